//! One migration under load, as a user of the service would live it: echo servers on the
//! source (one per 15,000 connections, all on the service port), the open-loop clients on the
//! client host, `tcpmig agent` on the destination (it becomes an echo server adopting the
//! restored connections, or starts one per group of them when they do not fit in one process)
//! and `tcpmig migrate --stop-source --json` with every server's pid on the source. The two
//! talk mutual TLS with the bed's own certificates ([`Pki`]), or plaintext with a token when
//! asked (to measure what TLS costs).
//!
//! Beside the load, the client host tries new connections through the migration (the prober:
//! one every 2 ms from [`probe::LEAD`] before `tcpmig migrate` starts to [`probe::TAIL`] after
//! the new servers are ready), and its TCP counters (nstat) are read before the migration and
//! after the load has ended: what the clients retransmitted. The scaling bench measures it; the
//! downtime test asserts its counts.

use std::fs;
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};

use crate::load::now_ns;
use crate::{
    EchoServers, IFACE, LineProcess, LoadConfig, LoadReport, LoadRun, Pki, ProbeArgs, ProbeReport,
    ProbeRun, Role, TcpCounters, TestBed, probe,
};

/// The service's port and the agent's.
pub const PORT: u16 = 9000;
pub const AGENT_PORT: u16 = 7070;
/// Traffic before the migration: every connection has had echoes before the blackout.
const WARMUP: Duration = Duration::from_secs(1);
/// The schedule's room for the migration itself (agent handshake, blackout, hand-over); a
/// slower migration still completes, the clients only stop sending sooner after it.
const MIGRATION_ALLOWANCE: Duration = Duration::from_secs(3);
/// Sending goes on at least this long after the allowance, so that a catch-up by
/// retransmission (up to 1.7 s in the notes) happens while the schedule runs.
const SETTLE: Duration = Duration::from_secs(3);
/// Bound on `tcpmig migrate` and on the adopting servers saying `ready`.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the agent and its servers ending after SIGTERM (closing thousands of sockets).
const AGENT_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The programs a loaded migration runs.
pub struct Programs<'a> {
    pub tcpmig: &'a Path,
    pub peer: &'a Path,
}

/// What to run: how many connections, the clients' total rate (the load's default when
/// `None`), and `tcpmig migrate`'s arguments beyond the ones every run has.
pub struct LoadedMigration<'a> {
    pub connections: usize,
    pub rate: Option<f64>,
    pub migrate_args: &'a [&'a str],
    /// Plaintext link with a token (`--insecure`) instead of mutual TLS.
    pub insecure: bool,
}

/// What one loaded migration saw.
pub struct Outcome {
    /// `tcpmig migrate --json` as printed.
    pub report: serde_json::Value,
    /// What the clients saw of their connections.
    pub load: LoadReport,
    /// New connections tried through the migration.
    pub new_connections: ProbeReport,
    /// The clients' TCP counters over the migration and the rest of the load.
    pub client_tcp: TcpCounters,
    /// The end of the blackout as the agent reports it, on [`now_ns`]'s clock.
    pub live_ns: u64,
}

impl LoadedMigration<'_> {
    /// Runs it on a bed of its own.
    pub fn run(&self, programs: &Programs<'_>) -> anyhow::Result<Outcome> {
        let n = self.connections;
        let bed = TestBed::new()?;
        let link = LinkFiles::new(&bed, self.insecure)?;
        let service = TestBed::service(false);
        let echo = EchoServers::listen(bed.source(), programs.peer, service, PORT, n)?;
        let mut agent = EchoAgent::start(&bed, programs, &link.agent_args())?;
        let config = self.load_config();
        let warmup = WARMUP.max(config.interval(n) * 2);
        let config = LoadConfig {
            duration: warmup + MIGRATION_ALLOWANCE + SETTLE.max(config.interval(n) * 2),
            ..config
        };
        let mut load = LoadRun::start(&bed, programs.peer, echo.addr(), n, &config)?;
        thread::sleep(warmup.saturating_sub(probe::LEAD));
        let counters = TcpCounters::read_in(bed.client())?;
        let prober = ProbeRun::start(bed.client(), programs.peer, &ProbeArgs::new(echo.addr()))?;
        thread::sleep(probe::LEAD);
        let report = migrate(
            &bed,
            programs.tcpmig,
            &echo,
            &link.source_args(),
            self.migrate_args,
        )?;
        let destination = &report["destination"];
        let servers = destination["shards"].as_u64().unwrap_or(1) as usize;
        agent.servers_ready(servers)?;
        let live_at = destination["live_at_unix_ms"]
            .as_f64()
            .with_context(|| format!("no destination.live_at_unix_ms in {report}"))?;
        let live_ns = monotonic_ns_of(live_at);
        load.mark_at(live_ns)?;
        thread::sleep(probe::TAIL);
        let new_connections = prober.finish()?;
        let load = load.finish()?;
        let client_tcp = TcpCounters::read_in(bed.client())?.since(&counters);
        Ok(Outcome {
            report,
            load,
            new_connections,
            client_tcp,
            live_ns,
        })
    }

    fn load_config(&self) -> LoadConfig {
        let defaults = LoadConfig::default();
        LoadConfig {
            rate: self.rate.unwrap_or(defaults.rate),
            ..defaults
        }
    }
}

