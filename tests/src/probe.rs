//! New connections through a migration, tried as a new user would: `tcpmig-peer probe` opens a
//! new connection to the service every `--every-ms` (open loop: whatever the earlier ones do),
//! sends one 16-byte message on each and waits for its echo, each attempt bounded by
//! `--timeout-ms`, and says how each ended ([`ProbeReport`]). [`ProbeRun`] runs it from the
//! client host: started shortly before a migration, stopped shortly after it.
//!
//! An attempt is served (echo back, byte-exact), refused (ECONNREFUSED, or a reset before the
//! echo), hanging (no connect, or no echo, within the bound) or failed otherwise (closed
//! without the echo, a wrong echo, another error). A connect that took 1 s or more waited for a
//! SYN retransmission: those are counted too, whatever their end.
//!
//! One process, one thread with epoll (mio, edge-triggered); a second thread only reads stdin,
//! where `stop` (or its end) stops new attempts. The process then waits for the attempts in
//! flight (at most the bound), prints one JSON [`ProbeReport`] line and exits.

use std::io::{self, BufRead as _, ErrorKind, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use crate::Host;
use crate::line_process::LineProcess;
use crate::load::{Spread, now_ns};

const MESSAGE_LEN: usize = 16;
/// A SYN that was dropped is sent again after 1 s (TCP_TIMEOUT_INIT).
const SYN_RETRY_NS: u64 = 1_000_000_000;
/// Extra wait for the report beyond the attempts' own bound, for a loaded 2-core machine.
const REPORT_MARGIN: Duration = Duration::from_secs(30);
/// Bound on the prober saying `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How the benchmarks probe an event (a migration, a freeze): a new connection every 2 ms,
/// each given 3 s, from [`LEAD`] before the event starts to [`TAIL`] after it ended.
pub const EVERY_MS: u64 = 2;
pub const TIMEOUT_MS: u64 = 3_000;
pub const LEAD: Duration = Duration::from_millis(200);
pub const TAIL: Duration = Duration::from_millis(300);
/// Bound on the probing when `stop` never comes.
const MAX_MS: u64 = 120_000;

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// The service to connect to.
    #[arg(long)]
    pub connect: SocketAddr,
    /// A new connection this often.
    #[arg(long, default_value_t = EVERY_MS)]
    pub every_ms: u64,
    /// Bound on each attempt, from the connect call to the whole echo.
    #[arg(long, default_value_t = TIMEOUT_MS)]
    pub timeout_ms: u64,
    /// Bound on the probing, should `stop` never come.
    #[arg(long, default_value_t = MAX_MS)]
    pub max_ms: u64,
}

impl ProbeArgs {
    /// Probing `connect` with the defaults.
    pub fn new(connect: SocketAddr) -> Self {
        Self {
            connect,
            every_ms: EVERY_MS,
            timeout_ms: TIMEOUT_MS,
            max_ms: MAX_MS,
        }
    }

    /// The command line that parses back to `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["probe".to_owned()];
        for (flag, value) in [
            ("--connect", self.connect.to_string()),
            ("--every-ms", self.every_ms.to_string()),
            ("--timeout-ms", self.timeout_ms.to_string()),
            ("--max-ms", self.max_ms.to_string()),
        ] {
            args.extend([flag.to_owned(), value]);
        }
        args
    }
}

/// How the new connections fared.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProbeReport {
    pub attempted: u64,
    pub served: u64,
    /// ECONNREFUSED, or reset before the echo.
    pub refused: u64,
    /// No connect within the bound, or connected but no echo within it.
    pub hung_connecting: u64,
    pub hung_echoing: u64,
    /// Closed without the echo, a wrong echo, or another error.
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Attempts that were connecting for 1 s or more (connected, refused or given up then):
    /// the first SYN went unanswered.
    pub slow_connects: u64,
    /// Over the served attempts: from the connect call to the whole echo.
    pub served_ms: Spread,
    /// Over the attempts that connected: the connect alone.
    pub connect_ms: Spread,
    /// When the first attempt started and the probing stopped (CLOCK_MONOTONIC ns, as
    /// [`now_ns`]), and when each attempt that was not served started and how it ended.
    pub started_ns: u64,
    pub stopped_ns: u64,
    pub unserved: Vec<Unserved>,
}

