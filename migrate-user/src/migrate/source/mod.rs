//! The source side of a migration: connect and get the agent ready, then the phases up to the
//! agent's GoingLive ([`phases`]: discover, stop, catch up, freeze, dump, send, restored, commit),
//! and the source's own commit, or the rollback (docs/architecture.md walks through them).
//!
//! Each application process's sockets are held in a shard of their own ([`crate::shard`]): one
//! fd table holds at most one process's worth (the fd limit), and several processes, 50,000
//! connections in all, move in one migration.
mod image;
mod phases;
mod rebalance;
mod rollback;
mod shard_work;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

pub use self::rebalance::{KeepAddress, STEER_KEEPER_COMMAND};
use self::{phases::Run, rebalance::Rebalancing};
use super::{
    ClientSecurity, MigrateError, MovedAddress, Privileged, RebalanceReport, Report, StoppedTree,
    Token, check_privileges,
    guard::{Guardian, Note, Plan},
    millis, require_token_in_plaintext, resident_memory, test_pause,
    transport::{ExpectedService, Link, Message, PROTOCOL_VERSION},
};
use crate::{
    freeze::{
        Freeze, RemoveOnDrop,
        hold::{Forwarder, HeldPackets, Hold, HoldBudget},
    },
    net::{self, Netns},
    repair::{self, DumpedSockets, PreparedDump, StateReader},
    shard::{self, Shard},
};

/// `--precopy` takes the connections that sent and received nothing for this long. The
/// pre-copy's window (from its read to the freeze) is 50-150 ms at 10,000 connections; in the
/// scaling benchmark, where each connection sends every 500 ms, 28% of them moved in it, and
/// replacing them in the blackout cost more than the others saved.
pub const PRECOPY_QUIET: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The application's processes whose connections move, together, all in one network
    /// namespace.
    pub pids: Vec<u32>,
    /// Local addresses and ports of those connections (one per family for a dual-stack
    /// service); the addresses move with them.
    pub services: Vec<SocketAddr>,
    /// The interface holding the address, in the application's network namespace.
    pub dev: String,
    /// Where `tcpmig agent` listens.
    pub agent: SocketAddr,
    /// Mutual TLS, or plaintext if the operator said so.
    pub security: ClientSecurity,
    /// A shared secret the agent may also ask for (sent inside TLS; required in plaintext).
    pub token: Option<Token>,
    /// End the application after the commit (SIGTERM, SIGKILL after 5 s).
    pub stop_source: bool,
    /// Ask each process to stop itself with this signal instead of stopping it (see
    /// [`StoppedTree::stop`]).
    pub stop_signal: Option<libc::c_int>,
    /// Pre-copy: once the application is stopped, read its connections and have the agent
    /// restore them ahead of the freeze; the blackout then pays only for those that moved
    /// since (see [`repair::RestoredAhead`]).
    pub precopy: bool,
    /// How much the freeze holds for the destination instead of dropping it
    /// ([`HoldBudget::NONE`]: nothing, every segment waits for its sender's retransmission).
    pub hold: HoldBudget,
    /// Move the other connections when some cannot move (a handshake in progress, one waiting
    /// in an accept queue), and list those in the report; without it such a migration refuses
    /// before the freeze, naming them.
    pub skip_unmovable: bool,
    /// A rebalance: only the chosen connections move, the addresses stay (see
    /// [`KeepAddress`]).
    pub keep_address: Option<KeepAddress>,
    /// Bound on each step of the agent.
    pub step_timeout: Duration,
    /// The tcpmig binary: started as `migrate-guard` to watch this migration (see `guard`), and
    /// as `steer-keeper` after a rebalance.
    pub guard_exe: PathBuf,
}

