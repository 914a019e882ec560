//! `kiln verify`: does a disk, or a live root, still match its manifest?
//!
//! A disk is read without mounting anything: `qemu-img convert` to a sparse
//! raw file, the root partition found in its GPT (`sfdisk --json`), the
//! files dumped with `debugfs rdump`, and their owners and modes set again
//! from `debugfs ls -p` (rdump's chown after chmod clears setuid bits), so
//! the dumped tree is a faithful copy (`--extract DIR` keeps it). Every path is then
//! compared with the manifest's file list, as is the disk's sha256.
//!
//! A live root (`--root /` on a server) is walked directly, skipping the
//! paths a running system changes by design ([`DEFAULT_IGNORES`], the
//! recipe's volumes, and any `--ignore`).
//!
//! A sealed image (its manifest has a root hash) is also checked by its
//! root hash ([`VerityCheck`]): on a disk, the hash tree is computed again
//! from the root partition and the partition's own tree is verified; on the
//! running system (`--root /`) the root hash the kernel verifies against
//! (`veritysetup status`, or `dmsetup table`) and the one on the kernel
//! command line are compared with the manifest's, in one step and without
//! walking the files: dm-verity checks every block as it is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::manifest::Manifest;
use super::tree::{self, under, Differences, FileEntry, Kind};
use crate::assemble::verity::{self, Verity};
use crate::cmd::Cmd;
use crate::plan::key::file_digest;

/// Paths a running system changes by design, never reported as drift with
/// `--root`. /var holds state and logs (including /var/lib/systemd);
/// /etc/machine-id is written at first boot; resolv.conf by DHCP or
/// systemd-resolved; adjtime by hwclock; .pwd.lock by every passwd change
/// attempt; lost+found by fsck; the SSH host keys are made on each
/// machine's first boot (an image carries none: recipes/ssh.toml), like
/// what cloud-init keeps under /var/lib/cloud.
pub const DEFAULT_IGNORES: &[&str] = &[
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/tmp",
    "/var",
    "/home",
    "/lost+found",
    "/etc/machine-id",
    "/etc/resolv.conf",
    "/etc/adjtime",
    "/etc/.pwd.lock",
    "/etc/ssh/ssh_host_*",
];

#[derive(Debug, Clone, Serialize)]
pub struct DiskDigest {
    pub expected: String,
    pub actual: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The image or root directory checked.
    pub target: String,
    pub manifest: String,
    /// Set when the disk file itself differs from the manifest.
    pub disk_digest: Option<DiskDigest>,
    #[serde(flatten)]
    pub differences: Differences,
    /// Paths (and what is under them) that were not compared.
    pub ignored: Vec<String>,
    /// Paths the manifest lists that the check cannot read (device nodes
    /// and fifos are not dumped by debugfs).
    pub unchecked: usize,
    /// With `--trusted-key`: the signature check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<super::signed::Check>,
    /// For a sealed image: its root hash, checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityCheck>,
    /// Nothing drifted and, when checked, the signature is good.
    pub clean: bool,
}

impl Report {
    /// The report with a signature check added.
    pub fn with_signature(mut self, check: Option<super::signed::Check>) -> Report {
        self.clean &= check.as_ref().is_none_or(super::signed::Check::ok);
        self.signature = check;
        self
    }

    fn drifted(&self) -> bool {
        !self.differences.is_empty()
            || self.disk_digest.is_some()
            || self.verity.as_ref().is_some_and(|v| !v.ok)
    }

    /// A readable report, for people.
    pub fn text(&self) -> String {
        let mut s = format!("{} against {}\n", self.target, self.manifest);
        if let Some(check) = &self.signature {
            s.push_str(&check.text());
        }
        if let Some(d) = &self.disk_digest {
            s.push_str(&format!(
                "disk sha256 differs: manifest {} , disk {}\n",
                d.expected, d.actual
            ));
        }
        if let Some(v) = &self.verity {
            s.push_str(&v.text());
        }
        for m in &self.differences.modified {
            s.push_str(&format!(
                "modified  {}  ({})\n",
                m.path,
                m.changes.join(", ")
            ));
        }
        for p in &self.differences.added {
            s.push_str(&format!("added     {p}\n"));
        }
        for p in &self.differences.removed {
            s.push_str(&format!("removed   {p}\n"));
        }
        if !self.drifted() {
            s.push_str("clean: every path matches the manifest");
        } else {
            s.push_str(&format!(
                "drift: {} modified, {} added, {} removed{}",
                self.differences.modified.len(),
                self.differences.added.len(),
                self.differences.removed.len(),
                self.drift_extra()
            ));
        }
        if !self.ignored.is_empty() {
            s.push_str(&format!("\nignored: {}", self.ignored.join(" ")));
        }
        s.push('\n');
        s
    }

