//! One function per subcommand: load, plan, run the pipeline, report.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::build::{self, BuildOptions, Summary};
use crate::cli::{BuildArgs, CacheCommand, Global, PlanArgs};
use crate::plan::{self, Freshness};
use crate::recipe;
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
    // From here on a `kill -9` of kiln takes every process it started with it.
    crate::cmd::isolate_processes()?;
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
    let opts = BuildOptions { refresh: args.refresh, out_dir: global.out.clone() };
    let summary = build::build(&plan, &store, &opts, &ui).map_err(|e| {
        let e = if crate::store::is_disk_full(&e) {
            e.context(format!(
                "the filesystem holding the store ({}) is full; nothing was added to the store: free space (`kiln cache gc`) and build again",
                store.root().display()
            ))
        } else {
            e
        };
        e.context(format!("the full log is in {}", log_path.display()))
    })?;
    let report = global.out.join(format!("{name}.build.json"));
    crate::store::write_json_atomic(&report, &summary)?;
    if global.json {
        print_json(&summary)?;
    } else {
        print_summary(&summary);
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

/// `kiln cache ls|du|verify|gc`.
pub fn cache(global: &Global, command: &CacheCommand) -> Result<()> {
    use crate::store::gc::{self, human};
    let root = store_root(global);
    if !root.is_dir() {
        anyhow::bail!("there is no store at {} (nothing built yet, or see --cache / KILN_CACHE_DIR)", root.display());
    }
    let store = Store::open(&root)?;
    let ui = Ui::new(global.json);
    match command {
        CacheCommand::Ls => {
            let rows = gc::list(&store)?;
            if global.json {
                return print_json(&rows);
            }
            let now = crate::store::now();
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let users = r.recipes.join(",") + &if r.images.is_empty() { String::new() } else { format!(" ({} image{})", r.images.len(), if r.images.len() == 1 { "" } else { "s" }) };
                    vec![r.kind.to_owned(), r.key[..12].to_owned(), r.what.clone(), human(r.bytes), age(now.saturating_sub(r.created)), if users.is_empty() { "-".into() } else { users }]
                })
                .collect();
            print!("{}", table(&["KIND", "KEY", "WHAT", "SIZE", "AGE", "USED BY"], &table_rows));
            println!("{} entries, {} in {}", rows.len(), human(rows.iter().map(|r| r.bytes).sum()), root.display());
        }
        CacheCommand::Du => {
            let rows = gc::usage(&store)?;
            if global.json {
                return print_json(&rows);
            }
            let table_rows: Vec<Vec<String>> = rows.iter().map(|r| vec![r.section.clone(), r.entries.to_string(), human(r.bytes)]).collect();
            print!("{}", table(&["PART", "ENTRIES", "SIZE"], &table_rows));
        }
        CacheCommand::Verify(args) => {
            let _lock = crate::store::lock::lock(&store.lock_path("store"), crate::store::lock::Mode::Exclusive, "running builds to finish", || ui.note("waiting for running builds to finish…"))?;
            let rows = crate::store::verify_all(&store, if args.quick { crate::store::integrity::Depth::Meta } else { crate::store::integrity::Depth::Content })?;
            if global.json {
                print_json(&rows)?;
            } else {
                let table_rows: Vec<Vec<String>> = rows.iter().map(|r| vec![r.kind.to_owned(), r.key[..12].to_owned(), r.what.clone(), r.result.clone(), format!("{:.2}", r.seconds)]).collect();
                print!("{}", table(&["KIND", "KEY", "WHAT", "RESULT", "SECONDS"], &table_rows));
            }
            let corrupt = rows.iter().filter(|r| r.result.starts_with("corrupt")).count();
            if corrupt > 0 {
                anyhow::bail!("{corrupt} corrupt entr{} moved to {}; the next build rebuilds {}", if corrupt == 1 { "y" } else { "ies" }, root.join(crate::store::CORRUPT).display(), if corrupt == 1 { "it" } else { "them" });
            }
            if !global.json {
                println!("{} entries intact", rows.len());
            }
        }
        CacheCommand::Gc(args) => {
            let _lock = crate::store::lock::lock(&store.lock_path("store"), crate::store::lock::Mode::Exclusive, "running builds to finish", || ui.note("waiting for running builds to finish…"))?;
            let done = gc::collect(&store, args.keep, args.dry_run)?;
            if global.json {
                return print_json(&done);
            }
            let verb = if done.dry_run { "would remove" } else { "removed" };
            for r in &done.removed {
                println!("{verb} {} {} {} ({})", r.kind, &r.name[..r.name.len().min(12)], r.what, human(r.bytes));
            }
            println!(
                "kept {} image{} and {} layer{}; {} {} entr{}, {} {}",
                done.kept_images.len(),
                if done.kept_images.len() == 1 { "" } else { "s" },
                done.kept_layers,
                if done.kept_layers == 1 { "" } else { "s" },
                verb,
                done.removed.len(),
                if done.removed.len() == 1 { "y" } else { "ies" },
                if done.dry_run { "would free" } else { "freed" },
                human(done.freed)
            );
        }
    }
    Ok(())
}

fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}
