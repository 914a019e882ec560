//! Sealed images (`[image] verity = true`): recipes/sealed.toml built and
//! booted under QEMU (TCG here) into the shared test store; a copy of its
//! disk with one byte of a file changed; `kiln verify` of both; and kiln
//! itself run in a booted sealed guest to check the running root hash.
//! They fail, never skip, when root, the build tools or QEMU are missing.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// "Linux root verity (x86-64)" from the Discoverable Partitions Specification.
const ROOT_VERITY_TYPE: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";

/// Built once per run in `<shared store>.sealed-test/`: a copy of
/// `recipes/` and its out dir, with sealed.toml built and smoked.
struct Sealed {
    recipes: PathBuf,
    kiln: common::Kiln,
    build: common::BuildReport,
}

impl Sealed {
    fn disk(&self) -> PathBuf {
        self.kiln.out.join("sealed.qcow2")
    }
    fn manifest_path(&self) -> PathBuf {
        self.kiln.out.join("sealed.manifest.json")
    }
    fn manifest(&self) -> serde_json::Value {
        read_json(&self.manifest_path())
    }
    fn root_hash(&self) -> String {
        self.manifest()["verity"]["root_hash"]
            .as_str()
            .expect("the manifest of a sealed image records its root hash")
            .to_owned()
    }
}

fn sealed() -> &'static Sealed {
    static SEALED: OnceLock<Sealed> = OnceLock::new();
    SEALED.get_or_init(|| {
        common::require_build();
        common::require_tools(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("veritysetup", "cryptsetup-bin"),
        ]);
        let dir = common::once_per_run_dir("sealed-test");
        let recipes = dir.join("recipes");
        common::copy_recipes(&recipes);
        let kiln = common::Kiln::at(&common::shared_store(), &dir.join("out"));
        let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
        let build = kiln.build_with_smoke(&recipes.join("sealed.toml"), &["--force-smoke"]);
        Sealed {
            recipes,
            kiln,
            build,
        }
    })
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A GPT UUID as sfdisk prints it, from 32 hex digits.
fn uuid(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
    .to_uppercase()
}

/// The in-guest checks a smoke record lists, by name.
fn record_check<'a>(record: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    record["predicate"]["kilnSmoke"]["checks"]
        .as_array()
        .expect("the smoke record lists its checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check `{name}` in the smoke record: {record:#}"))
}

#[test]
fn sealed_recipe_boots_read_only_on_its_root_hash() {
    let s = sealed();
    assert_eq!(s.build.row("smoke").status, "passed", "{:#?}", s.build);
    let root_hash = s.root_hash();
    assert_eq!(root_hash.len(), 64, "{root_hash}");

    // kiln's own check ran in the guest and passed: / read-only from
    // /dev/mapper/root, a verity target with the manifest's root hash, and
    // /usr refusing a write.
    let record = read_json(&s.kiln.out.join("sealed.smoke.json"));
    let check = record_check(&record, "sealed");
    assert_eq!(check["kind"], "sealed", "{check:#}");
    assert_eq!(check["result"], "PASSED", "{check:#}");
    let output = check["output"].to_string();
    assert!(
        output.contains("/ is mounted from /dev/mapper/root ro"),
        "{output}"
    );
    assert!(
        output.contains(&format!("running root hash {root_hash}")),
        "{output}"
    );
    assert!(
        output.contains("a write to /usr failed, as it should"),
        "{output}"
    );
    // ...and so did the recipe's own checks (golden's and sealed.toml's).
    let checks = common::smoke_checks(&s.recipes.join("sealed.toml")).checks;
    for n in 1..=checks.len() {
        let c = record_check(&record, &format!("check {n}"));
        assert_eq!(c["result"], "PASSED", "{c:#}");
    }

    // The disk: the data partition's UUID is the first half of the root
    // hash, the hash partition's (typed root-verity) the second.
    let disk = common::Disk::open(&s.disk());
    let parts = &disk.table.partitions;
    assert_eq!(parts.len(), 3, "{:#?}", disk.table);
    let uuids: Vec<String> = {
        let (json, _) = common::tool("sfdisk", &[OsStr::new("--json"), disk.raw.as_os_str()], &[]);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["uuid"].as_str().unwrap().to_uppercase())
            .collect()
    };
    assert_eq!(parts[1].type_.to_uppercase(), common::ROOT_TYPE);
    assert_eq!(uuids[1], uuid(&root_hash[..32]));
    assert_eq!(parts[2].type_.to_uppercase(), ROOT_VERITY_TYPE);
    assert_eq!(parts[2].name.as_deref(), Some("root-verity"));
    assert_eq!(uuids[2], uuid(&root_hash[32..]));
    // The UKI's command line names the root hash.
    let uki = disk
        .esp_file("::/EFI/BOOT/BOOTX64.EFI")
        .expect("the ESP holds the UKI");
    let wanted = format!("root=/dev/mapper/root roothash={root_hash} systemd.verity_root_options=panic-on-corruption ro");
    assert!(
        uki.windows(wanted.len()).any(|w| w == wanted.as_bytes()),
        "the UKI's command line lacks `{wanted}`"
    );
    // The root is mounted read-only and never checked; machine-id is empty.
    let fstab = disk.root_text("/etc/fstab");
    assert!(fstab.contains("/dev/mapper/root / ext4 ro 0 0"), "{fstab}");
    assert_eq!(disk.root_text("/etc/machine-id"), "");

    // `kiln verify` recomputes the root hash from the disk.
    let run = s.kiln.run(&[OsStr::new("verify"), s.disk().as_os_str()]);
    run.assert_code(0);
    assert!(
        run.stdout.contains(&format!(
            "sealed: root hash {root_hash} (computed from the disk's root partition) matches the manifest"
        )),
        "{}",
        run.show()
    );
}

