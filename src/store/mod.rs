//! The store: built layers and images, keyed by their inputs.
//!
//! ```text
//! <root>/                         /var/cache/kiln as root, or $KILN_CACHE_DIR, or --cache
//! ├── layers-v1/<key>/            one published step (see plan::key)
//! │   ├── tree/                   base: the whole root; other steps: the overlayfs
//! │   │                           upper dir, i.e. only what the step changed
//! │   └── entry.json              inputs, packages after the step, what changed
//! ├── images-v1/<key>/
//! │   ├── disk.qcow2 | disk.raw
//! │   ├── image.json
//! │   ├── boot-id                 the machine's boot it was published in
//! │   └── synced                  once it is known to be on the disk
//! ├── debs-v1/<sha256>.deb       every pinned .deb, by content (see debs.rs)
//! ├── apt-v1/archives/            .deb files apt downloaded (bind-mounted into steps)
//! ├── apt-v1/lists/<sources>/     apt's package lists, per set of apt sources
//! ├── state-v1/recipes/<name>.json  the inputs of each recipe's last build, for "why"
//! ├── state-v1/resolved/<key>.json  recent resolutions of unlocked steps
//! ├── state-v1/smoke/             passing smoke results, per image key + smoke spec
//! ├── state-v1/host/              host facts, such as the KVM probe verdict
//! ├── state-v1/roots/<name>.json  every image each recipe built, newest last:
//! │                               the roots `kiln cache gc` keeps
//! ├── locks/                      flock files: per key, per recipe, the store (see lock)
//! ├── uki-v1/<key>.efi            unsigned UKIs by what goes into them (kernel,
//! │                               initrd, os-release, command line, stub, clock),
//! │                               with <key>.sha256: assembly reuses one
//! ├── corrupt-v1/<key>-<time>/    entries that failed their integrity check
//! ├── store-format.json           the store's format: every entry is sealed
//! └── tmp/                        staging: entries are built here, then renamed;
//!                                 also the TMPDIR of every tool kiln runs
//! ```
//!
//! An entry is built in `tmp/` and becomes visible with one `rename(2)` into
//! `layers-v1/` or `images-v1/`, after its content has been sealed (see
//! [`integrity`]) and synced, and only once its stage succeeded. A
//! half-built entry is therefore never seen; whatever a killed run leaves in
//! `tmp/` is removed by the next run.
//!
//! An assembled image is the exception to "synced": it is published
//! without waiting for the disk ([`Durability::Deferred`]), because it is
//! cheap to assemble again and writing ~300 MB through to a slow disk was
//! most of a new image's time. Its `boot-id` says in which boot of the
//! machine it was published. Within that boot the page cache is what every
//! reader sees, so the usual check before use holds; a crash ends the
//! boot, so an entry from an earlier boot without `synced` is checked to
//! its content (every byte hashed against the seal) before its first use,
//! then marked `synced`: read back in a later boot, it came from the disk
//! (or, damaged, it is moved aside and rebuilt).
//!
//! A staging dir is claimed by its run with an flock on `.kiln-pid` inside
//! it, held until the process exits: a dir whose claim nobody holds belongs
//! to a dead run (a `kill -9` drops the flock with the process), so
//! [`Store::clean_stale_staging`] removes it without guessing from pids.
//!
//! `store-format.json` says that every entry in the store was sealed when
//! it was published, so an entry without a valid seal is damage (see
//! [`integrity`]). A store without it was written before kiln sealed
//! entries: [`Store::open`] migrates it once, under the store lock, sealing
//! each unsealed entry as it is and saying so on stderr, then writes the
//! marker. An empty store gets the marker at once.

pub mod debs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plan::{ImageInputs, Key, StepInputs};

pub mod gc;
pub mod integrity;
pub mod lock;

