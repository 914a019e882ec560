//! The build: run the plan's steps that are not in the store, assemble the
//! image if it is not in the store, and export it to `out/`.
//!
//! [`build`] reads as the list of stages; each stage has its own error
//! context and its own row in the summary.

pub mod mount;
mod resolve;
pub mod sources;
pub mod steps;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::assemble;
use crate::cmd::check_interrupt;
use crate::lock::{Locks, StepLock};
use crate::plan::{self, Action, Freshness, Plan, Reason, Step};
use crate::recipe::Recipe;
use crate::store::{self, ImageEntry, LayerEntry, RecipeState, Store};
use crate::ui::Ui;
use steps::{ChrootWork, Ctx, Source};

pub struct BuildOptions {
    pub refresh: bool,
    pub out_dir: PathBuf,
    /// Stop once every step is locked (`kiln lock`): no image.
    pub layers_only: bool,
    /// Resolve unlocked steps against the archive even when the store has a
    /// recent resolution of the same inputs (`--update`).
    pub fresh_resolve: bool,
}

/// One row of the summary: a step, the image, or the smoke test.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    pub stage: String,
    pub key: String,
    /// `cached`, `built`, `passed`, …
    pub status: String,
    pub reason: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    pub recipe: String,
    pub image: PathBuf,
    pub image_key: String,
    pub sha256: String,
    pub kernel: String,
    pub rows: Vec<Row>,
    pub seconds: f64,
    /// The smoke boot, when it ran or was cached.
    pub smoke: Option<crate::smoke::SmokeReport>,
}

/// Whether each step and the image must be built, and why.
pub fn freshness(plan: &Plan, store: &Store, refresh: bool) -> (Vec<Freshness>, Freshness) {
    let state = store.recipe_state(&plan.recipe.image.name);
    let mut after_unlocked = false;
    let steps = plan
        .steps
        .iter()
        .map(|s| {
            let f = step_freshness(s, store, refresh, &state, after_unlocked);
            after_unlocked |= s.unlocked();
            f
        })
        .collect();
    let image = if refresh {
        Freshness::Build(Reason::Refresh)
    } else if after_unlocked {
        Freshness::Build(Reason::ParentChanged)
    } else if store.has_image(&plan.image.key) {
        Freshness::Cached
    } else {
        Freshness::Build(plan::image_reason(&plan.image.inputs, state.image.as_ref()))
    };
    (steps, image)
}

fn step_freshness(
    step: &Step,
    store: &Store,
    refresh: bool,
    state: &RecipeState,
    after_unlocked: bool,
) -> Freshness {
    if refresh {
        Freshness::Build(Reason::Refresh)
    } else if step.unlocked() {
        Freshness::Build(Reason::Unlocked)
    } else if after_unlocked {
        // This key is provisional: it depends on how the step below resolves.
        Freshness::Build(Reason::ParentChanged)
    } else if store.has_layer(&step.key) {
        Freshness::Cached
    } else {
        Freshness::Build(plan::reason(&step.inputs, state.steps.get(&step.id())))
    }
}

