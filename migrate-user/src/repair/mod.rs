//! Socket plane: bulk TCP_REPAIR dump and restore, in the orders docs/tcp-repair.md explains.
//! Bulk because the blackout of a migration is the dump and the restore of every connection:
//! the work is sharded over one thread per CPU and costs as few calls per socket as the kernel
//! allows.
//!
//! [`discover()`] finds a process's connections (sock_diag + /proc/PID/fd) and takes their fds with
//! pidfd_getfd; [`dump()`] puts them all into repair mode and reads their state into
//! [`Connection`]s, sharded over one thread per CPU; the returned [`DumpedSockets`] keeps them
//! in repair mode until [`DumpedSockets::commit`] (silent close) or
//! [`DumpedSockets::rollback`]. [`restore()`] recreates connections in a network namespace and
//! keeps them in repair mode until [`RestoredSockets::commit`], so that a migration can move the
//! address and lift its freeze in between. [`crate::handoff`] then gives the live sockets to the
//! application.
//!
//! A pre-copy takes most of the work out of the blackout for connections that do not move
//! while the application is stopped (idle ones): [`PreparedDump::precopy`] reads them before the
//! freeze, [`restore_ahead`] restores them on the destination in repair mode, and after the
//! freeze [`RestoredAhead::restore`] keeps every socket whose connection the dump finds
//! unchanged; the dump itself skips the peeks of receive queues that did not move.
mod accept_queue;
mod btf;
mod diag;
mod discover;
mod dump;
mod filter;
mod kernel_state;
mod restore;
mod unmovable;

use std::{fmt, io, net::SocketAddr, num::NonZeroUsize};

use bytes::Bytes;

pub use self::{
    accept_queue::{AcceptPlan, HANDSHAKE_BOUND, Waiting, wait_until},
    diag::DiagSocket,
    discover::{
        CatchUp, Discovery, SocketsByInode, Taken, TakenSocket, catch_up, count_connections,
        discover, discover_among, list_tcp_sockets,
    },
    dump::{DumpedSockets, PreparedDump, dump, prepare_dump},
    filter::Filter,
    kernel_state::{SocketState, StateReader},
    restore::{
        Committed, RestoredAhead, RestoredSocket, RestoredSockets, SocketPool, restore,
        restore_ahead, restore_with, restore_with_pool,
    },
    unmovable::{Listed, Reason, Unmovable, unaccepted},
};
/// The kernel's struct tcp_repair_window, part of every dumped connection.
pub use crate::sys::tcp_repair::RepairWindow;
use crate::{
    net::{Netns, NetnsError},
    sys::Capability,
    tuple::Tuple,
};

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    MissingCapability(#[from] crate::sys::MissingCapability),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("listing TCP sockets with sock_diag in network namespace {netns}")]
    Diag { netns: String, source: io::Error },
    // `error` is in the message: see NotConnected.
    #[error(
        "the dump's BPF iterator over TCP sockets{}: {error}; it needs kernel BTF \
         (CONFIG_DEBUG_INFO_BTF) and BPF iterators (Linux 5.9 or later)",
        .netns.as_ref().map(|n| format!(" in network namespace {n}")).unwrap_or_default()
    )]
    StateIterator {
        netns: Option<String>,
        error: io::Error,
    },
    #[error("process {pid}: {what}: check that it runs and that tcpmig has CAP_SYS_PTRACE")]
    Process {
        pid: u32,
        what: String,
        source: io::Error,
    },
    // `error` is in the message, mid-sentence: not a `source`, or error chains would repeat it.
    #[error("fd {fd}: not a connected TCP socket ({error}); pass only established connections")]
    NotConnected { fd: i32, error: io::Error },
    #[error(
        "connection {tuple} is in state {state}: tcpmig moves ESTABLISHED, FIN_WAIT1, \
         FIN_WAIT2, CLOSE_WAIT, LAST_ACK and CLOSING connections only; leave it out or retry once \
         it has settled"
    )]
    UnsupportedState { tuple: Tuple, state: TcpState },
    #[error(
        "connection {tuple} is not a socket of process {pid} in network namespace {netns}: check \
         the pid, the namespace and the 4-tuple"
    )]
    NotOwned {
        tuple: Tuple,
        pid: u32,
        netns: String,
    },
    #[error("connection {tuple}: {op} failed during {phase} ({error}); {}", .phase.outcome())]
    Socket {
        tuple: Tuple,
        phase: Phase,
        op: &'static str,
        error: io::Error,
    },
    #[error(
        "connection {tuple}: its {queue} queue held {expected} bytes but {got} were read: its \
         traffic is not frozen; freeze it before dumping ({})", Phase::Dump.outcome()
    )]
    QueueChanged {
        tuple: Tuple,
        queue: &'static str,
        expected: usize,
        got: usize,
    },
    // `error` is in the message, mid-sentence: see NotConnected.
    #[error(
        "connection {tuple}: {left} of the {queue} queue's bytes do not fit even in an enlarged \
         buffer ({error}); {}", Phase::Restore.outcome()
    )]
    QueueTooLarge {
        tuple: Tuple,
        queue: &'static str,
        left: usize,
        error: io::Error,
    },
    #[error(
        "connection {tuple}: a live socket with this 4-tuple already exists in network namespace \
         {netns} (connect in repair mode gave EADDRNOTAVAIL): close it or restore elsewhere ({})",
        Phase::Restore.outcome()
    )]
    TupleInUse { tuple: Tuple, netns: String },
    #[error(
        "making {count} sockets for {local} ahead of the restore: {op} failed ({error}); none \
         was kept"
    )]
    Pool {
        local: SocketAddr,
        count: usize,
        op: &'static str,
        error: io::Error,
    },
    // `error` is in the message, mid-sentence: see NotConnected.
    #[error(
        "connection {tuple}: {left} never-sent bytes do not fit even in an enlarged send buffer \
         ({error}); {}", Phase::Commit.outcome()
    )]
    UnsentTooLarge {
        tuple: Tuple,
        left: usize,
        error: io::Error,
    },
    #[error(
        "connection {tuple}: its restored socket did not take the peer's FIN sent to it over \
         loopback (is the service address on this host yet?); {}", Phase::Commit.outcome()
    )]
    PeerFinNotTaken { tuple: Tuple },
    #[error("{failed} of {total} connections could not leave repair mode; first: {first}")]
    Rollback {
        failed: usize,
        total: usize,
        first: Box<RepairError>,
    },
}

