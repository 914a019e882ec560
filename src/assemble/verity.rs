//! Sealed images (`[image] verity = true`): the root filesystem under a
//! dm-verity hash tree, which the guest's kernel checks on every read.
//!
//! The root ext4 is written into the disk's root partition, and kiln
//! writes its hash tree into the partition after it (exactly what
//! `veritysetup format` would, without reading the holes: see
//! [`format_at`]); no device-mapper or loop device on the host. The salt and the hash tree's
//! UUID come from the image key, so the same layers give the same root
//! hash. As the Discoverable Partitions Specification and
//! systemd-repart have it, the data partition's GPT UUID is the first 128
//! bits of the root hash and the hash partition's the last 128, so
//! `roothash=` on the kernel command line alone finds both (systemd's
//! veritysetup generator in a systemd initrd, or sealed.toml's
//! initramfs-tools script, `recipes/files/sealed/initramfs-verity-local-top`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::plan::Key;

/// What the kernel does when a block does not match its hash
/// (`systemd.verity_root_options=`). A panic stops the guest at the first
/// bad block with the verity error as the last console lines, which the
/// smoke recognises at once; `restart-on-corruption` would reboot into the
/// same error over and over.
pub const ROOT_OPTIONS: &str = "panic-on-corruption";
/// The device-mapper device the initrd opens the verity root as
/// (`roothash=`; the name systemd's generator gives it too).
pub const MAPPER_ROOT: &str = "/dev/mapper/root";
/// Hash and data block size: the ext4 block size.
const BLOCK: u64 = 4096;

/// A sealed image's verity facts, in its store entry and manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verity {
    /// The root hash (hex), as on the UKI's command line.
    pub root_hash: String,
    /// GPT UUIDs of the data (root) and hash (root-verity) partitions.
    pub data_partition_uuid: String,
    pub hash_partition_uuid: String,
    /// `systemd.verity_root_options=` on the command line.
    pub options: String,
}

impl Verity {
    pub fn new(root_hash: &str) -> Result<Verity> {
        let (data, hash) = partition_uuids(root_hash)?;
        Ok(Verity {
            root_hash: root_hash.to_owned(),
            data_partition_uuid: data,
            hash_partition_uuid: hash,
            options: ROOT_OPTIONS.to_owned(),
        })
    }

    /// The facts of a root hash not known yet, of a root hash's length:
    /// the UKI's command line with it is as long as it will be with the
    /// real one, so the disk can be laid out before the root is hashed.
    pub fn placeholder() -> Verity {
        Verity::new(&"0".repeat(64)).expect("64 hex digits are a root hash")
    }

    /// The kernel arguments that open and mount the verity root.
    pub fn cmdline(&self) -> String {
        format!(
            "root={MAPPER_ROOT} roothash={} systemd.verity_root_options={}",
            self.root_hash, self.options
        )
    }
}

/// The salt of the hash tree: 32 bytes derived from the image key.
fn salt_bytes(key: Key) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key.hex().as_bytes());
    h.update(b"root-verity-salt");
    h.finalize().into()
}

/// The data and hash partition UUIDs for a root hash: its first and last
/// 128 bits, as UUIDs.
pub fn partition_uuids(root_hash: &str) -> Result<(String, String)> {
    let ok = root_hash.len() >= 64
        && root_hash.len().is_multiple_of(2)
        && root_hash.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        anyhow::bail!("`{root_hash}` is not a root hash (at least 64 hex digits)");
    }
    let h = root_hash.to_ascii_lowercase();
    use crate::plan::key::uuid_text;
    Ok((uuid_text(&h[..32]), uuid_text(&h[h.len() - 32..])))
}

/// The `roothash=` of a kernel command line.
pub fn cmdline_root_hash(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("roothash="))
}

/// The root hash of a `dmsetup table` line of a verity target: `0 SECTORS
/// verity VERSION DATA HASH DBS HBS BLOCKS HASH_START ALGORITHM DIGEST
/// SALT [OPTIONS]`.
pub fn table_root_hash(table: &str) -> Option<String> {
    let f: Vec<&str> = table.split_whitespace().collect();
    (f.get(2) == Some(&"verity"))
        .then(|| f.get(11).map(|h| h.to_ascii_lowercase()))
        .flatten()
}

