//! What the store holds, who uses it, and garbage collection with roots.
//!
//! Every build appends its image key to `state-v1/roots/<recipe>.json`
//! (newest last, one line per distinct image). Like Nix generations, those
//! lists are the roots: `kiln cache gc --keep N` keeps the newest N images
//! of each recipe that are still in the store, and every layer they stand
//! on (an image's `inputs.top`, then each layer's `inputs.parent` down to
//! the base), and removes every other layer and image, corrupt entries set
//! aside, and dead runs' staging dirs.
//!
//! gc takes the store lock exclusively, so it waits for running builds (which
//! hold it shared) and no build starts while it runs: nothing a build is
//! using or has just made can be collected. An entry is removed by renaming
//! it into `tmp/` first (it disappears from the store atomically) and then
//! deleting it; a gc killed half way leaves only debris in `tmp/`.
//!
//! gc removes only what it can prove unused. If the chain of a kept image
//! cannot be read to its base (an `image.json` or `entry.json` that is
//! missing or unreadable), the layers it stands on cannot be named, so gc
//! keeps every layer and says why; images and corrupt entries are still
//! collected.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    lock, read_json, remove_tree, write_json_atomic, ImageEntry, LayerEntry, Store, CORRUPT,
    IMAGES, LAYERS,
};
use crate::plan::Key;

/// `state-v1/roots/<recipe>.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Roots {
    pub recipe: String,
    /// Distinct images, oldest first; a rebuild of an image moves it last.
    pub images: Vec<Root>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Root {
    pub key: Key,
    /// When a build last produced or reused it (seconds since the epoch).
    pub built: u64,
    pub recipe_path: String,
}

impl Store {
    fn roots_path(&self, recipe: &str) -> PathBuf {
        self.state_dir("roots").join(format!("{recipe}.json"))
    }

    /// Record that `recipe` built (or reused) the image `key` just now.
    pub fn add_root(&self, recipe: &str, recipe_path: &Path, key: &Key) -> Result<()> {
        let _l = lock::lock(
            &self.lock_path(&format!("recipe-{recipe}")),
            lock::Mode::Exclusive,
            "another kiln recording a build",
            || {},
        )?;
        let path = self.roots_path(recipe);
        let mut roots: Roots = if path.exists() {
            read_json(&path)?
        } else {
            Roots {
                recipe: recipe.to_owned(),
                images: Vec::new(),
            }
        };
        roots.images.retain(|r| r.key != *key);
        roots.images.push(Root {
            key: *key,
            built: super::now(),
            recipe_path: recipe_path.display().to_string(),
        });
        write_json_atomic(&path, &roots)
    }

    pub fn all_roots(&self) -> Result<Vec<Roots>> {
        let dir = self.state_dir("roots");
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(read_json::<Roots>(&path)?);
            }
        }
        out.sort_by(|a, b| a.recipe.cmp(&b.recipe));
        Ok(out)
    }

    /// Keys of the entries in `layers-v1/` or `images-v1/`, sorted.
    pub fn keys(&self, section: &str) -> Result<Vec<Key>> {
        let dir = self.root().join(section);
        let mut keys = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let name = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .file_name();
            if let Some(k) = name.to_str().and_then(Key::parse) {
                keys.push(k);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// The layers an image stands on, top first, as far as the store has
    /// them; see [`Chain`].
    pub fn chain(&self, image: &ImageEntry) -> Chain {
        let mut layers = Vec::new();
        let mut next = Some(image.inputs.top);
        while let Some(key) = next {
            if layers.contains(&key) {
                return Chain {
                    layers,
                    broken: Some(format!("layer {} is its own ancestor", key.short())),
                };
            }
            layers.push(key);
            next = match self.layer_entry(&key) {
                Ok(e) => e.inputs.parent,
                Err(e) => {
                    return Chain {
                        layers,
                        broken: Some(format!("{e:#}")),
                    }
                }
            };
        }
        Chain {
            layers,
            broken: None,
        }
    }
}

/// The layers under an image, top first.
#[derive(Debug)]
pub struct Chain {
    pub layers: Vec<Key>,
    /// Why the walk stopped before the base, if it did: the layers below
    /// that point are unknown.
    pub broken: Option<String>,
}

/// One row of `kiln cache ls`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub kind: &'static str,
    pub key: String,
    /// A layer's step id (`base`, `security/upgrade`); an image's file.
    pub what: String,
    pub bytes: u64,
    pub created: u64,
    /// Recipes whose kept images (or last build) use this entry.
    pub recipes: Vec<String>,
    /// Images (short keys) standing on this layer.
    pub images: Vec<String>,
}

