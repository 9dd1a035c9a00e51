//! Rebalance (issue 20): `tcpmig migrate --keep-address --select ...` moves part of a busy
//! server's connections to a destination whose application already serves its own clients, while
//! the service address, the other connections and new connections stay on the source. The
//! source's steering forwards the moved connections' segments; the destination answers them from
//! the address it holds quietly on `lo`.
//!
//! Each test: an echo server on the source holding the service's connections, all sending all the
//! time (the open-loop load, every byte checked), an echo server on the destination serving its
//! own clients on its own address, and both taking hand-overs on a Unix socket. Asserted: every
//! connection kept byte-exact on both hosts, no reset anywhere, the moved connections held by the
//! destination's server (its fds hold their sockets) and none of the others, new connections to
//! the service served by the source, and the steering gone once the moved connections closed.
//! Moving back returns them all to the source, which stops forwarding them; moving on sends them
//! to a third host, through the destination, which forwards them there in turn.
//!
//! Needs root; run with `--test-threads=1` (`cargo xtask test`).
mod support;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use support::{AGENT_PORT, COMMAND_TIMEOUT, PEER, Running, Scratch, insecure};
use tcpmig::{
    freeze::Steering,
    net::{self, Netns},
    repair::{self, TcpState},
    tuple::Tuple,
};
use tcpmig_testbed::{
    Host, IFACE, LoadConfig, LoadReport, LoadRun, ProbeArgs, ProbeRun, TcpCounters, TestBed,
    TokenFile, echo::HandoffEcho, tcpmig_bin, tcpmig_ok,
};

/// The service's connections, and the destination application's own.
const SERVICE_CONNECTIONS: usize = 2_000;
const OWN_CONNECTIONS: usize = 200;
const PORT: u16 = 9100;
/// Long enough for the warm-up, a move, a move back and their settling.
const LOAD_DURATION: Duration = Duration::from_secs(14);
const WARMUP: Duration = Duration::from_secs(1);
/// A second client address, in a /28 of its own, for the test that selects by client network.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const OTHER_CLIENTS: &str = "198.18.0.192/28";
/// Of the service's connections, those from [`OTHER_CLIENT`] in that test.
const FROM_OTHER: usize = 300;
/// Read by the test's own thread: the root namespace's, which no agent may change.
const ROOT_ARP_IGNORE: &str = "/proc/sys/net/ipv4/conf/all/arp_ignore";

/// The servers, the loads on them and the link's token.
struct Rebalance<'bed> {
    source: HandoffEcho<'bed>,
    destination: HandoffEcho<'bed>,
    /// A second destination (serving nobody of its own), where connections move on to.
    third: HandoffEcho<'bed>,
    /// The service's load (one or two runs, by client address) and the destination's own.
    service_loads: Vec<LoadRun<'bed>>,
    own_load: LoadRun<'bed>,
    token: TokenFile,
    /// The hand-over sockets, removed with it.
    dir: Scratch,
}

impl<'bed> Rebalance<'bed> {
    /// Servers up, then the loads: `from_other` of the service's connections from
    /// [`OTHER_CLIENT`], the rest from the client's own address.
    fn start(bed: &'bed TestBed, from_other: usize) -> Result<Self> {
        let dir = Scratch::new(bed)?;
        let service = SocketAddr::new(TestBed::service(false), PORT);
        let own = SocketAddr::new(bed.destination().v4().into(), PORT);
        let peer = Path::new(PEER);
        let source = HandoffEcho::start(bed.source(), peer, service, &dir.path("source.sock"))?;
        let destination =
            HandoffEcho::start(bed.destination(), peer, own, &dir.path("destination.sock"))?;
        let third_own = SocketAddr::new(bed.third().v4().into(), PORT);
        let third = HandoffEcho::start(bed.third(), peer, third_own, &dir.path("third.sock"))?;
        let config = |first_id: usize, from: Option<IpAddr>| LoadConfig {
            duration: LOAD_DURATION,
            first_id: first_id as u32,
            from,
            ..LoadConfig::default()
        };
        let mut service_loads = Vec::new();
        let from_own = SERVICE_CONNECTIONS - from_other;
        service_loads.push(LoadRun::start(
            bed,
            peer,
            service,
            from_own,
            &config(0, None),
        )?);
        if from_other > 0 {
            let other = config(from_own, Some(OTHER_CLIENT.into()));
            service_loads.push(LoadRun::start(bed, peer, service, from_other, &other)?);
        }
        let own_config = config(SERVICE_CONNECTIONS, None);
        let own_load = LoadRun::start(bed, peer, own, OWN_CONNECTIONS, &own_config)?;
        std::thread::sleep(WARMUP);
        Ok(Self {
            source,
            destination,
            third,
            service_loads,
            own_load,
            token: TokenFile::new(bed, "rebalance", "tcpmig rebalance test token\n")?,
            dir,
        })
    }

