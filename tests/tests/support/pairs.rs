//! Connections built by hand between the client host and server sockets on the source, with
//! their streams' offsets (each byte checked with [`fill`]), the half-closed states made on
//! them, every state that moves at once, and the resets counted on every host.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig::{repair::TcpState, sys::tcp_repair::tcp_info};
use tcpmig_testbed::{
    Namespace, TestBed,
    pattern::{Direction, fill},
};

/// Bound on every read of these tests.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a connection's wait for its state (the FINs and ACKs on the bridge).
const STATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Written each way by a connection that keeps reading: its queues hold it all.
pub const SMALL: u64 = 1000;
/// Written by a destination application after the move, behind what was queued.
pub const FINAL: u64 = 500;

/// A connection from the client host to a server socket on the source, and how many bytes each
/// side wrote so far (the stream's offsets, [`fill`]).
pub struct Pair {
    pub client: TcpStream,
    pub server: TcpStream,
    pub to_client: u64,
    pub to_server: u64,
}

impl Pair {
    pub fn client_addr(&self) -> Result<SocketAddr> {
        Ok(self.client.local_addr()?)
    }

    /// SMALL bytes written each way, left unread.
    pub fn queue_both_ways(&mut self) -> Result<()> {
        let client = self.client_addr()?;
        let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
        self.to_client = write_stream(&self.server, client, s2c, 0, Some(SMALL))?;
        self.to_server = write_stream(&self.client, client, c2s, 0, Some(SMALL))?;
        Ok(())
    }

    /// Every queued byte arrives both ways, then FINAL more each way.
    pub fn carries_on(&mut self) -> Result<()> {
        let client = self.client_addr()?;
        let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
        read_stream(&self.server, client, c2s, (0, self.to_server), false)?;
        read_stream(&self.client, client, s2c, (0, self.to_client), false)?;
        let end = write_stream(&self.server, client, s2c, self.to_client, Some(FINAL))?;
        read_stream(&self.client, client, s2c, (self.to_client, end), false)?;
        let end = write_stream(&self.client, client, c2s, self.to_server, Some(FINAL))?;
        read_stream(&self.server, client, c2s, (self.to_server, end), false)?;
        Ok(())
    }
}

/// A pair's client half with its stream offsets, kept by the test while the server socket moves.
pub type ClientHalf = (TcpStream, u64, u64);

/// Servers' fds for the application, the pairs' other halves kept by the test.
pub fn split(pairs: Vec<Pair>) -> (Vec<OwnedFd>, Vec<ClientHalf>) {
    pairs
        .into_iter()
        .map(|p| {
            (
                OwnedFd::from(p.server),
                (p.client, p.to_client, p.to_server),
            )
        })
        .unzip()
}

/// The moved `servers` each joined to the client whose peer it is, in the clients' order; one
/// server per client, no more.
pub fn join(clients: Vec<ClientHalf>, servers: Vec<TcpStream>) -> Result<Vec<Pair>> {
    ensure!(
        servers.len() == clients.len(),
        "{} servers for {} clients",
        servers.len(),
        clients.len()
    );
    let mut servers = servers
        .into_iter()
        .map(|server| Ok((server.peer_addr()?, server)))
        .collect::<Result<Vec<_>>>()?;
    clients
        .into_iter()
        .map(|(client, to_client, to_server)| {
            let at = client.local_addr()?;
            let k = servers.iter().position(|(peer, _)| *peer == at);
            let (_, server) =
                servers.swap_remove(k.with_context(|| format!("no server for {at}"))?);
            Ok(Pair {
                client,
                server,
                to_client,
                to_server,
            })
        })
        .collect()
}

/// A connection from `host` to `to` begun (its SYN sent) and not waited for, from `local` when
/// given (SO_REUSEADDR on).
pub fn connect_begun(
    host: &Namespace,
    local: Option<SocketAddr>,
    to: SocketAddr,
) -> Result<socket2::Socket> {
    host.run(|| -> Result<socket2::Socket> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )?;
        if let Some(local) = local {
            socket.set_reuse_address(true)?;
            socket.bind(&local.into())?;
        }
        socket.set_nonblocking(true)?;
        match socket.connect(&to.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
            other => anyhow::bail!("connect to {to}: {other:?}"),
        }
    })?
}

