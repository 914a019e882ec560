//! First-boot access, proved in real smoke boots under QEMU: root's SSH
//! key passed as a systemd credential (recipes/ssh.toml), and a cloud-init
//! NoCloud seed written by kiln (recipes/cloud.toml). Each boot serves
//! several assertions; they cost a minute or more each under TCG. The
//! tests fail, never skip, when root, the build tools, QEMU or OpenSSH
//! are missing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use common::{Kiln, Run};

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Built once per test run (without smoke) in `<shared store>.access-test/`,
/// removed when the test binary exits: a copy of `recipes/` and its out dir.
struct Images {
    recipes: PathBuf,
    out: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        common::require_build();
        common::require_tools(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("ssh", "openssh-client"),
            ("ssh-keygen", "openssh-client"),
        ]);
        let dir = common::once_per_run_dir("access-test");
        let recipes = dir.join("recipes");
        common::copy_recipes(&recipes);
        Images {
            recipes,
            out: dir.join("out"),
        }
    })
}

/// `out/NAME.qcow2`, built (without smoke) the first time it is asked for.
fn image(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let imgs = images();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let recipe = imgs.recipes.join(format!("{name}.toml"));
        Kiln::at(&common::shared_store(), &imgs.out).build(&recipe, &[]);
        built.push(name.to_owned());
    }
    imgs.out.join(format!("{name}.qcow2"))
}

/// `kiln --json smoke IMAGE EXTRA…` with a TMPDIR of its own, which must
/// be empty afterwards: the throwaway keys, the known_hosts file and the
/// seed volume live there and go with the boot.
fn smoke(image: &Path, extra: &[&str]) -> (Run, serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["--json", "smoke", image.to_str().unwrap()];
    args.extend(extra);
    let run = Kiln::at(&common::shared_store(), &images().out).run_in(
        &args,
        &[("TMPDIR", tmp.path().to_str().unwrap())],
        None,
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
    let report = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}", run.show()));
    (run, report)
}

/// The results of one kind (`ssh`, `ssh_other_key`, `cloud_init`, …).
fn checks_of<'a>(report: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    report["checks"]
        .as_array()
        .expect("checks is a list")
        .iter()
        .filter(|c| c["kind"] == kind)
        .collect()
}

