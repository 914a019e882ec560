//! The one way kiln runs an external program.
//!
//! Every tool kiln drives (mmdebstrap, mke2fs, sfdisk, mtools, qemu-img,
//! QEMU, chroot'ed apt) goes through [`Cmd`], which
//!
//! * writes the command line, quoted so it can be pasted into a shell, to the
//!   build log before it starts;
//! * sends stdout and stderr line by line to the build log, and to the
//!   terminal too with `-v`;
//! * keeps the last lines of output so that a failure's error message shows
//!   why the tool failed, not just that it did;
//! * starts the child in its own process group, so a Ctrl-C reaches kiln
//!   first and kiln tears the whole group down before undoing its mounts;
//! * has a timeout (every wait in kiln is bounded and named);
//! * gives the child a fixed process state, whoever runs kiln: umask 022,
//!   `TZ=UTC`, `LC_ALL=C.UTF-8`, fixed soft rlimits, and a `TMPDIR` of its
//!   own inside the store's `tmp/` (removed when the child is done, on every
//!   path), so neither the caller's umask, time zone or locale reaches what
//!   a tool writes into an image, nor does a tool leave files in the
//!   caller's `$TMPDIR`.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::error::exit as error_exit;

/// Lines of output kept for an error message.
const TAIL_LINES: usize = 25;
/// Default bound on any one external program.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How often a running child is checked for timeout and Ctrl-C.
const POLL: Duration = Duration::from_millis(50);
/// The umask of kiln and of every program it runs: what Debian's tools
/// expect, and what makes a file's mode the same for every caller.
pub const UMASK: libc::mode_t = 0o022;
/// The environment every program kiln runs gets, over what it inherits.
pub const FIXED_ENV: &[(&str, &str)] = &[("TZ", "UTC"), ("LC_ALL", "C.UTF-8")];
/// Inherited variables that would override or refine [`FIXED_ENV`].
const DROPPED_ENV: &[&str] = &["LANGUAGE", "LANG", "TZDIR"];
/// Soft limits every child starts with (capped at the hard limit, which an
/// unprivileged caller may have lowered): the caller's `ulimit -n`, `-s`,
/// `-c` or `-f` must not change what a tool does or writes.
const RLIMITS: &[(libc::__rlimit_resource_t, libc::rlim_t)] = &[
    (libc::RLIMIT_NOFILE, 1024),
    (libc::RLIMIT_STACK, 8 << 20),
    (libc::RLIMIT_CORE, 0),
    (libc::RLIMIT_FSIZE, libc::RLIM_INFINITY),
];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static LOG: OnceLock<Arc<Mutex<LogSink>>> = OnceLock::new();
/// Where each child's own TMPDIR is made (the store's `tmp/`).
static TOOL_TMP: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// Fix kiln's own process state, before anything else runs: the umask (for
/// what kiln itself writes into layers and images) and the environment
/// variables of [`FIXED_ENV`] (for the programs it starts directly rather
/// than through [`Cmd`], such as QEMU).
pub fn fix_process_state() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(UMASK) };
    for key in DROPPED_ENV {
        std::env::remove_var(key);
    }
    for (key, value) in FIXED_ENV {
        std::env::set_var(key, value);
    }
}

/// Make each child's TMPDIR inside `dir` (the store's `tmp/`, which kiln
/// cleans of dead runs' debris) rather than in the caller's `$TMPDIR`.
pub fn set_tool_tmp(dir: &Path) {
    *TOOL_TMP.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.to_owned());
}

/// Run `f` with another process umask and time zone than kiln's own, as a
/// different caller would have; restored afterwards. `--check-repro` runs
/// its second build so, to catch anything that lets them reach the image.
pub fn with_other_caller_state<T>(umask: libc::mode_t, tz: &str, f: impl FnOnce() -> T) -> T {
    struct Restore {
        umask: libc::mode_t,
        tz: Option<OsString>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(self.umask) };
            match &self.tz {
                Some(tz) => std::env::set_var("TZ", tz),
                None => std::env::remove_var("TZ"),
            }
        }
    }
    // SAFETY: umask cannot fail.
    let old = unsafe { libc::umask(umask) };
    let _restore = Restore {
        umask: old,
        tz: std::env::var_os("TZ"),
    };
    std::env::set_var("TZ", tz);
    f()
}

