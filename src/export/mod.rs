//! Export: the deployable files a recipe asks for with `[image] formats`,
//! each made from the one assembled disk in the store, cached, and copied
//! to `out/` atomically.
//!
//! ```text
//! format         out/NAME…              made with                                   taken by
//! qcow2          .qcow2                 qemu-img convert -O qcow2                   libvirt, Proxmox, OpenStack
//! raw            .raw                   qemu-img convert -O raw (sparse)            libvirt, Proxmox, AWS import
//! vmdk           .vmdk                  -O vmdk -o subformat=streamOptimized        VMware ESXi, OVF, AWS import
//! vhd            .vhd                   -O vpc -o subformat=fixed,force_size=on     Azure
//! gce            .gce.tar.gz            disk.raw in GNU tar (oldgnu, sparse), gzip  Google Compute Engine
//! containerdisk  .containerdisk.tar     OCI image archive, see [`oci`]              KubeVirt
//! ```
//!
//! The recipe's `format` is the primary disk: the one that is smoked and
//! that the records describe (`out/NAME.qcow2`); `formats` adds files to
//! it. A format equal to the primary is the primary (the recipe loader
//! drops it from the list).
//!
//! ## Cache
//!
//! A file is cached under its own key ([`ExportInputs`]: the image key, the
//! format, and the image's name where the bytes carry it), inside the
//! image's store entry, so that `kiln cache gc` removes it with its image:
//!
//! ```text
//! images-v1/<image key>/exports/<export key>/
//! ├── NAME.vmdk | disk.vhd | disk.gce.tar.gz | …
//! ├── export.json           inputs, file, sha256
//! └── integrity.json        its own seal (see store::integrity)
//! ```
//!
//! The image's seal covers only the names it had when published, so the
//! exports beside them do not disturb it; each export is sealed on its own
//! and checked before use like any entry. The caller holds the image's
//! key lock, so two runs never convert the same image at once. A no-op
//! build finds every file in the store, and its copy in `out/` unchanged
//! (the stamp, as for the primary disk): it converts and copies nothing.
//!
//! ## The same bytes from the same image
//!
//! Tools that write "now" or a random id are pinned: the VHD footer's
//! timestamp and UUID ([`pin_vhd_footer`]), the VMDK descriptor's CID
//! ([`pin_vmdk_cid`]); the GCE tar is made with a fixed mtime, owner and
//! order, and gzip from a pipe writes no name or time; the containerDisk
//! is written by kiln itself (see [`oci`]). The clock is the image's
//! SOURCE_DATE_EPOCH.

pub mod oci;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cmd::{Cmd, Tool};
use crate::layers::{Row, Status};
use crate::plan::key::{file_digest, ExportInputs};
use crate::plan::Key;
use crate::recipe::ExportFormat;
use crate::store::{self, ImageEntry, Store};
use crate::ui::Ui;

/// The store folder, inside an image's entry, that holds its exports.
pub const EXPORTS: &str = "exports";
const ENTRY: &str = "export.json";
const MIB: u64 = 1 << 20;
/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01T00:00:00Z.
const VHD_EPOCH: u64 = 946_684_800;

/// What converting to `formats` runs, beyond assembling.
pub fn tools(formats: &[ExportFormat]) -> &'static [Tool] {
    const QEMU_IMG: Tool = Tool {
        program: "qemu-img",
        package: "qemu-utils",
    };
    const TAR: Tool = Tool {
        program: "tar",
        package: "tar",
    };
    const GZIP: Tool = Tool {
        program: "gzip",
        package: "gzip",
    };
    if formats.contains(&ExportFormat::Gce) {
        &[QEMU_IMG, TAR, GZIP]
    } else if formats.is_empty() {
        &[]
    } else {
        &[QEMU_IMG]
    }
}

/// One deployable file in `out/`, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// The file's name in `out/` (`web.vmdk`).
    pub file: String,
    /// As in the recipe: `vmdk`, `containerdisk`, …
    pub format: String,
    pub sha256: String,
    pub bytes: u64,
}

