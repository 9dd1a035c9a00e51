//! What the clients saw in the scaling run's migrations, the summary's first table: how long
//! their connections stalled beside the blackout, what they retransmitted, and how new
//! connections fared; and clients.svg, the same times against N.

use std::fmt::Write as _;
use std::path::Path;

use crate::plot::{self, Point};

use super::migration::MigrationRun;
use super::summary::{Column, median_ms, stat};
use super::{MigrationPoint, Scaling};

const STOP_CURVE: &str = "stop to freeze + blackout";

/// Times of one run drawn in clients.svg, in order.
const CURVES: [Column; 6] = [
    ("blackout", |r| r.blackout_ms),
    (STOP_CURVE, |r| r.stop_to_freeze_ms + r.blackout_ms),
    ("clients' longest stall", |r| r.load.max_stall.max_ms),
    ("clients' stall p99", |r| r.load.max_stall.p99_ms),
    ("clients' longest gap (with the send interval)", |r| {
        r.load.max_gap.max_ms
    }),
    ("slowest new connection served", |r| {
        r.new_connections.served_ms.max_ms
    }),
];

/// The clients' table, one line per N.
pub(super) fn table(s: &Scaling) -> String {
    let mut md = String::from(
        "### What the clients saw (medians over the runs; counts summed over the runs)\n\n\
         | N | runs | blackout (ms) | stop to freeze (ms) | longest stall p50 / p99 / max (ms) \
         | longest gap (ms) | latency p99 (ms) | retransmitted segments | RTO timeouts | SYN \
         retransmissions | loss probes | new connections served / tried | refused | hanging \
         | connects >= 1 s | not served, tried before / during / after the blackout | new \
         connection p99 / max (ms) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in s.migrations.iter().filter(|p| !p.runs.is_empty()) {
        let _ = writeln!(md, "{}", line(p));
    }
    md.push_str(
        "\nStall: per connection, the longest time it waited for an echo that was due (from \
         the later of its last echo and the scheduled send of the next message); a connection \
         with nothing to send during the blackout did not stall. Longest gap: per connection, \
         the longest time between two echoes, which includes its own send interval. \
         Retransmissions: the client host's counters (TcpRetransSegs, TcpExtTCPTimeouts, \
         TcpExtTCPSynRetrans, TcpExtTCPLossProbes) from before the migration to the end of the \
         load, the load's connections and the new ones together; RTO timeouts count the SYNs' \
         too, and TcpExtTCPFastRetrans (in the CSV and JSON) the segments resent on SACKs or \
         duplicate ACKs, without a timer. New connections: one every \
         2 ms from 200 ms before `tcpmig migrate` to 300 ms after the new servers were ready, \
         one 16-byte echo on each within 3 s; refused = ECONNREFUSED or reset, hanging = no \
         connect or no echo within 3 s, connects >= 1 s waited for a SYN retransmission.\n",
    );
    md
}

fn line(p: &MigrationPoint) -> String {
    let med = |f: fn(&MigrationRun) -> f64, decimals: usize| {
        median_ms(p, f).map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
    };
    let sum = |f: fn(&MigrationRun) -> u64| p.runs.iter().map(f).sum::<u64>();
    let slowest = p
        .runs
        .iter()
        .map(|r| r.new_connections.served_ms.max_ms)
        .fold(0.0, f64::max);
    format!(
        "| {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | \
         {} | {} / {} / {} | {} / {slowest:.1} |",
        p.connections,
        p.runs.len(),
        med(|r| r.blackout_ms, 1),
        // 0 when `tcpmig migrate --json` does not report it.
        median_ms(p, |r| r.stop_to_freeze_ms)
            .filter(|&ms| ms > 0.0)
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}")),
        med(|r| r.load.max_stall.p50_ms, 1),
        med(|r| r.load.max_stall.p99_ms, 1),
        med(|r| r.load.max_stall.max_ms, 1),
        med(|r| r.load.max_gap.max_ms, 0),
        med(|r| r.load.latency.p99_ms, 1),
        sum(|r| r.client_tcp.retrans_segs),
        sum(|r| r.client_tcp.timeouts),
        sum(|r| r.client_tcp.syn_retrans),
        sum(|r| r.client_tcp.loss_probes),
        sum(|r| r.new_connections.served),
        sum(|r| r.new_connections.attempted),
        sum(|r| r.new_connections.refused),
        sum(|r| r.new_connections.hanging()),
        sum(|r| r.new_connections.slow_connects),
        sum(|r| r.unserved_when[0]),
        sum(|r| r.unserved_when[1]),
        sum(|r| r.unserved_when[2]),
        med(|r| r.new_connections.served_ms.p99_ms, 1),
    )
}

/// clients.svg: the clients' times beside the blackout against N (median, and the runs' range).
pub(super) fn plot(path: &Path, s: &Scaling) -> anyhow::Result<()> {
    let mut points = Vec::new();
    let reported = |r: &MigrationRun| r.stop_to_freeze_ms > 0.0;
    let stop_known = s.migrations.iter().flat_map(|p| &p.runs).any(reported);
    for (method, value) in CURVES {
        // Without the stop-to-freeze time, its curve would be the blackout's again.
        if method == STOP_CURVE && !stop_known {
            continue;
        }
        for p in &s.migrations {
            if let Some(stats) = stat(p, value) {
                points.push(Point {
                    method: method.to_owned(),
                    connections: p.connections,
                    median_ms: stats.median_us / 1e3,
                    min_ms: stats.min_us / 1e3,
                    max_ms: stats.max_us / 1e3,
                });
            }
        }
    }
    if points.is_empty() {
        return Ok(());
    }
    plot::against_connections(
        path,
        "What the clients saw beside the blackout",
        "time (ms)",
        &points,
    )
}
