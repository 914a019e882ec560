//! Recipe loading, `extends`, validation, and what does and does not move a
//! key. Pure: recipes and the files they copy are written to a temp dir;
//! no root, no tools, no store.

use std::path::{Path, PathBuf};

use super::*;
use crate::error::BadInput;
use crate::plan::{self, Key};

/// A recipe folder in a temp dir. Paths are canonical, so that they compare
/// equal to what the loader reports.
struct Dir {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Dir {
    fn new() -> Dir {
        let tmp = tempfile::tempdir().expect("creating a temp dir");
        let root = std::fs::canonicalize(tmp.path()).expect("canonicalising the temp dir");
        Dir { _tmp: tmp, root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().expect("a file has a parent"))
            .expect("creating a folder");
        std::fs::write(&path, content).expect("writing a test file");
        path
    }
}

const BASE: &str = r#"
[base]
suite = "trixie"
variant = "minbase"
packages = ["linux-image-cloud-amd64", "systemd-sysv", "udev"]
"#;

/// base, sec/upgrade, app/{packages,files,run}, top/run, image.
fn layered_recipe() -> String {
    format!(
        r#"
[image]
name = "web"
size = "2GiB"
hostname = "web"

{BASE}

[[layer]]
name = "sec"
upgrade = true

[[layer]]
name = "app"
packages = ["nginx-light", "curl"]
files = [
  {{ src = "files/index.html", dest = "/var/www/html/index.html", mode = "0644" }},
  {{ src = "files/motd", dest = "/etc/motd" }},
]
run = ["systemctl enable nginx"]

[[layer]]
name = "top"
run = ["true"]
"#
    )
}

/// Every step's id and key, then the image key.
fn keys(recipe: &Path) -> (Vec<(String, Key)>, Key) {
    let recipe = load(recipe).unwrap_or_else(|e| panic!("loading {}: {e:#}", recipe.display()));
    let plan = plan::make(&recipe, &crate::lock::Locks::default())
        .unwrap_or_else(|e| panic!("planning: {e:#}"));
    (
        plan.steps.iter().map(|s| (s.id().into(), s.key)).collect(),
        plan.image.key,
    )
}

fn layered_dir() -> (Dir, PathBuf) {
    let d = Dir::new();
    d.write("files/index.html", "<h1>hello</h1>\n");
    d.write("files/motd", "welcome\n");
    let recipe = d.write("web.toml", layered_recipe());
    (d, recipe)
}

#[test]
fn plan_has_the_expected_steps() {
    let (_d, recipe) = layered_dir();
    let (steps, _) = keys(&recipe);
    let ids: Vec<&str> = steps.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "base",
            "sec/upgrade",
            "app/packages",
            "app/files",
            "app/run",
            "top/run"
        ]
    );
}

#[test]
fn comments_and_whitespace_do_not_change_any_key() {
    let (d, recipe) = layered_dir();
    let before = keys(&recipe);
    // The same recipe, reformatted and commented: inline tables as an array
    // of tables, different spacing, blank lines, trailing comments.
    let reformatted = r#"
# A comment at the top.
[image]   # the image
name="web"
size   =   "2GiB"
hostname = "web"     # a comment


[base]
suite = "trixie"
variant = "minbase"
packages = [
    "linux-image-cloud-amd64",   # the kernel
    "systemd-sysv",
    "udev",
]

[[layer]]
name = "sec"
upgrade = true

[[layer]]
name = "app"
packages = [ "nginx-light" , "curl" ]
run = [ "systemctl enable nginx" ]   # unchanged command

[[layer.files]]
src = "files/index.html"
dest = "/var/www/html/index.html"
mode = "0644"

[[layer.files]]
src = "files/motd"
dest = "/etc/motd"

[[layer]]
name = "top"
run = ["true"]
"#;
    d.write("web.toml", reformatted);
    assert_eq!(keys(&recipe), before);
}

#[test]
fn a_new_mtime_on_a_copied_file_changes_no_key() {
    let (d, recipe) = layered_dir();
    let before = keys(&recipe);
    let file = std::fs::File::options()
        .write(true)
        .open(d.path("files/index.html"))
        .expect("opening the copied file");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    file.set_modified(later).expect("setting the mtime");
    drop(file);
    // Rewriting the same bytes gives a new inode time too.
    d.write("files/motd", "welcome\n");
    assert_eq!(keys(&recipe), before);
}

#[test]
fn one_changed_byte_rebuilds_that_files_step_and_everything_above_only() {
    let (d, recipe) = layered_dir();
    let (before, image_before) = keys(&recipe);
    d.write("files/index.html", "<h1>jello</h1>\n");
    let (after, image_after) = keys(&recipe);
    let changed: Vec<&str> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.1 != a.1)
        .map(|(b, _)| b.0.as_str())
        .collect();
    assert_eq!(
        changed,
        ["app/files", "app/run", "top/run"],
        "steps whose key changed"
    );
    assert_ne!(image_before, image_after, "the image key must change too");
}

