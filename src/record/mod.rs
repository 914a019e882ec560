//! Records of a build: what is in an image, where it came from, who built
//! it, and whether a disk or a running system still matches it.
//!
//! After every build, next to `out/NAME.qcow2`:
//!
//! ```text
//! out/NAME.manifest.json    kiln-manifest-v1: inputs (recipe, lock, step keys),
//!                           image key and sha256, packages, every path of the
//!                           root filesystem, who/where/when, the recipe's git commit
//! out/NAME.spdx.json        SPDX 2.3 SBOM of the installed Debian packages (purls)
//! out/NAME.provenance.json  in-toto Statement v1, SLSA provenance v1 predicate;
//!                           subjects: the disk and the manifest
//! out/NAME.provenance.intoto.jsonl   with a signing key: that statement in a
//!                           signed DSSE envelope (see `signed`)
//! out/NAME.smoke.json       after the smoke boot: in-toto Statement v1,
//!                           test-result predicate (see `smoke`)
//! <store>/state-v1/history/NAME.jsonl   one line per build, appended
//! ```
//!
//! The file list is made once, when the image is assembled (the merged
//! layers are walked before mke2fs, see `assemble`), and kept in the store
//! beside the disk as `images-v1/<key>/files.json`, so a cached image gets
//! the same manifest as a freshly built one. So is who built the image and
//! when (`built`: the run that assembled it): the records of a no-op
//! rebuild are byte-identical to the last ones, and so is their signature.
//! The history says who ran each build.
//!
//! `verify` compares a disk (read without mounting: qemu-img to raw, then
//! `debugfs rdump`) or a live root directory with a manifest; `repro`
//! finds the first difference between two builds of the same recipe.

pub mod diff;
pub mod history;
pub mod manifest;
pub mod provenance;
pub mod repro;
pub mod sbom;
pub mod signed;
pub mod smoke;
pub mod tree;
pub mod verify;

use std::path::Path;

use anyhow::{Context, Result};
use sha2::Digest;

use crate::files::{publish, publish_json};
use crate::plan::Plan;
use crate::sign::key::SigningKey;
use crate::store::{BuiltBy, ImageEntry, Store};

pub use crate::plan::DEFAULT_SOURCE_DATE_EPOCH;

/// What the records of one build are made from.
pub struct BuildFacts<'a> {
    pub plan: &'a Plan,
    pub store: &'a Store,
    pub image: &'a ImageEntry,
    /// The exported disk, `out/NAME.qcow2`.
    pub exported: &'a Path,
    /// The deployable files of `[image] formats`, in `out/`.
    pub outputs: &'a [crate::export::Output],
    pub out_dir: &'a Path,
    /// `recipes/NAME.lock`, once locks exist.
    pub lock: Option<&'a Path>,
    pub source_date_epoch: u64,
    /// Unix seconds when the build started.
    pub started: u64,
    /// Sign the provenance with this key (`--signing-key`).
    pub signing_key: Option<&'a SigningKey>,
}

/// Write the manifest, SBOM and provenance to `out/`, the signed provenance
/// when there is a key (removing a stale one when there is not), and append
/// the build to the recipe's history in the store.
pub fn write_all(facts: &BuildFacts) -> Result<()> {
    let name = &facts.plan.recipe.image.name;
    let manifest = manifest::make(facts).context("making the manifest")?;
    let manifest_path = facts.out_dir.join(format!("{name}.manifest.json"));
    let provenance_path = facts.out_dir.join(format!("{name}.provenance.json"));
    // Records are published, like the disk: readable by everyone.
    let manifest_bytes = crate::files::json(&manifest_path, &manifest)?;
    publish(&manifest_path, &manifest_bytes)?;
    let sbom = facts.out_dir.join(format!("{name}.spdx.json"));
    publish_json(&sbom, &sbom::spdx(&manifest))?;
    let materials = provenance::materials(facts)?;
    let statement = provenance::statement(
        &manifest,
        &crate::plan::key::hex(&sha2::Sha256::digest(&manifest_bytes)),
        &materials,
    );
    // The envelope signs exactly the bytes of the provenance file.
    let statement_bytes = crate::files::json(&provenance_path, &statement)?;
    publish(&provenance_path, &statement_bytes)?;
    let signed_path = signed::path_for(facts.exported);
    match facts.signing_key {
        Some(key) => signed::write(&signed_path, &statement_bytes, key)?,
        None => {
            if signed::remove_stale(&signed_path)? {
                eprintln!(
                    "removed {}: it signed an earlier build, and this one had no signing key (--signing-key or KILN_SIGNING_KEY)",
                    signed_path.display()
                );
            }
        }
    }
    let run = manifest::Built::of_run(builder(), facts.started, crate::store::now());
    history::append(facts.store, &manifest, &run).context("appending to the build history")?;
    Ok(())
}

/// Who is building, on which host.
pub fn builder() -> BuiltBy {
    let (user, sudo_user) = user();
    BuiltBy {
        user,
        sudo_user,
        host: hostname(),
    }
}

/// `2023-11-14T22:13:20Z` from Unix seconds.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Who is building: the effective user (its name from /etc/passwd), and
/// the user behind sudo if any.
pub fn user() -> (String, Option<String>) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let user = user_name(&passwd, uid).unwrap_or_else(|| format!("uid {uid}"));
    (user, std::env::var("SUDO_USER").ok())
}

fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_come_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name(passwd, 7), None);
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
