//! Helpers shared by every integration test file (`mod common;`).
//!
//! The integration tests run the real `kiln` binary with the real tools, as
//! root, with no mocks. They are slow only the first time: every test that
//! just needs warm layers uses one shared store ([`shared_store`]), and
//! every recipe here uses golden's `[base]` ([`BASE`]), written beside the
//! same lock ([`RecipeDir::write_recipe`], [`base_lock`]), so the base layer
//! (mmdebstrap, the only slow step) is built once and reused by all of them
//! and by later runs. Each test gets its own `--out` folder and its own
//! image name, so the store's per-recipe "last build" state (which says why
//! something rebuilds) is never shared between tests.
//!
//! A test that needs root or a tool fails, naming what to install; it never
//! skips ([`require_build`], [`require_inspect`]).
//!
//! Every kiln run is checked afterwards for leftovers: no mount mentioning
//! the store or the out folder in this (the host's) mount namespace, and an
//! empty `tmp/` in the store. The tests must run one at a time
//! (`--test-threads=1`, as `make test` does): they share the store, and
//! kiln builds are heavy.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Overrides where the shared warm store lives.
pub const STORE_ENV: &str = "KILN_TEST_STORE";
pub const DEFAULT_STORE: &str = "/var/tmp/kiln-test-store";
/// One kiln run, cold base included, takes well under a minute here; this
/// only stops a hung run from hanging the test suite.
pub const KILN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Any one inspection tool (qemu-img, sfdisk, mtools, debugfs).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// GPT partition types kiln writes.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// Exactly `[base]` of recipes/golden.toml, so every test shares its base
/// layer with the others and with `kiln build` of the shipped recipes.
pub const BASE: &str = r#"[base]
suite = "trixie"
variant = "minbase"
packages = ["linux-image-cloud-amd64", "systemd-sysv", "udev"]
"#;

// ------------------------------------------------------------- requirements

/// Programs kiln runs for a build, with the Debian package providing each.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mke2fs", "e2fsprogs"),
    ("sfdisk", "fdisk"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("objcopy", "binutils"),
    ("qemu-img", "qemu-utils"),
    ("dpkg-query", "dpkg"),
    ("chroot", "coreutils"),
];

/// A folder of symlinks to every program on the host's PATH but `drop`.
pub fn path_without(dir: &Path, drop: &str) -> std::ffi::OsString {
    std::fs::create_dir_all(dir).unwrap();
    for bin in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"] {
        for entry in std::fs::read_dir(bin).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let link = dir.join(&name);
            if name != drop && !link.exists() {
                std::os::unix::fs::symlink(entry.path(), link).unwrap();
            }
        }
    }
    dir.as_os_str().to_owned()
}

/// Programs the tests use to look inside a disk without mounting it.
pub const INSPECT_TOOLS: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("sfdisk", "fdisk"),
    ("mdir", "mtools"),
    ("mcopy", "mtools"),
    ("debugfs", "e2fsprogs"),
];
const UKI_STUB: (&str, &str) = (
    "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
    "systemd-boot-efi",
);

fn install_hint(what: &str, package: &str) -> String {
    format!(
        "{what} is missing (Debian package `{package}`): run `make deps` as root, or `make test`, which installs it. \
         These tests fail rather than skip when a tool is missing."
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fail unless running as root.
#[track_caller]
pub fn require_root() {
    assert!(is_root(), "this test runs `kiln build`, which must run as root (it mounts overlayfs and chroots): run `make test` as root");
}

/// Where `program` is, searching PATH and the sbin folders (a root PATH
/// without /usr/sbin should not make a test fail for the wrong reason).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[track_caller]
pub fn require_tools(tools: &[(&str, &str)]) {
    let missing: Vec<String> = tools
        .iter()
        .filter(|(p, _)| find_program(p).is_none())
        .map(|(p, pkg)| install_hint(&format!("`{p}`"), pkg))
        .collect();
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// Root and everything `kiln build` runs.
#[track_caller]
pub fn require_build() {
    require_root();
    require_tools(BUILD_TOOLS);
    assert!(
        Path::new(UKI_STUB.0).is_file(),
        "{}",
        install_hint(UKI_STUB.0, UKI_STUB.1)
    );
}

/// Everything [`Disk`] runs.
#[track_caller]
pub fn require_inspect() {
    require_tools(INSPECT_TOOLS);
}

// ------------------------------------------------------------------ folders

/// The shared warm store: `$KILN_TEST_STORE`, or /var/tmp/kiln-test-store.
pub fn shared_store() -> PathBuf {
    std::env::var_os(STORE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))
}

/// `<shared store>.<name>`, emptied and made anew: the work folder of a
/// test binary's once-per-run images, kept in a static. A static is never
/// dropped, so a TempDir there would leave a copy behind every run; this
/// folder is instead removed when the test binary exits (its images take a
/// GB or more, and `make test` runs many binaries on one disk), and by the
/// next run if that exit never came. `KILN_KEEP_TEST_DIRS=1` keeps it, to
/// look at after a failure.
pub fn once_per_run_dir(name: &str) -> PathBuf {
    let store = shared_store();
    let dir = store.with_file_name(format!(
        "{}.{name}",
        store.file_name().unwrap().to_string_lossy()
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    if std::env::var_os("KILN_KEEP_TEST_DIRS").is_none() {
        remove_at_exit(&dir);
    }
    dir
}

static REMOVE_AT_EXIT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn remove_at_exit(dir: &Path) {
    extern "C" fn remove_all() {
        let dirs = std::mem::take(&mut *REMOVE_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()));
        for dir in dirs {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("warning: removing {}: {e}", dir.display());
            }
        }
    }
    let mut dirs = REMOVE_AT_EXIT.lock().unwrap_or_else(|e| e.into_inner());
    if dirs.is_empty() {
        // SAFETY: registers a plain function that takes no arguments; the
        // C library calls it once when the process exits normally.
        let registered = unsafe { libc::atexit(remove_all) };
        assert_eq!(registered, 0, "atexit failed");
    }
    dirs.push(dir.to_owned());
}

/// A temp dir on the same filesystem as the shared store (so copies into
/// a private store can be cheap, and big files stay off a small /tmp).
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let parent = shared_store()
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)
        .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .unwrap_or_else(|e| panic!("creating a temp dir in {}: {e}", parent.display()))
}

