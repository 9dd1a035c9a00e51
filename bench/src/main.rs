//! tcpmig's benchmarks, run with `cargo xtask bench [--quick]`. Results go to
//! `target/bench/<UTC time>/` as JSON, CSV, Markdown and SVG, and the Markdown is printed.
//!
//! Without a subcommand it runs the scaling benchmark, which measures the freeze, repair and
//! CRIU references for the same connection counts in the same run; the other subcommands run
//! one part alone. Every byte of traffic comes from the test bed's `tcpmig-peer` (built beside
//! this benchmark): this crate only orchestrates, measures and reports.
mod containers;
mod criu;
mod freeze;
mod gap;
mod plot;
mod rebalance;
mod repair;
mod report;
mod scaling;

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
    /// tcpmig migrate under load against N, with every reference for the same N (the default).
    Scaling(scaling::ScalingArgs),
    /// Freeze and unfreeze cost against N, beside CRIU's iptables and nftables locks.
    Freeze,
    /// Bulk dump and restore per connection, beside a one-thread loop of the same calls.
    Repair,
    /// Real CRIU dump + restore with its iptables lock, its nftables lock and the tcpmig hook.
    Criu,
    /// runc and podman checkpoint + restore of a container under load, CRIU's lock against the
    /// tcpmig hook.
    Containers,
    /// Dry run of the scaling benchmark's clients: open-loop echo traffic through a service
    /// freeze, no migration (gaps, catch-up after the thaw, nothing lost).
    Gap(gap::GapArgs),
    /// A fraction of N busy connections moved to a serving destination with `tcpmig migrate
    /// --keep-address --select`, the address staying: the moved connections' blackout, the
    /// staying ones' pause, what the clients of each saw, the steering's cost per segment.
    Rebalance(rebalance::RebalanceArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = report::OutputDir::create()?;
    let quick = cli.quick;
    match cli.which {
        None => scaling::run(&scaling::ScalingArgs::default(), quick, &out)?,
        Some(Which::Scaling(args)) => scaling::run(&args, quick, &out)?,
        Some(Which::Freeze) => {
            let ns: &[usize] = if quick {
                &[10, 1_000]
            } else {
                &[10, 1_000, 100_000]
            };
            let results = freeze::run(ns)?;
            out.write("freeze", &results, &freeze::markdown(&results))?;
        }
        Some(Which::Repair) => {
            let ns: &[usize] = if quick { &[1_000] } else { &[1_000, 10_000] };
            let results = ns
                .iter()
                .map(|&n| repair::run(n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            out.write("repair", &results, &repair::markdown(&results))?;
        }
        Some(Which::Criu) => {
            let ns: &[usize] = if quick {
                &[10, 100]
            } else {
                &[10, 100, 1_000, 5_000]
            };
            let results = criu::run(ns)?;
            out.write("criu", &results, &criu::markdown(&results))?;
        }
        Some(Which::Containers) => {
            let ns: &[usize] = if quick { &[100] } else { &[100, 1_000, 10_000] };
            let results = containers::run(ns)?;
            out.write("containers", &results, &containers::markdown(&results))?;
            containers::plot(&results, out.path())?;
        }
        Some(Which::Gap(args)) => {
            let results = gap::run(&args, quick)?;
            out.write("gap", &results, &gap::markdown(&results))?;
            gap::plot(&results, out.path())?;
        }
        Some(Which::Rebalance(args)) => rebalance::run(&args, quick, &out)?,
    }
    println!("results in {}", out.path().display());
    Ok(())
}
