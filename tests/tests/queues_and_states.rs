//! Connections that move whatever their queues hold and whatever half of them is closed: full
//! send and receive queues (an application or a client that stopped reading), and the
//! half-closed states. Each connection is built by hand between the client host and a server
//! socket on the source, moved through the library in the agent's order, and checked byte-exact
//! both ways, with the ends of stream where they were, and no reset. Needs root; run with
//! `--test-threads=1`.
mod support;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig_testbed::{
    TestBed,
    pattern::{Direction, fill},
};

/// Bound on every read of these tests.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Written each way by a connection that keeps reading: its queues hold it all.
const SMALL: u64 = 1000;
/// Written by a destination application after the move, behind what was queued.
const FINAL: u64 = 500;

/// A connection from the client host to a server socket on the source, and how many bytes each
/// side wrote so far (the stream's offsets, [`fill`]).
struct Pair {
    client: TcpStream,
    server: TcpStream,
    to_client: u64,
    to_server: u64,
}

impl Pair {
    fn client_addr(&self) -> Result<SocketAddr> {
        Ok(self.client.local_addr()?)
    }
}

/// `n` connections to `service`, served on the source.
fn connect(bed: &TestBed, service: SocketAddr, n: usize) -> Result<Vec<Pair>> {
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    (0..n)
        .map(|_| {
            let client = bed.client().run(|| TcpStream::connect(service))??;
            let (server, _) = listener.accept()?;
            Ok(Pair {
                client,
                server,
                to_client: 0,
                to_server: 0,
            })
        })
        .collect()
}

