//! `tcpmig demo`: a client, a source and a destination host in network namespaces on this
//! machine (tcpmig-testbed), a server holding N live connections with traffic flowing both ways,
//! an agent and a migration; then every byte is checked, a new connection is made, and
//! everything is removed. The traffic peers are this binary itself (`demo --peer-role ...`).
use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Args, Parser as _};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tcpmig_testbed::{
    IFACE, MAX_SOCKETS_PER_PEER, Peer, PeerArgs, PeerCommand, Pki, Report as PeerReport, Role,
    SERVICE_V4, StreamArgs, TcpCounters, TestBed, Traffic, command_all, peer_process,
};

use super::print_json;

const SERVICE_PORT: u16 = 8080;
const AGENT_PORT: u16 = 7070;
/// Bytes each way on every connection before the migration.
const INITIAL_BYTES: u64 = 1024;
/// Bound on the migration command and on each wait of the peers.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
const PEER_TIMEOUT_SECS: u64 = 60;
/// Traffic flows this long before the migration starts and after it ended.
const SETTLE: Duration = Duration::from_millis(100);
/// Pause between two rounds of client writes.
const ROUND_PAUSE: Duration = Duration::from_millis(20);

#[derive(Args)]
pub struct DemoArgs {
    /// Live connections to migrate (at most 15,000: one server process holds them).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Internal: act as a traffic peer with these arguments (see tcpmig-testbed's peer docs).
    #[arg(
        long,
        hide = true,
        num_args = 1..,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    peer_role: Option<Vec<String>>,
}

/// What `tcpmig demo --json` prints. Durations in milliseconds.
#[derive(Serialize)]
struct DemoReport {
    connections: usize,
    /// Connections verified byte-exact in both directions after the migration.
    kept: u64,
    /// Resets, wrong bytes, timeouts and other failures seen by either side.
    resets: u64,
    mismatched: u64,
    failed: u64,
    /// Bytes verified after the migration: client to server, server to client.
    bytes_to_server: u64,
    bytes_to_client: u64,
    /// Client bytes sent while the migration ran (per connection).
    sent_during_migration: u64,
    /// A new connection to the service was served on the destination.
    new_connection: bool,
    blackout_ms: f64,
    /// From the application stopped to the freeze (0 if `tcpmig migrate` did not say).
    stop_to_freeze_ms: f64,
    /// From the end of the blackout until the new server had read everything every client had
    /// written so far, including what the freeze dropped (an upper bound: the read starts once
    /// `tcpmig migrate` has returned).
    catch_up_ms: f64,
    /// The clients' TCP counters (nstat, in their namespace) from before the migration to
    /// after the check of every byte.
    client_tcp: TcpCounters,
    /// The `tcpmig migrate --json` report, with `catch_up_ms` added.
    migration: serde_json::Value,
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(peer) = args.peer_role {
        let argv = std::iter::once("tcpmig-peer".to_owned()).chain(peer);
        return peer_process::run(PeerArgs::try_parse_from(argv)?);
    }
    let n = args.connections;
    ensure!(
        (1..=MAX_SOCKETS_PER_PEER).contains(&n),
        "--connections {n}: give 1 to {MAX_SOCKETS_PER_PEER} (one server process holds them)"
    );
    let report = run(n)?;
    if args.json {
        print_json(&report)?;
    } else {
        print!("{}", summary(&report));
    }
    ensure!(
        report.kept == n as u64 && report.new_connection,
        "the migration lost connections: see the report"
    );
    Ok(())
}

/// A directory for the peer launcher, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tcpmig-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self(dir))
    }

    fn file(&self, name: &str, content: &str, mode: u32) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One step on the progress display: a spinner while it runs, its time once done.
fn step<T>(what: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let bar = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"))
        .with_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let result = work();
    bar.finish_and_clear();
    if bar.is_hidden() {
        return result;
    }
    let mark = if result.is_ok() { "done" } else { "FAILED" };
    eprintln!("{what}: {mark} in {:.2} s", started.elapsed().as_secs_f64());
    result
}

/// How many bytes per connection the server queues right before the migration,
/// and the clients send on every round during it. Per-connection amounts shrink as N grows so
/// that memory and the image stay small.
fn amounts(n: usize) -> (u64, u64) {
    let n = n as u64;
    (
        ((8 << 20) / n).clamp(1024, 256 << 10),
        ((1 << 20) / n).clamp(64, 1024),
    )
}

