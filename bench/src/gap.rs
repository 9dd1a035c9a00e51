//! Dry run of the scaling benchmark's client side, without a migration: echo servers on the
//! source, the open-loop load from the client host, and in the middle the service frozen with
//! tcpmig's freeze for `--freeze-ms`, then thawed. The clients should see a longest gap of about
//! the freeze plus retransmission backoff, no reset and nothing missing; the time until the last
//! client caught up after the thaw is the backoff the notes saw stretch to 1.7 s at 10,000
//! connections after a longer blackout. The client host's TCP counters (nstat), read before the
//! freeze and after the load, say what the clients retransmitted meanwhile, and new connections
//! tried every 2 ms through the freeze (the test bed's prober) how a new user fares.

use std::fmt::Write as _;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use tcpmig::freeze::{Freeze, RemoveOnDrop};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    EchoServers, IFACE, LoadConfig, LoadReport, LoadRun, ProbeArgs, ProbeReport, ProbeRun,
    TcpCounters, TestBed, probe,
};

use crate::criu::sibling;
use crate::plot::{self, Point};

const DEFAULT_FREEZE_MS: u64 = 200;
const PORT: u16 = 9000;
/// Traffic before the freeze and after the thaw, at least: every connection must have sent and
/// had echoes on both sides of the freeze (with at least two intervals each way).
const WARMUP: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_secs(4);
/// The freeze lifts itself this long after it should have been thawed, should we crash.
const FREEZE_TTL_MARGIN: Duration = Duration::from_secs(10);

#[derive(clap::Args, Clone, Debug)]
pub struct GapArgs {
    /// Connection counts, comma-separated [default: 1000 with --quick, else 1000,10000].
    #[arg(long, value_delimiter = ',')]
    pub connections: Vec<usize>,
    /// How long the service stays frozen.
    #[arg(long, default_value_t = DEFAULT_FREEZE_MS)]
    pub freeze_ms: u64,
    /// Messages per second over all connections.
    #[arg(long, default_value_t = LoadConfig::default().rate)]
    pub rate: f64,
}

impl Default for GapArgs {
    fn default() -> Self {
        Self {
            connections: Vec::new(),
            freeze_ms: DEFAULT_FREEZE_MS,
            rate: LoadConfig::default().rate,
        }
    }
}

#[derive(Serialize)]
pub struct GapResult {
    pub connections: usize,
    /// From the map update that froze the service to the one that thawed it.
    pub freeze_ms: f64,
    /// The mark is the thaw.
    pub load: LoadReport,
    /// The client host's counters from before the freeze to the end of the load.
    pub client_tcp: TcpCounters,
    /// New connections tried through the freeze.
    pub new_connections: ProbeReport,
}

pub fn run(args: &GapArgs, quick: bool) -> anyhow::Result<Vec<GapResult>> {
    let ns = match (&args.connections[..], quick) {
        ([], true) => vec![1_000],
        ([], false) => vec![1_000, 10_000],
        (ns, _) => ns.to_vec(),
    };
    let peer = sibling("tcpmig-peer")?;
    ns.into_iter().map(|n| once(&peer, n, args)).collect()
}

fn once(peer: &Path, n: usize, args: &GapArgs) -> anyhow::Result<GapResult> {
    let freeze_for = Duration::from_millis(args.freeze_ms);
    eprintln!("gap bench: {n} connections, service frozen for {freeze_for:?}");
    let bed = TestBed::new()?;
    let echo = EchoServers::listen(bed.source(), peer, TestBed::service(false), PORT, n)?;
    let services = [echo.addr()];
    let netns = Netns::open(bed.source().name())?;
    let name = format!("{}-gap", bed.prefix());
    let mut freeze = RemoveOnDrop::new(Freeze::attach(&netns, IFACE, &name)?);
    let config = LoadConfig {
        rate: args.rate,
        ..LoadConfig::default()
    };
    let interval = config.interval(n);
    let warmup = WARMUP.max(interval * 2);
    let config = LoadConfig {
        duration: warmup + freeze_for + SETTLE.max(interval * 2),
        ..config
    };
    let mut run = LoadRun::start(&bed, peer, echo.addr(), n, &config)?;
    thread::sleep(warmup.saturating_sub(probe::LEAD));
    let counters = TcpCounters::read_in(bed.client())?;
    let probe = ProbeRun::start(bed.client(), peer, &ProbeArgs::new(echo.addr()))?;
    thread::sleep(probe::LEAD);
    let frozen = Instant::now();
    freeze.freeze_services(&services, freeze_for + FREEZE_TTL_MARGIN)?;
    thread::sleep(freeze_for);
    freeze.thaw_services(&services)?;
    let freeze_ms = frozen.elapsed().as_secs_f64() * 1e3;
    run.mark()?;
    thread::sleep(probe::TAIL);
    let new_connections = probe.finish()?;
    let load = run.finish()?;
    Ok(GapResult {
        connections: n,
        freeze_ms,
        load,
        client_tcp: TcpCounters::read_in(bed.client())?.since(&counters),
        new_connections,
    })
}