/// Runs a migration from the source side and returns its report. On any failure before the
/// commit everything is rolled back and the error says so.
///
/// # Examples
/// Moves the connections of process 1234 on `192.0.2.1:80` and `[2001:db8::1]:80`, and both
/// addresses, to the agent at 192.0.2.2:7070 (see [`agent`](crate::migrate::agent()) for the other
/// side):
/// ```no_run
/// use tcpmig::{
///     freeze::hold::HoldBudget,
///     migrate::{self, ClientSecurity, DEFAULT_STEP_TIMEOUT, SourceConfig, TlsFiles},
/// };
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = SourceConfig {
///     pids: vec![1234],
///     services: vec!["192.0.2.1:80".parse()?, "[2001:db8::1]:80".parse()?],
///     dev: "eth0".into(),
///     agent: "192.0.2.2:7070".parse()?,
///     // Mutual TLS: the agent's certificate must name 192.0.2.2 and chain to ca.pem.
///     security: ClientSecurity::tls(
///         &TlsFiles {
///             cert: "/etc/tcpmig/source.pem".into(),
///             key: "/etc/tcpmig/source.key".into(),
///             ca: "/etc/tcpmig/ca.pem".into(),
///         },
///         "192.0.2.2",
///     )?,
///     token: None,
///     stop_source: true,
///     stop_signal: None,
///     precopy: false,
///     hold: HoldBudget::DEFAULT,
///     skip_unmovable: false,
///     keep_address: None,
///     step_timeout: DEFAULT_STEP_TIMEOUT,
///     // The tcpmig binary, which runs the guard of the migration.
///     guard_exe: "/usr/bin/tcpmig".into(),
/// };
/// let report = migrate::migrate(&config)?;
/// println!("{} connections moved, blackout {:.1} ms", report.kept, report.blackout_ms);
/// # Ok(())
/// # }
/// ```
pub fn migrate(config: &SourceConfig) -> Result<Report, MigrateError> {
    check_privileges(Privileged::Migrate)?;
    let plaintext = matches!(config.security, ClientSecurity::Insecure);
    require_token_in_plaintext(plaintext, config.token.as_ref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MigrateError::Runtime)?;
    runtime.block_on(run(config))
}

/// What the source holds while the migration can still be undone.
struct Held {
    freeze: RemoveOnDrop,
    /// Opened before the freeze, holding from it on (None with a budget of nothing).
    hold: Option<Hold>,
    /// Where the hold goes, opened on Prepared (None without a hold, or without the agent's MAC).
    forwarder: Option<Forwarder>,
    /// The dump's socket reader, loaded before the application stops.
    reader: StateReader,
    stopped: Vec<StoppedTree>,
    /// One per application process, holding its sockets.
    shards: Vec<Shard<ProcessSockets>>,
    /// The addresses were deleted and must come back on rollback.
    address_deleted: bool,
    /// When the application was stopped: the connections that stay pause until it resumes.
    stopped_at: Option<Instant>,
}

/// One application process's sockets, in its shard: prepared while the process runs (caught up
/// once it is stopped), then dumped (in repair mode) until the commit or the rollback. Dropped,
/// they roll back.
#[derive(Default)]
struct ProcessSockets {
    prepared: Option<PreparedDump>,
    known: shard_work::Known,
    dumped: Option<DumpedSockets>,
}

async fn run(config: &SourceConfig) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let services = distinct(config.services.iter().map(|&s| crate::tuple::canonical(s)));
    if services.is_empty() {
        return Err(MigrateError::NoService);
    }
    let netns = netns_of(&config.pids)?;
    if config.keep_address.is_some() && config.stop_source {
        return Err(MigrateError::KeepAddressStopsSource);
    }
    let name = format!("migrate-{}", std::process::id());
    let (addresses, rebalancing) = match &config.keep_address {
        None => (moved_addresses(&netns, config, &services)?, None),
        Some(keep) => {
            let rebalancing = Rebalancing::start(config, keep, &netns, &services)?;
            (rebalance::quiet_addresses(&services), Some(rebalancing))
        }
    };
    let counted = match &rebalancing {
        Some(rebalancing) => rebalancing.counts(&services),
        None => repair::count_connections(&netns, &services)?,
    };
    let expected = (services.iter().zip(counted))
        .map(|(&service, connections)| ExpectedService {
            service,
            connections: u32::try_from(connections).unwrap_or(u32::MAX),
        })
        .collect();
    let (mut link, one_way) = connect(config).await?;
    link.send(&Message::Prepare {
        services: expected,
        addresses: addresses.clone(),
        precopy: config.precopy,
        keep_address: rebalancing.is_some(),
    })
    .await?;
    // Before anything changes, so that whatever happens to us is undone.
    let mut guardian = Guardian::start(
        &config.guard_exe,
        &Note::Start(Plan {
            migrate_pid: std::process::id(),
            pids: config.pids.clone(),
            services: services.clone(),
            dev: config.dev.clone(),
            // A rebalance deletes none.
            addresses: match rebalancing {
                Some(_) => Vec::new(),
                None => addresses.clone(),
            },
            freeze: name.clone(),
            steering: rebalancing.as_ref().map(Rebalancing::planned_steering),
            stop_source: config.stop_source,
        }),
    )?;
    let connected = started.elapsed();
    let moving = Moving {
        services,
        addresses,
        rebalancing,
    };
    let result = guarded(config, &netns, &mut link, &mut guardian, &name, moving)
        .await
        .map(|mut report| {
            report.phases.prepare_ms += millis(connected);
            report.blackout_ms += millis(one_way);
            report.total_ms = millis(started.elapsed());
            report
        });
    guardian.finish();
    result
}