impl RepairError {
    /// For `map_err`: call `op` failed on the socket of `tuple` during `phase`.
    fn socket(tuple: Tuple, phase: Phase, op: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |error| Self::Socket {
            tuple,
            phase,
            op,
            error,
        }
    }
}

/// Where a per-socket error happened, which also says what became of the connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Dump,
    Rollback,
    Restore,
    Commit,
}

impl Phase {
    fn outcome(self) -> &'static str {
        match self {
            Phase::Dump => "the dump was rolled back: the connections carry on at the source",
            Phase::Rollback => "the connection stays in repair mode: retry, or close it (silently)",
            Phase::Restore => {
                "every socket restored so far was closed silently: the peers saw nothing"
            }
            Phase::Commit => "the connection was closed silently (no FIN, no RST)",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Dump => "dump",
            Phase::Rollback => "rollback",
            Phase::Restore => "restore",
            Phase::Commit => "commit (leaving repair mode)",
        })
    }
}

/// A TCP state, by its kernel number (include/net/tcp_states.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    Other(u8),
}

impl TcpState {
    const TABLE: [(TcpState, u8, &'static str); 11] = [
        (TcpState::Established, 1, "ESTABLISHED"),
        (TcpState::SynSent, 2, "SYN_SENT"),
        (TcpState::SynRecv, 3, "SYN_RECV"),
        (TcpState::FinWait1, 4, "FIN_WAIT1"),
        (TcpState::FinWait2, 5, "FIN_WAIT2"),
        (TcpState::TimeWait, 6, "TIME_WAIT"),
        (TcpState::Close, 7, "CLOSE"),
        (TcpState::CloseWait, 8, "CLOSE_WAIT"),
        (TcpState::LastAck, 9, "LAST_ACK"),
        (TcpState::Listen, 10, "LISTEN"),
        (TcpState::Closing, 11, "CLOSING"),
    ];

    pub fn from_kernel(value: u8) -> Self {
        Self::TABLE
            .iter()
            .find(|(_, number, _)| *number == value)
            .map_or(TcpState::Other(value), |(state, _, _)| *state)
    }

    pub fn to_kernel(self) -> u8 {
        match self {
            TcpState::Other(value) => value,
            state => Self::TABLE
                .iter()
                .find(|(s, _, _)| *s == state)
                .map_or(0, |(_, number, _)| *number),
        }
    }

    /// States that dump and restore handle: established, and half-closed with the FINs in
    /// their sequence space (TIME_WAIT and CLOSE hold no connection to move).
    pub fn repairable(self) -> bool {
        matches!(self, TcpState::Established) || self.fin_sent() || self.fin_received()
    }

    /// Our FIN is in the sequence space: the restore sends it again with shutdown().
    pub fn fin_sent(self) -> bool {
        matches!(
            self,
            TcpState::FinWait1 | TcpState::FinWait2 | TcpState::LastAck | TcpState::Closing
        )
    }

    /// The peer's FIN was received: the restore hands it to the socket again.
    pub fn fin_received(self) -> bool {
        matches!(
            self,
            TcpState::CloseWait | TcpState::LastAck | TcpState::Closing
        )
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::TABLE.iter().find(|(s, _, _)| s == self) {
            Some((_, _, name)) => f.write_str(name),
            None => write!(f, "state {}", self.to_kernel()),
        }
    }
}

/// TCP options negotiated at the handshake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub timestamps: bool,
    pub sack: bool,
    /// Window scaling: (send shift, receive shift) when negotiated.
    pub wscale: Option<(u8, u8)>,
    /// mss_clamp: the largest segment the peer accepts.
    pub mss: u16,
}

