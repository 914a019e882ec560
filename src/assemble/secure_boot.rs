//! Signing the UKI for UEFI Secure Boot.
//!
//! With `--secure-boot-key KEY --secure-boot-cert CERT` (an RSA key and its
//! X.509 certificate, PEM; UEFI firmware verifies RSA, not Ed25519), the
//! UKI gets an Authenticode signature from Debian's `sbsign` as the very
//! last change to it: after the PE timestamp and checksum fix, since any
//! byte changed after signing voids the signature.
//!
//! ## What is keyed, what is recorded
//!
//! The image key covers the certificate's SHA-256 fingerprint (of its DER
//! form), never the private key: a signed image is another cache entry
//! than the unsigned one, a new certificate rebuilds, and computing a key
//! needs no secret. Without a key the image key, and so the disk, is the
//! same as before kiln could sign.
//!
//! ## Not bit-identical, and how `--check-repro` copes
//!
//! An Authenticode signature carries its signing time (a PKCS#7 signed
//! attribute), so two signings of the same UKI differ in a few hundred
//! bytes; `sbattach --remove` does not give the unsigned file back either.
//! kiln records the digest of the UKI *before* signing
//! ([`SignedUki::unsigned_sha256`]), which is reproducible. The second
//! build of `--check-repro` compares its own unsigned UKI with that digest
//! and, when they match, reuses the first build's signed UKI ([`Reuse`]) in
//! place of a new signature: the rest of the two disks must then be
//! identical byte for byte, as without signing. When they do not match it
//! signs afresh and the comparison fails on the ESP.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::cmd::Cmd;
use crate::error::BadInput;
use crate::plan::key::{bytes_digest, file_digest};

/// What `kiln key new NAME --secure-boot` writes, for messages.
const MAKE_A_KEY: &str = "make a pair with `kiln key new NAME --secure-boot`, or \
     `openssl req -x509 -newkey rsa:2048 -nodes -keyout NAME.sb.key -out NAME.sb.crt -subj /CN=NAME -days 3650`";

/// A Secure Boot signing key and its certificate, checked.
#[derive(Debug, Clone)]
pub struct SecureBootKey {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// SHA-256 of the certificate's DER form, hex (what `openssl x509
    /// -fingerprint -sha256` shows, without colons).
    pub fingerprint: String,
}

/// How a signed image's UKI came to be, as the store and the manifest
/// keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedUki {
    /// sha256 of the UKI before signing: reproducible, unlike the signed file.
    pub unsigned_sha256: String,
    /// sha256 of the signed UKI on the ESP (`EFI/BOOT/BOOTX64.EFI`).
    pub signed_sha256: String,
    /// SHA-256 fingerprint of the signing certificate (DER).
    pub certificate_sha256: String,
    /// The certificate itself (PEM): public, and what a smoke boot enrolls
    /// into the firmware's db.
    pub certificate_pem: String,
}

/// A signed UKI to put on the ESP instead of signing again (the second
/// build of `--check-repro`), if the UKI built now is the one it signs.
#[derive(Debug, Clone)]
pub struct Reuse {
    pub signed_uki: PathBuf,
    pub unsigned_sha256: String,
}

/// What assembly does to the UKI.
#[derive(Debug, Clone)]
pub struct Signer {
    pub key: SecureBootKey,
    pub reuse: Option<Reuse>,
}

/// The key pair given on the command line (or in KILN_SECURE_BOOT_KEY /
/// KILN_SECURE_BOOT_CERT), checked: both or neither, the key private to
/// its owner, unencrypted and matching the certificate, an RSA certificate.
/// Every problem is bad input (exit 2) naming the file and the fix.
pub fn load(key: Option<&Path>, cert: Option<&Path>) -> Result<Option<SecureBootKey>> {
    let (key, cert) = match (key, cert) {
        (None, None) => return Ok(None),
        (Some(key), Some(cert)) => (key, cert),
        (Some(_), None) | (None, Some(_)) => {
            return Err(BadInput::arg(
                "--secure-boot-key and --secure-boot-cert go together: one was given without the other",
                "give both (or set both KILN_SECURE_BOOT_KEY and KILN_SECURE_BOOT_CERT), or neither to build an unsigned image",
            )
            .into())
        }
    };
    // Before openssl is asked about the files, so that its absence is not
    // mistaken for a bad file.
    crate::cmd::require_tools(&[crate::cmd::SIGNING_TOOLS])?;
    check_key_file(key)?;
    let fingerprint = cert_fingerprint(cert)?;
    let bad_cert = |problem: String, fix: &str| -> anyhow::Error {
        BadInput::new(cert, "--secure-boot-cert", problem, fix).into()
    };
    let text = Cmd::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(cert)
        .output()
        .map_err(|e| bad_cert(format!("openssl cannot read it: {e:#}"), MAKE_A_KEY))?
        .stdout_str();
    if !text.contains("rsaEncryption") {
        return Err(bad_cert(
            "its public key is not RSA; UEFI firmware verifies RSA signatures (2048 bits is what OVMF and most machines take)".into(),
            MAKE_A_KEY,
        ));
    }
    let cert_public = Cmd::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(cert)
        .output()
        .map_err(|e| bad_cert(format!("openssl cannot read it: {e:#}"), MAKE_A_KEY))?
        .stdout;
    // `-passin pass:` makes an encrypted key fail instead of prompting.
    let key_public = Cmd::new("openssl")
        .args(["pkey", "-pubout", "-passin", "pass:", "-in"])
        .arg(key)
        .output()
        .map_err(|e| {
            BadInput::new(
                key,
                "--secure-boot-key",
                format!("not an unencrypted private key in PEM form ({e:#})"),
                format!("decrypt it (`openssl pkey -in KEY -out KEY.plain`, then chmod 600), or {MAKE_A_KEY}"),
            )
        })?
        .stdout;
    if cert_public != key_public {
        return Err(BadInput::new(
            key,
            "--secure-boot-key",
            format!("this key is not the one certified by {}", cert.display()),
            "give the certificate made with this key (the NAME.sb.key / NAME.sb.crt pair)",
        )
        .into());
    }
    Ok(Some(SecureBootKey {
        key: key.to_owned(),
        cert: cert.to_owned(),
        fingerprint,
    }))
}

