//! Building one step into a staging directory.
//!
//! The base is made by mmdebstrap into a plain directory. Every other step
//! runs on an overlayfs mount whose lower dirs are the layers below it and
//! whose upper dir becomes the stored entry: it holds exactly what the step
//! changed (new and changed files, whiteouts for removed ones).
//!
//! Steps that run programs in the image (`upgrade`, `packages`, `run`) do so
//! chrooted, with /proc, /sys and /dev mounted, the host's resolv.conf
//! bind-mounted for the duration, a `policy-rc.d` that stops services from
//! starting, apt's caches bind-mounted from the store (so downloads are
//! shared and never land in a layer), and an empty environment: nothing of
//! the host's environment enters the image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::mount::Mounts;
use crate::cmd::Cmd;
use crate::error::BadInput;
use crate::plan::key::bytes_digest;
use crate::plan::sources::Mirrors;
use crate::recipe::{BaseSpec, FileSpec};
use crate::store::{Package, PackageChange, Store};

/// The environment of every program run inside an image.
const CHROOT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
];
/// The build's SOURCE_DATE_EPOCH (see `record`): set once per build, passed
/// to mmdebstrap and to every program run in the image, so that what they
/// write (initramfs, shadow's password dates, …) does not depend on when.
static SOURCE_DATE_EPOCH: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(crate::record::DEFAULT_SOURCE_DATE_EPOCH);

pub fn set_source_date_epoch(epoch: u64) {
    SOURCE_DATE_EPOCH.store(epoch, std::sync::atomic::Ordering::SeqCst);
}

fn source_date_epoch() -> String {
    SOURCE_DATE_EPOCH
        .load(std::sync::atomic::Ordering::SeqCst)
        .to_string()
}
const POLICY_RC_D: &str =
    "#!/bin/sh\n# kiln: no service starts while an image is being built\nexit 101\n";
/// Files apt and dpkg leave that say when, not what: never part of a layer.
const BUILD_DEBRIS: &[&str] = &[
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/statoverride-old",
    "var/cache/ldconfig/aux-cache",
];

/// What a step needs from the build.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub mirrors: Option<Mirrors>,
    /// Fetch the archive's lists even when they are fresh (`--update`).
    pub refetch_lists: bool,
}

impl Ctx<'_> {
    fn mirrors(&self) -> Result<&Mirrors> {
        self.mirrors.as_ref().ok_or_else(|| {
            BadInput::arg(
                "no package archive is configured: the host's apt has no `deb` source",
                "set `mirror` in the recipe's [base], or configure apt on this host",
            )
            .into()
        })
    }
}

/// How a step gets its packages.
pub enum Source<'a> {
    /// From the archive; the .debs and lists are kept for resolving a lock.
    Archive,
    /// Only the pinned .debs, from this flat repository.
    Locked(&'a Path),
}

