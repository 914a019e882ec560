//! Drift on a live server: boot the web image, change a file under /etc
//! inside the guest, shut it down cleanly keeping what it wrote, and show
//! that `kiln verify --root` on that guest's root reports exactly that
//! change (and `kiln verify` on its disk fails). Real build, real boot.

mod common;

#[test]
fn a_change_made_on_the_live_server_is_reported() {
    common::require_build();
    common::require_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("debugfs", "e2fsprogs"),
    ]);
    let dir = tempfile::Builder::new()
        .prefix("kiln-drift-")
        .tempdir()
        .unwrap();
    let recipes = dir.path().join("recipes");
    common::copy_recipes(&recipes);
    let out = dir.path().join("out");
    let built = common::kiln_output(
        &out,
        &[
            "build",
            "--no-smoke",
            recipes.join("web.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(built.status.code(), Some(0), "{}", common::describe(&built));
    let manifest = out.join("web.manifest.json");

    // The live server: booted, a change made by hand under /etc, shut down.
    let live = out.join("web-live.qcow2");
    let booted = common::kiln_output(
        &out,
        &[
            "smoke",
            "--keep-overlay",
            live.to_str().unwrap(),
            "--check",
            "echo 'edited by hand on the server' >> /etc/motd",
            out.join("web.qcow2").to_str().unwrap(),
        ],
    );
    assert_eq!(
        booted.status.code(),
        Some(0),
        "{}",
        common::describe(&booted)
    );

    // The disk no longer matches what was built; extract its root.
    let root = dir.path().join("live-root");
    let on_disk = common::kiln_output(
        &out,
        &[
            "verify",
            live.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
            "--extract",
            root.to_str().unwrap(),
        ],
    );
    assert_eq!(
        on_disk.status.code(),
        Some(4),
        "{}",
        common::describe(&on_disk)
    );

    // Against that root, what a running system changes by design (/var,
    // machine-id, …) is ignored and the hand edit is reported.
    let report = common::kiln_output(
        &out,
        &[
            "--json",
            "verify",
            "--root",
            root.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    assert_eq!(
        report.status.code(),
        Some(4),
        "{}",
        common::describe(&report)
    );
    let r: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let modified: Vec<&str> = r["modified"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap())
        .collect();
    assert!(modified.contains(&"/etc/motd"), "{r:#}");
    let elsewhere: Vec<&str> = modified
        .iter()
        .copied()
        .chain(
            r["added"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap()),
        )
        .filter(|p| p.starts_with("/usr"))
        .collect();
    assert!(elsewhere.is_empty(), "a boot changed /usr: {elsewhere:?}");

    // The built image itself is still clean.
    let clean = common::kiln_output(&out, &["verify", out.join("web.qcow2").to_str().unwrap()]);
    assert_eq!(clean.status.code(), Some(0), "{}", common::describe(&clean));
}