/// The result of some work followed by its clean-up (an unmount, removing
/// a temp dir). The work's own error is what went wrong and stays the
/// error (its exit code too); a clean-up failure after it is added as
/// context. A clean-up failure after success is the error.
pub fn keep_first_error<T>(work: Result<T>, cleanup: Result<()>) -> Result<T> {
    match (work, cleanup) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(c)) => Err(c),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(c)) => Err(e.context(format!(
            "cleaning up after the error below also failed ({c:#}); the first error"
        ))),
    }
}

/// A program kiln runs and the Debian package that has it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// A name looked up on `PATH`, or an absolute path.
    pub program: &'static str,
    pub package: &'static str,
}

const fn tool(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package }
}

/// What building layers runs (`kiln lock` too).
pub const LAYER_TOOLS: &[Tool] = &[
    tool("mmdebstrap", "mmdebstrap"),
    tool("chroot", "coreutils"),
    tool("dpkg-query", "dpkg"),
    tool("apt-ftparchive", "apt-utils"),
    tool("/usr/lib/apt/apt-helper", "apt"),
];
/// What assembling a disk runs, beyond [`LAYER_TOOLS`].
pub const ASSEMBLY_TOOLS: &[Tool] = &[
    tool("mke2fs", "e2fsprogs"),
    tool("debugfs", "e2fsprogs"),
    tool("sfdisk", "fdisk"),
    tool("mkfs.fat", "dosfstools"),
    tool("mmd", "mtools"),
    tool("mcopy", "mtools"),
    tool("objcopy", "binutils"),
    tool("objdump", "binutils"),
    tool("qemu-img", "qemu-utils"),
    tool(
        "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
        "systemd-boot-efi",
    ),
];
/// What `kiln verify` of a sealed disk runs to check its hash partition
/// (kiln writes the tree itself: see `assemble::verity`).
pub const VERITY_TOOLS: &[Tool] = &[tool("veritysetup", "cryptsetup-bin")];
/// What signing a UKI for Secure Boot runs, beyond [`ASSEMBLY_TOOLS`].
pub const SIGNING_TOOLS: &[Tool] = &[
    tool("openssl", "openssl"),
    tool("sbsign", "sbsigntool"),
    tool("sbverify", "sbsigntool"),
];
/// What a smoke boot runs.
pub const SMOKE_TOOLS: &[Tool] = &[
    tool("qemu-system-x86_64", "qemu-system-x86"),
    tool("qemu-img", "qemu-utils"),
];

/// A smoke that logs in over SSH: the OpenSSH client and its key maker.
pub const SSH_SMOKE_TOOLS: &[Tool] = &[
    tool("ssh", "openssh-client"),
    tool("ssh-keygen", "openssh-client"),
];

/// A smoke that seeds cloud-init: the seed volume is a FAT image.
pub const CLOUD_SMOKE_TOOLS: &[Tool] = &[tool("mkfs.fat", "dosfstools"), tool("mcopy", "mtools")];

/// The tools a smoke of `spec` runs.
pub fn smoke_tools(spec: &crate::recipe::SmokeSpec) -> Vec<&'static [Tool]> {
    let mut tools = vec![SMOKE_TOOLS];
    if spec.ssh || spec.cloud_init {
        tools.push(SSH_SMOKE_TOOLS);
    }
    if spec.cloud_init {
        tools.push(CLOUD_SMOKE_TOOLS);
    }
    tools
}

/// Fail, before any work, naming every program of `tools` that is not
/// installed and the Debian packages to install. Exit code 1: the host
/// lacks something, the recipe and arguments are fine.
pub fn require_tools(tools: &[&[Tool]]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut missing: Vec<Tool> = Vec::new();
    for t in tools.iter().copied().flatten() {
        if missing.iter().any(|m| m.program == t.program) || is_installed(t.program, &path) {
            continue;
        }
        missing.push(*t);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.sort();
    packages.dedup();
    bail!(
        "required programs are not installed: {}
  fix: apt-get install {} (or `make deps`);          programs are looked up on PATH={}",
        missing
            .iter()
            .map(|t| format!("{} (package {})", t.program, t.package))
            .collect::<Vec<_>>()
            .join(", "),
        packages.join(" "),
        path.to_string_lossy()
    )
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    is_installed(program, &std::env::var_os("PATH").unwrap_or_default())
}

fn is_installed(program: &str, path: &OsStr) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.starts_with('/') {
        // An absolute path may be data (the UEFI stub), not a program.
        return Path::new(program).is_file();
    }
    std::env::split_paths(path).any(|dir| runnable(&dir.join(program)))
}

