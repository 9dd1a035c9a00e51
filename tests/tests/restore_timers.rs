//! No idle timers after a restore: a connection whose client never got the last bytes the
//! source's kernel sent (a loss on the client's side, then the freeze) is migrated, and the
//! destination's kernel must send those bytes again at once, not on its first retransmission
//! timeout (which a restored socket, with no RTT estimate, takes at 1 to 3 s). Counted in the
//! destination's namespace: no retransmission timeout (TcpExt TCPTimeouts) and no tail loss probe
//! fired while the clients caught up. Needs root; run with `--test-threads=1`.
#[path = "support/mod.rs"]
mod support;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use support::PEER;
use tcpmig::{
    freeze::{Freeze, RemoveOnDrop},
    net::{self, Netns},
    repair,
    tuple::{self, Tuple},
};
use tcpmig_testbed::{
    Host, IFACE, Peer, PeerArgs, PeerCommand, Report, StreamArgs, TestBed, Traffic, command_all,
};

/// Written both ways at first and left unread: the receive queues hold it.
const BYTES: u64 = 1024;
/// Bound on each peer command: a connection stalled on timers still ends within it.
const STREAM_TIMEOUT_SECS: u64 = 60;
/// Bound on every freeze of these tests.
const FREEZE_TTL: Duration = Duration::from_secs(120);

fn stream(bytes: u64) -> StreamArgs {
    StreamArgs {
        timeout_secs: STREAM_TIMEOUT_SECS,
        ..StreamArgs::new(bytes)
    }
}

/// One of the `TcpExt:` counters of `host`'s namespace, from /proc/net/netstat.
fn tcp_ext(host: &Host, name: &str) -> Result<u64> {
    let netstat = host.run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
    let mut ext = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = ext.next().zip(ext.next()).context("no TcpExt: lines")?;
    let column = names
        .split_whitespace()
        .position(|n| n == name)
        .with_context(|| format!("no TcpExt counter {name}"))?;
    values
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("reading TcpExt counter {name}"))
}

/// The destination's retransmission counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retransmissions {
    timeouts: u64,
    loss_probes: u64,
    segments: u64,
}

