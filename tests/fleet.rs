//! `kiln build A.toml B.toml …`: several recipes in one run, the real
//! binary and tools. A step that several recipes share is built once, the
//! summary says which recipe's build did it and which shared it, and every
//! image is what a build of its recipe alone makes.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::Path;

use common::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct FleetReport {
    steps: Vec<FleetRow>,
    recipes: Vec<RecipeReport>,
    jobs: usize,
}

#[derive(Debug, Deserialize)]
struct FleetRow {
    stage: String,
    key: String,
    status: String,
    by: String,
    recipes: Vec<String>,
    shared: bool,
}

#[derive(Debug, Deserialize)]
struct RecipeReport {
    name: String,
    exit_code: i32,
    error: Option<String>,
    summary: Option<Summary>,
}

#[derive(Debug, Deserialize)]
struct Summary {
    image: std::path::PathBuf,
    sha256: String,
    rows: Vec<Row>,
    smoke: Option<Smoke>,
}

#[derive(Debug, Deserialize)]
struct Row {
    stage: String,
    key: String,
    status: String,
    #[serde(default)]
    shared_with: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Smoke {
    passed: bool,
}

const FLEET: [&str; 3] = ["golden", "web", "db"];

/// A step of a recipe's chain (not its image, an export or its smoke).
fn is_step(stage: &str) -> bool {
    stage != "image" && stage != "smoke" && !stage.starts_with("export")
}

/// The shipped golden, web and db, built together with their smoke boots:
/// golden's steps (with a layer new to this run at its top, so that they
/// are really built, not found) are brought in once for all three, each
/// image boots and passes, and each is the image its recipe builds alone.
#[test]
fn golden_web_and_db_built_together_share_golden_s_steps_once_and_all_pass() {
    require_build();
    require_tools(&[("qemu-system-x86_64", "qemu-system-x86")]);
    let dir = temp_dir("kiln-fleet-");
    let recipes = dir.path().join("recipes");
    copy_recipes(&recipes);
    let nonce = nonce();
    std::fs::write(recipes.join("files/fleet-nonce"), format!("{nonce}\n")).unwrap();
    let golden = recipes.join("golden.toml");
    let mut text = std::fs::read_to_string(&golden).unwrap();
    text += "\n[[layer]]\nname = \"fleet\"\nfiles = [{ src = \"files/fleet-nonce\", dest = \"/etc/kiln-fleet-nonce\", mode = \"0644\" }]\n";
    std::fs::write(&golden, text).unwrap();
    let paths: Vec<std::path::PathBuf> = FLEET
        .iter()
        .map(|n| recipes.join(format!("{n}.toml")))
        .collect();

    let kiln = Kiln::at(&shared_store(), &dir.path().join("out"));
    let mut args: Vec<&OsStr> = vec![OsStr::new("--json"), OsStr::new("build")];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let run = kiln.run(&args);
    // What this run built new is forgotten afterwards: everything above
    // golden's shipped layers, which the other tests share.
    let mut cleanup = ForgetOnDrop::new(&kiln.store);
    let plans: Vec<PlanReport> = paths.iter().map(|p| kiln.plan(p)).collect();
    let first_new = plans[0]
        .steps
        .iter()
        .position(|s| s.stage.starts_with("fleet"))
        .expect("golden has the fleet layer");
    let shipped: BTreeSet<&str> = plans[0].steps[..first_new]
        .iter()
        .map(|s| s.stage.as_str())
        .collect();
    for plan in &plans {
        let new: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| s.stage.as_str())
            .filter(|s| !shipped.contains(s))
            .collect();
        cleanup.add(plan, &new);
    }
    run.assert_code(0);
    let report: FleetReport = run.json();
    assert!(report.jobs >= 1);

    // Each step once, and golden's steps shared by all three.
    let steps: Vec<&FleetRow> = report.steps.iter().filter(|r| is_step(&r.stage)).collect();
    let keys: Vec<&str> = steps.iter().map(|r| r.key.as_str()).collect();
    let unique: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(
        keys.len(),
        unique.len(),
        "a step key twice: {:#?}",
        report.steps
    );
    let all: BTreeSet<&str> = FLEET.into_iter().collect();
    for stage in &plans[0].steps {
        if stage.stage == "image" {
            continue;
        }
        let row = steps
            .iter()
            .find(|r| stage.key.starts_with(&r.key))
            .unwrap_or_else(|| panic!("no row for golden's {}: {:#?}", stage.stage, report.steps));
        let users: BTreeSet<&str> = row.recipes.iter().map(String::as_str).collect();
        assert!(
            row.shared && users == all,
            "{row:#?} is golden's, so all three's"
        );
    }
    for (recipe, own) in [("web", "app"), ("db", "db")] {
        let row = steps
            .iter()
            .find(|r| r.stage.starts_with(&format!("{own}/")))
            .unwrap_or_else(|| panic!("no row for {recipe}'s {own}: {:#?}", report.steps));
        assert!(!row.shared && row.recipes == [recipe], "{row:#?}");
    }
    // The new layer was built, once, for one recipe; the others' rows say
    // it was that one's.
    let fleet = steps
        .iter()
        .find(|r| r.stage.starts_with("fleet"))
        .expect("a row for the fleet layer");
    assert_eq!(fleet.status, "built", "{fleet:#?}");
    let mut owners = 0;
    for r in &report.recipes {
        let summary = r.summary.as_ref().expect("every recipe has a summary");
        let row = summary
            .rows
            .iter()
            .find(|row| row.key == fleet.key)
            .unwrap_or_else(|| panic!("{} has no fleet row", r.name));
        match &row.shared_with {
            None => {
                owners += 1;
                assert_eq!(
                    (row.status.as_str(), r.name.as_str()),
                    ("built", fleet.by.as_str())
                );
            }
            Some(by) => assert_eq!((by, row.status.as_str()), (&fleet.by, "cached")),
        }
    }
    assert_eq!(owners, 1, "the fleet layer is one recipe's work");

