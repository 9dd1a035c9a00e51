//! `tcpmig-peer`, the traffic process of the bed: its command line ([`PeerArgs`]), its line
//! protocol, and [`Peer`], a test's handle on one such process.
//!
//! # Streams
//! Each connection carries one stream per direction; byte `off` of a stream is
//! [`pattern::byte_at`](crate::pattern::byte_at)`(client ip:port, direction, off)`, so a peer
//! needs nothing but the socket's addresses to produce or check it. `--bytes K` is the length of
//! both streams at first. A process that takes over sockets from a previous owner (a migration)
//! is told where that owner stopped: `--sent-already S` means the owner wrote bytes `[0, S)` of the
//! outgoing stream, so this process goes on at offset S; `--received-already R` means the owner
//! read `[0, R)` of the incoming stream, and the rest, still queued in the socket, is read from R.
//!
//! # Roles
//! - `server --listen ADDR:PORT --expect N`: accepts N connections (listen backlog 4096+).
//! - `server --listen ADDR:PORT --expect N --reuseport K`: the same on a port that several server
//!   processes share with SO_REUSEPORT, as the K-th (0-based) listener of the port's group. Once
//!   listening it steers every new connection of the group to itself (a classic BPF program on
//!   the group), so that N is exact while the earlier servers keep their listeners: start them
//!   one after the other, each once the previous one accepted its connections.
//! - `server --from-listen-fds`: systemd socket activation (LISTEN_FDS, LISTEN_PID), except that
//!   fds 3, 4, ... are already-connected sockets, as `tcpmig restore --exec` hands over restored
//!   connections.
//! - `server --from-listen-fds --script CMD...`: the same, for processes the test cannot talk to
//!   one by one, such as the children of `tcpmig agent` when it splits the connections over
//!   several processes (they share its stdin and stdout). It runs the commands (the stdin
//!   protocol's, below) in order instead of reading stdin, prints one [`ScriptReport`] line
//!   tagged with its `TCPMIG_SHARD` and `TCPMIG_SHARDS`, and exits.
//! - `server --listen ADDR:PORT --expect N --mirror`: for a process that CRIU dumps (no pipes to
//!   the test): reads no commands, and answers every byte it reads on a connection (checked
//!   against the client's stream) with the byte at the same offset of its own stream, until no
//!   byte arrives for 10 minutes. A wrong byte ends that connection, which its client reports.
//!   Clients then check everything: `send M` + `verify UNTIL` round trips through the server.
//! - `client --connect ADDR:PORT --count N`: opens N connections.
//!
//! Once it holds its connections, a peer writes its outgoing streams up to K on each and nothing
//! more, leaving everything it received unread in the socket queues.
//!
//! # Protocol, one line at a time
//! stdout:
//! - `listening`: a `--listen` server is bound; clients may connect now.
//! - `ready`: the peer holds all its connections and wrote its streams up to K.
//! - after each command, one JSON [`Report`].
//!
//! A `--script` peer says none of these: its only line is its [`ScriptReport`], written at once
//! (one write of less than PIPE_BUF, so siblings sharing the pipe do not interleave).
//!
//! stdin, [`PeerCommand`]s:
//! - `verify [UNTIL]`: reads every connection's incoming stream up to offset UNTIL (default K),
//!   checking every byte.
//! - `send M`: writes the next M bytes of every outgoing stream.
//! - `exit`, or the end of stdin (the test died): exits without a reply.
//!
//! Errors go to stderr, with a non-zero exit status. Every wait is bounded by `--timeout-secs` per
//! phase (connecting or accepting all, each command), and waiting for a command by 10 minutes.
//!
//! Extension point: another traffic shape (say, echo rounds running through a migration) is one
//! more [`PeerCommand`] variant and one arm in the binary's command loop.

use std::fmt;
use std::io::{Read, Write};
use std::iter::Sum;
use std::net::SocketAddr;
use std::ops::AddAssign;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser};
use serde::{Deserialize, Serialize};

use crate::namespaces::Namespace;
use crate::process::{ChildGuard, line_reader};