/// A string unique to this test run, to make content (and so keys) that
/// no earlier run built.
pub fn nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

/// A folder holding recipes and the files they copy.
pub struct RecipeDir {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl RecipeDir {
    pub fn new() -> RecipeDir {
        let tmp = tempfile::Builder::new()
            .prefix("kiln-recipe-")
            .tempdir()
            .expect("creating a temp recipe dir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonicalising the temp recipe dir");
        RecipeDir { _tmp: tmp, root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Write `rel` (creating its folders) and return its path.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(rel);
        let dir = path.parent().expect("a file has a parent");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        std::fs::write(&path, content)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Write a recipe and, beside it, a lock pinning its base to the one
    /// `kiln`'s store shares (see [`base_lock`]).
    pub fn write_recipe(&self, rel: &str, text: impl AsRef<[u8]>, kiln: &Kiln) -> PathBuf {
        let path = self.write(rel, text);
        let lock = path.with_extension("lock");
        std::fs::write(&lock, base_lock(&kiln.store))
            .unwrap_or_else(|e| panic!("writing {}: {e}", lock.display()));
        path
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        let path = self.path(rel);
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }
}

impl Default for RecipeDir {
    fn default() -> RecipeDir {
        RecipeDir::new()
    }
}

/// Where the shared base lock is kept: inside the store, so that it goes
/// away with the layers it describes.
pub fn base_lock_path(store: &Path) -> PathBuf {
    store.join("kiln-tests").join("base.lock")
}

/// A lock file (kiln's own output) pinning only `[base]` ([`BASE`]).
///
/// A recipe without a lock makes kiln resolve its base against the archive,
/// which means running mmdebstrap again; giving every test recipe the same
/// pins lets them all share one base layer. Kept at [`base_lock_path`];
/// checked once per test process with `kiln plan` (the base must be
/// cached under it) and otherwise made again by building a base-only
/// recipe, which also covers a lock written by an older kiln.
pub fn base_lock(store: &Path) -> String {
    static CHECKED: std::sync::Mutex<BTreeMap<PathBuf, String>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(text) = checked.get(store) {
        return text.clone();
    }
    let path = base_lock_path(store);
    let d = RecipeDir::new();
    let recipe = d.write("kt-base.toml", recipe("kt-base", ""));
    let kiln = Kiln::with_store(store);
    if let Ok(text) = std::fs::read_to_string(&path) {
        d.write("kt-base.lock", &text);
        if kiln.plan(&recipe).step("base").state == "cached" {
            checked.insert(store.to_owned(), text.clone());
            return text;
        }
    }
    kiln.build(&recipe, &[]);
    let text = String::from_utf8(d.read("kt-base.lock")).expect("the lock is UTF-8");
    assert!(
        text.contains("[steps.base]"),
        "kiln wrote no base pins:\n{text}"
    );
    assert_eq!(
        kiln.plan(&recipe).step("base").state,
        "cached",
        "the base is not cached under the lock kiln just wrote:\n{text}"
    );
    let dir = path.parent().expect("the lock has a folder");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let tmp = dir.join(format!(".base.lock.{}", std::process::id()));
    std::fs::write(&tmp, &text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, &path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
    checked.insert(store.to_owned(), text.clone());
    text
}

/// A recipe text: `[image]` named `name`, golden's `[base]`, then `layers`
/// (TOML for zero or more `[[layer]]` tables).
pub fn recipe(name: &str, layers: &str) -> String {
    format!(
        "[image]\nname = \"{name}\"\nsize = \"2GiB\"\nhostname = \"{name}\"\n\n{BASE}\n{layers}"
    )
}

// --------------------------------------------------------------------- kiln

/// What one kiln run did.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// For assertion messages.
    pub fn show(&self) -> String {
        format!(
            "kiln {}\nexit code: {:?} after {:.1}s\n--- stdout\n{}\n--- stderr\n{}",
            self.args.join(" "),
            self.code,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not the expected JSON ({e}):\n{}", self.show()))
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code:\n{}",
            self.show()
        );
        self
    }

    /// Exit code 2 and an error that names `file`, the key (containing
    /// `key`), a fix, and says `says`.
    #[track_caller]
    pub fn assert_bad_input(&self, file: &Path, key: &str, says: &str) -> &Run {
        self.assert_code(2);
        let err = &self.stderr;
        let mut wrong = Vec::new();
        if !err.contains(&file.display().to_string()) {
            wrong.push(format!("the file {}", file.display()));
        }
        if !err.contains("key `")
            || !err
                .split("key `")
                .skip(1)
                .any(|rest| rest.split('`').next().is_some_and(|k| k.contains(key)))
        {
            wrong.push(format!("a key `...{key}...`"));
        }
        if !err.contains("fix: ") {
            wrong.push("`fix: `".to_owned());
        }
        if !err.contains(says) {
            wrong.push(format!("`{says}`"));
        }
        assert!(
            wrong.is_empty(),
            "the error does not name {}:\n{}",
            wrong.join(", "),
            self.show()
        );
        self
    }
}

/// The kiln binary under test, with a store and an out folder.
///
/// A `Kiln` with a temp `--out` ([`Kiln::shared`], [`Kiln::with_store`])
/// forgets, when dropped, the store's entry of every image it built whose
/// name no shipped recipe has (see [`TestImages`]).
pub struct Kiln {
    pub store: PathBuf,
    pub out: PathBuf,
    _out_tmp: Option<tempfile::TempDir>,
    images: TestImages,
}

impl Kiln {
    /// The shared warm store and a fresh temp `--out` (removed on drop).
    pub fn shared() -> Kiln {
        Kiln::with_store(&shared_store())
    }

    /// A given store and a given `--out`, which the caller cleans up.
    pub fn at(store: &Path, out: &Path) -> Kiln {
        Kiln {
            store: store.to_owned(),
            out: out.to_owned(),
            _out_tmp: None,
            images: TestImages::default(),
        }
    }

    /// A given store, with a fresh temp `--out`.
    pub fn with_store(store: &Path) -> Kiln {
        let out = tempfile::Builder::new()
            .prefix("kiln-out-")
            .tempdir()
            .expect("creating a temp out dir");
        Kiln {
            store: store.to_owned(),
            out: out.path().join("out"),
            _out_tmp: Some(out),
            images: TestImages::default(),
        }
    }

    pub fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_kiln")
    }

    /// Run `kiln --cache STORE --out OUT ARGS…`, then check that it left no
    /// mount, QEMU process or staging debris behind (whatever its exit code).
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        self.run_in(args, &[], None)
    }