/// `export.json`: one cached deployable file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExportEntry {
    key: Key,
    inputs: ExportInputs,
    /// Its name in the entry.
    file: String,
    sha256: String,
    seconds: f64,
    created: u64,
}

/// Where one format of one image goes.
struct Target {
    format: ExportFormat,
    inputs: ExportInputs,
    key: Key,
    /// The file's name in the store entry.
    file: String,
    /// Its name in `out/`.
    out_name: String,
}

impl Target {
    fn new(format: ExportFormat, image: Key, name: &str) -> Target {
        // The bytes of these carry the image's name (the containerDisk's
        // /disk/NAME.qcow2, the VMDK descriptor's extent line).
        let named = matches!(format, ExportFormat::ContainerDisk | ExportFormat::Vmdk);
        let inputs = ExportInputs {
            image,
            format: format.name().to_owned(),
            inner_name: if named {
                name.to_owned()
            } else {
                String::new()
            },
        };
        let suffix = suffix(format);
        Target {
            format,
            key: inputs.key(),
            inputs,
            file: format!("{}.{suffix}", if named { name } else { "disk" }),
            out_name: format!("{name}.{suffix}"),
        }
    }
}

/// The end of a format's file name in `out/`.
pub fn suffix(format: ExportFormat) -> &'static str {
    match format {
        ExportFormat::Qcow2 => "qcow2",
        ExportFormat::Raw => "raw",
        ExportFormat::Vmdk => "vmdk",
        ExportFormat::Vhd => "vhd",
        ExportFormat::Gce => "gce.tar.gz",
        ExportFormat::ContainerDisk => "containerdisk.tar",
    }
}

/// Make (or find in the store) each of `formats` of the image `entry`,
/// named `name`, and publish each to `out_dir`. One summary row per
/// format; `refresh` converts whatever the store holds. The caller holds
/// the image's key lock.
pub fn export_all(
    store: &Store,
    entry: &ImageEntry,
    name: &str,
    formats: &[ExportFormat],
    out_dir: &Path,
    refresh: bool,
    ui: &Ui,
) -> Result<(Vec<Output>, Vec<Row>)> {
    let mut outputs = Vec::new();
    let mut rows = Vec::new();
    for &format in formats {
        crate::cmd::check_interrupt()?;
        let target = Target::new(format, entry.key, name);
        let stage_name = format!("export/{format}");
        let (cached, row) = match cached(store, entry, &target, refresh)? {
            Some(cached) => (cached, Row::new(&stage_name, &target.key, Status::Cached)),
            None => {
                let stage = ui.stage(&stage_name, "converting");
                match convert_into_store(store, entry, &target, name, refresh) {
                    Ok(made) => {
                        let seconds = stage.done("built");
                        let row = Row::new(&stage_name, &target.key, Status::Built).took(seconds);
                        (made, row)
                    }
                    Err(e) => {
                        stage.failed();
                        return Err(e.context(format!(
                            "making the {format} file of image {}",
                            entry.key.short()
                        )));
                    }
                }
            }
        };
        let src = export_dir(store, entry, &target.key).join(&cached.file);
        let dest = out_dir.join(&target.out_name);
        let stamp = out_dir.join(format!(".{}.stamp", target.out_name));
        publish(&src, &cached.sha256, &dest, &stamp)?;
        outputs.push(Output {
            file: target.out_name.clone(),
            format: format.name().to_owned(),
            sha256: cached.sha256,
            bytes: std::fs::metadata(&dest)
                .with_context(|| format!("reading {}", dest.display()))?
                .len(),
        });
        rows.push(row);
    }
    Ok((outputs, rows))
}

/// What `kiln export` made: the files beside the image, and a row each.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub image: PathBuf,
    pub image_key: String,
    pub outputs: Vec<Output>,
    pub rows: Vec<Row>,
}

