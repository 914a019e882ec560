//! One function per subcommand: load, plan, run the pipeline, report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::{
    BuildArgs, CacheCommand, DiffArgs, ExportArgs, Global, InspectArgs, KeyCommand, LockArgs,
    LogArgs, PlanArgs, SmokeArgs, VerifyArgs,
};
use crate::error::{BadInput, Drift, NotVerified, SmokeFailed};
use crate::layers::{self, BuildOptions, Summary};
use crate::layers::{Row, Status};
use crate::lock::Locks;
use crate::plan::{self, Freshness};
use crate::recipe;
use crate::recipe::Recipe;
use crate::record;
use crate::sign::key::{PublicKey, SigningKey};
use crate::smoke::stage::seed_then_checks;
use crate::smoke::upgrade::Upgrade;
use crate::smoke::volumes::VolumeDisks;
use crate::smoke::{SmokeOptions, SmokeReport};
use crate::store::Store;
use crate::ui::{table, Ui};

mod fleet;

fn store_root(global: &Global) -> PathBuf {
    global.cache.clone().unwrap_or_else(Store::default_root)
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("`kiln {what}` must run as root: it mounts overlayfs and runs apt in a chroot (try sudo)");
    }
    Ok(())
}

/// Everything a building command needs before it may touch the store.
struct Prepared {
    recipe: Recipe,
    locks: Locks,
    store: Store,
    log_path: PathBuf,
}

/// Load and validate (bad input fails here, before the store or out/ is
/// touched), then enter a private mount namespace, open the store and start
/// the build log.
fn prepare(
    global: &Global,
    recipe_path: &Path,
    what: &str,
    tools: impl FnOnce(&Recipe) -> Vec<&'static [crate::cmd::Tool]>,
) -> Result<Prepared> {
    // Bad input is exit 2 whoever runs kiln: validate before asking for root.
    let (recipe, locks, _) = validate(recipe_path)?;
    let store = enter(global, what, &tools(&recipe))?;
    let (log, log_path) = open_log(global, &recipe.image.name, what)?;
    crate::cmd::set_log(Some(log), global.verbose);
    log_header(what, recipe_path);
    Ok(Prepared {
        recipe,
        locks,
        store,
        log_path,
    })
}

/// Load a recipe and its lock and plan it: every bad input a build can
/// meet before it runs a tool.
fn validate(recipe_path: &Path) -> Result<(Recipe, Locks, plan::Plan)> {
    let recipe = recipe::load(recipe_path)?;
    let locks = Locks::load(&recipe.sources)?;
    let plan = plan::make(&recipe, &locks)?;
    Ok((recipe, locks, plan))
}

