//! `out/NAME.provenance.intoto.jsonl`: the provenance statement, signed.
//!
//! One DSSE envelope per line (the `.intoto.jsonl` convention of
//! slsa-github-generator); kiln writes one. Its payload is exactly the bytes
//! of `out/NAME.provenance.json`, its type `application/vnd.in-toto+json`,
//! its keyid the signing key's name. The statement's subjects are the disk
//! and the manifest, so a good signature vouches for both, and the
//! manifest's file list extends that to every file of the image.
//!
//! The envelope is as reproducible as the statement: the records of a
//! cached image do not change from run to run, and Ed25519 signatures are
//! deterministic, so a rebuild with the same key writes the same bytes.
//! A build without a key removes the envelope of an earlier build, which
//! would no longer match (the manifest is rewritten).
//!
//! [`check`] is `kiln verify --trusted-key`: offline, it needs the disk,
//! the manifest, the envelope and the public keys the verifier trusts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::manifest::Manifest;
use super::provenance::{manifest_subject, PREDICATE_TYPE, STATEMENT_TYPE};
use crate::plan::key::file_digest;
use crate::sign::dsse::{Envelope, IN_TOTO_PAYLOAD};
use crate::sign::key::{PublicKey, SigningKey};

const SUFFIX: &str = "provenance.intoto.jsonl";

/// `out/NAME.qcow2` or `out/NAME.manifest.json` → `out/NAME.provenance.intoto.jsonl`.
pub fn path_for(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".manifest.json")
        .or_else(|| name.rsplit_once('.').map(|(s, _)| s))
        .unwrap_or(&name);
    image.with_file_name(format!("{stem}.{SUFFIX}"))
}

/// Sign `statement` (the provenance file's bytes) and publish the envelope.
pub fn write(path: &Path, statement: &[u8], key: &SigningKey) -> Result<()> {
    let envelope = Envelope::sign(IN_TOTO_PAYLOAD, statement, key);
    crate::files::publish(path, envelope.to_line().as_bytes())
        .context("writing the signed provenance")
}

/// Remove the envelope an earlier, signed build left; whether there was one.
pub fn remove_stale(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
}

/// The outcome of checking a signature: who signed (names of trusted keys
/// with a good signature) and each thing that failed, one line each.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub file: String,
    pub signed_by: Vec<String>,
    pub failures: Vec<String>,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn text(&self) -> String {
        if self.ok() {
            return format!(
                "signature: good, by {} ({})\n",
                self.signed_by.join(", "),
                self.file
            );
        }
        self.failures.iter().map(|f| format!("{f}\n")).collect()
    }
}

/// Check the envelope beside `disk`: a trusted key signed it, it is an
/// in-toto SLSA provenance statement, and its subjects are this disk and
/// this manifest. Failures are in the result; `Err` is for kiln's own
/// trouble (a disk it cannot read).
pub fn check(
    disk: &Path,
    m: &Manifest,
    manifest_path: &Path,
    trusted: &[PublicKey],
) -> Result<Check> {
    let path = path_for(disk);
    let mut check = Check {
        file: path.display().to_string(),
        signed_by: Vec::new(),
        failures: Vec::new(),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            check
                .failures
                .push(format!("no signature file: {}", path.display()));
            return Ok(check);
        }
        Err(e) => {
            check
                .failures
                .push(format!("envelope: cannot read {}: {e}", path.display()));
            return Ok(check);
        }
    };
    let mut envelopes = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match Envelope::parse(line) {
            Ok(e) => envelopes.push(e),
            Err(why) => check
                .failures
                .push(format!("envelope: line {} {why}", i + 1)),
        }
    }
    if envelopes.is_empty() && check.failures.is_empty() {
        check
            .failures
            .push(format!("envelope: {} holds no envelope", path.display()));
    }
    // The first envelope a trusted key signed is the one that counts.
    let mut claimed = Vec::new();
    let mut signed = None;
    for envelope in &envelopes {
        claimed.extend(envelope.keyids().into_iter().map(str::to_owned));
        match envelope.signed_by(trusted) {
            Ok(keys) if !keys.is_empty() => {
                signed = Some((envelope, keys));
                break;
            }
            Ok(_) => {}
            Err(why) => check.failures.push(format!("envelope: {why}")),
        }
    }
    let Some((envelope, keys)) = signed else {
        if !envelopes.is_empty() {
            check.failures.push(format!(
                "signature: not signed by a trusted key (it claims {}; trusted: {})",
                names(claimed.iter().map(String::as_str)),
                names(trusted.iter().map(|k| k.name.as_str()))
            ));
        }
        return Ok(check);
    };
    check.signed_by = keys.iter().map(|k| k.name.clone()).collect();
    // A signature from an envelope with problems on other lines still counts.
    check.failures.clear();
    if envelope.payload_type != IN_TOTO_PAYLOAD {
        check.failures.push(format!(
            "payloadType: `{}`, not `{IN_TOTO_PAYLOAD}`",
            envelope.payload_type
        ));
        return Ok(check);
    }
    let statement: Value = match envelope
        .payload()
        .and_then(|p| serde_json::from_slice(&p).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(why) => {
            check
                .failures
                .push(format!("statement: the signed payload is not JSON: {why}"));
            return Ok(check);
        }
    };
    for (field, want) in [("_type", STATEMENT_TYPE), ("predicateType", PREDICATE_TYPE)] {
        let got = statement[field].as_str().unwrap_or("(none)");
        if got != want {
            check
                .failures
                .push(format!("{field}: `{got}`, not `{want}`"));
        }
    }
    let disk_sha256 = file_digest(disk).with_context(|| format!("hashing {}", disk.display()))?;
    let manifest_sha256 = file_digest(manifest_path)
        .with_context(|| format!("hashing {}", manifest_path.display()))?;
    let mut subjects = vec![
        ("disk", m.image.file.clone(), disk_sha256),
        ("manifest", manifest_subject(m), manifest_sha256),
    ];
    // The other formats are checked when they are here: a VMDK need not
    // travel with the qcow2 it was made from.
    for o in &m.outputs {
        let file = manifest_path.with_file_name(&o.file);
        if file.is_file() {
            let sha = file_digest(&file).with_context(|| format!("hashing {}", file.display()))?;
            subjects.push(("output", o.file.clone(), sha));
        }
    }
    for (what, name, actual) in subjects {
        match subject_digest(&statement, &name) {
            None => check.failures.push(format!(
                "subject: the signed statement names no {what} `{name}`"
            )),
            Some(signed) if signed != actual => check.failures.push(format!(
                "subject: {what} digest differs from the signed one{}",
                if what == "output" {
                    format!(" ({name})")
                } else {
                    String::new()
                }
            )),
            Some(_) => {}
        }
    }
    Ok(check)
}