/// Most bytes per connection the clients write that no server has read yet: the server reads
/// only on command, and a full receive window would block the clients.
const UNREAD_BUDGET: u64 = 32 << 10;

fn run(n: usize) -> anyhow::Result<DemoReport> {
    let exe = std::env::current_exe().context("finding the tcpmig binary")?;
    let scratch = Scratch::new()?;
    let launcher = scratch.file(
        "peer",
        &format!(
            "#!/bin/sh\nexec '{}' demo --peer-role \"$@\"\n",
            exe.display()
        ),
        0o700,
    )?;
    let bed = step(
        "building client, source and destination namespaces",
        TestBed::new,
    )?;
    // The agent's certificate names its address, which `tcpmig migrate --to` checks.
    let pki = Pki::new(&bed, Role::Destination.v4().into())?;
    let service = SocketAddr::new(SERVICE_V4.into(), SERVICE_PORT);
    let stream = StreamArgs {
        timeout_secs: PEER_TIMEOUT_SECS,
        ..StreamArgs::new(INITIAL_BYTES)
    };
    let mut traffic = step(&format!("opening {n} connections"), || {
        let mut traffic = Traffic::open_at(&bed, &launcher, service, n, stream)?;
        let first = traffic.verify()?;
        ensure!(
            first.all_verified(n as u64),
            "before the migration: {first:?}"
        );
        Ok(traffic)
    })?;
    let (burst, round) = amounts(n);
    let mut old_server = traffic.servers.pop().context("one server process")?;
    // Queued now, still flowing to the clients while the migration starts.
    let queued = old_server.command(PeerCommand::Send { bytes: burst })?;
    ensure!(queued.all_verified(), "server burst: {queued:?}");
    let server_sent = INITIAL_BYTES + burst;
    let parts = Parts {
        bed: &bed,
        exe: &exe,
        launcher: &launcher,
        pki: &pki,
        service,
        stream,
        round,
        server_sent,
    };
    let counters = TcpCounters::read_in(bed.client())?;
    let (migration, agent, client_sent) = step(
        &format!("migrating {n} connections with traffic flowing"),
        || migrate_under_traffic(&parts, &mut traffic.clients, old_server),
    )?;
    traffic.servers.push(agent);
    let blackout_ms = migration["blackout_ms"].as_f64().unwrap_or_default();
    let catch_up_ms = migration["catch_up_ms"].as_f64().unwrap_or_default();
    let (to_server, to_client) = step("verifying every byte", || {
        verify(&mut traffic, client_sent, server_sent, round)
    })?;
    let client_tcp = TcpCounters::read_in(bed.client())?.since(&counters);
    let new_connection = step("a new connection to the destination", || {
        new_connection(&bed, &launcher, service, stream)
    })?;
    let client_sent = client_sent - INITIAL_BYTES;
    let failed = |r: &PeerReport| r.timeouts + r.errors;
    Ok(DemoReport {
        connections: n,
        kept: to_server.verified.min(to_client.verified),
        resets: to_server.resets + to_client.resets,
        mismatched: to_server.mismatched + to_client.mismatched,
        failed: failed(&to_server) + failed(&to_client),
        bytes_to_server: to_server.bytes_in,
        bytes_to_client: to_client.bytes_in,
        sent_during_migration: client_sent,
        new_connection,
        blackout_ms,
        stop_to_freeze_ms: migration["stop_to_freeze_ms"].as_f64().unwrap_or_default(),
        catch_up_ms,
        client_tcp,
        migration,
    })
}

/// Checks every byte each way after the migration, and that the new server goes on writing;
/// returns the servers' and the clients' reports.
fn verify(
    traffic: &mut Traffic<'_>,
    client_sent: u64,
    server_sent: u64,
    round: u64,
) -> anyhow::Result<(PeerReport, PeerReport)> {
    let to_server = command_all(
        &mut traffic.servers,
        PeerCommand::Verify {
            until: Some(client_sent),
        },
    )?;
    command_all(
        &mut traffic.clients,
        PeerCommand::Verify {
            until: Some(server_sent),
        },
    )?;
    // The destination's server goes on writing.
    command_all(&mut traffic.servers, PeerCommand::Send { bytes: round })?;
    let to_client = command_all(
        &mut traffic.clients,
        PeerCommand::Verify {
            until: Some(server_sent + round),
        },
    )?;
    Ok((to_server, to_client))
}

