//! One measured rebalance on a bed of its own, as tests/tests/rebalance.rs runs one: an echo
//! server on the source holding the service's N connections and one on the destination serving
//! its own clients, both taking hand-overs on a Unix socket; the open-loop load from the client
//! host, the connections to move from a second client address ([`MOVED_FROM`]) and the others
//! from the client's own; `tcpmig agent --handoff` on the destination and `tcpmig migrate
//! --keep-address --select client=MOVED_FROM/32` on the source. Beside it: new connections tried
//! through the move (the prober), the client host's TCP counters, resets sent by any host, and
//! what the source's steering program cost (its run time, counted while [`SteerCost::count`]'s fd
//! is held, and the steering's own packet counters).

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use tcpmig::freeze::{SteerCost, Steering};
use tcpmig::net::{self, Netns};
use tcpmig_testbed::echo::HandoffEcho;
use tcpmig_testbed::{
    ChildGuard, Host, IFACE, LoadConfig, LoadReport, LoadRun, ProbeArgs, ProbeReport, ProbeRun,
    TcpCounters, TestBed, TokenFile, probe,
};

use crate::criu::Binaries;

/// The service's port (and the destination application's own), and the agent's.
const PORT: u16 = 9200;
const AGENT_PORT: u16 = 7070;
/// The client address of the connections that move, added to the client host's `eth0`.
const MOVED_FROM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
/// The destination application's own connections.
pub const OWN_CONNECTIONS: usize = 200;
/// Traffic before the move, room for the move itself, and sending on after it long enough for a
/// catch-up by retransmission to happen within the schedule (the reasoning of the test bed's
/// loaded migration, tests/src/loaded.rs).
const WARMUP: Duration = Duration::from_secs(1);
const MOVE_ALLOWANCE: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(3);
/// Bound on `tcpmig migrate`, the agent, and the hand-over to the destination's server.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// The counters that end with the connections (the steering's) or that their closing moves (the
/// resets: the echo server sends some when thousands of clients close at once, with or without a
/// move) are read this long before the first load stops sending.
const READ_AHEAD: Duration = Duration::from_millis(200);
/// Bound on the keeper removing the steering once the moved connections closed (1 s of grace).
const STEERING_GONE: Duration = Duration::from_secs(30);

/// One rebalance: what `tcpmig migrate --json` reported and what the clients saw.
#[derive(Clone, Debug, Serialize)]
pub struct RebalanceRun {
    /// The connections the selector picked, of those the application held; those live at the
    /// destination.
    pub picked: usize,
    pub of: usize,
    pub kept: usize,
    /// From the application stopped to the freeze (the picked connections found again, among
    /// the stopped application's), then from the freeze of the moved connections to the first
    /// of them live at the destination, and `tcpmig migrate` from start to end.
    pub stop_to_freeze_ms: f64,
    pub blackout_ms: f64,
    pub total_ms: f64,
    /// From the application stopped to resumed: the pause of the connections that stayed.
    pub application_paused_ms: f64,
    pub phases: Phases,
    /// The loads: the moved connections, those that stayed, and the destination's own.
    pub moved: LoadReport,
    pub staying: LoadReport,
    pub own: LoadReport,
    /// The client host's counters from before the move to the end of the loads (all three).
    pub client_tcp: TcpCounters,
    /// TCP resets sent by the client, source and destination hosts from before the move to
    /// shortly before the first load ended (OutRsts).
    pub resets_sent: u64,
    /// New connections to the service tried through the move.
    pub new_connections: ProbeReport,
    pub steering: SteerFigures,
    /// `tcpmig migrate --json` as printed.
    pub report: serde_json::Value,
}

impl RebalanceRun {
    /// Why the run does not count: a load lost connections or messages.
    pub fn broken(&self) -> Option<String> {
        let loads = [
            ("moved", &self.moved),
            ("staying", &self.staying),
            ("destination's own", &self.own),
        ];
        let broken: Vec<String> = (loads.iter())
            .filter(|(_, l)| l.lost() > 0 || l.missing > 0 || l.verified != l.connections as u64)
            .map(|(which, l)| {
                format!(
                    "{which} load: {} of {} connections lost ({} resets), {} messages missing, \
                     {} verified; first failure: {:?}",
                    l.lost(),
                    l.connections,
                    l.resets,
                    l.missing,
                    l.verified,
                    l.first_failure
                )
            })
            .collect();
        (!broken.is_empty()).then(|| broken.join("; "))
    }
}

