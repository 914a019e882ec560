//! Boot smoke: prove in QEMU that an image boots and its services work.
//!
//! # The protocol
//!
//! kiln never changes the image to test it. The VM boots a throwaway qcow2
//! overlay on the built disk (so the disk is opened read-only) with UEFI
//! firmware and a throwaway copy of its variable store. Three SMBIOS
//! credentials, which systemd ≥ 256 imports at boot, carry kiln's part in:
//! a unit (`systemd.extra-unit.kiln-smoke.service`), a drop-in that makes
//! multi-user.target want it, and the check script the unit runs.
//!
//! The script waits until `systemctl is-system-running` leaves "starting"
//! (bounded), reports the state and the failed units, runs each check with
//! `sh -c` and reports its exit code and last lines, then says `done`. Each
//! report is one line that starts `KILN-SMOKE-<nonce>`, with a nonce drawn
//! fresh for every boot, so no other text can pass for a result. The
//! reports go to a second serial port, ttyS1, that QEMU writes to a file
//! kiln tails: the console, ttyS0, is no good for them, because the serial
//! getty's vhangup() cuts off every writer that opened it before, and
//! kernel messages interleave with them. Both are merged into the log. Then the guest powers off, after a pause when there are HTTP
//! checks, which kiln makes itself, from the host, through user-mode
//! networking's host forwards, as soon as it reads `done`. kiln does not
//! wait for the guest's power-off: once it has a verdict it kills QEMU.
//!
//! With an SSH login (`[smoke] ssh`, `cloud_init`), kiln also hands the
//! guest a throwaway public key (as the `ssh.authorized_keys.root`
//! credential, or in a cloud-init NoCloud seed volume), forwards a port to
//! its 22, and the script reports the guest's SSH host public keys before
//! `done`; kiln then logs in with OpenSSH, checking the host key against
//! them, and runs the SSH checks like the HTTP ones (see [`ssh`] and
//! [`cloud`]). A refused login is its own failure, not a failed check.
//!
//! While waiting, kiln also reads the console for the ways a boot dies
//! early (kernel panic, emergency mode, an initramfs that cannot find the
//! root file system, the firmware's shell when there is nothing to boot)
//! and fails at once with that reason instead of waiting for the timeout.
//!
//! A guest whose systemd is older than 256 never runs kiln's unit: kiln
//! then takes a login prompt on the console as "booted", runs the HTTP
//! checks, and fails if the recipe has in-guest checks, since they could
//! not run (a check that did not run did not pass).
//!
//! # Every check, every time
//!
//! A boot under TCG costs a minute, so one boot tells everything: the
//! guest runs every in-guest check whatever the earlier ones did, and kiln
//! makes every HTTP check once the guest said `done`. The report carries
//! each result (passed or failed, exit code, output tail), and the verdict
//! is a failure when any of them failed. A boot-level failure (a panic,
//! emergency mode, a timeout, failed units, a boot that never finished)
//! is the verdict on its own: the HTTP checks are not made then, though
//! the in-guest results that did come back are kept in the report.
//!
//! Results: `Ok(report)` with `report.failure` `None` passed, `Some` the
//! image failed (exit code 3); `Err` kiln itself broke or was interrupted.

mod accel;
pub mod cloud;
mod console;
mod firmware;
mod guest;
mod http;
mod qemu;
pub mod sealed;
pub mod secure_boot;
pub mod ssh;
pub mod stage;
pub mod upgrade;
pub mod volumes;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use accel::Accel;
#[allow(unused_imports)] // the build stage and main.rs will use them
pub use firmware::{find_firmware, Firmware};
pub use secure_boot::SecureBootMode;

use crate::cmd;
use crate::recipe::SmokeSpec;
use console::{Console, Event, Marker};

/// How often the wait loop wakes to check the clock and Ctrl-C.
const POLL: Duration = Duration::from_millis(100);
/// After a fatal console message, keep logging this long so the log holds
/// the whole story (a panic's stack trace follows its first line).
const FATAL_LINGER: Duration = Duration::from_secs(1);
/// After a login prompt, how long kiln's unit may take to say `begin`
/// before kiln decides the guest did not import its credentials.
const UNIT_START_GRACE: Duration = Duration::from_secs(30);
/// First systemd that imports SMBIOS credentials as units and drop-ins.
const SYSTEMD_WITH_CREDENTIALS: u32 = 256;
/// How long the guest stays up after `done` for the host's HTTP and SSH
/// checks (kiln kills the VM as soon as it is finished with them).
const HOST_CHECKS_HOLD_BASE_SECS: u64 = 60;
/// More time the guest stays up for each SSH login (slow under emulation).
const SSH_HOLD_SECS: u64 = 30;
/// What kiln runs as root over SSH when the recipe has no `ssh_checks`:
/// the login is the check.
const LOGIN_ONLY: &str = "true";
/// Least time the guest waits for its boot to finish; otherwise half the
/// smoke timeout, so kiln hears about a stuck boot before its own timeout.
const MIN_SETTLE_SECS: u64 = 10;

/// How to run a smoke boot.
#[derive(Debug, Clone)]
pub struct SmokeOptions {
    pub accel: Accel,
    /// `--firmware`
    pub firmware: Option<PathBuf>,
    /// A folder in the store for the cached KVM verdict (created if missing).
    pub state_dir: PathBuf,
    /// The store's `firmware-v1/`, for the bundled firmware of last resort.
    pub firmware_dir: PathBuf,
    /// The serial console is written here, pass or fail.
    pub log_path: PathBuf,
    /// Also stream the console to stderr.
    pub verbose: bool,
    /// Data volume disks to attach (virtio, with their serials), in order.
    pub volumes: Vec<Volume>,
    /// After the checks pass, wait for the guest to power itself off (a
    /// clean shutdown, so data written to volumes is on disk) instead of
    /// killing the VM.
    pub wait_poweroff: bool,
    /// Keep what the VM wrote to its root disk in this qcow2 overlay (on
    /// the built disk) instead of a throwaway one; implies a clean shutdown.
    pub keep_overlay: Option<PathBuf>,
    /// Boot with Secure Boot enforced and this certificate in the db (see
    /// `secure_boot`); `None` boots without Secure Boot.
    pub secure_boot: Option<secure_boot::DbCert>,
    /// A sealed image's root hash, from its manifest: kiln checks the
    /// guest runs on exactly that root (see `sealed`).
    pub verity: Option<String>,
    /// With an SSH login: the public key passed to the guest as root's
    /// authorized key instead of the throwaway key's (kiln still logs in
    /// with the throwaway key, so the login is then refused).
    pub ssh_authorized_key: Option<String>,
}

/// A data volume's disk for the VM.
#[derive(Debug, Clone)]
pub struct Volume {
    pub path: PathBuf,
    /// The virtio serial the image's fstab looks for.
    pub serial: String,
}

/// How long a guest may take to power off cleanly once it said `done`.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(120);