fn host_keys(report: &serde_json::Value) -> Vec<String> {
    report["ssh_host_keys"]
        .as_array()
        .map(|a| a.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Paths of the image's manifest (`NAME.manifest.json` beside it).
fn manifest_paths(image: &Path) -> Vec<String> {
    let path = image.with_extension("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["files"]
        .as_array()
        .expect("the manifest lists files")
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect()
}

/// No SSH host key (private or public) in the disk or its manifest.
fn assert_no_host_keys(image: &Path) {
    let baked: Vec<String> = manifest_paths(image)
        .into_iter()
        .filter(|p| p.starts_with("/etc/ssh/ssh_host_"))
        .collect();
    assert!(baked.is_empty(), "host keys in the image: {baked:?}");
    common::require_inspect();
    let disk = common::Disk::open(image);
    for kind in ["ed25519", "ecdsa", "rsa"] {
        let file = format!("/etc/ssh/ssh_host_{kind}_key");
        assert!(disk.root_file(&file).is_none(), "{file} is in the image");
    }
}

#[test]
fn ssh_login_with_a_credential_key_and_fresh_host_keys_at_every_boot() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image("ssh");
    let recipe = images().recipes.join("ssh.toml");
    assert_no_host_keys(&img);

    // Boot 1: kiln's throwaway key is root's, every check passes.
    let (run, first) = smoke(&img, &[]);
    run.assert_code(0);
    let ssh_checks = recipe_ssh_checks(&recipe);
    assert!(!ssh_checks.is_empty(), "ssh.toml has ssh_checks");
    let ran = checks_of(&first, "ssh");
    assert_eq!(ran.len(), ssh_checks.len(), "{first:#}");
    for (result, command) in ran.iter().zip(&ssh_checks) {
        assert_eq!(result["check"], command.as_str());
        assert_eq!(result["passed"], true, "{result:#}");
        assert_eq!(result["exit_code"], 0);
    }
    // A key the guest was not given is refused.
    let other = checks_of(&first, "ssh_other_key");
    assert_eq!(other.len(), 1, "{first:#}");
    assert_eq!(other[0]["passed"], true, "{first:#}");
    assert!(
        other[0]["output"][0]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{first:#}"
    );
    assert_eq!(first["checks_passed"], first["checks_total"]);
    let keys = host_keys(&first);
    assert!(
        keys.iter().any(|k| k.starts_with("ssh-ed25519 ")),
        "{keys:?}"
    );
    // The guest printed its fingerprints on the console too.
    let log = std::fs::read_to_string(first["log"].as_str().unwrap()).unwrap();
    assert!(
        log.contains("SSH host key: 256 SHA256:"),
        "no fingerprints in the console log"
    );

    // Boot 2, same disk: root is given another key, so kiln's is refused:
    // its own failure kind, exit 3. The guest made new host keys.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("someone");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", common::describe(&made));
    let pubkey = key.with_extension("pub");
    let (run, second) = smoke(&img, &["--ssh-authorized-key", pubkey.to_str().unwrap()]);
    run.assert_code(3);
    assert_eq!(second["failure"]["kind"], "ssh_login_refused", "{second:#}");
    assert_eq!(second["failure"]["user"], "root");
    assert!(
        run.stderr.contains("refused the SSH login as root"),
        "{}",
        run.show()
    );
    assert!(checks_of(&second, "ssh").is_empty(), "{second:#}");
    let again = host_keys(&second);
    assert!(!again.is_empty(), "{second:#}");
    for k in &again {
        assert!(!keys.contains(k), "boot 2 has boot 1's host key {k}");
    }
    assert_no_host_keys(&img);
}

#[test]
fn cloud_init_takes_host_name_and_user_from_kilns_seed() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    common::require_tools(&[("mkfs.fat", "dosfstools"), ("mcopy", "mtools")]);
    let img = image("cloud");
    // No instance data and no host keys in the image.
    let instance: Vec<String> = manifest_paths(&img)
        .into_iter()
        .filter(|p| p.starts_with("/var/lib/cloud/instance") || p.starts_with("/home/kiln"))
        .collect();
    assert!(
        instance.is_empty(),
        "instance data in the image: {instance:?}"
    );
    assert_no_host_keys(&img);

    let (run, report) = smoke(&img, &[]);
    run.assert_code(0);
    let cloud = checks_of(&report, "cloud_init");
    assert_eq!(cloud.len(), 1, "{report:#}");
    assert_eq!(cloud[0]["passed"], true, "{report:#}");
    let what = cloud[0]["check"].as_str().unwrap();
    assert!(
        what.contains("user kiln") && what.contains("host name kiln-"),
        "{what}"
    );
    // Root's login (ssh.toml's) works in the same boot.
    assert!(!checks_of(&report, "ssh").is_empty(), "{report:#}");
    assert_eq!(
        report["checks_passed"], report["checks_total"],
        "{report:#}"
    );
}

#[test]
fn quick_ssh_options_are_checked_before_any_boot() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    std::fs::write(&img, b"not booted").unwrap();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/golden.toml");
    let kiln = Kiln::with_store(&dir.path().join("store"));
    let key = dir.path().join("k.pub");
    std::fs::write(&key, "ssh-ed25519 AAAAC3Nz kiln\n").unwrap();
    let run = kiln.run(&[
        "smoke",
        img.to_str().unwrap(),
        "--recipe",
        golden.to_str().unwrap(),
        "--ssh-authorized-key",
        key.to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(run.stderr.contains("add --ssh"), "{}", run.show());
    std::fs::write(&key, "not a key\n").unwrap();
    let run = kiln.run(&[
        "smoke",
        img.to_str().unwrap(),
        "--recipe",
        golden.to_str().unwrap(),
        "--ssh",
        "--ssh-authorized-key",
        key.to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(
        run.stderr.contains(key.to_str().unwrap()) && run.stderr.contains("OpenSSH public key"),
        "{}",
        run.show()
    );
}

/// `[smoke] ssh_checks` of a recipe and those it extends, in kiln's order.
fn recipe_ssh_checks(recipe: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(recipe).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let mut checks = match doc.get("extends").and_then(|v| v.as_str()) {
        Some(parent) => recipe_ssh_checks(&recipe.parent().unwrap().join(parent)),
        None => Vec::new(),
    };
    if let Some(list) = doc
        .get("smoke")
        .and_then(|s| s.get("ssh_checks"))
        .and_then(|v| v.as_array())
    {
        checks.extend(list.iter().map(|v| v.as_str().unwrap().to_owned()));
    }
    checks
}
