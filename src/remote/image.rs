//! `kiln push IMAGE REF` and `kiln pull REF`: a built image and its
//! evidence as one OCI artifact, fetched by tag or digest and verified
//! before anything is written to `out/`.
//!
//! ```text
//! REPOSITORY:TAG (or @sha256:…)           image manifest
//! ├── artifactType                        application/vnd.kiln.image.v1
//! ├── config                              the empty descriptor {}
//! ├── layers, each titled (org.opencontainers.image.title) with its file name:
//! │   ├── NAME.qcow2 | NAME.raw           application/vnd.kiln.disk.qcow2 | .raw
//! │   ├── NAME.manifest.json              application/vnd.kiln.manifest.v1+json
//! │   ├── NAME.provenance.intoto.jsonl    application/vnd.dsse.envelope.v1+json (signed)
//! │   ├── NAME.provenance.json            application/vnd.in-toto+json
//! │   ├── NAME.spdx.json                  application/spdx+json
//! │   └── NAME.smoke.json                 application/vnd.kiln.smoke.v1+json (when smoked)
//! └── annotations                         org.opencontainers.image.title = NAME; with
//!                                         --signing-key the signed file list (below)
//! ```
//!
//! Trust comes from the signed provenance, as for `kiln verify
//! --trusted-key`: its envelope must verify against a trusted key, and its
//! statement's subjects are the disk's and the manifest's sha256, so a good
//! signature vouches for both. The provenance file must be the envelope's
//! payload. Every blob is checked against its digest while it streams in.
//! Only then are the files renamed into `out/` (from a staging dir in the
//! same folder, `.kiln-pull-*`, claimed as the store's staging dirs are so
//! that the next pull removes what a killed one left), the disk last.
//!
//! The SBOM and the smoke record are not subjects of the provenance (the
//! smoke record is written after it, by the smoke boot), so a registry
//! could swap them. `kiln push --signing-key` (or `KILN_SIGNING_KEY`)
//! therefore signs the artifact's file list, as the layer cache signs its
//! entries (see [`crate::remote`]): three more annotations on the manifest,
//!
//! ```text
//! dev.kiln.fingerprint   kiln-push-v1;NAME;<title>=<digest>:<size>;…  every layer, in order
//! dev.kiln.signature     base64 Ed25519 signature over the fingerprint
//! dev.kiln.keyid         the signing key's name (a hint)
//! ```
//!
//! A pull writes a file only when a trusted signature vouches for it: the
//! disk, its manifest and the provenance through the provenance's
//! signature; the SBOM and the smoke record only through a good signature
//! on the file list (recomputed from the layers, never read from the
//! annotation). Without one they are not fetched, and the pull says so.
//!
//! `kiln push --containerdisk REF` pushes something else: a KubeVirt
//! containerDisk, an ordinary OCI image (image manifest, image config,
//! one gzip layer holding `/disk/NAME.qcow2`, 107:107, 0440) that KubeVirt
//! and any container tool take as they are. Its blobs are the ones
//! `[image] formats = ["containerdisk"]` writes into
//! `out/NAME.containerdisk.tar` (see [`crate::export::oci`]), so the same
//! image gets the same digest either way. The layer is written once to a
//! scratch file beside the disk and streamed from there; the disk's
//! sha256, read on the way, must be the one its manifest records. It
//! carries no evidence: the signed provenance of the kiln artifact names
//! the qcow2's sha256, which is the file inside the layer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

use super::registry::{Client, Reference, MANIFEST_TYPE};
use super::{EMPTY, EMPTY_DIGEST, EMPTY_TYPE};
use crate::error::{BadInput, NotVerified};
use crate::sign::key::{PublicKey, SigningKey};

pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.image.v1";
const TITLE: &str = "org.opencontainers.image.title";

/// The files of an image artifact: suffix after `NAME.`, media type,
/// whether a push needs it.
const FILES: &[(&str, &str, bool)] = &[
    (
        "manifest.json",
        "application/vnd.kiln.manifest.v1+json",
        true,
    ),
    (
        "provenance.intoto.jsonl",
        "application/vnd.dsse.envelope.v1+json",
        true,
    ),
    ("provenance.json", "application/vnd.in-toto+json", false),
    ("spdx.json", "application/spdx+json", false),
    ("smoke.json", "application/vnd.kiln.smoke.v1+json", false),
];
const DISKS: &[(&str, &str)] = &[
    ("qcow2", "application/vnd.kiln.disk.qcow2"),
    ("raw", "application/vnd.kiln.disk.raw"),
];