    fn service() -> SocketAddr {
        SocketAddr::new(TestBed::service(false), PORT)
    }

    /// `tcpmig migrate --keep-address` of `pid` on `from` to an agent on `to` that hands the
    /// connections to `handoff`; returns the source's JSON report once both ended.
    fn rebalance(
        &self,
        (from, pid): (&Host, u32),
        (to, handoff): (&Host, &Path),
        extra: &[&str],
    ) -> Result<serde_json::Value> {
        let mut agent = Running::spawn(to, self.agent_command(to, handoff)?)?;
        let migrate = self.migrate_command((from, pid), to, extra)?;
        let (status, stdout, stderr) = Running::spawn(from, migrate)?.finish()?;
        ensure!(status.success(), "tcpmig migrate failed: {stderr}");
        let (status, _, stderr) = agent.finish()?;
        ensure!(status.success(), "tcpmig agent failed: {stderr}");
        serde_json::from_str(&stdout).with_context(|| format!("the report: {stdout}"))
    }

    /// `tcpmig agent` on `to`, handing the connections to `handoff`.
    fn agent_command(&self, to: &Host, handoff: &Path) -> Result<std::process::Command> {
        let mut agent = to.command(tcpmig_bin())?;
        agent
            .arg("agent")
            .arg("--listen")
            .arg(SocketAddr::new(to.v4().into(), AGENT_PORT).to_string())
            .args(["--netns", to.name(), "--dev", IFACE, "--timeout", "10"])
            .args(insecure(&self.token.0))
            .arg("--handoff")
            .arg(handoff);
        Ok(agent)
    }

    /// `tcpmig migrate --keep-address --json` of `pid` on `from` to the agent on `to`.
    fn migrate_command(
        &self,
        (from, pid): (&Host, u32),
        to: &Host,
        extra: &[&str],
    ) -> Result<std::process::Command> {
        let mut migrate = from.command(tcpmig_bin())?;
        migrate
            .args(["migrate", "--pid", &pid.to_string()])
            .args(["--service", &Self::service().to_string()])
            .args(["--dev", IFACE, "--timeout", "10", "--to"])
            .arg(SocketAddr::new(to.v4().into(), AGENT_PORT).to_string())
            .args(["--keep-address", "--stop-signal", "USR1", "--json"])
            .args(["--steer-grace", "1", "--steer-idle", "30"])
            .args(insecure(&self.token.0))
            .args(extra);
        Ok(migrate)
    }

    /// Every load ran to its end with every message echoed byte-exact on every connection.
    fn finish_loads(self) -> Result<()> {
        let mut reports: Vec<LoadReport> = Vec::new();
        for load in self.service_loads {
            reports.push(load.finish()?);
        }
        reports.push(self.own_load.finish()?);
        for report in &reports {
            ensure!(
                report.lost() == 0
                    && report.missing == 0
                    && report.verified == report.connections as u64,
                "the clients lost connections or bytes: {report:#?}"
            );
        }
        Ok(())
    }
}

