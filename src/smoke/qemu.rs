//! The QEMU command line, and a running VM that cannot outlive kiln.
//!
//! QEMU is not run through `Cmd` (which waits for the end): it is spawned
//! here in its own process group, its serial console arrives on stdout, and
//! [`Vm`]'s `Drop` kills the whole group and reaps it, whatever path
//! (pass, failure, timeout, Ctrl-C, a kiln error) leaves the smoke stage.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use super::accel::Engine;
use super::firmware::Firmware;
use crate::cmd::{self, Cmd};

pub const QEMU: &str = "qemu-system-x86_64";
/// Guest memory: enough for a server image to boot, small enough to start
/// fast.
pub const MEMORY_MIB: u32 = 1024;

/// Guest CPUs for a smoke boot: two, under KVM and under TCG. QEMU 7.2's
/// multi-threaded TCG now and then runs kernel text that another vCPU has
/// just patched, and the guest dies two seconds in with `Oops: int3`; the
/// smoke boots again once when it sees that (see `smoke::run`). One vCPU
/// avoids the race but made golden's boot-to-ready 40 % slower here (26 s
/// against 36 s), and `-accel tcg,thread=single` slower still (40–48 s).
pub fn cpus(accel: Engine) -> u32 {
    match accel {
        Engine::Kvm => 2,
        Engine::Tcg => 2,
    }
}
/// Bound on `qemu-img create` for the overlay.
const OVERLAY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of QEMU's own stderr kept for an error message.
const STDERR_KEEP: usize = 4096;

/// How a disk file is stored, from its first bytes.
pub fn disk_format(path: &Path) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f =
        std::fs::File::open(path).with_context(|| format!("opening disk {}", path.display()))?;
    let n = f
        .read(&mut magic)
        .with_context(|| format!("reading disk {}", path.display()))?;
    Ok(if n == 4 && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    })
}

/// A throwaway qcow2 overlay on `disk`: the VM writes there, so the built
/// disk is opened read-only and never changes.
pub fn create_overlay(disk: &Path, overlay: &Path) -> Result<()> {
    let disk = std::fs::canonicalize(disk)
        .with_context(|| format!("resolving disk path {}", disk.display()))?;
    let format = disk_format(&disk)?;
    Cmd::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(&disk)
        .arg(overlay)
        .timeout(OVERLAY_TIMEOUT)
        .run()
        .context("creating the smoke boot's throwaway overlay")
}

/// Everything the command line is built from.
pub struct VmConfig<'a> {
    /// `kvm` or `tcg`.
    pub accel: Engine,
    pub firmware: &'a Firmware,
    /// The throwaway copy of the firmware's VARS (or of a combined image).
    pub vars_copy: &'a Path,
    /// The disk to boot (a qcow2 overlay), or None for a firmware-only boot.
    pub disk: Option<&'a Path>,
    /// Extra writable disks, with their format.
    /// Path, format, virtio serial.
    pub volumes: &'a [(PathBuf, &'static str, String)],
    /// `-smbios type=11` values.
    pub smbios: &'a [String],
    /// (host port on 127.0.0.1, guest port).
    pub forwards: &'a [(u16, u16)],
    /// A file that receives the guest's second serial port (ttyS1), kiln's
    /// report channel.
    pub channel: Option<&'a Path>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Enforce Secure Boot: the firmware must be a Secure Boot build, which
    /// needs SMM (so q35) and its flash marked secure.
    pub secure_boot: bool,
}

/// QEMU arguments for a Secure Boot firmware: SMM, which only q35 has; the
/// variable flash writable from SMM alone, so the guest OS cannot rewrite
/// the keys; S3 off, which older edk2 builds with SMM require.
pub const SECURE_BOOT_ARGS: &[&str] = &[
    "-machine",
    "q35,smm=on",
    "-global",
    "driver=cfi.pflash01,property=secure,value=on",
    "-global",
    "ICH9-LPC.disable_s3=1",
];