    /// `, disk digest differs, root hash differs`: what drifted besides
    /// paths.
    pub fn drift_extra(&self) -> String {
        let mut s = String::new();
        if self.disk_digest.is_some() {
            s.push_str(", disk digest differs");
        }
        if self.verity.as_ref().is_some_and(|v| !v.ok) {
            s.push_str(", root hash differs");
        }
        s
    }
}

/// A sealed image's root hash, checked against its manifest's.
#[derive(Debug, Clone, Serialize)]
pub struct VerityCheck {
    /// The manifest's root hash.
    pub expected: String,
    /// The root hash found: computed from the disk's root partition, or
    /// the one the running kernel verifies against.
    pub actual: Option<String>,
    /// Where `actual` came from.
    pub source: String,
    /// What does not match, when something does not.
    pub problems: Vec<String>,
    pub ok: bool,
}

impl VerityCheck {
    fn new(
        expected: &str,
        actual: Option<String>,
        source: &str,
        mut problems: Vec<String>,
    ) -> Self {
        match &actual {
            Some(a) if a != expected => problems.insert(
                0,
                format!("root hash differs: manifest {expected} , {source} {a}"),
            ),
            Some(_) => {}
            None => problems.insert(0, format!("no root hash found ({source})")),
        }
        VerityCheck {
            expected: expected.to_owned(),
            actual,
            source: source.to_owned(),
            ok: problems.is_empty(),
            problems,
        }
    }

    fn text(&self) -> String {
        if self.ok {
            format!(
                "sealed: root hash {} ({}) matches the manifest\n",
                self.expected, self.source
            )
        } else {
            self.problems.iter().map(|p| format!("{p}\n")).collect()
        }
    }
}

/// Compute a sealed disk's root hash again from its root partition, and
/// verify the disk's own hash partition against the manifest's root hash.
fn disk_verity(
    image: &Path,
    m: &Manifest,
    expected: &Verity,
    scratch: &Path,
) -> Result<VerityCheck> {
    crate::cmd::require_tools(&[crate::cmd::VERITY_TOOLS])?;
    let raw = scratch.join("verity-disk.raw");
    Cmd::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .run()
        .context("reading the disk")?;
    let source = "computed from the disk's root partition";
    let data_part = crate::disk::root_partition(&raw)?;
    let Some(hash_part) = crate::disk::verity_partition(&raw)? else {
        return Ok(VerityCheck::new(
            &expected.root_hash,
            None,
            source,
            vec![
                "the disk has no root-verity partition, but its manifest records a sealed root"
                    .to_owned(),
            ],
        ));
    };
    let mut problems = Vec::new();
    for (what, part, want) in [
        ("root", &data_part, &expected.data_partition_uuid),
        ("root-verity", &hash_part, &expected.hash_partition_uuid),
    ] {
        if !part.uuid.eq_ignore_ascii_case(want) {
            problems.push(format!(
                "the {what} partition's UUID is {}, not {want} (a half of the root hash)",
                part.uuid
            ));
        }
    }
    let data = scratch.join("root.ext4");
    let hash = scratch.join("root.verity");
    verity::copy_out(&raw, data_part.start, data_part.size, &data)?;
    verity::copy_out(&raw, hash_part.start, hash_part.size, &hash)?;
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    let recomputed = scratch.join("recomputed.verity");
    let actual = verity::format(&data, &recomputed, m.image.key)?;
    if actual == expected.root_hash {
        if let Some(said) = verity::verify(&data, &hash, &expected.root_hash) {
            problems.push(format!(
                "the disk's root-verity partition does not match its root partition: {said}"
            ));
        }
    }
    Ok(VerityCheck::new(
        &expected.root_hash,
        Some(actual),
        source,
        problems,
    ))
}

/// The running system's root hash: the one its kernel verifies `/` against
/// (`veritysetup status root`, else `dmsetup table root`), and `roothash=`
/// on its command line.
fn running_verity(expected: &Verity) -> Result<VerityCheck> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    let mut problems = Vec::new();
    match verity::cmdline_root_hash(&cmdline) {
        Some(h) if h.eq_ignore_ascii_case(&expected.root_hash) => {}
        Some(h) => problems.push(format!(
            "the kernel command line's roothash= is {h}, not the manifest's"
        )),
        None => problems.push(
            "the kernel command line has no roothash=: this system is not running sealed"
                .to_owned(),
        ),
    }
    let (actual, source) = if crate::cmd::on_path("veritysetup") {
        let out = Cmd::new("veritysetup").args(["status", "root"]).output();
        (
            out.ok()
                .and_then(|o| verity::parse_root_hash(&o.stdout_str())),
            "veritysetup status root",
        )
    } else {
        let out = Cmd::new("dmsetup").args(["table", "root"]).output();
        (
            out.ok()
                .and_then(|o| verity::table_root_hash(&o.stdout_str())),
            "dmsetup table root",
        )
    };
    Ok(VerityCheck::new(
        &expected.root_hash,
        actual,
        source,
        problems,
    ))
}

