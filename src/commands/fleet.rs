//! `kiln build A.toml B.toml …`: several recipes in one run, as a CI job
//! rebuilds a team's fleet after a security update.
//!
//! Every recipe is validated first (bad input in any one is exit 2 before
//! anything is built); then each is built by a thread of its own, as a
//! single build would be, with its own `out/NAME.build.log`, lock files,
//! records and `out/NAME.build.json`. The threads share the run's claims and
//! job tokens ([`crate::layers::shared`]): a step two recipes share is built
//! (or pulled) once, and at most `-j N` jobs run at once. One recipe's
//! failure does not stop the others; the run's exit code is the highest of
//! theirs. The summary has one row per step, saying for which recipe it was
//! done and which others shared it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::layers::shared::Shared;

/// One recipe of the run, validated.
struct Loaded {
    path: PathBuf,
    recipe: Recipe,
    locks: Locks,
    /// `--update` applies to it (it has the layer named).
    update: bool,
}

/// What became of one recipe.
struct Outcome {
    name: String,
    path: PathBuf,
    summary: Option<Summary>,
    plan: Option<plan::Plan>,
    changes: Vec<String>,
    result: Result<()>,
}

/// The run's summary, as `--json` prints it.
#[derive(Serialize)]
struct FleetReport {
    /// Every step, image, export and smoke of the run, once each.
    steps: Vec<FleetRow>,
    /// Each recipe's own summary (as in its `out/NAME.build.json`).
    recipes: Vec<RecipeReport>,
    jobs: usize,
    seconds: f64,
}

#[derive(Serialize)]
struct RecipeReport {
    name: String,
    recipe: PathBuf,
    exit_code: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    summary: Option<Summary>,
}

/// One row of the run's summary.
#[derive(Debug, Serialize, PartialEq)]
struct FleetRow {
    stage: String,
    key: String,
    status: Status,
    reason: Option<String>,
    seconds: f64,
    /// The recipe whose build did it.
    by: String,
    /// Every recipe that uses it, `by` first.
    recipes: Vec<String>,
    /// More than one recipe uses it.
    shared: bool,
}

