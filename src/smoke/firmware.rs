//! Finding UEFI firmware (OVMF) for the smoke boot.
//!
//! Lookup order, first match wins:
//! 1. `--firmware PATH`: a CODE file (its VARS file is looked up beside it,
//!    `CODE`→`VARS` in the name), a combined image (`OVMF.fd`), or a folder
//!    searched like the next ones;
//! 2. the repo's `firmware/` folder: `./firmware` in the current directory,
//!    then the `firmware/` folder of the source tree kiln was built from;
//! 3. the system's OVMF: Debian/Ubuntu, Fedora, Arch paths;
//! 4. the firmware of last resort: `OVMF-pure-efi.fd` of the `ovmf-prebuilt`
//!    crate at 0.1.0-alpha.1, built into kiln (see build.rs) so that a
//!    machine without OVMF can still boot images. QEMU needs it as a file:
//!    it is written once into the store, `firmware-v1/<sha256>.fd`, and
//!    checked against its sha256 on every use. (Later versions of the
//!    crate download the firmware at run time, which cannot work offline.)

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::error::BadInput;

/// The bundled firmware: a combined CODE+VARS image.
const BUNDLED: &[u8] = include_bytes!(env!("KILN_OVMF_PREBUILT"));
/// Names the bundled firmware in messages and the smoke report.
pub const BUNDLED_NAME: &str = "ovmf-prebuilt 0.1.0-alpha.1";

/// A firmware to boot with.
#[derive(Debug, Clone, PartialEq)]
pub struct Firmware {
    /// Mapped read-only (or, without `vars`, a combined image used through
    /// a throwaway copy).
    pub code: PathBuf,
    /// The variable store template; kiln boots a throwaway copy of it.
    pub vars: Option<PathBuf>,
    /// Where it was found, for messages and the report.
    pub origin: String,
}

/// (CODE, VARS) file name pairs, most preferred first, then combined images.
const PAIRS: &[(&str, &str)] = &[
    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.4m.fd", "OVMF_VARS.4m.fd"),
    ("OVMF_CODE.fd", "OVMF_VARS.fd"),
];
const COMBINED: &[&str] = &["OVMF.fd", "OVMF-pure-efi.fd", "OVMF.4m.fd"];
/// Secure Boot builds (with SMM) and their blank VARS templates: Debian,
/// Arch, older Fedora. See `smoke::secure_boot`.
const SECURE_BOOT_PAIRS: &[(&str, &str)] = &[
    ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.fd"),
    ("OVMF_CODE.secboot.4m.fd", "OVMF_VARS.4m.fd"),
    ("OVMF_CODE.secboot.fd", "OVMF_VARS.fd"),
];

/// System folders holding OVMF, by distribution.
const SYSTEM_DIRS: &[(&str, &str)] = &[
    ("/usr/share/OVMF", "Debian/Ubuntu package ovmf"),
    ("/usr/share/edk2/ovmf", "Fedora package edk2-ovmf"),
    ("/usr/share/edk2/x64", "Arch package edk2-ovmf"),
    (
        "/usr/share/edk2-ovmf/x64",
        "Arch package edk2-ovmf (older layout)",
    ),
    ("/usr/share/qemu", "QEMU's own share folder"),
];

/// Find firmware, in the order documented at the top of this file.
/// `store_dir` is the store's `firmware-v1/`, where the bundled firmware is
/// written when nothing else is found.
pub fn find_firmware(explicit: Option<&Path>, store_dir: &Path) -> Result<Firmware> {
    let system: Vec<(PathBuf, String)> = SYSTEM_DIRS
        .iter()
        .map(|(dir, what)| (PathBuf::from(dir), format!("{dir} ({what})")))
        .collect();
    lookup(explicit, &repo_dirs(), &system, store_dir)
}