/// Writes the stream of `direction` on `socket` from `offset`: `limit` bytes, or until the
/// socket takes no more (its send queue and the peer's receive queue full) when `limit` is
/// None. Returns the new offset.
fn write_stream(
    socket: &TcpStream,
    client: SocketAddr,
    direction: Direction,
    offset: u64,
    limit: Option<u64>,
) -> Result<u64> {
    let mut socket = socket;
    socket.set_nonblocking(true)?;
    let mut offset = offset;
    let end = limit.map_or(u64::MAX, |l| offset + l);
    let mut buf = vec![0; 16 << 10];
    let mut refused = 0;
    // The peer's window closes once its receive buffer is full: a few refusals in a row, some
    // time apart, mean the queues are full.
    while offset < end && refused < 5 {
        let len = (end - offset).min(buf.len() as u64) as usize;
        fill(client, direction, offset, &mut buf[..len]);
        match socket.write(&buf[..len]) {
            Ok(n) => {
                offset += n as u64;
                refused = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ensure!(limit.is_none(), "{len} bytes did not fit");
                refused += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
    socket.set_nonblocking(false)?;
    Ok(offset)
}

/// Reads the stream of `direction` from `socket`, from `from` to `to`, checking every byte;
/// with `eof`, the end of the stream must follow. Returns how long it took.
fn read_stream(
    socket: &TcpStream,
    client: SocketAddr,
    direction: Direction,
    (from, to): (u64, u64),
    eof: bool,
) -> Result<Duration> {
    let mut socket = socket;
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(READ_TIMEOUT))?;
    let started = Instant::now();
    let mut got = vec![0; (to - from) as usize];
    socket
        .read_exact(&mut got)
        .with_context(|| format!("{direction:?} bytes {from}..{to}"))?;
    let mut want = vec![0; got.len()];
    fill(client, direction, from, &mut want);
    let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
    ensure!(
        first_bad.is_none(),
        "{direction:?}: byte {} differs",
        from + first_bad.unwrap_or_default() as u64
    );
    if eof {
        let mut more = [0; 1];
        let n = socket
            .read(&mut more)
            .context("reading the end of the stream")?;
        ensure!(
            n == 0,
            "{direction:?}: more bytes after {to}, no end of stream"
        );
    }
    Ok(started.elapsed())
}

/// Resets so far: sent by any host (Tcp OutRsts), or ending a connection of the client or the
/// destination (EstabResets). The source's EstabResets count its silent disconnects at the
/// commit, not resets.
fn resets(bed: &TestBed) -> Result<u64> {
    let mut total = 0;
    for host in [bed.client(), bed.source(), bed.destination()] {
        total += host.tcp_counter("OutRsts")?;
    }
    for host in [bed.client(), bed.destination()] {
        total += host.tcp_counter("EstabResets")?;
    }
    Ok(total)
}

/// One connection with both queues full (its client stopped reading, its server too) beside
/// two that keep reading: all three move, the full one's bytes all arrive once the client and
/// the destination's application read again, and a final message written at the destination
/// arrives after them. `settings` are sysctls of the destination.
fn full_queues(ipv6: bool, port: u16, settings: &[(&str, &str)]) -> Result<()> {
    let bed = TestBed::new()?;
    for (key, value) in settings {
        bed.destination().set_sysctl(key, value)?;
    }
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let mut pairs = connect(&bed, service, 3)?;
    for (i, pair) in pairs.iter_mut().enumerate() {
        let client = pair.client_addr()?;
        let limit = (i > 0).then_some(SMALL);
        pair.to_client = write_stream(&pair.server, client, Direction::ServerToClient, 0, limit)?;
        pair.to_server = write_stream(&pair.client, client, Direction::ClientToServer, 0, limit)?;
    }
    let before = resets(&bed)?;
    let servers: Vec<TcpStream> = (pairs.iter())
        .map(|p| p.server.try_clone())
        .collect::<std::io::Result<_>>()?;
    let moved = support::move_sockets(&bed, service, &servers)?;
    let full = &moved.connections[0];
    eprintln!(
        "full connection: send queue {} bytes ({} never sent), receive queue {} bytes; \
         wrote {} to the client, {} to the server",
        full.send_queue.len(),
        full.unsent,
        full.recv_queue.len(),
        pairs[0].to_client,
        pairs[0].to_server,
    );
    ensure!(
        full.send_queue.len() > 32 << 10 && full.recv_queue.len() > 32 << 10,
        "the queues were not full"
    );
    for (pair, server) in pairs.iter().zip(&moved.sockets) {
        let client = pair.client_addr()?;
        let took = read_stream(
            server,
            client,
            Direction::ClientToServer,
            (0, pair.to_server),
            false,
        )?;
        eprintln!(
            "{client}: the destination read {} bytes in {took:?}",
            pair.to_server
        );
        let took = read_stream(
            &pair.client,
            client,
            Direction::ServerToClient,
            (0, pair.to_client),
            false,
        )?;
        eprintln!(
            "{client}: the client read {} bytes in {took:?}",
            pair.to_client
        );
        let end = write_stream(
            server,
            client,
            Direction::ServerToClient,
            pair.to_client,
            Some(FINAL),
        )?;
        server.shutdown(Shutdown::Write)?;
        read_stream(
            &pair.client,
            client,
            Direction::ServerToClient,
            (pair.to_client, end),
            true,
        )?;
    }
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

#[test]
fn full_queues_move_v4() -> Result<()> {
    full_queues(false, 7900, &[])
}

#[test]
fn full_queues_move_v6() -> Result<()> {
    full_queues(true, 7910, &[])
}

/// The never-sent bytes of a full send queue are more than the destination's
/// tcp_notsent_lowat: a plain send of them stops there while the client's window is closed.
#[test]
fn full_queues_move_past_notsent_lowat() -> Result<()> {
    full_queues(false, 7920, &[("net.ipv4.tcp_notsent_lowat", "16384")])
}

/// How a half-closed case closes its connection before the move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Half {
    /// The client wrote and shut down its side; the server has not read it.
    CloseWait,
    /// The same, and the server filled its send queue (the client does not read) and shut down.
    LastAck,
    /// The server filled its send queue (the client does not read) and shut down; the client
    /// writes on.
    FinWait1,
    /// The server shut down and the client read everything (our FIN acknowledged); the client
    /// writes on.
    FinWait2,
}

/// One connection closed on one side or both as `half` says, with bytes in both queues, moved:
/// the destination's application reads what the client wrote, then the end of the stream where
/// the client had closed, and writes a final message where its side is open; the client reads
/// everything the server wrote, then a clean end of stream. No reset anywhere.
fn half_closed(ipv6: bool, port: u16, half: Half) -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let mut pairs = connect(&bed, service, 1)?;
    let pair = &mut pairs[0];
    let client = pair.client_addr()?;
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    let server_fills = matches!(half, Half::LastAck | Half::FinWait1);
    pair.to_server = write_stream(&pair.client, client, c2s, 0, Some(5 * SMALL))?;
    let limit = (!server_fills).then_some(5 * SMALL);
    pair.to_client = write_stream(&pair.server, client, s2c, 0, limit)?;
    let client_closes = matches!(half, Half::CloseWait | Half::LastAck);
    if client_closes {
        pair.client.shutdown(Shutdown::Write)?;
    }
    if half != Half::CloseWait {
        pair.server.shutdown(Shutdown::Write)?;
    }
    let mut client_read = 0;
    if half == Half::FinWait2 {
        read_stream(&pair.client, client, s2c, (0, pair.to_client), true)?;
        client_read = pair.to_client;
    }
    std::thread::sleep(Duration::from_millis(100));
    let before = resets(&bed)?;
    let moved = support::move_sockets(&bed, service, &[pair.server.try_clone()?])?;
    let conn = &moved.connections[0];
    eprintln!(
        "{:?}: send queue {} bytes, receive queue {} bytes",
        conn.state,
        conn.send_queue.len(),
        conn.recv_queue.len()
    );
    let state = format!("{:?}", conn.state);
    ensure!(state == format!("{half:?}"), "moved in state {state}");
    let server = &moved.sockets[0];
    if !client_closes {
        let more = write_stream(&pair.client, client, c2s, pair.to_server, Some(3 * SMALL))?;
        pair.to_server = more;
        pair.client.shutdown(Shutdown::Write)?;
    }
    read_stream(server, client, c2s, (0, pair.to_server), true)?;
    let mut end = pair.to_client;
    if half == Half::CloseWait {
        end = write_stream(server, client, s2c, pair.to_client, Some(FINAL))?;
        server.shutdown(Shutdown::Write)?;
    }
    read_stream(&pair.client, client, s2c, (client_read, end), true)?;
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

#[test]
fn close_wait_moves_v4() -> Result<()> {
    half_closed(false, 7930, Half::CloseWait)
}

#[test]
fn close_wait_moves_v6() -> Result<()> {
    half_closed(true, 7931, Half::CloseWait)
}

#[test]
fn last_ack_moves_v4() -> Result<()> {
    half_closed(false, 7932, Half::LastAck)
}

#[test]
fn last_ack_moves_v6() -> Result<()> {
    half_closed(true, 7933, Half::LastAck)
}

#[test]
fn fin_wait1_moves_v4() -> Result<()> {
    half_closed(false, 7934, Half::FinWait1)
}

#[test]
fn fin_wait1_moves_v6() -> Result<()> {
    half_closed(true, 7935, Half::FinWait1)
}

#[test]
fn fin_wait2_moves_v4() -> Result<()> {
    half_closed(false, 7936, Half::FinWait2)
}

#[test]
fn fin_wait2_moves_v6() -> Result<()> {
    half_closed(true, 7937, Half::FinWait2)
}
