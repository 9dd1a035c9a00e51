//! The rebalance benchmark's outputs beside rebalance.json: rebalance.md (the medians of the key
//! figures per fraction, then a table per fraction with every figure's median and range) and
//! rebalance.svg (the moved connections' blackout, the staying ones' pause, and each side's
//! latency p99 and longest stall, against the connections moved).

use std::fmt::Write as _;
use std::path::Path;

use crate::plot::{self, Point};
use crate::report::Stats;

use super::once::RebalanceRun;
use super::{FractionPoint, Rebalance};

/// One figure of a run: its name, its value, its decimals, whether the headline table has it
/// and whether the plot draws it.
struct Figure {
    name: &'static str,
    value: fn(&RebalanceRun) -> f64,
    decimals: usize,
    headline: bool,
    plotted: bool,
}

const fn figure(
    name: &'static str,
    value: fn(&RebalanceRun) -> f64,
    decimals: usize,
    (headline, plotted): (bool, bool),
) -> Figure {
    Figure {
        name,
        value,
        decimals,
        headline,
        plotted,
    }
}

const TABLE: (bool, bool) = (false, false);
const HEADLINE: (bool, bool) = (true, false);
const PLOTTED: (bool, bool) = (true, true);

const FIGURES: [Figure; 31] = [
    figure("moved (picked)", |r| r.picked as f64, 0, TABLE),
    figure("stop to freeze (ms)", |r| r.stop_to_freeze_ms, 1, HEADLINE),
    figure("moved: blackout (ms)", |r| r.blackout_ms, 1, PLOTTED),
    figure(
        "staying: application paused (ms)",
        |r| r.application_paused_ms,
        1,
        PLOTTED,
    ),
    figure("tcpmig migrate total (ms)", |r| r.total_ms, 0, TABLE),
    figure("phase: prepare (ms)", |r| r.phases.prepare_ms, 2, TABLE),
    figure("phase: discover (ms)", |r| r.phases.discover_ms, 2, TABLE),
    figure("phase: stop (ms)", |r| r.phases.stop_ms, 2, TABLE),
    figure("phase: freeze (ms)", |r| r.phases.freeze_ms, 2, TABLE),
    figure("phase: dump (ms)", |r| r.phases.dump_ms, 2, TABLE),
    figure("phase: transfer (ms)", |r| r.phases.transfer_ms, 2, TABLE),
    figure("phase: restore (ms)", |r| r.phases.restore_ms, 2, TABLE),
    figure("phase: commit (ms)", |r| r.phases.commit_ms, 2, TABLE),
    figure("phase: finish (ms)", |r| r.phases.finish_ms, 2, TABLE),
    figure(
        "moved: latency p99 (ms)",
        |r| r.moved.latency.p99_ms,
        1,
        PLOTTED,
    ),
    figure(
        "moved: longest stall (ms)",
        |r| r.moved.max_stall.max_ms,
        1,
        PLOTTED,
    ),
    figure(
        "moved: lost connections",
        |r| r.moved.lost() as f64,
        0,
        HEADLINE,
    ),
    figure(
        "staying: latency p99 (ms)",
        |r| r.staying.latency.p99_ms,
        1,
        PLOTTED,
    ),
    figure(
        "staying: longest stall (ms)",
        |r| r.staying.max_stall.max_ms,
        1,
        PLOTTED,
    ),
    figure(
        "staying: lost connections",
        |r| r.staying.lost() as f64,
        0,
        HEADLINE,
    ),
    figure(
        "destination's own: latency p99 (ms)",
        |r| r.own.latency.p99_ms,
        1,
        TABLE,
    ),
    figure(
        "destination's own: lost connections",
        |r| r.own.lost() as f64,
        0,
        TABLE,
    ),
    figure(
        "clients: retransmitted segments",
        |r| r.client_tcp.retrans_segs as f64,
        0,
        HEADLINE,
    ),
    figure(
        "clients: RTO timeouts",
        |r| r.client_tcp.timeouts as f64,
        0,
        HEADLINE,
    ),
    figure(
        "resets sent (all hosts)",
        |r| r.resets_sent as f64,
        0,
        TABLE,
    ),
    figure(
        "steering: ns per steered packet",
        |r| r.steering.ns_per_steered_packet,
        0,
        HEADLINE,
    ),
    figure(
        "steering: ns per program run",
        |r| r.steering.ns_per_run,
        0,
        HEADLINE,
    ),
    figure(
        "steering: steered packets",
        |r| r.steering.steered_packets as f64,
        0,
        TABLE,
    ),
    figure(
        "steering: program runs",
        |r| r.steering.program_runs as f64,
        0,
        TABLE,
    ),
    figure(
        "new connections: served",
        |r| r.new_connections.served as f64,
        0,
        HEADLINE,
    ),
    figure(
        "new connections: tried",
        |r| r.new_connections.attempted as f64,
        0,
        HEADLINE,
    ),
];