    /// [`Kiln::run`] with extra environment (e.g. a PATH without a tool)
    /// and, if given, another working directory.
    pub fn run_in<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        env: &[(&str, &str)],
        dir: Option<&Path>,
    ) -> Run {
        let mut full: Vec<String> = vec![
            "--cache".into(),
            self.store.display().to_string(),
            "--out".into(),
            self.out.display().to_string(),
        ];
        full.extend(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        );
        let mut cmd = Command::new(Kiln::binary());
        cmd.args(&full).env_remove("KILN_CACHE_DIR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        let done = run_with_deadline(cmd, KILN_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        let run = Run {
            args: full,
            code: done.status.code(),
            status: done.status,
            stdout: String::from_utf8_lossy(&done.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&done.stderr).into_owned(),
            elapsed: done.elapsed,
        };
        // Shown with the output of a failing test (or with --nocapture).
        eprintln!(
            "kiln {}: exit {:?} in {:.1}s",
            run.args.join(" "),
            run.code,
            run.elapsed.as_secs_f64()
        );
        assert_no_leftovers(&self.store, &self.out)
            .unwrap_or_else(|m| panic!("{m}\nafter:\n{}", run.show()));
        if self._out_tmp.is_some() {
            self.images.note(&self.out);
        }
        run
    }

    /// `kiln --json build --no-smoke RECIPE EXTRA…`, which must succeed:
    /// layers and image only (the smoke boot has its own tests and costs a
    /// VM boot per new image).
    #[track_caller]
    pub fn build(&self, recipe: &Path, extra: &[&str]) -> BuildReport {
        let mut all = vec!["--no-smoke"];
        all.extend(extra);
        self.build_with_smoke(recipe, &all)
    }

    /// `kiln --json build RECIPE EXTRA…` (smoke included unless `extra`
    /// says otherwise), which must succeed.
    #[track_caller]
    pub fn build_with_smoke(&self, recipe: &Path, extra: &[&str]) -> BuildReport {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--json"),
            OsStr::new("build"),
            recipe.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let run = self.run(&args);
        run.assert_code(0);
        let report: BuildReport = run.json();
        // The same summary is kept beside the image.
        let kept = self.out.join(format!("{}.build.json", report.image_name()));
        let kept: BuildReport = serde_json::from_slice(
            &std::fs::read(&kept).unwrap_or_else(|e| panic!("reading {}: {e}", kept.display())),
        )
        .unwrap_or_else(|e| panic!("parsing {}: {e}", kept.display()));
        assert_eq!(
            kept, report,
            "OUT/NAME.build.json differs from the --json output"
        );
        let log = self.out.join(format!("{}.build.log", report.image_name()));
        assert!(log.is_file(), "no build log at {}", log.display());
        report
    }

    /// `kiln --json plan RECIPE`, which must succeed.
    #[track_caller]
    pub fn plan(&self, recipe: &Path) -> PlanReport {
        let run = self.run(&[OsStr::new("--json"), OsStr::new("plan"), recipe.as_os_str()]);
        run.assert_code(0);
        run.json()
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        if self._out_tmp.is_some() {
            self.images.forget(&self.store);
        }
    }
}