/// `oci://HOST/REPO[:TAG|@sha256:…]` → the repository and what names the
/// manifest in it (`latest` when neither is given).
pub fn parse_ref(text: &str) -> Result<(Reference, String), String> {
    let (repo, target) = match text.rsplit_once('@') {
        Some((repo, digest)) => (repo.to_owned(), digest.to_owned()),
        None => {
            // A `:` after the last `/` is a tag (one before it is a port).
            let slash = text.rfind('/').unwrap_or(0);
            match text[slash..].rsplit_once(':') {
                Some((_, tag)) => (
                    text[..text.len() - tag.len() - 1].to_owned(),
                    tag.to_owned(),
                ),
                None => (text.to_owned(), "latest".to_owned()),
            }
        }
    };
    let reference = Reference::parse(&repo)?;
    let valid = if let Some(hex) = target.strip_prefix("sha256:") {
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    } else {
        !target.is_empty()
            && target.len() <= 128
            && !target.starts_with(['.', '-'])
            && target
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    };
    if !valid {
        return Err(format!(
            "`{target}` is neither a tag (up to 128 of A-Z a-z 0-9 _ . -) nor a sha256:<64 hex> digest"
        ));
    }
    Ok((reference, target))
}

/// The image's name and the files to push, from `out/NAME.qcow2`.
fn image_files(image: &Path) -> Result<(String, Vec<(PathBuf, &'static str)>)> {
    let ext = image.extension().and_then(|e| e.to_str()).unwrap_or("");
    let Some((_, disk_type)) = DISKS.iter().find(|(e, _)| *e == ext) else {
        return Err(BadInput::file(
            image,
            "not a kiln disk (NAME.qcow2 or NAME.raw)",
            "give the disk a build wrote, e.g. out/web.qcow2",
        )
        .into());
    };
    let name = image
        .file_stem()
        .and_then(|n| n.to_str())
        .context("a disk without a name")?
        .to_owned();
    if !image.is_file() {
        return Err(BadInput::file(image, "the disk does not exist", "build it first").into());
    }
    let mut files = vec![(image.to_owned(), *disk_type)];
    for (suffix, media, required) in FILES {
        let path = image.with_file_name(format!("{name}.{suffix}"));
        if path.is_file() {
            files.push((path, *media));
        } else if *required {
            return Err(BadInput::file(
                &path,
                "missing: an image is pushed with its manifest and signed provenance",
                "build it with --signing-key NAME.key (from `kiln key new NAME`)",
            )
            .into());
        }
    }
    Ok((name, files))
}

/// Push the image and its records, their list signed with `signing` when
/// given (see the module doc); returns the manifest's digest.
pub fn push(
    image: &Path,
    reference: Reference,
    tag: &str,
    signing: Option<&SigningKey>,
) -> Result<String> {
    let (name, files) = image_files(image)?;
    let client = Client::new(reference, true)?;
    client.put_blob_bytes(EMPTY_DIGEST, EMPTY)?;
    let mut layers = Vec::new();
    for (path, media) in &files {
        let digest = format!(
            "sha256:{}",
            crate::plan::key::file_digest(path)
                .with_context(|| format!("hashing {}", path.display()))?
        );
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        client.put_blob(&digest, path)?;
        let title = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        layers.push(json!({
            "mediaType": media,
            "digest": digest,
            "size": size,
            "annotations": { TITLE: title },
        }));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_TYPE,
            "digest": EMPTY_DIGEST,
            "size": EMPTY.len(),
            "data": crate::sign::b64(EMPTY),
        },
        "layers": layers,
        "annotations": annotations(&name, &layers, signing),
    }))
    .expect("a JSON value serialises");
    client.put_manifest(tag, &manifest)?;
    Ok(format!(
        "sha256:{}",
        crate::plan::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&manifest))
    ))
}

/// What the push signature signs: the image's name and every layer's
/// title, digest and size, in order. `None` when a layer lacks one.
fn files_fingerprint(name: &str, layers: &[serde_json::Value]) -> Option<String> {
    let mut text = format!("kiln-push-v1;{name}");
    for layer in layers {
        let title = layer["annotations"][TITLE].as_str()?;
        let digest = layer["digest"].as_str()?;
        let size = layer["size"].as_u64()?;
        text += &format!(";{title}={digest}:{size}");
    }
    Some(text)
}