/// Write the hash tree of `data` to `hash` (a new file) and return the
/// root hash: [`format_at`] with each in a file of its own.
pub fn format(data: &Path, hash: &Path, key: Key) -> Result<String> {
    let len = std::fs::metadata(data)
        .with_context(|| format!("reading {}", data.display()))?
        .len();
    std::fs::File::create(hash).with_context(|| format!("creating {}", hash.display()))?;
    format_at(
        Span {
            file: data,
            at: 0,
            len,
        },
        hash,
        0,
        key,
    )
}

/// `len` bytes at byte `at` of `file`.
#[derive(Clone, Copy)]
pub struct Span<'a> {
    pub file: &'a Path,
    pub at: u64,
    pub len: u64,
}

/// The bytes of the hash tree of `data_len` bytes of data: the superblock's
/// block, then each level of hashes in whole blocks.
pub fn tree_size(data_len: u64) -> u64 {
    let per_block = BLOCK / 32;
    let mut blocks = data_len / BLOCK;
    let mut size = BLOCK;
    loop {
        blocks = blocks.div_ceil(per_block);
        size += blocks * BLOCK;
        if blocks <= 1 {
            return size;
        }
    }
}

/// Write the hash tree of `data` at byte `hash_at` of the existing file
/// `hash` (which may be the same file: a disk) and return the root hash:
/// what `veritysetup format --hash=sha256 --data-block-size=4096
/// --hash-block-size=4096 --salt=SALT --uuid=UUID` writes (format version 1,
/// superblock first), byte for byte (a unit test compares the two); the
/// tree takes [`tree_size`] bytes.
///
/// Done here rather than by veritysetup because the root is mostly holes: a
/// 2 GiB root with 300 MB of files would have veritysetup read and hash
/// 2 GiB, where every all-zero block has the same hash, computed once; only
/// the blocks the file system wrote are read.
pub fn format_at(data: Span, hash: &Path, hash_at: u64, key: Key) -> Result<String> {
    let salt = salt_bytes(key);
    let uuid = key.derive_uuid("root-verity");
    let (name, len) = (data.file.display(), data.len);
    if !len.is_multiple_of(BLOCK) || len < 2 * BLOCK || !data.at.is_multiple_of(BLOCK) {
        anyhow::bail!(
            "{name} at {}: {len} bytes, not a whole number (at least 2) of aligned {BLOCK}-byte blocks",
            data.at
        );
    }
    let blocks = len / BLOCK;
    let digest = |block: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(block);
        h.finalize().into()
    };
    let zero_hash = digest(&[0u8; BLOCK as usize]);
    let per_block = (BLOCK / 32) as usize;

    // Level 0 is built where it is stored: packed 128 hashes to a block,
    // every data block's hash at first the hash of a block of zeros (what
    // a hole reads as), then the blocks that hold data hashed in pieces of
    // 1 MiB, one thread per core, straight from the file's pages (mapped,
    // not copied: the raw disk is usually in memory), each thread writing
    // its pieces' hashes into their place.
    let mut level0 = vec![0u8; (blocks as usize).div_ceil(per_block) * BLOCK as usize];
    for h in level0[..blocks as usize * 32].chunks_exact_mut(32) {
        h.copy_from_slice(&zero_hash);
    }
    let file = std::fs::File::open(data.file).with_context(|| format!("opening {name}"))?;
    const PIECE: u64 = 256;
    // (first block, the piece's hashes in level 0), in block order.
    let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
    let mut rest: &mut [u8] = &mut level0;
    let mut rest_from = 0u64; // the block whose hash `rest` starts with
    for (from, to) in data_ranges(&file, data.at, data.at + len)? {
        let (mut b, last) = ((from - data.at) / BLOCK, (to - data.at).div_ceil(BLOCK));
        while b < last {
            let n = (last - b).min(PIECE);
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(((b - rest_from) * 32) as usize);
            let (piece, tail) = tail.split_at_mut((n * 32) as usize);
            pieces.push((b, piece));
            (rest, rest_from) = (tail, b + n);
            b += n;
        }
    }
    let mapped = Mapped::new(&file, data.at, len).with_context(|| format!("mapping {name}"))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queue = std::sync::Mutex::new(pieces.into_iter());
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some((first, hashes)) = next() {
                    let blocks = &mapped.bytes()[(first * BLOCK) as usize..];
                    for (h, block) in hashes
                        .chunks_exact_mut(32)
                        .zip(blocks.chunks(BLOCK as usize))
                    {
                        h.copy_from_slice(&digest(block));
                    }
                }
            });
        }
    });
    drop(mapped);

    // Each level up hashes the blocks of the one below (128 hashes to a
    // block, the last zero-padded), until one block is left: its hash is
    // the root hash. A block equal to the one before it has its hash: the
    // hashes of the root's holes repeat for thousands of blocks.
    let mut stored: Vec<Vec<u8>> = vec![level0];
    let root = loop {
        let below = stored.last().expect("level 0 is there");
        let mut hashes: Vec<u8> = Vec::with_capacity(below.len() / per_block);
        let mut last: Option<(&[u8], [u8; 32])> = None;
        for block in below.chunks(BLOCK as usize) {
            let h = match last {
                Some((same, h)) if same == block => h,
                _ => digest(block),
            };
            last = Some((block, h));
            hashes.extend_from_slice(&h);
        }
        if hashes.len() == 32 {
            break hashes;
        }
        hashes.resize(hashes.len().div_ceil(BLOCK as usize) * BLOCK as usize, 0);
        stored.push(hashes);
    };
    // The superblock's block, then the levels top first.
    let mut superblock = superblock(&uuid, &salt, blocks)?;
    superblock.resize(BLOCK as usize, 0);
    use std::os::unix::fs::FileExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open(hash)
        .with_context(|| format!("writing {}", hash.display()))?;
    let mut at = hash_at;
    for bytes in std::iter::once(&superblock).chain(stored.iter().rev()) {
        out.write_all_at(bytes, at)
            .with_context(|| format!("writing {}", hash.display()))?;
        at += bytes.len() as u64;
    }
    debug_assert_eq!(at - hash_at, tree_size(len));
    Ok(hex(&root))
}

