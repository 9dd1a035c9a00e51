//! Sockets handed to a running echo server (`--handoff-socket PATH`) over a Unix socket, in
//! tcpmig's hand-over protocol (`tcpmig agent --handoff PATH`): how a rebalance gives a host
//! that already serves more connections to serve. And [`HandoffEcho`], a handle on such a server.
//!
//! The sender connects (SOCK_STREAM here), sends messages of at most [`MAX_FDS_PER_MESSAGE`] fds
//! (SCM_RIGHTS), each a header line `tcpmig-fds <n>` and `n` lines of names, shuts down its side
//! and waits for the receiver to close the connection: then the receiver holds the fds.
//! Hand-overs are rare, so the server reads one to its end (bounded) between two events, and
//! takes its sockets as it takes inherited ones ([`Server::take`]).

use std::io::{self, ErrorKind, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use mio::net::UnixListener;
use mio::{Interest, Registry, Token};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use socket2::Socket;

use super::{HANDOFF_TOKEN, READY_TIMEOUT, Server};
use crate::Host;
use crate::line_process::LineProcess;

/// Most fds one message carries (the kernel's SCM_MAX_FD); every recvmsg has room for them, or
/// the kernel would drop the rest.
const MAX_FDS_PER_MESSAGE: usize = 253;
/// Bound on reading one hand-over: the sender waits as long for our close.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);
const HEADER: &str = "tcpmig-fds ";

/// The server's listener for hand-overs; dropping it removes its file.
pub(super) struct HandoffSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl HandoffSocket {
    /// A nonblocking listener at `path`, in place of a stale file a killed server left there.
    fn bind(path: &Path) -> anyhow::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("listening for hand-overs at {}", path.display()))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.listener, token, Interest::READABLE)
    }

    /// The next hand-over connection waiting, if any (blocking, to be read to its end).
    fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let stream = UnixStream::from(stream);
                    stream.set_nonblocking(false)?;
                    return Ok(Some(stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for HandoffSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Server {
    /// Binds the hand-over socket at `path` and serves the hand-overs it gets.
    pub(super) fn listen_for_handoffs(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut socket = HandoffSocket::bind(path)?;
        socket.register(self.poll.registry(), HANDOFF_TOKEN)?;
        self.handoff = Some(socket);
        Ok(())
    }

    /// Takes the sockets of every hand-over waiting, then closes its connection, which tells the
    /// sender we hold them, and says `handed N`. A failed hand-over is only reported: its
    /// sockets are closed and the others served on.
    pub(super) fn receive_handoffs(&mut self) -> anyhow::Result<()> {
        loop {
            let handoff = self.handoff.as_ref().context("no hand-over socket")?;
            let Some(stream) = handoff.accept()? else {
                return Ok(());
            };
            let sockets = match receive(&stream) {
                Ok(sockets) => sockets,
                Err(e) => {
                    eprintln!("echo-server: a hand-over failed: {e:#}");
                    continue;
                }
            };
            let mut taken = 0;
            for socket in sockets {
                match self.take(socket) {
                    Ok(()) => taken += 1,
                    Err(e) => eprintln!("echo-server: a handed-over fd: {e:#}"),
                }
            }
            drop(stream);
            // Line-buffered: a waiting test sees it now.
            println!("handed {taken}");
        }
    }
}

/// Reads hand-over `stream` to its end, within [`RECEIVE_TIMEOUT`], and returns its sockets if
/// its text announced as many as came; on an error, every fd received is closed.
fn receive(stream: &UnixStream) -> anyhow::Result<Vec<Socket>> {
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    let (mut text, mut fds) = (Vec::new(), Vec::new());
    let mut buf = vec![0; 64 << 10];
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no end within {RECEIVE_TIMEOUT:?}");
        stream.set_read_timeout(Some(left))?;
        match receive_some(stream, &mut buf, &mut control, &mut fds) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                anyhow::bail!("no end within {RECEIVE_TIMEOUT:?}")
            }
            Err(e) => return Err(e).context("recvmsg"),
        }
    }
    let announced = announced_fds(&String::from_utf8(text).context("text not UTF-8")?)?;
    ensure!(
        announced == fds.len(),
        "{announced} fds announced, {} received",
        fds.len()
    );
    Ok(fds.into_iter().map(Socket::from).collect())
}

/// One recvmsg: its bytes into `buf` (how many it returns, 0 at the end), its fds onto `fds`.
fn receive_some(
    stream: &UnixStream,
    buf: &mut [u8],
    control: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    // Truncated (ENOBUFS) only if a message carried more fds than the kernel sends in one.
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel installed these fds in our table for this recvmsg; nothing
            // else knows them, so each is owned once.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(msg.bytes)
}

