//! The build's smoke stage: boot the image just built, unless this very
//! disk already passed these checks.
//!
//! A pass is remembered in the store under a [`SmokeInputs`] key (the
//! image key, the timeout, the seed, the checks) as
//! `state-v1/smoke/<key>.json`, holding the disk's sha256 and the report.
//! A remembered pass counts only for a disk with that sha256; otherwise
//! the image is booted again. Failures are never remembered: a flaky
//! failure should be retried by the next build.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::volumes::VolumeDisks;
use super::{Accel, SmokeOptions, SmokeReport};
use crate::plan::key::{Key, SmokeInputs};
use crate::recipe::{Recipe, SmokeSpec};
use crate::store::Store;
use crate::ui::Ui;

/// What the build's smoke stage is asked to do.
pub struct Stage<'a> {
    pub store: &'a Store,
    pub image_key: Key,
    /// The exported disk, and its sha256.
    pub disk: &'a Path,
    pub disk_sha256: &'a str,
    pub recipe: &'a Recipe,
    pub accel: Accel,
    pub firmware: Option<PathBuf>,
    pub log_path: PathBuf,
    pub verbose: bool,
    /// Boot even when a pass is remembered.
    pub force: bool,
    /// Boot with Secure Boot on, enrolling this certificate.
    pub secure_boot: Option<super::secure_boot::DbCert>,
    /// A sealed image's root hash (see `sealed`).
    pub verity: Option<String>,
}

/// How the stage went.
pub struct StageReport {
    pub report: SmokeReport,
    /// A remembered pass: nothing was booted.
    pub cached: bool,
    pub seconds: f64,
}

/// A remembered pass.
#[derive(Serialize, Deserialize)]
struct CachedPass {
    disk_sha256: String,
    report: SmokeReport,
}

/// A plain smoke writes the seed data and reads it back in one boot.
pub fn seed_then_checks(spec: &SmokeSpec) -> SmokeSpec {
    SmokeSpec {
        checks: spec.seed.iter().chain(&spec.checks).cloned().collect(),
        seed: Vec::new(),
        ..spec.clone()
    }
}

/// The key a pass of `spec` on the image `image_key` is remembered under,
/// with Secure Boot on and this certificate enrolled when there is one.
pub fn cache_key(image_key: Key, spec: &SmokeSpec, secure_boot: Option<&str>) -> Key {
    let SmokeSpec {
        timeout,
        checks,
        http,
        seed,
        ssh,
        ssh_checks,
        cloud_init,
    } = spec;
    SmokeInputs {
        image: image_key,
        timeout_secs: timeout.as_secs(),
        seed: seed.clone(),
        checks: checks.clone(),
        http: http.clone(),
        secure_boot: secure_boot.map(str::to_owned),
        ssh: *ssh,
        ssh_checks: ssh_checks.clone(),
        cloud_init: *cloud_init,
    }
    .key()
}

impl Stage<'_> {
    fn cache_path(&self) -> PathBuf {
        self.store.state_dir("smoke").join(format!(
            "{}.json",
            cache_key(
                self.image_key,
                &self.recipe.smoke,
                self.secure_boot.as_ref().map(|c| c.fingerprint.as_str())
            )
        ))
    }

    /// The remembered pass of this disk, if any.
    fn remembered(&self) -> Option<SmokeReport> {
        let pass: CachedPass = crate::store::read_json(&self.cache_path()).ok()?;
        (pass.disk_sha256 == self.disk_sha256 && pass.report.passed).then_some(pass.report)
    }

    /// Boot (or recall a pass). `Err` is kiln failing, not the image.
    pub fn run(&self, ui: &Ui) -> Result<StageReport> {
        if !self.force {
            if let Some(report) = self.remembered() {
                return Ok(StageReport {
                    report,
                    cached: true,
                    seconds: 0.0,
                });
            }
        }
        let started = Instant::now();
        let disks = VolumeDisks::new(&self.recipe.volumes, None)?;
        let opts = SmokeOptions {
            accel: self.accel,
            firmware: self.firmware.clone(),
            state_dir: self.store.state_dir("host"),
            firmware_dir: self.store.root().join("firmware-v1"),
            log_path: self.log_path.clone(),
            verbose: self.verbose,
            volumes: disks.volumes.clone(),
            wait_poweroff: false,
            keep_overlay: None,
            secure_boot: self.secure_boot.clone(),
            verity: self.verity.clone(),
            ssh_authorized_key: None,
        };
        let stage = ui.stage("smoke", "booting in QEMU");
        let report = match super::run(self.disk, &seed_then_checks(&self.recipe.smoke), &opts) {
            Ok(report) => report,
            Err(e) => {
                stage.failed();
                return Err(e.context("running the smoke boot"));
            }
        };
        if report.passed {
            stage.done("passed");
            crate::store::write_json_atomic(
                &self.cache_path(),
                &CachedPass {
                    disk_sha256: self.disk_sha256.to_owned(),
                    report: report.clone(),
                },
            )?;
        } else {
            stage.failed();
        }
        Ok(StageReport {
            report,
            cached: false,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_seed_runs_first_and_counts_in_the_key() {
        let spec = SmokeSpec {
            timeout: Duration::from_secs(60),
            checks: vec!["check".into()],
            http: vec![],
            seed: vec!["seed".into()],
            ssh: false,
            ssh_checks: vec![],
            cloud_init: false,
        };
        let one = seed_then_checks(&spec);
        assert_eq!(one.checks, ["seed", "check"]);
        assert!(one.seed.is_empty());
        let image = Key::parse(&"a".repeat(64)).unwrap();
        assert_ne!(cache_key(image, &spec, None), cache_key(image, &one, None));
        assert_ne!(
            cache_key(image, &spec, None),
            cache_key(image, &spec, Some("ab"))
        );
    }
}
