//! No idle timers after a restore: a connection whose client never got the last bytes the
//! source's kernel sent (a loss on the client's side, then the freeze) is migrated, and the
//! destination's kernel must send those bytes again at once, not on its first retransmission
//! timeout (which a restored socket, with no RTT estimate, takes at 3 s, after a tail loss probe
//! at 1 s). Counted in the destination's namespace: no retransmission timeout (TcpExt
//! TCPTimeouts) while the clients caught up. Also: more in flight than one flight, with the
//! clients missing it or having it. Needs root; run with `--test-threads=1`.
#[path = "support/mod.rs"]
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use support::PEER;
use tcpmig::{
    freeze::{Freeze, RemoveOnDrop},
    net::{self, Netns},
    repair::{self, TcpState},
};
use tcpmig_testbed::{Host, IFACE, PeerCommand, Report, StreamArgs, TestBed, Traffic, command_all};

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

/// What the client host loses while the servers write their last bytes.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// Every segment of the connections, both ways: the clients never get those bytes.
    Everything,
    /// Only what the clients send: they get every byte, the source never learns it.
    Acks,
}

/// The client's side of a [`Loss`], lifted on drop.
enum LossGuard<'bed> {
    Freeze(#[allow(dead_code)] Box<RemoveOnDrop>),
    Nft(&'bed Host),
}

impl Drop for LossGuard<'_> {
    fn drop(&mut self) {
        if let Self::Nft(host) = self
            && let Ok(mut nft) = host.command("nft")
        {
            let _ = nft.args(["delete", "table", "inet", "loss"]).status();
        }
    }
}

fn start_loss(bed: &TestBed, service: SocketAddr, n: usize, loss: Loss) -> Result<LossGuard<'_>> {
    match loss {
        Loss::Everything => {
            let freeze = support::client_loses_everything(bed, service, n, FREEZE_TTL)?;
            Ok(LossGuard::Freeze(Box::new(freeze)))
        }
        Loss::Acks => {
            let rules = format!(
                "add table inet loss\nadd chain inet loss out {{ type filter hook output \
                 priority 0; }}\nadd rule inet loss out tcp dport {} drop\n",
                service.port()
            );
            let mut nft = bed.client().command("nft")?;
            nft.args(["-f", "-"]).stdin(Stdio::piped());
            let mut child = nft.spawn()?;
            child
                .stdin
                .take()
                .context("nft's stdin")?
                .write_all(rules.as_bytes())?;
            ensure!(child.wait()?.success(), "nft in {}", bed.client());
            Ok(LossGuard::Nft(bed.client()))
        }
    }
}

