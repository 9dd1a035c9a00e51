//! The source side: stop, freeze, dump, send, and commit or roll back.
//!
//! Each application process's sockets are held in a shard of their own ([`crate::shard`]): one
//! fd table holds at most one process's worth (the fd limit), and several processes, 50,000
//! connections in all, move in one migration.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    FREEZE_TTL, MigrateError, Phases, Privileged, Report, StoppedTree, Token, check_privileges,
    guard::{self, Guardian, Note, Plan},
    millis, test_pause,
    transport::{IMAGE_PIECE, Link, Message, PROTOCOL_VERSION},
};
use bytes::Bytes;

use crate::{
    freeze::{Freeze, RemoveOnDrop},
    image::{self, Image},
    net::{self, Netns},
    repair::{
        self, Connection, DumpedSockets, Filter, PreparedDump, SocketsByInode, StateReader, Workers,
    },
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
    /// Local address and port of those connections; the address moves with them.
    pub service: SocketAddr,
    /// The interface holding the address, in the application's network namespace.
    pub dev: String,
    /// Where `tcpmig agent` listens.
    pub agent: SocketAddr,
    pub token: Token,
    /// End the application after the commit (SIGTERM, SIGKILL after 5 s).
    pub stop_source: bool,
    /// Ask each process to stop itself with this signal instead of stopping it (see
    /// [`StoppedTree::stop`]).
    pub stop_signal: Option<libc::c_int>,
    /// Pre-copy: once the application is stopped, read its connections and have the agent
    /// restore them ahead of the freeze; the blackout then pays only for those that moved
    /// since (see [`repair::RestoredAhead`]).
    pub precopy: bool,
    /// Bound on each step of the agent.
    pub step_timeout: Duration,
    /// The tcpmig binary: started as `migrate-guard` to watch this migration (see `guard`).
    pub guard_exe: PathBuf,
}

/// Runs a migration from the source side and returns its report. On any failure before the
/// commit everything is rolled back and the error says so.
pub fn migrate(config: &SourceConfig) -> Result<Report, MigrateError> {
    check_privileges(Privileged::Migrate)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MigrateError::Runtime)?;
    runtime.block_on(run(config))
}

/// What the source holds while the migration can still be undone.
struct Held {
    freeze: RemoveOnDrop,
    /// The dump's socket reader, loaded before the application stops.
    reader: StateReader,
    stopped: Vec<StoppedTree>,
    /// One per application process, holding its sockets.
    shards: Vec<Shard<ProcessSockets>>,
    /// The address was deleted and must come back on rollback.
    address_deleted: bool,
}

/// One application process's sockets, in its shard: prepared once the process is stopped, then
/// dumped (in repair mode) until the commit or the rollback. Dropped, they roll back.
#[derive(Default)]
struct ProcessSockets {
    prepared: Option<PreparedDump>,
    dumped: Option<DumpedSockets>,
}

/// One process's part of the image, and what its connections carry.
struct Part {
    records: Bytes,
    connections: usize,
    send_bytes: u64,
    unsent_bytes: u64,
    recv_bytes: u64,
}

impl Part {
    fn of(connections: &[Connection]) -> Self {
        let sum = |f: fn(&Connection) -> usize| connections.iter().map(|c| f(c) as u64).sum();
        Self {
            records: image::records(connections),
            connections: connections.len(),
            send_bytes: sum(|c| c.send_queue.len()),
            unsent_bytes: sum(|c| c.unsent as usize),
            recv_bytes: sum(|c| c.recv_queue.len()),
        }
    }
}

/// What discovery found in one process.
struct Found {
    /// Inode and SO_REUSEADDR of each socket, for the guard.
    sockets: Vec<(u64, bool)>,
    skipped: usize,
}

