//! The build: run the plan's steps that are not in the store, assemble the
//! image if it is not in the store, and export it to `out/`.
//!
//! [`build`] reads as the list of stages; each stage has its own error
//! context and its own row in the summary.

pub mod mount;
pub mod sources;
pub mod steps;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::assemble;
use crate::cmd::check_interrupt;
use crate::plan::{self, Action, Freshness, Plan, Reason, Step};
use crate::store::{self, ImageEntry, LayerEntry, RecipeState, Store};
use crate::ui::Ui;
use steps::{ChrootWork, Ctx};

pub struct BuildOptions {
    pub refresh: bool,
    pub out_dir: PathBuf,
    /// No timestamp in the image is later than this; programs run in the
    /// image see it as SOURCE_DATE_EPOCH.
    pub source_date_epoch: u64,
}

/// One row of the summary: a step, the image, or the smoke test.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub stage: String,
    pub key: String,
    /// `cached`, `built`, `passed`, …
    pub status: String,
    pub reason: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub recipe: String,
    pub image: PathBuf,
    pub image_key: String,
    pub sha256: String,
    pub kernel: String,
    pub rows: Vec<Row>,
    pub seconds: f64,
}

/// Whether each step and the image must be built, and why.
pub fn freshness(plan: &Plan, store: &Store, refresh: bool) -> (Vec<Freshness>, Freshness) {
    let state = store.recipe_state(&plan.recipe.image.name);
    let steps = plan
        .steps
        .iter()
        .map(|s| {
            if refresh {
                Freshness::Build(Reason::Refresh)
            } else if store.has_layer(&s.key) {
                Freshness::Cached
            } else {
                Freshness::Build(plan::reason(&s.inputs, state.steps.get(&s.id())))
            }
        })
        .collect();
    let image = if refresh {
        Freshness::Build(Reason::Refresh)
    } else if store.has_image(&plan.image.key) {
        Freshness::Cached
    } else {
        Freshness::Build(plan::image_reason(&plan.image.inputs, state.image.as_ref()))
    };
    (steps, image)
}

