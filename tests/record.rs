//! The records of a build, with the real tools, as root: two cold builds
//! give the same disk (`--check-repro`), the SBOM passes the SPDX
//! validator, the provenance names the disk, and `kiln verify` finds drift.
//!
//! Costs two cold builds of a small recipe (golden's base and one files
//! layer), about two minutes. Never skips: a missing tool is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// Fresh for every run: the point is a build from an empty store. Beside
/// `KILN_TEST_STORE` when that is set, so parallel suites do not collide.
fn store() -> PathBuf {
    match std::env::var_os("KILN_TEST_STORE") {
        Some(s) => PathBuf::from(format!("{}-record", s.to_string_lossy())),
        None => PathBuf::from("/var/tmp/kiln-test-record-store"),
    }
}
/// The first build's caller state: neither kiln's own (umask 022, UTC) nor
/// that of `--check-repro`'s second build (umask 002, Asia/Kathmandu).
const CALLER_UMASK: libc::mode_t = 0o077;
const CALLER_TZ: &str = "America/St_Johns";
/// The SPDX validator (spdx-tools from PyPI), installed once.
const VENV: &str = "/var/tmp/kiln-test-spdx-venv";
const DRIFT: i32 = 4;

/// A fresh copy of the fixture recipe (so its lock is written there, and
/// the first build resolves against the archive like a user's would).
fn recipe(dir: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repro");
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::copy(fixture.join("repro.toml"), dir.join("repro.toml")).unwrap();
    std::fs::copy(fixture.join("files/motd"), dir.join("files/motd")).unwrap();
    dir.join("repro.toml")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?} -> {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn kiln(out_dir: &Path, args: &[&str]) -> Output {
    run(&mut kiln_cmd(out_dir, args))
}

fn kiln_cmd(out_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(KILN);
    cmd.arg("--cache")
        .arg(store())
        .arg("--out")
        .arg(out_dir)
        .args(args);
    cmd
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The two JSON documents of a successful `--json build --check-repro`:
/// the build's summary and the repro report.
fn repro_docs(built: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "build --check-repro failed:\n{stdout}"
    );
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        docs.len(),
        2,
        "a build summary and a repro report: {stdout}"
    );
    docs
}

fn require_tools(tools: &[&str]) {
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "`{t}` is not installed: run `make deps` (this test never skips)"
        );
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the record tests build images and must run as root"
    );
}

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pyspdxtools() -> PathBuf {
    let bin = Path::new(VENV).join("bin/pyspdxtools");
    if !bin.is_file() {
        assert!(
            run(Command::new("python3").args(["-m", "venv", VENV]))
                .status
                .success(),
            "python3 -m venv failed"
        );
        let pip = Path::new(VENV).join("bin/pip");
        assert!(
            run(Command::new(pip).args(["install", "-q", "spdx-tools"]))
                .status
                .success(),
            "pip install spdx-tools failed"
        );
    }
    bin
}

