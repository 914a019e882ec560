//! `kiln build --check-repro`: build the recipe a second time, from
//! nothing, and compare.
//!
//! The second build runs into a fresh, empty store (inside the real store's
//! `tmp/`, so on the same filesystem, removed afterwards): every step runs
//! again, mmdebstrap included, at a later time, exactly as on another
//! machine with an empty cache. That costs a full cold build; rebuilding
//! only the assembly from the same layers would miss everything that
//! differs between two runs of apt and dpkg, which is most of what breaks
//! reproducibility.
//!
//! The second build also runs with another umask and time zone than the
//! first (see [`OTHER_UMASK`]): two machines rarely share a caller's shell,
//! and anything of the process state that reaches the image (a directory
//! kiln makes with the process umask, a tool that stamps local time) shows
//! up as a difference here rather than on the other machine.
//!
//! When the two disks differ, the first difference is found in this order:
//! the two file lists (content, metadata, clamped mtime), then the raw
//! disks byte by byte, mapping the first differing byte to the GPT, the
//! ESP, or an ext4 block and, through `debugfs icheck`/`ncheck`, a file.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::tree::{self, FileEntry};
use crate::assemble::secure_boot::{Reuse, Signer};
use crate::cmd::Cmd;
use crate::layers::{self, BuildOptions, Summary};
use crate::lock::Locks;
use crate::recipe::Recipe;
use crate::store::Store;
use crate::ui::Ui;

/// The second build's umask: group-writable where kiln's own is 022.
pub const OTHER_UMASK: libc::mode_t = 0o002;
/// The second build's time zone: far from UTC, and not a whole hour off.
pub const OTHER_TZ: &str = "Asia/Kathmandu";

#[derive(Debug, Clone, Serialize)]
pub struct ReproReport {
    pub first_sha256: String,
    pub second_sha256: String,
    pub reproducible: bool,
    /// Where the two builds first differ, when they do.
    pub first_difference: Option<String>,
    pub second_build_seconds: f64,
}

impl ReproReport {
    pub fn text(&self) -> String {
        if self.reproducible {
            format!("reproducible: a second build from an empty store gave the same sha256 {} ({:.0}s)\n", self.second_sha256, self.second_build_seconds)
        } else {
            format!(
                "NOT reproducible: first build {}, second build {}\nfirst difference: {}\n",
                self.first_sha256,
                self.second_sha256,
                self.first_difference.as_deref().unwrap_or("unknown")
            )
        }
    }
}

/// Build the recipe again, with the same locks, into an empty store and
/// compare with `first`.
///
/// A signed image's second build reuses the first build's signature when
/// its unsigned UKI is the one the first build signed (see
/// `assemble::secure_boot`): an Authenticode signature carries its signing
/// time, everything else must be identical.
pub fn check(
    recipe: &Recipe,
    locks: &Locks,
    first: &Summary,
    store: &Store,
    ui: &Ui,
    signer: Option<&Signer>,
) -> Result<ReproReport> {
    let scratch = store.staging().context("creating a scratch store")?;
    let second_store = Store::open(&scratch.path().join("store"))?;
    let secure_boot = match signer {
        Some(signer) => Some(reuse_first_signature(first, store, signer, scratch.path())?),
        None => None,
    };
    let second_opts = BuildOptions {
        refresh: false,
        out_dir: scratch.path().join("out"),
        layers_only: false,
        fresh_resolve: false,
        // The second build is compared, never published: nothing to sign.
        signing_key: None,
        secure_boot,
        // A cold build: never from a cache.
        remote: None,
        push: false,
        shared: None,
    };
    eprintln!(
        "check-repro: building again into an empty store, with umask {OTHER_UMASK:03o} and TZ={OTHER_TZ}"
    );
    let mut locks = locks.clone();
    let (plan, second) = crate::cmd::with_other_caller_state(OTHER_UMASK, OTHER_TZ, || {
        layers::build(recipe, &mut locks, &second_store, &second_opts, ui)
    })
    .context("the second build of --check-repro")?;
    let mut report = ReproReport {
        first_sha256: first.sha256.clone(),
        second_sha256: second.sha256.clone(),
        reproducible: first.sha256 == second.sha256,
        first_difference: None,
        second_build_seconds: second.seconds,
    };
    if !report.reproducible {
        let key = plan.image.key;
        let files = |s: &Store| s.image_dir(&key).join(crate::disk::FILES_JSON);
        report.first_difference = Some(first_difference(
            &first.image,
            &files(store),
            &second.image,
            &files(&second_store),
            scratch.path(),
        )?);
    }
    Ok(report)
}

/// A signer for the second build that puts the first build's signed UKI
/// on the ESP if the second build's unsigned UKI is the same.
fn reuse_first_signature(
    first: &Summary,
    store: &Store,
    signer: &Signer,
    scratch: &Path,
) -> Result<Signer> {
    let key = crate::plan::Key::parse(&first.image_key)
        .with_context(|| format!("`{}` is not an image key", first.image_key))?;
    let signed = store
        .image_entry(&key)?
        .secure_boot
        .context("the first build's image is not signed, though a Secure Boot key was given")?;
    let signed_uki = scratch.join("first-build-uki.efi");
    crate::disk::read_uki(&first.image, &signed_uki, scratch)
        .context("reading the first build's signed UKI")?;
    Ok(Signer {
        key: signer.key.clone(),
        reuse: Some(Reuse {
            signed_uki,
            unsigned_sha256: signed.unsigned_sha256,
        }),
    })
}