fn manifest_files<'a>(m: &'a Manifest, manifest_path: &Path) -> Result<&'a [FileEntry]> {
    m.files.as_deref().with_context(|| {
        format!("{} has no file list (the image was assembled by an older kiln): rebuild it with `kiln build --refresh`", manifest_path.display())
    })
}

/// Check a live root directory.
pub fn root(
    dir: &Path,
    m: &Manifest,
    manifest_path: &Path,
    extra_ignores: &[String],
) -> Result<Report> {
    let running = std::fs::canonicalize(dir).is_ok_and(|d| d == Path::new("/"));
    if let (Some(expected), true) = (&m.verity, running) {
        let check = running_verity(expected)?;
        return Ok(Report {
            target: dir.display().to_string(),
            manifest: manifest_path.display().to_string(),
            disk_digest: None,
            differences: Differences::default(),
            ignored: vec![],
            unchecked: 0,
            signature: None,
            clean: check.ok,
            verity: Some(check),
        });
    }
    let mut ignored: Vec<String> = DEFAULT_IGNORES.iter().map(|s| s.to_string()).collect();
    ignored.extend(m.volumes.iter().cloned());
    ignored.extend(extra_ignores.iter().cloned());
    let skip = |p: &str| ignored.iter().any(|i| under(p, i));
    let actual =
        tree::walk(dir, &skip).with_context(|| format!("reading the root {}", dir.display()))?;
    let differences = tree::compare(manifest_files(m, manifest_path)?, &actual, &skip, false);
    let clean = differences.is_empty();
    Ok(Report {
        target: dir.display().to_string(),
        manifest: manifest_path.display().to_string(),
        disk_digest: None,
        differences,
        ignored,
        unchecked: 0,
        signature: None,
        clean,
        verity: None,
    })
}

/// Check a built disk: its digest, then every file of its root filesystem.
/// With `extract`, the root filesystem is left there (a new directory).
pub fn image(
    image: &Path,
    m: &Manifest,
    manifest_path: &Path,
    extract: Option<&Path>,
) -> Result<Report> {
    let expected = manifest_files(m, manifest_path)?;
    let actual_digest =
        file_digest(image).with_context(|| format!("hashing {}", image.display()))?;
    let disk_digest = (actual_digest != m.image.sha256).then(|| DiskDigest {
        expected: m.image.sha256.clone(),
        actual: actual_digest,
    });
    let scratch = tempfile::Builder::new()
        .prefix("kiln-verify-")
        .tempdir()
        .context("creating a scratch directory")?;
    let root = match extract {
        Some(dir) => {
            std::fs::create_dir(dir)
                .with_context(|| format!("creating {} (it must not exist yet)", dir.display()))?;
            dir.to_path_buf()
        }
        None => scratch.path().join("root"),
    };
    let actual = read_root(image, &root, scratch.path())?;
    let verity = m
        .verity
        .as_ref()
        .map(|v| disk_verity(image, m, v, scratch.path()))
        .transpose()?;
    // mke2fs adds lost+found; debugfs does not dump device nodes or fifos.
    let dumpable = |e: &FileEntry| matches!(e.kind, Kind::File | Kind::Dir | Kind::Symlink);
    let unchecked = expected.iter().filter(|e| !dumpable(e)).count();
    let expected: Vec<FileEntry> = expected.iter().filter(|e| dumpable(e)).cloned().collect();
    let ignored = vec!["/lost+found".to_owned()];
    let differences = tree::compare(&expected, &actual, &|p| under(p, "/lost+found"), false);
    let clean =
        differences.is_empty() && disk_digest.is_none() && verity.as_ref().is_none_or(|v| v.ok);
    Ok(Report {
        target: image.display().to_string(),
        manifest: manifest_path.display().to_string(),
        disk_digest,
        differences,
        ignored,
        unchecked,
        signature: None,
        clean,
        verity,
    })
}

/// The byte offset of the root partition in a raw GPT disk.
pub fn root_offset(raw: &Path) -> Result<u64> {
    Ok(crate::disk::root_partition(raw)?.start)
}

