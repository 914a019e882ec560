//! kiln: bake immutable VM images. See README.md.

mod assemble;
mod cli;
mod cmd;
mod commands;
mod disk;
mod error;
mod export;
mod files;
mod layers;
mod lock;
mod packages;
mod plan;
mod recipe;
mod record;
mod remote;
mod sign;
mod smoke;
mod store;
mod ui;

use clap::Parser;

fn main() {
    // Before any thread exists: what the caller's shell set must not reach
    // an image (see cmd::fix_process_state).
    cmd::fix_process_state();
    cmd::install_signal_handlers();
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        cli::Command::Build(args) => commands::build(&cli.global, args),
        cli::Command::Plan(args) => commands::plan(&cli.global, args),
        cli::Command::Lock(args) => commands::lock(&cli.global, args),
        cli::Command::Smoke(args) => commands::smoke(&cli.global, args),
        cli::Command::Cache(args) => commands::cache(&cli.global, &args.command),
        cli::Command::Inspect(args) => commands::inspect(&cli.global, args),
        cli::Command::Verify(args) => commands::verify(&cli.global, args),
        cli::Command::Log(args) => commands::log(&cli.global, args),
        cli::Command::Diff(args) => commands::diff(&cli.global, args),
        cli::Command::Key(args) => commands::key(&cli.global, &args.command),
        cli::Command::Push(args) => commands::push(&cli.global, args),
        cli::Command::Pull(args) => commands::pull(&cli.global, args),
        cli::Command::Export(args) => commands::export(&cli.global, args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(error::exit_code(&err));
    }
}