fn drive(spec: String) -> [OsString; 2] {
    ["-drive".into(), spec.into()]
}

/// Escape a value for QEMU's option syntax (a comma is doubled).
fn opt(value: &Path) -> String {
    value.to_string_lossy().replace(',', ",,")
}

/// The QEMU arguments (without the program name).
pub fn args(c: &VmConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&["-accel", c.accel.as_str()]);
    if c.accel == Engine::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &c.memory_mib.to_string(), "-smp", &c.cpus.to_string()]);
    if c.secure_boot {
        push(SECURE_BOOT_ARGS);
    }
    // No default devices, no display, no monitor: the serial console on
    // stdout is the only output; -no-reboot turns a guest reboot (a panic,
    // a triple fault) into QEMU exiting.
    push(&[
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
    ]);
    push(&[
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ]);
    if let Some(channel) = c.channel {
        push(&[
            "-chardev",
            &format!("file,id=kiln,path={}", opt(channel)),
            "-serial",
            "chardev:kiln",
        ]);
    }
    match &c.firmware.vars {
        Some(_) => {
            a.extend(drive(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                opt(&c.firmware.code)
            )));
            a.extend(drive(format!(
                "if=pflash,format=raw,unit=1,file={}",
                opt(c.vars_copy)
            )));
        }
        None => a.extend(drive(format!(
            "if=pflash,format=raw,unit=0,file={}",
            opt(c.vars_copy)
        ))),
    }
    if let Some(disk) = c.disk {
        // bootindex: the firmware tries this disk first, not a blank volume.
        a.extend(drive(format!(
            "if=none,id=disk0,format=qcow2,cache=unsafe,file={}",
            opt(disk)
        )));
        a.extend([
            "-device".into(),
            "virtio-blk-pci,drive=disk0,bootindex=0".into(),
        ]);
    }
    // The serial belongs to the device (QEMU 7.2 refuses it on -drive).
    for (i, (vol, format, serial)) in c.volumes.iter().enumerate() {
        a.extend(drive(format!(
            "if=none,id=vol{i},format={format},file={}",
            opt(vol)
        )));
        a.extend([
            "-device".into(),
            format!("virtio-blk-pci,drive=vol{i},serial={serial}").into(),
        ]);
    }
    if c.disk.is_some() {
        let mut netdev = "user,id=net0".to_owned();
        for (host, guest) in c.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        // romfile= : no iPXE option ROM, nothing to network-boot from.
        a.extend([
            "-netdev".into(),
            netdev.into(),
            "-device".into(),
            "virtio-net-pci,netdev=net0,romfile=".into(),
        ]);
        a.extend(["-device".into(), "virtio-rng-pci".into()]);
    }
    for value in c.smbios {
        a.extend(["-smbios".into(), format!("type=11,value={value}").into()]);
    }
    a
}

