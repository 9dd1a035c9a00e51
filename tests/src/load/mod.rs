//! The open-loop load generator: N connections from the bed's client host to echo servers
//! ([`crate::echo`]), each sending a 16-byte message (connection id, sequence number, scheduled
//! send time) every `interval`, whether or not the echoes come back, and checking every echoed
//! byte. The scaling benchmark measures a migration's effect on clients with it.
//!
//! The connections, all to one service address and each from a local port of its own, are spread
//! evenly over the fewest worker processes (`tcpmig-peer load-worker`) of at most
//! [`MAX_SOCKETS_PER_PEER`] sockets (the hard file limit is 20,000); each worker runs one thread
//! with epoll ([`run_worker`]) and no per-message round trips to the caller, whose stdin lines only
//! start the schedule and mark an instant. Messages of a worker are spread evenly over the
//! interval, so the load is smooth rather than in bursts; the interval is chosen for a total rate
//! that the 2 cores can carry ([`LoadConfig`]). Latency is measured from the scheduled send time,
//! not the actual one, so a stalled sender cannot hide its own delay (no coordinated omission);
//! sends go out in batches at epoll's 1 ms resolution, which adds up to 1 ms to the latency.
//!
//! A connection that breaks (reset, closed, a wrong byte) is counted as lost: the generator never
//! reconnects, so every connection in the report carried one byte stream from start to end.
//!
//! One measured migration:
//! ```ignore
//! let echo = EchoServers::listen(bed.source(), peer_bin, TestBed::service(false), PORT, n)?;
//! let mut run = LoadRun::start(&bed, peer_bin, echo.addr(), n, &LoadConfig::default())?;
//! // ... migrate ...
//! run.mark()?; // e.g. when the restore finished
//! let report = run.finish()?;
//! ```

mod worker;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::line_process::LineProcess;
use crate::{MAX_SOCKETS_PER_PEER, TestBed};
use worker::{LATENCY_RANGE_US, MAX_CONNECTIONS, WorkerReport};
pub use worker::{WorkerArgs, run as run_worker};

/// Delay between telling the workers to start and their common start, so that all of them have
/// read the line when the schedule begins (a late one would start with a burst to catch up).
const START_DELAY: Duration = Duration::from_millis(100);
/// Extra wait for a worker's report beyond its own deadline, for a loaded 2-core machine.
const REPORT_MARGIN: Duration = Duration::from_secs(60);

/// CLOCK_MONOTONIC in nanoseconds: the clock all processes of the bed share (network namespaces
/// do not change it), so a mark taken here compares with the workers' timestamps.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// How many processes `connections` sockets need, at most [`MAX_SOCKETS_PER_PEER`] each.
pub fn processes_for(connections: usize) -> usize {
    connections.div_ceil(MAX_SOCKETS_PER_PEER).max(1)
}

/// Splits `connections` evenly over [`processes_for`] workers (as the test bed's `Traffic` does).
fn worker_sizes(connections: usize) -> Vec<usize> {
    let workers = processes_for(connections);
    (0..workers)
        .map(|k| connections / workers + usize::from(k < connections % workers))
        .collect()
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Messages per second over all connections. Every message costs four syscalls and two
    /// packets through the bridge, and the 2 cores also run the echo servers and the migration.
    pub rate: f64,
    /// Floor on each connection's interval, so that a handful of connections does not send
    /// thousands of messages per second each.
    pub min_interval: Duration,
    /// How long messages are sent, from the common start.
    pub duration: Duration,
    /// How long, after the last send, the workers wait for missing echoes (retransmission
    /// backoff after a long blackout can take seconds).
    pub drain: Duration,
    pub connect_timeout: Duration,
    /// The id of the first connection, which also connects from port 1024 + id: two loads from
    /// one client host at once need ranges apart.
    pub first_id: u32,
    /// The client address to connect from (an address of the client host), or any.
    pub from: Option<IpAddr>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            rate: 20_000.0,
            min_interval: Duration::from_millis(10),
            duration: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(60),
            first_id: 0,
            from: None,
        }
    }
}

impl LoadConfig {
    /// Each connection's send interval at `connections` connections.
    pub fn interval(&self, connections: usize) -> Duration {
        Duration::from_secs_f64(connections as f64 / self.rate).max(self.min_interval)
    }
}

/// A running load: the workers hold their connections and send on schedule. Dropping it kills
/// the workers.
pub struct LoadRun<'bed> {
    workers: Vec<LineProcess<'bed>>,
    connections: usize,
    interval: Duration,
    config: LoadConfig,
    start_ns: u64,
    marked: bool,
}