/// Where the output of tools goes.
struct LogSink {
    file: Option<std::fs::File>,
    verbose: bool,
}

type Sink = Arc<Mutex<LogSink>>;
type Times = Arc<Mutex<Vec<ToolTime>>>;

thread_local! {
    /// A thread's own log and tool times ([`ThreadLog`]), when it builds one
    /// recipe of several; otherwise the process's ([`set_log`], [`TIMES`]).
    static THREAD_LOG: std::cell::RefCell<Option<(Sink, Times)>> =
        const { std::cell::RefCell::new(None) };
}

/// Set where tool output is logged (`out/NAME.build.log`) and whether it is
/// also streamed to the terminal (`-v`).
pub fn set_log(file: Option<std::fs::File>, verbose: bool) {
    let sink = LOG.get_or_init(|| {
        Arc::new(Mutex::new(LogSink {
            file: None,
            verbose,
        }))
    });
    let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
    sink.file = file;
    sink.verbose = verbose;
}

/// This thread's own build log and tool times, for as long as it lives:
/// `kiln build A.toml B.toml` builds each recipe in a thread of its own,
/// each with its `out/NAME.build.log` and the `tools` of its summary.
/// The programs a thread runs log there too (their output is pumped by
/// other threads, which are handed the sink).
pub struct ThreadLog(());

impl ThreadLog {
    pub fn start(file: std::fs::File, verbose: bool) -> ThreadLog {
        let sink = Arc::new(Mutex::new(LogSink {
            file: Some(file),
            verbose,
        }));
        THREAD_LOG.with(|t| *t.borrow_mut() = Some((sink, Arc::default())));
        ThreadLog(())
    }
}

impl Drop for ThreadLog {
    fn drop(&mut self) {
        THREAD_LOG.with(|t| *t.borrow_mut() = None);
    }
}

/// The log this thread writes to: its own, else the process's.
fn current_sink() -> Option<Sink> {
    THREAD_LOG
        .with(|t| t.borrow().as_ref().map(|(sink, _)| sink.clone()))
        .or_else(|| LOG.get().cloned())
}

/// Append one line to the build log (and to stderr with `-v`).
pub fn log_line(line: &str) {
    log_to(current_sink().as_ref(), line);
}

fn log_to(sink: Option<&Sink>, line: &str) {
    let Some(sink) = sink else { return };
    let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = sink.file.as_mut() {
        // A full disk while logging must not hide the real error: the log
        // is best effort, the command's own result is what matters.
        if writeln!(f, "{line}").is_err() {
            sink.file = None;
        }
    }
    if sink.verbose {
        eprintln!("  │ {line}");
    }
}

/// Install the SIGINT/SIGTERM handler: the first signal sets a flag that
/// every wait in kiln polls; running children are killed, guards unwind
/// (unmount, remove temp dirs) and kiln exits 130.
pub fn install_signal_handlers() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGHUP, handler);
    }
}

