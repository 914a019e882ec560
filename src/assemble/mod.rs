//! Assembly: layers → a GPT disk with an ESP holding a UKI and an ext4 root.
//!
//! Nothing is mounted except overlayfs (to see the layers as one tree): the
//! kernel here has no vfat and no device-mapper, so every filesystem is
//! written from files, in place inside one sparse raw disk:
//!
//! ```text
//! sector 0..2048      protective MBR + GPT (sfdisk)
//! ESP                 FAT (mkfs.fat --offset), /EFI/BOOT/BOOTX64.EFI (mtools)
//! root                ext4 filled from the tree (mke2fs -E offset= -d)
//! last 1 MiB          backup GPT
//! ```
//!
//! then `qemu-img convert` makes the qcow2.
//!
//! ## Bit-identical disks
//!
//! The same layers must give the same bytes, whenever and wherever they are
//! assembled (reproducible-builds.org's definition). What would otherwise
//! differ, and what pins it:
//!
//! * identifiers (disk GUID, partition GUIDs, filesystem UUID, ext4 hash
//!   seed, FAT volume id) are derived from the image key;
//! * the clock of every tool that writes a filesystem is the build's
//!   SOURCE_DATE_EPOCH (`E2FSPROGS_FAKE_TIME` for mke2fs and debugfs,
//!   `SOURCE_DATE_EPOCH` for mtools; `mkfs.fat --invariant`, which has no
//!   clock option); the UKI's PE timestamp, which objcopy sets to now, is
//!   rewritten to SOURCE_DATE_EPOCH;
//! * `mke2fs -d` copies each file's atime, mtime *and ctime* from the tree,
//!   and a ctime cannot be set from user space, so after mke2fs one pass
//!   over the inode tables sets every inode's mtime to min(mtime,
//!   SOURCE_DATE_EPOCH) and its atime and ctime to the same value, as
//!   debugfs's `sif` would ([`ext4_times`]; this also avoids touching the
//!   layers: clamping through the overlay would copy every file up);
//! * files that record when rather than what (dpkg and apt logs, `*-old`
//!   backups, ld.so's aux-cache, man-db's caches, machine ids, the random
//!   seed) are removed from the image's own upper dir ([`IMAGE_DEBRIS`]);
//!   the layers keep them, so this costs nothing at build time.
//!
//! The merged tree is walked once, beside mke2fs, to record every path
//! (`files.json`, kept beside the disk in the store: see `record::tree`).
//!
//! A sealed root ([`verity`]) is written into the disk like any other, and
//! its hash tree computed from it there: the root hash goes on the UKI's
//! command line and into the partitions' UUIDs, but the UKI is as long with
//! any root hash, so the disk is laid out around a UKI made with a
//! placeholder hash (cached like any UKI, the same for every sealed image
//! of the same kernel and initrd) and the real hash is put into it after.

mod ext4_times;
pub mod secure_boot;
pub mod verity;
mod volumes;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cmd::Cmd;
use crate::disk::{
    debugfs_quote, ESP_TYPE, FILES_JSON, ROOT_LABEL, ROOT_TYPE, ROOT_VERITY_NAME, ROOT_VERITY_TYPE,
    SECTOR,
};
use crate::error::BadInput;
use crate::layers::mount::Mounts;
use crate::layers::steps::{resolve_in_root, write_file};
use crate::plan::key::file_digest;
use crate::plan::{ImagePlan, Key};
use crate::recipe::{units::show_size, Format, VolumeSpec};
use crate::record::tree::{self, FileEntry};
pub use volumes::serial as volume_serial;

const MIB: u64 = 1 << 20;
/// Room before the ESP and after the root for the GPT and its backup.
const GPT_GAP: u64 = MIB;
const ESP_MIN: u64 = 64 * MIB;
/// Slack on the ESP beyond the UKI (FAT overhead, room for a second UKI).
const ESP_SLACK: u64 = 16 * MIB;
const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// Paths (relative to the root) that say when or where the image was built,
/// not what is in it; removed from the image (not from the layers).
/// A trailing `/` removes what is inside a directory and keeps it.
pub const IMAGE_DEBRIS: &[&str] = &[
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/passwords.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/statoverride-old",
    "var/lib/dpkg/available-old",
    "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed",
    "var/cache/man/",
];

/// The result of assembly, in a staging dir about to be published.
pub struct Assembled {
    pub disk: PathBuf,
    pub kernel: String,
    /// How the UKI was signed, when it was.
    pub secure_boot: Option<secure_boot::SignedUki>,
    /// The root's dm-verity hash tree, for a sealed image.
    pub verity: Option<verity::Verity>,
    /// The key of its unsigned UKI in the store's UKI cache.
    pub uki: String,
}