pub const LAYERS: &str = "layers-v1";
/// How long a resolution of an unlocked step is reused for another recipe
/// (or a deleted lock) with the same inputs, instead of asking the archive
/// again. `kiln lock --update` always asks.
pub const RESOLUTION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
pub const IMAGES: &str = "images-v1";
/// Built UKIs, by the key of what goes into them (see `assemble`).
pub const UKIS: &str = "uki-v1";
pub const CORRUPT: &str = "corrupt-v1";
pub const LOCKS: &str = "locks";
/// The store-format marker (see the module doc).
pub const FORMAT_FILE: &str = "store-format.json";
/// The claim file in a staging dir (see [`claim`]).
pub const CLAIM: &str = ".kiln-pid";
/// A staging dir younger than this without a claim may be one that another
/// run has just created and is about to claim: left alone.
const UNCLAIMED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

pub use crate::files::{copy_atomic, write_json_atomic};
pub use crate::packages::PackageChange;

pub struct Store {
    root: PathBuf,
    /// This boot of the machine (`/proc/sys/kernel/random/boot_id`), when
    /// the kernel says; without it every entry is published synced.
    boot: Option<String>,
}

/// In an entry published without waiting for the disk: the boot it was
/// published in (sealed with it).
pub const BOOT_ID: &str = "boot-id";
/// Beside such an entry's sealed files, once it is known to be on the disk.
const SYNCED: &str = "synced";

/// Whether [`Store::publish_with`] waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before it is visible: every entry but an assembled image.
    Synced,
    /// Visible at once, checked to its content before its first use in a
    /// later boot of the machine (see the module doc): for an entry that
    /// is cheap to make again.
    Deferred,
}

/// One installed package, as dpkg reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub arch: String,
    #[serde(default)]
    pub source: String,
}

/// `entry.json` of a layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerEntry {
    pub key: Key,
    pub id: String,
    pub inputs: StepInputs,
    /// Every package installed once this step is applied.
    pub packages: Vec<Package>,
    /// What this step changed.
    pub changes: Vec<PackageChange>,
    /// The newest time in this layer and those below it: every path the
    /// step made or changed is dated so (see `layers::clock`). 0 in an
    /// entry of a kiln before that (kiln-layer-v2 keys, never used now).
    #[serde(default)]
    pub epoch: u64,
    pub seconds: f64,
    pub created: u64,
}

/// `image.json` of an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageEntry {
    pub key: Key,
    pub inputs: ImageInputs,
    pub file: String,
    pub sha256: String,
    pub kernel: String,
    /// How the UKI was signed for Secure Boot; absent when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<crate::assemble::secure_boot::SignedUki>,
    /// The root's dm-verity facts; absent for an image that is not sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<crate::assemble::verity::Verity>,
    pub seconds: f64,
    pub created: u64,
    /// Who assembled it, where: with `created`, the manifest's `built`,
    /// the same for every later run that finds the image cached. `None`
    /// in an entry made before kiln recorded it.
    #[serde(default)]
    pub built_by: Option<BuiltBy>,
    /// The key of its unsigned UKI in `uki-v1/` (see `assemble`), which
    /// `kiln cache gc` keeps while the image is kept. `None` in an entry
    /// made before kiln cached UKIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uki: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltBy {
    pub user: String,
    pub sudo_user: Option<String>,
    pub host: String,
}

/// `store-format.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StoreFormat {
    /// Every entry was sealed when published (or by the one migration).
    sealed_entries: bool,
    seal_version: u32,
    /// When the marker was written, and how many entries that sealed.
    migrated: u64,
    migrated_entries: u64,
}

/// The inputs of a recipe's last build, per step id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecipeState {
    pub steps: BTreeMap<String, StepInputs>,
    pub image: Option<ImageInputs>,
}