/// How the two commands of a loaded migration secure their link: their arguments.
enum LinkFiles {
    Tls(Box<Pki>),
    Insecure(TokenFile),
}

impl LinkFiles {
    fn new(bed: &TestBed, insecure: bool) -> anyhow::Result<Self> {
        Ok(if insecure {
            Self::Insecure(TokenFile::new(
                bed,
                "loaded",
                "tcpmig loaded migration token\n",
            )?)
        } else {
            Self::Tls(Box::new(Pki::new(bed, agent_addr().ip())?))
        })
    }

    fn agent_args(&self) -> Vec<String> {
        match self {
            Self::Tls(pki) => pki.agent().args(),
            Self::Insecure(token) => token.insecure_args(),
        }
    }

    fn source_args(&self) -> Vec<String> {
        match self {
            Self::Tls(pki) => pki.source().args(),
            Self::Insecure(token) => token.insecure_args(),
        }
    }
}

/// A token file (mode 0600, as tcpmig demands), removed when dropped.
pub struct TokenFile(pub PathBuf);

impl TokenFile {
    pub fn new(bed: &TestBed, which: &str, token: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}-{which}.token", bed.prefix()));
        fs::write(&path, token)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(Self(path))
    }

    /// `--insecure --token-file PATH`: a plaintext link that checks this token.
    pub fn insecure_args(&self) -> Vec<String> {
        vec![
            "--insecure".into(),
            "--token-file".into(),
            self.0.display().to_string(),
        ]
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `tcpmig agent` on the destination; once the connections are live it becomes the test bed's
/// echo server (`tcpmig-peer echo-server --from-listen-fds`) adopting them and the listener it
/// made ahead, or, past what one process holds, starts one server per group of them. Each server
/// says `ready` on the agent's stdout (started ones inherit it). Dropping it ends the agent with
/// SIGTERM, which it passes on to the servers it started: the bed only knows the agent's pid.
struct EchoAgent<'bed>(LineProcess<'bed>);

impl<'bed> EchoAgent<'bed> {
    fn start(
        bed: &'bed TestBed,
        programs: &Programs<'_>,
        link_args: &[String],
    ) -> anyhow::Result<Self> {
        let host = bed.destination();
        let mut cmd = host.command(programs.tcpmig)?;
        cmd.arg("agent")
            .arg("--listen")
            .arg(agent_addr().to_string())
            .args(["--netns", host.name(), "--dev", IFACE])
            .args(link_args)
            .arg("--")
            .arg(programs.peer)
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

impl Drop for EchoAgent<'_> {
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

/// Runs `tcpmig migrate --stop-source --json` of the echo servers (one migration) on the source
/// to its end (bounded) and returns its report.
fn migrate(
    bed: &TestBed,
    tcpmig: &Path,
    echo: &EchoServers<'_>,
    link_args: &[String],
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let host = bed.source();
    let mut cmd = host.command(tcpmig)?;
    cmd.arg("migrate");
    for pid in echo.pids() {
        cmd.args(["--pid", &pid.to_string()]);
    }
    cmd.args(["--service", &echo.addr().to_string()])
        .args(["--dev", IFACE, "--to", &agent_addr().to_string()])
        .args(link_args)
        .args(["--stop-source", "--stop-signal", "USR1", "--json"])
        .args(extra)
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

/// The instant `unix_ms` (wall clock, as the agent reports it) on the load generator's
/// monotonic clock: both clocks are this machine's, so the offset is read once, now.
fn monotonic_ns_of(unix_ms: f64) -> u64 {
    let now_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let ago_ns = ((now_unix_ms - unix_ms).max(0.0) * 1e6) as u64;
    now_ns().saturating_sub(ago_ns)
}
