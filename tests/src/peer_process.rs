//! The body of `tcpmig-peer` (one side of the bed's verifiable TCP traffic), a library function so
//! that other binaries (`tcpmig demo`) can act as a peer too. The command line, the streams and
//! the stdin/stdout protocol are documented in [`crate::peer`].

use std::fs::File;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};
use std::{env, fmt};

use crate::pattern::{self, Direction};
use crate::peer::{PeerArgs, PeerCommand, Report, ScriptReport, StreamArgs};
use crate::sys;
use anyhow::{Context, Result, ensure};
use socket2::{Domain, Socket, Type};

/// How long a peer waits for its next command before deciding its test is gone.
const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// Accept backlog; the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: libc::c_int = 65_535;
/// Bytes produced or checked per read or write.
const CHUNK: usize = 16 * 1024;
/// How far a `--mirror` server's answers may lag what it read before it stops reading.
const MIRROR_BACKLOG: u64 = 1 << 20;
/// Socket activation hands over fds from this number on.
const LISTEN_FDS_START: RawFd = 3;

/// Runs a peer with these arguments until `exit` or the end of stdin (or its script's end).
pub fn run(args: PeerArgs) -> Result<()> {
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let stream = *args.stream();
    let deadline = Instant::now() + stream.timeout();
    let mut script = &[][..];
    // A listening server keeps its listener, as a real one would, but accepts no more.
    let (side, sockets, _listener) = match &args {
        PeerArgs::Server(server) => match server.listen {
            Some(addr) => {
                let listener = listen(addr, server.reuseport)?;
                say("listening")?;
                let sockets = accept(&listener, addr, server.expect, deadline)?;
                if server.mirror {
                    say("ready")?;
                    return mirror(Streams::new(Side::Server, sockets, stream)?);
                }
                (Side::Server, sockets, Some(listener))
            }
            None => {
                script = &server.script;
                (Side::Server, adopt()?, None)
            }
        },
        PeerArgs::Client(client) => (
            Side::Client,
            connect(client.connect, client.count, deadline)?,
            None,
        ),
    };
    let mut streams = Streams::new(side, sockets, stream)?;
    streams.send(stream.bytes.saturating_sub(stream.sent_already), deadline);
    if !script.is_empty() {
        return run_script(&mut streams, script);
    }
    say("ready")?;
    serve_commands(&mut streams)
}

/// Writes `line` in one write(), so that processes sharing the pipe never interleave lines.
fn say(line: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(format!("{line}\n").as_bytes())?;
    stdout.flush().context("writing to stdout")
}

/// Answers commands until `exit` or the end of stdin.
fn serve_commands(streams: &mut Streams) -> Result<()> {
    // Our own buffer on a clone of fd 0, not std's Stdin, whose buffer a poll of the fd cannot see.
    let mut stdin = BufReader::new(File::from(io::stdin().as_fd().try_clone_to_owned()?));
    loop {
        let waiting = !stdin.buffer().is_empty()
            || sys::poll_until(
                stdin.get_ref().as_fd(),
                libc::POLLIN,
                Instant::now() + IDLE_LIMIT,
            )?;
        ensure!(waiting, "no command for {IDLE_LIMIT:?}");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || !streams.execute(line.trim_end().parse()?) {
            return Ok(());
        }
        say(&serde_json::to_string(&streams.report())?)?;
    }
}

/// `--script`: runs the commands, then prints the [`ScriptReport`], tagged with this process's
/// place among `tcpmig agent`'s children.
fn run_script(streams: &mut Streams, script: &[PeerCommand]) -> Result<()> {
    let shard_var = |name| {
        env::var(name)
            .ok()
            .map(|value| value.parse().with_context(|| format!("{name}={value:?}")))
            .transpose()
    };
    let (shard, shards) = (shard_var("TCPMIG_SHARD")?, shard_var("TCPMIG_SHARDS")?);
    for &command in script {
        if !streams.execute(command) {
            break;
        }
    }
    let report = ScriptReport {
        pid: std::process::id(),
        shard,
        shards,
        report: streams.report(),
    };
    say(&serde_json::to_string(&report)?)
}

