//! The command line, as clap types. The commands themselves live in
//! `commands.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::recipe::DEFAULT_RECIPE;

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Bake immutable, layered, cached VM images from a TOML recipe"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// The layer store (default: /var/cache/kiln as root, $KILN_CACHE_DIR overrides)
    #[arg(long, global = true, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Where built images, logs and reports go
    #[arg(long, global = true, value_name = "DIR", default_value = "out")]
    pub out: PathBuf,
    /// Stream the output of the tools kiln runs
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Print the result as JSON on stdout (progress stays on stderr)
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a recipe's layers and image, then boot it and run its smoke
    /// checks; several recipes build the steps they share once
    Build(BuildArgs),
    /// Show each step's key, and whether it is cached or must be built and why
    Plan(PlanArgs),
    /// Boot an image in QEMU and run its recipe's smoke checks
    Smoke(SmokeArgs),
    /// Resolve the recipe's lock file (recipes/NAME.lock), or re-resolve layers
    Lock(LockArgs),
    /// Inspect and maintain the store: ls, du, verify, gc
    Cache(CacheArgs),
    /// Summarise a built image from its manifest
    Inspect(InspectArgs),
    /// Check a disk, or a live root directory, against its manifest, and a
    /// disk's signature with --trusted-key (exit 4 on drift or a bad signature)
    Verify(VerifyArgs),
    /// List the builds of a recipe (or of every recipe), newest first
    Log(LogArgs),
    /// What changed between two built images: packages, files, layer keys
    Diff(DiffArgs),
    /// Make signing keys: `kiln key new NAME`
    Key(KeyArgs),
    /// Push a built image with its manifest, SBOM and signed provenance to
    /// an OCI registry as one artifact, and/or as a KubeVirt containerDisk
    Push(PushArgs),
    /// Fetch an image pushed by `kiln push`, verify its signature and every
    /// digest, then write it to --out (exit 4 when it does not verify)
    Pull(PullArgs),
    /// Write other formats of a built image beside it (out/NAME.vmdk, …),
    /// from its store entry, cached like the recipe's `[image] formats`
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The disk a build wrote (out/NAME.qcow2); its records are beside it
    pub image: PathBuf,
    /// Where to push the image with its records: oci://HOST[:PORT]/REPOSITORY[:TAG]
    /// (default tag: latest), or oci+http://… for a plain-HTTP registry;
    /// may be left out with --containerdisk
    #[arg(value_name = "REF", required_unless_present = "containerdisk")]
    pub reference: Option<String>,
    /// Also (or, without REF, only) push the disk as a KubeVirt
    /// containerDisk, an OCI image holding /disk/NAME.qcow2, to this
    /// reference
    #[arg(long, value_name = "REF")]
    pub containerdisk: Option<String>,
    /// Sign the artifact's file list (NAME.key from `kiln key new`), so
    /// that a pull also trusts the SBOM and smoke record [default:
    /// $KILN_SIGNING_KEY]
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Trust images whose provenance this public key signed (NAME.pub);
    /// repeatable [default: $KILN_TRUSTED_KEY]
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The built image (out/NAME.qcow2): its manifest names its store entry
    pub image: PathBuf,
    /// A format to write: raw, qcow2, vmdk, vhd, gce or containerdisk
    /// (give --format again for more)
    #[arg(long = "format", value_name = "FORMAT", required = true)]
    pub formats: Vec<String>,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new Ed25519 signing key NAME.key (mode 0600: keep it out of
    /// git) and its public half NAME.pub, for `--signing-key` and
    /// `kiln verify --trusted-key`; never overwrites a file
    New(KeyNewArgs),
}

