//! The destination side: get ready on Prepare (a pool of sockets and the freeze programs, before
//! the source freezes), receive, restore in repair mode, and go live on Commit.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::BytesMut;

use super::{
    AgentReport, FREEZE_TTL, MigrateError, Privileged, Token, check_privileges, millis, test_pause,
    transport::{Frame, Link, Message, PROTOCOL_VERSION},
};
use crate::{
    freeze::{self, Freeze},
    image::{Decoded, Decoder},
    net::{self, Netns, Takeover},
    repair::{self, Connection, RestoredSocket, RestoredSockets, SocketPool, Workers},
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
}

/// A completed migration on the destination: the live sockets, to hand to the application.
#[derive(Debug)]
pub struct AgentOutcome {
    pub source: SocketAddr,
    pub service: SocketAddr,
    pub sockets: Vec<RestoredSocket>,
    pub report: AgentReport,
}

/// Waits for one source, receives its connections and makes them live here.
pub fn agent(config: &AgentConfig) -> Result<AgentOutcome, MigrateError> {
    check_privileges(Privileged::Agent)?;
    let netns = Netns::open(&config.netns)?;
    remove_stale_freezes();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| MigrateError::Setup(format!("starting the async runtime: {e}")))?;
    runtime.block_on(run(config, &netns))
}

async fn run(config: &AgentConfig, netns: &Netns) -> Result<AgentOutcome, MigrateError> {
    let (mut link, source) = accept_source(config).await?;
    let (service, prefix_len, expected) =
        match link.recv_message("waiting for Prepare", None).await? {
            Message::Prepare {
                service,
                prefix_len,
                expected_connections,
            } => (service, prefix_len, expected_connections),
            other => return Err(link.unexpected("waiting for Prepare", &other)),
        };
    let mut report = AgentReport::default();
    let ready = prepare(config, netns, service, prefix_len, expected, &mut report);
    let Ready {
        pool,
        mut freeze,
        takeover,
    } = match ready {
        Ok(ready) => ready,
        Err(error) => return Err(failed(&mut link, error).await),
    };
    link.send(&Message::Prepared).await?;
    test_pause("agent-prepared");
    let restoring = receive_and_restore(config, netns, &mut link, pool, &mut report).await;
    let restored = match restoring.and_then(|restored| {
        // The deadline counts from here, not from Prepare: one map update.
        freeze.freeze_services(&[service], FREEZE_TTL)?;
        Ok(restored)
    }) {
        Ok(restored) => restored,
        Err(error) => return Err(failed(&mut link, error).await),
    };
    link.send(&Message::Restored {
        connections: restored.len(),
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
    let sockets = go_live(&takeover, restored, freeze, service, &mut report)?;
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
        sockets,
        report,
    })
}

/// Waits for a source that passes the handshake. Those that do not (wrong token or protocol,
/// garbage, silence) are refused and the agent goes on waiting, until 60 step timeouts passed.
async fn accept_source(config: &AgentConfig) -> Result<(Link, SocketAddr), MigrateError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| MigrateError::Setup(format!("listening on {}: {e}", config.listen)))?;
    tracing::info!(listen = %config.listen, "waiting for a source");
    let deadline = tokio::time::Instant::now() + config.step_timeout * 60;
    loop {
        let (stream, source) = tokio::time::timeout_at(deadline, listener.accept())
            .await
            .map_err(|_| MigrateError::Setup(format!("no source connected to {}", config.listen)))?
            .map_err(|e| MigrateError::Setup(format!("accepting on {}: {e}", config.listen)))?;
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
        Some(format!(
            "protocol version {protocol}, this agent speaks {PROTOCOL_VERSION}: run the same \
             tcpmig version on both sides"
        ))
    } else if !config.token.matches(&token) {
        Some("wrong token (check --token-file on both sides)".to_owned())
    } else {
        None
    };
    match refusal {
        Some(reason) => {
            link.send(&Message::Refused {
                reason: reason.clone(),
            })
            .await?;
            Err(MigrateError::Setup(format!(
                "refused the source at {}: {reason}",
                link.peer()
            )))
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
    pool: SocketPool,
    freeze: Freeze,
    takeover: Takeover<'a>,
}

/// What the blackout would otherwise pay for, done on Prepare, before the source stops its
/// application: a pool of `expected` sockets bound to the service (socket() and bind are the
/// costliest restore calls); on a thread beside it, the freeze programs (10-40 ms of CPU that
/// would compete with the restore for the CPUs); then the netlink session and packet socket
/// that add and announce the address. The freeze is unpinned: an agent killed at any point
/// leaves nothing attached.
fn prepare<'a>(
    config: &'a AgentConfig,
    netns: &'a Netns,
    service: SocketAddr,
    prefix_len: u8,
    expected: u32,
    report: &mut AgentReport,
) -> Result<Ready<'a>, MigrateError> {
    let name = format!("{FREEZE_PREFIX}{}", std::process::id());
    let (pool, freeze) = std::thread::scope(|scope| {
        let attaching = scope.spawn(|| {
            let started = Instant::now();
            let freeze = Freeze::attach_unpinned(netns, &config.dev, &name);
            (freeze, started.elapsed())
        });
        let started = Instant::now();
        let pool = SocketPool::prepare(Workers::PerCpu, netns, service, expected as usize);
        report.pool_ms = millis(started.elapsed());
        let (freeze, freeze_time) = attaching
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        report.freeze_ms = millis(freeze_time);
        (pool, freeze)
    });
    let pool = pool?;
    report.pooled = pool.len();
    Ok(Ready {
        pool,
        freeze: freeze?,
        takeover: Takeover::prepare(netns, &config.dev, service.ip(), prefix_len)?,
    })
}

/// Receives the image and restores it in repair mode, on the pool's sockets.
async fn receive_and_restore(
    config: &AgentConfig,
    netns: &Netns,
    link: &mut Link,
    pool: SocketPool,
    report: &mut AgentReport,
) -> Result<RestoredSockets, MigrateError> {
    let connections = receive_image(config, link).await?;
    let started = Instant::now();
    let restored = repair::restore_with_pool(Workers::PerCpu, netns, &connections, pool)?;
    report.restored = connections.len();
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
    restored: RestoredSockets,
    mut freeze: Freeze,
    service: SocketAddr,
    report: &mut AgentReport,
) -> Result<Vec<RestoredSocket>, MigrateError> {
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
    let committed = restored.commit();
    report.repair_off_ms = millis(step.elapsed());
    report.live = committed.sockets.len();
    report.failed = committed.failures.len();
    report.first_failure = committed.failures.first().map(ToString::to_string);
    report.dropped = freeze.counters()?.into();
    freeze.remove()?;
    Ok(committed.sockets)
}

/// This process's resident memory and its peak, in KiB (VmRSS and VmHWM of /proc/self/status).
fn resident_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
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
