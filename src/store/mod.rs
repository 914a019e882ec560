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
//! │   └── image.json
//! ├── debs-v1/<sha256>.deb       every pinned .deb, by content (see debs.rs)
//! ├── apt-v1/archives/            .deb files apt downloaded (bind-mounted into steps)
//! ├── apt-v1/lists/<sources>/     apt's package lists, per set of apt sources
//! ├── state-v1/recipes/<name>.json  the inputs of each recipe's last build, for "why"
//! ├── state-v1/resolved/<key>.json  recent resolutions of unlocked steps
//! ├── state-v1/smoke/             passing smoke results, per image key + smoke spec
//! ├── state-v1/host/              host facts, such as the KVM probe verdict
//! └── tmp/                        staging: entries are built here, then renamed
//! ```
//!
//! An entry is built in `tmp/` and becomes visible with one `rename(2)` into
//! `layers-v1/` or `images-v1/`, after its content has been synced, and only
//! once its stage succeeded. A half-built entry is therefore never seen;
//! whatever a killed run leaves in `tmp/` is removed by the next run.

pub mod debs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plan::{ImageInputs, Key, StepInputs};

pub const LAYERS: &str = "layers-v1";
/// How long a resolution of an unlocked step is reused for another recipe
/// (or a deleted lock) with the same inputs, instead of asking the archive
/// again. `kiln lock --update` always asks.
pub const RESOLUTION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
pub const IMAGES: &str = "images-v1";

pub struct Store {
    root: PathBuf,
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

/// A package that a step installed, upgraded or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageChange {
    pub name: String,
    pub arch: String,
    /// `None` when the step installed it.
    pub old: Option<String>,
    /// `None` when the step removed it.
    pub new: Option<String>,
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
    pub seconds: f64,
    pub created: u64,
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
        for sub in [LAYERS, IMAGES, "tmp", "apt-v1/archives/partial", "apt-v1/lists", "state-v1/recipes", "state-v1/smoke", "state-v1/host"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating the store directory {}", dir.display()))?;
        }
        let store = Store { root: root.to_owned() };
        Ok(store)
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
        let dir = self.root.join("apt-v1/lists").join(sources_digest).join("partial");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(self.root.join("apt-v1/lists").join(sources_digest))
    }

    pub fn state_dir(&self, sub: &str) -> PathBuf {
        self.root.join("state-v1").join(sub)
    }

    /// A fresh staging directory on the store's filesystem, removed when
    /// dropped unless published.
    pub fn staging(&self) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(self.root.join("tmp"))
            .with_context(|| format!("creating a staging directory in {}", self.root.join("tmp").display()))
    }

    /// Make a staged entry visible under `dest` with one rename, after
    /// syncing it to disk. If another build published the same key first,
    /// theirs is kept (same key, same content) and ours is dropped, unless
    /// `replace` (`--refresh`) moves the old one aside first.
    pub fn publish(&self, staged: tempfile::TempDir, dest: &Path, replace: bool) -> Result<()> {
        sync_filesystem(staged.path())?;
        if replace && dest.exists() {
            let aside = self.staging()?.keep();
            let old = aside.join("old");
            std::fs::rename(dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
            remove_tree(&aside).with_context(|| format!("removing {}", aside.display()))?;
        }
        let path = staged.keep();
        match std::fs::rename(&path, dest) {
            Ok(()) => Ok(()),
            Err(e) if dest.exists() => {
                remove_tree(&path).with_context(|| format!("removing the duplicate staging dir {} ({e})", path.display()))
            }
            Err(e) => {
                // The publish error is the one to report; the staging dir is
                // debris that the next run's clean-up also removes.
                if let Err(cleanup) = remove_tree(&path) {
                    crate::cmd::log_line(&format!("warning: removing {}: {cleanup}", path.display()));
                }
                Err(anyhow::Error::new(e).context(format!("publishing {} as {}", path.display(), dest.display())))
            }
        }
    }

    /// Remove what a dead run left in `tmp/`. Safe because every run
    /// holds its staging dirs only while it is alive and mounts live in
    /// kiln's own mount namespace (gone with the process).
    pub fn clean_stale_staging(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).with_context(|| format!("reading {}", tmp.display()))? {
            let path = entry?.path();
            if is_stale(&path) {
                remove_tree(&path).with_context(|| format!("removing stale staging dir {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// The pins an unlocked step with this (provisional) key resolved to,
    /// if that happened within [`RESOLUTION_MAX_AGE`].
    pub fn recent_resolution(&self, key: &Key) -> Option<crate::lock::StepLock> {
        let pins: crate::lock::StepLock = read_json(&self.state_dir("resolved").join(format!("{}.json", key.hex()))).ok()?;
        (now().saturating_sub(pins.resolved) < RESOLUTION_MAX_AGE.as_secs()).then_some(pins)
    }

    pub fn save_resolution(&self, key: &Key, pins: &crate::lock::StepLock) -> Result<()> {
        write_json_atomic(&self.state_dir("resolved").join(format!("{}.json", key.hex())), pins)
    }

    pub fn recipe_state(&self, name: &str) -> RecipeState {
        read_json(&self.state_dir("recipes").join(format!("{name}.json"))).unwrap_or_default()
    }

    pub fn save_recipe_state(&self, name: &str, state: &RecipeState) -> Result<()> {
        write_json_atomic(&self.state_dir("recipes").join(format!("{name}.json")), state)
    }
}

/// A staging dir belongs to a live run when a `pid` file inside names a
/// running process; anything else is debris.
fn is_stale(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path.join(".kiln-pid")) else {
        return true;
    };
    let Ok(pid) = text.trim().parse::<i32>() else { return true };
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    !alive
}

/// Mark a staging dir as owned by this process (see [`is_stale`]).
pub fn claim(staging: &Path) -> Result<()> {
    let path = staging.join(".kiln-pid");
    std::fs::write(&path, std::process::id().to_string()).with_context(|| format!("writing {}", path.display()))
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Write JSON through a temp file and a rename, so a reader never sees half.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a temp file in {}", dir.display()))?;
    serde_json::to_writer_pretty(&mut tmp, value).with_context(|| format!("writing {}", path.display()))?;
    use std::io::Write;
    tmp.write_all(b"\n").with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Flush everything on the filesystem holding `path` (one syncfs instead of
/// an fsync per file of a tree with tens of thousands of files).
fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on a valid open fd.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncing {}", path.display()));
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
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
