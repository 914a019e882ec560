//! The .deb cache: every package a lock pins, stored under its sha256, so a
//! locked build works after the archive has moved on (Debian keeps only the
//! newest version of each package in a suite), and without the archive at
//! all once everything is cached.
//!
//! ```text
//! <store>/debs-v1/<sha256>.deb
//! ```
//!
//! A locked step is served only its pinned .debs, from a flat repository
//! made on the fly (`apt-ftparchive packages`), so apt can install nothing
//! else and no other version. Every .deb is checked against its pinned
//! sha256 on the way in and again when it is served.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Store;
use crate::cmd::Cmd;
use crate::error::BadInput;
use crate::lock::LockedPackage;
use crate::plan::key::file_digest;
use crate::plan::sources::Mirrors;

const DEBS: &str = "debs-v1";

/// apt's file name for a package: the epoch's colon is escaped.
pub fn deb_file_name(name: &str, version: &str, arch: &str) -> String {
    format!("{name}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// Where a package version lives in the archive, from apt's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEntry {
    pub path: String,
    pub sha256: String,
    /// `main` or `security`.
    pub archive: String,
}

impl Store {
    fn debs_dir(&self) -> PathBuf {
        self.root().join(DEBS)
    }

    pub fn deb_path(&self, sha256: &str) -> PathBuf {
        self.debs_dir().join(format!("{sha256}.deb"))
    }

    /// Copy a .deb into the cache; returns its sha256.
    pub fn import_deb(&self, file: &Path) -> Result<String> {
        let sha = file_digest(file).with_context(|| format!("hashing {}", file.display()))?;
        let dest = self.deb_path(&sha);
        if !dest.exists() {
            std::fs::create_dir_all(self.debs_dir())
                .with_context(|| format!("creating {}", self.debs_dir().display()))?;
            let staging = self.staging()?;
            let tmp = staging.path().join(format!("{sha}.deb"));
            // The .debs apt left are in the store already: a hard link is
            // enough (and the cache entry survives apt removing its copy).
            if std::fs::hard_link(file, &tmp).is_err() {
                std::fs::copy(file, &tmp)
                    .with_context(|| format!("copying {} into the .deb cache", file.display()))?;
            }
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming into {}", dest.display()))?;
            self.remove_staging(staging)?;
        }
        Ok(sha)
    }

    /// Put every pinned .deb into `repo` (fetching what the cache lacks)
    /// and index it, so apt can be pointed at `file:REPO ./`.
    ///
    /// The repository's Release file names `suite`, because mmdebstrap
    /// picks the essential set by suite.
    pub fn serve_locked(
        &self,
        pkgs: &[LockedPackage],
        mirrors: Option<&Mirrors>,
        suite: &str,
        repo: &Path,
        lock_path: &Path,
        step: &crate::plan::StepId,
    ) -> Result<()> {
        std::fs::create_dir_all(repo).with_context(|| format!("creating {}", repo.display()))?;
        // Everything the cache lacks, in one download (apt fetches in
        // parallel); if that fails, one by one below, to name what failed.
        let missing: Vec<&LockedPackage> = pkgs
            .iter()
            .filter(|p| !self.deb_path(&p.sha256).exists())
            .collect();
        if missing.len() > 1 && self.fetch_all(&missing, mirrors).is_err() {
            crate::cmd::log_line(
                "the batch download failed; fetching the missing .debs one by one",
            );
        }
        let mut unavailable = Vec::new();
        for p in pkgs {
            let cached = self.deb_path(&p.sha256);
            if !cached.exists() {
                if let Err(e) = self.fetch_all(&[p], mirrors) {
                    unavailable.push(format!("{} {} ({e:#})", p.name, p.version));
                    continue;
                }
            }
            let actual =
                file_digest(&cached).with_context(|| format!("hashing {}", cached.display()))?;
            if actual != p.sha256 {
                bail!(
                    "{} {} does not match its lock: the cached {} has sha256 {actual}, the lock says {}; \
                     remove the damaged file (or run `kiln cache verify`) and build again",
                    p.name,
                    p.version,
                    cached.display(),
                    p.sha256
                );
            }
            let target = repo.join(deb_file_name(&p.name, &p.version, &p.arch));
            if std::fs::hard_link(&cached, &target).is_err() {
                std::fs::copy(&cached, &target).with_context(|| {
                    format!("copying {} to {}", cached.display(), target.display())
                })?;
            }
        }
        if !unavailable.is_empty() {
            return Err(BadInput::new(
                lock_path,
                format!("steps.\"{step}\""),
                format!(
                    "{} locked package(s) are neither in the .deb cache nor in the archive:\n    {}",
                    unavailable.len(),
                    unavailable.join("\n    ")
                ),
                format!("re-resolve against today's archive with `kiln lock --update {}`", step.layer()),
            )
            .into());
        }
        let out = Cmd::new("apt-ftparchive")
            .args(["packages", "."])
            .current_dir(repo)
            .output()?;
        std::fs::write(repo.join("Packages"), out.stdout)
            .with_context(|| format!("writing {}/Packages", repo.display()))?;
        let out = Cmd::new("apt-ftparchive")
            .arg("-o")
            .arg(format!("APT::FTPArchive::Release::Suite={suite}"))
            .arg("-o")
            .arg(format!("APT::FTPArchive::Release::Codename={suite}"))
            .args(["release", "."])
            .current_dir(repo)
            .output()?;
        std::fs::write(repo.join("Release"), out.stdout)
            .with_context(|| format!("writing {}/Release", repo.display()))
    }

    /// Download several pinned .debs with one apt-helper, each verified by
    /// apt against its sha256; each that arrived enters the cache.
    fn fetch_all(&self, pkgs: &[&LockedPackage], mirrors: Option<&Mirrors>) -> Result<()> {
        let mirrors = mirrors.context("no archive is configured")?;
        std::fs::create_dir_all(self.debs_dir())
            .with_context(|| format!("creating {}", self.debs_dir().display()))?;
        // Downloads land in a staging dir of their own, removed on every
        // path (dropped on an error or Ctrl-C, and by the next run after a
        // kill): whatever apt leaves of a refused file (a partial download,
        // a `.FAILED` copy) never reaches debs-v1/.
        let staging = self.staging()?;
        let downloads: Vec<(&LockedPackage, PathBuf)> = pkgs
            .iter()
            .map(|p| (*p, staging.path().join(format!("{}.deb", p.sha256))))
            .collect();
        let mut cmd = Cmd::new("/usr/lib/apt/apt-helper")
            .args(["-o", "Acquire::Retries=2", "download-file"])
            .timeout(std::time::Duration::from_secs(1800));
        for (p, file) in &downloads {
            let base = if p.archive == "security" {
                &mirrors.security
            } else {
                &mirrors.main
            };
            cmd = cmd
                .arg(format!("{base}/{}", p.path))
                .arg(file)
                .arg(format!("SHA256:{}", p.sha256));
        }
        let result = cmd.run();
        let mut kept = Ok(());
        for (p, file) in downloads {
            // apt checked the digest of what it kept; a failed batch may
            // still leave a partial file, which is checked here too.
            if file.is_file() && (result.is_ok() || file_digest(&file).is_ok_and(|d| d == p.sha256))
            {
                if let Err(e) = std::fs::rename(&file, self.deb_path(&p.sha256)) {
                    kept = Err(anyhow::Error::new(e).context(format!(
                        "renaming {} to {}",
                        file.display(),
                        self.deb_path(&p.sha256).display()
                    )));
                    break;
                }
            }
        }
        crate::cmd::keep_first_error(result.and(kept), self.remove_staging(staging))
    }
}

/// Find where each wanted `(name, version, arch)` lives, from the Packages
/// files in apt list directories.
pub fn pool_entries(
    lists: &[PathBuf],
    wanted: &[(String, String, String)],
) -> Result<BTreeMap<(String, String, String), PoolEntry>> {
    let names: std::collections::BTreeSet<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    let mut found = BTreeMap::new();
    for dir in lists {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if !file_name.ends_with("_Packages") {
                continue;
            }
            let archive = if suite_of(&file_name).is_some_and(|s| s.ends_with("-security")) {
                "security"
            } else {
                "main"
            };
            let text = std::fs::read_to_string(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            for stanza in text.split("\n\n") {
                let Some(name) = stanza
                    .strip_prefix("Package: ")
                    .and_then(|r| r.lines().next())
                else {
                    continue;
                };
                if !names.contains(name) {
                    continue;
                }
                let field = |f: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(f))
                        .map(str::trim)
                        .map(str::to_owned)
                };
                let (Some(version), Some(arch), Some(path), Some(sha256)) = (
                    field("Version:"),
                    field("Architecture:"),
                    field("Filename:"),
                    field("SHA256:"),
                ) else {
                    continue;
                };
                let key = (name.to_owned(), version, arch);
                if wanted.contains(&key) {
                    found.entry(key).or_insert(PoolEntry {
                        path,
                        sha256,
                        archive: archive.to_owned(),
                    });
                }
            }
        }
    }
    Ok(found)
}

