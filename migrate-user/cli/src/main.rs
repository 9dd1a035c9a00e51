//! The `tcpmig` command: parses arguments, calls the library `tcpmig` and prints what it returns.
//! Everything that moves connections lives in the library; this crate holds what a library must
//! not carry: clap, anyhow, progress output, logging set-up and the demo's test bed.
mod criu;
mod demo;
mod freeze;
mod handto;
mod link;
mod migrate;
mod repair;
mod steer;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tcpmig", version, about, long_about = None)]
struct Cli {
    /// More logs (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Freeze services or connections: drop their traffic in both directions, silently.
    Freeze(freeze::FreezeArgs),
    /// Lift a freeze: remove its entries, or all of it (programs, links, pins).
    Unfreeze(freeze::UnfreezeArgs),
    /// What is frozen, since when, until when, and what was dropped.
    Status(freeze::StatusArgs),
    /// Dump a process's connections (frozen, in repair mode) into one image.
    Dump(repair::DumpArgs),
    /// Restore connections from an image into a namespace and hand them to an application.
    Restore(repair::RestoreArgs),
    /// Move a process's connections and service address to a `tcpmig agent`.
    Migrate(migrate::MigrateArgs),
    /// Receive migrated connections on the destination and hand them to an application.
    Agent(migrate::AgentArgs),
    /// Build a client, a source and a destination on this machine, migrate live connections
    /// between them, verify every byte, and remove everything.
    Demo(demo::DemoArgs),
    /// CRIU action script: replace CRIU's network lock with tcpmig's freeze.
    CriuHook(criu::CriuHookArgs),
    /// Internal: watches a `tcpmig migrate` and undoes it if it dies (it starts this itself).
    #[command(hide = true)]
    MigrateGuard(migrate::GuardArgs),
    /// Internal: sweeps a rebalance's steering until its connections ended (`migrate
    /// --keep-address` starts it).
    #[command(hide = true)]
    SteerKeeper(steer::KeeperArgs),
}

fn main() -> ExitCode {
    let result = if criu::invoked_as_hook() {
        init_logging(0);
        criu::run_as_hook(None)
    } else {
        let cli = match Cli::try_parse() {
            Ok(cli) => cli,
            Err(error) => return usage_error(error),
        };
        init_logging(cli.verbose);
        match cli.command {
            Command::Freeze(args) => freeze::freeze(args),
            Command::Unfreeze(args) => freeze::unfreeze(args),
            Command::Status(args) => freeze::status(args),
            Command::Dump(args) => repair::dump(args),
            Command::Restore(args) => repair::restore(args),
            Command::Migrate(args) => migrate::migrate(args),
            Command::Agent(args) => migrate::agent(args),
            Command::Demo(args) => demo::demo(args),
            Command::CriuHook(args) => criu::criu_hook(args),
            Command::MigrateGuard(args) => migrate::guard(args),
            Command::SteerKeeper(args) => steer::keeper(args),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tcpmig: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap renders them; a usage error is one line on stderr.
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let rendered = error.render().to_string();
    // The message, and the arguments it lists on the lines below it ("not provided:"), in one
    // line; the usage block after the blank line is left to --help.
    let message: Vec<&str> = rendered
        .lines()
        .skip_while(|line| line.trim().is_empty())
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = match message.join(" ") {
        joined if joined.is_empty() => "invalid arguments".to_owned(),
        joined => joined.trim_start_matches("error: ").to_owned(),
    };
    eprintln!("tcpmig: error: {line} (see --help)");
    ExitCode::from(2)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}
