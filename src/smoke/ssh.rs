//! Logging in to the smoke VM over SSH, from the host, with OpenSSH.
//!
//! kiln makes a throwaway ed25519 key pair in the smoke's temp dir (gone
//! when the boot is over) and hands the public key to the guest as the
//! systemd credential `ssh.authorized_keys.root`, an SMBIOS type 11 string:
//! systemd-tmpfiles writes it to root's authorized_keys at boot
//! (`/usr/lib/tmpfiles.d/provision.conf`), so the image itself holds no
//! key. The guest's port 22 is forwarded to a free port on 127.0.0.1.
//!
//! The host key is checked, never waved through: kiln's check script
//! reports the guest's host public keys on kiln's report channel (framed
//! with the boot's nonce, like every result), kiln writes them into a
//! known_hosts file of its own, and `ssh` runs with
//! `StrictHostKeyChecking=yes` against that file alone. A guest that
//! reported no key cannot be logged in to.
//!
//! Each check is `ssh -i KEY -p PORT USER@127.0.0.1 COMMAND`, with the
//! user's and the system's ssh configuration, agents and other keys left
//! out (`-F /dev/null`, `IdentitiesOnly`, `IdentityAgent=none`), and no
//! password prompt (`BatchMode`). Its exit code is the command's, except
//! 255 with ssh's own complaint on stderr: a refused login
//! ([`Outcome::Refused`], the image did not take the key), or a connection
//! or host key failure ([`Outcome::Failed`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::guest::base64;
use crate::cmd::{self, Cmd};

/// The credential systemd's provision.conf installs as root's authorized keys.
pub const ROOT_KEYS_CREDENTIAL: &str = "ssh.authorized_keys.root";
/// The guest's SSH port.
pub const GUEST_PORT: u16 = 22;
/// Bound on ssh-keygen making a key pair.
const KEYGEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the TCP connect and SSH handshake (slow under emulation).
const CONNECT_TIMEOUT_SECS: u64 = 30;
/// Bound on one check, login included.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long kiln keeps retrying while nothing answers on the port (the
/// forward is up before sshd is).
const RETRY_WINDOW: Duration = Duration::from_secs(30);
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Output lines kept per check, as for in-guest checks.
const OUTPUT_LINES: usize = super::guest::CHECK_TAIL_LINES;

/// A key pair made for one boot.
pub struct KeyPair {
    /// The private key file (mode 0600, in the smoke's temp dir).
    pub private: PathBuf,
    /// The public key line, `ssh-ed25519 AAAA… kiln-smoke`.
    pub public: String,
}

impl KeyPair {
    /// Make `dir/name` and `dir/name.pub` with ssh-keygen.
    pub fn generate(dir: &Path, name: &str) -> Result<KeyPair> {
        let private = dir.join(name);
        Cmd::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-smoke", "-f"])
            .arg(&private)
            .timeout(KEYGEN_TIMEOUT)
            .run()
            .context("making a throwaway SSH key pair for the smoke boot")?;
        let public_path = dir.join(format!("{name}.pub"));
        let public = std::fs::read_to_string(&public_path)
            .with_context(|| format!("reading {}", public_path.display()))?
            .trim()
            .to_owned();
        Ok(KeyPair { private, public })
    }
}

/// The `-smbios type=11` value that makes `public` root's authorized key.
pub fn credential(public: &str) -> String {
    format!(
        "io.systemd.credential.binary:{ROOT_KEYS_CREDENTIAL}={}",
        base64(format!("{public}\n").as_bytes())
    )
}

/// A known_hosts file naming the guest's host keys (`TYPE BASE64`) for
/// `[127.0.0.1]:port`.
pub fn known_hosts(port: u16, host_keys: &[String]) -> String {
    host_keys
        .iter()
        .map(|k| format!("[127.0.0.1]:{port} {k}\n"))
        .collect()
}

/// Who logs in, with what, to which port.
pub struct Login<'a> {
    pub user: &'a str,
    pub identity: &'a Path,
    pub known_hosts: &'a Path,
    pub port: u16,
}