/// `n` connections to `service`, served on the source.
pub fn connect(bed: &TestBed, service: SocketAddr, n: usize) -> Result<Vec<Pair>> {
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    accept_pairs(bed, &listener, n)
}

/// `n` connections from the client host to `listener`'s service, accepted.
pub fn accept_pairs(bed: &TestBed, listener: &TcpListener, n: usize) -> Result<Vec<Pair>> {
    let service = listener.local_addr()?;
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
pub fn write_stream(
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
pub fn read_stream(
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
pub fn resets(bed: &TestBed) -> Result<u64> {
    let mut total = 0;
    for host in [bed.client(), bed.source(), bed.destination()] {
        total += host.tcp_counter("OutRsts")?;
    }
    for host in [bed.client(), bed.destination()] {
        total += host.tcp_counter("EstabResets")?;
    }
    Ok(total)
}

/// How a half-closed case closes its connection before the move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
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
    /// The server filled its send queue (the client does not read) and shut down, then the
    /// client wrote and shut down: the server took the client's FIN in FIN_WAIT1, its own FIN
    /// queued behind bytes the closed window holds back, never acknowledged.
    Closing,
}

impl Half {
    /// Writes on `pair` both ways and closes it as the case says, with bytes in both queues
    /// (a full send queue on the server where it closes with the client not reading); returns
    /// how far the client has read (to the end of the stream in FIN_WAIT2).
    pub fn close(self, pair: &mut Pair) -> Result<u64> {
        let client = pair.client_addr()?;
        let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
        let server_fills = matches!(self, Half::LastAck | Half::FinWait1 | Half::Closing);
        pair.to_server = write_stream(&pair.client, client, c2s, 0, Some(5 * SMALL))?;
        let limit = (!server_fills).then_some(5 * SMALL);
        pair.to_client = write_stream(&pair.server, client, s2c, 0, limit)?;
        // The first FIN sent decides the state: the client's first makes CLOSE_WAIT then
        // LAST_ACK, ours first (held back by the full queue) makes FIN_WAIT1 then CLOSING.
        let client_first = matches!(self, Half::CloseWait | Half::LastAck);
        if client_first {
            pair.client.shutdown(Shutdown::Write)?;
            wait_for_state(&pair.server, TcpState::CloseWait)?;
        }
        if self != Half::CloseWait {
            pair.server.shutdown(Shutdown::Write)?;
        }
        if self == Half::Closing {
            pair.client.shutdown(Shutdown::Write)?;
        }
        let read = if self == Half::FinWait2 {
            read_stream(&pair.client, client, s2c, (0, pair.to_client), true)?;
            pair.to_client
        } else {
            0
        };
        wait_for_state(&pair.server, self.state())?;
        Ok(read)
    }

    fn client_closes(self) -> bool {
        matches!(self, Half::CloseWait | Half::LastAck | Half::Closing)
    }

    /// The server's state in this case.
    pub fn state(self) -> TcpState {
        match self {
            Half::CloseWait => TcpState::CloseWait,
            Half::LastAck => TcpState::LastAck,
            Half::FinWait1 => TcpState::FinWait1,
            Half::FinWait2 => TcpState::FinWait2,
            Half::Closing => TcpState::Closing,
        }
    }

    /// After the move, with `server` the destination's socket: the client writes more and
    /// closes where it was open, the server reads everything and the end of the stream, writes
    /// a final message and closes where it was open; the client reads everything from
    /// `client_read`, then the end of the stream.
    pub fn finish(self, pair: &mut Pair, server: &TcpStream, client_read: u64) -> Result<()> {
        let client = pair.client_addr()?;
        let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
        if !self.client_closes() {
            pair.to_server =
                write_stream(&pair.client, client, c2s, pair.to_server, Some(3 * SMALL))?;
            pair.client.shutdown(Shutdown::Write)?;
        }
        read_stream(server, client, c2s, (0, pair.to_server), true)?;
        let mut end = pair.to_client;
        if self == Half::CloseWait {
            end = write_stream(server, client, s2c, pair.to_client, Some(FINAL))?;
            server.shutdown(Shutdown::Write)?;
        }
        read_stream(&pair.client, client, s2c, (client_read, end), true)?;
        Ok(())
    }
}

/// A socket's TCP state, as TCP_INFO tells it.
pub fn state_of(socket: &TcpStream) -> Result<TcpState> {
    Ok(TcpState::from_kernel(tcp_info(socket.as_fd())?.tcpi_state))
}

/// Waits (bounded) until `socket` is in `state`: the FINs and acknowledgements settled.
pub fn wait_for_state(socket: &TcpStream, state: TcpState) -> Result<()> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let now = state_of(socket)?;
        if now == state {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "in {now}, not {state}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The half-closed cases [`every_state`] builds after its two open connections.
pub const HALVES: [Half; 5] = [
    Half::CloseWait,
    Half::LastAck,
    Half::FinWait1,
    Half::FinWait2,
    Half::Closing,
];

/// The fewest connections [`every_state`] makes: one per state.
pub const EVERY_STATE: usize = 2 + HALVES.len();

/// `total` connections to `service` (served on the source, at least [`EVERY_STATE`]), every
/// state that moves among them: both queues full first, then ESTABLISHED ones with SMALL bytes
/// queued each way, then one per [`HALVES`]. Returns the pairs, and how far each half-closed
/// client has read.
pub fn every_state(
    bed: &TestBed,
    service: SocketAddr,
    total: usize,
) -> Result<(Vec<Pair>, Vec<u64>)> {
    ensure!(
        total >= EVERY_STATE,
        "{total} connections cannot hold every state"
    );
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let mut pairs = accept_pairs(bed, &listener, total)?;
    drop(listener);
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    let open = total - HALVES.len();
    for (k, pair) in pairs.iter_mut().take(open).enumerate() {
        let client = pair.client_addr()?;
        let limit = (k > 0).then_some(SMALL);
        pair.to_client = write_stream(&pair.server, client, s2c, 0, limit)?;
        pair.to_server = write_stream(&pair.client, client, c2s, 0, limit)?;
    }
    let full = &pairs[0];
    ensure!(
        full.to_client > 64 << 10 && full.to_server > 64 << 10,
        "queues not full: {} bytes to the client, {} to the server",
        full.to_client,
        full.to_server
    );
    let mut client_read = Vec::new();
    for (half, pair) in HALVES.iter().zip(&mut pairs[open..]) {
        client_read.push(half.close(pair)?);
    }
    Ok((pairs, client_read))
}

/// After the move of [`every_state`]'s connections (`pairs` now with the moved servers): every
/// queued byte arrives both ways, the open ones carry FINAL bytes and our FIN to the client,
/// the half-closed ones end as [`Half::finish`] says.
pub fn check_every_state(pairs: &mut [Pair], client_read: Vec<u64>) -> Result<()> {
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    let open = pairs.len() - HALVES.len();
    for (k, pair) in pairs.iter_mut().take(open).enumerate() {
        let client = pair.client_addr()?;
        read_stream(&pair.server, client, c2s, (0, pair.to_server), false)
            .with_context(|| format!("connection {k}"))?;
        read_stream(&pair.client, client, s2c, (0, pair.to_client), false)
            .with_context(|| format!("connection {k}"))?;
        let end = write_stream(&pair.server, client, s2c, pair.to_client, Some(FINAL))?;
        pair.server.shutdown(Shutdown::Write)?;
        read_stream(&pair.client, client, s2c, (pair.to_client, end), true)
            .with_context(|| format!("connection {k}"))?;
    }
    for ((half, pair), read) in HALVES.iter().zip(&mut pairs[open..]).zip(client_read) {
        let server = pair.server.try_clone()?;
        half.finish(pair, &server, read)
            .with_context(|| format!("{half:?}"))?;
    }
    Ok(())
}