const DEFAULT_BYTES: u64 = 1024;
const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// How much longer than a peer's own deadline the test waits for its answer.
const REPLY_MARGIN: Duration = Duration::from_secs(10);
/// How much of a peer's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// The command line of `tcpmig-peer`.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(
    name = "tcpmig-peer",
    about = "Verifiable TCP traffic for tcpmig's test bed"
)]
pub enum PeerArgs {
    /// Accept (or adopt) connections and serve a stream on each.
    Server(ServerArgs),
    /// Open connections and send a stream on each.
    Client(ClientArgs),
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
#[group(id = "connections", required = true, multiple = false, args = ["listen", "from_listen_fds"])]
pub struct ServerArgs {
    /// Listen here and accept `--expect` connections.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Take the connected sockets passed as fds 3.. (LISTEN_FDS, LISTEN_PID).
    #[arg(long)]
    pub from_listen_fds: bool,
    /// How many connections to accept.
    #[arg(long, default_value_t = 1, conflicts_with = "from_listen_fds")]
    pub expect: usize,
    /// Share the port (SO_REUSEPORT) as the K-th listener of its group, and steer new
    /// connections to this one (see the module docs).
    #[arg(long, value_name = "K", conflicts_with = "from_listen_fds")]
    pub reuseport: Option<usize>,
    /// Mirror the clients' streams instead of taking commands (see the module docs).
    #[arg(long, conflicts_with = "from_listen_fds")]
    pub mirror: bool,
    /// Run this command instead of reading stdin (repeatable, in order), then print one
    /// [`ScriptReport`] and exit.
    #[arg(long = "script", value_name = "CMD", conflicts_with = "listen")]
    pub script: Vec<PeerCommand>,
    #[command(flatten)]
    pub stream: StreamArgs,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ClientArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    /// How many connections to open.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// The stream offsets and deadlines, the same for both roles (see the module docs).
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamArgs {
    /// Length of both streams of every connection at first.
    #[arg(long, default_value_t = DEFAULT_BYTES)]
    pub bytes: u64,
    /// Bytes of the outgoing stream a previous owner of the sockets already wrote.
    #[arg(long, default_value_t = 0)]
    pub sent_already: u64,
    /// Bytes of the incoming stream a previous owner of the sockets already read.
    #[arg(long, default_value_t = 0)]
    pub received_already: u64,
    /// Bound on each phase: connecting or accepting all, and each command.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout_secs: u64,
}

impl StreamArgs {
    /// Streams of `bytes` bytes, nothing sent or received before, the default deadline.
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            sent_already: 0,
            received_already: 0,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

impl PeerArgs {
    pub fn server(listen: SocketAddr, expect: usize, stream: StreamArgs) -> Self {
        Self::Server(ServerArgs {
            listen: Some(listen),
            expect,
            ..ServerArgs::new(stream)
        })
    }

    /// A `--reuseport` server: the `index`-th of the processes sharing `listen`.
    pub fn shared_server(
        listen: SocketAddr,
        index: usize,
        expect: usize,
        stream: StreamArgs,
    ) -> Self {
        Self::Server(ServerArgs {
            listen: Some(listen),
            expect,
            reuseport: Some(index),
            ..ServerArgs::new(stream)
        })
    }

    /// A `--mirror` server: the clients' streams come back, byte for byte in length.
    pub fn mirror_server(listen: SocketAddr, expect: usize, stream: StreamArgs) -> Self {
        Self::Server(ServerArgs {
            listen: Some(listen),
            expect,
            mirror: true,
            ..ServerArgs::new(stream)
        })
    }

    /// A server that takes over connected sockets passed as fds (see
    /// [`Namespace::command_with_listen_fds`]).
    pub fn adopting_server(stream: StreamArgs) -> Self {
        Self::scripted_adopting_server(stream, Vec::new())
    }

    /// An adopting server that runs `script` instead of reading commands (none: it reads them).
    pub fn scripted_adopting_server(stream: StreamArgs, script: Vec<PeerCommand>) -> Self {
        Self::Server(ServerArgs {
            from_listen_fds: true,
            script,
            ..ServerArgs::new(stream)
        })
    }

    pub fn client(connect: SocketAddr, count: usize, stream: StreamArgs) -> Self {
        Self::Client(ClientArgs {
            connect,
            count,
            stream,
        })
    }

    pub fn stream(&self) -> &StreamArgs {
        match self {
            Self::Server(server) => &server.stream,
            Self::Client(client) => &client.stream,
        }
    }

