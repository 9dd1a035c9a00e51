//! The scaling run's outputs: scaling.json, a Markdown summary (what the clients saw first,
//! then medians, ranges, ratios and the goals of docs/goals.md), scaling.csv (one line per N),
//! scaling-runs.csv (one line per migration), clients.svg (the clients' times beside the
//! blackout), blackout.svg (every method against N, log-log) and phases.svg (the blackout's
//! phases).

use std::fmt::Write as _;

use crate::criu::{CriuRun, Lock};
use crate::plot::{self, PhaseBar, Point};
use crate::report::{OutputDir, Stats};

use super::migration::MigrationRun;
use super::{CRIU_MAX, CRIU_MAX_QUICK, MigrationPoint, REPAIR_MAX, Scaling};

pub fn write(out: &OutputDir, scaling: &Scaling) -> anyhow::Result<()> {
    out.write("scaling", scaling, &markdown(scaling))?;
    csv(
        out,
        "scaling",
        scaling.migrations.iter().map(|p| per_n(scaling, p)),
    )?;
    csv(
        out,
        "scaling-runs",
        scaling
            .migrations
            .iter()
            .flat_map(|p| p.runs.iter().enumerate())
            .map(|(k, run)| per_run(k + 1, run)),
    )?;
    super::clients::plot(&out.path().join("clients.svg"), scaling)?;
    plot::against_connections(
        &out.path().join("blackout.svg"),
        "Blackout against connection count",
        "time (ms)",
        &points(scaling),
    )?;
    let bars: Vec<PhaseBar> = scaling.migrations.iter().filter_map(phase_bar).collect();
    if !bars.is_empty() {
        plot::phases(
            &out.path().join("phases.svg"),
            "tcpmig migrate: phases of the blackout (medians)",
            &bars,
        )?;
    }
    Ok(())
}