impl ProbeReport {
    pub fn hanging(&self) -> u64 {
        self.hung_connecting + self.hung_echoing
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unserved {
    pub at_ns: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Served,
    Refused,
    HungConnecting,
    HungEchoing,
    Failed,
}

/// A running prober on the client host. Dropping it kills it.
pub struct ProbeRun<'bed> {
    process: LineProcess<'bed>,
    timeout: Duration,
}

impl<'bed> ProbeRun<'bed> {
    /// Starts probing `args.connect` from `host` (`tcpmig-peer` at `peer_bin`); returns once
    /// the first attempt is under way.
    pub fn start(host: &'bed Host, peer_bin: &Path, args: &ProbeArgs) -> anyhow::Result<Self> {
        let mut process = LineProcess::start(host, peer_bin, &args.to_args())?;
        process.expect("ready", READY_TIMEOUT)?;
        Ok(Self {
            process,
            timeout: Duration::from_millis(args.timeout_ms),
        })
    }

    /// Stops new attempts, waits for those in flight (at most their bound) and returns the
    /// report.
    pub fn finish(mut self) -> anyhow::Result<ProbeReport> {
        self.process.send("stop")?;
        let line = self.process.line(self.timeout + REPORT_MARGIN)?;
        serde_json::from_str(&line).with_context(|| format!("bad probe report {line:?}"))
    }
}

/// One attempt in flight.
struct Attempt {
    stream: TcpStream,
    started: u64,
    connected: Option<u64>,
    message: [u8; MESSAGE_LEN],
    echo: [u8; MESSAGE_LEN],
    echoed: usize,
}

/// The attempts in flight, indexed by token, and what the ended ones came to.
struct Prober {
    poll: Poll,
    target: SocketAddr,
    attempts: Vec<Option<Attempt>>,
    free: Vec<usize>,
    report: ProbeReport,
    served_us: Vec<u64>,
    connect_us: Vec<u64>,
}

/// The `probe` mode of `tcpmig-peer`.
pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let stdin_stop = Arc::clone(&stop);
    // Blocking line reads: `stop`, or the end of stdin (the caller is gone), ends the probing.
    std::thread::Builder::new()
        .name("probe-stdin".to_owned())
        .spawn(move || {
            for line in io::stdin().lock().lines() {
                if line.map_or(true, |l| l.trim() == "stop") {
                    break;
                }
            }
            stdin_stop.store(true, Ordering::Relaxed);
        })?;
    let report = probe(args, &stop, || println!("ready"))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Probes until `stop` is set (or `args.max_ms`), then waits for the attempts in flight;
/// `started` is called once the first attempt is under way.
fn probe(
    args: &ProbeArgs,
    stop: &AtomicBool,
    started: impl FnOnce(),
) -> anyhow::Result<ProbeReport> {
    let mut prober = Prober {
        poll: Poll::new()?,
        target: args.connect,
        attempts: Vec::new(),
        free: Vec::new(),
        report: ProbeReport::default(),
        served_us: Vec::new(),
        connect_us: Vec::new(),
    };
    let every = args.every_ms.max(1) * 1_000_000;
    let timeout = args.timeout_ms * 1_000_000;
    let first = now_ns();
    prober.report.started_ns = first;
    let probe_until = first + args.max_ms * 1_000_000;
    let mut next = first;
    let mut events = Events::with_capacity(1024);
    let mut started = Some(started);
    loop {
        let now = now_ns();
        let probing = !stop.load(Ordering::Relaxed) && now < probe_until;
        if probing {
            while next <= now {
                prober.open(next);
                next += every;
            }
            if let Some(started) = started.take() {
                started();
            }
        } else if prober.report.stopped_ns == 0 {
            prober.report.stopped_ns = now;
        }
        prober.expire(now, timeout);
        if !probing && prober.free.len() == prober.attempts.len() {
            break;
        }
        let wait = next.saturating_sub(now).clamp(100_000, 1_000_000);
        match prober
            .poll
            .poll(&mut events, Some(Duration::from_nanos(wait)))
        {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            result => result?,
        }
        for event in &events {
            prober.advance(event.token().0, now_ns());
        }
    }
    Ok(prober.finish())
}

impl Prober {
    /// Starts attempt number `attempted`, scheduled at `at`.
    fn open(&mut self, at: u64) {
        let n = self.report.attempted;
        self.report.attempted += 1;
        let mut message = [0; MESSAGE_LEN];
        message[..8].copy_from_slice(b"tcpmig-p");
        message[8..].copy_from_slice(&n.to_le_bytes());
        let slot = self.free.pop().unwrap_or(self.attempts.len());
        let stream = TcpStream::connect(self.target).and_then(|mut stream| {
            self.poll.registry().register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                self.free.push(slot);
                return self.ended(at, outcome_of(&e), Some(format!("connect: {e}")));
            }
        };
        let attempt = Some(Attempt {
            stream,
            started: at,
            connected: None,
            message,
            echo: [0; MESSAGE_LEN],
            echoed: 0,
        });
        match self.attempts.get_mut(slot) {
            Some(free) => *free = attempt,
            None => self.attempts.push(attempt),
        }
    }