/// What one smoke boot found, pass or fail.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SmokeReport {
    /// Whether the image passed: no failure, every check passed.
    pub passed: bool,
    /// Why it failed, when it did.
    pub failure: Option<SmokeFailure>,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// From QEMU's start to the guest reporting the boot finished; `None`
    /// when the boot never got that far.
    pub boot_secs: Option<f64>,
    /// The whole smoke stage, firmware lookup to verdict.
    pub total_secs: f64,
    /// Every check that was run, in-guest ones first, then HTTP.
    pub checks: Vec<CheckResult>,
    /// In-guest checks plus HTTP checks.
    pub checks_passed: usize,
    pub checks_total: usize,
    /// `systemctl is-system-running` once the boot finished.
    pub system_state: String,
    /// The guest's systemd, when it printed it.
    pub systemd_version: Option<u32>,
    pub firmware: FirmwareUsed,
    /// With Secure Boot on, the certificate enrolled in the db; `None`
    /// when the boot was without Secure Boot.
    #[serde(default)]
    pub secure_boot: Option<secure_boot::SecureBootUsed>,
    pub log: PathBuf,
    /// Anything the user should know about a pass (e.g. old systemd).
    pub note: Option<String>,
    /// With an SSH login: the host public keys the guest reported (made at
    /// this boot), which kiln checked the host key against.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_host_keys: Vec<String>,
    /// Unix seconds when the verdict was reached.
    pub finished: u64,
}

/// The firmware a smoke booted with.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FirmwareUsed {
    /// The code (or combined) image QEMU mapped.
    pub path: PathBuf,
    pub sha256: String,
    /// Where it was found (`--firmware`, `./firmware`, a system package).
    pub origin: String,
}

impl fmt::Display for FirmwareUsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.origin)
    }
}

/// Which kind of check a result is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A shell command run in the guest.
    Guest,
    /// A GET kiln makes from the host.
    Http,
    /// kiln's own in-guest check that Secure Boot is on (only when it is).
    SecureBoot,
    /// kiln's own in-guest check of a sealed image's verity root.
    Sealed,
    /// A command run as root over SSH, from the host.
    Ssh,
    /// kiln's own check that root's login with a key the guest was never
    /// given is refused.
    #[serde(rename = "ssh_other_key")]
    SshOtherKey,
    /// kiln's own check, over SSH as the user the cloud-init seed made,
    /// that cloud-init applied the seed.
    #[serde(rename = "cloud_init")]
    CloudInit,
}

impl CheckKind {
    /// What one of kiln's own in-guest checks checks.
    fn builtin_name(self) -> &'static str {
        match self {
            CheckKind::SecureBoot => secure_boot::GUEST_CHECK_NAME,
            CheckKind::Sealed => sealed::GUEST_CHECK_NAME,
            CheckKind::Guest
            | CheckKind::Http
            | CheckKind::Ssh
            | CheckKind::SshOtherKey
            | CheckKind::CloudInit => "",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckResult {
    pub kind: CheckKind,
    /// 1-based, counted within its kind: `check 2`, `http 1`.
    pub index: usize,
    /// The command, or `GET :PORT/PATH` with what it expects.
    pub check: String,
    pub passed: bool,
    /// An in-guest check's exit code; `None` when it never reported one
    /// (and always for HTTP checks).
    pub exit_code: Option<i32>,
    /// An in-guest check's last lines of output; for an HTTP check, what
    /// came back (and what was expected, when it failed).
    pub output: Vec<String>,
}

impl CheckResult {
    /// `check 2` or `http 1`: the name records and messages use.
    pub fn name(&self) -> String {
        match self.kind {
            CheckKind::Guest => format!("check {}", self.index),
            CheckKind::Http => format!("http {}", self.index),
            CheckKind::SecureBoot => "secure-boot".to_owned(),
            CheckKind::Sealed => "sealed".to_owned(),
            CheckKind::Ssh => format!("ssh {}", self.index),
            CheckKind::SshOtherKey => "ssh-other-key".to_owned(),
            CheckKind::CloudInit => "cloud-init".to_owned(),
        }
    }
}

impl fmt::Display for CheckResult {
    /// One line (`✓ check 1 `cmd` exited 0`), then for a failure its output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.passed { "passed" } else { "FAILED" };
        match self.kind {
            CheckKind::Guest | CheckKind::Ssh => {
                write!(f, "{mark} {} `{}`", self.name(), self.check)?;
                match self.exit_code {
                    Some(code) => write!(f, " exited {code}")?,
                    None => write!(f, " reported no result")?,
                }
            }
            CheckKind::Http => write!(f, "{mark} {} {}", self.name(), self.check)?,
            CheckKind::SecureBoot
            | CheckKind::Sealed
            | CheckKind::SshOtherKey
            | CheckKind::CloudInit => {
                write!(f, "{mark} {}: {}", self.name(), self.check)?;
                if !self.passed {
                    if let Some(code) = self.exit_code {
                        write!(f, " (exited {code})")?;
                    }
                }
            }
        }
        if self.passed {
            return Ok(());
        }
        if self.output.is_empty() {
            return write!(f, " (no output)");
        }
        write!(f, "; its last output:")?;
        for line in &self.output {
            write!(f, "\n      {line}")?;
        }
        Ok(())
    }
}

impl SmokeReport {
    /// Every check's result, one per line (failures with their output).
    pub fn checks_text(&self) -> String {
        self.checks.iter().map(|c| format!("  {c}\n")).collect()
    }

    /// The error of a failed smoke: why, then every check's result.
    pub fn failure_text(&self) -> String {
        let why = self
            .failure
            .as_ref()
            .map_or_else(|| "passed".to_owned(), ToString::to_string);
        if self.checks.is_empty() {
            return why;
        }
        format!(
            "{why}\n  {} of {} checks passed:\n{}",
            self.checks_passed,
            self.checks_total,
            self.checks_text().trim_end()
        )
    }
}

/// Why an image failed its smoke.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SmokeFailure {
    /// QEMU exited at once, with its stderr.
    QemuFailed {
        command: String,
        stderr: String,
    },
    /// The firmware found nothing it could boot.
    NotBootable {
        detail: String,
    },
    /// Secure Boot refused the UKI: not signed by a certificate in the db,
    /// or changed after signing.
    SecurityViolation {
        line: String,
    },
    KernelPanic {
        line: String,
        tail: Vec<String>,
    },
    /// A sealed image's kernel found a root block that does not match its
    /// dm-verity hash: the disk changed after it was built.
    RootTampered {
        line: String,
        tail: Vec<String>,
    },
    /// systemd (or dracut) emergency or rescue mode.
    Emergency {
        line: String,
        tail: Vec<String>,
    },
    /// The initramfs could not find the root file system.
    NoRootFs {
        line: String,
        tail: Vec<String>,
    },
    /// The boot did not finish: state stayed "starting", with the jobs left.
    BootStuck {
        state: String,
        jobs: Vec<String>,
    },
    /// Units that failed during boot.
    FailedUnits {
        units: Vec<String>,
    },
    /// The boot was fine; some checks failed (each is in the report).
    ChecksFailed {
        /// Names of the failed checks, `check 2`, `http 1`.
        failed: Vec<String>,
        total: usize,
    },
    /// systemd < 256 (or no credential import): the checks could not run.
    ChecksCannotRun {
        systemd_version: Option<u32>,
        checks: usize,
    },
    /// The guest's SSH server refused kiln's key: the image did not take
    /// the key it was given at boot.
    SshLoginRefused {
        user: String,
        detail: String,
    },
    /// kiln could not log in over SSH: nothing answered, the guest
    /// reported no host key, or the host key was not the one it reported.
    SshFailed {
        user: String,
        detail: String,
    },
    /// The VM stopped before kiln had a verdict.
    GuestStopped {
        status: String,
        tail: Vec<String>,
    },
    Timeout {
        secs: u64,
        waiting_for: String,
        tail: Vec<String>,
    },
}