/// Dump the root filesystem of `image` into `dump` (created if missing)
/// with the owners and modes the filesystem stores, and describe it.
pub fn read_root(image: &Path, dump: &Path, scratch: &Path) -> Result<Vec<FileEntry>> {
    let raw = scratch.join("disk.raw");
    Cmd::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .run()
        .context("reading the disk")?;
    let fs = format!("{}?offset={}", raw.display(), root_offset(&raw)?);
    std::fs::create_dir_all(dump).with_context(|| format!("creating {}", dump.display()))?;
    Cmd::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dump.display()))
        .arg(&fs)
        .run()
        .context("dumping the root filesystem")?;
    let dumped = tree::walk(dump, &|_| false)?;
    let meta = fs_metadata(&fs, &dumped, scratch)?;
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    // Owner first, then mode: chown clears setuid and setgid.
    for e in &dumped {
        let (mode, uid, gid) = *meta
            .get(&e.path)
            .with_context(|| format!("debugfs listed no metadata for {}", e.path))?;
        let host = dump.join(e.path.trim_start_matches('/'));
        std::os::unix::fs::lchown(&host, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", host.display()))?;
        if e.kind != Kind::Symlink {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode & 0o7777))
                .with_context(|| format!("chmod {}", host.display()))?;
        }
    }
    tree::walk(dump, &|_| false)
}

/// `path -> (mode, uid, gid)` from `debugfs ls -p` of every directory.
fn fs_metadata(
    fs: &str,
    entries: &[FileEntry],
    scratch: &Path,
) -> Result<BTreeMap<String, (u32, u32, u32)>> {
    let mut script = String::new();
    for e in entries.iter().filter(|e| e.kind == Kind::Dir) {
        script.push_str(&format!("ls -p {}\n", crate::disk::debugfs_quote(&e.path)));
    }
    let script_path = scratch.join("ls.debugfs");
    std::fs::write(&script_path, script)
        .with_context(|| format!("writing {}", script_path.display()))?;
    let out = Cmd::new("debugfs")
        .arg("-f")
        .arg(&script_path)
        .arg(fs)
        .output()
        .context("reading owners and modes")?;
    Ok(parse_ls(&out.stdout_str()))
}

/// Parse `debugfs -f` output of `ls -p "DIR"` commands.
fn parse_ls(text: &str) -> BTreeMap<String, (u32, u32, u32)> {
    let mut out = BTreeMap::new();
    let mut dir = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("debugfs: ls -p ") {
            dir = rest.trim().trim_matches('"').replace("\"\"", "\"");
            continue;
        }
        // /ino/mode/uid/gid/name/size/
        let Some(body) = line.strip_prefix('/').and_then(|l| l.strip_suffix('/')) else {
            continue;
        };
        let mut head = body.splitn(5, '/');
        let (Some(_ino), Some(mode), Some(uid), Some(gid), Some(rest)) = (
            head.next(),
            head.next(),
            head.next(),
            head.next(),
            head.next(),
        ) else {
            continue;
        };
        let Some((name, _size)) = rest.rsplit_once('/') else {
            continue;
        };
        let (Ok(mode), Ok(uid), Ok(gid)) = (u32::from_str_radix(mode, 8), uid.parse(), gid.parse())
        else {
            continue;
        };
        let path = match name {
            ".." => continue,
            "." => dir.clone(),
            _ if dir == "/" => format!("/{name}"),
            _ => format!("{dir}/{name}"),
        };
        out.insert(path, (mode, uid, gid));
    }
    out
}

/// Where to find the manifest of an image when none is given.
pub fn manifest_for(image: &Path, given: Option<&Path>) -> PathBuf {
    given.map_or_else(|| super::manifest::path_for(image), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debugfs_ls_p() {
        let text = "debugfs: ls -p \"/\"\n/2/040755/0/0/.//\n/2/040755/0/0/..//\n/12/104755/0/0/su/72000/\n\n\
                    debugfs: ls -p \"/a b\"\n/13/040700/33/33/.//\n/14/100600/33/33/x y/3/\n";
        let m = parse_ls(text);
        assert_eq!(m["/"], (0o40755, 0, 0));
        assert_eq!(m["/su"], (0o104755, 0, 0));
        assert_eq!(m["/a b"], (0o40700, 33, 33));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn default_ignores_cover_state_but_not_config() {
        let ignored = |p: &str| DEFAULT_IGNORES.iter().any(|i| under(p, i));
        assert!(ignored("/var/lib/systemd/random-seed"));
        assert!(ignored("/etc/machine-id"));
        assert!(ignored(
            "/var/lib/cloud/instances/kiln-smoke-0/user-data.txt"
        ));
        assert!(ignored("/etc/ssh/ssh_host_ed25519_key"));
        assert!(!ignored("/etc/ssh/sshd_config"));
        assert!(!ignored("/root/.ssh/authorized_keys"));
        assert!(!ignored("/etc/passwd"));
        assert!(!ignored("/usr/bin/ls"));
    }
}
