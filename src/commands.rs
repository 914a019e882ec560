//! One function per subcommand: load, plan, run the pipeline, report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::build::Row;
use crate::build::{self, BuildOptions, Summary};
use crate::cli::{
    BuildArgs, CacheCommand, DiffArgs, Global, InspectArgs, LockArgs, LogArgs, PlanArgs, SmokeArgs,
    VerifyArgs,
};
use crate::error::{BadInput, Drift, SmokeFailed};
use crate::lock::{Locks, StepLock};
use crate::plan::{self, Freshness};
use crate::recipe;
use crate::recipe::{Recipe, SmokeSpec};
use crate::record;
use crate::smoke::{SmokeOptions, SmokeReport};
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

/// Everything a building command needs before it may touch the store.
struct Prepared {
    recipe: Recipe,
    locks: Locks,
    store: Store,
    log_path: PathBuf,
}

/// Load and validate (bad input fails here, before the store or out/ is
/// touched), then enter a private mount namespace, open the store and start
/// the build log.
fn prepare(global: &Global, recipe_path: &Path, what: &str) -> Result<Prepared> {
    // Bad input is exit 2 whoever runs kiln: validate before asking for root.
    let recipe = recipe::load(recipe_path)?;
    let locks = Locks::load(&recipe.sources)?;
    plan::make(&recipe, &locks)?;
    require_root(what)?;
    // From here on a `kill -9` of kiln takes every process it started with it.
    crate::cmd::isolate_processes()?;
    crate::build::mount::enter_private_namespace()?;
    let store = Store::open(&store_root(global))?;
    store.clean_stale_staging()?;
    let name = &recipe.image.name;
    std::fs::create_dir_all(&global.out)
        .with_context(|| format!("creating {}", global.out.display()))?;
    let log_path = global.out.join(format!("{name}.{what}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    crate::cmd::set_log(Some(log), global.verbose);
    crate::cmd::log_line(&format!(
        "kiln {} {what} {}",
        env!("CARGO_PKG_VERSION"),
        recipe_path.display()
    ));
    Ok(Prepared {
        recipe,
        locks,
        store,
        log_path,
    })
}

/// Forget the pins of `layer` (every layer when empty) so the build
/// re-resolves them. Returns what was forgotten, to report changes.
fn forget_pins(
    recipe: &Recipe,
    locks: &mut Locks,
    layer: &str,
) -> Result<Vec<(PathBuf, String, Option<StepLock>)>> {
    let plan = plan::make(recipe, locks)?;
    if !layer.is_empty() && !plan.steps.iter().any(|s| s.layer == layer) {
        let names: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| s.layer.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        return Err(BadInput::arg(
            format!(
                "--update {layer}: {} has no layer named `{layer}`",
                recipe.path.display()
            ),
            format!("use one of: {}", names.join(", ")),
        )
        .into());
    }
    Ok(plan
        .steps
        .iter()
        .filter(|s| s.is_locked_kind() && (layer.is_empty() || s.layer == layer))
        .map(|s| (s.origin.clone(), s.id(), locks.remove(&s.origin, &s.id())))
        .collect())
}

/// Print `package old -> new` per re-resolved step.
fn report_pin_changes(
    forgotten: &[(PathBuf, String, Option<StepLock>)],
    locks: &Locks,
    recipe: &Recipe,
    store: &Store,
) -> Vec<String> {
    let plan = plan::make(recipe, locks).ok();
    let mut lines = Vec::new();
    for (origin, id, old) in forgotten {
        // The versions the layer below had, so an upgrade shows old -> new.
        let below: std::collections::BTreeMap<String, String> = plan
            .as_ref()
            .and_then(|p| p.steps.iter().find(|s| s.id() == *id))
            .and_then(|s| s.inputs.parent)
            .and_then(|k| store.layer_entry(&k).ok())
            .map(|e| {
                e.packages
                    .into_iter()
                    .map(|p| (p.name, p.version))
                    .collect()
            })
            .unwrap_or_default();
        let changes = crate::lock::changes_over(old.as_ref(), locks.get(origin, id), &below);
        if changes.is_empty() {
            lines.push(format!("{id}: no changes"));
        } else {
            lines.push(format!("{id}:"));
            lines.extend(changes.into_iter().map(|c| format!("  {c}")));
        }
    }
    lines
}

pub fn build(global: &Global, args: &BuildArgs) -> Result<()> {
    let Prepared {
        recipe,
        mut locks,
        store,
        log_path,
    } = prepare(global, &args.recipe, "build")?;
    let forgotten = match &args.update {
        Some(layer) => forget_pins(&recipe, &mut locks, layer)?,
        None => Vec::new(),
    };
    let ui = Ui::new(global.json);
    let opts = BuildOptions {
        refresh: args.refresh,
        out_dir: global.out.clone(),
        layers_only: false,
        fresh_resolve: args.update.is_some(),
    };
    let (_, mut summary) = build::build(&recipe, &mut locks, &store, &opts, &ui).map_err(|e| {
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
    for written in locks.save_changed()? {
        eprintln!("wrote {}", written.display());
    }
    let smoke = if args.no_smoke {
        Ok(())
    } else {
        smoke_stage(global, args, &recipe, &store, &ui, &mut summary)
    };
    let report = global.out.join(format!("{}.build.json", recipe.image.name));
    crate::store::write_json_atomic(&report, &summary)?;
    if global.json {
        print_json(&summary)?;
    } else {
        for line in report_pin_changes(&forgotten, &locks, &recipe, &store) {
            println!("{line}");
        }
        print_summary(&summary);
    }
    if args.check_repro {
        let report = crate::record::repro::check(&recipe, &locks, &summary, &store, &ui)
            .map_err(|e| e.context(format!("the full log is in {}", log_path.display())))?;
        if global.json {
            print_json(&report)?;
        } else {
            print!("{}", report.text());
        }
        if !report.reproducible {
            anyhow::bail!(
                "{} is not reproducible: {}",
                args.recipe.display(),
                report
                    .first_difference
                    .as_deref()
                    .unwrap_or("unknown difference")
            );
        }
    }
    smoke
}

/// Where a passing smoke of this image with these checks is remembered.
fn smoke_cache(store: &Store, image_key: &str, spec: &SmokeSpec) -> PathBuf {
    let http: Vec<String> = spec
        .http
        .iter()
        .map(|h| format!("{} {} {} {:?}", h.port, h.path, h.status, h.contains))
        .collect();
    let text = format!(
        "{image_key}\n{}\n{}\n{}\n{}",
        spec.timeout.as_secs(),
        spec.checks.join("\n"),
        http.join("\n"),
        spec.seed.join("\n")
    );
    store.state_dir("smoke").join(format!(
        "{}.json",
        &crate::plan::key::bytes_digest(text.as_bytes())[..32]
    ))
}

/// Boot the built image, unless this image already passed these checks.
fn smoke_stage(
    global: &Global,
    args: &BuildArgs,
    recipe: &Recipe,
    store: &Store,
    ui: &Ui,
    summary: &mut Summary,
) -> Result<()> {
    let cache = smoke_cache(store, &summary.image_key, &recipe.smoke);
    if !args.force_smoke {
        if let Ok(report) = crate::store::read_json::<SmokeReport>(&cache) {
            summary.rows.push(Row {
                stage: "smoke".into(),
                key: summary.image_key[..12].to_owned(),
                status: "cached".into(),
                reason: Some("passed before".into()),
                seconds: 0.0,
            });
            summary.smoke = Some(report);
            return Ok(());
        }
    }
    let disks = VolumeDisks::new(&recipe.volumes, None)?;
    let opts = SmokeOptions {
        accel: args.vm.accel,
        firmware: args.vm.firmware.clone(),
        state_dir: store.state_dir("host"),
        firmware_dir: store.root().join("firmware-v1"),
        log_path: global.out.join(format!("{}.smoke.log", recipe.image.name)),
        verbose: global.verbose,
        volumes: disks.volumes.clone(),
        wait_poweroff: false,
        keep_overlay: None,
    };
    let stage = ui.stage("smoke", "booting in QEMU");
    let outcome = crate::smoke::run(&summary.image, &seed_then_checks(&recipe.smoke), &opts);
    match outcome {
        Ok(Ok(report)) => {
            let seconds = stage.done("passed");
            let why = format!(
                "{} ready in {:.1}s, {}/{} checks",
                report.accel, report.boot_secs, report.checks_passed, report.checks_total
            );
            summary.rows.push(Row {
                stage: "smoke".into(),
                key: summary.image_key[..12].to_owned(),
                status: "passed".into(),
                reason: Some(why),
                seconds,
            });
            crate::store::write_json_atomic(&cache, &report)?;
            summary.smoke = Some(report);
            Ok(())
        }
        Ok(Err(failure)) => {
            let seconds = stage.failed();
            summary.rows.push(Row {
                stage: "smoke".into(),
                key: summary.image_key[..12].to_owned(),
                status: "failed".into(),
                reason: Some(first_line(&failure.to_string())),
                seconds,
            });
            Err(SmokeFailed {
                image: summary.image.display().to_string(),
                failure: failure.to_string(),
                log: opts.log_path.display().to_string(),
            }
            .into())
        }
        Err(e) => {
            stage.failed();
            Err(e.context("running the smoke boot"))
        }
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_owned()
}

/// A plain smoke writes the seed data and reads it back in one boot.
fn seed_then_checks(spec: &SmokeSpec) -> SmokeSpec {
    SmokeSpec {
        checks: spec.seed.iter().chain(&spec.checks).cloned().collect(),
        ..spec.clone()
    }
}

/// Blank disks for a recipe's data volumes: in a temp dir removed on
/// drop, or kept (and reused when already there) in a given dir.
struct VolumeDisks {
    volumes: Vec<crate::smoke::Volume>,
    _tmp: Option<tempfile::TempDir>,
}

impl VolumeDisks {
    fn new(specs: &[crate::recipe::VolumeSpec], keep: Option<&Path>) -> Result<VolumeDisks> {
        if specs.is_empty() {
            return Ok(VolumeDisks {
                volumes: Vec::new(),
                _tmp: None,
            });
        }
        let (dir, tmp) = match keep {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                (dir.to_owned(), None)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("kiln-volumes-")
                    .tempdir()
                    .context("creating a temp dir for volume disks")?;
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let mut volumes = Vec::new();
        for v in specs {
            let path = dir.join(format!("{}.qcow2", v.name));
            if !path.exists() {
                crate::cmd::Cmd::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(v.size.to_string())
                    .run()?;
            }
            volumes.push(crate::smoke::Volume {
                path,
                serial: crate::assemble::volume_serial(v),
            });
        }
        Ok(VolumeDisks { volumes, _tmp: tmp })
    }
}

/// `kiln smoke IMAGE`: always boots (no cache), with the checks of the
/// recipe the image was built from, plus any given on the command line.
pub fn smoke(global: &Global, args: &SmokeArgs) -> Result<()> {
    // As root, QEMU runs in kiln's own pid namespace: not even a `kill -9`
    // of kiln leaves it running.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        crate::cmd::isolate_processes()?;
    }
    for image in std::iter::once(&args.image).chain(args.upgrade_from.as_ref()) {
        if !image.is_file() {
            return Err(BadInput::arg(
                format!("image {} does not exist", image.display()),
                "build it first with `kiln build`, or give the path of a .qcow2 or .raw disk",
            )
            .into());
        }
    }
    let stem = args
        .image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = args.image.parent().unwrap_or(Path::new("."));
    let recipe_path = match &args.recipe {
        Some(r) => Some(r.clone()),
        None => crate::store::read_json::<Summary>(&dir.join(format!("{stem}.build.json")))
            .ok()
            .map(|s| PathBuf::from(s.recipe))
            .filter(|p| p.is_file()),
    };
    let recipe = recipe_path.as_deref().map(recipe::load).transpose()?;
    let mut spec = match &recipe {
        Some(r) => r.smoke.clone(),
        None => SmokeSpec {
            timeout: std::time::Duration::from_secs(180),
            checks: vec![],
            http: vec![],
            seed: vec![],
        },
    };
    spec.checks.extend(args.checks.iter().cloned());
    for h in &args.http {
        spec.http.push(parse_http_arg(h)?);
    }
    if let Some(t) = args.timeout {
        spec.timeout = std::time::Duration::from_secs(t);
    }
    let volume_specs = match (&recipe, args.no_volumes) {
        (Some(r), false) => r.volumes.clone(),
        _ => Vec::new(),
    };
    let disks = VolumeDisks::new(&volume_specs, args.keep_volumes.as_deref())?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| store_root(global).join("state-v1/host"));
    let log_path = args
        .log
        .clone()
        .unwrap_or_else(|| dir.join(format!("{stem}.smoke.log")));
    let opts = SmokeOptions {
        accel: args.vm.accel,
        firmware: args.vm.firmware.clone(),
        state_dir,
        firmware_dir: store_root(global).join("firmware-v1"),
        log_path: log_path.clone(),
        verbose: global.verbose,
        volumes: disks.volumes.clone(),
        wait_poweroff: false,
        keep_overlay: None,
    };
    let ui = Ui::new(global.json);

    if let Some(old) = &args.upgrade_from {
        if spec.seed.is_empty() {
            return Err(BadInput::arg(
                format!("--upgrade-from needs seed commands, and {} has no [smoke] seed", recipe_path.as_deref().unwrap_or(Path::new("the image's recipe")).display()),
                "add seed = [\"...\"] to the recipe's [smoke]: commands that write the data the checks then look for",
            )
            .into());
        }
        let seed_spec = SmokeSpec {
            timeout: spec.timeout,
            checks: spec.seed.clone(),
            http: Vec::new(),
            seed: Vec::new(),
        };
        let seed_opts = SmokeOptions {
            log_path: log_path.with_extension("seed.log"),
            wait_poweroff: true,
            ..opts.clone()
        };
        let stage = ui.stage(
            "smoke (old)",
            &format!("booting {} and seeding its volumes", old.display()),
        );
        match crate::smoke::run(old, &seed_spec, &seed_opts) {
            Ok(Ok(_)) => {
                stage.done("seeded, shut down cleanly");
            }
            Ok(Err(failure)) => {
                stage.failed();
                return Err(SmokeFailed {
                    image: old.display().to_string(),
                    failure: format!("boot 1 of 2 (the old image), seeding: {failure}"),
                    log: seed_opts.log_path.display().to_string(),
                }
                .into());
            }
            Err(e) => {
                stage.failed();
                return Err(e);
            }
        }
    }

    let what = if args.upgrade_from.is_some() {
        "boot 2 of 2 (the new image, on the old image's volumes), checks: "
    } else {
        ""
    };
    let spec = if args.upgrade_from.is_some() {
        spec
    } else {
        seed_then_checks(&spec)
    };
    let opts = SmokeOptions {
        keep_overlay: args.keep_overlay.clone(),
        ..opts
    };
    let stage = ui.stage("smoke", &format!("booting {}", args.image.display()));
    match crate::smoke::run(&args.image, &spec, &opts) {
        Ok(Ok(report)) => {
            stage.done("passed");
            if global.json {
                print_json(&report)
            } else {
                println!(
                    "{} passed: {} ready in {:.1}s, {}/{} checks, {:.1}s in all; firmware {}; console in {}",
                    args.image.display(),
                    report.accel,
                    report.boot_secs,
                    report.checks_passed,
                    report.checks_total,
                    report.total_secs,
                    report.firmware,
                    report.log.display()
                );
                if let Some(note) = &report.note {
                    println!("note: {note}");
                }
                Ok(())
            }
        }
        Ok(Err(failure)) => {
            stage.failed();
            Err(SmokeFailed {
                image: args.image.display().to_string(),
                failure: format!("{what}{failure}"),
                log: opts.log_path.display().to_string(),
            }
            .into())
        }
        Err(e) => {
            stage.failed();
            Err(e)
        }
    }
}

/// `PORT:PATH:STATUS[:CONTAINS]`.
fn parse_http_arg(h: &str) -> Result<crate::recipe::HttpCheck> {
    let bad = || {
        BadInput::arg(
            format!("--http {h} is not PORT:PATH:STATUS[:CONTAINS]"),
            "write e.g. --http 80:/:200:hello",
        )
    };
    let mut parts = h.splitn(4, ':');
    let port = parts
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let path = parts
        .next()
        .filter(|p| p.starts_with('/'))
        .ok_or_else(bad)?
        .to_owned();
    let status = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let contains = parts.next().map(str::to_owned);
    Ok(crate::recipe::HttpCheck {
        port,
        path,
        status,
        contains,
    })
}

#[derive(Serialize)]
struct LockReport {
    recipe: String,
    written: Vec<PathBuf>,
    changes: Vec<String>,
    /// Steps (and `image`) the next `kiln build` will build.
    next_build: Vec<String>,
}

pub fn lock(global: &Global, args: &LockArgs) -> Result<()> {
    let Prepared {
        recipe,
        mut locks,
        store,
        log_path,
    } = prepare(global, &args.recipe, "lock")?;
    let forgotten = match &args.update {
        Some(layer) => forget_pins(&recipe, &mut locks, layer)?,
        None => Vec::new(),
    };
    let ui = Ui::new(global.json);
    let opts = BuildOptions {
        refresh: false,
        out_dir: global.out.clone(),
        layers_only: true,
        fresh_resolve: args.update.is_some(),
    };
    build::build(&recipe, &mut locks, &store, &opts, &ui)
        .map_err(|e| e.context(format!("the full log is in {}", log_path.display())))?;
    let written = locks.save_changed()?;
    let plan = plan::make(&recipe, &locks)?;
    let (steps, image) = build::freshness(&plan, &store, false);
    let mut next_build: Vec<String> = plan
        .steps
        .iter()
        .zip(&steps)
        .filter(|(_, f)| **f != Freshness::Cached)
        .map(|(s, _)| s.id())
        .collect();
    if image != Freshness::Cached {
        next_build.push("image".into());
    }
    let report = LockReport {
        recipe: args.recipe.display().to_string(),
        written,
        changes: report_pin_changes(&forgotten, &locks, &recipe, &store),
        next_build,
    };
    if global.json {
        return print_json(&report);
    }
    for line in &report.changes {
        println!("{line}");
    }
    match report.written.as_slice() {
        [] => println!("lock files unchanged"),
        files => files.iter().for_each(|f| println!("wrote {}", f.display())),
    }
    if report.next_build.is_empty() {
        println!("the next build is all cache hits");
    } else {
        println!(
            "the next build will build: {}",
            report.next_build.join(", ")
        );
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    let rows: Vec<Vec<String>> = s
        .rows
        .iter()
        .map(|r| {
            vec![
                r.stage.clone(),
                r.key.clone(),
                r.status.clone(),
                format!("{:.1}", r.seconds),
                r.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["STAGE", "KEY", "RESULT", "SECONDS", "WHY"], &rows)
    );
    println!(
        "{} ({}, kernel {}) in {:.1}s",
        s.image.display(),
        &s.sha256[..12],
        s.kernel,
        s.seconds
    );
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
    let locks = Locks::load(&recipe.sources)?;
    let plan = plan::make(&recipe, &locks)?;
    let root = store_root(global);
    // Planning never creates a store; a missing one just means nothing is cached.
    let store = if root.is_dir() {
        Some(Store::open(&root)?)
    } else {
        None
    };
    let (steps, image) = match &store {
        Some(store) => build::freshness(&plan, store, false),
        None => (
            plan.steps
                .iter()
                .map(|_| Freshness::Build(plan::Reason::NotInStore))
                .collect(),
            Freshness::Build(plan::Reason::NotInStore),
        ),
    };
    let mut rows: Vec<PlanRow> = plan
        .steps
        .iter()
        .zip(steps)
        .map(|(s, f)| PlanRow {
            stage: s.id(),
            key: s.key.hex(),
            freshness: f,
        })
        .collect();
    rows.push(PlanRow {
        stage: "image".into(),
        key: plan.image.key.hex(),
        freshness: image,
    });
    let report = PlanReport {
        recipe: args.recipe.display().to_string(),
        image: recipe.image.name.clone(),
        steps: rows,
    };
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
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("serialising JSON")?
    );
    Ok(())
}

/// `kiln cache ls|du|verify|gc`.
pub fn cache(global: &Global, command: &CacheCommand) -> Result<()> {
    use crate::store::gc::{self, human};
    let root = store_root(global);
    if !root.is_dir() {
        anyhow::bail!(
            "there is no store at {} (nothing built yet, or see --cache / KILN_CACHE_DIR)",
            root.display()
        );
    }
    let store = Store::open(&root)?;
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
                    let users = r.recipes.join(",")
                        + &if r.images.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " ({} image{})",
                                r.images.len(),
                                if r.images.len() == 1 { "" } else { "s" }
                            )
                        };
                    vec![
                        r.kind.to_owned(),
                        r.key[..12].to_owned(),
                        r.what.clone(),
                        human(r.bytes),
                        age(now.saturating_sub(r.created)),
                        if users.is_empty() { "-".into() } else { users },
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["KIND", "KEY", "WHAT", "SIZE", "AGE", "USED BY"],
                    &table_rows
                )
            );
            println!(
                "{} entries, {} in {}",
                rows.len(),
                human(rows.iter().map(|r| r.bytes).sum()),
                root.display()
            );
        }
        CacheCommand::Du => {
            let rows = gc::usage(&store)?;
            if global.json {
                return print_json(&rows);
            }
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.section.clone(), r.entries.to_string(), human(r.bytes)])
                .collect();
            print!("{}", table(&["PART", "ENTRIES", "SIZE"], &table_rows));
        }
        CacheCommand::Verify(args) => {
            let _lock = crate::store::lock::lock(
                &store.lock_path("store"),
                crate::store::lock::Mode::Exclusive,
                "running builds to finish",
                || eprintln!("waiting for running builds to finish…"),
            )?;
            let rows = crate::store::verify_all(
                &store,
                if args.quick {
                    crate::store::integrity::Depth::Meta
                } else {
                    crate::store::integrity::Depth::Content
                },
            )?;
            if global.json {
                print_json(&rows)?;
            } else {
                let table_rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.kind.to_owned(),
                            r.key[..12].to_owned(),
                            r.what.clone(),
                            r.result.clone(),
                            format!("{:.2}", r.seconds),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["KIND", "KEY", "WHAT", "RESULT", "SECONDS"], &table_rows)
                );
            }
            let corrupt = rows
                .iter()
                .filter(|r| r.result.starts_with("corrupt"))
                .count();
            if corrupt > 0 {
                anyhow::bail!(
                    "{corrupt} corrupt entr{} moved to {}; the next build rebuilds {}",
                    if corrupt == 1 { "y" } else { "ies" },
                    root.join(crate::store::CORRUPT).display(),
                    if corrupt == 1 { "it" } else { "them" }
                );
            }
            if !global.json {
                println!("{} entries intact", rows.len());
            }
        }
        CacheCommand::Gc(args) => {
            let _lock = crate::store::lock::lock(
                &store.lock_path("store"),
                crate::store::lock::Mode::Exclusive,
                "running builds to finish",
                || eprintln!("waiting for running builds to finish…"),
            )?;
            let done = gc::collect(&store, args.keep, args.dry_run)?;
            if global.json {
                return print_json(&done);
            }
            let verb = if done.dry_run {
                "would remove"
            } else {
                "removed"
            };
            for r in &done.removed {
                println!(
                    "{verb} {} {} {} ({})",
                    r.kind,
                    &r.name[..r.name.len().min(12)],
                    r.what,
                    human(r.bytes)
                );
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
    Err(Drift(format!(
        "{} modified, {} added, {} removed{}",
        d.modified.len(),
        d.added.len(),
        d.removed.len(),
        if report.disk_digest.is_some() {
            ", disk digest differs"
        } else {
            ""
        }
    ))
    .into())
}

pub fn log(global: &Global, args: &LogArgs) -> Result<()> {
    let root = store_root(global);
    let name = match &args.recipe {
        Some(r) if r.extension().is_some_and(|e| e == "toml") || r.is_file() => {
            Some(recipe::load(r)?.image.name)
        }
        Some(r) => Some(r.display().to_string()),
        None => None,
    };
    let records = if root.is_dir() {
        record::history::read(&Store::open(&root)?, name.as_deref())?
    } else {
        Vec::new()
    };
    if global.json {
        return print_json(&records);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let changes = if r.first {
                "first build".to_owned()
            } else if r.changes.is_empty() {
                "no package changes".to_owned()
            } else {
                record::history::show_changes(&r.changes)
            };
            vec![
                r.time.clone(),
                r.name.clone(),
                r.sudo_user.clone().unwrap_or_else(|| r.user.clone()),
                r.host.clone(),
                r.image_sha256[..12].to_owned(),
                changes,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["TIME", "IMAGE", "USER", "HOST", "SHA256", "PACKAGES"],
            &rows
        )
    );
    Ok(())
}

/// `kiln diff A B`, from the two images' manifests.
pub fn diff(global: &Global, args: &DiffArgs) -> Result<()> {
    let read = |p: &Path| {
        let path = record::manifest::path_for(p);
        if !path.is_file() {
            return Err(anyhow::Error::from(BadInput::arg(
                format!("{} has no manifest ({} does not exist)", p.display(), path.display()),
                "give an image kiln built (out/NAME.qcow2, its manifest beside it) or a manifest file",
            )));
        }
        record::manifest::read(&path)
    };
    let (a, b) = (read(&args.a)?, read(&args.b)?);
    let d = record::diff::diff(&a, &b);
    if global.json {
        return print_json(&d);
    }
    print!("{}", record::diff::text(&d));
    Ok(())
}
