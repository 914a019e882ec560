//! Smoke boots with UEFI Secure Boot enforced.
//!
//! A signed image is booted the way a machine with Secure Boot on boots
//! it, so the smoke proves that the firmware runs what kiln signed (and
//! nothing else does):
//!
//! * the firmware's Secure Boot build (`OVMF_CODE_4M.secboot.fd` on
//!   Debian; it needs SMM, so the machine is `q35,smm=on` with the flash
//!   marked secure and S3 off, see `qemu::args`);
//! * a throwaway VARS copy, made from the firmware's blank VARS template
//!   by `virt-fw-vars` (PyPI virt-firmware), whose PK, KEK and db hold one
//!   certificate and whose SecureBootEnable is set. Which certificate
//!   ([`decide`]): `--secure-boot-cert`, else the one the image was signed
//!   with (its manifest carries it), else, for `--secure-boot on` with an
//!   unsigned image, Debian's snakeoil test certificate, which signed
//!   nothing kiln built, so the firmware must refuse the UKI;
//! * one more in-guest check, [`GUEST_CHECK`], which reads the SecureBoot
//!   EFI variable: Secure Boot must really be on in the guest, not merely
//!   asked for on QEMU's command line.
//!
//! A UKI the firmware refuses makes OVMF print "Security Violation" for
//! the boot option; `console` turns that into its own failure.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::assemble::secure_boot::{cert_fingerprint, SignedUki};
use crate::cmd::Cmd;

/// `--secure-boot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecureBootMode {
    /// On for an image whose UKI kiln signed, off otherwise.
    Auto,
    On,
    Off,
}

/// Debian's test certificate (package ovmf), "for testing purposes only":
/// what `--secure-boot on` enrolls for an unsigned image.
pub const SNAKEOIL_CERT: &str = "/usr/share/ovmf/PkKek-1-snakeoil.pem";
/// The program that enrolls a certificate into a VARS copy.
const VIRT_FW_VARS: &str = "virt-fw-vars";
/// Where `make deps` installs it when no `virt-fw-vars` is on PATH.
const PYTOOLS_BIN: &str = "/opt/kiln/venv/bin";
/// The owner GUID edk2 gives its default keys; mkosi enrolls with it too.
const OWNER_GUID: &str = "OvmfEnrollDefaultKeys";

/// The built-in in-guest check. The EFI global variable SecureBoot says
/// whether Secure Boot is on; efivarfs shows it as 4 bytes of attributes,
/// then one byte, 1 when on.
pub const GUEST_CHECK: &str = "v=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c; \
     b=$(od -An -tu1 \"$v\") || exit 2; echo \"SecureBoot variable (attributes, value):$b\"; test \"${b##* }\" = 1";
/// How the built-in check reads in reports.
pub const GUEST_CHECK_NAME: &str =
    "Secure Boot is on in the guest (its SecureBoot EFI variable is 1)";

/// The certificate a Secure Boot smoke enrolls in the firmware's db.
#[derive(Debug, Clone, PartialEq)]
pub struct DbCert {
    pub pem: String,
    /// SHA-256 of its DER form, hex.
    pub fingerprint: String,
    /// Where it came from, for the report: a file, or the image's manifest.
    pub origin: String,
}

/// What a Secure Boot smoke enrolled, for the report and record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureBootUsed {
    pub certificate_sha256: String,
    pub certificate_origin: String,
    /// The blank VARS template the throwaway copy was made from.
    pub vars_template: PathBuf,
}

impl DbCert {
    fn from_file(path: &Path, origin: String) -> Result<DbCert> {
        let fingerprint = cert_fingerprint(path)?;
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(DbCert {
            pem,
            fingerprint,
            origin,
        })
    }
}