/// Build the recipe's steps that the store lacks, resolving unlocked steps
/// into `locks` on the way, then (unless `layers_only`) the image.
/// Returns the final plan (keys as locked) and the summary.
pub fn build(
    recipe: &Recipe,
    locks: &mut Locks,
    store: &Store,
    opts: &BuildOptions,
    ui: &Ui,
) -> Result<(Plan, Summary)> {
    let started = Instant::now();
    // Shared with other builds; `kiln cache gc` takes it exclusively.
    let _store_lock = store.lock_for_build(|| {
        eprintln!("waiting for `kiln cache gc` or `kiln cache verify` to finish…")
    })?;
    let started_unix = store::now();
    // Layers see a fixed clock (their keys do not cover one); the image is
    // clamped to its lock's time at assembly.
    steps::set_source_date_epoch(crate::record::DEFAULT_SOURCE_DATE_EPOCH);
    let state = store.recipe_state(&recipe.image.name);
    let mut plan = plan::make(recipe, locks)?;
    // The plan read the archive the apt sources will name; the steps use it.
    let ctx = Ctx {
        store,
        mirrors: plan.mirrors.clone(),
    };
    let mut rows = Vec::new();
    // Layer trees, topmost first, as overlayfs wants its lower dirs.
    let mut lowers: Vec<PathBuf> = Vec::new();
    let mut i = 0;
    while i < plan.steps.len() {
        check_interrupt()?;
        if opts.layers_only && !plan.steps[i..].iter().any(Step::unlocked) {
            break;
        }
        if plan.steps[i].unlocked() {
            let step = &plan.steps[i];
            if locks.get(&step.origin, &step.id()).is_some() {
                eprintln!(
                    "{}: the pins of {} in {} were resolved for other settings; resolving it again",
                    step.id(),
                    step.id(),
                    crate::lock::path_for(&step.origin).display()
                );
            }
        }
        if plan.steps[i].unlocked() && !opts.fresh_resolve && !opts.refresh {
            // A recent resolution of exactly these inputs stands in for the
            // lock: recipes that share layers resolve them once.
            if let Some(pins) = store.recent_resolution(&plan.steps[i].key) {
                let (origin, id) = (plan.steps[i].origin.clone(), plan.steps[i].id());
                locks.set(&origin, &id, pins);
                plan = plan::make(recipe, locks)?;
            }
        }
        let step = plan.steps[i].clone();
        // One run builds a key at a time; another that needs it waits, then
        // finds it in the store. The lock also covers the integrity check
        // and a corrupt entry's repair (see store::lock).
        let (_key_lock, waited) = lock_key(store, &step.key, &step.id())?;
        if waited
            && step.unlocked()
            && !opts.fresh_resolve
            && !opts.refresh
            && store.recent_resolution(&step.key).is_some()
        {
            // The other run resolved this step meanwhile: start the step
            // again, with its pins.
            continue;
        }
        let fresh = step_freshness(&step, store, opts.refresh, &state, false);
        let row = match usable(store, &step.key, &store.layer_dir(&step.key), fresh)? {
            None => Row {
                stage: step.id(),
                key: step.key.short(),
                status: "cached".into(),
                reason: waited.then(|| "built by another kiln meanwhile".into()),
                seconds: 0.0,
            },
            Some(reason) => {
                let stage = ui.stage(&step.id(), &format!("building ({reason})"));
                let result = build_step(&ctx, &step, &lowers).and_then(|built| {
                    let key = match &built.lock {
                        Some(pins) if step.unlocked() => {
                            store.save_resolution(&step.key, pins)?;
                            locks.set(&step.origin, &step.id(), pins.clone());
                            plan = plan::make(recipe, locks)?;
                            plan.steps[i].key
                        }
                        _ => step.key,
                    };
                    publish_step(store, built, &plan.steps[i], opts.refresh)?;
                    Ok(key)
                });
                match result {
                    Ok(key) => {
                        let seconds = stage.done("built");
                        Row {
                            stage: step.id(),
                            key: key.short(),
                            status: "built".into(),
                            reason: Some(reason.to_string()),
                            seconds,
                        }
                    }
                    Err(e) => {
                        stage.failed();
                        return Err(e.context(format!(
                            "building step {} of recipe {}",
                            step.id(),
                            recipe.path.display()
                        )));
                    }
                }
            }
        };
        rows.push(row);
        lowers.insert(0, store.layer_tree(&plan.steps[i].key));
        i += 1;
    }
    if opts.layers_only {
        let summary = Summary {
            recipe: recipe.path.display().to_string(),
            image: PathBuf::new(),
            image_key: String::new(),
            sha256: String::new(),
            kernel: String::new(),
            rows,
            seconds: started.elapsed().as_secs_f64(),
            smoke: None,
        };
        return Ok((plan, summary));
    }

    check_interrupt()?;
    let image_key = plan.image.key;
    let image_fresh = if opts.refresh {
        Freshness::Build(Reason::Refresh)
    } else if store.has_image(&image_key) {
        Freshness::Cached
    } else {
        Freshness::Build(plan::image_reason(&plan.image.inputs, state.image.as_ref()))
    };
    // Held through the export, so two runs of one recipe never write out/ at once.
    let (_image_lock, waited) = lock_key(store, &image_key, "the image")?;
    let entry = match usable(store, &image_key, &store.image_dir(&image_key), image_fresh)? {
        None => {
            rows.push(Row {
                stage: "image".into(),
                key: image_key.short(),
                status: "cached".into(),
                reason: waited.then(|| "built by another kiln meanwhile".into()),
                seconds: 0.0,
            });
            store.image_entry(&image_key)?
        }
        Some(reason) => {
            let stage = ui.stage("image", &format!("assembling ({reason})"));
            match build_image(&plan, store, &lowers, opts.refresh) {
                Ok(entry) => {
                    let seconds = stage.done("built");
                    rows.push(Row {
                        stage: "image".into(),
                        key: image_key.short(),
                        status: "built".into(),
                        reason: Some(reason.to_string()),
                        seconds,
                    });
                    entry
                }
                Err(e) => {
                    stage.failed();
                    return Err(
                        e.context(format!("assembling the image of {}", recipe.path.display()))
                    );
                }
            }
        }
    };

    let image = export(store, &entry, &recipe.image.name, &opts.out_dir)?;
    let new_state = RecipeState {
        steps: plan
            .steps
            .iter()
            .map(|s| (s.id(), s.inputs.clone()))
            .collect(),
        image: Some(plan.image.inputs.clone()),
    };
    store.save_recipe_state(&recipe.image.name, &new_state)?;
    store.add_root(&recipe.image.name, &recipe.path, &image_key)?;
    let lock_path = crate::lock::path_for(
        &std::fs::canonicalize(&recipe.path).unwrap_or_else(|_| recipe.path.clone()),
    );
    crate::record::write_all(&crate::record::BuildFacts {
        plan: &plan,
        store,
        image: &entry,
        exported: &image,
        out_dir: &opts.out_dir,
        lock: lock_path.is_file().then_some(lock_path.as_path()),
        source_date_epoch: plan.image.inputs.epoch,
        started: started_unix,
    })
    .context("writing the manifest, SBOM, provenance and history")?;
    let summary = Summary {
        recipe: std::fs::canonicalize(&recipe.path)
            .unwrap_or_else(|_| recipe.path.clone())
            .display()
            .to_string(),
        image,
        image_key: image_key.hex(),
        sha256: entry.sha256,
        kernel: entry.kernel,
        rows,
        seconds: started.elapsed().as_secs_f64(),
        smoke: None,
    };
    Ok((plan, summary))
}

