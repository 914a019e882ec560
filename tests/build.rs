//! `kiln build` and `kiln plan`, end to end: the real binary, real
//! mmdebstrap, apt, overlayfs and disk tools, as root. See `common` for
//! the shared warm store and the checks made after every run.
//!
//! Content that must be built fresh on every run (to test a rebuild, or
//! to inspect an image assembled by this run) carries a [`nonce`]; those
//! entries are removed from the shared store when the test ends.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use sha2::{Digest, Sha256};

fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn statuses(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn a_built_image_is_a_gpt_disk_with_a_uki_and_the_layers_files() {
    require_build();
    require_inspect();
    let d = RecipeDir::new();
    let hello = format!("hello from kiln {}\n", nonce());
    d.write("files/hello.txt", &hello);
    let layers = r#"
[[layer]]
name = "tools"
files = [{ src = "files/hello.txt", dest = "/opt/kiln-test/hello.txt", mode = "0640", owner = "root:root" }]
run = ["echo ran > /opt/kiln-test/run-marker"]
"#;
    let kiln = Kiln::shared();
    let recipe = d.write_recipe(
        "disk.toml",
        recipe("kt-disk", layers).replace("hostname = \"kt-disk\"", "hostname = \"kt-disk-host\""),
        &kiln,
    );
    let plan = kiln.plan(&recipe);
    let mut cleanup = ForgetOnDrop::new(&kiln.store);
    cleanup.add(&plan, &["tools/files", "tools/run", "image"]);

    let report = kiln.build(&recipe, &[]);
    assert_eq!(
        report.stages(),
        ["base", "tools/files", "tools/run", "image"]
    );
    // Where the time went: the tools this build ran, the longest first,
    // the run step and assembly's mke2fs among them.
    let tools: Vec<&str> = report.tools.iter().map(|t| t.tool.as_str()).collect();
    for tool in [
        "run step",
        "mke2fs",
        "check before use (integrity)",
        "seal (integrity)",
    ] {
        assert!(tools.contains(&tool), "no `{tool}` in {:#?}", report.tools);
    }
    assert!(
        report
            .tools
            .windows(2)
            .all(|w| w[0].seconds >= w[1].seconds)
            && report.tools.iter().all(|t| t.runs >= 1 && t.seconds >= 0.0),
        "{:#?}",
        report.tools
    );
    for stage in ["tools/files", "tools/run", "image"] {
        assert_eq!(
            report.row(stage).status,
            "built",
            "{stage} has content new to this run"
        );
    }
    assert_eq!(report.image, kiln.out.join("kt-disk.qcow2"));
    assert_eq!(
        sha256_file(&report.image),
        report.sha256,
        "the exported image is the one the summary names"
    );
    assert_eq!(report.image_key, plan.image_key());

    let disk = Disk::open(&report.image);
    assert_eq!(disk.table.label, "gpt");
    assert_eq!(disk.table.partitions.len(), 2, "{:#?}", disk.table);
    let (esp, root) = (disk.esp(), disk.root());
    assert!(
        esp.start >= 2048 && esp.start + esp.size <= root.start,
        "ESP first, then root: {:#?}",
        disk.table
    );
    assert_eq!(
        root.size * disk.sector(),
        2 << 30,
        "the root partition has the recipe's size"
    );

    let uki = disk
        .esp_file("::/EFI/BOOT/BOOTX64.EFI")
        .expect("the ESP holds /EFI/BOOT/BOOTX64.EFI");
    assert!(uki.starts_with(b"MZ"), "BOOTX64.EFI is not a PE binary");
    let has = |needle: &[u8]| uki.windows(needle.len()).any(|w| w == needle);
    for section in [&b".linux"[..], b".initrd", b".cmdline", b".osrel"] {
        assert!(
            has(section),
            "the UKI has no {} section",
            String::from_utf8_lossy(section)
        );
    }
    assert!(
        has(b"root=LABEL=root"),
        "the UKI's cmdline does not find the root by label"
    );

    assert_eq!(disk.root_label(), "root");
    assert_eq!(disk.root_text("/opt/kiln-test/hello.txt"), hello);
    let stat = disk.root_stat("/opt/kiln-test/hello.txt");
    assert_eq!(
        (stat.kind.as_str(), stat.mode, stat.uid, stat.gid),
        ("regular", 0o640, 0, 0),
        "{stat:?}"
    );
    assert_eq!(disk.root_text("/opt/kiln-test/run-marker"), "ran\n");
    assert_eq!(disk.root_text("/etc/hostname"), "kt-disk-host\n");
    let fstab = disk.root_text("/etc/fstab");
    assert!(
        fstab.lines().any(
            |l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["LABEL=root", "/", "ext4"]
        ),
        "fstab does not mount LABEL=root on /:\n{fstab}"
    );
    let machine_id = disk.root_stat("/etc/machine-id");
    assert_eq!(
        (machine_id.kind.as_str(), machine_id.size),
        ("regular", 0),
        "machine-id must exist and be empty: {machine_id:?}"
    );
    assert!(!report.kernel.is_empty());
    assert_eq!(
        disk.root_stat(&format!("/boot/vmlinuz-{}", report.kernel))
            .kind,
        "regular",
        "the kernel the summary names is in the image"
    );
    // Build-time scaffolding never reaches the image.
    assert!(
        disk.root_file("/usr/sbin/policy-rc.d").is_none(),
        "policy-rc.d was left in the image"
    );
}

#[test]
fn building_again_is_all_cache_hits() {
    require_build();
    let d = RecipeDir::new();
    // New content each run, so the first build below always builds the image.
    d.write(
        "files/hello.txt",
        format!("hello again {}\n", common::nonce()),
    );
    let layers = r#"
[[layer]]
name = "tools"
files = [{ src = "files/hello.txt", dest = "/opt/kiln-test/again.txt" }]
run = ["echo ran > /opt/kiln-test/again-marker"]
"#;
    let kiln = Kiln::shared();
    let recipe = d.write_recipe("again.toml", recipe("kt-again", layers), &kiln);
    let first = kiln.build(&recipe, &[]);
    let second = kiln.build(&recipe, &[]);
    assert_eq!(
        second.statuses(),
        statuses(&[
            ("base", "cached"),
            ("tools/files", "cached"),
            ("tools/run", "cached"),
            ("image", "cached")
        ]),
        "{:#?}",
        second.rows
    );
    // The image is in the store, so its layers are not even checked (a
    // no-op reads the image's entry only), and the rows say so.
    assert!(
        second.rows.iter().all(|r| match r.stage.as_str() {
            "image" => r.reason.is_none(),
            _ => r.reason.as_deref() == Some("not checked: its image is in the store"),
        }),
        "a no-op build: {:#?}",
        second.rows
    );
    assert_eq!(
        (&second.image_key, &second.sha256),
        (&first.image_key, &first.sha256)
    );
    assert_eq!(sha256_file(&second.image), second.sha256);

    // The no-op run wrote out/NAME.build.log anew; the log of the run that
    // built the image is kept in the store, and the no-op log says where.
    assert_eq!(first.row("image").status, "built");
    let kept = first
        .build_log
        .clone()
        .expect("the summary names the kept log");
    assert_eq!(second.build_log.as_ref(), Some(&kept));
    let kept_text =
        std::fs::read_to_string(&kept).unwrap_or_else(|e| panic!("{}: {e}", kept.display()));
    assert!(
        kept_text.contains("mke2fs"),
        "the kept log is the assembling run's:\n{kept_text}"
    );
    let noop_log = kiln.out.join(format!("{}.build.log", first.image_name()));
    let noop_text = std::fs::read_to_string(&noop_log).unwrap();
    assert!(
        !noop_text.contains("mke2fs"),
        "the no-op run assembled nothing:\n{noop_text}"
    );
    assert!(
        noop_text.contains(&format!("its log is {}", kept.display())),
        "the no-op log points at the kept one:\n{noop_text}"
    );
    let plan = kiln.plan(&recipe);
    assert!(
        plan.steps
            .iter()
            .all(|s| s.state == "cached" && s.reason.is_none()),
        "plan after a build: {:#?}",
        plan.steps
    );
}

#[test]
fn changing_one_byte_rebuilds_only_that_files_step_and_what_is_above_it() {
    require_build();
    require_inspect();
    let d = RecipeDir::new();
    let page = format!("page {} version A\n", nonce());
    d.write("files/page.txt", &page);
    let layers = r#"
[[layer]]
name = "tools"
run = ["mkdir -p /opt/kiln-test && echo tools > /opt/kiln-test/tools"]

[[layer]]
name = "app"
files = [{ src = "files/page.txt", dest = "/opt/kiln-test/page.txt" }]
run = ["cp /opt/kiln-test/page.txt /opt/kiln-test/page.copy"]

[[layer]]
name = "top"
run = ["echo top > /opt/kiln-test/top"]
"#;
    let kiln = Kiln::shared();
    let recipe = d.write_recipe("change.toml", recipe("kt-change", layers), &kiln);
    let unique = ["app/files", "app/run", "top/run", "image"];
    let mut cleanup = ForgetOnDrop::new(&kiln.store);
    let before = kiln.plan(&recipe);
    cleanup.add(&before, &unique);
    let first = kiln.build(&recipe, &[]);
    assert_eq!(first.row("app/files").status, "built");

    d.write("files/page.txt", page.replace("version A", "version B"));
    let plan = kiln.plan(&recipe);
    cleanup.add(&plan, &unique);
    let want = |s: &str, st: &str, r: &str| (s.to_owned(), st.to_owned(), r.to_owned());
    assert_eq!(
        plan.states(),
        [
            want("base", "cached", ""),
            want("tools/run", "cached", ""),
            want(
                "app/files",
                "build",
                r#"{"file_changed":["files/page.txt"]}"#
            ),
            want("app/run", "build", r#""parent_changed""#),
            want("top/run", "build", r#""parent_changed""#),
            want("image", "build", r#""parent_changed""#),
        ],
        "plan after changing one byte"
    );
    for (b, a) in before.steps.iter().zip(&plan.steps) {
        assert_eq!(
            b.key == a.key,
            ["base", "tools/run"].contains(&b.stage.as_str()),
            "key of {}",
            b.stage
        );
    }

    let second = kiln.build(&recipe, &[]);
    assert_eq!(
        second.statuses(),
        statuses(&[
            ("base", "cached"),
            ("tools/run", "cached"),
            ("app/files", "built"),
            ("app/run", "built"),
            ("top/run", "built"),
            ("image", "built")
        ]),
        "{:#?}",
        second.rows
    );
    assert_eq!(
        second.row("app/files").reason.as_deref(),
        Some("file changed: files/page.txt")
    );
    assert_eq!(
        second.row("app/run").reason.as_deref(),
        Some("parent changed")
    );
    assert_eq!(
        second.row("image").reason.as_deref(),
        Some("parent changed")
    );

    let disk = Disk::open(&second.image);
    assert_eq!(
        disk.root_text("/opt/kiln-test/page.copy"),
        page.replace("version A", "version B"),
        "the rebuilt run step saw the new file"
    );
    assert_eq!(disk.root_text("/opt/kiln-test/top"), "top\n");
}

#[test]
fn an_extending_recipe_reuses_its_parents_layers() {
    require_build();
    require_inspect();
    let d = RecipeDir::new();
    d.write("golden/files/hello.txt", "from the parent\n");
    let parent_layers = r#"
[[layer]]
name = "tools"
files = [{ src = "files/hello.txt", dest = "/opt/kiln-test/parent.txt" }]
run = ["echo parent > /opt/kiln-test/parent-marker"]
"#;
    let kiln = Kiln::shared();
    let parent = d.write_recipe(
        "golden/golden.toml",
        recipe("kt-parent", parent_layers),
        &kiln,
    );
    d.write("files/app.txt", "from the child\n");
    let child = d.write(
        "app.toml",
        r#"extends = "golden/golden.toml"

[image]
name = "kt-child"
hostname = "kt-child"

[[layer]]
name = "app"
files = [{ src = "files/app.txt", dest = "/opt/kiln-test/child.txt" }]
"#,
    );
    let parent_report = kiln.build(&parent, &[]);
    let plan = kiln.plan(&child);
    for stage in ["base", "tools/files", "tools/run"] {
        assert_eq!(
            plan.step(stage).state,
            "cached",
            "{stage} comes from the parent's build: {:#?}",
            plan.steps
        );
    }
    let child_report = kiln.build(&child, &[]);
    assert_eq!(
        child_report.stages(),
        ["base", "tools/files", "tools/run", "app/files", "image"]
    );
    for stage in ["base", "tools/files", "tools/run"] {
        let (p, c) = (parent_report.row(stage), child_report.row(stage));
        assert_eq!(
            (c.status.as_str(), &c.key),
            ("cached", &p.key),
            "{stage} is the parent's layer, reused"
        );
    }
    assert_ne!(child_report.image_key, parent_report.image_key);

    let disk = Disk::open(&child_report.image);
    assert_eq!(
        disk.root_text("/opt/kiln-test/parent.txt"),
        "from the parent\n",
        "the parent's file, relative to the parent's folder"
    );
    assert_eq!(disk.root_text("/opt/kiln-test/parent-marker"), "parent\n");
    assert_eq!(
        disk.root_text("/opt/kiln-test/child.txt"),
        "from the child\n"
    );
    assert_eq!(disk.root_text("/etc/hostname"), "kt-child\n");
}

/// A recipe refused before anything is built: exit code 2 for both
/// `build` and `plan`, an error naming file, key and fix, and no trace:
/// the (fresh) store and out/ are not even created.
#[test]
fn bad_recipes_exit_2_and_leave_nothing_behind() {
    require_root();
    struct Case {
        what: &'static str,
        /// Replaces `FILES` in the layer below; `None` replaces the whole recipe.
        files: Option<&'static str>,
        text: &'static str,
        key: &'static str,
        says: &'static str,
    }
    let cases = [
        Case {
            what: "malformed TOML",
            files: None,
            text: "[image\nname = \"kt-bad\"\n",
            key: "(syntax)",
            says: "line 1",
        },
        Case {
            what: "unknown key",
            files: None,
            text: "[image]\nname = \"kt-bad\"\ncolour = \"red\"\n",
            key: "colour",
            says: "unknown field",
        },
        Case {
            what: "missing src",
            files: Some(r#"{ src = "files/nope.txt", dest = "/opt/x" }"#),
            text: "",
            key: "files[0].src",
            says: "files/nope.txt",
        },
        Case {
            what: "src outside the folder",
            files: Some(r#"{ src = "../outside.txt", dest = "/opt/x" }"#),
            text: "",
            key: "files[0].src",
            says: "outside the recipe's folder",
        },
        Case {
            what: "src through a symlink out of the folder",
            files: Some(r#"{ src = "files/link.txt", dest = "/opt/x" }"#),
            text: "",
            key: "files[0].src",
            says: "outside the recipe's folder",
        },
        Case {
            what: "absolute src",
            files: Some(r#"{ src = "/etc/hostname", dest = "/opt/x" }"#),
            text: "",
            key: "files[0].src",
            says: "absolute",
        },
        Case {
            what: "dest with ..",
            files: Some(r#"{ src = "files/ok.txt", dest = "/opt/../../etc/shadow" }"#),
            text: "",
            key: "files[0].dest",
            says: "..",
        },
        Case {
            what: "relative dest",
            files: Some(r#"{ src = "files/ok.txt", dest = "opt/x" }"#),
            text: "",
            key: "files[0].dest",
            says: "absolute",
        },
        Case {
            what: "size zero",
            files: None,
            text: "[image]\nname = \"kt-bad\"\nsize = \"0GiB\"\n",
            key: "image.size",
            says: "zero",
        },
        Case {
            what: "size unparseable",
            files: None,
            text: "[image]\nname = \"kt-bad\"\nsize = \"big\"\n",
            key: "image.size",
            says: "not a size",
        },
    ];
    let d = RecipeDir::new();
    d.write("outside.txt", "not the recipe's\n");
    d.write("recipe/files/ok.txt", "ok\n");
    std::os::unix::fs::symlink("../../outside.txt", d.path("recipe/files/link.txt"))
        .expect("symlink");
    let path = d.path("recipe/bad.toml");
    let store = tempfile::tempdir().expect("temp dir");
    let kiln = Kiln::with_store(&store.path().join("store"));
    for case in cases {
        let text = match case.files {
            Some(files) => recipe(
                "kt-bad",
                &format!("[[layer]]\nname = \"app\"\nfiles = [{files}]\n"),
            ),
            None => format!("{}\n{BASE}", case.text),
        };
        d.write("recipe/bad.toml", text);
        eprintln!("case: {}", case.what);
        let build = kiln.run(&[OsStr::new("build"), path.as_os_str()]);
        build.assert_bad_input(&path, case.key, case.says);
        for dir in [&kiln.store, &kiln.out] {
            assert!(
                !dir.exists(),
                "{}: refused input created {}",
                case.what,
                dir.display()
            );
        }
        let plan = kiln.run(&[OsStr::new("--json"), OsStr::new("plan"), path.as_os_str()]);
        plan.assert_bad_input(&path, case.key, case.says);
        assert!(
            plan.stdout.is_empty(),
            "{}: plan printed a result for a bad recipe:\n{}",
            case.what,
            plan.show()
        );
    }
}

#[test]
fn a_dest_through_a_symlink_out_of_the_image_is_bad_input() {
    require_build();
    let escape = format!("kiln-escape-{}", nonce());
    let d = RecipeDir::new();
    d.write("files/x", "must not land on the host\n");
    let layers = format!(
        r#"
[[layer]]
name = "links"
run = ["mkdir -p /opt && ln -sfn ../../../../../../tmp /opt/out"]

[[layer]]
name = "app"
files = [{{ src = "files/x", dest = "/opt/out/{escape}" }}]
"#
    );
    let kiln = Kiln::shared();
    let recipe = d.write_recipe("escape.toml", recipe("kt-escape", &layers), &kiln);
    let plan = kiln.plan(&recipe);
    let before = StoreSnapshot::of(&kiln.store);
    let run = kiln.run(&[OsStr::new("build"), recipe.as_os_str()]);
    run.assert_bad_input(&recipe, "layer.app.files[0].dest", "out of the image");
    // The steps below the refused one succeeded and may be published.
    before.assert_not_published(&kiln.store, &plan.keys_from("app/files"));
    assert!(
        kiln.store
            .join(LAYERS)
            .join(&plan.step("links/run").key)
            .join("entry.json")
            .is_file(),
        "the step below the failure is kept"
    );
    for host in ["/tmp", "/var/tmp"] {
        let leaked = Path::new(host).join(&escape);
        assert!(
            !leaked.exists(),
            "the file escaped the image to {}",
            leaked.display()
        );
    }
}

#[test]
fn a_package_that_does_not_exist_is_bad_input() {
    require_build();
    let d = RecipeDir::new();
    let layers = "[[layer]]\nname = \"app\"\npackages = [\"kiln-test-no-such-package\"]\n";
    let kiln = Kiln::shared();
    let recipe = d.write_recipe("nopkg.toml", recipe("kt-nopkg", layers), &kiln);
    let plan = kiln.plan(&recipe);
    let before = StoreSnapshot::of(&kiln.store);
    let run = kiln.run(&[OsStr::new("build"), recipe.as_os_str()]);
    run.assert_bad_input(&recipe, "packages", "kiln-test-no-such-package");
    before.assert_not_published(&kiln.store, &plan.keys_from("app/packages"));
}

#[test]
fn refresh_rebuilds_every_step() {
    require_build();
    let d = RecipeDir::new();
    d.write("files/hello.txt", "refresh me\n");
    let layers = "[[layer]]\nname = \"tools\"\nfiles = [{ src = \"files/hello.txt\", dest = \"/opt/kiln-test/refresh.txt\" }]\n";
    let shared = Kiln::shared();
    let recipe = d.write_recipe("refresh.toml", recipe("kt-refresh", layers), &shared);
    // --refresh replaces entries in place, which must not disturb the
    // shared store's base under other users: refresh a private store that
    // starts as a copy of the shared store's entries for this recipe.
    shared.build(&recipe, &[]);
    let plan = shared.plan(&recipe);
    let private = temp_dir("kiln-store-");
    let store = private.path().join("store");
    copy_entries(
        &shared.store,
        &store,
        &plan
            .layer_keys()
            .into_iter()
            .map(|(_, k)| k)
            .collect::<Vec<_>>(),
    );
    // The pinned .debs too: --refresh rebuilds the layers, it need not
    // download what the store already holds (checked by sha256 on use).
    copy_store_dir(&shared.store, &store, "debs-v1");

    let kiln = Kiln::with_store(&store);
    let warm = kiln.build(&recipe, &[]);
    assert_eq!(
        warm.statuses(),
        statuses(&[
            ("base", "cached"),
            ("tools/files", "cached"),
            ("image", "built")
        ]),
        "{:#?}",
        warm.rows
    );
    let refreshed = kiln.build(&recipe, &["--refresh"]);
    assert_eq!(
        refreshed.statuses(),
        statuses(&[
            ("base", "built"),
            ("tools/files", "built"),
            ("image", "built")
        ]),
        "{:#?}",
        refreshed.rows
    );
    assert!(
        refreshed
            .rows
            .iter()
            .all(|r| r.reason.as_deref() == Some("--refresh")),
        "{:#?}",
        refreshed.rows
    );
    assert_eq!(
        refreshed.image_key, warm.image_key,
        "the same inputs give the same key"
    );
    let again = kiln.build(&recipe, &[]);
    assert!(
        again.rows.iter().all(|r| r.status == "cached"),
        "after --refresh: {:#?}",
        again.rows
    );
}

#[test]
fn a_missing_recipe_file_is_bad_input() {
    require_root();
    let d = RecipeDir::new();
    let path = d.path("no/such/recipe.toml");
    let store = tempfile::tempdir().expect("temp dir");
    let kiln = Kiln::with_store(&store.path().join("store"));
    for command in ["build", "plan"] {
        let run = kiln.run(&[OsStr::new(command), path.as_os_str()]);
        run.assert_bad_input(&path, "(file)", "cannot read the recipe");
    }
    assert!(
        !kiln.store.exists() && !kiln.out.exists(),
        "a missing recipe created the store or out/"
    );
}

#[test]
fn plan_with_an_empty_store_builds_everything_and_creates_nothing() {
    let d = RecipeDir::new();
    d.write("files/hello.txt", "hello\n");
    let layers = "[[layer]]\nname = \"tools\"\nfiles = [{ src = \"files/hello.txt\", dest = \"/opt/hello\" }]\nrun = [\"true\"]\n";
    let recipe = d.write("empty.toml", recipe("kt-empty", layers));
    let tmp = tempfile::tempdir().expect("temp dir");
    let kiln = Kiln::with_store(&tmp.path().join("store"));
    let plan = kiln.plan(&recipe);
    let stages: Vec<&str> = plan.steps.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(stages, ["base", "tools/files", "tools/run", "image"]);
    assert!(
        plan.steps
            .iter()
            .all(|s| s.state == "build" && s.reason == Some(serde_json::json!("not_in_store"))),
        "{:#?}",
        plan.steps
    );
    assert!(
        plan.steps.iter().all(|s| s.key.len() == 64),
        "full keys: {:#?}",
        plan.steps
    );
    assert_eq!(plan.image, "kt-empty");
    assert!(!kiln.store.exists(), "kiln plan created the store");
    assert!(!kiln.out.exists(), "kiln plan created out/");
}

#[test]
#[should_panic(expected = "run `make deps` as root")]
fn a_missing_tool_fails_the_test_and_says_what_to_install() {
    require_tools(&[("kiln-test-no-such-tool", "kiln-test-package")]);
}

#[test]
fn two_builds_resolving_packages_at_once_share_the_stores_apt_caches() {
    require_build();
    // Two recipes whose `packages` steps are new (their parents carry a
    // nonce) and unlocked, so both run apt against the store's shared apt
    // caches. apt gives up at once on a cache another apt has locked; kiln
    // must make the second run wait instead.
    let d = RecipeDir::new();
    let kiln = [Kiln::shared(), Kiln::shared()];
    let recipes: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| {
            d.write(&format!("files/{name}.txt"), format!("{name} {}\n", nonce()));
            let layers = format!(
                "[[layer]]\nname = \"marker\"\nfiles = [{{ src = \"files/{name}.txt\", dest = \"/etc/kiln-{name}.txt\" }}]\n\n\
                 [[layer]]\nname = \"tools\"\npackages = [\"hello\"]\n"
            );
            d.write_recipe(&format!("{name}.toml"), recipe(&format!("kt-apt-{name}"), &layers), &kiln[0])
        })
        .collect();
    let mut cleanup = ForgetOnDrop::new(&kiln[0].store);
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = recipes
            .iter()
            .zip(&kiln)
            .map(|(r, k)| {
                s.spawn(move || {
                    k.run(&[
                        OsStr::new("--json"),
                        OsStr::new("build"),
                        OsStr::new("--no-smoke"),
                        r.as_os_str(),
                    ])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (run, r) in runs.iter().zip(&recipes) {
        cleanup.add(
            &kiln[0].plan(r),
            &["marker/files", "tools/packages", "image"],
        );
        run.assert_code(0);
        let report: BuildReport = run.json();
        assert_eq!(
            report.row("tools/packages").status,
            "built",
            "{}",
            run.show()
        );
    }
}

#[test]
fn an_image_that_reuses_a_cached_uki_is_the_image_built_without_it() {
    require_build();
    let d = RecipeDir::new();
    d.write("files/uki.txt", "uki cache\n");
    let layers = "[[layer]]\nname = \"tools\"\nfiles = [{ src = \"files/uki.txt\", dest = \"/opt/kiln-test/uki.txt\" }]\n";
    let shared = Kiln::shared();
    let first = d.write_recipe("uki-a.toml", recipe("kt-uki-a", layers), &shared);
    shared.build(&first, &[]);
    // The same layers, kernel, initrd and command line; another hostname:
    // the image is assembled anew and takes its UKI from the store's cache.
    let second = d.write(
        "uki-b.toml",
        format!(
            "extends = \"uki-a.toml\"\n\n[image]\nname = \"kt-uki-b\"\nhostname = \"kt-uki-{}\"\n",
            common::nonce()
        ),
    );
    let reused = shared.build(&second, &[]);
    assert_eq!(reused.row("image").status, "built", "{:#?}", reused.rows);
    let log = std::fs::read_to_string(shared.out.join("kt-uki-b.build.log")).unwrap();
    assert!(log.contains("UKI cache: reused"), "{log}");

    // The same recipe into a store with the layers and no cached UKI.
    let private = temp_dir("kiln-store-");
    let store = private.path().join("store");
    let plan = shared.plan(&second);
    copy_entries(
        &shared.store,
        &store,
        &plan
            .layer_keys()
            .into_iter()
            .map(|(_, k)| k)
            .collect::<Vec<_>>(),
    );
    let kiln = Kiln::with_store(&store);
    let fresh = kiln.build(&second, &[]);
    let log = std::fs::read_to_string(kiln.out.join("kt-uki-b.build.log")).unwrap();
    assert!(!log.contains("UKI cache: reused"), "{log}");
    assert_eq!(fresh.sha256, reused.sha256);

    // A cached UKI whose bytes changed is not used: built again, same disk.
    let ukis = store.join("uki-v1");
    let efi = std::fs::read_dir(&ukis)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "efi"))
        .expect("the build kept its UKI");
    let mut bytes = std::fs::read(&efi).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&efi, bytes).unwrap();
    let third = d.write(
        "uki-c.toml",
        "extends = \"uki-a.toml\"\n\n[image]\nname = \"kt-uki-c\"\nhostname = \"kt-uki-c\"\n",
    );
    let rebuilt = kiln.build(&third, &[]);
    let log = std::fs::read_to_string(kiln.out.join("kt-uki-c.build.log")).unwrap();
    assert!(log.contains("does not match its digest"), "{log}");
    assert!(!log.contains("UKI cache: reused"), "{log}");
    assert_eq!(rebuilt.row("image").status, "built");

    // gc keeps the UKI of a kept image and removes the others.
    for name in ["0000.efi", "0000.sha256"] {
        std::fs::write(ukis.join(name), "no image uses this\n").unwrap();
    }
    let gc = kiln.run(&["--json", "cache", "gc", "--keep", "1"]);
    gc.assert_code(0);
    assert!(gc.stdout.contains("0000.efi"), "{}", gc.show());
    let remaining: Vec<String> = std::fs::read_dir(&ukis)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(remaining.len(), 2, "one UKI and its digest: {remaining:?}");
}

/// `initramfs = false` (golden's base and security layer): the kernels a
/// step installs get no initramfs there, and a later layer builds it. The
/// image is the one built with the initramfs made at every step and again
/// by that layer: the same files, bytes and times (same pins, same
/// SOURCE_DATE_EPOCH), and the same initrd; only Debian's `/initrd.img`
/// links, which the kernel's scripts make only for an initrd that exists,
/// are not there (kiln boots /boot/initrd.img-VERSION through its UKI).
/// With no later layer to build it, the image is refused.
#[test]
fn a_base_that_leaves_its_initramfs_to_a_later_layer_gives_the_same_image() {
    require_build();
    let layers = "[[layer]]\nname = \"initrd\"\nrun = [\"update-initramfs -c -k all\"]\n";
    let shared = Kiln::shared();
    let manifest = || -> serde_json::Value {
        let path = shared.out.join("kt-initrd.manifest.json");
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let now_dir = RecipeDir::new();
    let now = now_dir.write_recipe("initrd.toml", recipe("kt-initrd", layers), &shared);
    let built_now = shared.build(&now, &[]);
    let files_now = manifest();

    // The same recipe and pins; its base builds no initramfs.
    let later_dir = RecipeDir::new();
    let text = recipe("kt-initrd", layers).replace(
        "\"systemd-sysv\", \"udev\"]\n",
        "\"systemd-sysv\", \"udev\"]\ninitramfs = false\n",
    );
    assert!(text.contains("initramfs = false"), "{text}");
    let later = later_dir.write("initrd.toml", &text);
    let lock = base_lock(&shared.store).replace(
        "\"package=udev\",\n]",
        "\"package=udev\",\n    \"initramfs=later\",\n]",
    );
    assert!(lock.contains("initramfs=later"), "{lock}");
    later_dir.write("initrd.lock", &lock);
    let plan = shared.plan(&later);
    assert_ne!(
        plan.step("base").key,
        shared.plan(&now).step("base").key,
        "a base without its initramfs has its own key"
    );
    let built_later = shared.build(&later, &[]);
    assert_eq!(built_later.kernel, built_now.kernel);
    let log = std::fs::read_to_string(shared.out.join("kt-initrd.build.log")).unwrap();
    let generated = log.matches("update-initramfs: Generating").count();
    // The base was built now (its key is new) or by an earlier run; either
    // way only the `initrd` layer made one, if that layer was built.
    assert!(generated <= 1, "{log}");
    let files_later = manifest();
    assert_eq!(
        files_now["source_date_epoch"], files_later["source_date_epoch"],
        "both images come from the same pins"
    );
    let by_path = |m: &serde_json::Value| -> std::collections::BTreeMap<String, serde_json::Value> {
        m["files"]
            .as_array()
            .expect("the manifest lists the image's files")
            .iter()
            .map(|f| (f["path"].as_str().unwrap().to_owned(), f.clone()))
            .collect()
    };
    let (mut a, b) = (by_path(&files_now), by_path(&files_later));
    let initrd = format!("/boot/initrd.img-{}", built_now.kernel);
    assert!(
        a.contains_key(&initrd) && a.get(&initrd) == b.get(&initrd),
        "{initrd}"
    );
    for link in ["/initrd.img", "/initrd.img.old"] {
        assert!(
            !b.contains_key(link),
            "{link} points to an initrd made later"
        );
        a.remove(link);
    }
    assert_eq!(a, b, "the images' files differ");

    // Without a layer that builds it, the image is refused.
    let none_dir = RecipeDir::new();
    let none = none_dir.write("initrd.toml", text.replace(layers, ""));
    none_dir.write("initrd.lock", &lock);
    let run = shared.run(&[
        OsStr::new("build"),
        OsStr::new("--no-smoke"),
        none.as_os_str(),
    ]);
    assert!(!run.status.success(), "{}", run.show());
    assert!(
        run.stderr.contains("has no initrd for kernel")
            && run.stderr.contains("a later layer must build it"),
        "{}",
        run.show()
    );
}
