//! Real smoke boots under QEMU (TCG here), of images that `kiln build`
//! makes from the shipped recipes into the shared test store. They fail,
//! never skip, when root, the build tools or QEMU are missing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Built once per test run: a copy of `recipes/` (so locks are written
/// there, not in the checkout), its out dir, web built without smoke, and
/// a copy of web whose ESP lost its UKI.
struct Images {
    _dir: tempfile::TempDir,
    recipes: PathBuf,
    out: PathBuf,
    web: PathBuf,
    bad: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        common::require_build();
        common::require_tools(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("mdel", "mtools"),
        ]);
        let dir = tempfile::Builder::new()
            .prefix("kiln-smoke-")
            .tempdir()
            .unwrap();
        let recipes = dir.path().join("recipes");
        common::copy_recipes(&recipes);
        let out = dir.path().join("out");
        let run = common::kiln_output(
            &out,
            &[
                "build",
                "--no-smoke",
                recipes.join("web.toml").to_str().unwrap(),
            ],
        );
        assert_eq!(
            run.status.code(),
            Some(0),
            "building web: {}",
            common::describe(&run)
        );
        let web = out.join("web.qcow2");
        let bad = out.join("noboot.qcow2");
        empty_esp(&web, &bad, dir.path());
        Images {
            _dir: dir,
            recipes,
            out,
            web,
            bad,
        }
    })
}

/// A copy of `image` whose ESP no longer holds EFI/BOOT/BOOTX64.EFI.
fn empty_esp(image: &Path, bad: &Path, scratch: &Path) {
    let raw = scratch.join("noboot.raw");
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        let out = Command::new(program)
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program}: {}",
            common::describe(&out)
        );
        out
    };
    use std::ffi::OsStr;
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    );
    let table = run("sfdisk", &[OsStr::new("--json"), raw.as_os_str()]);
    let table: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
    let start = table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap();
    let target = format!("{}@@{}", raw.display(), start * 512);
    run(
        "mdel",
        &[
            OsStr::new("-i"),
            OsStr::new(&target),
            OsStr::new("::/EFI/BOOT/BOOTX64.EFI"),
        ],
    );
    run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("qcow2"),
            raw.as_os_str(),
            bad.as_os_str(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
}

/// A private TMPDIR and store folder for one run, so leftovers can be seen.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Sandbox { dir }
    }
    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }
    fn log(&self) -> PathBuf {
        self.dir.path().join("out/test.smoke.log")
    }
    fn command(&self, image: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--cache")
            .arg(common::shared_store())
            .arg("smoke")
            .arg(image)
            .arg("--log")
            .arg(self.log())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(extra)
            .env("TMPDIR", self.tmp())
            .stdin(Stdio::null());
        c
    }
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.tmp())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "temp files left behind: {left:?}");
        let needle = self.tmp().to_string_lossy().into_owned();
        let qemus = processes_mentioning(&needle);
        assert!(qemus.is_empty(), "QEMU processes left running: {qemus:?}");
        assert!(self.log().is_file(), "the smoke log was not written");
    }
}

/// Pids whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

fn sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_good_image_passes_and_its_disk_is_unchanged() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().web.clone();
    let before = sha256(&img);
    let sb = Sandbox::new();
    // web's own checks (golden's three, nginx active, the page over HTTP)
    // plus two given here.
    let out = sb
        .command(
            &img,
            &[
                "--json",
                "--check",
                "systemctl is-system-running",
                "--check",
                "test -d /etc",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checks_passed"], 7, "{report}");
    assert_eq!(report["checks_total"], 7, "{report}");
    assert!(report["boot_secs"].as_f64().unwrap() <= report["total_secs"].as_f64().unwrap());
    assert_eq!(sha256(&img), before, "the smoke run changed the disk");
    sb.assert_clean();
}

#[test]
fn a_failing_check_is_named() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().web.clone();
    let sb = Sandbox::new();
    let out = sb
        .command(
            &img,
            &[
                "--accel",
                "tcg",
                "--recipe",
                images().recipes.join("golden.toml").to_str().unwrap(),
                "--check",
                "true",
                "--check",
                "echo kiln-test-output; exit 7",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("check 5 `echo kiln-test-output; exit 7` failed with exit code 7"),
        "{stderr}"
    );
    assert!(stderr.contains("kiln-test-output"), "{stderr}");
    sb.assert_clean();
}

#[test]
fn an_unbootable_image_fails_early_with_the_reason() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().bad.clone();
    let sb = Sandbox::new();
    let started = Instant::now();
    let out = sb
        .command(&img, &["--accel", "tcg", "--timeout", "180"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("found nothing to boot")
            || stderr.contains("could not find the root file system"),
        "{stderr}"
    );
    assert!(!stderr.contains("timed out"), "{stderr}");
    assert!(
        took < Duration::from_secs(90),
        "took {took:?}, not well within the 180 s timeout"
    );
    sb.assert_clean();
}

#[test]
fn sigint_mid_boot_leaves_nothing_behind() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = images().web.clone();
    let sb = Sandbox::new();
    let mut child = sb
        .command(&img, &["--accel", "tcg"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until QEMU runs (its command line names our TMPDIR), then a bit.
    let needle = sb.tmp().to_string_lossy().into_owned();
    let started = Instant::now();
    while processes_mentioning(&needle)
        .iter()
        .all(|&p| p == child.id())
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "QEMU never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: sending a signal to our own child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    sb.assert_clean();
}

#[test]
fn build_boots_golden_and_caches_the_pass() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = images();
    let golden = imgs.recipes.join("golden.toml");
    let out = common::kiln_output(&imgs.out, &["--json", "build", golden.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let smoke = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "smoke")
        .expect("a smoke row");
    assert!(
        smoke["status"] == "passed" || smoke["status"] == "cached",
        "{summary:#}"
    );
    assert_eq!(
        summary["smoke"]["checks_passed"], summary["smoke"]["checks_total"],
        "{summary:#}"
    );
    assert!(imgs.out.join("golden.smoke.log").is_file() || smoke["status"] == "cached");
    // The same image with the same checks is not booted again.
    let again = common::kiln_output(&imgs.out, &["--json", "build", golden.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{}", common::describe(&again));
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let smoke = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["stage"] == "smoke")
        .unwrap();
    assert_eq!(smoke["status"], "cached", "{summary:#}");
}

#[test]
fn a_failing_recipe_check_makes_build_exit_3() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let imgs = images();
    let recipe = imgs.recipes.join("broken-check.toml");
    std::fs::write(
        &recipe,
        "extends = \"golden.toml\"\n[image]\nname = \"broken-check\"\n[smoke]\nchecks = [\"systemctl is-active no-such-service\"]\n",
    )
    .unwrap();
    let out = common::kiln_output(&imgs.out, &["build", recipe.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", common::describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`systemctl is-active no-such-service` failed"),
        "{stderr}"
    );
    assert!(imgs.out.join("broken-check.smoke.log").is_file());
}