/// The service addresses with their prefix lengths on the source interface: each moves.
fn moved_addresses(
    netns: &Netns,
    config: &SourceConfig,
    services: &[SocketAddr],
) -> Result<Vec<MovedAddress>, MigrateError> {
    distinct(services.iter().map(SocketAddr::ip))
        .into_iter()
        .map(|ip| {
            let prefix_len = prefix_of(netns, config, ip)?;
            Ok(MovedAddress { ip, prefix_len })
        })
        .collect()
}

/// Connects to the agent and passes the handshake; returns the link and half the handshake's
/// round trip, the time Commit will take to arrive (counted in the blackout).
async fn connect(config: &SourceConfig) -> Result<(Link, Duration), MigrateError> {
    let mut link = Link::connect(config.agent, config.step_timeout, &config.security).await?;
    let sent = Instant::now();
    link.send(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        token: config
            .token
            .as_ref()
            .map(|token| token.as_str().to_owned())
            .unwrap_or_default(),
    })
    .await?;
    let waiting = "waiting for the handshake";
    let answer = link.recv_message(waiting, None).await;
    match answer.map_err(|error| link.tls_refusal(error))? {
        Message::Welcome { .. } => link.authenticated(),
        Message::Refused { reason } => return Err(MigrateError::Refused { reason }),
        other => return Err(link.unexpected(waiting, &other)),
    }
    let one_way = sent.elapsed() / 2;
    Ok((link, one_way))
}

/// What a migration moves: the connections of `services` (or a rebalance's choice of them), and
/// the addresses.
struct Moving {
    services: Vec<SocketAddr>,
    addresses: Vec<MovedAddress>,
    rebalancing: Option<Rebalancing>,
}

/// The migration from the freeze programs on, with the guard watching: the phases up to
/// GoingLive ([`phases`]), then the commit of the source, or the rollback.
async fn guarded(
    config: &SourceConfig,
    netns: &Netns,
    link: &mut Link,
    guardian: &mut Guardian,
    name: &str,
    moving: Moving,
) -> Result<Report, MigrateError> {
    let Moving {
        services,
        addresses,
        rebalancing,
    } = moving;
    let started = Instant::now();
    // One port for every service (the usual dual-stack one): the reader reports only its
    // sockets; otherwise every socket, and the dump picks.
    let port = distinct(services.iter().map(SocketAddr::port));
    let held = Held {
        freeze: RemoveOnDrop::new(Freeze::attach(netns, &config.dev, name)?),
        // In a rebalance it takes every segment to the services, and forwards only those of
        // the moved connections.
        hold: open_hold(config, netns, &services)?,
        reader: StateReader::load(if port.len() == 1 {
            port.first().copied()
        } else {
            None
        })?,
        stopped: Vec::new(),
        shards: Vec::new(),
        address_deleted: false,
        stopped_at: None,
        forwarder: None,
    };
    let report = Report::started(config.pids.clone(), services.clone(), link.peer());
    let mut run = Run {
        config,
        netns,
        link,
        guardian,
        held,
        services,
        addresses,
        rebalancing,
        report,
    };
    run.report.phases.prepare_ms = millis(started.elapsed());
    match phases::until_live(&mut run).await {
        Ok(()) => finish(run).await,
        Err(cause) => Err(rollback::abort(run, cause).await),
    }
}

