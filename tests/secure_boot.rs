//! Secure Boot: a UKI signed at build time, and smoke boots under QEMU
//! (TCG here) with the firmware enforcing signatures. Boots are few, since
//! each costs a minute or two: one full boot of the signed golden image
//! (through `kiln build`'s smoke step), and two that end in the firmware (a
//! signed UKI with one changed byte, an unsigned image with `--secure-boot
//! on`). They fail, never skip, when root, the build tools, QEMU, sbsigntool
//! or virt-fw-vars are missing.
//!
//! The key pair is `tests/fixtures/secure-boot/` (tests only), so the signed
//! image has the same key every run and stays cached in the shared store.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use common::Kiln;
use serde_json::Value;

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Where the secure-boot OVMF build lives on Debian (package ovmf).
const SECBOOT_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
const VIRT_FW_VARS: &str = "/opt/kiln/venv/bin/virt-fw-vars";

/// Built once per run: a copy of `recipes/`, the key pair, golden built
/// signed (no smoke) into `signed/`, and unsigned into `unsigned/`, all in
/// one folder beside the shared store (see `common::once_per_run_dir`).
struct Images {
    dir: PathBuf,
    recipes: PathBuf,
    key: PathBuf,
    cert: PathBuf,
    signed_out: PathBuf,
    signed: PathBuf,
    unsigned: PathBuf,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/secure-boot")
        .join(name)
}

/// The test key pair, the key copied to a 0600 file (git keeps no mode).
fn key_pair(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("kiln-test.sb.key");
    std::fs::copy(fixture("kiln-test.sb.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (key, fixture("kiln-test.sb.crt"))
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        common::require_build();
        common::require_tools(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("sbsign", "sbsigntool"),
            ("sbverify", "sbsigntool"),
            ("openssl", "openssl"),
        ]);
        assert!(
            Path::new(SECBOOT_CODE).is_file(),
            "{SECBOOT_CODE} is missing: apt-get install ovmf (make deps)"
        );
        assert!(
            Path::new(VIRT_FW_VARS).is_file() || common::find_program("virt-fw-vars").is_some(),
            "virt-fw-vars is missing: make deps installs it into /opt/kiln/venv"
        );
        let dir = common::once_per_run_dir("secure-boot-test");
        let recipes = dir.join("recipes");
        common::copy_recipes(&recipes);
        let (key, cert) = key_pair(&dir);
        let golden = recipes.join("golden.toml");
        let signed_out = dir.join("signed");
        let signed = Kiln::at(&common::shared_store(), &signed_out)
            .build(
                &golden,
                &[
                    "--secure-boot-key",
                    key.to_str().unwrap(),
                    "--secure-boot-cert",
                    cert.to_str().unwrap(),
                ],
            )
            .image;
        let unsigned = Kiln::at(&common::shared_store(), &dir.join("unsigned"))
            .build(&golden, &[])
            .image;
        Images {
            recipes,
            key,
            cert,
            signed_out,
            signed,
            unsigned,
            dir,
        }
    })
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The certificate's SHA-256 fingerprint, as openssl shows it, in kiln's form.
fn fingerprint(cert: &Path) -> String {
    let (out, _) = common::tool(
        "openssl",
        &[
            OsStr::new("x509"),
            OsStr::new("-noout"),
            OsStr::new("-fingerprint"),
            OsStr::new("-sha256"),
            OsStr::new("-in"),
            cert.as_os_str(),
        ],
        &[],
    );
    String::from_utf8_lossy(&out)
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase()
}

/// The ESP's start in bytes in a raw disk.
fn esp_offset(raw: &Path) -> u64 {
    let (table, _) = common::tool("sfdisk", &[OsStr::new("--json"), raw.as_os_str()], &[]);
    let table: Value = serde_json::from_slice(&table).unwrap();
    table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512
}

fn qemu_img_convert(format: &str, from: &Path, to: &Path) {
    common::tool(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new(format),
            from.as_os_str(),
            to.as_os_str(),
        ],
        &[],
    );
}