/// Find the Secure Boot build of the firmware, in the same places as
/// [`find_firmware`] but never the bundled firmware, which has no Secure
/// Boot. An explicit CODE file is taken as it is (with the VARS template
/// beside it); a folder is searched for a Secure Boot pair.
pub fn find_secure_boot_firmware(explicit: Option<&Path>) -> Result<Firmware> {
    let system: Vec<(PathBuf, String)> = SYSTEM_DIRS
        .iter()
        .map(|(dir, what)| (PathBuf::from(dir), format!("{dir} ({what})")))
        .collect();
    lookup_secure_boot(explicit, &repo_dirs(), &system)
}

fn lookup_secure_boot(
    explicit: Option<&Path>,
    repo: &[PathBuf],
    system: &[(PathBuf, String)],
) -> Result<Firmware> {
    let search = |dir: &Path, origin: &str| {
        SECURE_BOOT_PAIRS.iter().find_map(|(code, vars)| {
            let (code, vars) = (dir.join(code), dir.join(vars));
            (code.is_file() && vars.is_file()).then(|| Firmware {
                code,
                vars: Some(vars),
                origin: origin.to_owned(),
            })
        })
    };
    if let Some(path) = explicit {
        let origin = format!("--firmware {}", path.display());
        if path.is_dir() {
            return search(path, &origin)
                .ok_or_else(|| super::secure_boot::no_firmware_error(&[origin]));
        }
        // A Secure Boot CODE file's VARS template does not share its name.
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(fw) = search(dir, &origin).filter(|fw| fw.code == path) {
            return Ok(fw);
        }
        return from_explicit(path);
    }
    let places: Vec<(PathBuf, String)> = repo
        .iter()
        .map(|d| (d.clone(), d.display().to_string()))
        .chain(system.iter().cloned())
        .collect();
    places
        .iter()
        .find_map(|(dir, origin)| search(dir, origin))
        .ok_or_else(|| {
            let searched: Vec<String> = places
                .iter()
                .map(|(d, _)| d.display().to_string())
                .collect();
            super::secure_boot::no_firmware_error(&searched)
        })
}

/// [`find_firmware`] with the folders to search given, for tests.
fn lookup(
    explicit: Option<&Path>,
    repo: &[PathBuf],
    system: &[(PathBuf, String)],
    store_dir: &Path,
) -> Result<Firmware> {
    if let Some(path) = explicit {
        return from_explicit(path);
    }
    let repo = repo.iter().map(|d| (d.clone(), d.display().to_string()));
    for (dir, origin) in repo.chain(system.iter().cloned()) {
        if let Some(fw) = search_dir(&dir, &origin) {
            return Ok(fw);
        }
    }
    bundled(store_dir)
}

