//! A peer's connections and the two streams on each: writing them, reading and checking them,
//! and what went wrong with each connection.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::pattern::{self, Direction};
use crate::peer::{PeerCommand, Report, StreamArgs};
use crate::sys;
use std::os::fd::AsFd;

/// Bytes produced or checked per read or write.
const CHUNK: usize = 16 * 1024;

#[derive(Clone, Copy)]
pub(super) enum Side {
    Server,
    Client,
}

impl Side {
    pub(super) fn outgoing(self) -> Direction {
        match self {
            Side::Server => Direction::ServerToClient,
            Side::Client => Direction::ClientToServer,
        }
    }

    pub(super) fn incoming(self) -> Direction {
        match self {
            Side::Server => Direction::ClientToServer,
            Side::Client => Direction::ServerToClient,
        }
    }
}

/// Why a connection stopped being verified; it keeps that state.
pub(super) enum Failure {
    Mismatch { offset: u64 },
    Eof,
    Reset(io::Error),
    TimedOut,
    Other(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Failure::Reset(e),
            ErrorKind::TimedOut => Failure::TimedOut,
            _ => Failure::Other(e),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Mismatch { offset } => write!(f, "wrong byte at offset {offset}"),
            Failure::Eof => write!(f, "end of stream"),
            Failure::Reset(e) | Failure::Other(e) => write!(f, "{e}"),
            Failure::TimedOut => write!(f, "timed out"),
        }
    }
}

pub(super) struct Conn {
    pub(super) socket: TcpStream,
    pub(super) local: SocketAddr,
    pub(super) peer: SocketAddr,
    /// The client's address keys the pattern of both directions.
    pub(super) client: SocketAddr,
    pub(super) read_at: u64,
    pub(super) write_at: u64,
    pub(super) failure: Option<Failure>,
}

/// This process's connections and what it has seen on them.
pub(super) struct Streams {
    pub(super) side: Side,
    pub(super) conns: Vec<Conn>,
    /// Where `verify` reads up to unless told otherwise.
    pub(super) bytes: u64,
    pub(super) timeout: Duration,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) first_failure: Option<String>,
    pub(super) buf: Vec<u8>,
    pub(super) expected: Vec<u8>,
}

impl Streams {
    pub(super) fn new(side: Side, sockets: Vec<TcpStream>, stream: StreamArgs) -> Result<Self> {
        let conns = sockets
            .into_iter()
            .map(|socket| {
                let (local, peer) = (socket.local_addr()?, socket.peer_addr()?);
                socket.set_nonblocking(true)?;
                Ok(Conn {
                    socket,
                    local,
                    peer,
                    client: match side {
                        Side::Server => peer,
                        Side::Client => local,
                    },
                    read_at: stream.received_already,
                    write_at: stream.sent_already,
                    failure: None,
                })
            })
            .collect::<io::Result<_>>()
            .context("setting up a connection")?;
        Ok(Self {
            side,
            conns,
            bytes: stream.bytes,
            timeout: stream.timeout(),
            bytes_in: 0,
            bytes_out: 0,
            first_failure: None,
            buf: vec![0; CHUNK],
            expected: vec![0; CHUNK],
        })
    }

    /// Runs one command (bounded by `--timeout-secs`); false for `exit`.
    pub(super) fn execute(&mut self, command: PeerCommand) -> bool {
        let deadline = Instant::now() + self.timeout;
        match command {
            PeerCommand::Verify { until } => self.receive(until.unwrap_or(self.bytes), deadline),
            PeerCommand::Send { bytes } => self.send(bytes, deadline),
            PeerCommand::Exit => return false,
        }
        true
    }

    /// Writes the next `bytes` bytes of every outgoing stream still verified.
    pub(super) fn send(&mut self, bytes: u64, deadline: Instant) {
        let direction = self.side.outgoing();
        for conn in self.conns.iter_mut().filter(|c| c.failure.is_none()) {
            let (start, end) = (conn.write_at, conn.write_at + bytes);
            let result = write_until(conn, direction, end, deadline, &mut self.buf);
            self.bytes_out += conn.write_at - start;
            if let Err(failure) = result {
                record(
                    &mut self.first_failure,
                    conn,
                    "writing",
                    conn.write_at,
                    failure,
                );
            }
        }
    }

