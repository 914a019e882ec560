//! Ed25519 key files (`NAME.key`, `NAME.pub`) and `kiln key new`.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ed25519_dalek::{Signature, Signer};

use super::{b64, unb64};
use crate::cmd::{Cmd, Tool};
use crate::error::BadInput;

/// A private key must be private: no permission bit for group or others.
const PRIVATE_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
/// Bits that make a private key file too open (ssh refuses the same).
const TOO_OPEN: u32 = 0o077;
/// The Secure Boot certificate's validity: UEFI firmware does not check
/// expiry when it verifies an image, so a long one spares a re-enrolment.
const SECURE_BOOT_CERT_DAYS: u32 = 3650;
const OPENSSL: Tool = Tool {
    program: "openssl",
    package: "openssl",
};

const KEY_FIX: &str =
    "give the NAME.key file written by `kiln key new NAME` (one line: NAME:base64 of 64 bytes)";
const PUB_FIX: &str =
    "give a NAME.pub file written by `kiln key new NAME` (one line: NAME:base64 of 32 bytes)";

/// A private signing key and its name (the keyid of its signatures).
pub struct SigningKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

/// A public key a verifier trusts, and its name.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A key name: what Nix allows in practice (`cache.example.org-1`), and
/// nothing that could break the `NAME:` format, a file name or a subject.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() {
        return Err("a key name cannot be empty".into());
    }
    if name.starts_with(['.', '-']) || !name.chars().all(ok_char) {
        return Err(format!(
            "`{name}` is not a key name: use letters, digits, `.`, `_` and `-`, not first `.` or `-`"
        ));
    }
    Ok(())
}

/// `NAME:BASE64` on one line (a final newline allowed) → name and bytes.
fn split(text: &str) -> Result<(String, Vec<u8>), String> {
    let line = text.strip_suffix('\n').unwrap_or(text);
    if line.contains('\n') {
        return Err("it has more than one line".into());
    }
    let (name, data) = line
        .split_once(':')
        .ok_or("it has no `NAME:` before the key")?;
    check_name(name)?;
    let bytes = unb64(data.trim()).ok_or("the part after `NAME:` is not base64")?;
    Ok((name.to_owned(), bytes))
}

impl SigningKey {
    pub fn generate(name: &str) -> SigningKey {
        SigningKey {
            name: name.to_owned(),
            key: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// Parse `NAME:base64(seed ‖ public)`, checking that the public half
    /// belongs to the seed (Nix's secret key format).
    pub fn parse(text: &str) -> Result<SigningKey, String> {
        let (name, bytes) = split(text)?;
        let pair: [u8; 64] = match bytes.len() {
            64 => bytes.try_into().expect("length checked"),
            32 => {
                return Err(
                    "this is a public key (NAME.pub); a signing key is the NAME.key beside it"
                        .into(),
                )
            }
            n => return Err(format!("the key is {n} bytes, not 64")),
        };
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&pair)
            .map_err(|_| "its public half does not belong to its secret half".to_owned())?;
        Ok(SigningKey { name, key })
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}\n", self.name, b64(&self.key.to_keypair_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Read a key file, refusing one that others may read or write.
    pub fn load(path: &Path) -> Result<SigningKey> {
        let meta = std::fs::metadata(path).map_err(|e| unreadable(path, &e, KEY_FIX))?;
        let text = read_text(path, KEY_FIX)?;
        // A public key given by mistake is not "too open": say what it is.
        if PublicKey::parse(&text).is_ok() {
            return Err(BadInput::file(
                path,
                "this is a public key (NAME.pub); a signing key is the NAME.key beside it",
                KEY_FIX,
            )
            .into());
        }
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_file() && mode & TOO_OPEN != 0 {
            return Err(BadInput::file(
                path,
                format!("the signing key is open to other users (mode {mode:04o}); a private key must be readable by its owner only"),
                format!("chmod 600 {}", path.display()),
            )
            .into());
        }
        SigningKey::parse(&text).map_err(|why| {
            BadInput::file(path, format!("not a kiln signing key: {why}"), KEY_FIX).into()
        })
    }
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let (name, bytes) = split(text)?;
        let raw: [u8; 32] = match bytes.len() {
            32 => bytes.try_into().expect("length checked"),
            64 => return Err("this is a private key (NAME.key): give its NAME.pub, and keep the .key to yourself".into()),
            n => return Err(format!("the key is {n} bytes, not 32")),
        };
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| "the bytes are not an Ed25519 public key".to_owned())?;
        Ok(PublicKey { name, key })
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}\n", self.name, b64(self.key.as_bytes()))
    }

    #[cfg(test)]
    pub fn raw(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Whether `sig` is this key's signature of `message` (strict: no
    /// malleable or small-order encodings).
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        self.key
            .verify_strict(message, &Signature::from_bytes(&sig))
            .is_ok()
    }

    pub fn load(path: &Path) -> Result<PublicKey> {
        let text = read_text(path, PUB_FIX)?;
        PublicKey::parse(&text).map_err(|why| {
            BadInput::file(path, format!("not a kiln public key: {why}"), PUB_FIX).into()
        })
    }
}

