//! One load generator process (`tcpmig-peer load-worker`): opens its connections,
//! says `ready`, and on `start T` (CLOCK_MONOTONIC nanoseconds) sends on schedule from T on, for
//! `--duration-ms`; `mark T` on stdin marks an instant. Then it waits for the missing echoes (at
//! most `--drain-ms`), prints one JSON [`WorkerReport`] line and exits. The end of stdin (its
//! caller died) ends it with an error. One thread, epoll (mio, edge-triggered), nonblocking
//! sockets.

use std::io::{self, ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use super::{duration_ns, now_ns};

mod connect;
mod schedule;
mod stdin;

use connect::connect_all;
use schedule::Schedule;
use stdin::{Command, Stdin};

/// Connection id, sequence number, scheduled send time: all little endian.
pub const MESSAGE_LEN: usize = 16;
/// Latencies are recorded in microseconds up to an hour (3 significant digits).
pub const LATENCY_RANGE_US: u64 = 3_600_000_000;
const STDIN: Token = Token(usize::MAX);
/// Connects started at once: more would overflow the server's accept backlog, and a dropped SYN
/// costs a 1 s retry.
const CONNECTS_IN_FLIGHT: usize = 256;
/// Bound on waiting for `start` once connected.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Connection `id` connects from port `FIRST_PORT + id`, bound before the connect: left to
/// choose, the kernel scans every port of one parity on each connect once half of its
/// ephemeral range is taken towards the service (about 3 ms a connect: 300 a second), and
/// that range holds 28,232 ports. The client host runs nothing else that takes a port.
const FIRST_PORT: u16 = 1024;
/// One connection per port from [`FIRST_PORT`] on.
pub const MAX_CONNECTIONS: usize = (u16::MAX - FIRST_PORT) as usize + 1;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    /// The local address to connect from (any when absent).
    #[arg(long)]
    pub from: Option<IpAddr>,
    #[arg(long)]
    pub connections: usize,
    /// Id of the first connection; ids are unique over the workers of a run, and every message
    /// carries its connection's, so a byte that lands on the wrong connection is caught.
    #[arg(long)]
    pub first_id: u32,
    #[arg(long)]
    pub interval_ns: u64,
    #[arg(long)]
    pub duration_ms: u64,
    #[arg(long)]
    pub drain_ms: u64,
    #[arg(long)]
    pub connect_timeout_ms: u64,
}

impl WorkerArgs {
    /// The command line that parses back to `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["load-worker".to_owned()];
        for (flag, value) in [
            ("--connect", self.connect.to_string()),
            ("--connections", self.connections.to_string()),
            ("--first-id", self.first_id.to_string()),
            ("--interval-ns", self.interval_ns.to_string()),
            ("--duration-ms", self.duration_ms.to_string()),
            ("--drain-ms", self.drain_ms.to_string()),
            ("--connect-timeout-ms", self.connect_timeout_ms.to_string()),
        ] {
            args.extend([flag.to_owned(), value]);
        }
        if let Some(from) = self.from {
            args.extend(["--from".to_owned(), from.to_string()]);
        }
        args
    }
}

/// One worker's results; [`super::LoadReport`] merges them. Times in microseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub scheduled: u64,
    pub sent: u64,
    pub echoed: u64,
    pub verified: u64,
    pub resets: u64,
    pub closed: u64,
    pub failed: u64,
    pub corrupt: u64,
    pub first_failure: Option<String>,
    /// The latency histogram as (value, count) of each recorded bucket.
    pub latency_us: Vec<(u64, u64)>,
    /// Per connection: its longest time between two echoes, and its longest silence while an
    /// echo was due (see [`super::LoadReport::max_stall`]).
    pub max_gap_us: Vec<u64>,
    pub max_stall_us: Vec<u64>,
    pub mark: Option<WorkerMark>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerMark {
    pub delay_us: u64,
    pub behind: u64,
    /// Per connection, relative to the mark (see [`super::MarkReport`]).
    pub caught_up_us: Vec<Option<u64>>,
    pub first_echo_us: Vec<Option<u64>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Open,
    Reset,
    Closed,
    Failed,
    Corrupt,
}

struct Conn {
    /// `None` once lost.
    stream: Option<TcpStream>,
    id: u32,
    fate: Fate,
    /// Messages fully written, and bytes of the next one written so far.
    sent: u32,
    written: usize,
    /// Waiting for room in the send buffer.
    blocked: bool,
    /// Messages echoed, and bytes of the next echo read so far.
    echoed: u32,
    partial: [u8; MESSAGE_LEN],
    partial_len: usize,
    /// When the last echo arrived (at first: when the first message was due).
    last_echo: u64,
    max_gap: u64,
    /// Longest wait for an echo: from the later of the last echo and the due time of the
    /// message echoed next, to its echo.
    max_stall: u64,
    after_mark: Option<AfterMark>,
}

