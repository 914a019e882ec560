mod cmd;
mod error;
mod recipe;
mod smoke;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Temporary command line (the smoke branch): `kiln smoke IMAGE`, and any
/// other arguments are recipes to load and print, as before.
#[derive(Parser)]
#[command(name = "kiln")]
enum Cli {
    /// Boot an image and run its checks (temporary form, for the smoke branch).
    Smoke(SmokeArgs),
    /// Load recipes and print them.
    Load { recipes: Vec<PathBuf> },
}

#[derive(clap::Args)]
struct SmokeArgs {
    image: PathBuf,
    /// Take the [smoke] section of this recipe.
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// An in-guest check (repeatable; added to the recipe's).
    #[arg(long = "check")]
    checks: Vec<String>,
    /// An HTTP check, PORT:PATH:STATUS[:CONTAINS] (repeatable).
    #[arg(long = "http")]
    http: Vec<String>,
    /// Seconds (overrides the recipe's).
    #[arg(long)]
    timeout: Option<u64>,
    #[arg(long, value_enum, default_value = "auto")]
    accel: smoke::Accel,
    #[arg(long)]
    firmware: Option<PathBuf>,
    #[arg(long, default_value = "out/smoke.smoke.log")]
    log: PathBuf,
    #[arg(long, default_value = "/var/cache/kiln/smoke")]
    state_dir: PathBuf,
    #[arg(short, long)]
    verbose: bool,
}

fn smoke_cmd(a: SmokeArgs) -> anyhow::Result<i32> {
    let mut spec = match &a.recipe {
        Some(r) => recipe::load(r)?.smoke,
        None => recipe::SmokeSpec { timeout: Duration::from_secs(180), checks: vec![], http: vec![], seed: vec![] },
    };
    spec.checks.extend(a.checks);
    for h in &a.http {
        let mut parts = h.splitn(4, ':');
        let bad = || error::BadInput::arg(format!("--http {h}"), "write PORT:PATH:STATUS[:CONTAINS]");
        let port = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let path = parts.next().ok_or_else(bad)?.to_owned();
        let status = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let contains = parts.next().map(str::to_owned);
        spec.http.push(recipe::HttpCheck { port, path, status, contains });
    }
    if let Some(t) = a.timeout {
        spec.timeout = Duration::from_secs(t);
    }
    let opts = smoke::SmokeOptions {
        accel: a.accel,
        firmware: a.firmware,
        state_dir: a.state_dir,
        log_path: a.log,
        verbose: a.verbose,
        volumes: vec![],
    };
    match smoke::run(&a.image, &spec, &opts)? {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(error::exit::OK)
        }
        Err(failure) => {
            eprintln!("smoke failed: {failure}\n  console log: {}", opts.log_path.display());
            Ok(error::exit::SMOKE_FAILED)
        }
    }
}

fn main() {
    cmd::install_signal_handlers();
    let result = match Cli::parse() {
        Cli::Smoke(a) => smoke_cmd(a),
        Cli::Load { recipes } => recipes.iter().try_for_each(|path| {
            recipe::load(path).map(|r| println!("{r:#?}"))
        }).map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(error::exit_code(&e));
        }
    }
}
