//! The layers (`src/layers`, not `src/build`: that name reads as generated
//! output to many tools and `.gitignore` templates, and this module holds
//! how the layers are made): pin the recipe's unlocked steps, bring every step into the
//! store, assemble the image, export it to `out/` and write its records.
//!
//! [`build`] reads as that list of stages; each has its own error context
//! and adds its rows to the summary.
//!
//! Resolution comes first because it is the only stage that changes the
//! plan: a step with no pins is resolved by building it against the archive,
//! and its key (and the keys of everything above it) is known only then. Once
//! [`resolve`] returns, every key is final and the later stages never plan
//! again.

mod clock;
pub mod mount;
mod resolve;
pub mod shared;

pub mod steps;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::assemble;
use crate::cmd::check_interrupt;
use crate::lock::{Locks, StepLock};
use crate::plan::freshness::{image_freshness, step_freshness};
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
    /// Sign the provenance with this key.
    pub signing_key: Option<crate::sign::key::SigningKey>,
    /// Sign the UKI for Secure Boot (`--secure-boot-key`, `--secure-boot-cert`).
    pub secure_boot: Option<assemble::secure_boot::Signer>,
    /// The shared cache (`--remote`): read when it has a trusted key.
    pub remote: Option<crate::remote::Remote>,
    /// Push every step of the plan that the remote lacks, signed with
    /// `signing_key` (`--push`).
    pub push: bool,
    /// In a build of several recipes: the claims that make a shared step
    /// one recipe's work, and the run's job tokens (see [`shared`]).
    pub shared: Option<std::sync::Arc<shared::Shared<plan::Key>>>,
}

/// What happened to a stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Found in the store (or, for the smoke, passed before).
    Cached,
    Built,
    /// Brought in from the remote cache, verified.
    Pulled,
    /// The smoke boot passed or failed.
    Passed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Built => "built",
            Status::Pulled => "pulled",
            Status::Passed => "passed",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the summary: a step, the image, or the smoke test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub stage: String,
    pub key: String,
    pub status: Status,
    pub reason: Option<String>,
    pub seconds: f64,
    /// What a pulled row downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// In a build of several recipes: the recipe whose build brought this
    /// step in (this recipe shares it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<String>,
}

impl Row {
    pub fn new(stage: impl Into<String>, key: &plan::Key, status: Status) -> Row {
        Row {
            stage: stage.into(),
            key: key.short(),
            status,
            reason: None,
            seconds: 0.0,
            bytes: None,
            shared_with: None,
        }
    }

    pub fn because(mut self, reason: impl ToString) -> Row {
        self.reason = Some(reason.to_string());
        self
    }

    pub fn took(mut self, seconds: f64) -> Row {
        self.seconds = seconds;
        self
    }

    /// A step another recipe of this run brought in.
    fn shared(stage: impl Into<String>, key: &plan::Key, done: shared::Done) -> Row {
        let mut row = Row::new(stage, key, Status::Cached).because(done.reason());
        row.shared_with = Some(done.by);
        row
    }

