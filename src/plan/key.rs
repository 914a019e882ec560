//! Cache keys.
//!
//! A key is the sha256 of everything that can change what a step produces,
//! and nothing else. It is computed in exactly one place per kind of entry
//! ([`StepInputs::key`], [`ImageInputs::key`]) from a struct whose fields are
//! those inputs; each function destructures its struct exhaustively, so a
//! field added later cannot be silently left out of the hash.
//!
//! The encoding is stable across runs, machines and kiln builds: every field
//! is fed as `name`, then its length as a little-endian u64, then its bytes.
//! Lists are fed as their length followed by each element, so `["a b"]` and
//! `["a", "b"]` hash differently. No `Debug` output, no `DefaultHasher`, no
//! unordered maps.
//!
//! What is deliberately *not* in a key: the recipe's text (comments and
//! whitespace), file names of copied files on the host and their mtimes (only
//! their content, destination, mode and owner), and the order of `packages`
//! (apt installs a set). The archive URLs *are* in the keys of the steps
//! that write them into the image's apt sources (the base and `upgrade`):
//! a layer built against another mirror is another layer.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bump when the meaning of a layer's inputs changes, or when the same
/// inputs would now give another layer: v2, a locked `packages` step marks
/// what the recipe asks for as manually installed, as the resolving build
/// does (a v1 entry may hold the other apt `extended_states`); v3, what a
/// step makes is dated by its inputs, not by the build's clock (a v2 entry
/// holds its build's times, see `layers::clock`).
const LAYER_DOMAIN: &str = "kiln-layer-v3";
/// Bump when assembly produces different bytes from the same layers: v4,
/// the root's times are pinned in its inode tables by kiln instead of by a
/// debugfs pass, which also added what it wrote to the superblock's
/// lifetime-writes count (`s_kbytes_written`: a v3 root differs in that
/// field and the superblock's checksum, and a sealed one's root hash with
/// them).
pub const ASSEMBLY_VERSION: &str = "kiln-image-v4";

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl Key {
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// The first 12 hex digits, for tables.
    pub fn short(&self) -> String {
        self.hex()[..12].to_owned()
    }

    pub fn parse(text: &str) -> Option<Key> {
        if text.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(out))
    }

    /// A stable UUID-shaped value derived from this key and a purpose, for
    /// filesystem UUIDs, hash seeds and GPT GUIDs (so the same image key
    /// always gives the same disk).
    pub fn derive_uuid(&self, purpose: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(purpose.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout, as tools expect
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        uuid_text(&hex(&b))
    }
}

/// 32 hex digits as a UUID's text, `8-4-4-4-12`.
pub fn uuid_text(x: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        Key::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a kiln key")))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            write!(s, "{b:02x}").expect("write to String");
            s
        })
}

/// sha256 of a file's content, streaming through one buffer per thread
/// (a root holds tens of thousands of small files: a fresh megabyte for
/// each cost more than hashing most of them).
pub fn file_digest(path: &std::path::Path) -> std::io::Result<String> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 20]);
    }
    let mut file = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    BUF.with_borrow_mut(|buf| loop {
        let n = std::io::Read::read(&mut file, buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize_reset()));
        }
        h.update(&buf[..n]);
    })
}

pub fn bytes_digest(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The stable encoder described in the module docs.
struct KeyHasher(Sha256);

impl KeyHasher {
    fn new(domain: &str) -> KeyHasher {
        let mut h = KeyHasher(Sha256::new());
        h.bytes("domain", domain.as_bytes());
        h
    }

    fn bytes(&mut self, name: &str, value: &[u8]) {
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
    }

    fn str(&mut self, name: &str, value: &str) {
        self.bytes(name, value.as_bytes());
    }

    fn list(&mut self, name: &str, values: &[String]) {
        self.bytes(name, &(values.len() as u64).to_le_bytes());
        for v in values {
            self.str("item", v);
        }
    }

    fn opt_key(&mut self, name: &str, key: Option<Key>) {
        match key {
            Some(k) => self.bytes(name, &k.0),
            None => self.bytes(name, b""),
        }
    }

    fn finish(self) -> Key {
        Key(self.0.finalize().into())
    }
}

/// What kind of work a step does. A layer is one or more steps, run in
/// this order: upgrade, packages, files, run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Base,
    Upgrade,
    Packages,
    Files,
    Run,
}