struct AfterMark {
    /// Messages scheduled before the mark: caught up once this many are echoed.
    target: u32,
    caught_up: Option<u64>,
    first_echo: Option<u64>,
}

struct Mark {
    at: u64,
    /// When this worker read it.
    seen: u64,
    /// Connections that had not caught up then.
    behind: u64,
}

struct Worker {
    poll: Poll,
    conns: Vec<Conn>,
    schedule: Schedule,
    stop_at: u64,
    drain_until: u64,
    /// Messages of the schedule handed to their connection so far, and due before the stop.
    next: u64,
    total: u64,
    /// Messages sent and not yet echoed, and connections blocked, over the open connections.
    outstanding: u64,
    blocked: usize,
    latency: Histogram<u64>,
    mark: Option<Mark>,
    first_failure: Option<String>,
    stdin: Stdin,
    buf: Vec<u8>,
}

pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "a worker needs connections");
    crate::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let mut poll = Poll::new()?;
    let streams = connect_all(&mut poll, args)?;
    let mut stdin = Stdin::register(&poll)?;
    println!("ready");
    let start = wait_for_start(&mut poll, &mut stdin)?;
    let schedule = Schedule {
        start,
        interval: args.interval_ns.max(1),
        connections: streams.len() as u64,
    };
    let stop_at = start + args.duration_ms * 1_000_000;
    let mut conns = Vec::with_capacity(streams.len());
    for (i, mut stream) in streams.into_iter().enumerate() {
        // Re-arming reports data (or a reset) that arrived while reads were not watched.
        poll.registry()
            .reregister(&mut stream, Token(i), Interest::READABLE)?;
        conns.push(Conn {
            stream: Some(stream),
            id: args.first_id + u32::try_from(i)?,
            fate: Fate::Open,
            sent: 0,
            written: 0,
            blocked: false,
            echoed: 0,
            partial: [0; MESSAGE_LEN],
            partial_len: 0,
            last_echo: schedule.at(i as u64),
            max_gap: 0,
            max_stall: 0,
            after_mark: None,
        });
    }
    let mut worker = Worker {
        poll,
        conns,
        schedule,
        stop_at,
        drain_until: stop_at + args.drain_ms * 1_000_000,
        next: 0,
        total: schedule.due(stop_at),
        outstanding: 0,
        blocked: 0,
        latency: Histogram::new_with_bounds(1, LATENCY_RANGE_US, 3)?,
        mark: None,
        first_failure: None,
        stdin,
        buf: vec![0; 64 * 1024],
    };
    worker.run()?;
    println!("{}", serde_json::to_string(&worker.report())?);
    Ok(())
}

/// One epoll wait of at most `timeout_ns` (rounded up to a millisecond by mio); a signal just
/// ends the wait.
fn poll_once(poll: &mut Poll, events: &mut Events, timeout_ns: u64) -> io::Result<()> {
    match poll.poll(events, Some(Duration::from_nanos(timeout_ns))) {
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
        result => result,
    }
}

fn wait_for_start(poll: &mut Poll, stdin: &mut Stdin) -> anyhow::Result<u64> {
    let deadline = now_ns() + duration_ns(START_TIMEOUT);
    let mut events = Events::with_capacity(1024);
    loop {
        let left = deadline.saturating_sub(now_ns());
        if left == 0 {
            bail!("no start command within {START_TIMEOUT:?}");
        }
        poll_once(poll, &mut events, left)?;
        if events.iter().any(|event| event.token() == STDIN) {
            stdin.fill()?;
            match stdin.next()? {
                Some(Command::Start(at)) => return Ok(at),
                Some(Command::Mark(_)) => bail!("mark before start"),
                None => {}
            }
        }
    }
}

fn fate_of(e: &io::Error) -> Fate {
    match e.raw_os_error() {
        Some(libc::ECONNRESET | libc::EPIPE) => Fate::Reset,
        _ => Fate::Failed,
    }
}

