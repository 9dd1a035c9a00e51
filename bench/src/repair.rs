//! Socket-plane cost at N idle connections (1 byte queued each way's receive queue, as in
//! notes/tcp-repair.md): dump and restore with the library (sharded over the CPUs), and in the
//! same run the same calls as a plain one-thread loop ([`Workers::One`]).
//!
//! The migrating ends live in this process, the peers in a `python3` child: at 10,000
//! connections both ends in one process would pass the 20,000 fd limit. Everything runs in a
//! network namespace made for the run and deleted afterwards, on its loopback.
use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::fd::OwnedFd,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use tcpmig::{
    image,
    net::Netns,
    repair::{self, Connection, Workers},
};

#[derive(Clone, Debug, Serialize)]
pub struct RepairBench {
    pub connections: usize,
    pub cpus: usize,
    /// Library, sharded: repair on + state + peeks, per connection.
    pub dump_us_per_conn: f64,
    /// Library, sharded: socket ... repair off, per connection.
    pub restore_us_per_conn: f64,
    /// The same calls on one thread.
    pub plain_dump_us_per_conn: f64,
    pub plain_restore_us_per_conn: f64,
    pub total_ms: f64,
    pub plain_total_ms: f64,
    /// total / plain total: the design's goal is at most 0.5.
    pub ratio: f64,
    pub image_bytes: usize,
}

/// Peers: connect N times, send one byte on each, say "ready", hold until stdin closes.
const PEER: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port))
    s.sendall(b"x")
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"#;

const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

struct Namespace {
    name: String,
}

impl Namespace {
    fn new() -> anyhow::Result<Self> {
        let ns = Self {
            name: format!("tcpmig-bench-{}", std::process::id()),
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    ensure!(status.success(), "ip {} failed", args.join(" "));
    Ok(())
}

/// The peer process; closing its stdin ends it, and drop also kills it (by its pid).
struct Peers {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(n: usize) -> anyhow::Result<RepairBench> {
    let ns = Namespace::new()?;
    let netns = Netns::open(&ns.name)?;
    let listener = netns.run(|| TcpListener::bind("127.0.0.1:0"))??;
    let port = listener.local_addr()?.port().to_string();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "python3",
            "-c",
            PEER,
            "127.0.0.1",
            &port,
        ])
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the python3 peers")?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let peers = Peers {
        stdin: child.stdin.take(),
        child,
    };
    let fds = accept(&listener, n)?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(line.trim() == "ready", "peers failed to connect: {line:?}");
    // Let the last bytes and ACKs land.
    std::thread::sleep(Duration::from_millis(200));

    let (dump, restore, conns, fds) = round(&netns, Workers::PerCpu, fds)?;
    let image_bytes = image::encode(&conns).len();
    let (plain_dump, plain_restore, _, fds) = round(&netns, Workers::One, fds)?;
    ensure!(fds.len() == n, "{} of {n} connections came back", fds.len());
    drop(fds);
    drop(peers);

    let per_conn = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let total = dump + restore;
    let plain_total = plain_dump + plain_restore;
    Ok(RepairBench {
        connections: n,
        cpus: std::thread::available_parallelism().map_or(1, |c| c.get()),
        dump_us_per_conn: per_conn(dump),
        restore_us_per_conn: per_conn(restore),
        plain_dump_us_per_conn: per_conn(plain_dump),
        plain_restore_us_per_conn: per_conn(plain_restore),
        total_ms: total.as_secs_f64() * 1e3,
        plain_total_ms: plain_total.as_secs_f64() * 1e3,
        ratio: total.as_secs_f64() / plain_total.as_secs_f64(),
        image_bytes,
    })
}

/// Dump (timed), silent close, restore and repair off (timed); returns the live sockets.
fn round(
    netns: &Netns,
    workers: Workers,
    fds: Vec<OwnedFd>,
) -> anyhow::Result<(Duration, Duration, Vec<Connection>, Vec<OwnedFd>)> {
    let started = Instant::now();
    let dumped = repair::dump_with(workers, fds)?;
    let dump = started.elapsed();
    let conns = dumped.connections().to_vec();
    dumped.commit();
    let started = Instant::now();
    let committed = repair::restore_with(workers, netns, &conns)?.commit();
    let restore = started.elapsed();
    if let Some(failure) = committed.failures.into_iter().next() {
        return Err(failure.into());
    }
    let fds = committed.sockets.into_iter().map(|s| s.fd).collect();
    Ok((dump, restore, conns, fds))
}

fn accept(listener: &TcpListener, n: usize) -> anyhow::Result<Vec<OwnedFd>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut fds = Vec::with_capacity(n);
    while fds.len() < n {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                fds.push(OwnedFd::from(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {n} peers connected within {SETUP_TIMEOUT:?}",
                        fds.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(fds)
}

pub fn markdown(results: &[RepairBench]) -> String {
    let mut md = String::from(
        "### Bulk dump and restore (microseconds per connection; total in ms)\n\n\
         | N | dump | restore | one-thread dump | one-thread restore | total | one-thread total | ratio |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            r.connections,
            r.dump_us_per_conn,
            r.restore_us_per_conn,
            r.plain_dump_us_per_conn,
            r.plain_restore_us_per_conn,
            r.total_ms,
            r.plain_total_ms,
            r.ratio
        ));
    }
    md
}