#[derive(Debug, Args)]
pub struct KeyNewArgs {
    /// The key's name, the keyid of its signatures (e.g. build-2025)
    pub name: String,
    /// Where to write the files (created if missing)
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Also write an RSA-2048 key NAME.sb.key and a self-signed certificate
    /// NAME.sb.crt for UEFI Secure Boot (with openssl)
    #[arg(long)]
    pub secure_boot: bool,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Every layer and image: size, age, and which recipes and images use it
    Ls,
    /// Disk use of each part of the store
    Du,
    /// Re-hash every entry and compare with the digest recorded when it was
    /// stored; corrupt entries are moved to corrupt-v1/ (the next build rebuilds them)
    Verify(CacheVerifyArgs),
    /// Keep the newest N images of each recipe and every layer they need;
    /// remove the rest and print what that freed
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct CacheVerifyArgs {
    /// Check metadata and sizes only (what a build checks before using an
    /// entry), not the content of every file
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Images to keep per recipe (newest first)
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub keep: usize,
    /// Print what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The recipe to lock
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
    /// Re-resolve LAYER against today's archive (every layer when no name is given)
    #[arg(long, value_name = "LAYER", num_args = 0..=1, default_missing_value = "")]
    pub update: Option<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipes to build: several build the union of their steps once,
    /// then each image
    #[arg(default_value = DEFAULT_RECIPE, value_name = "RECIPE")]
    pub recipes: Vec<PathBuf>,
    /// With several recipes: run at most N jobs (a step, an image, a smoke
    /// boot) at once [default: the number of cores]
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Rebuild every step and the image, whatever the store holds
    #[arg(long)]
    pub refresh: bool,
    /// Re-resolve LAYER's lock first (every layer when no name is given)
    #[arg(long, value_name = "LAYER", num_args = 0..=1, default_missing_value = "")]
    pub update: Option<String>,
    /// Do not boot the image afterwards
    #[arg(long, conflicts_with = "force_smoke")]
    pub no_smoke: bool,
    /// Boot the image even if this image already passed this smoke test
    #[arg(long)]
    pub force_smoke: bool,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub secure_boot_key: SecureBootKeyArgs,
    /// Then build it again into an empty temporary store (a full cold build)
    /// and fail, naming the first difference, unless the two disks are identical
    #[arg(long)]
    pub check_repro: bool,
    /// Sign the provenance with this key (NAME.key from `kiln key new`):
    /// writes out/NAME.provenance.intoto.jsonl [default: $KILN_SIGNING_KEY]
    #[arg(long, value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Push every layer of the recipe that the remote cache lacks, signed
    /// with --signing-key (for CI builders)
    #[arg(long)]
    pub push: bool,
}

/// The shared layer cache on an OCI registry.
#[derive(Debug, Args, Clone)]
pub struct RemoteArgs {
    /// A shared layer cache: oci://HOST[:PORT]/REPOSITORY, or
    /// oci+http://HOST:PORT/REPOSITORY for a plain-HTTP registry
    /// [default: $KILN_REMOTE]
    #[arg(long, value_name = "REF")]
    pub remote: Option<String>,
    /// Use a layer from the remote cache only if it is signed by this
    /// public key (NAME.pub from `kiln key new`); repeatable; without one
    /// the remote is not read [default: $KILN_TRUSTED_KEY]
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,
}

/// How to run QEMU.
#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Acceleration: auto probes KVM with a short real boot and falls back to TCG
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: crate::smoke::Accel,
    /// UEFI firmware (OVMF_CODE); its VARS file is looked for beside it
    #[arg(long, value_name = "FILE")]
    pub firmware: Option<PathBuf>,
    /// Boot with UEFI Secure Boot enforced: auto is on for a signed image
    #[arg(long, value_enum, default_value = "auto")]
    pub secure_boot: crate::smoke::SecureBootMode,
}

