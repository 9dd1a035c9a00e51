//! The destination side: get ready on Prepare (a pool of sockets and the freeze programs, before
//! the source freezes), receive, restore in repair mode, and go live on Commit.
//!
//! The connections are restored in groups of at most `max_per_process`, each group in a shard of
//! its own ([`crate::shard`]): one fd table, and one application process, holds at most one
//! group. Most migrations are one group.
use std::{
    collections::HashMap,
    net::SocketAddr,
    process::ExitStatus,
    time::{Duration, Instant},
};

use bytes::BytesMut;

use super::{
    AgentReport, FREEZE_TTL, MigrateError, Privileged, Refusal, Token, check_privileges, millis,
    resident_memory, test_pause,
    transport::{Frame, Link, Message, PROTOCOL_VERSION},
};
use crate::{
    freeze::{self, Freeze},
    image::{Decoded, Decoder},
    net::{self, Netns, Takeover},
    repair::{
        self, Connection, RestoredAhead, RestoredSocket, RestoredSockets, SocketPool, Workers,
        handoff::{self, ExecCommand, HandoffError},
    },
    shard::{self, Shard},
    tuple::Tuple,
};

/// Freezes of agents are named this plus the agent's pid, so that the next agent can remove
/// what one that was killed left pinned.
const FREEZE_PREFIX: &str = "agent-";
/// The largest image an agent accepts by default: about 10 million idle connections, or 16,000
/// with full 64 KiB queues both ways. The agent holds the whole image in memory.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 1 << 30;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where to listen for the source.
    pub listen: SocketAddr,
    /// The namespace the connections are restored in and the address is added to.
    pub netns: String,
    /// The interface that gets the service address.
    pub dev: String,
    /// The token the source must present. Sources without it are refused, and the agent goes on
    /// waiting for the right one.
    pub token: Token,
    /// Images larger than this are refused (the migration rolls back).
    pub max_image_bytes: u64,
    /// Bound on each step of the source, and on the wait for it to connect (times 60).
    pub step_timeout: Duration,
    /// Testing aid: once this many image bytes arrived, the agent stops itself (SIGSTOP), so a
    /// test can kill it at a known point.
    pub stop_after_image_bytes: Option<u64>,
    /// Most connections one group holds, and one application process gets; more make several
    /// groups. See [`handoff::max_fds_per_process`].
    pub max_per_process: usize,
}

/// A completed migration on the destination: the live sockets, to hand to the application.
pub struct AgentOutcome {
    pub source: SocketAddr,
    pub service: SocketAddr,
    pub live: LiveConnections,
    pub report: AgentReport,
}

/// The live connections, in their groups, until they are handed to the application.
pub struct LiveConnections {
    groups: Vec<Shard<Group>>,
    /// Where the application runs: the namespace the connections are in.
    netns: String,
}

/// One group of connections, in its shard: the pool made on Prepare, the restored sockets in
/// repair mode, then the live ones.
#[derive(Default)]
struct Group {
    pool: Option<SocketPool>,
    /// Its share of the pre-copy, restored ahead of the freeze.
    ahead: Option<RestoredAhead>,
    restored: Option<RestoredSockets>,
    live: Vec<RestoredSocket>,
}

impl LiveConnections {
    /// Groups, each handed to one process.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Sends each group in turn to the receiver at `path` (see [`handoff::send_fds`]): one
    /// connection to the receiver per group.
    pub fn send_to(self, path: &std::path::Path) -> Result<(), HandoffError> {
        for group in &self.groups {
            let path = path.to_owned();
            group.run(move |group| handoff::send_fds(&std::mem::take(&mut group.live), &path))?;
        }
        Ok(())
    }