#[test]
fn a_file_in_a_lower_layer_does_not_change_the_layers_below_it() {
    // The first layer copies a file: only the base stays.
    let d = Dir::new();
    d.write("files/a", "a\n");
    let text = format!(
        "{BASE}\n[[layer]]\nname = \"one\"\nfiles = [{{ src = \"files/a\", dest = \"/a\" }}]\nrun = [\"true\"]\n\n[[layer]]\nname = \"two\"\npackages = [\"curl\"]\n"
    );
    let recipe = d.write("r.toml", text);
    let (before, _) = keys(&recipe);
    d.write("files/a", "b\n");
    let (after, _) = keys(&recipe);
    let same: Vec<bool> = before.iter().zip(&after).map(|(b, a)| b == a).collect();
    assert_eq!(
        same,
        [true, false, false, false],
        "base, one/files, one/run, two/packages"
    );
}

#[test]
fn mode_owner_and_dest_of_a_copied_file_are_inputs() {
    let (d, recipe) = layered_dir();
    let (before, _) = keys(&recipe);
    let files_key = |steps: &[(String, Key)]| {
        steps
            .iter()
            .find(|(id, _)| id == "app/files")
            .expect("app/files step")
            .1
    };
    for (from, to) in [
        (r#"mode = "0644" }"#, r#"mode = "0600" }"#),
        (r#"mode = "0644" }"#, r#"mode = "0644", owner = "33:33" }"#),
        (r#"dest = "/etc/motd""#, r#"dest = "/etc/motd2""#),
    ] {
        let text = layered_recipe();
        assert!(text.contains(from), "{from}");
        d.write("web.toml", text.replacen(from, to, 1));
        let (after, _) = keys(&recipe);
        assert_ne!(files_key(&after), files_key(&before), "{from} -> {to}");
    }
}

#[test]
fn package_order_does_not_change_the_key() {
    let (d, recipe) = layered_dir();
    let before = keys(&recipe);
    let text = layered_recipe()
        .replace(r#"["nginx-light", "curl"]"#, r#"["curl", "nginx-light"]"#)
        .replace(
            r#"["linux-image-cloud-amd64", "systemd-sysv", "udev"]"#,
            r#"["udev", "linux-image-cloud-amd64", "systemd-sysv"]"#,
        );
    assert_ne!(text, layered_recipe(), "the replacements must apply");
    d.write("web.toml", text);
    assert_eq!(keys(&recipe), before);
}

#[test]
fn a_package_or_command_change_does_change_the_key() {
    let (d, recipe) = layered_dir();
    let (before, _) = keys(&recipe);
    d.write(
        "web.toml",
        layered_recipe().replace(
            r#"["nginx-light", "curl"]"#,
            r#"["nginx-light", "curl", "jq"]"#,
        ),
    );
    let (after, _) = keys(&recipe);
    assert_eq!(
        before[..2],
        after[..2],
        "base and sec/upgrade are below the change"
    );
    assert!(
        before[2..].iter().zip(&after[2..]).all(|(b, a)| b.1 != a.1),
        "app/packages and above must change"
    );
}

#[test]
fn initramfs_false_is_in_the_keys_of_the_steps_that_install_packages_only() {
    let (d, recipe) = layered_dir();
    let (before, image) = keys(&recipe);
    assert!(!plan::initramfs_later(&[]), "the default builds it");
    // On the base: every key changes (each step is above it).
    d.write(
        "web.toml",
        layered_recipe().replace("\"udev\"]\n", "\"udev\"]\ninitramfs = false\n"),
    );
    let (after, _) = keys(&recipe);
    assert!(before.iter().zip(&after).all(|(b, a)| b.1 != a.1));
    let loaded = load(&recipe).unwrap();
    assert!(!loaded.base.initramfs);
    // Which steps of the recipe's plan leave their initramfs to later.
    let later_of = |loaded: &Recipe| -> Vec<bool> {
        plan::make(loaded, &crate::lock::Locks::default())
            .unwrap()
            .steps
            .iter()
            .map(|s| plan::initramfs_later(&s.inputs.spec))
            .collect()
    };
    let later = later_of(&loaded);
    assert_eq!(later, [true, false, false, false, false, false]);
    // On a layer: its upgrade and packages steps, not its files or run.
    d.write(
        "web.toml",
        layered_recipe()
            .replace("upgrade = true\n", "upgrade = true\ninitramfs = false\n")
            .replace("name = \"app\"\n", "name = \"app\"\ninitramfs = false\n"),
    );
    let later = later_of(&load(&recipe).unwrap());
    assert_eq!(later, [false, true, true, false, false, false]);
    // `initramfs = true` is the default: the keys are as written without it.
    d.write(
        "web.toml",
        layered_recipe().replace("upgrade = true\n", "upgrade = true\ninitramfs = true\n"),
    );
    assert_eq!(keys(&recipe), (before, image));
    // On a layer that installs nothing it means nothing: refused.
    d.write(
        "web.toml",
        layered_recipe().replace("name = \"top\"\n", "name = \"top\"\ninitramfs = false\n"),
    );
    let err = load(&recipe).unwrap_err();
    let bad = err.downcast_ref::<BadInput>().expect("bad input");
    assert!(bad.to_string().contains("layer.top.initramfs"), "{bad}");
}

// ---------------------------------------------------------------- extends

/// parent/golden.toml (with files relative to parent/) and app.toml
/// extending it, each copying a file with the same relative name.
fn extends_dirs() -> (Dir, PathBuf, PathBuf) {
    let d = Dir::new();
    d.write("parent/files/motd", "from the parent\n");
    d.write("files/motd", "from the child\n");
    let parent = d.write(
        "parent/golden.toml",
        format!(
            r#"
[image]
name = "golden"
size = "3GiB"
hostname = "golden"
cmdline = "console=ttyS0 quiet"
format = "raw"
formats = ["raw", "vmdk"]
{BASE}
[[layer]]
name = "security"
upgrade = true

[[layer]]
name = "tools"
files = [{{ src = "files/motd", dest = "/etc/motd" }}]

[[volume]]
name = "logs"
mount = "/var/log/app"
size = "1GiB"

[smoke]
timeout = "100s"
checks = ["systemctl is-system-running --wait"]
http = [{{ port = 22, path = "/" }}]
ssh = true
ssh_checks = ["true"]
"#
        ),
    );
    let child = d.write(
        "app.toml",
        r#"
extends = "parent/golden.toml"

[image]
name = "app"
hostname = "app"

[[layer]]
name = "app"
files = [{ src = "files/motd", dest = "/etc/motd.app" }]
run = ["true"]

[[volume]]
name = "data"
mount = "/srv/data"
size = "2GiB"

[smoke]
timeout = "200s"
checks = ["systemctl is-active app"]
ssh_checks = ["systemctl is-active app"]
cloud_init = true
"#,
    );
    (d, parent, child)
}

#[test]
fn extends_appends_layers_and_overrides_image_fields_one_by_one() {
    let (d, parent_path, child_path) = extends_dirs();
    let parent = load(&parent_path).expect("parent loads");
    let child = load(&child_path).expect("child loads");

    let names: Vec<&str> = child.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["security", "tools", "app"]);
    assert_eq!(child.base, parent.base, "[base] is inherited");

    // Set by the child.
    assert_eq!(child.image.name, "app");
    assert_eq!(child.image.hostname, "app");
    // Left to the parent.
    assert_eq!(child.image.size, 3 << 30);
    assert_eq!(child.image.cmdline, "console=ttyS0 quiet");
    assert_eq!(child.image.format, Format::Raw);
    assert_eq!(child.image.formats, [ExportFormat::Vmdk]);

    let volumes: Vec<&str> = child.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(volumes, ["logs", "data"]);
    assert_eq!(
        child.smoke.checks,
        [
            "systemctl is-system-running --wait",
            "systemctl is-active app"
        ]
    );
    assert_eq!(child.smoke.http.len(), 1, "the parent's http check is kept");
    assert!(child.smoke.ssh, "the parent's ssh = true is kept");
    assert_eq!(
        child.smoke.ssh_checks,
        ["true", "systemctl is-active app"],
        "ssh checks are appended"
    );
    assert!(child.smoke.cloud_init && !parent.smoke.cloud_init);
    assert_eq!(
        child.smoke.timeout,
        std::time::Duration::from_secs(200),
        "the child's timeout overrides"
    );

    assert_eq!(child.path, child_path);
    assert_eq!(child.sources, [child_path.clone(), parent_path.clone()]);

    // Each layer's files are relative to the file that defines the layer.
    let tools = &child.layers[1];
    assert_eq!(tools.defined_in, parent_path);
    assert_eq!(tools.files[0].src, d.path("parent/files/motd"));
    let app = &child.layers[2];
    assert_eq!(app.defined_in, child_path);
    assert_eq!(app.files[0].src, d.path("files/motd"));
}

#[test]
fn an_extending_recipe_shares_its_parents_keys() {
    let (_d, parent_path, child_path) = extends_dirs();
    let (parent_steps, _) = keys(&parent_path);
    let (child_steps, _) = keys(&child_path);
    assert_eq!(
        child_steps[..parent_steps.len()],
        parent_steps[..],
        "inherited steps have the parent's keys"
    );
    assert_eq!(
        child_steps.len(),
        parent_steps.len() + 2,
        "app/files and app/run on top"
    );
}

#[test]
fn extends_without_an_image_table_keeps_the_parents() {
    let (d, _parent, _) = extends_dirs();
    let child = d.write(
        "bare.toml",
        "extends = \"parent/golden.toml\"\n[[layer]]\nname = \"x\"\nrun = [\"true\"]\n",
    );
    let recipe = load(&child).expect("loads");
    assert_eq!(recipe.image.name, "golden");
    assert_eq!(recipe.image.hostname, "golden");
    assert_eq!(recipe.smoke.timeout, std::time::Duration::from_secs(100));
}

#[test]
fn an_extends_cycle_is_bad_input() {
    let d = Dir::new();
    let a = d.write("a.toml", "extends = \"b.toml\"\n");
    d.write("b.toml", "extends = \"a.toml\"\n");
    let own = d.write("self.toml", "extends = \"self.toml\"\n");
    for path in [&a, &own] {
        let err = load(path).expect_err("a cycle must be refused");
        let text = assert_bad_input(&err, "extends");
        assert!(text.contains("cycle"), "{text}");
    }
}

#[test]
fn a_missing_parent_is_bad_input() {
    let d = Dir::new();
    let path = d.write("a.toml", "extends = \"nope.toml\"\n");
    let err = load(&path).expect_err("a missing parent must be refused");
    let text = assert_bad_input(&err, "extends");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn a_wrong_type_names_the_key_the_type_and_the_fix() {
    let d = Dir::new();
    let path = d.write(
        "x.toml",
        format!("{BASE}\n[[layer]]\nname = \"web\"\npackages = \"lighttpd\"\n"),
    );
    let err = load(&path).expect_err("a string where a list belongs must be refused");
    let text = assert_bad_input(&err, "layer[0].packages");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("line 9: "), "the line is named: {text}");
    assert!(text.contains("takes a list"), "the type is named: {text}");
    assert!(
        text.contains(r#"fix: write it as a list: packages = ["lighttpd"]"#),
        "the fix is spelled out: {text}"
    );
    assert!(!text.contains("(syntax)"), "not a syntax error: {text}");
}

/// A parent that is some other file: the child and its `extends` are named,
/// then the file and what is wrong with it.
#[test]
fn extending_a_file_that_is_not_a_recipe_names_the_recipe_and_key() {
    let d = Dir::new();
    d.write(
        "Cargo.toml",
        "[package]\nname = \"x\"\nversion = \"0.1.0\"\n",
    );
    let passwd = d.write("passwd", "root:x:0:0:root:/root:/bin/bash\n");
    for (parent, says) in [
        ("Cargo.toml", "unknown field `package`"),
        (passwd.to_str().expect("a UTF-8 temp path"), "line 1"),
    ] {
        let child = d.write("x.toml", format!("extends = \"{parent}\"\n"));
        let err = load(&child).expect_err("a parent that is not a recipe must be refused");
        let text = assert_bad_input(&err, "extends");
        let bad = err.downcast_ref::<BadInput>().expect("a BadInput");
        assert_eq!(bad.file.as_deref(), Some(child.as_path()), "{text}");
        assert!(
            text.starts_with(&format!(
                "{}: key `extends`: extends = \"{parent}\": is not a kiln recipe: ",
                child.display()
            )),
            "{text}"
        );
        assert!(text.contains(says), "the parent's problem is kept: {text}");
        assert!(
            text.contains("fix: point extends at a kiln recipe"),
            "{text}"
        );
    }
}

/// A parent recipe with a mistake of its own is still named as a recipe.
#[test]
fn extending_a_recipe_with_a_bad_key_names_both_files() {
    let d = Dir::new();
    let parent = d.write("p.toml", format!("[image]\nhostnam = \"x\"\n{BASE}"));
    let child = d.write("c.toml", "extends = \"p.toml\"\n");
    let err = load(&child).expect_err("the parent's unknown key must be refused");
    let text = assert_bad_input(&err, "extends");
    assert!(text.contains("is a recipe with an error"), "{text}");
    assert!(text.contains(&parent.display().to_string()), "{text}");
    assert!(text.contains("key `image.hostnam`"), "{text}");
    assert!(
        text.contains("fix: fix the recipe it extends: remove or rename it"),
        "{text}"
    );
}

#[test]
fn reusing_a_parents_layer_name_is_bad_input_in_the_child() {
    let (d, _, _) = extends_dirs();
    let child = d.write(
        "dup.toml",
        "extends = \"parent/golden.toml\"\n[[layer]]\nname = \"tools\"\nrun = [\"true\"]\n",
    );
    let err = load(&child).expect_err("a duplicate layer name must be refused");
    let text = assert_bad_input(&err, "layer[2].name");
    assert!(
        text.contains(&child.display().to_string()),
        "the child's file is named: {text}"
    );
}

#[test]
fn an_error_in_a_parents_layer_names_the_parent() {
    let d = Dir::new();
    let parent = d.write(
        "parent/p.toml",
        format!(
            "{BASE}\n[[layer]]\nname = \"p\"\nfiles = [{{ src = \"missing\", dest = \"/x\" }}]\n"
        ),
    );
    let child = d.write("c.toml", "extends = \"parent/p.toml\"\n");
    let err = load(&child).expect_err("the parent's missing file must be refused");
    let text = assert_bad_input(&err, "layer.p.files[0].src");
    assert!(
        text.contains(&parent.display().to_string()),
        "the parent is named: {text}"
    );
}

// ------------------------------------------------------------- validation

/// Assert that `err` is a [`BadInput`] whose text names a file, the key
/// `key`, and a fix; returns the text.
#[track_caller]
fn assert_bad_input(err: &anyhow::Error, key: &str) -> String {
    let text = format!("{err:#}");
    let bad = err
        .downcast_ref::<BadInput>()
        .unwrap_or_else(|| panic!("not a BadInput: {text}"));
    assert!(bad.file.is_some(), "no file in {text}");
    assert!(
        text.contains(&format!("key `{key}`")),
        "expected key `{key}` in: {text}"
    );
    assert!(text.contains("\n  fix: "), "no fix in: {text}");
    let fix = &bad.fix;
    assert!(!fix.trim().is_empty(), "empty fix in: {text}");
    text
}

/// A recipe that is valid except for what a case changes.
fn valid_recipe() -> String {
    format!(
        r#"[image]
name = "t"
size = "2GiB"
format = "qcow2"
hostname = "t"
cmdline = "console=ttyS0"
{BASE}
[[layer]]
name = "app"
packages = ["curl"]
files = [{{ src = "files/f", dest = "/opt/f", mode = "0644", owner = "root:root" }}]
run = ["true"]
"#
    )
}

struct Case {
    what: &'static str,
    /// (from, to) replacements applied to [`valid_recipe`], or a whole text.
    edit: Edit,
    key: &'static str,
    /// Something the problem must mention.
    says: &'static str,
}

enum Edit {
    Replace(&'static str, &'static str),
    Text(&'static str),
}

fn cases() -> Vec<Case> {
    use Edit::{Replace, Text};
    let file = r#"{ src = "files/f", dest = "/opt/f", mode = "0644", owner = "root:root" }"#;
    let with_file = |f: &'static str| Replace(file, f);
    vec![
        Case {
            what: "malformed TOML",
            edit: Replace("[image]", "[image"),
            key: "(syntax)",
            says: "line 1",
        },
        Case {
            what: "unterminated string",
            edit: Replace(r#"name = "t""#, r#"name = "t"#),
            key: "(syntax)",
            says: "line 2",
        },
        Case {
            what: "unknown top-level key",
            edit: Replace("[image]", "colour = \"red\"\n[image]"),
            key: "colour",
            says: "unknown field",
        },
        Case {
            what: "unknown key in [image]",
            edit: Replace(r#"hostname = "t""#, r#"hostnam = "t""#),
            key: "image.hostnam",
            says: "unknown field",
        },
        Case {
            what: "unknown key in [base]",
            edit: Replace(r#"variant = "minbase""#, r#"varient = "minbase""#),
            key: "base.varient",
            says: "unknown field",
        },
        Case {
            what: "unknown key in [[layer]]",
            edit: Replace(r#"packages = ["curl"]"#, r#"packges = ["curl"]"#),
            key: "layer[0].packges",
            says: "unknown field",
        },
        Case {
            what: "unknown key in files",
            edit: Replace(r#"mode = "0644""#, r#"mod = "0644""#),
            key: "layer[0].files[0].mod",
            says: "unknown field",
        },
        Case {
            what: "missing src",
            edit: with_file(r#"{ src = "files/nope", dest = "/opt/f" }"#),
            key: "layer.app.files[0].src",
            says: "files/nope",
        },
        Case {
            what: "src key missing",
            edit: with_file(r#"{ dest = "/opt/f" }"#),
            key: "layer[0].files[0].src",
            says: "missing field",
        },
        Case {
            what: "src outside the folder",
            edit: with_file(r#"{ src = "../outside", dest = "/opt/f" }"#),
            key: "layer.app.files[0].src",
            says: "outside the recipe's folder",
        },
        Case {
            what: "src outside through a symlink",
            edit: with_file(r#"{ src = "files/link", dest = "/opt/f" }"#),
            key: "layer.app.files[0].src",
            says: "outside the recipe's folder",
        },
        Case {
            what: "src outside through a symlinked folder",
            edit: with_file(r#"{ src = "linkdir/outside", dest = "/opt/f" }"#),
            key: "layer.app.files[0].src",
            says: "outside the recipe's folder",
        },
        Case {
            what: "absolute src",
            edit: with_file(r#"{ src = "/etc/hostname", dest = "/opt/f" }"#),
            key: "layer.app.files[0].src",
            says: "absolute",
        },
        Case {
            what: "src is a folder",
            edit: with_file(r#"{ src = "files", dest = "/opt/f" }"#),
            key: "layer.app.files[0].src",
            says: "not a regular file",
        },
        Case {
            what: "relative dest",
            edit: with_file(r#"{ src = "files/f", dest = "opt/f" }"#),
            key: "layer.app.files[0].dest",
            says: "not an absolute path",
        },
        Case {
            what: "dest with ..",
            edit: with_file(r#"{ src = "files/f", dest = "/opt/../../etc/shadow" }"#),
            key: "layer.app.files[0].dest",
            says: "..",
        },
        Case {
            what: "dest is /",
            edit: with_file(r#"{ src = "files/f", dest = "/" }"#),
            key: "layer.app.files[0].dest",
            says: "root",
        },
        Case {
            what: "size zero",
            edit: Replace(r#"size = "2GiB""#, r#"size = "0""#),
            key: "image.size",
            says: "zero",
        },
        Case {
            what: "size zero GiB",
            edit: Replace(r#"size = "2GiB""#, r#"size = "0GiB""#),
            key: "image.size",
            says: "zero",
        },
        Case {
            what: "size unparseable",
            edit: Replace(r#"size = "2GiB""#, r#"size = "two gigs""#),
            key: "image.size",
            says: "not a size",
        },
        Case {
            what: "size with a decimal",
            edit: Replace(r#"size = "2GiB""#, r#"size = "1.5GiB""#),
            key: "image.size",
            says: "not a size",
        },
        Case {
            what: "size too small",
            edit: Replace(r#"size = "2GiB""#, r#"size = "1MiB""#),
            key: "image.size",
            says: "outside the range",
        },
        Case {
            what: "size as a number",
            edit: Replace(r#"size = "2GiB""#, "size = 2"),
            key: "image.size",
            says: "the number 2, but size takes a string",
        },
        Case {
            what: "packages as a string, not a list",
            edit: Replace(r#"packages = ["curl"]"#, r#"packages = "curl""#),
            key: "layer[0].packages",
            says: "the string \"curl\", but packages takes a list",
        },
        Case {
            what: "upgrade as a string",
            edit: Replace(r#"run = ["true"]"#, "run = [\"true\"]\nupgrade = \"yes\""),
            key: "layer[0].upgrade",
            says: "takes true or false",
        },
        Case {
            what: "a file entry that is a string",
            edit: with_file(r#""files/f""#),
            key: "layer[0].files[0]",
            says: "takes a table",
        },
        Case {
            what: "an http port out of range",
            edit: Replace(
                "run = [\"true\"]\n",
                "run = [\"true\"]\n[smoke]\nhttp = [{ port = 70000 }]\n",
            ),
            key: "smoke.http[0].port",
            says: "65535",
        },
        Case {
            what: "ssh checks without ssh",
            edit: Replace(
                "run = [\"true\"]\n",
                "run = [\"true\"]\n[smoke]\nssh_checks = [\"true\"]\n",
            ),
            key: "smoke.ssh_checks",
            says: "`ssh` is not true",
        },
        Case {
            what: "an empty ssh check",
            edit: Replace(
                "run = [\"true\"]\n",
                "run = [\"true\"]\n[smoke]\nssh = true\nssh_checks = [\"true\", \" \"]\n",
            ),
            key: "smoke.ssh_checks[1]",
            says: "empty",
        },
        Case {
            what: "ssh as a string",
            edit: Replace(
                "run = [\"true\"]\n",
                "run = [\"true\"]\n[smoke]\nssh = \"yes\"\n",
            ),
            key: "smoke.ssh",
            says: "true or false",
        },
        Case {
            what: "bad format",
            edit: Replace(r#"format = "qcow2""#, r#"format = "vmdk""#),
            key: "image.format",
            says: "vmdk",
        },
        Case {
            what: "an unknown export format",
            edit: Replace(
                r#"format = "qcow2""#,
                "format = \"qcow2\"\nformats = [\"vmdk\", \"vhdx\"]",
            ),
            key: "image.formats[1]",
            says: "unknown format `vhdx`",
        },
        Case {
            what: "an export format listed twice",
            edit: Replace(
                r#"format = "qcow2""#,
                "format = \"qcow2\"\nformats = [\"gce\", \"vhd\", \"gce\"]",
            ),
            key: "image.formats[2]",
            says: "`gce` is listed twice",
        },
        Case {
            what: "formats as a string, not a list",
            edit: Replace(
                r#"format = "qcow2""#,
                "format = \"qcow2\"\nformats = \"vmdk\"",
            ),
            key: "image.formats",
            says: "takes a list",
        },
        Case {
            what: "bad mode (not octal)",
            edit: with_file(r#"{ src = "files/f", dest = "/opt/f", mode = "0999" }"#),
            key: "layer.app.files[0].mode",
            says: "0999",
        },
        Case {
            what: "bad mode (symbolic)",
            edit: with_file(r#"{ src = "files/f", dest = "/opt/f", mode = "rw-r--r--" }"#),
            key: "layer.app.files[0].mode",
            says: "octal",
        },
        Case {
            what: "bad mode (too large)",
            edit: with_file(r#"{ src = "files/f", dest = "/opt/f", mode = "17777" }"#),
            key: "layer.app.files[0].mode",
            says: "octal",
        },
        Case {
            what: "owner without group",
            edit: with_file(r#"{ src = "files/f", dest = "/opt/f", owner = "root" }"#),
            key: "layer.app.files[0].owner",
            says: "user:group",
        },
        Case {
            what: "owner with a space",
            edit: with_file(r#"{ src = "files/f", dest = "/opt/f", owner = "ro ot:root" }"#),
            key: "layer.app.files[0].owner",
            says: "user:group",
        },
        Case {
            what: "bad package name",
            edit: Replace(r#"packages = ["curl"]"#, r#"packages = ["Curl"]"#),
            key: "layer.app.packages[0]",
            says: "Curl",
        },
        Case {
            what: "package name with a space",
            edit: Replace(
                r#"packages = ["curl"]"#,
                r#"packages = ["curl", "nginx light"]"#,
            ),
            key: "layer.app.packages[1]",
            says: "nginx light",
        },
        Case {
            what: "bad base package name",
            edit: Replace(r#""udev"]"#, r#""udev", "-x"]"#),
            key: "base.packages[3]",
            says: "-x",
        },
        Case {
            what: "bad suite",
            edit: Replace(r#"suite = "trixie""#, r#"suite = "Trixie""#),
            key: "base.suite",
            says: "Trixie",
        },
        Case {
            what: "bad variant",
            edit: Replace(r#"variant = "minbase""#, r#"variant = "tiny""#),
            key: "base.variant",
            says: "tiny",
        },
        Case {
            what: "empty layer",
            edit: Replace(
                r#"packages = ["curl"]
files = [{ src = "files/f", dest = "/opt/f", mode = "0644", owner = "root:root" }]
run = ["true"]"#,
                "",
            ),
            key: "layer.app",
            says: "does nothing",
        },
        Case {
            what: "empty run command",
            edit: Replace(r#"run = ["true"]"#, r#"run = ["  "]"#),
            key: "layer.app.run[0]",
            says: "empty",
        },
        Case {
            what: "bad layer name",
            edit: Replace(r#"name = "app""#, r#"name = "App Layer""#),
            key: "layer[0].name",
            says: "App Layer",
        },
        Case {
            what: "layer without a name",
            edit: Replace(r#"name = "app""#, ""),
            key: "layer[0].name",
            says: "missing field",
        },
        Case {
            what: "root= in cmdline",
            edit: Replace(
                r#"cmdline = "console=ttyS0""#,
                r#"cmdline = "console=ttyS0 root=/dev/vda2""#,
            ),
            key: "image.cmdline",
            says: "root=",
        },
        Case {
            what: "bad hostname (leading dash)",
            edit: Replace(r#"hostname = "t""#, r#"hostname = "-web""#),
            key: "image.hostname",
            says: "-web",
        },
        Case {
            what: "bad hostname (underscore)",
            edit: Replace(r#"hostname = "t""#, r#"hostname = "web_1""#),
            key: "image.hostname",
            says: "web_1",
        },
        Case {
            what: "bad image name",
            edit: Replace(r#"name = "t""#, r#"name = "../t""#),
            key: "image.name",
            says: "../t",
        },
        Case {
            what: "missing [base]",
            edit: Text("[image]\nname = \"t\"\n[[layer]]\nname = \"app\"\nrun = [\"true\"]\n"),
            key: "base",
            says: "no [base]",
        },
        Case {
            what: "missing suite",
            edit: Replace(r#"suite = "trixie""#, ""),
            key: "base.suite",
            says: "missing field",
        },
    ]
}

#[test]
fn every_validation_error_is_bad_input_naming_file_key_and_fix() {
    let d = Dir::new();
    d.write("outside", "outside the recipe folder\n");
    let dir = d.path("recipe");
    std::fs::create_dir_all(dir.join("files")).expect("mkdir");
    std::fs::write(dir.join("files/f"), "content\n").expect("write");
    std::os::unix::fs::symlink("../../outside", dir.join("files/link")).expect("symlink");
    std::os::unix::fs::symlink("..", dir.join("linkdir")).expect("symlink");
    let path = dir.join("t.toml");

    // The valid recipe loads, so each case fails for its own reason.
    std::fs::write(&path, valid_recipe()).expect("write");
    load(&path).unwrap_or_else(|e| panic!("the valid recipe must load: {e:#}"));

    let mut failures = Vec::new();
    for case in cases() {
        let text = match case.edit {
            Edit::Replace(from, to) => {
                assert!(
                    valid_recipe().contains(from),
                    "{}: `{from}` is not in the valid recipe",
                    case.what
                );
                valid_recipe().replacen(from, to, 1)
            }
            Edit::Text(t) => t.to_owned(),
        };
        std::fs::write(&path, &text).expect("write");
        let err = match load(&path).and_then(|r| plan::make(&r, &crate::lock::Locks::default())) {
            Ok(_) => {
                failures.push(format!("{}: accepted", case.what));
                continue;
            }
            Err(e) => e,
        };
        let shown = format!("{err:#}");
        let Some(bad) = err.downcast_ref::<BadInput>() else {
            failures.push(format!("{}: not a BadInput: {shown}", case.what));
            continue;
        };
        let mut wrong = Vec::new();
        if bad.file.as_deref() != Some(path.as_path())
            || !shown.contains(&path.display().to_string())
        {
            wrong.push(format!("file {:?}", bad.file));
        }
        if !shown.contains(&format!("key `{}`", case.key)) {
            wrong.push(format!("key (want `{}`)", case.key));
        }
        if !shown.contains("\n  fix: ") || bad.fix.trim().is_empty() {
            wrong.push("fix".to_owned());
        }
        if !bad.problem.contains(case.says) {
            wrong.push(format!("problem (want it to mention `{}`)", case.says));
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: wrong {}:\n{shown}",
                case.what,
                wrong.join(", ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n\n")
    );
}

#[test]
fn a_missing_recipe_file_is_bad_input() {
    let d = Dir::new();
    let path = d.path("nope.toml");
    let err = load(&path).expect_err("a missing file must be refused");
    let text = assert_bad_input(&err, "(file)");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn the_shipped_recipes_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    for name in ["golden.toml", "web.toml", "sealed.toml"] {
        let recipe = load(&root.join(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        plan::make(&recipe, &crate::lock::Locks::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

#[test]
fn verity_is_off_by_default_inherited_and_in_the_image_key_only_when_on() {
    let (d, parent, _) = extends_dirs();
    assert!(!load(&parent).expect("loads").image.verity);
    let sealed = d.write(
        "sealed.toml",
        "extends = \"parent/golden.toml\"\n[image]\nverity = true\n",
    );
    let child = d.write(
        "child.toml",
        "extends = \"sealed.toml\"\n[image]\nhostname = \"golden\"\n",
    );
    assert!(load(&sealed).expect("loads").image.verity);
    assert!(load(&child).expect("loads").image.verity, "inherited");
    let off = d.write(
        "off.toml",
        "extends = \"sealed.toml\"\n[image]\nverity = false\n",
    );
    assert!(!load(&off).expect("loads").image.verity, "overridden");
    // Same layers; only the image key differs, and `verity = false`
    // written out is the same image as no verity at all.
    let (parent_steps, parent_image) = keys(&parent);
    let (sealed_steps, sealed_image) = keys(&sealed);
    assert_eq!(parent_steps, sealed_steps);
    assert_ne!(parent_image, sealed_image);
    assert_eq!(keys(&off).1, parent_image);
    let bad = d.write(
        "bad.toml",
        "extends = \"parent/golden.toml\"\n[image]\nverity = \"yes\"\n",
    );
    assert_bad_input(&load(&bad).unwrap_err(), "image.verity");
}

#[test]
fn dest_is_normalised() {
    assert_eq!(
        normalize_dest("/etc//nginx/./nginx.conf").as_deref(),
        Ok("/etc/nginx/nginx.conf")
    );
    for bad in ["etc/motd", "/etc/../shadow", "/", "//", "/etc/\nx"] {
        assert!(normalize_dest(bad).is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn export_formats_are_not_in_the_image_key() {
    // A new deployable format is converted from the same disk: adding one
    // must not assemble the image again.
    let d = Dir::new();
    d.write("files/index.html", "hi");
    d.write("files/motd", "motd");
    let plain = d.write("a.toml", layered_recipe());
    let with = d.write(
        "b.toml",
        layered_recipe().replace(
            "hostname = \"web\"",
            "hostname = \"web\"\nformats = [\"qcow2\", \"vhd\", \"containerdisk\"]",
        ),
    );
    assert_eq!(keys(&plain).1, keys(&with).1);
    let recipe = load(&with).expect("loads");
    assert_eq!(
        recipe.image.formats,
        [ExportFormat::Vhd, ExportFormat::ContainerDisk],
        "the primary qcow2 is made once, as the primary"
    );
}

#[test]
fn a_bad_export_format_names_the_key_and_every_choice() {
    let d = Dir::new();
    d.write("files/index.html", "hi");
    d.write("files/motd", "motd");
    let path = d.write(
        "r.toml",
        layered_recipe().replace(
            "hostname = \"web\"",
            "hostname = \"web\"\nformats = [\"raw\", \"ova\"]",
        ),
    );
    let err = load(&path).expect_err("ova is not a format");
    let bad = err.downcast_ref::<BadInput>().expect("bad input");
    assert_eq!(bad.key.as_deref(), Some("image.formats[1]"));
    assert_eq!(bad.file.as_deref(), Some(path.as_path()));
    assert_eq!(
        bad.fix,
        "use one of qcow2, raw, vmdk, vhd, gce, containerdisk"
    );
}
