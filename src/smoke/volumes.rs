//! Blank data volume disks for a smoke boot of an image with `[[volume]]`s.

use std::path::Path;

use anyhow::{Context, Result};

use super::Volume;
use crate::recipe::VolumeSpec;

/// Blank disks for a recipe's data volumes: in a temp dir removed on
/// drop, or kept (and reused when already there) in a given dir, so an
/// upgrade test's second boot finds what its first boot wrote.
pub struct VolumeDisks {
    pub volumes: Vec<Volume>,
    _tmp: Option<tempfile::TempDir>,
}

impl VolumeDisks {
    pub fn new(specs: &[VolumeSpec], keep: Option<&Path>) -> Result<VolumeDisks> {
        if specs.is_empty() {
            return Ok(VolumeDisks {
                volumes: Vec::new(),
                _tmp: None,
            });
        }
        let (dir, tmp) = match keep {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                (dir.to_owned(), None)
            }
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("kiln-volumes-")
                    .tempdir()
                    .context("creating a temp dir for volume disks")?;
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let mut volumes = Vec::new();
        for v in specs {
            let path = dir.join(format!("{}.qcow2", v.name));
            if !path.exists() {
                crate::cmd::Cmd::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(v.size.to_string())
                    .run()?;
            }
            volumes.push(Volume {
                path,
                serial: crate::assemble::volume_serial(v),
            });
        }
        Ok(VolumeDisks { volumes, _tmp: tmp })
    }
}