/// Make the base tree with mmdebstrap into `tree` (which must not exist).
/// Resolving keeps mmdebstrap's downloaded .debs in `scratch/debs` and its
/// package lists in `scratch/lists`.
pub fn base(
    ctx: &Ctx,
    spec: &BaseSpec,
    origin: &Path,
    tree: &Path,
    scratch: &Path,
    source: Source,
) -> Result<()> {
    let mirrors = ctx.mirrors()?;
    let mut cmd = Cmd::new("mmdebstrap").env("SOURCE_DATE_EPOCH", source_date_epoch());
    if !spec.initramfs {
        // As in a chroot step (see `apt_get`): mmdebstrap passes its
        // environment to the packages' scripts.
        cmd = cmd.env("INITRD", "No");
    }
    cmd = cmd
        .arg("--mode=root")
        .arg("--format=directory")
        .arg(format!("--variant={}", spec.variant))
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg("--dpkgopt=force-unsafe-io");
    if !spec.packages.is_empty() {
        cmd = cmd.arg(format!("--include={}", spec.packages.join(",")));
    }
    // The base comes from the suite's release alone; a layer with
    // `upgrade = true` adds the updates and security sources, so security
    // fixes show up as that layer's own changes.
    let real_source = format!("deb {} {} main", mirrors.main, spec.suite);
    let source_line = match source {
        Source::Archive => {
            let (debs, lists) = (scratch.join("debs"), scratch.join("lists"));
            for d in [&debs, &lists] {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            cmd = cmd
                .arg("--skip=essential/unlink")
                .arg(format!(
                    "--customize-hook=sync-out /var/cache/apt/archives {}",
                    crate::cmd::shell_quote(debs.as_os_str())
                ))
                .arg(format!(
                    "--customize-hook=sync-out /var/lib/apt/lists {}",
                    crate::cmd::shell_quote(lists.as_os_str())
                ));
            real_source.clone()
        }
        Source::Locked(repo) => {
            // mmdebstrap's own hook bind-mounts file:// repositories into the chroot.
            cmd = cmd.arg("--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount");
            format!("deb [trusted=yes] file://{} ./", repo.display())
        }
    };
    let fetched_at = crate::store::now();
    cmd.arg(&spec.suite)
        .arg(tree)
        .arg(source_line)
        .run()
        .map_err(|e| explain_apt_failure(e, origin, "base.packages"))?;
    if let Source::Locked(repo) = source {
        remove_mount_point_trail(tree, repo)?;
    }
    // A locked base was installed from a local repository; the image's own
    // sources are the real archive either way.
    write_file(
        &tree.join("etc/apt/sources.list"),
        format!("{real_source}\n").as_bytes(),
        0o644,
    )?;
    for rel in BUILD_DEBRIS {
        let path = tree.join(rel);
        if path.is_file() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    if let Source::Archive = source {
        keep_base_lists(ctx, tree, &scratch.join("lists"), fetched_at)?;
    }
    Ok(())
}

/// mmdebstrap's file-mirror-automount hook makes the local repository's
/// host path inside the tree to mount it on, and leaves the (empty)
/// directories behind. Remove them from the first one no package owns:
/// /var/tmp or /var/cache belong to base-files and stay.
fn remove_mount_point_trail(tree: &Path, repo: &Path) -> Result<()> {
    let mut inside = PathBuf::from("/");
    for part in repo.components().skip(1) {
        inside.push(part);
        let path = tree.join(inside.strip_prefix("/").expect("absolute"));
        if !path.is_dir() {
            return Ok(());
        }
        let owned = Cmd::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                tree.join("var/lib/dpkg").display()
            ))
            .arg("--search")
            .arg(&inside)
            .output()
            .is_ok();
        if !owned {
            // Only empty directories: anything else is not the hook's.
            return remove_empty_dirs(&path).with_context(|| {
                format!(
                    "removing the repository mount point {} from the base",
                    inside.display()
                )
            });
        }
    }
    Ok(())
}