/// The client host loses the `n` connections' segments as `loss` says while each server writes
/// `lost` bytes after the `written` it wrote so far (they leave the source and stay
/// unacknowledged), then the service is frozen on the source and the loss ends. Returns the
/// source's freeze.
fn lose_servers_writes(
    bed: &TestBed,
    traffic: &mut Traffic<'_>,
    service: SocketAddr,
    (n, written, case): (usize, u64, Case),
) -> Result<RemoveOnDrop> {
    let guard = start_loss(bed, service, n, case.loss)?;
    let servers = command_all(&mut traffic.servers, PeerCommand::Send { bytes: case.lost })?;
    ensure!(
        servers.bytes_out == (written + case.lost) * n as u64,
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
    drop(guard);
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
    check(
        "clients",
        command_all(&mut traffic.clients, until(to_client))?,
    )?;
    check(
        "servers",
        command_all(&mut traffic.servers, until(to_server))?,
    )
}

/// One migration's traffic: `warm` bytes each server writes and its client reads first (the
/// source's congestion windows open), then `lost` bytes written during a `loss`.
#[derive(Clone, Copy, Debug)]
struct Case {
    warm: u64,
    lost: u64,
    loss: Loss,
}

/// Migrates `n` connections whose servers' last bytes are unacknowledged as `case` says, in the
/// agent's order (restore in repair mode, address moved, destination unfrozen, repair off), and
/// returns what the destination retransmitted until every client had every byte. The dump must
/// hold `in_flight` bytes at least in the sent part of every connection's send queue.
fn migrate_undelivered(
    (n, ipv6, port): (usize, bool, u16),
    case: Case,
    in_flight: usize,
) -> Result<Retransmissions> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let total = BYTES + case.warm + case.lost;
    let mut traffic = Traffic::open_at(&bed, Path::new(PEER), service, n, stream(BYTES))?;
    ensure!(traffic.servers.len() == 1, "one server process");
    if case.warm > 0 {
        // Written while the clients read it: more than the buffers hold.
        let server = &mut traffic.servers[0];
        server.send_command(PeerCommand::Send { bytes: case.warm })?;
        let until = Some(BYTES + case.warm);
        command_all(&mut traffic.clients, PeerCommand::Verify { until })?;
        let wrote = server.read_report()?;
        ensure!(
            wrote.bytes_out == (BYTES + case.warm) * n as u64,
            "{wrote:?}"
        );
    }
    let written = BYTES + case.warm;
    let source_freeze = lose_servers_writes(&bed, &mut traffic, service, (n, written, case))?;
    let (src, dst) = (
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let fds = repair::discover(
        &src,
        traffic.servers[0].pid(),
        &repair::Filter::service(service),
    )?
    .into_fds();
    let mut reader = repair::StateReader::load(Some(service.port()))?;
    let dumped = repair::prepare_dump(repair::Workers::PerCpu, fds)?.dump(&mut reader)?;
    let sent: Vec<usize> = dumped
        .connections()
        .iter()
        .map(|c| c.sent_part().len())
        .collect();
    ensure!(
        sent.len() == n && sent.iter().all(|&len| len >= in_flight),
        "bytes sent but unacknowledged per connection: {sent:?}, {in_flight} wanted"
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
    let taken_over = StreamArgs {
        sent_already: total,
        ..stream(total)
    };
    let server = support::adopt_on_destination(&bed, fds, taken_over)?;
    // The old server's sockets are in repair mode: killing it closes them silently.
    drop(std::mem::replace(&mut traffic.servers, vec![server]));
    drop(source_freeze);
    verify(&mut traffic, total, BYTES, n as u64)?;
    let caught_up = committed_at.elapsed();
    let retransmitted = Retransmissions::of(bed.destination())?.since(before);
    eprintln!(
        "{n} connections (ipv6 {ipv6}, {case:?}, in flight per connection {}..={}): every \
         client had every byte {caught_up:?} after the commit; the destination retransmitted \
         {retransmitted:?}",
        sent.iter().min().unwrap_or(&0),
        sent.iter().max().unwrap_or(&0),
    );
    Ok(retransmitted)
}

/// No retransmission timeout: the destination sent what the clients missed without waiting
/// for one. (A tail loss probe may fire when a client delays its last ACK; it is not counted.)
fn no_timeouts(retransmitted: Retransmissions) -> Result<()> {
    ensure!(
        retransmitted.timeouts == 0,
        "the destination waited for its retransmission timers: {retransmitted:?}"
    );
    Ok(())
}

/// The clients' missing bytes fit in the first flight of a fresh socket.
const SMALL: Case = Case {
    warm: 0,
    lost: 4000,
    loss: Loss::Everything,
};

#[test]
fn lost_bytes_are_sent_again_at_once_v4() -> Result<()> {
    no_timeouts(migrate_undelivered((20, false, 7800), SMALL, 4000)?)
}

#[test]
fn lost_bytes_are_sent_again_at_once_v6() -> Result<()> {
    no_timeouts(migrate_undelivered((20, true, 7810), SMALL, 4000)?)
}

/// More in flight than a fresh socket's first flight holds (opened windows), and the clients
/// have it all: only their ACKs were lost. The destination must not stop short of the source's
/// snd_nxt, or it would ignore the clients' ACKs of it: the connections would stall for good.
#[test]
fn more_in_flight_than_a_first_flight_v4() -> Result<()> {
    let case = Case {
        warm: 1 << 20,
        lost: 48 * 1024,
        loss: Loss::Acks,
    };
    no_timeouts(migrate_undelivered((20, false, 7820), case, 8 * 1024)?)
}

/// The same, with the clients missing it all. More than a first flight stays in flight in
/// repair mode (sent anew, it would stall a client that has it, as in the test above), so the
/// destination still recovers on its timers, as before: every byte arrives, after one
/// retransmission timeout per connection at most.
#[test]
fn more_lost_than_a_first_flight_v4() -> Result<()> {
    const N: usize = 20;
    let case = Case {
        warm: 1 << 20,
        lost: 48 * 1024,
        loss: Loss::Everything,
    };
    let retransmitted = migrate_undelivered((N, false, 7830), case, 16 * 1024)?;
    ensure!(
        retransmitted.timeouts <= N as u64,
        "more than one retransmission timeout per connection: {retransmitted:?}"
    );
    Ok(())
}

/// A FIN behind the lost bytes: the server wrote them and shut its side down while the client
/// lost everything (FIN_WAIT1, our FIN in flight). The client gets every byte, then the end of
/// the stream, without a retransmission timeout on the destination.
#[test]
fn lost_bytes_and_fin_are_sent_again_at_once() -> Result<()> {
    const LOST: usize = 4000;
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(false), 7840);
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let mut client = bed.client().run(|| TcpStream::connect(service))??;
    let (mut server, _) = listener.accept()?;
    let loss = start_loss(&bed, service, 1, Loss::Everything)?;
    let data: Vec<u8> = (0..LOST).map(|i| (i % 251) as u8).collect();
    server.write_all(&data)?;
    server.shutdown(Shutdown::Write)?;
    std::thread::sleep(Duration::from_millis(50));
    let (src, dst) = (
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let mut source_freeze = RemoveOnDrop::new(Freeze::attach(
        &src,
        IFACE,
        &format!("{}-src", bed.prefix()),
    )?);
    source_freeze.freeze_services(&[service], FREEZE_TTL)?;
    drop(loss);
    let dumped = repair::dump(vec![OwnedFd::from(server.try_clone()?)])?;
    let conn = &dumped.connections()[0];
    ensure!(
        conn.state == TcpState::FinWait1 && conn.sent_part().len() == LOST,
        "{:?} with {} bytes sent",
        conn.state,
        conn.sent_part().len()
    );

    let mut dest_freeze = RemoveOnDrop::new(Freeze::attach(
        &dst,
        IFACE,
        &format!("{}-dst", bed.prefix()),
    )?);
    dest_freeze.freeze_services(&[service], FREEZE_TTL)?;
    let restored = repair::restore(&dst, dumped.connections())?;
    let prefix = tcpmig_testbed::PREFIX_V4;
    net::move_address(&src, IFACE, &dst, IFACE, service.ip(), prefix)?;
    drop(dest_freeze);
    let before = Retransmissions::of(bed.destination())?;
    let committed = restored.commit();
    ensure!(committed.failures.is_empty(), "{:?}", committed.failures);
    dumped.commit();
    drop(source_freeze);

    client.set_read_timeout(Some(Duration::from_secs(STREAM_TIMEOUT_SECS)))?;
    let mut received = Vec::new();
    client.read_to_end(&mut received)?;
    ensure!(
        received == data,
        "{} of {LOST} bytes, then the end",
        received.len()
    );
    no_timeouts(Retransmissions::of(bed.destination())?.since(before))
}