/// The command line as a user could paste it.
pub fn display(args: &[OsString]) -> String {
    std::iter::once(cmd::shell_quote(QEMU.as_ref()))
        .chain(args.iter().map(|a| cmd::shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Output from the guest, in chunks as read.
pub enum Chunk {
    /// The serial console (ttyS0).
    Console(Vec<u8>),
    /// kiln's report channel (ttyS1).
    Channel(Vec<u8>),
}

/// How often the report channel's file is read for new bytes.
const CHANNEL_POLL: Duration = Duration::from_millis(50);

/// A running QEMU. Dropping it kills its process group.
pub struct Vm {
    child: Child,
    /// Guest output; disconnected once QEMU is gone and all is read.
    pub output: Receiver<Chunk>,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: Option<ExitStatus>,
}

impl Vm {
    /// Start QEMU. Err if it could not even be executed. `channel` is the
    /// file given as `VmConfig::channel`, tailed until QEMU is gone.
    pub fn spawn(args: &[OsString], channel: Option<&Path>) -> Result<Vm> {
        cmd::check_interrupt()?;
        cmd::log_line(&format!("$ {}", display(args)));
        let mut child = Command::new(QEMU)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow!("`{QEMU}` is not installed; install it (Debian: `apt-get install qemu-utils qemu-system-x86`)")
                } else {
                    anyhow!("could not start {QEMU}: {e}")
                }
            })?;
        let mut stdout = child.stdout.take().expect("stdout was piped");
        let mut stderr = child.stderr.take().expect("stderr was piped");
        let (tx, output) = mpsc::channel();
        let console_done = Arc::new(AtomicBool::new(false));
        if let Some(path) = channel {
            let tx = tx.clone();
            let done = console_done.clone();
            let path = path.to_owned();
            std::thread::spawn(move || {
                tail_file(&path, &done, |bytes| tx.send(Chunk::Channel(bytes)).is_ok())
            });
        }
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends at EOF (QEMU gone) or when the receiver is dropped.
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(Chunk::Console(buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            console_done.store(true, Ordering::SeqCst);
        });
        let kept = Arc::new(Mutex::new(Vec::new()));
        let sink = kept.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut kept = sink.lock().unwrap_or_else(|e| e.into_inner());
                kept.extend_from_slice(&buf[..n]);
                let excess = kept.len().saturating_sub(STDERR_KEEP);
                kept.drain(..excess);
            }
        });
        Ok(Vm {
            child,
            output,
            stderr: kept,
            exited: None,
        })
    }

    /// QEMU's exit status, once it has exited.
    pub fn try_exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("checking on QEMU")?;
        }
        Ok(self.exited)
    }

    /// What QEMU wrote to stderr so far (its last few KiB).
    pub fn stderr(&self) -> String {
        let kept = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&kept).trim().to_owned()
    }
}