/// The bundled firmware as a file in `store_dir`, written there (atomically)
/// on first use and checked on every use after.
fn bundled(store_dir: &Path) -> Result<Firmware> {
    let digest = hex(&Sha256::digest(BUNDLED));
    let path = store_dir.join(format!("{digest}.fd"));
    let intact = match std::fs::read(&path) {
        Ok(bytes) => hex(&Sha256::digest(&bytes)) == digest,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !intact {
        crate::files::write_atomic(&path, BUNDLED).with_context(|| {
            format!(
                "writing kiln's bundled firmware ({BUNDLED_NAME}) to {}; \
                 fix: make the store writable, or install OVMF (Debian/Ubuntu: `apt-get install ovmf`) \
                 or pass --firmware PATH",
                path.display()
            )
        })?;
    }
    Ok(Firmware {
        code: path,
        vars: None,
        origin: format!("{BUNDLED_NAME}, bundled with kiln"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The repo's `firmware/` folders: the current directory's, then the
/// source tree's this binary was built from (a development checkout).
fn repo_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("firmware")];
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware");
    let same = match (
        std::fs::canonicalize(&dirs[0]),
        std::fs::canonicalize(&built_from),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        dirs.push(built_from);
    }
    dirs
}

fn search_dir(dir: &Path, origin: &str) -> Option<Firmware> {
    for (code, vars) in PAIRS {
        let (code, vars) = (dir.join(code), dir.join(vars));
        if code.is_file() && vars.is_file() {
            return Some(Firmware {
                code,
                vars: Some(vars),
                origin: origin.to_owned(),
            });
        }
    }
    COMBINED
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .map(|code| Firmware {
            code,
            vars: None,
            origin: origin.to_owned(),
        })
}

fn from_explicit(path: &Path) -> Result<Firmware> {
    let origin = format!("--firmware {}", path.display());
    if path.is_dir() {
        return match search_dir(path, &origin) {
            Some(fw) => Ok(fw),
            None => Err(BadInput::arg(
                format!(
                    "--firmware {}: no OVMF firmware files in this folder",
                    path.display()
                ),
                "give the folder holding OVMF_CODE*.fd and OVMF_VARS*.fd, or the CODE file itself",
            )
            .into()),
        };
    }
    if !path.is_file() {
        return Err(BadInput::arg(
            format!("--firmware {}: no such file or folder", path.display()),
            "give an OVMF CODE file (with its VARS file beside it), a combined OVMF.fd, or a folder",
        )
        .into());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains("CODE") || name.contains("code") {
        let vars_name = name.replace("CODE", "VARS").replace("code", "vars");
        let vars = path.with_file_name(&vars_name);
        if vars.is_file() {
            return Ok(Firmware {
                code: path.to_owned(),
                vars: Some(vars),
                origin,
            });
        }
        return Err(BadInput::arg(
            format!(
                "--firmware {}: its variable store {vars_name} is not beside it",
                path.display()
            ),
            format!(
                "put {vars_name} next to it, or give a combined firmware image such as OVMF.fd"
            ),
        )
        .into());
    }
    Ok(Firmware {
        code: path.to_owned(),
        vars: None,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"fw").unwrap();
        p
    }

    #[test]
    fn a_folder_prefers_the_4m_pair() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), "OVMF_CODE.fd");
        touch(d.path(), "OVMF_VARS.fd");
        let code = touch(d.path(), "OVMF_CODE_4M.fd");
        let vars = touch(d.path(), "OVMF_VARS_4M.fd");
        let fw = search_dir(d.path(), "test").unwrap();
        assert_eq!((fw.code, fw.vars), (code, Some(vars)));
    }

    #[test]
    fn secure_boot_firmware_is_the_secboot_build_with_the_blank_vars() {
        let d = tempfile::tempdir().unwrap();
        let (repo, system) = (d.path().join("repo"), d.path().join("system"));
        std::fs::create_dir(&repo).unwrap();
        std::fs::create_dir(&system).unwrap();
        // The plain pair alone is no Secure Boot firmware, and the bundled
        // one is never taken.
        touch(&system, "OVMF_CODE_4M.fd");
        touch(&system, "OVMF_VARS_4M.fd");
        touch(&system, "OVMF.fd");
        let sys = [(system.clone(), "system".to_owned())];
        let err = lookup_secure_boot(None, std::slice::from_ref(&repo), &sys).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("OVMF_CODE_4M.secboot.fd") && msg.contains("no Secure Boot"),
            "{msg}"
        );
        assert!(msg.contains(&system.display().to_string()), "{msg}");
        let code = touch(&system, "OVMF_CODE_4M.secboot.fd");
        let fw = lookup_secure_boot(None, std::slice::from_ref(&repo), &sys).unwrap();
        assert_eq!(
            (fw.code, fw.vars),
            (code.clone(), Some(system.join("OVMF_VARS_4M.fd")))
        );
        // An explicit CODE file finds its template beside it.
        let fw = lookup_secure_boot(Some(&code), &[], &[]).unwrap();
        assert_eq!(fw.vars, Some(system.join("OVMF_VARS_4M.fd")));
        assert!(fw.origin.starts_with("--firmware "));
    }

    #[test]
    fn a_combined_image_has_no_vars() {
        let d = tempfile::tempdir().unwrap();
        let code = touch(d.path(), "OVMF-pure-efi.fd");
        let fw = search_dir(d.path(), "test").unwrap();
        assert_eq!((fw.code, fw.vars), (code, None));
        assert!(search_dir(&d.path().join("nope"), "test").is_none());
    }

    #[test]
    fn explicit_code_file_finds_its_vars_or_says_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let code = touch(d.path(), "OVMF_CODE.4m.fd");
        let store = d.path().join("store");
        let err = find_firmware(Some(&code), &store).unwrap_err();
        assert!(
            format!("{err:#}").contains("OVMF_VARS.4m.fd is not beside it"),
            "{err:#}"
        );
        let vars = touch(d.path(), "OVMF_VARS.4m.fd");
        let fw = find_firmware(Some(&code), &store).unwrap();
        assert_eq!(fw.vars, Some(vars));
        assert!(fw.origin.starts_with("--firmware "));
        let err = find_firmware(Some(&d.path().join("missing.fd")), &store).unwrap_err();
        assert!(err.is::<BadInput>());
        assert!(
            !store.exists(),
            "an explicit firmware never touches the store"
        );
    }

    /// Folders `explicit`, `repo`, `system`, each holding a combined image,
    /// and an empty store folder.
    fn four_places(d: &Path) -> [PathBuf; 4] {
        let places = ["explicit", "repo", "system", "store"].map(|n| d.join(n));
        for dir in &places[..3] {
            std::fs::create_dir(dir).unwrap();
            touch(dir, "OVMF.fd");
        }
        places
    }

    #[test]
    fn lookup_order_is_explicit_repo_system_then_bundled() {
        let d = tempfile::tempdir().unwrap();
        let [explicit, repo, system, store] = four_places(d.path());
        let find = |explicit: Option<&Path>| {
            lookup(
                explicit,
                std::slice::from_ref(&repo),
                &[(system.clone(), "system".to_owned())],
                &store,
            )
            .unwrap()
        };
        assert_eq!(find(Some(&explicit)).code, explicit.join("OVMF.fd"));
        assert_eq!(find(None).code, repo.join("OVMF.fd"));
        std::fs::remove_file(repo.join("OVMF.fd")).unwrap();
        let fw = find(None);
        assert_eq!(
            (fw.code, fw.origin),
            (system.join("OVMF.fd"), "system".to_owned())
        );
        assert!(
            !store.exists(),
            "the bundled firmware is written only when used"
        );
        std::fs::remove_file(system.join("OVMF.fd")).unwrap();
        let fw = find(None);
        assert!(fw.code.starts_with(&store), "{}", fw.code.display());
        assert_eq!(fw.vars, None);
        assert!(fw.origin.contains(BUNDLED_NAME), "{}", fw.origin);
    }

    #[test]
    fn the_bundled_firmware_is_written_once_by_its_digest_and_repaired() {
        let d = tempfile::tempdir().unwrap();
        let store = d.path().join("firmware-v1");
        let fw = bundled(&store).unwrap();
        let name = format!("{}.fd", hex(&Sha256::digest(BUNDLED)));
        assert_eq!(fw.code, store.join(&name));
        assert_eq!(std::fs::read(&fw.code).unwrap(), BUNDLED);
        // The firmware QEMU can boot: a 2 MiB flash image.
        assert_eq!(BUNDLED.len(), 2 << 20);
        std::fs::write(&fw.code, b"damaged").unwrap();
        assert_eq!(bundled(&store).unwrap().code, fw.code);
        assert_eq!(
            std::fs::read(&fw.code).unwrap(),
            BUNDLED,
            "a damaged copy is rewritten"
        );
        let names: Vec<_> = std::fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            [std::ffi::OsString::from(name)],
            "no temp file is left beside it"
        );
    }
}