fn lines(f: &mut fmt::Formatter<'_>, tail: &[String]) -> fmt::Result {
    for line in tail {
        write!(f, "\n    {line}")?;
    }
    Ok(())
}

impl fmt::Display for SmokeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmokeFailure::QemuFailed { command, stderr } => {
                write!(f, "QEMU failed to start: {stderr}\n  command: {command}")
            }
            SmokeFailure::NotBootable { detail } => {
                write!(f, "the firmware found nothing to boot ({detail}); is there an EFI/BOOT/BOOTX64.EFI on the ESP?")
            }
            SmokeFailure::SecurityViolation { line } => {
                write!(
                    f,
                    "Secure Boot refused to start the image's UKI (EFI/BOOT/BOOTX64.EFI): {line}\n  \
                     the firmware runs only what a certificate in its db signed, and this UKI is not signed \
                     by that certificate, or it changed after it was signed\n  \
                     fix: sign it (kiln build --secure-boot-key KEY --secure-boot-cert CERT) and enroll that \
                     certificate (the default for a signed image; else --secure-boot-cert CERT); rebuild an image \
                     whose disk was modified; or boot without Secure Boot (--secure-boot off)"
                )
            }
            SmokeFailure::KernelPanic { line, tail } => {
                write!(f, "the kernel panicked: {line}\n  last console lines:")?;
                lines(f, tail)
            }
            SmokeFailure::RootTampered { line, tail } => {
                write!(
                    f,
                    "root tampered: the guest's kernel read a block of the sealed root that does not match \
                     its dm-verity hash, so the disk changed after kiln built it: {line}\n  \
                     rebuild the image (or restore it from its build); `kiln verify IMAGE` recomputes the root hash\n  \
                     last console lines:"
                )?;
                lines(f, tail)
            }
            SmokeFailure::Emergency { line, tail } => {
                write!(
                    f,
                    "the guest dropped into emergency/rescue mode: {line}\n  last console lines:"
                )?;
                lines(f, tail)
            }
            SmokeFailure::NoRootFs { line, tail } => {
                write!(f, "the initramfs could not find the root file system: {line}\n  last console lines:")?;
                lines(f, tail)
            }
            SmokeFailure::BootStuck { state, jobs } => {
                write!(
                    f,
                    "the boot did not finish (system state {state:?}); jobs still queued:"
                )?;
                lines(f, jobs)
            }
            SmokeFailure::FailedUnits { units } => {
                write!(f, "units failed during boot: {}", units.join(", "))
            }
            SmokeFailure::ChecksFailed { failed, total } => {
                write!(
                    f,
                    "{} of {total} checks failed: {}",
                    failed.len(),
                    failed.join(", ")
                )
            }
            SmokeFailure::ChecksCannotRun {
                systemd_version,
                checks,
            } => {
                let v = systemd_version
                    .map_or("an unknown systemd".to_owned(), |v| format!("systemd {v}"));
                write!(
                    f,
                    "the guest booted to a login prompt but its {checks} check(s) could not run: {v} did not start \
                     kiln's check unit (SMBIOS credentials need systemd {SYSTEMD_WITH_CREDENTIALS} or newer)"
                )
            }
            SmokeFailure::SshLoginRefused { user, detail } => {
                let how = if user == "root" {
                    format!(
                        "the `{}` credential (systemd-tmpfiles' provision.conf writes it to /root/.ssh/authorized_keys)",
                        ssh::ROOT_KEYS_CREDENTIAL
                    )
                } else {
                    "the cloud-init seed".to_owned()
                };
                write!(
                    f,
                    "the guest refused the SSH login as {user} with the key it was given in {how}: {detail}"
                )
            }
            SmokeFailure::SshFailed { user, detail } => {
                write!(f, "kiln could not log in over SSH as {user}: {detail}")
            }
            SmokeFailure::GuestStopped { status, tail } => {
                write!(
                    f,
                    "the VM stopped before the checks reported ({status}); last console lines:"
                )?;
                lines(f, tail)
            }
            SmokeFailure::Timeout {
                secs,
                waiting_for,
                tail,
            } => {
                write!(
                    f,
                    "timed out after {secs}s waiting for {waiting_for}; last console lines:"
                )?;
                lines(f, tail)
            }
        }
    }
}

/// Boot `disk` and run `spec`'s checks. See the module docs.
pub fn run(disk: &Path, spec: &SmokeSpec, opts: &SmokeOptions) -> Result<SmokeReport> {
    let report = run_once(disk, spec, opts)?;
    let oops = std::fs::read_to_string(&opts.log_path).unwrap_or_default();
    if report.accel == accel::Engine::Tcg.as_str()
        && is_tcg_text_patching_oops(report.failure.as_ref(), &oops)
    {
        eprintln!(
            "smoke: the guest kernel died at `Oops: int3` seconds into the boot: QEMU's \
             multi-threaded TCG now and then runs kernel text another vCPU has just \
             patched, a fault of the emulator, not of the image; booting it again, once"
        );
        return run_once(disk, spec, opts);
    }
    Ok(report)
}

/// Whether a smoke boot failed the way QEMU 7.2's multi-threaded TCG
/// sometimes makes a healthy kernel fail (about one boot in a hundred
/// here): a kernel panic after an `Oops: int3` (a breakpoint the kernel's
/// text patching left, seen by a vCPU that ran stale code), given the
/// failure and the console log.
fn is_tcg_text_patching_oops(failure: Option<&SmokeFailure>, console: &str) -> bool {
    matches!(failure, Some(SmokeFailure::KernelPanic { .. })) && console.contains("Oops: int3")
}