/// Socket options an application set and would miss on the restored socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOptions {
    pub nodelay: bool,
    /// SO_KEEPALIVE with TCP_KEEPIDLE, TCP_KEEPINTVL (seconds) and TCP_KEEPCNT.
    pub keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT in milliseconds (0: the kernel's default).
    pub user_timeout_ms: u32,
    /// SO_REUSEADDR: set again only after repair mode is off (docs/tcp-repair.md, pitfalls).
    pub reuseaddr: bool,
    /// O_NONBLOCK on the file description.
    pub nonblocking: bool,
    /// SO_SNDBUF and SO_RCVBUF as the kernel reports them (doubled), read only for a queue that
    /// holds bytes (0 otherwise). Applied on restore only when a queue does not fit in the
    /// default buffers.
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// SO_MARK (0: none).
    pub mark: u32,
    /// IP_TOS or IPV6_TCLASS.
    pub tos: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub idle_s: u16,
    pub interval_s: u16,
    pub count: u8,
}

/// Everything needed to recreate one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub tuple: Tuple,
    pub state: TcpState,
    /// Sequence number after the last data byte of the send queue (write_seq, our FIN not
    /// counted).
    pub send_seq: u32,
    /// Next sequence number expected from the peer (rcv_nxt, the peer's FIN not counted: where
    /// it is, when [`TcpState::fin_received`]).
    pub recv_seq: u32,
    pub window: RepairWindow,
    pub negotiated: Negotiated,
    /// TCP_TIMESTAMP: the timestamp clock, restored so the peer's PAWS check passes (0 when the
    /// connection does not use timestamps).
    pub timestamp: u32,
    pub options: SocketOptions,
    /// Bytes sent or queued but not acknowledged by the peer, in order.
    pub send_queue: Bytes,
    /// How many bytes at the end of `send_queue` never went on the wire: the restore sends
    /// them normally after repair mode is off.
    pub unsent: u32,
    /// Bytes received and acknowledged but not yet read by the application.
    pub recv_queue: Bytes,
}

impl Connection {
    /// The part of the send queue the peer may already have seen.
    pub fn sent_part(&self) -> &[u8] {
        &self.send_queue[..self.send_queue.len() - self.unsent_len()]
    }

    /// The never-sent tail of the send queue.
    pub fn unsent_part(&self) -> Bytes {
        self.send_queue
            .slice(self.send_queue.len() - self.unsent_len()..)
    }

    fn unsent_len(&self) -> usize {
        (self.unsent as usize).min(self.send_queue.len())
    }
}

/// Fewer sockets than this per thread cost more in thread start-up than they save.
const MIN_BATCH: usize = 256;

/// Worker threads of the bulk operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Workers {
    /// One per CPU (batches of at least 256 sockets).
    #[default]
    PerCpu,
    /// Exactly one batch, on one thread: the plain sequential loop, for comparison.
    One,
}

impl Workers {
    fn count(self, items: usize) -> usize {
        match self {
            Workers::PerCpu => {
                let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
                items.div_ceil(MIN_BATCH).clamp(1, cpus)
            }
            Workers::One => 1,
        }
    }
}

/// Runs `work` on contiguous batches of `items`, one batch per worker thread (one per CPU);
/// returns the batches' results in order.
fn sharded<T: Sync, R: Send>(
    workers: Workers,
    items: &[T],
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    run_sharded(workers, items, false, work)
}

/// [`sharded`] with every worker thread inside `netns` (the caller's thread stays where it is).
fn sharded_in<T: Sync, R: Send>(
    workers: Workers,
    netns: &Netns,
    items: &[T],
    work: impl Fn(&[T]) -> R + Sync,
) -> Result<Vec<R>, NetnsError> {
    run_sharded(workers, items, true, |batch| {
        netns.enter_current_thread()?;
        Ok(work(batch))
    })
    .into_iter()
    .collect()
}

fn run_sharded<T: Sync, R: Send>(
    workers: Workers,
    items: &[T],
    always_spawn: bool,
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let workers = workers.count(items.len());
    if workers == 1 && !always_spawn {
        return vec![work(items)];
    }
    let batch = items.len().div_ceil(workers).max(1);
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(batch)
            .enumerate()
            .map(|(worker, chunk)| {
                scope.spawn(move || {
                    let started = std::time::Instant::now();
                    let result = work(chunk);
                    // Shows whether the workers really ran side by side.
                    tracing::debug!(
                        worker,
                        items = chunk.len(),
                        us = started.elapsed().as_micros(),
                        "batch done"
                    );
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Bulk operations hold one fd per connection: the default soft limit (1024) is far too low.
fn raise_fd_limit() {
    if let Err(error) = crate::handoff::raise_nofile_limit() {
        tracing::warn!(%error, "raising RLIMIT_NOFILE to its hard limit");
    }
}

/// Fails early, naming the capability, instead of with EPERM on the first socket.
fn check_net_admin() -> Result<(), RepairError> {
    crate::sys::require_capabilities("TCP_REPAIR", &[Capability::NetAdmin])?;
    Ok(())
}
