//! A process of the open-loop load (an echo server, a load generator worker: `tcpmig-peer` in one
//! of those modes, or a program that execs it) started inside a bed host, spoken to one line at a
//! time over its stdin and stdout. Its stderr goes to ours, so its errors show up as they happen.

use std::io::{self, Write as _};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};

use crate::Host;
use crate::process::{ChildGuard, line_reader};

/// Dropping it kills the process (by pid, through the bed's guard).
pub struct LineProcess<'bed> {
    label: String,
    child: ChildGuard<'bed>,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl<'bed> LineProcess<'bed> {
    /// Starts `tcpmig-peer ARGS` (at `peer_bin`) in `host`.
    pub fn start(host: &'bed Host, peer_bin: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut cmd = host.command(peer_bin)?;
        cmd.args(args);
        let what = format!("tcpmig-peer {}", args.first().map_or("", String::as_str));
        Self::spawn(host, cmd, &what)
    }

    /// Starts `cmd` (from [`Namespace::command`](crate::Namespace::command): another program,
    /// e.g. `tcpmig agent` that becomes an echo server) with its stdin and stdout piped to us;
    /// `what` names it in errors.
    pub fn spawn(host: &'bed Host, mut cmd: Command, what: &str) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = host.spawn(&mut cmd)?;
        let label = format!("{what} (pid {}) in {host}", child.pid());
        let pipes = child.child_mut();
        let stdin = pipes.stdin.take().context("stdin not piped")?;
        let stdout = pipes.stdout.take().context("stdout not piped")?;
        let lines = line_reader(stdout, "line-process-stdout")?;
        Ok(Self {
            label,
            child,
            stdin,
            lines,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The next line it prints, waiting at most `timeout`.
    pub fn line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                Err(self.failure(&format!("no line within {timeout:?}")))
            }
            Err(RecvTimeoutError::Disconnected) => Err(self.failure("closed its stdout")),
        }
    }

    /// Waits at most `timeout` for the line `want`, e.g. `ready`.
    pub fn expect(&mut self, want: &str, timeout: Duration) -> anyhow::Result<()> {
        let line = self.line(timeout)?;
        anyhow::ensure!(
            line == want,
            "{}: said {line:?}, expected {want:?}",
            self.label
        );
        Ok(())
    }

    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        match writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush()) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failure(&format!("sending {line:?}: {e}"))),
        }
    }

    /// Asks it to end (SIGTERM) and waits at most `timeout` for it to exit. Unlike the SIGKILL
    /// of the drop, SIGTERM can be passed on: `tcpmig agent` ends the servers it started with
    /// it, which the bed does not know of.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: `pid` is our child and not reaped (try_wait said it runs), so it names it.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == -1 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("{}: sending SIGTERM", self.label));
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(2));
        }
        Err(self.failure(&format!("did not exit within {timeout:?} of SIGTERM")))
    }

    /// An error naming the process, with its exit status if it is gone (its stderr is ours).
    fn failure(&mut self, what: &str) -> anyhow::Error {
        let status = self.status();
        anyhow!("{}: {what} ({status})", self.label)
    }

    fn status(&mut self) -> String {
        // A process that closed its stdout is usually exiting: give it a moment to be reaped.
        for _ in 0..50 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.to_string();
            }
            thread::sleep(Duration::from_millis(2));
        }
        "still running".to_owned()
    }
}
