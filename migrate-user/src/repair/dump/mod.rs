//! Bulk dump: each socket into repair mode and its state read, in the order of
//! notes/tcp-repair.md; the commit that disconnects them silently, or the rollback.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    time::Duration,
};

use bytes::Bytes;

use super::{
    Connection, Keepalive, Negotiated, Phase, RepairError, SocketOptions, TcpState, Workers,
    kernel_state::{SocketState, StateReader},
    sockopt::{self as so, Queue},
};
use crate::{net::Netns, tuple::Tuple};

/// Sockets in repair mode at the source and their dumped state. They stay frozen in repair
/// mode until [`commit`](Self::commit) or [`rollback`](Self::rollback); dropping the handle
/// without either rolls back, so that a failed migration leaves the connections running where
/// they were.
pub struct DumpedSockets {
    fds: Vec<OwnedFd>,
    connections: Vec<Connection>,
    workers: Workers,
}

impl DumpedSockets {
    pub fn connections(&self) -> &[Connection] {
        &self.connections
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The connections live on elsewhere: disconnects each socket while it is still in repair
    /// mode (connect(AF_UNSPEC), which sends nothing: no FIN, no RST) and closes our fds. The
    /// process we took the fds from may still hold the same sockets: disconnected, they run no
    /// retransmission or keepalive timer any more, and once out of repair mode (without the
    /// window probe, which a closed socket does not send anyway) its reads fail with
    /// ECONNABORTED instead of EPERM. Failures are logged: the sockets are closed either way.
    pub fn commit(mut self) {
        let fds = std::mem::take(&mut self.fds);
        let connections = std::mem::take(&mut self.connections);
        let pairs: Vec<(OwnedFd, Tuple)> = fds
            .into_iter()
            .zip(connections.iter().map(|c| c.tuple))
            .collect();
        super::sharded(self.workers, &pairs, |batch| {
            for (fd, tuple) in batch {
                let fd = fd.as_fd();
                let result = so::disconnect(fd)
                    .map_err(|e| ("connect(AF_UNSPEC)", e))
                    .and_then(|()| {
                        so::set_repair(fd, so::REPAIR_OFF_NO_WP).map_err(|e| ("TCP_REPAIR=-1", e))
                    });
                if let Err((op, error)) = result {
                    tracing::warn!(%tuple, op, %error, "disconnecting a committed socket");
                }
            }
        });
    }

    /// Takes every socket out of repair mode and gives back the options repair mode changed:
    /// the connections carry on at the source. The freeze, if any, is the caller's to lift
    /// afterwards.
    pub fn rollback(mut self) -> Result<(), RepairError> {
        let fds = std::mem::take(&mut self.fds);
        let connections = std::mem::take(&mut self.connections);
        rollback_all(self.workers, &fds, &connections)
    }
}

impl Drop for DumpedSockets {
    fn drop(&mut self) {
        if self.fds.is_empty() {
            return;
        }
        tracing::info!(
            count = self.fds.len(),
            "dump neither committed nor rolled back: rolling back"
        );
        if let Err(error) = rollback_all(self.workers, &self.fds, &self.connections) {
            tracing::warn!(%error, "rolling back a dropped dump");
        }
    }
}

fn rollback_all(
    workers: Workers,
    fds: &[OwnedFd],
    connections: &[Connection],
) -> Result<(), RepairError> {
    let pairs: Vec<(&OwnedFd, &Connection)> = fds.iter().zip(connections).collect();
    let errors: Vec<RepairError> = super::sharded(workers, &pairs, |batch| {
        batch
            .iter()
            .filter_map(|(fd, conn)| {
                leave_repair(fd.as_fd(), conn.tuple, conn.options.reuseaddr).err()
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let failed = errors.len();
    match errors.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(RepairError::Rollback {
            failed,
            total: fds.len(),
            first: Box::new(first),
        }),
    }
}

/// Repair off with value 0 (no TCP_REPAIR_QUEUE=NO_QUEUE first: the kernel ignores the selected
/// queue once repair is off, and TCP_REPAIR=1 resets it), which sends a window probe: the peer answers with an ACK carrying
/// its current window, so both ends resynchronise at once instead of on the next timer (notes:
/// 0.07 s against 0.43 s with -1). The probe is an old-sequence segment every peer accepts, and
/// if a freeze still drops it nothing is lost. Repair mode also cleared SO_REUSEADDR, which is
/// set back.
fn leave_repair(fd: BorrowedFd<'_>, tuple: Tuple, reuseaddr: bool) -> Result<(), RepairError> {
    let fail = |op| RepairError::socket(tuple, Phase::Rollback, op);
    so::set_repair(fd, so::REPAIR_OFF).map_err(fail("TCP_REPAIR=0"))?;
    if reuseaddr {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(fail("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// Sockets taken for a dump, with their cookies and the options only their application changes
/// (TCP_NODELAY, keepalive, TCP_USER_TIMEOUT, SO_REUSEADDR, O_NONBLOCK, TOS) already read: once
/// the application is stopped these hold still, so [`prepare_dump`] reads them before the
/// freeze, and the blackout pays only for one pass of the [`StateReader`] over the namespace
/// and repair mode on each socket.
pub struct PreparedDump {
    sockets: Vec<PreparedSocket>,
    workers: Workers,
}

struct PreparedSocket {
    fd: OwnedFd,
    cookie: u64,
    /// Without what the state reader gives at dump time (buffers, mark) and TOS.
    options: SocketOptions,
    /// IP_TOS, and IPV6_TCLASS for an AF_INET6 socket: which one the connection uses depends on
    /// whether it is v4-mapped, known from its tuple at dump time.
    tos: u8,
    tclass: Option<u8>,
    /// Set by [`PreparedDump::precopy`], which leaves the socket in repair mode. Boxed: most
    /// sockets have none, and at 50,000 a hundred bytes each would be 5 MB.
    precopied: Option<Box<Precopied>>,
}

/// What the pre-copy read of a socket: its tuple, and its receive queue with where it ended
/// (rcv_nxt). While neither that end nor the queue's length moves, nothing was received or read
/// since and the queue holds the same bytes, which the dump takes from here instead of a peek
/// in the blackout.
struct Precopied {
    tuple: Tuple,
    rcv_nxt: u32,
    recv_queue: Bytes,
}

impl PreparedDump {
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The network namespace of the sockets (of the first one: a migration's share one), for
    /// a reader pass before the freeze.
    pub fn netns(&self) -> Result<Netns, RepairError> {
        let first = self
            .sockets
            .first()
            .ok_or_else(|| RepairError::NotConnected {
                fd: -1,
                error: io::Error::other("no socket to dump"),
            })?;
        socket_netns(first.fd.as_fd())
    }

    /// The pre-copy: the connections as they stand in `states` (one reader pass, made before
    /// the freeze, once the application is stopped), for a restore ahead of the freeze (see
    /// [`restore_ahead`](super::restore_ahead)). Only ESTABLISHED connections with an empty
    /// send queue: only repair mode shows that queue, and selecting it would stall a live
    /// connection's sending. Their receive queues are peeked and kept, so that the dump reuses
    /// those that did not move since, and they enter repair mode now, which a live idle
    /// connection does not notice (it receives, acknowledges and runs its timers as before; only
    /// its stopped application could tell), so that the dump does not pay for it either.
    /// Dropping the prepared dump takes them out of repair mode again. Only connections that
    /// sent and received nothing for at least `quiet` are taken: a busy one would likely move
    /// before the freeze, and then costs more than without a pre-copy (its pre-copied socket is
    /// replaced in the blackout). A socket that cannot be read is left out (the dump reads it in
    /// full), and so are those pre-copied already.
    pub fn precopy(
        &mut self,
        states: &HashMap<u64, SocketState>,
        quiet: Duration,
    ) -> Vec<Connection> {
        let read = super::sharded(self.workers, &self.sockets, |batch| {
            batch
                .iter()
                .map(|socket| {
                    let state = states.get(&socket.cookie)?;
                    if socket.precopied.is_some()
                        || state.state != TcpState::Established
                        || state.outq != 0
                        || Duration::from_millis(state.quiet_ms.into()) < quiet
                    {
                        return None;
                    }
                    let fd = socket.fd.as_fd();
                    let recv_queue = peek(fd, state.tuple, Queue::Recv, state.inq, false).ok()?;
                    let conn = with_send_queue(fd, state, recv_queue, with_state(socket, state));
                    let conn = conn.ok()?;
                    so::set_repair(fd, so::REPAIR_ON).ok()?;
                    Some(conn)
                })
                .collect::<Vec<_>>()
        });
        let mut connections = Vec::new();
        for (socket, conn) in self.sockets.iter_mut().zip(read.into_iter().flatten()) {
            if let Some(conn) = conn {
                socket.precopied = Some(Box::new(Precopied {
                    tuple: conn.tuple,
                    rcv_nxt: conn.recv_seq,
                    recv_queue: conn.recv_queue.clone(),
                }));
                connections.push(conn);
            }
        }
        connections
    }

    /// Dumps the sockets. Their traffic must be frozen (see the freeze plane): repair mode alone
    /// does not stop a socket from receiving and sending. On error every socket is taken out of
    /// repair mode again and the error names the first connection that failed.
    ///
    /// One pass of the state reader over the sockets' namespace gives each socket's addresses,
    /// state, sequence numbers, window, negotiated options, queue lengths, buffers and mark;
    /// each socket then costs repair on, and two calls per queue that holds bytes (selection
    /// and peek). Sockets of another namespace than the first's are found by further passes,
    /// one per namespace.
    pub fn dump(self, reader: &mut StateReader) -> Result<DumpedSockets, RepairError> {
        let mut outcomes: Vec<Option<Outcome>> = self.sockets.iter().map(|_| None).collect();
        let mut listed = Vec::new();
        // Each round settles the first socket not dumped yet, or reads one more namespace.
        for _ in 0..=2 * self.sockets.len() {
            let Some(first) = outcomes.iter().position(Option::is_none) else {
                break;
            };
            let fd = self.sockets[first].fd.as_fd();
            match states_of_netns(fd, reader, &mut listed) {
                Ok(Some(states)) => self.dump_found(&states, &mut outcomes),
                Ok(None) => {
                    outcomes[first] = Some(Outcome::failed(not_connected(
                        fd,
                        io::Error::other(
                            "not among the TCP sockets of its namespace (on the reader's port)",
                        ),
                    )));
                }
                Err(error) => {
                    for outcome in outcomes.iter_mut().skip(first + 1).filter(|o| o.is_none()) {
                        *outcome = Some(Outcome::failed(RepairError::StateIterator {
                            netns: Some("of an earlier socket".to_owned()),
                            error: io::Error::other("not dumped"),
                        }));
                    }
                    outcomes[first] = Some(Outcome::failed(error));
                }
            }
        }
        self.settle(outcomes)
    }

    /// [`dump`](Self::dump) with the states of one pass of the reader, made after the freeze:
    /// several dumps of one namespace (the shards of a migration) share one pass. A socket not
    /// in `states` fails the dump.
    pub fn dump_read(
        self,
        states: &HashMap<u64, SocketState>,
    ) -> Result<DumpedSockets, RepairError> {
        // Settled batch by batch as they come: no second array of outcomes (50,000 of them
        // are 14 MB).
        let batches = super::sharded(self.workers, &self.sockets, |batch| {
            batch
                .iter()
                .map(|socket| dump_one(socket, states))
                .collect::<Vec<_>>()
        });
        self.settle(batches.into_iter().flatten())
    }

    /// Dumps the sockets not settled yet that `states` holds.
    fn dump_found(&self, states: &HashMap<u64, SocketState>, outcomes: &mut [Option<Outcome>]) {
        let todo: Vec<(usize, &PreparedSocket)> = self
            .sockets
            .iter()
            .enumerate()
            .filter(|(i, _)| outcomes[*i].is_none())
            .collect();
        let results = super::sharded(self.workers, &todo, |batch| {
            batch
                .iter()
                .map(|(_, socket)| dump_one(socket, states))
                .collect::<Vec<_>>()
        });
        for ((i, _), result) in todo.iter().zip(results.into_iter().flatten()) {
            outcomes[*i] = result;
        }
    }

    /// The dumped sockets, or the first error after taking every socket out of repair mode.
    fn settle(
        mut self,
        outcomes: impl IntoIterator<Item = Option<Outcome>>,
    ) -> Result<DumpedSockets, RepairError> {
        let sockets = std::mem::take(&mut self.sockets);
        let workers = self.workers;
        let mut connections = Vec::with_capacity(sockets.len());
        let mut first_error = None;
        let mut in_repair = Vec::with_capacity(sockets.len());
        for (socket, outcome) in sockets.into_iter().zip(outcomes) {
            let fd = socket.fd;
            let outcome = outcome.unwrap_or_else(|| {
                Outcome::failed(not_connected(
                    fd.as_fd(),
                    io::Error::other("not among the TCP sockets the state reader found"),
                ))
            });
            match outcome.result {
                Ok(conn) => {
                    connections.push(conn);
                    in_repair.push(fd);
                }
                Err(error) => {
                    let entered = outcome
                        .entered
                        .or(socket.precopied.as_ref().map(|p| p.tuple));
                    if let Some(tuple) = entered
                        && let Err(rollback) =
                            leave_repair(fd.as_fd(), tuple, socket.options.reuseaddr)
                    {
                        tracing::warn!(%rollback, "rolling back a socket whose dump failed");
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        let dumped = DumpedSockets {
            fds: in_repair,
            connections,
            workers,
        };
        match first_error {
            // Dropping `dumped` rolls the others back.
            Some(error) => Err(error),
            None => Ok(dumped),
        }
    }
}

impl Drop for PreparedDump {
    /// Takes the pre-copied sockets out of repair mode: the connections carry on.
    fn drop(&mut self) {
        for socket in &self.sockets {
            if let Some(precopied) = &socket.precopied
                && let Err(error) =
                    leave_repair(socket.fd.as_fd(), precopied.tuple, socket.options.reuseaddr)
            {
                tracing::warn!(%error, "rolling back a pre-copied socket");
            }
        }
    }
}

/// Reads what only the sockets' application changes, sharded like the dump: call it once the
/// application is stopped, before the freeze. Changes nothing on the sockets.
pub fn prepare_dump(workers: Workers, fds: Vec<OwnedFd>) -> Result<PreparedDump, RepairError> {
    super::check_net_admin()?;
    let read = super::sharded(workers, &fds, |batch| {
        batch
            .iter()
            .map(|fd| prepare_one(fd.as_fd()))
            .collect::<Vec<_>>()
    });
    let mut sockets = Vec::with_capacity(fds.len());
    for (fd, read) in fds.into_iter().zip(read.into_iter().flatten()) {
        let (cookie, options, tos, tclass) =
            read.map_err(|error| not_connected(fd.as_fd(), error))?;
        sockets.push(PreparedSocket {
            fd,
            cookie,
            options,
            tos,
            tclass,
            precopied: None,
        });
    }
    Ok(PreparedDump { sockets, workers })
}

/// Dumps connected TCP sockets: [`StateReader::load`], [`prepare_dump`] and
/// [`PreparedDump::dump`] in one go, one thread per CPU.
pub fn dump(fds: Vec<OwnedFd>) -> Result<DumpedSockets, RepairError> {
    let mut reader = StateReader::load(None)?;
    prepare_dump(Workers::PerCpu, fds)?.dump(&mut reader)
}

/// The states of the namespace `fd` belongs to, or None when that namespace was read already
/// (`fd` is then not a TCP socket there).
fn states_of_netns(
    fd: BorrowedFd<'_>,
    reader: &mut StateReader,
    listed: &mut Vec<u64>,
) -> Result<Option<HashMap<u64, SocketState>>, RepairError> {
    let netns = socket_netns(fd)?;
    if listed.contains(&netns.inode()) {
        return Ok(None);
    }
    listed.push(netns.inode());
    reader.read(&netns).map(Some)
}

/// The network namespace `fd` belongs to. Through thread-self: the calling thread may have an
/// fd table of its own (a [`Shard`](crate::shard::Shard)).
fn socket_netns(fd: BorrowedFd<'_>) -> Result<Netns, RepairError> {
    let namespace = so::socket_netns(fd).map_err(|error| not_connected(fd, error))?;
    Ok(Netns::open(&format!(
        "/proc/thread-self/fd/{}",
        namespace.as_raw_fd()
    ))?)
}

fn not_connected(fd: BorrowedFd<'_>, error: io::Error) -> RepairError {
    RepairError::NotConnected {
        fd: fd.as_raw_fd(),
        error,
    }
}

/// One socket's dump: `entered` is set once it is in repair mode (and must leave it on error).
struct Outcome {
    entered: Option<Tuple>,
    result: Result<Connection, RepairError>,
}

impl Outcome {
    fn failed(error: RepairError) -> Self {
        Self {
            entered: None,
            result: Err(error),
        }
    }
}

/// The receive queue's bytes, TCP_REPAIR=1, the send queue's bytes, and the options completed
/// from `state`; None when `states` does not hold the socket (another namespace).
fn dump_one(socket: &PreparedSocket, states: &HashMap<u64, SocketState>) -> Option<Outcome> {
    let fd = socket.fd.as_fd();
    let state = states.get(&socket.cookie)?;
    let tuple = state.tuple;
    if !state.state.repairable() {
        return Some(Outcome::failed(RepairError::UnsupportedState {
            tuple,
            state: state.state,
        }));
    }
    // A pre-copied socket is in repair mode already; the others are read before it, as any
    // reader would: no queue to select.
    let in_repair = socket.precopied.is_some();
    let unmoved = socket
        .precopied
        .as_ref()
        .filter(|p| (p.rcv_nxt, p.recv_queue.len()) == (state.rcv_nxt, state.inq as usize));
    let recv_queue = match unmoved {
        Some(precopied) => precopied.recv_queue.clone(),
        None => match peek(fd, tuple, Queue::Recv, state.inq, in_repair) {
            Ok(bytes) => bytes,
            Err(error) => return Some(Outcome::failed(error)),
        },
    };
    if !in_repair && let Err(error) = so::set_repair(fd, so::REPAIR_ON) {
        return Some(Outcome::failed(RepairError::socket(
            tuple,
            Phase::Dump,
            "TCP_REPAIR=1",
        )(error)));
    }
    Some(Outcome {
        entered: Some(tuple),
        result: with_send_queue(fd, state, recv_queue, with_state(socket, state)),
    })
}

/// Cookie, then the options only the application changes. SO_REUSEADDR must be read before
/// repair mode, which forces it on.
fn prepare_one(fd: BorrowedFd<'_>) -> io::Result<(u64, SocketOptions, u8, Option<u8>)> {
    let cookie = so::get::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)?;
    let flag = |level, name| so::get_int(fd, level, name).map(|v| v != 0);
    let keepalive = if flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? {
        Some(Keepalive {
            idle_s: so::get_int(fd, libc::SOL_TCP, libc::TCP_KEEPIDLE)? as u16,
            interval_s: so::get_int(fd, libc::SOL_TCP, libc::TCP_KEEPINTVL)? as u16,
            count: so::get_int(fd, libc::SOL_TCP, libc::TCP_KEEPCNT)? as u8,
        })
    } else {
        None
    };
    let options = SocketOptions {
        nodelay: flag(libc::SOL_TCP, libc::TCP_NODELAY)?,
        keepalive,
        user_timeout_ms: so::get_int(fd, libc::SOL_TCP, libc::TCP_USER_TIMEOUT)? as u32,
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        nonblocking: so::is_nonblocking(fd)?,
        ..SocketOptions::default()
    };
    let (level, name) = tos_option(true);
    let tos = so::get_int(fd, level, name)? as u8;
    let tclass = if so::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)? == libc::AF_INET6 {
        let (level, name) = tos_option(false);
        Some(so::get_int(fd, level, name)? as u8)
    } else {
        None
    };
    Ok((cookie, options, tos, tclass))
}

/// The socket's options with what the state reader gives: mark, buffer sizes, and the TOS the
/// connection sends with (IP_TOS for IPv4 and v4-mapped connections, the traffic class for
/// IPv6 ones).
fn with_state(socket: &PreparedSocket, state: &SocketState) -> SocketOptions {
    // Only needed, and so only kept, for a queue that holds bytes.
    let buffer = |size, queued| if queued == 0 { 0 } else { size };
    let tos = match socket.tclass {
        Some(tclass) if !state.tuple.local.is_ipv4() => tclass,
        _ => socket.tos,
    };
    SocketOptions {
        sndbuf: buffer(state.sndbuf, state.outq),
        rcvbuf: buffer(state.rcvbuf, state.inq),
        mark: state.mark,
        tos,
        ..socket.options
    }
}

/// IP_TOS for IPv4 sockets, IPV6_TCLASS for IPv6 ones.
pub(super) fn tos_option(ipv4: bool) -> (libc::c_int, libc::c_int) {
    if ipv4 {
        (libc::SOL_IP, libc::IP_TOS)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TCLASS)
    }
}

/// The connection from `state` and its queues; the send queue is read here, in repair mode
/// (only repair mode shows it).
fn with_send_queue(
    fd: BorrowedFd<'_>,
    state: &SocketState,
    recv_queue: Bytes,
    options: SocketOptions,
) -> Result<Connection, RepairError> {
    let tuple = state.tuple;
    // Our FIN takes one sequence number and counts in the queue lengths, but carries no data.
    let fin = u32::from(state.state.fin_sent());
    let send_queue = peek(fd, tuple, Queue::Send, state.outq.saturating_sub(fin), true)?;
    Ok(Connection {
        tuple,
        state: state.state,
        send_seq: state.write_seq.wrapping_sub(fin),
        recv_seq: state.rcv_nxt,
        window: state.window,
        negotiated: Negotiated {
            timestamps: state.timestamps,
            sack: state.sack,
            wscale: state.wscale,
            mss: state.mss_clamp,
        },
        // Only restored when the connection uses timestamps.
        timestamp: if state.timestamps { state.timestamp } else { 0 },
        options,
        send_queue,
        unsent: state.notsent.saturating_sub(fin),
        recv_queue,
    })
}

/// Reads `queue` without consuming it: in repair mode (always, for the send queue, which only
/// it shows) with the queue selected first, or the receive queue as any reader would. An empty
/// queue costs no call. One byte more than expected is asked for, so that data arriving during
/// the dump is noticed.
fn peek(
    fd: BorrowedFd<'_>,
    tuple: Tuple,
    queue: Queue,
    len: u32,
    in_repair: bool,
) -> Result<Bytes, RepairError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let fail = |op| RepairError::socket(tuple, Phase::Dump, op);
    let name = match queue {
        Queue::Send => "send",
        Queue::Recv => "receive",
    };
    if in_repair {
        so::select_queue(fd, queue).map_err(fail(match queue {
            Queue::Send => "TCP_REPAIR_QUEUE=SEND",
            Queue::Recv => "TCP_REPAIR_QUEUE=RECV",
        }))?;
    }
    let data = so::peek_queue(fd, len as usize + 1).map_err(fail(match queue {
        Queue::Send => "peek of the send queue",
        Queue::Recv => "peek of the receive queue",
    }))?;
    if data.len() != len as usize {
        return Err(RepairError::QueueChanged {
            tuple,
            queue: name,
            expected: len as usize,
            got: data.len(),
        });
    }
    Ok(Bytes::from(data))
}
