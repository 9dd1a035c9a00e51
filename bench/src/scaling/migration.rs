//! One measured migration on a fresh bed: echo servers on the source (one per 15,000
//! connections, all on the service port), the open-loop clients on the client host,
//! `tcpmig agent` on the destination (it becomes an echo server adopting the restored
//! connections, or starts one per group of them when they do not fit in one process) and
//! `tcpmig migrate --stop-source --json` with every server's pid on the source: one migration.
//!
//! The clients' catch-up is counted from the end of the blackout as the agent reports it
//! (`live_at_unix_ms`), not from the moment `tcpmig migrate` returned: the source learns of the
//! end only after a round trip and its own clean-up, which would hide part of the catch-up.
//!
//! Beside the load, the client host tries new connections through the migration (the test
//! bed's prober: one every 2 ms from [`probe::LEAD`] before `tcpmig migrate` starts to
//! [`probe::TAIL`] after the new servers are ready), and its TCP counters (nstat) are read
//! before the migration and after the load has ended: what the clients retransmitted.

use std::fs;
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};
use tcpmig_testbed::load::now_ns;
use tcpmig_testbed::{
    EchoServers, IFACE, LineProcess, LoadConfig, LoadReport, LoadRun, ProbeArgs, ProbeReport,
    ProbeRun, Role, TcpCounters, TestBed, probe,
};

use super::ScalingArgs;
use crate::criu::Binaries;

const PORT: u16 = 9000;
const AGENT_PORT: u16 = 7070;
/// Traffic before the migration: every connection has had echoes before the blackout.
const WARMUP: Duration = Duration::from_secs(1);
/// The schedule's room for the migration itself (agent handshake, blackout, hand-over); a
/// slower migration still completes, the clients only stop sending sooner after it.
const MIGRATION_ALLOWANCE: Duration = Duration::from_secs(3);
/// Sending goes on at least this long after the allowance, so that the catch-up (retransmission
/// backoff: up to 1.7 s in the notes) happens while the schedule runs.
const SETTLE: Duration = Duration::from_secs(3);
/// Bound on `tcpmig migrate` and on the adopting servers saying `ready`.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the agent and its servers ending after SIGTERM (closing thousands of sockets).
const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One migration: the times `tcpmig migrate --json` reported and what the clients saw.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationRun {
    pub connections: usize,
    pub kept: usize,
    pub blackout_ms: f64,
    /// From the application stopped to the freeze: the part of the clients' silence before the
    /// blackout (0 when `tcpmig migrate --json` does not report it).
    pub stop_to_freeze_ms: f64,
    pub total_ms: f64,
    pub phases: Phases,
    /// With `--precopy`: connections restored ahead of the freeze, and those of them that
    /// kept their sockets (they had not moved by the dump).
    pub precopied: usize,
    pub kept_precopied: usize,
    pub load: LoadReport,
    /// The clients' TCP counters over the migration and the rest of the load.
    pub client_tcp: TcpCounters,
    /// New connections tried through the migration.
    pub new_connections: ProbeReport,
    /// Of those not served, how many were tried before the blackout, during it and after it.
    pub unserved_when: [u64; 3],
    /// `tcpmig migrate --json` as printed.
    pub report: serde_json::Value,
}

/// The blackout split into the steps of design.md, in milliseconds, in order.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Phases {
    pub freeze_ms: f64,
    pub dump_ms: f64,
    pub transfer_ms: f64,
    /// From the address deleted on the source to the agent's Restored.
    pub restore_ms: f64,
    /// Deleting the address on the source (while the agent restores), adding and announcing it
    /// on the destination.
    pub address_ms: f64,
    /// Destination unfreeze and the first socket out of repair mode.
    pub unfreeze_ms: f64,
    /// The rest of the blackout: the Commit's way to the agent.
    pub other_ms: f64,
}

impl Phases {
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("freeze", self.freeze_ms),
            ("dump", self.dump_ms),
            ("transfer", self.transfer_ms),
            ("restore", self.restore_ms),
            ("address move", self.address_ms),
            ("unfreeze", self.unfreeze_ms),
            ("other (Commit in flight)", self.other_ms),
        ]
    }
}

/// The fields of `tcpmig migrate --json` used here (README, "Moving a service").
#[derive(Deserialize)]
struct MigrateJson {
    connections: usize,
    kept: usize,
    blackout_ms: f64,
    #[serde(default)]
    stop_to_freeze_ms: f64,
    total_ms: f64,
    phases: SourcePhases,
    destination: AgentJson,
}

