//! Lock files and the security-patch rebuild, against the real archive:
//! lock and rebuild are cache hits with a byte-identical lock; rolling the
//! security layer's pins back and then `kiln lock --update security` prints
//! the version bumps, rebuilds only that layer and those above it, and
//! `kiln diff` shows exactly those packages; a .deb that does not match its
//! pin is refused with nothing stored; a locked rebuild works with the
//! archive unreachable, and an unlocked package then fails clearly.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{Kiln, RecipeDir};

/// golden's base, its security layer, and a small app layer (after the
/// `pre` layers, TOML, if any).
fn app_recipe(name: &str, extra_base: &str, app_packages: &str) -> String {
    app_recipe_with(name, extra_base, "", app_packages)
}

fn app_recipe_with(name: &str, extra_base: &str, pre: &str, app_packages: &str) -> String {
    let text = common::recipe(
        name,
        &format!(
            "[[layer]]\nname = \"security\"\nupgrade = true\n\n{pre}\
             [[layer]]\nname = \"app\"\npackages = [{app_packages}]\nfiles = [{{ src = \"motd\", dest = \"/etc/motd\" }}]\n"
        ),
    );
    text.replace("[base]\n", &format!("[base]\n{extra_base}"))
}

fn lock_toml(path: &Path) -> toml::Value {
    toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `(name, version)` pinned for one step.
fn pins(lock: &toml::Value, step: &str) -> BTreeSet<(String, String)> {
    lock["steps"][step]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A dir with the app recipe and its lock, resolved and built once.
fn locked_app(kiln: &Kiln, name: &str) -> (RecipeDir, PathBuf) {
    common::require_build();
    let d = RecipeDir::new();
    d.write("motd", format!("kiln lock test {name}\n"));
    let recipe = d.write_recipe(
        &format!("{name}.toml"),
        app_recipe(name, "", "\"hello\""),
        kiln,
    );
    kiln.run(&["lock", recipe.to_str().unwrap()]).assert_code(0);
    kiln.build(&recipe, &[]);
    (d, recipe)
}

#[test]
fn lock_then_build_twice_is_all_cache_hits_and_the_lock_does_not_move() {
    let kiln = Kiln::shared();
    let (_d, recipe) = locked_app(&kiln, "lk-hits");
    let lock_path = recipe.with_extension("lock");
    let before = std::fs::read(&lock_path).unwrap();
    let lock = lock_toml(&lock_path);
    assert!(
        lock["steps"].get("security/upgrade").is_some(),
        "no security pins in\n{}",
        String::from_utf8_lossy(&before)
    );
    assert!(
        pins(&lock, "app/packages")
            .iter()
            .any(|(n, _)| n == "hello"),
        "hello is not pinned"
    );
    for p in lock["steps"]["app/packages"]["packages"]
        .as_array()
        .unwrap()
    {
        assert_eq!(p["sha256"].as_str().unwrap().len(), 64, "{p}");
        assert!(p["path"].as_str().unwrap().starts_with("pool/"), "{p}");
    }
    let report = kiln.build(&recipe, &[]);
    assert!(
        report.rows.iter().all(|r| r.status == "cached"),
        "not all cache hits: {:?}",
        report.statuses()
    );
    assert_eq!(
        std::fs::read(&lock_path).unwrap(),
        before,
        "the lock changed on a rebuild"
    );
}

#[test]
fn a_security_update_rebuilds_only_the_security_layer_and_above() {
    let kiln = Kiln::shared();
    let (_d, recipe) = locked_app(&kiln, "lk-sec");
    let lock_path = recipe.with_extension("lock");
    let today = lock_toml(&lock_path);
    let fixes = pins(&today, "security/upgrade");

    // Yesterday: the same lock, but the security layer had nothing to apply.
    let text = std::fs::read_to_string(&lock_path).unwrap();
    let mut yesterday: toml::Value = toml::from_str(&text).unwrap();
    yesterday["steps"]["security/upgrade"]["packages"] = toml::Value::Array(vec![]);
    std::fs::write(&lock_path, toml::to_string(&yesterday).unwrap()).unwrap();
    let old = kiln.build(&recipe, &[]);
    assert_eq!(old.row("base").status, "cached");
    let old_manifest = kiln.out.join("lk-sec.old.manifest.json");
    std::fs::copy(kiln.out.join("lk-sec.manifest.json"), &old_manifest).unwrap();

    // The day the fixes are published.
    let update = kiln.run(&["lock", "--update", "security", recipe.to_str().unwrap()]);
    update.assert_code(0);
    let printed = &update.stdout;
    assert!(printed.contains("security/upgrade"), "{}", update.show());
    let relocked = lock_toml(&lock_path);
    assert_eq!(
        pins(&relocked, "security/upgrade"),
        fixes,
        "re-resolving gave other pins than today's"
    );
    assert_eq!(
        relocked["steps"]["base"], today["steps"]["base"],
        "the base's pins moved"
    );
    assert_eq!(
        relocked["steps"]["app/packages"]["packages"], today["steps"]["app/packages"]["packages"],
        "the app's pins moved"
    );
    for (name, version) in &fixes {
        assert!(
            printed.contains(&format!("{name} ")) && printed.contains(&format!("-> {version}")),
            "`{name} … -> {version}` not printed:\n{}",
            update.show()
        );
    }

    // Only the security layer and what is above it change: the base keeps
    // its key (and is a cache hit); every step above the base gets a new
    // key, so it is built unless this store already holds it (another run
    // of this test built the very same layers before).
    let new = kiln.build(&recipe, &[]);
    assert_eq!(new.row("base").status, "cached", "{:?}", new.statuses());
    assert_eq!(new.row("base").key, old.row("base").key);
    if !fixes.is_empty() {
        for row in new.rows.iter().filter(|r| r.stage != "base") {
            assert_ne!(
                row.key,
                old.row(&row.stage).key,
                "{} kept its key across the security update",
                row.stage
            );
        }
    }

    let diff = kiln.run(&[
        "--json",
        "diff",
        old_manifest.to_str().unwrap(),
        kiln.out.join("lk-sec.manifest.json").to_str().unwrap(),
    ]);
    diff.assert_code(0);
    let d: serde_json::Value = diff.json();
    let moved: BTreeSet<(String, String)> = d["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["new"].is_null())
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["new"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        moved,
        fixes,
        "kiln diff does not show exactly the security fixes:\n{}",
        diff.show()
    );
    // Anything it removed is a kernel the upgrade replaced.
    for p in d["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["new"].is_null())
    {
        assert!(
            p["name"].as_str().unwrap().starts_with("linux-image-"),
            "unexpected removal {p}"
        );
    }
    if !fixes.is_empty() {
        assert!(
            d["layers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["step"] == "security/upgrade"),
            "{}",
            diff.show()
        );
        assert!(
            !d["layers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["step"] == "base"),
            "{}",
            diff.show()
        );
    }
}

#[test]
fn a_deb_that_does_not_match_its_pin_is_refused_and_nothing_is_stored() {
    let kiln = Kiln::shared();
    let (d, recipe) = locked_app(&kiln, "lk-bad");
    let lock_path = recipe.with_extension("lock");
    let lock = lock_toml(&lock_path);
    let hello = lock["steps"]["app/packages"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("hello"))
        .unwrap()
        .clone();
    let sha = hello["sha256"].as_str().unwrap();

    // 1. The cached .deb was damaged: a new step that needs it refuses it.
    let cached = kiln.store.join("debs-v1").join(format!("{sha}.deb"));
    let good = std::fs::read(&cached).unwrap();
    let mut damaged = good.clone();
    damaged.extend_from_slice(b"tampered");
    std::fs::write(&cached, &damaged).unwrap();
    // A new layer below the app gives its packages step a new parent, so it
    // must be built again from its pins.
    d.write("pre.txt", common::nonce());
    let pre =
        "[[layer]]\nname = \"pre\"\nfiles = [{ src = \"pre.txt\", dest = \"/etc/kiln-pre\" }]\n\n";
    std::fs::write(&recipe, app_recipe_with("lk-bad", "", pre, "\"hello\"")).unwrap();
    let plan = kiln.plan(&recipe);
    let before = common::StoreSnapshot::of(&kiln.store);
    let run = kiln.run(&["--json", "build", "--no-smoke", recipe.to_str().unwrap()]);
    std::fs::write(&cached, &good).unwrap();
    assert_eq!(run.code, Some(1), "{}", run.show());
    assert!(
        run.stderr.contains("hello") && run.stderr.contains("does not match its lock"),
        "{}",
        run.show()
    );
    before.assert_not_published(&kiln.store, &plan.keys_from("app/packages"));

    // 2. The lock names content the archive does not have: the download is
    //    refused by its digest, and nothing enters the store.
    let text = std::fs::read_to_string(&lock_path)
        .unwrap()
        .replace(sha, &"0".repeat(64));
    std::fs::write(&lock_path, text).unwrap();
    let plan = kiln.plan(&recipe);
    let run = kiln.run(&["--json", "build", "--no-smoke", recipe.to_str().unwrap()]);
    assert_ne!(run.code, Some(0), "{}", run.show());
    assert!(run.stderr.contains("hello"), "{}", run.show());
    assert!(
        !kiln
            .store
            .join("debs-v1")
            .join(format!("{}.deb", "0".repeat(64)))
            .exists(),
        "a mismatching .deb entered the cache"
    );
    // Nor does anything of the refused download (a partial file, apt's
    // `.FAILED` copy): debs-v1 holds only verified `<sha256>.deb` files.
    let debris: Vec<String> = std::fs::read_dir(kiln.store.join("debs-v1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !(n.len() == 68
                && n.ends_with(".deb")
                && n[..64].bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect();
    assert_eq!(debris, Vec::<String>::new(), "left in debs-v1");
    common::StoreSnapshot::of(&kiln.store)
        .assert_not_published(&kiln.store, &plan.keys_from("app/packages"));
}

#[test]
fn with_the_archive_unreachable_a_locked_rebuild_comes_from_the_cache() {
    let kiln = Kiln::shared();
    let (d, recipe) = locked_app(&kiln, "lk-offline");
    // Same recipe, but its archive is a closed port on loopback.
    let offline = d.path("lk-offline-2.toml");
    std::fs::write(
        &offline,
        app_recipe(
            "lk-offline-2",
            "mirror = \"http://127.0.0.1:9/debian\"\n",
            "\"hello\"",
        ),
    )
    .unwrap();
    std::fs::copy(
        recipe.with_extension("lock"),
        offline.with_extension("lock"),
    )
    .unwrap();
    let rebuilt = kiln.build(&offline, &["--refresh"]);
    assert!(
        rebuilt.rows.iter().all(|r| r.status == "built"),
        "{:?}",
        rebuilt.statuses()
    );

    // A package nobody pinned has to come from the archive: a clear error.
    std::fs::write(
        &offline,
        app_recipe(
            "lk-offline-2",
            "mirror = \"http://127.0.0.1:9/debian\"\n",
            "\"hello\", \"cowsay\"",
        ),
    )
    .unwrap();
    let run = kiln.run(&["--json", "build", "--no-smoke", offline.to_str().unwrap()]);
    assert_ne!(run.code, Some(0), "{}", run.show());
    assert!(
        run.stderr.contains("could not reach the package archive"),
        "{}",
        run.show()
    );
    assert!(run.stderr.contains("127.0.0.1:9"), "{}", run.show());
}

#[test]
fn fresh_lists_are_reused_and_resolve_as_fetched_ones_do() {
    let kiln = Kiln::shared();
    let (d, recipe) = locked_app(&kiln, "lk-lists");
    // `kiln lock` just fetched the archive's lists (or found them fetched
    // minutes ago): one more package resolves against them as they are.
    // A layer of this run's own below it makes the package step new even
    // when an earlier run built the same pins (the shared store is warm).
    d.write("nonce", common::nonce());
    let text = app_recipe_with(
        "lk-lists",
        "",
        "[[layer]]\nname = \"nonce\"\nfiles = [{ src = \"nonce\", dest = \"/etc/kiln-nonce\" }]\n\n",
        "\"hello\", \"cowsay\"",
    );
    std::fs::write(&recipe, text).unwrap();
    let mut cleanup = common::ForgetOnDrop::new(&kiln.store);
    cleanup.add(
        &kiln.plan(&recipe),
        &["nonce/files", "app/packages", "app/files"],
    );
    let reused = kiln.build(&recipe, &[]);
    assert_eq!(reused.row("app/packages").status, "built");
    let log = std::fs::read_to_string(kiln.out.join("lk-lists.build.log")).unwrap();
    assert!(
        log.contains("were fetched") && log.contains("used as they are"),
        "the resolving step fetched the lists again:\n{log}"
    );
    let lock_path = recipe.with_extension("lock");
    let resolved = pins(&lock_toml(&lock_path), "app/packages");
    assert!(resolved.iter().any(|(n, _)| n == "cowsay"), "{resolved:?}");
    let plan = kiln.plan(&recipe);

    // --update fetches them again and resolves the layer anew: the same
    // pins, the same keys and reasons, the same disk.
    let again = kiln.build(&recipe, &["--update", "app"]);
    let log = std::fs::read_to_string(kiln.out.join("lk-lists.build.log")).unwrap();
    assert!(
        !log.contains("used as they are"),
        "--update used the lists without fetching them:\n{log}"
    );
    assert_eq!(pins(&lock_toml(&lock_path), "app/packages"), resolved);
    assert_eq!(again.sha256, reused.sha256, "{again:#?}");
    assert_eq!(kiln.plan(&recipe), plan);
    drop(d);
}