/// The median and range of `figure` over `point`'s runs, none without runs.
fn stats(point: &FractionPoint, figure: &Figure) -> Option<Stats> {
    let values: Vec<f64> = point.runs.iter().map(figure.value).collect();
    (!values.is_empty()).then(|| Stats::of_ms(&values))
}

fn ms(us: f64, decimals: usize) -> String {
    format!("{:.decimals$}", us / 1e3)
}

pub fn markdown(r: &Rebalance) -> String {
    let mut md = format!(
        "## Rebalance: part of {} busy connections moved, the address staying\n\n{}; {} \
         connections on the service, {} on the destination's own; {:.0} messages/s over the \
         service's; {:.0} s in all.\n\n",
        r.connections, r.date_utc, r.connections, r.own_connections, r.rate, r.wall_s
    );
    md.push_str(&headline(r));
    for point in &r.points {
        md.push_str(&fraction_table(point));
    }
    md.push_str(NOTES);
    md
}

/// One line per fraction: the medians of the headline figures.
fn headline(r: &Rebalance) -> String {
    let figures: Vec<&Figure> = FIGURES.iter().filter(|f| f.headline).collect();
    let names: Vec<&str> = figures.iter().map(|f| f.name).collect();
    let mut md = format!(
        "### Medians over the runs\n\n| fraction | moved | runs (failed) | {} |\n|---|---|---|{}\n",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for point in &r.points {
        let cells: Vec<String> = (figures.iter())
            .map(|f| {
                stats(point, f).map_or_else(|| "-".to_owned(), |s| ms(s.median_us, f.decimals))
            })
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} ({}) | {} |",
            point.fraction,
            point.moved,
            point.runs.len(),
            point.failures.len(),
            cells.join(" | ")
        );
    }
    md
}

/// Every figure of one fraction: median, min and max over its runs; then its failures.
fn fraction_table(point: &FractionPoint) -> String {
    let mut md = format!(
        "\n### {} moved ({} connections): {} runs, {} failed\n\n| figure | median | min | max \
         |\n|---|---|---|---|\n",
        point.fraction,
        point.moved,
        point.runs.len(),
        point.failures.len()
    );
    for f in &FIGURES {
        let Some(s) = stats(point, f) else { break };
        let d = f.decimals;
        let (median, min, max) = (ms(s.median_us, d), ms(s.min_us, d), ms(s.max_us, d));
        let _ = writeln!(md, "| {} | {median} | {min} | {max} |", f.name);
    }
    for failure in &point.failures {
        let _ = writeln!(md, "\nRun {} failed: {}", failure.run, failure.why);
    }
    md
}

const NOTES: &str = "\nMoved: the connections from the client's second address \
(198.18.0.200), which `--select client=198.18.0.200/32` picks; staying: the service's others, from \
the client's own address; each a load of its own, both at the same interval per connection. \
Stop to freeze: from the source's application stopped to the freeze of the moved connections \
(they are found again among the stopped application's). Blackout: from the freeze of the moved connections to the first of them live at the destination. \
Application paused: from the source's application stopped to resumed, during which the staying \
connections got no answer. Latency p99: from the scheduled send to the echo, over every message of \
the load. Longest stall: the longest any connection of the load waited for an echo that was due. \
Lost: connections reset, closed or corrupted (a run with any is failed, not counted). Clients' \
retransmissions and RTO timeouts: the client host's counters from before the move to the end of \
the loads, all loads together (one host). Steering: the `tcpmig_steer` programs' run time as the \
kernel counts it with BPF_ENABLE_STATS, from before the move to 200 ms before the first load \
stopped sending (read with the steering's counters and the resets while every connection is \
open). Resets sent: the three hosts' OutRsts over the same time (the load's end is left out: \
the echo server sends some when thousands of clients close at once, with or without a move). \
Per program run: every frame the program looked at on the source's eth0 ingress, the \
forwarded segments and every other (the staying connections' segments, new connections, ARP). Per \
steered packet: the same time over the steering's own counters of the segments it forwarded, so \
it includes the lookups of the frames not forwarded. New connections: one every 2 ms from 200 ms \
before `tcpmig migrate` to 300 ms after it, one echo each within 3 s.\n";

/// rebalance.svg: the plotted figures against the connections moved (median and range).
pub fn plot(r: &Rebalance, path: &Path) -> anyhow::Result<()> {
    let mut points = Vec::new();
    for f in FIGURES.iter().filter(|f| f.plotted) {
        for point in &r.points {
            if let Some(s) = stats(point, f) {
                points.push(Point {
                    method: f.name.to_owned(),
                    connections: point.moved,
                    median_ms: s.median_us / 1e3,
                    min_ms: s.min_us / 1e3,
                    max_ms: s.max_us / 1e3,
                });
            }
        }
    }
    if points.is_empty() {
        return Ok(());
    }
    let fractions: Vec<String> = (r.points.iter())
        .map(|p| format!("{:.0}%", p.fraction * 100.0))
        .collect();
    let title = format!(
        "Rebalance of {} connections: against the connections moved ({})",
        r.connections,
        fractions.join(", ")
    );
    plot::against_connections(path, &title, "time (ms)", &points)
}