/// The established connections on `service` in `host`'s namespace, and whether `pid` holds each
/// (one of its fds is the socket).
fn held_by(host: &Host, service: SocketAddr, pid: u32) -> Result<(HashSet<Tuple>, usize)> {
    let sockets = repair::list_tcp_sockets(&Netns::open(host.name())?)?;
    let inodes = socket_inodes(pid)?;
    let mine: Vec<_> = (sockets.iter())
        .filter(|s| s.tuple.local == service && s.state == TcpState::Established)
        .collect();
    let held = mine.iter().filter(|s| inodes.contains(&s.inode)).count();
    Ok((mine.iter().map(|s| s.tuple).collect(), held))
}

/// Resets sent by any host, and seen by the clients. Not the servers' EstabResets: the host a
/// connection leaves disconnects its copy in repair mode, which sends nothing but counts there as
/// an established connection reset.
fn sent_or_seen_resets(bed: &TestBed) -> Result<u64> {
    let mut total = bed.client().tcp_counter("EstabResets")?;
    for host in [bed.client(), bed.source(), bed.destination()] {
        total += host.tcp_counter("OutRsts")?;
    }
    Ok(total)
}

/// The inodes of the sockets among `pid`'s fds.
fn socket_inodes(pid: u32) -> Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let inode: Option<u64> = (target.to_str())
            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok());
        inodes.extend(inode);
    }
    Ok(inodes)
}

/// Waits (bounded) until no steering is left in the bed's hosts: each keeper removed its own once
/// the moved connections closed.
fn steerings_gone(bed: &TestBed, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let netns = [bed.source(), bed.destination(), bed.third()]
        .iter()
        .map(|host| Netns::open(host.name()))
        .collect::<Result<Vec<_>, _>>()?;
    loop {
        let mut left = Vec::new();
        for netns in &netns {
            left.extend(Steering::list_in(netns)?);
        }
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "steerings left: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What happens to the moved connections after the move, before the loads end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    Stay,
    /// All back to the source.
    Back,
    /// All on to the third host.
    On,
}

/// Moves what `select` picks (`expected` of them) while every connection sends; checks the
/// hosts, new connections, the loads, resets and the steering's end; then `then`.
fn rebalance_under_load(
    select: &str,
    from_other: usize,
    expected: usize,
    then: Then,
) -> Result<()> {
    let root_arp_ignore = std::fs::read_to_string(ROOT_ARP_IGNORE)?;
    let bed = TestBed::new()?;
    if from_other > 0 {
        let client = Netns::open(bed.client().name())?;
        net::add_address(&client, IFACE, OTHER_CLIENT.into(), 24)?;
    }
    let mut run = Rebalance::start(&bed, from_other)?;
    let resets_before = sent_or_seen_resets(&bed)?;
    let counters = TcpCounters::read_in(bed.client())?;
    let service = Rebalance::service();
    let prober = ProbeRun::start(bed.client(), Path::new(PEER), &ProbeArgs::new(service))?;
    let to_destination = (bed.destination(), run.dir.path("destination.sock"));
    let report = run.rebalance(
        (bed.source(), run.source.pid()),
        (to_destination.0, &to_destination.1),
        &["--select", select],
    )?;
    ensure!(
        report["kept"] == expected && report["connections"] == expected,
        "moved {} of {expected}: {report}",
        report["kept"]
    );
    ensure!(
        run.destination.handed(COMMAND_TIMEOUT)? == expected,
        "the destination's server did not take them all"
    );
    let steering = report["rebalance"]["steering"]
        .as_str()
        .context("no steering")?;
    // `tcpmig status` shows the steering and each connection it forwards.
    let status = tcpmig_ok(["status", "--json", "--netns", bed.source().name()])?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    let shown = &status["steerings"][0];
    ensure!(
        shown["name"] == steering
            && shown["dev"] == IFACE
            && shown["connections"].as_array().map(Vec::len) == Some(expected),
        "tcpmig status showed {status}"
    );
    // The destination holds the address quietly: its ARP answers only for the addresses of the
    // interface asked on, and the machine's own setting is untouched.
    let destination = bed.destination();
    for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let key = format!("net.ipv4.conf.all.{key}");
        ensure!(
            destination.sysctl(&key)? == value,
            "{key} on the destination"
        );
    }
    ensure!(
        std::fs::read_to_string(ROOT_ARP_IGNORE)? == root_arp_ignore,
        "the agent changed the root namespace's arp_ignore"
    );
    // The moved connections are the destination server's, the others still the source's.
    let (moved, held) = held_by(bed.destination(), service, run.destination.pid())?;
    ensure!(
        moved.len() == expected && held == expected,
        "destination holds {held} of {}",
        moved.len()
    );
    let (stayed, held) = held_by(bed.source(), service, run.source.pid())?;
    ensure!(
        stayed.is_disjoint(&moved) && held >= SERVICE_CONNECTIONS - expected,
        "source holds {held} of {} after the move",
        stayed.len()
    );
    // What the moved connections' clients sent into the freeze was held, and forwarded to the
    // destination (how much depends on the load's schedule): none waited for a retransmission
    // timer.
    ensure!(report["forwarded"]["failed"] == 0, "{report}");
    let timeouts = TcpCounters::read_in(bed.client())?
        .since(&counters)
        .timeouts;
    ensure!(
        timeouts == 0,
        "{timeouts} retransmission timeouts in the clients"
    );
    let new_connections = prober.finish()?;
    ensure!(
        new_connections.attempted > 0 && new_connections.served == new_connections.attempted,
        "new connections through the rebalance: {new_connections:?}"
    );
    match then {
        Then::Stay => {}
        Then::Back => move_back(&mut run, &bed, expected)?,
        Then::On => move_on(&mut run, &bed, expected)?,
    }
    let mut counts = Vec::new();
    for host in [bed.client(), bed.source(), bed.destination(), bed.third()] {
        counts.push((
            host.tcp_counter("OutRsts")?,
            host.tcp_counter("EstabResets")?,
        ));
    }
    ensure!(
        sent_or_seen_resets(&bed)? == resets_before,
        "resets: {} before, {} after; (OutRsts, EstabResets) of client, source, destination, third: {counts:?}",
        resets_before,
        sent_or_seen_resets(&bed)?
    );
    run.finish_loads()?;
    steerings_gone(&bed, Duration::from_secs(20))
}