/// The `ssh` arguments that run `command` as the login's user.
pub fn args(login: &Login, command: &str) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["-F", "/dev/null", "-T", "-i"]
        .iter()
        .map(OsString::from)
        .collect();
    a.push(login.identity.into());
    a.extend(["-p".into(), login.port.to_string().into()]);
    let mut known = OsString::from("UserKnownHostsFile=");
    known.push(login.known_hosts);
    let options: [OsString; 11] = [
        known,
        "GlobalKnownHostsFile=/dev/null".into(),
        "StrictHostKeyChecking=yes".into(),
        "UpdateHostKeys=no".into(),
        "IdentitiesOnly=yes".into(),
        "IdentityAgent=none".into(),
        "BatchMode=yes".into(),
        "PasswordAuthentication=no".into(),
        "KbdInteractiveAuthentication=no".into(),
        format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}").into(),
        "ServerAliveInterval=15".into(),
    ];
    for o in options {
        a.push("-o".into());
        a.push(o);
    }
    a.push(format!("{}@127.0.0.1", login.user).into());
    a.push("--".into());
    a.push(command.into());
    a
}

/// What one `ssh` run came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Logged in; the command exited with this code.
    Ran { exit_code: i32, output: Vec<String> },
    /// The server refused the key (`Permission denied`).
    Refused(String),
    /// No login: the connection or the host key check failed.
    Failed(String),
    /// The login or the command did not finish in time (and was killed).
    TimedOut(String),
}

/// What ssh's own stderr says, when it exited 255.
#[derive(Debug, PartialEq)]
enum SshError {
    Refused(String),
    /// Nothing answered yet (worth a retry while sshd starts).
    NoAnswer(String),
    Failed(String),
}

/// ssh's complaint among `stderr`'s lines, if any.
fn ssh_error(stderr: &[String]) -> Option<SshError> {
    let find = |needles: &[&str]| {
        stderr
            .iter()
            .find(|l| needles.iter().any(|n| l.contains(n)))
            .map(|l| l.trim().to_owned())
    };
    if let Some(l) = find(&["Permission denied ("]) {
        return Some(SshError::Refused(l));
    }
    if let Some(l) = find(&[
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "host key is known",
        "No matching host key",
    ]) {
        let all = stderr.join("\n");
        return Some(SshError::Failed(format!(
            "the guest's host key is not the one it reported ({l}): {all}"
        )));
    }
    if let Some(l) = find(&[
        "Connection refused",
        "Connection reset",
        "Connection closed",
        "kex_exchange_identification",
        "timed out",
        "banner exchange",
    ]) {
        return Some(SshError::NoAnswer(l));
    }
    find(&["ssh: ", "Could not", "Bad "]).map(SshError::Failed)
}

/// Judge one ssh run from its exit code, stdout and stderr.
fn judge(exit_code: Option<i32>, stdout: &str, stderr: &[String]) -> Result<Outcome, SshError> {
    let code = exit_code.unwrap_or(255);
    if code == 255 {
        if let Some(e) = ssh_error(stderr) {
            return Err(e);
        }
    }
    let mut output: Vec<String> = stdout
        .lines()
        .chain(stderr.iter().map(String::as_str))
        .map(str::to_owned)
        .collect();
    let excess = output.len().saturating_sub(OUTPUT_LINES);
    output.drain(..excess);
    Ok(Outcome::Ran {
        exit_code: code,
        output,
    })
}