impl Store {
    /// The store kiln uses when neither `--cache` nor `KILN_CACHE_DIR` says.
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("KILN_CACHE_DIR") {
            return PathBuf::from(dir);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return PathBuf::from("/var/cache/kiln");
        }
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        cache.join("kiln")
    }

    pub fn open(root: &Path) -> Result<Store> {
        for sub in [
            LAYERS,
            IMAGES,
            "tmp",
            "apt-v1/archives/partial",
            "apt-v1/lists",
            "state-v1/recipes",
            "state-v1/smoke",
            "state-v1/host",
            "state-v1/roots",
            UKIS,
            LOCKS,
            CORRUPT,
        ] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the store directory {}", dir.display()))?;
        }
        let store = Store {
            root: root.to_owned(),
            boot: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty()),
        };
        if !root.join(FORMAT_FILE).is_file() {
            store.migrate_to_sealed()?;
        }
        Ok(store)
    }

    /// Seal the entries of a store written before kiln sealed entries, once
    /// (see the module doc), then mark the store as sealed.
    fn migrate_to_sealed(&self) -> Result<()> {
        let _lock = lock::lock(
            &self.lock_path("store"),
            lock::Mode::Exclusive,
            "running builds to finish before the store is migrated",
            || eprintln!("waiting for running builds to finish, to migrate the store…"),
        )?;
        let marker = self.root.join(FORMAT_FILE);
        if marker.is_file() {
            return Ok(());
        }
        let mut sealed = 0;
        for section in [LAYERS, IMAGES] {
            for key in self.keys(section)? {
                let dir = self.root.join(section).join(key.hex());
                match integrity::read_seal(&dir) {
                    integrity::SealState::Missing => {
                        eprintln!(
                            "migrating the store: sealing {} (published before kiln sealed entries)",
                            dir.display()
                        );
                        integrity::seal(&dir)
                            .with_context(|| format!("sealing {}", dir.display()))?;
                        sealed += 1;
                    }
                    // Never written by a kiln before seals: damage, which
                    // the check before use moves aside.
                    integrity::SealState::Invalid(_) | integrity::SealState::Valid(_) => {}
                }
            }
        }
        if sealed > 0 {
            eprintln!(
                "migrating the store: sealed {sealed} entr{}; from now on an entry without a valid seal is corrupt",
                if sealed == 1 { "y" } else { "ies" }
            );
        }
        write_json_atomic(
            &marker,
            &StoreFormat {
                sealed_entries: true,
                seal_version: integrity::VERSION,
                migrated: now(),
                migrated_entries: sealed,
            },
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layer_dir(&self, key: &Key) -> PathBuf {
        self.root.join(LAYERS).join(key.hex())
    }

    /// The directory holding a layer's files (the base tree or an upper dir).
    pub fn layer_tree(&self, key: &Key) -> PathBuf {
        self.layer_dir(key).join("tree")
    }

    pub fn has_layer(&self, key: &Key) -> bool {
        self.layer_dir(key).join("entry.json").is_file()
    }

    pub fn layer_entry(&self, key: &Key) -> Result<LayerEntry> {
        read_json(&self.layer_dir(key).join("entry.json"))
    }

    pub fn image_dir(&self, key: &Key) -> PathBuf {
        self.root.join(IMAGES).join(key.hex())
    }

    pub fn image_entry(&self, key: &Key) -> Result<ImageEntry> {
        read_json(&self.image_dir(key).join("image.json"))
    }

    pub fn has_image(&self, key: &Key) -> bool {
        self.image_dir(key).join("image.json").is_file()
    }

    pub fn apt_archives(&self) -> PathBuf {
        self.root.join("apt-v1/archives")
    }

    pub fn apt_lists(&self, sources_digest: &str) -> Result<PathBuf> {
        let dir = self
            .root
            .join("apt-v1/lists")
            .join(sources_digest)
            .join("partial");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(self.root.join("apt-v1/lists").join(sources_digest))
    }

    pub fn state_dir(&self, sub: &str) -> PathBuf {
        self.root.join("state-v1").join(sub)
    }

    /// A fresh staging directory on the store's filesystem, claimed by this
    /// process, removed when dropped unless published.
    pub fn staging(&self) -> Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(self.root.join("tmp"))
            .with_context(|| {
                format!(
                    "creating a staging directory in {}",
                    self.root.join("tmp").display()
                )
            })?;
        claim(dir.path())?;
        Ok(dir)
    }

    /// Remove a staging dir that was only scratch space, and drop its claim
    /// (a run may make hundreds).
    pub fn remove_staging(&self, staging: tempfile::TempDir) -> Result<()> {
        let path = staging.keep();
        release_claim(&path);
        remove_tree(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// Make a staged entry visible under `dest` with one rename, after
    /// sealing it (see [`integrity`]) and syncing it to disk. If another
    /// build published the same key first, theirs is kept (same key, same
    /// content) and ours is dropped, unless `replace` (`--refresh`) moves the
    /// old one aside first.
    pub fn publish(&self, staged: tempfile::TempDir, dest: &Path, replace: bool) -> Result<()> {
        self.publish_with(staged, dest, replace, &[], Durability::Synced)
    }

    /// [`Store::publish`], with the sha256 of files in the staging dir that
    /// the caller has just computed (see [`integrity::seal_with`]), and
    /// whether to wait for the disk.
    pub fn publish_with(
        &self,
        staged: tempfile::TempDir,
        dest: &Path,
        replace: bool,
        known: &[(&Path, &str)],
        durability: Durability,
    ) -> Result<()> {
        let unsynced_in = match (durability, &self.boot) {
            (Durability::Deferred, Some(boot)) => Some(boot),
            // Without a boot id a later boot could not be told: synced.
            _ => None,
        };
        if let Some(boot) = unsynced_in {
            let path = staged.path().join(BOOT_ID);
            std::fs::write(&path, format!("{boot}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        crate::cmd::timed("seal (integrity)", || {
            integrity::seal_with(staged.path(), known)
        })
        .with_context(|| format!("sealing {}", staged.path().display()))?;
        if unsynced_in.is_none() {
            sync_filesystem(staged.path())?;
        }
        if replace && dest.exists() {
            let aside = self.staging()?.keep();
            let old = aside.join("old");
            std::fs::rename(dest, &old)
                .with_context(|| format!("moving {} aside", dest.display()))?;
            remove_tree(&aside).with_context(|| format!("removing {}", aside.display()))?;
        }
        let path = staged.keep();
        match std::fs::rename(&path, dest) {
            Ok(()) => {
                // The claim was for the staging dir; the entry needs none.
                match std::fs::remove_file(dest.join(CLAIM)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(e).with_context(|| format!("removing {}", dest.join(CLAIM).display()))
                    }
                    _ => Ok(()),
                }
            }
            Err(e) if dest.exists() => remove_tree(&path).with_context(|| {
                format!(
                    "removing the duplicate staging dir {} ({e})",
                    path.display()
                )
            }),
            Err(e) => {
                // The publish error is the one to report; the staging dir is
                // debris that the next run's clean-up also removes.
                if let Err(cleanup) = remove_tree(&path) {
                    crate::cmd::log_line(&format!(
                        "warning: removing {}: {cleanup}",
                        path.display()
                    ));
                }
                Err(anyhow::Error::new(e).context(format!(
                    "publishing {} as {}",
                    path.display(),
                    dest.display()
                )))
            }
        }
    }

    /// Remove what a dead run left in `tmp/`. Safe because every run
    /// holds its staging dirs' claims only while it is alive, and mounts
    /// and child processes live in kiln's own namespaces (gone with it).
    pub fn clean_stale_staging(&self) -> Result<()> {
        remove_stale(&self.root.join("tmp"), "")
    }

    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join(LOCKS).join(format!("{name}.lock"))
    }

    /// Held by every build for its whole run, so that `kiln cache gc` never
    /// removes a layer a running build is about to use or has just made.
    pub fn lock_for_build(&self, waiting: impl FnOnce()) -> Result<lock::Lock> {
        lock::lock(
            &self.lock_path("store"),
            lock::Mode::Shared,
            "`kiln cache gc` or `kiln cache verify` to finish",
            waiting,
        )
    }

    /// Held while one run builds (or checks and repairs) the entry `key`.
    pub fn lock_key(&self, key: &Key, what: &str, waiting: impl FnOnce()) -> Result<lock::Lock> {
        lock::lock(
            &self.lock_path(&key.hex()),
            lock::Mode::Exclusive,
            &format!("another kiln building {what}"),
            waiting,
        )
    }

    /// Check a cached entry's metadata against its seal before it is used
    /// (see [`integrity`]). An intact entry gives `true`. A corrupt one is
    /// moved to `corrupt-v1/`, logged, and gives `false`: the caller
    /// rebuilds it; so is one without a valid seal (the store was migrated
    /// when opened). The caller holds the entry's key lock.
    pub fn check_before_use(&self, dir: &Path, report: impl FnOnce(&str)) -> Result<bool> {
        let unsynced = self.unsynced_from_an_earlier_boot(dir);
        let depth = if unsynced {
            integrity::Depth::Content
        } else {
            integrity::Depth::Meta
        };
        match crate::cmd::timed("check before use (integrity)", || {
            integrity::check(dir, depth)
        })? {
            integrity::Verdict::Intact => {
                if unsynced {
                    // Read back in a later boot, so from the disk: it is
                    // there (nothing to sync).
                    crate::files::write_atomic(&dir.join(SYNCED), b"")?;
                }
                Ok(true)
            }
            integrity::Verdict::Corrupt(why) => {
                let aside = self.quarantine(dir)?;
                report(&format!(
                    "{} is corrupt ({why}): moved to {}; rebuilding it",
                    dir.display(),
                    aside.display()
                ));
                Ok(false)
            }
        }
    }

    /// Whether `dir` was published without waiting for the disk in another
    /// boot than this one, and not synced since: what a crash may have
    /// left half-written with its metadata intact.
    fn unsynced_from_an_earlier_boot(&self, dir: &Path) -> bool {
        match std::fs::read_to_string(dir.join(BOOT_ID)) {
            // A synced entry (published synced, or checked since).
            Err(_) => false,
            Ok(_) if dir.join(SYNCED).exists() => false,
            Ok(boot) => self.boot.as_deref() != Some(boot.trim()),
        }
    }

    /// Move a corrupt entry out of the way (kept for inspection until
    /// `kiln cache gc`), so its key is free to be rebuilt.
    pub fn quarantine(&self, dir: &Path) -> Result<PathBuf> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let aside_dir = self.root.join(CORRUPT);
        std::fs::create_dir_all(&aside_dir)
            .with_context(|| format!("creating {}", aside_dir.display()))?;
        let mut aside = aside_dir.join(format!("{name}-{}", now()));
        let mut n = 1;
        while aside.exists() {
            aside = aside_dir.join(format!("{name}-{}.{n}", now()));
            n += 1;
        }
        std::fs::rename(dir, &aside).with_context(|| {
            format!(
                "moving the corrupt entry {} to {}",
                dir.display(),
                aside.display()
            )
        })?;
        crate::cmd::log_line(&format!(
            "moved corrupt entry {} to {}",
            dir.display(),
            aside.display()
        ));
        Ok(aside)
    }

    /// The pins an unlocked step with this (provisional) key resolved to,
    /// if that happened within [`RESOLUTION_MAX_AGE`].
    pub fn recent_resolution(&self, key: &Key) -> Option<crate::lock::StepLock> {
        let pins: crate::lock::StepLock = read_json(
            &self
                .state_dir("resolved")
                .join(format!("{}.json", key.hex())),
        )
        .ok()?;
        (now().saturating_sub(pins.resolved) < RESOLUTION_MAX_AGE.as_secs()).then_some(pins)
    }

    pub fn save_resolution(&self, key: &Key, pins: &crate::lock::StepLock) -> Result<()> {
        write_json_atomic(
            &self
                .state_dir("resolved")
                .join(format!("{}.json", key.hex())),
            pins,
        )
    }

    pub fn recipe_state(&self, name: &str) -> RecipeState {
        read_json(&self.state_dir("recipes").join(format!("{name}.json"))).unwrap_or_default()
    }

    pub fn save_recipe_state(&self, name: &str, state: &RecipeState) -> Result<()> {
        write_json_atomic(
            &self.state_dir("recipes").join(format!("{name}.json")),
            state,
        )
    }
}

