//! The remote cache: store entries (layers and assembled images) shared
//! through an OCI registry, which kiln treats as untrusted storage (as a
//! Nix binary cache is).
//!
//! ## Layout
//!
//! One repository (`--remote oci://HOST/REPO`, or `KILN_REMOTE`) holds one
//! immutable tag per key. Never a shared mutable "cache" tag, so
//! concurrent CI runs cannot race on one, and a hit is one request:
//!
//! ```text
//! REPO:kl1-<64 hex key>            an OCI 1.1 artifact (image manifest):
//! ├── artifactType                 application/vnd.kiln.layer.v1
//! ├── config                       the empty descriptor: {} (2 bytes), pushed first
//! ├── layers[0]                    application/vnd.oci.image.layer.v1.tar+zstd:
//! │                                entry.json and tree/ of the store entry, as
//! │                                GNU tar writes them (POSIX format, sorted names,
//! │                                numeric owners, xattrs and ACLs kept, overlayfs
//! │                                whiteouts as the 0:0 character devices they are)
//! └── annotations
//!     ├── dev.kiln.key             the key
//!     ├── dev.kiln.step            the step's id (for people)
//!     ├── dev.kiln.fingerprint     kiln-layer-v1;<key>;<blob digest>;<size>
//!     ├── dev.kiln.signature       base64 Ed25519 signature over the fingerprint
//!     └── dev.kiln.keyid           the signing key's name (a hint, see sign)
//!
//! REPO:ki1-<64 hex image key>      the same for an image entry:
//!                                  application/vnd.kiln.image-entry.v1, its blob
//!                                  image.json and the disk; fingerprint
//!                                  kiln-image-v1;<key>;<blob digest>;<size>
//! ```
//!
//! The kinds differ in tag, artifact type and fingerprint, so a signed
//! layer can never be served as an image entry or the other way round.
//! An image's exports (`formats`) do not travel: they are made again from
//! the pulled disk.
//!
//! The signature sits in the manifest rather than in a referrer or a
//! sibling tag: a key becomes visible with one manifest PUT, the last
//! request of a push, so a reader never sees a layer without its
//! signature, and a push killed midway leaves only unreferenced blobs.
//!
//! ## Trust
//!
//! A pulled entry is used only when the fingerprint of the blob that was
//! actually downloaded (its sha256 and size, checked while streaming) and
//! of the key kiln asked for verifies against one of the `--trusted-key`s.
//! Without a trusted key the registry is not read at all. The blob is
//! unpacked into a staging dir, its `entry.json` (`image.json`, whose disk
//! must also have the recorded sha256) must name the same key, and it is
//! then published exactly as a local build publishes (sealed,
//! synced, one rename; see `store`), so a killed pull leaves no entry.
//!
//! ## Faults
//!
//! A refused layer (signature, digest, size, content) is one warning line
//! naming the step and key, and the step is built locally. A registry that
//! is unreachable, answers 5xx (after the client's bounded retries) or
//! refuses our credentials is one warning for the whole run, which then
//! builds locally and asks it nothing more. Pushing (`--push`) is what the user asked for: a failed push is an
//! error, after the local build has been published.

pub mod auth;
pub mod image;
pub mod registry;

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::cmd::Cmd;
use crate::plan::Key;
use crate::sign::key::{PublicKey, SigningKey};
use crate::store::{LayerEntry, Store};
pub use registry::Reference;
use registry::{Client, MANIFEST_TYPE};

pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The OCI empty descriptor: `{}`.
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub const EMPTY: &[u8] = b"{}";
/// What GNU tar needs besides itself to write and read a layer blob.
pub const TOOLS: &[crate::cmd::Tool] = &[
    crate::cmd::Tool {
        program: "tar",
        package: "tar",
    },
    crate::cmd::Tool {
        program: "zstd",
        package: "zstd",
    },
];