/// `--mirror` (see `tcpmig_testbed::peer`): answers every byte read with the byte at the same
/// offset of the outgoing stream, at most [`MIRROR_BACKLOG`] bytes behind, until idle.
fn mirror(mut streams: Streams) -> Result<()> {
    let mut last_input = Instant::now();
    while last_input.elapsed() < IDLE_LIMIT {
        let mut polls: Vec<libc::pollfd> = streams
            .conns
            .iter()
            .map(|conn| {
                let owed = conn.read_at - conn.write_at;
                let mut events = 0;
                if conn.failure.is_none() {
                    if owed < MIRROR_BACKLOG {
                        events |= libc::POLLIN;
                    }
                    if owed > 0 {
                        events |= libc::POLLOUT;
                    }
                }
                libc::pollfd {
                    fd: conn.socket.as_raw_fd(),
                    events,
                    revents: 0,
                }
            })
            .collect();
        // SAFETY: a valid array of pollfds of the length passed.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 1000) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            ensure!(error.kind() == ErrorKind::Interrupted, "poll: {error}");
            continue;
        }
        for (conn, poll) in streams.conns.iter_mut().zip(&polls) {
            if poll.revents == 0 || conn.failure.is_some() {
                continue;
            }
            let result = mirror_once(conn, &mut streams.buf, &mut streams.expected);
            match result {
                Ok(true) => last_input = Instant::now(),
                Ok(false) => {}
                Err(failure) => {
                    // Tell the client at once: it reports the early end of its stream.
                    let _ = conn.socket.shutdown(std::net::Shutdown::Both);
                    conn.failure = Some(failure);
                }
            }
        }
    }
    Ok(())
}

