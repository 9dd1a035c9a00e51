//! tcpmig's benchmarks, run with `cargo xtask bench [--quick]`. Results go to
//! target/bench/<UTC time>/ as JSON and Markdown, and the Markdown is printed.
mod criu;
mod echo;
mod freeze;
mod gap;
mod loadgen;
mod plot;
mod repair;
mod report;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tcpmig-bench")]
struct Cli {
    /// The short run CI uses (N up to 1,000).
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    which: Option<Which>,
}

#[derive(Subcommand)]
enum Which {
    /// Freeze and unfreeze cost against N, beside CRIU's iptables and nftables locks.
    Freeze,
    /// Bulk dump and restore per connection, beside a one-thread loop of the same calls.
    Repair,
    /// Real CRIU dump + restore with its iptables lock, its nftables lock and the tcpmig hook.
    Criu,
    /// Dry run of the scaling benchmark's clients: open-loop echo traffic through a service
    /// freeze, no migration (gaps, catch-up after the thaw, nothing lost).
    Gap(gap::GapArgs),
    /// The server the scaling benchmark migrates (a helper process).
    #[command(hide = true)]
    EchoServer(echo::EchoArgs),
    /// One process of the load generator (a helper process).
    #[command(hide = true)]
    LoadgenWorker(loadgen::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.which {
        Some(Which::EchoServer(args)) => return echo::serve(args),
        Some(Which::LoadgenWorker(args)) => return loadgen::run_worker(args),
        _ => {}
    }
    let out = report::OutputDir::create()?;
    let selected = |which: Which| {
        let kind = std::mem::discriminant(&which);
        cli.which
            .as_ref()
            .is_none_or(|w| std::mem::discriminant(w) == kind)
    };
    if selected(Which::Freeze) {
        let ns: &[usize] = if cli.quick {
            &[10, 1_000]
        } else {
            &[10, 1_000, 100_000]
        };
        let results = freeze::run(ns)?;
        out.write("freeze", &results, &freeze::markdown(&results))?;
    }
    if selected(Which::Repair) {
        let ns: &[usize] = if cli.quick {
            &[1_000]
        } else {
            &[1_000, 10_000]
        };
        let results = ns
            .iter()
            .map(|&n| repair::run(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        out.write("repair", &results, &repair::markdown(&results))?;
    }
    if selected(Which::Criu) {
        let ns: &[usize] = if cli.quick {
            &[10, 100]
        } else {
            &[10, 100, 1_000, 5_000]
        };
        let results = criu::run(ns)?;
        out.write("criu", &results, &criu::markdown(&results))?;
    }
    let gap_args = match &cli.which {
        None => Some(gap::GapArgs::default()),
        Some(Which::Gap(args)) => Some(args.clone()),
        Some(_) => None,
    };
    if let Some(args) = gap_args {
        let results = gap::run(&args, cli.quick)?;
        out.write("gap", &results, &gap::markdown(&results))?;
        gap::plot(&results, out.path())?;
    }
    println!("results in {}", out.path().display());
    Ok(())
}