/// Send what is appended to `path` until `done` is set (then one last
/// read), or until `send` says nobody listens.
fn tail_file(path: &Path, done: &AtomicBool, send: impl Fn(Vec<u8>) -> bool) {
    let mut file = None;
    let mut buf = [0u8; 4096];
    loop {
        let finished = done.load(Ordering::SeqCst);
        if file.is_none() {
            file = std::fs::File::open(path).ok();
        }
        if let Some(f) = file.as_mut() {
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if !send(buf[..n].to_vec()) {
                            return;
                        }
                    }
                }
            }
        }
        if finished {
            return;
        }
        std::thread::sleep(CHANNEL_POLL);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The group id is QEMU's pid; a group already gone is fine.
        cmd::kill_group(self.child.id());
        if self.exited.is_none() {
            // Reap after SIGKILL so no zombie is left. Nothing useful can
            // be done with an error while dropping.
            if let Err(e) = self.child.wait() {
                cmd::log_line(&format!("reaping QEMU failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn guests_get_two_cpus() {
        assert_eq!(cpus(Engine::Tcg), 2);
        assert_eq!(cpus(Engine::Kvm), 2);
    }

    #[test]
    fn command_line_for_a_smoke_boot() {
        let fw = Firmware {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: Some("/usr/share/OVMF/OVMF_VARS_4M.fd".into()),
            origin: "test".into(),
        };
        let vols = vec![(
            PathBuf::from("/tmp/k/data,1.raw"),
            "raw",
            "vol-data".to_owned(),
        )];
        let smbios = vec!["io.systemd.credential.binary:x=YQ==".to_owned()];
        let c = VmConfig {
            accel: Engine::Tcg,
            firmware: &fw,
            vars_copy: Path::new("/tmp/k/vars.fd"),
            disk: Some(Path::new("/tmp/k/overlay.qcow2")),
            volumes: &vols,
            smbios: &smbios,
            forwards: &[(34567, 80), (34568, 443)],
            channel: Some(Path::new("/tmp/k/channel")),
            memory_mib: 1024,
            cpus: cpus(Engine::Tcg),
            secure_boot: false,
        };
        let line = joined(&args(&c));
        for want in [
            "-accel tcg -m 1024 -smp 2 -nodefaults -display none -monitor none -no-reboot",
            "-serial chardev:console -chardev file,id=kiln,path=/tmp/k/channel -serial chardev:kiln",
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive if=pflash,format=raw,unit=1,file=/tmp/k/vars.fd",
            "-drive if=none,id=disk0,format=qcow2,cache=unsafe,file=/tmp/k/overlay.qcow2 -device virtio-blk-pci,drive=disk0,bootindex=0",
            "-drive if=none,id=vol0,format=raw,file=/tmp/k/data,,1.raw -device virtio-blk-pci,drive=vol0,serial=vol-data",
            "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:34567-:80,hostfwd=tcp:127.0.0.1:34568-:443",
            "-smbios type=11,value=io.systemd.credential.binary:x=YQ==",
        ] {
            assert!(line.contains(want), "missing {want:?} in\n{line}");
        }
        assert!(!line.contains("-cpu host"));
        assert!(
            !line.contains("snapshot"),
            "the overlay replaces snapshot=on"
        );
        for absent in ["-machine", "smm", "cfi.pflash01", "disable_s3"] {
            assert!(
                !line.contains(absent),
                "{absent} without Secure Boot:\n{line}"
            );
        }
    }

    #[test]
    fn command_line_with_secure_boot() {
        let fw = Firmware {
            code: "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd".into(),
            vars: Some("/usr/share/OVMF/OVMF_VARS_4M.fd".into()),
            origin: "test".into(),
        };
        let c = VmConfig {
            accel: Engine::Tcg,
            firmware: &fw,
            vars_copy: Path::new("/tmp/k/efivars.fd"),
            disk: Some(Path::new("/tmp/k/overlay.qcow2")),
            volumes: &[],
            smbios: &[],
            forwards: &[],
            channel: None,
            memory_mib: 1024,
            cpus: cpus(Engine::Tcg),
            secure_boot: true,
        };
        let line = joined(&args(&c));
        for want in [
            "-accel tcg -m 1024 -smp 2 -machine q35,smm=on \
             -global driver=cfi.pflash01,property=secure,value=on -global ICH9-LPC.disable_s3=1",
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
            "-drive if=pflash,format=raw,unit=1,file=/tmp/k/efivars.fd",
        ] {
            assert!(line.contains(want), "missing {want:?} in\n{line}");
        }
    }

    #[test]
    fn firmware_probe_has_no_disk_and_no_network() {
        let fw = Firmware {
            code: "/fw/OVMF.fd".into(),
            vars: None,
            origin: "test".into(),
        };
        let c = VmConfig {
            accel: Engine::Kvm,
            firmware: &fw,
            vars_copy: Path::new("/tmp/k/OVMF.fd"),
            disk: None,
            volumes: &[],
            smbios: &[],
            forwards: &[],
            channel: None,
            memory_mib: 128,
            cpus: 1,
            secure_boot: false,
        };
        let line = joined(&args(&c));
        assert!(
            line.contains("-accel kvm -cpu host -m 128 -smp 1"),
            "{line}"
        );
        assert!(
            line.contains("-drive if=pflash,format=raw,unit=0,file=/tmp/k/OVMF.fd"),
            "{line}"
        );
        assert!(!line.contains("virtio"), "{line}");
        assert!(!line.contains("readonly"), "{line}");
    }

    #[test]
    fn display_is_pasteable() {
        let a: Vec<OsString> = vec!["-smbios".into(), "type=11,value=a b".into()];
        assert_eq!(
            display(&a),
            "qemu-system-x86_64 -smbios 'type=11,value=a b'"
        );
    }

    #[test]
    fn disk_format_reads_the_magic() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        let r = d.path().join("r");
        std::fs::write(&r, [0u8; 512]).unwrap();
        assert_eq!(disk_format(&q).unwrap(), "qcow2");
        assert_eq!(disk_format(&r).unwrap(), "raw");
    }
}
