//! Steerings, the forwarding of a rebalance's moved connections: listed by `tcpmig status`, and
//! swept by `tcpmig steer-keeper` (hidden), which `tcpmig migrate --keep-address` starts.
use std::time::Duration;

use clap::Args;
use tcpmig::freeze::{Steered, Steering};

use super::migrate::seconds;

/// How often the keeper sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// `tcpmig steer-keeper NAME`: sweeps the steering until its last connection ended, then removes
/// it.
#[derive(Args)]
pub struct KeeperArgs {
    name: String,
    /// Seconds an entry lasts after its client closed the connection.
    #[arg(long, value_name = "SECS")]
    grace: f64,
    /// Seconds an entry lasts without a segment.
    #[arg(long, value_name = "SECS")]
    idle: f64,
}

pub fn keeper(args: KeeperArgs) -> anyhow::Result<()> {
    let (grace, idle) = (
        seconds("--grace", args.grace)?,
        seconds("--idle", args.idle)?,
    );
    let swept = Steering::keep(&args.name, grace, idle, SWEEP_EVERY)?;
    tracing::info!(name = %args.name, swept, "the last steered connection ended: steering removed");
    Ok(())
}

/// The steerings of this host, for `tcpmig status`.
pub fn print_steerings() -> anyhow::Result<()> {
    for name in Steering::list()? {
        let entries = Steering::open(&name)?.entries()?;
        let packets: u64 = entries.iter().map(|e| e.packets).sum();
        println!(
            "steering {name}: {} connection(s) forwarded, {packets} segment(s) so far",
            entries.len()
        );
        for entry in entries.iter().take(STATUS_LIST_MAX) {
            println!("  {}", entry_text(entry));
        }
        if entries.len() > STATUS_LIST_MAX {
            println!("  ... and {} more", entries.len() - STATUS_LIST_MAX);
        }
    }
    Ok(())
}

/// Status lists connections one by one only up to this many.
const STATUS_LIST_MAX: usize = 32;

fn entry_text(entry: &Steered) -> String {
    let mac = entry.dst_mac.map(|b| format!("{b:02x}")).join(":");
    let ended = match (entry.rst, entry.fin) {
        (true, _) => ", reset by the client",
        (false, true) => ", closed by the client",
        _ => "",
    };
    format!(
        "{} <-> {} to {mac}: {} segment(s){ended}",
        entry.tuple.local, entry.tuple.remote, entry.packets
    )
}