    // Every image booted and passed; out/ has each, as its recipe alone
    // builds it (a warm no-op build now).
    for (name, r) in FLEET.iter().zip(&report.recipes) {
        assert_eq!((r.name.as_str(), r.exit_code, &r.error), (*name, 0, &None));
        let summary = r.summary.as_ref().unwrap();
        assert!(
            summary.smoke.as_ref().is_some_and(|s| s.passed),
            "{name} did not pass its smoke: {:#?}",
            summary.smoke
        );
        assert_eq!(summary.image, kiln.out.join(format!("{name}.qcow2")));
        assert!(kiln.out.join(format!("{name}.build.log")).is_file());
        let alone = Kiln::with_store(&kiln.store)
            .build(&paths[FLEET.iter().position(|n| n == name).unwrap()], &[]);
        assert_eq!(
            alone.sha256, summary.sha256,
            "{name} alone is another image"
        );
        assert_eq!(
            summary
                .rows
                .iter()
                .filter(|row| is_step(&row.stage))
                .map(|row| &row.key)
                .collect::<Vec<_>>(),
            alone
                .rows
                .iter()
                .filter(|row| is_step(&row.stage))
                .map(|row| &row.key)
                .collect::<Vec<_>>(),
            "{name}: the same steps as alone"
        );
    }
}

/// Bad input in any recipe is exit 2 naming its file before anything is
/// built (no root or tools needed, so `make check` runs it), as are
/// options that take one recipe and two recipes making one image.
#[test]
fn quick_bad_input_in_one_recipe_of_several_builds_nothing() {
    let d = RecipeDir::new();
    let good = d.write("good.toml", recipe("kt-fleet-good", ""));
    let bad = d.write(
        "bad.toml",
        recipe("kt-fleet-bad", "").replace("size = \"2GiB\"", "size = \"two\""),
    );
    let twin = d.write("twin.toml", recipe("kt-fleet-good", ""));
    let other = d.write("other.toml", recipe("kt-fleet-other", ""));
    let work = tempfile::tempdir().unwrap();
    let (store, out) = (work.path().join("store"), work.path().join("out"));
    let kiln = Kiln::at(&store, &out);
    let build = |extra: &[&Path], flags: &[&str]| {
        let mut args: Vec<&OsStr> = vec![OsStr::new("build")];
        args.extend(flags.iter().map(OsStr::new));
        args.extend(extra.iter().map(|p| p.as_os_str()));
        let run = kiln.run(&args);
        assert!(
            !store.exists() && !out.exists(),
            "something was made:\n{}",
            run.show()
        );
        run
    };

    let run = build(&[&good, &bad], &[]);
    run.assert_bad_input(&bad, "image.size", "recipe 2 of 2");
    assert!(run.stderr.contains("nothing was built"), "{}", run.show());

    build(&[&good, &twin], &[]).assert_bad_input(&twin, "image.name", "both make the image");

    for (flags, says) in [
        (&["--check-repro"][..], "--check-repro"),
        (
            &["--update", "no-such-layer"][..],
            "none of the recipes has a layer named",
        ),
        (&["-j", "0"][..], "--jobs"),
    ] {
        let run = build(&[&good, &other], flags);
        run.assert_code(2);
        assert!(run.stderr.contains(says), "{flags:?}:\n{}", run.show());
    }
}

/// One recipe's failure does not stop the others: their images are built,
/// the summary has each recipe's exit code, and the error names the
/// recipe that failed.
#[test]
fn a_failing_recipe_does_not_stop_the_others_and_the_error_names_it() {
    require_build();
    let kiln = Kiln::shared();
    let d = RecipeDir::new();
    let n = nonce();
    let ok = d.write_recipe(
        "ok.toml",
        recipe(
            "kt-fleet-ok",
            &format!("[[layer]]\nname = \"ok\"\nrun = [\"echo {n} > /etc/kt-fleet-ok\"]\n"),
        ),
        &kiln,
    );
    let fails = d.write_recipe(
        "fails.toml",
        recipe(
            "kt-fleet-fails",
            &format!("[[layer]]\nname = \"fails\"\nrun = [\"echo {n}; exit 7\"]\n"),
        ),
        &kiln,
    );
    let mut cleanup = ForgetOnDrop::new(&kiln.store);
    let plan = kiln.plan(&ok);
    let new: Vec<&str> = plan
        .steps
        .iter()
        .map(|s| s.stage.as_str())
        .filter(|s| *s != "base")
        .collect();
    cleanup.add(&plan, &new);

    let run = kiln.run(&[
        OsStr::new("--json"),
        OsStr::new("build"),
        OsStr::new("--no-smoke"),
        fails.as_os_str(),
        ok.as_os_str(),
    ]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("kt-fleet-fails") && run.stderr.contains(&*fails.to_string_lossy()),
        "the error names the recipe that failed:\n{}",
        run.show()
    );
    let report: FleetReport = run.json();
    let codes: Vec<(&str, i32)> = report
        .recipes
        .iter()
        .map(|r| (r.name.as_str(), r.exit_code))
        .collect();
    assert_eq!(codes, [("kt-fleet-fails", 1), ("kt-fleet-ok", 0)]);
    assert!(report.recipes[0].error.is_some() && report.recipes[0].summary.is_none());
    let built = report.recipes[1].summary.as_ref().expect("ok was built");
    assert!(kiln.out.join("kt-fleet-ok.qcow2").is_file());
    assert!(!built.sha256.is_empty());
    assert!(!kiln.out.join("kt-fleet-fails.qcow2").exists());
}
