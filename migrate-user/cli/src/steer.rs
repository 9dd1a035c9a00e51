//! Steerings, the forwarding of a rebalance's moved connections: listed by `tcpmig status`, and
//! swept by `tcpmig steer-keeper` (hidden), which `tcpmig migrate --keep-address` starts.
use std::time::Duration;

use clap::Args;
use tcpmig::freeze::{SteeredStatus, Steering, SteeringStatus};

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

/// The steerings, as `tcpmig status` prints them.
pub fn print_steerings(steerings: &[SteeringStatus]) {
    for steering in steerings {
        let segments: u64 = steering.connections.iter().map(|c| c.segments).sum();
        println!(
            "steering {} on {}: {} connection(s) forwarded, {segments} segment(s) so far",
            steering.name,
            steering.dev.as_deref().unwrap_or("?"),
            steering.connections.len()
        );
        for connection in steering.connections.iter().take(STATUS_LIST_MAX) {
            println!("  {}", connection_text(connection));
        }
        if steering.connections.len() > STATUS_LIST_MAX {
            println!(
                "  ... and {} more",
                steering.connections.len() - STATUS_LIST_MAX
            );
        }
    }
}

/// Status lists connections one by one only up to this many.
const STATUS_LIST_MAX: usize = 32;

fn connection_text(c: &SteeredStatus) -> String {
    let ended = match (c.client_reset, c.client_closed) {
        (true, _) => ", reset by the client",
        (false, true) => ", closed by the client",
        _ => "",
    };
    format!(
        "{} <-> {} to {}: {} segment(s), quiet {:.1} s{ended}",
        c.local, c.remote, c.to_mac, c.segments, c.quiet_s
    )
}