impl StepKind {
    /// Whether this kind of step installs packages, and so is pinned by a
    /// lock (and writes apt sources, for the base and `upgrade`).
    pub fn is_pinned(self) -> bool {
        matches!(
            self,
            StepKind::Base | StepKind::Upgrade | StepKind::Packages
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Base => "base",
            StepKind::Upgrade => "upgrade",
            StepKind::Packages => "packages",
            StepKind::Files => "files",
            StepKind::Run => "run",
        }
    }
}

/// One copied file as far as the key is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInput {
    /// As written in the recipe (for "why", not hashed).
    pub src: String,
    pub dest: String,
    pub mode: u32,
    pub owner: String,
    pub sha256: String,
}

/// Everything that goes into a step's key. Stored beside the entry so that
/// `kiln plan` can say which input changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInputs {
    pub parent: Option<Key>,
    pub kind: StepKind,
    /// The step's own settings, each as one canonical string
    /// (e.g. `suite=trixie`, a package name, a shell command).
    pub spec: Vec<String>,
    pub files: Vec<FileInput>,
    /// Digest of the locked package set for this step, when there is one.
    pub lock: Option<String>,
    /// The archive URLs a step writes into the image's apt sources (the
    /// base and `upgrade` steps): they are part of what the step produces.
    #[serde(default)]
    pub archive: Vec<String>,
}

impl StepInputs {
    pub fn key(&self) -> Key {
        let StepInputs {
            parent,
            kind,
            spec,
            files,
            lock,
            archive,
        } = self;
        let mut h = KeyHasher::new(LAYER_DOMAIN);
        h.opt_key("parent", *parent);
        h.str("kind", kind.as_str());
        h.list("spec", spec);
        h.bytes("files", &(files.len() as u64).to_le_bytes());
        for f in files {
            // `src` is deliberately left out: renaming the file on the host
            // without changing its content changes nothing in the image.
            let FileInput {
                src: _,
                dest,
                mode,
                owner,
                sha256,
            } = f;
            h.str("dest", dest);
            h.bytes("mode", &mode.to_le_bytes());
            h.str("owner", owner);
            h.str("sha256", sha256);
        }
        h.str("lock", lock.as_deref().unwrap_or(""));
        h.list("archive", archive);
        h.finish()
    }
}

/// Everything that goes into an image's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInputs {
    pub top: Key,
    pub size: u64,
    pub format: String,
    pub hostname: String,
    pub cmdline: String,
    /// A sealed (dm-verity) root. Left out of the hash when off, so an
    /// image without it keeps the key (and the disk) it had before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verity: bool,
    /// `name mount size filesystem owner` per volume.
    pub volumes: Vec<String>,
    /// SOURCE_DATE_EPOCH: no timestamp in the image is later (from the lock).
    pub epoch: u64,
    /// The SHA-256 fingerprint of the certificate whose key signs the UKI
    /// for Secure Boot (never the key itself: a key needs no secret). An
    /// unsigned image leaves it out of the hash, so its key is the one it
    /// had before kiln could sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<String>,
}

impl ImageInputs {
    pub fn key(&self) -> Key {
        let ImageInputs {
            top,
            size,
            format,
            hostname,
            cmdline,
            verity,
            volumes,
            epoch,
            secure_boot,
        } = self;
        let mut h = KeyHasher::new(ASSEMBLY_VERSION);
        h.opt_key("top", Some(*top));
        h.bytes("size", &size.to_le_bytes());
        h.str("format", format);
        h.str("hostname", hostname);
        h.str("cmdline", cmdline);
        h.list("volumes", volumes);
        h.bytes("epoch", &epoch.to_le_bytes());
        if let Some(fingerprint) = secure_boot {
            h.str("secure-boot-cert", fingerprint);
        }
        if *verity {
            h.str("verity", "root");
        }
        h.finish()
    }
}

/// Bump when a deployable file made from the same disk has other bytes.
const EXPORT_DOMAIN: &str = "kiln-export-v1";

/// Everything a deployable file made from an image depends on (see
/// `export`). The image key covers the disk's bytes and its
/// SOURCE_DATE_EPOCH (the archives' clock); the recipe's `formats` list is
/// not in the image key, so adding a format converts, never reassembles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInputs {
    pub image: Key,
    /// `vmdk`, `containerdisk`, … as in the recipe.
    pub format: String,
    /// The disk's name inside an archive, when it depends on the image's
    /// name (a containerDisk's `/disk/NAME.qcow2`); empty otherwise.
    pub inner_name: String,
}