/// Run `command` over SSH, retrying while nothing answers.
pub fn run(login: &Login, command: &str) -> Result<Outcome> {
    let started = Instant::now();
    loop {
        cmd::check_interrupt()?;
        let out = match Cmd::new("ssh")
            .args(args(login, command))
            .timeout(CHECK_TIMEOUT)
            .any_status()
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                return match e.downcast::<cmd::TimedOut>() {
                    Ok(t) => Ok(Outcome::TimedOut(format!(
                        "ssh did not finish within {}s and was killed",
                        t.secs
                    ))),
                    Err(e) => Err(e),
                }
            }
        };
        match judge(out.status.code(), &out.stdout_str(), &out.tail) {
            Ok(outcome) => return Ok(outcome),
            Err(SshError::Refused(why)) => return Ok(Outcome::Refused(why)),
            Err(SshError::Failed(why)) => return Ok(Outcome::Failed(why)),
            Err(SshError::NoAnswer(why)) if started.elapsed() >= RETRY_WINDOW => {
                return Ok(Outcome::Failed(format!(
                    "nothing answered on port {} (the guest's {GUEST_PORT}) for {}s: {why} \
                     (does the image run an SSH server, e.g. extend ssh.toml?)",
                    login.port,
                    RETRY_WINDOW.as_secs()
                )))
            }
            Err(SshError::NoAnswer(_)) => std::thread::sleep(RETRY_PAUSE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn the_command_line_checks_the_host_key_and_uses_only_kilns_key() {
        let login = Login {
            user: "root",
            identity: Path::new("/tmp/k/id"),
            known_hosts: Path::new("/tmp/k/known_hosts"),
            port: 34567,
        };
        let a: Vec<String> = args(&login, "systemctl is-active ssh")
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let line = a.join(" ");
        for want in [
            "-F /dev/null -T -i /tmp/k/id -p 34567",
            "-o UserKnownHostsFile=/tmp/k/known_hosts -o GlobalKnownHostsFile=/dev/null",
            "-o StrictHostKeyChecking=yes",
            "-o IdentitiesOnly=yes -o IdentityAgent=none -o BatchMode=yes",
            "root@127.0.0.1 -- systemctl is-active ssh",
        ] {
            assert!(line.contains(want), "{want:?} not in {line}");
        }
        assert!(!line.contains("StrictHostKeyChecking=no"));
        // The command is one argument: the remote shell splits it.
        assert_eq!(a.last().unwrap(), "systemctl is-active ssh");
    }

    #[test]
    fn the_credential_and_known_hosts_name_the_keys() {
        let c = credential("ssh-ed25519 AAAA kiln-smoke");
        assert_eq!(
            c,
            format!(
                "io.systemd.credential.binary:ssh.authorized_keys.root={}",
                base64(b"ssh-ed25519 AAAA kiln-smoke\n")
            )
        );
        assert!(!c.contains(','), "QEMU splits options at commas");
        assert_eq!(
            known_hosts(2222, &["ssh-ed25519 AAAA".into(), "ssh-rsa BBBB".into()]),
            "[127.0.0.1]:2222 ssh-ed25519 AAAA\n[127.0.0.1]:2222 ssh-rsa BBBB\n"
        );
    }

    #[test]
    fn ssh_exits_are_told_apart() {
        let ran = judge(Some(3), "inactive\n", &[]).unwrap();
        assert_eq!(
            ran,
            Outcome::Ran {
                exit_code: 3,
                output: vec!["inactive".into()]
            }
        );
        // A command that itself exits 255 is not ssh failing.
        assert!(matches!(
            judge(Some(255), "", &lines("my tool failed")),
            Ok(Outcome::Ran { exit_code: 255, .. })
        ));
        let refused = lines("root@127.0.0.1: Permission denied (publickey).");
        assert!(
            matches!(judge(Some(255), "", &refused), Err(SshError::Refused(l)) if l.contains("publickey"))
        );
        for host_key in [
            "Host key verification failed.",
            "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.",
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
        ] {
            assert!(
                matches!(judge(Some(255), "", &lines(host_key)), Err(SshError::Failed(w)) if w.contains("host key")),
                "{host_key}"
            );
        }
        for no_answer in [
            "ssh: connect to host 127.0.0.1 port 2222: Connection refused",
            "kex_exchange_identification: read: Connection reset by peer",
            "Connection closed by 127.0.0.1 port 2222",
        ] {
            assert!(
                matches!(
                    judge(Some(255), "", &lines(no_answer)),
                    Err(SshError::NoAnswer(_))
                ),
                "{no_answer}"
            );
        }
        let tail: String = (0..30).map(|i| format!("{i}\n")).collect();
        match judge(Some(0), &tail, &[]).unwrap() {
            Outcome::Ran { output, .. } => {
                assert_eq!(output.len(), OUTPUT_LINES);
                assert_eq!(output.last().unwrap(), "29");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_pair_is_made_with_ssh_keygen() {
        let d = tempfile::tempdir().unwrap();
        let pair = KeyPair::generate(d.path(), "id").unwrap();
        assert!(pair.public.starts_with("ssh-ed25519 "), "{}", pair.public);
        assert!(pair.public.ends_with(" kiln-smoke"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pair.private)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