/// Every layer and image in the store, with its size and its users.
pub fn list(store: &Store) -> Result<Vec<Listed>> {
    let roots = store.all_roots()?;
    let mut image_recipes: BTreeMap<Key, BTreeSet<String>> = BTreeMap::new();
    for r in &roots {
        for i in &r.images {
            image_recipes
                .entry(i.key)
                .or_default()
                .insert(r.recipe.clone());
        }
    }
    let mut layer_images: BTreeMap<Key, BTreeSet<Key>> = BTreeMap::new();
    let mut rows = Vec::new();
    for key in store.keys(IMAGES)? {
        let dir = store.image_dir(&key);
        let (what, created) = match store.image_entry(&key) {
            Ok(entry) => {
                for layer in store.chain(&entry).layers {
                    layer_images.entry(layer).or_default().insert(key);
                }
                (entry.file.clone(), entry.created)
            }
            Err(_) => ("(no image.json)".to_owned(), 0),
        };
        rows.push(Listed {
            kind: "image",
            key: key.hex(),
            what,
            bytes: disk_usage(&dir)?,
            created,
            recipes: image_recipes
                .get(&key)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            images: Vec::new(),
        });
    }
    // A recipe's last build uses its steps even before (or without) an image.
    let mut layer_recipes: BTreeMap<Key, BTreeSet<String>> = BTreeMap::new();
    let recipes_dir = store.state_dir("recipes");
    for entry in std::fs::read_dir(&recipes_dir)
        .with_context(|| format!("reading {}", recipes_dir.display()))?
    {
        let path = entry
            .with_context(|| format!("reading {}", recipes_dir.display()))?
            .path();
        let Some(name) = path
            .file_stem()
            .and_then(|n| n.to_str())
            .filter(|_| path.extension().is_some_and(|e| e == "json"))
        else {
            continue;
        };
        for inputs in store.recipe_state(name).steps.values() {
            layer_recipes
                .entry(inputs.key())
                .or_default()
                .insert(name.to_owned());
        }
    }
    for key in store.keys(LAYERS)? {
        let dir = store.layer_dir(&key);
        let (what, created) = match store.layer_entry(&key) {
            Ok(LayerEntry { id, created, .. }) => (id, created),
            Err(_) => ("(no entry.json)".to_owned(), 0),
        };
        let images = layer_images.get(&key).cloned().unwrap_or_default();
        let mut recipes = layer_recipes.get(&key).cloned().unwrap_or_default();
        for i in &images {
            recipes.extend(image_recipes.get(i).into_iter().flatten().cloned());
        }
        rows.push(Listed {
            kind: "layer",
            key: key.hex(),
            what,
            bytes: disk_usage(&dir)?,
            created,
            recipes: recipes.into_iter().collect(),
            images: images.iter().map(Key::short).collect(),
        });
    }
    Ok(rows)
}

/// One row of `kiln cache du`.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub section: String,
    pub entries: u64,
    pub bytes: u64,
}