pub fn build(plan: &Plan, store: &Store, opts: &BuildOptions, ui: &Ui) -> Result<Summary> {
    let started = Instant::now();
    let started_unix = store::now();
    steps::set_source_date_epoch(opts.source_date_epoch);
    let (fresh, image_fresh) = freshness(plan, store, opts.refresh);
    let ctx = Ctx {
        store,
        mirrors: sources::mirrors(plan.recipe.base.mirror.as_deref(), Path::new("/etc/apt")),
    };
    let mut rows = Vec::new();
    // Layer trees, topmost first, as overlayfs wants its lower dirs.
    let mut lowers: Vec<PathBuf> = Vec::new();
    for (step, fresh) in plan.steps.iter().zip(fresh) {
        check_interrupt()?;
        let row = match fresh {
            Freshness::Cached => Row { stage: step.id(), key: step.key.short(), status: "cached".into(), reason: None, seconds: 0.0 },
            Freshness::Build(reason) => {
                let stage = ui.stage(&step.id(), &format!("building ({reason})"));
                match build_step(&ctx, step, &lowers, opts.refresh) {
                    Ok(_entry) => {
                        let seconds = stage.done("built");
                        Row { stage: step.id(), key: step.key.short(), status: "built".into(), reason: Some(reason.to_string()), seconds }
                    }
                    Err(e) => {
                        stage.failed();
                        return Err(e.context(format!("building step {} of recipe {}", step.id(), plan.recipe.path.display())));
                    }
                }
            }
        };
        rows.push(row);
        lowers.insert(0, store.layer_tree(&step.key));
    }

    check_interrupt()?;
    let image_key = plan.image.key;
    let entry = match image_fresh {
        Freshness::Cached => {
            rows.push(Row { stage: "image".into(), key: image_key.short(), status: "cached".into(), reason: None, seconds: 0.0 });
            store.image_entry(&image_key)?
        }
        Freshness::Build(reason) => {
            let stage = ui.stage("image", &format!("assembling ({reason})"));
            match build_image(plan, store, &lowers, opts) {
                Ok(entry) => {
                    let seconds = stage.done("built");
                    rows.push(Row { stage: "image".into(), key: image_key.short(), status: "built".into(), reason: Some(reason.to_string()), seconds });
                    entry
                }
                Err(e) => {
                    stage.failed();
                    return Err(e.context(format!("assembling the image of {}", plan.recipe.path.display())));
                }
            }
        }
    };

    let image = export(store, &entry, &plan.recipe.image.name, &opts.out_dir)?;
    let state = RecipeState {
        steps: plan.steps.iter().map(|s| (s.id(), s.inputs.clone())).collect(),
        image: Some(plan.image.inputs.clone()),
    };
    store.save_recipe_state(&plan.recipe.image.name, &state)?;
    crate::record::write_all(&crate::record::BuildFacts {
        plan,
        store,
        image: &entry,
        exported: &image,
        out_dir: &opts.out_dir,
        lock: None,
        source_date_epoch: opts.source_date_epoch,
        started: started_unix,
    })
    .context("writing the manifest, SBOM, provenance and history")?;
    Ok(Summary {
        recipe: plan.recipe.path.display().to_string(),
        image,
        image_key: image_key.hex(),
        sha256: entry.sha256,
        kernel: entry.kernel,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Build one step into a staging dir and publish it under its key.
fn build_step(ctx: &Ctx, step: &Step, lowers: &[PathBuf], replace: bool) -> Result<LayerEntry> {
    let started = Instant::now();
    let store = ctx.store;
    // Declared before the mounts so it is dropped (removed) after them.
    let staging = store.staging()?;
    store::claim(staging.path())?;
    let tree = staging.path().join("tree");
    let (before, after) = match &step.action {
        Action::Base(spec) => {
            steps::base(ctx, spec, &tree)?;
            (Vec::new(), steps::installed(&tree)?)
        }
        action => {
            let parent = step.inputs.parent.expect("only the base has no parent");
            let before = store.layer_entry(&parent)?.packages;
            let work = staging.path().join("work");
            let merged = staging.path().join("merged");
            for d in [&tree, &work, &merged] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let mut mounts = mount::Mounts::new();
            mounts.overlay(lowers, Some((&tree, &work)), &merged)?;
            match action {
                Action::Base(_) => unreachable!("handled above"),
                Action::Files { files, origin } => steps::copy_files(&merged, files, origin, &step.layer)?,
                Action::Upgrade { suite, .. } => steps::chrooted(ctx, &merged, ChrootWork::Upgrade { suite: suite.clone() })?,
                Action::Packages(pkgs) => steps::chrooted(ctx, &merged, ChrootWork::Packages(pkgs.clone()))?,
                Action::Run(commands) => steps::chrooted(ctx, &merged, ChrootWork::Run { commands: commands.clone(), layer: step.layer.clone() })?,
            }
            let after = steps::installed(&merged)?;
            mounts.unmount_all()?;
            for d in [&work, &merged] {
                store::remove_tree(d).with_context(|| format!("removing {}", d.display()))?;
            }
            (before, after)
        }
    };
    let entry = LayerEntry {
        key: step.key,
        id: step.id(),
        inputs: step.inputs.clone(),
        changes: steps::package_changes(&before, &after),
        packages: after,
        seconds: started.elapsed().as_secs_f64(),
        created: store::now(),
    };
    store::write_json_atomic(&staging.path().join("entry.json"), &entry)?;
    std::fs::remove_file(staging.path().join(".kiln-pid")).context("removing the staging claim")?;
    store.publish(staging, &store.layer_dir(&step.key), replace)?;
    Ok(entry)
}

fn build_image(plan: &Plan, store: &Store, lowers: &[PathBuf], opts: &BuildOptions) -> Result<ImageEntry> {
    let started = Instant::now();
    let staging = store.staging()?;
    store::claim(staging.path())?;
    let assembled = assemble::assemble(&plan.image, lowers, staging.path(), &plan.recipe.path, opts.source_date_epoch)?;
    let sha256 = plan::key::file_digest(&assembled.disk).with_context(|| format!("hashing {}", assembled.disk.display()))?;
    let entry = ImageEntry {
        key: plan.image.key,
        inputs: plan.image.inputs.clone(),
        file: assembled.disk.file_name().expect("disk has a name").to_string_lossy().into_owned(),
        sha256,
        kernel: assembled.kernel,
        seconds: started.elapsed().as_secs_f64(),
        created: store::now(),
    };
    store::write_json_atomic(&staging.path().join("image.json"), &entry)?;
    std::fs::remove_file(staging.path().join(".kiln-pid")).context("removing the staging claim")?;
    store.publish(staging, &store.image_dir(&plan.image.key), opts.refresh)?;
    Ok(entry)
}

/// Copy the image to `out/NAME.EXT`, unless the copy there is already this
/// image (same size and mtime as when kiln wrote it).
fn export(store: &Store, entry: &ImageEntry, name: &str, out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ext = Path::new(&entry.file).extension().and_then(|e| e.to_str()).unwrap_or("img");
    let dest = out_dir.join(format!("{name}.{ext}"));
    let stamp_path = out_dir.join(format!(".{name}.stamp"));
    let stamp = |p: &Path| -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        use std::os::unix::fs::MetadataExt;
        Some(format!("{} {} {}.{}", entry.sha256, m.len(), m.mtime(), m.mtime_nsec()))
    };
    if stamp(&dest).is_some_and(|s| std::fs::read_to_string(&stamp_path).is_ok_and(|t| t == s)) {
        return Ok(dest);
    }
    let src = store.image_dir(&entry.key).join(&entry.file);
    let tmp = out_dir.join(format!(".{name}.{ext}.tmp"));
    crate::cmd::Cmd::new("cp").args(["--sparse=always", "--reflink=auto"]).arg(&src).arg(&tmp).run()?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    let s = stamp(&dest).context("stat of the exported image")?;
    std::fs::write(&stamp_path, s).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(dest)
}