/// The images a test made up, to forget from the store when the test is
/// done: each a few hundred MB that nothing else uses, and a full `make
/// test` would otherwise leave some 30 of them (9 GB) in the shared store.
/// Their layers stay, and so do the images of the shipped recipes
/// (`recipes/NAME.toml`), which other tests reuse warm.
#[derive(Default)]
pub struct TestImages(std::sync::Mutex<BTreeSet<String>>);

impl TestImages {
    /// Note the images whose build summaries (`NAME.build.json`) are in
    /// `out` now; call it after each build, as a later build of the same
    /// name replaces the summary.
    pub fn note(&self, out: &Path) {
        let mut noted = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(".build.json"))
            else {
                continue;
            };
            let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("recipes")
                .join(format!("{name}.toml"))
                .is_file();
            let report = std::fs::read(entry.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<BuildReport>(&b).ok());
            if let (Some(report), false) = (report, shipped) {
                noted.extend(
                    report
                        .rows
                        .into_iter()
                        .filter(|r| r.stage == "image")
                        .map(|r| r.key),
                );
            }
        }
    }

    /// Forget the store's entries of the noted images (by the first 12 hex
    /// digits of their keys, as the summaries give them).
    pub fn forget(&self, store: &Path) {
        let noted = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let keys: Vec<String> = std::fs::read_dir(store.join(IMAGES))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|k| noted.iter().any(|p| k.starts_with(p.as_str())))
            .collect();
        // No panic here: this also runs while a failed test unwinds.
        if let Err(e) = forget(store, &[], &keys) {
            eprintln!("warning: forgetting the test's images in the store: {e}");
        }
    }
}

/// A program that ran to its end.
#[derive(Debug)]
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

/// How long a finished program's output may stay open: longer means a
/// process it started (a QEMU, a daemon) still holds its stdout or stderr.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(30);

