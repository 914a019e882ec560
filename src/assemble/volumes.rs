//! Data volumes: data that must outlive the image lives on its own disk.
//!
//! For each `[[volume]]` the image gets an fstab line that mounts the disk
//! whose virtio serial is `vol-NAME` (`/dev/disk/by-id/virtio-vol-NAME`) at
//! its mount point with
//!
//! * `x-systemd.makefs`: a blank disk gets its filesystem on first boot
//!   (a blank disk has no label yet, which is why kiln names it by serial);
//! * `nofail` and a short `x-systemd.device-timeout`: a missing volume does
//!   not stop the boot, the services that need the data fail instead;
//!
//! and a tmpfiles.d line that gives the mounted directory its owner once it
//! is mounted. The image itself never carries data under a mount point:
//! whatever the layers put there is left out of the disk.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd::log_line;
use crate::error::BadInput;
use crate::layers::steps::{resolve_in_root, write_file};
use crate::recipe::VolumeSpec;

/// How long the boot waits for a volume's disk before going on without it
/// (udev under TCG can take tens of seconds to announce a disk).
const DEVICE_TIMEOUT_SECS: u32 = 60;

/// The virtio serial a volume's disk carries (QEMU allows 20 bytes).
pub fn serial(volume: &VolumeSpec) -> String {
    format!("vol-{}", volume.name)
}

/// The program the guest needs to make a volume's filesystem.
fn mkfs(fs: &str) -> String {
    format!("/usr/sbin/mkfs.{fs}")
}

/// fstab lines for the volumes.
pub fn fstab(volumes: &[VolumeSpec]) -> String {
    volumes
        .iter()
        .map(|v| {
            format!(
                "/dev/disk/by-id/virtio-{} {} {} defaults,nofail,x-systemd.makefs,x-systemd.device-timeout={DEVICE_TIMEOUT_SECS}s 0 2\n",
                serial(v),
                v.mount,
                v.filesystem
            )
        })
        .collect()
}

/// Prepare `root` (the assembly's throwaway overlay) for its volumes: empty
/// mount points, the tmpfiles.d owner lines, and a check that the guest can
/// make each filesystem.
pub fn prepare(root: &Path, volumes: &[VolumeSpec], recipe: &Path) -> Result<()> {
    if volumes.is_empty() {
        return Ok(());
    }
    let mut tmpfiles =
        String::from("# Written by kiln: owners of the data volumes' mount points.\n");
    for (i, v) in volumes.iter().enumerate() {
        let tool = mkfs(&v.filesystem);
        if resolve_in_root(root, &tool)
            .map(|p| !p.exists())
            .unwrap_or(true)
        {
            return Err(BadInput::new(
                recipe,
                format!("volume[{i}].filesystem"),
                format!("the image has no {tool} to make the `{}` filesystem of volume `{}` on first boot", v.filesystem, v.name),
                "install the package that provides it in a layer (e2fsprogs for ext4, xfsprogs for xfs, btrfs-progs for btrfs)",
            )
            .into());
        }
        let dir = resolve_in_root(root, &v.mount).map_err(|why| {
            BadInput::new(
                recipe,
                format!("volume[{i}].mount"),
                format!("`{}` {why}", v.mount),
                "mount volumes on a path whose directories are real directories",
            )
        })?;
        if dir.exists() {
            let left_out: Vec<String> = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !left_out.is_empty() {
                log_line(&format!(
                    "volume {}: leaving out of the image what the layers put under {}: {}",
                    v.name,
                    v.mount,
                    left_out.join(", ")
                ));
                crate::store::remove_tree(&dir)
                    .with_context(|| format!("emptying {}", dir.display()))?;
            }
        }
        crate::layers::steps::create_dirs(&dir)?;
        tmpfiles.push_str(&format!(
            "d {} 0755 {} {} -\n",
            v.mount, v.owner.user, v.owner.group
        ));
    }
    write_file(
        &root.join("etc/tmpfiles.d/kiln-volumes.conf"),
        tmpfiles.as_bytes(),
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, mount: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            mount: mount.into(),
            size: 1 << 30,
            filesystem: "ext4".into(),
            owner: crate::recipe::Owner::parse("postgres:postgres").unwrap(),
        }
    }

    #[test]
    fn fstab_mounts_by_serial_with_makefs_and_nofail() {
        assert_eq!(
            fstab(&[vol("data", "/srv/data")]),
            "/dev/disk/by-id/virtio-vol-data /srv/data ext4 defaults,nofail,x-systemd.makefs,x-systemd.device-timeout=60s 0 2\n"
        );
    }

    #[test]
    fn mount_points_are_emptied_and_owned() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::write(root.join("usr/sbin/mkfs.ext4"), "").unwrap();
        std::fs::create_dir_all(root.join("srv/data/old")).unwrap();
        std::fs::write(root.join("srv/data/old/file"), "x").unwrap();
        prepare(root, &[vol("data", "/srv/data")], Path::new("r.toml")).unwrap();
        assert_eq!(std::fs::read_dir(root.join("srv/data")).unwrap().count(), 0);
        let t = std::fs::read_to_string(root.join("etc/tmpfiles.d/kiln-volumes.conf")).unwrap();
        assert!(t.contains("d /srv/data 0755 postgres postgres -"), "{t}");
    }

    #[test]
    fn a_missing_mkfs_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            prepare(dir.path(), &[vol("data", "/srv/data")], Path::new("r.toml")).unwrap_err();
        assert!(err.is::<BadInput>());
        assert!(err.to_string().contains("e2fsprogs"), "{err}");
    }
}