fn run_once(disk: &Path, spec: &SmokeSpec, opts: &SmokeOptions) -> Result<SmokeReport> {
    let started = Instant::now();
    cmd::check_interrupt()?;
    let firmware = match &opts.secure_boot {
        Some(_) => firmware::find_secure_boot_firmware(opts.firmware.as_deref())?,
        None => find_firmware(opts.firmware.as_deref(), &opts.firmware_dir)?,
    };
    let firmware_used = FirmwareUsed {
        path: firmware.code.clone(),
        sha256: crate::plan::key::file_digest(&firmware.code)
            .with_context(|| format!("hashing firmware {}", firmware.code.display()))?,
        origin: firmware.origin.clone(),
    };
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating {}", opts.state_dir.display()))?;
    // The KVM probe boots the firmware alone, without SMM: a Secure Boot
    // build would refuse that, so it probes with the plain firmware.
    let probe_firmware = match &opts.secure_boot {
        Some(_) => find_firmware(None, &opts.firmware_dir)?,
        None => firmware.clone(),
    };
    let (accel, fallback_note) = accel::choose(opts.accel, &probe_firmware, &opts.state_dir)?;
    if let Some(note) = fallback_note {
        eprintln!("kiln: {note}");
    }

    // Everything temporary lives here and goes when this returns.
    let tmp = tempfile::Builder::new()
        .prefix("kiln-smoke-")
        .tempdir()
        .context("creating a temp dir for the smoke boot")?;
    let vars_copy = tmp.path().join("efivars.fd");
    let template = firmware.vars.as_ref().unwrap_or(&firmware.code);
    let secure_boot_used = match &opts.secure_boot {
        Some(cert) => {
            secure_boot::enroll(template, cert, &vars_copy, tmp.path())?;
            Some(secure_boot::SecureBootUsed {
                certificate_sha256: cert.fingerprint.clone(),
                certificate_origin: cert.origin.clone(),
                vars_template: template.clone(),
            })
        }
        None => {
            std::fs::copy(template, &vars_copy)
                .with_context(|| format!("copying firmware {}", template.display()))?;
            None
        }
    };
    // kiln's own checks run last, after the recipe's: with Secure Boot on,
    // that the guest sees it on; for a sealed image, that the root is the
    // verity device of the manifest's root hash.
    let mut builtin = BTreeMap::new();
    let mut checks = spec.checks.clone();
    if opts.secure_boot.is_some() {
        checks.push(secure_boot::GUEST_CHECK.to_owned());
        builtin.insert(checks.len(), CheckKind::SecureBoot);
    }
    if let Some(root_hash) = &opts.verity {
        checks.push(sealed::guest_check(root_hash));
        builtin.insert(checks.len(), CheckKind::Sealed);
    }
    let with_checks = SmokeSpec {
        checks,
        ..spec.clone()
    };
    let spec = &with_checks;
    let overlay = match &opts.keep_overlay {
        Some(path) if path.exists() => anyhow::bail!(
            "{} already exists; --keep-overlay makes a new file",
            path.display()
        ),
        Some(path) => path.clone(),
        None => tmp.path().join("overlay.qcow2"),
    };
    qemu::create_overlay(disk, &overlay)?;
    let mut volumes = Vec::new();
    for v in &opts.volumes {
        volumes.push((
            v.path.clone(),
            qemu::disk_format(&v.path)?,
            v.serial.clone(),
        ));
    }

    let nonce = nonce()?;
    let channel_path = tmp.path().join("channel");
    let mut ports = BTreeMap::new();
    for check in &spec.http {
        if let std::collections::btree_map::Entry::Vacant(e) = ports.entry(check.port) {
            e.insert(http::free_port()?);
        }
    }
    let access = Access::prepare(spec, opts, tmp.path(), &nonce, &mut ports)?;
    let mut smbios = Vec::new();
    if let Some(a) = &access {
        if let Some(public) = &a.root_credential {
            smbios.push(ssh::credential(public));
        }
        if let Some((_, volume)) = &a.cloud {
            volumes.push((volume.clone(), "raw", cloud::SERIAL.to_owned()));
        }
    }
    let forwards: Vec<(u16, u16)> = ports.iter().map(|(guest, host)| (*host, *guest)).collect();
    let host_checks = spec.http.len() + access.as_ref().map_or(0, Access::checks);
    let plan = guest::GuestPlan {
        nonce: &nonce,
        checks: &spec.checks,
        settle_secs: (spec.timeout.as_secs() / 2).max(MIN_SETTLE_SECS),
        hold_secs: if host_checks == 0 {
            0
        } else {
            HOST_CHECKS_HOLD_BASE_SECS
                + 10 * spec.http.len() as u64
                + SSH_HOLD_SECS * access.as_ref().map_or(0, Access::checks) as u64
        },
        host_keys: access.is_some(),
    };
    smbios.extend(guest::credentials(&plan));
    let args = qemu::args(&qemu::VmConfig {
        accel,
        firmware: &firmware,
        vars_copy: &vars_copy,
        disk: Some(&overlay),
        volumes: &volumes,
        smbios: &smbios,
        forwards: &forwards,
        channel: Some(&channel_path),
        memory_mib: qemu::MEMORY_MIB,
        cpus: qemu::cpus(accel),
        secure_boot: opts.secure_boot.is_some(),
    });
    let command = qemu::display(&args);

    let mut log = ConsoleLog::create(&opts.log_path, opts.verbose)?;
    log.note(&format!("kiln smoke: {command}"))?;
    let mut watch = Watch {
        spec,
        ports: &ports,
        console: Console::new(&guest::marker(&nonce)),
        channel: Console::new(&guest::marker(&nonce)),
        pending_channel: Vec::new(),
        log,
        guest: GuestReport::default(),
        pending: Vec::new(),
        ready_at: None,
        results: Vec::new(),
        builtin,
        access: access.as_ref(),
    };
    let mut vm = qemu::Vm::spawn(&args, Some(&channel_path))?;
    let boot_started = Instant::now();
    let mut outcome = watch.wait(&mut vm, boot_started, &command);
    if (opts.wait_poweroff || opts.keep_overlay.is_some()) && matches!(outcome, Ok(Ok(_))) {
        match watch.drain_until_exit(&mut vm, POWEROFF_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => {
                outcome = Ok(Err(SmokeFailure::Timeout {
                    secs: POWEROFF_TIMEOUT.as_secs(),
                    waiting_for: "the guest to shut down cleanly after its checks".to_owned(),
                    tail: watch.console.tail(),
                }))
            }
            Err(e) => outcome = Err(e),
        }
    }
    drop(vm);
    // Whatever happened, the log gets the rest of the console and a verdict.
    let verdict = match &outcome {
        Ok(Ok(_)) => "passed".to_owned(),
        Ok(Err(failure)) => format!("FAILED: {failure}"),
        Err(e) => format!("stopped: {e:#}"),
    };
    watch.log.finish(&watch.console, &verdict)?;
    let outcome = outcome?;
    let results = std::mem::take(&mut watch.results);
    let checks_passed = results.iter().filter(|c| c.passed).count();
    let (failure, note) = match outcome {
        Ok(ready) => (None, ready.note),
        Err(failure) => (Some(failure), None),
    };
    Ok(SmokeReport {
        passed: failure.is_none(),
        failure,
        accel: accel.to_string(),
        boot_secs: watch.ready_at.map(|d| round(d.as_secs_f64())),
        total_secs: round(started.elapsed().as_secs_f64()),
        checks_passed,
        checks_total: spec.checks.len() + host_checks,
        checks: results,
        system_state: watch
            .guest
            .state
            .clone()
            .unwrap_or_else(|| "unknown".to_owned()),
        systemd_version: watch.guest.systemd,
        firmware: firmware_used,
        secure_boot: secure_boot_used,
        log: opts.log_path.clone(),
        note,
        finished: crate::store::now(),
        ssh_host_keys: std::mem::take(&mut watch.guest.host_keys),
    })
}

