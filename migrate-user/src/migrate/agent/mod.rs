//! The destination side of a migration: get ready on Prepare (a pool of sockets and the freeze
//! programs, before the source freezes), receive, restore in repair mode, and go live on Commit
//! (docs/architecture.md walks through the steps).
//!
//! The connections are restored in groups of at most `max_per_process`, each group in a shard of
//! its own ([`crate::shard`]): one fd table, and one application process, holds at most one
//! group ([`groups`]). Most migrations are one group. [`restore`] holds the steps from Prepare
//! to live sockets, [`live`] hands them to the application.
mod groups;
mod live;
mod quiet;
mod restore;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

pub use self::live::LiveConnections;
use self::restore::{
    Frozen, Ready, go_live, prepare, receive_and_restore, restore_precopy, tell_live,
};
use super::{
    AgentReport, FREEZE_TTL, MigrateError, MovedAddress, Privileged, Refusal, ServerSecurity,
    Token, check_privileges, require_token_in_plaintext, resident_memory, test_pause,
    transport::{ExpectedService, Link, Message, PROTOCOL_VERSION},
};
use crate::{
    freeze::{self, Freeze},
    net::Netns,
    sys::{self, Capability, CapabilitySet},
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
    /// Mutual TLS (the source must present a certificate of our CA), or plaintext if the
    /// operator said so. A peer that fails TLS, or speaks the wrong one, ends the agent.
    pub security: ServerSecurity,
    /// A token the source must also present (required in plaintext). Sources without it are
    /// refused, and the agent goes on waiting for the right one.
    pub token: Option<Token>,
    /// Images larger than this are refused (the migration rolls back).
    pub max_image_bytes: u64,
    /// Bound on each step of the source, and on the wait for it to connect (times 60).
    pub step_timeout: Duration,
    /// Testing aid: once this many image bytes arrived, the agent stops itself (SIGSTOP), so a
    /// test can kill it at a known point.
    pub stop_after_image_bytes: Option<u64>,
    /// Most connections one group holds, and one application process gets; more make several
    /// groups. See [`crate::handoff::max_fds_per_process`].
    pub max_per_process: usize,
    /// The capabilities the application gets (as ambient capabilities, so that they survive
    /// execve whatever its user); it gets no other, even as root. The agent holds them until it
    /// starts the application (permitted, not effective), beside those it keeps for itself
    /// ([`kept_capabilities`]).
    pub app_capabilities: CapabilitySet,
    /// Capabilities the caller still needs once the agent listens, beside
    /// [`kept_capabilities`]: `tcpmig agent --handoff` keeps CAP_DAC_OVERRIDE, to connect to an
    /// application's Unix socket that another user owns.
    pub also_keep: CapabilitySet,
}

/// A completed migration on the destination: the live sockets, to hand to the application.
pub struct AgentOutcome {
    pub source: SocketAddr,
    /// The services whose connections are live here.
    pub services: Vec<SocketAddr>,
    pub live: LiveConnections,
    pub report: AgentReport,
}

/// Waits for one source, receives its connections and makes them live here. Once it listens
/// for the source, the calling thread (the only one of the process: capabilities belong to
/// threads) drops every capability but [`kept_capabilities`] and
/// [`AgentConfig::app_capabilities`], from its bounding set too.
///
/// # Examples
/// Takes the connections [`migrate`](crate::migrate::migrate) sends, adds the service's
/// addresses to eth0, and hands the live sockets to the application over a Unix socket:
/// ```no_run
/// use std::path::Path;
///
/// use tcpmig::{
///     handoff,
///     migrate::{
///         self, AgentConfig, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_STEP_TIMEOUT, ServerSecurity,
///         TlsFiles,
///     },
///     sys::{Capability, CapabilitySet},
/// };
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = AgentConfig {
///     listen: "192.0.2.2:7070".parse()?,
///     netns: "/proc/self/ns/net".into(),
///     dev: "eth0".into(),
///     security: ServerSecurity::tls(&TlsFiles {
///         cert: "/etc/tcpmig/agent.pem".into(),
///         key: "/etc/tcpmig/agent.key".into(),
///         ca: "/etc/tcpmig/ca.pem".into(),
///     })?,
///     token: None,
///     max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
///     step_timeout: DEFAULT_STEP_TIMEOUT,
///     stop_after_image_bytes: None,
///     max_per_process: handoff::max_fds_per_process()?,
///     // Handed over a Unix socket (below): the application starts itself, so it gets none
///     // from the agent; the agent may need to reach a socket another user owns.
///     app_capabilities: CapabilitySet::EMPTY,
///     also_keep: CapabilitySet::of(&[Capability::DacOverride]),
/// };
/// let outcome = migrate::agent(&config)?;
/// outcome.live.send_to(Path::new("/run/app/fds.sock"))?;
/// # Ok(())
/// # }
/// ```
pub fn agent(config: &AgentConfig) -> Result<AgentOutcome, MigrateError> {
    check_privileges(Privileged::Agent)?;
    let plaintext = matches!(config.security, ServerSecurity::Insecure);
    require_token_in_plaintext(plaintext, config.token.as_ref())?;
    check_app_capabilities(config)?;
    let netns = Netns::open(&config.netns)?;
    remove_stale_freezes();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MigrateError::Runtime)?;
    runtime.block_on(run(config, &netns))
}