    /// The arguments that make `tcpmig-peer` parse back to `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = match self {
            Self::Server(ServerArgs {
                listen: Some(addr),
                expect,
                reuseport,
                mirror,
                ..
            }) => {
                let mut args = vec![
                    "server".into(),
                    "--listen".into(),
                    addr.to_string(),
                    "--expect".into(),
                    expect.to_string(),
                ];
                if let Some(index) = reuseport {
                    args.extend(["--reuseport".into(), index.to_string()]);
                }
                if *mirror {
                    args.push("--mirror".into());
                }
                args
            }
            Self::Server(ServerArgs {
                listen: None,
                script,
                ..
            }) => {
                let mut args = vec!["server".into(), "--from-listen-fds".into()];
                for command in script {
                    args.extend(["--script".into(), command.to_string()]);
                }
                args
            }
            Self::Client(ClientArgs { connect, count, .. }) => {
                vec![
                    "client".into(),
                    "--connect".into(),
                    connect.to_string(),
                    "--count".into(),
                    count.to_string(),
                ]
            }
        };
        let stream = self.stream();
        for (flag, value) in [
            ("--bytes", stream.bytes),
            ("--sent-already", stream.sent_already),
            ("--received-already", stream.received_already),
            ("--timeout-secs", stream.timeout_secs),
        ] {
            args.extend([flag.to_owned(), value.to_string()]);
        }
        args
    }
}

impl ServerArgs {
    /// A server that adopts nothing and listens nowhere yet: the constructors fill in the rest.
    fn new(stream: StreamArgs) -> Self {
        Self {
            listen: None,
            from_listen_fds: false,
            expect: 1,
            reuseport: None,
            mirror: false,
            script: Vec::new(),
            stream,
        }
    }
}

impl fmt::Display for PeerArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server(ServerArgs {
                listen: Some(addr),
                reuseport: Some(index),
                ..
            }) => write!(f, "server {index} on {addr}"),
            Self::Server(ServerArgs {
                listen: Some(addr), ..
            }) => write!(f, "server on {addr}"),
            Self::Server(ServerArgs { listen: None, .. }) => {
                write!(f, "server of handed-over sockets")
            }
            Self::Client(client) => write!(f, "client of {}", client.connect),
        }
    }
}

/// A command on a peer's stdin; `Display` and `FromStr` are the wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCommand {
    /// Read and check every incoming stream up to offset `until` (default: `--bytes`).
    Verify {
        until: Option<u64>,
    },
    /// Write the next `bytes` bytes of every outgoing stream.
    Send {
        bytes: u64,
    },
    Exit,
}

impl fmt::Display for PeerCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Verify { until: None } => write!(f, "verify"),
            Self::Verify { until: Some(until) } => write!(f, "verify {until}"),
            Self::Send { bytes } => write!(f, "send {bytes}"),
            Self::Exit => write!(f, "exit"),
        }
    }
}

impl FromStr for PeerCommand {
    type Err = anyhow::Error;

    fn from_str(line: &str) -> Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |word: &str| {
            word.parse::<u64>()
                .with_context(|| format!("bad number in {line:?}"))
        };
        Ok(match words[..] {
            ["verify"] => Self::Verify { until: None },
            ["verify", until] => Self::Verify {
                until: Some(number(until)?),
            },
            ["send", bytes] => Self::Send {
                bytes: number(bytes)?,
            },
            ["exit"] => Self::Exit,
            _ => bail!("unknown command {line:?}"),
        })
    }
}

/// What a peer says after a command. Every connection is in exactly one state, counted here:
/// verified (no failure so far: every byte read matched, every write completed), mismatched (a
/// wrong byte, or end of stream before the expected end), reset (ECONNRESET or EPIPE), timed out
/// (no progress before the deadline, or ETIMEDOUT), or failed with another error. A connection
/// that failed stays failed and is skipped by later commands. Byte counts are totals since start.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub connections: u64,
    pub verified: u64,
    pub mismatched: u64,
    pub resets: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The first failure, with the connection's addresses and stream offset.
    pub first_failure: Option<String>,
}

impl Report {
    /// Whether every connection is verified (and there is at least one).
    pub fn all_verified(&self) -> bool {
        self.connections > 0 && self.verified == self.connections
    }
}