/// `mcopy -i RAW@@ESP ARGS…`: files in and out of a raw disk's ESP.
fn mcopy(raw: &Path, args: &[&OsStr]) {
    let image = format!("{}@@{}", raw.display(), esp_offset(raw));
    let mut all = vec![OsStr::new("-i"), OsStr::new(&image)];
    all.extend(args);
    common::tool("mcopy", &all, &[("MTOOLS_SKIP_CHECK", "1")]);
}

const UKI_ON_ESP: &str = "::/EFI/BOOT/BOOTX64.EFI";

/// The UKI on `disk`'s ESP.
fn read_uki(disk: &Path, scratch: &Path) -> Vec<u8> {
    let raw = scratch.join("read.raw");
    qemu_img_convert("raw", disk, &raw);
    let uki = scratch.join("read-uki.efi");
    mcopy(&raw, &[OsStr::new(UKI_ON_ESP), uki.as_os_str()]);
    let data = std::fs::read(&uki).unwrap();
    std::fs::remove_file(&raw).unwrap();
    std::fs::remove_file(&uki).unwrap();
    data
}

/// A copy of `disk` at `to` whose UKI has one byte changed, in the middle
/// of the file (inside the kernel or initrd, which the signature covers).
fn change_one_uki_byte(disk: &Path, to: &Path, scratch: &Path) {
    let raw = scratch.join("changed.raw");
    qemu_img_convert("raw", disk, &raw);
    let uki = scratch.join("changed-uki.efi");
    mcopy(&raw, &[OsStr::new(UKI_ON_ESP), uki.as_os_str()]);
    let mut data = std::fs::read(&uki).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x01;
    std::fs::write(&uki, &data).unwrap();
    mcopy(
        &raw,
        &[OsStr::new("-o"), uki.as_os_str(), OsStr::new(UKI_ON_ESP)],
    );
    qemu_img_convert("qcow2", &raw, to);
    std::fs::remove_file(&raw).unwrap();
    std::fs::remove_file(&uki).unwrap();
}

/// A private TMPDIR for one kiln run: the smoke's overlay and its VARS
/// copy live there, and it must be empty afterwards.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: common::temp_dir("kiln-sb-tmp-"),
        }
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("TMPDIR", self.dir.path().to_str().unwrap())]
    }

    #[track_caller]
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(
            left.is_empty(),
            "temp files (the VARS copy?) left behind: {left:?}"
        );
        let needle = self.dir.path().to_string_lossy().into_owned();
        let qemus: Vec<_> = common::qemu_processes()
            .into_iter()
            .filter(|q| q.cmdline.contains(&needle))
            .collect();
        assert!(qemus.is_empty(), "QEMU left running: {qemus:?}");
    }
}

/// `kiln --json smoke IMAGE EXTRA… --log LOG` in a sandbox, which the
/// firmware must end: exit 3, the security-violation kind, the console
/// saying so, nothing left behind. Returns the report.
#[track_caller]
fn smoke_refused(image: &Path, extra: &[&str], log: &Path) -> Value {
    let sandbox = Sandbox::new();
    let mut args = vec!["--json", "smoke", image.to_str().unwrap()];
    args.extend(extra);
    args.extend(["--log", log.to_str().unwrap()]);
    let run = Kiln::at(&common::shared_store(), image.parent().unwrap()).run_in(
        &args,
        &sandbox.env(),
        None,
    );
    sandbox.assert_clean();
    run.assert_code(3);
    let report: Value = run.json();
    assert_eq!(
        report["failure"]["kind"],
        "security_violation",
        "{}",
        run.show()
    );
    assert!(
        report["failure"]["line"]
            .as_str()
            .is_some_and(|l| l.contains("Boot0001")),
        "the refusal names the disk's boot option:\n{}",
        run.show()
    );
    assert!(report["secure_boot"].is_object(), "{}", run.show());
    assert!(
        run.stderr
            .contains("Secure Boot refused to start the image's UKI"),
        "{}",
        run.show()
    );
    assert!(run.stderr.contains("fix: "), "{}", run.show());
    let console = std::fs::read_to_string(log).unwrap();
    assert!(
        console.contains("Access Denied") || console.contains("Security Violation"),
        "{console}"
    );
    report
}