    /// Reads and checks every incoming stream still verified up to offset `end`.
    pub(super) fn receive(&mut self, end: u64, deadline: Instant) {
        let direction = self.side.incoming();
        for conn in self.conns.iter_mut().filter(|c| c.failure.is_none()) {
            let start = conn.read_at;
            let result = read_until(
                conn,
                direction,
                end,
                deadline,
                &mut self.buf,
                &mut self.expected,
            );
            self.bytes_in += conn.read_at - start;
            if let Err(failure) = result {
                record(
                    &mut self.first_failure,
                    conn,
                    "reading",
                    conn.read_at,
                    failure,
                );
            }
        }
    }

    pub(super) fn report(&self) -> Report {
        let mut report = Report {
            connections: self.conns.len() as u64,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            first_failure: self.first_failure.clone(),
            ..Report::default()
        };
        for conn in &self.conns {
            *match conn.failure {
                None => &mut report.verified,
                Some(Failure::Mismatch { .. } | Failure::Eof) => &mut report.mismatched,
                Some(Failure::Reset(_)) => &mut report.resets,
                Some(Failure::TimedOut) => &mut report.timeouts,
                Some(Failure::Other(_)) => &mut report.errors,
            } += 1;
        }
        report
    }
}

/// Marks `conn` failed, and describes the first failure of the process.
pub(super) fn record(
    first: &mut Option<String>,
    conn: &mut Conn,
    doing: &str,
    offset: u64,
    failure: Failure,
) {
    first.get_or_insert_with(|| {
        format!(
            "{} -> {}: {doing} at offset {offset}: {failure}",
            conn.local, conn.peer
        )
    });
    conn.failure = Some(failure);
}

pub(super) fn write_until(
    conn: &mut Conn,
    direction: Direction,
    end: u64,
    deadline: Instant,
    buf: &mut [u8],
) -> Result<(), Failure> {
    while conn.write_at < end {
        let len = chunk(end - conn.write_at, buf);
        pattern::fill(conn.client, direction, conn.write_at, &mut buf[..len]);
        let written = retry(&conn.socket, libc::POLLOUT, deadline, |mut socket| {
            socket.write(&buf[..len])
        })?;
        conn.write_at += written as u64;
    }
    Ok(())
}

pub(super) fn read_until(
    conn: &mut Conn,
    direction: Direction,
    end: u64,
    deadline: Instant,
    buf: &mut [u8],
    expected: &mut [u8],
) -> Result<(), Failure> {
    while conn.read_at < end {
        let len = chunk(end - conn.read_at, buf);
        let got = retry(&conn.socket, libc::POLLIN, deadline, |mut socket| {
            socket.read(&mut buf[..len])
        })?;
        if got == 0 {
            return Err(Failure::Eof);
        }
        take_checked(conn, direction, &buf[..got], expected)?;
    }
    Ok(())
}

/// Checks bytes just read against the stream's pattern (`expected` is scratch room) and counts
/// them as read.
pub(super) fn take_checked(
    conn: &mut Conn,
    direction: Direction,
    received: &[u8],
    expected: &mut [u8],
) -> Result<(), Failure> {
    let expected = &mut expected[..received.len()];
    pattern::fill(conn.client, direction, conn.read_at, expected);
    if let Some(i) = received
        .iter()
        .zip(expected.iter())
        .position(|(b, e)| b != e)
    {
        return Err(Failure::Mismatch {
            offset: conn.read_at + i as u64,
        });
    }
    conn.read_at += received.len() as u64;
    Ok(())
}

pub(super) fn chunk(left: u64, buf: &[u8]) -> usize {
    usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()))
}

/// Runs a non-blocking socket operation, waiting for readiness until `deadline`.
pub(super) fn retry(
    socket: &TcpStream,
    events: libc::c_short,
    deadline: Instant,
    mut op: impl FnMut(&TcpStream) -> io::Result<usize>,
) -> Result<usize, Failure> {
    loop {
        match op(socket) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if !sys::poll_until(socket.as_fd(), events, deadline)? {
                    return Err(Failure::TimedOut);
                }
            }
            result => return Ok(result?),
        }
    }
}
