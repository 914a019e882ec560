//! One function per subcommand: load, plan, run the pipeline, report.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::build::{self, BuildOptions, Summary};
use crate::cli::{BuildArgs, Global, InspectArgs, LogArgs, PlanArgs, VerifyArgs};
use crate::error::{BadInput, Drift};
use crate::plan::{self, Freshness};
use crate::recipe;
use crate::record;
use crate::store::Store;
use crate::ui::{table, Ui};

fn store_root(global: &Global) -> PathBuf {
    global.cache.clone().unwrap_or_else(Store::default_root)
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("`kiln {what}` must run as root: it mounts overlayfs and runs apt in a chroot (try sudo)");
    }
    Ok(())
}

pub fn build(global: &Global, args: &BuildArgs) -> Result<()> {
    require_root("build")?;
    // Bad input fails here, before the store or out/ is touched.
    let recipe = recipe::load(&args.recipe)?;
    let plan = plan::make(&recipe)?;
    crate::build::mount::enter_private_namespace()?;
    let store = Store::open(&store_root(global))?;
    store.clean_stale_staging()?;
    let name = &recipe.image.name;
    std::fs::create_dir_all(&global.out).with_context(|| format!("creating {}", global.out.display()))?;
    let log_path = global.out.join(format!("{name}.build.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    crate::cmd::set_log(Some(log), global.verbose);
    crate::cmd::log_line(&format!("kiln {} building {}", env!("CARGO_PKG_VERSION"), args.recipe.display()));

    let ui = Ui::new(global.json);
    let opts = BuildOptions { refresh: args.refresh, out_dir: global.out.clone(), source_date_epoch: crate::record::DEFAULT_SOURCE_DATE_EPOCH };
    let summary = build::build(&plan, &store, &opts, &ui).map_err(|e| e.context(format!("the full log is in {}", log_path.display())))?;
    let report = global.out.join(format!("{name}.build.json"));
    crate::store::write_json_atomic(&report, &summary)?;
    if global.json {
        print_json(&summary)?;
    } else {
        print_summary(&summary);
    }
    if args.check_repro {
        let report = crate::record::repro::check(&plan, &store, &summary, &opts, &ui).map_err(|e| e.context(format!("the full log is in {}", log_path.display())))?;
        if global.json {
            print_json(&report)?;
        } else {
            print!("{}", report.text());
        }
        if !report.reproducible {
            anyhow::bail!("{} is not reproducible: {}", args.recipe.display(), report.first_difference.as_deref().unwrap_or("unknown difference"));
        }
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    let rows: Vec<Vec<String>> = s
        .rows
        .iter()
        .map(|r| vec![r.stage.clone(), r.key.clone(), r.status.clone(), format!("{:.1}", r.seconds), r.reason.clone().unwrap_or_default()])
        .collect();
    print!("{}", table(&["STAGE", "KEY", "RESULT", "SECONDS", "WHY"], &rows));
    println!("{} ({}, kernel {}) in {:.1}s", s.image.display(), &s.sha256[..12], s.kernel, s.seconds);
}

#[derive(Serialize)]
struct PlanRow {
    stage: String,
    key: String,
    #[serde(flatten)]
    freshness: Freshness,
}

#[derive(Serialize)]
struct PlanReport {
    recipe: String,
    image: String,
    steps: Vec<PlanRow>,
}

pub fn plan(global: &Global, args: &PlanArgs) -> Result<()> {
    let recipe = recipe::load(&args.recipe)?;
    let plan = plan::make(&recipe)?;
    let root = store_root(global);
    // Planning never creates a store; a missing one just means nothing is cached.
    let store = if root.is_dir() { Some(Store::open(&root)?) } else { None };
    let (steps, image) = match &store {
        Some(store) => build::freshness(&plan, store, false),
        None => (
            plan.steps.iter().map(|_| Freshness::Build(plan::Reason::NotInStore)).collect(),
            Freshness::Build(plan::Reason::NotInStore),
        ),
    };
    let mut rows: Vec<PlanRow> = plan.steps.iter().zip(steps).map(|(s, f)| PlanRow { stage: s.id(), key: s.key.hex(), freshness: f }).collect();
    rows.push(PlanRow { stage: "image".into(), key: plan.image.key.hex(), freshness: image });
    let report = PlanReport { recipe: args.recipe.display().to_string(), image: recipe.image.name.clone(), steps: rows };
    if global.json {
        return print_json(&report);
    }
    let table_rows: Vec<Vec<String>> = report
        .steps
        .iter()
        .map(|r| {
            let (state, why) = match &r.freshness {
                Freshness::Cached => ("cached".to_owned(), String::new()),
                Freshness::Build(reason) => ("build".to_owned(), reason.to_string()),
            };
            vec![r.stage.clone(), r.key[..12].to_owned(), state, why]
        })
        .collect();
    print!("{}", table(&["STAGE", "KEY", "STATE", "WHY"], &table_rows));
    Ok(())
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value).context("serialising JSON")?);
    Ok(())
}

pub fn inspect(global: &Global, args: &InspectArgs) -> Result<()> {
    let path = record::manifest::path_for(&args.image);
    let m = record::manifest::read(&path)?;
    if global.json {
        let mut value = serde_json::to_value(&m).context("serialising the manifest")?;
        // The summary leaves out the file list; the manifest itself has it.
        value["files"] = serde_json::json!(m.files.as_ref().map(Vec::len));
        return print_json(&value);
    }
    print!("{}", record::manifest::summary(&m));
    Ok(())
}

pub fn verify(global: &Global, args: &VerifyArgs) -> Result<()> {
    let report = match (&args.image, &args.root) {
        (Some(image), None) => {
            require_root("verify IMAGE")?;
            let path = record::verify::manifest_for(image, args.manifest.as_deref());
            let m = record::manifest::read(&path)?;
            record::verify::image(image, &m, &path, args.extract.as_deref())?
        }
        (None, Some(root)) => {
            let path = args.manifest.as_deref().ok_or_else(|| BadInput::arg("--root needs --manifest FILE", "pass the manifest the system was built from, e.g. --manifest out/web.manifest.json"))?;
            let m = record::manifest::read(path)?;
            record::verify::root(root, &m, path, &args.ignore)?
        }
        _ => return Err(BadInput::arg("give either an IMAGE or --root DIR", "e.g. `kiln verify out/web.qcow2` or `kiln verify --root / --manifest web.manifest.json`").into()),
    };
    if global.json {
        print_json(&report)?;
    } else {
        print!("{}", report.text());
    }
    if report.clean {
        return Ok(());
    }
    let d = &report.differences;
    Err(Drift(format!("{} modified, {} added, {} removed{}", d.modified.len(), d.added.len(), d.removed.len(), if report.disk_digest.is_some() { ", disk digest differs" } else { "" })).into())
}

pub fn log(global: &Global, args: &LogArgs) -> Result<()> {
    let root = store_root(global);
    let name = match &args.recipe {
        Some(r) if r.extension().is_some_and(|e| e == "toml") || r.is_file() => Some(recipe::load(r)?.image.name),
        Some(r) => Some(r.display().to_string()),
        None => None,
    };
    let records = if root.is_dir() { record::history::read(&Store::open(&root)?, name.as_deref())? } else { Vec::new() };
    if global.json {
        return print_json(&records);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let changes = if r.first { "first build".to_owned() } else if r.changes.is_empty() { "no package changes".to_owned() } else { record::history::show_changes(&r.changes) };
            vec![r.time.clone(), r.name.clone(), r.sudo_user.clone().unwrap_or_else(|| r.user.clone()), r.host.clone(), r.image_sha256[..12].to_owned(), changes]
        })
        .collect();
    print!("{}", table(&["TIME", "IMAGE", "USER", "HOST", "SHA256", "PACKAGES"], &rows));
    Ok(())
}
