//! What a migration reports: the source's [`Report`] (`tcpmig migrate --json`), the agent's
//! [`AgentReport`] it contains, and what each side's freeze dropped.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    freeze::{
        Counters,
        hold::{HoldReport, ReplayReport},
    },
    repair,
};

/// Segments dropped by one side's freeze while it was on (the freeze plane's counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// New connection attempts (SYNs) to the service, dropped silently.
    pub syn: u64,
    /// Other segments arriving for the service's connections.
    pub ingress: u64,
    /// Segments the service's sockets sent (repair mode still retransmits).
    pub egress: u64,
}

impl From<Counters> for Dropped {
    fn from(c: Counters) -> Self {
        Self {
            syn: c.syn_dropped,
            ingress: c.ingress_dropped,
            egress: c.egress_dropped,
        }
    }
}

/// What the agent did, sent back to the source in Committed. Durations in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Connections restored (in repair mode).
    pub restored: usize,
    /// Connections out of repair mode and handed over.
    pub live: usize,
    /// Connections that failed to leave repair mode (closed silently), and the first error.
    pub failed: usize,
    pub first_failure: Option<String>,
    /// Attaching the freeze programs on the destination, on Prepare (before the source
    /// freezes), beside the pool.
    pub freeze_ms: f64,
    /// Making the pool of sockets on Prepare, before the source freezes: socket(), repair mode
    /// and bind, out of the blackout.
    #[serde(default)]
    pub pool_ms: f64,
    /// Sockets in that pool: the source's count of connections before it stopped the
    /// application. Connections beyond it, or on another local address, got fresh sockets.
    #[serde(default)]
    pub pooled: usize,
    /// Connections of the source's pre-copy restored ahead of its freeze (`migrate
    /// --precopy`), and the time it took.
    #[serde(default)]
    pub precopied: usize,
    #[serde(default)]
    pub precopy_ms: f64,
    /// Of those, the connections the dump found unchanged: they kept their sockets, and the
    /// restore only set their timestamps.
    #[serde(default)]
    pub kept_precopied: usize,
    /// Recreating the sockets in repair mode, on the pool's sockets.
    pub restore_ms: f64,
    /// Groups the connections were restored in (shards of the agent), each handed to its own
    /// process: more than one when they are more than one process can hold
    /// (`tcpmig agent --max-per-process`).
    #[serde(default)]
    pub shards: usize,
    /// From Commit received to the addresses added and announced.
    pub address_ms: f64,
    /// From Commit received to the first socket leaving repair mode: the end of the blackout.
    pub live_after_commit_ms: f64,
    /// Taking every socket out of repair mode.
    pub repair_off_ms: f64,
    /// When the blackout ended, in milliseconds since the Unix epoch on the agent's clock: to
    /// line up measurements taken elsewhere (clients catching up) on a shared clock.
    pub live_at_unix_ms: f64,
    /// Gratuitous ARPs or unsolicited NAs sent for each address.
    pub announcements: u32,
    /// In a rebalance back to the host that answers for the address: the connections taken out
    /// of its steerings.
    #[serde(default)]
    pub taken_back: usize,
    /// What the destination's freeze dropped before it was lifted.
    pub dropped: Dropped,
    /// Whether a listener of the agent took new connections from the address move on, handed to
    /// the application (false when something there listened on every service already; a
    /// dual-stack service may have one listener of the agent and one of its own).
    #[serde(default)]
    pub listener: bool,
    /// What this host's own freeze dropped and kept between the address move and its lift
    /// (new connections' SYNs, clients that learned the address early), replayed once the
    /// connections were live: counted in `dropped` too, and its replays in `replay`.
    #[serde(default)]
    pub held_here: HoldReport,
    /// What this host's own freeze held (`held_here`), replayed into its stack, and how long that
    /// took (the source forwards its own hold to this host's MAC: `forwarded` in its report).
    #[serde(default)]
    pub replay: ReplayReport,
    #[serde(default)]
    pub replay_ms: f64,
    /// The agent's resident memory once the connections were live, and its peak, in KiB.
    pub resident_kib: u64,
    pub peak_resident_kib: u64,
}