/// What the migration steps need to know about the bed and the traffic.
struct Parts<'a> {
    bed: &'a TestBed,
    exe: &'a Path,
    launcher: &'a Path,
    /// The certificates of the link's mutual TLS.
    pki: &'a Pki,
    service: SocketAddr,
    stream: StreamArgs,
    /// Bytes each client writes per round.
    round: u64,
    /// Where the old server's stream ends.
    server_sent: u64,
}

/// The agent on the destination; once the connections are live it becomes an adopting server
/// that goes on where the old one stopped (it wrote `server_sent` and read `received`).
fn start_agent<'bed>(parts: &Parts<'bed>, received: u64) -> anyhow::Result<Peer<'bed>> {
    let host = parts.bed.destination();
    let adopting = PeerArgs::adopting_server(StreamArgs {
        sent_already: parts.server_sent,
        received_already: received,
        ..parts.stream
    });
    let (exe, launcher) = (parts.exe, parts.launcher);
    let mut cmd = host.command(exe)?;
    cmd.arg("agent")
        .arg("--listen")
        .arg(SocketAddr::new(Role::Destination.v4().into(), AGENT_PORT).to_string())
        .args(["--netns", host.name(), "--dev", IFACE])
        .args(parts.pki.agent().args())
        .arg("--")
        .arg(launcher)
        .args(adopting.to_args());
    Peer::spawn(host, cmd, "tcpmig agent", MIGRATION_TIMEOUT)
}

/// Runs `tcpmig migrate` while the clients keep writing; returns its report, the adopting
/// server, and how much each client wrote since the start of the stream.
fn migrate_under_traffic<'bed>(
    parts: &Parts<'bed>,
    clients: &mut [Peer<'bed>],
    mut old_server: Peer<'bed>,
) -> anyhow::Result<(serde_json::Value, Peer<'bed>, u64)> {
    let stop = AtomicBool::new(false);
    // Bytes per connection the clients wrote, and those a server read (beyond INITIAL_BYTES).
    let sent = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| keep_sending(clients, &stop, &sent, &read, parts.round));
        let result = (|| -> anyhow::Result<_> {
            std::thread::sleep(SETTLE);
            // The old server reads up to here, then idles: it is stopped between two commands.
            let upto = catch_reader_up(&mut old_server, &sent, &read)?;
            let mut agent = start_agent(parts, INITIAL_BYTES + upto)?;
            let mut migration = run_migrate(parts, old_server.pid(), &mut agent)?;
            // Everything the clients wrote, including what the freeze dropped and they must
            // send again, has reached the new server: they caught up.
            catch_reader_up(&mut agent, &sent, &read)?;
            let live_at = migration["destination"]["live_at_unix_ms"].as_f64();
            migration["catch_up_ms"] = live_at.map(|t| unix_ms() - t).into();
            let settled = Instant::now() + SETTLE;
            while Instant::now() < settled {
                catch_reader_up(&mut agent, &sent, &read)?;
            }
            Ok((migration, agent))
        })();
        stop.store(true, Ordering::Relaxed);
        let sender = sender
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // Ended by the migration (--stop-source): dropping the handle reaps it.
        drop(old_server);
        let (migration, agent) = result?;
        Ok((migration, agent, INITIAL_BYTES + sender?))
    })
}

/// Has `server` read everything the clients wrote so far; returns that offset (past
/// INITIAL_BYTES).
fn catch_reader_up(
    server: &mut Peer<'_>,
    sent: &AtomicU64,
    read: &AtomicU64,
) -> anyhow::Result<u64> {
    let upto = sent.load(Ordering::Acquire);
    let report = server.command(PeerCommand::Verify {
        until: Some(INITIAL_BYTES + upto),
    })?;
    ensure!(
        report.all_verified(),
        "server reading during the migration: {report:?}"
    );
    read.store(upto, Ordering::Release);
    Ok(upto)
}

