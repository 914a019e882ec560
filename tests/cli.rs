//! What people see, pinned: the build summary of a `--no-smoke` build,
//! `kiln plan`, `kiln verify` (clean and with drift) and the main error
//! messages, compared with the expected files in `tests/snapshots/`.
//!
//! Keys, digests, times, sizes and the test's own temp paths change from
//! run to run; [`redact`] replaces them with `[KEY]`, `[SECS]`, `[SIZE]`,
//! `[RECIPES]`, `[OUT]` and `[STORE]`, and collapses the padding of table
//! columns (whose width follows the redacted values). Everything else is
//! compared byte for byte, so a change to what a user reads shows up as a
//! diff in review. To accept a change on purpose, run
//! `KILN_UPDATE_SNAPSHOTS=1 make check` and commit `tests/snapshots/`.
//!
//! Part of `make check`: no boots. The builds use the shared warm store
//! (golden's base, built once) and add one small layer.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Kiln, RecipeDir};

const UPDATE_ENV: &str = "KILN_UPDATE_SNAPSHOTS";

// ----------------------------------------------------------- snapshots

fn snapshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"))
}

/// Compare `actual` with `tests/snapshots/NAME.txt`, or write it there
/// when `KILN_UPDATE_SNAPSHOTS=1`. A missing snapshot is a failure, never
/// a silent pass.
#[track_caller]
fn assert_snapshot(name: &str, actual: &str) {
    let path = snapshot_path(name);
    if std::env::var_os(UPDATE_ENV).is_some_and(|v| v == "1") {
        let dir = path.parent().expect("snapshots have a folder");
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no snapshot {} ({e}); run with {UPDATE_ENV}=1 to write it, then review and commit it.\nactual:\n{actual}",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "{name}: the output differs from {}.\n--- expected\n{expected}--- actual\n{actual}---\n\
             If the change is intended, run `{UPDATE_ENV}=1 make check` and commit tests/snapshots/.",
            path.display()
        );
    }
}

/// The output with everything that changes between runs replaced by a
/// placeholder: the given paths (longest first), hex digests of 12 or more
/// digits, durations, sizes and timestamps.
fn redact(text: &str, paths: &[(&Path, &str)]) -> String {
    let mut text = text.to_owned();
    let mut paths: Vec<(String, &str)> = paths
        .iter()
        .map(|(p, name)| (p.display().to_string(), *name))
        .collect();
    paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    for (p, name) in &paths {
        text = text.replace(p.as_str(), name);
    }
    text.lines()
        .map(|line| {
            let words: Vec<String> = split_keep(line).into_iter().map(redact_word).collect();
            let joined = words.concat();
            // Column padding follows the width of redacted values: keep
            // the indentation, make every other run of spaces one or two.
            let body = joined.trim_start();
            let indent = &joined[..joined.len() - body.len()];
            let mut out = indent.to_owned();
            let mut spaces = 0;
            for c in body.trim_end().chars() {
                if c == ' ' {
                    spaces += 1;
                    continue;
                }
                out.push_str(&" ".repeat(spaces.min(2)));
                spaces = 0;
                out.push(c);
            }
            out + "\n"
        })
        .collect()
}

/// Split a line into runs of word characters and runs of everything else.
fn split_keep(line: &str) -> Vec<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '_';
    let mut parts: Vec<String> = Vec::new();
    for c in line.chars() {
        match parts.last_mut() {
            Some(last) if last.chars().next().is_some_and(word) == word(c) => last.push(c),
            _ => parts.push(c.to_string()),
        }
    }
    parts
}

fn redact_word(w: String) -> String {
    let hex = |s: &str| s.len() >= 12 && s.chars().all(|c| c.is_ascii_hexdigit());
    let number = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| c.is_ascii_digit() || c == '.')
            && s.chars().next().is_some_and(|c| c.is_ascii_digit())
    };
    if hex(&w) {
        return "[KEY]".into();
    }
    // 12.3s, 0.5s
    if let Some(n) = w.strip_suffix('s') {
        if number(n) && n.contains('.') {
            return "[SECS]".into();
        }
    }
    // A bare decimal (the SECONDS column, sizes like 1.2 before a unit).
    if number(&w) && w.contains('.') && !w.ends_with('.') {
        return "[N]".into();
    }
    for unit in ["B", "KiB", "MiB", "GiB", "K", "M", "G"] {
        if let Some(n) = w.strip_suffix(unit) {
            if number(n) {
                return "[SIZE]".into();
            }
        }
    }
    w
}

// ------------------------------------------------------------- fixture

/// A recipe with golden's base and one small layer whose file carries a
/// nonce, so the layer is built by this run whatever the store holds.
struct Fixture {
    kiln: Kiln,
    dir: RecipeDir,
    recipe: PathBuf,
    /// The image name, unique to this run: the store keeps each recipe
    /// name's last build, which `plan` and `build` compare against.
    name: String,
    forget: std::cell::RefCell<Vec<common::ForgetOnDrop>>,
}