    /// Moves attempt `slot` on as far as its socket allows: connected, message written, echo
    /// read (edge-triggered: until it would block).
    fn advance(&mut self, slot: usize, now: u64) {
        let Some(Some(attempt)) = self.attempts.get_mut(slot) else {
            return;
        };
        match step(attempt, now) {
            Ok(None) => {}
            Ok(Some(outcome)) => self.close(slot, outcome, None),
            Err(e) => self.close(slot, outcome_of(&e), Some(e.to_string())),
        }
    }

    /// Ends the attempts older than `timeout`: they hang.
    fn expire(&mut self, now: u64, timeout: u64) {
        for slot in 0..self.attempts.len() {
            let Some(attempt) = &self.attempts[slot] else {
                continue;
            };
            if now.saturating_sub(attempt.started) >= timeout {
                let outcome = if attempt.connected.is_some() {
                    Outcome::HungEchoing
                } else {
                    Outcome::HungConnecting
                };
                self.close(slot, outcome, None);
            }
        }
    }

    fn close(&mut self, slot: usize, outcome: Outcome, why: Option<String>) {
        let Some(mut attempt) = self.attempts[slot].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut attempt.stream);
        self.free.push(slot);
        let now = now_ns();
        // Connected, or refused or given up while connecting: either way a connect this long
        // sent its SYN again.
        let connecting = match attempt.connected {
            Some(connected) => {
                let took = connected.saturating_sub(attempt.started);
                self.connect_us.push(took / 1000);
                took
            }
            None => now.saturating_sub(attempt.started),
        };
        self.report.slow_connects += u64::from(connecting >= SYN_RETRY_NS);
        if outcome == Outcome::Served {
            self.served_us
                .push(now.saturating_sub(attempt.started) / 1000);
        }
        self.ended(attempt.started, outcome, why);
    }

    /// Counts an attempt started at `at` that ended with `outcome`.
    fn ended(&mut self, at: u64, outcome: Outcome, why: Option<String>) {
        let report = &mut self.report;
        *match outcome {
            Outcome::Served => return report.served += 1,
            Outcome::Refused => &mut report.refused,
            Outcome::HungConnecting => &mut report.hung_connecting,
            Outcome::HungEchoing => &mut report.hung_echoing,
            Outcome::Failed => &mut report.failed,
        } += 1;
        report.unserved.push(Unserved { at_ns: at, outcome });
        if let Some(why) = why {
            report
                .first_failure
                .get_or_insert_with(|| format!("attempt {}: {why}", report.unserved.len()));
        }
    }