/// The two kinds of store entry the cache holds, each with its own tags,
/// artifact type and signed fingerprint, so that one can never stand in
/// for the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Layer,
    /// An assembled image entry (`images-v1/<key>/`: the disk and image.json).
    Image,
}

impl Kind {
    /// Tags: `kl1-<key>` / `ki1-<key>` (68 characters, within the grammar).
    fn tag_prefix(self) -> &'static str {
        match self {
            Kind::Layer => "kl1-",
            Kind::Image => "ki1-",
        }
    }

    pub fn artifact_type(self) -> &'static str {
        match self {
            Kind::Layer => "application/vnd.kiln.layer.v1",
            Kind::Image => "application/vnd.kiln.image-entry.v1",
        }
    }

    fn fingerprint_version(self) -> &'static str {
        match self {
            Kind::Layer => "kiln-layer-v1",
            Kind::Image => "kiln-image-v1",
        }
    }

    fn dir(self, store: &Store, key: &Key) -> std::path::PathBuf {
        match self {
            Kind::Layer => store.layer_dir(key),
            Kind::Image => store.image_dir(key),
        }
    }
}

/// The tag of a key.
pub fn tag(kind: Kind, key: &Key) -> String {
    format!("{}{}", kind.tag_prefix(), key.hex())
}

/// The message an entry's signature is over: its kind, the key it answers,
/// and the exact blob (its digest and size).
pub fn fingerprint(kind: Kind, key: &Key, digest: &str, size: u64) -> String {
    format!(
        "{};{};{digest};{size}",
        kind.fingerprint_version(),
        key.hex()
    )
}

/// A remote cache as this run uses it.
pub struct Remote {
    client: Client,
    trusted: Vec<PublicKey>,
    /// Set after the first "unavailable": the run asks nothing more.
    down: std::sync::atomic::AtomicBool,
}

/// A layer the registry has for a key, its signature verified.
#[derive(Debug, Clone)]
pub struct Found {
    pub digest: String,
    pub size: u64,
    /// The trusted key whose signature verified.
    pub signed_by: String,
}

/// A layer brought in from the registry.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub bytes: u64,
    pub signed_by: String,
}

/// Why a lookup or pull did not give a layer.
#[derive(Debug)]
pub enum Miss {
    /// The registry has no layer for the key.
    Absent,
    /// The registry is unavailable (said once per run, see [`Remote::warn`]).
    Down,
}