/// Run `cmd` in its own process group with a deadline. stdout and stderr
/// are drained by threads while the deadline runs (a program that fills a
/// pipe, or never closes one, cannot stall the wait); past the deadline the
/// whole group is killed and reaped, and the error says so, with the output
/// so far.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> Result<Finished, String> {
    use std::os::unix::process::CommandExt;
    use std::sync::mpsc;
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {shown}: {e}"))?;
    let pump = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let read = r.read_to_end(&mut buf).map(|_| buf);
            // The receiver is gone only if the run already failed.
            drop(tx.send(read));
        });
        rx
    };
    let out = pump(Box::new(child.stdout.take().expect("piped stdout")));
    let err = pump(Box::new(child.stderr.take().expect("piped stderr")));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
        if started.elapsed() > timeout {
            kill_group(&mut child);
            let so_far = |rx: &mpsc::Receiver<std::io::Result<Vec<u8>>>| {
                rx.recv_timeout(Duration::from_secs(2))
                    .ok()
                    .and_then(Result::ok)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            return Err(format!(
                "{shown} took more than {timeout:?} and was killed\n--- stdout\n{}\n--- stderr\n{}",
                so_far(&out),
                so_far(&err)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let collect = |rx: mpsc::Receiver<std::io::Result<Vec<u8>>>, which: &str| match rx
        .recv_timeout(OUTPUT_GRACE)
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(format!("reading the {which} of {shown}: {e}")),
        Err(_) => Err(format!(
            "{shown} exited ({status}) but its {which} stayed open for {OUTPUT_GRACE:?}: \
                 a process it started is still running"
        )),
    };
    let stdout = collect(out, "stdout")?;
    let stderr = collect(err, "stderr")?;
    Ok(Finished {
        status,
        stdout,
        stderr,
        elapsed: started.elapsed(),
    })
}

/// SIGKILL the process group `child` leads and its direct children that
/// left the group (kiln starts QEMU in a group of its own), then reap
/// `child`.
fn kill_group(child: &mut std::process::Child) {
    let group = child.id() as i32;
    for pid in children_of(child.id()) {
        // SAFETY: kill(2) on a child of the process this harness started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    // SAFETY: kill(2) on the process group this harness created.
    if unsafe { libc::kill(-group, libc::SIGKILL) } != 0 {
        eprintln!(
            "warning: killing process group {group}: {}",
            std::io::Error::last_os_error()
        );
    }
    if let Err(e) = child.wait() {
        eprintln!("warning: reaping process {group}: {e}");
    }
}

/// Run a tool that must succeed; returns its stdout and stderr.
#[track_caller]
pub fn tool(program: &str, args: &[&OsStr], env: &[(&str, &str)]) -> (Vec<u8>, String) {
    tool_with_timeout(program, args, env, TOOL_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// [`tool`] with a given timeout, as a `Result`: the error says why (it
/// failed, or it ran past `timeout` and was killed).
pub fn tool_with_timeout(
    program: &str,
    args: &[&OsStr],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<(Vec<u8>, String), String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let shown = format!("{cmd:?}");
    let done = run_with_deadline(cmd, timeout)?;
    let stderr = String::from_utf8_lossy(&done.stderr).into_owned();
    if !done.status.success() {
        return Err(format!("{shown} failed ({}):\n{stderr}", done.status));
    }
    Ok((done.stdout, stderr))
}

// ------------------------------------------------------------ JSON reports

/// `kiln --json build` (and OUT/NAME.build.json).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BuildReport {
    pub recipe: String,
    pub image: PathBuf,
    pub image_key: String,
    pub sha256: String,
    pub kernel: String,
    pub rows: Vec<BuildRow>,
    pub seconds: f64,
    /// Where the log of the run that built the image is kept.
    #[serde(default)]
    pub build_log: Option<PathBuf>,
    /// Seconds per tool, the longest first.
    #[serde(default)]
    pub tools: Vec<ToolTime>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolTime {
    pub tool: String,
    pub runs: u32,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BuildRow {
    pub stage: String,
    /// The key's first 12 hex digits.
    pub key: String,
    /// `cached` or `built`.
    pub status: String,
    pub reason: Option<String>,
    pub seconds: f64,
    /// What a `pulled` row downloaded.
    #[serde(default)]
    pub bytes: Option<u64>,
}

impl BuildReport {
    /// `NAME` of `OUT/NAME.qcow2`.
    pub fn image_name(&self) -> String {
        self.image
            .file_stem()
            .expect("the image has a file name")
            .to_string_lossy()
            .into_owned()
    }

    #[track_caller]
    pub fn row(&self, stage: &str) -> &BuildRow {
        self.rows
            .iter()
            .find(|r| r.stage == stage)
            .unwrap_or_else(|| panic!("no row `{stage}` in {:#?}", self.rows))
    }

    /// `(stage, status)` for every row, in order.
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.rows
            .iter()
            .map(|r| (r.stage.clone(), r.status.clone()))
            .collect()
    }

    pub fn stages(&self) -> Vec<String> {
        self.rows.iter().map(|r| r.stage.clone()).collect()
    }
}

/// `kiln --json plan`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PlanReport {
    pub recipe: String,
    pub image: String,
    pub steps: Vec<PlanStep>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PlanStep {
    pub stage: String,
    /// The full key.
    pub key: String,
    /// `cached` or `build`.
    pub state: String,
    /// `"not_in_store"`, `{"file_changed": [...]}`, … (absent when cached).
    #[serde(default)]
    pub reason: Option<serde_json::Value>,
}

impl PlanReport {
    #[track_caller]
    pub fn step(&self, stage: &str) -> &PlanStep {
        self.steps
            .iter()
            .find(|s| s.stage == stage)
            .unwrap_or_else(|| panic!("no step `{stage}` in {:#?}", self.steps))
    }

    /// Full keys of the layer steps (not the image), by stage.
    pub fn layer_keys(&self) -> Vec<(String, String)> {
        self.steps
            .iter()
            .filter(|s| s.stage != "image")
            .map(|s| (s.stage.clone(), s.key.clone()))
            .collect()
    }

    /// Full keys of `stage` and of every step after it, the image's included:
    /// what a failure at `stage` must not publish.
    #[track_caller]
    pub fn keys_from(&self, stage: &str) -> Vec<String> {
        let at = self
            .steps
            .iter()
            .position(|s| s.stage == stage)
            .unwrap_or_else(|| panic!("no step `{stage}` in {:#?}", self.steps));
        self.steps[at..].iter().map(|s| s.key.clone()).collect()
    }

    pub fn image_key(&self) -> String {
        self.step("image").key.clone()
    }

    /// `(stage, state, reason as compact JSON or "")` for every step.
    pub fn states(&self) -> Vec<(String, String, String)> {
        self.steps
            .iter()
            .map(|s| {
                (
                    s.stage.clone(),
                    s.state.clone(),
                    s.reason.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }
}

// -------------------------------------------------------------------- store

pub const LAYERS: &str = "layers-v1";
pub const IMAGES: &str = "images-v1";

/// The entries of a store at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreSnapshot {
    pub layers: BTreeSet<String>,
    pub images: BTreeSet<String>,
}

fn entries(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("reading a store dir")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    }
}

impl StoreSnapshot {
    pub fn of(store: &Path) -> StoreSnapshot {
        StoreSnapshot {
            layers: entries(&store.join(LAYERS)),
            images: entries(&store.join(IMAGES)),
        }
    }

    /// After a failed build: none of `forbidden` (full keys of the failed
    /// step, the steps above it and the image) was published, and every
    /// entry that appeared since this snapshot is complete. Entries other
    /// than the forbidden ones may appear: steps below the failure succeed
    /// and are rightly kept, and others may be building into a shared store
    /// at the same time.
    #[track_caller]
    pub fn assert_not_published(&self, store: &Path, forbidden: &[String]) {
        let now = StoreSnapshot::of(store);
        let published: Vec<&String> = forbidden
            .iter()
            .filter(|k| now.layers.contains(*k) || now.images.contains(*k))
            .collect();
        assert!(
            published.is_empty(),
            "entries of the failed build were published: {published:?}"
        );
        for key in now.layers.difference(&self.layers) {
            let entry = store.join(LAYERS).join(key).join("entry.json");
            assert!(
                entry.is_file(),
                "layer {key} was published without its entry.json"
            );
        }
        for key in now.images.difference(&self.images) {
            let entry = store.join(IMAGES).join(key).join("image.json");
            assert!(
                entry.is_file(),
                "image {key} was published without its image.json"
            );
        }
    }
}

/// Whether a live run claims this staging dir: a running kiln holds the
/// flock on its `.kiln-pid`, or the dir is so new (under the minute kiln
/// itself allows, `UNCLAIMED_GRACE`) that its run has not claimed it yet.
/// (Not the pid written in `.kiln-pid`: kiln is pid 1 of its own
/// namespace, so that pid always names a live process.)
fn staging_is_claimed(dir: &Path) -> bool {
    let just_made = || {
        !dir.join(".kiln-pid").exists()
            && std::fs::symlink_metadata(dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(60))
    };
    claim_is_held(dir) || just_made()
}

/// Whether a running kiln holds the claim (an flock on `.kiln-pid`) on a
/// staging or tool dir of a store's `tmp/`.
pub fn claim_is_held(dir: &Path) -> bool {
    std::fs::File::open(dir.join(".kiln-pid")).is_ok_and(|f| {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file we hold open; released when it closes.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    })
}

/// `tmp/` of a store (kiln's staging area) must hold nothing once the run
/// that used it is over: nothing but the staging dirs of runs still alive,
/// which a shared store may have.
pub fn assert_tmp_empty(store: &Path) -> Result<(), String> {
    let tmp = store.join("tmp");
    // In a shared store another test's kiln may remove its dir between the
    // listing and the check: only what is still there counts.
    let left: Vec<String> = entries(&tmp)
        .into_iter()
        .filter(|n| {
            let dir = tmp.join(n);
            !staging_is_claimed(&dir) && dir.symlink_metadata().is_ok()
        })
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} holds what a finished run left: {left:?}",
            tmp.display()
        ))
    }
}

/// Everything a finished kiln run must not leave behind: a mount, a QEMU
/// process, a staging dir.
pub fn assert_no_leftovers(store: &Path, out: &Path) -> Result<(), String> {
    assert_no_mounts(&[store, out])?;
    assert_no_orphan_qemu(&[store, out])?;
    assert_tmp_empty(store)
}

/// No QEMU process that mentions any of `paths` on its command line has
/// lost the kiln that started it. (QEMU under a live kiln, e.g. another
/// test's build into the same shared store, is not a leftover.)
pub fn assert_no_orphan_qemu(paths: &[&Path]) -> Result<(), String> {
    let orphans: Vec<String> = qemu_processes()
        .into_iter()
        .filter(|q| {
            paths
                .iter()
                .any(|p| q.cmdline.contains(&*p.to_string_lossy()))
        })
        .filter(|q| comm(q.ppid).as_deref() != Some("kiln"))
        .map(|q| format!("pid {} (parent {}): {}", q.pid, q.ppid, q.cmdline))
        .collect();
    if orphans.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "QEMU processes left running:\n{}",
            orphans.join("\n")
        ))
    }
}