/// Run the rest of kiln as process 1 of a new pid namespace, so that no
/// process it starts can outlive it, even after a `kill -9`.
///
/// A child killed by [`Cmd`] on Ctrl-C takes its process group with it, but
/// a `kill -9` of kiln itself runs no code: mmdebstrap, apt or QEMU would
/// keep running, orphaned, and keep the mount namespace (and its overlays)
/// alive. So kiln forks: the child becomes pid 1 of a new pid namespace and
/// does the work; the parent only waits, forwards SIGINT/SIGTERM/SIGHUP,
/// and exits with the child's status. When pid 1 of a namespace dies the
/// kernel kills every process in it, and the child has
/// `PR_SET_PDEATHSIG=SIGKILL`, so killing either process ends them all. The
/// child gets its own /proc (in a private mount namespace) so that pids
/// seen by the tools match their namespace.
///
/// Must be called before any other thread exists. Returns only in the child.
pub fn isolate_processes() -> Result<()> {
    // SAFETY: plain syscalls; fork with a single thread.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("unshare(CLONE_NEWPID): kiln build must run as root");
        }
        // The parent holds the write end for as long as it lives, so the
        // child can tell whether it died before PR_SET_PDEATHSIG was set.
        let mut alive = [0; 2];
        if libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error()).context("pipe2");
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_PDEATHSIG)");
            }
            libc::close(alive[1]);
            let mut poll = libc::pollfd {
                fd: alive[0],
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut poll, 1, 0) != 0 {
                // Hung up: the parent died before prctl took effect.
                libc::_exit(error_exit::FAILURE);
            }
            libc::close(alive[0]);
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error()).context("making / a private mount");
            }
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error())
                    .context("mounting /proc for kiln's pid namespace");
            }
            return Ok(());
        }
        libc::close(alive[0]);
        let mut forwarded = false;
        loop {
            let mut status = 0;
            let rc = libc::waitpid(pid, &mut status, libc::WNOHANG);
            if rc == pid {
                if libc::WIFEXITED(status) {
                    std::process::exit(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    std::process::exit(128 + libc::WTERMSIG(status));
                }
            } else if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINTR) {
                    eprintln!("error: waiting for kiln's worker process: {err}");
                    std::process::exit(error_exit::FAILURE);
                }
            }
            if interrupted() && !forwarded {
                libc::kill(pid, libc::SIGINT);
                forwarded = true;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The error kiln returns when it was interrupted: exit code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// A program [`Cmd`] killed at its timeout (callers that judge a
/// program's result, like an SSH check, tell it from other failures).
#[derive(Debug, thiserror::Error)]
#[error("`{line}` did not finish within {secs}s and was killed")]
pub struct TimedOut {
    pub line: String,
    pub secs: u64,
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fail with [`Interrupted`] if Ctrl-C was pressed.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Quote one word for a POSIX shell, only when it needs it.
pub fn shell_quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if safe {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// An external program to run.
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<std::path::PathBuf>,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
    clear_env: bool,
    /// A non-zero exit is the caller's to judge, not an error.
    any_status: bool,
    /// What its time counts as in [`tool_times`] (default: the program's
    /// file name).
    label: Option<String>,
}

/// What a finished program printed.
pub struct Output {
    pub stdout: Vec<u8>,
    /// Its exit status (always success unless [`Cmd::any_status`]).
    pub status: std::process::ExitStatus,
    /// The last lines of its stderr (and of its stdout when not captured).
    pub tail: Vec<String>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            timeout: DEFAULT_TIMEOUT,
            stdin: None,
            clear_env: false,
            any_status: false,
            label: None,
        }
    }

    /// Return a non-zero exit in [`Output::status`] instead of failing:
    /// for a program whose exit code is a result (a remote command's).
    pub fn any_status(mut self) -> Cmd {
        self.any_status = true;
        self
    }

    /// Count this program's time as `label` in [`tool_times`] (e.g.
    /// `apt-get install` for a chroot's apt-get).
    pub fn timed_as(mut self, label: impl Into<String>) -> Cmd {
        self.label = Some(label.into());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Start from an empty environment (plus what `env` adds): nothing of
    /// the host's environment, credentials included, reaches the program.
    pub fn env_clear(mut self) -> Cmd {
        self.clear_env = true;
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Cmd {
        self.cwd = Some(dir.to_owned());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    pub fn stdin_bytes(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }

    /// The command line as a user could paste it into a shell.
    pub fn display(&self) -> String {
        let mut parts: Vec<String> = self
            .envs
            .iter()
            .map(|(k, v)| format!("{}={}", k.to_string_lossy(), shell_quote(v)))
            .collect();
        parts.push(shell_quote(&self.program));
        parts.extend(self.args.iter().map(|a| shell_quote(a)));
        parts.join(" ")
    }

    /// Run to completion; stdout is logged, not captured.
    pub fn run(self) -> Result<()> {
        self.exec(false).map(|_| ())
    }

    /// Run to completion and capture stdout (stderr is logged).
    pub fn output(self) -> Result<Output> {
        self.exec(true)
    }

    fn exec(self, capture: bool) -> Result<Output> {
        check_interrupt()?;
        let line = self.display();
        log_line(&format!("$ {line}"));
        let mut command = Command::new(&self.program);
        if self.clear_env {
            command.env_clear();
        }
        for key in DROPPED_ENV {
            command.env_remove(key);
        }
        command.envs(FIXED_ENV.iter().copied());
        // A program that runs in the host's environment gets a TMPDIR of
        // its own; one whose environment is cleared (a chroot) inherits
        // none, and a host path would not exist inside it anyway.
        let tmp = if self.clear_env {
            None
        } else {
            let dir = tool_tmp_dir()?;
            command.env("TMPDIR", dir.path());
            Some(dir)
        };
        let result = self.exec_in(command, capture, &line);
        match tmp {
            Some(dir) => keep_first_error(result, dir.remove()),
            None => result,
        }
    }

    fn exec_in(self, command: Command, capture: bool, line: &str) -> Result<Output> {
        let label = self.label.clone().unwrap_or_else(|| {
            Path::new(&self.program)
                .file_name()
                .unwrap_or(&self.program)
                .to_string_lossy()
                .into_owned()
        });
        let started = Instant::now();
        let result = self.spawn_and_wait(command, capture, line);
        record_time(label, started.elapsed().as_secs_f64());
        result
    }

    fn spawn_and_wait(self, mut command: Command, capture: bool, line: &str) -> Result<Output> {
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls (umask, getrlimit, setrlimit).
        unsafe {
            command.pre_exec(|| {
                libc::umask(UMASK);
                for &(resource, soft) in RLIMITS {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(resource, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = if limit.rlim_max == libc::RLIM_INFINITY {
                        soft
                    } else {
                        soft.min(limit.rlim_max)
                    };
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|e| {
            let program = self.program.to_string_lossy();
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "`{program}` is not installed (needed to run: {line}); \
                     install it with `make deps` or see the README"
                )
            } else {
                anyhow!("could not start `{line}`: {e}")
            }
        })?;
        let started = Instant::now();
        let pidfd = pidfd_open(child.id());
        let stdin_writer = self.stdin.map(|data| {
            let mut stdin = child.stdin.take().expect("stdin was piped");
            // Dropping `stdin` at the end closes the pipe: the child sees EOF.
            std::thread::spawn(move || stdin.write_all(&data))
        });
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let sink = current_sink();
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        let out_reader = if capture {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut stdout = stdout;
                stdout.read_to_end(&mut buf).map(|_| buf)
            })
        } else {
            let (tail, sink) = (tail.clone(), sink.clone());
            std::thread::spawn(move || pump(stdout, &tail, sink.as_ref()).map(|_| Vec::new()))
        };
        let err_tail = tail.clone();
        let err_reader = std::thread::spawn(move || pump(stderr, &err_tail, sink.as_ref()));

        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for a child process")? {
                break status;
            }
            let timed_out = started.elapsed() > self.timeout;
            if interrupted() || timed_out {
                kill_group(child.id());
                // Reap it so no zombie is left; the group was sent SIGKILL.
                child.wait().context("reaping a killed child process")?;
                if timed_out && !interrupted() {
                    return Err(TimedOut {
                        line: line.to_owned(),
                        secs: self.timeout.as_secs(),
                    }
                    .into());
                }
                return Err(Interrupted.into());
            }
            wait_for_exit(pidfd.as_ref());
        };
        let stdout = out_reader
            .join()
            .map_err(|_| anyhow!("output reader thread panicked"))?
            .context("reading a child's stdout")?;
        err_reader
            .join()
            .map_err(|_| anyhow!("output reader thread panicked"))?
            .context("reading a child's stderr")?;
        // Children of the child (e.g. gpg-agent started by apt) must not
        // outlive the step either.
        kill_group(child.id());
        // A child that stopped reading its input may have acted on part of
        // it: that is a failure even when it exits 0.
        let stdin_result = match stdin_writer {
            None => Ok(()),
            Some(writer) => writer
                .join()
                .map_err(|_| anyhow!("stdin writer thread panicked"))?
                .with_context(|| format!("writing the input of `{line}`")),
        };
        log_line(&format!(
            "  ({status}, {:.1}s)",
            started.elapsed().as_secs_f64()
        ));
        let tail: Vec<String> = tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        if !status.success() && !self.any_status {
            let what = match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => format!("was killed ({status})"),
            };
            let failed = anyhow!(
                "command failed: {line}\n  it {what}; its last output:\n    {}",
                tail.join("\n    ")
            );
            return keep_first_error(Err(failed), stdin_result);
        }
        stdin_result?;
        Ok(Output {
            stdout,
            status,
            tail,
        })
    }
}