async fn run(config: &SourceConfig) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let service = crate::tuple::canonical(config.service);
    let netns = netns_of(&config.pids)?;
    let prefix_len = prefix_of(&netns, config, service.ip())?;
    let expected = repair::count_connections(&netns, &Filter::service(service))?;
    let mut link = Link::connect(config.agent, config.step_timeout).await?;
    let sent = Instant::now();
    link.send(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        token: config.token.as_str().to_owned(),
    })
    .await?;
    match link.recv_message("waiting for the handshake", None).await? {
        Message::Welcome { .. } => link.authenticated(),
        Message::Refused { reason } => return Err(MigrateError::Refused { reason }),
        other => return Err(link.unexpected("waiting for the handshake", &other)),
    }
    // The Commit message takes about half a round trip to arrive: counted in the blackout.
    let one_way = sent.elapsed() / 2;
    link.send(&Message::Prepare {
        service,
        prefix_len,
        expected_connections: u32::try_from(expected).unwrap_or(u32::MAX),
        precopy: config.precopy,
    })
    .await?;
    let name = format!("migrate-{}", std::process::id());
    // Before anything changes, so that whatever happens to us is undone.
    let mut guardian = Guardian::start(
        &config.guard_exe,
        &Note::Start(Plan {
            migrate_pid: std::process::id(),
            pids: config.pids.clone(),
            service,
            dev: config.dev.clone(),
            prefix_len,
            freeze: name.clone(),
            stop_source: config.stop_source,
        }),
    )?;
    let connected = started.elapsed();
    let result = guarded(
        config,
        &netns,
        &mut link,
        &mut guardian,
        &name,
        service,
        prefix_len,
    )
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

/// The migration from the freeze programs on, with the guard watching.
async fn guarded(
    config: &SourceConfig,
    netns: &Netns,
    link: &mut Link,
    guardian: &mut Guardian,
    name: &str,
    service: SocketAddr,
    prefix_len: u8,
) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let freeze = RemoveOnDrop::new(Freeze::attach(netns, &config.dev, name)?);
    let reader = StateReader::load(Some(service.port()))?;
    let mut held = Held {
        freeze,
        reader,
        stopped: Vec::new(),
        shards: Vec::new(),
        address_deleted: false,
    };
    let prepare_ms = millis(started.elapsed());
    let outcome = until_live(
        config, netns, link, guardian, &mut held, service, prefix_len,
    )
    .await;
    let mut report = match outcome {
        Ok(report) => report,
        Err(cause) => {
            if !matches!(
                cause,
                MigrateError::Remote { .. } | MigrateError::Refused { .. }
            ) {
                // Best effort: the agent may be gone, which is often why we roll back.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    link.send(&Message::Abort {
                        reason: super::chain(&cause),
                    }),
                )
                .await;
            }
            // Past Committing, the guard must now roll back too if we die.
            if let Err(error) = guardian.note(&Note::RollingBack) {
                tracing::warn!(%error, "telling the guard about the rollback");
            }
            return Err(rollback(
                config,
                netns,
                held,
                service.ip(),
                prefix_len,
                cause,
            ));
        }
    };
    report.phases.prepare_ms = prepare_ms;
    let commit_sent = Instant::now();
    let committed = link
        .recv_message("waiting for the agent to commit", None)
        .await;
    report.phases.commit_ms += millis(commit_sent.elapsed());
    test_pause("finishing");
    let finished = Instant::now();
    // Committed or not, the source is past the point of no return: see MigrateError::InDoubt.
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
    report.dropped_source = held.freeze.counters()?.into();
    Freeze::remove(held.freeze.keep())?;
    report.phases.finish_ms = millis(finished.elapsed());
    let destination = match committed {
        Ok(Message::Committed { report }) => report,
        Ok(other) => {
            let cause = link.unexpected("waiting for the agent to commit", &other);
            return Err(MigrateError::InDoubt {
                cause: Box::new(cause),
            });
        }
        Err(cause) => {
            return Err(MigrateError::InDoubt {
                cause: Box::new(cause),
            });
        }
    };
    report.peak_resident_kib = super::resident_memory().1;
    report.blackout_ms += destination.live_after_commit_ms;
    report.kept = destination.live;
    report.dropped_destination = destination.dropped;
    report.destination = destination;
    Ok(report)
}