/// Assemble `lowers` (topmost first) into `staging/disk.{qcow2,raw}` and
/// `staging/files.json`. `epoch` is the build's SOURCE_DATE_EPOCH: no
/// timestamp in the disk is later than it. With `signer` the UKI is signed
/// for Secure Boot (see [`secure_boot`]).
#[allow(clippy::too_many_arguments)]
pub fn assemble(
    image: &ImagePlan,
    vols: &[VolumeSpec],
    lowers: &[PathBuf],
    staging: &Path,
    recipe_path: &Path,
    epoch: u64,
    signer: Option<&secure_boot::Signer>,
    uki_cache: &Path,
) -> Result<Assembled> {
    let spec = &image.spec;
    let key = image.key;
    let upper = staging.join("upper");
    let work = staging.join("work");
    let merged = staging.join("merged");
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut mounts = Mounts::new();
    mounts.overlay(lowers, Some((&upper, &work)), &merged)?;

    // The image's own files go into a throwaway upper dir, never a layer.
    let root_line = if spec.verity {
        // Read-only, never checked: the kernel verifies every block.
        format!("{} / ext4 ro 0 0", verity::MAPPER_ROOT)
    } else {
        format!("LABEL={ROOT_LABEL} / ext4 defaults 0 1")
    };
    let fstab = format!("# Written by kiln.\n{root_line}\n{}", volumes::fstab(vols));
    write_file(&merged.join("etc/fstab"), fstab.as_bytes(), 0o644)?;
    volumes::prepare(&merged, vols, recipe_path)?;
    write_file(
        &merged.join("etc/hostname"),
        format!("{}\n", spec.hostname).as_bytes(),
        0o644,
    )?;
    write_file(&merged.join("etc/machine-id"), b"", 0o444)?;
    remove_debris(&merged)?;

    let kernel = pick_kernel(&merged)?;
    if spec.verity {
        require_verity_initrd(&merged, recipe_path)?;
    }
    let root_size = round_up(spec.size, MIB);
    // A qcow2's raw disk is only read by qemu-img: in memory when there is
    // room for all of it (see `raw_in_memory`), it is never written back.
    let mut in_memory = Mounts::new();
    let raw_dir = if spec.format == Format::Qcow2 && raw_in_memory(spec.size) {
        let dir = staging.join("raw");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        in_memory.tmpfs(&dir)?;
        dir
    } else {
        staging.to_path_buf()
    };
    let walk = Walk {
        merged: &merged,
        size: spec.size,
        recipe_path,
    };
    let disk = Disk {
        merged: &merged,
        kernel: &kernel,
        spec,
        key,
        epoch,
        staging,
        raw_dir: &raw_dir,
        signer,
        uki_cache,
        root_size,
    };
    // The root is written straight into the disk at its offset, which the
    // UKI's size decides: the UKI comes first. A sealed root's hash decides
    // the UKI's command line and the partition UUIDs, but not the UKI's
    // size (a root hash is always as long): the disk is laid out around a
    // UKI with a placeholder hash, the root hashed where it lies, and its
    // hash then put into the UKI and the partition table.
    let hash_size = if spec.verity {
        round_up(verity::tree_size(root_size), MIB)
    } else {
        0
    };
    let prepared = disk.prepare(hash_size)?;
    let layout = &prepared.layout;
    let mut files = walk.beside(|| {
        make_root_fs(
            &layout.raw,
            layout.root_start,
            root_size,
            &merged,
            key,
            epoch,
            spec.verity,
        )
    })?;
    set_times(&layout.raw, layout.root_start, &files, epoch, staging)?;
    for f in &mut files {
        f.mtime = f.mtime.min(epoch as i64);
    }
    let verity = if spec.verity {
        // Its data extents are read next (see `sync_file` below).
        sync_file(&layout.raw)?;
        let root = verity::Span {
            file: &layout.raw,
            at: layout.root_start,
            len: root_size,
        };
        let root_hash = crate::cmd::timed("hash tree (verity)", || {
            verity::format_at(root, &layout.raw, layout.hash_start, key)
        })?;
        Some(verity::Verity::new(&root_hash)?)
    } else {
        None
    };
    let started = disk.finish(prepared, verity.as_ref())?;
    crate::store::write_json_atomic(&staging.join(FILES_JSON), &files)?;
    let Started {
        layout: Layout { raw, .. },
        uki,
        signed,
        uki_inputs,
        fresh_uki,
    } = started;
    if fresh_uki {
        uki_inputs.keep(uki_cache, &staging.join(UNSIGNED_UKI), staging)?;
    }
    mounts.unmount_all()?;
    for d in [&upper, &work, &merged] {
        crate::store::remove_tree(d).with_context(|| format!("removing {}", d.display()))?;
    }
    std::fs::remove_file(&uki).with_context(|| format!("removing {}", uki.display()))?;

    // Written back before anything reads it: while ext4 still holds the
    // blocks mke2fs wrote as delayed allocations, finding the
    // data (SEEK_DATA, as qemu-img and cp do) is slow. Measured here on
    // golden's root: qemu-img convert 1.6 s right after mke2fs, against
    // 0.17 s for the fsync and 0.18 s for the convert after it. (Nothing
    // to do for a raw disk in memory.)
    sync_file(&raw)?;
    let disk = match spec.format {
        Format::Raw => raw,
        Format::Qcow2 => {
            let qcow = staging.join("disk.qcow2");
            // `-t unsafe`: no flushes; the store publishes an image without
            // waiting for the disk (see `store::Durability::Deferred`).
            Cmd::new("qemu-img")
                .args(["convert", "-t", "unsafe", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&qcow)
                .run()?;
            std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
            in_memory.unmount_all()?;
            if raw_dir != staging {
                std::fs::remove_dir(&raw_dir)
                    .with_context(|| format!("removing {}", raw_dir.display()))?;
            }
            qcow
        }
    };
    Ok(Assembled {
        disk,
        kernel,
        secure_boot: signed,
        verity,
        uki: uki_inputs.key,
    })
}

/// Whether the raw disk of an image of `size` goes in memory (a tmpfs in
/// kiln's own mount namespace, gone with it however kiln ends): when it
/// could be all data and still take at most a quarter of the memory
/// available. It then costs no write to disk and no fsync before it is
/// read; the disk's bytes are the same either way.
fn raw_in_memory(size: u64) -> bool {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    size + ESP_MIN + ESP_SLACK <= available / 4
}

fn sync_file(path: &Path) -> Result<()> {
    crate::cmd::timed("fsync (disk)", || {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", path.display()))
    })
}

/// The sfdisk line of a sealed image's hash partition.
fn verity_table_line(start: u64, size: u64, v: &verity::Verity) -> String {
    format!(
        "start={}, size={}, type={ROOT_VERITY_TYPE}, name={ROOT_VERITY_NAME}, uuid={}\n",
        start / SECTOR,
        size / SECTOR,
        v.hash_partition_uuid
    )
}

/// Write the root ext4 from `merged` at `offset` in `target` (its
/// timestamps are pinned afterwards by [`set_times`]). A sealed root has no
/// journal: it is never written.
fn make_root_fs(
    target: &Path,
    offset: u64,
    size: u64,
    merged: &Path,
    key: Key,
    epoch: u64,
    sealed: bool,
) -> Result<()> {
    let uuid = key.derive_uuid("root-fs");
    let mut mke2fs = Cmd::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-L", ROOT_LABEL, "-U", &uuid,
        ]);
    // The journal is not written out as zeros (`lazy_journal_init`): the
    // disk is a new sparse file, which reads as zeros where nothing was
    // written; the bytes of the disk are the same, with 64 MiB less for
    // mke2fs to write and for qemu-img to read.
    let journal = if sealed {
        mke2fs = mke2fs.args(["-O", "^has_journal"]);
        ""
    } else {
        ",lazy_journal_init=1"
    };
    mke2fs
        .arg("-E")
        .arg(format!(
            "offset={offset},hash_seed={},root_owner=0:0,nodiscard{journal}",
            key.derive_uuid("root-hash-seed")
        ))
        .arg("-d")
        .arg(merged)
        .arg(target)
        .arg(format!("{}k", size / 1024))
        .run()
        .context("writing the root filesystem")
}

