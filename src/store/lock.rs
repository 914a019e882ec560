//! Locks on the store: `flock(2)` on files under `locks/`.
//!
//! ```text
//! locks/store.lock        shared by every build for its whole run,
//!                         exclusive for `kiln cache gc` and `kiln cache verify`
//! locks/<key>.lock        exclusive while one run builds (or repairs) that key
//! locks/recipe-<name>.lock  exclusive while a run appends to the recipe's roots
//! ```
//!
//! Two builds that need the same layer: the first takes `<key>.lock` and
//! builds; the second finds it taken, says so in one line, waits, and then
//! looks in the store again, where it finds the first one's layer.
//!
//! Why flock and not a pid file: the kernel drops a flock when the last file
//! descriptor on it closes, which includes the process dying by `kill -9`.
//! A lock left by a killed run is therefore never held; the lock *file*
//! stays (it is empty and harmless) and the next run simply takes it. There
//! is no stale-lock detection to get wrong, no pid reuse to fool it.
//!
//! A wait polls with a non-blocking flock so that Ctrl-C is seen within
//! [`POLL`], and gives up after [`WAIT_TIMEOUT`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a run waits for another run to finish with a key or the store.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    // Held for its file descriptor: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl Lock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))
}

fn flock(file: &File, mode: Mode, block: bool) -> std::io::Result<bool> {
    let mut op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    if !block {
        op |= libc::LOCK_NB;
    }
    // SAFETY: flock on a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}

/// Take the lock without waiting: `None` if another process holds it.
pub fn try_lock(path: &Path, mode: Mode) -> Result<Option<Lock>> {
    let file = open(path)?;
    if flock(&file, mode, false).with_context(|| format!("locking {}", path.display()))? {
        Ok(Some(Lock {
            _file: file,
            path: path.to_owned(),
        }))
    } else {
        Ok(None)
    }
}

/// Take the lock, waiting for whoever holds it. `waiting` is called once,
/// before the wait starts, only if there is one (to say so in one line).
pub fn lock(path: &Path, mode: Mode, what: &str, waiting: impl FnOnce()) -> Result<Lock> {
    lock_with_timeout(path, mode, what, WAIT_TIMEOUT, waiting)
}

pub fn lock_with_timeout(
    path: &Path,
    mode: Mode,
    what: &str,
    timeout: Duration,
    waiting: impl FnOnce(),
) -> Result<Lock> {
    let file = open(path)?;
    if flock(&file, mode, false).with_context(|| format!("locking {}", path.display()))? {
        return Ok(Lock {
            _file: file,
            path: path.to_owned(),
        });
    }
    waiting();
    let started = Instant::now();
    loop {
        crate::cmd::check_interrupt()?;
        if flock(&file, mode, false).with_context(|| format!("locking {}", path.display()))? {
            return Ok(Lock {
                _file: file,
                path: path.to_owned(),
            });
        }
        if started.elapsed() > timeout {
            bail!(
                "waited {}s for {what} (lock {}) and gave up: another kiln still holds it; \
                 `fuser -v {}` shows which process",
                timeout.as_secs(),
                path.display(),
                path.display()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Whether some process holds a lock on `path` in a way that conflicts
/// with `mode` (used to tell a live run's staging dir from a dead one's).
pub fn is_held(path: &Path, mode: Mode) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    matches!(flock(&file, mode, false), Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_drop_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/k.lock");
        let held = try_lock(&path, Mode::Exclusive)
            .unwrap()
            .expect("free lock");
        // flock is per open file description: a second open conflicts even
        // within one process, just as another process would.
        assert!(try_lock(&path, Mode::Exclusive).unwrap().is_none());
        assert!(try_lock(&path, Mode::Shared).unwrap().is_none());
        assert!(is_held(&path, Mode::Shared));
        drop(held);
        assert!(!is_held(&path, Mode::Exclusive));
        assert!(try_lock(&path, Mode::Exclusive).unwrap().is_some());
    }

    #[test]
    fn shared_locks_coexist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.lock");
        let a = try_lock(&path, Mode::Shared).unwrap();
        let b = try_lock(&path, Mode::Shared).unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(try_lock(&path, Mode::Exclusive).unwrap().is_none());
    }

    #[test]
    fn a_wait_says_so_once_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.lock");
        let _held = try_lock(&path, Mode::Exclusive).unwrap().unwrap();
        let mut said = 0;
        let err = lock_with_timeout(
            &path,
            Mode::Exclusive,
            "layer x",
            Duration::from_millis(250),
            || said += 1,
        )
        .unwrap_err();
        assert_eq!(said, 1);
        assert!(format!("{err:#}").contains("gave up"), "{err:#}");
    }

    #[test]
    fn a_lock_of_a_killed_process_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.lock");
        // A shell takes the lock on fd 9 and becomes `sleep`; we SIGKILL it.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exec 9>\"$1\" && flock 9 && exec sleep 60", "sh"])
            .arg(&path)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !is_held(&path, Mode::Exclusive) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "flock(1) never took the lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            try_lock(&path, Mode::Exclusive).unwrap().is_some(),
            "the dead process's lock is still held"
        );
    }
}