/// A running (not zombie) QEMU process.
#[derive(Debug)]
pub struct Qemu {
    pub pid: u32,
    pub ppid: u32,
    pub cmdline: String,
}

/// One process, from `/proc/PID/stat`.
struct ProcStat {
    pid: u32,
    comm: String,
    state: String,
    ppid: u32,
}

/// Every process on the machine; one that exits while being read is left out.
fn processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name is in parentheses and may hold spaces.
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.to_owned();
            let ppid = fields.next()?.parse().ok()?;
            Some(ProcStat {
                pid,
                comm: comm.to_owned(),
                state,
                ppid,
            })
        })
        .collect()
}

/// Every live `qemu-system-*` process on the machine.
pub fn qemu_processes() -> Vec<Qemu> {
    processes()
        .into_iter()
        .filter(|p| p.comm.starts_with("qemu-system") && p.state != "Z")
        .filter_map(|p| {
            let raw = std::fs::read(format!("/proc/{}/cmdline", p.pid)).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            Some(Qemu {
                pid: p.pid,
                ppid: p.ppid,
                cmdline,
            })
        })
        .collect()
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == parent)
        .map(|p| p.pid)
        .collect()
}

/// The command name of a process, if it is alive.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}

/// No mount in this process's mount namespace (the host's) mentions any
/// of `paths`.
pub fn assert_no_mounts(paths: &[&Path]) -> Result<(), String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let hits: Vec<&str> = info
        .lines()
        .filter(|l| paths.iter().any(|p| l.contains(&*p.to_string_lossy())))
        .collect();
    if hits.is_empty() {
        Ok(())
    } else {
        Err(format!("mounts left behind:\n{}", hits.join("\n")))
    }
}

/// Remove entries a test made with content unique to its run (see
/// [`nonce`]), so the shared store does not grow by an image per run.
/// Each entry is first renamed out of the store (into a temp dir beside
/// it, on the same file system), so it disappears at once and nothing of
/// it is ever in kiln's own `tmp/`, which other tests check for leftovers.
pub fn forget(store: &Path, layers: &[String], images: &[String]) -> Result<(), String> {
    let beside = store.parent().unwrap_or(Path::new("/"));
    let aside = tempfile::Builder::new()
        .prefix(".kiln-test-forget-")
        .tempdir_in(beside)
        .map_err(|e| format!("creating a temp dir in {}: {e}", beside.display()))?;
    for (sub, key) in layers
        .iter()
        .map(|k| (LAYERS, k))
        .chain(images.iter().map(|k| (IMAGES, k)))
    {
        let entry = store.join(sub).join(key);
        if !entry.exists() {
            continue;
        }
        std::fs::rename(&entry, aside.path().join(format!("{sub}-{key}")))
            .map_err(|e| format!("moving {} aside: {e}", entry.display()))?;
    }
    let removing = aside.path().display().to_string();
    aside
        .close()
        .map_err(|e| format!("removing {removing}: {e}"))
}

