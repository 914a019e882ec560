//! The plan: a recipe resolved into an ordered list of steps, each with its
//! key, and the image key on top.
//!
//! A layer is split into steps (upgrade, packages, files, run), each cached
//! on its own, the way a Dockerfile's instructions are: changing a copied
//! file rebuilds only that layer's `files` step and what is above it, not the
//! layer's package installation. The layer's key is its last step's key.

pub mod freshness;
pub mod key;
pub mod sources;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::error::BadInput;
use crate::lock::{Locks, StepLock};
use crate::recipe::{BaseSpec, FileSpec, ImageSpec, Recipe};
pub use key::{FileInput, ImageInputs, Key, StepInputs, StepKind};

/// The SOURCE_DATE_EPOCH of builds until the lock file provides one: no
/// timestamp in an image is later than this (2023-11-14T22:13:20Z). An
/// input of the image key.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_700_000_000;

#[derive(Debug, Clone)]
pub struct Plan {
    pub recipe: Recipe,
    pub steps: Vec<Step>,
    pub image: ImagePlan,
    /// The archive the build uses: the recipe's mirror or the host's.
    pub mirrors: Option<crate::plan::sources::Mirrors>,
}

#[derive(Debug, Clone)]
pub struct Step {
    /// The layer this step belongs to (`base` for the base).
    pub layer: String,
    /// The recipe file that defines the layer: its lock pins this step.
    pub origin: PathBuf,
    /// The step's pins, when it installs packages and is locked.
    pub lock: Option<StepLock>,
    pub inputs: StepInputs,
    pub key: Key,
    pub action: Action,
}

impl Step {
    /// Whether this step installs packages, and so is pinned by a lock.
    pub fn is_locked_kind(&self) -> bool {
        self.inputs.kind.is_pinned()
    }

    /// A step that installs packages but has no pins yet: the build will
    /// resolve it, and its key is only known afterwards.
    pub fn unlocked(&self) -> bool {
        self.is_locked_kind() && self.lock.is_none()
    }

    /// This step with the pins its resolution gave: the key changes to the
    /// one `make` gives once the lock holds them.
    pub fn pinned(&self, pins: StepLock) -> Step {
        let inputs = StepInputs {
            lock: Some(pins.digest()),
            ..self.inputs.clone()
        };
        Step {
            key: inputs.key(),
            inputs,
            lock: Some(pins),
            ..self.clone()
        }
    }

    /// `layer/kind`, or `base`: stable across builds of one recipe.
    pub fn id(&self) -> StepId {
        StepId::new(&self.layer, self.inputs.kind)
    }
}

/// A step's name in locks, records and messages: `layer/kind` (e.g.
/// `app/packages`), or `base`. It reads as the string it is written as;
/// [`StepId::layer`] gives the layer without splitting that string again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId {
    text: String,
    layer_len: usize,
}

impl StepId {
    pub fn new(layer: &str, kind: StepKind) -> StepId {
        if kind == StepKind::Base {
            StepId {
                text: "base".to_owned(),
                layer_len: 4,
            }
        } else {
            StepId {
                text: format!("{layer}/{}", kind.as_str()),
                layer_len: layer.len(),
            }
        }
    }

    /// The layer the step belongs to (`base` for the base), as
    /// `kiln lock --update` takes it.
    pub fn layer(&self) -> &str {
        &self.text[..self.layer_len]
    }
}

impl std::ops::Deref for StepId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for StepId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<StepId> for String {
    fn from(id: StepId) -> String {
        id.text
    }
}

/// In the spec (and so the key) of a base, `upgrade` or `packages` step
/// whose recipe says `initramfs = false`: the kernels it installs or
/// upgrades get no initramfs in this step (Debian's `INITRD=No` for the
/// kernel's postinst hooks), because a later layer builds it (golden's
/// `boot` layer runs `update-initramfs -c -k all`). That saves building
/// an initramfs that a later layer replaces; an image whose kernel ends up
/// with none is refused at assembly. The step's key says it, so a layer
/// built this way is never taken for one built with its initramfs.
pub const INITRAMFS_LATER: &str = "initramfs=later";

/// Whether a step's spec defers its kernels' initramfs (see
/// [`INITRAMFS_LATER`]).
pub fn initramfs_later(spec: &[String]) -> bool {
    spec.iter().any(|s| s == INITRAMFS_LATER)
}