impl Retransmissions {
    fn of(host: &Host) -> Result<Self> {
        Ok(Self {
            timeouts: tcp_ext(host, "TCPTimeouts")?,
            loss_probes: tcp_ext(host, "TCPLossProbes")?,
            segments: host.tcp_counter("RetransSegs")?,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            timeouts: self.timeouts - before.timeouts,
            loss_probes: self.loss_probes - before.loss_probes,
            segments: self.segments - before.segments,
        }
    }
}

/// The client host loses every segment of the `n` connections while each server writes `lost`
/// bytes (they leave the source, unacknowledged, and never arrive), then the service is frozen
/// on the source and the loss ends. Returns the source's freeze.
fn lose_servers_writes(
    bed: &TestBed,
    traffic: &mut Traffic<'_>,
    service: SocketAddr,
    n: usize,
    lost: u64,
) -> Result<RemoveOnDrop> {
    let client_ns = Netns::open(bed.client().name())?;
    let tuples: Vec<Tuple> = repair::list_tcp_sockets(&client_ns)?
        .into_iter()
        .filter(|s| s.tuple.remote == tuple::canonical(service))
        .map(|s| s.tuple)
        .collect();
    ensure!(tuples.len() == n, "{} client sockets found", tuples.len());
    let mut loss = RemoveOnDrop::new(Freeze::attach(
        &client_ns,
        IFACE,
        &format!("{}-loss", bed.prefix()),
    )?);
    loss.freeze_tuples(&tuples, FREEZE_TTL)?;
    let servers = command_all(&mut traffic.servers, PeerCommand::Send { bytes: lost })?;
    ensure!(
        servers.bytes_out == (BYTES + lost) * n as u64,
        "servers' writes: {servers:?}"
    );
    // Let the writes leave the source (into the loss) before the freeze there.
    std::thread::sleep(Duration::from_millis(50));
    let src_ns = Netns::open(bed.source().name())?;
    let mut frozen = RemoveOnDrop::new(Freeze::attach(
        &src_ns,
        IFACE,
        &format!("{}-src", bed.prefix()),
    )?);
    frozen.freeze_services(&[service], FREEZE_TTL)?;
    drop(loss);
    Ok(frozen)
}

/// Both streams of every connection checked up to their ends, and no failure.
fn verify(traffic: &mut Traffic<'_>, to_client: u64, to_server: u64, n: u64) -> Result<()> {
    let check = |side: &str, report: Report| {
        ensure!(
            report.connections == n && report.all_verified() && report.resets == 0,
            "{side}: {report:?}"
        );
        Ok(())
    };
    let until = |bytes| PeerCommand::Verify { until: Some(bytes) };
    check("clients", command_all(&mut traffic.clients, until(to_client))?)?;
    check("servers", command_all(&mut traffic.servers, until(to_server))?)
}

/// Migrates `n` connections whose servers' last `lost` bytes never reached the clients, in the
/// agent's order (restore in repair mode, address moved, destination unfrozen, repair off), and
/// returns what the destination retransmitted until every client had every byte.
fn migrate_undelivered(n: usize, ipv6: bool, port: u16, lost: u64) -> Result<Retransmissions> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let mut traffic = Traffic::open_at(&bed, Path::new(PEER), service, n, stream(BYTES))?;
    ensure!(traffic.servers.len() == 1, "one server process");
    let source_freeze = lose_servers_writes(&bed, &mut traffic, service, n, lost)?;
    let (src, dst) = (
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let fds = repair::discover(&src, traffic.servers[0].pid(), &repair::Filter::service(service))?
        .into_fds();
    let mut reader = repair::StateReader::load(Some(service.port()))?;
    let dumped = repair::prepare_dump(repair::Workers::PerCpu, fds)?.dump(&mut reader)?;
    let in_flight = dumped
        .connections()
        .iter()
        .filter(|c| !c.sent_part().is_empty())
        .count();
    ensure!(
        in_flight == n,
        "{in_flight} of {n} connections have sent but unacknowledged bytes"
    );

    let mut dest_freeze = RemoveOnDrop::new(Freeze::attach(
        &dst,
        IFACE,
        &format!("{}-dst", bed.prefix()),
    )?);
    dest_freeze.freeze_services(&[service], FREEZE_TTL)?;
    let restored = repair::restore(&dst, dumped.connections())?;
    let prefix = if ipv6 {
        tcpmig_testbed::PREFIX_V6
    } else {
        tcpmig_testbed::PREFIX_V4
    };
    net::move_address(&src, IFACE, &dst, IFACE, service.ip(), prefix)?;
    drop(dest_freeze);
    let before = Retransmissions::of(bed.destination())?;
    let committed_at = Instant::now();
    let committed = restored.commit();
    ensure!(committed.failures.is_empty(), "{:?}", committed.failures);
    dumped.commit();

    let fds = committed.sockets.into_iter().map(|s| s.fd).collect();
    let mut cmd = bed.destination().command_with_listen_fds(PEER, fds)?;
    let taken_over = StreamArgs {
        sent_already: BYTES + lost,
        ..stream(BYTES + lost)
    };
    cmd.args(PeerArgs::adopting_server(taken_over).to_args());
    let server = Peer::spawn(
        bed.destination(),
        cmd,
        "server of the restored sockets",
        taken_over.timeout() + Duration::from_secs(10),
    )?;
    // The old server's sockets are in repair mode: killing it closes them silently.
    drop(std::mem::replace(&mut traffic.servers, vec![server]));
    traffic.servers[0].expect_line("ready")?;
    drop(source_freeze);
    verify(&mut traffic, BYTES + lost, BYTES, n as u64)?;
    let caught_up = committed_at.elapsed();
    let retransmitted = Retransmissions::of(bed.destination())?.since(before);
    eprintln!(
        "{n} connections (ipv6 {ipv6}, {lost} bytes lost each): every client had every byte \
         {caught_up:?} after the commit; the destination retransmitted {retransmitted:?}"
    );
    Ok(retransmitted)
}

/// The clients' missing bytes fit in the first flight of a fresh socket.
#[test]
fn lost_bytes_are_sent_again_at_once_v4() -> Result<()> {
    let retransmitted = migrate_undelivered(20, false, 7800, 4000)?;
    ensure!(
        retransmitted.timeouts == 0 && retransmitted.loss_probes == 0,
        "the destination waited for its timers: {retransmitted:?}"
    );
    Ok(())
}

#[test]
fn lost_bytes_are_sent_again_at_once_v6() -> Result<()> {
    let retransmitted = migrate_undelivered(20, true, 7810, 4000)?;
    ensure!(
        retransmitted.timeouts == 0 && retransmitted.loss_probes == 0,
        "the destination waited for its timers: {retransmitted:?}"
    );
    Ok(())
}
