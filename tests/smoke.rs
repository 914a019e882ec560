//! Real smoke boots under QEMU. They need test images and FAIL (never
//! skip) without them:
//!
//! * `KILN_TEST_IMAGE`: a bootable kiln image with systemd ≥ 256;
//! * `KILN_TEST_BAD_IMAGE`: an image that cannot boot (an empty ESP, or a
//!   root label in the UKI's cmdline that no partition has).
//!
//! They drive the binary's temporary `kiln smoke IMAGE` command; once
//! `kiln build` works they will build their images themselves.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// One VM at a time: the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());

fn image(var: &str) -> PathBuf {
    let path = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: point it at a test image (see the top of tests/smoke.rs)")
    });
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    path
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
        c.arg("smoke")
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
        let left: Vec<_> = std::fs::read_dir(self.tmp()).unwrap().map(|e| e.unwrap().path()).collect();
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
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
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

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_good_image_passes_and_its_disk_is_unchanged() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image("KILN_TEST_IMAGE");
    let before = sha256(&img);
    let sb = Sandbox::new();
    let out = sb.command(&img, &["--check", "systemctl is-system-running", "--check", "test -d /etc"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checks_passed"], 2, "{report}");
    assert_eq!(report["checks_total"], 2, "{report}");
    assert!(report["boot_secs"].as_f64().unwrap() <= report["total_secs"].as_f64().unwrap());
    assert_eq!(sha256(&img), before, "the smoke run changed the disk");
    sb.assert_clean();
}

#[test]
fn a_failing_check_is_named() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image("KILN_TEST_IMAGE");
    let sb = Sandbox::new();
    let out = sb
        .command(&img, &["--accel", "tcg", "--check", "true", "--check", "echo kiln-test-output; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("check 2 `echo kiln-test-output; exit 7` failed with exit code 7"), "{stderr}");
    assert!(stderr.contains("kiln-test-output"), "{stderr}");
    sb.assert_clean();
}

#[test]
fn an_unbootable_image_fails_early_with_the_reason() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image("KILN_TEST_BAD_IMAGE");
    let sb = Sandbox::new();
    let started = Instant::now();
    let out = sb.command(&img, &["--accel", "tcg", "--timeout", "180"]).output().unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("found nothing to boot") || stderr.contains("could not find the root file system"),
        "{stderr}"
    );
    assert!(!stderr.contains("timed out"), "{stderr}");
    assert!(took < Duration::from_secs(90), "took {took:?}, not well within the 180 s timeout");
    sb.assert_clean();
}

#[test]
fn sigint_mid_boot_leaves_nothing_behind() {
    let _vm = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image("KILN_TEST_IMAGE");
    let sb = Sandbox::new();
    let mut child = sb.command(&img, &["--accel", "tcg"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until QEMU runs (its command line names our TMPDIR), then a bit.
    let needle = sb.tmp().to_string_lossy().into_owned();
    let started = Instant::now();
    while processes_mentioning(&needle).iter().all(|&p| p == child.id()) {
        assert!(started.elapsed() < Duration::from_secs(30), "QEMU never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    sb.assert_clean();
}
