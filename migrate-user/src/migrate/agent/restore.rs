//! The agent's work between Prepare and live sockets: the pool and freeze programs made ahead,
//! the pre-copy restored ahead, the image received and restored in repair mode, and going live.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use nix::sys::signal::{Signal, raise};

use super::{
    AgentConfig, FREEZE_PREFIX, Request,
    groups::{
        Group, group_sizes, on_each_group, pool_shares, spawn_groups, split_by_precopy,
        split_evenly,
    },
    quiet::{self, QuietAddresses},
};
use crate::{
    freeze::{
        Freeze, FreezeError,
        hold::{HeldPackets, Hold, HoldBudget, HoldError, Replayer, Segments},
    },
    image::{Decoded, Decoder},
    migrate::{
        AgentReport, MigrateError, millis, test_pause,
        transport::{Frame, Link, Message},
    },
    net::{self, Netns, Takeover},
    repair::{self, Connection, SocketPool, Workers},
    shard::{self, Shard},
    tuple::Tuple,
};

/// What [`prepare`] made ready.
pub(super) struct Ready<'a> {
    pub(super) groups: Vec<Shard<Group>>,
    pub(super) freeze: Freeze,
    /// How the addresses come here on the commit.
    pub(super) claim: Claim<'a>,
    /// Take new connections from the address move on, one per service (none for a service
    /// something listens on already).
    pub(super) listeners: Vec<(SocketAddr, OwnedFd)>,
    pub(super) replayer: Replayer,
    /// Keeps what this host's own freeze drops between the address move and its lift (None in
    /// a rebalance: it captures by service, and would take the segments of this host's own
    /// connections to it).
    pub(super) hold: Option<Hold>,
    /// The MAC of the interface (None when it is not Ethernet): where the source forwards what
    /// its freeze held, and in a rebalance steers to.
    pub(super) mac: Option<[u8; 6]>,
}

