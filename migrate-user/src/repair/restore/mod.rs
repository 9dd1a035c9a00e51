//! Bulk restore in the order of notes/tcp-repair.md, and the commit that takes the restored
//! sockets out of repair mode. The sockets can be made ahead, in a [`SocketPool`].
use std::{
    borrow::Borrow,
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;

use super::{
    Connection, Phase, RepairError, SocketOptions, UNSENT_TIMEOUT, Workers,
    dump::tos_option,
    sockopt::{self as so, Queue, RepairOpt},
};
use crate::{net::Netns, tuple::Tuple};

/// Restored sockets still in repair mode: nothing has been sent to the peers yet. Dropping the
/// handle closes them silently (no FIN, no RST), which is the abort of a two-phase migration.
pub struct RestoredSockets {
    pending: Vec<Pending>,
    workers: Workers,
    /// How many of them were restored ahead of the freeze ([`RestoredAhead`]).
    precopied: usize,
}

struct Pending {
    tuple: Tuple,
    fd: OwnedFd,
    options: SocketOptions,
    unsent: Bytes,
    shutdown: bool,
    /// Leave repair mode with a window probe: the connection has data or a FIN in flight.
    probe: bool,
}

/// A live restored connection, out of repair mode.
#[derive(Debug)]
pub struct RestoredSocket {
    pub tuple: Tuple,
    pub fd: OwnedFd,
}

/// The result of [`RestoredSockets::commit`]: the connections that are live, and those that
/// failed to leave repair mode (already closed silently).
#[derive(Debug, Default)]
pub struct Committed {
    pub sockets: Vec<RestoredSocket>,
    pub failures: Vec<RepairError>,
}

impl RestoredSockets {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn tuples(&self) -> impl Iterator<Item = Tuple> + '_ {
        self.pending.iter().map(|p| p.tuple)
    }

    /// How many kept the socket restored ahead of the freeze (unchanged since the pre-copy).
    pub fn precopied(&self) -> usize {
        self.precopied
    }

    /// The sockets, leaving nothing for drop to report.
    fn take(mut self) -> Vec<Pending> {
        std::mem::take(&mut self.pending)
    }

    /// Takes every socket out of repair mode (with a window probe where data or a FIN is in
    /// flight: those peers resynchronise at once), sends the never-sent tails normally, sends our
    /// FIN again for FIN_WAIT connections, and sets SO_REUSEADDR where the source had it
    /// (O_NONBLOCK was set at socket()). Sharded over threads.
    pub fn commit(mut self) -> Committed {
        let pending = std::mem::take(&mut self.pending);
        let deadline = Instant::now() + UNSENT_TIMEOUT;
        let results = super::sharded(self.workers, &pending, |batch| {
            batch
                .iter()
                .map(|p| go_live(p, deadline))
                .collect::<Vec<_>>()
        });
        let mut committed = Committed::default();
        for (p, result) in pending.into_iter().zip(results.into_iter().flatten()) {
            match result {
                Ok(()) => committed.sockets.push(RestoredSocket {
                    tuple: p.tuple,
                    fd: p.fd,
                }),
                Err(error) => {
                    // Back into repair mode first, so that closing sends nothing.
                    let _ = so::set_repair(p.fd.as_fd(), so::REPAIR_ON);
                    committed.failures.push(error);
                }
            }
        }
        committed
    }
}

impl Drop for RestoredSockets {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            tracing::info!(
                count = self.pending.len(),
                "restored sockets not committed: closing them silently in repair mode"
            );
        }
    }
}