/// The source's account of a migration (`tcpmig migrate --json`). Durations in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub pids: Vec<u32>,
    /// The services whose connections moved (one per family for a dual-stack service).
    pub services: Vec<SocketAddr>,
    pub agent: SocketAddr,
    /// Processes stopped (the application and its descendants).
    pub processes_stopped: usize,
    /// Connections dumped and sent.
    pub connections: usize,
    /// Connections live at the destination.
    pub kept: usize,
    /// Of `connections`, those taken from the application's accept queues: completed by the
    /// source's kernel, never accepted by the application; handed over like the others.
    pub accepted: usize,
    /// Connections of the service left behind: those `left` lists.
    pub skipped: usize,
    /// Each connection left behind, and why: closed ones, and with `--skip-unmovable` those
    /// that cannot move.
    pub left: Vec<LeftConnection>,
    pub image_bytes: usize,
    /// Bytes queued in the sockets, carried in the image: sent but unacknowledged or never sent
    /// (`send_bytes`, of which `unsent_bytes` never left), received but unread (`recv_bytes`).
    pub send_bytes: u64,
    pub unsent_bytes: u64,
    pub recv_bytes: u64,
    /// From the freeze on the source to the first socket out of repair mode on the destination.
    pub blackout_ms: f64,
    /// From the application stopped to the freeze: the part of the clients' silence before the
    /// blackout.
    pub stop_to_freeze_ms: f64,
    pub total_ms: f64,
    pub phases: Phases,
    /// What each side's freeze dropped.
    pub dropped_source: Dropped,
    pub dropped_destination: Dropped,
    /// What the source's freeze held for the destination instead of dropping it (counted in
    /// `dropped_source` too), and what it could not hold.
    pub hold: HoldReport,
    /// Those held segments forwarded to the destination's MAC once it was live (`replayed`: sent),
    /// and the failures.
    pub forwarded: ReplayReport,
    /// Whether the application was ended after the commit (--stop-source).
    pub source_stopped: bool,
    /// From the application stopped to resumed (0 when it was ended): in a rebalance, the pause
    /// of the connections that stay.
    pub application_paused_ms: f64,
    /// A rebalance's choice and steering (`--keep-address`).
    pub rebalance: Option<RebalanceReport>,
    /// This process's peak resident memory, in KiB.
    pub peak_resident_kib: u64,
    pub destination: AgentReport,
}

/// What a rebalance moved, and what forwards the moved connections.
#[derive(Clone, Debug, Serialize)]
pub struct RebalanceReport {
    /// The selector, as given (`all`: every connection of the services, a move back).
    pub selector: String,
    /// The connections it picked, of those of the services the application held then.
    pub picked: usize,
    pub of: usize,
    /// The steering forwarding the moved connections, under /sys/fs/bpf/tcpmig-steer (None when
    /// this host held the address quietly: the host answering for it steers).
    pub steering: Option<String>,
}

impl Report {
    /// The report of a migration that has just begun: every count and time zero.
    pub(super) fn started(pids: Vec<u32>, services: Vec<SocketAddr>, agent: SocketAddr) -> Self {
        Self {
            pids,
            services,
            agent,
            processes_stopped: 0,
            connections: 0,
            kept: 0,
            accepted: 0,
            skipped: 0,
            left: Vec::new(),
            image_bytes: 0,
            send_bytes: 0,
            unsent_bytes: 0,
            recv_bytes: 0,
            blackout_ms: 0.0,
            stop_to_freeze_ms: 0.0,
            total_ms: 0.0,
            phases: Phases::default(),
            dropped_source: Dropped::default(),
            dropped_destination: Dropped::default(),
            hold: HoldReport::default(),
            forwarded: ReplayReport::default(),
            source_stopped: false,
            application_paused_ms: 0.0,
            rebalance: None,
            peak_resident_kib: 0,
            destination: AgentReport::default(),
        }
    }
}

/// A connection a migration left behind (see [`repair::Unmovable`]).
#[derive(Clone, Debug, Serialize)]
pub struct LeftConnection {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: String,
    pub reason: String,
    /// Whether leaving it loses a connection (false for a closed one).
    pub lost: bool,
}

impl From<&repair::Unmovable> for LeftConnection {
    fn from(left: &repair::Unmovable) -> Self {
        Self {
            local: left.tuple.local,
            remote: left.tuple.remote,
            state: left.state.to_string(),
            reason: left.reason.to_string(),
            lost: left.is_loss(),
        }
    }
}

/// Each phase of a migration as the source sees it, in order, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    /// Connect, handshake, agent ready, source freeze programs attached.
    pub prepare_ms: f64,
    /// Finding the application's connections (sock_diag, pidfd_getfd) and reading the options
    /// only it sets, while it runs.
    pub discover_ms: f64,
    /// Stopping the application's process tree.
    pub stop_ms: f64,
    /// With `--precopy`, before the freeze: reading the connections, sending them, and the
    /// agent restoring them ahead.
    pub precopy_ms: f64,
    /// The map update that freezes the service: the blackout starts.
    pub freeze_ms: f64,
    /// Every socket into repair mode and read.
    pub dump_ms: f64,
    /// Encoding the image and sending it.
    pub transfer_ms: f64,
    /// Deleting the service addresses on the source, while the agent restores.
    pub address_ms: f64,
    /// From the address deleted to the agent's Restored.
    pub restore_ms: f64,
    /// From Commit sent to Committed received: address, announcements and repair off there,
    /// and the held segments read here and forwarded there.
    pub commit_ms: f64,
    /// Of that, forwarding the held segments to the destination once it was live.
    pub forward_ms: f64,
    /// Closing the source sockets, ending the application, removing the freeze.
    pub finish_ms: f64,
}