/// The walk that records every file of the root (and hashes it).
struct Walk<'a> {
    merged: &'a Path,
    size: u64,
    recipe_path: &'a Path,
}

impl Walk<'_> {
    /// Walk the root in another thread while `mkfs` (mke2fs, reading the
    /// same tree) runs in this one: they take about as long, on different
    /// cores. Then refuse a root too big for `image.size` (whatever mke2fs
    /// made of it). The times are the tree's, not yet clamped.
    fn beside(&self, mkfs: impl FnOnce() -> Result<()>) -> Result<Vec<FileEntry>> {
        let (files, made) = std::thread::scope(|s| {
            let walk = s.spawn(|| {
                let started = std::time::Instant::now();
                (tree::walk(self.merged, &|_| false), started.elapsed())
            });
            let made = mkfs();
            (walk.join(), made)
        });
        let (files, took) =
            files.map_err(|_| anyhow::anyhow!("the walk of the root filesystem panicked"))?;
        // Counted here: the walk's thread does not count for this build.
        crate::cmd::record_time(
            "walk and hash (root, beside mke2fs)".into(),
            took.as_secs_f64(),
        );
        let files = files.context("recording the root filesystem")?;
        let needed = tree_bytes(&files);
        // ext4 needs room for its metadata and a reserve beyond the files.
        if needed + needed / 8 + 32 * MIB > self.size {
            return Err(BadInput::new(
                self.recipe_path,
                "image.size",
                format!(
                    "the root filesystem needs about {} but image.size is {}",
                    show_size(round_up(needed + needed / 8 + 32 * MIB, MIB)),
                    show_size(self.size)
                ),
                "raise [image] size",
            )
            .into());
        }
        made?;
        Ok(files)
    }
}

/// Where the partitions of a disk being assembled are.
struct Layout {
    raw: PathBuf,
    esp_start: u64,
    esp_size: u64,
    root_start: u64,
    hash_start: u64,
    hash_size: u64,
    total: u64,
}

/// The disk and its UKI: laid out and created, the UKI built (or taken
/// from the cache) by [`Disk::prepare`]; with its table and ESP, the UKI on
/// it (signed, when it is), by [`Disk::finish`].
struct Started {
    layout: Layout,
    /// The UKI as it is on the ESP (signed, when it was).
    uki: PathBuf,
    signed: Option<secure_boot::SignedUki>,
    uki_inputs: UkiInputs,
    /// Built by this assembly (not from the cache): kept in the cache once
    /// the image is assembled.
    fresh_uki: bool,
}

/// What assembling the disk around the root needs.
struct Disk<'a> {
    merged: &'a Path,
    kernel: &'a str,
    spec: &'a crate::recipe::ImageSpec,
    key: Key,
    epoch: u64,
    staging: &'a Path,
    /// Where `disk.raw` is made: the staging dir, or memory.
    raw_dir: &'a Path,
    signer: Option<&'a secure_boot::Signer>,
    uki_cache: &'a Path,
    root_size: u64,
}