fn go_live(p: &Pending, deadline: Instant) -> Result<(), RepairError> {
    let fd = p.fd.as_fd();
    let fail = |op| RepairError::socket(p.tuple, Phase::Commit, op);
    // No TCP_REPAIR_QUEUE=NO_QUEUE first: the kernel ignores the selected queue once repair is
    // off. The window probe (TCP_REPAIR=0) makes the peer acknowledge at once what it already
    // has of our data in flight, instead of at our next retransmission; with nothing in flight
    // it changes nothing (the window was restored), and costs a round trip of packets per socket
    // (64 ms of the commit at 10,000 connections), so those leave without it (-1).
    let (value, op) = if p.probe {
        (so::REPAIR_OFF, "TCP_REPAIR=0")
    } else {
        (so::REPAIR_OFF_NO_WP, "TCP_REPAIR=-1")
    };
    so::set_repair(fd, value).map_err(fail(op))?;
    send_all(
        fd,
        &p.unsent,
        (so::SO_SNDBUFFORCE, p.options.sndbuf),
        Some(deadline),
    )
    .map_err(|(left, source)| match source.kind() {
        io::ErrorKind::TimedOut => RepairError::UnsentStuck {
            tuple: p.tuple,
            left,
        },
        _ => fail("sending the never-sent tail")(source),
    })?;
    if p.shutdown {
        // SAFETY: shutdown on a valid socket.
        if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) } != 0 {
            return Err(fail("shutdown(SHUT_WR) for FIN_WAIT")(
                io::Error::last_os_error(),
            ));
        }
    }
    if p.options.reuseaddr {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(fail("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// Connections restored ahead of the freeze from a pre-copy
/// ([`PreparedDump::precopy`](super::PreparedDump::precopy)), in repair mode: nothing has been
/// sent. [`restore`](Self::restore) keeps each socket whose connection the dump finds unchanged,
/// so that the blackout pays only for the connections that moved since. Dropping it closes the
/// sockets silently.
pub struct RestoredAhead {
    connections: Vec<Connection>,
    restored: RestoredSockets,
}

/// Restores the pre-copied `connections` in `netns` (on the sockets of `pool` while it lasts),
/// ahead of the freeze: [`restore_with_pool`] for a pre-copy.
pub fn restore_ahead(
    workers: Workers,
    netns: &Netns,
    connections: Vec<Connection>,
    pool: SocketPool,
) -> Result<RestoredAhead, RepairError> {
    let restored = restore_with_pool(workers, netns, &connections, pool)?;
    Ok(RestoredAhead {
        connections,
        restored,
    })
}

impl RestoredAhead {
    pub fn tuples(&self) -> impl Iterator<Item = Tuple> + '_ {
        self.connections.iter().map(|c| c.tuple)
    }

    /// The restore proper, from the dump made after the freeze: a connection equal to its
    /// pre-copy (but for the timestamp clock, which runs on) keeps its socket and gets its
    /// timestamp anew; the others are restored as [`restore_with_pool`] does, after the sockets
    /// of their pre-copies are closed (silently: they hold the same 4-tuples). The result is in
    /// the order of `connections`.
    pub fn restore(
        self,
        workers: Workers,
        netns: &Netns,
        connections: &[Connection],
        pool: SocketPool,
    ) -> Result<RestoredSockets, RepairError> {
        let Self {
            connections: ahead,
            restored,
        } = self;
        if ahead.is_empty() {
            return restore_with_pool(workers, netns, connections, pool);
        }
        let mut by_tuple: HashMap<Tuple, (Connection, Pending)> = ahead
            .into_iter()
            .zip(restored.take())
            .map(|(conn, pending)| (conn.tuple, (conn, pending)))
            .collect();
        let mut kept: Vec<Option<(&Connection, Pending)>> = Vec::with_capacity(connections.len());
        let mut changed = Vec::new();
        // The sockets not kept are closed in repair mode: they send nothing, and free their
        // 4-tuples for the changed connections.
        for conn in connections {
            let unchanged = by_tuple
                .remove(&conn.tuple)
                .and_then(|(mut ahead, pending)| {
                    // Only the timestamp clock may have run on.
                    ahead.timestamp = conn.timestamp;
                    (ahead == *conn).then_some(pending)
                });
            match unchanged {
                Some(pending) => kept.push(Some((conn, pending))),
                None => {
                    kept.push(None);
                    changed.push(conn);
                }
            }
        }
        drop(by_tuple);
        let fresh = restore_on_pool(workers, netns, &changed, pool)?.take();
        let timed = super::sharded(workers, &kept, |batch| {
            batch
                .iter()
                .flatten()
                .map(|(conn, pending)| set_timestamp(pending.fd.as_fd(), conn))
                .collect::<Result<Vec<()>, RepairError>>()
        });
        timed.into_iter().collect::<Result<Vec<_>, _>>()?;
        let precopied = connections.len() - changed.len();
        let mut fresh = fresh.into_iter();
        let pending = kept
            .into_iter()
            .map(|kept| match kept {
                Some((_, pending)) => Some(pending),
                None => fresh.next(),
            })
            .collect::<Option<Vec<_>>>()
            .expect("one restored socket per changed connection");
        Ok(RestoredSockets {
            pending,
            workers,
            precopied,
        })
    }
}

/// TCP_TIMESTAMP, for a connection that uses timestamps.
fn set_timestamp(fd: BorrowedFd<'_>, conn: &Connection) -> Result<(), RepairError> {
    if !conn.negotiated.timestamps {
        return Ok(());
    }
    so::set(fd, libc::SOL_TCP, so::TCP_TIMESTAMP, &conn.timestamp).map_err(RepairError::socket(
        conn.tuple,
        Phase::Restore,
        "TCP_TIMESTAMP",
    ))
}

/// Sockets made ahead of a restore: TCP sockets in repair mode, bound to one local address.
///
/// socket() (about 3 us) and bind are the costliest calls of a restore. Made while the source's
/// application still runs (the migration agent makes them on Prepare, for the source's count of
/// connections), they leave the blackout: [`restore_with_pool`] only sets each connection's
/// state. Dropping the pool closes the sockets it still holds, silently: they are unconnected
/// and in repair mode.
pub struct SocketPool {
    local: SocketAddr,
    sockets: Vec<OwnedFd>,
}

impl SocketPool {
    /// `count` sockets bound to `local` inside `netns`, made on one thread per CPU. Repair mode
    /// sets SK_FORCE_REUSE, so any number of them bind the same address and port; `local` need
    /// not exist in `netns` yet (IP_TRANSPARENT). They are non-blocking, as most servers' sockets
    /// are; the restore clears it for the others.
    pub fn prepare(
        workers: Workers,
        netns: &Netns,
        local: SocketAddr,
        count: usize,
    ) -> Result<Self, RepairError> {
        let mut pool = Self::empty(local);
        if count == 0 {
            return Ok(pool);
        }
        super::check_net_admin()?;
        super::raise_fd_limit();
        reserve_fds(count);
        // Zero-sized: only shares the work out.
        let slots = vec![(); count];
        let batches = super::sharded_in(workers, netns, &slots, |batch| {
            let mut bound = LocalAddresses::default();
            batch
                .iter()
                .map(|()| repair_socket(&local, true, &mut bound))
                .collect::<Result<Vec<_>, _>>()
        })?;
        for batch in batches {
            // Returning early drops the sockets made so far: they close silently.
            let sockets = batch.map_err(|(op, error)| RepairError::Pool {
                local,
                count,
                op,
                error,
            })?;
            pool.sockets.extend(sockets);
        }
        Ok(pool)
    }

    fn empty(local: SocketAddr) -> Self {
        Self {
            local,
            sockets: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Takes up to `count` of the sockets into a pool of their own.
    pub fn split_off(&mut self, count: usize) -> SocketPool {
        let from = self.sockets.len().saturating_sub(count);
        SocketPool {
            local: self.local,
            sockets: self.sockets.split_off(from),
        }
    }

    /// Whether `conn` can have a socket of this pool (it may be empty by then).
    fn fits(&self, conn: &Connection) -> bool {
        conn.tuple.local == self.local
    }
}

/// Recreates `connections` inside `netns`, sharded over one thread per CPU, each in repair mode
/// with its queues, sequence numbers, options, timestamp and window. Works before the local
/// address exists there (IP_TRANSPARENT). On error every socket restored so far is closed
/// silently and the error names the connection that failed.
pub fn restore(netns: &Netns, connections: &[Connection]) -> Result<RestoredSockets, RepairError> {
    restore_with(Workers::PerCpu, netns, connections)
}

/// [`restore`] with a chosen number of worker threads (also used by its commit).
pub fn restore_with(
    workers: Workers,
    netns: &Netns,
    connections: &[Connection],
) -> Result<RestoredSockets, RepairError> {
    // Any address: an empty pool fits no connection.
    let none = SocketPool::empty(SocketAddr::from(([0, 0, 0, 0], 0)));
    restore_with_pool(workers, netns, connections, none)
}

/// [`restore_with`] on the sockets of `pool` (made in `netns`) for the connections on its local
/// address, as far as it has sockets; the other connections get fresh ones. The sockets left in
/// the pool are closed (silently) before this returns, so that a listener can take the port
/// later.
pub fn restore_with_pool(
    workers: Workers,
    netns: &Netns,
    connections: &[Connection],
    pool: SocketPool,
) -> Result<RestoredSockets, RepairError> {
    restore_on_pool(workers, netns, connections, pool)
}

/// [`restore_with_pool`] of connections owned or borrowed.
fn restore_on_pool<C: Borrow<Connection> + Sync>(
    workers: Workers,
    netns: &Netns,
    connections: &[C],
    pool: SocketPool,
) -> Result<RestoredSockets, RepairError> {
    super::check_net_admin()?;
    super::raise_fd_limit();
    let fitting = connections
        .iter()
        .filter(|c| pool.fits((*c).borrow()))
        .count();
    reserve_fds(connections.len() - fitting.min(pool.len()));
    let spare = Mutex::new(pool);
    let abort = AtomicBool::new(false);
    let batches = super::sharded_in(workers, netns, connections, |batch| {
        let mut mine = take_sockets(&spare, batch);
        let mut restored = Vec::with_capacity(batch.len());
        let mut local = LocalAddresses::default();
        for conn in batch {
            let conn = conn.borrow();
            if abort.load(Ordering::Relaxed) {
                break;
            }
            let socket = if mine.fits(conn) {
                mine.sockets.pop()
            } else {
                None
            };
            let result = restore_one(conn, netns, socket, &mut local);
            if result.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            restored.push(result);
        }
        restored
    })?;
    drop(spare);
    let mut pending = Vec::with_capacity(connections.len());
    for result in batches.into_iter().flatten() {
        // Returning early drops `pending`: those sockets close silently in repair mode.
        pending.push(result?);
    }
    Ok(RestoredSockets {
        pending,
        workers,
        precopied: 0,
    })
}

/// A worker's share of the pool: one socket for each of its connections that fits, while the
/// pool lasts. One lock per worker.
fn take_sockets<C: Borrow<Connection>>(pool: &Mutex<SocketPool>, batch: &[C]) -> SocketPool {
    let mut pool = pool.lock().unwrap_or_else(PoisonError::into_inner);
    let wanted = batch.iter().filter(|c| pool.fits((*c).borrow())).count();
    pool.split_off(wanted)
}

/// Grows this process's fd table once to hold `count` more fds. Grown one doubling at a time by
/// the sockets themselves, each growth of a table shared by several threads waits for an RCU
/// grace period (expand_fdtable), milliseconds each on a busy machine.
fn reserve_fds(count: usize) {
    if count == 0 {
        return;
    }
    // Its number is the lowest free one, where the sockets' numbers start.
    let Ok(lowest) = std::fs::File::open("/dev/null") else {
        return;
    };
    let highest = lowest.as_raw_fd() as usize + count;
    // Fails harmlessly beyond RLIMIT_NOFILE: the sockets would not fit anyway.
    drop(so::dup_at_least(lowest.as_fd(), highest));
}

/// Whether each local IP of a batch needs IP_TRANSPARENT (is not an address of the namespace),
/// learnt from the first bind to it: the option is set only where it is needed, which saves a
/// call per socket.
#[derive(Default)]
struct LocalAddresses {
    transparent: Vec<(IpAddr, bool)>,
}

impl LocalAddresses {
    /// Binds `fd` to `addr`, with IP_TRANSPARENT when the address is not (or no longer) local.
    fn bind(
        &mut self,
        fd: BorrowedFd<'_>,
        addr: &SocketAddr,
    ) -> Result<(), (&'static str, io::Error)> {
        let known = self.transparent.iter().position(|(ip, _)| *ip == addr.ip());
        let mut needed = known.is_some_and(|i| self.transparent[i].1);
        if needed {
            set_transparent(fd, addr)?;
        }
        let mut result = so::bind(fd, addr);
        if !needed && matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)) {
            set_transparent(fd, addr)?;
            needed = true;
            result = so::bind(fd, addr);
        }
        match known {
            Some(i) => self.transparent[i].1 = needed,
            None => self.transparent.push((addr.ip(), needed)),
        }
        result.map_err(|e| ("bind", e))
    }
}

/// A TCP socket in repair mode with its send queue selected, bound to `local`: what a restore
/// needs before it sets any state (the queues' sequence numbers, which must be set before
/// connect, are also accepted after bind: the socket is still CLOSED). Do not set SO_REUSEADDR
/// on it (notes, pitfalls).
fn repair_socket(
    local: &SocketAddr,
    nonblocking: bool,
    bound: &mut LocalAddresses,
) -> Result<OwnedFd, (&'static str, io::Error)> {
    let fd = so::new_tcp_socket(local, nonblocking).map_err(|e| ("socket()", e))?;
    so::set_repair(fd.as_fd(), so::REPAIR_ON).map_err(|e| ("TCP_REPAIR=1", e))?;
    so::select_queue(fd.as_fd(), Queue::Send).map_err(|e| ("TCP_REPAIR_QUEUE (send)", e))?;
    bound.bind(fd.as_fd(), local)?;
    Ok(fd)
}

/// Clears O_NONBLOCK: F_SETFL sets only the status flags, and a fresh socket has no other.
fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_SETFL on a valid fd.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// IP_TRANSPARENT: bind and connect then accept an address the namespace does not have yet.
fn set_transparent(fd: BorrowedFd<'_>, addr: &SocketAddr) -> Result<(), (&'static str, io::Error)> {
    let (level, transparent) = match addr {
        SocketAddr::V4(_) => (libc::SOL_IP, so::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::SOL_IPV6, so::IPV6_TRANSPARENT),
    };
    so::set_int(fd, level, transparent, 1).map_err(|e| ("IP_TRANSPARENT", e))
}

/// Restores `conn` on `pooled` (a socket of a [`SocketPool`] bound to its local address), or on
/// a fresh socket.
fn restore_one(
    conn: &Connection,
    netns: &Netns,
    pooled: Option<OwnedFd>,
    local: &mut LocalAddresses,
) -> Result<Pending, RepairError> {
    let tuple = conn.tuple;
    if !conn.state.repairable() {
        return Err(RepairError::UnsupportedState {
            tuple,
            state: conn.state,
        });
    }
    let fail = |op| RepairError::socket(tuple, Phase::Restore, op);
    let fd = match pooled {
        Some(fd) => {
            if !conn.options.nonblocking {
                set_blocking(fd.as_fd()).map_err(fail("clearing O_NONBLOCK"))?;
            }
            fd
        }
        None => repair_socket(&tuple.local, conn.options.nonblocking, local)
            .map_err(|(op, source)| fail(op)(source))?,
    };
    let s = fd.as_fd();
    let recv = QueueState {
        queue: Queue::Recv,
        name: "receive",
        seq: conn.recv_seq.wrapping_sub(conn.recv_queue.len() as u32),
        data: &conn.recv_queue,
        grow: (so::SO_RCVBUFFORCE, conn.options.rcvbuf),
    };
    let send = QueueState {
        queue: Queue::Send,
        name: "send",
        seq: conn.send_seq.wrapping_sub(conn.send_queue.len() as u32),
        data: conn.sent_part(),
        grow: (so::SO_SNDBUFFORCE, conn.options.sndbuf),
    };
    // The send queue comes selected (repair_socket), so its sequence number goes first; the
    // receive queue, selected next, keeps its selection through connect for its bytes. Idle
    // connections and those with received bytes need one TCP_REPAIR_QUEUE call.
    for (q, select) in [(&send, false), (&recv, true)] {
        if select {
            so::select_queue(s, q.queue)
        } else {
            Ok(())
        }
        .and_then(|()| so::set(s, libc::SOL_TCP, so::TCP_QUEUE_SEQ, &q.seq))
        .map_err(fail(q.seq_op()))?;
    }
    so::connect(s, &tuple.remote).map_err(|source| {
        if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            RepairError::TupleInUse {
                tuple,
                netns: netns.spec().to_owned(),
            }
        } else {
            fail("connect (repair mode)")(source)
        }
    })?;
    let (options, count) = repair_options(conn);
    so::set_slice(s, libc::SOL_TCP, so::TCP_REPAIR_OPTIONS, &options[..count])
        .map_err(fail("TCP_REPAIR_OPTIONS"))?;
    set_timestamp(s, conn)?;
    for (q, selected) in [(&recv, true), (&send, false)] {
        fill_queue(s, q, selected).map_err(fail(q.fill_op()))?;
    }
    so::set(s, libc::SOL_TCP, so::TCP_REPAIR_WINDOW, &conn.window)
        .map_err(fail("TCP_REPAIR_WINDOW"))?;
    apply_options(s, tuple.local.is_ipv4(), &conn.options).map_err(fail("socket options"))?;
    Ok(Pending {
        tuple,
        fd,
        options: conn.options,
        unsent: conn.unsent_part(),
        shutdown: conn.state.fin_sent(),
        probe: !conn.sent_part().is_empty() || conn.state.fin_sent(),
    })
}

/// The negotiated options, in a fixed array: no allocation per socket.
fn repair_options(conn: &Connection) -> ([RepairOpt; 4], usize) {
    let n = &conn.negotiated;
    let candidates = [
        Some(RepairOpt {
            code: so::OPT_MSS,
            val: u32::from(n.mss),
        }),
        n.wscale.map(|(snd, rcv)| RepairOpt {
            code: so::OPT_WINDOW,
            val: u32::from(snd) | (u32::from(rcv) << 16),
        }),
        n.sack.then_some(RepairOpt {
            code: so::OPT_SACK_PERM,
            val: 0,
        }),
        n.timestamps.then_some(RepairOpt {
            code: so::OPT_TIMESTAMP,
            val: 0,
        }),
    ];
    let mut options = [RepairOpt { code: 0, val: 0 }; 4];
    let mut count = 0;
    for option in candidates.into_iter().flatten() {
        options[count] = option;
        count += 1;
    }
    (options, count)
}

/// Sends all of `data` (in repair mode: into the selected queue). When the buffer is full it is
/// grown once, to the source's size or four times what is left, whichever is larger: the
/// source's socket held these bytes, a fresh one starts smaller. Then, with a `deadline`, it
/// waits for room; without one, it gives up. Errors carry the number of bytes left.
fn send_all(
    fd: BorrowedFd<'_>,
    mut data: &[u8],
    (force_option, source_size): (libc::c_int, u32),
    deadline: Option<Instant>,
) -> Result<(), (usize, io::Error)> {
    let mut grown = false;
    while !data.is_empty() {
        let no_room = match so::send(fd, data, libc::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(n) => {
                data = &data[n..];
                false
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => true,
            Err(e) => return Err((data.len(), e)),
        };
        if !no_room {
            continue;
        }
        if !grown {
            let size = (source_size as usize)
                .max(4 * data.len())
                .min(i32::MAX as usize);
            // The kernel doubles the value it is given.
            so::set_int(
                fd,
                libc::SOL_SOCKET,
                force_option,
                (size / 2) as libc::c_int,
            )
            .map_err(|e| (data.len(), e))?;
            grown = true;
            continue;
        }
        let left_ms = deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now()).as_millis()
        });
        if left_ms == 0 {
            return Err((data.len(), io::Error::from(io::ErrorKind::TimedOut)));
        }
        so::wait_writable(fd, left_ms.min(1000) as libc::c_int).map_err(|e| (data.len(), e))?;
    }
    Ok(())
}

