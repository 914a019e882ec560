//! Sealed images (`[image] verity = true`): the root filesystem under a
//! dm-verity hash tree, which the guest's kernel checks on every read.
//!
//! `veritysetup format` works on plain files (no device-mapper, no loop
//! device): the root ext4 is written to its own file, the hash tree to
//! another, and both are copied into the disk. The salt and the hash
//! tree's UUID come from the image key, so the same layers give the same
//! root hash. As the Discoverable Partitions Specification and
//! systemd-repart have it, the data partition's GPT UUID is the first 128
//! bits of the root hash and the hash partition's the last 128, so
//! `roothash=` on the kernel command line alone finds both (systemd's
//! veritysetup generator, in a systemd initrd).

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
/// The device-mapper name systemd gives the verity root (`roothash=`).
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

    /// The kernel arguments that open and mount the verity root.
    pub fn cmdline(&self) -> String {
        format!(
            "root={MAPPER_ROOT} roothash={} systemd.verity_root_options={}",
            self.root_hash, self.options
        )
    }
}

/// The salt of the hash tree: 32 bytes derived from the image key (hex).
pub fn salt(key: Key) -> String {
    let mut h = Sha256::new();
    h.update(key.hex().as_bytes());
    h.update(b"root-verity-salt");
    hex(&h.finalize())
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
    let uuid = |x: &str| {
        format!(
            "{}-{}-{}-{}-{}",
            &x[0..8],
            &x[8..12],
            &x[12..16],
            &x[16..20],
            &x[20..32]
        )
    };
    Ok((uuid(&h[..32]), uuid(&h[h.len() - 32..])))
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
/// root hash.
pub fn format(data: &Path, hash: &Path, key: Key) -> Result<String> {
    std::fs::File::create(hash).with_context(|| format!("creating {}", hash.display()))?;
    let out = Cmd::new("veritysetup")
        .args(["format", "--hash=sha256"])
        .arg(format!("--data-block-size={BLOCK}"))
        .arg(format!("--hash-block-size={BLOCK}"))
        .arg(format!("--salt={}", salt(key)))
        .arg(format!("--uuid={}", key.derive_uuid("root-verity")))
        .arg(data)
        .arg(hash)
        .output()
        .context(
            "writing the root's dm-verity hash tree (veritysetup, Debian package cryptsetup-bin)",
        )?;
    parse_root_hash(&out.stdout_str()).context("veritysetup format printed no root hash")
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

/// Copy all of `src` into `dest` at byte `offset` (all-zero blocks of
/// `src` are skipped: `dest` is a new sparse file there).
pub fn copy_into(src: &Path, dest: &Path, offset: u64) -> Result<()> {
    let len = std::fs::metadata(src)
        .with_context(|| format!("reading {}", src.display()))?
        .len();
    copy_range(src, 0, len, dest, offset)
}

/// Copy `len` bytes of `src` from byte `offset` to the new sparse file
/// `dest`.
pub fn copy_out(src: &Path, offset: u64, len: u64, dest: &Path) -> Result<()> {
    std::fs::File::create(dest)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("creating {}", dest.display()))?;
    copy_range(src, offset, len, dest, 0)
}

/// Copy `len` bytes at `from_at` in `src` to `to_at` in the existing
/// `dest`, writing only blocks that are not all zeros.
fn copy_range(src: &Path, from_at: u64, len: u64, dest: &Path, to_at: u64) -> Result<()> {
    let mut from =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    from.seek(SeekFrom::Start(from_at))
        .with_context(|| format!("reading {}", src.display()))?;
    let mut from = from.take(len);
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = to_at;
    loop {
        let n =
            read_full(&mut from, &mut buf).with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            to.seek(SeekFrom::Start(at))
                .and_then(|_| to.write_all(&buf[..n]))
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        at += n as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(salt(a), salt(a));
        assert_ne!(salt(a), salt(b));
        assert_eq!(salt(a).len(), 64);
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
        copy_into(&src, &disk, 1 << 20).unwrap();
        let back = dir.path().join("back");
        copy_out(&disk, 1 << 20, 3 << 20, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 << 20);
    }
}
