//! Writing files so that a reader sees the old content or the new, never a
//! half-written one: into a temp file beside the target, fsync, rename
//! (uv's `write_atomic_sync`). Every file kiln publishes goes through here.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Replace `path` with `data` atomically, creating its folder if needed.
/// The file is private to its owner (mode 0600), like every temp file.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, None)
}

/// A record published beside the disk, readable by everyone like the disk
/// (mode 0644), as pretty JSON, atomically.
pub fn publish_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    publish(path, &json(path, value)?)
}

/// A published record's bytes (see [`publish_json`]), as they are.
pub fn publish(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, Some(0o644))
}

fn write_atomic_mode(path: &Path, data: &[u8], mode: Option<u32>) -> Result<()> {
    if holds(path, data, mode) {
        // A no-op build writes the same records again: leave them (no
        // temp file, no fsync, which was most of a no-op's time).
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", tmp.path().display()))?;
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    // On failure the temp file is removed when `tmp` is dropped.
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Whether `path` is a regular file with exactly `data`, and `mode` (when
/// given).
fn holds(path: &Path, data: &[u8], mode: Option<u32>) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    meta.is_file()
        && meta.len() == data.len() as u64
        && mode.is_none_or(|m| meta.permissions().mode() & 0o7777 == m)
        && std::fs::read(path).is_ok_and(|d| d == data)
}

/// `value` as pretty JSON with a final newline, atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &json(path, value)?)
}

/// `value` as the bytes [`publish_json`] writes: pretty JSON and a newline.
pub fn json<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>> {
    let mut data = serde_json::to_vec_pretty(value)
        .with_context(|| format!("serialising {}", path.display()))?;
    data.push(b'\n');
    Ok(data)
}

/// Copy `from` to `to` atomically.
pub fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_atomic(to, &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.json");
        write_json_atomic(&path, &serde_json::json!({"a": 1})).unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn a_published_record_is_world_readable_and_a_private_file_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (public, private) = (dir.path().join("p.json"), dir.path().join("q.json"));
        publish_json(&public, &1).unwrap();
        write_json_atomic(&private, &1).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&public), mode(&private)), (0o644, 0o600));
    }

    #[test]
    fn the_same_bytes_are_not_written_again_but_a_change_or_a_mode_is() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        publish(&path, b"same").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        publish(&path, b"same").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "rewritten");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        publish(&path, b"same").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_ne!(meta.ino(), inode, "a wrong mode is written anew");
        publish(&path, b"other").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"other");
    }

    #[test]
    fn json_ends_with_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        write_json_atomic(&path, &vec![1, 2]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("]\n"), "{text:?}");
    }
}