fn remove_empty_dirs(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_empty_dirs(&entry.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Upper-dir files created only for the build, removed before publishing;
/// and, for a step that uses the store's shared apt caches, the lock that
/// keeps other kiln runs' apt out of them meanwhile.
struct Scaffolding {
    created: Vec<PathBuf>,
    _apt_caches: Option<crate::store::lock::Lock>,
}

/// Inside the chroot, where a locked step's repository and apt state live
/// (on a tmpfs over /run, so none of it reaches the layer).
const LOCKED_APT_DIR: &str = "run/kiln";

/// Mount what a chroot needs and put the scaffolding in place; returns the
/// host paths of the apt list directories the step will use.
fn enter_chroot(
    ctx: &Ctx,
    mounts: &mut Mounts,
    root: &Path,
    apt: Option<&Source>,
) -> Result<(Scaffolding, Vec<PathBuf>)> {
    let mut created = Vec::new();
    mounts.fs("proc", &root.join("proc"))?;
    mounts.fs("sysfs", &root.join("sys"))?;
    mounts.bind(Path::new("/dev"), &root.join("dev"))?;
    if root.join("dev/pts").is_dir() && Path::new("/dev/pts/ptmx").exists() {
        mounts.bind(Path::new("/dev/pts"), &root.join("dev/pts"))?;
    }
    let policy = root.join("usr/sbin/policy-rc.d");
    if std::fs::symlink_metadata(&policy).is_err() {
        write_file(&policy, POLICY_RC_D.as_bytes(), 0o755)?;
        created.push(PathBuf::from("usr/sbin/policy-rc.d"));
    }
    let resolv = root.join("etc/resolv.conf");
    match std::fs::symlink_metadata(&resolv) {
        Err(_) => {
            write_file(&resolv, b"", 0o644)?;
            created.push(PathBuf::from("etc/resolv.conf"));
            mounts.bind(Path::new("/etc/resolv.conf"), &resolv)?;
        }
        Ok(m) if m.file_type().is_file() => mounts.bind(Path::new("/etc/resolv.conf"), &resolv)?,
        // A symlink (e.g. to systemd-resolved's stub) is left alone: binding
        // over it would follow it into the image.
        Ok(_) => {}
    }
    let mut lists_used = Vec::new();
    let mut apt_caches = None;
    match apt {
        None => {}
        Some(Source::Archive) => {
            // /run is a tmpfs, as on a running system and in a locked step:
            // what a package's scripts leave there (cryptsetup's
            // /run/cryptsetup) is not part of the layer, whichever way the
            // step is built.
            mounts.tmpfs(&root.join("run"))?;
            apt_caches = Some(lock_apt_caches(ctx.store)?);
            mounts.bind(
                &ctx.store.apt_archives(),
                &root.join("var/cache/apt/archives"),
            )?;
            let lists = ctx.store.apt_lists(&sources_digest(root))?;
            mounts.bind(&lists, &root.join("var/lib/apt/lists"))?;
            lists_used.push(lists);
        }
        Some(Source::Locked(repo)) => {
            mounts.tmpfs(&root.join("run"))?;
            let dir = root.join(LOCKED_APT_DIR);
            for sub in ["repo", "lists/partial", "empty", "archives/partial"] {
                std::fs::create_dir_all(dir.join(sub))
                    .with_context(|| format!("creating {}", dir.join(sub).display()))?;
            }
            mounts.bind(repo, &dir.join("repo"))?;
            std::fs::write(
                dir.join("sources.list"),
                format!("deb [trusted=yes] file:/{LOCKED_APT_DIR}/repo ./\n"),
            )
            .with_context(|| format!("writing {}", dir.display()))?;
        }
    }
    Ok((
        Scaffolding {
            created,
            _apt_caches: apt_caches,
        },
        lists_used,
    ))
}

/// After the chroot's own mounts are gone: remove the scaffolding, and
/// debris that says when rather than what, through the overlay (so a file
/// only the build created simply disappears from the upper dir).
fn clean_up(root: &Path, scaffolding: Scaffolding) -> Result<()> {
    for rel in scaffolding
        .created
        .iter()
        .map(PathBuf::as_path)
        .chain(BUILD_DEBRIS.iter().map(Path::new))
    {
        let path = root.join(rel);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file()) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// The store's apt caches (downloads and lists), for this step alone: apt
/// locks them with fcntl and gives up at once when another apt holds them,
/// so another kiln run on this store waits here instead of failing.
fn lock_apt_caches(store: &Store) -> Result<crate::store::lock::Lock> {
    crate::store::lock::lock(
        &store.lock_path("apt-caches"),
        crate::store::lock::Mode::Exclusive,
        "another kiln run's apt step to finish with the store's apt caches",
        || {
            eprintln!("waiting for another apt step (this run's or another kiln's) to finish with the store's apt caches…")
        },
    )
}

fn sources_digest(root: &Path) -> String {
    let mut text = std::fs::read(root.join("etc/apt/sources.list")).unwrap_or_default();
    for f in crate::plan::sources::source_parts(&root.join("etc/apt")) {
        text.extend(
            f.file_name()
                .map(|n| n.as_encoded_bytes().to_vec())
                .unwrap_or_default(),
        );
        text.extend(std::fs::read(&f).unwrap_or_default());
    }
    bytes_digest(&text)[..16].to_owned()
}

fn chroot(root: &Path) -> Cmd {
    let mut cmd = Cmd::new("chroot").env_clear().arg(root);
    for (k, v) in CHROOT_ENV {
        cmd = cmd.env(k, v);
    }
    cmd.env("SOURCE_DATE_EPOCH", source_date_epoch())
}

/// How a step runs apt.
#[derive(Clone, Copy)]
struct Apt {
    /// A locked step sees only its own repository.
    locked: bool,
    /// The step's key says its kernels' initramfs is built by a later
    /// layer (see [`crate::plan::INITRAMFS_LATER`]).
    initramfs_later: bool,
}

/// apt-get in the chroot; a locked step sees only its own repository.
fn apt_get(root: &Path, apt: Apt) -> Cmd {
    let mut cmd = chroot(root);
    if apt.initramfs_later {
        // The kernel's postinst hooks (initramfs-tools', dracut's) build
        // no initramfs; `update-initramfs -u` (a trigger) only updates the
        // initrds that exist.
        cmd = cmd.env("INITRD", "No");
    }
    cmd = cmd.arg("apt-get");
    if apt.locked {
        let d = LOCKED_APT_DIR;
        cmd = cmd.args([
            "-o".to_owned(),
            format!("Dir::Etc::SourceList=/{d}/sources.list"),
            "-o".to_owned(),
            format!("Dir::Etc::SourceParts=/{d}/empty"),
            "-o".to_owned(),
            format!("Dir::State::Lists=/{d}/lists"),
            "-o".to_owned(),
            format!("Dir::Cache::Archives=/{d}/archives"),
        ]);
    }
    cmd.args([
        "-y",
        "-q",
        "-o",
        "APT::Sandbox::User=root",
        "-o",
        "Acquire::Retries=3",
        // No translated package descriptions (6.5 MB for trixie's main):
        // nothing kiln does reads them. mmdebstrap does the same.
        "-o",
        "Acquire::Languages=none",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "-o",
        "Dpkg::Options::=--force-unsafe-io",
        "-o",
        "Dpkg::Use-Pty=0",
    ])
}

/// How long the archive's lists, once fetched, stand for its current
/// state: a run that resolves several steps, or a rebuild right after one,
/// asks the archive once. `--update` always fetches.
const LISTS_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Make the step's apt lists current: a locked step's from its own
/// repository; a resolving step's from the archive, unless they were
/// fetched less than [`LISTS_FRESH_FOR`] ago (`<lists dir>.fetched` says
/// when; it is removed before a fetch and written after one that worked).
fn update_lists(ctx: &Ctx, root: &Path, apt: Apt, lists: &[PathBuf]) -> Result<()> {
    let Some(dir) = lists.last().filter(|_| !apt.locked) else {
        return apt_update(root, apt);
    };
    let stamp = dir.with_extension("fetched");
    let age = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    if let Some(age) = age.filter(|a| *a < LISTS_FRESH_FOR && !ctx.refetch_lists) {
        crate::cmd::log_line(&format!(
            "apt lists {} were fetched {}s ago: used as they are (fresh for {}s; --update fetches them)",
            dir.display(),
            age.as_secs(),
            LISTS_FRESH_FOR.as_secs()
        ));
        return Ok(());
    }
    remove_stamp(&stamp)?;
    apt_update(root, apt)?;
    std::fs::write(&stamp, b"").with_context(|| format!("writing {}", stamp.display()))
}

/// Lists whose stamp is gone are not fresh (a run killed while it wrote
/// them leaves no stamp).
fn remove_stamp(stamp: &Path) -> Result<()> {
    match std::fs::remove_file(stamp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", stamp.display()))
        }
        _ => Ok(()),
    }
}

/// Give a lists directory the files of `from` it lacks (the suite's own
/// lists, fetched for the sources below, when an `upgrade` step adds its
/// updates and security sources): `apt-get update` then asks the archive
/// whether they changed (If-Modified-Since, and the hashes its Release file
/// lists) instead of downloading them again. Only a cache: apt checks and
/// replaces what does not match.
fn seed_lists(from: &Path, to: &Path) -> Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    copy_lists(from, to, true)
}

/// Copy apt's list files (not its `lock`) from `from` into `to`, with their
/// mtimes; `keep_existing`: leave a file `to` already has.
fn copy_lists(from: &Path, to: &Path, keep_existing: bool) -> Result<()> {
    let entries = std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", from.display()))?;
        let name = entry.file_name();
        let target = to.join(&name);
        if name == "lock"
            || !entry.file_type().is_ok_and(|t| t.is_file())
            || (keep_existing && target.exists())
        {
            continue;
        }
        copy_keeping_time(&entry.path(), &target)?;
    }
    Ok(())
}