/// A named value of one migration run: a column, or a curve of the plot.
pub(super) type Column = (&'static str, fn(&MigrationRun) -> f64);

/// Statistics of one value over the runs at one N, none without runs.
pub(super) fn stat(point: &MigrationPoint, value: impl Fn(&MigrationRun) -> f64) -> Option<Stats> {
    let values: Vec<f64> = point.runs.iter().map(value).collect();
    (!values.is_empty()).then(|| Stats::of_ms(&values))
}

pub(super) fn median_ms(
    point: &MigrationPoint,
    value: impl Fn(&MigrationRun) -> f64,
) -> Option<f64> {
    stat(point, value).map(|s| s.median_us / 1e3)
}

/// From the end of the blackout to the last connection's catch-up (0 if none was behind).
pub(super) fn caught_up_ms(run: &MigrationRun) -> f64 {
    run.load
        .mark
        .as_ref()
        .map_or(f64::NAN, |m| m.last_caught_up_ms)
}

pub(super) fn never_caught_up(run: &MigrationRun) -> u64 {
    run.load.mark.as_ref().map_or(0, |m| m.never_caught_up)
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Real CRIU dump + restore of N connections with `lock`, in seconds, or why there is none.
fn criu_cell(runs: &[CriuRun], n: usize, lock: Lock) -> String {
    let Some(run) = runs.iter().find(|r| r.connections == n && r.lock == lock) else {
        return "-".to_owned();
    };
    match (run.dump.seconds(), run.restore.seconds()) {
        (Some(dump), Some(restore)) => format!("{:.2}", dump + restore),
        (Some(_), None) => format!("restore {}", run.restore.cell()),
        _ => format!("dump {}", run.dump.cell()),
    }
}

pub(super) fn criu_seconds(runs: &[CriuRun], n: usize, lock: Lock) -> Option<f64> {
    let run = runs.iter().find(|r| r.connections == n && r.lock == lock)?;
    Some(run.dump.seconds()? + run.restore.seconds()?)
}

fn markdown(s: &Scaling) -> String {
    let m = &s.machine;
    let mut md = format!(
        "## Scaling: what the clients see, and the blackout, against N\n\n{}, {} CPUs (shared), kernel {}, load average {} at \
         the start and {} at the end; {:.0} s in all.\n\n",
        m.date_utc, m.cpus, m.kernel, m.load_start, m.load_end, s.wall_s
    );
    md.push_str(&super::clients::table(s));
    md.push_str(
        "\n### tcpmig migrate under load (medians over the runs; blackout [min-max])\n\n\
         | N | runs | blackout (ms) | freeze (us) | dump | transfer | restore | address move | \
         unfreeze | migrate total (ms) | kept | client longest gap (ms) | latency p99 (ms) | \
         last caught up after the blackout (ms) | lost (resets) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &s.migrations {
        if p.runs.is_empty() {
            let _ = writeln!(
                md,
                "| {} | 0 | failed (below) |{}",
                p.connections,
                " - |".repeat(12)
            );
            continue;
        }
        let med = |f: fn(&MigrationRun) -> f64, decimals| cell(median_ms(p, f), decimals);
        let blackout = stat(p, |r| r.blackout_ms).expect("runs");
        let sum = |f: fn(&MigrationRun) -> u64| p.runs.iter().map(f).sum::<u64>();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} [{:.1}-{:.1}] | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} \
             | {}{} | {} ({}) |",
            p.connections,
            p.runs.len(),
            blackout.median_us / 1e3,
            blackout.min_us / 1e3,
            blackout.max_us / 1e3,
            cell(median_ms(p, |r| r.phases.freeze_ms * 1e3), 1),
            med(|r| r.phases.dump_ms, 2),
            med(|r| r.phases.transfer_ms, 2),
            med(|r| r.phases.restore_ms, 2),
            med(|r| r.phases.address_ms, 2),
            med(|r| r.phases.unfreeze_ms, 2),
            med(|r| r.total_ms, 0),
            p.runs.iter().map(|r| r.kept).min().unwrap_or(0),
            p.connections,
            med(|r| r.load.max_gap.max_ms, 0),
            med(|r| r.load.latency.p99_ms, 1),
            med(caught_up_ms, 0),
            match sum(never_caught_up) {
                0 => String::new(),
                never => format!(" ({never} never)"),
            },
            sum(|r| r.load.lost()),
            sum(|r| r.load.resets),
        );
    }
    md.push_str(&references(s));
    if s.precopy {
        md.push_str(&precopy(s));
    }
    md.push_str(&super::goals::goals(s));
    let _ = write!(
        md,
        "\nPhases: as `tcpmig migrate --json` reports them; address move = deleting the address \
         on the source (while the agent restores) + adding and announcing it on the \
         destination; restore = from the address deleted to the agent's Restored; unfreeze = the \
         destination's unfreeze and first socket out of repair mode; transfer = the image \
         crossing the link ({}). Clients: open loop, 16-byte \
         messages at {:.0} per second over all connections (every connection at least every \
         10 ms), each echo checked byte for byte; the longest gap is the longest time between \
         two echoes of any connection (it includes stopping the server before the freeze, \
         starting the new one after it, and the connection's own send interval; the stall in \
         the clients' table leaves the interval out); the catch-up counts from the end of the blackout as the agent reports it \
         (`live_at_unix_ms`) to the echo of the last message each connection sent before it. The \
         clients never reconnect: a broken connection is counted as lost, so reconnects are 0 \
         by construction.\n",
        if s.insecure {
            "plaintext, `--insecure`"
        } else {
            "mutual TLS 1.3"
        },
        s.rate,
    );
    for p in &s.migrations {
        for failure in &p.failures {
            let _ = writeln!(md, "\nN = {}: failed: {failure}", p.connections);
        }
    }
    md
}

/// The pre-copy's share at each N: how many connections held still from the stop to the dump.
fn precopy(s: &Scaling) -> String {
    let mut md = String::from(
        "\nEvery migration ran with `tcpmig migrate --precopy` (medians): connections restored \
         ahead of the freeze, and those of them the dump found unchanged (they kept their \
         sockets; the others were restored again in the blackout):\n\n",
    );
    for p in s.migrations.iter().filter(|p| !p.runs.is_empty()) {
        let precopied = median_ms(p, |r| r.precopied as f64).unwrap_or_default();
        let kept = median_ms(p, |r| r.kept_precopied as f64).unwrap_or_default();
        let _ = writeln!(
            md,
            "- N = {}: {precopied:.0} pre-copied, {kept:.0} kept",
            p.connections
        );
    }
    md
}