/// [`forget`] when dropped, so a failing test cleans up too. Never give it
/// a key that other tests share (the base): only keys made unique by a
/// [`nonce`].
pub struct ForgetOnDrop {
    pub store: PathBuf,
    pub layers: Vec<String>,
    pub images: Vec<String>,
}

impl ForgetOnDrop {
    pub fn new(store: &Path) -> ForgetOnDrop {
        ForgetOnDrop {
            store: store.to_owned(),
            layers: Vec::new(),
            images: Vec::new(),
        }
    }

    /// Forget the steps of `plan` whose stage is in `stages` (and its image
    /// if `stages` holds `image`).
    pub fn add(&mut self, plan: &PlanReport, stages: &[&str]) {
        for s in &plan.steps {
            if stages.contains(&s.stage.as_str()) {
                let list = if s.stage == "image" {
                    &mut self.images
                } else {
                    &mut self.layers
                };
                list.push(s.key.clone());
            }
        }
    }
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        // No panic here: this also runs while a failed test unwinds.
        if let Err(e) = forget(&self.store, &self.layers, &self.images) {
            eprintln!("warning: cleaning the test's entries out of the shared store: {e}");
        }
    }
}

/// Copy the given entries of one store into another (a private store that
/// starts warm without rebuilding the base), with `cp -a`.
pub fn copy_entries(from: &Path, to: &Path, layers: &[String]) {
    let dest = to.join(LAYERS);
    std::fs::create_dir_all(&dest).unwrap_or_else(|e| panic!("creating {}: {e}", dest.display()));
    for key in layers {
        let src = from.join(LAYERS).join(key);
        assert!(
            src.join("entry.json").is_file(),
            "{} is not a complete layer",
            src.display()
        );
        tool(
            "cp",
            &[OsStr::new("-a"), src.as_os_str(), dest.as_os_str()],
            &[],
        );
    }
}

/// Copy one folder of a store into another if it exists (e.g. `debs-v1`,
/// the .deb cache, so a private store need not download the base again).
pub fn copy_store_dir(from: &Path, to: &Path, sub: &str) {
    let src = from.join(sub);
    if !src.is_dir() {
        return;
    }
    let dest = to.join(sub);
    let parent = dest.parent().expect("a store folder has a parent");
    std::fs::create_dir_all(parent)
        .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    tool(
        "cp",
        &[
            OsStr::new("-a"),
            OsStr::new("--reflink=auto"),
            src.as_os_str(),
            dest.as_os_str(),
        ],
        &[],
    );
}

// --------------------------------------------------------------------- disk