/// What the source asks for in Prepare.
struct Request {
    services: Vec<ExpectedService>,
    addresses: Vec<MovedAddress>,
    precopy: bool,
    /// A rebalance: the addresses stay on the source, held quietly here.
    keep_address: bool,
}

async fn run(config: &AgentConfig, netns: &Netns) -> Result<AgentOutcome, MigrateError> {
    let (mut link, source) = accept_source(config).await?;
    let request = receive_prepare(&mut link).await?;
    let services: Vec<SocketAddr> = request.services.iter().map(|s| s.service).collect();
    let mut report = AgentReport::default();
    let ready = prepare(config, netns, &request, &mut report);
    let Ready {
        mut groups,
        mut freeze,
        claim,
        listeners,
        replayer,
        hold,
        mac,
    } = or_fail(&mut link, ready).await?;
    report.listener = !listeners.is_empty();
    let has_addresses = claim.has_addresses();
    link.send(&Message::Prepared { mac, has_addresses }).await?;
    test_pause("agent-prepared");
    let mut ahead = HashMap::new();
    if request.precopy {
        let restored = restore_precopy(config, &mut link, &mut groups, &mut report).await;
        ahead = or_fail(&mut link, restored).await?;
        let connections = ahead.len();
        link.send(&Message::Precopied { connections }).await?;
    }
    let restoring = receive_and_restore(config, &mut link, &mut groups, &ahead, &mut report).await;
    let restoring = restoring.and_then(|restored| {
        let frozen = Frozen::of(request.keep_address, &services, &groups);
        // The deadline counts from here, not from Prepare: one map update.
        frozen.freeze(&mut freeze, FREEZE_TTL)?;
        Ok((restored, frozen))
    });
    let (connections, frozen) = or_fail(&mut link, restoring).await?;
    let restore_ms = report.restore_ms;
    link.send(&Message::Restored {
        connections,
        restore_ms,
    })
    .await?;
    let restored_sent = Instant::now();
    test_pause("agent-restored");
    receive_commit(&mut link, restored_sent).await?;
    test_pause("agent-commit");
    // From here on the connections go live here whatever happens to the link: the source
    // committed, and a source that died meanwhile has a guard that finishes its commit.
    if let Err(error) = link.send(&Message::GoingLive).await {
        tracing::warn!(%error, "telling the source that the connections go live here");
    }
    let held_here = (hold, &replayer);
    let thawed = go_live(&claim, &groups, freeze, &frozen, held_here, &mut report)?;
    tell_live(&mut link, thawed, &mut report).await?;
    (report.resident_kib, report.peak_resident_kib) = resident_memory();
    let committed = Message::Committed {
        report: Box::new(report.clone()),
    };
    if let Err(error) = link.send(&committed).await {
        tracing::warn!(%error, "confirming the commit to the source");
    }
    let live = LiveConnections::new(groups, config, listeners);
    Ok(AgentOutcome {
        source,
        services,
        live,
        report,
    })
}

async fn receive_prepare(link: &mut Link) -> Result<Request, MigrateError> {
    let waiting = "waiting for Prepare";
    match link.recv_message(waiting, None).await? {
        Message::Prepare {
            services,
            addresses,
            precopy,
            keep_address,
        } if !services.is_empty() => Ok(Request {
            services,
            addresses,
            precopy,
            keep_address,
        }),
        other => Err(link.unexpected(waiting, &other)),
    }
}

/// Waits for Commit. The source gives up waiting for GoingLive `answer_within_ms` after it sent
/// Commit, which is after we sent Restored: answering within half of that leaves the other half
/// for GoingLive to travel. Later, the source may have rolled back: going live would duplicate
/// the connections, so a late Commit fails the migration here.
async fn receive_commit(link: &mut Link, restored_sent: Instant) -> Result<(), MigrateError> {
    let waiting = "waiting for Commit";
    let answer_within_ms = match link.recv_message(waiting, None).await? {
        Message::Commit { answer_within_ms } => answer_within_ms,
        other => return Err(link.unexpected(waiting, &other)),
    };
    let after = restored_sent.elapsed();
    if after > Duration::from_millis(answer_within_ms) / 2 {
        let error = MigrateError::LateCommit {
            after_ms: after.as_millis() as u64,
            limit_ms: answer_within_ms,
        };
        return Err(failed(link, error).await);
    }
    Ok(())
}

