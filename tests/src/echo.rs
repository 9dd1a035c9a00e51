//! The server of the open-loop load ([`crate::load`]), which the scaling benchmark migrates:
//! `tcpmig-peer echo-server`, which echoes every byte it receives, and [`EchoServers`], a handle
//! on a set of them.
//!
//! `--listen ADDR:PORT` accepts connections, sharing the port with the other servers listening
//! there (SO_REUSEPORT); `--from-listen-fds` takes over the sockets passed as fds 3.. the way
//! systemd's socket activation passes them (LISTEN_FDS, LISTEN_PID): that is how `tcpmig` hands
//! restored connections to the new server, and with them the listener the destination held for
//! the service since the address moved, whose accept queue holds the connections opened during
//! the migration. Each inherited fd is a listener (SO_ACCEPTCONN) to accept on, or a connection
//! to echo on. Either way it prints `ready` once it listens or holds its sockets, and exits
//! when it has neither a listener nor a connection left, or after `--idle-exit-secs` without
//! any event. `--handoff-socket PATH` (beside either) also takes sockets handed over on a Unix
//! socket while it serves (see `handoff.rs`), and then it runs until idle.
//!
//! The echo is synchronous, so that a migration loses nothing: a chunk read is written back whole
//! before anything more is read. If the send buffer is full, the rest of the chunk waits in the
//! process and the server waits for room on that socket only; bytes sit in the process (where a
//! dump of the sockets cannot see them) only between one read and its write, or while a client
//! does not read its echoes. So it is migrated with `--stop-signal USR1`: on SIGUSR1 it
//! stops itself (SIGSTOP) once it holds nothing, between two events.

use std::io::{self, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::line_process::LineProcess;
use crate::{Host, load, sys};

mod handoff;
pub use handoff::HandoffEcho;

/// A server binds and says `ready` in milliseconds; this bounds a broken start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The hand-over socket's token; listener `k` has token `LAST_LISTENER - k`; connections have
/// their slot's index.
const HANDOFF_TOKEN: Token = Token(usize::MAX);
const LAST_LISTENER: usize = usize::MAX - 1;
/// Thousands of clients connect at once; std's 128 would drop their SYNs (net.core.somaxconn,
/// 4096 in a new namespace, caps it).
const BACKLOG: i32 = 4096;
/// The first fd of socket activation.
const LISTEN_FDS_START: RawFd = 3;

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// Listen here and echo on every connection accepted.
    #[arg(
        long,
        required_unless_present = "from_listen_fds",
        conflicts_with = "from_listen_fds"
    )]
    pub listen: Option<SocketAddr>,
    /// Echo on the sockets passed as fds 3.. (LISTEN_FDS, LISTEN_PID), and accept on those of
    /// them that listen.
    #[arg(long)]
    pub from_listen_fds: bool,
    /// Also take the sockets handed over on a Unix socket bound here, in tcpmig's hand-over
    /// protocol (`tcpmig agent --handoff PATH`): a rebalance's destination that already serves.
    #[arg(long)]
    pub handoff_socket: Option<PathBuf>,
    /// Exit after this long without any event.
    #[arg(long, default_value_t = 600)]
    pub idle_exit_secs: u64,
}

/// Set by SIGTERM: how a migration ends the old server (`--stop-source`, after SIGSTOP).
static TERMINATED: AtomicBool = AtomicBool::new(false);
/// Set by SIGUSR1 (`tcpmig migrate --stop-signal USR1`): stop once nothing read is unanswered.
static STOP_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::Relaxed);
}

extern "C" fn on_sigusr1(_: libc::c_int) {
    STOP_ASKED.store(true, Ordering::Relaxed);
}