/// What an SSH login needs, made for one boot in its temp dir (and gone
/// with it): see [`ssh`] and [`cloud`].
struct Access {
    /// The throwaway key pair kiln logs in with.
    key: ssh::KeyPair,
    /// A second pair the guest is never given (its login must be refused).
    other: ssh::KeyPair,
    known_hosts: PathBuf,
    /// Host port forwarded to the guest's 22.
    port: u16,
    /// With `ssh`: the public key passed as root's credential, and the
    /// commands run as root (the recipe's `ssh_checks`, or just a login).
    root_credential: Option<String>,
    root_checks: Vec<String>,
    /// With `cloud_init`: the seed, and its volume.
    cloud: Option<(cloud::Seed, PathBuf)>,
}

impl Access {
    /// `None` unless the spec logs in over SSH.
    fn prepare(
        spec: &SmokeSpec,
        opts: &SmokeOptions,
        tmp: &Path,
        nonce: &str,
        ports: &mut BTreeMap<u16, u16>,
    ) -> Result<Option<Access>> {
        if !spec.ssh && !spec.cloud_init {
            return Ok(None);
        }
        let key = ssh::KeyPair::generate(tmp, "id_ed25519")?;
        let other = ssh::KeyPair::generate(tmp, "id_other")?;
        let port = match ports.get(&ssh::GUEST_PORT) {
            Some(p) => *p,
            None => http::free_port()?,
        };
        ports.insert(ssh::GUEST_PORT, port);
        let root_credential = spec.ssh.then(|| {
            opts.ssh_authorized_key
                .clone()
                .unwrap_or_else(|| key.public.clone())
        });
        let root_checks = match (spec.ssh, spec.ssh_checks.is_empty()) {
            (false, _) => Vec::new(),
            (true, true) => vec![LOGIN_ONLY.to_owned()],
            (true, false) => spec.ssh_checks.clone(),
        };
        let cloud = if spec.cloud_init {
            let seed = cloud::Seed::new(nonce, &key.public);
            let volume = seed.write_volume(tmp)?;
            Some((seed, volume))
        } else {
            None
        };
        Ok(Some(Access {
            key,
            other,
            known_hosts: tmp.join("known_hosts"),
            port,
            root_credential,
            root_checks,
            cloud,
        }))
    }

    /// How many checks the host makes over SSH.
    fn checks(&self) -> usize {
        // The recipe's (or one login), then the other key's refusal.
        let other_key = usize::from(self.root_credential.is_some());
        self.root_checks.len() + other_key + usize::from(self.cloud.is_some())
    }

    fn login<'a>(&'a self, user: &'a str, key: &'a ssh::KeyPair) -> ssh::Login<'a> {
        ssh::Login {
            user,
            identity: &key.private,
            known_hosts: &self.known_hosts,
            port: self.port,
        }
    }
}

fn round(secs: f64) -> f64 {
    (secs * 10.0).round() / 10.0
}

/// A fresh random nonce: 16 hex digits.
fn nonce() -> Result<String> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the guest reported so far.
#[derive(Default)]
struct GuestReport {
    begun: bool,
    state: Option<String>,
    jobs: Vec<String>,
    failed_units: Vec<String>,
    current_check: Option<usize>,
    outputs: BTreeMap<usize, Vec<String>>,
    exits: BTreeMap<usize, i32>,
    systemd: Option<u32>,
    /// SSH host public keys (`TYPE BASE64`), when asked for.
    host_keys: Vec<String>,
}

/// How a pass went.
struct Ready {
    note: Option<String>,
}

struct Watch<'a> {
    spec: &'a SmokeSpec,
    /// Guest port → host port.
    ports: &'a BTreeMap<u16, u16>,
    /// The serial console (ttyS0).
    console: Console,
    /// kiln's report channel (ttyS1).
    channel: Console,
    log: ConsoleLog,
    guest: GuestReport,
    /// Bytes of an unfinished UTF-8 character between reads, per stream.
    pending: Vec<u8>,
    pending_channel: Vec<u8>,
    /// When the guest reported its boot finished (or a login prompt, for
    /// an old systemd), from QEMU's start.
    ready_at: Option<Duration>,
    /// Each check's result, as they are judged.
    results: Vec<CheckResult>,
    /// The numbers of kiln's own checks among the in-guest checks.
    builtin: BTreeMap<usize, CheckKind>,
    /// The SSH login, when the spec asks for one.
    access: Option<&'a Access>,
}