#[test]
fn a_signed_image_boots_with_secure_boot_on_and_the_guest_sees_it_on() {
    let img = images();
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = tempfile::tempdir_in(&img.dir).unwrap();

    // The manifest: signed, by this certificate, with the unsigned digest.
    let manifest = read_json(&img.signed.with_file_name("golden.manifest.json"));
    let sb = &manifest["secure_boot"];
    assert_eq!(sb["certificate_sha256"], fingerprint(&img.cert));
    let uki = read_uki(&img.signed, scratch.path());
    assert_eq!(sb["signed_sha256"], sha256_hex(&uki));
    assert_ne!(sb["unsigned_sha256"], sb["signed_sha256"]);
    // The UKI on the ESP carries a valid signature by that certificate.
    let on_disk = scratch.path().join("uki.efi");
    std::fs::write(&on_disk, &uki).unwrap();
    common::tool(
        "sbverify",
        &[
            OsStr::new("--cert"),
            img.cert.as_os_str(),
            on_disk.as_os_str(),
        ],
        &[],
    );
    // An unsigned build is another image, with no signature recorded.
    let unsigned = read_json(&img.unsigned.with_file_name("golden.manifest.json"));
    assert!(unsigned.get("secure_boot").is_none(), "{unsigned}");
    assert_ne!(unsigned["image"]["key"], manifest["image"]["key"]);

    // The build's smoke step, booting with Secure Boot (auto: the image is
    // signed). --force-smoke: an earlier run may have remembered a pass.
    let sandbox = Sandbox::new();
    let kiln = Kiln::at(&common::shared_store(), &img.signed_out);
    let run = kiln.run_in(
        &[
            "--json",
            "build",
            img.recipes.join("golden.toml").to_str().unwrap(),
            "--force-smoke",
            "--secure-boot-key",
            img.key.to_str().unwrap(),
            "--secure-boot-cert",
            img.cert.to_str().unwrap(),
        ],
        &sandbox.env(),
        None,
    );
    run.assert_code(0);
    sandbox.assert_clean();
    let summary: Value = run.json();
    let image_row = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "image")
        .unwrap();
    assert_eq!(image_row["status"], "cached", "{}", run.show());
    let smoke = &summary["smoke"];
    assert_eq!(smoke["passed"], true, "{}", run.show());
    assert_eq!(
        smoke["secure_boot"]["certificate_sha256"],
        fingerprint(&img.cert)
    );
    assert!(
        smoke["firmware"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("OVMF_CODE_4M.secboot.fd")),
        "{smoke}"
    );
    // kiln's own check, reported like the others, saw Secure Boot on.
    let checks = smoke["checks"].as_array().unwrap();
    let sb_check = checks
        .iter()
        .find(|c| c["kind"] == "secureboot")
        .unwrap_or_else(|| panic!("no Secure Boot check in {smoke}"));
    assert_eq!(sb_check["passed"], true, "{sb_check}");
    assert!(
        sb_check["output"].to_string().contains("0   0   0   1"),
        "{sb_check}"
    );
    assert_eq!(smoke["checks_passed"], smoke["checks_total"]);
    let smoke_row = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "smoke")
        .unwrap();
    assert!(
        smoke_row["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Secure Boot on")),
        "{smoke_row}"
    );
    // The smoke record says so.
    let record = read_json(&img.signed.with_file_name("golden.smoke.json"));
    let predicate = &record["predicate"];
    assert_eq!(predicate["result"], "PASSED");
    assert_eq!(predicate["kilnSmoke"]["secureBoot"], true);
    assert!(
        predicate["passedTests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t.as_str().is_some_and(|t| t.starts_with("secure-boot: "))),
        "{predicate}"
    );
    assert!(
        predicate["configuration"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "secure-boot-db"
                && c["digest"]["sha256"] == fingerprint(&img.cert)),
        "{predicate}"
    );
    // The kernel saw it too (the console is in the smoke log).
    let console = std::fs::read_to_string(img.signed.with_file_name("golden.smoke.log")).unwrap();
    assert!(
        console.contains("Secure boot enabled"),
        "the kernel did not report Secure Boot"
    );
}