/// The `echo-server` mode of `tcpmig-peer`.
pub fn serve(args: &EchoArgs) -> anyhow::Result<()> {
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    // Caught rather than fatal, so that a server stopped between a read and its echo says so
    // when it is ended: those bytes were in its memory, where no dump of the sockets sees them.
    for (signal, handler, name) in [
        (
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int),
            "SIGTERM",
        ),
        (libc::SIGUSR1, on_sigusr1, "SIGUSR1"),
    ] {
        // SAFETY: the handlers only store to an atomic.
        if unsafe { libc::signal(signal, handler as *const () as libc::sighandler_t) }
            == libc::SIG_ERR
        {
            return Err(io::Error::last_os_error()).with_context(|| format!("handling {name}"));
        }
    }
    let mut server = match args.listen {
        Some(addr) => Server::listen(addr)?,
        None => Server::adopt(inherited_sockets()?)?,
    };
    if let Some(path) = &args.handoff_socket {
        server.listen_for_handoffs(path)?;
    }
    println!("ready");
    server.run(Duration::from_secs(args.idle_exit_secs))
}

/// Echo servers in one host for `connections` connections, all on one address and port
/// (SO_REUSEPORT): the kernel spreads the connections over them by a hash of the 4-tuple, so each
/// gets about `connections / servers`, and with [`load::processes_for`] servers (at most
/// 15,000 each on average) none comes near the file limit of 20,000. Dropping it kills them.
pub struct EchoServers<'bed> {
    /// Dropping them kills the servers (by pid).
    processes: Vec<LineProcess<'bed>>,
    addr: SocketAddr,
}

impl<'bed> EchoServers<'bed> {
    /// Starts the servers (`tcpmig-peer` at `peer_bin`) on `ip:port` (`ip` must be on one of
    /// `host`'s interfaces) and returns once all of them listen.
    pub fn listen(
        host: &'bed Host,
        peer_bin: &Path,
        ip: IpAddr,
        port: u16,
        connections: usize,
    ) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(ip, port);
        let args = [
            "echo-server".to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
        ];
        let mut processes = (0..load::processes_for(connections))
            .map(|_| LineProcess::start(host, peer_bin, &args))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for process in &mut processes {
            process.expect("ready", READY_TIMEOUT)?;
        }
        Ok(Self { processes, addr })
    }

    /// The servers' pids (what `tcpmig migrate --pid` takes, once per pid).
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(LineProcess::pid).collect()
    }

    /// The service address they all listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The sockets of socket activation, after checking that they are meant for this process.
fn inherited_sockets() -> anyhow::Result<Vec<Socket>> {
    let count = listen_fd_count(
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::process::id(),
    )?;
    (0..count)
        .map(|k| {
            let fd = LISTEN_FDS_START + RawFd::try_from(k)?;
            let fd = sys::claim_inherited_fd(fd)
                .with_context(|| format!("inherited fd {fd} (LISTEN_FDS={count})"))?;
            Ok(Socket::from(fd))
        })
        .collect()
}

/// How many fds socket activation passed: LISTEN_FDS, if LISTEN_PID (when set) is our pid.
fn listen_fd_count(fds: Option<&str>, pid: Option<&str>, own_pid: u32) -> anyhow::Result<usize> {
    let fds = fds.context("--from-listen-fds without LISTEN_FDS in the environment")?;
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(own_pid)
    {
        bail!("LISTEN_PID={pid} is not this process ({own_pid}): the fds are not ours");
    }
    fds.parse()
        .with_context(|| format!("LISTEN_FDS={fds:?} is not a count"))
}

/// A nonblocking listener on `addr` that the other echo servers of the service share
/// (SO_REUSEPORT, which socket2 has behind its feature `all`).
fn shared_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

struct Conn {
    stream: TcpStream,
    /// Read and not yet written back: the send buffer was full.
    held: Vec<u8>,
}

struct Server {
    poll: Poll,
    /// Indexed by `LAST_LISTENER - token`.
    listeners: Vec<TcpListener>,
    handoff: Option<handoff::HandoffSocket>,
    /// Indexed by token; slots of closed connections are reused.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    buf: Vec<u8>,
}