/// The 512-byte dm-verity superblock (cryptsetup's `struct verity_sb`,
/// little-endian): signature, version 1, hash type 1 (salt first), UUID,
/// algorithm, block sizes, data blocks, salt.
fn superblock(uuid: &str, salt: &[u8; 32], data_blocks: u64) -> Result<Vec<u8>> {
    let uuid: Vec<u8> = (0..16)
        .map(|i| {
            let hex = uuid.replace('-', "");
            u8::from_str_radix(hex.get(i * 2..i * 2 + 2).unwrap_or("x"), 16)
        })
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("`{uuid}` is not a UUID"))?;
    let mut sb = Vec::with_capacity(512);
    sb.extend_from_slice(b"verity\0\0");
    sb.extend_from_slice(&1u32.to_le_bytes());
    sb.extend_from_slice(&1u32.to_le_bytes());
    sb.extend_from_slice(&uuid);
    let mut algorithm = [0u8; 32];
    algorithm[..6].copy_from_slice(b"sha256");
    sb.extend_from_slice(&algorithm);
    sb.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    sb.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    sb.extend_from_slice(&data_blocks.to_le_bytes());
    sb.extend_from_slice(&(salt.len() as u16).to_le_bytes());
    sb.extend_from_slice(&[0u8; 6]);
    let mut salt_field = [0u8; 256];
    salt_field[..salt.len()].copy_from_slice(salt);
    sb.extend_from_slice(&salt_field);
    sb.resize(512, 0);
    Ok(sb)
}

/// `len` bytes of a file from `at` (a multiple of the page size), mapped
/// read-only for as long as this lives.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and never changes owner; sharing
// `&[u8]` views of it between threads is what a `&[u8]` allows anyway.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn new(file: &std::fs::File, at: u64, len: u64) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: a fresh read-only shared mapping of an open file; no
        // existing memory is touched. The file is kiln's own staging file,
        // which nothing truncates while it is mapped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                at as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no view outlives
        // `self` (they borrow it).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The byte ranges of `file` between `from` and `to` that hold data, from
/// `SEEK_DATA`/`SEEK_HOLE`: the rest are holes, which read as zeros.
fn data_ranges(file: &std::fs::File, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at = from;
    while at < to {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole from here on
            }
            // A file system without SEEK_DATA: the rest is data.
            ranges.push((at, to));
            break;
        }
        if data as u64 >= to {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { to } else { (hole as u64).min(to) };
        ranges.push((data as u64, end));
        at = end;
    }
    Ok(ranges)
}

/// The "Root hash:" line of `veritysetup format` or `status`.
pub fn parse_root_hash(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        let v = v.trim();
        (k.trim().eq_ignore_ascii_case("root hash") && !v.is_empty())
            .then(|| v.to_ascii_lowercase())
    })
}

/// Check every block of `data` against the tree in `hash` and `root_hash`
/// (`veritysetup verify`): `None` when all match, else what veritysetup
/// said.
pub fn verify(data: &Path, hash: &Path, root_hash: &str) -> Option<String> {
    Cmd::new("veritysetup")
        .arg("verify")
        .arg(data)
        .arg(hash)
        .arg(root_hash)
        .run()
        .err()
        .map(|e| format!("{e:#}"))
}