#[test]
fn cold_builds_are_identical_and_records_hold() {
    require_tools(&[
        "mmdebstrap",
        "mke2fs",
        "debugfs",
        "sfdisk",
        "mcopy",
        "mkfs.fat",
        "objcopy",
        "qemu-img",
        "python3",
    ]);
    if store().exists() {
        std::fs::remove_dir_all(store()).unwrap();
    }
    let out = tempfile::Builder::new()
        .prefix("kiln-record-out-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let recipes = tempfile::Builder::new()
        .prefix("kiln-record-recipe-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let recipe = recipe(recipes.path());
    let recipe_arg = recipe.to_str().unwrap();

    // Build, then build again into an empty temporary store and compare.
    // The two builds run with different umasks and time zones (this one
    // from the caller, the second from --check-repro): neither may reach
    // the disk.
    let mut first = kiln_cmd(
        out.path(),
        &["--json", "build", "--check-repro", recipe_arg],
    );
    first.env("TZ", CALLER_TZ).env("LC_ALL", "POSIX");
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe {
        use std::os::unix::process::CommandExt;
        first.pre_exec(|| {
            libc::umask(CALLER_UMASK);
            Ok(())
        });
    }
    let built = run(&mut first);
    let docs = repro_docs(&built);
    let image = out.path().join("repro.qcow2");
    let digest = sha256(&image);
    assert!(
        String::from_utf8_lossy(&built.stderr).contains("with umask 002 and TZ=Asia/Kathmandu"),
        "the second build does not run with another umask and time zone"
    );
    let report = &docs[1];
    assert_eq!(report["reproducible"], true, "{report}");
    assert_eq!(report["first_sha256"], digest.as_str());
    assert_eq!(
        report["second_sha256"],
        digest.as_str(),
        "two cold builds in two empty stores differ: {report}"
    );

    // The SBOM passes the reference SPDX validator.
    let sbom = out.path().join("repro.spdx.json");
    let valid = run(Command::new(pyspdxtools()).arg("-i").arg(&sbom));
    assert!(
        valid.status.success(),
        "pyspdxtools rejected {}: {}",
        sbom.display(),
        String::from_utf8_lossy(&valid.stdout)
    );
    let sbom: Value = serde_json::from_slice(&std::fs::read(&sbom).unwrap()).unwrap();
    let purls: Vec<&str> = sbom["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["externalRefs"][0]["referenceLocator"].as_str())
        .collect();
    assert!(
        purls
            .iter()
            .any(|p| p.starts_with("pkg:deb/debian/systemd@") && p.contains("arch=amd64")),
        "{purls:?}"
    );

    // The provenance names the disk by its digest.
    let prov: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("repro.provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(prov["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(prov["subject"][0]["name"], "repro.qcow2");
    assert_eq!(prov["subject"][0]["digest"]["sha256"], digest.as_str());
    let deps = prov["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(deps
        .iter()
        .any(|d| d["name"].as_str().unwrap().starts_with("recipe:")));
    assert!(deps
        .iter()
        .any(|d| d["name"].as_str().unwrap().contains("files/motd")));

    // The manifest lists the copied file with its digest, and packages.
    let manifest_path = out.path().join("repro.manifest.json");
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["image"]["sha256"], digest.as_str());
    let motd_sha = sha256(&recipe.parent().unwrap().join("files/motd"));
    let files = manifest["files"].as_array().unwrap();
    let motd = files
        .iter()
        .find(|f| f["path"] == "/etc/motd")
        .expect("/etc/motd in the manifest");
    assert_eq!(motd["sha256"], motd_sha.as_str());
    assert_eq!(motd["mode"], "0644");
    assert!(manifest["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "systemd"));

    let inspect = kiln(out.path(), &["inspect", image.to_str().unwrap()]);
    assert!(inspect.status.success());
    assert!(String::from_utf8_lossy(&inspect.stdout).contains(&digest));
    let log = json(&kiln(out.path(), &["--json", "log", recipe_arg]));
    assert_eq!(log[0]["image_sha256"], digest.as_str(), "{log}");

    // A fresh disk is clean; its root tree, dumped, is clean too.
    let root = out.path().join("root");
    let verified = kiln(
        out.path(),
        &[
            "verify",
            image.to_str().unwrap(),
            "--extract",
            root.to_str().unwrap(),
        ],
    );
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let verify_root = || {
        let o = kiln(
            out.path(),
            &[
                "--json",
                "verify",
                "--root",
                root.to_str().unwrap(),
                "--manifest",
                manifest_path.to_str().unwrap(),
            ],
        );
        (o.status.code(), json(&o))
    };
    let (code, report) = verify_root();
    assert_eq!(code, Some(0), "{report}");

    // One byte of one file: exactly that file, exit 4.
    let motd_path = root.join("etc/motd");
    let mut data = std::fs::read(&motd_path).unwrap();
    data[0] ^= 1;
    std::fs::write(&motd_path, &data).unwrap();
    let (code, report) = verify_root();
    assert_eq!(code, Some(DRIFT), "{report}");
    assert_eq!(report["modified"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["modified"][0]["path"], "/etc/motd");
    assert_eq!(report["modified"][0]["changes"][0], "content");
    assert_eq!(report["added"], serde_json::json!([]));
    assert_eq!(report["removed"], serde_json::json!([]));

    // Put it back; a new file under /usr is added; a change under /var is not drift.
    data[0] ^= 1;
    std::fs::write(&motd_path, &data).unwrap();
    std::fs::write(root.join("usr/bin/kiln-test-added"), "#!/bin/sh\n").unwrap();
    std::fs::write(root.join("var/kiln-test-state"), "state\n").unwrap();
    let (code, report) = verify_root();
    assert_eq!(code, Some(DRIFT), "{report}");
    assert_eq!(
        report["added"],
        serde_json::json!(["/usr/bin/kiln-test-added"]),
        "{report}"
    );
    assert_eq!(report["modified"], serde_json::json!([]), "{report}");
    std::fs::remove_file(root.join("usr/bin/kiln-test-added")).unwrap();
    let (code, report) = verify_root();
    assert_eq!(
        code,
        Some(0),
        "a change under /var must be ignored: {report}"
    );

    same_pins_resolved_later_reuse_the_layers_and_rebuild_identically(out.path(), &recipe);
    std::fs::remove_dir_all(store()).unwrap();
}

/// The same pins resolved again later (another recipe's lock, or
/// `kiln lock --update` finding nothing new) keep every step key, so the
/// warm layers are used, but their SOURCE_DATE_EPOCH is later than those
/// layers' builds. The image must still be what a cold build of that lock
/// gives: a layer's times are its inputs', not its build's clock.
fn same_pins_resolved_later_reuse_the_layers_and_rebuild_identically(out: &Path, recipe: &Path) {
    let lock = recipe.with_extension("lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut moved = 0;
    let shifted: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("resolved = ") {
                moved += 1;
                format!("resolved = {later}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(
        moved > 0,
        "no `resolved` line in {}:\n{text}",
        lock.display()
    );
    std::fs::write(&lock, shifted.join("\n") + "\n").unwrap();

    let built = kiln(
        out,
        &[
            "--json",
            "build",
            "--no-smoke",
            "--check-repro",
            recipe.to_str().unwrap(),
        ],
    );
    let docs = repro_docs(&built);
    let rows = docs[0]["rows"].as_array().expect("the summary's rows");
    for row in rows {
        let expected = if row["stage"] == "image" {
            "built"
        } else {
            "cached"
        };
        assert_eq!(row["status"], expected, "{row}");
    }
    assert_eq!(docs[1]["reproducible"], true, "{}", docs[1]);
}
