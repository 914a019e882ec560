//! The store survives concurrency, crashes, interrupts, corruption and a
//! full disk; gc keeps what is needed; host secrets never reach an image.
//!
//! Real builds as root with the real tools: run by `make test`. They fail,
//! never skip, when something is missing. Tests that need warm layers use
//! the shared store (`KILN_TEST_STORE`, default /var/tmp/kiln-test-store)
//! and add only small layers with a per-run nonce on top of golden's base;
//! tests that delete or damage entries get a private store seeded with a
//! copy of the base layer; the canary test and the interrupted-base test
//! use a cold store, because their point is the base itself.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// Golden's [base], so every recipe here shares the warm base layer.
const BASE: &str = common::BASE;
/// Bound on waiting for a build to reach a point in its log.
const LOG_WAIT: Duration = Duration::from_secs(240);
/// Bound on a killed or interrupted kiln going away.
const EXIT_WAIT: Duration = Duration::from_secs(30);

fn warm_store() -> PathBuf {
    let store = std::env::var_os("KILN_TEST_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/kiln-test-store"));
    std::fs::create_dir_all(&store).unwrap();
    store
}

fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("n{}x{t}", std::process::id())
}

/// A scratch folder on /var/tmp (same filesystem as the stores) holding
/// recipes and an out/ dir; removed when dropped, with the warm store's
/// entries of the images built into it (see `common::TestImages`).
struct Scratch {
    dir: tempfile::TempDir,
    images: common::TestImages,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.images.note(&self.out());
        self.images.forget(&warm_store());
    }
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("kiln-rel-")
                .tempdir_in("/var/tmp")
                .unwrap(),
            images: common::TestImages::default(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn out(&self) -> PathBuf {
        self.path().join("out")
    }

    /// Write `recipes/NAME.toml`: golden's base plus `rest`, and beside it
    /// the tests' shared lock of that base (so the warm base is used).
    fn recipe(&self, name: &str, rest: &str) -> PathBuf {
        let dir = self.path().join("recipes");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!("[image]\nname = \"{name}\"\nsize = \"2GiB\"\n{BASE}\n{rest}\n"),
        )
        .unwrap();
        std::fs::write(
            path.with_extension("lock"),
            common::base_lock(&warm_store()),
        )
        .unwrap();
        path
    }

    fn kiln(&self, store: &Path) -> Command {
        let mut cmd = Command::new(KILN);
        cmd.arg("--cache")
            .arg(store)
            .arg("--out")
            .arg(self.out())
            .current_dir(self.path());
        cmd
    }

    fn build(&self, store: &Path, recipe: &Path) -> Output {
        let out = self
            .kiln(store)
            .args(["build", "--no-smoke"])
            .arg(recipe)
            .output()
            .unwrap();
        self.images.note(&self.out());
        out
    }

    fn spawn_build(&self, store: &Path, recipe: &Path) -> Child {
        self.kiln(store)
            .args(["build", "--no-smoke"])
            .arg(recipe)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.out().join(format!("{name}.build.log"))).unwrap_or_default()
    }

    /// Wait until the build log of `name` contains `needle`.
    fn wait_for_log(&self, name: &str, needle: &str, child: &mut Child) {
        let started = Instant::now();
        while !self.log(name).contains(needle) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "kiln exited ({status}) before its log showed `{needle}`:\n{}",
                    self.log(name)
                );
            }
            assert!(
                started.elapsed() < LOG_WAIT,
                "the log never showed `{needle}`:\n{}",
                self.log(name)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The rows of `out/NAME.build.json`: (stage, status, reason).
    fn rows(&self, name: &str) -> Vec<(String, String, String)> {
        let text = std::fs::read_to_string(self.out().join(format!("{name}.build.json"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["stage"].as_str().unwrap().to_owned(),
                    r["status"].as_str().unwrap().to_owned(),
                    r["reason"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    fn status_of(&self, name: &str, stage: &str) -> String {
        self.rows(name)
            .into_iter()
            .find(|r| r.0 == stage)
            .unwrap_or_else(|| panic!("no row {stage} in {name}"))
            .1
    }
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < EXIT_WAIT,
            "kiln did not exit within {EXIT_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn child_output(mut child: Child) -> (std::process::ExitStatus, String, String) {
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), out, err)
}

/// Processes whose command line mentions `needle` (a nonce in a recipe's
/// `run` command), waited for briefly: a killed process group needs a
/// moment to be reaped.
fn processes_with(needle: &str) -> Vec<String> {
    let started = Instant::now();
    loop {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) && entry.file_name() != std::process::id().to_string().as_str()
            {
                found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
            }
        }
        if found.is_empty() || started.elapsed() > Duration::from_secs(5) {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mounts in the host's (this test's) namespace whose line mentions `path`.
fn host_mounts_under(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Loop devices whose backing file is under `path`.
fn loops_under(path: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(file) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if file.trim().starts_with(&*path.to_string_lossy()) {
                found.push(file.trim().to_owned());
            }
        }
    }
    found
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn new_entries(before: &[String], dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect()
}

/// The key (hex) of a step of the last build of `name` (from `kiln plan --json`).
fn step_key(scratch: &Scratch, store: &Path, recipe: &Path, stage: &str) -> String {
    let out = scratch
        .kiln(store)
        .arg("--json")
        .arg("plan")
        .arg(recipe)
        .output()
        .unwrap();
    ok(&out, "kiln plan");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap_or_else(|| panic!("no stage {stage}"))["key"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The key of golden's base layer, built into the warm store if needed.
fn warm_base() -> PathBuf {
    let store = warm_store();
    let scratch = Scratch::new();
    let recipe = scratch.recipe("kiln-rel-base", "");
    let key = step_key(&scratch, &store, &recipe, "base");
    let dir = store.join("layers-v1").join(&key);
    if !dir.join("entry.json").is_file() {
        ok(&scratch.build(&store, &recipe), "building the warm base");
    }
    dir
}

/// A private store holding a copy of golden's base layer, for tests that
/// delete or damage entries.
fn seeded_store(at: &Path) -> PathBuf {
    let base = warm_base();
    let store = at.to_owned();
    std::fs::create_dir_all(store.join("layers-v1")).unwrap();
    let status = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&base)
        .arg(store.join("layers-v1"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "copying the base layer into {}",
        store.display()
    );
    store
}

#[test]
fn two_concurrent_builds_build_a_shared_layer_once() {
    let store = warm_store();
    let s = Scratch::new();
    let n = nonce();
    let shared =
        format!("[[layer]]\nname = \"shared\"\nrun = [\"echo {n} > /etc/kiln-shared; sleep 4\"]\n");
    let a = s.recipe(
        "conc-a",
        &format!("{shared}\n[[layer]]\nname = \"a\"\nrun = [\"echo a{n} > /etc/a\"]\n"),
    );
    let b = s.recipe(
        "conc-b",
        &format!("{shared}\n[[layer]]\nname = \"b\"\nrun = [\"echo b{n} > /etc/b\"]\n"),
    );
    let first = s.spawn_build(&store, &a);
    std::thread::sleep(Duration::from_millis(1500));
    let second = s.spawn_build(&store, &b);
    let (sa, oa, ea) = child_output(first);
    let (sb, ob, eb) = child_output(second);
    assert!(sa.success(), "first build failed:\n{oa}\n{ea}");
    assert!(sb.success(), "second build failed:\n{ob}\n{eb}");
    assert_eq!(s.status_of("conc-a", "shared/run"), "built");
    let row = s
        .rows("conc-b")
        .into_iter()
        .find(|r| r.0 == "shared/run")
        .unwrap();
    assert_eq!(
        (row.1.as_str(), row.2.as_str()),
        ("cached", "built by another kiln meanwhile"),
        "{eb}"
    );
    let waits: Vec<&str> = eb
        .lines()
        .filter(|l| l.contains("another kiln is building it"))
        .collect();
    assert_eq!(waits.len(), 1, "the waiting run says so in one line:\n{eb}");
    // Nothing corrupted: both images and the shared layer pass their checks
    // when used again.
    for (r, name) in [(&a, "conc-a"), (&b, "conc-b")] {
        let again = s.build(&store, r);
        ok(&again, "rebuild");
        assert!(
            s.rows(name).iter().all(|r| r.1 == "cached"),
            "{:?}",
            s.rows(name)
        );
        assert!(!stderr(&again).contains("corrupt"), "{}", stderr(&again));
    }
}

#[test]
fn kill_9_mid_layer_and_mid_image_then_the_next_run_succeeds() {
    let store = warm_store();
    let s = Scratch::new();
    let n = nonce();
    let recipe = s.recipe(
        "kill9",
        &format!("[[layer]]\nname = \"slow\"\nrun = [\"echo {n} > /etc/kiln-k9; sleep 6\"]\n"),
    );
    let tmp_before = listing(&store.join("tmp"));

    // Killed in the middle of a chrooted `run` (overlay mounted, apt-less chroot).
    let mut child = s.spawn_build(&store, &recipe);
    s.wait_for_log("kill9", &format!("echo {n}"), &mut child);
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap(); // SIGKILL
    wait_exit(&mut child);
    let left = processes_with(&n);
    assert!(
        left.is_empty(),
        "processes outlived a kill -9 of kiln: {left:?}"
    );
    assert!(
        host_mounts_under(&store).is_empty(),
        "{:?}",
        host_mounts_under(&store)
    );
    let debris = new_entries(&tmp_before, &store.join("tmp"));
    assert!(
        !debris.is_empty(),
        "expected the killed run's staging dir in tmp/"
    );

    // The next run cleans up and builds.
    let out = s.build(&store, &recipe);
    ok(&out, "the build after kill -9 mid-layer");
    assert_eq!(s.status_of("kill9", "slow/run"), "built");
    let still: Vec<String> = debris
        .iter()
        .filter(|d| store.join("tmp").join(d).exists())
        .cloned()
        .collect();
    assert!(
        still.is_empty(),
        "the dead run's staging dirs were not removed: {still:?}"
    );

    // Killed while assembling the image (between sfdisk and qemu-img).
    let recipe2 = s.recipe("kill9", &format!("[[layer]]\nname = \"slow\"\nrun = [\"echo {n} > /etc/kiln-k9; sleep 6\"]\n[[layer]]\nname = \"more\"\nrun = [\"echo more{n} > /etc/more\"]\n"));
    let tmp_before = listing(&store.join("tmp"));
    let mut child = s.spawn_build(&store, &recipe2);
    s.wait_for_log("kill9", "$ sfdisk", &mut child);
    child.kill().unwrap();
    wait_exit(&mut child);
    assert!(host_mounts_under(&store).is_empty());
    let debris = new_entries(&tmp_before, &store.join("tmp"));
    let out = s.build(&store, &recipe2);
    ok(&out, "the build after kill -9 mid-image");
    assert_eq!(s.status_of("kill9", "image"), "built");
    assert!(
        debris.iter().all(|d| !store.join("tmp").join(d).exists()),
        "{debris:?}"
    );
    assert!(
        listing(&s.out()).iter().all(|f| !f.ends_with(".tmp")),
        "{:?}",
        listing(&s.out())
    );
}

#[test]
fn sigint_mid_layer_undoes_everything_and_exits_130() {
    let store = warm_store();
    let s = Scratch::new();
    let n = nonce();
    let recipe = s.recipe(
        "sigint",
        &format!("[[layer]]\nname = \"slow\"\nrun = [\"echo {n} > /etc/kiln-int; sleep 60\"]\n"),
    );
    let tmp_before = listing(&store.join("tmp"));
    let mut child = s.spawn_build(&store, &recipe);
    s.wait_for_log("sigint", &format!("echo {n}"), &mut child);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(130), "{}", s.log("sigint"));
    assert!(processes_with(&n).is_empty(), "{:?}", processes_with(&n));
    assert!(host_mounts_under(&store).is_empty());
    assert!(loops_under(&store).is_empty() && loops_under(s.path()).is_empty());
    // The other lane of `make test` builds in this store at the same
    // time: its live staging dirs are claimed (an flock on `.kiln-pid`);
    // what the interrupted run left would not be.
    let left: Vec<String> = new_entries(&tmp_before, &store.join("tmp"))
        .into_iter()
        .filter(|d| !common::claim_is_held(&store.join("tmp").join(d)))
        .collect();
    assert!(left.is_empty(), "temp dirs left in the store: {left:?}");
    assert!(listing(&s.out()).iter().all(|f| !f.ends_with(".tmp")));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("interrupted"), "{err}");
}

#[test]
fn sigint_mid_base_leaves_no_mount_or_temp_dir() {
    // A cold store: mmdebstrap mounts /proc, /sys and /dev pieces inside the
    // tree it builds, and is killed in the middle of that.
    let s = Scratch::new();
    let store = s.path().join("cold-store");
    let n = nonce();
    let recipe = s.recipe(
        "sigbase",
        &format!("[[layer]]\nname = \"x\"\nrun = [\"echo {n}\"]\n"),
    );
    // mmdebstrap keeps a gpg home in $TMPDIR: the tools kiln runs get a
    // temp dir of kiln's own instead, removed on every path.
    let caller_tmp = s.path().join("caller-tmp");
    std::fs::create_dir_all(&caller_tmp).unwrap();
    let mut child = s
        .kiln(&store)
        .env("TMPDIR", &caller_tmp)
        .args(["build", "--no-smoke"])
        .arg(&recipe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_for_log("sigbase", "mmdebstrap --mode=root", &mut child);
    std::thread::sleep(Duration::from_secs(6));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(130), "{}", s.log("sigbase"));
    assert!(host_mounts_under(&store).is_empty());
    assert_eq!(
        listing(&store.join("tmp")),
        Vec::<String>::new(),
        "temp dirs left"
    );
    assert_eq!(listing(&store.join("layers-v1")), Vec::<String>::new());
    assert_eq!(
        listing(&caller_tmp),
        Vec::<String>::new(),
        "left in the caller's TMPDIR"
    );
    let left = processes_with(&store.to_string_lossy());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_corrupted_layer_is_detected_moved_aside_and_rebuilt() {
    let s = Scratch::new();
    let store = seeded_store(&s.path().join("store"));
    let n = nonce();
    std::fs::create_dir_all(s.path().join("recipes/files")).unwrap();
    std::fs::write(s.path().join("recipes/files/motd"), format!("hello {n}\n")).unwrap();
    let recipe = s.recipe("corrupt", "[[layer]]\nname = \"app\"\nfiles = [{ src = \"files/motd\", dest = \"/etc/motd\", mode = \"0644\" }]\nrun = [\"mkdir -p /srv/app && echo data > /srv/app/data\"]\n");
    ok(&s.build(&store, &recipe), "first build");
    let key = step_key(&s, &store, &recipe, "app/files");
    let layer = store.join("layers-v1").join(&key);
    let corrupt_dir = store.join("corrupt-v1");

    // A layer is checked when it is used: when its image is assembled. An
    // image in the store needs none of its layers, so each build below
    // that must see a damaged layer first removes the image.
    let image_key = step_key(&s, &store, &recipe, "image");
    let image_dir = store.join("images-v1").join(&image_key);
    // 0. With the image in the store, a damaged layer is not read at all:
    //    the no-op build succeeds and leaves it alone.
    std::fs::remove_file(layer.join("tree/etc/motd")).unwrap();
    let out = s.build(&store, &recipe);
    ok(&out, "no-op build over a damaged layer");
    assert_eq!(s.status_of("corrupt", "image"), "cached");
    assert!(!stderr(&out).contains("is corrupt"), "{}", stderr(&out));
    assert!(listing(&corrupt_dir).is_empty());

    // 1. A file of the layer deleted: caught by the check before use.
    std::fs::remove_dir_all(&image_dir).unwrap();
    let out = s.build(&store, &recipe);
    ok(&out, "build over a damaged layer");
    assert!(stderr(&out).contains("is corrupt"), "{}", stderr(&out));
    assert_eq!(s.status_of("corrupt", "app/files"), "built");
    assert_eq!(
        std::fs::read_to_string(layer.join("tree/etc/motd")).unwrap(),
        format!("hello {n}\n")
    );
    assert_eq!(
        listing(&corrupt_dir).len(),
        1,
        "{:?}",
        listing(&corrupt_dir)
    );

    // 2. The same number of bytes changed: the quick check cannot see it,
    //    `kiln cache verify` does, moves it aside, and the build rebuilds it.
    std::fs::write(layer.join("tree/etc/motd"), format!("HELLO {n}\n")).unwrap();
    let verify = s.kiln(&store).args(["cache", "verify"]).output().unwrap();
    assert_eq!(
        verify.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let table = String::from_utf8_lossy(&verify.stdout);
    assert!(
        table.contains("corrupt: a file's content changed"),
        "{table}"
    );
    assert!(
        stderr(&verify).contains("1 corrupt entry moved to"),
        "{}",
        stderr(&verify)
    );
    assert!(!layer.exists());
    std::fs::remove_dir_all(&image_dir).unwrap();
    ok(&s.build(&store, &recipe), "build after verify");
    assert_eq!(s.status_of("corrupt", "app/files"), "built");
    assert_eq!(s.status_of("corrupt", "base"), "cached");
    let verify = s.kiln(&store).args(["cache", "verify"]).output().unwrap();
    ok(&verify, "verify of a repaired store");

    // 3. A damaged image is rebuilt too.
    let disk = image_dir.join("disk.qcow2");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(4096).unwrap();
    let out = s.build(&store, &recipe);
    ok(&out, "build over a damaged image");
    assert_eq!(s.status_of("corrupt", "image"), "built", "{}", stderr(&out));
}

/// A small ext4 filesystem in a file, loop-mounted; unmounted when dropped.
struct SmallFs {
    mount: PathBuf,
}

impl SmallFs {
    fn new(at: &Path, size: &str) -> SmallFs {
        let image = at.join("fs.img");
        let mount = at.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            ok(&out, &format!("{cmd:?}"));
        };
        run(Command::new("truncate").arg("-s").arg(size).arg(&image));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image));
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount));
        SmallFs { mount }
    }

    /// Fill the filesystem up to `free_mb` MiB of free space with a
    /// ballast file; [`SmallFs::unfill`] frees it again.
    fn fill(&self, free_mb: u64) {
        let out = Command::new("df")
            .args(["--output=avail", "-B1M"])
            .arg(&self.mount)
            .output()
            .unwrap();
        ok(&out, "df");
        let avail: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            avail > free_mb + 16,
            "the small fs has only {avail} MiB free"
        );
        let out = Command::new("fallocate")
            .arg("-l")
            .arg(format!("{}M", avail - free_mb))
            .arg(self.mount.join("ballast"))
            .output()
            .unwrap();
        ok(&out, "fallocate");
    }

    fn unfill(&self) {
        std::fs::remove_file(self.mount.join("ballast")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(&self.mount).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "warning: umount {}: {}",
                self.mount.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn disk_full_while_storing_a_layer_leaves_the_store_unchanged() {
    let s = Scratch::new();
    // Room for the base and the image, but filled up to 100 MiB free
    // before the build: the layer below writes 200 MiB.
    let fs = SmallFs::new(s.path(), "2600M");
    let store = seeded_store(&fs.mount.join("store"));
    fs.fill(100);
    let n = nonce();
    let recipe = s.recipe("full", &format!("[[layer]]\nname = \"big\"\nrun = [\"echo {n} > /etc/big; head -c 200M /dev/zero > /var/big\"]\n"));
    ok(
        &s.kiln(&store).args(["cache", "ls"]).output().unwrap(),
        "cache ls",
    );
    let before: Vec<Vec<String>> = ["layers-v1", "images-v1", "tmp"]
        .iter()
        .map(|d| listing(&store.join(d)))
        .collect();
    let out = s.build(&store, &recipe);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("is full") && err.contains("No space left on device"),
        "{err}"
    );
    let after: Vec<Vec<String>> = ["layers-v1", "images-v1", "tmp"]
        .iter()
        .map(|d| listing(&store.join(d)))
        .collect();
    assert_eq!(before, after, "the store changed");
    assert!(host_mounts_under(&store).is_empty());

    fs.unfill();
    let out = s.build(&store, &recipe);
    ok(&out, "the build with space");
    assert_eq!(s.status_of("full", "big/run"), "built");
    assert_eq!(listing(&store.join("tmp")), Vec::<String>::new());
    ok(
        &s.kiln(&store).args(["cache", "verify"]).output().unwrap(),
        "verify after a full disk",
    );
    drop(fs);
}

#[test]
fn gc_keeps_the_newest_images_and_their_layers() {
    let s = Scratch::new();
    let store = seeded_store(&s.path().join("store"));
    std::fs::create_dir_all(s.path().join("recipes/files")).unwrap();
    let version = |name: &str, v: &str| {
        std::fs::write(
            s.path().join("recipes/files").join(format!("{name}.txt")),
            format!("{name} version {v}\n"),
        )
        .unwrap();
        s.recipe(name, &format!("[[layer]]\nname = \"app\"\nfiles = [{{ src = \"files/{name}.txt\", dest = \"/etc/{name}.txt\", mode = \"0644\" }}]\n"))
    };
    let mut keys = Vec::new();
    for v in ["1", "2", "3"] {
        let r = version("web", v);
        ok(&s.build(&store, &r), "build web");
        keys.push((
            step_key(&s, &store, &r, "image"),
            step_key(&s, &store, &r, "app/files"),
        ));
    }
    let r = version("db", "1");
    ok(&s.build(&store, &r), "build db");
    let db = (
        step_key(&s, &store, &r, "image"),
        step_key(&s, &store, &r, "app/files"),
    );
    let base = step_key(&s, &store, &r, "base");

    let ls = s.kiln(&store).args(["cache", "ls"]).output().unwrap();
    ok(&ls, "cache ls");
    let table = String::from_utf8_lossy(&ls.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains(&base[..12]) && l.contains("db,web") && l.contains("4 images")),
        "{table}"
    );
    ok(
        &s.kiln(&store).args(["cache", "du"]).output().unwrap(),
        "cache du",
    );

    // Remembered smoke passes: one for a disk that stays (web v3), one for
    // a disk that goes (web v1), one unreadable. gc keeps only the first.
    let disk_of = |image: &str| -> String {
        let entry = std::fs::read_to_string(store.join("images-v1").join(image).join("image.json"))
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&entry).unwrap()["sha256"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let passes = store.join("state-v1/smoke");
    std::fs::create_dir_all(&passes).unwrap();
    for (file, disk) in [("kept.json", &keys[2].0), ("gone.json", &keys[0].0)] {
        let pass = serde_json::json!({ "disk_sha256": disk_of(disk), "report": {} });
        std::fs::write(passes.join(file), pass.to_string()).unwrap();
    }
    std::fs::write(passes.join("garbled.json"), "{").unwrap();

    let listed = |d: &str| listing(&store.join(d));
    let before = (listed("layers-v1"), listed("images-v1"));
    let dry = s
        .kiln(&store)
        .args(["cache", "gc", "--keep", "2", "--dry-run"])
        .output()
        .unwrap();
    ok(&dry, "gc --dry-run");
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains(&format!("would remove image {}", &keys[0].0[..12]))
            && text.contains(&format!("would remove layer {}", &keys[0].1[..12])),
        "{text}"
    );
    assert_eq!(
        before,
        (listed("layers-v1"), listed("images-v1")),
        "--dry-run removed something"
    );

    let gc = s
        .kiln(&store)
        .args(["cache", "gc", "--keep", "2"])
        .output()
        .unwrap();
    ok(&gc, "gc");
    let text = String::from_utf8_lossy(&gc.stdout);
    assert!(text.contains("removed 4 entries, freed"), "{text}");
    assert_eq!(
        listing(&passes),
        ["kept.json"],
        "gc must remove the smoke passes of removed disks and unreadable ones, and keep the rest"
    );
    let (layers, images) = (listed("layers-v1"), listed("images-v1"));
    assert!(
        !images.contains(&keys[0].0) && !layers.contains(&keys[0].1),
        "web v1 was kept"
    );
    for (image, layer) in [&keys[1], &keys[2], &db] {
        assert!(
            images.contains(image) && layers.contains(layer),
            "a kept image or its layer was removed"
        );
    }
    assert!(layers.contains(&base));

    // What was kept still builds as all cache hits.
    for (name, v) in [("web", "2"), ("web", "3"), ("db", "1")] {
        let r = version(name, v);
        ok(&s.build(&store, &r), "rebuild of a kept image");
        assert!(
            s.rows(name).iter().all(|r| r.1 == "cached"),
            "{name} v{v}: {:?}",
            s.rows(name)
        );
    }
}