/// As root, with the tools there: isolate kiln's processes, enter a
/// private mount namespace, open the store.
fn enter(global: &Global, what: &str, tools: &[&'static [crate::cmd::Tool]]) -> Result<Store> {
    require_root(what)?;
    // Before anything is downloaded or the store is touched.
    crate::cmd::require_tools(tools)?;
    // From here on a `kill -9` of kiln takes every process it started with it.
    crate::cmd::isolate_processes()?;
    crate::layers::mount::enter_private_namespace()?;
    let store = Store::open(&store_root(global))?;
    crate::cmd::set_tool_tmp(&store.root().join("tmp"));
    store.clean_stale_staging()?;
    Ok(store)
}

/// `out/NAME.WHAT.log`, created anew.
fn open_log(global: &Global, name: &str, what: &str) -> Result<(std::fs::File, PathBuf)> {
    std::fs::create_dir_all(&global.out)
        .with_context(|| format!("creating {}", global.out.display()))?;
    let log_path = global.out.join(format!("{name}.{what}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    Ok((log, log_path))
}

fn log_header(what: &str, recipe_path: &Path) {
    crate::cmd::log_line(&format!(
        "kiln {} {what} {}",
        env!("CARGO_PKG_VERSION"),
        recipe_path.display()
    ));
}

/// The tools a build of `recipe` runs.
fn build_tools(
    args: &BuildArgs,
    recipe: &Recipe,
    signing: bool,
    remote: bool,
) -> Vec<&'static [crate::cmd::Tool]> {
    use crate::cmd::{ASSEMBLY_TOOLS, LAYER_TOOLS};
    let signing = match signing {
        true => crate::cmd::SIGNING_TOOLS,
        false => &[],
    };
    let exports = crate::export::tools(&recipe.image.formats);
    let mut tools = vec![LAYER_TOOLS, ASSEMBLY_TOOLS, signing, exports];
    if !args.no_smoke {
        tools.extend(crate::cmd::smoke_tools(&recipe.smoke));
    }
    if remote {
        tools.push(crate::remote::TOOLS);
    }
    tools
}

/// The keys and the remote cache a build uses, loaded before anything is
/// built (a bad one is bad input).
struct BuildKeys {
    signing_key: Option<SigningKey>,
    signer: Option<crate::assemble::secure_boot::Signer>,
    remote: Option<crate::remote::Remote>,
}

/// The signing key of `--signing-key`, else `KILN_SIGNING_KEY`, loaded
/// (a bad key is bad input, refused before anything is done).
fn signing_key(flag: &Option<PathBuf>) -> Result<Option<SigningKey>> {
    flag.clone()
        .or_else(signing_key_from_env)
        .as_deref()
        .map(SigningKey::load)
        .transpose()
}

fn build_keys(args: &BuildArgs) -> Result<BuildKeys> {
    let signing_key = signing_key(&args.signing_key)?;
    let signing = &args.secure_boot_key;
    let signer = crate::assemble::secure_boot::load(
        signing
            .secure_boot_key
            .clone()
            .or_else(|| path_from_env("KILN_SECURE_BOOT_KEY"))
            .as_deref(),
        signing
            .secure_boot_cert
            .clone()
            .or_else(|| path_from_env("KILN_SECURE_BOOT_CERT"))
            .as_deref(),
    )?
    .map(|key| crate::assemble::secure_boot::Signer { key, reuse: None });
    let remote = open_remote(&args.remote, args.push, signing_key.is_some())?;
    Ok(BuildKeys {
        signing_key,
        signer,
        remote,
    })
}

/// A failed layers stage, with what to do about a full disk and where the
/// log is.
fn build_failed(e: anyhow::Error, store: &Store, log_path: &Path) -> anyhow::Error {
    let e = if crate::store::is_disk_full(&e) {
        e.context(format!(
            "the filesystem holding the store ({}) is full; nothing was added to the store: free space (`kiln cache gc`) and build again",
            store.root().display()
        ))
    } else {
        e
    };
    e.context(format!("the full log is in {}", log_path.display()))
}

fn log_tool_times(summary: &Summary) {
    crate::cmd::log_line(&format!(
        "time in tools: {}",
        summary
            .tools
            .iter()
            .map(|t| format!("{} {:.1}s ({}x)", t.tool, t.seconds, t.runs))
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

pub fn build(global: &Global, args: &BuildArgs) -> Result<()> {
    match args.recipes.as_slice() {
        [recipe] => build_one(global, args, recipe),
        [] => unreachable!("clap gives the default recipe"),
        recipes => fleet::build(global, args, recipes),
    }
}

fn build_one(global: &Global, args: &BuildArgs, recipe_path: &Path) -> Result<()> {
    // A bad key is bad input: refused before anything is built.
    let BuildKeys {
        signing_key,
        signer,
        remote,
    } = build_keys(args)?;
    let Prepared {
        recipe,
        mut locks,
        store,
        log_path,
    } = prepare(global, recipe_path, "build", |r| {
        build_tools(args, r, signer.is_some(), remote.is_some())
    })?;
    let forgotten = match &args.update {
        Some(layer) => crate::lock::forget(&recipe, &mut locks, layer)?,
        None => crate::lock::Forgotten::none(),
    };
    let ui = Ui::new(global.json);
    let opts = BuildOptions {
        refresh: args.refresh,
        out_dir: global.out.clone(),
        layers_only: false,
        fresh_resolve: args.update.is_some(),
        signing_key,
        secure_boot: signer,
        remote,
        push: args.push,
        shared: None,
    };
    let (plan, mut summary) = layers::build(&recipe, &mut locks, &store, &opts, &ui)
        .map_err(|e| build_failed(e, &store, &log_path))?;
    for written in locks.save_changed()? {
        eprintln!("wrote {}", written.display());
    }
    if let (Some(remote), true, Some(key)) = (&opts.remote, opts.push, &opts.signing_key) {
        push_layers(remote, &store, &[&plan], key)?;
    }
    let smoke = if args.no_smoke {
        Ok(())
    } else {
        smoke_stage(global, args, &recipe, &store, &ui, &mut summary)
    };
    log_tool_times(&summary);
    let report = global.out.join(format!("{}.build.json", recipe.image.name));
    crate::store::write_json_atomic(&report, &summary)?;
    if global.json {
        print_json(&summary)?;
    } else {
        for line in forgotten.report(&locks, &recipe, &store) {
            println!("{line}");
        }
        print!("{}", summary.text());
        if let Some(key) = &opts.signing_key {
            println!(
                "signed by key {}: {}",
                key.name,
                record::signed::path_for(&summary.image).display()
            );
        }
        if let Some(smoke) = &summary.smoke {
            print!("{}", smoke.checks_text());
        }
    }
    keep_log(&summary, &log_path)?;
    if args.check_repro {
        let signer = opts.secure_boot.as_ref();
        let report = crate::record::repro::check(&recipe, &locks, &summary, &store, &ui, signer)
            .map_err(|e| e.context(format!("the full log is in {}", log_path.display())))?;
        if global.json {
            print_json(&report)?;
        } else {
            print!("{}", report.text());
        }
        if !report.reproducible {
            anyhow::bail!(
                "{} is not reproducible: {}",
                recipe_path.display(),
                report
                    .first_difference
                    .as_deref()
                    .unwrap_or("unknown difference")
            );
        }
    }
    smoke
}

/// The remote cache of `--remote` (or `KILN_REMOTE`), with its trusted
/// keys (`--trusted-key`, or `KILN_TRUSTED_KEY`). Bad input is refused
/// before anything is built. Without a trusted key the cache is not read,
/// and kiln says so once.
fn open_remote(
    args: &crate::cli::RemoteArgs,
    push: bool,
    signing: bool,
) -> Result<Option<crate::remote::Remote>> {
    let reference = args
        .remote
        .clone()
        .or_else(|| std::env::var("KILN_REMOTE").ok().filter(|v| !v.is_empty()));
    let Some(reference) = reference else {
        if push {
            return Err(BadInput::arg(
                "--push needs a remote cache to push to",
                "add --remote oci://HOST/REPOSITORY (or set KILN_REMOTE)",
            )
            .into());
        }
        return Ok(None);
    };
    let reference = crate::remote::Reference::parse(&reference).map_err(|why| {
        BadInput::arg(
            format!("--remote: {why}"),
            "e.g. --remote oci://HOST/team/kiln",
        )
    })?;
    if push && !signing {
        return Err(BadInput::arg(
            "--push signs every layer it pushes, and no signing key was given",
            "add --signing-key NAME.key (from `kiln key new NAME`), or set KILN_SIGNING_KEY",
        )
        .into());
    }
    let mut trusted_paths = args.trusted_keys.clone();
    if trusted_paths.is_empty() {
        trusted_paths.extend(path_from_env("KILN_TRUSTED_KEY"));
    }
    let trusted = trusted_paths
        .iter()
        .map(|k| PublicKey::load(k))
        .collect::<Result<Vec<_>>>()?;
    if trusted.is_empty() {
        eprintln!(
            "note: the remote cache {reference} is not read: no --trusted-key (or KILN_TRUSTED_KEY) to check what it serves{}",
            if push { "; it is only pushed to" } else { "" }
        );
    }
    Ok(Some(crate::remote::Remote::new(reference, trusted, push)?))
}

/// `kiln push IMAGE [REF] [--containerdisk REF]`.
pub fn push(global: &Global, args: &crate::cli::PushArgs) -> Result<()> {
    // Both references are checked before anything is sent.
    let artifact = args.reference.as_deref().map(push_ref).transpose()?;
    let containerdisk = args.containerdisk.as_deref().map(push_ref).transpose()?;
    if artifact.is_none() && args.signing_key.is_some() {
        // kiln signs its own artifact's file list; a containerDisk is a
        // plain OCI image with no place for that signature.
        return Err(BadInput::arg(
            "--signing-key signs kiln's artifact (REF), and only --containerdisk was given: a containerDisk carries no kiln signature",
            "give REF too (`kiln push IMAGE REF --containerdisk REF2 --signing-key KEY`), or leave out --signing-key",
        )
        .into());
    }
    let signing_key = signing_key(&args.signing_key)?;
    let mut pushed = serde_json::Map::new();
    if let Some((reference, tag)) = artifact {
        let shown = reference.to_string();
        let digest = crate::remote::image::push(&args.image, reference, &tag, signing_key.as_ref())
            .with_context(|| format!("pushing {} to {shown}:{tag}", args.image.display()))?;
        if !global.json {
            println!("pushed {} to {shown}:{tag}", args.image.display());
            println!("digest: {shown}@{digest}");
        }
        pushed.insert("reference".into(), format!("{shown}:{tag}").into());
        pushed.insert("digest".into(), digest.into());
    }
    if let Some((reference, tag)) = containerdisk {
        let shown = reference.to_string();
        let digest = crate::remote::image::push_containerdisk(&args.image, reference, &tag)
            .with_context(|| {
                format!(
                    "pushing the containerDisk of {} to {shown}:{tag}",
                    args.image.display()
                )
            })?;
        if !global.json {
            println!(
                "pushed the containerDisk of {} to {shown}:{tag}",
                args.image.display()
            );
            println!("digest: {shown}@{digest}");
        }
        pushed.insert(
            "containerdisk".into(),
            serde_json::json!({ "reference": format!("{shown}:{tag}"), "digest": digest }),
        );
    }
    if global.json {
        return print_json(&pushed);
    }
    Ok(())
}

/// A reference to push to: a tag, never a digest.
fn push_ref(text: &str) -> Result<(crate::remote::Reference, String)> {
    let (reference, tag) = image_ref(text)?;
    if tag.starts_with("sha256:") {
        return Err(BadInput::arg(
            format!("{text}: a push names a tag, not a digest"),
            "e.g. oci://HOST/team/images:web-1",
        )
        .into());
    }
    Ok((reference, tag))
}

/// `kiln pull REF`.
pub fn pull(global: &Global, args: &crate::cli::PullArgs) -> Result<()> {
    let (reference, target) = image_ref(&args.reference)?;
    let mut paths = args.trusted_keys.clone();
    if paths.is_empty() {
        paths.extend(path_from_env("KILN_TRUSTED_KEY"));
    }
    if paths.is_empty() {
        return Err(BadInput::arg(
            "kiln pull verifies the image's signature, and no trusted key was given",
            "add --trusted-key NAME.pub (the public key of the builder's --signing-key), or set KILN_TRUSTED_KEY",
        )
        .into());
    }
    let trusted = paths
        .iter()
        .map(|k| PublicKey::load(k))
        .collect::<Result<Vec<_>>>()?;
    let pulled = crate::remote::image::pull(reference, &target, &global.out, &trusted)?;
    if let Some(why) = &pulled.not_written_because {
        eprintln!(
            "note: not written: {}: {why}; only the disk, its manifest and its provenance are trusted (push with --signing-key to have the rest signed)",
            pulled.not_written.join(", ")
        );
    }
    if global.json {
        return print_json(&pulled);
    }
    println!(
        "pulled {} (sha256 {}), signature: good, by {}{}",
        pulled.disk.display(),
        pulled.sha256,
        pulled.signed_by.join(", "),
        pulled
            .files_signed_by
            .as_ref()
            .map(|by| format!("; file list signed by {by}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn image_ref(text: &str) -> Result<(crate::remote::Reference, String)> {
    crate::remote::image::parse_ref(text).map_err(|why| {
        BadInput::arg(
            why,
            "e.g. oci://HOST/team/images:web-1, or …/images@sha256:<digest>",
        )
        .into()
    })
}

/// `kiln plan --remote`: which steps to build the remote would serve
/// (their manifests are fetched and their signatures checked; no blob is).
fn remote_plan(
    remote: &crate::remote::Remote,
    plan: &plan::Plan,
    report: &mut plan::freshness::PlanReport,
) -> Result<()> {
    use crate::remote::Kind;
    use plan::freshness::RemoteState;
    let keys = plan
        .steps
        .iter()
        .map(|s| (Kind::Layer, s.key))
        .chain([(Kind::Image, plan.image.key)]);
    for ((kind, key), row) in keys.zip(&mut report.steps) {
        let pullable = matches!(&row.freshness, Freshness::Build(r)
            if !matches!(r, plan::Reason::Refresh | plan::Reason::Unlocked));
        if !pullable || !remote.readable() {
            continue;
        }
        row.remote = Some(match remote.lookup(kind, &key) {
            Ok(Ok(found)) => RemoteState::Pull {
                bytes: found.size,
                signed_by: found.signed_by,
            },
            Ok(Err(crate::remote::Miss::Absent)) => RemoteState::Absent,
            Ok(Err(crate::remote::Miss::Down)) => RemoteState::Unavailable,
            Err(e) => RemoteState::Refused {
                why: format!("{e:#}"),
            },
        });
    }
    Ok(())
}

/// `--push`: every layer of the plans and their images that the remote
/// lacks, signed; an entry that several plans share is pushed once.
fn push_layers(
    remote: &crate::remote::Remote,
    store: &Store,
    plans: &[&plan::Plan],
    key: &SigningKey,
) -> Result<()> {
    use crate::remote::Kind;
    // So that `kiln cache gc` does not remove an entry while it is packed.
    let _store_lock = store.lock_for_build(|| {
        eprintln!("waiting for `kiln cache gc` or `kiln cache verify` to finish…")
    })?;
    let mut seen = std::collections::HashSet::new();
    let entries = plans
        .iter()
        .flat_map(|plan| {
            plan.steps
                .iter()
                .map(|s| (Kind::Layer, s.id().to_string(), s.key))
                .chain([(Kind::Image, "image".to_owned(), plan.image.key)])
        })
        .filter(|(_, _, key)| seen.insert(*key));
    let mut present = 0;
    for (kind, id, entry_key) in entries {
        crate::cmd::check_interrupt()?;
        if remote.push(store, kind, &entry_key, &id, key)? {
            eprintln!(
                "pushed {id} ({}) to {}",
                entry_key.short(),
                remote.reference()
            );
        } else {
            present += 1;
        }
    }
    if present > 0 {
        eprintln!(
            "{present} entr{} already in {}",
            if present == 1 { "y was" } else { "ies were" },
            remote.reference()
        );
    }
    Ok(())
}

/// `KILN_SIGNING_KEY`, unless unset or empty (as a shell's `VAR=` means).
fn signing_key_from_env() -> Option<PathBuf> {
    path_from_env("KILN_SIGNING_KEY")
}

/// A file named by an environment variable, which kiln reads itself rather
/// than through clap: set but empty means unset, as in a shell's
/// `KILN_SIGNING_KEY= kiln build`.
fn path_from_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A run that built the image keeps its log in the store (the next run of
/// the recipe overwrites `out/NAME.build.log`), smoke boot included.
fn keep_log(summary: &Summary, log_path: &Path) -> Result<()> {
    let built = summary
        .rows
        .iter()
        .any(|r| r.stage == "image" && r.status == Status::Built);
    match &summary.build_log {
        Some(kept) if built => crate::store::copy_atomic(log_path, kept),
        _ => Ok(()),
    }
}

/// The build's smoke stage: boot (or recall a pass), add its row, write
/// the smoke record beside the provenance.
fn smoke_stage(
    global: &Global,
    args: &BuildArgs,
    recipe: &Recipe,
    store: &Store,
    ui: &Ui,
    summary: &mut Summary,
) -> Result<()> {
    let image_key = crate::plan::Key::parse(&summary.image_key)
        .with_context(|| format!("`{}` is not an image key", summary.image_key))?;
    let done = crate::smoke::stage::Stage {
        store,
        image_key,
        disk: &summary.image,
        disk_sha256: &summary.sha256,
        recipe,
        accel: args.vm.accel,
        firmware: args.vm.firmware.clone(),
        log_path: global.out.join(format!("{}.smoke.log", recipe.image.name)),
        verbose: global.verbose,
        force: args.force_smoke,
        secure_boot: crate::smoke::secure_boot::for_image(
            args.vm.secure_boot,
            &summary.image,
            None,
        )?,
        verity: crate::smoke::sealed::for_image(&summary.image)?,
    }
    .run(ui)?;
    let report = done.report;
    let (status, why) = if done.cached {
        (Status::Cached, "passed before".to_owned())
    } else if report.passed {
        (Status::Passed, smoke_line(&report))
    } else {
        let why = report.failure.as_ref().map(ToString::to_string);
        (Status::Failed, first_line(&why.unwrap_or_default()))
    };
    summary.rows.push(
        Row::new("smoke", &image_key, status)
            .because(why)
            .took(done.seconds),
    );
    let disk = record::smoke::Disk {
        path: &summary.image,
        sha256: &summary.sha256,
    };
    let statement = record::smoke::statement(&disk, &report, None);
    let recorded = record::smoke::write(&record::smoke::path_for(&summary.image), &statement)
        .and_then(|()| record::smoke::keep_in_store(store.root(), &recipe.image.name, &statement))
        .context("writing the smoke record");
    let failed = (!report.passed).then(|| SmokeFailed {
        image: summary.image.display().to_string(),
        failure: report.failure_text(),
        log: report.log.display().to_string(),
    });
    summary.smoke = Some(report);
    smoke_outcome(failed, recorded)
}

/// A failed smoke is the verdict (exit 3) even when its record could not be
/// written too; that second error rides along as context.
fn smoke_outcome(failed: Option<SmokeFailed>, recorded: Result<()>) -> Result<()> {
    match (failed, recorded) {
        (None, recorded) => recorded,
        (Some(f), Ok(())) => Err(f.into()),
        (Some(f), Err(e)) => {
            Err(anyhow::Error::from(f)
                .context(format!("{e:#}; and the image failed its smoke test")))
        }
    }
}

/// `tcg ready in 41.2s, 7/7 checks`.
fn smoke_line(r: &SmokeReport) -> String {
    let ready = r
        .boot_secs
        .map_or_else(|| "never ready".to_owned(), |b| format!("ready in {b:.1}s"));
    let secure_boot = if r.secure_boot.is_some() {
        ", Secure Boot on"
    } else {
        ""
    };
    format!(
        "{} {ready}, {}/{} checks{secure_boot}",
        r.accel, r.checks_passed, r.checks_total
    )
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_owned()
}

/// The recipe `image` was built from, as its `NAME.build.json` beside it
/// says. Without it kiln cannot know the image's checks, and judging the
/// boot alone would pass an image whose checks fail: that is an error.
fn recipe_of(image: &Path) -> Result<PathBuf> {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = image.with_file_name(format!("{stem}.build.json"));
    let fix = format!(
        "pass --recipe RECIPE, the recipe {} was built from, so its checks run",
        image.display()
    );
    let bad = |problem: String| -> anyhow::Error {
        BadInput::new(&report, "recipe", problem, fix.clone()).into()
    };
    if !report.is_file() {
        return Err(bad(format!(
            "{} has no build report, so kiln cannot tell which recipe's checks to run",
            image.display()
        )));
    }
    let summary: Summary = crate::store::read_json(&report)
        .map_err(|e| bad(format!("the build report is damaged ({e:#})")))?;
    let recipe = PathBuf::from(&summary.recipe);
    if !recipe.is_file() {
        return Err(bad(format!(
            "names the recipe {}, which does not exist",
            recipe.display()
        )));
    }
    Ok(recipe)
}

/// `kiln smoke IMAGE`: always boots (no cache), with the checks of the
/// recipe the image was built from, plus any given on the command line,
/// and writes the smoke record beside IMAGE.
pub fn smoke(global: &Global, args: &SmokeArgs) -> Result<()> {
    // As root, QEMU runs in kiln's own pid namespace: not even a `kill -9`
    // of kiln leaves it running.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        crate::cmd::isolate_processes()?;
    }
    for image in std::iter::once(&args.image).chain(args.upgrade_from.as_ref()) {
        if !image.is_file() {
            return Err(BadInput::arg(
                format!("image {} does not exist", image.display()),
                "build it first with `kiln build`, or give the path of a .qcow2 or .raw disk",
            )
            .into());
        }
    }
    let recipe_path = match &args.recipe {
        Some(r) => r.clone(),
        None => recipe_of(&args.image)?,
    };
    let recipe = recipe::load(&recipe_path)?;
    let mut spec = recipe.smoke.clone();
    spec.ssh |= args.ssh;
    let ssh_authorized_key = args
        .ssh_authorized_key
        .as_deref()
        .map(read_public_key)
        .transpose()?;
    if ssh_authorized_key.is_some() && !spec.ssh {
        return Err(BadInput::arg(
            "--ssh-authorized-key is given, but the smoke does not log in over SSH",
            "add --ssh (or `ssh = true` to the recipe's [smoke])",
        )
        .into());
    }
    crate::cmd::require_tools(&crate::cmd::smoke_tools(&spec))?;
    spec.checks.extend(args.checks.iter().cloned());
    for h in &args.http {
        spec.http.push(parse_http_arg(h)?);
    }
    if let Some(t) = args.timeout {
        spec.timeout = std::time::Duration::from_secs(t);
    }
    if args.upgrade_from.is_some() && spec.seed.is_empty() {
        return Err(BadInput::new(
            &recipe_path,
            "smoke.seed",
            "--upgrade-from needs seed commands, and the recipe has no [smoke] seed",
            "add seed = [\"...\"] to the recipe's [smoke]: commands that write the data the checks then look for",
        )
        .into());
    }
    let volume_specs = if args.no_volumes {
        Vec::new()
    } else {
        recipe.volumes.clone()
    };
    let disks = VolumeDisks::new(&volume_specs, args.keep_volumes.as_deref())?;
    let dir = args.image.parent().unwrap_or(Path::new("."));
    let log_path = args.log.clone().unwrap_or_else(|| {
        let stem = args.image.file_stem().unwrap_or_default().to_string_lossy();
        dir.join(format!("{stem}.smoke.log"))
    });
    let opts = SmokeOptions {
        accel: args.vm.accel,
        firmware: args.vm.firmware.clone(),
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| store_root(global).join("state-v1/host")),
        firmware_dir: store_root(global).join("firmware-v1"),
        log_path,
        verbose: global.verbose,
        volumes: disks.volumes.clone(),
        wait_poweroff: false,
        keep_overlay: args.keep_overlay.clone(),
        secure_boot: crate::smoke::secure_boot::for_image(
            args.vm.secure_boot,
            &args.image,
            args.secure_boot_cert
                .clone()
                .or_else(|| path_from_env("KILN_SECURE_BOOT_CERT"))
                .as_deref(),
        )?,
        verity: crate::smoke::sealed::for_image(&args.image)?,
        ssh_authorized_key,
    };
    let ui = Ui::new(global.json);

    let (report, what) = match &args.upgrade_from {
        Some(old) => match crate::smoke::upgrade::run(old, &args.image, &spec, &opts, &ui)? {
            Upgrade::SeedFailed(seeded) => {
                return Err(SmokeFailed {
                    image: old.display().to_string(),
                    failure: format!(
                        "boot 1 of 2 (the old image), seeding: {}",
                        seeded.failure_text()
                    ),
                    log: seeded.log.display().to_string(),
                }
                .into());
            }
            Upgrade::Checked(report) => (
                report,
                "boot 2 of 2 (the new image, on the old image's volumes), checks: ",
            ),
        },
        None => {
            let stage = ui.stage("smoke", &format!("booting {}", args.image.display()));
            let report = crate::smoke::run(&args.image, &seed_then_checks(&spec), &opts);
            match &report {
                Ok(r) if r.passed => stage.done("passed"),
                _ => stage.failed(),
            };
            (report?, "")
        }
    };
    let digest = |p: &Path| {
        crate::plan::key::file_digest(p).with_context(|| format!("hashing {}", p.display()))
    };
    let sha256 = digest(&args.image)?;
    let old_sha256 = args.upgrade_from.as_deref().map(digest).transpose()?;
    let old = args
        .upgrade_from
        .as_deref()
        .zip(old_sha256.as_deref())
        .map(|(path, sha256)| record::smoke::Disk { path, sha256 });
    let record_path = record::smoke::path_for(&args.image);
    let statement = record::smoke::statement(
        &record::smoke::Disk {
            path: &args.image,
            sha256: &sha256,
        },
        &report,
        old.as_ref(),
    );
    // Only the recipe's own test is the image's verdict in `kiln log`.
    let own_test = args.checks.is_empty()
        && args.http.is_empty()
        && args.timeout.is_none()
        && !args.no_volumes
        && args.upgrade_from.is_none()
        && !args.ssh
        && args.ssh_authorized_key.is_none();
    let recorded = record::smoke::write(&record_path, &statement)
        .context("writing the smoke record")
        .and_then(|()| {
            if own_test {
                record::smoke::keep_in_store(&store_root(global), &recipe.image.name, &statement)
                    .context("keeping the smoke record in the store")
            } else {
                Ok(())
            }
        });
    if global.json {
        print_json(&report)?;
    } else {
        println!(
            "{} {}: {}, {:.1}s in all; firmware {}; console in {}; record in {}",
            args.image.display(),
            if report.passed { "passed" } else { "FAILED" },
            smoke_line(&report),
            report.total_secs,
            report.firmware,
            report.log.display(),
            record_path.display()
        );
        print!("{}", report.checks_text());
        if let Some(note) = &report.note {
            println!("note: {note}");
        }
    }
    let failed = (!report.passed).then(|| SmokeFailed {
        image: args.image.display().to_string(),
        failure: format!("{what}{}", report.failure_text()),
        log: report.log.display().to_string(),
    });
    smoke_outcome(failed, recorded)
}

/// An OpenSSH public key file (`TYPE BASE64 [COMMENT]`, one line).
fn read_public_key(path: &Path) -> Result<String> {
    let bad = |problem: String| -> anyhow::Error {
        BadInput::new(
            path,
            "--ssh-authorized-key",
            problem,
            "give an OpenSSH public key file, e.g. KEY.pub from `ssh-keygen -t ed25519 -f KEY`",
        )
        .into()
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let key = text.trim();
    let mut fields = key.split_whitespace();
    let kind = fields.next().unwrap_or("");
    let valid = (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && fields.next().is_some()
        && !key.contains('\n');
    if !valid {
        return Err(bad("is not one OpenSSH public key line".to_owned()));
    }
    Ok(key.to_owned())
}

/// `PORT:PATH:STATUS[:CONTAINS]`.
fn parse_http_arg(h: &str) -> Result<crate::recipe::HttpCheck> {
    let bad = || {
        BadInput::arg(
            format!("--http {h} is not PORT:PATH:STATUS[:CONTAINS]"),
            "write e.g. --http 80:/:200:hello",
        )
    };
    let mut parts = h.splitn(4, ':');
    let port = parts
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    let path = parts
        .next()
        .filter(|p| p.starts_with('/'))
        .ok_or_else(bad)?
        .to_owned();
    let status = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let contains = parts.next().map(str::to_owned);
    Ok(crate::recipe::HttpCheck {
        port,
        path,
        status,
        contains,
    })
}

#[derive(Serialize)]
struct LockReport {
    recipe: String,
    written: Vec<PathBuf>,
    changes: Vec<String>,
    /// Steps (and `image`) the next `kiln build` will build.
    next_build: Vec<String>,
}

pub fn lock(global: &Global, args: &LockArgs) -> Result<()> {
    let Prepared {
        recipe,
        mut locks,
        store,
        log_path,
    } = prepare(global, &args.recipe, "lock", |_| {
        vec![crate::cmd::LAYER_TOOLS]
    })?;
    let forgotten = match &args.update {
        Some(layer) => crate::lock::forget(&recipe, &mut locks, layer)?,
        None => crate::lock::Forgotten::none(),
    };
    let ui = Ui::new(global.json);
    let opts = BuildOptions {
        refresh: false,
        out_dir: global.out.clone(),
        layers_only: true,
        fresh_resolve: args.update.is_some(),
        signing_key: None,
        secure_boot: None,
        remote: None,
        push: false,
        shared: None,
    };
    layers::build(&recipe, &mut locks, &store, &opts, &ui)
        .map_err(|e| e.context(format!("the full log is in {}", log_path.display())))?;
    let written = locks.save_changed()?;
    let plan = plan::make(&recipe, &locks)?;
    let (steps, image) = plan::freshness::freshness(&plan, &store, false);
    let mut next_build: Vec<String> = plan
        .steps
        .iter()
        .zip(&steps)
        .filter(|(_, f)| **f != Freshness::Cached)
        .map(|(s, _)| s.id().into())
        .collect();
    if image != Freshness::Cached {
        next_build.push("image".into());
    }
    let report = LockReport {
        recipe: args.recipe.display().to_string(),
        written,
        changes: forgotten.report(&locks, &recipe, &store),
        next_build,
    };
    if global.json {
        return print_json(&report);
    }
    for line in &report.changes {
        println!("{line}");
    }
    match report.written.as_slice() {
        [] => println!("lock files unchanged"),
        files => files.iter().for_each(|f| println!("wrote {}", f.display())),
    }
    if report.next_build.is_empty() {
        println!("the next build is all cache hits");
    } else {
        println!(
            "the next build will build: {}",
            report.next_build.join(", ")
        );
    }
    Ok(())
}

pub fn plan(global: &Global, args: &PlanArgs) -> Result<()> {
    let recipe = recipe::load(&args.recipe)?;
    let locks = Locks::load(&recipe.sources)?;
    let plan = plan::make(&recipe, &locks)?;
    let root = store_root(global);
    // Planning never creates a store; a missing one just means nothing is cached.
    let store = if root.is_dir() {
        Some(Store::open(&root)?)
    } else {
        None
    };
    let mut report = plan::freshness::PlanReport::new(&plan, store.as_ref());
    report.recipe = args.recipe.display().to_string();
    if let Some(remote) = open_remote(&args.remote, false, false)? {
        remote_plan(&remote, &plan, &mut report)?;
    }
    if global.json {
        return print_json(&report);
    }
    print!("{}", report.text());
    Ok(())
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).context("serialising JSON")?
    );
    Ok(())
}

/// `kiln cache ls|du|verify|gc`.
pub fn cache(global: &Global, command: &CacheCommand) -> Result<()> {
    use crate::store::gc::{self, human};
    let root = store_root(global);
    if !root.is_dir() {
        anyhow::bail!(
            "there is no store at {} (nothing built yet, or see --cache / KILN_CACHE_DIR)",
            root.display()
        );
    }
    let store = Store::open(&root)?;
    match command {
        CacheCommand::Ls => {
            let rows = gc::list(&store)?;
            if global.json {
                return print_json(&rows);
            }
            let now = crate::store::now();
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let users = r.recipes.join(",")
                        + &if r.images.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " ({} image{})",
                                r.images.len(),
                                if r.images.len() == 1 { "" } else { "s" }
                            )
                        };
                    vec![
                        r.kind.to_owned(),
                        r.key[..12].to_owned(),
                        r.what.clone(),
                        human(r.bytes),
                        age(now.saturating_sub(r.created)),
                        if users.is_empty() { "-".into() } else { users },
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["KIND", "KEY", "WHAT", "SIZE", "AGE", "USED BY"],
                    &table_rows
                )
            );
            println!(
                "{} entries, {} in {}",
                rows.len(),
                human(rows.iter().map(|r| r.bytes).sum()),
                root.display()
            );
        }
        CacheCommand::Du => {
            let rows = gc::usage(&store)?;
            if global.json {
                return print_json(&rows);
            }
            let table_rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.section.clone(), r.entries.to_string(), human(r.bytes)])
                .collect();
            print!("{}", table(&["PART", "ENTRIES", "SIZE"], &table_rows));
        }
        CacheCommand::Verify(args) => {
            let _lock = crate::store::lock::lock(
                &store.lock_path("store"),
                crate::store::lock::Mode::Exclusive,
                "running builds to finish",
                || eprintln!("waiting for running builds to finish…"),
            )?;
            let rows = crate::store::verify_all(
                &store,
                if args.quick {
                    crate::store::integrity::Depth::Meta
                } else {
                    crate::store::integrity::Depth::Content
                },
            )?;
            if global.json {
                print_json(&rows)?;
            } else {
                let table_rows: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.kind.as_str().to_owned(),
                            r.key[..12].to_owned(),
                            r.what.clone(),
                            r.result.clone(),
                            format!("{:.2}", r.seconds),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["KIND", "KEY", "WHAT", "RESULT", "SECONDS"], &table_rows)
                );
            }
            let corrupt = rows.iter().filter(|r| !r.intact).count();
            if corrupt > 0 {
                anyhow::bail!(
                    "{corrupt} corrupt entr{} moved to {}; the next build rebuilds {}",
                    if corrupt == 1 { "y" } else { "ies" },
                    root.join(crate::store::CORRUPT).display(),
                    if corrupt == 1 { "it" } else { "them" }
                );
            }
            if !global.json {
                println!("{} entries intact", rows.len());
            }
        }
        CacheCommand::Gc(args) => {
            let _lock = crate::store::lock::lock(
                &store.lock_path("store"),
                crate::store::lock::Mode::Exclusive,
                "running builds to finish",
                || eprintln!("waiting for running builds to finish…"),
            )?;
            let done = gc::collect(&store, args.keep, args.dry_run)?;
            if global.json {
                return print_json(&done);
            }
            let verb = if done.dry_run {
                "would remove"
            } else {
                "removed"
            };
            for r in &done.removed {
                println!(
                    "{verb} {} {} {} ({})",
                    r.kind,
                    &r.name[..r.name.len().min(12)],
                    r.what,
                    human(r.bytes)
                );
            }
            for why in &done.kept_all_layers_because {
                println!("kept every layer, because {why}");
            }
            println!(
                "kept {} image{} and {} layer{}; {} {} entr{}, {} {}",
                done.kept_images.len(),
                if done.kept_images.len() == 1 { "" } else { "s" },
                done.kept_layers,
                if done.kept_layers == 1 { "" } else { "s" },
                verb,
                done.removed.len(),
                if done.removed.len() == 1 { "y" } else { "ies" },
                if done.dry_run { "would free" } else { "freed" },
                human(done.freed)
            );
        }
    }
    Ok(())
}

fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

pub fn inspect(global: &Global, args: &InspectArgs) -> Result<()> {
    let path = record::manifest::path_for(&args.image);
    let m = record::manifest::read(&path)?;
    // The verdict is checked against the disk itself when it is there: a
    // record is about one disk, not about whatever now has its name.
    let disk = path.with_file_name(&m.image.file);
    let disk_sha256 = if disk.is_file() {
        crate::plan::key::file_digest(&disk)
            .with_context(|| format!("hashing {}", disk.display()))?
    } else {
        m.image.sha256.clone()
    };
    let smoke = record::smoke::verdict(&record::smoke::path_for(&path), &disk_sha256);
    let signed = record::signed::claim(&path, &m.image.file, &disk_sha256);
    if global.json {
        let mut value = serde_json::to_value(&m).context("serialising the manifest")?;
        // The summary leaves out the file list; the manifest itself has it.
        value["files"] = serde_json::json!(m.files.as_ref().map(Vec::len));
        value["smoke"] = serde_json::to_value(&smoke).context("serialising the smoke verdict")?;
        value["signature"] = serde_json::to_value(&signed).context("serialising the signature")?;
        return print_json(&value);
    }
    print!("{}", record::manifest::summary(&m));
    println!("{:<12}{}", "smoke", smoke.text());
    println!("{:<12}{}", "signed", signed.text());
    Ok(())
}