impl Disk<'_> {
    /// The UKI's command line: a sealed root's (with `v`'s hash) or a
    /// plain one's, then the recipe's.
    fn cmdline(&self, v: Option<&verity::Verity>) -> String {
        let root_args = match v {
            Some(v) => format!("{} ro", v.cmdline()),
            None => format!("root=LABEL={ROOT_LABEL} ro"),
        };
        format!("{root_args} {}", self.spec.cmdline)
    }

    /// The UKI (from the store's cache when it was built before; a sealed
    /// image's with a placeholder root hash, the same for every sealed image
    /// of the same kernel and initrd), signed when it is final, then
    /// `staging/disk.raw` laid out around it, empty. A sealed image's hash
    /// partition (`hash_size` bytes) follows the root.
    fn prepare(&self, hash_size: u64) -> Result<Started> {
        let staging = self.staging;
        let uki = staging.join("uki.efi");
        let sealed = self.spec.verity;
        let placeholder = sealed.then(verity::Verity::placeholder);
        let uki_inputs = UkiInputs::of(
            self.merged,
            self.kernel,
            &self.cmdline(placeholder.as_ref()),
            self.epoch,
        )?;
        let fresh = !uki_inputs.reuse(self.uki_cache, &uki)?;
        if fresh {
            make_uki(&uki_inputs, &uki, staging)?;
            // Kept in the cache once the image is assembled (an image that
            // fails, e.g. for bad input, leaves the store as it was).
            std::fs::copy(&uki, staging.join(UNSIGNED_UKI))
                .with_context(|| format!("copying {}", uki.display()))?;
        }
        let signed = if sealed { None } else { self.sign(&uki)? };
        let layout = self.layout(&uki, hash_size)?;
        let raw = &layout.raw;
        std::fs::File::create(raw)
            .and_then(|f| f.set_len(layout.total))
            .with_context(|| format!("creating {}", raw.display()))?;
        Ok(Started {
            layout,
            uki,
            signed,
            uki_inputs,
            fresh_uki: fresh,
        })
    }

    /// The last change to the UKI: any byte changed after it voids the
    /// signature.
    fn sign(&self, uki: &Path) -> Result<Option<secure_boot::SignedUki>> {
        self.signer
            .map(|s| secure_boot::sign(uki, s, self.staging))
            .transpose()
    }

    /// Where the partitions go around `uki`.
    fn layout(&self, uki: &Path, hash_size: u64) -> Result<Layout> {
        let uki_len = std::fs::metadata(uki)
            .with_context(|| format!("reading {}", uki.display()))?
            .len();
        let esp_size = round_up((uki_len + ESP_SLACK).max(ESP_MIN), MIB);
        let esp_start = GPT_GAP;
        let root_start = esp_start + esp_size;
        let hash_start = root_start + self.root_size;
        Ok(Layout {
            raw: self.raw_dir.join("disk.raw"),
            esp_start,
            esp_size,
            root_start,
            hash_start,
            hash_size,
            total: hash_start + hash_size + GPT_GAP,
        })
    }

    /// With the root written into the disk: a sealed image's root hash
    /// into its UKI (which is then signed), the partition table, and the
    /// ESP with the UKI.
    fn finish(&self, prepared: Started, sealed: Option<&verity::Verity>) -> Result<Started> {
        let Started {
            mut layout,
            uki,
            mut signed,
            uki_inputs,
            fresh_uki,
        } = prepared;
        if let Some(v) = sealed {
            crate::cmd::timed("root hash into the UKI (verity)", || {
                set_uki_cmdline(&uki, &uki_inputs.cmdline, &self.cmdline(Some(v)))
            })?;
            signed = self.sign(&uki)?;
            // The same size unsigned; a signature can make the ESP a MiB
            // larger and move the root and its hash tree.
            let signed_layout = self.layout(&uki, layout.hash_size)?;
            if signed_layout.root_start != layout.root_start {
                self.relocate(&layout, &signed_layout)?;
                layout = signed_layout;
            }
        }
        let key = self.key;
        let mut table = format!(
            "label: gpt\nlabel-id: {}\nunit: sectors\n\
             start={}, size={}, type={ESP_TYPE}, name=esp, uuid={}\n\
             start={}, size={}, type={ROOT_TYPE}, name={ROOT_LABEL}, uuid={}\n",
            key.derive_uuid("disk"),
            layout.esp_start / SECTOR,
            layout.esp_size / SECTOR,
            key.derive_uuid("esp-partition"),
            layout.root_start / SECTOR,
            self.root_size / SECTOR,
            match sealed {
                Some(v) => v.data_partition_uuid.clone(),
                None => key.derive_uuid("root-partition"),
            },
        );
        if let Some(v) = sealed {
            table.push_str(&verity_table_line(layout.hash_start, layout.hash_size, v));
        }
        Cmd::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&layout.raw)
            .stdin_bytes(table)
            .run()?;
        make_esp(
            &layout.raw,
            layout.esp_start,
            layout.esp_size,
            &uki,
            key,
            self.epoch,
        )?;
        Ok(Started {
            layout,
            uki,
            signed,
            uki_inputs,
            fresh_uki,
        })
    }

    /// Move the root and its hash tree from where `from` put them to where
    /// `to` does, in a new disk file (only when signing a sealed UKI made
    /// its ESP larger).
    fn relocate(&self, from: &Layout, to: &Layout) -> Result<()> {
        crate::cmd::log_line(&format!(
            "the signed UKI needs a larger ESP: moving the root from byte {} to {}",
            from.root_start, to.root_start
        ));
        let moved = self.raw_dir.join("disk.raw.moved");
        std::fs::File::create(&moved)
            .and_then(|f| f.set_len(to.total))
            .with_context(|| format!("creating {}", moved.display()))?;
        let root_and_tree = verity::Span {
            file: &from.raw,
            at: from.root_start,
            len: self.root_size + from.hash_size,
        };
        verity::copy_span(root_and_tree, &moved, to.root_start)?;
        std::fs::rename(&moved, &to.raw)
            .with_context(|| format!("renaming {} to {}", moved.display(), to.raw.display()))
    }
}

/// A UKI built by this assembly, unsigned, until it goes into the cache.
const UNSIGNED_UKI: &str = "uki-unsigned.efi";