/// The two kinds of cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Layer,
    Image,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Layer => "layer",
            EntryKind::Image => "image",
        }
    }
}

/// One row of `kiln cache verify`.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub kind: EntryKind,
    pub key: String,
    pub what: String,
    /// False when the entry did not match its seal and was moved aside.
    pub intact: bool,
    /// `intact` or `corrupt: …; moved to …`, for people.
    pub result: String,
    pub seconds: f64,
}

/// Re-hash every layer and image to `depth` against its seal;
/// move corrupt ones aside. The caller holds the store lock exclusively.
pub fn verify_all(store: &Store, depth: integrity::Depth) -> Result<Vec<Verified>> {
    let mut rows = Vec::new();
    for (kind, section) in [(EntryKind::Layer, LAYERS), (EntryKind::Image, IMAGES)] {
        for key in store.keys(section)? {
            let dir = store.root.join(section).join(key.hex());
            let what = match kind {
                EntryKind::Layer => store.layer_entry(&key).map(|e| e.id).unwrap_or_default(),
                EntryKind::Image => store.image_entry(&key).map(|e| e.file).unwrap_or_default(),
            };
            let started = std::time::Instant::now();
            let (intact, result) = match integrity::check(&dir, depth)? {
                integrity::Verdict::Intact => (true, "intact".to_owned()),
                integrity::Verdict::Corrupt(why) => {
                    let aside = store.quarantine(&dir)?;
                    (
                        false,
                        format!("corrupt: {why}; moved to {}", aside.display()),
                    )
                }
            };
            rows.push(Verified {
                kind,
                key: key.hex(),
                what,
                intact,
                result,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
    }
    Ok(rows)
}

/// Remove the staging dirs in `dir` whose names start with `prefix` and
/// that belong to no live run (see [`is_stale`]): the store's `tmp/`, or
/// the `.kiln-pull-*` dirs `kiln pull` stages in `--out`.
pub fn remove_stale(dir: &Path, prefix: &str) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(prefix) && is_stale(&path) {
            remove_tree(&path)
                .with_context(|| format!("removing stale staging dir {}", path.display()))?;
        }
    }
    Ok(())
}

/// A staging dir belongs to a live run while some process holds the flock
/// on its claim file; anything else is debris (after a short grace for a
/// dir so new that its run has not claimed it yet).
fn is_stale(path: &Path) -> bool {
    let claim = path.join(CLAIM);
    if claim.exists() {
        return !lock::is_held(&claim, lock::Mode::Exclusive);
    }
    let age = std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    age.is_none_or(|age| age > UNCLAIMED_GRACE)
}

/// Claims held by this process: the open descriptors keep the flocks, and
/// the kernel drops them when the process exits, however it exits.
static CLAIMS: std::sync::Mutex<Vec<lock::Lock>> = std::sync::Mutex::new(Vec::new());

/// Mark a staging dir as owned by this process, for as long as it lives
/// (see [`is_stale`]). [`Store::staging`] already does; claiming twice is
/// harmless. The file also names the pid, for people.
pub fn claim(staging: &Path) -> Result<()> {
    let path = staging.join(CLAIM);
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    if claims.iter().any(|l| l.path() == path) {
        return Ok(());
    }
    let held = lock::try_lock(&path, lock::Mode::Exclusive)?.with_context(|| {
        format!(
            "{} is already claimed by another process",
            staging.display()
        )
    })?;
    std::fs::write(&path, std::process::id().to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    claims.push(held);
    Ok(())
}

/// Drop this process's claim on a staging dir that is about to be removed
/// (a tool's temp dir), so the claims do not pile up over a long run. The
/// claim file goes first, while its flock is still held: an unclaimed dir
/// whose claim file is left reads as a dead run's (see [`is_stale`]), which
/// another run's clean-up would remove under this one's feet; without it,
/// the dir is one just touched, inside the grace.
pub fn release_claim(staging: &Path) {
    let path = staging.join(CLAIM);
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    // At most one: `claim` does not claim twice.
    let Some(at) = claims.iter().position(|l| l.path() == path) else {
        return;
    };
    // Gone already is fine; a file that cannot be removed is left to the
    // next clean-up, as a killed run's is.
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            crate::cmd::log_line(&format!("warning: removing {}: {e}", path.display()));
        }
    }
    // Dropping the lock releases the flock, after the file is gone.
    claims.swap_remove(at);
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Detach every mount at or below `dir` in this process's mount namespace,
/// deepest first: what a killed tool (mmdebstrap mounts /proc, /sys and
/// /dev pieces inside the tree it builds) can leave inside a staging dir,
/// which must never be deleted through.
pub fn unmount_under(dir: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mut targets: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|t| PathBuf::from(unescape_mountinfo(t)))
        .filter(|t| t.starts_with(&dir))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    for target in targets {
        crate::cmd::log_line(&format!("$ umount --lazy {}", target.display()));
        let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
            .context("a mount point with a NUL byte")?;
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let err = std::io::Error::last_os_error();
            // Already gone with its parent mount.
            if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOENT)
            {
                return Err(err).with_context(|| format!("unmounting {}", target.display()));
            }
        }
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an error is the disk filling up, however it was reported (an
/// `io::Error` of ours, or a tool's message in its output).
pub fn is_disk_full(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|e| {
            e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
        }) || c.to_string().contains("No space left on device")
            || c.to_string().contains("Disk quota exceeded")
    })
}