impl<'bed> LoadRun<'bed> {
    /// Opens `connections` connections to `service` from the client host (`tcpmig-peer` at
    /// `peer_bin` as worker processes, connecting in parallel), then starts the schedule on all
    /// of them at once. Returns when the schedule has started.
    pub fn start(
        bed: &'bed TestBed,
        peer_bin: &Path,
        service: SocketAddr,
        connections: usize,
        config: &LoadConfig,
    ) -> anyhow::Result<Self> {
        ensure!(connections > 0, "no connections to open");
        ensure!(
            connections + config.first_id as usize <= MAX_CONNECTIONS,
            "{connections} connections: the client host has {MAX_CONNECTIONS} ports to connect from"
        );
        let interval = config.interval(connections);
        let sizes = worker_sizes(connections);
        let mut workers = Vec::with_capacity(sizes.len());
        let mut first_id = config.first_id;
        for size in sizes {
            let args = WorkerArgs {
                connect: service,
                from: config.from,
                connections: size,
                first_id,
                interval_ns: duration_ns(interval),
                duration_ms: duration_ms(config.duration),
                drain_ms: duration_ms(config.drain),
                connect_timeout_ms: duration_ms(config.connect_timeout),
            };
            workers.push(LineProcess::start(bed.client(), peer_bin, &args.to_args())?);
            first_id = u32::try_from(size)
                .ok()
                .and_then(|n| first_id.checked_add(n))
                .context("more than 2^32 connections")?;
        }
        for worker in &mut workers {
            worker.expect("ready", config.connect_timeout + REPORT_MARGIN)?;
        }
        let start_ns = now_ns() + duration_ns(START_DELAY);
        for worker in &mut workers {
            worker.send(&format!("start {start_ns}"))?;
        }
        std::thread::sleep(START_DELAY);
        Ok(Self {
            workers,
            connections,
            interval,
            config: config.clone(),
            start_ns,
            marked: false,
        })
    }

    /// Marks this instant (e.g. the end of the restore): the report says when after it each
    /// connection caught up. Workers learn of it within about a millisecond
    /// ([`MarkReport::delay_ms`] says how long); at most one mark per run.
    pub fn mark(&mut self) -> anyhow::Result<()> {
        self.mark_at(now_ns())
    }

    /// Marks an instant already past, on [`now_ns`]'s clock: e.g. the end of a blackout that
    /// another process reported, known only once it returns.
    pub fn mark_at(&mut self, at_ns: u64) -> anyhow::Result<()> {
        ensure!(!self.marked, "one mark per run");
        self.marked = true;
        let line = format!("mark {at_ns}");
        self.workers.iter_mut().try_for_each(|w| w.send(&line))
    }