/// What a step does when it is not cached.
#[derive(Debug, Clone)]
pub enum Action {
    Base(BaseSpec),
    /// Add the suite's updates and security sources, then upgrade.
    Upgrade {
        suite: String,
    },
    Packages(Vec<String>),
    Files {
        files: Vec<FileSpec>,
        origin: std::path::PathBuf,
    },
    Run(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct ImagePlan {
    pub inputs: ImageInputs,
    pub key: Key,
    pub spec: ImageSpec,
}

/// Resolve a recipe into steps and keys. Reads the copied files (for their
/// digests) and the host's apt sources (the archive, unless the recipe sets
/// a mirror: its URLs are written into the image, so they are inputs).
pub fn make(recipe: &Recipe, locks: &Locks) -> Result<Plan> {
    let mut steps = Vec::new();
    // The archive the image's apt sources will name: the recipe's mirror or
    // the host's (read now, as the build will).
    let mirrors =
        crate::plan::sources::mirrors(recipe.base.mirror.as_deref(), Path::new("/etc/apt"));
    let archive: Vec<String> = match &mirrors {
        Some(m) => vec![m.main.clone(), m.security.clone()],
        None => Vec::new(),
    };
    let push = |steps: &mut Vec<Step>, layer: &str, origin: &Path, kind, spec, files, action| {
        push(
            steps, locks, &archive, layer, origin, kind, spec, files, action,
        )
    };
    let BaseSpec {
        suite,
        variant,
        packages,
        mirror: _,
        initramfs,
    } = &recipe.base;
    let mut base_spec = vec![format!("suite={suite}"), format!("variant={variant}")];
    base_spec.extend(sorted(packages).into_iter().map(|p| format!("package={p}")));
    let later = |spec: &mut Vec<String>, initramfs: bool| {
        if !initramfs {
            spec.push(INITRAMFS_LATER.to_owned());
        }
    };
    later(&mut base_spec, *initramfs);
    push(
        &mut steps,
        "base",
        &recipe.base_defined_in,
        StepKind::Base,
        base_spec,
        vec![],
        Action::Base(recipe.base.clone()),
    );

    for layer in &recipe.layers {
        if layer.upgrade {
            let action = Action::Upgrade {
                suite: suite.clone(),
            };
            let mut spec = vec![format!("suite={suite}")];
            later(&mut spec, layer.initramfs);
            push(
                &mut steps,
                &layer.name,
                &layer.defined_in,
                StepKind::Upgrade,
                spec,
                vec![],
                action,
            );
        }
        if !layer.packages.is_empty() {
            let pkgs = sorted(&layer.packages);
            let mut spec = pkgs.clone();
            later(&mut spec, layer.initramfs);
            push(
                &mut steps,
                &layer.name,
                &layer.defined_in,
                StepKind::Packages,
                spec,
                vec![],
                Action::Packages(pkgs),
            );
        }
        if !layer.files.is_empty() {
            let files = layer
                .files
                .iter()
                .map(|f| {
                    let sha256 = key::file_digest(&f.src).map_err(|e| {
                        BadInput::new(
                            &layer.defined_in,
                            format!("layer.{}.files", layer.name),
                            format!("cannot read `{}`: {e}", f.src_name),
                            "make the file readable",
                        )
                    })?;
                    Ok(FileInput {
                        src: f.src_name.clone(),
                        dest: f.dest.clone(),
                        mode: f.mode,
                        owner: f.owner.to_string(),
                        sha256,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            push(
                &mut steps,
                &layer.name,
                &layer.defined_in,
                StepKind::Files,
                vec![],
                files,
                Action::Files {
                    files: layer.files.clone(),
                    origin: layer.defined_in.clone(),
                },
            );
        }
        if !layer.run.is_empty() {
            push(
                &mut steps,
                &layer.name,
                &layer.defined_in,
                StepKind::Run,
                layer.run.clone(),
                vec![],
                Action::Run(layer.run.clone()),
            );
        }
    }

    let top = steps.last().expect("a plan always has a base step").key;
    let spec = recipe.image.clone();
    let inputs = ImageInputs {
        top,
        size: spec.size,
        format: spec.format.extension().to_owned(),
        hostname: spec.hostname.clone(),
        cmdline: spec.cmdline.clone(),
        verity: spec.verity,
        volumes: recipe
            .volumes
            .iter()
            .map(|v| {
                format!(
                    "{} {} {} {} {}",
                    v.name, v.mount, v.size, v.filesystem, v.owner
                )
            })
            .collect(),
        epoch: locks
            .source_date_epoch()
            .unwrap_or(DEFAULT_SOURCE_DATE_EPOCH),
        secure_boot: None,
    };
    let key = inputs.key();
    Ok(Plan {
        recipe: recipe.clone(),
        steps,
        image: ImagePlan { inputs, key, spec },
        mirrors,
    })
}

impl Plan {
    /// This plan with its UKI signed for Secure Boot by the key of the
    /// certificate with this fingerprint (or unsigned): the image key
    /// changes, the steps do not.
    pub fn signed_with(mut self, fingerprint: Option<&str>) -> Plan {
        self.image.inputs.secure_boot = fingerprint.map(str::to_owned);
        self.image.key = self.image.inputs.key();
        self
    }
}

#[allow(clippy::too_many_arguments)]
fn push(
    steps: &mut Vec<Step>,
    locks: &Locks,
    archive: &[String],
    layer: &str,
    origin: &Path,
    kind: StepKind,
    spec: Vec<String>,
    files: Vec<FileInput>,
    action: Action,
) {
    // Only the steps that write apt sources into the image depend on them.
    let archive: &[String] = if matches!(kind, StepKind::Base | StepKind::Upgrade) {
        archive
    } else {
        &[]
    };
    let parent = steps.last().map(|s: &Step| s.key);
    let id = if kind == StepKind::Base {
        "base".to_owned()
    } else {
        format!("{layer}/{}", kind.as_str())
    };
    let lock = if kind.is_pinned() {
        locks.get(origin, &id).filter(|l| l.spec == spec).cloned()
    } else {
        None
    };
    let inputs = StepInputs {
        parent,
        kind,
        spec,
        files,
        lock: lock.as_ref().map(StepLock::digest),
        archive: archive.to_vec(),
    };
    let key = inputs.key();
    steps.push(Step {
        layer: layer.to_owned(),
        origin: origin.to_owned(),
        lock,
        inputs,
        key,
        action,
    });
}

fn sorted(items: &[String]) -> Vec<String> {
    items
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Whether a step (or the image) must be built, and why: the answer to
/// "why did this rebuild?" (cargo's `DirtyReason`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "lowercase")]
pub enum Freshness {
    Cached,
    Build(Reason),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Never built for this recipe, and not in the store.
    NotInStore,
    /// `--refresh` was given.
    Refresh,
    /// Installs packages but has no pins yet: it will be resolved against
    /// the archive, and its key is known only then.
    Unlocked,
    SpecChanged,
    FileChanged(Vec<String>),
    LockChanged,
    ParentChanged,
    /// The image's own settings changed (size, hostname, cmdline, volumes).
    ImageSpecChanged,
    /// Signed for Secure Boot now and not before, or the other way round,
    /// or with another certificate.
    SecureBootChanged,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NotInStore => f.write_str("not in store"),
            Reason::Refresh => f.write_str("--refresh"),
            Reason::Unlocked => f.write_str("not locked: resolve against the archive"),
            Reason::SpecChanged => f.write_str("spec changed"),
            Reason::FileChanged(files) => write!(f, "file changed: {}", files.join(", ")),
            Reason::LockChanged => f.write_str("lock changed"),
            Reason::ParentChanged => f.write_str("parent changed"),
            Reason::ImageSpecChanged => f.write_str("image settings changed"),
            Reason::SecureBootChanged => f.write_str("Secure Boot signing changed"),
        }
    }
}

/// Why a step whose key is not in the store must be built, given the inputs
/// of the last build of the same step of the same recipe.
pub fn reason(current: &StepInputs, last: Option<&StepInputs>) -> Reason {
    let Some(last) = last else {
        return Reason::NotInStore;
    };
    if current.parent != last.parent {
        return Reason::ParentChanged;
    }
    if current.spec != last.spec || current.kind != last.kind || current.archive != last.archive {
        return Reason::SpecChanged;
    }
    if current.files != last.files {
        let mut changed: Vec<String> = current
            .files
            .iter()
            .filter(|f| !last.files.contains(f))
            .map(|f| f.src.clone())
            .collect();
        changed.extend(
            last.files
                .iter()
                .filter(|f| !current.files.iter().any(|c| c.src == f.src))
                .map(|f| f.src.clone()),
        );
        return Reason::FileChanged(changed);
    }
    if current.lock != last.lock {
        return Reason::LockChanged;
    }
    Reason::NotInStore
}

/// Why the image must be assembled.
pub fn image_reason(current: &ImageInputs, last: Option<&ImageInputs>) -> Reason {
    match last {
        None => Reason::NotInStore,
        Some(last) if last.top != current.top => Reason::ParentChanged,
        Some(last) if last.secure_boot != current.secure_boot => Reason::SecureBootChanged,
        Some(last) if last != current => Reason::ImageSpecChanged,
        Some(_) => Reason::NotInStore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_id_reads_as_written_and_knows_its_layer() {
        let id = StepId::new("app-server", StepKind::Packages);
        assert_eq!(&*id, "app-server/packages");
        assert_eq!(id.layer(), "app-server");
        let base = StepId::new("ignored", StepKind::Base);
        assert_eq!(base.to_string(), "base");
        assert_eq!(base.layer(), "base");
    }
}