pub fn verify(global: &Global, args: &VerifyArgs) -> Result<()> {
    let trusted = args
        .trusted_keys
        .iter()
        .map(|k| PublicKey::load(k))
        .collect::<Result<Vec<_>>>()?;
    let report = match (&args.image, &args.root) {
        (Some(image), None) => {
            require_root("verify IMAGE")?;
            let path = record::verify::manifest_for(image, args.manifest.as_deref());
            let m = record::manifest::read(&path)?;
            // The signature first: it says whether the manifest is worth
            // comparing the disk with.
            let signature = (!trusted.is_empty())
                .then(|| record::signed::check(image, &m, &path, &trusted))
                .transpose()?;
            match record::verify::image(image, &m, &path, args.extract.as_deref()) {
                Ok(report) => report.with_signature(signature),
                // A damaged disk may not even be readable: its failed
                // signature check is still the verdict.
                Err(e) => match signature.filter(|c| !c.ok()) {
                    Some(check) => {
                        print!("{}", check.text());
                        return Err(NotVerified(format!(
                            "{}; and the disk could not be compared with its manifest: {e:#}",
                            check.failures.join("; ")
                        ))
                        .into());
                    }
                    None => return Err(e),
                },
            }
        }
        (None, Some(root)) => {
            let path = args.manifest.as_deref().ok_or_else(|| BadInput::arg("--root needs --manifest FILE", "pass the manifest the system was built from, e.g. --manifest out/web.manifest.json"))?;
            let m = record::manifest::read(path)?;
            record::verify::root(root, &m, path, &args.ignore)?
        }
        _ => return Err(BadInput::arg("give either an IMAGE or --root DIR", "e.g. `kiln verify out/web.qcow2` or `kiln verify --root / --manifest web.manifest.json`").into()),
    };
    if global.json {
        print_json(&report)?;
    } else {
        print!("{}", report.text());
    }
    if report.clean {
        return Ok(());
    }
    if let Some(check) = report.signature.as_ref().filter(|c| !c.ok()) {
        return Err(NotVerified(check.failures.join("; ")).into());
    }
    let d = &report.differences;
    Err(Drift(format!(
        "{} modified, {} added, {} removed{}",
        d.modified.len(),
        d.added.len(),
        d.removed.len(),
        report.drift_extra()
    ))
    .into())
}

