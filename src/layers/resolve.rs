//! Turning what an unlocked step installed into its lock entry, and
//! checking that a locked step installed exactly its pins.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::lock::{LockedPackage, StepLock};
use crate::store::debs::{archive_state, deb_file_name, pool_entries};
use crate::store::{PackageChange, Store};

/// Pin every package a step installed or upgraded: its .deb (found in
/// `debs_dir`, where apt left it) goes into the .deb cache, its pool path
/// comes from the apt lists the step read.
pub fn pin(
    store: &Store,
    spec: &[String],
    started: u64,
    changes: &[PackageChange],
    debs_dir: &Path,
    lists: &[PathBuf],
) -> Result<StepLock> {
    let wanted: Vec<(String, String, String)> = changes
        .iter()
        .filter_map(|c| {
            c.new
                .as_ref()
                .map(|v| (c.name.clone(), v.clone(), c.arch.clone()))
        })
        .collect();
    let pool = pool_entries(lists, &wanted)?;
    let mut packages = Vec::new();
    for key in &wanted {
        let (name, version, arch) = key;
        let deb = debs_dir.join(deb_file_name(name, version, arch));
        if !deb.is_file() {
            bail!(
                "apt installed {name} {version} but its .deb is not in {} to pin",
                debs_dir.display()
            );
        }
        let sha256 = store.import_deb(&deb)?;
        let entry = pool.get(key).with_context(|| format!("{name} {version} ({arch}) is not in the archive's package lists; cannot record where it comes from"))?;
        if entry.sha256 != sha256 {
            bail!(
                "{} has sha256 {sha256} but the archive lists {}: the download is damaged",
                deb.display(),
                entry.sha256
            );
        }
        packages.push(LockedPackage {
            name: name.clone(),
            version: version.clone(),
            arch: arch.clone(),
            sha256,
            archive: entry.archive.clone(),
            path: entry.path.clone(),
        });
    }
    packages.sort();
    Ok(StepLock {
        spec: spec.to_vec(),
        resolved: started,
        archive: archive_state(lists),
        packages,
    })
}

/// A locked step must have installed exactly its pins.
pub fn check(step: &crate::plan::StepId, lock: &StepLock, changes: &[PackageChange]) -> Result<()> {
    let mut installed: Vec<String> = changes
        .iter()
        .filter_map(|c| c.new.as_ref().map(|v| format!("{} {v}", c.name)))
        .collect();
    let mut pinned: Vec<String> = lock
        .packages
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    installed.sort();
    pinned.sort();
    if installed == pinned {
        return Ok(());
    }
    let extra: Vec<&String> = installed.iter().filter(|i| !pinned.contains(i)).collect();
    let missing: Vec<&String> = pinned.iter().filter(|p| !installed.contains(p)).collect();
    let layer = step.layer();
    bail!(
        "step {step} did not install exactly its locked packages (installed but not locked: {extra:?}; locked but not installed: {missing:?}); \
         the lock no longer fits the layers below it: re-resolve with `kiln lock --update {layer}`"
    )
}