impl Server {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            listeners: Vec::new(),
            handoff: None,
            conns: Vec::new(),
            free: Vec::new(),
            buf: vec![0; 64 * 1024],
        })
    }

    fn listen(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = shared_listener(addr).with_context(|| format!("listening on {addr}"))?;
        let mut server = Self::new()?;
        server.add_listener(listener)?;
        Ok(server)
    }

    /// A server that accepts on the listeners among `sockets` (SO_ACCEPTCONN) and echoes on
    /// the others.
    fn adopt(sockets: Vec<Socket>) -> anyhow::Result<Self> {
        let mut server = Self::new()?;
        for socket in sockets {
            server.take(socket)?;
        }
        Ok(server)
    }

    /// Accepts on `socket` if it listens (SO_ACCEPTCONN), echoes on it otherwise.
    fn take(&mut self, socket: Socket) -> anyhow::Result<()> {
        socket.set_nonblocking(true)?;
        if socket
            .is_listener()
            .context("SO_ACCEPTCONN (is every fd a socket?)")?
        {
            self.add_listener(socket.into())
        } else {
            self.add(TcpStream::from_std(socket.into()))
        }
    }

    fn add_listener(&mut self, listener: std::net::TcpListener) -> anyhow::Result<()> {
        let mut listener = TcpListener::from_std(listener);
        let token = Token(LAST_LISTENER - self.listeners.len());
        self.poll
            .registry()
            .register(&mut listener, token, Interest::READABLE)?;
        self.listeners.push(listener);
        Ok(())
    }

    /// The listener of `token`, if it is one.
    fn listener_of(&self, token: Token) -> Option<usize> {
        LAST_LISTENER
            .checked_sub(token.0)
            .filter(|&k| k < self.listeners.len())
    }

    fn add(&mut self, mut stream: TcpStream) -> anyhow::Result<()> {
        // Echoes must not wait for the ACK of the previous one (Nagle). A socket option is not
        // part of what a migration restores, so it is set here for adopted sockets too.
        stream
            .set_nodelay(true)
            .context("TCP_NODELAY (is every fd a TCP socket?)")?;
        let slot = self.free.pop().unwrap_or(self.conns.len());
        self.poll
            .registry()
            .register(&mut stream, Token(slot), Interest::READABLE)?;
        let conn = Some(Conn {
            stream,
            held: Vec::new(),
        });
        match self.conns.get_mut(slot) {
            Some(free) => *free = conn,
            None => self.conns.push(conn),
        }
        Ok(())
    }

    fn open(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    fn run(&mut self, idle: Duration) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_event = Instant::now();
        while !self.listeners.is_empty() || self.open() > 0 || self.handoff.is_some() {
            let left = idle.saturating_sub(last_event.elapsed());
            if left.is_zero() {
                eprintln!("echo-server: no event for {idle:?}, exiting");
                return Ok(());
            }
            if TERMINATED.load(Ordering::Relaxed) {
                return self.ended();
            }
            // Between events every chunk read has been echoed, unless the send buffer was full:
            // then it waits for that to drain.
            if STOP_ASKED.load(Ordering::Relaxed) && self.holding() == 0 {
                STOP_ASKED.store(false, Ordering::Relaxed);
                // SAFETY: raise(3) with a valid signal; SIGCONT resumes us here.
                unsafe { libc::raise(libc::SIGSTOP) };
                continue;
            }
            match self.poll.poll(&mut events, Some(left)) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                result => result?,
            }
            if !events.is_empty() {
                last_event = Instant::now();
            }
            for event in &events {
                let token = event.token();
                if token == HANDOFF_TOKEN {
                    self.receive_handoffs()?;
                } else if let Some(k) = self.listener_of(token) {
                    self.accept(k)?;
                } else if let Err(e) = self.echo(token.0) {
                    if TERMINATED.load(Ordering::Relaxed) {
                        // Its sockets moved away: what it holds is reported, not echoed.
                        return self.ended();
                    }
                    self.close(token.0, &e);
                }
                if TERMINATED.load(Ordering::Relaxed) {
                    return self.ended();
                }
            }
        }
        Ok(())
    }

    /// Bytes read and not yet echoed.
    fn holding(&self) -> usize {
        self.conns.iter().flatten().map(|c| c.held.len()).sum()
    }

    /// Ended by SIGTERM: says what it still held (read, not yet echoed), which is lost.
    fn ended(&self) -> anyhow::Result<()> {
        let bytes = self.holding();
        if bytes > 0 {
            eprintln!(
                "echo-server: ended holding {bytes} bytes read but not echoed on {} connections",
                self.conns
                    .iter()
                    .flatten()
                    .filter(|c| !c.held.is_empty())
                    .count()
            );
        }
        Ok(())
    }

    /// Accepts what listener `k` has queued.
    fn accept(&mut self, k: usize) -> anyhow::Result<()> {
        loop {
            match self.listeners[k].accept() {
                Ok((stream, _)) => self.add(stream)?,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The client gave up before we got to it; others wait behind it.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(e).context("accepting"),
            }
        }
    }

    /// Echoes what connection `i` offers until it would block, synchronously (see the module
    /// docs). Edge-triggered: it must read until it would block, or until it holds bytes and
    /// waits for room; either way the next event calls it again.
    fn echo(&mut self, i: usize) -> io::Result<()> {
        let Some(Some(conn)) = self.conns.get_mut(i) else {
            return Ok(());
        };
        let registry = self.poll.registry();
        loop {
            if !conn.held.is_empty() {
                let written = write_until_full(&mut conn.stream, &conn.held)?;
                conn.held.drain(..written);
                if !conn.held.is_empty() {
                    return Ok(());
                }
                registry.reregister(&mut conn.stream, Token(i), Interest::READABLE)?;
            }
            let n = match conn.stream.read(&mut self.buf) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let written = match write_until_full(&mut conn.stream, &self.buf[..n]) {
                Ok(written) => written,
                Err(e) => {
                    // Read but not echoed: kept so that an ended server can tell.
                    conn.held.extend_from_slice(&self.buf[..n]);
                    return Err(e);
                }
            };
            if written < n {
                conn.held.extend_from_slice(&self.buf[written..n]);
                registry.reregister(
                    &mut conn.stream,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                return Ok(());
            }
        }
    }

    /// Closes connection `i` (the client closed it, or it failed): the clients count what they
    /// lost, so the server only says why when it is not the end of the stream.
    fn close(&mut self, i: usize, error: &io::Error) {
        if let Some(Some(mut conn)) = self.conns.get_mut(i).map(Option::take) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            self.free.push(i);
            if error.kind() != ErrorKind::UnexpectedEof {
                eprintln!(
                    "echo-server: connection {:?}: {error}",
                    conn.stream.peer_addr().ok()
                );
            }
        }
    }
}

