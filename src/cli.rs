//! The command line, as clap types. The commands themselves live in
//! `commands.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::recipe::DEFAULT_RECIPE;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Bake immutable, layered, cached VM images from a TOML recipe")]
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
    /// Build a recipe's layers and image (then boot it, once smoke exists)
    Build(BuildArgs),
    /// Show each step's key, and whether it is cached or must be built and why
    Plan(PlanArgs),
    /// Summarise a built image from its manifest
    Inspect(InspectArgs),
    /// Check a disk, or a live root directory, against its manifest (exit 4 on drift)
    Verify(VerifyArgs),
    /// List the builds of a recipe (or of every recipe), newest first
    Log(LogArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe to build
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
    /// Rebuild every step and the image, whatever the store holds
    #[arg(long)]
    pub refresh: bool,
    /// Then build it again into an empty temporary store (a full cold build)
    /// and fail, naming the first difference, unless the two disks are identical
    #[arg(long)]
    pub check_repro: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe to plan
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
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
    /// With --root: another path whose changes are expected (repeatable)
    #[arg(long, value_name = "PATH")]
    pub ignore: Vec<String>,
    /// With IMAGE: leave the root filesystem, with its owners and modes, in
    /// this new directory (for --root, diff or inspection)
    #[arg(long, value_name = "DIR", conflicts_with = "root")]
    pub extract: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// A recipe file or an image name (default: every recipe)
    pub recipe: Option<PathBuf>,
}
