//! Data volumes, with real boots: the shipped db recipe (PostgreSQL with its
//! data on a volume) passes its smoke on a blank volume, keeps its rows
//! across an image upgrade, copes with a missing volume, and its disk holds
//! nothing under the volume's mount point. Fails, never skips, without root,
//! the build tools or QEMU.

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Mutex, OnceLock};

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// A copy of `recipes/` (locks are written there, not in the checkout) and
/// db built from it once, with its smoke (a blank volume).
struct Db {
    recipes: PathBuf,
    out: PathBuf,
    build: Output,
}

fn db() -> &'static Db {
    static DB: OnceLock<Db> = OnceLock::new();
    DB.get_or_init(|| {
        common::require_build();
        common::require_tools(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("debugfs", "e2fsprogs"),
        ]);
        let dir = common::once_per_run_dir("volumes-test");
        let recipes = dir.join("recipes");
        common::copy_recipes(&recipes);
        let out = dir.join("out");
        let build = common::kiln_output(
            &out,
            &[
                "--json",
                "build",
                "--force-smoke",
                recipes.join("db.toml").to_str().unwrap(),
            ],
        );
        Db {
            recipes,
            out,
            build,
        }
    })
}

#[test]
fn db_passes_its_smoke_on_a_blank_volume() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let db = db();
    assert_eq!(
        db.build.status.code(),
        Some(0),
        "{}",
        common::describe(&db.build)
    );
    let summary: serde_json::Value = serde_json::from_slice(&db.build.stdout).unwrap();
    let smoke = &summary["smoke"];
    // The seed and every check (golden's, then db's) ran and passed.
    let expected = common::smoke_checks(&db.recipes.join("db.toml"));
    assert!(
        !expected.seed.is_empty(),
        "db.toml has a seed: {expected:?}"
    );
    let total = expected.seed.len() + expected.checks.len() + expected.http;
    assert_eq!(smoke["checks_total"], total, "{summary:#}");
    assert_eq!(smoke["checks_passed"], total, "{summary:#}");
    // The manifest names the volume.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(db.out.join("db.manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["volumes"],
        serde_json::json!(["/var/lib/postgresql"]),
        "{}",
        manifest["volumes"]
    );
}

#[test]
fn the_disk_holds_nothing_under_the_volume_mount_point() {
    let db = db();
    assert_eq!(
        db.build.status.code(),
        Some(0),
        "{}",
        common::describe(&db.build)
    );
    let scratch = tempfile::tempdir().unwrap();
    let raw = scratch.path().join("db.raw");
    let (_, _) = common::tool(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            db.out.join("db.qcow2").as_os_str(),
            raw.as_os_str(),
        ],
        &[],
    );
    let (table, _) = common::tool("sfdisk", &[OsStr::new("--json"), raw.as_os_str()], &[]);
    let table: serde_json::Value = serde_json::from_slice(&table).unwrap();
    let root = &table["partitiontable"]["partitions"][1];
    let offset = root["start"].as_u64().unwrap() * 512;
    let image = format!("{}?offset={offset}", raw.display());
    let (listing, _) = common::tool(
        "debugfs",
        &[
            OsStr::new("-R"),
            OsStr::new("ls -l /var/lib/postgresql"),
            OsStr::new(&image),
        ],
        &[],
    );
    let listing = String::from_utf8_lossy(&listing);
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| *n != "." && *n != "..")
        .collect();
    assert!(
        names.is_empty(),
        "the image carries data under the volume's mount point: {names:?}\n{listing}"
    );
    // The fstab mounts the volume by its disk's serial, made on first boot, nofail.
    let (fstab, _) = common::tool(
        "debugfs",
        &[
            OsStr::new("-R"),
            OsStr::new("cat /etc/fstab"),
            OsStr::new(&image),
        ],
        &[],
    );
    let fstab = String::from_utf8_lossy(&fstab);
    assert!(fstab.contains("/dev/disk/by-id/virtio-vol-pgdata /var/lib/postgresql ext4 defaults,nofail,x-systemd.makefs"), "{fstab}");
}