/// Writes as much of `bytes` as the send buffer takes; returns how much that was.
fn write_until_full(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::net::{Shutdown, TcpListener};
    use std::thread;

    use super::*;
    use crate::peer::PeerMode;

    #[test]
    fn needs_exactly_one_source_of_sockets() {
        let parse = |args: &[&str]| -> Result<EchoArgs, clap::Error> {
            let argv = [&["tcpmig-peer", "echo-server"], args].concat();
            match <PeerMode as clap::Parser>::try_parse_from(argv)? {
                PeerMode::EchoServer(args) => Ok(args),
                _ => panic!("not an echo-server command line"),
            }
        };
        let adopting = parse(&["--from-listen-fds", "--idle-exit-secs", "5"]).unwrap();
        assert!(adopting.from_listen_fds && adopting.listen.is_none());
        assert_eq!(adopting.idle_exit_secs, 5);
        assert!(parse(&["--listen", "198.18.0.100:9000"]).is_ok());
        assert!(parse(&["--from-listen-fds", "--handoff-socket", "/run/h.sock"]).is_ok());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--listen", "198.18.0.100:9000", "--from-listen-fds"]).is_err());
    }

    #[test]
    fn listen_fds_must_be_ours() {
        assert_eq!(listen_fd_count(Some("3"), Some("42"), 42).unwrap(), 3);
        assert_eq!(listen_fd_count(Some("2"), None, 42).unwrap(), 2);
        assert!(listen_fd_count(Some("3"), Some("41"), 42).is_err());
        assert!(listen_fd_count(None, Some("42"), 42).is_err());
        assert!(listen_fd_count(Some("x"), Some("42"), 42).is_err());
    }

    /// Two listeners on one port, and the kernel gives each a share of the connections.
    #[test]
    fn servers_share_the_service_port() {
        let first = shared_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = shared_listener(addr).unwrap();
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let accepted = |listener: &std::net::TcpListener| {
            std::iter::from_fn(|| listener.accept().ok()).count()
        };
        // A handshake can complete on the client's side before the listener queues it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut a, mut b) = (0, 0);
        while a + b < clients.len() && Instant::now() < deadline {
            a += accepted(&first);
            b += accepted(&second);
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(a + b, clients.len());
        assert!(a > 0 && b > 0, "{a} and {b} connections");
    }

    /// Among adopted sockets, a listener is accepted on and a connection echoed on: the new
    /// server after a migration serves the moved connections and the new ones alike.
    #[test]
    fn adopts_listeners_and_connections() {
        let listener = shared_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut moved = std::net::TcpStream::connect(addr).unwrap();
        // A handshake can complete on the client's side before the listener queues it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (accepted, _) = std::iter::from_fn(|| {
            (Instant::now() < deadline).then(|| {
                thread::sleep(Duration::from_millis(1));
                listener.accept().ok()
            })
        })
        .flatten()
        .next()
        .expect("the first connection accepted");
        accepted.set_nonblocking(false).unwrap();
        let mut server = Server::adopt(vec![accepted.into(), listener.into()]).unwrap();
        assert_eq!((server.listeners.len(), server.open()), (1, 1));
        let server = thread::spawn(move || server.run(Duration::from_secs(1)));
        let mut new = std::net::TcpStream::connect(addr).unwrap();
        assert_echoes(&mut moved, b"moved");
        assert_echoes(&mut new, b"new!!");
        // It still listens, so it ends only when idle.
        server.join().unwrap().unwrap();
    }

    /// `message` comes back on `client`, within 10 s.
    pub(super) fn assert_echoes(client: &mut std::net::TcpStream, message: &[u8]) {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(message).unwrap();
        let mut echo = vec![0; message.len()];
        client.read_exact(&mut echo).unwrap();
        assert_eq!(echo, message);
    }

    /// A client that does not read for a while makes the server hold a chunk and stop reading;
    /// every byte still comes back, in order, and the server ends with its last connection.
    #[test]
    fn echoes_every_byte_under_backpressure() {
        const LEN: usize = 8 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut server = Server::adopt(vec![accepted.into()]).unwrap();
        let server = thread::spawn(move || server.run(Duration::from_secs(20)));

        let pattern: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let mut writer = client.try_clone().unwrap();
        let sent = pattern.clone();
        let writer = thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        // Long enough for both directions' buffers to fill.
        thread::sleep(Duration::from_millis(300));
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut echoed = Vec::with_capacity(LEN);
        client.read_to_end(&mut echoed).unwrap();
        writer.join().unwrap();
        assert!(
            echoed == pattern,
            "{} of {LEN} bytes came back",
            echoed.len()
        );
        server.join().unwrap().unwrap();
    }
}