/// One repair queue of a connection being restored.
struct QueueState<'a> {
    queue: Queue,
    name: &'static str,
    /// TCP_QUEUE_SEQ: the sequence number of the queue's first byte.
    seq: u32,
    data: &'a [u8],
    /// The force option that grows its buffer, and the source's buffer size.
    grow: (libc::c_int, u32),
}

impl QueueState<'_> {
    fn seq_op(&self) -> &'static str {
        match self.queue {
            Queue::Recv => "TCP_QUEUE_SEQ (receive)",
            Queue::Send => "TCP_QUEUE_SEQ (send)",
        }
    }

    fn fill_op(&self) -> &'static str {
        match self.queue {
            Queue::Recv => "restoring the receive queue",
            Queue::Send => "restoring the send queue",
        }
    }
}

/// Queues the bytes of `q` under its TCP_REPAIR_QUEUE (selected first unless it still is),
/// where nothing can drain them: no waiting.
fn fill_queue(fd: BorrowedFd<'_>, q: &QueueState<'_>, selected: bool) -> io::Result<()> {
    if q.data.is_empty() {
        return Ok(());
    }
    if !selected {
        so::select_queue(fd, q.queue)?;
    }
    send_all(fd, q.data, q.grow, None).map_err(|(left, e)| {
        io::Error::new(
            e.kind(),
            format!(
                "{left} of the {} queue's bytes do not fit even in an enlarged buffer: {e}",
                q.name
            ),
        )
    })
}

/// The options that differ from a fresh socket's; SO_REUSEADDR and O_NONBLOCK wait for commit.
fn apply_options(fd: BorrowedFd<'_>, ipv4: bool, options: &SocketOptions) -> io::Result<()> {
    if options.nodelay {
        so::set_int(fd, libc::SOL_TCP, libc::TCP_NODELAY, 1)?;
    }
    if let Some(keepalive) = options.keepalive {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        so::set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_KEEPIDLE,
            keepalive.idle_s.into(),
        )?;
        so::set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_KEEPINTVL,
            keepalive.interval_s.into(),
        )?;
        so::set_int(fd, libc::SOL_TCP, libc::TCP_KEEPCNT, keepalive.count.into())?;
    }
    if options.user_timeout_ms != 0 {
        so::set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_USER_TIMEOUT,
            options.user_timeout_ms as libc::c_int,
        )?;
    }
    if options.mark != 0 {
        so::set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            options.mark as libc::c_int,
        )?;
    }
    if options.tos != 0 {
        let (level, name) = tos_option(ipv4);
        so::set_int(fd, level, name, options.tos.into())?;
    }
    Ok(())
}
