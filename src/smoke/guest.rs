//! What runs inside the guest: a check script, the systemd unit that runs
//! it, and the SMBIOS credentials that carry both into an unchanged image.
//!
//! Everything the guest prints for kiln goes to its second serial port
//! (ttyS1), one line each, starting with the run's marker, `KILN-SMOKE-<nonce>`, followed by an event (see
//! [`super::console::Marker`]). The nonce is fresh for every boot, so
//! nothing else on the console (kernel messages, a service echoing a
//! previous log) can fake a result.

use std::fmt::Write as _;

/// Name of kiln's check unit in the guest.
pub const UNIT_NAME: &str = "kiln-smoke.service";
/// Name of the credential that carries the check script.
const SCRIPT_CREDENTIAL: &str = "kiln-smoke.sh";
/// Lines of each check's output reported back to the host.
pub const CHECK_TAIL_LINES: usize = 20;

/// What the guest script is asked to do.
pub struct GuestPlan<'a> {
    pub nonce: &'a str,
    /// Shell commands, run in order with `sh -c`.
    pub checks: &'a [String],
    /// Bound on waiting for the boot to finish (leave "starting").
    pub settle_secs: u64,
    /// Seconds to stay up after reporting, so the host can run its HTTP
    /// and SSH checks; 0 powers off at once.
    pub hold_secs: u64,
    /// Report the SSH host public keys (kiln logs in over SSH and checks
    /// the host key against them).
    pub host_keys: bool,
}

/// The marker that starts every line the guest prints for kiln.
pub fn marker(nonce: &str) -> String {
    format!("KILN-SMOKE-{nonce}")
}

/// Quote a string as one POSIX shell word (always single quotes, so the
/// guest's shell never expands anything in a check command).
fn sh_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The check script, run by `/bin/sh` in the guest.
pub fn script(plan: &GuestPlan) -> String {
    let mut s = format!(
        r#"#!/bin/sh
# kiln smoke checks, generated for one boot. Output goes to /dev/ttyS1.
M={marker}
say() {{ printf '%s %s\n' "$M" "$*"; }}
say begin
# Wait for the boot to finish (systemd says when; no polling, which under
# emulation cost a systemctl run every 0.2 s beside the boot), at most
# {settle} s; then the state as it is.
state=$(timeout {settle} systemctl is-system-running --wait 2>/dev/null)
case "$state" in ""|initializing|starting) state=$(systemctl is-system-running 2>/dev/null) ;; esac
say state "$state"
case "$state" in initializing|starting)
  systemctl list-jobs --no-legend --no-pager --full 2>&1 | head -n 20 |
    while IFS= read -r l || [ -n "$l" ]; do say job "$l"; done ;;
esac
systemctl list-units --state=failed --no-legend --plain --no-pager --full 2>&1 |
  while read -r unit rest; do say failed-unit "$unit"; done
run_check() {{
  say check-start "$1"
  out=$(mktemp)
  sh -c "$2" </dev/null >"$out" 2>&1
  rc=$?
  tail -n {tail} "$out" | while IFS= read -r l || [ -n "$l" ]; do say out "$1" "$l"; done
  rm -f "$out"
  say check-end "$1" "$rc"
}}
"#,
        marker = sh_word(&marker(plan.nonce)),
        settle = plan.settle_secs.max(1),
        tail = CHECK_TAIL_LINES,
    );
    if plan.host_keys {
        // Read after the boot settled: the keys are made before ssh starts
        // (by the image's unit, or by cloud-init).
        s.push_str(
            "for k in /etc/ssh/ssh_host_*_key.pub; do [ -f \"$k\" ] && say host-key \"$(cat \"$k\")\"; done\n",
        );
    }
    for (i, check) in plan.checks.iter().enumerate() {
        writeln!(s, "run_check {} {}", i + 1, sh_word(check)).expect("write to String");
    }
    writeln!(s, "say done {}", plan.checks.len()).expect("write to String");
    if plan.hold_secs > 0 {
        writeln!(s, "sleep {}", plan.hold_secs).expect("write to String");
    }
    s.push_str("systemctl poweroff --no-block\n");
    s
}

/// kiln's check unit. It starts with the boot's other services (after
/// basic.target, systemd's default), not after multi-user.target: its
/// script waits for the boot's end itself (`systemctl is-system-running
/// --wait`), so under emulation the shell, `timeout` and `systemctl` it
/// starts are up while the boot's last jobs run, instead of after them
/// (about 0.4 s of every TCG smoke boot). `Type=simple` matters: a
/// oneshot's start job would keep the system in "starting" until the
/// script ends, which the script itself waits on.
pub fn unit() -> String {
    format!(
        "[Unit]\n\
         Description=kiln smoke checks\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ImportCredential={SCRIPT_CREDENTIAL}\n\
         ExecStart=/bin/sh -c 'exec /bin/sh \"$$CREDENTIALS_DIRECTORY/{SCRIPT_CREDENTIAL}\"'\n\
         StandardOutput=file:/dev/ttyS1\n\
         StandardError=inherit\n"
    )
}