/// All of the service's connections on the destination go back to the source (`Then::Back`) or
/// on to the third host (`Then::On`); checks that the destination holds none of them any more,
/// and the receiving server all it has on the service. Returns the report.
fn move_all_from_destination(
    run: &mut Rebalance<'_>,
    bed: &TestBed,
    expected: usize,
    then: Then,
) -> Result<serde_json::Value> {
    let (to, socket) = match then {
        Then::On => (bed.third(), "third.sock"),
        _ => (bed.source(), "source.sock"),
    };
    let from = (bed.destination(), run.destination.pid());
    let report = run.rebalance(from, (to, &run.dir.path(socket)), &[])?;
    ensure!(report["kept"] == expected, "moved: {report}");
    let server = match then {
        Then::On => &mut run.third,
        _ => &mut run.source,
    };
    ensure!(server.handed(COMMAND_TIMEOUT)? == expected, "handed");
    let service = Rebalance::service();
    let (left, _) = held_by(bed.destination(), service, run.destination.pid())?;
    ensure!(left.is_empty(), "{} left on the destination", left.len());
    let (there, held) = held_by(to, service, server.pid())?;
    ensure!(
        held == there.len() && held >= expected,
        "{to} holds {held} of {}",
        there.len()
    );
    Ok(report)
}