impl Worker {
    /// Sends on schedule until the stop, then waits for the missing echoes until the drain
    /// deadline.
    fn run(&mut self) -> anyhow::Result<()> {
        // Lines that came with `start`.
        self.take_commands()?;
        let mut events = Events::with_capacity(1024);
        let n = self.schedule.connections;
        loop {
            let now = now_ns();
            let due = self.schedule.due(now).min(self.total);
            while self.next < due {
                let k = self.next;
                self.next += 1;
                self.flush((k % n) as usize, u32::try_from(k / n + 1)?)?;
            }
            let done = self.next == self.total
                && now >= self.stop_at
                && self.outstanding == 0
                && self.blocked == 0;
            if done || now >= self.drain_until {
                return Ok(());
            }
            let wake = if self.next < self.total {
                self.schedule.at(self.next)
            } else {
                self.drain_until
            };
            poll_once(&mut self.poll, &mut events, wake.saturating_sub(now))?;
            for event in &events {
                match event.token() {
                    STDIN => {
                        self.stdin.fill()?;
                        self.take_commands()?;
                    }
                    Token(i) => {
                        if event.is_writable() {
                            self.on_writable(i)?;
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(i);
                        }
                    }
                }
            }
        }
    }

    fn take_commands(&mut self) -> anyhow::Result<()> {
        while let Some(command) = self.stdin.next()? {
            match command {
                Command::Start(_) => bail!("a second start"),
                Command::Mark(at) => self.set_mark(at)?,
            }
        }
        Ok(())
    }

    /// Sets the targets of the catch-up. Echoes that arrived between the mark and now are only
    /// known by the last one, which is why the report gives the delay as the resolution.
    fn set_mark(&mut self, at: u64) -> anyhow::Result<()> {
        anyhow::ensure!(self.mark.is_none(), "a second mark");
        let seen = now_ns();
        let mut behind = 0;
        for (i, conn) in self.conns.iter_mut().enumerate() {
            let target = self.schedule.due_on(i, at.min(self.stop_at));
            let echoed_since = conn.echoed > 0 && conn.last_echo > at;
            behind += u64::from(conn.echoed < target);
            conn.after_mark = Some(AfterMark {
                target,
                caught_up: (conn.echoed >= target).then_some(if echoed_since {
                    conn.last_echo
                } else {
                    at
                }),
                first_echo: echoed_since.then_some(conn.last_echo),
            });
        }
        self.mark = Some(Mark { at, seen, behind });
        Ok(())
    }

