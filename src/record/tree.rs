//! One entry per path of a root filesystem, and the difference between two
//! such lists.
//!
//! The same walk describes the merged tree at assembly (stored as
//! `images-v1/<key>/files.json` and copied into the manifest), a root tree
//! dumped from a built disk, and a live system's `/`; [`compare`] then says
//! what was modified, added or removed. Modification times are recorded
//! (clamped as they are in the image, which helps find the first difference
//! between two builds) but never compared: a live system touches them.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plan::key::file_digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

/// One path of a root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Absolute inside the image: `/`, `/etc`, `/etc/passwd`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky, in octal (`0755`).
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// Bytes, for regular files (0 otherwise).
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `major:minor` of a device node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Seconds since the epoch, as the image stores it.
    pub mtime: i64,
}

/// Walk `root` without following symlinks, skipping every path (and what is
/// under it) for which `skip` is true. Sorted by path.
pub fn walk(root: &Path, skip: &dyn Fn(&str) -> bool) -> Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    // Regular files are hashed after the walk, on every core.
    let mut to_hash: Vec<(usize, PathBuf)> = Vec::new();
    let meta =
        std::fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    out.push(entry("/".to_owned(), root, &meta)?);
    let mut dirs = vec![("".to_owned(), root.to_path_buf())];
    while let Some((rel, dir)) = dirs.pop() {
        let listing =
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for item in listing {
            let item = item.with_context(|| format!("listing {}", dir.display()))?;
            let name = item.file_name();
            let path = format!("{rel}/{}", name.to_string_lossy());
            if skip(&path) {
                continue;
            }
            let host = item.path();
            let meta = std::fs::symlink_metadata(&host)
                .with_context(|| format!("reading {}", host.display()))?;
            if meta.is_dir() {
                dirs.push((path.clone(), host.clone()));
            }
            if meta.is_file() {
                to_hash.push((out.len(), host.clone()));
            }
            out.push(entry(path, &host, &meta)?);
        }
    }
    for ((i, _), digest) in to_hash.iter().zip(hash_files(&to_hash)) {
        out[*i].sha256 = Some(digest?);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The sha256 of each file, in order, hashed by one thread per core.
fn hash_files(files: &[(usize, PathBuf)]) -> Vec<Result<String>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut digests: Vec<Option<Result<String>>> = Vec::new();
    digests.resize_with(files.len(), || None);
    let done = std::sync::Mutex::new(&mut digests);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((_, host)) = files.get(i) else {
                    return;
                };
                let digest =
                    file_digest(host).with_context(|| format!("hashing {}", host.display()));
                done.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(digest);
            });
        }
    });
    digests
        .into_iter()
        .map(|d| d.expect("every file was hashed"))
        .collect()
}

