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

mod args;
mod protocol;

pub use args::{ClientArgs, PeerArgs, PeerMode, ServerArgs, StreamArgs};
pub use protocol::{PeerCommand, Report, ScriptReport};

use std::io::{Read, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::namespaces::Namespace;
use crate::process::{ChildGuard, line_reader};

/// How much longer than a peer's own deadline the test waits for its answer.
const REPLY_MARGIN: Duration = Duration::from_secs(10);
/// How much of a peer's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

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