fn unreadable(path: &Path, e: &std::io::Error, fix: &str) -> anyhow::Error {
    let problem = match e.kind() {
        std::io::ErrorKind::NotFound => "the file does not exist".to_owned(),
        std::io::ErrorKind::PermissionDenied => {
            "the file cannot be read: permission denied".to_owned()
        }
        _ => format!("the file cannot be read: {e}"),
    };
    BadInput::file(path, problem, fix).into()
}

fn read_text(path: &Path, fix: &str) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| unreadable(path, &e, fix))?;
    String::from_utf8(bytes).map_err(|_| {
        BadInput::file(path, "the file is not text: a kiln key is one line", fix).into()
    })
}

/// The files `kiln key new NAME` writes into DIR.
#[derive(Debug)]
pub struct KeyFiles {
    pub key: PathBuf,
    pub public: PathBuf,
    /// With `--secure-boot`: `NAME.sb.key` and `NAME.sb.crt`.
    pub secure_boot: Option<(PathBuf, PathBuf)>,
}

impl KeyFiles {
    pub fn new(dir: &Path, name: &str, secure_boot: bool) -> KeyFiles {
        KeyFiles {
            key: dir.join(format!("{name}.key")),
            public: dir.join(format!("{name}.pub")),
            secure_boot: secure_boot.then(|| {
                (
                    dir.join(format!("{name}.sb.key")),
                    dir.join(format!("{name}.sb.crt")),
                )
            }),
        }
    }

    pub fn all(&self) -> Vec<&Path> {
        let mut all = vec![self.key.as_path(), self.public.as_path()];
        if let Some((k, c)) = &self.secure_boot {
            all.extend([k.as_path(), c.as_path()]);
        }
        all
    }
}

/// `kiln key new`: write a new key pair (and the Secure Boot pair) into
/// `dir`, never replacing a file. Everything is made in a private folder
/// inside `dir`, then hard-linked into place, which fails rather than
/// overwrite a file that appeared meanwhile.
pub fn new(dir: &Path, name: &str, secure_boot: bool) -> Result<KeyFiles> {
    check_name(name).map_err(|why| {
        BadInput::arg(
            why,
            "name the key after who signs, e.g. `kiln key new build-2025`",
        )
    })?;
    let files = KeyFiles::new(dir, name, secure_boot);
    for path in files.all() {
        if path.symlink_metadata().is_ok() {
            return Err(refuse_overwrite(path).into());
        }
    }
    if secure_boot {
        crate::cmd::require_tools(&[&[OPENSSL]])?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".kiln-key-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a private folder in {}", dir.display()))?;
    let staged = |p: &Path| {
        staging
            .path()
            .join(p.file_name().expect("a key file has a name"))
    };

    let key = SigningKey::generate(name);
    write_new(&staged(&files.key), key.to_text().as_bytes(), PRIVATE_MODE)?;
    write_new(
        &staged(&files.public),
        key.public().to_text().as_bytes(),
        PUBLIC_MODE,
    )?;
    if let Some((sb_key, sb_cert)) = &files.secure_boot {
        let (k, c) = (staged(sb_key), staged(sb_cert));
        Cmd::new(OPENSSL.program)
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256"])
            .args(["-days", &SECURE_BOOT_CERT_DAYS.to_string()])
            .args(["-subj", &format!("/CN={name}")])
            .arg("-keyout")
            .arg(&k)
            .arg("-out")
            .arg(&c)
            .run()
            .context("making the Secure Boot key and certificate")?;
        for (path, mode) in [(&k, PRIVATE_MODE), (&c, PUBLIC_MODE)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
        }
    }
    for path in files.all() {
        std::fs::hard_link(staged(path), path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => refuse_overwrite(path).into(),
            _ => anyhow::Error::new(e).context(format!("creating {}", path.display())),
        })?;
    }
    Ok(files)
}

