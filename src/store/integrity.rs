//! What a store entry looked like when it was published, so that a changed
//! entry is never used.
//!
//! At publish, [`seal`] walks the entry (`tree/` and `entry.json` of a layer,
//! the disk and `image.json` of an image) and writes `integrity.json` with
//! two digests over it, in one walk:
//!
//! * `meta`: every path (sorted bytewise), its type, permission bits, owner
//!   and group, extended attributes (overlayfs keeps opaque-directory marks
//!   there), a file's size, a symlink's target and a device's number
//!   (overlayfs whiteouts are 0:0 character devices). No content is read.
//! * `content`: the same records plus the sha256 of every regular file.
//!
//! Timestamps, inode numbers, link counts and directory sizes are left out:
//! they change when nothing that matters does (copying a store, a `touch`).
//!
//! Before a cached entry is used, the build recomputes `meta` ([`check`]
//! with [`Depth::Meta`]): that catches a deleted, added, truncated,
//! re-owned or re-moded file and costs a walk with `lstat` (no reads).
//! `kiln cache verify` recomputes `content` ([`Depth::Content`]), which also
//! catches a same-size change to a file's bytes. The measured costs are in
//! the README.
//!
//! The names an entry is sealed over are listed in `integrity.json`
//! (`covers`), so a file added beside them later (by a later stage writing a
//! report into an image's dir) does not make the entry look corrupt.
//!
//! An entry without a valid seal (no `integrity.json`, an unreadable one, or
//! one of another version) is corrupt, like one whose digests differ:
//! damage that takes the seal with it must not turn into a "good" entry by
//! being sealed as found. The only entries ever sealed after publishing are
//! those of a store written before kiln sealed entries, once, by the
//! migration in [`super::Store::open`].

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plan::key::hex;

pub const FILE: &str = "integrity.json";
/// Bump when the record format below changes. An entry sealed with another
/// version is corrupt (rebuilt): a new format must come with its own
/// migration, or the rebuild is the price of the change.
pub const VERSION: u32 = 1;
/// Names at an entry's top level that are never sealed: the seal itself and
/// a live run's claim on a staging dir.
const NOT_SEALED: &[&str] = &[FILE, super::CLAIM];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub version: u32,
    /// The top-level names of the entry that the digests cover.
    pub covers: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    pub meta: String,
    pub content: String,
    pub sealed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Metadata and sizes only.
    Meta,
    /// Metadata and every file's content.
    Content,
}

/// The result of checking an entry against its seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact,
    Corrupt(String),
}

/// Whether an entry carries a seal [`check`] can use.
#[derive(Debug)]
pub enum SealState {
    Valid(Seal),
    /// No `integrity.json` at all: what an entry published before kiln
    /// sealed entries looks like (and what deleting the seal looks like).
    Missing,
    /// An `integrity.json` that cannot be read, parsed, or is of another
    /// version; the reason.
    Invalid(String),
}

struct Digests {
    files: u64,
    bytes: u64,
    meta: String,
    content: Option<String>,
}

/// Compute the seal of `entry` (a staging dir about to be published) and
/// write it there as `integrity.json`.
pub fn seal(entry: &Path) -> Result<Seal> {
    seal_with(entry, &[])
}

/// [`seal`], taking the sha256 of some files from `known` (a path relative
/// to `entry`, and its sha256 in hex) instead of reading them again: for a
/// disk that kiln hashed itself a moment before, in its own staging dir.
/// Reading a 2 GiB disk twice was most of an export's time.
pub fn seal_with(entry: &Path, known: &[(&Path, &str)]) -> Result<Seal> {
    let covers = top_level(entry)?;
    let known = known
        .iter()
        .map(|(rel, sha)| Ok((rel.to_path_buf(), unhex(sha)?)))
        .collect::<Result<Vec<_>>>()?;
    let d = digest(entry, &covers, Depth::Content, known)?;
    let seal = Seal {
        version: VERSION,
        covers,
        files: d.files,
        bytes: d.bytes,
        meta: d.meta,
        content: d.content.expect("content depth"),
        sealed: super::now(),
    };
    super::write_json_atomic(&entry.join(FILE), &seal)?;
    Ok(seal)
}