/// The manifest's annotations: its title, and with a key the signed
/// fingerprint of its files.
fn annotations(
    name: &str,
    layers: &[serde_json::Value],
    signing: Option<&SigningKey>,
) -> serde_json::Value {
    let mut a = json!({ TITLE: name });
    if let Some(key) = signing {
        let fingerprint = files_fingerprint(name, layers).expect("every pushed layer is titled");
        a["dev.kiln.fingerprint"] = fingerprint.clone().into();
        a["dev.kiln.signature"] = crate::sign::b64(&key.sign(fingerprint.as_bytes())).into();
        a["dev.kiln.keyid"] = key.name.clone().into();
    }
    a
}

/// Who of `trusted` signed the file list of the manifest `m`, or why none
/// did (for the note on what was not written).
fn files_signer(
    m: &serde_json::Value,
    name: &str,
    trusted: &[PublicKey],
) -> Result<String, String> {
    let annotations = &m["annotations"];
    let Some(signature) = annotations["dev.kiln.signature"].as_str() else {
        return Err("the artifact's file list is not signed (pushed without --signing-key)".into());
    };
    let layers = m["layers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let fingerprint = files_fingerprint(name, layers)
        .ok_or_else(|| "a layer lacks a title, digest or size".to_owned())?;
    let sig = crate::sign::unb64(signature)
        .ok_or_else(|| "the file list's signature is not base64".to_owned())?;
    trusted
        .iter()
        .find(|t| t.verifies(fingerprint.as_bytes(), &sig))
        .map(|t| t.name.clone())
        .ok_or_else(|| {
            format!(
                "the file list's signature (key `{}`) does not verify against a trusted key",
                annotations["dev.kiln.keyid"].as_str().unwrap_or("")
            )
        })
}

/// Where `kiln pull` stages in `--out`, and `kiln push --containerdisk`
/// writes its layer beside the disk.
const PULL_STAGING: &str = ".kiln-pull-";
const PUSH_SCRATCH: &str = ".kiln-push-";

/// A claimed staging dir in `dir` named `prefix…`, after removing the ones
/// dead runs left there (see [`crate::store::remove_stale`]).
fn staging_in(dir: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    crate::store::remove_stale(dir, prefix)?;
    let staging = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(dir)
        .with_context(|| format!("creating a staging dir in {}", dir.display()))?;
    crate::store::claim(staging.path())?;
    Ok(staging)
}

/// Push the KubeVirt containerDisk of `image` (see the module doc);
/// returns the manifest's digest.
pub fn push_containerdisk(image: &Path, reference: Reference, tag: &str) -> Result<String> {
    let m = crate::record::manifest::read(&crate::record::manifest::path_for(image))?;
    let ext = image.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !DISKS.iter().any(|(e, _)| *e == ext) || !image.is_file() {
        return Err(BadInput::file(
            image,
            "not a disk kiln built (NAME.qcow2 or NAME.raw)",
            "give the disk a build wrote, e.g. out/web.qcow2",
        )
        .into());
    }
    let dir = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let scratch = staging_in(dir, PUSH_SCRATCH)?;
    let pushed = (|| {
        let qcow2 = crate::export::qcow2_of(image, ext, scratch.path())?;
        let cd =
            crate::export::oci::write_image(&qcow2, &m.name, m.source_date_epoch, scratch.path())?;
        let sha256 = if qcow2 == image {
            cd.disk_sha256.clone()
        } else {
            crate::plan::key::file_digest(image)
                .with_context(|| format!("hashing {}", image.display()))?
        };
        if sha256 != m.image.sha256 {
            return Err(NotVerified(format!(
                "{} has the sha256 {sha256}, not the {} its manifest records: rebuild it",
                image.display(),
                m.image.sha256
            ))
            .into());
        }
        let client = Client::new(reference, true)?;
        client.put_blob_bytes(&cd.config_blob.digest, &cd.config)?;
        client.put_blob(&cd.layer.digest, &cd.layer_path)?;
        client.put_manifest(tag, &cd.manifest)?;
        Ok(cd.manifest_blob.digest)
    })();
    crate::store::release_claim(scratch.path());
    pushed
}

/// What `kiln pull` wrote.
#[derive(Debug, serde::Serialize)]
pub struct Pulled {
    pub disk: PathBuf,
    pub sha256: String,
    pub files: Vec<PathBuf>,
    pub signed_by: Vec<String>,
    /// Who signed the file list, when a trusted key did.
    pub files_signed_by: Option<String>,
    /// Files of the artifact not written: no trusted signature covers them.
    pub not_written: Vec<String>,
    /// Why, when some were not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_written_because: Option<String>,
}

/// Fetch an image artifact into `out`, verified (see the module doc).
pub fn pull(
    reference: Reference,
    target: &str,
    out: &Path,
    trusted: &[PublicKey],
) -> Result<Pulled> {
    let client = Client::new(reference, false)?;
    let what = format!("{}:{target}", client.reference);
    let manifest = client
        .manifest(target)?
        .with_context(|| format!("{what}: no such tag or digest"))?;
    if let Some(want) = target.strip_prefix("sha256:") {
        let got = crate::plan::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&manifest));
        if got != want {
            return Err(NotVerified(format!(
                "{what}: the manifest served has the digest sha256:{got}"
            ))
            .into());
        }
    }
    let m: serde_json::Value = serde_json::from_slice(&manifest)
        .with_context(|| format!("{what}: a manifest that is not JSON"))?;
    if m["artifactType"] != ARTIFACT_TYPE {
        anyhow::bail!(
            "{what} is not a kiln image (artifactType {}, not {ARTIFACT_TYPE})",
            m["artifactType"]
        );
    }
    let name = m["annotations"][TITLE]
        .as_str()
        .filter(|n| safe_name(n))
        .with_context(|| format!("{what}: no usable image name ({TITLE})"))?
        .to_owned();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let staging = staging_in(out, PULL_STAGING)?;
    let pulled = pull_into(&client, &what, &m, &name, staging.path(), out, trusted);
    crate::store::release_claim(staging.path());
    pulled
}