#[derive(Deserialize)]
struct SourcePhases {
    freeze_ms: f64,
    dump_ms: f64,
    transfer_ms: f64,
    restore_ms: f64,
    address_ms: f64,
}

#[derive(Deserialize)]
struct AgentJson {
    address_ms: f64,
    live_after_commit_ms: f64,
    live_at_unix_ms: f64,
    /// How many servers the agent started (1: it became the server itself).
    shards: usize,
    #[serde(default)]
    precopied: usize,
    #[serde(default)]
    kept_precopied: usize,
}

impl MigrateJson {
    fn phases(&self) -> Phases {
        let (p, d) = (&self.phases, &self.destination);
        let mut phases = Phases {
            freeze_ms: p.freeze_ms,
            dump_ms: p.dump_ms,
            transfer_ms: p.transfer_ms,
            restore_ms: p.restore_ms,
            address_ms: p.address_ms + d.address_ms,
            unfreeze_ms: (d.live_after_commit_ms - d.address_ms).max(0.0),
            other_ms: 0.0,
        };
        let named: f64 = phases.named().iter().map(|(_, ms)| ms).sum();
        phases.other_ms = (self.blackout_ms - named).max(0.0);
        phases
    }
}

/// A token file for both sides, mode 0600 (tcpmig refuses others), removed when dropped.
struct TokenFile(PathBuf);

impl TokenFile {
    fn new(bed: &TestBed) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}-bench.token", bed.prefix()));
        let file = Self(path);
        fs::write(&file.0, "tcpmig bench token\n")?;
        fs::set_permissions(&file.0, fs::Permissions::from_mode(0o600))?;
        Ok(file)
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Migrates `n` connections under load once, on a bed of its own.
pub fn once(bin: &Binaries, n: usize, args: &ScalingArgs) -> anyhow::Result<MigrationRun> {
    let bed = TestBed::new()?;
    let token = TokenFile::new(&bed)?;
    let echo = EchoServers::listen(bed.source(), &bin.peer, TestBed::service(false), PORT, n)?;
    let mut agent = Agent::start(&bed, bin, &token.0)?;
    let defaults = LoadConfig::default();
    let config = LoadConfig {
        rate: args.rate.unwrap_or(defaults.rate),
        ..defaults
    };
    let interval = config.interval(n);
    let warmup = WARMUP.max(interval * 2);
    let config = LoadConfig {
        duration: warmup + MIGRATION_ALLOWANCE + SETTLE.max(interval * 2),
        ..config
    };
    let mut run = LoadRun::start(&bed, &bin.peer, echo.addr(), n, &config)?;
    thread::sleep(warmup.saturating_sub(probe::LEAD));
    let counters = TcpCounters::read_in(bed.client())?;
    let probe = ProbeRun::start(bed.client(), &bin.peer, &ProbeArgs::new(echo.addr()))?;
    thread::sleep(probe::LEAD);
    let raw = migrate(
        &bed,
        &bin.tcpmig,
        &echo.pids(),
        echo.addr(),
        &token.0,
        args.precopy,
    )?;
    let report: MigrateJson = serde_json::from_value(raw.clone())
        .with_context(|| format!("unexpected `tcpmig migrate --json` output: {raw}"))?;
    // The prober's connections may be open at discovery too.
    ensure!(
        report.connections >= n,
        "tcpmig migrate found {} of the {n} connections",
        report.connections
    );
    agent.servers_ready(report.destination.shards)?;
    let live_ns = monotonic_ns_of(report.destination.live_at_unix_ms);
    run.mark_at(live_ns)?;
    thread::sleep(probe::TAIL);
    let new_connections = probe.finish()?;
    let load = run.finish()?;
    let client_tcp = TcpCounters::read_in(bed.client())?.since(&counters);
    Ok(MigrationRun {
        connections: n,
        kept: report.kept,
        blackout_ms: report.blackout_ms,
        stop_to_freeze_ms: report.stop_to_freeze_ms,
        total_ms: report.total_ms,
        phases: report.phases(),
        precopied: report.destination.precopied,
        kept_precopied: report.destination.kept_precopied,
        load,
        client_tcp,
        unserved_when: unserved_when(&new_connections, live_ns, report.blackout_ms),
        new_connections,
        report: raw,
    })
}