/// The drop-in that pulls kiln's unit into the boot.
pub fn dropin() -> String {
    format!("[Unit]\nWants={UNIT_NAME}\n")
}

/// The `-smbios` values (without `type=11,value=`) that hand the unit,
/// the drop-in and the script to systemd ≥ 256 in the guest.
pub fn credentials(plan: &GuestPlan) -> Vec<String> {
    [
        (format!("systemd.extra-unit.{UNIT_NAME}"), unit()),
        (
            "systemd.unit-dropin.multi-user.target~kiln".to_owned(),
            dropin(),
        ),
        (SCRIPT_CREDENTIAL.to_owned(), script(plan)),
    ]
    .into_iter()
    .map(|(name, body)| {
        format!(
            "io.systemd.credential.binary:{name}={}",
            base64(body.as_bytes())
        )
    })
    .collect()
}

/// Standard base64 with padding (RFC 4648), as systemd expects.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    fn plan<'a>(checks: &'a [String], hold: u64) -> GuestPlan<'a> {
        GuestPlan {
            nonce: "0123abcd",
            checks,
            settle_secs: 60,
            hold_secs: hold,
            host_keys: false,
        }
    }

    #[test]
    fn script_runs_each_check_quoted_and_reports_done() {
        let checks = vec![
            "systemctl is-active nginx".to_owned(),
            "echo 'it''s' $HOME".to_owned(),
        ];
        let s = script(&plan(&checks, 0));
        assert!(s.contains("M='KILN-SMOKE-0123abcd'"), "{s}");
        assert!(
            s.contains("run_check 1 'systemctl is-active nginx'\n"),
            "{s}"
        );
        assert!(
            s.contains(r#"run_check 2 'echo '\''it'\'''\''s'\'' $HOME'"#),
            "{s}"
        );
        assert!(s.contains("say done 2\n"), "{s}");
        assert!(!s.contains("sleep 0\n"), "{s}");
        assert!(s.ends_with("systemctl poweroff --no-block\n"), "{s}");
        // The boot is waited for, for at most 60 s.
        assert!(
            s.contains("state=$(timeout 60 systemctl is-system-running --wait 2>/dev/null)\n"),
            "{s}"
        );
        assert!(!s.contains("host-key"), "{s}");
    }

    #[test]
    fn script_reports_host_keys_when_kiln_logs_in() {
        let s = script(&GuestPlan {
            host_keys: true,
            ..plan(&[], 0)
        });
        assert!(s.contains("say host-key \"$(cat \"$k\")\""), "{s}");
        // Reported before `done`, which is when kiln logs in.
        assert!(s.find("host-key").unwrap() < s.find("say done").unwrap());
        // The real loop, over a fake /etc/ssh.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAA root@x\n",
        )
        .unwrap();
        let lp = s.find("for k in").unwrap();
        let line = s[lp..]
            .lines()
            .next()
            .unwrap()
            .replace("/etc/ssh", &d.path().display().to_string());
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &format!("M=m; say() {{ printf '%s %s\\n' \"$M\" \"$*\"; }}\n{line}"),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "m host-key ssh-ed25519 AAAA root@x\n"
        );
    }

    #[test]
    fn script_holds_for_the_host_when_asked() {
        let s = script(&plan(&[], 45));
        assert!(
            s.contains("say done 0\nsleep 45\nsystemctl poweroff"),
            "{s}"
        );
    }

    #[test]
    fn the_script_is_valid_shell() {
        let checks = vec!["true".to_owned(), "printf 'a\\nb'; exit 3".to_owned()];
        let s = script(&plan(&checks, 0));
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &s])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn unit_is_simple_and_reads_the_script_credential() {
        let u = unit();
        assert!(u.contains("Type=simple\n"));
        // Not ordered after the boot's end: it waits for that itself.
        assert!(!u.contains("After="), "{u}");
        assert!(u.contains("ImportCredential=kiln-smoke.sh\n"));
        assert!(u.contains("$$CREDENTIALS_DIRECTORY/kiln-smoke.sh"));
        assert!(u.contains("StandardOutput=file:/dev/ttyS1\n"));
        assert_eq!(dropin(), "[Unit]\nWants=kiln-smoke.service\n");
    }

    #[test]
    fn credentials_name_the_unit_dropin_and_script() {
        let creds = credentials(&plan(&[], 0));
        assert_eq!(creds.len(), 3);
        assert!(creds[0]
            .starts_with("io.systemd.credential.binary:systemd.extra-unit.kiln-smoke.service="));
        assert!(creds[1].starts_with(
            "io.systemd.credential.binary:systemd.unit-dropin.multi-user.target~kiln="
        ));
        assert!(creds[2].starts_with("io.systemd.credential.binary:kiln-smoke.sh="));
        assert_eq!(
            creds[1].split_once('=').unwrap().1,
            base64(dropin().as_bytes())
        );
        // QEMU's option parser treats ',' as a separator.
        assert!(creds.iter().all(|c| !c.contains(',')));
    }
}
