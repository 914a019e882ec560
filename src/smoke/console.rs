//! Reading the serial console: kiln's framed markers, and the well-known
//! ways a boot goes wrong, told apart from a line of text.
//!
//! The parser is fed raw bytes as they arrive and returns [`Event`]s; it
//! keeps the last lines for error messages. It works on text only, so it is
//! tested without QEMU.

use std::collections::VecDeque;

/// Console lines kept for a failure message.
pub const TAIL_LINES: usize = 30;

/// One line the guest script printed for kiln (see `guest::script`).
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    Begin,
    State(String),
    Job(String),
    FailedUnit(String),
    CheckStart(usize),
    Out(usize, String),
    CheckEnd(usize, i32),
    /// One of the guest's SSH host public keys (`TYPE BASE64`), reported
    /// when kiln logs in over SSH: its known_hosts.
    HostKey(String),
    Done(usize),
}

/// Something kiln reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Marker(Marker),
    /// "Kernel panic - not syncing: ..."
    KernelPanic(String),
    /// The kernel's dm-verity found a block of a sealed root that does not
    /// match its hash: "device-mapper: verity: …: data block N is corrupted".
    RootTampered(String),
    /// systemd's emergency or rescue mode, or dracut's emergency shell.
    Emergency(String),
    /// The initramfs gave up on the root file system and dropped to a shell.
    NoRoot(String),
    /// The firmware could not boot the disk: it failed to load the disk's
    /// boot entry, fell back to network boot, or started its own shell.
    NotBootable(String),
    /// Secure Boot refused a boot option's image: OVMF's "BdsDxe: failed
    /// to load Boot0001 …: Access Denied" for a UKI whose signature it does
    /// not accept, "failed to start …: Security Violation" for one whose
    /// verdict was deferred (its built-in shell, say).
    SecurityViolation(String),
    /// A getty's "NAME login: " prompt.
    LoginPrompt,
    /// "systemd 257.9-1 running in system mode": the guest's systemd.
    SystemdVersion(u32),
}

/// Incremental console reader.
pub struct Console {
    marker: String,
    partial: String,
    tail: VecDeque<String>,
    login_seen: bool,
    firmware_lines: Vec<String>,
}

impl Console {
    pub fn new(marker: &str) -> Console {
        Console {
            marker: format!("{marker} "),
            partial: String::new(),
            tail: VecDeque::with_capacity(TAIL_LINES),
            login_seen: false,
            firmware_lines: Vec::new(),
        }
    }

    /// Feed console output; returns the complete lines (cleaned of escape
    /// sequences and carriage returns, for the log) and the events seen.
    pub fn feed(&mut self, text: &str) -> (Vec<String>, Vec<Event>) {
        let mut lines = Vec::new();
        let mut events = Vec::new();
        self.partial.push_str(text);
        while let Some(nl) = self.partial.find('\n') {
            let raw: String = self.partial.drain(..=nl).collect();
            let line = clean(&raw);
            self.line_events(&line, &mut events);
            if self.tail.len() == TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(line.clone());
            lines.push(line);
        }
        // A prompt has no newline after it: look at the unfinished line.
        let rest = clean(&self.partial);
        if !self.login_seen && rest.trim_end().ends_with(" login:") && rest.ends_with(' ') {
            self.login_seen = true;
            events.push(Event::LoginPrompt);
        }
        (lines, events)
    }

    /// Any unfinished last line, cleaned (for the log at the end).
    pub fn unfinished(&self) -> String {
        clean(&self.partial)
    }

    /// The last console lines, oldest first, including an unfinished one.
    pub fn tail(&self) -> Vec<String> {
        let mut out: Vec<String> = self.tail.iter().cloned().collect();
        let rest = self.unfinished();
        if !rest.trim().is_empty() {
            if out.len() == TAIL_LINES {
                out.remove(0);
            }
            out.push(rest);
        }
        out
    }