    /// Hands the connections to `command` in their namespace: one group becomes it (this process
    /// is replaced, see [`handoff::exec_with_fds`]); several start it once per group (see
    /// [`handoff::spawn_with_fds`]) and wait for them all. Returns the first failure's exit
    /// status, or success.
    pub fn run(self, command: ExecCommand) -> Result<ExitStatus, HandoffError> {
        let Self { groups, netns } = self;
        let count = groups.len();
        if count == 1 {
            let exec = groups[0].run(move |group| {
                enter(&netns)?;
                handoff::exec_with_fds(std::mem::take(&mut group.live), command)
            });
            match exec? {}
        }
        let command = std::sync::Arc::new(command);
        let started = shard::run_all(&groups, move |k, group| {
            enter(&netns)?;
            let env = [
                ("TCPMIG_SHARD", k.to_string()),
                ("TCPMIG_SHARDS", count.to_string()),
            ];
            handoff::spawn_with_fds(std::mem::take(&mut group.live), &command, &env)
        });
        let children = started.into_iter().collect::<Result<Vec<_>, _>>()?;
        // The groups' threads live until the children end: each child gets SIGTERM when the
        // thread that started it ends (PR_SET_PDEATHSIG), so when this process dies.
        let status = handoff::wait_all(children);
        drop(groups);
        status
    }
}

/// The application runs in the namespace its connections are in.
fn enter(netns: &str) -> Result<(), HandoffError> {
    Ok(Netns::open(netns)?.enter_current_thread()?)
}

/// Waits for one source, receives its connections and makes them live here.
pub fn agent(config: &AgentConfig) -> Result<AgentOutcome, MigrateError> {
    check_privileges(Privileged::Agent)?;
    let netns = Netns::open(&config.netns)?;
    remove_stale_freezes();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MigrateError::Runtime)?;
    runtime.block_on(run(config, &netns))
}

async fn run(config: &AgentConfig, netns: &Netns) -> Result<AgentOutcome, MigrateError> {
    let (mut link, source) = accept_source(config).await?;
    let (service, prefix_len, expected, precopy) =
        match link.recv_message("waiting for Prepare", None).await? {
            Message::Prepare {
                service,
                prefix_len,
                expected_connections,
                precopy,
            } => (service, prefix_len, expected_connections, precopy),
            other => return Err(link.unexpected("waiting for Prepare", &other)),
        };
    let mut report = AgentReport::default();
    let ready = prepare(config, netns, service, prefix_len, expected, &mut report);
    let Ready {
        mut groups,
        mut freeze,
        takeover,
    } = match ready {
        Ok(ready) => ready,
        Err(error) => return Err(failed(&mut link, error).await),
    };
    link.send(&Message::Prepared).await?;
    test_pause("agent-prepared");
    let mut ahead = HashMap::new();
    if precopy {
        ahead = match restore_precopy(config, &mut link, service, &mut groups, &mut report).await {
            Ok(ahead) => ahead,
            Err(error) => return Err(failed(&mut link, error).await),
        };
        link.send(&Message::Precopied {
            connections: ahead.len(),
        })
        .await?;
    }
    let restoring =
        receive_and_restore(config, &mut link, service, &mut groups, &ahead, &mut report).await;
    let restored = match restoring.and_then(|restored| {
        // The deadline counts from here, not from Prepare: one map update.
        freeze.freeze_services(&[service], FREEZE_TTL)?;
        Ok(restored)
    }) {
        Ok(restored) => restored,
        Err(error) => return Err(failed(&mut link, error).await),
    };
    link.send(&Message::Restored {
        connections: restored,
        restore_ms: report.restore_ms,
    })
    .await?;
    let restored_sent = Instant::now();
    test_pause("agent-restored");
    let answer_within_ms = match link.recv_message("waiting for Commit", None).await? {
        Message::Commit { answer_within_ms } => answer_within_ms,
        other => return Err(link.unexpected("waiting for Commit", &other)),
    };
    // The source gives up waiting for GoingLive `answer_within_ms` after it sent Commit, which
    // is after we sent Restored: answering within half of that leaves the other half for
    // GoingLive to travel. Later, the source may have rolled back: going live would duplicate
    // the connections.
    let after = restored_sent.elapsed();
    if after > Duration::from_millis(answer_within_ms) / 2 {
        let error = MigrateError::LateCommit {
            after_ms: after.as_millis() as u64,
            limit_ms: answer_within_ms,
        };
        return Err(failed(&mut link, error).await);
    }
    test_pause("agent-commit");
    // From here on the connections go live here whatever happens to the link: the source
    // committed, and a source that died meanwhile has a guard that finishes its commit.
    if let Err(error) = link.send(&Message::GoingLive).await {
        tracing::warn!(%error, "telling the source that the connections go live here");
    }
    go_live(&takeover, &groups, freeze, service, &mut report)?;
    (report.resident_kib, report.peak_resident_kib) = resident_memory();
    let committed = Message::Committed {
        report: report.clone(),
    };
    if let Err(error) = link.send(&committed).await {
        tracing::warn!(%error, "confirming the commit to the source");
    }
    Ok(AgentOutcome {
        source,
        service,
        live: LiveConnections {
            groups,
            netns: config.netns.clone(),
        },
        report,
    })
}