/// How many fds a hand-over's text announces, checking it is whole messages: a header line
/// `tcpmig-fds <n>` and `n` names each.
fn announced_fds(text: &str) -> anyhow::Result<usize> {
    ensure!(text.is_empty() || text.ends_with('\n'), "a line cut short");
    let mut lines = text.lines();
    let mut total = 0;
    while let Some(header) = lines.next() {
        let n = header
            .strip_prefix(HEADER)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n <= MAX_FDS_PER_MESSAGE)
            .with_context(|| format!("{header:?} is not a header `{HEADER}<n>`"))?;
        let names = lines.by_ref().take(n).filter(|name| !name.is_empty());
        ensure!(names.count() == n, "fewer than the {n} names announced");
        total += n;
    }
    Ok(total)
}

/// An echo server in a bed host that serves its own clients and takes more connections handed
/// over at its Unix socket: a rebalance's destination. Dropping it kills it.
pub struct HandoffEcho<'bed> {
    process: LineProcess<'bed>,
}

impl<'bed> HandoffEcho<'bed> {
    /// Starts it (`tcpmig-peer` at `peer_bin`) listening on `addr` (on one of `host`'s
    /// interfaces) with its hand-over socket at `socket`; returns once it is ready.
    pub fn start(
        host: &'bed Host,
        peer_bin: &Path,
        addr: SocketAddr,
        socket: &Path,
    ) -> anyhow::Result<Self> {
        let socket = socket
            .to_str()
            .context("a hand-over socket path not UTF-8")?;
        let args = [
            "echo-server",
            "--listen",
            &addr.to_string(),
            "--handoff-socket",
            socket,
        ]
        .map(str::to_owned);
        let mut process = LineProcess::start(host, peer_bin, &args)?;
        process.expect("ready", READY_TIMEOUT)?;
        Ok(Self { process })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits at most `timeout` for its next hand-over to be taken; returns how many sockets it
    /// took.
    pub fn handed(&mut self, timeout: Duration) -> anyhow::Result<usize> {
        let line = self.process.line(timeout)?;
        line.strip_prefix("handed ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("it said {line:?}, not `handed N`"))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{Shutdown, TcpListener, TcpStream};

    use tcpmig::{repair::RestoredSocket, tuple::Tuple};

    use super::super::tests::assert_echoes;
    use super::*;

    /// A serving server refuses a hand-over whose text announces an fd that did not come, then
    /// takes a handed connection to echo on and a handed listener to accept on.
    #[test]
    fn takes_handed_sockets_while_serving() {
        let dir = std::env::temp_dir().join(format!("echo-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("handoff.sock");
        let mut server = Server::new().unwrap();
        server.listen_for_handoffs(&path).unwrap();
        let server = std::thread::spawn(move || server.run(Duration::from_secs(2)));

        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(format!("{HEADER}1\nname\n").as_bytes())
            .unwrap();
        bad.shutdown(Shutdown::Write).unwrap();
        // Closed by the server, which carries on.
        bad.read_to_end(&mut Vec::new()).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut moved = TcpStream::connect(addr).unwrap();
        let (accepted, remote) = listener.accept().unwrap();
        let tuple = |remote| Tuple {
            local: addr,
            remote,
        };
        let sockets = [
            RestoredSocket {
                tuple: tuple(remote),
                fd: accepted.into(),
            },
            RestoredSocket {
                tuple: tuple(addr),
                fd: listener.into(),
            },
        ];
        tcpmig::handoff::send_fds(&sockets, &path).unwrap();
        drop(sockets);
        assert_echoes(&mut moved, b"moved");
        assert_echoes(&mut TcpStream::connect(addr).unwrap(), b"new");
        server.join().unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn text_must_be_whole_messages() {
        let message = |n: usize| {
            let names: String = (0..n).map(|k| format!("198.18.0.100.80-c.{k}\n")).collect();
            format!("{HEADER}{n}\n{names}")
        };
        let two = format!("{}{}", message(253), message(3));
        assert_eq!(announced_fds(&two).unwrap(), 256);
        assert_eq!(announced_fds("").unwrap(), 0);
        let cut = &two[..two.len() - 1];
        let short = format!("{HEADER}3\na\nb\n");
        let empty_name = format!("{HEADER}2\na\n\n");
        let too_many = message(254);
        for bad in [
            cut,
            "tcpmig-fd 1\na\n",
            "x\n",
            &short,
            &empty_name,
            &too_many,
        ] {
            assert!(announced_fds(bad).is_err(), "{bad:?}");
        }
    }
}
