//! Finding UEFI firmware (OVMF) for the smoke boot.
//!
//! Lookup order, first match wins:
//! 1. `--firmware PATH`: a CODE file (its VARS file is looked up beside it,
//!    `CODE`→`VARS` in the name), a combined image (`OVMF.fd`), or a folder
//!    searched like the next ones;
//! 2. the repo's `firmware/` folder: `./firmware` in the current directory,
//!    then the `firmware/` folder of the source tree kiln was built from;
//! 3. the system's OVMF: Debian/Ubuntu, Fedora, Arch paths;
//! 4. (not done) the `ovmf-prebuilt` crate's bundled `OVMF-pure-efi.fd`:
//!    see firmware/README.md.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::error::BadInput;

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
pub fn find_firmware(explicit: Option<&Path>) -> Result<Firmware> {
    if let Some(path) = explicit {
        return from_explicit(path);
    }
    let mut looked = Vec::new();
    for dir in repo_dirs() {
        if let Some(fw) = search_dir(&dir, &format!("{}", dir.display())) {
            return Ok(fw);
        }
        looked.push(dir.display().to_string());
    }
    for (dir, what) in SYSTEM_DIRS {
        if let Some(fw) = search_dir(Path::new(dir), &format!("{dir} ({what})")) {
            return Ok(fw);
        }
        looked.push((*dir).to_owned());
    }
    bail!(
        "no UEFI firmware (OVMF) found; looked in {}.\n  \
         fix: install it (Debian/Ubuntu: `apt-get install ovmf`, Fedora: `dnf install edk2-ovmf`, \
         Arch: `pacman -S edk2-ovmf`), or pass --firmware PATH, or put OVMF_CODE.fd and \
         OVMF_VARS.fd in firmware/",
        looked.join(", ")
    )
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
        let err = find_firmware(Some(&code)).unwrap_err();
        assert!(
            format!("{err:#}").contains("OVMF_VARS.4m.fd is not beside it"),
            "{err:#}"
        );
        let vars = touch(d.path(), "OVMF_VARS.4m.fd");
        let fw = find_firmware(Some(&code)).unwrap();
        assert_eq!(fw.vars, Some(vars));
        assert!(fw.origin.starts_with("--firmware "));
        let err = find_firmware(Some(&d.path().join("missing.fd"))).unwrap_err();
        assert!(err.is::<BadInput>());
    }
}