fn references(s: &Scaling) -> String {
    let mut md = String::from(
        "\n### References in the same run (medians; CRIU real dump + restore: one run each)\n\n\
         | N | tcpmig blackout (ms) | tcpmig service freeze (us) | CRIU iptables lock (s) | \
         nft set lock (s) | CRIU dump+restore, iptables lock (s) | CRIU, nftables lock (s) | \
         CRIU, tcpmig hook (s) | CRIU, no lock (s) | plain repair loop (ms) | tcpmig dump + \
         restore (ms) | iptables lock / tcpmig blackout |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut ns: Vec<usize> = (s.migrations.iter().map(|p| p.connections))
        .chain(s.criu.iter().map(|r| r.connections))
        .collect();
    ns.sort_unstable();
    ns.dedup();
    for n in ns {
        // An N that only CRIU ran at: no migration.
        let empty = MigrationPoint {
            connections: n,
            runs: Vec::new(),
            failures: Vec::new(),
        };
        let p = s
            .migrations
            .iter()
            .find(|p| p.connections == n)
            .unwrap_or(&empty);
        let freeze = s.freeze.iter().find(|f| f.connections == n);
        let blackout = median_ms(p, |r| r.blackout_ms);
        let iptables = freeze.map(|f| &f.criu_iptables_lock);
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(blackout, 1),
            cell(freeze.map(|f| f.service_freeze.median_us), 1),
            iptables.map_or_else(
                || "-".to_owned(),
                |i| format!(
                    "{:.2}{}",
                    i.seconds,
                    if i.extrapolated {
                        " (extrapolated)"
                    } else {
                        ""
                    }
                )
            ),
            cell(freeze.map(|f| f.nft_set_lock.median_us / 1e6), 3),
            criu_cell(&s.criu, n, Lock::Iptables),
            criu_cell(&s.criu, n, Lock::Nftables),
            criu_cell(&s.criu, n, Lock::Tcpmig),
            criu_cell(&s.criu, n, Lock::Skip),
            cell(
                s.repair
                    .iter()
                    .find(|r| r.connections == n)
                    .map(|r| r.plain_total_ms),
                2
            ),
            cell(median_ms(p, |r| r.phases.dump_ms + r.phases.restore_ms), 2),
            match (iptables, blackout) {
                (Some(i), Some(b)) if b > 0.0 => ratio(i.seconds * 1e3 / b),
                _ => "-".to_owned(),
            },
        );
    }
    let _ = writeln!(
        md,
        "\nCRIU iptables lock: two `iptables` spawns per connection as CRIU does, timed up to \
         1,000 connections and extrapolated from 40 spawns above (freeze.md). Real CRIU ran up \
         to {} connections in this run (at most {CRIU_MAX}, {CRIU_MAX_QUICK} with --quick, and at \
         that cap when the run goes past it); its iptables restore is stopped at 120 s. The plain repair loop is one thread of the \
         minimal dump and restore syscalls on idle connections (up to {REPAIR_MAX}: both ends \
         live in one process); tcpmig's dump + restore is the migration's dump and restore \
         phases, under load.",
        s.criu.iter().map(|r| r.connections).max().unwrap_or(0),
    );
    md
}

/// A ratio with one decimal below 10, so that a small one does not read 0x.
fn ratio(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.1}x")
    } else {
        format!("{x:.0}x")
    }
}

/// Every method against N, for blackout.svg.
fn points(s: &Scaling) -> Vec<Point> {
    let mut points = Vec::new();
    let mut push = |method: &str, connections: usize, (median_ms, min_ms, max_ms)| {
        points.push(Point {
            method: method.to_owned(),
            connections,
            median_ms,
            min_ms,
            max_ms,
        });
    };
    let spread = |stats: Stats| {
        (
            stats.median_us / 1e3,
            stats.min_us / 1e3,
            stats.max_us / 1e3,
        )
    };
    let once = |ms: f64| (ms, ms, ms);
    let series: [Column; 3] = [
        ("tcpmig migrate: blackout", |r| r.blackout_ms),
        ("tcpmig migrate: clients' longest gap", |r| {
            r.load.max_gap.max_ms
        }),
        ("tcpmig migrate: clients' longest stall", |r| {
            r.load.max_stall.max_ms
        }),
    ];
    for (method, value) in series {
        for p in &s.migrations {
            if let Some(stats) = stat(p, value) {
                push(method, p.connections, spread(stats));
            }
        }
    }
    for f in &s.freeze {
        let n = f.connections;
        push(
            "tcpmig: service freeze (one map update)",
            n,
            spread(f.service_freeze),
        );
        push(
            "CRIU iptables lock (extrapolated past 1,000)",
            n,
            once(f.criu_iptables_lock.seconds * 1e3),
        );
        push("nftables set lock", n, spread(f.nft_set_lock));
    }
    for (method, lock) in [
        ("CRIU dump + restore, iptables lock", Lock::Iptables),
        ("CRIU dump + restore, tcpmig hook", Lock::Tcpmig),
    ] {
        for run in s.criu.iter().filter(|r| r.lock == lock) {
            if let Some(seconds) = criu_seconds(&s.criu, run.connections, lock) {
                push(method, run.connections, once(seconds * 1e3));
            }
        }
    }
    for r in &s.repair {
        push(
            "plain repair loop (dump + restore)",
            r.connections,
            once(r.plain_total_ms),
        );
    }
    points
}

