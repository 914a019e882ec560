//! Choosing KVM or TCG.
//!
//! `/dev/kvm` existing proves nothing: on some hosts (nested clouds) the
//! device is there and guests die with "KVM internal error" or hang. So
//! `auto` boots the firmware alone under KVM, with no disk, and calls KVM
//! usable only if the firmware prints on the serial console within
//! [`PROBE_TIMEOUT`] (it does in well under a second when KVM works). The
//! verdict is kept in the store, one file per host kernel release and QEMU
//! version, so the probe runs once per host setup.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::firmware::Firmware;
use super::qemu::{self, Vm, VmConfig};
use crate::cmd::{self, Cmd};

/// Bound on the KVM probe boot.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on `qemu-system-x86_64 --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_POLL: Duration = Duration::from_millis(50);

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe boot proves it works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a boot runs with, once `auto` is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Kvm,
    Tcg,
}

impl Engine {
    /// QEMU's name for it (`-accel NAME`).
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Kvm => "kvm",
            Engine::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on KVM, as cached.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub kernel: String,
    pub qemu: String,
    pub usable: bool,
    pub reason: String,
}

/// The accelerator to use, and the one line to tell the user when `auto`
/// fell back to TCG.
pub fn choose(
    accel: Accel,
    firmware: &Firmware,
    state_dir: &Path,
) -> Result<(Engine, Option<String>)> {
    match accel {
        Accel::Kvm => Ok((Engine::Kvm, None)),
        Accel::Tcg => Ok((Engine::Tcg, None)),
        Accel::Auto => {
            if let Err(e) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                return Ok((
                    Engine::Tcg,
                    Some(format!(
                        "KVM is not available (/dev/kvm: {e}); using TCG, which is slower"
                    )),
                ));
            }
            let verdict = verdict(firmware, state_dir)?;
            if verdict.usable {
                Ok((Engine::Kvm, None))
            } else {
                Ok((
                    Engine::Tcg,
                    Some(format!(
                        "KVM does not work on this host ({}); using TCG, which is slower",
                        verdict.reason
                    )),
                ))
            }
        }
    }
}

/// The cached verdict for this kernel and QEMU, probing if there is none.
fn verdict(firmware: &Firmware, state_dir: &Path) -> Result<Verdict> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let version = Cmd::new(qemu::QEMU)
        .arg("--version")
        .timeout(VERSION_TIMEOUT)
        .output()?
        .stdout_str();
    let qemu = version.lines().next().unwrap_or("").trim().to_owned();
    let path = cache_path(state_dir, &kernel, &qemu);
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<Verdict>(&text) {
            Ok(v) if v.kernel == kernel && v.qemu == qemu => return Ok(v),
            // A damaged or foreign file is just re-probed and replaced.
            _ => cmd::log_line(&format!(
                "ignoring unreadable KVM verdict {}",
                path.display()
            )),
        }
    }
    let (usable, reason) = probe(firmware)?;
    let v = Verdict {
        kernel,
        qemu,
        usable,
        reason,
    };
    crate::files::write_atomic(&path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    Ok(v)
}

/// `STATE/kvm-probe-v1-<hash of kernel and QEMU version>.json`.
pub fn cache_path(state_dir: &Path, kernel: &str, qemu: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(b"kiln-kvm-probe-v1\0");
    h.update(kernel.as_bytes());
    h.update(b"\0");
    h.update(qemu.as_bytes());
    let hex: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    state_dir.join(format!("kvm-probe-v1-{hex}.json"))
}

/// Boot the firmware alone under KVM: (usable, why).
fn probe(firmware: &Firmware) -> Result<(bool, String)> {
    let tmp = tempfile::Builder::new()
        .prefix("kiln-kvm-probe-")
        .tempdir()
        .context("creating a temp dir")?;
    let vars_copy = tmp.path().join("vars.fd");
    let template = firmware.vars.as_ref().unwrap_or(&firmware.code);
    std::fs::copy(template, &vars_copy)
        .with_context(|| format!("copying {}", template.display()))?;
    let args = qemu::args(&VmConfig {
        accel: Engine::Kvm,
        firmware,
        vars_copy: &vars_copy,
        disk: None,
        volumes: &[],
        smbios: &[],
        forwards: &[],
        channel: None,
        memory_mib: 128,
        cpus: 1,
        secure_boot: false,
    });
    let started = Instant::now();
    let mut vm = Vm::spawn(&args, None)?;
    let outcome = loop {
        cmd::check_interrupt()?;
        if vm.output.try_recv().is_ok() {
            break (
                true,
                format!("firmware ran in {:.1}s", started.elapsed().as_secs_f64()),
            );
        }
        let stderr = vm.stderr();
        if let Some(line) = stderr
            .lines()
            .find(|l| l.contains("KVM internal error") || l.contains("failed to initialize"))
        {
            break (false, line.trim().to_owned());
        }
        if let Some(status) = vm.try_exited()? {
            // Let the stderr reader catch up with QEMU's last words.
            std::thread::sleep(PROBE_POLL * 4);
            let stderr = vm.stderr();
            let last = stderr.lines().last().unwrap_or("no message").to_owned();
            break (false, format!("QEMU exited ({status}): {last}"));
        }
        if started.elapsed() > PROBE_TIMEOUT {
            break (
                false,
                format!(
                    "the firmware printed nothing within {}s",
                    PROBE_TIMEOUT.as_secs()
                ),
            );
        }
        std::thread::sleep(PROBE_POLL);
    };
    drop(vm);
    cmd::log_line(&format!("KVM probe: usable={} ({})", outcome.0, outcome.1));
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_path_depends_on_kernel_and_qemu() {
        let d = Path::new("/store/smoke");
        let a = cache_path(d, "6.1.0", "QEMU emulator version 7.2.22");
        assert_eq!(a, cache_path(d, "6.1.0", "QEMU emulator version 7.2.22"));
        assert_ne!(a, cache_path(d, "6.1.1", "QEMU emulator version 7.2.22"));
        assert_ne!(a, cache_path(d, "6.1.0", "QEMU emulator version 8.0"));
        assert!(a
            .to_string_lossy()
            .starts_with("/store/smoke/kvm-probe-v1-"));
    }

    #[test]
    fn a_cached_verdict_is_used() {
        let d = tempfile::tempdir().unwrap();
        let fw = Firmware {
            code: "/nonexistent".into(),
            vars: None,
            origin: "test".into(),
        };
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
            .to_owned();
        let Ok(out) = Cmd::new(qemu::QEMU).arg("--version").output() else {
            panic!("{} must be installed for this test", qemu::QEMU)
        };
        let qemu_v = out.stdout_str().lines().next().unwrap().trim().to_owned();
        let v = Verdict {
            kernel: kernel.clone(),
            qemu: qemu_v.clone(),
            usable: false,
            reason: "cached no".into(),
        };
        crate::files::write_atomic(
            &cache_path(d.path(), &kernel, &qemu_v),
            serde_json::to_string(&v).unwrap().as_bytes(),
        )
        .unwrap();
        // The firmware does not exist: only the cache can answer.
        assert_eq!(verdict(&fw, d.path()).unwrap(), v);
    }
}