impl AddAssign for Report {
    fn add_assign(&mut self, other: Self) {
        self.connections += other.connections;
        self.verified += other.verified;
        self.mismatched += other.mismatched;
        self.resets += other.resets;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.first_failure = self.first_failure.take().or(other.first_failure);
    }
}

impl Sum for Report {
    fn sum<I: Iterator<Item = Self>>(reports: I) -> Self {
        reports.fold(Self::default(), |mut total, report| {
            total += report;
            total
        })
    }
}

/// The one line a `--script` peer prints when its script is done: its [`Report`] and which of
/// `tcpmig agent`'s children it is (its pid, `TCPMIG_SHARD` and `TCPMIG_SHARDS`, `None` when
/// unset), since those children share one stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptReport {
    pub pid: u32,
    pub shard: Option<usize>,
    pub shards: Option<usize>,
    pub report: Report,
}

/// A process speaking the peer protocol, started in a host: `tcpmig-peer` itself, or a tool that
/// execs it. Every wait for a line is bounded; dropping it kills the process.
pub struct Peer<'bed> {
    label: String,
    child: ChildGuard<'bed>,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Disconnects when the stderr reader has read everything: the process's last words.
    stderr_read: Receiver<()>,
    reply_timeout: Duration,
}

impl<'bed> Peer<'bed> {
    /// Starts `tcpmig-peer` (at `peer_bin`) with `args` in `host`, without waiting for it.
    pub fn start(host: &'bed Namespace, peer_bin: &Path, args: &PeerArgs) -> Result<Self> {
        let mut cmd = host.command(peer_bin)?;
        cmd.args(args.to_args());
        Self::spawn(
            host,
            cmd,
            &args.to_string(),
            args.stream().timeout() + REPLY_MARGIN,
        )
    }

    /// Starts `cmd` (made by `host`, e.g. a migration tool that execs `tcpmig-peer` with restored
    /// sockets) with piped stdio. `what` names it in errors; `reply_timeout` bounds each wait for
    /// a line.
    pub fn spawn(
        host: &'bed Namespace,
        mut cmd: Command,
        what: &str,
        reply_timeout: Duration,
    ) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = host.spawn(&mut cmd)?;
        let label = format!("{what} (pid {}) in {host}", child.pid());
        let pipes = child.child_mut();
        let (stdin, stdout, stderr_pipe) =
            match (pipes.stdin.take(), pipes.stdout.take(), pipes.stderr.take()) {
                (Some(stdin), Some(stdout), Some(stderr)) => (stdin, stdout, stderr),
                _ => bail!("{label}: stdio not piped"),
            };
        // Reader threads end when the process does (its pipes close); nobody waits for them.
        let lines = line_reader(stdout, "peer-stdout")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let tail = Arc::clone(&stderr);
        let (reading, stderr_read) = std::sync::mpsc::channel::<()>();
        thread::Builder::new()
            .name("peer-stderr".into())
            .spawn(move || {
                let _reading = reading;
                let mut chunk = [0; 1024];
                let mut pipe = stderr_pipe;
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
                    tail.push_str(&String::from_utf8_lossy(&chunk[..n]));
                    if let Some(cut) = tail.len().checked_sub(STDERR_TAIL) {
                        let cut = (cut..tail.len())
                            .find(|&i| tail.is_char_boundary(i))
                            .unwrap_or(tail.len());
                        tail.drain(..cut);
                    }
                }
            })?;
        Ok(Self {
            label,
            child,
            stdin,
            lines,
            stderr,
            stderr_read,
            reply_timeout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// What it is and where, as errors name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Waits for the line `want` (`listening`, `ready`).
    pub fn expect_line(&mut self, want: &str) -> Result<()> {
        let line = self.next_line()?;
        if line != want {
            bail!("{}: said {line:?}, expected {want:?}", self.label);
        }
        Ok(())
    }

    /// Sends a command without waiting for its report, so that several peers work at once.
    pub fn send_command(&mut self, command: PeerCommand) -> Result<()> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| self.failure(&format!("sending {command:?}: {e}")))
    }

    /// Reads the report of the last command.
    pub fn read_report(&mut self) -> Result<Report> {
        let line = self.next_line()?;
        serde_json::from_str(&line).with_context(|| format!("{}: bad report {line:?}", self.label))
    }

    /// Sends a command and reads its report.
    pub fn command(&mut self, command: PeerCommand) -> Result<Report> {
        self.send_command(command)?;
        self.read_report()
    }

    fn next_line(&mut self) -> Result<String> {
        match self.lines.recv_timeout(self.reply_timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                Err(self.failure(&format!("no answer within {:?}", self.reply_timeout)))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.failure("closed its stdout")),
        }
    }

    /// An error naming the peer, with its exit status if it is gone and its last stderr.
    fn failure(&mut self, what: &str) -> anyhow::Error {
        // A peer that closed stdout is exiting: give it a moment to be reaped for its status.
        let mut status = None;
        for _ in 0..100 {
            status = self.child.try_wait().ok().flatten();
            if status.is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        if status.is_some() {
            // Gone: its stderr is complete once the reader reaches the end of the pipe.
            let _ = self.stderr_read.recv_timeout(Duration::from_secs(1));
        }
        let status = status.map_or_else(|| "still running".to_owned(), |s| s.to_string());
        let stderr = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        anyhow!(
            "{}: {what} ({status}); stderr: {:?}",
            self.label,
            stderr.trim()
        )
    }
}