/// The phases as the source reports them, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Phases {
    pub prepare_ms: f64,
    pub discover_ms: f64,
    pub stop_ms: f64,
    pub freeze_ms: f64,
    pub dump_ms: f64,
    pub transfer_ms: f64,
    pub restore_ms: f64,
    pub commit_ms: f64,
    pub finish_ms: f64,
}

/// What the steering program cost from before the move to shortly before the first load ended.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SteerFigures {
    /// Frames the program ran on (the source's `eth0` ingress: the forwarded segments and every
    /// other frame), and its run time, as the kernel counts them (BPF_ENABLE_STATS).
    pub program_runs: u64,
    pub cpu_ns: u64,
    /// The steering's own packet counters, summed over its entries: the forwarded segments.
    pub steered_packets: u64,
    pub ns_per_run: f64,
    pub ns_per_steered_packet: f64,
}

/// The fields of `tcpmig migrate --json` used here (docs/rebalance.md).
#[derive(Deserialize)]
struct ReportJson {
    kept: usize,
    stop_to_freeze_ms: f64,
    blackout_ms: f64,
    total_ms: f64,
    application_paused_ms: f64,
    phases: Phases,
    rebalance: RebalanceJson,
}

#[derive(Deserialize)]
struct RebalanceJson {
    picked: usize,
    of: usize,
    steering: Option<String>,
}

/// Moves `fraction` of `n` connections under load once, on a bed of its own.
pub fn once(bin: &Binaries, n: usize, fraction: f64) -> anyhow::Result<RebalanceRun> {
    let moved = moved_of(n, fraction);
    ensure!(
        moved > 0 && moved < n,
        "{fraction} of {n} connections is {moved}: none would move, or none stay"
    );
    let bed = TestBed::new()?;
    let client = Netns::open(bed.client().name())?;
    net::add_address(&client, IFACE, MOVED_FROM.into(), 24)?;
    let dir = std::env::temp_dir().join(format!("tcpmig-{}-rebalance", bed.prefix()));
    fs::create_dir_all(&dir)?;
    let run = measure(&bed, bin, &dir, n, moved);
    let _ = fs::remove_dir_all(&dir);
    run
}

/// The connections `fraction` of `n` moves.
pub fn moved_of(n: usize, fraction: f64) -> usize {
    (n as f64 * fraction).round() as usize
}

fn measure(
    bed: &TestBed,
    bin: &Binaries,
    dir: &Path,
    n: usize,
    moved: usize,
) -> anyhow::Result<RebalanceRun> {
    let service = SocketAddr::new(TestBed::service(false), PORT);
    let own = SocketAddr::new(bed.destination().v4().into(), PORT);
    let source = HandoffEcho::start(bed.source(), &bin.peer, service, &dir.join("source.sock"))?;
    let handoff = dir.join("destination.sock");
    let mut destination = HandoffEcho::start(bed.destination(), &bin.peer, own, &handoff)?;
    let loads = Loads::start(bed, &bin.peer, (service, own), n, moved)?;
    thread::sleep(loads.warmup.saturating_sub(probe::LEAD));
    let counters = TcpCounters::read_in(bed.client())?;
    let resets = resets_sent(bed)?;
    let _counting = SteerCost::count()?;
    let cost = SteerCost::now()?;
    let prober = ProbeRun::start(bed.client(), &bin.peer, &ProbeArgs::new(service))?;
    thread::sleep(probe::LEAD);
    let raw = rebalance(bed, bin, (dir, &handoff), (service, source.pid()))?;
    thread::sleep(probe::TAIL);
    let new_connections = prober.finish()?;
    let report: ReportJson = serde_json::from_value(raw.clone())
        .with_context(|| format!("unexpected `tcpmig migrate --json` output: {raw}"))?;
    let (picked, kept) = (report.rebalance.picked, report.kept);
    ensure!(
        picked == moved && kept == moved,
        "picked {picked} and kept {kept} of the {moved} to move: {raw}"
    );
    let steering = report.rebalance.steering.clone();
    let steering = steering.with_context(|| format!("no steering: {raw}"))?;
    handed(&mut destination, moved)?;
    thread::sleep((loads.end - READ_AHEAD).saturating_duration_since(Instant::now()));
    let steering_figures = steer_figures(&steering, cost)?;
    let resets_sent = resets_sent(bed)?.saturating_sub(resets);
    let (moved_load, staying, own_load) = loads.finish()?;
    let client_tcp = TcpCounters::read_in(bed.client())?.since(&counters);
    steering_gone(&steering)?;
    Ok(RebalanceRun {
        picked,
        of: report.rebalance.of,
        kept,
        stop_to_freeze_ms: report.stop_to_freeze_ms,
        blackout_ms: report.blackout_ms,
        total_ms: report.total_ms,
        application_paused_ms: report.application_paused_ms,
        phases: report.phases,
        moved: moved_load,
        staying,
        own: own_load,
        client_tcp,
        resets_sent,
        new_connections,
        steering: steering_figures,
        report: raw,
    })
}