    fn line_events(&mut self, line: &str, events: &mut Vec<Event>) {
        if let Some(m) = parse_marker(line, &self.marker) {
            events.push(Event::Marker(m));
            return;
        }
        // Before "failed to load": a refused signature is its own failure.
        if is_security_violation(line) {
            events.push(Event::SecurityViolation(line.trim().to_owned()));
            return;
        }
        if line.starts_with("BdsDxe: failed") || line.contains("No bootable option") {
            self.firmware_lines.push(line.trim().to_owned());
        }
        // Trying the network or its shell means the firmware gave up on
        // the disk; kiln never boots from anything else.
        let disk_failed = line.starts_with("BdsDxe: failed to load") && !line.contains("MAC(");
        let gave_up = line.contains("UEFI Interactive Shell")
            || line.contains(">>Start PXE over")
            || line.contains(">>Start HTTP Boot over");
        if disk_failed || gave_up {
            let why = if self.firmware_lines.is_empty() {
                line.trim().to_owned()
            } else {
                self.firmware_lines.join("; ")
            };
            events.push(Event::NotBootable(why));
        } else if crate::smoke::sealed::is_verity_error(line) {
            events.push(Event::RootTampered(line.trim().to_owned()));
        } else if line.contains("Kernel panic - not syncing") {
            events.push(Event::KernelPanic(line.trim().to_owned()));
        } else if line.contains("You are in emergency mode")
            || line.contains("You are in rescue mode")
            || line.contains("Entering emergency mode")
            || line.contains("Give root password for maintenance")
            || line.contains("Cannot open access to console, the root account is locked")
        {
            events.push(Event::Emergency(line.trim().to_owned()));
        } else if line.contains("Gave up waiting for root")
            || (line.contains("ALERT!") && line.contains("does not exist"))
            || line.contains("Dropping to a shell!")
        {
            events.push(Event::NoRoot(line.trim().to_owned()));
        } else if let Some(v) = systemd_version(line) {
            events.push(Event::SystemdVersion(v));
        }
    }
}

/// The firmware's boot manager refused an image for its signature: with
/// Secure Boot on, edk2's LoadImage returns EFI_ACCESS_DENIED for an image
/// that fails verification (unsigned, signed by a key not in db, or changed
/// after signing) and EFI_SECURITY_VIOLATION when it deferred the verdict.
fn is_security_violation(line: &str) -> bool {
    let line = line.trim();
    let boot_option =
        line.starts_with("BdsDxe: failed to load") || line.starts_with("BdsDxe: failed to start");
    boot_option && (line.ends_with(": Access Denied") || line.ends_with(": Security Violation"))
}

/// Parse one of kiln's marker lines. The marker may follow other text on
/// the same line (a kernel message without a newline), never precede it.
pub fn parse_marker(line: &str, marker_space: &str) -> Option<Marker> {
    let at = line.find(marker_space)?;
    let rest = &line[at + marker_space.len()..];
    let (event, arg) = rest.split_once(' ').unwrap_or((rest.trim_end(), ""));
    let num = |s: &str| s.trim().parse::<usize>().ok();
    Some(match event {
        "begin" => Marker::Begin,
        "state" => Marker::State(arg.trim().to_owned()),
        "job" => Marker::Job(arg.trim_end().to_owned()),
        "failed-unit" => Marker::FailedUnit(arg.trim().to_owned()),
        "check-start" => Marker::CheckStart(num(arg)?),
        "out" => {
            let (n, text) = arg.split_once(' ').unwrap_or((arg, ""));
            Marker::Out(num(n)?, text.trim_end().to_owned())
        }
        "check-end" => {
            let (n, rc) = arg.split_once(' ')?;
            Marker::CheckEnd(num(n)?, rc.trim().parse().ok()?)
        }
        "done" => Marker::Done(num(arg)?),
        "host-key" => {
            let mut fields = arg.split_whitespace();
            let (kind, key) = (fields.next()?, fields.next()?);
            Marker::HostKey(format!("{kind} {key}"))
        }
        _ => return None,
    })
}