/// Waits for a source that passes the handshake. Those that do not (wrong token or protocol,
/// garbage, silence) are refused and the agent goes on waiting, until 60 step timeouts passed.
async fn accept_source(config: &AgentConfig) -> Result<(Link, SocketAddr), MigrateError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| MigrateError::Listen {
            listen: config.listen,
            source,
        })?;
    tracing::info!(listen = %config.listen, "waiting for a source");
    let deadline = tokio::time::Instant::now() + config.step_timeout * 60;
    loop {
        let (stream, source) = tokio::time::timeout_at(deadline, listener.accept())
            .await
            .map_err(|_| MigrateError::NoSource {
                listen: config.listen,
            })?
            .map_err(|source| MigrateError::Accept {
                listen: config.listen,
                source,
            })?;
        let mut link = Link::new(stream, source, config.step_timeout);
        match handshake(config, &mut link).await {
            Ok(()) => {
                link.authenticated();
                return Ok((link, source));
            }
            Err(error) => tracing::warn!(%source, %error, "refused a source; waiting for another"),
        }
    }
}

async fn handshake(config: &AgentConfig, link: &mut Link) -> Result<(), MigrateError> {
    let (protocol, token) = match link.recv_message("waiting for Hello", None).await? {
        Message::Hello { protocol, token } => (protocol, token),
        other => return Err(link.unexpected("waiting for Hello", &other)),
    };
    let refusal = if protocol != PROTOCOL_VERSION {
        Some(Refusal::Protocol { theirs: protocol })
    } else if !config.token.matches(&token) {
        Some(Refusal::WrongToken)
    } else {
        None
    };
    match refusal {
        Some(reason) => {
            link.send(&Message::Refused {
                reason: reason.to_string(),
            })
            .await?;
            Err(MigrateError::RefusedSource {
                peer: link.peer(),
                reason,
            })
        }
        None => {
            link.send(&Message::Welcome {
                protocol: PROTOCOL_VERSION,
            })
            .await
        }
    }
}

/// Tells the source that this side failed (unless the source aborted), and returns the error.
async fn failed(link: &mut Link, error: MigrateError) -> MigrateError {
    if !matches!(error, MigrateError::Aborted { .. }) {
        let _ = link
            .send(&Message::Failed {
                error: super::chain(&error),
            })
            .await;
    }
    error
}

/// What [`prepare`] made ready.
struct Ready<'a> {
    groups: Vec<Shard<Group>>,
    freeze: Freeze,
    takeover: Takeover<'a>,
}