impl Fixture {
    fn new(prefix: &str) -> Fixture {
        common::require_build();
        let name = format!("{prefix}-{}", common::nonce());
        let name = name.as_str();
        let kiln = Kiln::shared();
        let dir = RecipeDir::new();
        // Of a fixed length: its size is part of what `verify` prints.
        dir.write(
            "files/motd",
            format!("kiln cli test {:>40}\n", common::nonce()),
        );
        let recipe = dir.write_recipe(
            &format!("{name}.toml"),
            common::recipe(
                name,
                "[[layer]]\nname = \"app\"\nfiles = [{ src = \"files/motd\", dest = \"/etc/motd\" }]\n",
            ),
            &kiln,
        );
        Fixture {
            kiln,
            dir,
            recipe,
            name: name.to_owned(),
            forget: Default::default(),
        }
    }

    fn redact(&self, text: &str) -> String {
        redact(
            text,
            &[
                (self.dir.root(), "[RECIPES]"),
                (&self.kiln.out, "[OUT]"),
                (&self.kiln.store, "[STORE]"),
            ],
        )
        .replace(&self.name, "[NAME]")
    }

    fn run(&self, args: &[&OsStr]) -> common::Run {
        self.kiln.run(args)
    }
}

impl Fixture {
    /// Forget, at the end of the test, the layer and image the recipe
    /// names now (they are unique to this run: a nonce).
    fn forget_current(&self) {
        let plan = self.kiln.run(&[
            OsStr::new("--json"),
            OsStr::new("plan"),
            self.recipe.as_os_str(),
        ]);
        if plan.code == Some(0) {
            let mut forget = common::ForgetOnDrop::new(&self.kiln.store);
            forget.add(&plan.json(), &["app/files", "image"]);
            self.forget.borrow_mut().push(forget);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.forget_current();
    }
}

// --------------------------------------------------------------- tests

#[test]
fn plan_build_and_rebuild_read_as_before() {
    let f = Fixture::new("clisnap");
    let recipe = f.recipe.as_os_str();

    let plan = f.run(&[OsStr::new("plan"), recipe]);
    plan.assert_code(0);
    assert_snapshot("plan-before-build", &f.redact(&plan.stdout));

    let build = f.run(&[OsStr::new("build"), OsStr::new("--no-smoke"), recipe]);
    build.assert_code(0);
    assert_snapshot("build-summary", &f.redact(&build.stdout));

    let again = f.run(&[OsStr::new("build"), OsStr::new("--no-smoke"), recipe]);
    again.assert_code(0);
    assert_snapshot("build-summary-cached", &f.redact(&again.stdout));

    let plan = f.run(&[OsStr::new("plan"), recipe]);
    plan.assert_code(0);
    assert_snapshot("plan-after-build", &f.redact(&plan.stdout));

    f.forget_current();
    f.dir
        .write("files/motd", format!("edited {:>40}\n", common::nonce()));
    let plan = f.run(&[OsStr::new("plan"), recipe]);
    plan.assert_code(0);
    assert_snapshot("plan-after-an-edit", &f.redact(&plan.stdout));
}

#[test]
fn verify_clean_and_with_drift_reads_as_before() {
    let f = Fixture::new("cliverify");
    f.kiln.build(&f.recipe, &[]);
    let image = f.kiln.out.join(format!("{}.qcow2", f.name));
    let manifest = f.kiln.out.join(format!("{}.manifest.json", f.name));
    let root = f.dir.path("root");

    let clean = f.run(&[
        OsStr::new("verify"),
        image.as_os_str(),
        OsStr::new("--extract"),
        root.as_os_str(),
    ]);
    clean.assert_code(0);
    assert_snapshot("verify-clean", &f.redact(&clean.stdout));

    // A hand edit, a new file and a removed one on the "live" root.
    std::fs::write(root.join("etc/motd"), "edited by hand\n").expect("editing etc/motd");
    std::fs::write(root.join("etc/added-by-hand"), "x\n").expect("adding a file");
    std::fs::remove_file(root.join("etc/hostname")).expect("removing etc/hostname");
    let drift = f.run(&[
        OsStr::new("verify"),
        OsStr::new("--root"),
        root.as_os_str(),
        OsStr::new("--manifest"),
        manifest.as_os_str(),
    ]);
    drift.assert_code(4);
    assert_snapshot(
        "verify-drift",
        &f.redact(&format!(
            "--- stdout\n{}--- stderr\n{}",
            drift.stdout, drift.stderr
        )),
    );
}

/// The main error messages: a recipe with a mistake, a missing recipe
/// file, a damaged lock. Refused before the store: no root needed.
#[test]
fn error_messages_read_as_before() {
    let dir = RecipeDir::new();
    let tmp = common::temp_dir("kiln-cli-");
    let kiln = Kiln::at(&tmp.path().join("store"), &tmp.path().join("out"));
    let paths = [(dir.root(), "[RECIPES]"), (tmp.path(), "[TMP]")];
    let mut shown = String::new();
    let base = common::BASE;
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("unknown key", format!("[image]\nhostnam = \"x\"\n{base}"), None),
        (
            "wrong type",
            format!("{base}[[layer]]\nname = \"web\"\npackages = \"lighttpd\"\n"),
            None,
        ),
        ("extends a file that is not a recipe", "extends = \"/etc/passwd\"\n".into(), None),
        ("bad TOML", "[image\n".into(), None),
        (
            "missing file to copy",
            format!("{base}[[layer]]\nname = \"web\"\nfiles = [{{ src = \"files/nope\", dest = \"/etc/x\" }}]\n"),
            None,
        ),
        ("damaged lock", base.to_owned(), Some("version = 1\n[steps\n")),
    ];
    for (i, (what, recipe, lock)) in cases.iter().enumerate() {
        let path = dir.write(&format!("case{i}.toml"), recipe);
        if let Some(lock) = lock {
            dir.write(&format!("case{i}.lock"), lock);
        }
        let run = kiln.run(&[OsStr::new("build"), path.as_os_str()]);
        run.assert_code(2);
        shown.push_str(&format!("=== {what}\n{}", redact(&run.stderr, &paths)));
    }
    let missing = dir.path("missing.toml");
    for command in ["build", "plan"] {
        let run = kiln.run(&[OsStr::new(command), missing.as_os_str()]);
        run.assert_code(2);
        shown.push_str(&format!(
            "=== {command} of a missing recipe\n{}",
            redact(&run.stderr, &paths)
        ));
    }
    assert_snapshot("errors", &shown);
    assert!(!kiln.store.exists(), "refusing bad input created the store");
}

