//! Socket build: TCP sockets in repair mode, bound to their local address (IP_TRANSPARENT where
//! the namespace does not have it yet), made one per connection or ahead in a [`SocketPool`].
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::reserve_fds;
use crate::{
    net::Netns,
    repair::{self, Connection, RepairError, Workers},
    sys::tcp_repair::{self as so, Queue},
};

/// Sockets made ahead of a restore: TCP sockets in repair mode, bound to their local addresses
/// (one for most services, one per family for a dual-stack one).
///
/// socket() (about 3 us) and bind are the costliest calls of a restore. Made while the source's
/// application still runs (the migration agent makes them on Prepare, for the source's count of
/// connections), they leave the blackout: [`restore_with_pool`](repair::restore_with_pool) only
/// sets each connection's state. Dropping the pool closes the sockets it still holds, silently:
/// they are unconnected and in repair mode.
#[derive(Default)]
pub struct SocketPool {
    /// The sockets bound to each local address.
    sockets: HashMap<SocketAddr, Vec<OwnedFd>>,
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
        if count == 0 {
            return Ok(Self::none());
        }
        repair::check_net_admin()?;
        repair::raise_fd_limit();
        reserve_fds(count);
        // Zero-sized: only shares the work out.
        let slots = vec![(); count];
        let batches = repair::sharded_in(workers, netns, &slots, |batch| {
            let mut bound = LocalAddresses::default();
            batch
                .iter()
                .map(|()| repair_socket(&local, true, &mut bound))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut sockets = Vec::with_capacity(count);
        for batch in batches {
            // Returning early drops the sockets made so far: they close silently.
            sockets.extend(batch.map_err(|(op, error)| RepairError::Pool {
                local,
                count,
                op,
                error,
            })?);
        }
        Ok(Self {
            sockets: HashMap::from([(local, sockets)]),
        })
    }

    /// A pool with no sockets: every connection restored with it gets a fresh one.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds the sockets of `other` (of another local address, say) to this pool.
    pub fn absorb(&mut self, other: SocketPool) {
        for (local, sockets) in other.sockets {
            self.sockets.entry(local).or_default().extend(sockets);
        }
    }

    pub fn len(&self) -> usize {
        self.sockets.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one socket for each of `connections` on a local address of the pool, while the
    /// pool lasts, into a pool of their own.
    pub fn split_for<'c>(
        &mut self,
        connections: impl IntoIterator<Item = &'c Connection>,
    ) -> SocketPool {
        let mut split = SocketPool::none();
        for (local, count) in per_local(connections) {
            if let Some(sockets) = self.sockets.get_mut(&local) {
                let from = sockets.len().saturating_sub(count);
                split.sockets.insert(local, sockets.split_off(from));
            }
        }
        split
    }

    /// How many of `connections` get a socket of the pool (the others, fresh ones).
    pub(super) fn covers<'c>(
        &self,
        connections: impl IntoIterator<Item = &'c Connection>,
    ) -> usize {
        (per_local(connections).into_iter())
            .map(|(local, count)| count.min(self.sockets.get(&local).map_or(0, Vec::len)))
            .sum()
    }

    /// A socket for `conn`, bound to its local address, if the pool has one left.
    pub(super) fn take(&mut self, conn: &Connection) -> Option<OwnedFd> {
        self.sockets.get_mut(&conn.tuple.local)?.pop()
    }
}

/// How many of `connections` are on each local address.
fn per_local<'c>(
    connections: impl IntoIterator<Item = &'c Connection>,
) -> HashMap<SocketAddr, usize> {
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for conn in connections {
        *counts.entry(conn.tuple.local).or_default() += 1;
    }
    counts
}

/// Whether each local IP of a batch needs IP_TRANSPARENT (is not an address of the namespace),
/// learnt from the first bind to it: the option is set only where it is needed, which saves a
/// call per socket.
#[derive(Default)]
pub(super) struct LocalAddresses {
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
/// on it (docs/tcp-repair.md, pitfalls).
pub(super) fn repair_socket(
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
pub(super) fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFL(OFlag::empty()))?;
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