/// What the blackout would otherwise pay for, done on Prepare, before the source stops its
/// application: pools of `expected` sockets in all bound to the service, one per group, on the
/// groups' threads (socket() and bind are the costliest restore calls); beside them, the freeze
/// programs (10-40 ms of CPU that would compete with the restore for the CPUs); then the netlink
/// session and packet socket that add and announce the address. The freeze is unpinned: an
/// agent killed at any point leaves nothing attached.
fn prepare<'a>(
    config: &'a AgentConfig,
    netns: &'a Netns,
    service: SocketAddr,
    prefix_len: u8,
    expected: u32,
    report: &mut AgentReport,
) -> Result<Ready<'a>, MigrateError> {
    let name = format!("{FREEZE_PREFIX}{}", std::process::id());
    let started = Instant::now();
    let sizes = group_sizes(expected as usize, config.max_per_process);
    let groups = spawn_groups(sizes.len())?;
    let pooling: Vec<_> = groups
        .iter()
        .zip(sizes)
        .map(|(group, size)| {
            let spec = config.netns.clone();
            group.start(move |group| {
                let netns = Netns::open(&spec)?;
                let pool = SocketPool::prepare(Workers::PerCpu, &netns, service, size)?;
                group.pool = Some(pool);
                Ok::<_, MigrateError>(size)
            })
        })
        .collect();
    let attached = Instant::now();
    let freeze = Freeze::attach_unpinned(netns, &config.dev, &name);
    report.freeze_ms = millis(attached.elapsed());
    let mut pooled = 0;
    for pending in pooling {
        pooled += pending.wait()?;
    }
    report.pool_ms = millis(started.elapsed());
    report.pooled = pooled;
    Ok(Ready {
        groups,
        freeze: freeze?,
        takeover: Takeover::prepare(netns, &config.dev, service.ip(), prefix_len)?,
    })
}

/// `count` shards for groups of connections.
fn spawn_groups(count: usize) -> Result<Vec<Shard<Group>>, MigrateError> {
    (0..count)
        .map(|k| Shard::spawn(format!("group-{k}")).map_err(MigrateError::GroupThread))
        .collect()
}

/// `total` split evenly into the fewest groups of at most `max` (one group when there are none).
fn group_sizes(total: usize, max: usize) -> Vec<usize> {
    let groups = total.div_ceil(max.max(1)).max(1);
    (0..groups)
        .map(|k| total / groups + usize::from(k < total % groups))
        .collect()
}

/// Receives the pre-copy's image and restores it ahead, in repair mode, each group its share on
/// sockets of its pool; returns the group each connection is in. When a group cannot restore
/// its share (a 4-tuple in use, say), nothing stays ahead: every connection is restored after
/// the freeze then, as without a pre-copy.
async fn restore_precopy(
    config: &AgentConfig,
    link: &mut Link,
    service: SocketAddr,
    groups: &mut Vec<Shard<Group>>,
    report: &mut AgentReport,
) -> Result<HashMap<Tuple, usize>, MigrateError> {
    let connections = receive_image(config, link).await?;
    let started = Instant::now();
    let parts = split_evenly(connections, groups, config.max_per_process)?;
    let restoring = on_each_group(
        config,
        service,
        groups,
        parts,
        |group, netns, mut pool, part| {
            let mine = pool.split_off(part.len());
            // The rest is for the connections the dump brings beside the pre-copy's.
            group.pool = Some(pool);
            let ahead = repair::restore_ahead(Workers::PerCpu, netns, part, mine)?;
            Ok(group.ahead.insert(ahead).tuples().collect::<Vec<_>>())
        },
    );
    let mut ahead = HashMap::new();
    let mut failure = None;
    for (k, restored) in restoring.into_iter().enumerate() {
        match restored {
            Ok(tuples) => ahead.extend(tuples.into_iter().map(|tuple| (tuple, k))),
            Err(error) => failure = Some(error),
        }
    }
    if let Some(error) = failure {
        tracing::warn!(%error, "restoring the pre-copy ahead; restoring everything after the freeze");
        shard::run_all(groups, |_, group| group.ahead = None);
        ahead.clear();
    }
    report.precopied = ahead.len();
    report.precopy_ms = millis(started.elapsed());
    Ok(ahead)
}