pub(super) fn build(global: &Global, args: &BuildArgs, paths: &[PathBuf]) -> Result<()> {
    let started = Instant::now();
    if args.check_repro {
        return Err(BadInput::arg(
            "--check-repro rebuilds one recipe into an empty store and compares; it takes one recipe",
            "run `kiln build --check-repro RECIPE` for each recipe",
        )
        .into());
    }
    let keys = build_keys(args)?;
    let loaded = load_all(paths, args.update.as_deref())?;
    let tools: Vec<&'static [crate::cmd::Tool]> = loaded
        .iter()
        .flat_map(|l| {
            build_tools(
                args,
                &l.recipe,
                keys.signer.is_some(),
                keys.remote.is_some(),
            )
        })
        .collect();
    let store = enter(global, "build", &tools)?;
    let jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    let shared = Arc::new(Shared::new(jobs));
    let opts = BuildOptions {
        refresh: args.refresh,
        out_dir: global.out.clone(),
        layers_only: false,
        fresh_resolve: args.update.is_some(),
        signing_key: keys.signing_key,
        secure_boot: keys.signer,
        remote: keys.remote,
        push: args.push,
        shared: Some(shared.clone()),
    };
    if !global.json {
        eprintln!(
            "building {} recipes, at most {jobs} job{} at once",
            loaded.len(),
            if jobs == 1 { "" } else { "s" }
        );
    }
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let threads: Vec<_> = loaded
            .into_iter()
            .map(|l| {
                let (store, opts, shared) = (&store, &opts, &*shared);
                scope.spawn(move || build_recipe(global, args, store, opts, shared, l))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let pushed = match (&opts.remote, opts.push, &opts.signing_key) {
        (Some(remote), true, Some(key)) => {
            let plans: Vec<&plan::Plan> = outcomes.iter().filter_map(|o| o.plan.as_ref()).collect();
            push_layers(remote, &store, &plans, key)
        }
        _ => Ok(()),
    };
    let report = FleetReport {
        steps: merge(
            &outcomes
                .iter()
                .filter_map(|o| Some((o.name.as_str(), o.summary.as_ref()?.rows.as_slice())))
                .collect::<Vec<_>>(),
        ),
        recipes: outcomes
            .iter()
            .map(|o| RecipeReport {
                name: o.name.clone(),
                recipe: o.path.clone(),
                exit_code: o
                    .result
                    .as_ref()
                    .map_or_else(crate::error::exit_code, |()| 0),
                error: o.result.as_ref().err().map(|e| format!("{e:#}")),
                summary: o.summary.clone(),
            })
            .collect(),
        jobs,
        seconds: started.elapsed().as_secs_f64(),
    };
    if global.json {
        print_json(&report)?;
    } else {
        print!("{}", text(&report, &outcomes, opts.signing_key.as_ref()));
    }
    pushed?;
    worst(outcomes)
}

/// Load and plan every recipe: the first bad one is the error (exit 2),
/// naming its file, and nothing is built.
fn load_all(paths: &[PathBuf], update: Option<&str>) -> Result<Vec<Loaded>> {
    let mut loaded: Vec<Loaded> = Vec::new();
    let mut has_layer = false;
    for (i, path) in paths.iter().enumerate() {
        let (recipe, locks, plan) = validate(path).with_context(|| {
            format!(
                "recipe {} of {} ({}); nothing was built",
                i + 1,
                paths.len(),
                path.display()
            )
        })?;
        let name = &recipe.image.name;
        if let Some(other) = loaded.iter().find(|l| l.recipe.image.name == *name) {
            return Err(BadInput::new(
                path,
                "image.name",
                format!(
                    "{} and {} both make the image `{name}` ({})",
                    other.path.display(),
                    path.display(),
                    Path::new("out").join(format!("{name}.qcow2")).display()
                ),
                "give each recipe its own [image] name, or build them in separate runs",
            )
            .into());
        }
        // `--update LAYER` re-resolves the layer in the recipes that have it.
        let update = match update {
            None => false,
            Some("") => true,
            Some(layer) => plan.steps.iter().any(|s| s.layer == layer),
        };
        has_layer |= update;
        loaded.push(Loaded {
            path: path.clone(),
            recipe,
            locks,
            update,
        });
    }
    if let Some(layer) = update.filter(|_| !has_layer) {
        return Err(BadInput::arg(
            format!("--update {layer}: none of the recipes has a layer named `{layer}`"),
            "name a layer of one of them (`kiln plan RECIPE` lists them)",
        )
        .into());
    }
    Ok(loaded)
}

/// One recipe's build, in its own thread: what a single `kiln build`
/// does, with the run's claims and job tokens.
fn build_recipe(
    global: &Global,
    args: &BuildArgs,
    store: &Store,
    opts: &BuildOptions,
    shared: &Shared<plan::Key>,
    l: Loaded,
) -> Outcome {
    let mut outcome = Outcome {
        name: l.recipe.image.name.clone(),
        path: l.path.clone(),
        summary: None,
        plan: None,
        changes: Vec::new(),
        result: Ok(()),
    };
    outcome.result = build_into(global, args, store, opts, shared, l, &mut outcome)
        .with_context(|| format!("building {}", outcome.path.display()));
    outcome
}

fn build_into(
    global: &Global,
    args: &BuildArgs,
    store: &Store,
    opts: &BuildOptions,
    shared: &Shared<plan::Key>,
    l: Loaded,
    outcome: &mut Outcome,
) -> Result<()> {
    let Loaded {
        path,
        recipe,
        mut locks,
        update,
    } = l;
    let (log, log_path) = open_log(global, &recipe.image.name, "build")?;
    let _log = crate::cmd::ThreadLog::start(log, global.verbose);
    log_header("build", &path);
    let forgotten = match (&args.update, update) {
        (Some(layer), true) => crate::lock::forget(&recipe, &mut locks, layer)?,
        _ => crate::lock::Forgotten::none(),
    };
    let ui = Ui::for_recipe(global.json, &recipe.image.name);
    let (plan, mut summary) = layers::build(&recipe, &mut locks, store, opts, &ui)
        .map_err(|e| build_failed(e, store, &log_path))?;
    {
        // Recipes that extend one recipe share its lock file.
        let _one_writer = shared.lock_files.lock().unwrap_or_else(|e| e.into_inner());
        for written in locks.save_changed()? {
            eprintln!("wrote {}", written.display());
        }
    }
    let smoke = if args.no_smoke {
        Ok(())
    } else {
        let _job = shared.job()?;
        smoke_stage(global, args, &recipe, store, &ui, &mut summary)
    };
    log_tool_times(&summary);
    let report = global.out.join(format!("{}.build.json", recipe.image.name));
    crate::store::write_json_atomic(&report, &summary)?;
    outcome.changes = forgotten.report(&locks, &recipe, store);
    keep_log(&summary, &log_path)?;
    outcome.summary = Some(summary);
    outcome.plan = Some(plan);
    smoke
}

/// The rows of every recipe's summary, one per stage and key, in the order
/// the recipes first use them.
fn merge(summaries: &[(&str, &[Row])]) -> Vec<FleetRow> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<(&str, &Row)>> = BTreeMap::new();
    for (recipe, rows) in summaries {
        for row in *rows {
            let id = (row.stage.clone(), row.key.clone());
            if !groups.contains_key(&id) {
                order.push(id.clone());
            }
            groups.entry(id).or_default().push((recipe, row));
        }
    }
    order
        .into_iter()
        .map(|id| {
            let group = &groups[&id];
            // The row of the recipe that did the work; the others say whose it was.
            let (by, row) = group
                .iter()
                .find(|(_, r)| r.shared_with.is_none())
                .unwrap_or(&group[0]);
            let by = row.shared_with.as_deref().unwrap_or(by).to_owned();
            let mut recipes = vec![by.clone()];
            for (recipe, _) in group {
                if !recipes.iter().any(|r| r == recipe) {
                    recipes.push((*recipe).to_owned());
                }
            }
            FleetRow {
                stage: row.stage.clone(),
                key: row.key.clone(),
                status: row.status,
                reason: row.reason.clone(),
                seconds: row.seconds,
                shared: recipes.len() > 1,
                by,
                recipes,
            }
        })
        .collect()
}

/// The table a person reads at the end, then each image and each failure.
fn text(report: &FleetReport, outcomes: &[Outcome], signing: Option<&SigningKey>) -> String {
    let mut out = String::new();
    let mut changes: Vec<&String> = Vec::new();
    for line in outcomes.iter().flat_map(|o| &o.changes) {
        if !changes.contains(&line) {
            changes.push(line);
        }
    }
    for line in changes {
        out += &format!("{line}\n");
    }
    let rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|r| {
            let mut recipes = r.by.clone();
            if r.shared {
                recipes += &format!(", shared by {}", r.recipes[1..].join(", "));
            }
            vec![
                r.stage.clone(),
                r.key.clone(),
                r.status.to_string(),
                format!("{:.1}", r.seconds),
                recipes,
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out += &table(&["STAGE", "KEY", "RESULT", "SECONDS", "FOR", "WHY"], &rows);
    for o in outcomes {
        if let Some(summary) = &o.summary {
            out += &summary.image_line();
            if let Some(key) = signing {
                out += &format!(
                    "signed by key {}: {}\n",
                    key.name,
                    record::signed::path_for(&summary.image).display()
                );
            }
        }
        if let Err(e) = &o.result {
            out += &format!(
                "{}: FAILED (exit {}): {}\n",
                o.name,
                crate::error::exit_code(e),
                first_line(&format!("{e:#}"))
            );
        }
    }
    let steps = report.steps.iter().filter(|r| is_step(r));
    let shared = steps.clone().filter(|r| r.shared).count();
    out += &format!(
        "{} recipes, {} steps ({shared} of them shared), with -j {}, in {:.1}s\n",
        outcomes.len(),
        steps.count(),
        report.jobs,
        report.seconds
    );
    out
}

/// A row of a layer step (not an image, an export or a smoke).
fn is_step(row: &FleetRow) -> bool {
    row.stage != "image" && row.stage != "smoke" && !row.stage.starts_with("export")
}

/// Ok when every recipe built (and passed); else the error with the
/// highest exit code, the others printed first.
fn worst(outcomes: Vec<Outcome>) -> Result<()> {
    let total = outcomes.len();
    let mut failed: Vec<(String, anyhow::Error)> = outcomes
        .into_iter()
        .filter_map(|o| o.result.err().map(|e| (o.name, e)))
        .collect();
    failed.sort_by_key(|(_, e)| crate::error::exit_code(e));
    let Some((name, worst)) = failed.pop() else {
        return Ok(());
    };
    for (other, e) in &failed {
        eprintln!("error: {other}: {e:#}");
    }
    Err(worst.context(format!(
        "{} of {total} recipes failed; {name}",
        failed.len() + 1
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stage: &str, key: &str, status: Status, shared_with: Option<&str>) -> Row {
        Row {
            stage: stage.into(),
            key: key.into(),
            status,
            reason: None,
            seconds: 1.0,
            bytes: None,
            shared_with: shared_with.map(str::to_owned),
        }
    }

    #[test]
    fn the_run_fails_with_the_highest_exit_code_naming_its_recipe() {
        let outcome = |name: &str, result: Result<()>| Outcome {
            name: name.into(),
            path: format!("recipes/{name}.toml").into(),
            summary: None,
            plan: None,
            changes: Vec::new(),
            result,
        };
        let smoke = crate::error::SmokeFailed {
            image: "out/web.qcow2".into(),
            failure: "check 2 failed".into(),
            log: "out/web.smoke.log".into(),
        };
        let err = worst(vec![
            outcome("golden", Ok(())),
            outcome("db", Err(anyhow::anyhow!("apt failed"))),
            outcome("web", Err(smoke.into())),
        ])
        .unwrap_err();
        assert_eq!(
            crate::error::exit_code(&err),
            crate::error::exit::SMOKE_FAILED
        );
        let text = format!("{err:#}");
        assert!(text.starts_with("2 of 3 recipes failed; web: "), "{text}");
        assert!(worst(vec![outcome("golden", Ok(()))]).is_ok());
    }

    #[test]
    fn each_step_is_one_row_naming_whose_it_was_and_who_shared_it() {
        use Status::*;
        let golden = [
            row("base", "b", Built, None),
            row("app", "g1", Built, None),
            row("image", "gi", Built, None),
        ];
        // web's thread lost the race for base, so its row says golden's.
        let web = [
            row("base", "b", Cached, Some("golden")),
            row("app", "w1", Built, None),
            row("image", "wi", Built, None),
        ];
        // db's thread won base: golden's says db's.
        let db = [
            row("base", "b", Cached, None),
            row("image", "di", Built, None),
        ];
        let merged = merge(&[("golden", &golden), ("web", &web), ("db", &db)]);
        let got: Vec<(&str, &str, &str, Vec<&str>, bool)> = merged
            .iter()
            .map(|r| {
                (
                    r.stage.as_str(),
                    r.key.as_str(),
                    r.by.as_str(),
                    r.recipes.iter().map(String::as_str).collect(),
                    r.shared,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("base", "b", "golden", vec!["golden", "web", "db"], true),
                ("app", "g1", "golden", vec!["golden"], false),
                ("image", "gi", "golden", vec!["golden"], false),
                ("app", "w1", "web", vec!["web"], false),
                ("image", "wi", "web", vec!["web"], false),
                ("image", "di", "db", vec!["db"], false),
            ]
        );
        assert_eq!(merged[0].status, Built, "the owner's row is the step's");
    }
}