/// Copy a file with its mtime (apt's If-Modified-Since is the list's mtime).
fn copy_keeping_time(from: &Path, to: &Path) -> Result<()> {
    let partial = to.with_extension("kiln-partial");
    std::fs::copy(from, &partial)
        .with_context(|| format!("copying {} to {}", from.display(), partial.display()))?;
    let modified = std::fs::metadata(from)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading {}", from.display()))?;
    set_modified(&partial, modified)?;
    std::fs::rename(&partial, to)
        .with_context(|| format!("renaming {} to {}", partial.display(), to.display()))
}

/// The lists a resolving base's mmdebstrap fetched (`fetched`: in
/// `scratch/lists`, fetched at `fetched_at`) become the store's lists for
/// the base's sources, unless the store has newer ones: the steps above
/// that use the same sources, and an `upgrade` step's seed
/// ([`seed_lists`]), start from them instead of fetching them again.
fn keep_base_lists(ctx: &Ctx, tree: &Path, fetched: &Path, fetched_at: u64) -> Result<()> {
    let _apt_caches = lock_apt_caches(ctx.store)?;
    let dir = ctx.store.apt_lists(&sources_digest(tree))?;
    let stamp = dir.with_extension("fetched");
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(fetched_at);
    if std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= at)
    {
        return Ok(());
    }
    remove_stamp(&stamp)?;
    copy_lists(fetched, &dir, false)?;
    std::fs::write(&stamp, b"").with_context(|| format!("writing {}", stamp.display()))?;
    set_modified(&stamp, at)
}