/// Everything up to the agent's GoingLive, the answer to Commit. The report's `blackout_ms`
/// holds the part up to Commit sent, `commit_ms` the wait for GoingLive.
async fn until_live(
    config: &SourceConfig,
    netns: &Netns,
    link: &mut Link,
    guardian: &mut Guardian,
    held: &mut Held,
    service: SocketAddr,
    prefix_len: u8,
) -> Result<Report, MigrateError> {
    let mut phases = Phases::default();
    match link
        .recv_message("waiting for the agent to prepare", None)
        .await?
    {
        Message::Prepared => {}
        other => return Err(link.unexpected("waiting for the agent to prepare", &other)),
    }
    let step = Instant::now();
    guardian.note(&Note::Stopping)?;
    for &pid in &config.pids {
        held.stopped
            .push(StoppedTree::stop(pid, config.stop_signal)?);
    }
    let processes_stopped = held.stopped.iter().map(StoppedTree::len).sum();
    phases.stop_ms = millis(step.elapsed());
    test_pause("stopped");
    let step = Instant::now();
    for &pid in &config.pids {
        let shard = Shard::spawn(format!("pid-{pid}")).map_err(|source| MigrateError::Process {
            pid,
            what: "starting a thread for its sockets",
            source,
        })?;
        held.shards.push(shard);
    }
    // One listing for all the processes.
    let listed = Arc::new(SocketsByInode::list(netns, &Filter::service(service))?);
    let pids = config.pids.clone();
    let found = shard::run_all(&held.shards, move |k, sockets| {
        prepare_process(pids[k], service, &listed, sockets)
    });
    let mut skipped = 0;
    let mut noted = Vec::new();
    for found in found {
        let found = found?;
        skipped += found.skipped;
        noted.extend(found.sockets);
    }
    // A socket shared by two of the processes (inherited over fork) would be dumped twice.
    let mut inodes: Vec<u64> = noted.iter().map(|&(inode, _)| inode).collect();
    inodes.sort_unstable();
    if let Some(pair) = inodes.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(MigrateError::SharedSocket { inode: pair[0] });
    }
    guardian.note(&Note::Sockets { sockets: noted })?;
    phases.discover_ms = millis(step.elapsed());
    if config.precopy {
        let step = Instant::now();
        precopy(netns, link, held).await?;
        phases.precopy_ms = millis(step.elapsed());
    }
    let frozen = Instant::now();
    held.freeze.freeze_services(&[service], FREEZE_TTL)?;
    phases.freeze_ms = millis(frozen.elapsed());
    test_pause("frozen");
    let step = Instant::now();
    // One pass of the reader for every process: they share the namespace.
    let states = Arc::new(held.reader.read(netns)?);
    let dumped = shard::run_all(&held.shards, move |_, sockets| {
        let prepared = sockets.prepared.take().expect("prepared before the dump");
        sockets.dumped = Some(prepared.dump_read(&states)?);
        Ok::<_, MigrateError>(())
    });
    dumped.into_iter().collect::<Result<(), _>>()?;
    phases.dump_ms = millis(step.elapsed());
    test_pause("dumped");
    let step = Instant::now();
    // Each shard encodes its records: the connections are not copied out of them.
    let parts = shard::run_all(&held.shards, |_, sockets| {
        let connections = sockets.dumped.as_ref().map_or(&[][..], |d| d.connections());
        Part::of(connections)
    });
    let (connections, image_bytes) = send_image(link, &parts, Some("mid-transfer")).await?;
    phases.transfer_ms = millis(step.elapsed());
    // While the agent restores: the address is of no use here any more (the freeze drops the
    // service's traffic), and a rollback puts it back.
    let step = Instant::now();
    net::delete_address(netns, &config.dev, service.ip(), prefix_len)?;
    held.address_deleted = true;
    phases.address_ms = millis(step.elapsed());
    test_pause("address-deleted");
    let step = Instant::now();
    match link
        .recv_message("waiting for the agent to restore", None)
        .await?
    {
        Message::Restored {
            connections: restored,
            ..
        } if restored == connections => {}
        other => return Err(link.unexpected("waiting for the agent to restore", &other)),
    }
    phases.restore_ms = millis(step.elapsed());
    test_pause("restored");
    // The decision, recorded before it is sent: if we die from here on, the guard finishes the
    // commit instead of rolling back.
    guardian.note(&Note::Committing)?;
    link.send(&Message::Commit {
        answer_within_ms: link.timeout().as_millis() as u64,
    })
    .await?;
    let blackout_ms = millis(frozen.elapsed());
    let commit_sent = Instant::now();
    test_pause("committed");
    match link
        .recv_message("waiting for the agent to go live", None)
        .await?
    {
        Message::GoingLive => {}
        other => return Err(link.unexpected("waiting for the agent to go live", &other)),
    }
    phases.commit_ms = millis(commit_sent.elapsed());
    let queued = |f: fn(&Part) -> u64| -> u64 { parts.iter().map(f).sum() };
    Ok(Report {
        pids: config.pids.clone(),
        service,
        agent: link.peer(),
        processes_stopped,
        connections,
        kept: 0,
        skipped,
        image_bytes,
        send_bytes: queued(|p| p.send_bytes),
        unsent_bytes: queued(|p| p.unsent_bytes),
        recv_bytes: queued(|p| p.recv_bytes),
        blackout_ms,
        total_ms: 0.0,
        phases,
        dropped_source: Default::default(),
        dropped_destination: Default::default(),
        source_stopped: false,
        peak_resident_kib: 0,
        destination: Default::default(),
    })
}