pub fn log(global: &Global, args: &LogArgs) -> Result<()> {
    let root = store_root(global);
    let name = match &args.recipe {
        Some(r) if r.extension().is_some_and(|e| e == "toml") || r.is_file() => {
            Some(recipe::load(r)?.image.name)
        }
        Some(r) => Some(r.display().to_string()),
        None => None,
    };
    let records = if root.is_dir() {
        record::history::read(&Store::open(&root)?, name.as_deref())?
    } else {
        Vec::new()
    };
    let verdicts: Vec<record::smoke::Verdict> = records
        .iter()
        .map(|r| record::smoke::verdict_in_store(&root, &r.name, &r.image_sha256))
        .collect();
    if global.json {
        let mut values = Vec::new();
        for (r, v) in records.iter().zip(&verdicts) {
            let mut value = serde_json::to_value(r).context("serialising a history record")?;
            value["smoke"] = serde_json::to_value(v).context("serialising a smoke verdict")?;
            values.push(value);
        }
        return print_json(&values);
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .zip(&verdicts)
        .map(|(r, verdict)| {
            let changes = if r.first {
                "first build".to_owned()
            } else if r.changes.is_empty() {
                "no package changes".to_owned()
            } else {
                record::history::show_changes(&r.changes)
            };
            vec![
                r.time.clone(),
                r.name.clone(),
                r.sudo_user.clone().unwrap_or_else(|| r.user.clone()),
                r.host.clone(),
                r.image_sha256[..12].to_owned(),
                verdict.short(),
                changes,
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["TIME", "IMAGE", "USER", "HOST", "SHA256", "SMOKE", "PACKAGES"],
            &rows
        )
    );
    Ok(())
}

/// `kiln diff A B`, from the two images' manifests.
pub fn diff(global: &Global, args: &DiffArgs) -> Result<()> {
    let read = |p: &Path| {
        let path = record::manifest::path_for(p);
        if !path.is_file() {
            return Err(anyhow::Error::from(BadInput::arg(
                format!("{} has no manifest ({} does not exist)", p.display(), path.display()),
                "give an image kiln built (out/NAME.qcow2, its manifest beside it) or a manifest file",
            )));
        }
        record::manifest::read(&path)
    };
    let (a, b) = (read(&args.a)?, read(&args.b)?);
    let d = record::diff::diff(&a, &b);
    if global.json {
        return print_json(&d);
    }
    print!("{}", record::diff::text(&d));
    Ok(())
}

/// `kiln key new NAME`.
pub fn key(global: &Global, command: &KeyCommand) -> Result<()> {
    match command {
        KeyCommand::New(args) => {
            let files = crate::sign::key::new(&args.dir, &args.name, args.secure_boot)?;
            if global.json {
                return print_json(&files.all());
            }
            println!(
                "wrote {} (private, mode 0600: keep it out of git; give it to `kiln build --signing-key`)",
                files.key.display()
            );
            println!(
                "wrote {} (public: give it to `kiln verify --trusted-key`)",
                files.public.display()
            );
            if let Some((key, cert)) = &files.secure_boot {
                println!(
                    "wrote {} (private Secure Boot key, mode 0600)",
                    key.display()
                );
                println!(
                    "wrote {} (its self-signed certificate, CN={})",
                    cert.display(),
                    args.name
                );
            }
            Ok(())
        }
    }
}

/// `kiln export IMAGE --format F…`.
pub fn export(global: &Global, args: &ExportArgs) -> Result<()> {
    let formats = args
        .formats
        .iter()
        .map(|f| {
            crate::recipe::ExportFormat::parse(f).ok_or_else(|| {
                BadInput::arg(
                    format!("--format {f}: kiln does not write that format"),
                    format!(
                        "use one of {}",
                        crate::recipe::ExportFormat::ALL
                            .map(|f| f.name())
                            .join(", ")
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Read before asking for root: a wrong path is bad input for anyone.
    record::manifest::read(&record::manifest::path_for(&args.image))?;
    require_root("export")?;
    crate::cmd::require_tools(&[crate::export::tools(&formats)])?;
    crate::cmd::isolate_processes()?;
    let store = Store::open(&store_root(global))?;
    crate::cmd::set_tool_tmp(&store.root().join("tmp"));
    let _build = store.lock_for_build(|| eprintln!("waiting for `kiln cache gc` to finish"))?;
    let report = crate::export::export_image(&store, &args.image, &formats, &Ui::new(global.json))?;
    if global.json {
        return print_json(&report);
    }
    print!("{}", report.text());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> SmokeFailed {
        SmokeFailed {
            image: "out/web.qcow2".into(),
            failure: "check 2 failed".into(),
            log: "out/web.smoke.log".into(),
        }
    }

    #[test]
    fn a_failed_smoke_stays_exit_3_when_its_record_cannot_be_written() {
        let unwritable = || Err(anyhow::anyhow!("out/web.smoke.json: disk full"));
        let both = smoke_outcome(Some(failed()), unwritable()).unwrap_err();
        assert_eq!(
            crate::error::exit_code(&both),
            crate::error::exit::SMOKE_FAILED
        );
        let text = format!("{both:#}");
        assert!(
            text.contains("disk full") && text.contains("check 2 failed"),
            "{text}"
        );

        let only_record = smoke_outcome(None, unwritable()).unwrap_err();
        assert_eq!(
            crate::error::exit_code(&only_record),
            crate::error::exit::FAILURE
        );
        assert!(smoke_outcome(None, Ok(())).is_ok());
        let only_smoke = smoke_outcome(Some(failed()), Ok(())).unwrap_err();
        assert_eq!(
            crate::error::exit_code(&only_smoke),
            crate::error::exit::SMOKE_FAILED
        );
    }
}