/// A descriptor that becomes readable when the process `pid` exits
/// (Linux 5.3 and later); `None` where there is none.
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative result is a descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Wait until the child exits or [`POLL`] passes, whichever is first (so an
/// interrupt or a timeout is still seen within [`POLL`]): a program that
/// takes 5 ms no longer costs a 50 ms sleep.
fn wait_for_exit(pidfd: Option<&std::os::fd::OwnedFd>) {
    use std::os::fd::AsRawFd;
    let Some(fd) = pidfd else {
        std::thread::sleep(POLL);
        return;
    };
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for at most POLL. An error (EINTR from
    // Ctrl-C) just ends this wait early; the caller checks again.
    let ready = unsafe { libc::poll(&mut poll, 1, POLL.as_millis() as libc::c_int) };
    if ready < 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Seconds spent in each kind of tool during this run, for the summary's
/// `tools` (where a build's time goes).
static TIMES: Mutex<Vec<ToolTime>> = Mutex::new(Vec::new());

/// The time a run spent in one tool (or one kind of in-process work).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolTime {
    pub tool: String,
    pub runs: u32,
    pub seconds: f64,
}

/// Add `seconds` of `label` to [`tool_times`].
pub fn record_time(label: String, seconds: f64) {
    with_times(|times| match times.iter_mut().find(|t| t.tool == label) {
        Some(t) => {
            t.runs += 1;
            t.seconds += seconds;
        }
        None => times.push(ToolTime {
            tool: label,
            runs: 1,
            seconds,
        }),
    })
}

/// Work on this thread's tool times ([`ThreadLog`]), else the process's.
fn with_times<T>(work: impl FnOnce(&mut Vec<ToolTime>) -> T) -> T {
    let own = THREAD_LOG.with(|t| t.borrow().as_ref().map(|(_, times)| times.clone()));
    let mut times = match &own {
        Some(times) => times.lock(),
        None => TIMES.lock(),
    }
    .unwrap_or_else(|e| e.into_inner());
    work(&mut times)
}

/// Run `work`, counting its time as `label` in [`tool_times`].
pub fn timed<T>(label: &str, work: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = work();
    record_time(label.to_owned(), started.elapsed().as_secs_f64());
    result
}

/// Every tool's time so far in this run, the longest first.
pub fn tool_times() -> Vec<ToolTime> {
    let mut times = with_times(|times| times.clone());
    times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    times
}

/// A child's own TMPDIR: a claimed dir in the store's `tmp/` (so a
/// concurrent kiln's clean-up leaves it alone and the next run removes it
/// if this one is killed), or in the caller's temp dir before a store is
/// open.
struct ToolTmp(Option<tempfile::TempDir>);

fn tool_tmp_dir() -> Result<ToolTmp> {
    let base = TOOL_TMP
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("tool-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temp dir for a tool in {}", base.display()))?;
    crate::store::claim(dir.path())?;
    Ok(ToolTmp(Some(dir)))
}

impl ToolTmp {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("present until removed").path()
    }

    /// Remove the dir and what the tool left there (after undoing any
    /// mount a killed tool left inside).
    fn remove(mut self) -> Result<()> {
        let dir = self.0.take().expect("present until removed");
        let path = dir.keep();
        crate::store::release_claim(&path);
        crate::store::unmount_under(&path)?;
        crate::store::remove_tree(&path)
            .with_context(|| format!("removing the tool's temp dir {}", path.display()))
    }
}