/// Disk use of each part of the store.
pub fn usage(store: &Store) -> Result<Vec<Usage>> {
    let mut rows = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(store.root())
        .with_context(|| format!("reading {}", store.root().display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", store.root().display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    for name in names {
        let dir = store.root().join(&name);
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .count() as u64;
        rows.push(Usage {
            section: name,
            entries,
            bytes: disk_usage(&dir)?,
        });
    }
    let total = rows.iter().map(|r| r.bytes).sum();
    rows.push(Usage {
        section: "total".into(),
        entries: rows.iter().map(|r| r.entries).sum(),
        bytes: total,
    });
    Ok(rows)
}

/// What `gc` removed (or would remove, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct Collected {
    pub kept_images: Vec<String>,
    pub kept_layers: usize,
    /// Why every layer was kept: the chain of a kept image that could not
    /// be read to its base (gc never removes what it cannot prove unused).
    pub kept_all_layers_because: Vec<String>,
    pub removed: Vec<Removed>,
    pub freed: u64,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    pub kind: &'static str,
    pub name: String,
    pub what: String,
    pub bytes: u64,
}

/// Keep the newest `keep` images of each recipe and the layers under them;
/// remove everything else. The caller holds the store lock exclusively.
pub fn collect(store: &Store, keep: usize, dry_run: bool) -> Result<Collected> {
    let mut kept_images: BTreeSet<Key> = BTreeSet::new();
    let mut kept_layers: BTreeSet<Key> = BTreeSet::new();
    let mut unknown_chains = Vec::new();
    let mut roots = store.all_roots()?;
    for r in &mut roots {
        let present: Vec<Key> = r
            .images
            .iter()
            .rev()
            .map(|i| i.key)
            .filter(|k| store.has_image(k))
            .take(keep)
            .collect();
        for key in &present {
            kept_images.insert(*key);
            match store.image_entry(key) {
                Ok(image) => {
                    let chain = store.chain(&image);
                    kept_layers.extend(&chain.layers);
                    if let Some(why) = chain.broken {
                        unknown_chains.push(format!(
                            "the layers under image {} (recipe {}) cannot all be read: {why}",
                            key.short(),
                            r.recipe
                        ));
                    }
                }
                Err(e) => unknown_chains.push(format!(
                    "image {} (recipe {}) cannot be read: {e:#}",
                    key.short(),
                    r.recipe
                )),
            }
        }
        r.images.retain(|i| present.contains(&i.key));
    }
    if !unknown_chains.is_empty() {
        kept_layers.extend(store.keys(LAYERS)?);
    }
    let mut removed = Vec::new();
    for key in store.keys(IMAGES)? {
        if !kept_images.contains(&key) {
            let what = store.image_entry(&key).map(|e| e.file).unwrap_or_default();
            removed.push((
                Removed {
                    kind: "image",
                    name: key.hex(),
                    what,
                    bytes: 0,
                },
                store.image_dir(&key),
            ));
        }
    }
    for key in store.keys(LAYERS)? {
        if !kept_layers.contains(&key) {
            let what = store.layer_entry(&key).map(|e| e.id).unwrap_or_default();
            removed.push((
                Removed {
                    kind: "layer",
                    name: key.hex(),
                    what,
                    bytes: 0,
                },
                store.layer_dir(&key),
            ));
        }
    }
    // Remembered smoke passes (`state-v1/smoke`, see smoke::stage) count
    // only for the disk they name: a pass whose disk no kept image has can
    // never be used again. One that cannot be read is never used either.
    let kept_disks: BTreeSet<String> = kept_images
        .iter()
        .filter_map(|k| store.image_entry(k).ok().map(|e| e.sha256))
        .collect();
    let passes = store.state_dir("smoke");
    if passes.is_dir() {
        #[derive(serde::Deserialize)]
        struct Pass {
            disk_sha256: String,
        }
        for entry in
            std::fs::read_dir(&passes).with_context(|| format!("reading {}", passes.display()))?
        {
            let path = entry
                .with_context(|| format!("reading {}", passes.display()))?
                .path();
            let disk = crate::store::read_json::<Pass>(&path).map(|p| p.disk_sha256);
            if disk.as_ref().is_ok_and(|d| kept_disks.contains(d)) {
                continue;
            }
            removed.push((
                Removed {
                    kind: "smoke pass",
                    name: path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    what: match disk {
                        Ok(d) => format!("of disk sha256 {}", &d[..d.len().min(12)]),
                        Err(_) => "unreadable".into(),
                    },
                    bytes: 0,
                },
                path,
            ));
        }
    }
    // Cached UKIs (uki-v1/<key>.efi and .sha256) of no kept image.
    let kept_ukis: BTreeSet<String> = kept_images
        .iter()
        .filter_map(|k| store.image_entry(k).ok().and_then(|e| e.uki))
        .collect();
    let ukis = store.root().join(crate::store::UKIS);
    for entry in std::fs::read_dir(&ukis).with_context(|| format!("reading {}", ukis.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", ukis.display()))?
            .path();
        let key = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if kept_ukis.contains(&key) {
            continue;
        }
        removed.push((
            Removed {
                kind: "uki",
                name: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                what: "a cached UKI no kept image uses".into(),
                bytes: 0,
            },
            path,
        ));
    }
    let corrupt = store.root().join(CORRUPT);
    for entry in
        std::fs::read_dir(&corrupt).with_context(|| format!("reading {}", corrupt.display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", corrupt.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        removed.push((
            Removed {
                kind: "corrupt",
                name,
                what: "set aside by an integrity check".into(),
                bytes: 0,
            },
            entry.path(),
        ));
    }
    let mut freed = 0;
    for (r, path) in &mut removed {
        r.bytes = disk_usage(path)?;
        freed += r.bytes;
        if !dry_run {
            remove_entry(store, path)?;
            if let Some(key) = Key::parse(&r.name) {
                // Its lock file, and for an image the log of the run that built it.
                let log = crate::layers::kept_log(store, &key);
                for file in [store.lock_path(&key.hex()), log] {
                    match std::fs::remove_file(&file) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(e).with_context(|| format!("removing {}", file.display()))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    if !dry_run {
        for r in &roots {
            write_json_atomic(&store.roots_path(&r.recipe), r)?;
        }
        store.clean_stale_staging()?;
    }
    Ok(Collected {
        kept_images: kept_images.iter().map(Key::hex).collect(),
        kept_layers: kept_layers.len(),
        kept_all_layers_because: unknown_chains,
        removed: removed.into_iter().map(|(r, _)| r).collect(),
        freed,
        dry_run,
    })
}

/// Take an entry out of the store with one rename, then delete it.
fn remove_entry(store: &Store, path: &Path) -> Result<()> {
    let doomed = store.staging()?.keep();
    let inside = doomed.join("doomed");
    std::fs::rename(path, &inside)
        .with_context(|| format!("moving {} out of the store", path.display()))?;
    remove_tree(&doomed).with_context(|| format!("removing {}", doomed.display()))
}

/// Bytes a tree occupies on disk (allocated blocks; hard links once).
pub fn disk_usage(path: &Path) -> Result<u64> {
    fn walk(path: &Path, seen: &mut BTreeSet<(u64, u64)>) -> Result<u64> {
        let m = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            return Ok(0);
        }
        let mut total = m.blocks() * 512;
        if m.is_dir() {
            for entry in
                std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
            {
                let entry = entry.with_context(|| format!("reading {}", path.display()))?;
                total += walk(&entry.path(), seen)?;
            }
        }
        Ok(total)
    }
    walk(path, &mut BTreeSet::new())
}

/// `1.4 GiB`, `320.0 KiB`.
pub fn human(bytes: u64) -> String {
    let mut value = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return if unit == "B" {
                format!("{bytes} B")
            } else {
                format!("{value:.1} {unit}")
            };
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn a_root_moves_last_when_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let k = |b: u8| Key::parse(&format!("{:02x}", b).repeat(32)).unwrap();
        for key in [k(1), k(2), k(1), k(3)] {
            store
                .add_root("web", Path::new("recipes/web.toml"), &key)
                .unwrap();
        }
        let roots = store.all_roots().unwrap();
        let order: Vec<Key> = roots[0].images.iter().map(|r| r.key).collect();
        assert_eq!(order, [k(2), k(1), k(3)]);
    }
}