impl ExportInputs {
    pub fn key(&self) -> Key {
        let ExportInputs {
            image,
            format,
            inner_name,
        } = self;
        let mut h = KeyHasher::new(EXPORT_DOMAIN);
        h.opt_key("image", Some(*image));
        h.str("format", format);
        h.str("inner_name", inner_name);
        h.finish()
    }
}

/// Bump when what a remembered smoke pass holds changes.
const SMOKE_DOMAIN: &str = "kiln-smoke-v2";

/// Everything a smoke pass depends on: the image and the checks it ran.
/// A pass is remembered under this key, so the same image with the same
/// checks is not booted again.
#[derive(Debug, Clone, PartialEq)]
pub struct SmokeInputs {
    pub image: Key,
    pub timeout_secs: u64,
    /// Run in this order in the guest: the seed, then the checks.
    pub seed: Vec<String>,
    pub checks: Vec<String>,
    pub http: Vec<crate::recipe::HttpCheck>,
    /// With Secure Boot on, the fingerprint of the certificate enrolled in
    /// the firmware's db; a boot without it leaves it out of the hash.
    pub secure_boot: Option<String>,
    /// The SSH login and its checks, and the cloud-init seed; a boot with
    /// none of them leaves them out of the hash.
    pub ssh: bool,
    pub ssh_checks: Vec<String>,
    pub cloud_init: bool,
}

impl SmokeInputs {
    pub fn key(&self) -> Key {
        let SmokeInputs {
            image,
            timeout_secs,
            seed,
            checks,
            http,
            secure_boot,
            ssh,
            ssh_checks,
            cloud_init,
        } = self;
        let mut h = KeyHasher::new(SMOKE_DOMAIN);
        h.opt_key("image", Some(*image));
        h.bytes("timeout", &timeout_secs.to_le_bytes());
        h.list("seed", seed);
        h.list("checks", checks);
        h.bytes("http", &(http.len() as u64).to_le_bytes());
        for c in http {
            let crate::recipe::HttpCheck {
                port,
                path,
                status,
                contains,
            } = c;
            h.bytes("port", &port.to_le_bytes());
            h.str("path", path);
            h.bytes("status", &status.to_le_bytes());
            match contains {
                Some(text) => h.str("contains", text),
                None => h.bytes("no-contains", b""),
            }
        }
        if let Some(fingerprint) = secure_boot {
            h.str("secure-boot-db", fingerprint);
        }
        if *ssh {
            h.list("ssh-checks", ssh_checks);
        }
        if *cloud_init {
            h.bytes("cloud-init", b"");
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(spec: &[&str]) -> StepInputs {
        StepInputs {
            parent: None,
            kind: StepKind::Run,
            spec: spec.iter().map(|s| s.to_string()).collect(),
            files: vec![],
            lock: None,
            archive: vec![],
        }
    }

    #[test]
    fn list_boundaries_are_part_of_the_key() {
        assert_ne!(inputs(&["a b"]).key(), inputs(&["a", "b"]).key());
        assert_ne!(inputs(&["ab"]).key(), inputs(&["a", "b"]).key());
        assert_ne!(inputs(&[]).key(), inputs(&[""]).key());
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = StepInputs {
            parent: None,
            kind: StepKind::Files,
            spec: vec![],
            files: vec![FileInput {
                src: "a".into(),
                dest: "/a".into(),
                mode: 0o644,
                owner: "root:root".into(),
                sha256: "00".into(),
            }],
            lock: None,
            archive: vec![],
        };
        let k = base.key();
        let mut v = base.clone();
        v.parent = Some(k);
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.kind = StepKind::Run;
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.files[0].mode = 0o600;
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.files[0].owner = "www-data:root".into();
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.files[0].sha256 = "01".into();
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.lock = Some("x".into());
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.archive = vec!["http://127.0.0.1:8005/debian".into()];
        assert_ne!(v.key(), k);
        // The host-side name is not an input.
        let mut v = base.clone();
        v.files[0].src = "renamed".into();
        assert_eq!(v.key(), k);
    }

    #[test]
    fn every_smoke_input_changes_the_smoke_key() {
        let base = SmokeInputs {
            image: inputs(&["x"]).key(),
            timeout_secs: 180,
            seed: vec![],
            checks: vec!["true".into()],
            http: vec![crate::recipe::HttpCheck {
                port: 80,
                path: "/".into(),
                status: 200,
                contains: None,
            }],
            secure_boot: None,
            ssh: false,
            ssh_checks: vec![],
            cloud_init: false,
        };
        let k = base.key();
        let mut v = base.clone();
        v.ssh = true;
        assert_ne!(v.key(), k, "an SSH login is part of the test");
        let mut ssh = v.clone();
        ssh.ssh_checks = vec!["true".into()];
        assert_ne!(ssh.key(), v.key());
        let mut v = base.clone();
        v.cloud_init = true;
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.secure_boot = Some("ab".into());
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.image = inputs(&["y"]).key();
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.timeout_secs = 181;
        assert_ne!(v.key(), k);
        // A seed command is not the same as a check command.
        let mut v = base.clone();
        v.seed = v.checks.split_off(0);
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.http[0].port = 8080;
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.http[0].path = "/x".into();
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.http[0].status = 204;
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.http[0].contains = Some(String::new());
        assert_ne!(v.key(), k);
        assert_eq!(base.clone().key(), k);
    }

    fn image_inputs() -> ImageInputs {
        ImageInputs {
            top: inputs(&["x"]).key(),
            size: 2 << 30,
            format: "qcow2".into(),
            hostname: "web".into(),
            cmdline: "console=ttyS0".into(),
            verity: false,
            volumes: vec![],
            epoch: 1_700_000_000,
            secure_boot: None,
        }
    }

    #[test]
    fn verity_changes_the_image_key_and_its_absence_keeps_it() {
        let plain = image_inputs();
        let mut sealed = plain.clone();
        sealed.verity = true;
        assert_ne!(sealed.key(), plain.key());
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("verity"), "{json}");
        let json = serde_json::to_string(&sealed).unwrap();
        let back: ImageInputs = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sealed);
    }