/// The blobs of the image manifest `m` into `staging`, verified, then
/// renamed into `out`.
fn pull_into(
    client: &Client,
    what: &str,
    m: &serde_json::Value,
    name: &str,
    staging: &Path,
    out: &Path,
    trusted: &[PublicKey],
) -> Result<Pulled> {
    let files_signer = files_signer(m, name, trusted);
    // What the provenance's signature vouches for, checked below.
    let by_provenance = DISKS
        .iter()
        .map(|(ext, _)| format!("{name}.{ext}"))
        .chain(
            [
                "manifest.json",
                "provenance.intoto.jsonl",
                "provenance.json",
            ]
            .map(|suffix| format!("{name}.{suffix}")),
        )
        .collect::<Vec<_>>();
    let mut fetched = Vec::new();
    let mut not_written = Vec::new();
    for layer in m["layers"].as_array().into_iter().flatten() {
        let title = layer["annotations"][TITLE]
            .as_str()
            .filter(|t| safe_name(t) && t.starts_with(&format!("{name}.")))
            .with_context(|| format!("{what}: a layer without a usable file name"))?;
        if files_signer.is_err() && !by_provenance.iter().any(|f| f == title) {
            not_written.push(title.to_owned());
            continue;
        }
        let digest = layer["digest"].as_str().unwrap_or("");
        let size = layer["size"].as_u64().unwrap_or(0);
        let dest = staging.join(title);
        client.get_blob(digest, size, &dest).map_err(|e| {
            match e.downcast::<super::registry::Mismatch>() {
                Ok(mismatch) => NotVerified(format!("{what}: {title}: {mismatch}")).into(),
                Err(e) => e,
            }
        })?;
        fetched.push(title.to_owned());
    }
    let disk_name = DISKS
        .iter()
        .map(|(ext, _)| format!("{name}.{ext}"))
        .find(|d| fetched.contains(d))
        .with_context(|| format!("{what}: no disk in the artifact"))?;
    let disk = staging.join(&disk_name);
    let manifest_path = staging.join(format!("{name}.manifest.json"));
    let m = crate::record::manifest::read(&manifest_path)?;
    let check = crate::record::signed::check(&disk, &m, &manifest_path, trusted)?;
    if !check.ok() {
        return Err(NotVerified(format!("{what}: {}", check.failures.join("; "))).into());
    }
    check_provenance_is_payload(staging, name, &disk)?;
    // Records first, the disk last: a disk in out/ comes with its evidence.
    fetched.sort_by_key(|f| *f == disk_name);
    let mut files = Vec::new();
    for title in &fetched {
        let dest = out.join(title);
        std::fs::rename(staging.join(title), &dest)
            .with_context(|| format!("moving the pulled {title} to {}", dest.display()))?;
        files.push(dest);
    }
    let (files_signed_by, not_written_because) = match files_signer {
        Ok(signer) => (Some(signer), None),
        Err(why) => (None, (!not_written.is_empty()).then_some(why)),
    };
    Ok(Pulled {
        disk: out.join(&disk_name),
        sha256: m.image.sha256.clone(),
        files,
        signed_by: check.signed_by,
        files_signed_by,
        not_written,
        not_written_because,
    })
}

