//! The upgrade test: two boots on the same data volumes.
//!
//! Boot 1 runs the old image with the recipe's `[smoke] seed` (commands
//! that write data) and waits for the guest to power off cleanly, so what
//! it wrote is on the volumes. Boot 2 runs the new image on those volumes
//! with the checks, which look for the data. A failed seed is reported as
//! such: the new image was then never booted.

use std::path::Path;

use anyhow::Result;

use super::{SmokeOptions, SmokeReport};
use crate::recipe::SmokeSpec;
use crate::ui::Ui;

/// How the two boots went.
pub enum Upgrade {
    /// Boot 1 (the old image, seeding) failed; boot 2 did not happen.
    SeedFailed(SmokeReport),
    /// Boot 1 seeded and shut down; this is boot 2's report.
    Checked(SmokeReport),
}

/// Seed on `old`, then check `new`. `opts.volumes` must be kept disks
/// (both boots use them); `spec.seed` must not be empty.
pub fn run(
    old: &Path,
    new: &Path,
    spec: &SmokeSpec,
    opts: &SmokeOptions,
    ui: &Ui,
) -> Result<Upgrade> {
    let seed_spec = SmokeSpec {
        timeout: spec.timeout,
        checks: spec.seed.clone(),
        http: Vec::new(),
        seed: Vec::new(),
        ssh: false,
        ssh_checks: Vec::new(),
        cloud_init: false,
    };
    // The old image only writes the data; Secure Boot is the new one's test
    // (the old one may be unsigned, or signed by another key).
    let seed_opts = SmokeOptions {
        log_path: opts.log_path.with_extension("seed.log"),
        wait_poweroff: true,
        keep_overlay: None,
        secure_boot: None,
        ..opts.clone()
    };
    let stage = ui.stage(
        "smoke (old)",
        &format!("booting {} and seeding its volumes", old.display()),
    );
    let seeded = super::run(old, &seed_spec, &seed_opts);
    match &seeded {
        Ok(r) if r.passed => stage.done("seeded, shut down cleanly"),
        _ => stage.failed(),
    };
    let seeded = seeded?;
    if !seeded.passed {
        return Ok(Upgrade::SeedFailed(seeded));
    }
    let checks_spec = SmokeSpec {
        seed: Vec::new(),
        ..spec.clone()
    };
    let stage = ui.stage("smoke", &format!("booting {}", new.display()));
    let report = super::run(new, &checks_spec, opts);
    match &report {
        Ok(r) if r.passed => stage.done("passed"),
        _ => stage.failed(),
    };
    Ok(Upgrade::Checked(report?))
}