impl Drop for ToolTmp {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            crate::store::release_claim(dir.path());
        }
    }
}

fn pump(
    stream: impl Read,
    tail: &Mutex<VecDeque<String>>,
    sink: Option<&Sink>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        log_to(sink, line);
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }
}

/// SIGKILL a process group started by [`Cmd`] (the group id is the pid).
pub fn kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; a group
    // that no longer exists gives ESRCH, which is exactly the state we want.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tool_times_add_up_per_label_longest_first() {
        // Labels of this test only: other tests run programs at the same time.
        record_time("kiln-test-short".into(), 0.5);
        timed("kiln-test-long", || {
            std::thread::sleep(Duration::from_millis(20))
        });
        record_time("kiln-test-short".into(), 0.25);
        record_time("kiln-test-long".into(), 1.0);
        let times: Vec<ToolTime> = tool_times()
            .into_iter()
            .filter(|t| t.tool.starts_with("kiln-test-"))
            .collect();
        assert_eq!(times.len(), 2, "{times:?}");
        assert_eq!(
            (times[0].tool.as_str(), times[0].runs),
            ("kiln-test-long", 2)
        );
        assert!(times[0].seconds >= 1.02, "{times:?}");
        assert_eq!(times[1].runs, 2);
        assert!((times[1].seconds - 0.75).abs() < 1e-9, "{times:?}");
    }

    use super::*;

    #[test]
    fn quoting_round_trips_through_a_shell_word() {
        let cases = [
            ("plain", "plain"),
            ("a b", "'a b'"),
            ("it's", r"'it'\''s'"),
            ("", "''"),
            ("/usr/lib/x.efi", "/usr/lib/x.efi"),
            ("$(rm -rf /)", "'$(rm -rf /)'"),
        ];
        for (input, want) in cases {
            assert_eq!(shell_quote(OsStr::new(input)), want, "{input}");
        }
    }

    #[test]
    fn display_shows_env_and_args() {
        let cmd = Cmd::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", "1")
            .args(["-L", "root fs"]);
        assert_eq!(cmd.display(), "E2FSPROGS_FAKE_TIME=1 mke2fs -L 'root fs'");
    }

    #[test]
    fn failure_names_the_command_and_its_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c 'echo oops >&2; exit 3'"), "{msg}");
        assert!(msg.contains("status 3"), "{msg}");
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn missing_program_says_to_install_it() {
        let err = Cmd::new("kiln-no-such-tool").run().unwrap_err();
        assert!(format!("{err:#}").contains("is not installed"), "{err:#}");
    }

    #[test]
    fn output_captures_stdout_and_stdin() {
        let out = Cmd::new("cat").stdin_bytes("hello").output().unwrap();
        assert_eq!(out.stdout_str(), "hello");
    }

    #[test]
    fn a_cleanup_failure_is_added_to_the_first_error_not_put_in_its_place() {
        let first = || -> Result<()> { Err(Interrupted.into()) };
        let err = keep_first_error(first(), Err(anyhow!("unmounting /x: busy"))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("interrupted") && msg.contains("unmounting /x"),
            "{msg}"
        );
        assert_eq!(
            crate::error::exit_code(&err),
            crate::error::exit::INTERRUPTED
        );
        assert!(keep_first_error(Ok(()), Err(anyhow!("busy"))).is_err());
        assert_eq!(keep_first_error(Ok(7), Ok(())).unwrap(), 7);
    }

    #[test]
    fn input_the_child_did_not_read_is_an_error() {
        // `true` exits without reading: the write hits a closed pipe.
        let err = Cmd::new("true")
            .stdin_bytes(vec![b'x'; 1 << 20])
            .run()
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("writing the input of"),
            "{err:#}"
        );
        let err = Cmd::new("sh")
            .args(["-c", "exit 4"])
            .stdin_bytes(vec![b'x'; 1 << 20])
            .run()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("status 4") && msg.contains("writing the input"),
            "{msg}"
        );
    }

    #[test]
    fn children_get_a_fixed_umask_time_zone_locale_and_temp_dir() {
        let out = with_other_caller_state(0o077, "Asia/Kathmandu", || {
            Cmd::new("sh")
                .args([
                    "-c",
                    "umask; echo $TZ $LC_ALL; ulimit -c; echo $TMPDIR; touch $TMPDIR/x",
                ])
                .output()
                .unwrap()
                .stdout_str()
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[..3], ["0022", "UTC C.UTF-8", "0"], "{out}");
        // Its own temp dir (no store is set here: under the caller's), gone
        // with what the child left there.
        let tmp = Path::new(lines[3]);
        assert!(
            tmp.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tool-")),
            "{out}"
        );
        assert!(!tmp.exists(), "{out}");
    }

    #[test]
    fn a_missing_tool_is_named_with_its_package() {
        let err = require_tools(&[
            SMOKE_TOOLS,
            &[tool("kiln-no-such-tool", "kiln-pkg"), tool("sh", "dash")],
        ]);
        let msg = format!("{:#}", err.unwrap_err());
        assert!(
            msg.contains("kiln-no-such-tool (package kiln-pkg)"),
            "{msg}"
        );
        assert!(
            msg.contains("apt-get install") && !msg.contains("dash"),
            "{msg}"
        );
    }

    #[test]
    fn timeout_kills_the_child() {
        let started = Instant::now();
        let err = Cmd::new("sleep")
            .arg("30")
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