/// Receives the image and restores it in repair mode, each group on its pool's sockets (or on
/// those of its pre-copy, for the connections in `ahead`), the groups side by side; more
/// connections than the pools planned for get groups of their own. Returns how many were
/// restored.
async fn receive_and_restore(
    config: &AgentConfig,
    link: &mut Link,
    service: SocketAddr,
    groups: &mut Vec<Shard<Group>>,
    ahead: &HashMap<Tuple, usize>,
    report: &mut AgentReport,
) -> Result<usize, MigrateError> {
    let connections = receive_image(config, link).await?;
    let started = Instant::now();
    let parts = if ahead.is_empty() {
        split_evenly(connections, groups, config.max_per_process)?
    } else {
        split_by_precopy(connections, groups, ahead, config.max_per_process)?
    };
    let restoring = on_each_group(
        config,
        service,
        groups,
        parts,
        |group, netns, pool, part| {
            let restored = match group.ahead.take() {
                Some(ahead) => ahead.restore(Workers::PerCpu, netns, &part, pool)?,
                None => repair::restore_with_pool(Workers::PerCpu, netns, &part, pool)?,
            };
            let restored = group.restored.insert(restored);
            Ok((restored.len(), restored.precopied()))
        },
    );
    let mut restored = 0;
    let mut first_error = None;
    for outcome in restoring {
        match outcome {
            Ok((count, precopied)) => {
                restored += count;
                report.kept_precopied += precopied;
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    report.restored = restored;
    report.shards = groups.len();
    report.restore_ms = millis(started.elapsed());
    Ok(restored)
}

/// Runs `work` on every group's thread, side by side, inside the agent's namespace, with the
/// group's part and its pool (an empty one when it has none left); returns each outcome, in
/// group order.
fn on_each_group<R: Send + 'static>(
    config: &AgentConfig,
    service: SocketAddr,
    groups: &[Shard<Group>],
    parts: Vec<Vec<Connection>>,
    work: impl Fn(&mut Group, &Netns, SocketPool, Vec<Connection>) -> Result<R, MigrateError>
    + Clone
    + Send
    + 'static,
) -> Vec<Result<R, MigrateError>> {
    let started: Vec<_> = groups
        .iter()
        .zip(parts)
        .map(|(group, part)| {
            let (spec, work) = (config.netns.clone(), work.clone());
            group.start(move |group| {
                let netns = Netns::open(&spec)?;
                let pool = match group.pool.take() {
                    Some(pool) => pool,
                    None => SocketPool::prepare(Workers::PerCpu, &netns, service, 0)?,
                };
                work(group, &netns, pool, part)
            })
        })
        .collect();
    started.into_iter().map(shard::Pending::wait).collect()
}

/// `connections` cut into one part per group, in order, in the fewest groups of at most `max`
/// (more groups are started when the existing ones are too few).
fn split_evenly(
    mut connections: Vec<Connection>,
    groups: &mut Vec<Shard<Group>>,
    max: usize,
) -> Result<Vec<Vec<Connection>>, MigrateError> {
    let sizes = group_sizes(connections.len(), max);
    if sizes.len() > groups.len() {
        groups.extend(spawn_groups(sizes.len() - groups.len())?);
    }
    // Cut from the end, so each group's connections keep their order.
    let mut parts: Vec<Vec<Connection>> = Vec::with_capacity(groups.len());
    for &size in sizes.iter().rev() {
        parts.push(connections.split_off(connections.len() - size));
    }
    parts.reverse();
    parts.resize_with(groups.len(), Vec::new);
    Ok(parts)
}

/// One part per group: each connection of the pre-copy to the group that holds its socket
/// (the fd is in that group's table), the others to the group with the fewest, while it has
/// fewer than `max` (more groups are started when all are full).
fn split_by_precopy(
    connections: Vec<Connection>,
    groups: &mut Vec<Shard<Group>>,
    ahead: &HashMap<Tuple, usize>,
    max: usize,
) -> Result<Vec<Vec<Connection>>, MigrateError> {
    let mut parts: Vec<Vec<Connection>> = groups.iter().map(|_| Vec::new()).collect();
    let mut others = Vec::new();
    for conn in connections {
        match ahead.get(&conn.tuple) {
            Some(&k) => parts[k].push(conn),
            None => others.push(conn),
        }
    }
    for conn in others {
        let fewest = parts
            .iter()
            .enumerate()
            .min_by_key(|(_, part)| part.len())
            .map(|(k, part)| (k, part.len()));
        match fewest {
            Some((k, len)) if len < max => parts[k].push(conn),
            _ => {
                groups.extend(spawn_groups(1)?);
                parts.push(vec![conn]);
            }
        }
    }
    Ok(parts)
}

async fn receive_image(
    config: &AgentConfig,
    link: &mut Link,
) -> Result<Vec<Connection>, MigrateError> {
    let mut decoder = Decoder::new();
    let mut buffer = BytesMut::new();
    let mut connections = Vec::new();
    let mut received = 0u64;
    loop {
        if received > config.max_image_bytes {
            return Err(MigrateError::ImageTooLarge {
                limit: config.max_image_bytes,
            });
        }
        match decoder.decode(&mut buffer)? {
            Decoded::Connection(conn) => connections.push(*conn),
            Decoded::End => {
                decoder.finish(&buffer)?;
                return Ok(connections);
            }
            Decoded::NeedMore(_) => match link.recv("receiving the image", None).await? {
                Frame::Image(piece) => {
                    received += piece.len() as u64;
                    buffer.extend_from_slice(&piece);
                    if config.stop_after_image_bytes.is_some_and(|n| received >= n) {
                        tracing::warn!(received, "stopping myself (--stop-after-image-bytes)");
                        // SAFETY: raise(3) with a valid signal number.
                        unsafe { libc::raise(libc::SIGSTOP) };
                    }
                }
                Frame::Message(Message::Abort { reason }) => {
                    return Err(MigrateError::Aborted { reason });
                }
                Frame::Message(other) => {
                    return Err(link.unexpected("receiving the image", &other));
                }
            },
        }
    }
}

/// Address and its announcements, unfreeze, repair off: the blackout ends.
///
/// The announcements go out together, right after the address, as keepalived sends its
/// gratuitous ARPs: the interface is quiet then (the destination is still frozen), so one frame
/// lost does not mean all are. Spaced 30 ms apart after the commit they delayed the hand-over to
/// the application by 60 ms, which every client's catch-up showed.
fn go_live(
    takeover: &Takeover<'_>,
    groups: &[Shard<Group>],
    mut freeze: Freeze,
    service: SocketAddr,
    report: &mut AgentReport,
) -> Result<(), MigrateError> {
    let committed_at = Instant::now();
    takeover.claim(net::ANNOUNCE_COUNT)?;
    report.announcements = net::ANNOUNCE_COUNT;
    report.address_ms = millis(committed_at.elapsed());
    freeze.thaw_services(&[service])?;
    report.live_after_commit_ms = millis(committed_at.elapsed());
    report.live_at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, millis);
    let step = Instant::now();
    let committed = shard::run_all(groups, |_, group| {
        let Some(restored) = group.restored.take() else {
            return (0, Vec::new());
        };
        let committed = restored.commit();
        group.live = committed.sockets;
        let failures: Vec<String> = committed.failures.iter().map(ToString::to_string).collect();
        (group.live.len(), failures)
    });
    report.repair_off_ms = millis(step.elapsed());
    for (live, failures) in committed {
        report.live += live;
        report.failed += failures.len();
        if report.first_failure.is_none() {
            report.first_failure = failures.into_iter().next();
        }
    }
    report.dropped = freeze.counters()?.into();
    freeze.remove()?;
    Ok(())
}

/// Removes what agents that died left pinned: the whole freeze of an older agent (its programs
/// would stay attached, idle, until then), or the maps of one killed while attaching its unpinned
/// freeze.
fn remove_stale_freezes() {
    let Ok(names) = Freeze::list() else {
        return;
    };
    for name in names {
        let Some(pid) = name
            .strip_prefix(FREEZE_PREFIX)
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match freeze::remove(&name) {
                Ok(()) => tracing::info!(%name, "removed the freeze of a dead agent"),
                Err(error) => tracing::warn!(%name, %error, "removing the freeze of a dead agent"),
            }
        }
    }
}
