//! The layout of the disks kiln writes, in one place: `assemble` writes it,
//! `record` (verify, check-repro) reads it back.
//!
//! GPT with two partitions: a FAT ESP holding the UKI at
//! `/EFI/BOOT/BOOTX64.EFI`, then an ext4 root labelled [`ROOT_LABEL`], typed
//! as an x86-64 root by the Discoverable Partitions Specification. A sealed
//! image (`[image] verity = true`) has a third, the root's dm-verity hash
//! tree, typed as the x86-64 root-verity partition (see `assemble::verity`).

use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::Cmd;

pub const SECTOR: u64 = 512;
/// "EFI System Partition".
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// "Linux root (x86-64)" from the Discoverable Partitions Specification.
pub const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// "Linux root verity (x86-64)" from the Discoverable Partitions
/// Specification: the dm-verity hash tree of a sealed image's root.
pub const ROOT_VERITY_TYPE: &str = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5";
/// The root filesystem's label and its GPT partition name.
pub const ROOT_LABEL: &str = "root";
/// The GPT partition name of a sealed image's hash tree.
pub const ROOT_VERITY_NAME: &str = "root-verity";
/// The record of every path of the root filesystem, beside the disk in the
/// store.
pub const FILES_JSON: &str = "files.json";

/// One GPT partition as sfdisk reports it, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub type_guid: String,
    /// The partition's own GUID, as sfdisk prints it (upper case).
    pub uuid: String,
    pub start: u64,
    pub size: u64,
}

impl Partition {
    /// The root: by name, as kiln writes it, or by type.
    pub fn is_root(&self) -> bool {
        self.name == ROOT_LABEL || self.type_guid.eq_ignore_ascii_case(ROOT_TYPE)
    }
}

/// The partitions of a raw disk image.
pub fn partitions(raw: &Path) -> Result<Vec<Partition>> {
    let out = Cmd::new("sfdisk").arg("--json").arg(raw).output()?;
    parse_sfdisk_json(&out.stdout)
        .with_context(|| format!("reading the partitions of {}", raw.display()))
}

fn parse_sfdisk_json(json: &[u8]) -> Result<Vec<Partition>> {
    let table: serde_json::Value = serde_json::from_slice(json).context("parsing sfdisk --json")?;
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .context("sfdisk shows no partitions")?;
    parts
        .iter()
        .map(|p| {
            let start = p["start"].as_u64().context("a partition without a start")?;
            let size = p["size"].as_u64().context("a partition without a size")?;
            Ok(Partition {
                name: p["name"].as_str().unwrap_or("").to_owned(),
                type_guid: p["type"].as_str().unwrap_or("").to_owned(),
                uuid: p["uuid"].as_str().unwrap_or("").to_owned(),
                start: start * SECTOR,
                size: size * SECTOR,
            })
        })
        .collect()
}

/// Copy the UKI (`EFI/BOOT/BOOTX64.EFI` on the ESP) of a built disk
/// (qcow2 or raw) to `dest`, through a raw copy in `scratch` (sparse,
/// removed afterwards).
pub fn read_uki(disk: &Path, dest: &Path, scratch: &Path) -> Result<()> {
    let raw = scratch.join("read-uki.raw");
    Cmd::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .run()?;
    let esp = partitions(&raw)?
        .into_iter()
        .find(|p| p.type_guid.eq_ignore_ascii_case(ESP_TYPE))
        .with_context(|| format!("{} has no ESP", disk.display()));
    let copied = esp.and_then(|esp| {
        Cmd::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@{}", raw.display(), esp.start))
            .arg("::/EFI/BOOT/BOOTX64.EFI")
            .arg(dest)
            .run()
            .with_context(|| format!("reading the UKI off {}", disk.display()))
    });
    let removed = std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()));
    crate::cmd::keep_first_error(copied, removed)
}

/// The root-verity (hash tree) partition of a raw disk image, if it has one.
pub fn verity_partition(raw: &Path) -> Result<Option<Partition>> {
    Ok(partitions(raw)?
        .into_iter()
        .find(|p| p.type_guid.eq_ignore_ascii_case(ROOT_VERITY_TYPE)))
}

/// The root partition of a raw disk image.
pub fn root_partition(raw: &Path) -> Result<Partition> {
    partitions(raw)?
        .into_iter()
        .find(Partition::is_root)
        .with_context(|| format!("{} has no root partition", raw.display()))
}

/// Quote a path for debugfs's command parser (a doubled quote is a quote).
pub fn debugfs_quote(path: &str) -> String {
    format!("\"{}\"", path.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_root_by_name_or_type() {
        let json = format!(
            r#"{{"partitiontable": {{"label": "gpt", "partitions": [
                {{"node": "d1", "start": 2048, "size": 131072, "type": "{ESP_TYPE}", "name": "esp"}},
                {{"node": "d2", "start": 133120, "size": 4096, "type": "{}", "name": "x"}}
            ]}}}}"#,
            ROOT_TYPE.to_lowercase()
        );
        let parts = parse_sfdisk_json(json.as_bytes()).unwrap();
        assert_eq!(parts[0].start, 2048 * 512);
        assert!(!parts[0].is_root());
        assert!(parts[1].is_root(), "typed as root, whatever its name");
        assert_eq!(parts[1].size, 4096 * 512);
    }

    #[test]
    fn quotes_for_debugfs() {
        assert_eq!(debugfs_quote(r#"/a "b""#), r#""/a ""b""""#);
    }
}