impl Remote {
    pub fn new(reference: Reference, trusted: Vec<PublicKey>, push: bool) -> Result<Remote> {
        Ok(Remote {
            client: Client::new(reference, push)?,
            trusted,
            down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn reference(&self) -> &Reference {
        &self.client.reference
    }

    /// Whether layers may be read from it: only with a trusted key.
    pub fn readable(&self) -> bool {
        !self.trusted.is_empty() && !self.down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Turn an error into what the run does next: an unavailable registry
    /// is warned about once and then left alone (`Ok(Miss::Down)`); any
    /// other error is the caller's.
    fn absorb<T>(&self, result: Result<T>) -> Result<std::result::Result<T, Miss>> {
        match result {
            Ok(v) => Ok(Ok(v)),
            Err(e) if registry::is_unusable(&e) => {
                // A read that gave up after Ctrl-C says nothing of the registry.
                crate::cmd::check_interrupt()?;
                if !self.down.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    eprintln!(
                        "warning: the registry {} is unavailable: {e:#}; building locally and not asking it again in this run",
                        self.reference()
                    );
                }
                Ok(Err(Miss::Down))
            }
            Err(e) => Err(e),
        }
    }

    /// The verified layer the registry has for `key`: one manifest GET.
    /// `Err` is a refusal (the registry's layer is not one to use).
    pub fn lookup(&self, kind: Kind, key: &Key) -> Result<std::result::Result<Found, Miss>> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Err(Miss::Down));
        }
        let manifest = match self.absorb(self.client.manifest(&tag(kind, key)))? {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Err(Miss::Absent)),
            Err(miss) => return Ok(Err(miss)),
        };
        self.verify(kind, key, &manifest).map(Ok)
    }

    /// Check a layer manifest: kiln's artifact for this key, with one blob,
    /// signed by a trusted key over the fingerprint of that blob.
    fn verify(&self, kind: Kind, key: &Key, manifest: &[u8]) -> Result<Found> {
        let m: serde_json::Value =
            serde_json::from_slice(manifest).context("its manifest is not JSON")?;
        let text = |v: &serde_json::Value, name: &str| -> Result<String> {
            v.get(name)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .with_context(|| format!("its manifest has no {name}"))
        };
        let artifact = text(&m, "artifactType")?;
        if artifact != kind.artifact_type() {
            anyhow::bail!(
                "its manifest is a {artifact}, not a {}",
                kind.artifact_type()
            );
        }
        let layers = m
            .get("layers")
            .and_then(|l| l.as_array())
            .context("its manifest has no layers")?;
        let [layer] = layers.as_slice() else {
            anyhow::bail!("its manifest has {} layers, not one", layers.len());
        };
        let digest = text(layer, "digest")?;
        let size = layer
            .get("size")
            .and_then(|s| s.as_u64())
            .context("its layer has no size")?;
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            anyhow::bail!("its layer digest `{digest}` is not a sha256");
        }
        let annotations = m.get("annotations").cloned().unwrap_or(json!({}));
        let signature = text(&annotations, "dev.kiln.signature")
            .context("it is not signed (no dev.kiln.signature)")?;
        let keyid = text(&annotations, "dev.kiln.keyid").unwrap_or_default();
        let sig = crate::sign::unb64(&signature).context("its signature is not base64")?;
        let message = fingerprint(kind, key, &digest, size);
        match self
            .trusted
            .iter()
            .find(|t| t.verifies(message.as_bytes(), &sig))
        {
            Some(t) => Ok(Found {
                digest,
                size,
                signed_by: t.name.clone(),
            }),
            None => anyhow::bail!(
                "its signature (key `{keyid}`) does not verify against any trusted key ({})",
                self.trusted
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Bring the layer `key` that [`Remote::lookup`] found in from the
    /// registry and publish it in the store. The caller holds the key's
    /// lock and has found it missing. `Err` is a refusal or a local
    /// failure; nothing was published then.
    pub fn pull(
        &self,
        store: &Store,
        kind: Kind,
        key: &Key,
        found: &Found,
    ) -> Result<std::result::Result<Pulled, Miss>> {
        let scratch = store.staging()?;
        let blob = scratch.path().join("entry.tar.zst");
        let fetched = self.client.get_blob(&found.digest, found.size, &blob);
        if let Err(miss) = self.absorb(fetched)? {
            store.remove_staging(scratch)?;
            return Ok(Err(miss));
        }
        let staged = store.staging()?;
        let unpacked =
            unpack(&blob, staged.path()).and_then(|()| check_unpacked(kind, staged.path(), key));
        store.remove_staging(scratch)?;
        if let Err(e) = unpacked {
            store.remove_staging(staged)?;
            return Err(e);
        }
        store.publish(staged, &kind.dir(store, key), false)?;
        Ok(Ok(Pulled {
            bytes: found.size,
            signed_by: found.signed_by.clone(),
        }))
    }

    /// Push the store's entry `key`, signed, unless the registry has it.
    /// Says whether it pushed. An unavailable registry is an error here.
    pub fn push(
        &self,
        store: &Store,
        kind: Kind,
        key: &Key,
        id: &str,
        signing: &SigningKey,
    ) -> Result<bool> {
        self.push_entry(store, kind, key, id, signing)
            .with_context(|| format!("pushing {id} ({}) to {}", key.short(), self.reference()))
    }

    fn push_entry(
        &self,
        store: &Store,
        kind: Kind,
        key: &Key,
        id: &str,
        signing: &SigningKey,
    ) -> Result<bool> {
        let tag = tag(kind, key);
        if self.client.has_manifest(&tag)? {
            return Ok(false);
        }
        let members = members(store, kind, key)?;
        let scratch = store.staging()?;
        let blob = scratch.path().join("entry.tar.zst");
        let pushed = pack(&kind.dir(store, key), &members, &blob).and_then(|()| {
            let digest = format!(
                "sha256:{}",
                crate::plan::key::file_digest(&blob)
                    .with_context(|| format!("hashing {}", blob.display()))?
            );
            let size = std::fs::metadata(&blob)
                .with_context(|| format!("reading {}", blob.display()))?
                .len();
            // distribution refuses a manifest whose blobs it lacks, config included.
            self.client.put_blob_bytes(EMPTY_DIGEST, EMPTY)?;
            self.client.put_blob(&digest, &blob)?;
            let manifest = entry_manifest(kind, key, id, &digest, size, signing);
            self.client.put_manifest(&tag, &manifest)
        });
        store.remove_staging(scratch)?;
        pushed.map(|()| true)
    }
}

/// The top-level names of a store entry that travel: a layer's
/// `entry.json` and `tree/`, an image's `image.json` and disk (not its
/// exports, which are made again from the disk; not the seal, which the
/// importing store makes itself).
fn members(store: &Store, kind: Kind, key: &Key) -> Result<Vec<String>> {
    Ok(match kind {
        Kind::Layer => vec!["entry.json".into(), "tree".into()],
        Kind::Image => vec!["image.json".into(), store.image_entry(key)?.file],
    })
}

/// The manifest of an entry's artifact (see the module doc), signed.
pub fn entry_manifest(
    kind: Kind,
    key: &Key,
    id: &str,
    digest: &str,
    size: u64,
    signing: &SigningKey,
) -> Vec<u8> {
    let fingerprint = fingerprint(kind, key, digest, size);
    let signature = crate::sign::b64(&signing.sign(fingerprint.as_bytes()));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": kind.artifact_type(),
        "config": {
            "mediaType": EMPTY_TYPE,
            "digest": EMPTY_DIGEST,
            "size": EMPTY.len(),
            "data": crate::sign::b64(EMPTY),
        },
        "layers": [{
            "mediaType": LAYER_TYPE,
            "digest": digest,
            "size": size,
        }],
        "annotations": {
            "dev.kiln.key": key.hex(),
            "dev.kiln.step": id,
            "dev.kiln.fingerprint": fingerprint,
            "dev.kiln.signature": signature,
            "dev.kiln.keyid": signing.name,
        },
    });
    serde_json::to_vec(&manifest).expect("a JSON value serialises")
}