/// Waits for a source that passes the handshake. Those that do not (wrong token or protocol,
/// garbage, silence) are refused and the agent goes on waiting, until 60 step timeouts passed;
/// one that fails TLS or speaks the other of TLS and plaintext ends the agent with its error
/// (a misconfigured pair shows at once, on both sides).
async fn accept_source(config: &AgentConfig) -> Result<(Link, SocketAddr), MigrateError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| MigrateError::Listen {
            listen: config.listen,
            source,
        })?;
    drop_capabilities(config)?;
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
        let accepted = Link::accept(stream, source, config.step_timeout, &config.security);
        let Some(mut link) = accepted.await? else {
            tracing::warn!(%source, "a peer connected and sent nothing; waiting for another");
            continue;
        };
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
    } else if config
        .token
        .as_ref()
        .is_some_and(|ours| !ours.matches(&token))
    {
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

/// `result`, after telling the source when it is an error (see [`failed`]).
async fn or_fail<T>(link: &mut Link, result: Result<T, MigrateError>) -> Result<T, MigrateError> {
    match result {
        Ok(value) => Ok(value),
        Err(error) => Err(failed(link, error).await),
    }
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

/// The capabilities the agent still uses once it listens for the source; it drops every other
/// one (see [`agent`]):
/// - CAP_SYS_ADMIN: entering the namespace (setns) on the threads of the groups, of the
///   netlink session and of the freeze, and for the application; loading and attaching the
///   freeze programs (it stands in for CAP_BPF and CAP_PERFMON); mounting bpffs when it is not;
/// - CAP_NET_ADMIN: repair mode (TCP_REPAIR), SO_SNDBUFFORCE, SO_RCVBUFFORCE and SO_MARK on the
///   restored sockets, attaching the freeze programs (tcx), adding the service address
///   (netlink);
/// - CAP_NET_RAW: the packet socket of the address announcements (gratuitous ARP, unsolicited
///   NA), the raw socket that replays the segments the source's freeze held, IP_TRANSPARENT on
///   the restored sockets (bound before the address exists here);
/// - CAP_NET_BIND_SERVICE: binding the restored sockets and the service's listener to the
///   service's port, when it is below the namespace's ip_unprivileged_port_start (1024);
/// - CAP_SETPCAP: emptying the bounding set of the threads that start the application, so that
///   it gets none of these (see [`sys::confine_for_exec`]);
/// - CAP_SYS_PTRACE, only when `netns` is another process's /proc/PID/ns/net: opening it needs
///   ptrace access to that process, which a process with fewer capabilities than it has only
///   with CAP_SYS_PTRACE.
pub fn kept_capabilities(netns: &str) -> CapabilitySet {
    use Capability::{NetAdmin, NetBindService, NetRaw, SetPcap, SysAdmin, SysPtrace};
    let kept = CapabilitySet::of(&[SysAdmin, NetAdmin, NetRaw, NetBindService, SetPcap]);
    match names_another_process(netns) {
        true => kept.union(CapabilitySet::of(&[SysPtrace])),
        false => kept,
    }
}

/// Whether `netns` is a path under /proc/PID of a process other than this one.
fn names_another_process(netns: &str) -> bool {
    let Some(pid) = netns
        .strip_prefix("/proc/")
        .and_then(|rest| rest.split('/').next())
    else {
        return false;
    };
    !["self", "thread-self", &std::process::id().to_string()].contains(&pid)
}

/// Fails before anything is done when the application is to get a capability this process
/// does not hold.
fn check_app_capabilities(config: &AgentConfig) -> Result<(), MigrateError> {
    sys::ThreadCapabilities::of_this_thread()
        .and_then(|sets| sets.require_permitted(config.app_capabilities))
        .map_err(MigrateError::AppCapabilities)
}

/// Keeps [`kept_capabilities`], and the application's for it, and drops the rest.
fn drop_capabilities(config: &AgentConfig) -> Result<(), MigrateError> {
    let kept = kept_capabilities(&config.netns).union(config.also_keep);
    let dropping = |source| MigrateError::DropCapabilities { kept, source };
    sys::require_single_thread().map_err(dropping)?;
    let now = sys::drop_all_but(kept, config.app_capabilities).map_err(dropping)?;
    tracing::info!(
        effective = %now.effective,
        permitted = %now.permitted,
        "dropped every other capability"
    );
    Ok(())
}