/// "systemd 257.9-1~deb13u1 running in system mode" → 257.
fn systemd_version(line: &str) -> Option<u32> {
    let at = line.find("systemd ")?;
    let rest = &line[at + "systemd ".len()..];
    if !rest.contains(" running in system mode") {
        return None;
    }
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Drop terminal escape sequences, carriage returns and other control
/// characters; the firmware paints its screen with them.
pub fn clean(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&']') {
                    // OSC: up to BEL or ESC backslash.
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next();
                            break;
                        }
                    }
                } else if chars.peek() == Some(&'[') {
                    chars.next();
                    // CSI: parameters and intermediates, then one final byte.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "KILN-SMOKE-00ff";

    fn events(text: &str) -> Vec<Event> {
        let mut c = Console::new(M);
        c.feed(text).1
    }

    #[test]
    fn markers_parse_into_events() {
        let cases: &[(&str, Marker)] = &[
            ("KILN-SMOKE-00ff begin", Marker::Begin),
            (
                "KILN-SMOKE-00ff state degraded",
                Marker::State("degraded".into()),
            ),
            (
                "KILN-SMOKE-00ff failed-unit nginx.service",
                Marker::FailedUnit("nginx.service".into()),
            ),
            ("KILN-SMOKE-00ff check-start 2", Marker::CheckStart(2)),
            (
                "KILN-SMOKE-00ff out 2   indented text ",
                Marker::Out(2, "  indented text".into()),
            ),
            ("KILN-SMOKE-00ff out 3 ", Marker::Out(3, String::new())),
            ("KILN-SMOKE-00ff check-end 2 127", Marker::CheckEnd(2, 127)),
            ("KILN-SMOKE-00ff done 3", Marker::Done(3)),
            (
                "KILN-SMOKE-00ff host-key ssh-ed25519 AAAAC3Nz root@ssh",
                Marker::HostKey("ssh-ed25519 AAAAC3Nz".into()),
            ),
            (
                "KILN-SMOKE-00ff job 12 foo.service start running",
                Marker::Job("12 foo.service start running".into()),
            ),
            // A kernel message that lost its newline before the marker.
            (
                "[   12.3] random: crng initKILN-SMOKE-00ff done 1",
                Marker::Done(1),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_marker(line, &format!("{M} ")),
                Some(want.clone()),
                "{line}"
            );
        }
    }

    #[test]
    fn lines_without_the_right_nonce_are_not_markers() {
        let cases = [
            "KILN-SMOKE-0000 done 0",
            "KILN-SMOKE-00ffdone 0",
            "kiln-smoke-00ff done 0",
            "KILN-SMOKE-00ff done",
            "KILN-SMOKE-00ff check-end 1 notanumber",
            "KILN-SMOKE-00ff launch-missiles now",
            "KILN-SMOKE-00ff host-key ssh-ed25519",
            "done 0",
        ];
        for line in cases {
            assert_eq!(parse_marker(line, &format!("{M} ")), None, "{line}");
        }
    }

    #[test]
    fn boot_failures_are_recognised() {
        type Check = fn(&Event) -> bool;
        let cases: &[(&str, Check)] = &[
            (
                "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n",
                |e| matches!(e, Event::KernelPanic(l) if l.contains("VFS")),
            ),
            (
                "[   61.5] device-mapper: verity: 254:0: data block 1234 is corrupted\r\n",
                |e| matches!(e, Event::RootTampered(l) if l.contains("data block 1234")),
            ),
            (
                "[   61.6] Kernel panic - not syncing: dm-verity device corrupted\n",
                |e| matches!(e, Event::RootTampered(_)),
            ),
            (
                "You are in emergency mode. After logging in, type \"journalctl -xb\"\n",
                |e| matches!(e, Event::Emergency(_)),
            ),
            (
                "Cannot open access to console, the root account is locked.\n",
                |e| matches!(e, Event::Emergency(_)),
            ),
            ("You are in rescue mode.\n", |e| {
                matches!(e, Event::Emergency(_))
            }),
            (
                "Gave up waiting for root file system device.  Common problems:\n",
                |e| matches!(e, Event::NoRoot(_)),
            ),
            (
                "ALERT!  LABEL=nosuchlabel does not exist.  Dropping to a shell!\n",
                |e| matches!(e, Event::NoRoot(l) if l.contains("nosuchlabel")),
            ),
            (
                "[    1.0] systemd[1]: systemd 257.9-1~deb13u1 running in system mode (+PAM)\n",
                |e| *e == Event::SystemdVersion(257),
            ),
        ];
        for (text, ok) in cases {
            let ev = events(text);
            assert_eq!(ev.len(), 1, "{text}: {ev:?}");
            assert!(ok(&ev[0]), "{text}: {ev:?}");
        }
        assert!(events("Welcome to Debian GNU/Linux 13 (trixie)!\n").is_empty());
    }

    #[test]
    fn a_disk_the_firmware_cannot_boot_is_reported_at_once() {
        let text = "\x1b[2J\x1b[01;01HBdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0): Not Found\r\n";
        let ev = events(text);
        assert!(
            matches!(&ev[..], [Event::NotBootable(why)] if why.contains("Misc Device")),
            "{ev:?}"
        );
        // A failed network entry alone is not the disk failing.
        let net = "BdsDxe: failed to load Boot0002 \"UEFI PXEv4 (MAC:525400123456)\" from PciRoot(0x0)/MAC(525400123456,0x1): Not Found\n";
        assert!(events(net).is_empty());
        for gave_up in [
            ">>Start PXE over IPv4.\n",
            "UEFI Interactive Shell v2.2\r\n",
            ">>Start HTTP Boot over IPv4.....\n",
        ] {
            assert!(
                matches!(&events(gave_up)[..], [Event::NotBootable(_)]),
                "{gave_up}"
            );
        }
    }

    #[test]
    fn a_refused_signature_is_a_security_violation_not_an_empty_disk() {
        let cases = [
            // OVMF (Debian 12's secboot build) refusing an unsigned UKI, or
            // one changed after signing, painted with escape sequences.
            "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0): Access Denied\r\n",
            // Loaded, then refused at start (the notes' EFI shell case).
            "BdsDxe: failed to start Boot0002 \"EFI Internal Shell\" from Fv(7CB8BDC9-F8EB-4F34-AAEA-3EE4AF6516A1)/FvFile(7C04A583-9E3E-4F1C-AD65-E05268D0B4D1): Security Violation\n",
        ];
        for text in cases {
            let ev = events(text);
            assert!(
                matches!(&ev[..], [Event::SecurityViolation(l)] if l.starts_with("BdsDxe: failed to") && l.contains("Boot000")),
                "{text:?}: {ev:?}"
            );
        }
        // A line split across reads is seen once it is whole.
        let mut c = Console::new(M);
        assert!(c
            .feed("BdsDxe: failed to load Boot0001 \"UEFI Misc Device\": Access De")
            .1
            .is_empty());
        assert_eq!(c.feed("nied\r\n").1.len(), 1);
        // A disk with nothing to boot is still that, not a refusal.
        assert!(matches!(
            &events("BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0): Not Found\n")[..],
            [Event::NotBootable(_)]
        ));
        // The words in a guest's own output are not the firmware's verdict
        // only when they come as a kiln marker.
        assert!(matches!(
            &events("KILN-SMOKE-00ff out 1 Security Violation\n")[..],
            [Event::Marker(Marker::Out(1, _))]
        ));
    }

    #[test]
    fn login_prompt_is_seen_without_a_newline_and_once() {
        let mut c = Console::new(M);
        assert!(c
            .feed("\r\nDebian GNU/Linux 13 kiln-test ttyS0\r\n\r\nkiln-te")
            .1
            .is_empty());
        assert_eq!(c.feed("st login: ").1, vec![Event::LoginPrompt]);
        assert!(c.feed("\r\nkiln-test login: ").1.is_empty());
    }

    #[test]
    fn chunks_split_anywhere_give_the_same_events() {
        let text =
            "boot\nKILN-SMOKE-00ff begin\nKILN-SMOKE-00ff state running\nKILN-SMOKE-00ff done 0\n";
        let whole = events(text);
        for split in 0..text.len() {
            let mut c = Console::new(M);
            let mut ev = c.feed(&text[..split]).1;
            ev.extend(c.feed(&text[split..]).1);
            assert_eq!(ev, whole, "split at {split}");
        }
        assert_eq!(whole.len(), 3);
    }

    #[test]
    fn tail_keeps_the_last_lines_cleaned() {
        let mut c = Console::new(M);
        assert_eq!(
            clean("\x1b]104\x07[  OK  ] x\x1b]104\x1b\\y"),
            "[  OK  ] xy"
        );
        for i in 0..40 {
            c.feed(&format!("\x1b[1mline {i}\x1b[0m\r\n"));
        }
        c.feed("half");
        let tail = c.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 11");
        assert_eq!(tail[TAIL_LINES - 2], "line 39");
        assert_eq!(tail[TAIL_LINES - 1], "half");
    }
}