impl ExportReport {
    pub fn text(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .outputs
            .iter()
            .zip(&self.rows)
            .map(|(o, r)| {
                vec![
                    o.format.clone(),
                    o.file.clone(),
                    r.status.to_string(),
                    format!("{:.1}", r.seconds),
                    o.sha256[..12].to_owned(),
                ]
            })
            .collect();
        crate::ui::table(&["FORMAT", "FILE", "RESULT", "SECONDS", "SHA256"], &rows)
            + "not in the image's manifest or signed provenance: list formats in the recipe's [image] formats for that\n"
    }
}

/// `kiln export IMAGE --format F`: the image's store entry (named by the
/// manifest beside IMAGE) converted to each format, written beside IMAGE.
/// The records are left as the build wrote them: a signed manifest cannot
/// grow a file after the fact.
pub fn export_image(
    store: &Store,
    image: &Path,
    formats: &[ExportFormat],
    ui: &Ui,
) -> Result<ExportReport> {
    let manifest_path = crate::record::manifest::path_for(image);
    let m = crate::record::manifest::read(&manifest_path)?;
    let key = m.image.key;
    let _lock = store.lock_key(&key, "the image", || {
        eprintln!(
            "another kiln is using image {}; waiting for it",
            key.short()
        )
    })?;
    let rebuild = format!(
        "rebuild it with `kiln build {}` and export again",
        m.recipe.first().map_or("RECIPE", |r| r.path.as_str())
    );
    if !store.has_image(&key) {
        bail!(
            "image {} ({}) is not in the store {} (removed by `kiln cache gc`?): {rebuild}",
            key.short(),
            image.display(),
            store.root().display()
        );
    }
    if !store.check_before_use(&store.image_dir(&key), |m| eprintln!("{m}"))? {
        bail!(
            "image {} was damaged in the store and has been moved aside: {rebuild}",
            key.short()
        );
    }
    let entry = store.image_entry(&key)?;
    let dir = image.parent().unwrap_or(Path::new("."));
    let (outputs, rows) = export_all(store, &entry, &m.name, formats, dir, false, ui)?;
    Ok(ExportReport {
        image: image.to_path_buf(),
        image_key: key.hex(),
        outputs,
        rows,
    })
}

fn export_dir(store: &Store, entry: &ImageEntry, key: &Key) -> PathBuf {
    store.image_dir(&entry.key).join(EXPORTS).join(key.hex())
}

/// The cached entry of `target`, when the store has it intact.
fn cached(
    store: &Store,
    entry: &ImageEntry,
    target: &Target,
    refresh: bool,
) -> Result<Option<ExportEntry>> {
    let dir = export_dir(store, entry, &target.key);
    if refresh || !dir.join(ENTRY).is_file() {
        return Ok(None);
    }
    if !store.check_before_use(&dir, |m| eprintln!("{m}"))? {
        return Ok(None);
    }
    Ok(Some(store::read_json(&dir.join(ENTRY))?))
}