/// The stacked bar of one N's medians, none without runs.
fn phase_bar(p: &MigrationPoint) -> Option<PhaseBar> {
    let first = p.runs.first()?;
    let phases = first
        .phases
        .named()
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let ms = median_ms(p, |r| r.phases.named()[i].1).unwrap_or(0.0);
            ((*name).to_owned(), ms)
        })
        .collect();
    Some(PhaseBar {
        connections: p.connections,
        phases,
    })
}

/// Writes `<name>.csv` from rows of (column, value) pairs, all with the same columns.
fn csv(
    out: &OutputDir,
    name: &str,
    rows: impl Iterator<Item = Vec<(&'static str, String)>>,
) -> anyhow::Result<()> {
    let rows: Vec<_> = rows.collect();
    let header: Vec<&str> = rows
        .first()
        .map(|row| row.iter().map(|(column, _)| *column).collect())
        .unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.into_iter().map(|(_, value)| value).collect())
        .collect();
    out.write_csv(name, &header, &cells)
}

fn num(value: Option<f64>) -> String {
    value.map_or_else(String::new, |v| format!("{v:.4}"))
}

/// One line of scaling.csv: the medians at N and the references (empty cells where none).
fn per_n(s: &Scaling, p: &MigrationPoint) -> Vec<(&'static str, String)> {
    let n = p.connections;
    let blackout = stat(p, |r| r.blackout_ms);
    let freeze = s.freeze.iter().find(|f| f.connections == n);
    let mut row = vec![
        ("connections", n.to_string()),
        ("runs", p.runs.len().to_string()),
        (
            "status",
            if p.runs.is_empty() { "failed" } else { "ok" }.to_owned(),
        ),
        (
            "blackout_median_ms",
            num(blackout.map(|b| b.median_us / 1e3)),
        ),
        ("blackout_min_ms", num(blackout.map(|b| b.min_us / 1e3))),
        ("blackout_max_ms", num(blackout.map(|b| b.max_us / 1e3))),
    ];
    let columns: [Column; 26] = [
        ("stop_to_freeze_ms", |r| r.stop_to_freeze_ms),
        ("freeze_ms", |r| r.phases.freeze_ms),
        ("dump_ms", |r| r.phases.dump_ms),
        ("transfer_ms", |r| r.phases.transfer_ms),
        ("restore_ms", |r| r.phases.restore_ms),
        ("address_ms", |r| r.phases.address_ms),
        ("unfreeze_ms", |r| r.phases.unfreeze_ms),
        ("other_ms", |r| r.phases.other_ms),
        ("migrate_total_ms", |r| r.total_ms),
        ("kept", |r| r.kept as f64),
        ("client_longest_gap_ms", |r| r.load.max_gap.max_ms),
        ("client_stall_p50_ms", |r| r.load.max_stall.p50_ms),
        ("client_stall_p99_ms", |r| r.load.max_stall.p99_ms),
        ("client_longest_stall_ms", |r| r.load.max_stall.max_ms),
        ("latency_p99_ms", |r| r.load.latency.p99_ms),
        ("last_caught_up_ms", caught_up_ms),
        ("lost", |r| r.load.lost() as f64),
        ("client_retrans_segs", |r| r.client_tcp.retrans_segs as f64),
        ("client_rto_timeouts", |r| r.client_tcp.timeouts as f64),
        ("client_syn_retrans", |r| r.client_tcp.syn_retrans as f64),
        ("client_loss_probes", |r| r.client_tcp.loss_probes as f64),
        ("new_tried", |r| r.new_connections.attempted as f64),
        ("new_served", |r| r.new_connections.served as f64),
        ("new_refused", |r| r.new_connections.refused as f64),
        ("new_hanging", |r| r.new_connections.hanging() as f64),
        ("new_served_max_ms", |r| r.new_connections.served_ms.max_ms),
    ];
    row.extend(columns.map(|(column, value)| (column, num(median_ms(p, value)))));
    row.extend([
        (
            "service_freeze_us",
            num(freeze.map(|f| f.service_freeze.median_us)),
        ),
        (
            "criu_iptables_lock_s",
            num(freeze.map(|f| f.criu_iptables_lock.seconds)),
        ),
        (
            "criu_iptables_lock_extrapolated",
            freeze.map_or_else(String::new, |f| {
                f.criu_iptables_lock.extrapolated.to_string()
            }),
        ),
        (
            "nft_set_lock_s",
            num(freeze.map(|f| f.nft_set_lock.median_us / 1e6)),
        ),
        (
            "criu_iptables_s",
            num(criu_seconds(&s.criu, n, Lock::Iptables)),
        ),
        (
            "criu_nftables_s",
            num(criu_seconds(&s.criu, n, Lock::Nftables)),
        ),
        (
            "criu_tcpmig_hook_s",
            num(criu_seconds(&s.criu, n, Lock::Tcpmig)),
        ),
        ("criu_no_lock_s", num(criu_seconds(&s.criu, n, Lock::Skip))),
        (
            "plain_repair_loop_ms",
            num(s
                .repair
                .iter()
                .find(|r| r.connections == n)
                .map(|r| r.plain_total_ms)),
        ),
    ]);
    row
}

