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
    /// Inspect and maintain the store: ls, du, verify, gc
    Cache(CacheArgs),
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
    Verify(VerifyArgs),
    /// Keep the newest N images of each recipe and every layer they need;
    /// remove the rest and print what that freed
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
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
pub struct BuildArgs {
    /// The recipe to build
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
    /// Rebuild every step and the image, whatever the store holds
    #[arg(long)]
    pub refresh: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe to plan
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
}
