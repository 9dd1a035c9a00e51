//! design.md's performance goals against a scaling run, one function per goal, each stating
//! the goal, whether this run met it, and its numbers.

use std::fmt::Write as _;

use crate::criu::Lock;

use super::summary::{caught_up_ms, criu_seconds, median_ms, never_caught_up, stat};
use super::{MigrationPoint, Scaling};

/// The goals section of the summary.
pub(super) fn goals(s: &Scaling) -> String {
    let mut md = String::from("\n### Against the goals of design.md\n\n");
    for goal in [freeze, blackout, catch_up, criu, repair, memory] {
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

/// The blackout at 10,000 connections: under 100 ms.
fn blackout(md: &mut String, s: &Scaling) {
    match at(s, 10_000).and_then(|p| stat(p, |r| r.blackout_ms)) {
        Some(b) => {
            let _ = writeln!(
                md,
                "- Blackout at 10,000 connections under 100 ms: {} (median {:.1} ms, max {:.1}).",
                verdict(b.median_us < 100e3),
                b.median_us / 1e3,
                b.max_us / 1e3
            );
        }
        None => md.push_str("- Blackout at 10,000 connections: not measured in this run.\n"),
    }
}

/// The last client caught up within blackout + 300 ms.
fn catch_up(md: &mut String, s: &Scaling) {
    // Per N: past the clients' first retransmission timeout (200 ms and more), a longer
    // blackout is answered later than it lasted, so one verdict over all N would hide where it
    // holds.
    let worst: Vec<(usize, f64)> = s
        .migrations
        .iter()
        .filter_map(|p| {
            let ms = p.runs.iter().map(caught_up_ms).max_by(f64::total_cmp)?;
            Some((p.connections, ms))
        })
        .collect();
    if !worst.is_empty() {
        let never: u64 = s
            .migrations
            .iter()
            .flat_map(|p| &p.runs)
            .map(never_caught_up)
            .sum();
        let per_n: Vec<String> = worst
            .iter()
            .map(|(n, ms)| format!("{n}: {ms:.0} ms"))
            .collect();
        let _ = writeln!(
            md,
            "- Last client caught up within blackout + 300 ms: {} (worst run after the \
             blackout, per N: {}; connections that never caught up: {never}).",
            verdict(worst.iter().all(|&(_, ms)| ms <= 300.0) && never == 0),
            per_n.join(", "),
        );
    }
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