pub fn read_seal(entry: &Path) -> SealState {
    let path = entry.join(FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SealState::Missing,
        Err(e) => return SealState::Invalid(format!("{FILE} cannot be read ({e})")),
    };
    // The version first, so a seal of another format is named as such
    // rather than as unparsable.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    match serde_json::from_slice::<Versioned>(&text) {
        Ok(v) if v.version != VERSION => {
            return SealState::Invalid(format!(
                "{FILE} is of version {}, this kiln writes version {VERSION}",
                v.version
            ))
        }
        Ok(_) => {}
        Err(e) => return SealState::Invalid(format!("{FILE} is not a seal ({e})")),
    }
    match serde_json::from_slice::<Seal>(&text) {
        Ok(seal) => SealState::Valid(seal),
        Err(e) => SealState::Invalid(format!("{FILE} is not a seal ({e})")),
    }
}

/// Recompute an entry's digests to `depth` and compare with its seal.
pub fn check(entry: &Path, depth: Depth) -> Result<Verdict> {
    let seal = match read_seal(entry) {
        SealState::Valid(seal) => seal,
        SealState::Missing => return Ok(Verdict::Corrupt(format!("{FILE} is missing"))),
        SealState::Invalid(why) => return Ok(Verdict::Corrupt(why)),
    };
    for name in &seal.covers {
        if std::fs::symlink_metadata(entry.join(name)).is_err() {
            return Ok(Verdict::Corrupt(format!("`{name}` is missing")));
        }
    }
    let d = digest(entry, &seal.covers, depth, Vec::new())?;
    if d.files != seal.files {
        return Ok(Verdict::Corrupt(format!(
            "{} paths where {} were sealed",
            d.files, seal.files
        )));
    }
    if d.bytes != seal.bytes {
        return Ok(Verdict::Corrupt(format!(
            "{} bytes of files where {} were sealed",
            d.bytes, seal.bytes
        )));
    }
    if d.meta != seal.meta {
        return Ok(Verdict::Corrupt(
            "a path's type, mode, owner, size, link target or xattrs changed".into(),
        ));
    }
    if let Some(content) = d.content {
        if content != seal.content {
            return Ok(Verdict::Corrupt(
                "a file's content changed (same names and sizes)".into(),
            ));
        }
    }
    Ok(Verdict::Intact)
}