fn set_modified(path: &Path, time: std::time::SystemTime) -> Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(time))
        .with_context(|| format!("setting the time of {}", path.display()))
}

/// `apt-get update` that fails when any index cannot be fetched (apt only
/// warns by default, and the install then fails with a misleading
/// "Unable to locate package").
fn apt_update(root: &Path, apt: Apt) -> Result<()> {
    apt_get(root, apt).args(["update", "--error-on=any"]).timed_as("apt-get update").run().map_err(|e| {
        let text = format!("{e:#}");
        if text.contains("Could not connect") || text.contains("Failed to fetch") || text.contains("Temporary failure resolving") {
            e.context(
                "apt could not reach the package archive. Locked packages come from kiln's .deb cache, \
                 but this step is not locked (or its packages changed) and must be resolved against the archive: \
                 check the network and [base] mirror, or restore the lock entry",
            )
        } else {
            e
        }
    })
}

/// An apt failure caused by a package name that does not exist is bad
/// input (exit 2), not a broken kiln.
fn explain_apt_failure(err: anyhow::Error, origin: &Path, key: &str) -> anyhow::Error {
    let text = format!("{err:#}");
    let missing: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.split("Unable to locate package ").nth(1).or_else(|| {
                l.split("Package '")
                    .nth(1)
                    .and_then(|r| r.split('\'').next())
                    .filter(|_| l.contains("has no installation candidate"))
            })
        })
        .chain(text.lines().filter_map(|l| {
            l.split("Couldn't find any package by")
                .nth(1)
                .map(|r| r.trim().trim_matches(|c| c == '\'' || c == '"'))
        }))
        .map(str::trim)
        .collect();
    if missing.is_empty() {
        return err;
    }
    BadInput::new(
        origin,
        key,
        format!(
            "the archive has no package named {} ({})",
            missing.join(", "),
            text.lines().next().unwrap_or("")
        ),
        "check the spelling (apt-cache search NAME on a machine with the same suite) or remove it",
    )
    .into()
}

/// Run an apt or shell step in `root` (an overlay mount); every mount made
/// for it is undone before this returns. Returns the apt list directories
/// the step read (to resolve its lock from). `initramfs_later`: the step's
/// key defers its kernels' initramfs (see [`crate::plan::INITRAMFS_LATER`]).
pub fn chrooted(
    ctx: &Ctx,
    root: &Path,
    work: ChrootWork,
    source: Source,
    initramfs_later: bool,
) -> Result<Vec<PathBuf>> {
    let apt = if matches!(work, ChrootWork::Run { .. }) {
        None
    } else {
        Some(&source)
    };
    let locked = matches!(source, Source::Locked(_));
    let apt_in = Apt {
        locked,
        initramfs_later,
    };
    let mut mounts = Mounts::new();
    let (scaffolding, mut lists) = enter_chroot(ctx, &mut mounts, root, apt)?;
    let result = match work {
        ChrootWork::Upgrade { suite } => {
            let below = lists.last().cloned();
            upgrade(ctx, &mut mounts, root, &suite, apt_in, below.as_deref())
                .map(|l| lists.extend(l))
        }
        ChrootWork::Packages {
            install,
            auto,
            manual,
            origin,
            layer,
        } => update_lists(ctx, root, apt_in, &lists).and_then(|()| {
            apt_get(root, apt_in)
                .args(["install", "--no-install-recommends"])
                .args(&install)
                .timed_as("apt-get install")
                .run()
                .map_err(|e| explain_apt_failure(e, &origin, &format!("layer.{layer}.packages")))?;
            // Installed by version as a locked step must, dependencies would
            // otherwise be marked as wanted for themselves; and what the
            // recipe asks for that was there already is marked as wanted,
            // as `apt-get install NAME` marks it. Both keep apt's
            // extended_states as the resolving build left it.
            for (mark, names) in [("auto", &auto), ("manual", &manual)] {
                if !names.is_empty() {
                    chroot(root)
                        .args(["apt-mark", mark])
                        .args(names)
                        .timed_as("apt-mark")
                        .run()?;
                }
            }
            Ok(())
        }),
        ChrootWork::Run { commands, layer } => {
            commands.iter().enumerate().try_for_each(|(i, c)| {
                chroot(root)
                    .args(["/bin/sh", "-ec", c])
                    .timed_as("run step")
                    .run()
                    .with_context(|| {
                        format!("layer `{layer}`, run[{i}]: `{c}` failed inside the image")
                    })
            })
        }
    };
    // The step's own failure is what to report; an unmount that fails
    // after it is added to it, not put in its place.
    crate::cmd::keep_first_error(result, mounts.unmount_all())?;
    clean_up(root, scaffolding)?;
    Ok(lists)
}

