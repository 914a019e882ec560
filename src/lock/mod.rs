//! Lock files: `recipes/NAME.lock`, next to the recipe, meant to be
//! committed.
//!
//! A lock pins, for each step of the recipe's *own* layers that installs
//! packages (the base, `upgrade`, `packages`), the exact packages that step
//! installed or upgraded: name, version, architecture, the sha256 of the
//! .deb, and where in the archive it lives (`main` or `security` plus its
//! pool path, never a host name). Inherited layers are pinned by the parent
//! recipe's lock, so every recipe that extends golden shares golden's pins.
//!
//! A step's key covers the digest of its locked set ([`StepLock::digest`]),
//! so an unchanged lock means cache hits, and a lock change (a security
//! update) rebuilds exactly that step and those above it. A step with no
//! entry is *unlocked*: the build resolves it against the archive, stores the
//! result under the key of the lock it produced, and writes the entry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::error::BadInput;
use crate::packages::{self, PackageChange, Versions};
use crate::plan::{self, key::bytes_digest};
use crate::recipe::Recipe;
use crate::store::Store;

pub const LOCK_VERSION: u32 = 1;

/// One lock file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub version: u32,
    /// Step id (`base`, `security/upgrade`, `app/packages`) → its pins.
    #[serde(default)]
    pub steps: BTreeMap<String, StepLock>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepLock {
    /// The step's settings when it was resolved (e.g. the packages asked
    /// for). Pins resolved for other settings are stale and ignored, so
    /// adding a package to a layer re-resolves that step only.
    #[serde(default)]
    pub spec: Vec<String>,
    /// When this entry's resolution started (seconds since the epoch). The
    /// earliest one is the image's SOURCE_DATE_EPOCH.
    pub resolved: u64,
    /// The archive state it was resolved against: `suite date` of each
    /// Release file apt read.
    #[serde(default)]
    pub archive: Vec<String>,
    #[serde(default)]
    pub packages: Vec<LockedPackage>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub sha256: String,
    /// `main` (the suite and its updates) or `security`.
    pub archive: String,
    /// Path below the archive root, e.g. `pool/main/n/nginx/…deb`.
    pub path: String,
}

impl StepLock {
    /// What the step key covers: the package set, not when or against
    /// which archive state it was resolved.
    pub fn digest(&self) -> String {
        let mut lines: Vec<String> = self
            .packages
            .iter()
            .map(|p| format!("{} {} {} {}", p.name, p.version, p.arch, p.sha256))
            .collect();
        lines.sort();
        bytes_digest(lines.join("\n").as_bytes())
    }
}

/// The lock file path of a recipe file.
pub fn path_for(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

impl LockFile {
    /// Load a recipe's lock; a missing file is an empty lock.
    pub fn load(path: &Path) -> Result<LockFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LockFile {
                    version: LOCK_VERSION,
                    steps: BTreeMap::new(),
                })
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        // Like a recipe: a syntax error names its line, a wrong shape the
        // key path where it was found.
        let damaged = |key: String, e: &toml::de::Error| {
            BadInput::new(
                path,
                key,
                format!(
                    "the lock file is damaged: {}",
                    crate::recipe::at_line(&text, e, e.message().trim())
                ),
                "restore it from version control, or delete it and run `kiln lock` to resolve it again",
            )
        };
        let document =
            toml::Deserializer::parse(&text).map_err(|e| damaged("(syntax)".into(), &e))?;
        let lock: LockFile = serde_path_to_error::deserialize(document)
            .map_err(|e| damaged(e.path().to_string(), e.inner()))?;
        if lock.version != LOCK_VERSION {
            return Err(BadInput::new(
                path,
                "version",
                format!(
                    "lock version {} is not supported (this kiln writes {LOCK_VERSION})",
                    lock.version
                ),
                "re-resolve it with `kiln lock --update`",
            )
            .into());
        }
        for (id, step) in &lock.steps {
            for (i, p) in step.packages.iter().enumerate() {
                let hex_ok =
                    p.sha256.len() == 64 && p.sha256.chars().all(|c| c.is_ascii_hexdigit());
                let path_ok = p.path.starts_with("pool/")
                    && !p.path.split('/').any(|c| c == ".." || c.is_empty());
                let name_ok = !p.name.is_empty()
                    && p.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
                let ver_ok = !p.version.is_empty()
                    && p.version
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.:~".contains(c));
                if !(hex_ok
                    && path_ok
                    && name_ok
                    && ver_ok
                    && ["main", "security"].contains(&p.archive.as_str()))
                {
                    return Err(BadInput::new(
                        path,
                        format!("steps.\"{id}\".packages[{i}]"),
                        format!("`{}` is not a valid locked package (name, version, sha256 of 64 hex digits, archive main|security, path under pool/)", p.name),
                        "restore the lock from version control, or re-resolve it with `kiln lock --update`",
                    )
                    .into());
                }
            }
        }
        Ok(lock)
    }

    /// Write the lock, atomically, with a header saying what it is.
    pub fn save(&self, path: &Path, recipe_name: &str) -> Result<()> {
        let body = toml::to_string_pretty(self).context("serialising the lock file")?;
        let text = format!(
            "# kiln lock file for {recipe_name}: the exact packages each layer of this recipe\n\
             # installs. Commit it. `kiln lock --update [LAYER]` re-resolves; `kiln build`\n\
             # installs exactly these versions and checks every .deb against its sha256.\n\n{body}"
        );
        crate::files::write_atomic(path, text.as_bytes())
    }
}

