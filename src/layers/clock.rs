//! The times in a layer, made a function of its key.
//!
//! A step's key covers its pins, not when it ran, so two builds of the same
//! key must give the same files, times included. What a package brings is
//! dated by the package (dpkg sets each file's mtime from the .deb); what
//! the step itself makes or changes (dpkg's database, a copied file,
//! mmdebstrap's /dev, a whiteout) is dated by the build's clock. Before a
//! step is published, [`date_made_files`] dates every path the step made
//! with the newest time it was made from: the newest mtime older than the
//! step's start, in this layer or the layers below.
//!
//! Without it, a layer built by one recipe's lock and used under another
//! whose SOURCE_DATE_EPOCH is later (same pins resolved again) kept the
//! first build's clock, which the image's clamp left alone, so a cold
//! rebuild from the same lock gave other times.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Give every path under `tree` (and `tree` itself) whose mtime is not older
/// than `started` (the step's start, in seconds since the epoch) the time
/// `max(below, newest mtime older than started)`, as mtime and atime, and
/// return that time: the layer's own epoch, `below` for the step above.
/// `below` is the epoch of the layer underneath (0 for the base).
pub fn date_made_files(tree: &Path, started: u64, below: u64) -> Result<u64> {
    let started = i64::try_from(started).context("the step's start does not fit a time")?;
    let mut made: Vec<PathBuf> = Vec::new();
    let mut newest = i64::try_from(below).context("the layer's epoch does not fit a time")?;
    let mut visit = |path: PathBuf, meta: &std::fs::Metadata| {
        if meta.mtime() >= started {
            made.push(path);
        } else {
            newest = newest.max(meta.mtime());
        }
    };
    let meta =
        std::fs::symlink_metadata(tree).with_context(|| format!("reading {}", tree.display()))?;
    visit(tree.to_path_buf(), &meta);
    let mut dirs = vec![tree.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for item in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = item
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                dirs.push(path.clone());
            }
            visit(path, &meta);
        }
    }
    for path in &made {
        set_time(path, newest)?;
    }
    Ok(u64::try_from(newest).unwrap_or(0))
}

/// Set a path's mtime and atime without following a symlink.
fn set_time(path: &Path, seconds: i64) -> Result<()> {
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))?;
    let t = libc::timespec {
        tv_sec: seconds,
        tv_nsec: 0,
    };
    // SAFETY: `name` is a valid C string and `times` two valid timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            name.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting the time of {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtime(path: &Path) -> i64 {
        std::fs::symlink_metadata(path).unwrap().mtime()
    }

    #[test]
    fn made_paths_take_the_newest_older_time_and_older_ones_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("usr/share")).unwrap();
        let packaged = tree.join("usr/share/old");
        let newer_packaged = tree.join("usr/share/newer");
        std::fs::write(&packaged, "from a package").unwrap();
        std::fs::write(&newer_packaged, "from a package").unwrap();
        set_time(&packaged, 1_600_000_000).unwrap();
        set_time(&newer_packaged, 1_650_000_000).unwrap();
        let made = tree.join("usr/made");
        std::fs::write(&made, "made by the step").unwrap();
        let link = tree.join("link");
        std::os::unix::fs::symlink("usr/made", &link).unwrap();
        let started = crate::store::now() - 5;

        let epoch = date_made_files(&tree, started, 1_500_000_000).unwrap();
        assert_eq!(epoch, 1_650_000_000);
        assert_eq!(mtime(&packaged), 1_600_000_000);
        assert_eq!(mtime(&newer_packaged), 1_650_000_000);
        for p in [&made, &link, &tree, &tree.join("usr")] {
            assert_eq!(mtime(p), 1_650_000_000, "{}", p.display());
        }
    }

    #[test]
    fn a_layer_newer_below_keeps_the_time_of_the_layer_below() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let packaged = tree.join("old");
        std::fs::write(&packaged, "").unwrap();
        set_time(&packaged, 1_600_000_000).unwrap();
        std::fs::write(tree.join("made"), "").unwrap();
        let started = crate::store::now() - 5;

        let epoch = date_made_files(&tree, started, 1_700_000_000).unwrap();
        assert_eq!(epoch, 1_700_000_000);
        assert_eq!(mtime(&tree.join("made")), 1_700_000_000);
        assert_eq!(mtime(&packaged), 1_600_000_000);
        // Dating again changes nothing: every time is now before the start.
        assert_eq!(
            date_made_files(&tree, started, 1_700_000_000).unwrap(),
            epoch
        );
    }
}