    #[test]
    fn signing_changes_the_image_key_and_no_signing_keeps_it() {
        let unsigned = image_inputs();
        // Pinned: an unsigned image keeps the key (and so the disk) it had
        // before kiln could sign (given the layer keys of kiln-layer-v3 and
        // kiln-image-v4, whose bump changed it).
        assert_eq!(
            unsigned.key().hex(),
            "bc5b8baaa47f75852ece00e6cd18ae92963f4b213c72d86c28af7107f4be716a"
        );
        let mut signed = unsigned.clone();
        signed.secure_boot = Some("11".repeat(32));
        assert_ne!(signed.key(), unsigned.key());
        let mut other_cert = signed.clone();
        other_cert.secure_boot = Some("22".repeat(32));
        assert_ne!(other_cert.key(), signed.key());
        // image.json of an unsigned image is as it was.
        let json = serde_json::to_string(&unsigned).unwrap();
        assert!(!json.contains("secure_boot"), "{json}");
        let back: ImageInputs = serde_json::from_str(&json).unwrap();
        assert_eq!(back, unsigned);
    }

    #[test]
    fn every_export_input_changes_the_export_key() {
        let base = ExportInputs {
            image: inputs(&["x"]).key(),
            format: "vmdk".into(),
            inner_name: String::new(),
        };
        let k = base.key();
        let mut v = base.clone();
        v.image = inputs(&["y"]).key();
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.format = "vhd".into();
        assert_ne!(v.key(), k);
        let mut v = base.clone();
        v.inner_name = "web".into();
        assert_ne!(v.key(), k);
        assert_eq!(base.key(), k);
    }

    #[test]
    fn key_is_stable_across_releases() {
        // A changed encoding silently invalidates every store: this pins it
        // (changed on purpose with LAYER_DOMAIN kiln-layer-v3).
        assert_eq!(
            inputs(&["echo hi"]).key().hex(),
            "a3ac4874ef0cf757c09a5b3641dcf370c83ba2c8fcd9fb259f734609e45a3d5a"
        );
    }

    #[test]
    fn hex_round_trips_and_uuids_are_stable() {
        let k = inputs(&["x"]).key();
        assert_eq!(Key::parse(&k.hex()), Some(k));
        assert_eq!(Key::parse("zz"), None);
        let u = k.derive_uuid("root");
        assert_eq!(u, k.derive_uuid("root"));
        assert_ne!(u, k.derive_uuid("esp"));
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