/// The clients' side while the migration runs: a round of writes on every connection every few
/// milliseconds, as long as the servers keep up, until told to stop. Returns the bytes written
/// per connection.
fn keep_sending(
    clients: &mut [Peer<'_>],
    stop: &AtomicBool,
    sent: &AtomicU64,
    read: &AtomicU64,
    round: u64,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    while !stop.load(Ordering::Relaxed) {
        ensure!(Instant::now() < deadline, "the migration did not end");
        let written = sent.load(Ordering::Acquire);
        if written + round - read.load(Ordering::Acquire) <= UNREAD_BUDGET {
            let wrote = command_all(clients, PeerCommand::Send { bytes: round })?;
            ensure!(
                wrote.all_verified(),
                "clients writing during the migration: {wrote:?}"
            );
            sent.store(written + round, Ordering::Release);
        }
        std::thread::sleep(ROUND_PAUSE);
    }
    Ok(sent.load(Ordering::Acquire))
}

/// `tcpmig migrate --json` on the source, and the agent's word that the sockets were handed on.
fn run_migrate(
    parts: &Parts<'_>,
    pid: u32,
    agent: &mut Peer<'_>,
) -> anyhow::Result<serde_json::Value> {
    let host = parts.bed.source();
    let mut cmd = host.command(parts.exe)?;
    cmd.arg("migrate")
        .args([
            "--pid",
            &pid.to_string(),
            "--service",
            &parts.service.to_string(),
        ])
        .args(["--dev", IFACE, "--to"])
        .arg(SocketAddr::new(Role::Destination.v4().into(), AGENT_PORT).to_string())
        .args(parts.pki.source().args())
        .args(["--stop-source", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = host.spawn(&mut cmd)?;
    let adopted = agent.expect_line("ready");
    let status = child
        .wait_timeout(MIGRATION_TIMEOUT)?
        .with_context(|| format!("tcpmig migrate did not end in {MIGRATION_TIMEOUT:?}"))?;
    let output = |pipe: Option<&mut dyn std::io::Read>| {
        let mut text = String::new();
        if let Some(pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    };
    let pipes = child.child_mut();
    let stdout = output(pipes.stdout.as_mut().map(|p| p as &mut dyn std::io::Read));
    let stderr = output(pipes.stderr.as_mut().map(|p| p as &mut dyn std::io::Read));
    if !status.success() {
        bail!("tcpmig migrate failed ({status}): {}", stderr.trim());
    }
    adopted.context("the agent did not hand the connections over")?;
    serde_json::from_str(&stdout).with_context(|| format!("tcpmig migrate printed {stdout:?}"))
}

/// A new client connects to the service, now on the destination, and a new server answers it.
fn new_connection(
    bed: &TestBed,
    launcher: &Path,
    service: SocketAddr,
    stream: StreamArgs,
) -> anyhow::Result<bool> {
    let mut server = Peer::start(
        bed.destination(),
        launcher,
        &PeerArgs::server(service, 1, stream),
    )?;
    server.expect_line("listening")?;
    let mut client = Peer::start(
        bed.client(),
        launcher,
        &PeerArgs::client(service, 1, stream),
    )?;
    client.expect_line("ready")?;
    server.expect_line("ready")?;
    let both = [
        client.command(PeerCommand::Verify { until: None })?,
        server.command(PeerCommand::Verify { until: None })?,
    ];
    Ok(both.iter().all(PeerReport::all_verified))
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn summary(r: &DemoReport) -> String {
    let m = &r.migration;
    let phase = |name: &str| m["phases"][name].as_f64().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tcpmig demo: {kept}/{n} connections kept (byte-exact both ways, {resets} resets)",
        kept = r.kept,
        n = r.connections,
        resets = r.resets
    );
    let tcp = &r.client_tcp;
    // 0 when `tcpmig migrate --json` does not report it.
    let stopped = if r.stop_to_freeze_ms > 0.0 {
        format!(" ({:.1} ms after the stop)", r.stop_to_freeze_ms)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "blackout {:.1} ms{stopped}, clients caught up {:.0} ms after it (at most); clients \
         retransmitted {} segments ({} timeouts, {} SYN, {} loss probes)",
        r.blackout_ms,
        r.catch_up_ms,
        tcp.retrans_segs,
        tcp.timeouts,
        tcp.syn_retrans,
        tcp.loss_probes,
    );
    let _ = writeln!(
        out,
        "phases (ms): stop {:.1}, discover {:.1}, freeze {:.3}, dump {:.1}, transfer {:.1}, \
         restore {:.1}, address {:.1}, commit {:.1}",
        phase("stop_ms"),
        phase("discover_ms"),
        phase("freeze_ms"),
        phase("dump_ms"),
        phase("transfer_ms"),
        phase("restore_ms"),
        phase("address_ms"),
        phase("commit_ms"),
    );
    let _ = writeln!(
        out,
        "image {} bytes (mutual TLS 1.3); {} bytes to the server and {} to the clients \
         verified after the move; new connection on the destination: {}",
        m["image_bytes"],
        r.bytes_to_server,
        r.bytes_to_client,
        if r.new_connection { "served" } else { "FAILED" }
    );
    out
}