/// One line of scaling-runs.csv.
fn per_run(k: usize, r: &MigrationRun) -> Vec<(&'static str, String)> {
    let mut row = vec![
        ("connections", r.connections.to_string()),
        ("run", k.to_string()),
        ("blackout_ms", num(Some(r.blackout_ms))),
        ("stop_to_freeze_ms", num(Some(r.stop_to_freeze_ms))),
        ("migrate_total_ms", num(Some(r.total_ms))),
        ("kept", r.kept.to_string()),
    ];
    let columns = [
        "freeze_ms",
        "dump_ms",
        "transfer_ms",
        "restore_ms",
        "address_ms",
        "unfreeze_ms",
        "other_ms",
    ];
    row.extend(
        columns
            .iter()
            .zip(r.phases.named())
            .map(|(column, (_, ms))| (*column, num(Some(ms)))),
    );
    let load = &r.load;
    row.extend([
        ("client_longest_gap_ms", num(Some(load.max_gap.max_ms))),
        ("client_stall_p50_ms", num(Some(load.max_stall.p50_ms))),
        ("client_stall_p99_ms", num(Some(load.max_stall.p99_ms))),
        ("client_longest_stall_ms", num(Some(load.max_stall.max_ms))),
        ("latency_p99_ms", num(Some(load.latency.p99_ms))),
        ("latency_max_ms", num(Some(load.latency.max_ms))),
        ("last_caught_up_ms", num(Some(caught_up_ms(r)))),
        ("never_caught_up", never_caught_up(r).to_string()),
        ("sent", load.sent.to_string()),
        ("missing", load.missing.to_string()),
        ("verified", load.verified.to_string()),
        ("resets", load.resets.to_string()),
        ("lost", load.lost().to_string()),
    ]);
    let (tcp, new) = (&r.client_tcp, &r.new_connections);
    row.extend(
        [
            ("client_retrans_segs", tcp.retrans_segs),
            ("client_rto_timeouts", tcp.timeouts),
            ("client_syn_retrans", tcp.syn_retrans),
            ("client_loss_probes", tcp.loss_probes),
            ("client_fast_retrans", tcp.fast_retrans),
            ("new_tried", new.attempted),
            ("new_served", new.served),
            ("new_refused", new.refused),
            ("new_hanging", new.hanging()),
            ("new_failed", new.failed),
            ("new_slow_connects", new.slow_connects),
            ("new_unserved_before_blackout", r.unserved_when[0]),
            ("new_unserved_in_blackout", r.unserved_when[1]),
            ("new_unserved_after_blackout", r.unserved_when[2]),
        ]
        .map(|(column, count)| (column, count.to_string())),
    );
    row.push(("new_served_max_ms", num(Some(new.served_ms.max_ms))));
    row
}