/// Past the point of no return, Committed or not (see [`MigrateError::InDoubt`]): the source's
/// sockets closed, the application ended if asked, the freeze removed; then the agent's report.
async fn finish(run: Run<'_>) -> Result<Report, MigrateError> {
    let Run {
        config,
        link,
        mut held,
        mut report,
        rebalancing,
        ..
    } = run;
    let commit_sent = Instant::now();
    let forwarding = forward_held(link, held.hold.take(), held.forwarder.take(), &mut report);
    let committed = match forwarding.await {
        Ok(()) => {
            link.recv_message("waiting for the agent to commit", None)
                .await
        }
        Err(cause) => Err(cause),
    };
    report.phases.commit_ms += millis(commit_sent.elapsed());
    test_pause("finishing");
    let finished = Instant::now();
    release(config, held, &mut report)?;
    report.phases.finish_ms = millis(finished.elapsed());
    if let Some(rebalancing) = rebalancing {
        rebalanced(config, rebalancing, &mut report);
    }
    let destination = match committed {
        Ok(Message::Committed { report }) => *report,
        Ok(other) => {
            let waiting = "waiting for the agent to commit";
            return Err(in_doubt(link.unexpected(waiting, &other)));
        }
        Err(cause) => return Err(in_doubt(cause)),
    };
    report.peak_resident_kib = resident_memory().1;
    report.blackout_ms += destination.live_after_commit_ms;
    report.kept = destination.live;
    report.dropped_destination = destination.dropped;
    report.destination = destination;
    Ok(report)
}

/// Forwards what the freeze held to the agent's MAC once it says Live (its sockets out of repair
/// mode, its address announced): its kernel takes the segments as if the clients had just sent
/// them there. What came during the blackout is read while the agent goes live, the rest (what
/// reached this host until the clients learned the new address) after Live. A hold that cannot
/// be read or forwarded costs only time: its senders retransmit, as without a hold.
async fn forward_held(
    link: &mut Link,
    mut hold: Option<Hold>,
    forwarder: Option<Forwarder>,
    report: &mut Report,
) -> Result<(), MigrateError> {
    let early = match hold.as_mut().map(Hold::take).transpose() {
        Ok(early) => early.unwrap_or_default(),
        Err(error) => {
            tracing::warn!(%error, "reading the held segments; their senders retransmit them");
            hold = None;
            HeldPackets::default()
        }
    };
    let waiting = "waiting for the agent to go live";
    match link.recv_message(waiting, None).await? {
        Message::Live => {}
        other => return Err(link.unexpected(waiting, &other)),
    }
    let started = Instant::now();
    // What came during the blackout goes at once; the rest is read after.
    forward(forwarder.as_ref(), &early, report);
    drop(early);
    let rest = match hold.as_mut().map(Hold::finish).transpose() {
        Ok(Some((rest, hold))) => {
            report.hold = hold;
            rest
        }
        Ok(None) => HeldPackets::default(),
        Err(error) => {
            tracing::warn!(%error, "reading the held segments; their senders retransmit them");
            HeldPackets::default()
        }
    };
    forward(forwarder.as_ref(), &rest, report);
    report.phases.forward_ms = millis(started.elapsed());
    if let Some(hold) = hold {
        hold.close_in_background();
    }
    Ok(())
}

/// Sends `held` to the agent by `forwarder`, counted in the report (without a forwarder, the
/// agent's interface has no MAC: the senders retransmit).
fn forward(forwarder: Option<&Forwarder>, held: &HeldPackets, report: &mut Report) {
    let Some(forwarder) = forwarder else {
        return;
    };
    match HeldPackets::decode(held.encoded()) {
        Ok(packets) => report.forwarded.absorb(forwarder.forward(&packets)),
        Err(error) => tracing::warn!(%error, "forwarding the held segments"),
    }
}