fn subject_digest<'a>(statement: &'a Value, name: &str) -> Option<&'a str> {
    statement["subject"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)?["digest"]["sha256"]
        .as_str()
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names
        .map(|n| if n.is_empty() { "no keyid" } else { n })
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// What `kiln inspect` says about a signature, without trusted keys: who
/// the envelope claims signed it, and whether it is about this disk.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub file: String,
    pub present: bool,
    /// The keyids: claimed, not checked (`kiln verify --trusted-key` checks).
    pub keyids: Vec<String>,
    /// Whether the signed statement's disk subject has this disk's sha256.
    pub for_this_disk: Option<bool>,
    pub problem: Option<String>,
}

pub fn claim(image: &Path, disk_file: &str, disk_sha256: &str) -> Claim {
    let path = path_for(image);
    let mut claim = Claim {
        file: path.display().to_string(),
        present: path.is_file(),
        keyids: Vec::new(),
        for_this_disk: None,
        problem: None,
    };
    if !claim.present {
        return claim;
    }
    let envelope = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| Envelope::parse(t.lines().next().unwrap_or("")));
    let statement = envelope.as_ref().map_err(Clone::clone).and_then(|e| {
        let payload = e.payload()?;
        serde_json::from_slice::<Value>(&payload).map_err(|e| e.to_string())
    });
    match (envelope, statement) {
        (Ok(e), Ok(s)) => {
            claim.keyids = e.keyids().into_iter().map(str::to_owned).collect();
            claim.for_this_disk = Some(subject_digest(&s, disk_file) == Some(disk_sha256));
        }
        (Err(why), _) | (_, Err(why)) => claim.problem = Some(why),
    }
    claim
}

impl Claim {
    pub fn text(&self) -> String {
        if !self.present {
            return format!("no ({} does not exist)", self.file);
        }
        if let Some(why) = &self.problem {
            return format!("{} is damaged: {why}", self.file);
        }
        let by = names(self.keyids.iter().map(String::as_str));
        match self.for_this_disk {
            Some(false) => format!(
                "{} names key {by} but signs another disk (an older build?)",
                self.file
            ),
            _ => format!(
                "by key {by} ({}; a claim until `kiln verify --trusted-key KEY.pub` checks it)",
                self.file
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_lives_beside_the_disk() {
        for (given, want) in [
            ("out/web.qcow2", "out/web.provenance.intoto.jsonl"),
            ("out/web.raw", "out/web.provenance.intoto.jsonl"),
            ("out/web.manifest.json", "out/web.provenance.intoto.jsonl"),
            ("web", "web.provenance.intoto.jsonl"),
        ] {
            assert_eq!(path_for(Path::new(given)), Path::new(want), "{given}");
        }
    }

    #[test]
    fn subjects_are_found_by_name() {
        let s = serde_json::json!({ "subject": [
            { "name": "web.qcow2", "digest": { "sha256": "aa" } },
            { "name": "web.manifest.json", "digest": { "sha256": "bb" } },
        ]});
        assert_eq!(subject_digest(&s, "web.qcow2"), Some("aa"));
        assert_eq!(subject_digest(&s, "web.manifest.json"), Some("bb"));
        assert_eq!(subject_digest(&s, "x"), None);
        assert_eq!(subject_digest(&serde_json::json!({}), "x"), None);
    }
}