/// Convert the image into a staging dir, then publish it as the export's
/// store entry.
fn convert_into_store(
    store: &Store,
    entry: &ImageEntry,
    target: &Target,
    name: &str,
    refresh: bool,
) -> Result<ExportEntry> {
    let started = Instant::now();
    let staging = store.staging()?;
    let disk = Disk {
        path: store.image_dir(&entry.key).join(&entry.file),
        format: entry.inputs.format.clone(),
    };
    let out = staging.path().join(&target.file);
    let scratch = staging.path().join("scratch");
    std::fs::create_dir(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let epoch = entry.inputs.epoch;
    match target.format {
        ExportFormat::Qcow2 | ExportFormat::Raw => convert(&disk, target.format, &out).run()?,
        ExportFormat::Vmdk => {
            convert(&disk, target.format, &out).run()?;
            pin_vmdk_cid(&out, &target.key)?;
        }
        ExportFormat::Vhd => {
            convert(&disk, target.format, &out).run()?;
            pin_vhd_footer(&out, epoch, &target.key)?;
        }
        ExportFormat::Gce => {
            let raw = scratch.join(GCE_DISK);
            convert(&disk, ExportFormat::Raw, &raw).run()?;
            gce_tar(&scratch, &out, epoch).run()?;
        }
        ExportFormat::ContainerDisk => {
            let qcow2 = qcow2_of(&disk.path, &disk.format, &scratch)?;
            oci::write_archive(&qcow2, name, epoch, &scratch, &out)?;
        }
    }
    store::remove_tree(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    let sha256 = file_digest(&out).with_context(|| format!("hashing {}", out.display()))?;
    let made = ExportEntry {
        key: target.key,
        inputs: target.inputs.clone(),
        file: target.file.clone(),
        sha256,
        seconds: started.elapsed().as_secs_f64(),
        created: store::now(),
    };
    store::write_json_atomic(&staging.path().join(ENTRY), &made)?;
    let exports = store.image_dir(&entry.key).join(EXPORTS);
    std::fs::create_dir_all(&exports).with_context(|| format!("creating {}", exports.display()))?;
    store.publish_with(
        staging,
        &export_dir(store, entry, &target.key),
        refresh,
        &[(Path::new(&made.file), &made.sha256)],
        crate::store::Durability::Synced,
    )?;
    Ok(made)
}

/// The disk as a qcow2 (a containerDisk ships one): `path` itself, or a
/// conversion of it (`format` as qemu-img names it) in `scratch`.
pub fn qcow2_of(path: &Path, format: &str, scratch: &Path) -> Result<PathBuf> {
    if format == "qcow2" {
        return Ok(path.to_owned());
    }
    let disk = Disk {
        path: path.to_owned(),
        format: format.to_owned(),
    };
    let qcow2 = scratch.join("disk.qcow2");
    convert(&disk, ExportFormat::Qcow2, &qcow2).run()?;
    Ok(qcow2)
}

/// The assembled disk in the store.
struct Disk {
    path: PathBuf,
    /// `qcow2` or `raw`, as qemu-img names it.
    format: String,
}

/// The name GCE requires inside its tar.
const GCE_DISK: &str = "disk.raw";

/// `qemu-img convert` of the disk to `format` (one of the formats qemu-img
/// writes: qcow2, raw, vmdk, vhd). The source format is always given, never
/// probed.
fn convert(disk: &Disk, format: ExportFormat, dest: &Path) -> Cmd {
    let cmd = Cmd::new("qemu-img").args(["convert", "-f", &disk.format]);
    let cmd = match format {
        ExportFormat::Qcow2 => cmd.args(["-O", "qcow2"]),
        // Sparse: the zeros of the unused root filesystem stay holes.
        ExportFormat::Raw | ExportFormat::Gce => cmd.args(["-O", "raw"]),
        // One file that VMware imports and OVF packages carry.
        ExportFormat::Vmdk => cmd.args(["-O", "vmdk", "-o", "subformat=streamOptimized"]),
        // Azure takes only a fixed VHD whose virtual size is a whole number
        // of MiB: force_size keeps the disk's size (a MiB multiple, see
        // assemble) instead of rounding it to a CHS geometry.
        ExportFormat::Vhd => cmd.args(["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
        ExportFormat::ContainerDisk => unreachable!("a containerDisk is written by kiln"),
    };
    cmd.arg(&disk.path).arg(dest)
}

/// GCE's image archive: exactly `disk.raw` (in `dir`), in a gzip-compressed
/// tar of GNU's old format with holes kept (GCE's import documents
/// `tar --format=oldgnu -Sczf`), with a fixed clock, owner and mode.
fn gce_tar(dir: &Path, dest: &Path, epoch: u64) -> Cmd {
    Cmd::new("tar")
        .args(["--format=oldgnu", "--sparse", "--gzip", "--create"])
        .arg(format!("--mtime=@{epoch}"))
        .args([
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mode=0644",
            "--no-recursion",
        ])
        .arg("--file")
        .arg(dest)
        .arg("--directory")
        .arg(dir)
        .arg(GCE_DISK)
}

/// A fixed VHD's footer (its last 512 bytes) holds the time qemu-img ran
/// and a random UUID: set them to SOURCE_DATE_EPOCH and a UUID derived from
/// the export key, and recompute the footer's checksum.
pub fn pin_vhd_footer(path: &Path, epoch: u64, key: &Key) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len < 512 || (len - 512) % MIB != 0 {
        bail!(
            "{} is {len} bytes: not a fixed VHD of a whole number of MiB plus its footer",
            path.display()
        );
    }
    let mut footer = [0u8; 512];
    f.seek(SeekFrom::Start(len - 512))
        .and_then(|_| f.read_exact(&mut footer))
        .with_context(|| format!("reading the footer of {}", path.display()))?;
    let uuid = uuid_bytes(&key.derive_uuid("vhd"));
    set_vhd_footer(&mut footer, epoch, uuid)
        .with_context(|| format!("the footer of {}", path.display()))?;
    f.seek(SeekFrom::Start(len - 512))
        .and_then(|_| f.write_all(&footer))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing the footer of {}", path.display()))
}

/// The footer fields that change from run to run, pinned (VHD spec: the
/// time stamp at 24 is seconds since 2000-01-01, big-endian; the checksum
/// at 64 is the one's complement of the sum of every other byte; the
/// unique id at 68).
fn set_vhd_footer(footer: &mut [u8; 512], epoch: u64, uuid: [u8; 16]) -> Result<()> {
    if &footer[..8] != b"conectix" {
        bail!("no VHD footer (no `conectix` cookie)");
    }
    let stamp = u32::try_from(epoch.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX);
    footer[24..28].copy_from_slice(&stamp.to_be_bytes());
    footer[68..84].copy_from_slice(&uuid);
    footer[64..68].copy_from_slice(&[0; 4]);
    let sum = footer
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

fn uuid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("a derived UUID is hex");
    }
    out
}

/// qemu-img writes a random content id into a VMDK's descriptor
/// (`CID=` and up to eight hex digits, unpadded): write the descriptor
/// again with one from the key, always eight digits. The descriptor is
/// text in a zero-padded area whose place and size (in sectors) the
/// header gives.
pub fn pin_vmdk_cid(path: &Path, key: &Key) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut header = [0u8; 44];
    f.read_exact(&mut header)
        .with_context(|| format!("reading the header of {}", path.display()))?;
    if &header[..4] != b"KDMV" {
        bail!("{} is not a VMDK (no KDMV magic)", path.display());
    }
    let sectors = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (offset, size) = (sectors(28) * 512, sectors(36) * 512);
    if size == 0 || size > MIB {
        bail!(
            "{} has a descriptor of {size} bytes: not one qemu-img writes",
            path.display()
        );
    }
    let mut area = vec![0u8; size as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut area))
        .with_context(|| format!("reading the descriptor of {}", path.display()))?;
    let pinned = with_cid(&area, &key.hex()[..8])
        .with_context(|| format!("the descriptor of {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(&pinned))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing the descriptor of {}", path.display()))
}