impl Watch<'_> {
    /// Keep logging the console until QEMU exits by itself (the guest
    /// powered off); false if it is still running after `timeout`.
    fn drain_until_exit(&mut self, vm: &mut qemu::Vm, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            cmd::check_interrupt()?;
            match vm.output.recv_timeout(POLL) {
                Ok(chunk) => {
                    self.feed(chunk)?;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => loop {
                    if vm.try_exited()?.is_some() {
                        return Ok(true);
                    }
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                    std::thread::sleep(POLL);
                },
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Read the console until there is a verdict.
    fn wait(
        &mut self,
        vm: &mut qemu::Vm,
        boot_started: Instant,
        command: &str,
    ) -> Result<Result<Ready, SmokeFailure>> {
        let timeout = self.spec.timeout;
        let mut fatal: Option<(SmokeFailure, Instant)> = None;
        let mut login_at: Option<Instant> = None;
        loop {
            cmd::check_interrupt()?;
            if let Some((_, until)) = &fatal {
                if Instant::now() >= *until {
                    let (failure, _) = fatal.take().expect("checked above");
                    return Ok(Err(self.with_tail(failure)));
                }
            }
            match vm.output.recv_timeout(POLL) {
                Ok(chunk) => {
                    for event in self.feed(chunk)? {
                        if fatal.is_some() {
                            continue;
                        }
                        match event {
                            Event::Marker(Marker::Done(n)) => {
                                self.ready_at.get_or_insert_with(|| boot_started.elapsed());
                                return self.judge(n);
                            }
                            Event::Marker(m) => {
                                if matches!(m, Marker::State(_)) {
                                    self.ready_at = Some(boot_started.elapsed());
                                }
                                self.record(m);
                            }
                            Event::SystemdVersion(v) => self.guest.systemd = Some(v),
                            Event::LoginPrompt => {
                                login_at.get_or_insert_with(Instant::now);
                            }
                            Event::KernelPanic(line) => {
                                fatal = Some((
                                    SmokeFailure::KernelPanic { line, tail: vec![] },
                                    Instant::now() + FATAL_LINGER,
                                ))
                            }
                            Event::RootTampered(line) => {
                                fatal = Some((
                                    SmokeFailure::RootTampered { line, tail: vec![] },
                                    Instant::now() + FATAL_LINGER,
                                ))
                            }
                            Event::Emergency(line) => {
                                fatal = Some((
                                    SmokeFailure::Emergency { line, tail: vec![] },
                                    Instant::now() + FATAL_LINGER,
                                ))
                            }
                            Event::NoRoot(line) => {
                                fatal = Some((
                                    SmokeFailure::NoRootFs { line, tail: vec![] },
                                    Instant::now() + FATAL_LINGER,
                                ))
                            }
                            Event::NotBootable(detail) => {
                                fatal = Some((SmokeFailure::NotBootable { detail }, Instant::now()))
                            }
                            Event::SecurityViolation(line) => {
                                fatal =
                                    Some((SmokeFailure::SecurityViolation { line }, Instant::now()))
                            }
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The console closed: QEMU is gone. Reap and explain.
                    let status = loop {
                        if let Some(status) = vm.try_exited()? {
                            break status;
                        }
                        std::thread::sleep(POLL);
                    };
                    if let Some((failure, _)) = fatal.take() {
                        return Ok(Err(self.with_tail(failure)));
                    }
                    let stderr = vm.stderr();
                    if !status.success() && !stderr.is_empty() && !self.guest.begun {
                        return Ok(Err(SmokeFailure::QemuFailed {
                            command: command.to_owned(),
                            stderr,
                        }));
                    }
                    return Ok(Err(SmokeFailure::GuestStopped {
                        status: status.to_string(),
                        tail: self.console.tail(),
                    }));
                }
            }
            // An old systemd never starts kiln's unit: a login prompt then
            // is as far as the boot can be followed.
            // A systemd that said it imports credentials is waited for until
            // the timeout: its unit can be late (basic.target waits for a
            // missing volume's device timeout, say).
            if let (Some(at), false) = (login_at, self.guest.begun) {
                let old = self
                    .guest
                    .systemd
                    .is_some_and(|v| v < SYSTEMD_WITH_CREDENTIALS);
                let unknown = self.guest.systemd.is_none();
                if fatal.is_none() && (old || (unknown && at.elapsed() > UNIT_START_GRACE)) {
                    self.ready_at = Some(boot_started.elapsed());
                    return self.judge_without_unit();
                }
            }
            if boot_started.elapsed() > timeout && fatal.is_none() {
                return Ok(Err(SmokeFailure::Timeout {
                    secs: timeout.as_secs(),
                    waiting_for: self.waiting_for(),
                    tail: self.console.tail(),
                }));
            }
        }
    }

    fn feed(&mut self, chunk: qemu::Chunk) -> Result<Vec<Event>> {
        let (pending, console, bytes) = match chunk {
            qemu::Chunk::Console(b) => (&mut self.pending, &mut self.console, b),
            qemu::Chunk::Channel(b) => (&mut self.pending_channel, &mut self.channel, b),
        };
        pending.extend_from_slice(&bytes);
        let valid = match std::str::from_utf8(pending) {
            Ok(s) => s.len(),
            // An incomplete character at the end waits for the next read;
            // an invalid one is replaced.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        let text: Vec<u8> = pending.drain(..valid).collect();
        let (lines, events) = console.feed(&String::from_utf8_lossy(&text));
        for line in &lines {
            self.log.line(line)?;
        }
        Ok(events)
    }

    fn record(&mut self, m: Marker) {
        let g = &mut self.guest;
        match m {
            Marker::Begin => g.begun = true,
            Marker::State(s) => g.state = Some(s),
            Marker::Job(j) => g.jobs.push(j),
            Marker::FailedUnit(u) => g.failed_units.push(u),
            Marker::CheckStart(n) => g.current_check = Some(n),
            Marker::Out(n, line) => g.outputs.entry(n).or_default().push(line),
            Marker::CheckEnd(n, rc) => {
                g.exits.insert(n, rc);
                g.current_check = None;
            }
            Marker::HostKey(k) => g.host_keys.push(k),
            Marker::Done(_) => {}
        }
    }

    fn waiting_for(&self) -> String {
        let g = &self.guest;
        match (g.begun, &g.state, g.current_check) {
            (false, _, _) => "the guest to boot and start kiln's check unit".to_owned(),
            (true, None, _) => "the boot to finish (systemctl is-system-running)".to_owned(),
            (true, Some(_), Some(n)) if self.builtin.contains_key(&n) => {
                format!(
                    "kiln's check that {} to finish",
                    self.builtin[&n].builtin_name()
                )
            }
            (true, Some(_), Some(n)) => {
                let cmd = self.spec.checks.get(n - 1).map_or("?", String::as_str);
                format!("check {n} `{cmd}` to finish")
            }
            (true, Some(_), None) => "the checks to finish".to_owned(),
        }
    }

    /// The guest said `done`: collect every in-guest result, make every
    /// HTTP check unless the boot itself failed, then decide.
    fn judge(&mut self, reported: usize) -> Result<Result<Ready, SmokeFailure>> {
        let g = &self.guest;
        let complete = reported == self.spec.checks.len();
        self.results = self
            .spec
            .checks
            .iter()
            .enumerate()
            .map(|(i, command)| {
                let n = i + 1;
                let exit_code = g.exits.get(&n).copied();
                let (kind, index, check) = match self.builtin.get(&n) {
                    Some(&kind) => (kind, 1, kind.builtin_name().to_owned()),
                    None => (CheckKind::Guest, n, command.clone()),
                };
                CheckResult {
                    kind,
                    index,
                    check,
                    passed: exit_code == Some(0) && complete,
                    exit_code,
                    output: g.outputs.get(&n).cloned().unwrap_or_default(),
                }
            })
            .collect();
        if !g.failed_units.is_empty() {
            return Ok(Err(SmokeFailure::FailedUnits {
                units: g.failed_units.clone(),
            }));
        }
        let state = g.state.clone().unwrap_or_default();
        if state != "running" {
            return Ok(Err(SmokeFailure::BootStuck {
                state,
                jobs: g.jobs.clone(),
            }));
        }
        self.http_checks()?;
        if let Some(failure) = self.ssh_checks()? {
            return Ok(Err(failure));
        }
        Ok(self.verdict(None))
    }

    /// Log in over SSH and make every SSH check, adding each result; a
    /// login that fails is the verdict (`Some`).
    fn ssh_checks(&mut self) -> Result<Option<SmokeFailure>> {
        let Some(access) = self.access else {
            return Ok(None);
        };
        let first_user = if access.root_credential.is_some() {
            "root"
        } else {
            cloud::USER
        };
        if self.guest.host_keys.is_empty() {
            return Ok(Some(SmokeFailure::SshFailed {
                user: first_user.to_owned(),
                detail: "the guest reported no SSH host key (/etc/ssh/ssh_host_*_key.pub): does the image \
                         have an SSH server that makes its host keys at boot (extend ssh.toml)?"
                    .to_owned(),
            }));
        }
        let known_hosts = ssh::known_hosts(access.port, &self.guest.host_keys);
        std::fs::write(&access.known_hosts, known_hosts)
            .with_context(|| format!("writing {}", access.known_hosts.display()))?;
        let mut logins: Vec<(CheckKind, usize, &str, String, String)> = Vec::new();
        if access.root_credential.is_some() {
            for (i, command) in access.root_checks.iter().enumerate() {
                logins.push((
                    CheckKind::Ssh,
                    i + 1,
                    "root",
                    command.clone(),
                    command.clone(),
                ));
            }
        }
        if let Some((seed, _)) = &access.cloud {
            logins.push((
                CheckKind::CloudInit,
                1,
                cloud::USER,
                seed.check(),
                format!(
                    "cloud-init made user {} and host name {} from the seed",
                    seed.user, seed.hostname
                ),
            ));
        }
        for (kind, index, user, command, check) in logins {
            let outcome = ssh::run(&access.login(user, &access.key), &command)?;
            self.log
                .note(&format!("ssh {user}@127.0.0.1 `{check}`: {outcome:?}"))?;
            let (exit_code, output) = match outcome {
                ssh::Outcome::Ran { exit_code, output } => (Some(exit_code), output),
                ssh::Outcome::TimedOut(why) => (None, vec![why]),
                ssh::Outcome::Refused(detail) => {
                    return Ok(Some(SmokeFailure::SshLoginRefused {
                        user: user.to_owned(),
                        detail,
                    }))
                }
                ssh::Outcome::Failed(detail) => {
                    return Ok(Some(SmokeFailure::SshFailed {
                        user: user.to_owned(),
                        detail,
                    }))
                }
            };
            self.results.push(CheckResult {
                kind,
                index,
                check,
                passed: exit_code == Some(0),
                exit_code,
                output,
            });
            if kind == CheckKind::Ssh && index == access.root_checks.len() {
                self.other_key_check(access)?;
            }
        }
        Ok(None)
    }

    /// Root's login with a key the guest was never given must be refused.
    fn other_key_check(&mut self, access: &Access) -> Result<()> {
        let outcome = ssh::run(&access.login("root", &access.other), LOGIN_ONLY)?;
        self.log.note(&format!(
            "ssh root@127.0.0.1 with a key the guest was not given: {outcome:?}"
        ))?;
        let (passed, output) = match outcome {
            ssh::Outcome::Refused(why) => (true, vec![why]),
            ssh::Outcome::Ran { .. } => (
                false,
                vec!["logged in: the image accepts a key it was not given (a key baked into the image?)".to_owned()],
            ),
            ssh::Outcome::Failed(why) | ssh::Outcome::TimedOut(why) => (false, vec![why]),
        };
        self.results.push(CheckResult {
            kind: CheckKind::SshOtherKey,
            index: 1,
            check: "root's login with a key the guest was not given is refused".to_owned(),
            passed,
            exit_code: None,
            output,
        });
        Ok(())
    }

    /// No check unit ran (old systemd): a login prompt is the best sign.
    fn judge_without_unit(&mut self) -> Result<Result<Ready, SmokeFailure>> {
        let version = self.guest.systemd;
        if !self.spec.checks.is_empty() {
            return Ok(Err(SmokeFailure::ChecksCannotRun {
                systemd_version: version,
                checks: self.spec.checks.len(),
            }));
        }
        self.http_checks()?;
        // Without kiln's unit no host key was reported: an SSH login
        // cannot be checked, and fails saying so.
        if let Some(failure) = self.ssh_checks()? {
            return Ok(Err(failure));
        }
        self.guest.state = Some("login prompt".to_owned());
        let v = version.map_or("an unknown systemd".to_owned(), |v| format!("systemd {v}"));
        Ok(self.verdict(Some(format!(
            "{v} did not run kiln's check unit; the boot was judged by its login prompt only, \
             so failed units were not looked for"
        ))))
    }

    /// Passed when every result passed.
    fn verdict(&self, note: Option<String>) -> Result<Ready, SmokeFailure> {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter(|c| !c.passed)
            .map(CheckResult::name)
            .collect();
        if failed.is_empty() {
            Ok(Ready { note })
        } else {
            Err(SmokeFailure::ChecksFailed {
                failed,
                total: self.results.len(),
            })
        }
    }

    /// Make every HTTP check, adding each result.
    fn http_checks(&mut self) -> Result<()> {
        for (i, check) in self.spec.http.iter().enumerate() {
            let host_port = self.ports[&check.port];
            let got = http::get(host_port, &check.path)?;
            let request = format!("GET :{}{}", check.port, check.path);
            let line = match &got {
                Ok(r) => format!("HTTP {request} -> status {}", r.status),
                Err(why) => format!("HTTP {request} -> {why}"),
            };
            self.log.note(&line)?;
            let verdict = http::judge(check, &got);
            let output = match &verdict {
                Ok(()) => vec![line],
                Err((expected, got)) => vec![format!("expected {expected}, got {got}")],
            };
            self.results.push(CheckResult {
                kind: CheckKind::Http,
                index: i + 1,
                check: request,
                passed: verdict.is_ok(),
                exit_code: None,
                output,
            });
        }
        Ok(())
    }

    fn with_tail(&self, failure: SmokeFailure) -> SmokeFailure {
        let tail = self.console.tail();
        match failure {
            SmokeFailure::KernelPanic { line, .. } => SmokeFailure::KernelPanic { line, tail },
            SmokeFailure::RootTampered { line, .. } => SmokeFailure::RootTampered { line, tail },
            SmokeFailure::Emergency { line, .. } => SmokeFailure::Emergency { line, tail },
            SmokeFailure::NoRootFs { line, .. } => SmokeFailure::NoRootFs { line, tail },
            other => other,
        }
    }
}

/// `out/NAME.smoke.log`: the cleaned serial console, plus kiln's own
/// lines (the command, HTTP results, the verdict) starting with `# kiln:`.
struct ConsoleLog {
    file: File,
    path: PathBuf,
    verbose: bool,
}

impl ConsoleLog {
    fn create(path: &Path, verbose: bool) -> Result<ConsoleLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file =
            File::create(path).with_context(|| format!("creating smoke log {}", path.display()))?;
        Ok(ConsoleLog {
            file,
            path: path.to_owned(),
            verbose,
        })
    }

    fn line(&mut self, line: &str) -> Result<()> {
        if self.verbose {
            eprintln!("  │ {line}");
        }
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }

    fn note(&mut self, text: &str) -> Result<()> {
        for l in text.lines() {
            self.line(&format!("# kiln: {l}"))?;
        }
        Ok(())
    }

    fn finish(&mut self, console: &Console, verdict: &str) -> Result<()> {
        let rest = console.unfinished();
        if !rest.trim().is_empty() {
            self.line(&rest)?;
        }
        self.note(&format!("verdict: {verdict}"))?;
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_a_panic_after_an_int3_oops_is_booted_again() {
        let panic = SmokeFailure::KernelPanic {
            line: "Kernel panic - not syncing: Fatal exception".into(),
            tail: vec![],
        };
        let oops = "[    2.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[    2.1] RIP: 0010:sched_clock_cpu+0x5/0x1d0\n";
        assert!(is_tcg_text_patching_oops(Some(&panic), oops));
        assert!(!is_tcg_text_patching_oops(
            Some(&panic),
            "VFS: Unable to mount root fs"
        ));
        assert!(!is_tcg_text_patching_oops(None, oops));
        let stuck = SmokeFailure::BootStuck {
            state: "starting".into(),
            jobs: vec![],
        };
        assert!(!is_tcg_text_patching_oops(Some(&stuck), oops));
    }

    use super::*;

    #[test]
    fn failures_read_as_plain_words() {
        let cases = [
            (
                SmokeFailure::ChecksFailed {
                    failed: vec!["check 2".into(), "http 1".into()],
                    total: 5,
                },
                "2 of 5 checks failed: check 2, http 1",
            ),
            (
                SmokeFailure::FailedUnits {
                    units: vec!["a.service".into(), "b.mount".into()],
                },
                "units failed during boot: a.service, b.mount",
            ),
            (
                SmokeFailure::Timeout {
                    secs: 180,
                    waiting_for: "x".into(),
                    tail: vec!["a".into(), "b".into()],
                },
                "timed out after 180s waiting for x; last console lines:\n    a\n    b",
            ),
        ];
        for (failure, want) in cases {
            assert_eq!(failure.to_string(), want);
        }
    }

    fn result(kind: CheckKind, index: usize, passed: bool, exit: Option<i32>) -> CheckResult {
        CheckResult {
            kind,
            index,
            check: match kind {
                CheckKind::Guest | CheckKind::Ssh => "systemctl is-active nginx".into(),
                CheckKind::Http => "GET :80/".into(),
                CheckKind::SecureBoot | CheckKind::Sealed => kind.builtin_name().into(),
                CheckKind::SshOtherKey => {
                    "root's login with a key the guest was not given is refused".into()
                }
                CheckKind::CloudInit => "cloud-init made user kiln".into(),
            },
            passed,
            exit_code: exit,
            output: if passed {
                vec![]
            } else {
                vec!["inactive".into()]
            },
        }
    }

    #[test]
    fn a_failure_lists_every_check_with_its_result() {
        let report = SmokeReport {
            passed: false,
            failure: Some(SmokeFailure::ChecksFailed {
                failed: vec!["check 2".into(), "http 1".into()],
                total: 3,
            }),
            accel: "tcg".into(),
            boot_secs: Some(40.0),
            total_secs: 50.0,
            checks: vec![
                result(CheckKind::Guest, 1, true, Some(0)),
                result(CheckKind::Guest, 2, false, Some(3)),
                result(CheckKind::Http, 1, false, None),
            ],
            checks_passed: 1,
            checks_total: 3,
            system_state: "running".into(),
            systemd_version: Some(257),
            firmware: FirmwareUsed {
                path: "/fw".into(),
                sha256: "0".repeat(64),
                origin: "test".into(),
            },
            secure_boot: None,
            log: "/log".into(),
            note: None,
            finished: 0,
            ssh_host_keys: vec![],
        };
        assert_eq!(
            report.failure_text(),
            "2 of 3 checks failed: check 2, http 1\n  1 of 3 checks passed:\n  \
             passed check 1 `systemctl is-active nginx` exited 0\n  \
             FAILED check 2 `systemctl is-active nginx` exited 3; its last output:\n      inactive\n  \
             FAILED http 1 GET :80/; its last output:\n      inactive"
        );
    }

    #[test]
    fn the_secure_boot_check_and_a_refused_uki_read_as_plain_words() {
        assert_eq!(
            result(CheckKind::SecureBoot, 1, true, Some(0)).to_string(),
            "passed secure-boot: Secure Boot is on in the guest (its SecureBoot EFI variable is 1)"
        );
        let mut off = result(CheckKind::SecureBoot, 1, false, Some(1));
        off.output = vec!["SecureBoot variable (attributes, value):   6   0   0   0   0".into()];
        assert_eq!(
            off.to_string(),
            "FAILED secure-boot: Secure Boot is on in the guest (its SecureBoot EFI variable is 1) (exited 1); \
             its last output:\n      SecureBoot variable (attributes, value):   6   0   0   0   0"
        );
        let refused = SmokeFailure::SecurityViolation {
            line: "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0): Access Denied".into(),
        }
        .to_string();
        for words in [
            "Secure Boot refused to start the image's UKI",
            "Access Denied",
            "changed after it was signed",
            "--secure-boot-key KEY --secure-boot-cert CERT",
            "--secure-boot off",
        ] {
            assert!(refused.contains(words), "{words:?} not in {refused}");
        }
    }

    #[test]
    fn the_secure_boot_check_is_valid_shell_that_reads_the_last_byte() {
        // The check's own logic, on a fake variable file: attributes 6, value 1 or 0.
        let d = tempfile::tempdir().unwrap();
        let var = d.path().join("SecureBoot");
        let check = secure_boot::GUEST_CHECK.replace(
            "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c",
            &var.display().to_string(),
        );
        assert_ne!(check, secure_boot::GUEST_CHECK, "the path is in the check");
        let run = |bytes: &[u8]| {
            std::fs::write(&var, bytes).unwrap();
            std::process::Command::new("sh")
                .args(["-c", &check])
                .output()
                .unwrap()
        };
        let on = run(&[6, 0, 0, 0, 1]);
        assert!(on.status.success(), "{on:?}");
        assert!(String::from_utf8_lossy(&on.stdout).contains("6   0   0   0   1"));
        assert!(!run(&[6, 0, 0, 0, 0]).status.success());
        std::fs::remove_file(&var).unwrap();
        assert!(!std::process::Command::new("sh")
            .args(["-c", &check])
            .status()
            .unwrap()
            .success());
    }

    #[test]
    fn ssh_checks_and_refusals_read_as_plain_words() {
        assert_eq!(
            result(CheckKind::Ssh, 2, false, Some(3)).to_string(),
            "FAILED ssh 2 `systemctl is-active nginx` exited 3; its last output:\n      inactive"
        );
        assert_eq!(
            result(CheckKind::SshOtherKey, 1, true, None).to_string(),
            "passed ssh-other-key: root's login with a key the guest was not given is refused"
        );
        assert_eq!(
            result(CheckKind::CloudInit, 1, true, Some(0)).name(),
            "cloud-init"
        );
        let refused = SmokeFailure::SshLoginRefused {
            user: "root".into(),
            detail: "root@127.0.0.1: Permission denied (publickey).".into(),
        };
        let text = refused.to_string();
        for words in [
            "refused the SSH login as root",
            "ssh.authorized_keys.root",
            "Permission denied",
        ] {
            assert!(text.contains(words), "{words:?} not in {text}");
        }
        let json = serde_json::to_value(&refused).unwrap();
        assert_eq!(json["kind"], "ssh_login_refused");
        assert_eq!(
            serde_json::to_value(CheckKind::SshOtherKey).unwrap(),
            "ssh_other_key"
        );
    }

    #[test]
    fn nonces_are_fresh_hex() {
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