/// One non-blocking read (checked) and write on `conn`; whether bytes came in.
fn mirror_once(conn: &mut Conn, buf: &mut [u8], expected: &mut [u8]) -> Result<bool, Failure> {
    let owed = conn.read_at - conn.write_at;
    let mut came = false;
    if owed < MIRROR_BACKLOG {
        match (&conn.socket).read(buf) {
            Ok(0) => return Err(Failure::Eof),
            Ok(got) => {
                take_checked(conn, Direction::ClientToServer, &buf[..got], expected)?;
                came = true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let owed = chunk(conn.read_at - conn.write_at, buf);
    if owed > 0 {
        pattern::fill(
            conn.client,
            Direction::ServerToClient,
            conn.write_at,
            &mut buf[..owed],
        );
        match (&conn.socket).write(&buf[..owed]) {
            Ok(written) => conn.write_at += written as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(came)
}

/// Listens on `addr`; with `reuseport`, as that listener of the port's SO_REUSEPORT group, and
/// steering the group's new connections to itself.
fn listen(addr: SocketAddr, reuseport: Option<usize>) -> Result<TcpListener> {
    let listener = match reuseport {
        None => TcpListener::bind(addr),
        Some(_) => bind_reuseport(addr),
    }
    .with_context(|| format!("binding {addr}"))?;
    sys::set_backlog(&listener, LISTEN_BACKLOG).with_context(|| format!("listen on {addr}"))?;
    if let Some(index) = reuseport {
        // Only once listening: a program attached before joins no group (the socket's own,
        // dropped when it joins the port's).
        steer_to(&listener, index)
            .with_context(|| format!("steering {addr} to listener {index}"))?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A socket bound to `addr` with SO_REUSEADDR (as std binds) and SO_REUSEPORT; listen() makes it
/// a listener.
fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Attaches to the listener's SO_REUSEPORT group a classic BPF program that picks listener
/// `index` (in the order they joined) for every new connection.
fn steer_to(listener: &TcpListener, index: usize) -> io::Result<()> {
    let index = u32::try_from(index).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    set_socket_option(listener, libc::SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// setsockopt(SOL_SOCKET, `option`) with `value` (the kernel copies it).
fn set_socket_option<T>(socket: &impl AsRawFd, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is valid for the size passed.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn accept(
    listener: &TcpListener,
    addr: SocketAddr,
    count: usize,
    deadline: Instant,
) -> Result<Vec<TcpStream>> {
    let mut sockets = Vec::with_capacity(count);
    while sockets.len() < count {
        match listener.accept() {
            Ok((socket, _)) => sockets.push(socket),
            // A connection reset before it was accepted is the client's to report.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) =>
            {
                let more = sys::poll_until(listener.as_fd(), libc::POLLIN, deadline)?;
                ensure!(
                    more,
                    "accepted {} of {count} connections on {addr} before the deadline",
                    sockets.len()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("accepting on {addr}")),
        }
    }
    Ok(sockets)
}

/// Takes the connected sockets handed over by socket activation (LISTEN_PID, LISTEN_FDS).
fn adopt() -> Result<Vec<TcpStream>> {
    let var =
        |name| env::var(name).with_context(|| format!("{name} is not set (--from-listen-fds)"));
    let pid: u32 = var("LISTEN_PID")?.parse().context("LISTEN_PID")?;
    ensure!(
        pid == std::process::id(),
        "LISTEN_PID is {pid}, not this process ({})",
        std::process::id()
    );
    let count: RawFd = var("LISTEN_FDS")?.parse().context("LISTEN_FDS")?;
    (LISTEN_FDS_START..LISTEN_FDS_START + count)
        .map(|fd| {
            let socket = TcpStream::from(
                sys::claim_inherited_fd(fd).with_context(|| format!("LISTEN_FDS fd {fd}"))?,
            );
            socket
                .peer_addr()
                .with_context(|| format!("LISTEN_FDS fd {fd} is not a connected TCP socket"))?;
            Ok(socket)
        })
        .collect()
}

fn connect(addr: SocketAddr, count: usize, deadline: Instant) -> Result<Vec<TcpStream>> {
    (0..count)
        .map(|i| {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "opened {i} of {count} connections to {addr} before the deadline"
            );
            TcpStream::connect_timeout(&addr, left)
                .with_context(|| format!("connection {i} of {count} to {addr}"))
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Side {
    Server,
    Client,
}

impl Side {
    fn outgoing(self) -> Direction {
        match self {
            Side::Server => Direction::ServerToClient,
            Side::Client => Direction::ClientToServer,
        }
    }

    fn incoming(self) -> Direction {
        match self {
            Side::Server => Direction::ClientToServer,
            Side::Client => Direction::ServerToClient,
        }
    }
}

/// Why a connection stopped being verified; it keeps that state.
enum Failure {
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

struct Conn {
    socket: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    /// The client's address keys the pattern of both directions.
    client: SocketAddr,
    read_at: u64,
    write_at: u64,
    failure: Option<Failure>,
}

/// This process's connections and what it has seen on them.
struct Streams {
    side: Side,
    conns: Vec<Conn>,
    /// Where `verify` reads up to unless told otherwise.
    bytes: u64,
    timeout: Duration,
    bytes_in: u64,
    bytes_out: u64,
    first_failure: Option<String>,
    buf: Vec<u8>,
    expected: Vec<u8>,
}

impl Streams {
    fn new(side: Side, sockets: Vec<TcpStream>, stream: StreamArgs) -> Result<Self> {
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
    fn execute(&mut self, command: PeerCommand) -> bool {
        let deadline = Instant::now() + self.timeout;
        match command {
            PeerCommand::Verify { until } => self.receive(until.unwrap_or(self.bytes), deadline),
            PeerCommand::Send { bytes } => self.send(bytes, deadline),
            PeerCommand::Exit => return false,
        }
        true
    }

    /// Writes the next `bytes` bytes of every outgoing stream still verified.
    fn send(&mut self, bytes: u64, deadline: Instant) {
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
    fn receive(&mut self, end: u64, deadline: Instant) {
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

    fn report(&self) -> Report {
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
fn record(first: &mut Option<String>, conn: &mut Conn, doing: &str, offset: u64, failure: Failure) {
    first.get_or_insert_with(|| {
        format!(
            "{} -> {}: {doing} at offset {offset}: {failure}",
            conn.local, conn.peer
        )
    });
    conn.failure = Some(failure);
}

fn write_until(
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

fn read_until(
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
fn take_checked(
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

fn chunk(left: u64, buf: &[u8]) -> usize {
    usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()))
}

/// Runs a non-blocking socket operation, waiting for readiness until `deadline`.
fn retry(
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
