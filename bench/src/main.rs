//! tcpmig's benchmarks, run with `cargo xtask bench [--quick]`. Results go to
//! target/bench/<UTC time>/ as JSON and Markdown, and the Markdown is printed.
mod criu;
mod freeze;
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

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Which {
    /// Freeze and unfreeze cost against N, beside CRIU's iptables and nftables locks.
    Freeze,
    /// Bulk dump and restore per connection, beside a one-thread loop of the same calls.
    Repair,
    /// Real CRIU dump + restore with its iptables lock, its nftables lock and the tcpmig hook.
    Criu,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = report::OutputDir::create()?;
    let selected = |which| cli.which.is_none_or(|w| w == which);
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
    println!("results in {}", out.path().display());
    Ok(())
}