fn entry(path: String, host: &Path, meta: &std::fs::Metadata) -> Result<FileEntry> {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::Char
    } else if ft.is_block_device() {
        Kind::Block
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let target = match kind {
        Kind::Symlink => Some(
            std::fs::read_link(host)
                .with_context(|| format!("reading the link {}", host.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        _ => None,
    };
    let device = match kind {
        Kind::Char | Kind::Block => {
            let rdev = meta.rdev();
            Some(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
        }
        _ => None,
    };
    Ok(FileEntry {
        path,
        kind,
        mode: format!("{:04o}", meta.mode() & 0o7777),
        uid: meta.uid(),
        gid: meta.gid(),
        size: if kind == Kind::File { meta.len() } else { 0 },
        // Filled in by `walk` once every file is listed.
        sha256: None,
        target,
        device,
        mtime: meta.mtime(),
    })
}

/// Whether `path` is `prefix` or lies under it. A `prefix` ending in `*`
/// covers every path that starts with what comes before the `*`
/// (`/etc/ssh/ssh_host_*`).
pub fn under(path: &str, prefix: &str) -> bool {
    if let Some(start) = prefix.strip_suffix('*') {
        return path.starts_with(start);
    }
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// A path whose metadata or content differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Modified {
    pub path: String,
    /// What differs: `content`, `type`, `mode 0644 -> 0600`, `uid 0 -> 33`, …
    pub changes: Vec<String>,
}

/// What differs between the expected and the actual tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Differences {
    pub modified: Vec<Modified>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Differences {
    pub fn is_empty(&self) -> bool {
        self.modified.is_empty() && self.added.is_empty() && self.removed.is_empty()
    }
}

/// Compare two walks, ignoring paths for which `ignore` is true. With
/// `times`, modification times count too (for comparing two builds).
pub fn compare(
    expected: &[FileEntry],
    actual: &[FileEntry],
    ignore: &dyn Fn(&str) -> bool,
    times: bool,
) -> Differences {
    let want: BTreeMap<&str, &FileEntry> = expected
        .iter()
        .filter(|e| !ignore(&e.path))
        .map(|e| (e.path.as_str(), e))
        .collect();
    let have: BTreeMap<&str, &FileEntry> = actual
        .iter()
        .filter(|e| !ignore(&e.path))
        .map(|e| (e.path.as_str(), e))
        .collect();
    let mut diff = Differences::default();
    for (path, w) in &want {
        match have.get(path) {
            None => diff.removed.push((*path).to_owned()),
            Some(h) => {
                let changes = entry_changes(w, h, times);
                if !changes.is_empty() {
                    diff.modified.push(Modified {
                        path: (*path).to_owned(),
                        changes,
                    });
                }
            }
        }
    }
    diff.added = have
        .keys()
        .filter(|p| !want.contains_key(*p))
        .map(|p| (*p).to_owned())
        .collect();
    diff
}

fn entry_changes(w: &FileEntry, h: &FileEntry, times: bool) -> Vec<String> {
    let mut changes = Vec::new();
    if w.kind != h.kind {
        changes.push(format!("type {:?} -> {:?}", w.kind, h.kind).to_lowercase());
        return changes;
    }
    if w.sha256 != h.sha256 {
        changes.push("content".to_owned());
    }
    if w.size != h.size {
        changes.push(format!("size {} -> {}", w.size, h.size));
    }
    if w.target != h.target {
        changes.push(format!(
            "target {} -> {}",
            w.target.as_deref().unwrap_or(""),
            h.target.as_deref().unwrap_or("")
        ));
    }
    if w.device != h.device {
        changes.push(format!(
            "device {} -> {}",
            w.device.as_deref().unwrap_or(""),
            h.device.as_deref().unwrap_or("")
        ));
    }
    if w.mode != h.mode {
        changes.push(format!("mode {} -> {}", w.mode, h.mode));
    }
    if w.uid != h.uid {
        changes.push(format!("uid {} -> {}", w.uid, h.uid));
    }
    if w.gid != h.gid {
        changes.push(format!("gid {} -> {}", w.gid, h.gid));
    }
    if times && w.mtime != h.mtime {
        changes.push(format!("mtime {} -> {}", w.mtime, h.mtime));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, sha: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind: Kind::File,
            mode: "0644".into(),
            uid: 0,
            gid: 0,
            size: 1,
            sha256: Some(sha.into()),
            target: None,
            device: None,
            mtime: 1,
        }
    }

    #[test]
    fn under_matches_whole_components() {
        assert!(under("/var", "/var"));
        assert!(under("/var/lib/x", "/var/"));
        assert!(!under("/variable", "/var"));
        assert!(under(
            "/etc/ssh/ssh_host_rsa_key.pub",
            "/etc/ssh/ssh_host_*"
        ));
        assert!(!under("/etc/ssh/sshd_config", "/etc/ssh/ssh_host_*"));
        assert!(under("/anything", "/"));
    }

    #[test]
    fn compare_reports_modified_added_removed_and_ignores() {
        let want = vec![
            file("/etc/a", "1"),
            file("/etc/b", "2"),
            file("/var/log/x", "3"),
        ];
        let mut changed = file("/etc/a", "9");
        changed.mode = "0600".into();
        changed.mtime = 5;
        let have = vec![changed, file("/usr/new", "4"), file("/var/log/x", "7")];
        let d = compare(&want, &have, &|p| under(p, "/var"), false);
        assert_eq!(
            d.modified,
            vec![Modified {
                path: "/etc/a".into(),
                changes: vec!["content".into(), "mode 0644 -> 0600".into()]
            }]
        );
        assert_eq!(d.added, vec!["/usr/new".to_owned()]);
        assert_eq!(d.removed, vec!["/etc/b".to_owned()]);
        let d = compare(&want[..1], &[file("/etc/a", "1")], &|_| false, true);
        assert!(d.is_empty());
    }

    #[test]
    fn walk_describes_files_links_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/hello"), "hi\n").unwrap();
        std::os::unix::fs::symlink("hello", dir.path().join("etc/link")).unwrap();
        std::fs::create_dir_all(dir.path().join("proc/1")).unwrap();
        let entries = walk(dir.path(), &|p| under(p, "/proc")).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/", "/etc", "/etc/hello", "/etc/link"]);
        assert_eq!(
            entries[2].sha256.as_deref(),
            Some("98ea6e4f216f2fb4b69fff9b3a44842c38686ca685f3f55dc48c5d3fb1107be4")
        );
        assert_eq!(entries[2].size, 3);
        assert_eq!(entries[3].target.as_deref(), Some("hello"));
        assert_eq!(entries[1].kind, Kind::Dir);
    }
}