#[test]
fn host_secrets_never_reach_the_disk() {
    // A cold store, so the base (mmdebstrap, which runs with the host's
    // environment) is built with the canary present too.
    let s = Scratch::new();
    let store = s.path().join("cold-store");
    let canary = format!("KILNCANARY{}", nonce().to_uppercase());
    let marker = format!("KILNMARKER{}", nonce().to_uppercase());
    let home = s.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(
        home.join(".ssh/id_canary"),
        format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{canary}\n"),
    )
    .unwrap();
    std::fs::write(
        home.join(".netrc"),
        format!("machine deb.example login u password {canary}\n"),
    )
    .unwrap();
    // A run step that dumps what it can see of its environment into the image,
    // and a marker proving that the search below finds what is on the disk.
    let recipe = s.recipe("canary", &format!("[[layer]]\nname = \"dump\"\nrun = [\"env > /etc/kiln-env; ls -la /root > /etc/kiln-home; echo {marker} > /etc/kiln-marker\"]\n"));
    let out = s
        .kiln(&store)
        .args(["build", "--no-smoke"])
        .arg(&recipe)
        .env("KILN_CANARY_SECRET", &canary)
        .env("HOME", &home)
        .env("http_proxy_password", &canary)
        .env("SSH_AUTH_SOCK", home.join(&canary))
        .output()
        .unwrap();
    ok(&out, "the canary build");
    let raw = s.path().join("disk.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(s.out().join("canary.qcow2"))
        .arg(&raw)
        .output()
        .unwrap();
    ok(&conv, "qemu-img convert");
    assert!(
        std::fs::metadata(&raw).is_ok_and(|m| m.len() > 0),
        "{} is missing or empty",
        raw.display()
    );
    // grep exits 0 (found), 1 (not found) or 2 (could not search): only 0
    // and 1 are answers, so a search that fails cannot pass as "not found".
    let count = |needle: &str| -> u64 {
        let out = Command::new("sh")
            .arg("-c")
            .arg("tr '\\0' '\\n' < \"$1\" | grep -a -c -F -e \"$2\"")
            .arg("sh")
            .arg(&raw)
            .arg(needle)
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "searching {} failed ({}): {}",
            raw.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    assert!(
        count(&marker) > 0,
        "the search does not see the image's own files"
    );
    assert_eq!(count(&canary), 0, "a host secret is on the disk");
    // Nor in any layer the build stored.
    let grep_layers = |needle: &str| {
        Command::new("grep")
            .args(["-r", "-l", "-a", "-F"])
            .arg(needle)
            .arg(store.join("layers-v1"))
            .output()
            .unwrap()
    };
    let seen = grep_layers(&marker);
    assert_eq!(
        seen.status.code(),
        Some(0),
        "the search of the stored layers does not see the build's own marker: {}",
        String::from_utf8_lossy(&seen.stderr)
    );
    let grep = grep_layers(&canary);
    assert_eq!(
        grep.status.code(),
        Some(1),
        "a host secret is in a stored layer, or the search failed:\n{}{}",
        String::from_utf8_lossy(&grep.stdout),
        String::from_utf8_lossy(&grep.stderr)
    );
}

#[test]
fn a_layer_whose_seal_is_gone_garbled_or_of_another_version_is_rebuilt() {
    let s = Scratch::new();
    let store = seeded_store(&s.path().join("store"));
    let n = nonce();
    std::fs::create_dir_all(s.path().join("recipes/files")).unwrap();
    std::fs::write(s.path().join("recipes/files/motd"), format!("seal {n}\n")).unwrap();
    let recipe = s.recipe(
        "unsealed",
        "[[layer]]\nname = \"app\"\nfiles = [{ src = \"files/motd\", dest = \"/etc/motd\", mode = \"0644\" }]\n",
    );
    // A store from before seals: no format marker, an unsealed base. The
    // first kiln to open it seals the base once, and says so.
    let base = listing(&store.join("layers-v1")).pop().unwrap();
    std::fs::remove_file(store.join("layers-v1").join(&base).join("integrity.json")).unwrap();
    let first = s.build(&store, &recipe);
    ok(&first, "first build");
    assert!(
        stderr(&first).contains(&format!(
            "migrating the store: sealing {}",
            store.join("layers-v1").join(&base).display()
        )),
        "{}",
        stderr(&first)
    );
    assert_eq!(s.status_of("unsealed", "base"), "cached");
    assert!(store.join("store-format.json").is_file());
    let key = step_key(&s, &store, &recipe, "app/files");
    let layer = store.join("layers-v1").join(&key);
    let seal = layer.join("integrity.json");
    type Damage = fn(&Path);
    let damages: &[(&str, Damage)] = &[
        ("deleted", |p| std::fs::remove_file(p).unwrap()),
        ("garbled", |p| {
            std::fs::write(p, "{\"version\": 1, \"cov").unwrap()
        }),
        ("version-bumped", |p| {
            let text = std::fs::read_to_string(p).unwrap();
            let bumped = text.replace("\"version\": 1", "\"version\": 99");
            assert_ne!(text, bumped, "no version field in {text}");
            std::fs::write(p, bumped).unwrap();
        }),
    ];
    // The layer is checked when the image is assembled from it.
    let image_dir = store
        .join("images-v1")
        .join(step_key(&s, &store, &recipe, "image"));
    for (i, (what, damage)) in damages.iter().enumerate() {
        damage(&seal);
        std::fs::remove_dir_all(&image_dir).unwrap();
        let out = s.build(&store, &recipe);
        ok(&out, &format!("build over a layer whose seal was {what}"));
        assert!(
            stderr(&out).contains("is corrupt") && stderr(&out).contains("integrity.json"),
            "{what}: {}",
            stderr(&out)
        );
        assert_eq!(s.status_of("unsealed", "app/files"), "built", "{what}");
        assert_eq!(s.status_of("unsealed", "base"), "cached", "{what}");
        assert_eq!(listing(&store.join("corrupt-v1")).len(), i + 1, "{what}");
        ok(
            &s.kiln(&store).args(["cache", "verify"]).output().unwrap(),
            &format!("verify after the rebuild of a {what} seal"),
        );
    }
}

#[test]
fn gc_keeps_every_layer_when_a_kept_images_chain_cannot_be_read() {
    let s = Scratch::new();
    let store = seeded_store(&s.path().join("store"));
    let n = nonce();
    std::fs::create_dir_all(s.path().join("recipes/files")).unwrap();
    std::fs::write(s.path().join("recipes/files/motd"), format!("gc {n}\n")).unwrap();
    let recipe = s.recipe(
        "gcchain",
        "[[layer]]\nname = \"app\"\nfiles = [{ src = \"files/motd\", dest = \"/etc/motd\", mode = \"0644\" }]\n",
    );
    ok(&s.build(&store, &recipe), "build");
    let base = step_key(&s, &store, &recipe, "base");
    let top = step_key(&s, &store, &recipe, "app/files");
    // The kept image's top layer no longer says what it stands on.
    std::fs::write(store.join("layers-v1").join(&top).join("entry.json"), "{").unwrap();
    let before = listing(&store.join("layers-v1"));
    for dry in [true, false] {
        let mut cmd = s.kiln(&store);
        cmd.args(["cache", "gc", "--keep", "1"]);
        if dry {
            cmd.arg("--dry-run");
        }
        let gc = cmd.output().unwrap();
        ok(&gc, "gc");
        let text = String::from_utf8_lossy(&gc.stdout);
        assert!(
            text.contains("kept every layer, because") && text.contains(&top[..12]),
            "{text}"
        );
        assert!(!text.contains("remove layer"), "{text}");
        assert_eq!(listing(&store.join("layers-v1")), before);
        assert!(store.join("layers-v1").join(&base).is_dir());
    }
}

#[test]
fn a_missing_tool_fails_before_anything_is_downloaded() {
    let s = Scratch::new();
    // A cold store that does not exist yet: the base's pinned .debs would
    // be downloaded into it first.
    let store = s.path().join("cold-store");
    let recipe = s.recipe("notool", "");
    let path = common::path_without(&s.path().join("bin"), "mmdebstrap");
    let started = Instant::now();
    let out = s
        .kiln(&store)
        .env("PATH", &path)
        .args(["build", "--no-smoke"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("mmdebstrap (package mmdebstrap)") && err.contains("apt-get install"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        !store.exists(),
        "the store was touched: {:?}",
        listing(&store)
    );

    // The smoke boot's programs are needed only when it boots.
    let path = common::path_without(&s.path().join("bin2"), "qemu-system-x86_64");
    let out = s
        .kiln(&store)
        .env("PATH", &path)
        .args(["build"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("qemu-system-x86_64 (package qemu-system-x86)"),
        "{}",
        stderr(&out)
    );
    assert!(!store.exists());
}