pub enum ChrootWork {
    Upgrade {
        suite: String,
    },
    /// Package names, or `name=version` for a locked step (which then
    /// marks the pins the recipe did not ask for as automatically installed,
    /// and the packages it asked for that were already installed as manual).
    Packages {
        install: Vec<String>,
        auto: Vec<String>,
        manual: Vec<String>,
        origin: PathBuf,
        layer: String,
    },
    Run {
        commands: Vec<String>,
        layer: String,
    },
}

/// Returns the lists directory it switched to.
fn upgrade(
    ctx: &Ctx,
    mounts: &mut Mounts,
    root: &Path,
    suite: &str,
    apt: Apt,
    below: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let mirrors = ctx.mirrors()?;
    let list = format!(
        "# Added by kiln's upgrade layer: the suite's updates and security fixes.\n\
         deb {} {suite}-updates main\ndeb {} {suite}-security main\n",
        mirrors.main, mirrors.security
    );
    write_file(
        &root.join("etc/apt/sources.list.d/kiln-updates.list"),
        list.as_bytes(),
        0o644,
    )?;
    let mut lists_used = Vec::new();
    if !apt.locked {
        // The lists bind mount was chosen for the base's sources; rebind it
        // for the sources this step adds.
        let lists = ctx.store.apt_lists(&sources_digest(root))?;
        if let Some(below) = below {
            seed_lists(below, &lists)?;
        }
        mounts.bind(&lists, &root.join("var/lib/apt/lists"))?;
        lists_used.push(lists);
    }
    update_lists(ctx, root, apt, &lists_used)?;
    apt_get(root, apt)
        .arg("dist-upgrade")
        .timed_as("apt-get dist-upgrade")
        .run()?;
    purge_old_kernels(root, apt)?;
    Ok(lists_used)
}

/// After an upgrade two kernels can be installed; the image boots the one
/// `/vmlinuz` points to (the metapackage's, the newest), so the others go.
fn purge_old_kernels(root: &Path, apt: Apt) -> Result<()> {
    let Ok(target) = std::fs::read_link(root.join("vmlinuz")) else {
        return Ok(());
    };
    let Some(keep) = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_owned)
    else {
        return Ok(());
    };
    let old: Vec<String> = installed(root)?
        .into_iter()
        .map(|p| p.name)
        .filter(|n| {
            n.strip_prefix("linux-image-").is_some_and(|v| {
                v.starts_with(|c: char| c.is_ascii_digit())
                    && !v.ends_with("-dbg")
                    && v.trim_end_matches("-unsigned") != keep
            })
        })
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    apt_get(root, apt)
        .arg("purge")
        .args(&old)
        .timed_as("apt-get purge")
        .run()
}

/// Copy the recipe's files into `root`, never following a symlink out of it.
pub fn copy_files(root: &Path, files: &[FileSpec], origin: &Path, layer: &str) -> Result<()> {
    let passwd = read_ids(&root.join("etc/passwd"));
    let group = read_ids(&root.join("etc/group"));
    for (i, f) in files.iter().enumerate() {
        let key = format!("layer.{layer}.files[{i}]");
        let target = resolve_in_root(root, &f.dest).map_err(|why| {
            BadInput::new(
                origin,
                format!("{key}.dest"),
                format!("`{}`: {why}", f.dest),
                "copy to a path whose directories are real directories inside the image",
            )
        })?;
        let (user, grp) = (&f.owner.user, &f.owner.group);
        let uid = lookup(&passwd, user).ok_or_else(|| {
            BadInput::new(
                origin,
                format!("{key}.owner"),
                format!("no user `{user}` in the image's /etc/passwd at this layer"),
                "use an existing user, or create it in an earlier layer",
            )
        })?;
        let gid = lookup(&group, grp).ok_or_else(|| {
            BadInput::new(
                origin,
                format!("{key}.owner"),
                format!("no group `{grp}` in the image's /etc/group at this layer"),
                "use an existing group, or create it in an earlier layer",
            )
        })?;
        if let Some(parent) = target.parent() {
            create_dirs(parent)?;
        }
        if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&target)
                .with_context(|| format!("replacing {}", target.display()))?;
        }
        let data = std::fs::read(&f.src).with_context(|| format!("reading {}", f.src.display()))?;
        write_file(&target, &data, f.mode)?;
        std::os::unix::fs::chown(&target, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", target.display()))?;
        // chown clears setuid/setgid bits: set the mode last.
        set_mode(&target, f.mode)?;
    }
    Ok(())
}