/// A private key must exist, be a file, and be private to its owner.
fn check_key_file(key: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |problem: String, fix: String| -> anyhow::Error {
        BadInput::new(key, "--secure-boot-key", problem, fix).into()
    };
    let meta = std::fs::metadata(key).map_err(|e| {
        bad(
            format!("cannot read the key file: {e}"),
            format!("give the path of the private key (NAME.sb.key); {MAKE_A_KEY}"),
        )
    })?;
    if !meta.is_file() {
        return Err(bad("not a file".into(), "give the NAME.sb.key file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(
            format!("the private key is readable by others (mode {mode:04o})"),
            format!(
                "`chmod 600 {}`, and consider the key exposed if others could read it",
                key.display()
            ),
        ));
    }
    std::fs::File::open(key).map_err(|e| {
        bad(
            format!("cannot open the key file: {e}"),
            "make it readable by the user running kiln (root)".into(),
        )
    })?;
    Ok(())
}

/// The SHA-256 fingerprint of a PEM certificate (of its DER form), hex.
pub fn cert_fingerprint(cert: &Path) -> Result<String> {
    let bad = |problem: String| -> anyhow::Error {
        BadInput::new(cert, "--secure-boot-cert", problem, MAKE_A_KEY).into()
    };
    let pem = std::fs::read_to_string(cert)
        .map_err(|e| bad(format!("cannot read the certificate: {e}")))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(bad(
            "not an X.509 certificate in PEM form (no BEGIN CERTIFICATE line); a DER file converts with `openssl x509 -inform DER -in CERT -out CERT.pem`".into(),
        ));
    }
    let der = Cmd::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(cert)
        .output()
        .map_err(|e| bad(format!("openssl cannot parse it: {e:#}")))?;
    Ok(bytes_digest(&der.stdout))
}