// --------------------------------------------------------------- harness

/// The harness's tool timeout fires: a tool that sleeps past it (holding
/// its stdout and stderr open) is killed and reaped, and the error says so.
#[test]
fn the_harness_kills_a_tool_at_its_timeout() {
    let tmp = common::temp_dir("kiln-cli-");
    let pidfile = tmp.path().join("pid");
    let script = format!(
        "echo $$ > {}; echo started >&2; exec sleep 60",
        pidfile.display()
    );
    let started = Instant::now();
    let err = common::tool_with_timeout(
        "sh",
        &[OsStr::new("-c"), OsStr::new(&script)],
        &[],
        Duration::from_secs(1),
    )
    .expect_err("a tool sleeping 60 s must not finish inside a 1 s timeout");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the timeout fired after {took:?}"
    );
    assert!(err.contains("took more than 1s and was killed"), "{err}");
    assert!(
        err.contains("started"),
        "the error keeps the output so far: {err}"
    );
    let pid = std::fs::read_to_string(&pidfile).expect("the tool wrote its pid");
    let pid = pid.trim();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the timed-out tool (pid {pid}) is still there"
    );
}

/// And a tool that finishes in time is not disturbed by it.
#[test]
fn the_harness_returns_a_tools_output() {
    let (out, err) = common::tool_with_timeout(
        "sh",
        &[OsStr::new("-c"), OsStr::new("echo out; echo err >&2")],
        &[],
        Duration::from_secs(30),
    )
    .expect("a quick tool succeeds");
    assert_eq!(out, b"out\n");
    assert_eq!(err, "err\n");
    let failed = common::tool_with_timeout("false", &[], &[], Duration::from_secs(30))
        .expect_err("a failing tool is an error");
    assert!(failed.contains("failed"), "{failed}");
}

/// `assert_no_orphan_qemu` sees a QEMU process that outlived its kiln.
#[test]
fn the_harness_sees_a_leftover_qemu() {
    let tmp = common::temp_dir("kiln-cli-");
    let marker = tmp.path().join("disk.qcow2");
    let qemu = common::find_program("qemu-system-x86_64")
        .expect("qemu-system-x86_64 is missing (Debian package qemu-system-x86): run `make deps`");
    // Paused (-S), with nothing to boot: it only has to exist.
    let mut child = Command::new(qemu)
        .args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "none",
            "-name",
        ])
        .arg(&marker)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting qemu");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Err(String::new());
    while Instant::now() < deadline {
        seen = common::assert_no_orphan_qemu(&[tmp.path()]);
        if seen.is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().expect("killing qemu");
    child.wait().expect("reaping qemu");
    let err = seen.expect_err("a QEMU whose parent is not kiln is a leftover");
    assert!(err.contains(&marker.display().to_string()), "{err}");
    common::assert_no_orphan_qemu(&[tmp.path()]).expect("no QEMU once it is killed");
}