#[test]
fn a_tampered_root_fails_its_smoke_as_root_tampered_and_its_verify() {
    let s = sealed();
    let original = sha256(&s.disk());
    assert_eq!(original, s.manifest()["image"]["sha256"]);

    // A copy of the disk with one byte changed in /etc/hostname's data
    // block (systemd reads it at every boot), found with debugfs.
    let work = common::temp_dir("kiln-sealed-tamper-");
    let disk = common::Disk::open(&s.disk());
    assert_eq!(disk.root_text("/etc/hostname"), "sealed\n");
    let fs = format!(
        "{}?offset={}",
        disk.raw.display(),
        disk.root().start * disk.sector()
    );
    let (block, _) = common::tool(
        "debugfs",
        &[
            OsStr::new("-R"),
            OsStr::new("bmap /etc/hostname 0"),
            OsStr::new(&fs),
        ],
        &[],
    );
    let block: u64 = String::from_utf8_lossy(&block)
        .trim()
        .parse()
        .expect("debugfs bmap prints a block number");
    let at = disk.root().start * disk.sector() + block * 4096;
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk.raw)
            .unwrap();
        let mut byte = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut byte).unwrap();
        assert_eq!(
            &byte, b"s",
            "/etc/hostname's block is not where debugfs said"
        );
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(b"S").unwrap();
    }
    let tampered = work.path().join("tampered.qcow2");
    common::tool(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("qcow2"),
            disk.raw.as_os_str(),
            tampered.as_os_str(),
        ],
        &[],
    );
    drop(disk);

    // `kiln verify` against the image's manifest: the root hash differs
    // (exit 4, drift), and says which file.
    let run = s.kiln.run(&[
        OsStr::new("verify"),
        OsStr::new("--manifest"),
        s.manifest_path().as_os_str(),
        tampered.as_os_str(),
    ]);
    run.assert_code(4);
    assert!(
        run.stdout
            .contains(&format!("root hash differs: manifest {}", s.root_hash())),
        "{}",
        run.show()
    );
    assert!(
        run.stdout.contains("modified  /etc/hostname"),
        "{}",
        run.show()
    );

    // The smoke: the kernel's verity error, not a timeout; exit 3.
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let run = s.kiln.run(&[
        OsStr::new("--json"),
        OsStr::new("smoke"),
        OsStr::new("--recipe"),
        s.recipes.join("sealed.toml").as_os_str(),
        tampered.as_os_str(),
    ]);
    run.assert_code(3);
    let report: serde_json::Value = run.json();
    let failure = &report["failure"];
    assert_eq!(failure["kind"], "root_tampered", "{}", run.show());
    let line = failure["line"].as_str().unwrap_or_default();
    assert!(
        line.contains("device-mapper: verity") && line.contains("is corrupted"),
        "{}",
        run.show()
    );
    assert!(run.stderr.contains("root tampered"), "{}", run.show());

    // The original disk is as it was built.
    assert_eq!(sha256(&s.disk()), original);
}