    /// A cache hit; when this run waited for another to build it, says so.
    fn cached(stage: impl Into<String>, key: &plan::Key, waited: bool) -> Row {
        let row = Row::new(stage, key, Status::Cached);
        if waited {
            row.because("built by another kiln meanwhile")
        } else {
            row
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub recipe: String,
    pub image: PathBuf,
    pub image_key: String,
    pub sha256: String,
    pub kernel: String,
    pub rows: Vec<Row>,
    pub seconds: f64,
    /// Where the log of the run that built this image is kept.
    #[serde(default)]
    pub build_log: Option<PathBuf>,
    /// The smoke boot, when it ran or was cached.
    pub smoke: Option<crate::smoke::SmokeReport>,
    /// Where the time went: seconds in each tool kiln ran (mmdebstrap,
    /// `apt-get install` in a chroot, mke2fs, …) and in its integrity
    /// checks, the longest first.
    #[serde(default)]
    pub tools: Vec<crate::cmd::ToolTime>,
}

impl Summary {
    /// The table a person reads at the end of a build.
    pub fn text(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.stage.clone(),
                    r.key.clone(),
                    r.status.to_string(),
                    format!("{:.1}", r.seconds),
                    r.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        crate::ui::table(&["STAGE", "KEY", "RESULT", "SECONDS", "WHY"], &rows) + &self.image_line()
    }

    /// `out/NAME.qcow2 (SHA256, kernel K) in S s`, when there is an image.
    pub fn image_line(&self) -> String {
        if self.sha256.is_empty() {
            return String::new();
        }
        format!(
            "{} ({}, kernel {}) in {:.1}s\n",
            self.image.display(),
            &self.sha256[..12],
            self.kernel,
            self.seconds
        )
    }
}

/// Build the recipe's steps that the store lacks, resolving unlocked steps
/// into `locks` first, then (unless `layers_only`) the image, its export and
/// its records. Returns the final plan (keys as locked) and the summary.
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
    steps::set_source_date_epoch(crate::plan::DEFAULT_SOURCE_DATE_EPOCH);
    let plan = plan::make(recipe, locks)?;
    let mut run = Run {
        // The plan read the archive the apt sources will name; the steps use it.
        ctx: Ctx {
            store,
            mirrors: plan.mirrors.clone(),
            refetch_lists: opts.fresh_resolve,
        },
        opts,
        ui,
        name: &recipe.image.name,
        state: store.recipe_state(&recipe.image.name),
        lowers: Vec::new(),
        rows: Vec::new(),
    };

    let plan = run.resolve(plan, recipe, locks)?.signed_with(
        opts.secure_boot
            .as_ref()
            .map(|s| s.key.fingerprint.as_str()),
    );
    let recipe_path = std::fs::canonicalize(&recipe.path).unwrap_or_else(|_| recipe.path.clone());
    let summary = |run: Run, image, entry: Option<&ImageEntry>, build_log| Summary {
        recipe: recipe_path.display().to_string(),
        image,
        image_key: entry.map(|e| e.key.hex()).unwrap_or_default(),
        sha256: entry.map(|e| e.sha256.clone()).unwrap_or_default(),
        kernel: entry.map(|e| e.kernel.clone()).unwrap_or_default(),
        rows: run.rows,
        seconds: started.elapsed().as_secs_f64(),
        build_log,
        smoke: None,
        tools: crate::cmd::tool_times(),
    };
    if opts.layers_only {
        return Ok((plan, summary(run, PathBuf::new(), None, None)));
    }
    // Held through the layers (an image in the store needs none of them)
    // and the export, so two runs of one recipe never write out/ at once.
    let (_image_lock, waited) = lock_key(store, &plan.image.key, "the image")?;
    let (entry, built) = run
        .image(&plan, waited)
        .with_context(|| format!("assembling the image of {}", recipe.path.display()))?;
    let image = export(store, &entry, &recipe.image.name, &opts.out_dir)?;
    // Converting to other formats is heavy work too.
    let job = run.job()?;
    let (outputs, rows) = crate::export::export_all(
        store,
        &entry,
        &recipe.image.name,
        &recipe.image.formats,
        &opts.out_dir,
        opts.refresh,
        ui,
    )?;
    drop(job);
    run.rows.extend(rows);
    let build_log = keep_build_log(store, &entry, built)?;
    run.remember(&plan)?;
    let lock_path = crate::lock::path_for(&recipe_path);
    crate::record::write_all(&crate::record::BuildFacts {
        plan: &plan,
        store,
        image: &entry,
        exported: &image,
        outputs: &outputs,
        out_dir: &opts.out_dir,
        lock: lock_path.is_file().then_some(lock_path.as_path()),
        source_date_epoch: plan.image.inputs.epoch,
        started: started_unix,
        signing_key: opts.signing_key.as_ref(),
    })
    .context("writing the manifest, SBOM, provenance and history")?;
    let summary = summary(run, image, Some(&entry), Some(build_log));
    Ok((plan, summary))
}

/// One build's progress through the stages.
struct Run<'a> {
    ctx: Ctx<'a>,
    opts: &'a BuildOptions,
    ui: &'a Ui,
    /// The recipe's image name (whose work a shared step was).
    name: &'a str,
    /// The inputs of this recipe's last build, to say why something rebuilds.
    state: RecipeState,
    /// Layer trees of the steps done so far, topmost first, as overlayfs
    /// wants its lower dirs.
    lowers: Vec<PathBuf>,
    rows: Vec<Row>,
}

