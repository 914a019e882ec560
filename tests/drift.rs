//! Drift on a live server: boot the web image, change a file under /etc
//! inside the guest, shut it down cleanly keeping what it wrote, and show
//! that `kiln verify --root` on that guest's root reports exactly that
//! change (and `kiln verify` on its disk fails). Real build, real boot.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn kiln(out: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--cache")
        .arg(common::shared_store())
        .arg("--out")
        .arg(out)
        .args(args)
        .env_remove("KILN_CACHE_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn describe(out: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.path().extension().is_none_or(|e| e != "lock") {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_change_made_on_the_live_server_is_reported() {
    common::require_build();
    common::require_tools(&[("qemu-system-x86_64", "qemu-system-x86"), ("debugfs", "e2fsprogs")]);
    let dir = tempfile::Builder::new().prefix("kiln-drift-").tempdir().unwrap();
    let recipes = dir.path().join("recipes");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"), &recipes);
    let out = dir.path().join("out");
    let built = kiln(&out, &["build", "--no-smoke", recipes.join("web.toml").to_str().unwrap()]);
    assert_eq!(built.status.code(), Some(0), "{}", describe(&built));
    let manifest = out.join("web.manifest.json");

    // The live server: booted, a change made by hand under /etc, shut down.
    let live = out.join("web-live.qcow2");
    let booted = kiln(
        &out,
        &["smoke", "--keep-overlay", live.to_str().unwrap(), "--check", "echo 'edited by hand on the server' >> /etc/motd", out.join("web.qcow2").to_str().unwrap()],
    );
    assert_eq!(booted.status.code(), Some(0), "{}", describe(&booted));

    // The disk no longer matches what was built; extract its root.
    let root = dir.path().join("live-root");
    let on_disk = kiln(&out, &["verify", live.to_str().unwrap(), "--manifest", manifest.to_str().unwrap(), "--extract", root.to_str().unwrap()]);
    assert_eq!(on_disk.status.code(), Some(4), "{}", describe(&on_disk));

    // Against that root, what a running system changes by design (/var,
    // machine-id, …) is ignored and the hand edit is reported.
    let report = kiln(&out, &["--json", "verify", "--root", root.to_str().unwrap(), "--manifest", manifest.to_str().unwrap()]);
    assert_eq!(report.status.code(), Some(4), "{}", describe(&report));
    let r: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let modified: Vec<&str> = r["modified"].as_array().unwrap().iter().map(|m| m["path"].as_str().unwrap()).collect();
    assert!(modified.contains(&"/etc/motd"), "{r:#}");
    let elsewhere: Vec<&str> = modified.iter().copied().chain(r["added"].as_array().unwrap().iter().map(|p| p.as_str().unwrap())).filter(|p| p.starts_with("/usr")).collect();
    assert!(elsewhere.is_empty(), "a boot changed /usr: {elsewhere:?}");

    // The built image itself is still clean.
    let clean = kiln(&out, &["verify", out.join("web.qcow2").to_str().unwrap()]);
    assert_eq!(clean.status.code(), Some(0), "{}", describe(&clean));
}