/// The provenance file, when pulled, must be what the envelope signed.
fn check_provenance_is_payload(dir: &Path, name: &str, disk: &Path) -> Result<()> {
    let statement = dir.join(format!("{name}.provenance.json"));
    if !statement.is_file() {
        return Ok(());
    }
    let envelope_path = crate::record::signed::path_for(disk);
    let text = std::fs::read_to_string(&envelope_path)
        .with_context(|| format!("reading {}", envelope_path.display()))?;
    let signed = text
        .lines()
        .filter_map(|l| crate::sign::dsse::Envelope::parse(l).ok())
        .filter_map(|e| e.payload().ok())
        .collect::<Vec<_>>();
    let bytes =
        std::fs::read(&statement).with_context(|| format!("reading {}", statement.display()))?;
    if !signed.contains(&bytes) {
        return Err(NotVerified(format!(
            "{name}.provenance.json is not the statement its envelope signed"
        ))
        .into());
    }
    Ok(())
}

/// A file name kiln writes into `out/`: no path, nothing hidden.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_take_a_tag_or_a_digest_and_keep_the_port() {
        let (r, t) = parse_ref("oci+http://127.0.0.1:5000/team/images:web-1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), t.as_str()),
            ("127.0.0.1:5000", "team/images", "web-1")
        );
        let (r, t) = parse_ref("oci+http://127.0.0.1:5000/team/images").unwrap();
        assert_eq!(
            (r.repository.as_str(), t.as_str()),
            ("team/images", "latest")
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let (_, t) = parse_ref(&format!("oci://reg.example/x@{digest}")).unwrap();
        assert_eq!(t, digest);
        assert!(parse_ref("oci://reg.example/x@sha256:abc").is_err());
        assert!(parse_ref("oci://reg.example/x:-bad").is_err());
        assert!(!safe_name("../web.qcow2") && !safe_name(".hidden") && safe_name("web.qcow2"));
    }

    #[test]
    fn a_file_list_signature_vouches_for_every_title_digest_and_size() {
        let ci = SigningKey::generate("ci");
        let other = SigningKey::generate("other");
        let layer = |title: &str, byte: char, size: u64| {
            json!({
                "digest": format!("sha256:{}", byte.to_string().repeat(64)),
                "size": size,
                "annotations": { TITLE: title },
            })
        };
        let layers = vec![
            layer("web.qcow2", 'a', 1000),
            layer("web.spdx.json", 'b', 20),
        ];
        let manifest = |layers: &[serde_json::Value], key: Option<&SigningKey>| json!({ "layers": layers, "annotations": annotations("web", layers, key) });
        let m = manifest(&layers, Some(&ci));
        assert_eq!(
            m["annotations"]["dev.kiln.fingerprint"],
            format!(
                "kiln-push-v1;web;web.qcow2=sha256:{}:1000;web.spdx.json=sha256:{}:20",
                "a".repeat(64),
                "b".repeat(64)
            )
        );
        assert_eq!(files_signer(&m, "web", &[ci.public()]).unwrap(), "ci");
        // Another trusted set, another name, a swapped blob, no signature.
        let err = files_signer(&m, "web", &[other.public()]).unwrap_err();
        assert!(
            err.contains("key `ci`") && err.contains("does not verify"),
            "{err}"
        );
        assert!(files_signer(&m, "db", &[ci.public()]).is_err());
        let mut swapped = m.clone();
        swapped["layers"][1]["digest"] = layers[0]["digest"].clone();
        assert!(files_signer(&swapped, "web", &[ci.public()]).is_err());
        let err = files_signer(&manifest(&layers, None), "web", &[ci.public()]).unwrap_err();
        assert!(err.contains("not signed"), "{err}");
    }
}