pub fn markdown(results: &[GapResult]) -> String {
    let mut md = String::from(
        "### Client gaps through a service freeze (no migration)\n\n\
         | N | interval (ms) | freeze (ms) | sent | missing | verified | lost (resets) | \
         latency p50 / p99 / p99.9 / max (ms) | longest gap p50 / max (ms) | longest stall p50 \
         / p99 / max (ms) | behind at thaw | caught up p50 / p99 / last (ms) | retransmitted \
         segments / RTO timeouts / SYN retransmissions / loss probes | new connections served / \
         tried, refused, hanging, connects >= 1 s | slowest new connection (ms) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let (load, new) = (&r.load, &r.new_connections);
        let (behind, caught) = load.mark.as_ref().map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |m| {
                let never = if m.never_caught_up > 0 {
                    format!(" ({} never)", m.never_caught_up)
                } else {
                    String::new()
                };
                (
                    m.behind.to_string(),
                    format!(
                        "{:.1} / {:.1} / {:.1}{never}",
                        m.caught_up.p50_ms, m.caught_up.p99_ms, m.last_caught_up_ms
                    ),
                )
            },
        );
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} | {} | {} | {} / {} | {} ({}) | {:.2} / {:.1} / {:.1} / {:.1} | \
             {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {behind} | {caught} | {} / {} / {} / {} | {} / {}, {}, {}, {} | {:.1} |",
            r.connections,
            load.interval_ms,
            r.freeze_ms,
            load.sent,
            load.missing,
            load.verified,
            load.connections,
            load.lost(),
            load.resets,
            load.latency.p50_ms,
            load.latency.p99_ms,
            load.latency.p999_ms,
            load.latency.max_ms,
            load.max_gap.p50_ms,
            load.max_gap.max_ms,
            load.max_stall.p50_ms,
            load.max_stall.p99_ms,
            load.max_stall.max_ms,
            r.client_tcp.retrans_segs,
            r.client_tcp.timeouts,
            r.client_tcp.syn_retrans,
            r.client_tcp.loss_probes,
            new.served,
            new.attempted,
            new.refused,
            new.hanging(),
            new.slow_connects,
            new.served_ms.max_ms,
        );
    }
    if let Some(failure) = results.iter().find_map(|r| r.load.first_failure.as_ref()) {
        let _ = writeln!(md, "\nFirst failure: {failure}");
    }
    md.push_str(
        "\nOpen loop: each connection sends a 16-byte message every interval whatever the echoes \
         do, and checks every echoed byte. Latency counts from the scheduled send. Longest gap: \
         per connection, the longest time without an echo (its send interval included). Longest \
         stall: per connection, the longest wait for an echo that was due. Caught up: from the \
         thaw to the echo of the connection's last message sent before the thaw. Retransmissions: \
         the client host's counters (nstat) from before the freeze to the end of the load. New \
         connections: one every 2 ms from 200 ms before the freeze to 300 ms after the thaw, one \
         16-byte echo on each within 3 s.\n",
    );
    md
}

/// The longest gap and the last catch-up against N, as `gap.svg` in `dir`.
pub fn plot(results: &[GapResult], dir: &Path) -> anyhow::Result<()> {
    let mut points = Vec::new();
    for r in results {
        let mut point = |method: &str, ms: f64| {
            points.push(Point {
                method: method.to_owned(),
                connections: r.connections,
                median_ms: ms,
                min_ms: ms,
                max_ms: ms,
            });
        };
        point("longest client gap", r.load.max_gap.max_ms);
        point("longest client stall", r.load.max_stall.max_ms);
        if let Some(mark) = &r.load.mark {
            point(
                "last client caught up, after the thaw",
                mark.last_caught_up_ms,
            );
        }
        point("freeze", r.freeze_ms);
    }
    plot::against_connections(
        &dir.join("gap.svg"),
        "Clients through a service freeze (no migration)",
        "time (ms)",
        &points,
    )
}
