//! `out/NAME.provenance.json`: an in-toto Statement v1 whose predicate is
//! SLSA provenance v1 (<https://slsa.dev/spec/v1.0/provenance>).
//!
//! The subjects are the exported disk, its manifest, and each deployable
//! file of `[image] formats` (file name and sha256 of each): a signature on
//! the statement then vouches for the disk, for every other format of it,
//! and, through the manifest, for every file in it. The resolved
//! dependencies are the recipe files, the lock, every copied file, and every
//! installed Debian package as a purl, with the .deb's sha256 from the lock's
//! pins (a package no pin names, e.g. one a `run` step installed, has none).
//! This file is unsigned; with a signing key the same bytes are also
//! written signed (`signed`). Nothing in it changes from one run to the
//! next for the same image: `runDetails` holds the image's assembly, which
//! a cached image keeps.

use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};

use super::manifest::{digested, Manifest};
use super::BuildFacts;
use crate::plan::Action;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
const BUILD_TYPE: &str = "https://kiln.invalid/build/v1";

/// An SLSA ResourceDescriptor.
#[derive(Debug, Clone, Serialize)]
pub struct Material {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Digest {
    pub sha256: String,
}

pub fn materials(facts: &BuildFacts) -> Result<Vec<Material>> {
    let plan = facts.plan;
    let mut out = Vec::new();
    for src in &plan.recipe.sources {
        let d = digested(src)?;
        out.push(Material {
            name: format!("recipe:{}", d.path),
            uri: None,
            digest: Some(Digest { sha256: d.sha256 }),
        });
    }
    if let Some(lock) = facts.lock {
        let d = digested(lock)?;
        out.push(Material {
            name: format!("lock:{}", d.path),
            uri: None,
            digest: Some(Digest { sha256: d.sha256 }),
        });
    }
    for step in &plan.steps {
        if let Action::Files { files, .. } = &step.action {
            for (spec, input) in files.iter().zip(&step.inputs.files) {
                out.push(Material {
                    name: format!("file:{} -> {}", spec.src.display(), spec.dest),
                    uri: None,
                    digest: Some(Digest {
                        sha256: input.sha256.clone(),
                    }),
                });
            }
        }
    }
    let top = plan.steps.last().expect("a plan always has a base step");
    let packages = facts.store.layer_entry(&top.key)?.packages;
    let distro = packages
        .iter()
        .find(|p| p.name == "base-files")
        .and_then(|p| p.version.split('.').next().map(|m| format!("debian-{m}")))
        .unwrap_or_else(|| "debian".to_owned());
    // The pins already hold every .deb's sha256: no need to hash .debs again.
    let pinned: std::collections::BTreeMap<(&str, &str, &str), &str> = plan
        .steps
        .iter()
        .filter_map(|s| s.lock.as_ref())
        .flat_map(|l| &l.packages)
        .map(|p| {
            (
                (p.name.as_str(), p.version.as_str(), p.arch.as_str()),
                p.sha256.as_str(),
            )
        })
        .collect();
    for p in &packages {
        let digest = pinned
            .get(&(p.name.as_str(), p.version.as_str(), p.arch.as_str()))
            .map(|sha| Digest {
                sha256: sha.to_string(),
            });
        out.push(Material {
            name: format!("deb:{}_{}_{}", p.name, p.version, p.arch),
            uri: Some(super::sbom::purl(p, &distro)),
            digest,
        });
    }
    Ok(out)
}

/// The manifest's subject name: `NAME.manifest.json`, as `write_all` names it.
pub fn manifest_subject(m: &Manifest) -> String {
    format!("{}.manifest.json", m.name)
}

/// The disk, the manifest, then each deployable file of `[image] formats`
/// (`web.vmdk`, …), so that a verifier holding only the VMDK can check it
/// against the signed statement.
fn subjects(m: &Manifest, manifest_sha256: &str) -> Vec<Value> {
    let mut subjects = vec![
        json!({ "name": m.image.file, "digest": { "sha256": m.image.sha256 } }),
        json!({ "name": manifest_subject(m), "digest": { "sha256": manifest_sha256 } }),
    ];
    subjects.extend(
        m.outputs
            .iter()
            .map(|o| json!({ "name": o.file, "digest": { "sha256": o.sha256 } })),
    );
    subjects
}

/// The statement about the disk `m` describes and the manifest itself,
/// whose sha256 is `manifest_sha256`.
pub fn statement(m: &Manifest, manifest_sha256: &str, materials: &[Material]) -> Value {
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subjects(m, manifest_sha256),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": m.recipe.first().map(|r| r.path.clone()),
                    "source_date_epoch": m.source_date_epoch,
                },
                "internalParameters": {
                    "kiln_version": m.kiln_version,
                    "image_key": m.image.key.hex(),
                    "steps": m.steps.iter().map(|s| json!({ "id": s.id, "key": s.key.hex() })).collect::<Vec<_>>(),
                },
                "resolvedDependencies": materials,
            },
            "runDetails": {
                "builder": { "id": format!("kiln-{}@{}", m.kiln_version, m.built.host) },
                "metadata": {
                    "invocationId": format!("{}:{}", m.image.key.short(), m.built.started),
                    "startedOn": m.built.started,
                    "finishedOn": m.built.finished,
                },
            },
        },
    })
}