/// Undoes what the source did, in reverse: address back, sockets out of repair mode, freeze
/// removed, application resumed.
fn rollback(
    config: &SourceConfig,
    netns: &Netns,
    mut held: Held,
    ip: IpAddr,
    prefix_len: u8,
    cause: MigrateError,
) -> MigrateError {
    tracing::warn!(%cause, "rolling back");
    let mut result: Result<(), MigrateError> = Ok(());
    if held.address_deleted {
        result = net::add_address(netns, &config.dev, ip, prefix_len).map_err(Into::into);
    }
    let rolled_back = shard::run_all(&held.shards, |_, sockets| {
        sockets.prepared = None;
        sockets.dumped.take().map(DumpedSockets::rollback)
    });
    for outcome in rolled_back.into_iter().flatten() {
        result = result.and(outcome.map_err(Into::into));
    }
    result = result.and(Freeze::remove(held.freeze.keep()).map_err(Into::into));
    // Dropping the stopped trees resumes them.
    held.stopped.clear();
    match result {
        Ok(()) => MigrateError::RolledBack {
            cause: Box::new(cause),
        },
        Err(rollback) => MigrateError::RollbackFailed {
            cause: Box::new(cause),
            rollback: Box::new(rollback),
        },
    }
}

/// The pre-copy, before the freeze: one reader pass, each process's connections that were
/// quiet for [`PRECOPY_QUIET`] read in its shard, the image of them sent (it may hold none), and
/// the agent's Precopied awaited.
async fn precopy(netns: &Netns, link: &mut Link, held: &mut Held) -> Result<(), MigrateError> {
    let states = Arc::new(held.reader.read(netns)?);
    let parts = shard::run_all(&held.shards, move |_, sockets| {
        let prepared = sockets
            .prepared
            .as_mut()
            .expect("prepared before the pre-copy");
        Part::of(&prepared.precopy(&states, PRECOPY_QUIET))
    });
    let (connections, _) = send_image(link, &parts, None).await?;
    match link
        .recv_message("waiting for the agent to restore the pre-copy", None)
        .await?
    {
        Message::Precopied { connections: ahead } => {
            tracing::info!(connections, ahead, "pre-copied");
            Ok(())
        }
        other => Err(link.unexpected("waiting for the agent to restore the pre-copy", &other)),
    }
}

/// Sends the image of `parts` in pieces; returns its connections and bytes. `pause` names the
/// test pause after the first piece.
async fn send_image(
    link: &mut Link,
    parts: &[Part],
    pause: Option<&str>,
) -> Result<(usize, usize), MigrateError> {
    let connections: usize = parts.iter().map(|p| p.connections).sum();
    let mut pieces = vec![Image::header()];
    pieces.extend(parts.iter().map(|p| p.records.clone()));
    pieces.push(Image::end(connections));
    let image_bytes = pieces.iter().map(Bytes::len).sum();
    for (i, chunk) in pieces
        .iter()
        .flat_map(|p| p.chunks(IMAGE_PIECE))
        .enumerate()
    {
        if i == 1
            && let Some(pause) = pause
        {
            test_pause(pause);
        }
        link.send_image(chunk).await?;
    }
    Ok((connections, image_bytes))
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

/// The network namespace of the processes, which must share it: one migration moves one
/// service address.
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

/// In the process's shard: takes its connections on `service` and reads what only it changes.
fn prepare_process(
    pid: u32,
    service: SocketAddr,
    listed: &SocketsByInode,
    sockets: &mut ProcessSockets,
) -> Result<Found, MigrateError> {
    let netns = Netns::open(&format!("/proc/{pid}/ns/net"))?;
    let discovery = repair::discover_among(listed, &netns, pid, &Filter::service(service))?;
    if discovery.sockets.is_empty() {
        return Err(MigrateError::NoConnections { pid, service });
    }
    let identified = discovery
        .sockets
        .iter()
        .map(|taken| {
            guard::identify(taken.fd.as_fd()).map_err(|source| MigrateError::Process {
                pid,
                what: "reading its sockets",
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    let skipped = discovery.skipped.len();
    sockets.prepared = Some(repair::prepare_dump(Workers::PerCpu, discovery.into_fds())?);
    Ok(Found {
        sockets: identified,
        skipped,
    })
}