/// What GNU tar keeps of a layer: owners as numbers, permissions, every
/// xattr (overlayfs's opaque marks, file capabilities) and ACL.
const TAR_METADATA: &[&str] = &[
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
];

/// Write the layer at `entry_dir` (its `entry.json` and `tree/`) as a
/// zstd-compressed POSIX tar: names sorted, no access or change times, so
/// the same tree gives the same bytes.
fn pack(entry_dir: &Path, members: &[String], dest: &Path) -> Result<()> {
    Cmd::new("tar")
        .args(["--create", "--format=posix", "--sort=name"])
        .arg("--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime")
        .args(TAR_METADATA)
        .arg("--use-compress-program=zstd -T0")
        .arg("--file")
        .arg(dest)
        .arg("--directory")
        .arg(entry_dir)
        .arg("--")
        .args(members)
        .run()
}

/// Unpack a layer blob into a staging dir, owners and modes as stored.
fn unpack(blob: &Path, dest: &Path) -> Result<()> {
    Cmd::new("tar")
        .args(["--extract", "--same-owner", "--same-permissions"])
        .args(TAR_METADATA)
        .arg("--use-compress-program=zstd")
        .arg("--file")
        .arg(blob)
        .arg("--directory")
        .arg(dest)
        .run()
}

/// A pulled entry must be an entry of its kind for `key`, and nothing else.
fn check_unpacked(kind: Kind, dir: &Path, key: &Key) -> Result<()> {
    let (record, found_key, payload) = match kind {
        Kind::Layer => {
            let entry: LayerEntry = crate::store::read_json(&dir.join("entry.json"))
                .context("its entry.json is not a layer entry")?;
            ("entry.json", entry.key, "tree".to_owned())
        }
        Kind::Image => {
            let entry: crate::store::ImageEntry = crate::store::read_json(&dir.join("image.json"))
                .context("its image.json is not an image entry")?;
            let disk = dir.join(&entry.file);
            if entry.file.contains('/') || !disk.is_file() {
                anyhow::bail!("it has no disk {}", entry.file);
            }
            let sha256 = crate::plan::key::file_digest(&disk)
                .with_context(|| format!("hashing {}", disk.display()))?;
            if sha256 != entry.sha256 {
                anyhow::bail!("its disk's sha256 is not the one its image.json records");
            }
            ("image.json", entry.key, entry.file)
        }
    };
    if found_key != *key {
        anyhow::bail!("its {record} is for key {}", found_key.short());
    }
    for item in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = item
            .with_context(|| format!("reading {}", dir.display()))?
            .file_name();
        let name = name.to_string_lossy();
        if name != record && name != payload && name != crate::store::CLAIM {
            anyhow::bail!("it holds {name} besides {record} and {payload}");
        }
    }
    if kind == Kind::Layer && !dir.join("tree").is_dir() {
        anyhow::bail!("it has no tree/");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Key {
        Key::parse(&format!("{byte:02x}").repeat(32)).unwrap()
    }

    fn remote(trusted: Vec<PublicKey>) -> Remote {
        Remote::new(
            Reference::parse("oci+http://127.0.0.1:1/kiln").unwrap(),
            trusted,
            false,
        )
        .unwrap()
    }

    #[test]
    fn a_layer_manifest_is_an_oci_artifact_that_verifies_only_for_its_key_blob_and_signer() {
        let signer = SigningKey::generate("ci");
        let other = SigningKey::generate("other");
        let digest = format!("sha256:{}", "ab".repeat(32));
        let manifest = entry_manifest(Kind::Layer, &key(1), "base", &digest, 42, &signer);
        let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(m["artifactType"], "application/vnd.kiln.layer.v1");
        assert_eq!(m["config"]["digest"], EMPTY_DIGEST);
        assert_eq!(m["config"]["size"], 2);
        assert_eq!(m["layers"][0]["mediaType"], LAYER_TYPE);
        assert_eq!(
            m["annotations"]["dev.kiln.fingerprint"],
            format!("kiln-layer-v1;{};{digest};42", key(1).hex())
        );
        assert_eq!(tag(Kind::Layer, &key(1)).len(), 68);

        let trusting = remote(vec![signer.public()]);
        let found = trusting.verify(Kind::Layer, &key(1), &manifest).unwrap();
        assert_eq!((found.size, found.signed_by.as_str()), (42, "ci"));
        // Another key's manifest served under this key's tag.
        let err = trusting
            .verify(Kind::Layer, &key(2), &manifest)
            .unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        // A size or digest changed in the manifest.
        let grown = String::from_utf8(manifest.clone())
            .unwrap()
            .replace("\"size\":42", "\"size\":43");
        assert!(trusting
            .verify(Kind::Layer, &key(1), grown.as_bytes())
            .is_err());
        // A layer never stands in for an image entry with the same key.
        assert!(trusting.verify(Kind::Image, &key(1), &manifest).is_err());
        let err = remote(vec![other.public()])
            .verify(Kind::Layer, &key(1), &manifest)
            .unwrap_err();
        assert!(
            err.to_string().contains("key `ci`") && err.to_string().contains("other"),
            "{err}"
        );
        assert_eq!(
            EMPTY_DIGEST,
            format!(
                "sha256:{}",
                crate::plan::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(EMPTY))
            )
        );
    }
}