    fn finish(mut self) -> ProbeReport {
        self.report.served_ms = Spread::of_us(self.served_us);
        self.report.connect_ms = Spread::of_us(self.connect_us);
        self.report
    }
}

/// One attempt's next steps; `Some` once it has ended.
fn step(attempt: &mut Attempt, now: u64) -> io::Result<Option<Outcome>> {
    if attempt.connected.is_none() {
        if let Some(e) = attempt.stream.take_error()? {
            return Err(e);
        }
        match attempt.stream.peer_addr() {
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(None),
            Err(e) => return Err(e),
            Ok(_) => attempt.connected = Some(now),
        }
        // 16 bytes always fit in a new connection's send buffer.
        attempt.stream.write_all(&attempt.message)?;
    }
    while attempt.echoed < MESSAGE_LEN {
        match attempt.stream.read(&mut attempt.echo[attempt.echoed..]) {
            Ok(0) => return Ok(Some(Outcome::Failed)),
            Ok(n) => attempt.echoed += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(if attempt.echo == attempt.message {
        Outcome::Served
    } else {
        Outcome::Failed
    }))
}

fn outcome_of(e: &io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            Outcome::Refused
        }
        _ => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerMode;

    #[test]
    fn probe_args_parse_back() {
        let args = ProbeArgs {
            connect: "198.18.0.100:9000".parse().unwrap(),
            every_ms: 2,
            timeout_ms: 3_000,
            max_ms: 10_000,
        };
        let argv = std::iter::once("tcpmig-peer".to_owned()).chain(args.to_args());
        let PeerMode::Probe(parsed) = <PeerMode as clap::Parser>::parse_from(argv) else {
            panic!("not a probe command line");
        };
        assert_eq!(parsed.to_args(), args.to_args());
    }

    fn probe_for_40_ms(connect: SocketAddr) -> ProbeReport {
        let args = ProbeArgs {
            connect,
            every_ms: 2,
            timeout_ms: 3_000,
            max_ms: 40,
        };
        probe(&args, &AtomicBool::new(false), || {}).unwrap()
    }

    #[test]
    fn serves_and_counts_new_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Echoes one message per connection; ends when the listener's socket is shut below.
        let server = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let mut message = [0; MESSAGE_LEN];
                if stream.read_exact(&mut message).is_err() || message == [0; MESSAGE_LEN] {
                    break;
                }
                stream.write_all(&message).unwrap();
            }
        });
        let report = probe_for_40_ms(addr);
        // The server's last connection: sixteen zero bytes end it.
        std::net::TcpStream::connect(addr)
            .unwrap()
            .write_all(&[0; MESSAGE_LEN])
            .unwrap();
        server.join().unwrap();
        assert!(report.attempted >= 15, "{report:?}");
        assert_eq!(report.served, report.attempted, "{report:?}");
        assert!(report.served_ms.max_ms > 0.0, "{report:?}");
        assert!(report.unserved.is_empty() && report.stopped_ns > report.started_ns);

        // Nothing listens on that port any more: every attempt is refused.
        let refused = probe_for_40_ms(addr);
        assert!(refused.attempted >= 15, "{refused:?}");
        assert_eq!(refused.refused, refused.attempted, "{refused:?}");
        assert_eq!(refused.unserved.len() as u64, refused.attempted);
    }

    #[test]
    fn outcomes_of_errors() {
        let refused = io::Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(outcome_of(&refused), Outcome::Refused);
        let reset = io::Error::from(ErrorKind::ConnectionReset);
        assert_eq!(outcome_of(&reset), Outcome::Refused);
        let other = io::Error::from(ErrorKind::HostUnreachable);
        assert_eq!(outcome_of(&other), Outcome::Failed);
    }
}