/// The host path of `dest` inside `root`, resolving symlinks in its
/// directories the way the image will see them (absolute targets are
/// relative to the image root). A symlink whose `..` climbs above the image
/// root is refused, as is a directory component that is not a directory.
pub fn resolve_in_root(root: &Path, dest: &str) -> Result<PathBuf, String> {
    const MAX_LINKS: usize = 40;
    let mut parts: Vec<String> = dest
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let Some(last) = parts.pop() else {
        return Err("is the image root".into());
    };
    let mut resolved: Vec<String> = Vec::new();
    let mut queue: std::collections::VecDeque<String> = parts.into();
    let mut links = 0;
    while let Some(part) = queue.pop_front() {
        match part.as_str() {
            "." | "" => continue,
            ".." => {
                if resolved.pop().is_none() {
                    return Err("goes through a symlink that points out of the image".into());
                }
                continue;
            }
            _ => {}
        }
        let candidate = root.join(resolved.join("/")).join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err("goes through too many symlinks".into());
                }
                let target = std::fs::read_link(&candidate).map_err(|e| e.to_string())?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                for p in target.split('/').rev() {
                    queue.push_front(p.to_owned());
                }
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!(
                    "/{} is not a directory",
                    resolved
                        .iter()
                        .chain([&part])
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("/")
                ))
            }
            _ => resolved.push(part),
        }
    }
    let mut path = root.to_path_buf();
    for p in resolved {
        path.push(p);
    }
    path.push(last);
    Ok(path)
}

fn read_ids(path: &Path) -> BTreeMap<String, u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((name.to_owned(), id))
        })
        .collect()
}

fn lookup(ids: &BTreeMap<String, u32>, name: &str) -> Option<u32> {
    name.parse().ok().or_else(|| ids.get(name).copied())
}

/// The mode of a directory kiln makes inside an image.
pub const DIR_MODE: u32 = 0o755;

/// `mkdir -p` for a path inside an image: each directory it makes gets
/// [`DIR_MODE`] whatever the process umask, so the image does not depend on
/// who ran kiln.
pub fn create_dirs(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
        Ok(()) => set_mode(dir, DIR_MODE),
    }
}

pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        create_dirs(parent)?;
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// The packages installed in a root, from its dpkg database.
pub fn installed(root: &Path) -> Result<Vec<Package>> {
    let admin = root.join("var/lib/dpkg");
    if !admin.join("status").is_file() {
        bail!("{} has no dpkg database", root.display());
    }
    let out = Cmd::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args([
            "-W",
            "-f",
            "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\t${source:Package}\n",
        ])
        .output()?;
    let mut pkgs: Vec<Package> = out
        .stdout_str()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let status = f.next()?;
            if !status.starts_with("ii") {
                return None;
            }
            Some(Package {
                name: f.next()?.into(),
                version: f.next()?.into(),
                arch: f.next()?.into(),
                source: f.next().unwrap_or("").into(),
            })
        })
        .collect();
    pkgs.sort();
    Ok(pkgs)
}