    /// Writes connection `i`'s messages up to number `upto` (exclusive), unless it is waiting
    /// for room in its send buffer; if the buffer fills, waits for room on this socket only.
    fn flush(&mut self, i: usize, upto: u32) -> anyhow::Result<()> {
        let conn = &mut self.conns[i];
        if conn.blocked {
            return Ok(());
        }
        let Some(stream) = conn.stream.as_mut() else {
            return Ok(());
        };
        while conn.sent < upto {
            let message = self.schedule.message(i, conn.id, conn.sent);
            match stream.write(&message[conn.written..]) {
                Ok(0) => {
                    self.lose(i, Fate::Failed, "write returned 0".into());
                    return Ok(());
                }
                Ok(n) => {
                    conn.written += n;
                    if conn.written == MESSAGE_LEN {
                        conn.written = 0;
                        conn.sent += 1;
                        self.outstanding += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.blocked = true;
                    self.blocked += 1;
                    self.poll.registry().reregister(
                        stream,
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.lose(i, fate_of(&e), format!("write: {e}"));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn on_writable(&mut self, i: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[i];
        if !conn.blocked {
            return Ok(());
        }
        conn.blocked = false;
        self.blocked -= 1;
        if let Some(stream) = conn.stream.as_mut() {
            self.poll
                .registry()
                .reregister(stream, Token(i), Interest::READABLE)?;
        }
        let upto = self.schedule.due_on(i, now_ns().min(self.stop_at));
        self.flush(i, upto)
    }

    /// Reads and checks the echoes of connection `i` until it would block.
    fn read(&mut self, i: usize) {
        loop {
            let Some(stream) = self.conns[i].stream.as_mut() else {
                return;
            };
            let n = match stream.read(&mut self.buf) {
                Ok(0) => return self.lose(i, Fate::Closed, "closed by the server".into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return self.lose(i, fate_of(&e), format!("read: {e}")),
            };
            if let Err(what) = self.take_echoes(i, n, now_ns()) {
                return self.lose(i, Fate::Corrupt, what);
            }
        }
    }

    /// Checks the `n` bytes read into the buffer, which arrived at `now`, against the messages
    /// sent, and records each complete echo.
    fn take_echoes(&mut self, i: usize, n: usize, now: u64) -> Result<(), String> {
        let conn = &mut self.conns[i];
        for &byte in &self.buf[..n] {
            conn.partial[conn.partial_len] = byte;
            conn.partial_len += 1;
            if conn.partial_len < MESSAGE_LEN {
                continue;
            }
            conn.partial_len = 0;
            let expected = self.schedule.message(i, conn.id, conn.echoed);
            if conn.partial != expected {
                return Err(format!(
                    "echo {} was {:02x?}, expected {expected:02x?}",
                    conn.echoed, conn.partial
                ));
            }
            let scheduled = u64::from_le_bytes(expected[8..].try_into().expect("8 bytes"));
            self.latency
                .saturating_record(now.saturating_sub(scheduled) / 1000);
            conn.max_gap = conn.max_gap.max(now.saturating_sub(conn.last_echo));
            let owed_since = conn.last_echo.max(scheduled);
            conn.max_stall = conn.max_stall.max(now.saturating_sub(owed_since));
            conn.last_echo = now;
            conn.echoed += 1;
            self.outstanding = self.outstanding.saturating_sub(1);
            if let Some(after) = &mut conn.after_mark {
                after.first_echo.get_or_insert(now);
                if after.caught_up.is_none() && conn.echoed >= after.target {
                    after.caught_up = Some(now);
                }
            }
        }
        Ok(())
    }

    /// Closes connection `i` for good, counting it as lost by `fate`.
    fn lose(&mut self, i: usize, fate: Fate, what: String) {
        let conn = &mut self.conns[i];
        let Some(mut stream) = conn.stream.take() else {
            return;
        };
        // Closing the socket removes it from epoll anyway; this only keeps mio's books.
        let _ = self.poll.registry().deregister(&mut stream);
        if conn.blocked {
            conn.blocked = false;
            self.blocked -= 1;
        }
        self.outstanding -= u64::from(conn.sent - conn.echoed);
        conn.fate = fate;
        let local = stream
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        self.first_failure
            .get_or_insert_with(|| format!("connection {} from {local}: {what}", conn.id));
    }

    fn report(&self) -> WorkerReport {
        let end = now_ns();
        let mut report = WorkerReport {
            scheduled: self.total,
            latency_us: self
                .latency
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
            first_failure: self.first_failure.clone(),
            ..WorkerReport::default()
        };
        for (i, conn) in self.conns.iter().enumerate() {
            report.sent += u64::from(conn.sent);
            report.echoed += u64::from(conn.echoed);
            match conn.fate {
                Fate::Open => {}
                Fate::Reset => report.resets += 1,
                Fate::Closed => report.closed += 1,
                Fate::Failed => report.failed += 1,
                Fate::Corrupt => report.corrupt += 1,
            }
            let complete = conn.fate == Fate::Open
                && conn.echoed == conn.sent
                && conn.sent == self.schedule.due_on(i, self.stop_at);
            report.verified += u64::from(complete);
            // A connection still missing echoes has been silent since its last one, and owed
            // one since its next message was due.
            let (tail, stall_tail) = if complete {
                (0, 0)
            } else {
                let next_due = self
                    .schedule
                    .at(u64::from(conn.echoed) * self.schedule.connections + i as u64);
                let silent = end.saturating_sub(conn.last_echo);
                (silent, silent.min(end.saturating_sub(next_due)))
            };
            report.max_gap_us.push(conn.max_gap.max(tail) / 1000);
            report
                .max_stall_us
                .push(conn.max_stall.max(stall_tail) / 1000);
        }
        report.mark = self.mark.as_ref().map(|mark| {
            let since = |t: Option<u64>| t.map(|t| t.saturating_sub(mark.at) / 1000);
            let after = || self.conns.iter().filter_map(|c| c.after_mark.as_ref());
            WorkerMark {
                delay_us: mark.seen.saturating_sub(mark.at) / 1000,
                behind: mark.behind,
                caught_up_us: after().map(|a| since(a.caught_up)).collect(),
                first_echo_us: after().map(|a| since(a.first_echo)).collect(),
            }
        });
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerMode;

    #[test]
    fn worker_args_parse_back() {
        let args = WorkerArgs {
            connect: "[fd54:636d::100]:8080".parse().unwrap(),
            from: Some("fd54:636d::200".parse().unwrap()),
            connections: 15_000,
            first_id: 30_000,
            interval_ns: 2_500_000_000,
            duration_ms: 10_000,
            drain_ms: 5_000,
            connect_timeout_ms: 60_000,
        };
        let argv = std::iter::once("tcpmig-peer".to_owned()).chain(args.to_args());
        let PeerMode::LoadWorker(parsed) = <PeerMode as clap::Parser>::parse_from(argv) else {
            panic!("not a worker command line");
        };
        assert_eq!(parsed.to_args(), args.to_args());
    }
}