/// How the addresses come to this host on the commit.
pub(super) enum Claim<'a> {
    /// Moved here and announced: one takeover per address.
    Move(Vec<Takeover<'a>>),
    /// A rebalance: held quietly (see [`QuietAddresses`]).
    Quiet(&'a Netns, QuietAddresses),
}

impl<'a> Claim<'a> {
    fn prepare(
        config: &'a AgentConfig,
        netns: &'a Netns,
        request: &Request,
    ) -> Result<Self, MigrateError> {
        if request.keep_address {
            return Ok(Claim::Quiet(
                netns,
                QuietAddresses::prepare(netns, &request.addresses)?,
            ));
        }
        let takeovers = (request.addresses.iter())
            .map(|address| Takeover::prepare(netns, &config.dev, address.ip, address.prefix_len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Claim::Move(takeovers))
    }

    /// In a rebalance, whether this host has the addresses already: the connections come back
    /// to the host answering for them, which stops forwarding them.
    pub(super) fn has_addresses(&self) -> bool {
        matches!(self, Claim::Quiet(_, quiet) if quiet.holds_all())
    }

    /// The addresses here; in a rebalance, the connections of `frozen` out of this host's
    /// steerings (they come back).
    fn claim(&self, frozen: &Frozen, report: &mut AgentReport) -> Result<(), MigrateError> {
        match self {
            Claim::Move(takeovers) => {
                for takeover in takeovers {
                    takeover.claim(net::ANNOUNCE_COUNT)?;
                }
                report.announcements = net::ANNOUNCE_COUNT;
            }
            Claim::Quiet(netns, quiet) => {
                quiet.claim(netns)?;
                if let Frozen::Tuples(tuples) = frozen {
                    report.taken_back = quiet::take_back(netns, tuples)?;
                }
            }
        }
        Ok(())
    }
}

/// What this host's freeze covers once the connections are restored: the services, or in a
/// rebalance the restored connections only (the application here serves others on them).
pub(super) enum Frozen {
    Services(Vec<SocketAddr>),
    Tuples(Vec<Tuple>),
}

impl Frozen {
    pub(super) fn of(keep_address: bool, services: &[SocketAddr], groups: &[Shard<Group>]) -> Self {
        if !keep_address {
            return Self::Services(services.to_vec());
        }
        let tuples = shard::run_all(groups, |_, group| {
            let restored = group.restored.as_ref();
            restored.map_or_else(Vec::new, |r| r.tuples().collect::<Vec<_>>())
        });
        Self::Tuples(tuples.concat())
    }

    pub(super) fn freeze(&self, freeze: &mut Freeze, ttl: Duration) -> Result<(), FreezeError> {
        match self {
            Self::Services(services) => freeze.freeze_services(services, ttl),
            Self::Tuples(tuples) => freeze.freeze_tuples(tuples, ttl),
        }
    }

    fn thaw(&self, freeze: &mut Freeze) -> Result<(), FreezeError> {
        match self {
            Self::Services(services) => freeze.thaw_services(services),
            Self::Tuples(tuples) => freeze.thaw_tuples(tuples),
        }
    }
}

/// What this host's own freeze may drop: the milliseconds between the address move and the
/// freeze's lift bring a few segments per client that learned the address at once.
const HOLD_HERE: HoldBudget = HoldBudget {
    bytes: 4 << 20,
    packets: 16_384,
};

/// What the blackout would otherwise pay for, done on Prepare, before the source stops its
/// application: pools of as many sockets as the source counted connections, bound to each
/// service's address in proportion to its count, one pool per group, on the groups' threads
/// (socket() and bind are the costliest restore calls); beside them, the freeze programs (10-40 ms of CPU that would compete with the
/// restore for the CPUs); then the netlink session and packet socket that add and announce each
/// address, each service's listener and the raw sockets that replay what the source's freeze
/// held. The freeze is unpinned: an agent killed at any point leaves nothing attached.
pub(super) fn prepare<'a>(
    config: &'a AgentConfig,
    netns: &'a Netns,
    request: &Request,
    report: &mut AgentReport,
) -> Result<Ready<'a>, MigrateError> {
    let services: Vec<SocketAddr> = request.services.iter().map(|s| s.service).collect();
    let name = format!("{FREEZE_PREFIX}{}", std::process::id());
    let started = Instant::now();
    // Before the pools: their sockets bind with repair mode's forced reuse, which a listener
    // bound after them would not be granted.
    // In a rebalance, new connections stay on the source.
    let mut listeners = Vec::new();
    for &service in services.iter().filter(|_| !request.keep_address) {
        if let Some(listener) = net::listen_ahead(netns, service)? {
            listeners.push((service, listener));
        }
    }
    let total: usize = request
        .services
        .iter()
        .map(|s| s.connections as usize)
        .sum();
    let sizes = group_sizes(total, config.max_per_process);
    let groups = spawn_groups(sizes.len())?;
    let pooling: Vec<_> = groups
        .iter()
        .zip(sizes)
        .map(|(group, size)| {
            let (spec, shares) = (
                config.netns.clone(),
                pool_shares(size, total, &request.services),
            );
            group.start(move |group| {
                let netns = Netns::open(&spec)?;
                let mut pool = SocketPool::none();
                for (service, count) in shares {
                    pool.absorb(SocketPool::prepare(
                        Workers::PerCpu,
                        &netns,
                        service,
                        count,
                    )?);
                }
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
    let hold = match request.keep_address {
        true => None,
        false => Some(Hold::open(netns, &config.dev, &services, HOLD_HERE)?),
    };
    let claim = Claim::prepare(config, netns, request)?;
    Ok(Ready {
        groups,
        freeze: freeze?,
        // A source that needs it refuses a None, naming why.
        mac: net::ethernet_link(netns, &config.dev)
            .ok()
            .map(|(_, mac)| mac),
        claim,
        listeners,
        replayer: Replayer::open(netns, &services)?,
        hold,
    })
}

/// Receives the pre-copy's image and restores it ahead, in repair mode, each group its share on
/// sockets of its pool; returns the group each connection is in. When a group cannot restore
/// its share (a 4-tuple in use, say), nothing stays ahead: every connection is restored after
/// the freeze then, as without a pre-copy.
pub(super) async fn restore_precopy(
    config: &AgentConfig,
    link: &mut Link,
    groups: &mut Vec<Shard<Group>>,
    report: &mut AgentReport,
) -> Result<HashMap<Tuple, usize>, MigrateError> {
    let connections = receive_image(config, link).await?;
    let started = Instant::now();
    let parts = split_evenly(connections, groups, config.max_per_process)?;
    let restoring = on_each_group(config, groups, parts, |group, netns, mut pool, part| {
        let mine = pool.split_for(&part);
        // The rest is for the connections the dump brings beside the pre-copy's.
        group.pool = Some(pool);
        let ahead = repair::restore_ahead(Workers::PerCpu, netns, part, mine)?;
        Ok(group.ahead.insert(ahead).tuples().collect::<Vec<_>>())
    });
    let mut ahead = HashMap::new();
    let mut failure = None;
    for (k, restored) in restoring.into_iter().enumerate() {
        match restored {
            Ok(tuples) => ahead.extend(tuples.into_iter().map(|tuple| (tuple, k))),
            Err(error) => failure = Some(error),
        }
    }
    if let Some(error) = failure {
        tracing::warn!(
            %error,
            "restoring the pre-copy ahead; restoring everything after the freeze"
        );
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
pub(super) async fn receive_and_restore(
    config: &AgentConfig,
    link: &mut Link,
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
    let restoring = on_each_group(config, groups, parts, |group, netns, pool, part| {
        let restored = match group.ahead.take() {
            Some(ahead) => ahead.restore(Workers::PerCpu, netns, &part, pool)?,
            None => repair::restore_with_pool(Workers::PerCpu, netns, &part, pool)?,
        };
        let restored = group.restored.insert(restored);
        Ok((restored.len(), restored.precopied()))
    });
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
                        // Cannot fail: SIGSTOP is a valid signal.
                        let _ = raise(Signal::SIGSTOP);
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

/// Addresses and their announcements, unfreeze, repair off: the blackout ends. Returns the thawed
/// freeze, removed later (detaching its programs takes milliseconds, see [`tell_live`]).
///
/// The announcements go out together, right after the address, as keepalived sends its
/// gratuitous ARPs: the interface is quiet then (the destination is still frozen), so one frame
/// lost does not mean all are. Spaced 30 ms apart after the commit they delayed the hand-over to
/// the application by 60 ms, which every client's catch-up showed.
pub(super) fn go_live(
    claim: &Claim<'_>,
    groups: &[Shard<Group>],
    mut freeze: Freeze,
    frozen: &Frozen,
    (mut hold, replayer): (Option<Hold>, &Replayer),
    report: &mut AgentReport,
) -> Result<Freeze, MigrateError> {
    let committed_at = Instant::now();
    // Clients answered by the address's announcements send here at once: a new connection's SYN
    // dropped by the freeze would wait a second for its retry.
    let holding = hold.as_mut().map(|hold| hold.begin(Segments::All));
    claim.claim(frozen, report)?;
    report.address_ms = millis(committed_at.elapsed());
    test_pause("agent-claimed");
    frozen.thaw(&mut freeze)?;
    let held = match (holding, hold.as_mut()) {
        (Some(begun), Some(hold)) => Some(begun.and_then(|()| hold.finish())),
        _ => None,
    };
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
    // Past the commit a hold that failed costs only time: its senders retransmit.
    match held.unwrap_or_else(|| Ok(Default::default())) {
        Ok((held, held_report)) => {
            report.held_here = held_report;
            if let Err(error) = replay(replayer, held.encoded(), report) {
                tracing::warn!(%error, "replaying what this host's freeze held");
            }
        }
        Err(error) => tracing::warn!(%error, "holding what this host's freeze dropped"),
    }
    if let Some(hold) = hold {
        hold.close_in_background();
    }
    Ok(freeze)
}

/// Hands the `encoded` held packets to this host's stack through `replayer`, in their order,
/// counted and timed in the report.
fn replay(replayer: &Replayer, encoded: &[u8], report: &mut AgentReport) -> Result<(), HoldError> {
    let started = Instant::now();
    report
        .replay
        .absorb(replayer.replay(&HeldPackets::decode(encoded)?));
    report.replay_ms += millis(started.elapsed());
    Ok(())
}

/// Tells the source the connections are live (it forwards what its freeze held to this host's
/// MAC from then on, straight into this host's stack) and removes the thawed freeze: its detach
/// (25-30 ms) is left to a keeper process, off the hand-over's path.
pub(super) async fn tell_live(
    link: &mut Link,
    thawed: Freeze,
    report: &mut AgentReport,
) -> Result<(), MigrateError> {
    if let Err(error) = link.send(&Message::Live).await {
        tracing::warn!(%error, "telling the source the connections are live");
    }
    report.dropped = thawed.counters()?.into();
    thawed.remove_in_background()?;
    Ok(())
}