    /// Waits until the workers stopped sending (after the configured duration) and collected the
    /// missing echoes (at most the drain time), and merges their reports.
    pub fn finish(mut self) -> anyhow::Result<LoadReport> {
        let deadline =
            self.start_ns + duration_ns(self.config.duration + self.config.drain + REPORT_MARGIN);
        let reports = self
            .workers
            .iter_mut()
            .map(|worker| {
                let left = Duration::from_nanos(deadline.saturating_sub(now_ns()));
                let line = worker.line(left)?;
                serde_json::from_str::<WorkerReport>(&line)
                    .with_context(|| format!("bad worker report {line:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        LoadReport::merge(&reports, self.connections, self.interval, &self.config)
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the clients saw, over all connections. Times in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub connections: usize,
    pub processes: usize,
    /// Each connection's send interval, and the resulting total rate.
    pub interval_ms: f64,
    pub rate_per_s: f64,
    pub duration_s: f64,
    /// Messages due by the schedule, fully written, and echoed back byte-exact.
    pub scheduled: u64,
    pub sent: u64,
    pub echoed: u64,
    /// Sent but never echoed within the drain time (on lost connections too).
    pub missing: u64,
    /// Connections that stayed open and had every message of the schedule sent and echoed, in
    /// order, byte for byte.
    pub verified: u64,
    /// Lost connections, by cause: ECONNRESET or EPIPE; closed by the server; another error;
    /// a wrong byte (out of order, missing or altered message).
    pub resets: u64,
    pub closed: u64,
    pub failed: u64,
    pub corrupt: u64,
    pub first_failure: Option<String>,
    /// From the scheduled send to the echo.
    pub latency: Latency,
    /// Spread over connections of each one's longest silence: between two echoes, or from its
    /// last echo to the end for a connection that did not get everything back. It includes the
    /// connection's own send interval (500 ms at 10,000 connections and the default rate).
    pub max_gap: Spread,
    /// Spread over connections of each one's longest stall: the longest silence while an echo
    /// was due, from the later of its last echo and the scheduled send of the message echoed
    /// next, to that echo (or to the end). A connection with nothing to send during a blackout
    /// did not stall; one that did waited this long to hear back.
    pub max_stall: Spread,
    pub mark: Option<MarkReport>,
}

impl LoadReport {
    /// Connections that broke; the generator never reconnects.
    pub fn lost(&self) -> u64 {
        self.resets + self.closed + self.failed + self.corrupt
    }

    fn merge(
        reports: &[WorkerReport],
        connections: usize,
        interval: Duration,
        config: &LoadConfig,
    ) -> anyhow::Result<Self> {
        let sum = |field: fn(&WorkerReport) -> u64| reports.iter().map(field).sum::<u64>();
        let mut latency = Histogram::<u64>::new_with_bounds(1, LATENCY_RANGE_US, 3)?;
        for (value, count) in reports.iter().flat_map(|r| &r.latency_us) {
            latency.saturating_record_n(*value, *count);
        }
        let marks: Vec<_> = reports.iter().filter_map(|r| r.mark.as_ref()).collect();
        let mark = (!marks.is_empty()).then(|| {
            let caught_up: Vec<Option<u64>> = marks
                .iter()
                .flat_map(|m| m.caught_up_us.iter().copied())
                .collect();
            let never_caught_up = caught_up.iter().filter(|c| c.is_none()).count() as u64;
            let late = caught_up.iter().flatten().copied().filter(|&us| us > 0);
            let caught = Spread::of_us(late.collect());
            MarkReport {
                delay_ms: ms(marks.iter().map(|m| m.delay_us).max().unwrap_or(0)),
                behind: marks.iter().map(|m| m.behind).sum(),
                never_caught_up,
                last_caught_up_ms: caught.max_ms,
                caught_up: caught,
                first_echo: Spread::of_us(
                    marks
                        .iter()
                        .flat_map(|m| m.first_echo_us.iter().flatten().copied())
                        .collect(),
                ),
                caught_up_ms: caught_up.iter().map(|c| c.map(ms)).collect(),
            }
        });
        let interval_s = interval.as_secs_f64();
        Ok(Self {
            connections,
            processes: reports.len(),
            interval_ms: interval_s * 1e3,
            rate_per_s: connections as f64 / interval_s,
            duration_s: config.duration.as_secs_f64(),
            scheduled: sum(|r| r.scheduled),
            sent: sum(|r| r.sent),
            echoed: sum(|r| r.echoed),
            missing: sum(|r| r.sent - r.echoed),
            verified: sum(|r| r.verified),
            resets: sum(|r| r.resets),
            closed: sum(|r| r.closed),
            failed: sum(|r| r.failed),
            corrupt: sum(|r| r.corrupt),
            first_failure: reports.iter().find_map(|r| r.first_failure.clone()),
            latency: Latency {
                p50_ms: ms(latency.value_at_quantile(0.5)),
                p99_ms: ms(latency.value_at_quantile(0.99)),
                p999_ms: ms(latency.value_at_quantile(0.999)),
                max_ms: ms(latency.max()),
            },
            max_gap: Spread::of_us(reports.iter().flat_map(|r| r.max_gap_us.clone()).collect()),
            max_stall: Spread::of_us(
                reports
                    .iter()
                    .flat_map(|r| r.max_stall_us.clone())
                    .collect(),
            ),
            mark,
        })
    }
}

/// What happened after [`LoadRun::mark`].
#[derive(Clone, Debug, Serialize)]
pub struct MarkReport {
    /// How late the slowest worker learned of the mark: the resolution of the times below.
    pub delay_ms: f64,
    /// Connections still waiting, when their worker learned of the mark, for the echo of a
    /// message scheduled before it.
    pub behind: u64,
    /// Connections that never got back everything scheduled before the mark.
    pub never_caught_up: u64,
    /// The time until the last connection caught up (of those that did).
    pub last_caught_up_ms: f64,
    /// Over the connections that were behind: from the mark to the echo of the connection's last
    /// message scheduled before the mark, i.e. when its backlog cleared, whatever its schedule.
    pub caught_up: Spread,
    /// Per connection, from the mark to its first echo after it; for a connection that was not
    /// behind, this also waits for its next scheduled send (up to one interval).
    pub first_echo: Spread,
    /// The catch-up of each connection, in connection id order: 0 if it was not behind, `None`
    /// if it never caught up.
    pub caught_up_ms: Vec<Option<f64>>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// The median, 99th percentile and maximum of one value per connection, in milliseconds; all zero
/// when there are no values.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub(crate) fn of_us(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        let at = |q: f64| {
            let last = values.len().saturating_sub(1);
            values
                .get((last as f64 * q).round() as usize)
                .map_or(0.0, |&v| ms(v))
        };
        Self {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_per_connection_values() {
        let spread = Spread::of_us((1..=1000).map(|v| v * 1000).collect());
        assert_eq!(
            (spread.p50_ms, spread.p99_ms, spread.max_ms),
            (501.0, 990.0, 1000.0)
        );
        assert_eq!(Spread::of_us(Vec::new()).max_ms, 0.0);
    }

    #[test]
    fn workers_stay_under_the_file_limit() {
        for connections in [1, 15_000, 15_001, 50_000] {
            let sizes = worker_sizes(connections);
            assert_eq!(sizes.len(), processes_for(connections));
            assert_eq!(sizes.iter().sum::<usize>(), connections);
            assert!(sizes.iter().all(|&s| s <= MAX_SOCKETS_PER_PEER));
        }
        assert_eq!(worker_sizes(50_000), [12_500; 4]);
    }

    #[test]
    fn interval_keeps_the_total_rate_and_a_floor() {
        let config = LoadConfig::default();
        assert_eq!(config.interval(10_000), Duration::from_millis(500));
        assert_eq!(config.interval(1), config.min_interval);
    }
}
