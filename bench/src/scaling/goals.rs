//! docs/goals.md's performance goals against a scaling run, the clients' first, one function
//! per goal, each stating the goal, whether this run met it, and its numbers. A goal missed is
//! reported, never an error: the run fails only when a migration does.

use std::fmt::Write as _;

use crate::criu::Lock;

use super::migration::MigrationRun;
use super::summary::{criu_seconds, median_ms, stat};
use super::{MigrationPoint, Scaling};

/// The goals section of the summary.
pub(super) fn goals(s: &Scaling) -> String {
    let mut md = String::from("\n### Against the goals of docs/goals.md\n\n");
    for goal in [
        silence,
        latency,
        retransmissions,
        new_connections,
        blackout,
        freeze,
        criu,
        repair,
        memory,
    ] {
        goal(&mut md, s);
    }
    md
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The migrations at `n` connections, if any ran.
fn at(s: &Scaling, n: usize) -> Option<&MigrationPoint> {
    s.migrations
        .iter()
        .find(|p| p.connections == n && !p.runs.is_empty())
}

/// The service freeze: under 10 us and flat in N.
fn freeze(md: &mut String, s: &Scaling) {
    let freezes: Vec<(usize, f64)> = s
        .freeze
        .iter()
        .map(|f| (f.connections, f.service_freeze.median_us))
        .collect();
    if let (Some(lo), Some(hi)) = (
        freezes.iter().map(|f| f.1).reduce(f64::min),
        freezes.iter().map(|f| f.1).reduce(f64::max),
    ) {
        let _ = writeln!(
            md,
            "- Service freeze under 10 us and flat in N: {verdict} (median {lo:.1}-{hi:.1} us from \
             N = {} to {}; in the migrations the freeze phase is {}).",
            freezes.first().map_or(0, |f| f.0),
            freezes.last().map_or(0, |f| f.0),
            s.migrations
                .iter()
                .filter_map(|p| Some(format!(
                    "{:.1} us at {}",
                    median_ms(p, |r| r.phases.freeze_ms * 1e3)?,
                    p.connections
                )))
                .collect::<Vec<_>>()
                .join(", "),
            verdict = verdict(hi < 10.0 && hi - lo < 5.0),
        );
    }
}

/// The blackout: at 10,000 connections at most 65 ms cold (35 ms with `--precopy`), at 50,000
/// under 300 ms.
fn blackout(md: &mut String, s: &Scaling) {
    let (cold, limit) = if s.precopy {
        ("with --precopy", 35.0)
    } else {
        ("cold", 65.0)
    };
    for (n, limit, how) in [(10_000, limit, cold), (50_000, 300.0, "")] {
        let Some(b) = at(s, n).and_then(|p| stat(p, |r| r.blackout_ms)) else {
            continue;
        };
        let _ = writeln!(
            md,
            "- Blackout at {n} connections at most {limit:.0} ms{}: {} (median {:.1} ms, max \
             {:.1}).",
            if how.is_empty() {
                String::new()
            } else {
                format!(" {how}")
            },
            verdict(b.median_us / 1e3 <= limit),
            b.median_us / 1e3,
            b.max_us / 1e3
        );
    }
}

/// The migrations at N up to `max`, as (N, runs).
fn up_to(s: &Scaling, max: usize) -> impl Iterator<Item = (usize, &[MigrationRun])> {
    s.migrations
        .iter()
        .filter(move |p| p.connections <= max && !p.runs.is_empty())
        .map(|p| (p.connections, p.runs.as_slice()))
}

/// The clients' longest silence: each run's longest stall at most its blackout + 20 ms up to
/// 10,000 connections, at most 1.2 x its blackout at 50,000.
fn silence(md: &mut String, s: &Scaling) {
    let per_n: Vec<(usize, bool, String)> = up_to(s, usize::MAX)
        .map(|(n, runs)| {
            let (allowed, bound): (fn(f64) -> f64, &str) = if n <= 10_000 {
                (|b| b + 20.0, "blackout + 20")
            } else {
                (|b| b * 1.2, "1.2 x blackout")
            };
            let ok = runs
                .iter()
                .all(|r| r.load.max_stall.max_ms <= allowed(r.blackout_ms));
            let worst = runs
                .iter()
                .map(|r| {
                    format!(
                        "{:.0} vs {bound} = {:.0}",
                        r.load.max_stall.max_ms,
                        allowed(r.blackout_ms)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            (n, ok, format!("{n}: {worst} ms"))
        })
        .filter(|(n, _, _)| *n <= 10_000 || *n >= 50_000)
        .collect();
    if per_n.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "- Clients' longest silence (longest stall of any connection) at most blackout + 20 ms \
         up to 10,000 connections and 1.2 x blackout at 50,000: {} (per run: {}).",
        verdict(per_n.iter().all(|(_, ok, _)| *ok)),
        per_n
            .iter()
            .map(|(_, _, line)| line.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// Latency p99 at 10,000 connections within each run's blackout + 20 ms.
fn latency(md: &mut String, s: &Scaling) {
    let Some(point) = at(s, 10_000) else {
        return;
    };
    let runs: Vec<String> = point
        .runs
        .iter()
        .map(|r| {
            format!(
                "{:.1} vs {:.1}",
                r.load.latency.p99_ms,
                r.blackout_ms + 20.0
            )
        })
        .collect();
    let _ = writeln!(
        md,
        "- Latency p99 at 10,000 connections within blackout + 20 ms: {} (per run, ms: {}).",
        verdict(
            point
                .runs
                .iter()
                .all(|r| r.load.latency.p99_ms <= r.blackout_ms + 20.0)
        ),
        runs.join(", ")
    );
}

/// No retransmission timeout and no SYN retransmission in the clients up to 10,000.
fn retransmissions(md: &mut String, s: &Scaling) {
    let per_n: Vec<(usize, u64, u64)> = up_to(s, 10_000)
        .map(|(n, runs)| {
            let sum = |f: fn(&MigrationRun) -> u64| runs.iter().map(f).sum::<u64>();
            (
                n,
                sum(|r| r.client_tcp.timeouts),
                sum(|r| r.client_tcp.syn_retrans),
            )
        })
        .collect();
    if per_n.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "- No retransmission timeout and no SYN retransmission in the clients up to 10,000 \
         connections: {} (per N over its runs, timeouts / SYN retransmissions: {}).",
        verdict(per_n.iter().all(|&(_, rto, syn)| rto == 0 && syn == 0)),
        per_n
            .iter()
            .map(|(n, rto, syn)| format!("{n}: {rto} / {syn}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// New connections through the migration up to 10,000: all served, each within blackout + 20 ms.
fn new_connections(md: &mut String, s: &Scaling) {
    let per_n: Vec<(usize, bool, String)> = up_to(s, 10_000)
        .map(|(n, runs)| {
            let ok = runs.iter().all(|r| {
                let new = &r.new_connections;
                new.attempted > 0
                    && new.served == new.attempted
                    && new.served_ms.max_ms <= r.blackout_ms + 20.0
            });
            let sum = |f: fn(&MigrationRun) -> u64| runs.iter().map(f).sum::<u64>();
            let slowest = runs
                .iter()
                .map(|r| r.new_connections.served_ms.max_ms)
                .fold(0.0, f64::max);
            let line = format!(
                "{n}: {} of {} served, {} refused, {} hanging, slowest {slowest:.0} ms",
                sum(|r| r.new_connections.served),
                sum(|r| r.new_connections.attempted),
                sum(|r| r.new_connections.refused),
                sum(|r| r.new_connections.hanging()),
            );
            (n, ok, line)
        })
        .collect();
    if per_n.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "- New connections through the migration up to 10,000 connections all served, none \
         refused or hanging, each within blackout + 20 ms: {} ({}).",
        verdict(per_n.iter().all(|(_, ok, _)| *ok)),
        per_n
            .iter()
            .map(|(_, _, line)| line.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// At least 50 times less than CRIU's default lock at 1,000 connections.
fn criu(md: &mut String, s: &Scaling) {
    let ratio = at(s, 1_000).and_then(|p| {
        let blackout = median_ms(p, |r| r.blackout_ms)?;
        let lock = s.freeze.iter().find(|f| f.connections == 1_000)?;
        Some((lock.criu_iptables_lock.seconds, blackout))
    });
    if let Some((lock_s, blackout)) = ratio {
        let criu = criu_seconds(&s.criu, 1_000, Lock::Iptables).map_or_else(String::new, |c| {
            format!("; real CRIU dump + restore with it: {c:.1} s")
        });
        let _ = writeln!(
            md,
            "- At least 50 times less than CRIU's default lock at 1,000 connections: {} (lock \
             alone {lock_s:.2} s vs blackout {blackout:.1} ms: {:.0}x{criu}).",
            verdict(lock_s * 1e3 >= 50.0 * blackout),
            lock_s * 1e3 / blackout
        );
    }
}

/// Dump + restore of 10,000 idle connections: under 60 ms, and at most half the plain loop.
fn repair(md: &mut String, s: &Scaling) {
    let migrations =
        at(s, 10_000).and_then(|p| median_ms(p, |r| r.phases.dump_ms + r.phases.restore_ms));
    if let Some(bench) = s.repair.iter().find(|r| r.connections == 10_000) {
        let under_load = migrations.map_or_else(String::new, |ms| {
            format!("; the migrations' dump and restore phases under load: {ms:.1} ms")
        });
        let per_conn_ms = |us: f64| us * bench.connections as f64 / 1e3;
        let _ = writeln!(
            md,
            "- Dump + restore of 10,000 idle connections under 60 ms: {} with a pre-copy ({:.1} \
             ms in the repair benchmark: dump {:.1} + restore {:.1}, after {:.1} ms of setup \
             before the freeze); {} cold ({:.1} ms: dump {:.1} + restore {:.1}, after {:.1} ms \
             of setup){under_load}.",
            verdict(bench.precopy_total_ms < 60.0),
            bench.precopy_total_ms,
            per_conn_ms(bench.precopy_dump_us_per_conn),
            per_conn_ms(bench.precopy_restore_us_per_conn),
            bench.precopy_setup_ms,
            verdict(bench.total_ms < 60.0),
            bench.total_ms,
            per_conn_ms(bench.dump_us_per_conn),
            per_conn_ms(bench.restore_us_per_conn),
            bench.setup_ms,
        );
        let _ = writeln!(
            md,
            "- At most half the plain one-thread loop of the same syscalls: {} (ratio {:.2} cold, \
             {:.2} with a pre-copy, plain loop {:.1} ms; {:.2} cold with the setup before the \
             freeze counted too).",
            verdict(bench.ratio <= 0.5),
            bench.ratio,
            bench.precopy_ratio,
            bench.plain_total_ms,
            bench.ratio_with_setup,
        );
    }
}

/// Memory: under 64 MiB resident for 50,000 idle connections.
fn memory(md: &mut String, s: &Scaling) {
    if let Some(point) = at(s, 50_000).filter(|p| !p.runs.is_empty()) {
        // The reports' peaks (VmHWM), in MiB: `tcpmig migrate`'s and the agent's.
        let peak = |path: &str| {
            point
                .runs
                .iter()
                .filter_map(|r| r.report.pointer(path)?.as_f64())
                .fold(0.0, f64::max)
                / 1024.0
        };
        let (source, agent) = (
            peak("/peak_resident_kib"),
            peak("/destination/peak_resident_kib"),
        );
        let _ = writeln!(
            md,
            "- Memory under 64 MiB resident for 50,000 idle connections: {} (largest peak of \
             `tcpmig migrate` {source:.1} MiB, of `tcpmig agent` {agent:.1} MiB).",
            verdict(source > 0.0 && source < 64.0 && agent < 64.0),
        );
    }
}