/// The Secure Boot key pair a build signs the UKI with (never in a recipe).
#[derive(Debug, Args, Clone)]
pub struct SecureBootKeyArgs {
    /// Sign the UKI with this RSA private key (PEM, mode 0600; NAME.sb.key;
    /// or KILN_SECURE_BOOT_KEY=FILE)
    #[arg(long, value_name = "KEY")]
    pub secure_boot_key: Option<PathBuf>,
    /// The key's X.509 certificate (PEM; NAME.sb.crt; or KILN_SECURE_BOOT_CERT=FILE)
    #[arg(long, value_name = "CERT")]
    pub secure_boot_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SmokeArgs {
    /// The image: out/NAME.qcow2 (or .raw)
    pub image: PathBuf,
    /// Take the checks from this recipe (default: the recipe the image was built from)
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// An extra in-guest check (repeatable)
    #[arg(long = "check", value_name = "COMMAND")]
    pub checks: Vec<String>,
    /// An extra HTTP check, PORT:PATH:STATUS[:CONTAINS] (repeatable)
    #[arg(long = "http", value_name = "SPEC")]
    pub http: Vec<String>,
    /// Seconds to wait for the verdict (default: the recipe's [smoke] timeout)
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Where the console goes (default: beside the image, NAME.smoke.log)
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Where the KVM probe verdict is cached (default: in the store)
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Keep the data volume disks in DIR (NAME.qcow2; reused when present)
    #[arg(long, value_name = "DIR", conflicts_with = "no_volumes")]
    pub keep_volumes: Option<PathBuf>,
    /// Boot without the recipe's data volumes (to see that the image copes)
    #[arg(long)]
    pub no_volumes: bool,
    /// Keep the VM's writes to its root disk in FILE (a qcow2 overlay on
    /// IMAGE), after a clean shutdown: e.g. to `kiln verify` what a live
    /// system changed
    #[arg(long, value_name = "FILE")]
    pub keep_overlay: Option<PathBuf>,
    /// Log in over SSH as root with a throwaway key passed as the
    /// ssh.authorized_keys.root credential, and run the recipe's ssh_checks
    /// (as `ssh = true` in its [smoke] does)
    #[arg(long)]
    pub ssh: bool,
    /// With --ssh: pass this public key as root's credential instead of the
    /// throwaway key's; kiln still logs in with its own key, so the login
    /// must be refused (a negative test of the image)
    #[arg(long, value_name = "FILE.pub")]
    pub ssh_authorized_key: Option<PathBuf>,
    /// Upgrade test: boot OLD with fresh volumes, run the recipe's [smoke] seed,
    /// shut it down, then boot IMAGE with the same volumes and run the checks
    #[arg(long, value_name = "OLD")]
    pub upgrade_from: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
    /// With Secure Boot on: the certificate to enroll in the firmware's db
    /// (or KILN_SECURE_BOOT_CERT=FILE; default: the one the image was signed
    /// with, else Debian's snakeoil test certificate)
    #[arg(long, value_name = "CERT")]
    pub secure_boot_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe to plan
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
    /// Also say which steps the remote cache would serve
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// out/NAME.qcow2 (its manifest is out/NAME.manifest.json) or a manifest
    pub image: PathBuf,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["image", "root"]))]
pub struct VerifyArgs {
    /// A built disk (out/NAME.qcow2): its sha256 and every file of its root filesystem
    pub image: Option<PathBuf>,
    /// A live root directory (`/` on a server) instead of a disk
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The manifest (default: beside the image; required with --root)
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// With --root: another path whose changes are expected, or a prefix
    /// ending in `*` (repeatable)
    #[arg(long, value_name = "PATH")]
    pub ignore: Vec<String>,
    /// With IMAGE: leave the root filesystem, with its owners and modes, in
    /// this new directory (for --root, diff or inspection)
    #[arg(long, value_name = "DIR", conflicts_with = "root")]
    pub extract: Option<PathBuf>,
    /// With IMAGE: also check its signed provenance
    /// (NAME.provenance.intoto.jsonl beside it) against this public key
    /// (NAME.pub); repeatable, any one trusted key's signature suffices
    #[arg(long = "trusted-key", value_name = "FILE", conflicts_with = "root")]
    pub trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// A recipe file or an image name (default: every recipe)
    pub recipe: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The older image (out/NAME.qcow2) or its manifest (NAME.manifest.json)
    pub a: PathBuf,
    /// The newer image or its manifest
    pub b: PathBuf,
}