type Owner<'a> = shared::Owner<'a, plan::Key>;

/// A step's locks, taken by the caller of [`Run::step`]: the store's, and
/// in a build of several recipes its claim.
struct Held<'a> {
    lock: store::lock::Lock,
    owner: Option<Owner<'a>>,
}

impl<'a> Run<'a> {
    /// In a build of several recipes, claim a step: `Ok(owner)` when it is
    /// this recipe's to do (`None` in a single build), `Err(done)` when
    /// another recipe's build did it in this run.
    fn claim(
        &self,
        key: &plan::Key,
        what: &str,
    ) -> Result<Result<Option<Owner<'a>>, shared::Done>> {
        let Some(shared) = self.opts.shared.as_deref() else {
            return Ok(Ok(None));
        };
        Ok(match shared.claim(key, what, self.name)? {
            shared::Claim::Mine(owner) => Ok(Some(owner)),
            shared::Claim::Done(done) => Err(done),
        })
    }

    /// One of the run's job tokens for heavy work (none in a single build).
    fn job(&self) -> Result<Option<shared::Job<'a, plan::Key>>> {
        self.opts.shared.as_deref().map(|s| s.job()).transpose()
    }

    /// Stage 1: pin every unlocked step. Each is built against the archive
    /// on the steps below it (which are brought into the store first), its
    /// pins go into `locks`, and the plan is made again with the keys they
    /// give. A recent resolution of the same inputs (another recipe that
    /// shares the layer) stands in for building it. Returns the final plan.
    fn resolve(&mut self, mut plan: Plan, recipe: &Recipe, locks: &mut Locks) -> Result<Plan> {
        while let Some(i) = plan.steps.iter().position(Step::unlocked) {
            let step = plan.steps[i].clone();
            for below in &plan.steps[self.rows.len()..i] {
                self.step(below, None)?;
            }
            check_interrupt()?;
            if locks.get(&step.origin, &step.id()).is_some() {
                eprintln!(
                    "{}: its pins in {} were resolved for other settings; resolving it again",
                    step.id(),
                    crate::lock::path_for(&step.origin).display()
                );
            }
            let reuse = !self.opts.fresh_resolve && !self.opts.refresh;
            let owner = match self.claim(&step.key, &step.id())? {
                Ok(owner) => owner,
                // Another recipe of this run resolved it just now.
                Err(done) => {
                    let pins = self
                        .ctx
                        .store
                        .recent_resolution(&step.key)
                        .with_context(|| {
                            format!(
                                "{}: {} but its resolution is not in the store",
                                step.id(),
                                done.reason()
                            )
                        })?;
                    locks.set(&step.origin, &step.id(), pins);
                    plan = plan::make(recipe, locks)?;
                    continue;
                }
            };
            // One run resolves a key at a time; another that needs it waits,
            // then takes its resolution.
            let (lock, _) = lock_key(self.ctx.store, &step.key, &step.id())?;
            let pins = match self
                .ctx
                .store
                .recent_resolution(&step.key)
                .filter(|_| reuse)
            {
                Some(pins) => {
                    if let Some(owner) = owner {
                        owner.finish(Status::Cached, None);
                    }
                    pins
                }
                None => self
                    .step(&step, Some(Held { lock, owner }))?
                    .expect("an unlocked step resolves"),
            };
            locks.set(&step.origin, &step.id(), pins);
            plan = plan::make(recipe, locks)?;
        }
        Ok(plan)
    }

    /// Stage 2: every step of the final plan not done yet, from the store
    /// or built from its pins.
    fn layers(&mut self, plan: &Plan) -> Result<()> {
        for step in &plan.steps[self.rows.len()..] {
            check_interrupt()?;
            self.step(step, None)?;
        }
        Ok(())
    }

    /// Bring one step into the store, add its row and its tree to the
    /// lowers. An unlocked step is built and published under the key its
    /// resolution gives; its pins are returned. `held` is the key's lock
    /// when the caller took it already.
    fn step(&mut self, step: &Step, held: Option<Held<'a>>) -> Result<Option<StepLock>> {
        let store = self.ctx.store;
        let (held, owner) = match held {
            Some(Held { lock, owner }) => (Some(lock), owner),
            None => match self.claim(&step.key, &step.id())? {
                Ok(owner) => (None, owner),
                Err(done) => {
                    self.rows.push(Row::shared(step.id(), &step.key, done));
                    self.lowers.insert(0, store.layer_tree(&step.key));
                    return Ok(None);
                }
            },
        };
        let finish = |status, also: Option<&plan::Key>| {
            if let Some(owner) = owner {
                owner.finish(status, also);
            }
        };
        // The lock also covers the integrity check and a corrupt entry's
        // repair (see store::lock).
        let (_key_lock, waited) = match held {
            Some(lock) => (lock, false),
            None => lock_key(store, &step.key, &step.id())?,
        };
        let fresh = step_freshness(step, store, self.opts.refresh, &self.state, false);
        let Some(reason) = usable(store, &step.key, &store.layer_dir(&step.key), fresh)? else {
            self.rows.push(Row::cached(step.id(), &step.key, waited));
            self.lowers.insert(0, store.layer_tree(&step.key));
            finish(Status::Cached, None);
            return Ok(None);
        };
        let _job = self.job()?;
        if !matches!(reason, Reason::Refresh | Reason::Unlocked) {
            if let Some(row) = self.pull(crate::remote::Kind::Layer, &step.id(), &step.key)? {
                self.rows.push(row);
                self.lowers.insert(0, store.layer_tree(&step.key));
                finish(Status::Pulled, None);
                return Ok(None);
            }
        }
        let stage = self.ui.stage(&step.id(), &format!("building ({reason})"));
        let built = build_step(&self.ctx, step, &self.lowers).and_then(|built| {
            let pins = built.staged.lock.clone();
            // A resolved step is published under the key of its pins.
            let step = match &pins {
                Some(pins) => {
                    store.save_resolution(&step.key, pins)?;
                    step.pinned(pins.clone())
                }
                None => step.clone(),
            };
            publish_step(store, built, &step, self.opts.refresh)?;
            Ok((step.key, pins))
        });
        let (key, pins) = match built {
            Ok(done) => done,
            Err(e) => {
                stage.failed();
                return Err(e.context(format!(
                    "building step {} of recipe {}",
                    step.id(),
                    step.origin.display()
                )));
            }
        };
        let seconds = stage.done("built");
        self.rows.push(
            Row::new(step.id(), &key, Status::Built)
                .because(reason)
                .took(seconds),
        );
        self.lowers.insert(0, store.layer_tree(&key));
        finish(Status::Built, Some(&key));
        Ok(pins)
    }

    /// A step or image missing from the store, from the remote cache when
    /// it has a verified entry for the key; `None` means build it. A
    /// refused entry is one warning line and a local build.
    fn pull(&self, kind: crate::remote::Kind, id: &str, key: &plan::Key) -> Result<Option<Row>> {
        let Some(remote) = self.opts.remote.as_ref().filter(|r| r.readable()) else {
            return Ok(None);
        };
        let refused = |e: anyhow::Error| {
            eprintln!(
                "warning: {} ({}): the entry in {} is refused: {e:#}; building it locally",
                id,
                key.short(),
                remote.reference()
            );
        };
        let found = match remote.lookup(kind, key) {
            Ok(Ok(found)) => found,
            Ok(Err(_miss)) => {
                crate::cmd::log_line(&format!(
                    "{}: {} has no entry {}",
                    id,
                    remote.reference(),
                    key.short()
                ));
                return Ok(None);
            }
            Err(e) => {
                // A lookup cut short by Ctrl-C is not a refused entry.
                check_interrupt()?;
                refused(e);
                return Ok(None);
            }
        };
        let stage = self.ui.stage(
            id,
            &format!(
                "pulling {} from {}",
                crate::store::gc::human(found.size),
                remote.reference()
            ),
        );
        match remote.pull(self.ctx.store, kind, key, &found) {
            Ok(Ok(pulled)) => {
                let seconds = stage.done("pulled");
                let mut row = Row::new(id, key, Status::Pulled)
                    .because(format!(
                        "{} from {}, signed by {}",
                        crate::store::gc::human(pulled.bytes),
                        remote.reference(),
                        pulled.signed_by
                    ))
                    .took(seconds);
                row.bytes = Some(pulled.bytes);
                Ok(Some(row))
            }
            Ok(Err(_down)) => {
                stage.failed();
                Ok(None)
            }
            Err(e) => {
                stage.failed();
                check_interrupt()?;
                refused(e);
                Ok(None)
            }
        }
    }

    /// Stage 3: the image, from the store or assembled from the lowers.
    /// Says whether this run built it.
    fn image(&mut self, plan: &Plan, waited: bool) -> Result<(ImageEntry, bool)> {
        let store = self.ctx.store;
        let key = plan.image.key;
        let fresh = image_freshness(plan, store, self.opts.refresh, &self.state);
        let Some(reason) = usable(store, &key, &store.image_dir(&key), fresh)? else {
            // Its layers are not needed, so not checked: a no-op build
            // reads the image's entry, not every file of every layer.
            for step in &plan.steps[self.rows.len()..] {
                self.rows.push(
                    Row::new(step.id(), &step.key, Status::Cached)
                        .because("not checked: its image is in the store"),
                );
            }
            self.rows.push(Row::cached("image", &key, waited));
            return Ok((store.image_entry(&key)?, false));
        };
        self.layers(plan)?;
        check_interrupt()?;
        let _job = self.job()?;
        if reason != Reason::Refresh {
            if let Some(row) = self.pull(crate::remote::Kind::Image, "image", &key)? {
                self.rows.push(row);
                return Ok((store.image_entry(&key)?, false));
            }
        }
        let stage = self.ui.stage("image", &format!("assembling ({reason})"));
        let signer = self.opts.secure_boot.as_ref();
        match build_image(plan, store, &self.lowers, self.opts.refresh, signer) {
            Ok(entry) => {
                let seconds = stage.done("built");
                self.rows.push(
                    Row::new("image", &key, Status::Built)
                        .because(reason)
                        .took(seconds),
                );
                Ok((entry, true))
            }
            Err(e) => {
                stage.failed();
                Err(e)
            }
        }
    }

    /// What this build's inputs were, so the next one can say why it
    /// rebuilds something.
    fn remember(&self, plan: &Plan) -> Result<()> {
        let name = &plan.recipe.image.name;
        let state = RecipeState {
            steps: plan
                .steps
                .iter()
                .map(|s| (s.id().into(), s.inputs.clone()))
                .collect(),
            image: Some(plan.image.inputs.clone()),
        };
        self.ctx.store.save_recipe_state(name, &state)?;
        self.ctx
            .store
            .add_root(name, &plan.recipe.path, &plan.image.key)
    }
}