/// Take the lock of a key, saying in one line if another run holds it.
/// Gives whether it had to wait.
fn lock_key(store: &Store, key: &plan::Key, what: &str) -> Result<(store::lock::Lock, bool)> {
    let mut waited = false;
    let lock = store.lock_key(key, what, || {
        waited = true;
        eprintln!(
            "{what}: another kiln is building it ({}); waiting for it",
            key.short()
        );
    })?;
    Ok((lock, waited))
}

/// With the key's lock held: `None` when the entry is in the store and
/// intact (so it is used as it is), else why it must be built. A corrupt
/// entry is moved aside here and rebuilt; an entry that another run
/// published while this one waited is used. A step that must be resolved
/// (unlocked) or refreshed is built whatever the store holds.
fn usable(store: &Store, key: &plan::Key, dir: &Path, fresh: Freshness) -> Result<Option<Reason>> {
    if let Freshness::Build(reason @ (Reason::Refresh | Reason::Unlocked)) = fresh {
        return Ok(Some(reason));
    }
    let present = dir.is_dir() && (store.has_layer(key) || store.has_image(key));
    if present && store.check_before_use(dir, |m| eprintln!("{m}"))? {
        return Ok(None);
    }
    Ok(Some(match fresh {
        Freshness::Build(reason) => reason,
        Freshness::Cached => Reason::NotInStore,
    }))
}