/// A sealed root must be opened by the initrd before it can be mounted:
/// refuse an image that cannot do it rather than build a disk that never
/// finds its root. Two ways are accepted, by what the image holds:
/// initramfs-tools with veritysetup (cryptsetup-bin) and a local-top
/// script that runs it (recipes/sealed.toml's way: the same initrd as
/// golden plus one script, which boots much faster under emulation than a
/// systemd initrd), or a systemd initrd, whose veritysetup generator opens
/// `roothash=` (dracut and systemd-cryptsetup). Both need dmsetup: its udev
/// rules make `/dev/mapper/root` appear, and the smoke's `sealed` check
/// reads `dmsetup table root`. The packages and the script are checked,
/// not what the initrd holds: that is the recipe's configuration.
fn require_verity_initrd(root: &Path, recipe_path: &Path) -> Result<()> {
    let has = |rel: &str| std::fs::symlink_metadata(root.join(rel)).is_ok();
    let lacking = |needs: &[(&str, &'static str)]| -> Vec<&'static str> {
        needs
            .iter()
            .filter(|(path, _)| !has(path))
            .map(|(_, what)| *what)
            .collect()
    };
    let local_top_runs_veritysetup = [
        "etc/initramfs-tools/scripts/local-top",
        "usr/share/initramfs-tools/scripts/local-top",
    ]
    .iter()
    .filter_map(|dir| std::fs::read_dir(root.join(dir)).ok())
    .flatten()
    .filter_map(|entry| std::fs::read(entry.ok()?.path()).ok())
    .any(|script| script.windows(11).any(|w| w == b"veritysetup"));
    let mut initramfs_tools = lacking(&[
        ("usr/sbin/update-initramfs", "initramfs-tools"),
        ("usr/sbin/veritysetup", "cryptsetup-bin"),
    ]);
    if !local_top_runs_veritysetup {
        initramfs_tools.push("a local-top script that runs veritysetup");
    }
    let systemd_initrd = lacking(&[
        ("usr/bin/dracut", "dracut"),
        ("usr/lib/systemd/systemd-veritysetup", "systemd-cryptsetup"),
    ]);
    let dmsetup = lacking(&[("usr/sbin/dmsetup", "dmsetup")]);
    if dmsetup.is_empty() && (initramfs_tools.is_empty() || systemd_initrd.is_empty()) {
        return Ok(());
    }
    let mut lacks = Vec::new();
    if !dmsetup.is_empty() {
        lacks.push("dmsetup (for either)".to_owned());
    }
    if !initramfs_tools.is_empty() && !systemd_initrd.is_empty() {
        lacks.push(format!(
            "for initramfs-tools: {}; for a systemd initrd: {}",
            initramfs_tools.join(", "),
            systemd_initrd.join(", ")
        ));
    }
    Err(BadInput::new(
        recipe_path,
        "image.verity",
        format!(
            "a sealed root needs an initrd that opens dm-verity, but the image lacks {}",
            lacks.join("; ")
        ),
        "extend recipes/sealed.toml (initramfs-tools: packages = [\"cryptsetup-bin\", \"dmsetup\"] \
         with its initramfs hook and local-top script from recipes/files/sealed/), or add \
         packages = [\"dracut\", \"systemd-cryptsetup\", \"dmsetup\"] with a dracut config that adds the \
         systemd-veritysetup module and the dm-verity driver, or remove verity = true",
    )
    .into())
}

/// Remove [`IMAGE_DEBRIS`] through the overlay (whiteouts in the image's
/// own upper dir; the layers are untouched).
fn remove_debris(merged: &Path) -> Result<()> {
    for rel in IMAGE_DEBRIS {
        if let Some(dir) = rel.strip_suffix('/') {
            let dir = merged.join(dir);
            let Ok(listing) = std::fs::read_dir(&dir) else {
                continue;
            };
            for item in listing {
                let path = item
                    .with_context(|| format!("listing {}", dir.display()))?
                    .path();
                let meta = std::fs::symlink_metadata(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                if meta.is_dir() {
                    std::fs::remove_dir_all(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                } else {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        } else {
            let path = merged.join(rel);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Give every inode of the root filesystem (at `offset` in `raw`) the
/// clamped mtime of its entry as mtime, atime and ctime (mke2fs copied the
/// tree's real atimes and ctimes: see the module docs): in the inode tables
/// ([`ext4_times`]), then with one debugfs run for the paths whose times
/// those cannot tell from the inode (before 1970 or after 2106; usually
/// none).
fn set_times(
    raw: &Path,
    offset: u64,
    files: &[FileEntry],
    epoch: u64,
    scratch: &Path,
) -> Result<()> {
    crate::cmd::timed("timestamps (inode tables)", || {
        ext4_times::pin(raw, offset, epoch)
    })
    .context("setting the root filesystem's timestamps")?;
    let odd: Vec<&FileEntry> = files
        .iter()
        .filter(|f| !ext4_times::pinned_by_inode(f.mtime))
        .collect();
    if odd.is_empty() {
        return Ok(());
    }
    let mut script = String::new();
    for f in odd {
        if f.path.contains('\n') {
            anyhow::bail!(
                "the image holds a path with a newline, which debugfs cannot address: {:?}",
                f.path
            );
        }
        let quoted = debugfs_quote(&f.path);
        let t = f.mtime.min(epoch as i64);
        for field in ["mtime", "atime", "ctime"] {
            // `@`: without it debugfs first tries the digits as YYYYMMDDhhmm[ss]
            // and turns many times into other dates (1744297585 into 2288).
            script.push_str(&format!("sif {quoted} {field} @{t}\n"));
        }
    }
    let script_path = scratch.join("times.debugfs");
    std::fs::write(&script_path, script)
        .with_context(|| format!("writing {}", script_path.display()))?;
    // debugfs reports a failed command on stderr and still exits 0; merge
    // the streams so that anything but its echo of each command is an error.
    let out = Cmd::new("sh")
        .args(["-c", "exec debugfs -w -f \"$1\" \"$2\" 2>&1", "sh"])
        .arg(&script_path)
        .arg(format!("{}?offset={offset}", raw.display()))
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .timed_as("debugfs (timestamps)")
        .output()
        .context("setting the root filesystem's timestamps")?;
    let text = out.stdout_str();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("debugfs"))
        .take(5)
        .collect();
    if !errors.is_empty() {
        anyhow::bail!(
            "debugfs failed to set timestamps:\n  {}",
            errors.join("\n  ")
        );
    }
    std::fs::remove_file(&script_path)
        .with_context(|| format!("removing {}", script_path.display()))
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// The 4 KiB blocks the tree's files and directories fill, in bytes (about
/// what du counts; from the walk that records the tree, not another one).
fn tree_bytes(files: &[FileEntry]) -> u64 {
    const BLOCK: u64 = 4096;
    files
        .iter()
        .map(|f| match f.kind {
            tree::Kind::File => round_up(f.size, BLOCK),
            tree::Kind::Dir => BLOCK,
            _ => 0,
        })
        .sum()
}

/// The kernel version to boot: the one `/vmlinuz` points to (Debian keeps it
/// on the newest installed kernel), else the highest version in /boot.
pub fn pick_kernel(root: &Path) -> Result<String> {
    if let Ok(target) = std::fs::read_link(root.join("vmlinuz")) {
        if let Some(v) = target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            if root.join("boot").join(format!("vmlinuz-{v}")).is_file() {
                return Ok(v.to_owned());
            }
        }
    }
    let mut versions: Vec<String> = std::fs::read_dir(root.join("boot"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .collect();
    if versions.is_empty() {
        anyhow::bail!("the image has no kernel in /boot: add a kernel package (e.g. linux-image-cloud-amd64) to [base] packages");
    }
    versions.sort_by(|a, b| compare_versions(a, b));
    Ok(versions.pop().expect("not empty"))
}

/// Order version strings the way people expect of kernels: numeric runs
/// compare as numbers.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, chunk)) if *d == digit => chunk.push(c),
                _ => out.push((digit, c.to_string())),
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x.0, y.0) {
            (true, true) => {
                x.1.parse::<u128>()
                    .unwrap_or(0)
                    .cmp(&y.1.parse::<u128>().unwrap_or(0))
            }
            _ => x.1.cmp(&y.1),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// A Unified Kernel Image: systemd's EFI stub with the kernel, initrd,
/// os-release and command line added as PE sections after the stub's own.
/// What goes into a UKI. Its key names a built UKI in the store's
/// `uki-v1/`: an image whose kernel, initrd, os-release and command line
/// are those of an earlier one (another hostname, one more package) reuses
/// that UKI instead of copying the kernel and initrd through objcopy again.
struct UkiInputs {
    linux: PathBuf,
    initrd: PathBuf,
    osrel: PathBuf,
    cmdline: String,
    epoch: u64,
    key: String,
}

impl UkiInputs {
    fn of(root: &Path, kernel: &str, cmdline: &str, epoch: u64) -> Result<UkiInputs> {
        let stub = Path::new(STUB);
        if !stub.is_file() {
            anyhow::bail!(
                "{STUB} is missing: install the Debian package systemd-boot-efi (make deps does)"
            );
        }
        let linux = root.join("boot").join(format!("vmlinuz-{kernel}"));
        let initrd = root.join("boot").join(format!("initrd.img-{kernel}"));
        if !initrd.is_file() {
            anyhow::bail!(
                "the image has no initrd for kernel {kernel}: install initramfs-tools in the image; \
                 where a layer says `initramfs = false`, a later layer must build it \
                 (`update-initramfs -c -k all`)"
            );
        }
        let osrel = resolve_in_root(root, "/etc/os-release")
            .map_err(|e| anyhow::anyhow!("/etc/os-release {e}"))?;
        let osrel = if std::fs::symlink_metadata(&osrel).is_ok_and(|m| m.file_type().is_symlink()) {
            resolve_in_root(root, "/usr/lib/os-release")
                .map_err(|e| anyhow::anyhow!("/usr/lib/os-release {e}"))?
        } else {
            osrel
        };
        // A few files, hashed before the walk of the whole root: the UKI
        // decides where the root partition starts.
        let digest = |p: &Path| file_digest(p).with_context(|| format!("hashing {}", p.display()));
        let key = crate::plan::key::bytes_digest(
            format!(
                "kiln-uki-v1\nstub {}\nosrel {}\nlinux {}\ninitrd {}\nepoch {epoch}\ncmdline {cmdline}\n",
                file_digest(stub).with_context(|| format!("hashing {STUB}"))?,
                digest(&osrel)?,
                digest(&linux)?,
                digest(&initrd)?,
            )
            .as_bytes(),
        );
        Ok(UkiInputs {
            linux,
            initrd,
            osrel,
            cmdline: cmdline.to_owned(),
            epoch,
            key,
        })
    }

    fn cached(&self, cache: &Path) -> (PathBuf, PathBuf) {
        (
            cache.join(format!("{}.efi", self.key)),
            cache.join(format!("{}.sha256", self.key)),
        )
    }

    /// Copy the cached UKI to `out` if there is one whose bytes are still
    /// those it was kept with.
    fn reuse(&self, cache: &Path, out: &Path) -> Result<bool> {
        let (efi, sum) = self.cached(cache);
        let Ok(expected) = std::fs::read_to_string(&sum) else {
            return Ok(false);
        };
        if file_digest(&efi).ok().as_deref() != Some(expected.trim()) {
            crate::cmd::log_line(&format!(
                "UKI cache: {} does not match its digest: building the UKI again",
                efi.display()
            ));
            return Ok(false);
        }
        std::fs::copy(&efi, out)
            .with_context(|| format!("copying {} to {}", efi.display(), out.display()))?;
        crate::cmd::log_line(&format!("UKI cache: reused {}", efi.display()));
        Ok(true)
    }

    /// Keep the UKI just built (`uki`, in the staging dir): renamed into
    /// the cache, its digest last (a UKI without one is not used).
    fn keep(&self, cache: &Path, uki: &Path, staging: &Path) -> Result<()> {
        let (efi, sum) = self.cached(cache);
        let digest = file_digest(uki).with_context(|| format!("hashing {}", uki.display()))?;
        std::fs::rename(uki, &efi)
            .with_context(|| format!("renaming {} to {}", uki.display(), efi.display()))?;
        let tmp = staging.join("uki-cache.tmp");
        std::fs::write(&tmp, &digest).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &sum)
            .with_context(|| format!("renaming {} to {}", tmp.display(), sum.display()))
    }
}

fn make_uki(inputs: &UkiInputs, out: &Path, scratch: &Path) -> Result<()> {
    let stub = Path::new(STUB);
    let cmdline_file = scratch.join("cmdline.txt");
    std::fs::write(&cmdline_file, &inputs.cmdline)
        .with_context(|| format!("writing {}", cmdline_file.display()))?;

    let stub_end = stub_end(stub)?;
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .with_context(|| format!("reading {}", p.display()))
    };
    let mut vma = round_up(stub_end, 0x10000);
    let mut cmd = Cmd::new("objcopy");
    for (name, file) in [
        (".osrel", &inputs.osrel),
        (".cmdline", &cmdline_file),
        (".linux", &inputs.linux),
        (".initrd", &inputs.initrd),
    ] {
        cmd = cmd
            .arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma:#x}"));
        vma = round_up(vma + size(file)?, 0x10000);
    }
    cmd.arg(stub).arg(out).run().context("building the UKI")?;
    pin_pe_timestamp(out, inputs.epoch)
}

/// objcopy (binutils 2.40) stamps a PE file's COFF header with the current
/// time and ignores SOURCE_DATE_EPOCH: set the stamp to `epoch` (and the
/// checksum to match).
fn pin_pe_timestamp(path: &Path, epoch: u64) -> Result<()> {
    let stamp = u32::try_from(epoch).context("SOURCE_DATE_EPOCH does not fit a PE timestamp")?;
    edit_pe(path, |data, pe| {
        data[pe + 8..pe + 12].copy_from_slice(&stamp.to_le_bytes());
        Ok(pe + 8..pe + 12)
    })
}

/// Replace the command line `from` in the UKI's `.cmdline` section by
/// `to`, of the same length. objcopy copies a section's bytes as they are
/// and lays the file out by the sections' sizes alone, so the result is
/// byte for byte the UKI that objcopy makes with `to` (a unit test
/// compares the two), without copying the kernel and initrd again.
fn set_uki_cmdline(path: &Path, from: &str, to: &str) -> Result<()> {
    if from.len() != to.len() {
        anyhow::bail!("a UKI's command line can only be replaced by one as long");
    }
    edit_pe(path, |data, pe| {
        let half = |at: usize| usize::from(u16::from_le_bytes([data[at], data[at + 1]]));
        let word = |at: usize| {
            u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize
        };
        let sections = half(pe + 6);
        let table = pe + 24 + half(pe + 20);
        let found = (0..sections)
            .map(|i| table + 40 * i)
            .take_while(|at| at + 40 <= data.len())
            .find(|&at| &data[at..at + 8] == b".cmdline");
        let Some(at) = found else {
            anyhow::bail!("{} has no .cmdline section", path.display());
        };
        let (size, start) = (word(at + 8), word(at + 20));
        if size != from.len() || data.get(start..start + size) != Some(from.as_bytes()) {
            anyhow::bail!("{}'s .cmdline section is not `{from}`", path.display());
        }
        data[start..start + size].copy_from_slice(to.as_bytes());
        Ok(start..start + size)
    })
}

/// Change the PE file at `path` with `edit` (given its bytes and where its
/// PE header starts; it returns the range of bytes it changed), then set
/// its checksum to match. Only the changed bytes and the checksum are
/// written, in place: rewriting a ~20 MB UKI whole made ext4 write it
/// through to the disk (a truncated file rewritten is flushed on close).
fn edit_pe(
    path: &Path,
    edit: impl FnOnce(&mut Vec<u8>, usize) -> Result<std::ops::Range<usize>>,
) -> Result<()> {
    let mut data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let word = |d: &[u8], at: usize| {
        d.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let pe = word(&data, 0x3c).context("the UKI has no DOS header")? as usize;
    if data.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) || data.len() < pe + 92 {
        anyhow::bail!("{} is not a PE file", path.display());
    }
    let changed = edit(&mut data, pe)?;
    let checksum_at = pe + 24 + 64;
    let checksum = pe_checksum(&data, checksum_at);
    data[checksum_at..checksum_at + 4].copy_from_slice(&checksum.to_le_bytes());
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| {
            file.write_all_at(&data[changed.clone()], changed.start as u64)?;
            file.write_all_at(&data[checksum_at..checksum_at + 4], checksum_at as u64)
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// The PE image checksum: a folded 16-bit sum of the file (its own field
/// counted as zero) plus the file's length.
fn pe_checksum(data: &[u8], checksum_at: usize) -> u32 {
    // Summed whole, then folded: an end-around-carry sum folds to the same
    // 16 bits whenever it is folded (and this way the loop vectorises: a
    // UKI is ~20 MB).
    let words = data.chunks_exact(2);
    let odd = words.remainder().first().map_or(0, |&b| u64::from(b));
    let mut sum: u64 = words
        .map(|w| u64::from(u16::from_le_bytes([w[0], w[1]])))
        .sum::<u64>()
        + odd;
    debug_assert!(checksum_at.is_multiple_of(2), "a PE header is aligned");
    if let Some(field) = data.get(checksum_at..checksum_at + 4) {
        // Its own field counts as zero.
        sum -= u64::from(u16::from_le_bytes([field[0], field[1]]))
            + u64::from(u16::from_le_bytes([field[2], field[3]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (sum as u32).wrapping_add(data.len() as u32)
}

/// The end of the stub's last section (VMA + size), from `objdump -h`.
fn stub_end(stub: &Path) -> Result<u64> {
    let out = Cmd::new("objdump").arg("-h").arg(stub).output()?;
    let end = out
        .stdout_str()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 4 && f[0].parse::<u32>().is_ok() {
                Some(u64::from_str_radix(f[2], 16).ok()? + u64::from_str_radix(f[3], 16).ok()?)
            } else {
                None
            }
        })
        .max();
    end.context("objdump -h showed no sections in the EFI stub")
}

fn make_esp(raw: &Path, start: u64, size: u64, uki: &Path, key: Key, epoch: u64) -> Result<()> {
    let volume_id = &key.derive_uuid("esp-fs").replace('-', "")[..8];
    // mkfs.fat guesses the FAT type from the whole file's size; the ESP is
    // small, so say it: FAT16 up to 512 MiB, FAT32 beyond.
    let fat = if size <= 512 * MIB { "16" } else { "32" };
    Cmd::new("mkfs.fat")
        .arg(format!("--offset={}", start / SECTOR))
        // --invariant: the volume label's time is a constant, not now
        // (mkfs.fat ignores SOURCE_DATE_EPOCH); -i still sets the id.
        .args(["--invariant", "-F", fat, "-n", "ESP", "-i", volume_id])
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .arg(raw)
        .arg((size / 1024).to_string())
        .run()
        .context("making the ESP")?;
    let image = format!("{}@@{start}", raw.display());
    // mtools takes its clock from SOURCE_DATE_EPOCH (directory and file times).
    Cmd::new("mmd")
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["-i", &image, "::/EFI", "::/EFI/BOOT"])
        .run()?;
    Cmd::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["-i", &image])
        .arg(uki)
        .arg("::/EFI/BOOT/BOOTX64.EFI")
        .run()
        .context("copying the UKI to the ESP")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `data`'s PE checksum field is, and what it holds.
    fn stored_checksum(data: &[u8]) -> (usize, u32) {
        let pe = u32::from_le_bytes(data[0x3c..0x40].try_into().unwrap()) as usize;
        let at = pe + 24 + 64;
        (at, u32::from_le_bytes(data[at..at + 4].try_into().unwrap()))
    }

    #[test]
    fn pe_checksum_matches_the_one_objcopy_writes() {
        // objcopy writes the checksum of the PE file it makes: build a small
        // UKI-like file from the stub (the stub's own field may be 0, which
        // would compare nothing) and check ours agrees.
        let dir = tempfile::tempdir().unwrap();
        let section = dir.path().join("osrel");
        std::fs::write(&section, "ID=kiln-test\n").unwrap();
        let made = dir.path().join("made.efi");
        let status = std::process::Command::new("objcopy")
            .arg(format!("--add-section=.osrel={}", section.display()))
            .args(["--change-section-vma", ".osrel=0x20000"])
            .arg(STUB)
            .arg(&made)
            .status()
            .expect("running objcopy (binutils; make deps installs it)");
        assert!(status.success(), "objcopy failed: {status}");
        let data = std::fs::read(&made).unwrap();
        let (at, stored) = stored_checksum(&data);
        assert_ne!(
            stored,
            0,
            "objcopy wrote no checksum into {}",
            made.display()
        );
        assert_eq!(pe_checksum(&data, at), stored);
        // And the sum sees every byte outside its own field.
        let mut changed = data.clone();
        let last = changed.len() - 1;
        changed[last] ^= 0x01;
        assert_ne!(pe_checksum(&changed, at), stored);
    }

    #[test]
    fn a_root_hash_put_into_a_uki_gives_the_uki_objcopy_makes_with_it() {
        // What a sealed image does: a UKI made with the placeholder hash,
        // the real one put in afterwards, against objcopy (binutils) making
        // the UKI with the real hash.
        let dir = tempfile::tempdir().unwrap();
        let part = |name: &str, len: usize| {
            let p = dir.path().join(name);
            std::fs::write(&p, name.repeat(len)).unwrap();
            p
        };
        let cmdline = |v: &verity::Verity| format!("{} ro console=ttyS0", v.cmdline());
        let inputs = |v: &verity::Verity| UkiInputs {
            linux: part("linux", 70_001),
            initrd: part("initrd", 90_003),
            osrel: part("osrel", 3),
            cmdline: cmdline(v),
            epoch: 1_700_000_000,
            key: String::new(),
        };
        let (placeholder, real) = (
            verity::Verity::placeholder(),
            verity::Verity::new(&"c0ffee42".repeat(8)).unwrap(),
        );
        let made = dir.path().join("placeholder.efi");
        make_uki(&inputs(&placeholder), &made, dir.path()).unwrap();
        let theirs = dir.path().join("real.efi");
        make_uki(&inputs(&real), &theirs, dir.path()).unwrap();
        set_uki_cmdline(&made, &cmdline(&placeholder), &cmdline(&real)).unwrap();
        assert!(
            std::fs::read(&made).unwrap() == std::fs::read(&theirs).unwrap(),
            "the UKI with the hash put in differs from objcopy's"
        );
        // Only the command line it holds is replaced.
        let err = set_uki_cmdline(&made, &cmdline(&placeholder), &cmdline(&real)).unwrap_err();
        assert!(
            format!("{err:#}").contains(".cmdline section is not"),
            "{err:#}"
        );
    }

    #[test]
    fn the_hash_partition_is_typed_root_verity_with_the_hash_s_second_half() {
        let v = verity::Verity::new(&format!("{}{}", "ab".repeat(16), "cd".repeat(16))).unwrap();
        assert_eq!(
            verity_table_line(4 * MIB, 17 * MIB, &v),
            "start=8192, size=34816, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, \
             name=root-verity, uuid=cdcdcdcd-cdcd-cdcd-cdcd-cdcdcdcdcdcd\n"
        );
        assert_eq!(
            v.data_partition_uuid,
            "abababab-abab-abab-abab-abababababab"
        );
    }

    #[test]
    fn a_sealed_root_without_an_initrd_that_opens_verity_is_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("r.toml");
        let root = dir.path().join("root");
        let put = |rel: &str, text: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        let refused = |lacking: &[&str]| {
            let err = require_verity_initrd(&root, &recipe).unwrap_err();
            let bad = err.downcast_ref::<BadInput>().expect("bad input");
            let text = format!("{err:#}");
            assert_eq!(bad.key.as_deref(), Some("image.verity"), "{text}");
            for what in lacking
                .iter()
                .chain(&["sealed.toml", "remove verity = true"])
            {
                assert!(text.contains(what), "no `{what}` in: {text}");
            }
        };
        // golden's initrd (initramfs-tools) with verity on: refused.
        put("usr/sbin/update-initramfs", "");
        refused(&[
            "dmsetup",
            "cryptsetup-bin",
            "a local-top script that runs veritysetup",
            "dracut",
            "systemd-cryptsetup",
        ]);
        put("usr/sbin/veritysetup", "");
        put("usr/sbin/dmsetup", "");
        // A local-top script that does something else is not enough.
        put(
            "etc/initramfs-tools/scripts/local-top/other",
            "#!/bin/sh\nexit 0\n",
        );
        refused(&["a local-top script that runs veritysetup"]);
        // sealed.toml's way.
        put(
            "etc/initramfs-tools/scripts/local-top/kiln-verity",
            "#!/bin/sh\nveritysetup open \"$data\" root \"$hash\" \"$roothash\"\n",
        );
        require_verity_initrd(&root, &recipe).unwrap();
        // Without dmsetup, neither way is enough.
        std::fs::remove_file(root.join("usr/sbin/dmsetup")).unwrap();
        refused(&["dmsetup"]);
        // A systemd initrd (dracut and systemd's veritysetup generator).
        std::fs::remove_dir_all(&root).unwrap();
        for rel in [
            "usr/bin/dracut",
            "usr/lib/systemd/systemd-veritysetup",
            "usr/sbin/dmsetup",
        ] {
            put(rel, "");
        }
        require_verity_initrd(&root, &recipe).unwrap();
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = [
            "6.12.9+deb13-cloud-amd64".to_string(),
            "6.12.117+deb13-cloud-amd64".into(),
            "6.12.38+deb13-cloud-amd64".into(),
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(v.last().unwrap(), "6.12.117+deb13-cloud-amd64");
    }

    #[test]
    fn picks_the_kernel_vmlinuz_points_to() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir(&boot).unwrap();
        for v in ["6.1.0-1-cloud-amd64", "6.1.0-9-cloud-amd64"] {
            std::fs::write(boot.join(format!("vmlinuz-{v}")), "").unwrap();
        }
        assert_eq!(pick_kernel(dir.path()).unwrap(), "6.1.0-9-cloud-amd64");
        std::os::unix::fs::symlink(
            "boot/vmlinuz-6.1.0-1-cloud-amd64",
            dir.path().join("vmlinuz"),
        )
        .unwrap();
        assert_eq!(pick_kernel(dir.path()).unwrap(), "6.1.0-1-cloud-amd64");
    }
}
