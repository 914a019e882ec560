//! Pin the times of every inode of a just-made ext4, in its inode tables.
//!
//! `mke2fs -d` copies each file's atime, mtime and ctime from the tree, and
//! a ctime cannot be set from user space: after mke2fs every inode of the
//! tree gets `t = min(mtime, SOURCE_DATE_EPOCH)` as its mtime, atime and
//! ctime. That used to be one debugfs run of three `sif` commands per path
//! (60,000 commands, each looking its path up from the root: 0.6–0.9 s).
//! Here the inode tables are read once and each inode whose times are not
//! yet `t` is rewritten with its checksum, as debugfs writes it: the same
//! bytes (a unit test compares the two on a tree of files, directories,
//! symlinks and hard links), in a few milliseconds.
//!
//! What debugfs addressed by path is addressed here by inode: the root
//! (inode 2) and every inode in use from the first non-reserved one on (the
//! tree's files, and `lost+found`, which mke2fs made with the build's clock
//! and so is left as it is). The time clamped is the inode's own mtime,
//! which mke2fs copied from the tree: exact for every time from 1970 to
//! 2106 (ext4 without its epoch bits keeps the low 32 bits of a time, and
//! mke2fs 1.47.0 sets none). The caller sets a path whose time lies outside
//! that range with debugfs as before.
//!
//! Only the layout mke2fs writes is read: block groups with descriptors
//! after the superblock (no `meta_bg`), checksummed (`metadata_csum`) or
//! not.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};

const SUPERBLOCK_AT: u64 = 1024;
const MAGIC: u16 = 0xEF53;
const INCOMPAT_META_BG: u32 = 0x0010;
const INCOMPAT_64BIT: u32 = 0x0080;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_GDT_CSUM: u32 = 0x0010;
const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;
const BG_INODE_UNINIT: u16 = 0x0001;
const ROOT_INO: u32 = 2;
/// The inode size of ext2's first revision: the extra fields follow it.
const GOOD_OLD_INODE_SIZE: usize = 128;
/// The low 2 bits of a time's `_extra` field extend its seconds past 2038.
const EPOCH_MASK: u32 = 3;

/// Where each time lives in an inode: its low 32 seconds and its `_extra`
/// field (epoch bits and nanoseconds), as debugfs's `sif` names them.
const TIMES: [(usize, usize); 3] = [(0x08, 0x8C), (0x0C, 0x84), (0x10, 0x88)];
const I_MTIME: usize = 0x10;
const I_LINKS_COUNT: usize = 0x1A;
const I_GENERATION: usize = 0x64;
const I_CHECKSUM_LO: usize = 0x7C;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CHECKSUM_HI: usize = 0x82;

/// Whether [`pin`] gives a path whose mtime in the tree is `mtime` the
/// times debugfs would: mke2fs kept its low 32 bits, which tell it from
/// 1970 to 2106.
pub fn pinned_by_inode(mtime: i64) -> bool {
    (0..1 << 32).contains(&mtime)
}

/// Set the times of the ext4 at `offset` in `image` (see the module docs);
/// `epoch` is SOURCE_DATE_EPOCH. Returns how many inodes changed.
pub fn pin(image: &Path, offset: u64, epoch: u64) -> Result<usize> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let read = |at: u64, len: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset + at)
            .with_context(|| format!("reading {} at {}", image.display(), offset + at))?;
        Ok(buf)
    };
    let sb = Superblock::parse(&read(SUPERBLOCK_AT, 1024)?)
        .with_context(|| format!("the root filesystem in {}", image.display()))?;
    let gdt = read(
        (sb.first_data_block + 1) * sb.block_size,
        sb.groups as usize * sb.desc_size,
    )?;
    let epoch = i64::try_from(epoch).context("SOURCE_DATE_EPOCH is out of range")?;
    let mut changed = 0;
    for group in 0..sb.groups {
        let desc = &gdt[group as usize * sb.desc_size..][..sb.desc_size];
        let table = u64::from(le32(desc, 0x08))
            | if sb.desc_size >= 64 {
                u64::from(le32(desc, 0x28)) << 32
            } else {
                0
            };
        let mut used = sb.inodes_per_group;
        if sb.group_csums {
            if le16(desc, 0x12) & BG_INODE_UNINIT != 0 {
                continue;
            }
            let unused = u32::from(le16(desc, 0x1C))
                | if sb.desc_size >= 64 {
                    u32::from(le16(desc, 0x32)) << 16
                } else {
                    0
                };
            used = used.saturating_sub(unused);
        }
        if used == 0 {
            continue;
        }
        let at = table * sb.block_size;
        let mut inodes = read(at, used as usize * sb.inode_size)?;
        let mut dirty = false;
        for (i, inode) in inodes.chunks_mut(sb.inode_size).enumerate() {
            let ino = group * sb.inodes_per_group + i as u32 + 1;
            if ino != ROOT_INO && ino < sb.first_ino || le16(inode, I_LINKS_COUNT) == 0 {
                continue;
            }
            if pin_inode(inode, ino, epoch, &sb) {
                dirty = true;
                changed += 1;
            }
        }
        if dirty {
            file.write_all_at(&inodes, offset + at)
                .with_context(|| format!("writing {}", image.display()))?;
        }
    }
    Ok(changed)
}