/// The locks of a recipe and of every recipe it extends, by file.
#[derive(Debug, Clone, Default)]
pub struct Locks {
    pub files: BTreeMap<PathBuf, LockFile>,
}

impl Locks {
    /// Load the lock of every recipe file in `sources`.
    pub fn load(sources: &[PathBuf]) -> Result<Locks> {
        let mut files = BTreeMap::new();
        for recipe in sources {
            files.insert(recipe.clone(), LockFile::load(&path_for(recipe))?);
        }
        Ok(Locks { files })
    }

    pub fn get(&self, recipe: &Path, step: &str) -> Option<&StepLock> {
        self.files.get(recipe)?.steps.get(step)
    }

    pub fn set(&mut self, recipe: &Path, step: &str, lock: StepLock) {
        self.files
            .entry(recipe.to_owned())
            .or_insert_with(|| LockFile {
                version: LOCK_VERSION,
                steps: BTreeMap::new(),
            })
            .steps
            .insert(step.to_owned(), lock);
    }

    pub fn remove(&mut self, recipe: &Path, step: &str) -> Option<StepLock> {
        self.files.get_mut(recipe)?.steps.remove(step)
    }

    /// The image's SOURCE_DATE_EPOCH: the earliest resolution over every
    /// pin. Pins are dated by when their resolution started, so no file a
    /// build creates is older than this: clamping every timestamp to it
    /// makes two builds of the same locks agree, whenever they run.
    pub fn source_date_epoch(&self) -> Option<u64> {
        self.files
            .values()
            .flat_map(|f| f.steps.values())
            .map(|s| s.resolved)
            .min()
    }