/// The granularity at which all-zero data is left out of a copy.
const ZERO_BLOCK: usize = 4096;

/// The byte ranges of `data` made of `block`-sized pieces that are not all
/// zeros, adjacent pieces joined.
fn nonzero_runs(data: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in data.chunks(block).enumerate() {
        if piece.iter().all(|&b| b == 0) {
            continue;
        }
        let (start, end) = (i * block, i * block + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Copy `len` bytes of `src` from byte `offset` to the new sparse file
/// `dest`.
pub fn copy_out(src: &Path, offset: u64, len: u64, dest: &Path) -> Result<()> {
    std::fs::File::create(dest)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("creating {}", dest.display()))?;
    copy_span(
        Span {
            file: src,
            at: offset,
            len,
        },
        dest,
        0,
    )
}

/// Copy `src` to byte `to_at` of the existing `dest`, writing only what
/// `src` holds as data and is not all zeros (`dest` is sparse there).
pub fn copy_span(src: Span, dest: &Path, to_at: u64) -> Result<()> {
    let Span {
        file: src,
        at: from_at,
        len,
    } = src;
    let mut from =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let src_len = from
        .metadata()
        .with_context(|| format!("reading {}", src.display()))?
        .len();
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    let end = (from_at + len).min(src_len);
    let mut buf = vec![0u8; 1 << 20];
    for (start, stop) in data_ranges(&from, from_at, end)? {
        let (start, stop) = (start.max(from_at), stop.min(end));
        if start >= stop {
            continue;
        }
        from.seek(SeekFrom::Start(start))
            .with_context(|| format!("reading {}", src.display()))?;
        let mut at = start;
        while at < stop {
            let n = ((stop - at) as usize).min(buf.len());
            from.read_exact(&mut buf[..n])
                .with_context(|| format!("reading {}", src.display()))?;
            // Runs of 4 KiB blocks that are not all zeros: `dest` stays as
            // sparse as the file system was (a mostly empty block group
            // written whole would make qemu-img read and test its zeros).
            for (run_start, run_end) in nonzero_runs(&buf[..n], ZERO_BLOCK) {
                to.seek(SeekFrom::Start(at - from_at + to_at + run_start as u64))
                    .and_then(|_| to.write_all(&buf[run_start..run_end]))
                    .with_context(|| format!("writing {}", dest.display()))?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_runs_join_adjacent_blocks_and_skip_zero_ones() {
        let mut data = vec![0u8; 10 * 4];
        data[0] = 1; // block 0
        data[5] = 1; // block 1
        data[17] = 1; // block 4
        data[39] = 1; // block 9 (the last)
        assert_eq!(nonzero_runs(&data, 4), vec![(0, 8), (16, 20), (36, 40)]);
        assert_eq!(nonzero_runs(&[0u8; 12], 4), vec![]);
        // A short last piece counts by its own length.
        assert_eq!(nonzero_runs(&[0, 0, 0, 0, 0, 7], 4), vec![(4, 6)]);
    }

    const HASH: &str = "0123456789abcdef0123456789abcdefFEDCBA9876543210fedcba9876543210";

    #[test]
    fn partition_uuids_are_the_halves_of_the_root_hash() {
        let (data, hash) = partition_uuids(HASH).unwrap();
        assert_eq!(data, "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(hash, "fedcba98-7654-3210-fedc-ba9876543210");
        assert!(partition_uuids("abc").is_err());
        assert!(partition_uuids(&"g".repeat(64)).is_err());
    }

    #[test]
    fn cmdline_names_the_mapper_root_and_the_hash() {
        let v = Verity::new(HASH).unwrap();
        let line = v.cmdline();
        assert_eq!(
            line,
            format!(
                "root=/dev/mapper/root roothash={HASH} systemd.verity_root_options=panic-on-corruption"
            )
        );
        assert_eq!(cmdline_root_hash(&format!("ro {line} quiet")), Some(HASH));
        assert_eq!(cmdline_root_hash("root=LABEL=root ro"), None);
    }

    #[test]
    fn salt_comes_from_the_key() {
        let a = Key::parse(&"01".repeat(32)).unwrap();
        let b = Key::parse(&"02".repeat(32)).unwrap();
        assert_eq!(salt_bytes(a), salt_bytes(a));
        assert_ne!(salt_bytes(a), salt_bytes(b));
    }

    #[test]
    fn reads_the_root_hash_of_a_dm_table() {
        let t = format!("0 4194304 verity 1 252:2 252:3 4096 4096 524288 1 sha256 {HASH} 00 1 panic_on_corruption\n");
        assert_eq!(table_root_hash(&t), Some(HASH.to_ascii_lowercase()));
        assert_eq!(table_root_hash("0 4194304 linear 252:2 0"), None);
    }

    #[test]
    fn parses_veritysetup_output() {
        let out = "VERITY header information for x\nUUID:            \tabc\n\
                   Salt:            \t00\nRoot hash:      \tABCDEF\n";
        assert_eq!(parse_root_hash(out).as_deref(), Some("abcdef"));
        assert_eq!(parse_root_hash("Root hash:\n"), None);
    }

    /// A sparse file of `blocks` 4 KiB blocks with data in a few places.
    fn sparse_data(path: &Path, blocks: u64) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(blocks * BLOCK).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        for (n, at) in [0, 1, 7, blocks / 2, blocks - 1].into_iter().enumerate() {
            f.seek(SeekFrom::Start(at * BLOCK + 100)).unwrap();
            f.write_all(format!("block {at} #{n}").repeat(50).as_bytes())
                .unwrap();
        }
    }

    #[test]
    fn the_hash_tree_is_the_one_veritysetup_writes() {
        // veritysetup (cryptsetup-bin; `make deps` installs it) is the
        // reference: same root hash, same hash file, byte for byte, for one,
        // two and three levels of tree.
        let dir = tempfile::tempdir().unwrap();
        let key = Key::parse(&"5a".repeat(32)).unwrap();
        for blocks in [100, 300, 20_000] {
            let data = dir.path().join(format!("data-{blocks}"));
            sparse_data(&data, blocks);
            let ours = dir.path().join(format!("ours-{blocks}"));
            let root = format(&data, &ours, key).unwrap();
            let theirs = dir.path().join(format!("theirs-{blocks}"));
            std::fs::File::create(&theirs).unwrap();
            let out = std::process::Command::new("veritysetup")
                .args(["format", "--hash=sha256"])
                .arg(format!("--data-block-size={BLOCK}"))
                .arg(format!("--hash-block-size={BLOCK}"))
                .arg(format!("--salt={}", hex(&salt_bytes(key))))
                .arg(format!("--uuid={}", key.derive_uuid("root-verity")))
                .arg(&data)
                .arg(&theirs)
                .output()
                .expect("running veritysetup (Debian package cryptsetup-bin)");
            assert!(out.status.success(), "{out:?}");
            let said = parse_root_hash(&String::from_utf8_lossy(&out.stdout));
            assert_eq!(said.as_deref(), Some(root.as_str()), "{blocks} blocks");
            assert!(
                std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                "{blocks} blocks: the hash files differ"
            );
            assert_eq!(
                tree_size(blocks * BLOCK),
                std::fs::metadata(&theirs).unwrap().len()
            );
            assert_eq!(verify(&data, &ours, &root), None);

            // The same data inside a disk, its tree written into the disk
            // after it: the same root hash and tree.
            let disk = dir.path().join(format!("disk-{blocks}"));
            let (data_at, len) = (3 * BLOCK, blocks * BLOCK);
            let hash_at = data_at + len + BLOCK;
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(hash_at + tree_size(len) + BLOCK)
                .unwrap();
            let span = Span {
                file: &data,
                at: 0,
                len,
            };
            copy_span(span, &disk, data_at).unwrap();
            let in_disk = Span {
                file: &disk,
                at: data_at,
                len,
            };
            assert_eq!(format_at(in_disk, &disk, hash_at, key).unwrap(), root);
            let bytes = std::fs::read(&disk).unwrap();
            let at = hash_at as usize;
            assert!(
                bytes[at..at + tree_size(len) as usize] == std::fs::read(&theirs).unwrap()[..],
                "{blocks} blocks: the tree in the disk differs"
            );
        }
    }

    #[test]
    fn copies_keep_holes_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 3 << 20];
        data[5] = 1;
        data[(2 << 20) + 7] = 2;
        std::fs::write(&src, &data).unwrap();
        let disk = dir.path().join("disk");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let all = Span {
            file: &src,
            at: 0,
            len: 3 << 20,
        };
        copy_span(all, &disk, 1 << 20).unwrap();
        let back = dir.path().join("back");
        copy_out(&disk, 1 << 20, 3 << 20, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 << 20);
    }
}