/// `trixie-security` from `host_debian-security_dists_trixie-security_main_binary-amd64_Packages`.
fn suite_of(list_file: &str) -> Option<&str> {
    let rest = list_file.split("_dists_").nth(1)?;
    rest.split('_').next()
}

/// `suite date` of each Release file in apt list directories.
pub fn archive_state(lists: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for dir in lists {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.ends_with("_InRelease") || name.ends_with("_Release")) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |f: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(f))
                    .map(str::trim)
                    .unwrap_or("?")
                    .to_owned()
            };
            out.push(format!("{} {}", field("Codename:"), field("Date:")));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_escape_epochs() {
        assert_eq!(
            deb_file_name("libbpf1", "1:1.5.0-3", "amd64"),
            "libbpf1_1%3a1.5.0-3_amd64.deb"
        );
    }

    #[test]
    fn finds_pool_paths_and_tells_security_apart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("m_debian_dists_trixie_main_binary-amd64_Packages"),
            "Package: curl\nVersion: 8.1\nArchitecture: amd64\nFilename: pool/main/c/curl/curl_8.1_amd64.deb\nSHA256: aa\n\n\
             Package: zsh\nVersion: 5\nArchitecture: amd64\nFilename: pool/main/z/zsh.deb\nSHA256: bb\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("m_debian-security_dists_trixie-security_main_binary-amd64_Packages"),
            "Package: curl\nVersion: 8.2\nArchitecture: amd64\nFilename: pool/updates/main/c/curl/curl_8.2_amd64.deb\nSHA256: cc\n",
        )
        .unwrap();
        let want = vec![
            ("curl".to_string(), "8.2".to_string(), "amd64".to_string()),
            ("curl".into(), "8.1".into(), "amd64".into()),
        ];
        let found = pool_entries(&[dir.path().to_owned()], &want).unwrap();
        assert_eq!(found[&want[0]].archive, "security");
        assert_eq!(found[&want[0]].sha256, "cc");
        assert_eq!(found[&want[1]].archive, "main");
        assert_eq!(found[&want[1]].path, "pool/main/c/curl/curl_8.1_amd64.deb");
        assert_eq!(found.len(), 2);
    }
}