/// A step built in its staging dir, not yet published.
struct Built {
    staging: tempfile::TempDir,
    packages: Vec<store::Package>,
    changes: Vec<store::PackageChange>,
    /// The pins an unlocked step resolved to.
    lock: Option<StepLock>,
    seconds: f64,
}

/// Build one step into a staging dir: from the archive when it is
/// unlocked (and then pin what it installed), else from its pins only.
fn build_step(ctx: &Ctx, step: &Step, lowers: &[PathBuf]) -> Result<Built> {
    let started = Instant::now();
    // Declared before the mounts so it is dropped (removed) after them.
    let staging = ctx.store.staging()?;
    match stage_step(ctx, step, lowers, staging.path()) {
        Ok((packages, changes, lock)) => Ok(Built {
            staging,
            packages,
            changes,
            lock,
            seconds: started.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            // A killed tool can leave its own mounts inside the tree.
            if let Err(u) = store::unmount_under(staging.path()) {
                crate::cmd::log_line(&format!("warning: {u:#}"));
            }
            Err(e)
        }
    }
}

type Staged = (
    Vec<store::Package>,
    Vec<store::PackageChange>,
    Option<StepLock>,
);

fn stage_step(ctx: &Ctx, step: &Step, lowers: &[PathBuf], staging: &Path) -> Result<Staged> {
    // A resolution is dated by its start: every file this build creates is
    // then no older than the pin, so clamping to the earliest pin makes them
    // all equal in any later build.
    let started_unix = store::now();
    let store = ctx.store;
    let tree = staging.join("tree");
    let scratch = staging.join("scratch");
    let repo = scratch.join("repo");
    if let Some(pins) = &step.lock {
        let lock_path = crate::lock::path_for(&step.origin);
        let suite = &plan_suite(step);
        store.serve_locked(
            &pins.packages,
            ctx.mirrors.as_ref(),
            suite,
            &repo,
            &lock_path,
            &step.id(),
        )?;
    }
    let source = if step.lock.is_some() {
        Source::Locked(&repo)
    } else {
        Source::Archive
    };
    let (before, after, debs_dir, lists) = match &step.action {
        Action::Base(spec) => {
            steps::base(ctx, spec, &step.origin, &tree, &scratch, source)?;
            (
                Vec::new(),
                steps::installed(&tree)?,
                scratch.join("debs"),
                vec![scratch.join("lists")],
            )
        }
        action => {
            let parent = step.inputs.parent.expect("only the base has no parent");
            let before = store.layer_entry(&parent)?.packages;
            let work = staging.join("work");
            let merged = staging.join("merged");
            for d in [&tree, &work, &merged] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let mut mounts = mount::Mounts::new();
            mounts.overlay(lowers, Some((&tree, &work)), &merged)?;
            let lists = match action {
                Action::Base(_) => unreachable!("handled above"),
                Action::Files { files, origin } => {
                    steps::copy_files(&merged, files, origin, &step.layer)?;
                    Vec::new()
                }
                Action::Upgrade { suite } => steps::chrooted(
                    ctx,
                    &merged,
                    ChrootWork::Upgrade {
                        suite: suite.clone(),
                    },
                    source,
                )?,
                Action::Packages(pkgs) => {
                    let work = match &step.lock {
                        None => ChrootWork::Packages {
                            install: pkgs.clone(),
                            auto: Vec::new(),
                            origin: step.origin.clone(),
                            layer: step.layer.clone(),
                        },
                        Some(pins) => ChrootWork::Packages {
                            install: pins
                                .packages
                                .iter()
                                .map(|p| format!("{}={}", p.name, p.version))
                                .collect(),
                            auto: pins
                                .packages
                                .iter()
                                .map(|p| p.name.clone())
                                .filter(|n| !pkgs.contains(n))
                                .collect(),
                            origin: step.origin.clone(),
                            layer: step.layer.clone(),
                        },
                    };
                    steps::chrooted(ctx, &merged, work, source)?
                }
                Action::Run(commands) => steps::chrooted(
                    ctx,
                    &merged,
                    ChrootWork::Run {
                        commands: commands.clone(),
                        layer: step.layer.clone(),
                    },
                    source,
                )?,
            };
            let after = steps::installed(&merged)?;
            mounts.unmount_all()?;
            for d in [&work, &merged] {
                store::remove_tree(d).with_context(|| format!("removing {}", d.display()))?;
            }
            (before, after, store.apt_archives(), lists)
        }
    };
    let changes = steps::package_changes(&before, &after);
    let lock = match &step.lock {
        Some(pins) => {
            resolve::check(&step.id(), pins, &changes)?;
            None
        }
        None if step.is_locked_kind() => Some(resolve::pin(
            store,
            &step.inputs.spec,
            started_unix,
            &changes,
            &debs_dir,
            &lists,
        )?),
        None => None,
    };
    store::remove_tree(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok((after, changes, lock))
}

/// The suite a step's packages come from (for the local repository).
fn plan_suite(step: &Step) -> String {
    match &step.action {
        Action::Base(spec) => spec.suite.clone(),
        Action::Upgrade { suite } => suite.clone(),
        _ => "kiln-locked".to_owned(),
    }
}

/// Write a built step's entry.json and publish it under its (final) key.
fn publish_step(store: &Store, built: Built, step: &Step, replace: bool) -> Result<()> {
    let Built {
        staging,
        packages,
        changes,
        lock: _,
        seconds,
    } = built;
    let entry = LayerEntry {
        key: step.key,
        id: step.id(),
        inputs: step.inputs.clone(),
        changes,
        packages,
        seconds,
        created: store::now(),
    };
    store::write_json_atomic(&staging.path().join("entry.json"), &entry)?;
    store.publish(staging, &store.layer_dir(&step.key), replace)
}

fn build_image(
    plan: &Plan,
    store: &Store,
    lowers: &[PathBuf],
    replace: bool,
) -> Result<ImageEntry> {
    let started = Instant::now();
    let staging = store.staging()?;
    let assembled = assemble::assemble(
        &plan.image,
        &plan.recipe.volumes,
        lowers,
        staging.path(),
        &plan.recipe.path,
        plan.image.inputs.epoch,
    )?;
    let sha256 = plan::key::file_digest(&assembled.disk)
        .with_context(|| format!("hashing {}", assembled.disk.display()))?;
    let entry = ImageEntry {
        key: plan.image.key,
        inputs: plan.image.inputs.clone(),
        file: assembled
            .disk
            .file_name()
            .expect("disk has a name")
            .to_string_lossy()
            .into_owned(),
        sha256,
        kernel: assembled.kernel,
        seconds: started.elapsed().as_secs_f64(),
        created: store::now(),
    };
    store::write_json_atomic(&staging.path().join("image.json"), &entry)?;
    store.publish(staging, &store.image_dir(&plan.image.key), replace)?;
    Ok(entry)
}

/// Copy the image to `out/NAME.EXT`, unless the copy there is already this
/// image (same size and mtime as when kiln wrote it).
fn export(store: &Store, entry: &ImageEntry, name: &str, out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ext = Path::new(&entry.file)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("img");
    let dest = out_dir.join(format!("{name}.{ext}"));
    let stamp_path = out_dir.join(format!(".{name}.stamp"));
    let stamp = |p: &Path| -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        use std::os::unix::fs::MetadataExt;
        Some(format!(
            "{} {} {}.{}",
            entry.sha256,
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ))
    };
    if stamp(&dest).is_some_and(|s| std::fs::read_to_string(&stamp_path).is_ok_and(|t| t == s)) {
        return Ok(dest);
    }
    let src = store.image_dir(&entry.key).join(&entry.file);
    let tmp = out_dir.join(format!(".{name}.{ext}.tmp"));
    if let Err(e) = crate::cmd::Cmd::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(&src)
        .arg(&tmp)
        .run()
    {
        // Interrupted or out of space: leave no half copy in out/.
        if let Err(r) = std::fs::remove_file(&tmp) {
            crate::cmd::log_line(&format!("warning: removing {}: {r}", tmp.display()));
        }
        return Err(e);
    }
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    let s = stamp(&dest).context("stat of the exported image")?;
    std::fs::write(&stamp_path, s).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(dest)
}
