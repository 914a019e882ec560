//! A sealed image's smoke (`[image] verity = true`): kiln's own in-guest
//! check that the root really is what the manifest says, and the console
//! lines of a kernel that found a tampered block.
//!
//! The check ([`guest_check`]) runs after the recipe's: `/` is mounted
//! read-only from `/dev/mapper/root`, that device is a dm-verity target
//! whose root hash (from `dmsetup table`, what the kernel verifies
//! against) is the manifest's, and a write to `/usr` fails.

use std::path::Path;

use anyhow::{Context, Result};

/// How the built-in check reads in reports.
pub const GUEST_CHECK_NAME: &str =
    "the root is read-only on dm-verity with the manifest's root hash, and /usr refuses writes";

/// The built-in in-guest check for a sealed image whose manifest records
/// `root_hash`.
pub fn guest_check(root_hash: &str) -> String {
    // dmsetup table: `0 SECTORS verity VERSION DATA HASH DBS HBS BLOCKS
    // HASH_START ALGORITHM DIGEST SALT [OPTIONS]`.
    format!(
        r#"want={root_hash}
m=$(findmnt -rno SOURCE,OPTIONS /); echo "/ is mounted from $m"
case "$m" in "/dev/mapper/root "*) ;; *) echo "/ is not mounted from /dev/mapper/root"; exit 1;; esac
case ",${{m#* }}," in *,ro,*) ;; *) echo "/ is not mounted read-only"; exit 1;; esac
t=$(dmsetup table root) || exit 1
set -- $t
test "$3" = verity || {{ echo "/dev/mapper/root is a $3 device, not verity: $t"; exit 1; }}
echo "running root hash ${{12}}"
test "${{12}}" = "$want" || {{ echo "the manifest's root hash is $want"; exit 1; }}
if touch /usr/.kiln-sealed-write 2>/dev/null; then echo "a write to /usr succeeded"; rm -f /usr/.kiln-sealed-write; exit 1; fi
echo "a write to /usr failed, as it should""#
    )
}

/// The root hash the manifest beside `image` (`out/NAME.manifest.json`)
/// records, when the image is sealed; `None` for an image that is not, or
/// that has no manifest.
pub fn for_image(image: &Path) -> Result<Option<String>> {
    let manifest = crate::record::manifest::path_for(image);
    if !manifest.is_file() {
        return Ok(None);
    }
    let m = crate::record::manifest::read(&manifest).with_context(|| {
        format!(
            "reading {} to see whether the image is sealed",
            manifest.display()
        )
    })?;
    Ok(m.verity.map(|v| v.root_hash))
}

/// A kernel line that says dm-verity found a block that does not match its
/// hash: "device-mapper: verity: 254:0: data block 1234 is corrupted", or
/// the panic that `panic-on-corruption` makes of it.
pub fn is_verity_error(line: &str) -> bool {
    (line.contains("device-mapper: verity") && line.contains("is corrupted"))
        || line.contains("dm-verity device corrupted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_kernels_verity_errors() {
        assert!(is_verity_error(
            "[   61.123456] device-mapper: verity: 254:0: data block 1234 is corrupted"
        ));
        assert!(is_verity_error(
            "[   61.2] Kernel panic - not syncing: dm-verity device corrupted"
        ));
        assert!(!is_verity_error(
            "[   55.0] device-mapper: verity: sha256 using shash \"sha256-generic\""
        ));
    }

    #[test]
    fn the_check_is_valid_shell() {
        let script = guest_check(&"ab".repeat(32));
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The hash compared is the 12th field of dmsetup's verity table.
        let table = format!(
            "0 4194304 verity 1 /dev/vda2 /dev/vda3 4096 4096 524288 1 sha256 {} 00 1 panic_on_corruption",
            "ab".repeat(32)
        );
        let probe = format!(
            "set -- {table}; test \"${{12}}\" = {} && test \"$3\" = verity",
            "ab".repeat(32)
        );
        assert!(std::process::Command::new("sh")
            .args(["-c", &probe])
            .status()
            .unwrap()
            .success());
    }
}