/// What [`pin`] needs of the superblock.
struct Superblock {
    block_size: u64,
    first_data_block: u64,
    inodes_per_group: u32,
    groups: u32,
    inode_size: usize,
    first_ino: u32,
    desc_size: usize,
    /// The descriptors say how much of each inode table is in use.
    group_csums: bool,
    /// The seed of the inode checksums, when there are some.
    csum_seed: Option<u32>,
}

impl Superblock {
    fn parse(sb: &[u8]) -> Result<Superblock> {
        if le16(sb, 0x38) != MAGIC {
            anyhow::bail!("no ext4 superblock");
        }
        let incompat = le32(sb, 0x60);
        let ro_compat = le32(sb, 0x64);
        if incompat & INCOMPAT_META_BG != 0 {
            anyhow::bail!("meta_bg is not supported (mke2fs does not set it for a root this size)");
        }
        let inodes_per_group = le32(sb, 0x28);
        let inode_size = usize::from(le16(sb, 0x58));
        let log_block = le32(sb, 0x18);
        if inodes_per_group == 0 || inode_size < GOOD_OLD_INODE_SIZE || log_block > 6 {
            anyhow::bail!("the superblock is not one mke2fs wrote");
        }
        let metadata_csum = ro_compat & RO_COMPAT_METADATA_CSUM != 0;
        Ok(Superblock {
            block_size: 1024 << log_block,
            first_data_block: u64::from(le32(sb, 0x14)),
            inodes_per_group,
            groups: le32(sb, 0x00).div_ceil(inodes_per_group),
            inode_size,
            first_ino: le32(sb, 0x54),
            desc_size: if incompat & INCOMPAT_64BIT != 0 {
                usize::from(le16(sb, 0xFE)).max(32)
            } else {
                32
            },
            group_csums: metadata_csum || ro_compat & RO_COMPAT_GDT_CSUM != 0,
            csum_seed: metadata_csum.then(|| {
                if incompat & INCOMPAT_CSUM_SEED != 0 {
                    le32(sb, 0x270)
                } else {
                    crc32c(!0, &sb[0x68..0x78])
                }
            }),
        })
    }
}

/// Give one inode `min(mtime, epoch)` as its three times, the way debugfs's
/// `sif` does (low 32 bits, and the epoch bits of `_extra` where the inode
/// has it, its nanoseconds kept), and its checksum again. False when it
/// already had them.
fn pin_inode(inode: &mut [u8], ino: u32, epoch: i64, sb: &Superblock) -> bool {
    let t = i64::from(le32(inode, I_MTIME)).min(epoch);
    let low = t as u32;
    let high = ((t - i64::from(t as i32)) >> 32) as u32 & EPOCH_MASK;
    let extra_isize = if sb.inode_size > GOOD_OLD_INODE_SIZE {
        usize::from(le16(inode, I_EXTRA_ISIZE))
    } else {
        0
    };
    let has = |field: usize| field + 4 <= GOOD_OLD_INODE_SIZE + extra_isize;
    let before = inode.to_vec();
    for (time, extra) in TIMES {
        put32(inode, time, low);
        if has(extra) {
            put32(inode, extra, (le32(inode, extra) & !EPOCH_MASK) | high);
        }
    }
    if inode == before.as_slice() {
        return false;
    }
    if let Some(seed) = sb.csum_seed {
        let has_hi = extra_isize >= I_CHECKSUM_HI + 2 - GOOD_OLD_INODE_SIZE;
        inode[I_CHECKSUM_LO..I_CHECKSUM_LO + 2].fill(0);
        if has_hi {
            inode[I_CHECKSUM_HI..I_CHECKSUM_HI + 2].fill(0);
        }
        let mut crc = crc32c(seed, &ino.to_le_bytes());
        crc = crc32c(crc, &inode[I_GENERATION..I_GENERATION + 4]);
        crc = crc32c(crc, inode);
        inode[I_CHECKSUM_LO..I_CHECKSUM_LO + 2].copy_from_slice(&(crc as u16).to_le_bytes());
        if has_hi {
            inode[I_CHECKSUM_HI..I_CHECKSUM_HI + 2]
                .copy_from_slice(&((crc >> 16) as u16).to_le_bytes());
        }
    }
    true
}

