//! `out/NAME.manifest.json`: everything known about one built image.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::tree::FileEntry;
use super::BuildFacts;
use crate::cmd::Cmd;
use crate::plan::key::file_digest;
use crate::plan::Key;
use crate::store::{BuiltBy, ImageEntry, Package};

pub const SCHEMA: &str = "kiln-manifest-v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub kiln_version: String,
    /// The image name (`[image] name`).
    pub name: String,
    /// The recipe asked for, then every file it extends.
    pub recipe: Vec<Digested>,
    pub lock: Option<Digested>,
    pub source_date_epoch: u64,
    pub steps: Vec<StepRecord>,
    pub image: ImageRecord,
    /// The other deployable files made from the image (`[image] formats`).
    #[serde(default)]
    pub outputs: Vec<crate::export::Output>,
    pub packages: Vec<Package>,
    pub built: Built,
    /// The recipe folder's git state; null when it is not in a git checkout
    /// (or git is not installed).
    pub git: Option<Git>,
    /// Mount points of the recipe's volumes.
    pub volumes: Vec<String>,
    /// Every path of the root filesystem; null for an image assembled
    /// before kiln recorded files (rebuild it with --refresh).
    pub files: Option<Vec<FileEntry>>,
    /// The UKI's Secure Boot signature: the digest of the UKI before
    /// signing (reproducible), of the signed one, and the certificate.
    /// Absent for an unsigned image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<crate::assemble::secure_boot::SignedUki>,
    /// A sealed image's root hash (and its partitions' UUIDs, which are
    /// halves of it). Absent for an image that is not sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<crate::assemble::verity::Verity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digested {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// `base`, `security/upgrade`, `app/files`, …
    pub id: String,
    pub layer: String,
    pub key: Key,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub key: Key,
    /// The exported file's name (`web.qcow2`).
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub format: String,
    pub kernel: String,
}

/// Who assembled the image, where, and when (from the image's entry in the
/// store, so a run that finds the image cached reports the same).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub user: String,
    pub sudo_user: Option<String>,
    pub host: String,
    pub started: String,
    pub finished: String,
}

impl Built {
    /// A run of `by`, between two Unix times.
    pub fn of_run(by: BuiltBy, started: u64, finished: u64) -> Built {
        let BuiltBy {
            user,
            sudo_user,
            host,
        } = by;
        Built {
            user,
            sudo_user,
            host,
            started: super::rfc3339(started),
            finished: super::rfc3339(finished),
        }
    }