    /// Write every lock file whose content differs from what is on disk.
    pub fn save_changed(&self) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        for (recipe, lock) in &self.files {
            let path = path_for(recipe);
            let unchanged = if path.exists() {
                LockFile::load(&path).ok().as_ref() == Some(lock)
            } else {
                lock.steps.is_empty()
            };
            if unchanged {
                continue;
            }
            let name = recipe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            lock.save(&path, &name)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// What changed between two pins of one step. A package the old pins did
/// not list shows the version `below` had (what the layer under the step
/// installed), so an upgrade reads as one.
pub fn changes_over(
    old: Option<&StepLock>,
    new: Option<&StepLock>,
    below: &Versions,
) -> Vec<PackageChange> {
    let mut out = changes(old, new);
    for c in &mut out {
        if c.old.is_none() {
            c.old = below
                .get(&(c.name.clone(), c.arch.clone()))
                .filter(|v| Some(*v) != c.new.as_ref())
                .cloned();
        }
    }
    out
}

/// What changed between two pins of one step.
pub fn changes(old: Option<&StepLock>, new: Option<&StepLock>) -> Vec<PackageChange> {
    let versions = |s: Option<&StepLock>| {
        packages::versions(s.into_iter().flat_map(|s| {
            s.packages
                .iter()
                .map(|p| (p.name.as_str(), p.arch.as_str(), p.version.as_str()))
        }))
    };
    packages::diff(&versions(old), &versions(new))
}

/// The pins `--update [LAYER]` forgot, so that the report can say what
/// the re-resolution changed.
pub struct Forgotten(Vec<(PathBuf, String, Option<StepLock>)>);

/// Forget the pins of `layer` (every layer when empty) so the build
/// re-resolves them.
pub fn forget(recipe: &Recipe, locks: &mut Locks, layer: &str) -> Result<Forgotten> {
    let plan = plan::make(recipe, locks)?;
    if !layer.is_empty() && !plan.steps.iter().any(|s| s.layer == layer) {
        let names: BTreeSet<&str> = plan.steps.iter().map(|s| s.layer.as_str()).collect();
        return Err(BadInput::arg(
            format!(
                "--update {layer}: {} has no layer named `{layer}`",
                recipe.path.display()
            ),
            format!(
                "use one of: {}",
                names.into_iter().collect::<Vec<_>>().join(", ")
            ),
        )
        .into());
    }
    Ok(Forgotten(
        plan.steps
            .iter()
            .filter(|s| s.is_locked_kind() && (layer.is_empty() || s.layer == layer))
            .map(|s| {
                (
                    s.origin.clone(),
                    s.id().into(),
                    locks.remove(&s.origin, &s.id()),
                )
            })
            .collect(),
    ))
}

impl Forgotten {
    pub fn none() -> Forgotten {
        Forgotten(Vec::new())
    }

    /// `step:` then `  package old -> new` per re-resolved step, or
    /// `step: no changes`.
    pub fn report(&self, locks: &Locks, recipe: &Recipe, store: &Store) -> Vec<String> {
        let plan = plan::make(recipe, locks).ok();
        let mut lines = Vec::new();
        for (origin, id, old) in &self.0 {
            // The versions the layer below had, so an upgrade shows old -> new.
            let below = plan
                .as_ref()
                .and_then(|p| p.steps.iter().find(|s| *s.id() == **id))
                .and_then(|s| s.inputs.parent)
                .and_then(|k| store.layer_entry(&k).ok())
                .map(|e| {
                    packages::versions(
                        e.packages
                            .iter()
                            .map(|p| (p.name.as_str(), p.arch.as_str(), p.version.as_str())),
                    )
                })
                .unwrap_or_default();
            let changes = changes_over(old.as_ref(), locks.get(origin, id), &below);
            if changes.is_empty() {
                lines.push(format!("{id}: no changes"));
            } else {
                lines.push(format!("{id}:"));
                lines.extend(changes.into_iter().map(|c| format!("  {c}")));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_lock_names_the_line_or_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.lock");
        let error = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let e = LockFile::load(&path).unwrap_err();
            let bad = e.downcast_ref::<BadInput>().expect("bad input");
            (bad.key.clone().unwrap_or_default(), bad.problem.clone())
        };
        let (key, problem) = error("version = 1\n[steps\n");
        assert_eq!(key, "(syntax)");
        assert!(problem.contains("line 2"), "{problem}");
        let (key, _) = error("version = \"one\"\n");
        assert_eq!(key, "version");
        let (key, _) = error("version = 1\n[steps.\"app/packages\"]\nspec = 3\n");
        assert_eq!(key, "steps.app/packages.spec");
    }

    fn pkg(name: &str, version: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            sha256: "a".repeat(64),
            archive: "main".into(),
            path: format!("pool/main/x/{name}.deb"),
        }
    }

    #[test]
    fn digest_ignores_order_and_resolution_time() {
        let a = StepLock {
            spec: vec![],
            resolved: 1,
            archive: vec!["trixie x".into()],
            packages: vec![pkg("a", "1"), pkg("b", "1")],
        };
        let b = StepLock {
            spec: vec![],
            resolved: 2,
            archive: vec![],
            packages: vec![pkg("b", "1"), pkg("a", "1")],
        };
        assert_eq!(a.digest(), b.digest());
        let c = StepLock {
            packages: vec![pkg("a", "2"), pkg("b", "1")],
            ..a.clone()
        };
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let mut lock = LockFile {
            version: LOCK_VERSION,
            steps: BTreeMap::new(),
        };
        lock.steps.insert(
            "app/packages".into(),
            StepLock {
                spec: vec!["p".into()],
                resolved: 5,
                archive: vec![],
                packages: vec![pkg("curl", "8.1")],
            },
        );
        lock.save(&path, "x.toml").unwrap();
        assert_eq!(LockFile::load(&path).unwrap(), lock);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(&"a".repeat(64), "nothex");
        std::fs::write(&path, text).unwrap();
        let err = LockFile::load(&path).unwrap_err();
        assert!(err.is::<BadInput>(), "{err:#}");
        assert!(err.to_string().contains("curl"), "{err:#}");
        std::fs::write(&path, "version = 1\n[steps.x]\nresolved = 1\nbogus = 2\n").unwrap();
        assert!(LockFile::load(&path)
            .unwrap_err()
            .to_string()
            .contains("bogus"));
        assert_eq!(
            LockFile::load(&dir.path().join("missing.lock"))
                .unwrap()
                .steps
                .len(),
            0
        );
    }

    #[test]
    fn changes_read_like_a_changelog() {
        let old = StepLock {
            packages: vec![pkg("a", "1"), pkg("gone", "1")],
            ..Default::default()
        };
        let new = StepLock {
            packages: vec![pkg("a", "2"), pkg("new", "3")],
            ..Default::default()
        };
        let lines: Vec<String> = changes(Some(&old), Some(&new))
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(lines, ["a 1 -> 2", "gone 1 -> (none)", "new (none) -> 3"]);
        assert!(changes(Some(&old), Some(&old)).is_empty());
    }

    #[test]
    fn a_package_new_to_the_pins_shows_the_version_below() {
        let new = StepLock {
            packages: vec![pkg("libzstd1", "2"), pkg("fresh", "1")],
            ..Default::default()
        };
        let below = packages::versions([("libzstd1", "amd64", "1")]);
        let lines: Vec<String> = changes_over(None, Some(&new), &below)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(lines, ["fresh (none) -> 1", "libzstd1 1 -> 2"]);
    }
}