/// The three loads, all at the same interval per connection, so that the service's two carry
/// the load's default total rate between them.
struct Loads<'bed> {
    staying: LoadRun<'bed>,
    moved: LoadRun<'bed>,
    own: LoadRun<'bed>,
    warmup: Duration,
    /// The end of the first load's schedule (the staying one, started first).
    end: Instant,
}

impl<'bed> Loads<'bed> {
    fn start(
        bed: &'bed TestBed,
        peer: &Path,
        (service, own): (SocketAddr, SocketAddr),
        n: usize,
        moved: usize,
    ) -> anyhow::Result<Self> {
        let defaults = LoadConfig::default();
        let interval = defaults.interval(n);
        let warmup = WARMUP.max(interval * 2);
        let duration = warmup + MOVE_ALLOWANCE + SETTLE.max(interval * 2);
        let config = |connections: usize, first_id: usize, from: Option<Ipv4Addr>| LoadConfig {
            rate: connections as f64 / interval.as_secs_f64(),
            duration,
            first_id: first_id as u32,
            from: from.map(Into::into),
            ..defaults.clone()
        };
        let stay = n - moved;
        let staying = LoadRun::start(bed, peer, service, stay, &config(stay, 0, None))?;
        let end = Instant::now() + duration;
        let moved_config = config(moved, stay, Some(MOVED_FROM));
        let moved = LoadRun::start(bed, peer, service, moved, &moved_config)?;
        let own_config = config(OWN_CONNECTIONS, n, None);
        let own = LoadRun::start(bed, peer, own, OWN_CONNECTIONS, &own_config)?;
        Ok(Self {
            staying,
            moved,
            own,
            warmup,
            end,
        })
    }

    /// The moved, staying and destination's own loads' reports, once each ended.
    fn finish(self) -> anyhow::Result<(LoadReport, LoadReport, LoadReport)> {
        Ok((
            self.moved.finish()?,
            self.staying.finish()?,
            self.own.finish()?,
        ))
    }
}