#[test]
fn a_signed_uki_with_one_changed_byte_is_refused() {
    let img = images();
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir_in(&img.dir).unwrap();
    // A copy of the signed image beside a copy of its manifest, so that
    // `--secure-boot auto` finds it signed and enrolls its certificate.
    let changed = dir.path().join("changed.qcow2");
    change_one_uki_byte(&img.signed, &changed, dir.path());
    std::fs::copy(
        img.signed.with_file_name("golden.manifest.json"),
        dir.path().join("changed.manifest.json"),
    )
    .unwrap();
    let report = smoke_refused(
        &changed,
        &[
            "--recipe",
            img.recipes.join("golden.toml").to_str().unwrap(),
        ],
        &dir.path().join("changed.smoke.log"),
    );
    assert_eq!(
        report["secure_boot"]["certificate_sha256"],
        fingerprint(&img.cert),
        "the image's own certificate was enrolled"
    );
    let record = read_json(&dir.path().join("changed.smoke.json"));
    assert_eq!(record["predicate"]["result"], "FAILED");
    assert_eq!(record["predicate"]["kilnSmoke"]["secureBoot"], true);
}

#[test]
fn an_unsigned_image_with_secure_boot_on_is_refused() {
    let img = images();
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let report = smoke_refused(
        &img.unsigned,
        &["--secure-boot", "on"],
        &img.dir.join("unsigned-on.smoke.log"),
    );
    assert!(
        report["secure_boot"]["certificate_origin"]
            .as_str()
            .is_some_and(|o| o.contains("snakeoil")),
        "an unsigned image is booted with Debian's test certificate enrolled: {report}"
    );
}

#[test]
fn quick_bad_secure_boot_keys_are_bad_input() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (key, cert) = key_pair(dir.path());
    let recipes = dir.path().join("recipes");
    common::copy_recipes(&recipes);
    let golden = recipes.join("golden.toml");
    let kiln = Kiln::with_store(&dir.path().join("store"));
    let build = |extra: &[&OsStr], env: &[(&str, &str)]| {
        let mut args = vec![OsStr::new("build"), golden.as_os_str()];
        args.extend(extra);
        kiln.run_in(&args, env, None)
    };
    let (k, c) = (
        OsStr::new("--secure-boot-key"),
        OsStr::new("--secure-boot-cert"),
    );

    let run = build(&[k, key.as_os_str()], &[]);
    run.assert_code(2);
    assert!(run.stderr.contains("go together"), "{}", run.show());
    // The environment counts as given.
    let run = build(&[], &[("KILN_SECURE_BOOT_CERT", cert.to_str().unwrap())]);
    run.assert_code(2);
    assert!(run.stderr.contains("go together"), "{}", run.show());
    // ...but set and empty is unset, as for KILN_SIGNING_KEY.
    let run = build(&[k, key.as_os_str()], &[("KILN_SECURE_BOOT_CERT", "")]);
    run.assert_code(2);
    assert!(run.stderr.contains("go together"), "{}", run.show());

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    build(&[k, key.as_os_str(), c, cert.as_os_str()], &[]).assert_bad_input(
        &key,
        "--secure-boot-key",
        "chmod 600",
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let garbage = dir.path().join("garbage.sb.key");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nnope\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
    build(&[k, garbage.as_os_str(), c, cert.as_os_str()], &[]).assert_bad_input(
        &garbage,
        "--secure-boot-key",
        "not an unencrypted private key",
    );
    let missing = dir.path().join("missing.sb.key");
    build(&[k, missing.as_os_str(), c, cert.as_os_str()], &[]).assert_bad_input(
        &missing,
        "--secure-boot-key",
        "cannot read",
    );
    build(&[k, key.as_os_str(), c, key.as_os_str()], &[]).assert_bad_input(
        &key,
        "--secure-boot-cert",
        "not an X.509 certificate",
    );
    // Nothing was built: bad input is refused before the store.
    assert!(!dir.path().join("store").exists());
}