    /// The assembly of `image`. An entry made before kiln recorded who
    /// assembled it is credited to this run's user and host.
    fn of_image(image: &ImageEntry) -> Built {
        let by = image.built_by.clone().unwrap_or_else(super::builder);
        let seconds = image.seconds.max(0.0).ceil() as u64;
        Built::of_run(by, image.created.saturating_sub(seconds), image.created)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Git {
    pub commit: String,
    pub dirty: bool,
}

pub fn digested(path: &Path) -> Result<Digested> {
    Ok(Digested {
        path: path.display().to_string(),
        sha256: file_digest(path).with_context(|| format!("hashing {}", path.display()))?,
    })
}

pub fn make(facts: &BuildFacts) -> Result<Manifest> {
    let plan = facts.plan;
    let top = plan.steps.last().expect("a plan always has a base step");
    let packages = facts.store.layer_entry(&top.key)?.packages;
    let files_path = facts
        .store
        .image_dir(&facts.image.key)
        .join(crate::disk::FILES_JSON);
    let files = if files_path.is_file() {
        Some(crate::store::read_json::<Vec<FileEntry>>(&files_path)?)
    } else {
        crate::cmd::log_line(&format!("warning: {} is missing (image assembled by an older kiln): the manifest has no file list", files_path.display()));
        None
    };
    let folder = plan
        .recipe
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(Manifest {
        schema: SCHEMA.to_owned(),
        kiln_version: env!("CARGO_PKG_VERSION").to_owned(),
        name: plan.recipe.image.name.clone(),
        recipe: plan
            .recipe
            .sources
            .iter()
            .map(|p| digested(p))
            .collect::<Result<_>>()?,
        lock: facts.lock.map(digested).transpose()?,
        source_date_epoch: facts.source_date_epoch,
        steps: plan
            .steps
            .iter()
            .map(|s| StepRecord {
                id: s.id().into(),
                layer: s.layer.clone(),
                key: s.key,
            })
            .collect(),
        image: ImageRecord {
            key: facts.image.key,
            file: facts
                .exported
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: facts.image.sha256.clone(),
            bytes: std::fs::metadata(facts.exported)
                .with_context(|| format!("reading {}", facts.exported.display()))?
                .len(),
            format: plan.image.inputs.format.clone(),
            kernel: facts.image.kernel.clone(),
        },
        outputs: facts.outputs.to_vec(),
        packages,
        built: Built::of_image(facts.image),
        git: git_state(folder),
        volumes: plan
            .recipe
            .volumes
            .iter()
            .map(|v| v.mount.clone())
            .collect(),
        files,
        secure_boot: facts.image.secure_boot.clone(),
        verity: facts.image.verity.clone(),
    })
}

/// The commit of the git checkout holding `dir`, and whether anything under
/// `dir` differs from it. `None` when git is missing or `dir` is not in a
/// checkout: the manifest then says null, which is the honest answer.
pub fn git_state(dir: &Path) -> Option<Git> {
    let head = Cmd::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    let status = Cmd::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--", "."])
        .output()
        .ok()?;
    Some(Git {
        commit: head.stdout_str().trim().to_owned(),
        dirty: !status.stdout_str().trim().is_empty(),
    })
}

/// The manifest of `image`: `out/NAME.qcow2` → `out/NAME.manifest.json`, or
/// a manifest itself.
pub fn path_for(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".json") {
        return image.to_owned();
    }
    let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
    image.with_file_name(format!("{stem}.manifest.json"))
}

pub fn read(path: &Path) -> Result<Manifest> {
    if !path.is_file() {
        return Err(crate::error::BadInput::file(
            path,
            "does not exist: kiln writes NAME.manifest.json beside every image it builds",
            "name an image that `kiln build` wrote (e.g. out/web.qcow2), with its manifest beside it",
        )
        .into());
    }
    let m: Manifest = crate::store::read_json(path)?;
    if m.schema != SCHEMA {
        anyhow::bail!(
            "{} is a `{}` document, not a kiln manifest ({SCHEMA})",
            path.display(),
            m.schema
        );
    }
    Ok(m)
}

/// A few lines a person reads to know what an image is.
pub fn summary(m: &Manifest) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<12}{v}\n"));
    line(
        &mut s,
        "image",
        format!(
            "{} ({}, {} bytes, kernel {})",
            m.image.file, m.image.format, m.image.bytes, m.image.kernel
        ),
    );
    line(&mut s, "sha256", m.image.sha256.clone());
    line(&mut s, "key", m.image.key.hex());
    line(
        &mut s,
        "recipe",
        m.recipe
            .iter()
            .map(|d| format!("{} ({})", d.path, &d.sha256[..12]))
            .collect::<Vec<_>>()
            .join(", "),
    );
    line(
        &mut s,
        "lock",
        m.lock.as_ref().map_or("none".to_owned(), |d| {
            format!("{} ({})", d.path, &d.sha256[..12])
        }),
    );
    let by = match &m.built.sudo_user {
        Some(u) => format!("{} (sudo from {u})", m.built.user),
        None => m.built.user.clone(),
    };
    line(
        &mut s,
        "built",
        format!(
            "{} by {by} on {} with kiln {}",
            m.built.finished, m.built.host, m.kiln_version
        ),
    );
    line(
        &mut s,
        "git",
        m.git
            .as_ref()
            .map_or("not in a git checkout".to_owned(), |g| {
                format!("{}{}", g.commit, if g.dirty { " (dirty)" } else { "" })
            }),
    );
    line(
        &mut s,
        "epoch",
        format!("SOURCE_DATE_EPOCH={}", m.source_date_epoch),
    );
    for step in &m.steps {
        line(
            &mut s,
            "step",
            format!("{:<24} {}", step.id, step.key.short()),
        );
    }
    line(&mut s, "packages", m.packages.len().to_string());
    match &m.files {
        Some(files) => {
            let bytes: u64 = files.iter().map(|f| f.size).sum();
            line(
                &mut s,
                "files",
                format!("{} paths, {} bytes in regular files", files.len(), bytes),
            );
        }
        None => line(
            &mut s,
            "files",
            "not recorded (image assembled by an older kiln)".to_owned(),
        ),
    }
    for o in &m.outputs {
        line(
            &mut s,
            "output",
            format!(
                "{} ({}, {} bytes, sha256 {})",
                o.file,
                o.format,
                o.bytes,
                &o.sha256[..12.min(o.sha256.len())]
            ),
        );
    }
    if !m.volumes.is_empty() {
        line(&mut s, "volumes", m.volumes.join(", "));
    }
    if let Some(sb) = &m.secure_boot {
        line(
            &mut s,
            "secure boot",
            format!(
                "UKI signed by certificate sha256 {} (unsigned UKI sha256 {})",
                sb.certificate_sha256, sb.unsigned_sha256
            ),
        );
    }
    if let Some(v) = &m.verity {
        line(
            &mut s,
            "sealed",
            format!("dm-verity root hash {} ({})", v.root_hash, v.options),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_path_from_image_or_manifest() {
        assert_eq!(
            path_for(Path::new("out/web.qcow2")),
            PathBuf::from("out/web.manifest.json")
        );
        assert_eq!(
            path_for(Path::new("out/web.manifest.json")),
            PathBuf::from("out/web.manifest.json")
        );
        assert_eq!(
            path_for(Path::new("web.raw")),
            PathBuf::from("web.manifest.json")
        );
    }
}