fn refuse_overwrite(path: &Path) -> BadInput {
    BadInput::file(
        path,
        "already exists; kiln never overwrites a key",
        "choose another NAME or --dir; to replace the key, move the old files away first (and keep trusting the old .pub until its images are gone)",
    )
}

/// Create `path` with `mode` from the start: a private key is never
/// readable by others, not even for a moment.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The umask may have taken bits away from a public file; set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032 test 1: the secret seed and its public key.
    const SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const SIGNATURE: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn rfc_key() -> SigningKey {
        let pair = [unhex(SEED), unhex(PUBLIC)].concat();
        SigningKey::parse(&format!("rfc8032-1:{}\n", b64(&pair))).unwrap()
    }

    #[test]
    fn signs_like_rfc_8032() {
        let key = rfc_key();
        assert_eq!(key.sign(b"").to_vec(), unhex(SIGNATURE));
        assert_eq!(key.public().raw().to_vec(), unhex(PUBLIC));
        assert!(key.public().verifies(b"", &unhex(SIGNATURE)));
        assert!(!key.public().verifies(b"x", &unhex(SIGNATURE)));
    }

    #[test]
    fn text_round_trips() {
        let key = SigningKey::generate("build-1");
        let again = SigningKey::parse(&key.to_text()).unwrap();
        assert_eq!(again.name, "build-1");
        assert_eq!(again.public().raw(), key.public().raw());
        let public = PublicKey::parse(&key.public().to_text()).unwrap();
        assert_eq!(public.to_text(), key.public().to_text());
        assert!(key.to_text().starts_with("build-1:") && key.to_text().ends_with("=\n"));
    }

    #[test]
    fn malformed_keys_say_what_is_wrong() {
        let key = rfc_key();
        let public = key.public().to_text();
        let cases: &[(&str, &str)] = &[
            ("", "no `NAME:`"),
            ("just-base64", "no `NAME:`"),
            ("name:!!!", "not base64"),
            ("name:AAAA", "3 bytes, not 64"),
            (":AAAA", "cannot be empty"),
            ("a b:AAAA", "not a key name"),
            ("a:AAAA\nb:AAAA\n", "more than one line"),
            (&public, "this is a public key"),
        ];
        for (text, says) in cases {
            let why = SigningKey::parse(text).unwrap_err();
            assert!(why.contains(says), "{text:?}: {why}");
        }
        // A public half that is not the seed's.
        let mut pair = [unhex(SEED), unhex(PUBLIC)].concat();
        pair[63] ^= 1;
        let why = SigningKey::parse(&format!("x:{}", b64(&pair))).unwrap_err();
        assert!(why.contains("does not belong"), "{why}");
        let why = PublicKey::parse(&key.to_text()).unwrap_err();
        assert!(why.contains("this is a private key"), "{why}");
    }

    #[test]
    fn key_names() {
        for ok in ["a", "build-2025", "cache.example.org-1", "A_b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a:b", "a b", "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_writes_private_and_public_files_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let files = new(dir.path(), "t", false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(mode(&files.public), 0o644);
        let key = SigningKey::load(&files.key).unwrap();
        assert_eq!(
            key.public().to_text(),
            std::fs::read_to_string(&files.public).unwrap()
        );
        let err = new(dir.path(), "t", false).unwrap_err();
        assert!(
            err.is::<BadInput>() && err.to_string().contains("already exists"),
            "{err:#}"
        );
        // Nothing but the two files: the private folder is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn an_open_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = new(dir.path(), "t", false).unwrap();
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = SigningKey::load(&files.key).unwrap_err();
        let text = err.to_string();
        assert!(err.is::<BadInput>(), "{text}");
        assert!(
            text.contains("mode 0640") && text.contains("chmod 600"),
            "{text}"
        );
    }
}