/// Flush everything on the filesystem holding `path` (one syncfs instead of
/// an fsync per file of a tree with tens of thousands of files).
fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on a valid open fd.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncing {}", path.display()));
    }
    Ok(())
}

/// Remove a tree that may contain read-only directories.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(root: &Path, byte: u8) -> PathBuf {
        let dir = root.join(LAYERS).join(format!("{byte:02x}").repeat(32));
        std::fs::create_dir_all(dir.join("tree/etc")).unwrap();
        std::fs::write(dir.join("tree/etc/motd"), "hello\n").unwrap();
        std::fs::write(dir.join("entry.json"), "{}").unwrap();
        dir
    }

    #[test]
    fn stale_staging_dirs_with_the_prefix_go_and_claimed_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mkdir = |name: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::fs::write(path.join("blob"), b"partial").unwrap();
            path
        };
        let dead = mkdir(".kiln-pull-dead");
        // A claim file nobody holds: what a kill -9 leaves.
        std::fs::write(dead.join(CLAIM), b"1").unwrap();
        let live = mkdir(".kiln-pull-live");
        claim(&live).unwrap();
        let other = mkdir("web-data");
        std::fs::write(other.join(CLAIM), b"1").unwrap();
        remove_stale(dir.path(), ".kiln-pull-").unwrap();
        assert!(!dead.exists(), "a dead run's staging dir stayed");
        assert!(live.join("blob").is_file(), "a live run's staging dir went");
        assert!(other.exists(), "a dir without the prefix went");
        release_claim(&live);
    }

    #[test]
    fn a_store_from_before_seals_is_migrated_once_then_unsealed_is_corrupt() {
        let root = tempfile::tempdir().unwrap();
        let old = layer(root.path(), 1);
        let store = Store::open(root.path()).unwrap();
        assert!(root.path().join(FORMAT_FILE).is_file());
        assert!(matches!(
            integrity::read_seal(&old),
            integrity::SealState::Valid(_)
        ));
        assert!(store.check_before_use(&old, |_| {}).unwrap());

        // Migrated: the seal going missing is damage, not an old entry.
        std::fs::remove_file(old.join(integrity::FILE)).unwrap();
        let store = Store::open(root.path()).unwrap();
        let mut said = String::new();
        assert!(!store
            .check_before_use(&old, |m| said = m.to_owned())
            .unwrap());
        assert!(said.contains("integrity.json is missing"), "{said}");
        assert!(!old.exists());
        assert_eq!(
            std::fs::read_dir(root.path().join(CORRUPT))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn a_new_store_is_marked_at_once_and_never_seals_what_appears_later() {
        let root = tempfile::tempdir().unwrap();
        Store::open(root.path()).unwrap();
        assert!(root.path().join(FORMAT_FILE).is_file());
        let planted = layer(root.path(), 2);
        let store = Store::open(root.path()).unwrap();
        assert!(!store.check_before_use(&planted, |_| {}).unwrap());
        assert!(!planted.exists());
    }

    #[test]
    fn the_migration_leaves_a_damaged_seal_for_the_check_to_catch() {
        let root = tempfile::tempdir().unwrap();
        let entry = layer(root.path(), 3);
        std::fs::write(entry.join(integrity::FILE), "not json").unwrap();
        let store = Store::open(root.path()).unwrap();
        assert!(!store.check_before_use(&entry, |_| {}).unwrap());
    }

    #[test]
    fn an_image_published_unsynced_is_checked_to_its_content_once_in_a_later_boot() {
        let root = tempfile::tempdir().unwrap();
        let mut store = Store::open(root.path()).unwrap();
        store.boot = Some("boot-one".into());
        let publish = |store: &Store, byte: u8| {
            let staged = store.staging().unwrap();
            std::fs::write(staged.path().join("disk.qcow2"), [byte; 4096]).unwrap();
            std::fs::write(staged.path().join("image.json"), "{}").unwrap();
            let dest = root
                .path()
                .join(IMAGES)
                .join(format!("{byte:02x}").repeat(32));
            store
                .publish_with(staged, &dest, false, &[], Durability::Deferred)
                .unwrap();
            dest
        };
        let flip = |entry: &Path| {
            // The same size: only reading the bytes tells.
            std::fs::write(entry.join("disk.qcow2"), [0xffu8; 4096]).unwrap();
        };

        // In the boot it was published in, the usual check (metadata).
        let same_boot = publish(&store, 1);
        assert_eq!(
            std::fs::read_to_string(same_boot.join(BOOT_ID)).unwrap(),
            "boot-one\n"
        );
        flip(&same_boot);
        assert!(store.check_before_use(&same_boot, |_| {}).unwrap());
        assert!(!same_boot.join(SYNCED).exists());

        let intact = publish(&store, 2);
        let damaged = publish(&store, 3);
        flip(&damaged);
        // A later boot (the machine rebooted, or crashed): each is read
        // whole once.
        store.boot = Some("boot-two".into());
        let mut said = String::new();
        assert!(!store
            .check_before_use(&damaged, |m| said = m.to_owned())
            .unwrap());
        assert!(said.contains("is corrupt"), "{said}");
        assert!(!damaged.exists(), "the damaged entry was not moved aside");
        assert!(store.check_before_use(&intact, |_| {}).unwrap());
        assert!(intact.join(SYNCED).is_file());
        // Synced: metadata again, in any boot (a change of its bytes now
        // is caught by `kiln cache verify`, as for every synced entry).
        store.boot = Some("boot-three".into());
        flip(&intact);
        assert!(store.check_before_use(&intact, |_| {}).unwrap());

        // Without a boot id the entry is published synced, as layers are.
        store.boot = None;
        let synced = publish(&store, 4);
        assert!(!synced.join(BOOT_ID).exists());
        store.boot = Some("boot-four".into());
        flip(&synced);
        assert!(store.check_before_use(&synced, |_| {}).unwrap());
    }
}