/// Where two builds of the same image first differ.
pub fn first_difference(
    a: &Path,
    a_files: &Path,
    b: &Path,
    b_files: &Path,
    scratch: &Path,
) -> Result<String> {
    let fa: Vec<FileEntry> = crate::store::read_json(a_files)?;
    let fb: Vec<FileEntry> = crate::store::read_json(b_files)?;
    let d = tree::compare(&fa, &fb, &|_| false, true);
    let mut found: Vec<String> = d
        .modified
        .iter()
        .map(|m| format!("{} ({})", m.path, m.changes.join(", ")))
        .collect();
    found.extend(
        d.added
            .iter()
            .map(|p| format!("{p} (only in the second build)")),
    );
    found.extend(
        d.removed
            .iter()
            .map(|p| format!("{p} (only in the first build)")),
    );
    found.sort();
    if !found.is_empty() {
        return Ok(name_differences(&found));
    }
    let ra = scratch.join("a.raw");
    let rb = scratch.join("b.raw");
    for (disk, raw) in [(a, &ra), (b, &rb)] {
        Cmd::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(disk)
            .arg(raw)
            .run()?;
    }
    let Some(offset) = first_differing_byte(&ra, &rb)? else {
        return Ok(
            "the file lists and the raw disks are identical: only the qcow2 container differs"
                .to_owned(),
        );
    };
    let place = locate(&ra, offset)?;
    for raw in [&ra, &rb] {
        std::fs::remove_file(raw).with_context(|| format!("removing {}", raw.display()))?;
    }
    Ok(format!(
        "the file lists are identical; the disks first differ at byte {offset}: {place}"
    ))
}

/// The paths that differ, the first few by name: enough to start from
/// without burying the summary under a long list.
fn name_differences(found: &[String]) -> String {
    const NAMED: usize = 5;
    let named = found[..found.len().min(NAMED)].join(", ");
    match found.len() {
        1 => named,
        n if n <= NAMED => format!("{named} ({n} paths differ)"),
        n => format!("{named}, … ({n} paths differ in all)"),
    }
}

pub fn first_differing_byte(a: &Path, b: &Path) -> Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let open =
        |p: &Path| std::fs::File::open(p).with_context(|| format!("opening {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).with_context(|| format!("reading {}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).with_context(|| format!("reading {}", b.display()))?;
        if let Some(i) = ba[..na.min(nb)]
            .iter()
            .zip(&bb[..na.min(nb)])
            .position(|(x, y)| x != y)
        {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + na.min(nb) as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += na as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Name the place of a byte in a kiln disk.
fn locate(raw: &Path, offset: u64) -> Result<String> {
    for p in crate::disk::partitions(raw)? {
        let (start, end) = (p.start, p.start + p.size);
        if !(start..end).contains(&offset) {
            continue;
        }
        let name = p.name.as_str();
        if name != crate::disk::ROOT_LABEL {
            return Ok(format!("partition `{name}`, byte {} of it", offset - start));
        }
        let block = (offset - start) / 4096;
        let fs = format!("{}?offset={start}", raw.display());
        let icheck = Cmd::new("debugfs")
            .arg("-R")
            .arg(format!("icheck {block}"))
            .arg(&fs)
            .output()?
            .stdout_str();
        let inode = icheck
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|i| i.parse::<u64>().ok());
        let Some(inode) = inode else {
            return Ok(format!("root filesystem block {block}, which no file owns (filesystem metadata: inode table, bitmap, directory index or journal)"));
        };
        let ncheck = Cmd::new("debugfs")
            .arg("-R")
            .arg(format!("ncheck {inode}"))
            .arg(&fs)
            .output()?
            .stdout_str();
        let path = ncheck
            .lines()
            .nth(1)
            .and_then(|l| l.split_once(char::is_whitespace))
            .map(|(_, p)| p.trim().to_owned());
        return Ok(format!(
            "root filesystem block {block}, data of inode {inode} ({})",
            path.as_deref().unwrap_or("no path")
        ));
    }
    Ok("outside every partition (the GPT)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_five_differences() {
        let paths =
            |n: usize| -> Vec<String> { (0..n).map(|i| format!("/p{i} (content)")).collect() };
        assert_eq!(name_differences(&paths(1)), "/p0 (content)");
        assert_eq!(
            name_differences(&paths(3)),
            "/p0 (content), /p1 (content), /p2 (content) (3 paths differ)"
        );
        assert_eq!(
            name_differences(&paths(7)),
            "/p0 (content), /p1 (content), /p2 (content), /p3 (content), /p4 (content), … (7 paths differ in all)"
        );
    }

    #[test]
    fn finds_the_first_differing_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![7u8; 3 << 20];
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        assert_eq!(first_differing_byte(&a, &b).unwrap(), None);
        data[(2 << 20) + 5] = 8;
        std::fs::write(&b, &data).unwrap();
        assert_eq!(first_differing_byte(&a, &b).unwrap(), Some((2 << 20) + 5));
        std::fs::write(&b, &data[..100]).unwrap();
        assert_eq!(first_differing_byte(&a, &b).unwrap(), Some(100));
    }
}
