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
    /// Resolve the recipe's lock file (recipes/NAME.lock), or re-resolve layers
    Lock(LockArgs),
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
    /// The recipe to build
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
    /// Rebuild every step and the image, whatever the store holds
    #[arg(long)]
    pub refresh: bool,
    /// Re-resolve LAYER's lock first (every layer when no name is given)
    #[arg(long, value_name = "LAYER", num_args = 0..=1, default_missing_value = "")]
    pub update: Option<String>,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe to plan
    #[arg(default_value = DEFAULT_RECIPE)]
    pub recipe: PathBuf,
}
