//! The worker's stdin: nonblocking, watched by its poll, read as one command per line.

use std::io::{self, ErrorKind, Read as _};
use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, bail};
use mio::unix::SourceFd;
use mio::{Interest, Poll};

use super::STDIN;

/// Commands on stdin, one per line.
pub(super) enum Command {
    /// Start the schedule at this instant (CLOCK_MONOTONIC ns).
    Start(u64),
    /// The caller's mark.
    Mark(u64),
}

/// Our stdin, nonblocking and watched by the poll, split into lines.
pub(super) struct Stdin {
    pending: Vec<u8>,
}

impl Stdin {
    pub(super) fn register(poll: &Poll) -> anyhow::Result<Self> {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: fcntl on our own stdin; only the O_NONBLOCK flag changes.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags == -1 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == -1 {
                return Err(io::Error::last_os_error()).context("making stdin nonblocking");
            }
        }
        poll.registry()
            .register(&mut SourceFd(&fd), STDIN, Interest::READABLE)?;
        Ok(Self {
            pending: Vec::new(),
        })
    }

    /// Reads what arrived, until it would block (as edge triggering needs).
    pub(super) fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0; 256];
        loop {
            match io::stdin().lock().read(&mut chunk) {
                Ok(0) => bail!("stdin closed: its caller is gone"),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading stdin"),
            }
        }
    }

    /// The next complete command read so far.
    pub(super) fn next(&mut self) -> anyhow::Result<Option<Command>> {
        let Some(end) = self.pending.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line: Vec<u8> = self.pending.drain(..=end).collect();
        let line = String::from_utf8_lossy(&line);
        let number = |word: &str| {
            word.parse::<u64>()
                .with_context(|| format!("bad command {:?}", line.trim()))
        };
        Ok(Some(
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["start", at] => Command::Start(number(at)?),
                ["mark", at] => Command::Mark(number(at)?),
                _ => bail!("unknown command {:?}", line.trim()),
            },
        ))
    }
}