/// What changed between two package sets.
pub fn package_changes(before: &[Package], after: &[Package]) -> Vec<PackageChange> {
    let versions = |list: &[Package]| {
        crate::packages::versions(
            list.iter()
                .map(|p| (p.name.as_str(), p.arch.as_str(), p.version.as_str())),
        )
    };
    crate::packages::diff(&versions(before), &versions(after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_links_inside_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join("opt")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("opt/abs")).unwrap();
        std::os::unix::fs::symlink("../../../../tmp", root.join("opt/out")).unwrap();
        std::fs::write(root.join("opt/file"), "").unwrap();
        assert_eq!(
            resolve_in_root(root, "/lib/x.service").unwrap(),
            root.join("usr/lib/x.service")
        );
        assert_eq!(
            resolve_in_root(root, "/opt/abs/motd").unwrap(),
            root.join("etc/motd")
        );
        assert_eq!(
            resolve_in_root(root, "/new/dir/f").unwrap(),
            root.join("new/dir/f")
        );
        assert!(resolve_in_root(root, "/opt/out/x")
            .unwrap_err()
            .contains("points out of the image"));
        assert!(resolve_in_root(root, "/opt/file/x")
            .unwrap_err()
            .contains("not a directory"));
    }

    #[test]
    fn package_changes_lists_installs_upgrades_and_removals() {
        let p = |n: &str, v: &str| Package {
            name: n.into(),
            version: v.into(),
            arch: "amd64".into(),
            source: String::new(),
        };
        let changes = package_changes(
            &[p("a", "1"), p("b", "1"), p("c", "1")],
            &[p("a", "1"), p("b", "2"), p("d", "1")],
        );
        let shown: Vec<String> = changes
            .iter()
            .map(|c| format!("{} {:?} {:?}", c.name, c.old, c.new))
            .collect();
        assert_eq!(
            shown,
            [
                "b Some(\"1\") Some(\"2\")",
                "c Some(\"1\") None",
                "d None Some(\"1\")"
            ]
        );
    }

    fn mtime(path: &Path) -> std::time::SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn an_upgrade_steps_lists_are_seeded_with_what_they_lack_keeping_times() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::create_dir_all(from.join("partial")).unwrap();
        std::fs::create_dir_all(&to).unwrap();
        for (name, text) in [
            ("a_InRelease", "release"),
            ("a_Packages", "pkgs"),
            ("lock", ""),
        ] {
            std::fs::write(from.join(name), text).unwrap();
        }
        set_modified(
            &from.join("a_InRelease"),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        )
        .unwrap();
        std::fs::write(to.join("a_Packages"), "newer").unwrap();
        seed_lists(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("a_InRelease")).unwrap(),
            "release"
        );
        assert_eq!(
            mtime(&to.join("a_InRelease")),
            mtime(&from.join("a_InRelease"))
        );
        // What the step's own lists hold is theirs; apt's lock is not a list.
        assert_eq!(
            std::fs::read_to_string(to.join("a_Packages")).unwrap(),
            "newer"
        );
        assert!(!to.join("lock").exists() && !to.join("partial").exists());
        let names = std::fs::read_dir(&to).unwrap().count();
        assert_eq!(names, 2, "no partial copy is left");
        // A lists dir that does not exist (nothing below) seeds nothing.
        seed_lists(&dir.path().join("none"), &to).unwrap();
    }

    #[test]
    fn a_resolving_bases_lists_become_the_stores_unless_it_has_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let ctx = Ctx {
            store: &store,
            mirrors: None,
            refetch_lists: false,
        };
        let tree = dir.path().join("tree");
        write_file(
            &tree.join("etc/apt/sources.list"),
            b"deb http://127.0.0.1:9/debian trixie main\n",
            0o644,
        )
        .unwrap();
        let fetched = dir.path().join("lists");
        std::fs::create_dir_all(&fetched).unwrap();
        std::fs::write(fetched.join("x_InRelease"), "first").unwrap();
        let at = crate::store::now() - 30;
        keep_base_lists(&ctx, &tree, &fetched, at).unwrap();
        let kept = store.apt_lists(&sources_digest(&tree)).unwrap();
        assert_eq!(
            std::fs::read_to_string(kept.join("x_InRelease")).unwrap(),
            "first"
        );
        let stamp = kept.with_extension("fetched");
        assert_eq!(
            mtime(&stamp),
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(at),
            "fresh from when mmdebstrap fetched them"
        );
        // Lists fetched before those in the store do not replace them.
        std::fs::write(fetched.join("x_InRelease"), "older").unwrap();
        keep_base_lists(&ctx, &tree, &fetched, at - 60).unwrap();
        assert_eq!(
            std::fs::read_to_string(kept.join("x_InRelease")).unwrap(),
            "first"
        );
    }

    #[test]
    fn apt_name_errors_become_bad_input() {
        let err = anyhow::anyhow!(
            "command failed: apt-get install\n    E: Unable to locate package no-such-pkg"
        );
        let err = explain_apt_failure(err, Path::new("r.toml"), "layer.app.packages");
        assert!(err.is::<BadInput>());
        assert!(err.to_string().contains("no-such-pkg"), "{err}");
    }
}