/// Sends `command` to every peer, then sums their reports: the peers work in parallel.
pub fn command_all(peers: &mut [Peer<'_>], command: PeerCommand) -> Result<Report> {
    for peer in peers.iter_mut() {
        peer.send_command(command)?;
    }
    peers.iter_mut().map(Peer::read_report).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_parse_back() {
        let addr = "198.18.0.100:8080".parse().unwrap();
        let stream = StreamArgs {
            sent_already: 5,
            received_already: 7,
            ..StreamArgs::new(2048)
        };
        for args in [
            PeerArgs::server(addr, 10, stream),
            PeerArgs::mirror_server(addr, 10, stream),
            PeerArgs::adopting_server(stream),
            PeerArgs::shared_server(addr, 2, 10, stream),
            PeerArgs::scripted_adopting_server(
                stream,
                vec![
                    PeerCommand::Send { bytes: 700 },
                    PeerCommand::Verify { until: Some(2424) },
                ],
            ),
            PeerArgs::client(addr, 3, StreamArgs::new(1)),
        ] {
            let argv = std::iter::once("tcpmig-peer".to_owned()).chain(args.to_args());
            assert_eq!(PeerArgs::try_parse_from(argv).unwrap(), args);
        }
    }

    #[test]
    fn server_needs_exactly_one_source_of_connections() {
        let parse =
            |args: &[&str]| PeerArgs::try_parse_from([&["tcpmig-peer", "server"], args].concat());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--listen", "[::1]:1", "--from-listen-fds"]).is_err());
        assert!(parse(&["--from-listen-fds", "--expect", "3"]).is_err());
        assert!(parse(&["--listen", "[::1]:1", "--expect", "3"]).is_ok());
        assert!(parse(&["--from-listen-fds", "--reuseport", "1"]).is_err());
        assert!(parse(&["--listen", "[::1]:1", "--script", "verify"]).is_err());
        assert!(parse(&["--from-listen-fds", "--script", "dance"]).is_err());
    }

    #[test]
    fn commands_parse_back() {
        for command in [
            PeerCommand::Verify { until: None },
            PeerCommand::Verify { until: Some(4096) },
            PeerCommand::Send { bytes: 100 },
            PeerCommand::Exit,
        ] {
            assert_eq!(command.to_string().parse::<PeerCommand>().unwrap(), command);
        }
        assert!("verify x".parse::<PeerCommand>().is_err());
        assert!("dance".parse::<PeerCommand>().is_err());
    }

    #[test]
    fn reports_add_up() {
        let one = Report {
            connections: 2,
            verified: 1,
            resets: 1,
            first_failure: Some("reset".into()),
            ..Report::default()
        };
        let total: Report = [Report::default(), one.clone(), one].into_iter().sum();
        assert_eq!((total.connections, total.verified, total.resets), (4, 2, 2));
        assert_eq!(total.first_failure.as_deref(), Some("reset"));
        assert!(!total.all_verified());
    }
}
