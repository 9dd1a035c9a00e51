//! Bulk restore, in the order of docs/tcp-repair.md, sharded over threads; the connections stay
//! in repair mode until [`RestoredSockets::commit`], so that a migration can move the address
//! and lift its freeze in between.
//!
//! The steps have a file each: [`socket`] builds the sockets (fresh, or ahead of time in a
//! [`SocketPool`]), [`state`] sets each connection's sequence numbers, options and window,
//! [`queue`] fills its queues, [`commit`] takes it out of repair mode; [`ahead`] is the restore
//! of a pre-copy.
mod ahead;
mod commit;
mod fin;
mod queue;
mod socket;
mod state;

use std::{
    borrow::Borrow,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;

pub use self::{
    ahead::{RestoredAhead, restore_ahead},
    commit::{Committed, RestoredSocket},
    socket::SocketPool,
};
use self::{socket::LocalAddresses, state::restore_one};
use super::{Connection, RepairError, SocketOptions, Workers};
use crate::sys::tcp_repair as so;
use crate::{net::Netns, repair, tuple::Tuple};

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
    /// Sent normally after repair-off: the never-sent tail of the send queue, and before it the
    /// part already sent when one flight holds it ([`state`]).
    tail: Bytes,
    shutdown: bool,
    /// The peer's FIN, handed to the socket at the commit (CLOSE_WAIT, LAST_ACK, CLOSING).
    peer_fin: Option<fin::PeerFin>,
    /// Leave repair mode with a window probe: part of the send queue stays in flight.
    probe: bool,
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

/// Recreates `connections` inside `netns`, sharded over one thread per CPU, each in repair mode
/// with its queues, sequence numbers, options, timestamp and window. Works before the local
/// address exists there (IP_TRANSPARENT). On error every socket restored so far is closed
/// silently and the error names the connection that failed.
///
/// # Examples
/// Connections from an image file, restored while their service is still frozen, then made
/// live and sent to the application over a Unix socket ([`crate::handoff`]):
/// ```no_run
/// use std::path::Path;
///
/// use tcpmig::{handoff, image, net::Netns, repair};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = image::read_file(Path::new("connections.img"))?;
/// let netns = Netns::open("/run/netns/destination")?;
/// let restored = repair::restore(&netns, &connections)?;
/// // Add the service address and lift the freeze here: nothing was sent yet.
/// let committed = restored.commit();
/// assert!(committed.failures.is_empty());
/// handoff::send_fds(&committed.sockets, Path::new("/run/app/fds.sock"))?;
/// # Ok(())
/// # }
/// ```
pub fn restore(netns: &Netns, connections: &[Connection]) -> Result<RestoredSockets, RepairError> {
    restore_with(Workers::PerCpu, netns, connections)
}

/// [`restore`] with a chosen number of worker threads (also used by its commit).
pub fn restore_with(
    workers: Workers,
    netns: &Netns,
    connections: &[Connection],
) -> Result<RestoredSockets, RepairError> {
    restore_with_pool(workers, netns, connections, SocketPool::none())
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
    repair::check_net_admin()?;
    repair::raise_fd_limit();
    reserve_fds(connections.len() - pool.covers(connections.iter().map(Borrow::borrow)));
    let spare = Mutex::new(pool);
    let abort = AtomicBool::new(false);
    let batches = repair::sharded_in(workers, netns, connections, |batch| {
        let mut mine = take_sockets(&spare, batch);
        let mut restored = Vec::with_capacity(batch.len());
        let mut local = LocalAddresses::default();
        for conn in batch {
            let conn = conn.borrow();
            if abort.load(Ordering::Relaxed) {
                break;
            }
            let socket = mine.take(conn);
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

/// A worker's share of the pool: one socket for each of its connections on a local address of
/// the pool, while the pool lasts. One lock per worker.
fn take_sockets<C: Borrow<Connection>>(pool: &Mutex<SocketPool>, batch: &[C]) -> SocketPool {
    let mut pool = pool.lock().unwrap_or_else(PoisonError::into_inner);
    pool.split_for(batch.iter().map(Borrow::borrow))
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