/// Back to the source, which holds the address: its agent takes them out of its steering, and
/// the destination steers nothing.
fn move_back(run: &mut Rebalance<'_>, bed: &TestBed, expected: usize) -> Result<()> {
    let back = move_all_from_destination(run, bed, expected, Then::Back)?;
    ensure!(
        back["rebalance"]["steering"].is_null() && back["destination"]["taken_back"] == expected,
        "the source's steering still forwards some, or the destination steers: {back}"
    );
    let (all, _) = held_by(bed.source(), Rebalance::service(), run.source.pid())?;
    ensure!(
        all.len() >= SERVICE_CONNECTIONS,
        "{} on the source",
        all.len()
    );
    Ok(())
}

/// On to the third host, which has not the address: the destination forwards them there (the
/// source still forwards them to it).
fn move_on(run: &mut Rebalance<'_>, bed: &TestBed, expected: usize) -> Result<()> {
    let on = move_all_from_destination(run, bed, expected, Then::On)?;
    ensure!(on["rebalance"]["steering"].is_string(), "moved on: {on}");
    Ok(())
}

#[test]
fn thirty_percent_move_to_a_serving_destination_and_back() -> Result<()> {
    rebalance_under_load("fraction=0.3", 0, SERVICE_CONNECTIONS * 3 / 10, Then::Back)
}

#[test]
fn the_clients_of_one_network_move() -> Result<()> {
    let select = format!("client={OTHER_CLIENTS}");
    rebalance_under_load(&select, FROM_OTHER, FROM_OTHER, Then::Stay)
}

/// The agent dies after Commit reached it, before it went live: the source, which had steered
/// the chosen connections already, rolls back: no steering left, every connection on the source,
/// byte-exact (the loads check every byte), none reset.
#[test]
fn a_rebalance_that_fails_after_the_steering_rolls_back() -> Result<()> {
    let bed = TestBed::new()?;
    let run = Rebalance::start(&bed, 0)?;
    let (client, source) = (bed.client(), bed.source());
    let client_before = client.tcp_counter("EstabResets")? + client.tcp_counter("OutRsts")?;
    let source_before = source.tcp_counter("OutRsts")?;
    let (to, handoff) = (bed.destination(), run.dir.path("destination.sock"));
    let mut agent = run.agent_command(to, &handoff)?;
    agent.env("TCPMIG_TEST_PAUSE_AT", "agent-commit");
    let mut agent = Running::spawn(to, agent)?;
    let extra = ["--select", "fraction=0.3"];
    let mut migrate = Running::spawn(
        bed.source(),
        run.migrate_command((bed.source(), run.source.pid()), to, &extra)?,
    )?;
    agent
        .stderr
        .wait_for("test pause at agent-commit", COMMAND_TIMEOUT)?;
    let steered: usize = (Steering::list_in(&Netns::open(bed.source().name())?)?.iter())
        .map(|name| Ok(Steering::open(name)?.entries()?.len()))
        .sum::<Result<_>>()?;
    ensure!(
        steered == 600,
        "{steered} connections steered before the commit"
    );
    agent.kill()?;
    let (status, _, stderr) = migrate.finish()?;
    ensure!(
        !status.success() && stderr.contains("rolled back"),
        "tcpmig migrate should have rolled back: {stderr}"
    );
    let (all, held) = held_by(bed.source(), Rebalance::service(), run.source.pid())?;
    ensure!(
        all.len() == SERVICE_CONNECTIONS && held == SERVICE_CONNECTIONS,
        "the source holds {held} of {}",
        all.len()
    );
    steerings_gone(&bed, Duration::from_secs(1))?;
    // The killed agent's end of the link sends a reset, to `migrate`: none else may.
    let (client, source) = (bed.client(), bed.source());
    ensure!(
        client.tcp_counter("EstabResets")? + client.tcp_counter("OutRsts")? == client_before
            && source.tcp_counter("OutRsts")? == source_before,
        "connections reset by the rollback"
    );
    run.finish_loads()
}

#[test]
fn moved_connections_move_on_to_a_third_host() -> Result<()> {
    rebalance_under_load("count=500", 0, 500, Then::On)
}
