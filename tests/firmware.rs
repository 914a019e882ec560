//! The firmware of last resort: with every system OVMF hidden and no
//! `./firmware/`, `kiln smoke` boots golden with the `ovmf-prebuilt`
//! firmware built into kiln, and says so.

mod common;

use std::process::Command;

use common::Kiln;

/// Folders holding a system OVMF on this (Debian) host, hidden under empty
/// tmpfs mounts in a private mount namespace. /usr/share/qemu stays (QEMU
/// needs its ROMs); its OVMF.fd links into /usr/share/ovmf, hidden here.
const HIDDEN: &[&str] = &["/usr/share/OVMF", "/usr/share/ovmf"];

/// Exits 97 if any firmware file kiln would look for is still visible.
const NONE_LEFT: &str = "for f in /usr/share/OVMF/* /usr/share/ovmf/* /usr/share/qemu/OVMF*.fd \
     /usr/share/edk2/ovmf/* /usr/share/edk2/x64/* /usr/share/edk2-ovmf/x64/*; do \
     [ -f \"$f\" ] && { echo \"still visible: $f\" >&2; exit 97; }; done";

#[test]
fn smoke_boots_with_the_bundled_firmware_when_no_other_is_found() {
    common::require_root();
    common::require_build();
    common::require_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("unshare", "util-linux"),
    ]);
    let kiln = Kiln::shared();
    let dir = common::temp_dir("kiln-firmware-");
    let recipes = dir.path().join("recipes");
    common::copy_recipes(&recipes);
    let built = kiln.build(&recipes.join("golden.toml"), &[]);
    let firmware_dir = kiln.store.join("firmware-v1");
    if firmware_dir.exists() {
        std::fs::remove_dir_all(&firmware_dir).unwrap();
    }
    // Run from a folder without ./firmware.
    let cwd = dir.path().join("elsewhere");
    std::fs::create_dir(&cwd).unwrap();

    let mut script = String::from("set -e; ");
    for d in HIDDEN {
        script.push_str(&format!(
            "if [ -d {d} ]; then mount -t tmpfs kiln-hidden {d}; fi; "
        ));
    }
    script.push_str(NONE_LEFT);
    script.push_str("; exec \"$0\" \"$@\"");
    let mut cmd = Command::new("unshare");
    cmd.current_dir(&cwd)
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .arg(Kiln::binary())
        .arg("--cache")
        .arg(&kiln.store)
        .arg("--out")
        .arg(&kiln.out)
        .args(["--json", "smoke", "--accel", "tcg"])
        .arg(&built.image)
        .env_remove("KILN_CACHE_DIR");
    let done =
        common::run_with_deadline(cmd, common::KILN_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let (code, stdout, stderr) = (
        done.status.code(),
        String::from_utf8_lossy(&done.stdout).into_owned(),
        String::from_utf8_lossy(&done.stderr).into_owned(),
    );
    common::assert_no_mounts(&[&kiln.store, &kiln.out]).unwrap();
    common::assert_tmp_empty(&kiln.store).unwrap();
    assert_eq!(code, Some(0), "kiln smoke failed:\n{stdout}\n{stderr}");

    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let firmware = &report["firmware"];
    assert!(
        firmware["origin"]
            .as_str()
            .is_some_and(|o| o.contains("ovmf-prebuilt 0.1.0-alpha.1"))
            && firmware["path"]
                .as_str()
                .is_some_and(|p| p.contains("firmware-v1/")),
        "the report does not name the bundled firmware: {firmware}"
    );
    assert_eq!(report["checks_passed"], report["checks_total"], "{report}");
    assert!(report["checks_total"].as_u64().unwrap() >= 3, "{report}");
    let written: Vec<_> = std::fs::read_dir(&firmware_dir).unwrap().collect();
    assert_eq!(
        written.len(),
        1,
        "one firmware file in {}",
        firmware_dir.display()
    );
}
