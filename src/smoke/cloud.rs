//! A cloud-init NoCloud seed for the smoke boot.
//!
//! cloud-init's NoCloud data source reads `meta-data` and `user-data` from
//! a file system labelled `cidata` (or `CIDATA`). kiln writes one as a
//! small FAT image, without mounting anything (`mkfs.fat -C`, then
//! `mcopy`), in the smoke's temp dir, and attaches it to the VM as a
//! second virtio disk. It names a fresh host name and instance id for the
//! boot and one user whose authorized key is the boot's throwaway key; the
//! smoke then logs in as that user and checks the host name. The image
//! itself carries no instance data: all of it comes from the seed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cmd::Cmd;

/// The user the seed creates and the smoke logs in as.
pub const USER: &str = "kiln";
/// The seed's file system label, as NoCloud looks for it.
pub const LABEL: &str = "CIDATA";
/// The seed disk's virtio serial (seen in the guest as
/// /dev/disk/by-id/virtio-cidata).
pub const SERIAL: &str = "cidata";
/// Size of the FAT image: the smallest mkfs.fat makes without complaint.
const SEED_KIB: u32 = 1440;
/// Bound on mkfs.fat and mcopy.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// What one boot's seed says.
#[derive(Debug, Clone)]
pub struct Seed {
    pub instance_id: String,
    pub hostname: String,
    pub user: String,
    /// The public key line the user may log in with.
    pub public_key: String,
}

impl Seed {
    /// A seed for the boot with this nonce.
    pub fn new(nonce: &str, public_key: &str) -> Seed {
        let short = &nonce[..nonce.len().min(8)];
        Seed {
            instance_id: format!("kiln-smoke-{nonce}"),
            hostname: format!("kiln-{short}"),
            user: USER.to_owned(),
            public_key: public_key.to_owned(),
        }
    }

    pub fn meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.instance_id, self.hostname
        )
    }

    /// `#cloud-config` user-data: the host name and one user with the key
    /// (no password: a key is the only way in).
    pub fn user_data(&self) -> String {
        format!(
            "#cloud-config\n\
             hostname: {host}\n\
             preserve_hostname: false\n\
             users:\n  \
             - name: {user}\n    \
             shell: /bin/bash\n    \
             lock_passwd: true\n    \
             ssh_authorized_keys:\n      \
             - {key}\n",
            host = self.hostname,
            user = self.user,
            key = self.public_key,
        )
    }

    /// The check kiln runs as the seeded user over SSH: the host name and
    /// the user are the seed's. (That cloud-init finished cleanly is for
    /// an in-guest check, as root: `cloud-init status` needs root.)
    pub fn check(&self) -> String {
        format!(
            "test \"$(id -un)\" = {user} && test \"$(hostname)\" = {host} || {{ echo \"user $(id -un), host name $(hostname)\"; exit 1; }}",
            user = self.user,
            host = self.hostname,
        )
    }

    /// Write the seed volume into `dir`; returns its path (a raw image).
    pub fn write_volume(&self, dir: &Path) -> Result<PathBuf> {
        let files = dir.join("cidata");
        std::fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
        let image = dir.join("cidata.img");
        Cmd::new("mkfs.fat")
            .args(["-C", "-n", LABEL])
            .arg(&image)
            .arg(SEED_KIB.to_string())
            .timeout(TOOL_TIMEOUT)
            .run()
            .context("making the cloud-init seed volume")?;
        for (name, text) in [
            ("meta-data", self.meta_data()),
            ("user-data", self.user_data()),
        ] {
            let path = files.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Cmd::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&image)
                .arg(&path)
                .arg(format!("::{name}"))
                .timeout(TOOL_TIMEOUT)
                .run()
                .with_context(|| format!("copying {name} onto the cloud-init seed volume"))?;
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        Seed::new("0123456789abcdef", "ssh-ed25519 AAAA kiln-smoke")
    }

    #[test]
    fn the_seed_names_the_host_the_user_and_the_key() {
        let s = seed();
        assert_eq!(
            s.meta_data(),
            "instance-id: kiln-smoke-0123456789abcdef\nlocal-hostname: kiln-01234567\n"
        );
        let user_data = s.user_data();
        assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
        // Parsed as YAML would be: checked here with the TOML-free shape.
        for want in [
            "hostname: kiln-01234567\n",
            "users:\n  - name: kiln\n",
            "    ssh_authorized_keys:\n      - ssh-ed25519 AAAA kiln-smoke\n",
            "    lock_passwd: true\n",
        ] {
            assert!(user_data.contains(want), "{want:?} not in\n{user_data}");
        }
        assert!(s.check().contains("= kiln-01234567"));
    }

    #[test]
    fn the_check_is_valid_shell() {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &seed().check()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn the_volume_is_fat_labelled_cidata_with_both_files() {
        let d = tempfile::tempdir().unwrap();
        let s = seed();
        let image = s.write_volume(d.path()).unwrap();
        let read = |args: &[&str]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let img = image.to_str().unwrap();
        assert!(read(&["mlabel", "-i", img, "-s", "::"]).contains(LABEL));
        assert_eq!(read(&["mtype", "-i", img, "::meta-data"]), s.meta_data());
        assert_eq!(read(&["mtype", "-i", img, "::user-data"]), s.user_data());
    }
}