/// CRC-32C (Castagnoli) as e2fsprogs' `ext2fs_crc32c_le` computes it: no
/// inversion before or after, the caller's seed carried on.
fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        t
    });
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn crc32c_is_castagnoli_without_inversions() {
        // The standard check value of CRC-32C ("123456789" → e3069283) is
        // with both inversions; e2fsprogs leaves them to the caller.
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    fn run(cmd: &mut Command) {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    /// Set `path`'s atime and mtime (it is not followed when a symlink).
    fn touch(path: &Path, atime: i64, mtime: i64) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let times = [
            libc::timespec {
                tv_sec: atime,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            },
        ];
        // SAFETY: a valid C string and two timespecs.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(rc, 0, "utimensat {}", path.display());
    }

    /// A tree of files, directories, a symlink and a hard link with the
    /// given mtimes, and debugfs's script that pins its times.
    fn tree_with(dir: &Path, epoch: i64, odd: bool) -> (std::path::PathBuf, String) {
        let tree = dir.join(if odd { "odd-tree" } else { "tree" });
        let mut paths = vec![
            ("etc/", 1_600_000_000),
            ("etc/old", 1_000_000_000),
            ("etc/new", epoch + 5_000),
            ("etc/at-epoch", epoch),
            ("usr/share/doc/a", 1_650_000_000),
            ("usr/share/doc/b", 3_000_000_000),
        ];
        if odd {
            // Times ext4 keeps only with its epoch bits, which mke2fs 1.47.0
            // does not set.
            paths.extend([
                ("var/before-1970", -100_000),
                ("var/after-2106", 5_000_000_000),
            ]);
        }
        for (rel, _) in &paths {
            let p = tree.join(rel);
            if rel.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, rel).unwrap();
            }
        }
        std::fs::hard_link(tree.join("etc/old"), tree.join("usr/old-link")).unwrap();
        std::os::unix::fs::symlink("../etc/new", tree.join("usr/link")).unwrap();
        touch(&tree.join("usr/link"), 1_500_000_000, 1_550_000_000);
        for (rel, mtime) in &paths {
            touch(&tree.join(rel), mtime - 7, *mtime);
        }
        touch(&tree.join("usr/share/doc"), 1, 1_690_000_000);
        let mut script = String::new();
        for entry in crate::record::tree::walk(&tree, &|_| false).unwrap() {
            for field in ["mtime", "atime", "ctime"] {
                let t = entry.mtime.min(epoch);
                script.push_str(&format!(
                    "sif {} {field} @{t}\n",
                    crate::disk::debugfs_quote(&entry.path)
                ));
            }
        }
        (tree, script)
    }

    /// `tree` through mke2fs (with `features`) at an offset in a file, twice:
    /// debugfs runs `script` on one, `pin_times` works on the other (given
    /// the file and the offset); the two must be the same bytes.
    fn same_as_debugfs(
        dir: &Path,
        tree: &Path,
        script: &str,
        epoch: i64,
        features: &str,
        pin_times: impl Fn(&Path, u64),
    ) {
        let made = dir.join("made.img");
        let offset = 3 * 4096;
        std::fs::File::create(&made)
            .unwrap()
            .set_len(offset + (32 << 20))
            .unwrap();
        run(Command::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-O", features])
            .arg("-E")
            .arg(format!("offset={offset},root_owner=0:0,nodiscard"))
            .arg("-d")
            .arg(tree)
            .arg(&made)
            .arg("32768k"));
        let theirs = dir.join("theirs.img");
        std::fs::copy(&made, &theirs).unwrap();
        let script_path = dir.join("times.debugfs");
        std::fs::write(&script_path, script).unwrap();
        let out = Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(format!("{}?offset={offset}", theirs.display()))
            .output()
            .expect("running debugfs (e2fsprogs)");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.lines().all(|l| l.starts_with("debugfs")),
            "debugfs: {said}"
        );
        pin_times(&made, offset);
        assert!(
            std::fs::read(&made).unwrap() == std::fs::read(&theirs).unwrap(),
            "{features}: pinned times differ from debugfs's"
        );
        run(Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(format!("{}?offset={offset}", made.display())));
    }

    #[test]
    fn pinning_writes_the_bytes_debugfs_writes() {
        // e2fsprogs (make deps installs it) is the reference: the same tree
        // through mke2fs, then debugfs's three `sif` per path on one copy
        // and `pin` on the other, with and without a journal and checksums.
        let dir = tempfile::tempdir().unwrap();
        let epoch: i64 = 1_700_000_000;
        let (tree, script) = tree_with(dir.path(), epoch, false);
        for features in ["^has_journal", "has_journal", "^metadata_csum"] {
            same_as_debugfs(dir.path(), &tree, &script, epoch, features, |made, at| {
                let changed = pin(made, at, epoch as u64).unwrap();
                assert!(changed > 5, "{features}: only {changed} inodes changed");
                assert_eq!(pin(made, at, epoch as u64).unwrap(), 0, "{features}");
            });
        }
    }

    #[test]
    fn times_the_inode_cannot_tell_are_set_by_debugfs_after_the_pass() {
        // Assembly's whole step: the pass, then debugfs for the paths whose
        // time lies outside 1970–2106.
        let dir = tempfile::tempdir().unwrap();
        let epoch: i64 = 1_700_000_000;
        let (tree, script) = tree_with(dir.path(), epoch, true);
        let files = crate::record::tree::walk(&tree, &|_| false).unwrap();
        assert_eq!(
            files.iter().filter(|f| !pinned_by_inode(f.mtime)).count(),
            2
        );
        same_as_debugfs(
            dir.path(),
            &tree,
            &script,
            epoch,
            "has_journal",
            |made, at| {
                crate::assemble::set_times(made, at, &files, epoch as u64, dir.path()).unwrap();
            },
        );
    }
}