#[test]
fn rows_survive_an_upgrade_to_a_rebuilt_image() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let db = db();
    assert_eq!(
        db.build.status.code(),
        Some(0),
        "{}",
        common::describe(&db.build)
    );
    let old = db.out.join("db-old.qcow2");
    std::fs::copy(db.out.join("db.qcow2"), &old).unwrap();
    // A changed file in the app layer is a new image.
    let script = db.recipes.join("files/db/kiln-pg-init");
    let mut text = std::fs::read_to_string(&script).unwrap();
    text.push_str(&format!(
        "# rebuilt for the upgrade test {}\n",
        common::nonce()
    ));
    std::fs::write(&script, text).unwrap();
    let rebuilt = common::kiln_output(
        &db.out,
        &[
            "--json",
            "build",
            "--no-smoke",
            db.recipes.join("db.toml").to_str().unwrap(),
        ],
    );
    assert_eq!(
        rebuilt.status.code(),
        Some(0),
        "{}",
        common::describe(&rebuilt)
    );
    let summary: serde_json::Value = serde_json::from_slice(&rebuilt.stdout).unwrap();
    let row = |stage: &str| {
        summary["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["stage"] == stage)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(row("db/files"), "built", "{summary:#}");
    assert_eq!(row("db/packages"), "cached", "{summary:#}");
    let new = db.out.join("db.qcow2");
    assert_ne!(std::fs::read(&old).unwrap().len(), 0);

    let volumes = db.out.join("volumes");
    let upgrade = common::kiln_output(
        &db.out,
        &[
            "smoke",
            "--keep-volumes",
            volumes.to_str().unwrap(),
            "--upgrade-from",
            old.to_str().unwrap(),
            new.to_str().unwrap(),
        ],
    );
    assert_eq!(
        upgrade.status.code(),
        Some(0),
        "{}",
        common::describe(&upgrade)
    );
    let stderr = String::from_utf8_lossy(&upgrade.stderr);
    assert!(stderr.contains("seeded, shut down cleanly"), "{stderr}");
    assert!(
        volumes.join("pgdata.qcow2").is_file(),
        "--keep-volumes kept no disk"
    );
    // The record is about the new disk, and names the old one it upgraded.
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(db.out.join("db.smoke.json")).unwrap()).unwrap();
    assert_eq!(record["predicate"]["result"], "PASSED", "{record:#}");
    let sha256 = |p: &std::path::Path| {
        let (out, _) = common::tool("sha256sum", &[p.as_os_str()], &[]);
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(record["subject"][0]["digest"]["sha256"], sha256(&new));
    let old_disk = record["predicate"]["configuration"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "upgrade-from:db-old.qcow2")
        .unwrap_or_else(|| panic!("no upgrade-from in {record:#}"));
    assert_eq!(old_disk["digest"]["sha256"], sha256(&old));
}

#[test]
fn a_missing_volume_still_boots_and_the_data_check_fails_clearly() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let db = db();
    assert_eq!(
        db.build.status.code(),
        Some(0),
        "{}",
        common::describe(&db.build)
    );
    let out = common::kiln_output(
        &db.out,
        &[
            "smoke",
            "--no-volumes",
            db.out.join("db.qcow2").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It booted (no boot failure) and a check that needs the database failed.
    for boot_failure in [
        "timed out",
        "emergency",
        "panicked",
        "nothing to boot",
        "root file system",
    ] {
        assert!(
            !stderr.contains(boot_failure),
            "the boot itself failed ({boot_failure}):\n{stderr}"
        );
    }
    assert!(
        stderr.contains("check 1 `runuser -u postgres -- psql"),
        "{stderr}"
    );
    assert!(
        stderr.contains("connection to server") || stderr.contains("seeded rows are missing"),
        "{stderr}"
    );
}
