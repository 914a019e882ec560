//! Build history: `state-v1/history/NAME.jsonl` in the store, one JSON line
//! per build of a recipe, appended; `NAME.packages.json` beside it holds the
//! package set of the last build, to say what each build changed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::manifest::{Built, Git, Manifest};
use crate::store::{Package, PackageChange, Store};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub time: String,
    pub name: String,
    pub recipe: String,
    pub user: String,
    pub sudo_user: Option<String>,
    pub host: String,
    pub image_key: String,
    pub image_sha256: String,
    pub steps: Vec<StepKey>,
    /// Packages installed, upgraded or removed since the previous build of
    /// this recipe (empty for the first one, see `first`).
    pub changes: Vec<PackageChange>,
    pub first: bool,
    pub git: Option<Git>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepKey {
    pub id: String,
    pub key: String,
}

fn dir(store: &Store) -> PathBuf {
    store.state_dir("history")
}

/// Append the build of `m` by `run` (who ran it, when: on a cache hit, not
/// the run that assembled the image, which is the manifest's `built`).
pub fn append(store: &Store, m: &Manifest, run: &Built) -> Result<Record> {
    let dir = dir(store);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let last_path = dir.join(format!("{}.packages.json", m.name));
    let previous: Option<Vec<Package>> = if last_path.is_file() {
        Some(crate::store::read_json(&last_path)?)
    } else {
        None
    };
    let record = Record {
        time: run.finished.clone(),
        name: m.name.clone(),
        recipe: m.recipe.first().map(|r| r.path.clone()).unwrap_or_default(),
        user: run.user.clone(),
        sudo_user: run.sudo_user.clone(),
        host: run.host.clone(),
        image_key: m.image.key.hex(),
        image_sha256: m.image.sha256.clone(),
        steps: m
            .steps
            .iter()
            .map(|s| StepKey {
                id: s.id.clone(),
                key: s.key.hex(),
            })
            .collect(),
        changes: previous
            .as_deref()
            .map(|p| crate::layers::steps::package_changes(p, &m.packages))
            .unwrap_or_default(),
        first: previous.is_none(),
        git: m.git.clone(),
    };
    let mut line = serde_json::to_string(&record).context("serialising a history record")?;
    line.push('\n');
    let path = dir.join(format!("{}.jsonl", m.name));
    // One write of one line with O_APPEND: concurrent builds never interleave.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(line.as_bytes())
        .with_context(|| format!("appending to {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    crate::store::write_json_atomic(&last_path, &m.packages)?;
    Ok(record)
}

/// The history of one image name, or of every one; newest first.
pub fn read(store: &Store, name: Option<&str>) -> Result<Vec<Record>> {
    let dir = dir(store);
    let mut files: Vec<PathBuf> = match name {
        Some(n) => vec![dir.join(format!("{n}.jsonl"))],
        None => std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect(),
    };
    files.sort();
    let mut records = Vec::new();
    for f in files {
        if !f.is_file() {
            continue;
        }
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            records.push(
                serde_json::from_str::<Record>(line)
                    .with_context(|| format!("{}:{}: not a history record", f.display(), i + 1))?,
            );
        }
    }
    // RFC 3339 UTC times sort as strings; a stable sort keeps file order on ties.
    records.reverse();
    records.sort_by(|a, b| b.time.cmp(&a.time));
    Ok(records)
}

/// One line per change: `+nginx-light 1.26`, `~libc6 2.41-11 -> 2.41-12`.
pub fn show_changes(changes: &[PackageChange]) -> String {
    changes
        .iter()
        .map(|c| match (&c.old, &c.new) {
            (None, Some(n)) => format!("+{} {n}", c.name),
            (Some(o), None) => format!("-{} {o}", c.name),
            (Some(o), Some(n)) => format!("~{} {o} -> {n}", c.name),
            (None, None) => format!("?{}", c.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