/// `tcpmig agent --handoff` on the destination and `tcpmig migrate --keep-address` of the
/// source's server `pid` for `service`, selecting the clients at [`MOVED_FROM`]; returns the
/// source's report once both ended.
fn rebalance(
    bed: &TestBed,
    bin: &Binaries,
    (dir, handoff): (&Path, &Path),
    (service, pid): (SocketAddr, u32),
) -> anyhow::Result<serde_json::Value> {
    let token = TokenFile::new(bed, "rebalance", "tcpmig rebalance bench token\n")?;
    let link = token.insecure_args();
    let (from, to) = (bed.source(), bed.destination());
    let agent_addr = SocketAddr::new(to.v4().into(), AGENT_PORT).to_string();
    let mut agent = to.command(&bin.tcpmig)?;
    agent
        .args(["agent", "--listen", &agent_addr, "--netns", to.name()])
        .args(["--dev", IFACE, "--timeout", "10"])
        .args(&link)
        .arg("--handoff")
        .arg(handoff);
    let agent = Logged::spawn(to, agent, dir, "agent")?;
    let mut migrate = from.command(&bin.tcpmig)?;
    migrate
        .args(["migrate", "--pid", &pid.to_string()])
        .args(["--service", &service.to_string()])
        .args(["--dev", IFACE, "--timeout", "10", "--to", &agent_addr])
        .args(["--keep-address", "--stop-signal", "USR1", "--json"])
        .args(["--steer-grace", "1", "--steer-idle", "30"])
        .args(["--select", &format!("client={MOVED_FROM}/32")])
        .args(&link);
    let stdout = Logged::spawn(from, migrate, dir, "migrate")?.finish()?;
    agent.finish()?;
    serde_json::from_str(&stdout).with_context(|| format!("tcpmig migrate printed {stdout:?}"))
}

/// A command in a bed host whose stdout and stderr go to files in a directory: nothing to drain
/// while it runs, and its errors to quote when it fails.
struct Logged<'bed> {
    child: ChildGuard<'bed>,
    what: &'static str,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl<'bed> Logged<'bed> {
    fn spawn(
        host: &'bed Host,
        mut cmd: std::process::Command,
        dir: &Path,
        what: &'static str,
    ) -> anyhow::Result<Self> {
        let (stdout, stderr) = (
            dir.join(format!("{what}.out")),
            dir.join(format!("{what}.err")),
        );
        cmd.stdin(std::process::Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?);
        let child = host.spawn(&mut cmd)?;
        Ok(Self {
            child,
            what,
            stdout,
            stderr,
        })
    }

    /// Waits (bounded) for it to end; its stdout if it succeeded.
    fn finish(mut self) -> anyhow::Result<String> {
        let status = self.child.wait_timeout(COMMAND_TIMEOUT)?;
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        let Some(status) = status else {
            bail!(
                "tcpmig {} did not end within {COMMAND_TIMEOUT:?}: {}",
                self.what,
                stderr.trim()
            );
        };
        ensure!(
            status.success(),
            "tcpmig {} failed ({status}): {}",
            self.what,
            stderr.trim()
        );
        Ok(fs::read_to_string(&self.stdout)?)
    }
}

/// Waits until the destination's server took `moved` connections handed over.
fn handed(destination: &mut HandoffEcho<'_>, moved: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut taken = 0;
    while taken < moved {
        taken += destination.handed(deadline.saturating_duration_since(Instant::now()))?;
    }
    ensure!(
        taken == moved,
        "the destination's server took {taken} of {moved}"
    );
    Ok(())
}

/// What the steering programs cost since `before`, per run and per packet of `steering`.
fn steer_figures(steering: &str, before: SteerCost) -> anyhow::Result<SteerFigures> {
    let steered_packets: u64 = (Steering::open(steering)?.entries()?.iter())
        .map(|e| e.packets)
        .sum();
    let now = SteerCost::now()?;
    let program_runs = now.runs.saturating_sub(before.runs);
    let cpu_ns = u64::try_from(now.cpu.saturating_sub(before.cpu).as_nanos())?;
    let per = |count: u64| cpu_ns as f64 / count.max(1) as f64;
    Ok(SteerFigures {
        program_runs,
        cpu_ns,
        steered_packets,
        ns_per_run: per(program_runs),
        ns_per_steered_packet: per(steered_packets),
    })
}

/// Resets sent so far by the bed's three hosts.
fn resets_sent(bed: &TestBed) -> anyhow::Result<u64> {
    let hosts = [bed.client(), bed.source(), bed.destination()];
    hosts.iter().map(|host| host.tcp_counter("OutRsts")).sum()
}

/// Waits (bounded) until the keeper removed `steering`: the moved connections all closed.
fn steering_gone(steering: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEERING_GONE;
    while Steering::list()?.iter().any(|name| name == steering) {
        ensure!(
            Instant::now() < deadline,
            "the steering {steering} is still there {STEERING_GONE:?} after the loads ended"
        );
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