/// Where the log of the run that built an image is kept: the next run of
/// the recipe (a no-op, say) writes `out/NAME.build.log` anew.
pub fn kept_log(store: &Store, image: &plan::Key) -> PathBuf {
    store
        .root()
        .join(BUILD_LOGS)
        .join(format!("{}.log", image.hex()))
}

const BUILD_LOGS: &str = "logs-v1";

/// The kept log of the run that built this image; when this run did not
/// build it, the run's own log says where that one is.
fn keep_build_log(store: &Store, entry: &ImageEntry, built: bool) -> Result<PathBuf> {
    let path = kept_log(store, &entry.key);
    if built {
        let dir = store.root().join(BUILD_LOGS);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    } else if path.is_file() {
        crate::cmd::log_line(&format!(
            "the image {} was built by an earlier run; its log is {}",
            entry.key.short(),
            path.display()
        ));
    } else {
        crate::cmd::log_line(&format!(
            "the image {} was built by an earlier run whose log was not kept",
            entry.key.short()
        ));
    }
    Ok(path)
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
    staged: Staged,
    seconds: f64,
}

/// Build one step into a staging dir: from the archive when it is
/// unlocked (and then pin what it installed), else from its pins only.
fn build_step(ctx: &Ctx, step: &Step, lowers: &[PathBuf]) -> Result<Built> {
    let started = Instant::now();
    // Declared before the mounts so it is dropped (removed) after them.
    let staging = ctx.store.staging()?;
    match stage_step(ctx, step, lowers, staging.path()) {
        Ok(staged) => Ok(Built {
            staging,
            staged,
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

/// What staging a step gave, besides its tree.
struct Staged {
    /// Every package installed once the step is applied.
    packages: Vec<store::Package>,
    changes: Vec<store::PackageChange>,
    /// The pins an unlocked step resolved to.
    lock: Option<StepLock>,
    /// The layer's epoch (see [`clock`]).
    epoch: u64,
}

fn stage_step(ctx: &Ctx, step: &Step, lowers: &[PathBuf], staging: &Path) -> Result<Staged> {
    // A resolution is dated by its start. What the step makes is dated by
    // what it was made from (see `clock`), not by this clock.
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
    let (before, below, after, debs_dir, lists) = match &step.action {
        Action::Base(spec) => {
            steps::base(ctx, spec, &step.origin, &tree, &scratch, source)?;
            (
                Vec::new(),
                0,
                steps::installed(&tree)?,
                scratch.join("debs"),
                vec![scratch.join("lists")],
            )
        }
        action => {
            let parent = step.inputs.parent.expect("only the base has no parent");
            let parent = store.layer_entry(&parent)?;
            let work = staging.join("work");
            let merged = staging.join("merged");
            for d in [&tree, &work, &merged] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let mut mounts = mount::Mounts::new();
            mounts.overlay(lowers, Some((&tree, &work)), &merged)?;
            let initramfs_later = plan::initramfs_later(&step.inputs.spec);
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
                    initramfs_later,
                )?,
                Action::Packages(pkgs) => {
                    let work = match &step.lock {
                        None => ChrootWork::Packages {
                            install: pkgs.clone(),
                            auto: Vec::new(),
                            manual: Vec::new(),
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
                            // Asked for but already installed (e.g. as a
                            // dependency of an earlier layer): nothing to
                            // pin, but apt-get install marks it as wanted
                            // for itself, and so must the locked build.
                            manual: pkgs
                                .iter()
                                .filter(|n| !pins.packages.iter().any(|p| &p.name == *n))
                                .cloned()
                                .collect(),
                            origin: step.origin.clone(),
                            layer: step.layer.clone(),
                        },
                    };
                    steps::chrooted(ctx, &merged, work, source, initramfs_later)?
                }
                Action::Run(commands) => steps::chrooted(
                    ctx,
                    &merged,
                    ChrootWork::Run {
                        commands: commands.clone(),
                        layer: step.layer.clone(),
                    },
                    source,
                    initramfs_later,
                )?,
            };
            let after = steps::installed(&merged)?;
            mounts.unmount_all()?;
            for d in [&work, &merged] {
                store::remove_tree(d).with_context(|| format!("removing {}", d.display()))?;
            }
            (
                parent.packages,
                parent.epoch,
                after,
                store.apt_archives(),
                lists,
            )
        }
    };
    let epoch = clock::date_made_files(&tree, started_unix, below)?;
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
    Ok(Staged {
        packages: after,
        changes,
        lock,
        epoch,
    })
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
        staged:
            Staged {
                packages,
                changes,
                lock: _,
                epoch,
            },
        seconds,
    } = built;
    let entry = LayerEntry {
        key: step.key,
        id: step.id().into(),
        inputs: step.inputs.clone(),
        changes,
        packages,
        epoch,
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
    signer: Option<&assemble::secure_boot::Signer>,
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
        signer,
        &store.root().join(store::UKIS),
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
        secure_boot: assembled.secure_boot,
        verity: assembled.verity,
        seconds: started.elapsed().as_secs_f64(),
        created: store::now(),
        built_by: Some(crate::record::builder()),
        uki: Some(assembled.uki),
    };
    store::write_json_atomic(&staging.path().join("image.json"), &entry)?;
    // Cheap to assemble again: not worth waiting for the disk (see store).
    store.publish_with(
        staging,
        &store.image_dir(&plan.image.key),
        replace,
        &[(Path::new(&entry.file), &entry.sha256)],
        store::Durability::Deferred,
    )?;
    Ok(entry)
}

/// Copy the image to `out/NAME.EXT`, unless the copy there is already this
/// image (same size and mtime as when kiln wrote it).
fn export(store: &Store, entry: &ImageEntry, name: &str, out_dir: &Path) -> Result<PathBuf> {
    let ext = Path::new(&entry.file)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("img");
    let dest = out_dir.join(format!("{name}.{ext}"));
    let stamp = out_dir.join(format!(".{name}.stamp"));
    let src = store.image_dir(&entry.key).join(&entry.file);
    crate::export::publish(&src, &entry.sha256, &dest, &stamp)?;
    Ok(dest)
}