/// The descriptor area with its `CID=` line set to `cid`, as long as it was.
fn with_cid(area: &[u8], cid: &str) -> Result<Vec<u8>> {
    let text_len = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let text = std::str::from_utf8(&area[..text_len]).context("the descriptor is not text")?;
    let mut found = false;
    let lines: Vec<String> = text
        .split_inclusive('\n')
        .map(|line| match line.strip_prefix("CID=") {
            Some(rest) if !found && rest.trim_end().chars().all(|c| c.is_ascii_hexdigit()) => {
                found = true;
                format!("CID={cid}\n")
            }
            _ => line.to_owned(),
        })
        .collect();
    if !found {
        bail!("no `CID=` line");
    }
    let mut out = lines.concat().into_bytes();
    if out.len() >= area.len() {
        bail!("no room for an eight-digit CID");
    }
    out.resize(area.len(), 0);
    Ok(out)
}

/// Copy `src` (whose content has the digest `sha256`) to `dest` in `out/`,
/// unless the copy there is already it: same digest, inode, size, mtime and
/// ctime as when kiln wrote it, which `stamp` remembers. Any write to the
/// file or its replacement changes the ctime or the inode, which, unlike
/// the mtime, nobody can set back (`cp -p`, `touch -r`). The copy is made
/// beside `dest` and renamed over it, so `dest` is the old file or the new
/// one.
pub fn publish(src: &Path, sha256: &str, dest: &Path, stamp_path: &Path) -> Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = |p: &Path| -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        use std::os::unix::fs::MetadataExt;
        Some(format!(
            "{sha256} {} {} {}.{} {}.{}",
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ))
    };
    if stamp(dest).is_some_and(|s| std::fs::read_to_string(stamp_path).is_ok_and(|t| t == s)) {
        return Ok(());
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    if let Err(e) = Cmd::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(src)
        .arg(&tmp)
        .run()
    {
        // Interrupted or out of space: leave no half copy in out/.
        if let Err(r) = std::fs::remove_file(&tmp) {
            crate::cmd::log_line(&format!("warning: removing {}: {r}", tmp.display()));
        }
        return Err(e);
    }
    std::fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    let s = stamp(dest).context("stat of the exported file")?;
    std::fs::write(stamp_path, s).with_context(|| format!("writing {}", stamp_path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        ExportInputs {
            image: Key::parse(&"ab".repeat(32)).unwrap(),
            format: "vhd".into(),
            inner_name: String::new(),
        }
        .key()
    }

    fn line(format: ExportFormat, disk_format: &str) -> String {
        let disk = Disk {
            path: PathBuf::from("/s/images-v1/k/disk.qcow2"),
            format: disk_format.into(),
        };
        convert(&disk, format, Path::new("/s/tmp/out")).display()
    }

    #[test]
    fn each_format_is_one_qemu_img_convert_with_the_source_format_given() {
        let src = "/s/images-v1/k/disk.qcow2 /s/tmp/out";
        assert_eq!(
            line(ExportFormat::Vmdk, "qcow2"),
            format!("qemu-img convert -f qcow2 -O vmdk -o subformat=streamOptimized {src}")
        );
        assert_eq!(
            line(ExportFormat::Vhd, "qcow2"),
            format!("qemu-img convert -f qcow2 -O vpc -o subformat=fixed,force_size=on {src}")
        );
        assert_eq!(
            line(ExportFormat::Raw, "qcow2"),
            format!("qemu-img convert -f qcow2 -O raw {src}")
        );
        assert_eq!(
            line(ExportFormat::Qcow2, "raw"),
            format!("qemu-img convert -f raw -O qcow2 {src}")
        );
    }

    #[test]
    fn the_gce_tar_is_oldgnu_sparse_gzip_with_only_disk_raw_and_a_fixed_clock() {
        let cmd = gce_tar(
            Path::new("/s/tmp/x"),
            Path::new("/s/tmp/o.tar.gz"),
            1_700_000_000,
        );
        assert_eq!(
            cmd.display(),
            "tar --format=oldgnu --sparse --gzip --create --mtime=@1700000000 --owner=0 \
             --group=0 --numeric-owner --mode=0644 --no-recursion --file /s/tmp/o.tar.gz \
             --directory /s/tmp/x disk.raw"
        );
    }

    #[test]
    fn file_names_in_out_and_in_the_store() {
        let image = Key::parse(&"cd".repeat(32)).unwrap();
        let names: Vec<(String, String)> = ExportFormat::ALL
            .iter()
            .map(|&f| {
                let t = Target::new(f, image, "web");
                (t.out_name, t.file)
            })
            .collect();
        let want = [
            ("web.qcow2", "disk.qcow2"),
            ("web.raw", "disk.raw"),
            ("web.vmdk", "web.vmdk"),
            ("web.vhd", "disk.vhd"),
            ("web.gce.tar.gz", "disk.gce.tar.gz"),
            ("web.containerdisk.tar", "web.containerdisk.tar"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(names, want);
        // Renaming the image re-makes only the files that carry the name.
        let renamed = |f| Target::new(f, image, "db").key == Target::new(f, image, "web").key;
        assert!(renamed(ExportFormat::Vhd));
        assert!(!renamed(ExportFormat::ContainerDisk));
    }

    #[test]
    fn the_vhd_footer_gets_the_build_clock_a_derived_uuid_and_a_valid_checksum() {
        let mut footer = [0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        footer[24..28].copy_from_slice(&0x32a1_0286u32.to_be_bytes());
        footer[68..84].copy_from_slice(&[0x5a; 16]);
        let uuid = uuid_bytes(&key().derive_uuid("vhd"));
        set_vhd_footer(&mut footer, 1_700_000_000, uuid).unwrap();
        assert_eq!(
            u32::from_be_bytes(footer[24..28].try_into().unwrap()),
            1_700_000_000 - 946_684_800
        );
        assert_eq!(&footer[68..84], &uuid);
        let stored = u32::from_be_bytes(footer[64..68].try_into().unwrap());
        let mut rest = footer;
        rest[64..68].copy_from_slice(&[0; 4]);
        let sum = rest.iter().fold(0u32, |s, &b| s.wrapping_add(u32::from(b)));
        assert_eq!(stored, !sum);
        let mut not_vhd = [0u8; 512];
        assert!(set_vhd_footer(&mut not_vhd, 0, uuid).is_err());
    }

    #[test]
    fn the_vmdk_cid_becomes_eight_digits_from_the_key_whatever_qemu_wrote() {
        let area = |text: &str| {
            let mut a = text.as_bytes().to_vec();
            a.resize(1024, 0);
            a
        };
        let text = "# Disk DescriptorFile\nversion=1\nCID=5f3a2b1\nparentCID=ffffffff\n";
        let pinned = with_cid(&area(text), "0123abcd").unwrap();
        let want = "# Disk DescriptorFile\nversion=1\nCID=0123abcd\nparentCID=ffffffff\n";
        assert_eq!(pinned, area(want));
        // A random CID of eight digits gives the same bytes.
        let eight = text.replace("5f3a2b1", "c9c7e9e5");
        assert_eq!(with_cid(&area(&eight), "0123abcd").unwrap(), pinned);
        assert!(with_cid(&area("version=1\nparentCID=ffffffff\n"), "0123abcd").is_err());
    }

    #[test]
    fn tools_name_their_packages_only_for_the_formats_asked_for() {
        assert!(tools(&[]).is_empty());
        let progs = |f: &[ExportFormat]| tools(f).iter().map(|t| t.program).collect::<Vec<_>>();
        assert_eq!(progs(&[ExportFormat::Vmdk]), ["qemu-img"]);
        assert_eq!(
            progs(&[ExportFormat::Gce, ExportFormat::Vhd]),
            ["qemu-img", "tar", "gzip"]
        );
    }

    /// `src` ("disk", digest d1) published once into `dir/out/web.vmdk`:
    /// (src, dest, stamp).
    fn published_once(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let src = dir.join("src");
        std::fs::write(&src, b"disk").unwrap();
        let out = dir.join("out");
        let (dest, stamp) = (out.join("web.vmdk"), out.join(".web.vmdk.stamp"));
        publish(&src, "d1", &dest, &stamp).unwrap();
        (src, dest, stamp)
    }

    #[test]
    fn publish_copies_once_then_leaves_an_unchanged_copy_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest, stamp) = published_once(dir.path());
        let out = dest.parent().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"disk");
        std::fs::write(&src, b"changed").unwrap();
        publish(&src, "d1", &dest, &stamp).unwrap();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"disk",
            "same digest: no copy"
        );
        publish(&src, "d2", &dest, &stamp).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"changed");
        let names: Vec<_> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }

    #[test]
    fn publish_copies_again_over_a_rewrite_that_kept_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest, stamp) = published_once(dir.path());
        // Rewritten in place with as many bytes, its mtime set back.
        let mtime = std::fs::metadata(&dest).unwrap().modified().unwrap();
        std::fs::write(&dest, b"half").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&dest)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        publish(&src, "d1", &dest, &stamp).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"disk");
    }
}