/// The hold of `config`, opened on the services' interface (None with a budget of nothing).
fn open_hold(
    config: &SourceConfig,
    netns: &Netns,
    services: &[SocketAddr],
) -> Result<Option<Hold>, MigrateError> {
    if config.hold.is_none() {
        return Ok(None);
    }
    Ok(Some(Hold::open(netns, &config.dev, services, config.hold)?))
}

/// The values of `items` in their first order, each once: `--service` given twice moves it once,
/// and services on two ports of one address move that address once.
fn distinct<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

/// After a rebalance's commit: its account in the report, and a keeper for its steering, which
/// sweeps the entries of the moved connections as they end. Past the commit a keeper that does
/// not start costs only the entries' memory: logged.
fn rebalanced(config: &SourceConfig, rebalancing: Rebalancing, report: &mut Report) {
    let keep = config
        .keep_address
        .as_ref()
        .expect("a rebalance keeps the address");
    let steering = rebalancing.steering_name();
    if let Some(name) = &steering
        && let Err(error) = rebalance::start_keeper(&config.guard_exe, name, keep)
    {
        tracing::warn!(%error, %name, "starting the steering's keeper; sweep it with `tcpmig status`");
    }
    report.rebalance = Some(RebalanceReport {
        selector: keep
            .select
            .as_ref()
            .map_or("all".to_owned(), ToString::to_string),
        picked: rebalancing.picked.len(),
        of: rebalancing.of,
        steering,
    });
}

fn in_doubt(cause: MigrateError) -> MigrateError {
    MigrateError::InDoubt {
        cause: Box::new(cause),
    }
}

/// The connections live on at the destination: the source's sockets are disconnected silently,
/// the application ends (--stop-source) or resumes, and the freeze goes.
fn release(config: &SourceConfig, mut held: Held, report: &mut Report) -> Result<(), MigrateError> {
    shard::run_all(&held.shards, |_, sockets| {
        if let Some(dumped) = sockets.dumped.take() {
            dumped.commit();
        }
    });
    // Without --stop-source, dropping the stopped trees resumes them.
    if config.stop_source {
        for stopped in held.stopped.drain(..) {
            stopped.terminate()?;
        }
        report.source_stopped = true;
    }
    held.stopped.clear();
    report.application_paused_ms = held.stopped_at.map_or(0.0, |at| millis(at.elapsed()));
    report.dropped_source = held.freeze.counters()?.into();
    Freeze::remove(held.freeze.keep())?;
    Ok(())
}

/// The prefix length of `ip` on the source interface: the address is deleted and added with it.
fn prefix_of(netns: &Netns, config: &SourceConfig, ip: IpAddr) -> Result<u8, MigrateError> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    // Host routes and the usual subnets first: most addresses are found in one or two queries.
    let likely = [max, 24, 64, 16, 8, 48, 56, 96, 112, 120, 127];
    let rest = (0..=max).rev();
    for prefix in likely.into_iter().filter(|&p| p <= max).chain(rest) {
        match net::has_address(netns, &config.dev, ip, prefix) {
            Ok(true) => return Ok(prefix),
            Ok(false) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Err(MigrateError::NoAddress {
        ip,
        dev: config.dev.clone(),
        pid: config.pids[0],
    })
}

/// The network namespace of the processes, which must share it: one migration moves the
/// service's addresses of one namespace.
fn netns_of(pids: &[u32]) -> Result<Netns, MigrateError> {
    let open = |pid: u32| Netns::open(&format!("/proc/{pid}/ns/net"));
    let (&first, others) = pids.split_first().ok_or(MigrateError::NoProcess)?;
    let netns = open(first)?;
    for (k, &pid) in others.iter().enumerate() {
        if pids[..=k].contains(&pid) {
            return Err(MigrateError::DuplicatePid { pid });
        }
        if open(pid)?.inode() != netns.inode() {
            return Err(MigrateError::NetnsMismatch { pid, first });
        }
    }
    Ok(netns)
}