/// Sign `uki` in place (or put the reused signed UKI there) and say how.
/// Checks the result with `sbverify` against the certificate.
pub fn sign(uki: &Path, signer: &Signer, scratch: &Path) -> Result<SignedUki> {
    let unsigned_sha256 = file_digest(uki).with_context(|| format!("hashing {}", uki.display()))?;
    let signed = scratch.join("uki.signed.efi");
    let reused = signer
        .reuse
        .as_ref()
        .filter(|r| r.unsigned_sha256 == unsigned_sha256);
    match (reused, &signer.reuse) {
        (Some(r), _) => {
            crate::cmd::log_line(&format!(
                "the UKI is the one {} signs (unsigned sha256 {unsigned_sha256}): reusing that signature",
                r.signed_uki.display()
            ));
            std::fs::copy(&r.signed_uki, &signed).with_context(|| {
                format!("copying {} to {}", r.signed_uki.display(), signed.display())
            })?;
        }
        (None, reuse) => {
            if let Some(r) = reuse {
                eprintln!(
                    "kiln: the UKI differs from the first build's (unsigned sha256 {unsigned_sha256}, first build {}): signing it afresh",
                    r.unsigned_sha256
                );
            }
            Cmd::new("sbsign")
                .arg("--key")
                .arg(&signer.key.key)
                .arg("--cert")
                .arg(&signer.key.cert)
                .arg("--output")
                .arg(&signed)
                .arg(uki)
                .run()
                .context("signing the UKI for Secure Boot")?;
        }
    }
    Cmd::new("sbverify")
        .arg("--cert")
        .arg(&signer.key.cert)
        .arg(&signed)
        .run()
        .context("checking the UKI's Secure Boot signature")?;
    std::fs::rename(&signed, uki)
        .with_context(|| format!("renaming {} to {}", signed.display(), uki.display()))?;
    let certificate_pem = std::fs::read_to_string(&signer.key.cert)
        .with_context(|| format!("reading {}", signer.key.cert.display()))?;
    Ok(SignedUki {
        unsigned_sha256,
        signed_sha256: file_digest(uki).with_context(|| format!("hashing {}", uki.display()))?,
        certificate_sha256: signer.key.fingerprint.clone(),
        certificate_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh RSA key and self-signed certificate, as `kiln key new
    /// --secure-boot` makes them.
    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = dir.join(format!("{name}.sb.key"));
        let cert = dir.join(format!("{name}.sb.crt"));
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .arg("-subj")
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("running openssl (make deps installs it)");
        assert!(status.success());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (key, cert)
    }

    fn bad_input(r: Result<Option<SecureBootKey>>) -> String {
        let e = r.expect_err("should be refused");
        assert!(e.is::<BadInput>(), "not bad input: {e:#}");
        format!("{e:#}")
    }

    #[test]
    fn a_good_pair_loads_with_the_certificates_fingerprint() {
        let d = tempfile::tempdir().unwrap();
        let (key, cert) = pair(d.path(), "a");
        let k = load(Some(&key), Some(&cert)).unwrap().unwrap();
        let der = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        let want = String::from_utf8_lossy(&der.stdout)
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase();
        assert_eq!(k.fingerprint, want);
        assert!(load(None, None).unwrap().is_none());
    }

    #[test]
    fn signing_verifies_and_a_matching_uki_reuses_the_earlier_signature() {
        let d = tempfile::tempdir().unwrap();
        let (key, cert) = pair(d.path(), "a");
        let key = load(Some(&key), Some(&cert)).unwrap().unwrap();
        // systemd's EFI stub stands in for a UKI: a PE file sbsign signs.
        let uki = d.path().join("uki.efi");
        std::fs::copy(super::super::STUB, &uki).unwrap();
        let unsigned = std::fs::read(&uki).unwrap();
        let fresh = Signer {
            key: key.clone(),
            reuse: None,
        };
        let first = sign(&uki, &fresh, d.path()).unwrap();
        let signed = std::fs::read(&uki).unwrap();
        assert_eq!(first.unsigned_sha256, bytes_digest(&unsigned));
        assert_eq!(first.signed_sha256, bytes_digest(&signed));
        assert_ne!(signed, unsigned);
        assert_eq!(first.certificate_sha256, key.fingerprint);
        assert!(first.certificate_pem.contains("BEGIN CERTIFICATE"));

        // The same unsigned UKI, given the first signed file: reused as it is.
        let kept = d.path().join("first.efi");
        std::fs::write(&kept, &signed).unwrap();
        let reuse = Signer {
            key: key.clone(),
            reuse: Some(Reuse {
                signed_uki: kept.clone(),
                unsigned_sha256: first.unsigned_sha256.clone(),
            }),
        };
        std::fs::write(&uki, &unsigned).unwrap();
        assert_eq!(sign(&uki, &reuse, d.path()).unwrap(), first);
        assert_eq!(std::fs::read(&uki).unwrap(), signed);

        // Another unsigned UKI is signed afresh, not given the old signature.
        let mut other = unsigned.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        std::fs::write(&uki, &other).unwrap();
        let again = sign(&uki, &reuse, d.path()).unwrap();
        assert_eq!(again.unsigned_sha256, bytes_digest(&other));
        assert_ne!(again.signed_sha256, first.signed_sha256);
    }

    #[test]
    fn bad_keys_and_certificates_are_bad_input_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (key, cert) = pair(d.path(), "a");
        let (other_key, _) = pair(d.path(), "b");
        let msg = bad_input(load(Some(&key), None));
        assert!(msg.contains("go together"), "{msg}");
        let msg = bad_input(load(None, Some(&cert)));
        assert!(msg.contains("go together"), "{msg}");

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let msg = bad_input(load(Some(&key), Some(&cert)));
        assert!(
            msg.contains(&key.display().to_string()) && msg.contains("chmod 600"),
            "{msg}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

        let msg = bad_input(load(Some(&d.path().join("missing.key")), Some(&cert)));
        assert!(msg.contains("missing.key"), "{msg}");

        let garbage = d.path().join("garbage.key");
        std::fs::write(&garbage, "not a key\n").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
        let msg = bad_input(load(Some(&garbage), Some(&cert)));
        assert!(msg.contains("garbage.key") && msg.contains("PEM"), "{msg}");

        let msg = bad_input(load(Some(&other_key), Some(&cert)));
        assert!(msg.contains("not the one certified"), "{msg}");

        // The key where the certificate belongs.
        let msg = bad_input(load(Some(&key), Some(&key)));
        assert!(msg.contains("BEGIN CERTIFICATE"), "{msg}");
    }
}