/// `tcpmig agent` on the destination; once the connections are live it becomes the test bed's
/// echo server (`tcpmig-peer echo-server`) adopting them or, past what one process holds, starts
/// one server per group of them. Each server says `ready` on the agent's stdout (started ones
/// inherit it). Dropping it ends the agent with SIGTERM, which it passes on to the servers it
/// started: the bed only knows the agent's pid.
struct Agent<'bed>(LineProcess<'bed>);

impl<'bed> Agent<'bed> {
    fn start(bed: &'bed TestBed, bin: &Binaries, token: &Path) -> anyhow::Result<Self> {
        let host = bed.destination();
        let mut cmd = host.command(&bin.tcpmig)?;
        cmd.arg("agent")
            .arg("--listen")
            .arg(agent_addr().to_string())
            .args(["--netns", host.name(), "--dev", IFACE, "--token-file"])
            .arg(token)
            .arg("--")
            .arg(&bin.peer)
            .args(["echo-server", "--from-listen-fds"]);
        Ok(Self(LineProcess::spawn(host, cmd, "tcpmig agent")?))
    }

    /// Waits for the `ready` of each of the `servers` adopting the connections.
    fn servers_ready(&mut self, servers: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        for k in 0..servers {
            self.0
                .expect("ready", deadline.saturating_duration_since(Instant::now()))
                .with_context(|| format!("{k} of the {servers} adopting servers ready"))?;
        }
        Ok(())
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        // The bed's guard kills the agent itself afterwards anyway.
        if let Err(e) = self.0.terminate(AGENT_EXIT_TIMEOUT) {
            eprintln!("{e:#}");
        }
    }
}

fn agent_addr() -> SocketAddr {
    SocketAddr::new(Role::Destination.v4().into(), AGENT_PORT)
}

/// Runs `tcpmig migrate --json` of the servers `pids` (one migration) on the source to its end
/// (bounded) and returns its report.
fn migrate(
    bed: &TestBed,
    tcpmig: &Path,
    pids: &[u32],
    service: SocketAddr,
    token: &Path,
    precopy: bool,
) -> anyhow::Result<serde_json::Value> {
    let host = bed.source();
    let mut cmd = host.command(tcpmig)?;
    cmd.arg("migrate");
    for pid in pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    cmd.args(["--service", &service.to_string()])
        .args(["--dev", IFACE, "--to", &agent_addr().to_string()])
        .arg("--token-file")
        .arg(token)
        .args(["--stop-source", "--stop-signal", "USR1", "--json"])
        .args(precopy.then_some("--precopy"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = host.spawn(&mut cmd)?;
    // The report is a few kilobytes and errors a few lines: both fit in the pipes meanwhile.
    let status = child
        .wait_timeout(MIGRATION_TIMEOUT)?
        .with_context(|| format!("tcpmig migrate did not end within {MIGRATION_TIMEOUT:?}"))?;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let pipes = child.child_mut();
    if let Some(pipe) = pipes.stdout.as_mut() {
        pipe.read_to_string(&mut stdout)?;
    }
    if let Some(pipe) = pipes.stderr.as_mut() {
        pipe.read_to_string(&mut stderr)?;
    }
    ensure!(
        status.success(),
        "tcpmig migrate failed ({status}): {}",
        stderr.trim()
    );
    serde_json::from_str(&stdout).with_context(|| format!("tcpmig migrate printed {stdout:?}"))
}

/// How many of the new connections not served were tried before, during and after the blackout
/// that ended at `live_ns` (on [`now_ns`]'s clock).
fn unserved_when(probe: &ProbeReport, live_ns: u64, blackout_ms: f64) -> [u64; 3] {
    let frozen_ns = live_ns.saturating_sub((blackout_ms * 1e6) as u64);
    let mut when = [0; 3];
    for attempt in &probe.unserved {
        let k = match attempt.at_ns {
            at if at < frozen_ns => 0,
            at if at <= live_ns => 1,
            _ => 2,
        };
        when[k] += 1;
    }
    when
}

/// The instant `unix_ms` (wall clock, as the agent reports it) on the load generator's
/// monotonic clock: both clocks are this machine's, so the offset is read once, now.
fn monotonic_ns_of(unix_ms: f64) -> u64 {
    let now_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let ago_ns = ((now_unix_ms - unix_ms).max(0.0) * 1e6) as u64;
    now_ns().saturating_sub(ago_ns)
}