/// The entry's top-level names that a seal covers, sorted.
fn top_level(entry: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(entry)
        .with_context(|| format!("reading {}", entry.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", entry.display()))?;
    names.retain(|n| !NOT_SEALED.contains(&n.as_str()));
    names.sort();
    Ok(names)
}

fn unhex(text: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        bail!("`{text}` is not a sha256 in hex");
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .with_context(|| format!("`{text}` is not a sha256 in hex"))?;
    }
    Ok(out)
}

fn digest(
    entry: &Path,
    covers: &[String],
    depth: Depth,
    known: Vec<(PathBuf, [u8; 32])>,
) -> Result<Digests> {
    let mut w = Walker {
        meta: Sha256::new(),
        content: (depth == Depth::Content).then(Sha256::new),
        files: 0,
        bytes: 0,
        buf: vec![0; 1 << 20],
        known,
    };
    for name in covers {
        w.visit(entry, Path::new(name))?;
    }
    Ok(Digests {
        files: w.files,
        bytes: w.bytes,
        meta: hex(&w.meta.finalize()),
        content: w.content.map(|c| hex(&c.finalize())),
    })
}

struct Walker {
    meta: Sha256,
    content: Option<Sha256>,
    files: u64,
    bytes: u64,
    buf: Vec<u8>,
    /// Files whose sha256 the caller already has (see [`seal_with`]).
    known: Vec<(PathBuf, [u8; 32])>,
}

impl Walker {
    /// Feed one field: a tag, the length, the bytes (so no two different
    /// sequences of fields encode alike).
    fn field(&mut self, tag: u8, bytes: &[u8]) {
        for h in std::iter::once(&mut self.meta).chain(self.content.as_mut()) {
            h.update([tag]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
    }

    fn visit(&mut self, root: &Path, rel: &Path) -> Result<()> {
        let path = root.join(rel);
        let m = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ft = m.file_type();
        self.files += 1;
        self.field(b'p', rel.as_os_str().as_bytes());
        let kind = if ft.is_dir() {
            b'd'
        } else if ft.is_file() {
            b'f'
        } else if ft.is_symlink() {
            b'l'
        } else if ft.is_char_device() {
            b'c'
        } else if ft.is_block_device() {
            b'b'
        } else if ft.is_fifo() {
            b'p'
        } else {
            b's'
        };
        self.field(b't', &[kind]);
        self.field(b'm', &(m.mode() & 0o7777).to_le_bytes());
        self.field(
            b'o',
            &[m.uid().to_le_bytes(), m.gid().to_le_bytes()].concat(),
        );
        for (name, value) in xattrs(&path)? {
            self.field(b'x', &name);
            self.field(b'v', &value);
        }
        match kind {
            b'f' => {
                self.bytes += m.len();
                self.field(b's', &m.len().to_le_bytes());
                if self.content.is_some() {
                    let sum = match self.known.iter().find(|(k, _)| k == rel) {
                        Some((_, sum)) => *sum,
                        None => self.file_sha256(&path)?,
                    };
                    if let Some(c) = self.content.as_mut() {
                        c.update(b"h");
                        c.update(sum);
                    }
                }
            }
            b'l' => {
                let target = std::fs::read_link(&path)
                    .with_context(|| format!("reading the link {}", path.display()))?;
                self.field(b'l', target.as_os_str().as_bytes());
            }
            b'c' | b'b' => self.field(b'r', &m.rdev().to_le_bytes()),
            b'd' => {
                let mut names: Vec<_> = std::fs::read_dir(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<std::io::Result<_>>()
                    .with_context(|| format!("reading {}", path.display()))?;
                names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                for name in names {
                    self.visit(root, &rel.join(name))?;
                }
                // Marks the end of a directory, so moving a file up a level
                // changes the digest even if the sorted paths would not.
                self.field(b'e', b"");
            }
            _ => {}
        }
        Ok(())
    }

    fn file_sha256(&mut self, path: &Path) -> Result<[u8; 32]> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut h = Sha256::new();
        loop {
            let n = file
                .read(&mut self.buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&self.buf[..n]);
        }
        Ok(h.finalize().into())
    }
}

/// A path's extended attributes (not following symlinks), sorted by name.
fn xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    let names = xattr_call(path, |buf, len| {
        // SAFETY: valid C string; buf is null (size query) or `len` writable bytes.
        unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) }
    })?;
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split at NUL");
        let value = xattr_call(path, |buf, len| {
            // SAFETY: as above.
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        })?;
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// The size-query-then-read dance of the xattr syscalls, retried if the
/// value grew in between.
fn xattr_call(path: &Path, call: impl Fn(*mut u8, usize) -> isize) -> Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(err)
                .with_context(|| format!("reading the extended attributes of {}", path.display()));
        }
        let mut buf = vec![0u8; size as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err)
                .with_context(|| format!("reading the extended attributes of {}", path.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn entry() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc/sub")).unwrap();
        std::fs::write(tree.join("etc/a.conf"), "alpha\n").unwrap();
        std::fs::write(tree.join("etc/sub/b"), "bravo\n").unwrap();
        std::os::unix::fs::symlink("a.conf", tree.join("etc/link")).unwrap();
        std::fs::write(dir.path().join("entry.json"), "{}").unwrap();
        dir
    }

    #[test]
    fn a_known_digest_seals_like_reading_the_file() {
        let e = entry();
        let read = seal(e.path()).unwrap();
        let sha = crate::plan::key::file_digest(&e.path().join("entry.json")).unwrap();
        let known = seal_with(e.path(), &[(Path::new("entry.json"), &sha)]).unwrap();
        assert_eq!(known.content, read.content);
        // A wrong digest gives another seal, which the next check rejects.
        let wrong = "00".repeat(32);
        seal_with(e.path(), &[(Path::new("entry.json"), &wrong)]).unwrap();
        assert!(matches!(
            check(e.path(), Depth::Content).unwrap(),
            Verdict::Corrupt(_)
        ));
        assert!(seal_with(e.path(), &[(Path::new("entry.json"), "xyz")]).is_err());
    }

    #[test]
    fn an_untouched_entry_is_intact_at_both_depths() {
        let e = entry();
        let s = seal(e.path()).unwrap();
        assert_eq!(s.covers, ["entry.json", "tree"]);
        assert_eq!(s.files, 7);
        assert_eq!(check(e.path(), Depth::Meta).unwrap(), Verdict::Intact);
        assert_eq!(check(e.path(), Depth::Content).unwrap(), Verdict::Intact);
    }

    #[test]
    fn timestamps_and_later_files_beside_the_covered_ones_do_not_matter() {
        let e = entry();
        seal(e.path()).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(e.path().join("tree/etc/a.conf"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        std::fs::write(e.path().join("manifest.json"), "{}").unwrap();
        assert_eq!(check(e.path(), Depth::Content).unwrap(), Verdict::Intact);
    }

    #[test]
    fn every_kind_of_change_is_caught() {
        type Change = fn(&Path);
        let cases: &[(&str, Change, Depth)] = &[
            (
                "deleted file",
                |t| std::fs::remove_file(t.join("etc/sub/b")).unwrap(),
                Depth::Meta,
            ),
            (
                "added file",
                |t| std::fs::write(t.join("etc/new"), "").unwrap(),
                Depth::Meta,
            ),
            (
                "truncated file",
                |t| std::fs::write(t.join("etc/a.conf"), "al").unwrap(),
                Depth::Meta,
            ),
            (
                "chmod",
                |t| {
                    std::fs::set_permissions(
                        t.join("etc/a.conf"),
                        std::fs::Permissions::from_mode(0o600),
                    )
                    .unwrap()
                },
                Depth::Meta,
            ),
            (
                "chown",
                |t| std::os::unix::fs::lchown(t.join("etc/a.conf"), Some(4242), None).unwrap(),
                Depth::Meta,
            ),
            (
                "retargeted link",
                |t| {
                    std::fs::remove_file(t.join("etc/link")).unwrap();
                    std::os::unix::fs::symlink("sub/b", t.join("etc/link")).unwrap();
                },
                Depth::Meta,
            ),
            (
                "moved up a level",
                |t| std::fs::rename(t.join("etc/sub/b"), t.join("etc/b")).unwrap(),
                Depth::Meta,
            ),
            (
                "same-size byte flip",
                |t| std::fs::write(t.join("etc/a.conf"), "alphA\n").unwrap(),
                Depth::Content,
            ),
            (
                "whole tree gone",
                |t| std::fs::remove_dir_all(t).unwrap(),
                Depth::Meta,
            ),
        ];
        for (what, change, depth) in cases {
            let e = entry();
            seal(e.path()).unwrap();
            change(&e.path().join("tree"));
            let v = check(e.path(), *depth).unwrap();
            assert!(matches!(v, Verdict::Corrupt(_)), "{what}: {v:?}");
        }
    }

    #[test]
    fn a_same_size_flip_passes_the_meta_check_only() {
        let e = entry();
        seal(e.path()).unwrap();
        std::fs::write(e.path().join("tree/etc/a.conf"), "alphA\n").unwrap();
        assert_eq!(check(e.path(), Depth::Meta).unwrap(), Verdict::Intact);
        assert!(matches!(
            check(e.path(), Depth::Content).unwrap(),
            Verdict::Corrupt(_)
        ));
    }

    #[test]
    fn an_entry_without_a_valid_seal_is_corrupt() {
        type Damage = fn(&Path);
        let cases: &[(&str, Damage, &str)] = &[
            (
                "deleted",
                |p| std::fs::remove_file(p).unwrap(),
                "integrity.json is missing",
            ),
            (
                "garbled",
                |p| std::fs::write(p, "{\"version\": 1, \"cov").unwrap(),
                "is not a seal",
            ),
            (
                "another version",
                |p| {
                    let text = std::fs::read_to_string(p).unwrap();
                    let bumped = text.replace("\"version\": 1", "\"version\": 2");
                    assert_ne!(text, bumped);
                    std::fs::write(p, bumped).unwrap()
                },
                "is of version 2",
            ),
            (
                "unreadable",
                |p| {
                    std::fs::remove_file(p).unwrap();
                    std::fs::create_dir(p).unwrap();
                },
                "cannot be read",
            ),
        ];
        for (what, damage, says) in cases {
            let e = entry();
            seal(e.path()).unwrap();
            damage(&e.path().join(FILE));
            for depth in [Depth::Meta, Depth::Content] {
                match check(e.path(), depth).unwrap() {
                    Verdict::Corrupt(why) => assert!(why.contains(says), "{what}: {why}"),
                    v => panic!("{what}: {v:?}"),
                }
            }
        }
    }
}