/// A disk image converted to raw in a temp dir, read without mounting:
/// sfdisk for the partition table, mtools for the ESP, debugfs for ext4.
pub struct Disk {
    _tmp: tempfile::TempDir,
    pub raw: PathBuf,
    pub table: PartitionTable,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PartitionTable {
    pub label: String,
    #[serde(default)]
    pub sectorsize: Option<u64>,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Partition {
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub name: Option<String>,
}

impl Disk {
    /// `qemu-img convert -O raw IMAGE` into a temp dir, then read its table.
    #[track_caller]
    pub fn open(image: &Path) -> Disk {
        require_inspect();
        let tmp = temp_dir("kiln-disk-");
        let raw = tmp.path().join("disk.raw");
        tool(
            "qemu-img",
            &[
                OsStr::new("convert"),
                OsStr::new("-O"),
                OsStr::new("raw"),
                image.as_os_str(),
                raw.as_os_str(),
            ],
            &[],
        );
        let (json, _) = tool("sfdisk", &[OsStr::new("--json"), raw.as_os_str()], &[]);
        #[derive(Deserialize)]
        struct Top {
            partitiontable: PartitionTable,
        }
        let top: Top = serde_json::from_slice(&json).unwrap_or_else(|e| {
            panic!(
                "sfdisk --json output ({e}): {}",
                String::from_utf8_lossy(&json)
            )
        });
        Disk {
            _tmp: tmp,
            raw,
            table: top.partitiontable,
        }
    }

    pub fn sector(&self) -> u64 {
        self.table.sectorsize.unwrap_or(512)
    }

    #[track_caller]
    pub fn partition(&self, type_: &str) -> &Partition {
        let found: Vec<&Partition> = self
            .table
            .partitions
            .iter()
            .filter(|p| p.type_.eq_ignore_ascii_case(type_))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "want exactly one partition of type {type_}: {:#?}",
            self.table
        );
        found[0]
    }

    pub fn esp(&self) -> &Partition {
        self.partition(ESP_TYPE)
    }

    pub fn root(&self) -> &Partition {
        self.partition(ROOT_TYPE)
    }

    fn mtools_image(&self) -> String {
        format!(
            "{}@@{}",
            self.raw.display(),
            self.esp().start * self.sector()
        )
    }

    /// A file on the ESP (a `::/EFI/...` path), or `None` if absent.
    pub fn esp_file(&self, path: &str) -> Option<Vec<u8>> {
        let env = [("MTOOLS_SKIP_CHECK", "1")];
        let image = self.mtools_image();
        let listed = Command::new("mdir")
            .args(["-b", "-i", &image, path])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap_or_else(|e| panic!("running mdir: {e}"));
        if !listed.status.success() {
            return None;
        }
        let (data, _) = tool(
            "mcopy",
            &[
                OsStr::new("-n"),
                OsStr::new("-i"),
                OsStr::new(&image),
                OsStr::new(path),
                OsStr::new("-"),
            ],
            &env,
        );
        Some(data)
    }

    fn debugfs(&self, request: &str) -> (Vec<u8>, String) {
        let device = format!(
            "{}?offset={}",
            self.raw.display(),
            self.root().start * self.sector()
        );
        let (out, err) = tool(
            "debugfs",
            &[OsStr::new("-R"), OsStr::new(request), OsStr::new(&device)],
            &[],
        );
        // debugfs exits 0 even when the request fails: anything on stderr
        // but its banner is an error.
        let problems: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect();
        (out, problems.join("\n"))
    }

    /// A file in the root filesystem, or `None` if absent.
    #[track_caller]
    pub fn root_file(&self, path: &str) -> Option<Vec<u8>> {
        let (out, err) = self.debugfs(&format!("cat {path}"));
        if err.contains("not found") {
            return None;
        }
        assert!(err.is_empty(), "debugfs cat {path}: {err}");
        Some(out)
    }

    #[track_caller]
    pub fn root_text(&self, path: &str) -> String {
        let data = self
            .root_file(path)
            .unwrap_or_else(|| panic!("{path} is not in the image's root filesystem"));
        String::from_utf8(data).unwrap_or_else(|e| panic!("{path} is not UTF-8: {e}"))
    }

    /// `debugfs stat` of a path in the root filesystem.
    #[track_caller]
    pub fn root_stat(&self, path: &str) -> Stat {
        let (out, err) = self.debugfs(&format!("stat {path}"));
        assert!(err.is_empty(), "debugfs stat {path}: {err}");
        let text = String::from_utf8_lossy(&out).into_owned();
        let field = |name: &str| -> u64 {
            let rest = text
                .split(&format!("{name}:"))
                .nth(1)
                .unwrap_or_else(|| panic!("no `{name}` in debugfs stat {path}:\n{text}"));
            let word = rest.split_whitespace().next().unwrap_or("");
            if name == "Mode" {
                u64::from_str_radix(word, 8)
                    .unwrap_or_else(|e| panic!("mode `{word}` of {path}: {e}"))
            } else {
                word.parse()
                    .unwrap_or_else(|e| panic!("{name} `{word}` of {path}: {e}"))
            }
        };
        let kind = text
            .split("Type:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("")
            .to_owned();
        Stat {
            kind,
            mode: field("Mode") as u32,
            uid: field("User") as u32,
            gid: field("Group") as u32,
            size: field("Size"),
        }
    }

    /// The root filesystem's volume label.
    pub fn root_label(&self) -> String {
        let (out, err) = self.debugfs("stats");
        assert!(err.is_empty(), "debugfs stats: {err}");
        let text = String::from_utf8_lossy(&out).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("Filesystem volume name:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    }
}

/// What `debugfs stat` says about a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    /// `regular`, `directory`, `symlink`, …
    pub kind: String,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

// ------------------------------------------------------ shipped recipes, VMs

/// A copy of the shipped `recipes/` in `to`, without lock files, so a test
/// builds them like a fresh checkout would and writes its locks there.
pub fn copy_recipes(to: &Path) {
    copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"), to);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
    for entry in
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()))
    {
        let entry = entry.expect("reading a recipe dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else if entry.path().extension().is_none_or(|e| e != "lock") {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copying {}: {e}", entry.path().display()));
        }
    }
}

/// `kiln --cache SHARED --out OUT ARGS…`, whatever its exit code (for the
/// tests that boot VMs and look at stderr themselves), through the harness:
/// a timeout, then the leftover checks of [`Kiln::run`].
pub fn kiln_output(out: &Path, args: &[&str]) -> std::process::Output {
    let run = Kiln::at(&shared_store(), out).run(args);
    std::process::Output {
        status: run.status,
        stdout: run.stdout.into_bytes(),
        stderr: run.stderr.into_bytes(),
    }
}

/// An output, for assertion messages.
pub fn describe(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A recipe's `[smoke]` as kiln merges it: a recipe's seed, checks and
/// HTTP checks come after those of the recipe it `extends`. Read from the
/// TOML here, so tests derive counts and check numbers from the recipes
/// instead of hard-coding them.
#[derive(Debug, Default, Clone)]
pub struct SmokeChecks {
    pub seed: Vec<String>,
    pub checks: Vec<String>,
    pub http: usize,
}

pub fn smoke_checks(recipe: &Path) -> SmokeChecks {
    let text = std::fs::read_to_string(recipe)
        .unwrap_or_else(|e| panic!("reading {}: {e}", recipe.display()));
    let doc: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", recipe.display()));
    let mut merged = match doc.get("extends").and_then(|v| v.as_str()) {
        Some(parent) => smoke_checks(&recipe.parent().expect("a recipe has a folder").join(parent)),
        None => SmokeChecks::default(),
    };
    let strings = |key: &str| -> Vec<String> {
        doc.get("smoke")
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().expect("a smoke command is a string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    merged.seed.extend(strings("seed"));
    merged.checks.extend(strings("checks"));
    merged.http += doc
        .get("smoke")
        .and_then(|s| s.get("http"))
        .and_then(|v| v.as_array())
        .map_or(0, Vec::len);
    merged
}
