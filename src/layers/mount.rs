//! Mounts, always undone.
//!
//! kiln moves itself into a private mount namespace before it mounts
//! anything ([`enter_private_namespace`]), so the host never sees its
//! overlays and bind mounts, and a `kill -9` cannot leave one behind: the
//! namespace dies with the process. Within a run, [`Mounts`] unmounts in
//! reverse order when dropped, on success and on every error path, falling
//! back to a lazy detach so that a staging dir is never removed while
//! something is still mounted inside it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cmd::log_line;

/// Unshare the mount namespace and make every mount in it private. Must be
/// called before any other thread exists (the namespace is per thread until
/// children inherit it).
pub fn enter_private_namespace() -> Result<()> {
    // SAFETY: plain syscalls with valid arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("unshare(CLONE_NEWNS): kiln build must run as root");
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("making / a private mount");
        }
    }
    Ok(())
}

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// The mode of an image's root directory.
const ROOT_MODE: u32 = 0o755;

/// A stack of mounts, undone in reverse order on drop.
#[derive(Default)]
pub struct Mounts {
    targets: Vec<PathBuf>,
}

impl Mounts {
    pub fn new() -> Mounts {
        Mounts::default()
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> Result<()> {
        let shown = format!(
            "mount {}{}{} {}",
            fstype.map(|t| format!("-t {t} ")).unwrap_or_default(),
            data.map(|d| format!("-o {d} ")).unwrap_or_default(),
            source,
            target.display()
        );
        log_line(&format!("$ {shown}"));
        let c_source = CString::new(source)?;
        let c_target = cstr(target)?;
        let c_type = fstype.map(CString::new).transpose()?;
        let c_data = data.map(CString::new).transpose()?;
        // SAFETY: all pointers are valid NUL-terminated strings or null.
        let rc = unsafe {
            libc::mount(
                c_source.as_ptr(),
                c_target.as_ptr(),
                c_type.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
                flags,
                c_data
                    .as_ref()
                    .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            bail!("`{shown}` failed: {err}");
        }
        self.targets.push(target.to_owned());
        Ok(())
    }

    /// overlayfs: `lowers` topmost first. Options are explicit so a stored
    /// upper dir is a self-contained diff: no metacopy (an upper file always
    /// holds its data), no redirects, no index.
    pub fn overlay(
        &mut self,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> Result<()> {
        let lowerdir = lowers
            .iter()
            .map(|p| escape_overlay(p))
            .collect::<Vec<_>>()
            .join(":");
        let mut data =
            format!("lowerdir={lowerdir},redirect_dir=off,index=off,metacopy=off,xino=off");
        if let Some((upper, work)) = upper {
            data.push_str(&format!(
                ",upperdir={},workdir={}",
                escape_overlay(upper),
                escape_overlay(work)
            ));
        }
        if let Some((upper, _)) = upper {
            // The upper dir's own mode is the mode of the merged root, and
            // it was made with whatever umask kiln had: pin it, so the
            // image's `/` does not depend on the caller.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(upper, std::fs::Permissions::from_mode(ROOT_MODE))
                .with_context(|| format!("chmod {ROOT_MODE:o} {}", upper.display()))?;
        }
        let flags = if upper.is_none() { libc::MS_RDONLY } else { 0 };
        self.mount("overlay", target, Some("overlay"), flags, Some(&data))
    }

    pub fn bind(&mut self, source: &Path, target: &Path) -> Result<()> {
        let src = source
            .to_str()
            .with_context(|| format!("{} is not UTF-8", source.display()))?
            .to_owned();
        self.mount(&src, target, None, libc::MS_BIND, None)
    }

    pub fn tmpfs(&mut self, target: &Path) -> Result<()> {
        self.mount(
            "tmpfs",
            target,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        )
    }

    pub fn fs(&mut self, fstype: &str, target: &Path) -> Result<()> {
        self.mount(
            fstype,
            target,
            Some(fstype),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )
    }

    /// Undo every mount now, reporting the first failure.
    pub fn unmount_all(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some(target) = self.targets.pop() {
            if let Err(e) = unmount(&target) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            log_line(&format!("warning: {e:#}"));
        }
    }
}

fn unmount(target: &Path) -> Result<()> {
    log_line(&format!("$ umount {}", target.display()));
    let c = cstr(target)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    // Busy (a process still has a file open): detach it from the tree now so
    // nothing below can be reached through it; the kernel finishes later.
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        log_line(&format!("  (detached lazily: {err})"));
        return Ok(());
    }
    Err(std::io::Error::last_os_error()).with_context(|| format!("unmounting {}", target.display()))
}

/// overlayfs separates options with ',' and layers with ':'.
fn escape_overlay(path: &Path) -> String {
    path.to_string_lossy()
        .replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}