#[test]
fn verify_root_on_a_running_sealed_system_compares_its_root_hash() {
    let s = sealed();
    common::require_tools(&[("objcopy", "binutils")]);
    // sealed.toml plus kiln itself, so the guest can run `kiln verify
    // --root /` (the host's binary: the guest's glibc is newer).
    let kiln_file = s.recipes.join("files/kiln");
    common::tool(
        "objcopy",
        &[
            OsStr::new("--strip-debug"),
            OsStr::new(common::Kiln::binary()),
            kiln_file.as_os_str(),
        ],
        &[],
    );
    let recipe = s.recipes.join("sealed-kiln.toml");
    std::fs::write(
        &recipe,
        r#"extends = "sealed.toml"

[image]
name = "sealed-kiln"

[[layer]]
name = "kiln-binary"
files = [{ src = "files/kiln", dest = "/usr/local/bin/kiln", mode = "0755" }]
"#,
    )
    .unwrap();
    s.kiln.build(&recipe, &[]);
    let manifest_path = s.kiln.out.join("sealed-kiln.manifest.json");
    let mut manifest = read_json(&manifest_path);
    let root_hash = manifest["verity"]["root_hash"].as_str().unwrap().to_owned();
    // The manifest carried in on the check's command line: the root hash
    // check needs neither the file list nor the packages.
    manifest["files"] = serde_json::Value::Null;
    manifest["packages"] = serde_json::json!([]);
    let good = manifest.to_string();
    manifest["verity"]["root_hash"] = serde_json::json!("0".repeat(64));
    let bad = manifest.to_string();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let clean = format!(
        "printf '%s' {} > /run/m.json && kiln verify --root / --manifest /run/m.json",
        quote(&good)
    );
    let mismatch = format!(
        "printf '%s' {} > /run/bad.json; kiln verify --root / --manifest /run/bad.json; rc=$?; echo \"exit $rc\"; test $rc = 4",
        quote(&bad)
    );

    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let image = s.kiln.out.join("sealed-kiln.qcow2");
    let run = s.kiln.run(&[
        OsStr::new("smoke"),
        OsStr::new("--check"),
        OsStr::new(&clean),
        OsStr::new("--check"),
        OsStr::new(&mismatch),
        image.as_os_str(),
    ]);
    run.assert_code(0);
    let record = read_json(&s.kiln.out.join("sealed-kiln.smoke.json"));
    let n = common::smoke_checks(&s.recipes.join("sealed.toml"))
        .checks
        .len();
    // sealed.toml's image has veritysetup (cryptsetup-bin, for its
    // initrd), which `kiln verify --root` asks first.
    let output = record_check(&record, &format!("check {}", n + 1))["output"].to_string();
    assert!(
        output.contains(&format!(
            "sealed: root hash {root_hash} (veritysetup status root) matches the manifest"
        )),
        "{output}"
    );
    let output = record_check(&record, &format!("check {}", n + 2))["output"].to_string();
    assert!(
        output.contains(&format!(
            "root hash differs: manifest {} , veritysetup status root {root_hash}",
            "0".repeat(64)
        )),
        "{output}"
    );
    assert!(output.contains("exit 4"), "{output}");
}

#[test]
fn a_sealed_image_builds_bit_identically_from_an_empty_store() {
    let s = sealed();
    // `--check-repro` builds sealed.toml again from its lock into an empty
    // store (every layer cold, with another umask and time zone) and
    // compares the disks. The root hash is a function of the root
    // partition's bytes and sits on the UKI's command line on the ESP, so
    // equal disks also mean an equal root hash.
    let run = s.kiln.run(&[
        OsStr::new("--json"),
        OsStr::new("build"),
        OsStr::new("--no-smoke"),
        OsStr::new("--check-repro"),
        s.recipes.join("sealed.toml").as_os_str(),
    ]);
    run.assert_code(0);
    let docs: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&run.stdout)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        docs.len(),
        2,
        "a build summary and a repro report: {}",
        run.show()
    );
    let report = &docs[1];
    let disk = sha256(&s.disk());
    assert_eq!(report["reproducible"], true, "{report}");
    assert_eq!(report["first_sha256"], disk.as_str(), "{report}");
    assert_eq!(report["second_sha256"], disk.as_str(), "{report}");
    assert!(
        report["second_build_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

#[test]
fn a_sealed_recipe_without_an_initrd_that_opens_verity_is_refused() {
    let s = sealed();
    // golden with verity on: its initrd is initramfs-tools' without
    // veritysetup or a script that runs it, and initramfs-tools ignores
    // roothash=. Refused at assembly, with what to add; nothing published.
    let recipe = s.recipes.join("golden-verity.toml");
    std::fs::write(
        &recipe,
        "extends = \"golden.toml\"\n\n[image]\nname = \"golden-verity\"\nverity = true\n",
    )
    .unwrap();
    let image_key = s.kiln.plan(&recipe).image_key();
    let run = s.kiln.run(&[
        OsStr::new("build"),
        OsStr::new("--no-smoke"),
        recipe.as_os_str(),
    ]);
    run.assert_bad_input(&recipe, "image.verity", "cryptsetup-bin");
    for what in [
        "a local-top script that runs veritysetup",
        "dmsetup",
        "sealed.toml",
    ] {
        assert!(run.stderr.contains(what), "no `{what}`: {}", run.show());
    }
    assert!(
        !s.kiln.store.join("images-v1").join(&image_key).exists(),
        "a refused image was published"
    );
    assert!(!s.kiln.out.join("golden-verity.qcow2").exists());
}