/// Which certificate to enroll, or `None` to boot without Secure Boot (see
/// the module docs). `signed` is how the image's UKI was signed, from its
/// manifest; `explicit` is `--secure-boot-cert`.
pub fn decide(
    mode: SecureBootMode,
    signed: Option<&SignedUki>,
    explicit: Option<&Path>,
) -> Result<Option<DbCert>> {
    let on = match mode {
        SecureBootMode::Off => false,
        SecureBootMode::On => true,
        SecureBootMode::Auto => signed.is_some(),
    };
    if !on {
        return Ok(None);
    }
    if let Some(path) = explicit {
        return DbCert::from_file(path, format!("--secure-boot-cert {}", path.display())).map(Some);
    }
    if let Some(s) = signed {
        return Ok(Some(DbCert {
            pem: s.certificate_pem.clone(),
            fingerprint: s.certificate_sha256.clone(),
            origin: "the image's signing certificate (from its manifest)".to_owned(),
        }));
    }
    let snakeoil = Path::new(SNAKEOIL_CERT);
    if !snakeoil.is_file() {
        anyhow::bail!(
            "--secure-boot on for an unsigned image enrolls Debian's test certificate {SNAKEOIL_CERT}, which is missing: \
             install the Debian package ovmf, or pass --secure-boot-cert CERT"
        );
    }
    DbCert::from_file(
        snakeoil,
        format!("{SNAKEOIL_CERT} (Debian's test certificate: the image is not signed)"),
    )
    .map(Some)
}

/// [`decide`] for a built image, reading whether it is signed from its
/// manifest beside it (`out/NAME.manifest.json`); an image without one is
/// taken as unsigned.
pub fn for_image(
    mode: SecureBootMode,
    image: &Path,
    explicit: Option<&Path>,
) -> Result<Option<DbCert>> {
    let manifest = crate::record::manifest::path_for(image);
    let signed = if mode == SecureBootMode::Off || !manifest.is_file() {
        None
    } else {
        crate::record::manifest::read(&manifest)
            .with_context(|| {
                format!(
                    "reading {} to see whether the image is signed for Secure Boot \
                     (or say it: --secure-boot on|off)",
                    manifest.display()
                )
            })?
            .secure_boot
    };
    decide(mode, signed.as_ref(), explicit)
}

/// The Secure Boot build of the firmware is required; without one, say
/// where kiln looked and what to install.
pub fn no_firmware_error(searched: &[String]) -> anyhow::Error {
    anyhow::anyhow!(
        "Secure Boot needs an OVMF build with Secure Boot and SMM (Debian: /usr/share/OVMF/OVMF_CODE_4M.secboot.fd, \
         package ovmf), and none was found in {}; the ovmf-prebuilt firmware built into kiln has no Secure Boot. \
         Fix: `apt-get install ovmf` (or `make deps`), pass --firmware CODE_FILE, or boot with --secure-boot off",
        searched.join(", ")
    )
}

/// `virt-fw-vars` on PATH, else where `make deps` puts it.
fn virt_fw_vars() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::iter::once(PathBuf::from(PYTOOLS_BIN)))
        .map(|dir| dir.join(VIRT_FW_VARS))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{VIRT_FW_VARS} is not installed (looked on PATH and in {PYTOOLS_BIN}); a Secure Boot smoke uses it \
                 to enroll the certificate into a throwaway copy of the firmware's variables. \
                 Fix: `make deps` installs it (PyPI virt-firmware, into /opt/kiln/venv), or boot with --secure-boot off"
            )
        })
}

/// Write `out`: a copy of the blank VARS `template` whose PK, KEK and db
/// hold `cert`, with Secure Boot enabled. `scratch` holds the certificate
/// file on the way.
pub fn enroll(template: &Path, cert: &DbCert, out: &Path, scratch: &Path) -> Result<()> {
    let program = virt_fw_vars()?;
    let pem = scratch.join("secure-boot-db.pem");
    std::fs::write(&pem, &cert.pem).with_context(|| format!("writing {}", pem.display()))?;
    Cmd::new(program)
        .arg("--input")
        .arg(template)
        .arg("--output")
        .arg(out)
        .arg("--enroll-cert")
        .arg(&pem)
        .args(["--add-db", OWNER_GUID])
        .arg(&pem)
        .args(["--no-microsoft", "--secure-boot"])
        .run()
        .context("enrolling the Secure Boot certificate into the firmware's variables")?;
    std::fs::remove_file(&pem).with_context(|| format!("removing {}", pem.display()))
}
