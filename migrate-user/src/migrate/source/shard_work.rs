//! What each process's shard does with its sockets: takes and prepares them at the discovery,
//! and once the process is stopped catches up with what it opened and closed since, and takes
//! the connections waiting in its listeners' accept queues.
use std::{
    collections::HashSet,
    os::fd::{AsFd as _, OwnedFd},
};

use super::ProcessSockets;
use crate::{
    migrate::{MigrateError, guard},
    net::Netns,
    repair::{self, AcceptPlan, Filter, SocketsByInode, TakenSocket, TcpState, Unmovable, Workers},
    tuple::Tuple,
};

/// What one process's shard knows of its sockets besides the prepared dump.
#[derive(Default)]
pub(super) struct Known {
    /// The inode of each prepared socket and its fd number in the process, in the prepared
    /// dump's order.
    pub(super) taken: Vec<(u64, i32)>,
    /// Every socket inode the discovery saw in the process's fd table, taken or not.
    seen: HashSet<u64>,
    /// Its listeners on the service: fd number and inode.
    listeners: Vec<(i32, u64)>,
}

/// What discovery found in one process.
pub(super) struct Found {
    /// Inode and SO_REUSEADDR of each socket, for the guard.
    pub(super) sockets: Vec<(u64, bool)>,
    /// Its connections on the service that do not move.
    pub(super) left: Vec<Unmovable>,
}

/// In the process's shard: takes its connections of `filter`'s services and reads what only it
/// changes.
pub(super) fn prepare_process(
    pid: u32,
    filter: &Filter,
    listed: &SocketsByInode,
    sockets: &mut ProcessSockets,
) -> Result<Found, MigrateError> {
    let netns = Netns::open(&format!("/proc/{pid}/ns/net"))?;
    let mut discovery = repair::discover_among(listed, &netns, pid, filter)?;
    // A rebalance's choice may leave a process out; the discovery fails if it leaves all out.
    if discovery.sockets.is_empty() && !filter.picks() {
        let services = filter.services.clone();
        return Err(MigrateError::NoConnections { pid, services });
    }
    let identified = identify(pid, &discovery.sockets)?;
    // A handshake now may be done by the catch-up (the stop gives it a round trip), which sees
    // any socket the discovery did not: left for it to judge.
    for inode in &discovery.handshakes {
        discovery.seen.remove(inode);
    }
    discovery
        .skipped
        .retain(|(_, state)| !matches!(state, TcpState::SynSent | TcpState::SynRecv));
    let left = held_unmovable(&discovery.skipped);
    sockets.known = Known {
        taken: (identified.iter().map(|&(inode, _)| inode))
            .zip(discovery.sockets.iter().map(|s| s.source_fd))
            .collect(),
        seen: std::mem::take(&mut discovery.seen),
        listeners: std::mem::take(&mut discovery.listeners),
    };
    sockets.prepared = Some(repair::prepare_dump(Workers::PerCpu, discovery.into_fds())?);
    Ok(Found {
        sockets: identified,
        left,
    })
}

/// Inode and SO_REUSEADDR of each socket taken from `pid`.
pub(super) fn identify(pid: u32, taken: &[TakenSocket]) -> Result<Vec<(u64, bool)>, MigrateError> {
    taken
        .iter()
        .map(|taken| {
            guard::identify(taken.fd.as_fd()).map_err(|source| MigrateError::Process {
                pid,
                what: "reading its sockets",
                source,
            })
        })
        .collect()
}

/// What the catch-up changed in one process.
pub(super) struct Caught {
    /// Inode and SO_REUSEADDR of the sockets taken now and of those whose options changed.
    pub(super) noted: Vec<(u64, bool)>,
    pub(super) taken: usize,
    pub(super) closed: usize,
    /// Connections it opened since that do not move.
    pub(super) left: Vec<Unmovable>,
}

/// In the stopped process's shard: lets go of the sockets it closed since the discovery, reads
/// the options of the others again, and takes and prepares those it opened, and those `plan`
/// says wait in its listeners' accept queues.
pub(super) fn catch_up_process(
    pid: u32,
    filter: &Filter,
    sockets: &mut ProcessSockets,
) -> Result<Caught, MigrateError> {
    let prepared = sockets.prepared.as_mut().expect("prepared at discovery");
    let known = &mut sockets.known;
    let found = {
        let taken: Vec<repair::Taken<'_>> = (known.taken.iter())
            .zip(prepared.fds())
            .map(|(&(inode, fd), ours)| (fd, ours, inode))
            .collect();
        repair::catch_up(pid, &taken, &known.seen, filter)?
    };
    // Not needed again: a megabyte of inodes at 50,000 connections.
    known.seen = HashSet::new();
    let left = held_unmovable(&found.skipped);
    let closed = found.closed.len();
    if closed > 0 {
        let open = |k: usize| found.closed.binary_search(&k).is_err();
        prepared.retain(open);
        known.taken = (known.taken.iter().enumerate())
            .filter(|&(k, _)| open(k))
            .map(|(_, &taken)| taken)
            .collect();
    }
    let changed = prepared.reread_options()?;
    let mut noted: Vec<(u64, bool)> = changed
        .into_iter()
        .map(|(k, reuse)| (known.taken[k].0, reuse))
        .collect();
    let identified = identify(pid, &found.sockets)?;
    let taken = found.sockets.len();
    take(sockets, &identified, found.sockets)?;
    noted.extend(identified);
    Ok(Caught {
        noted,
        taken,
        closed,
        left,
    })
}

/// In the stopped process's shard: takes the connections `plan` says wait in its listeners'
/// accept queues; returns how many. They are not told to the guard: it finds sockets in the
/// process, and these were never there.
pub(super) fn take_accepted(
    pid: u32,
    filter: &Filter,
    plan: &AcceptPlan,
    sockets: &mut ProcessSockets,
) -> Result<usize, MigrateError> {
    let accepted = plan.take(pid, &sockets.known.listeners, filter)?;
    let identified = identify(pid, &accepted)?;
    let count = accepted.len();
    take(sockets, &identified, accepted)?;
    Ok(count)
}

/// Prepares `new` sockets (inodes in `identified`) beside those taken before.
fn take(
    sockets: &mut ProcessSockets,
    identified: &[(u64, bool)],
    new: Vec<TakenSocket>,
) -> Result<(), MigrateError> {
    if new.is_empty() {
        return Ok(());
    }
    let inodes = identified.iter().map(|&(inode, _)| inode);
    (sockets.known.taken).extend(inodes.zip(new.iter().map(|s| s.source_fd)));
    let fds: Vec<OwnedFd> = new.into_iter().map(|s| s.fd).collect();
    let prepared = sockets.prepared.as_mut().expect("prepared at discovery");
    prepared.append(repair::prepare_dump(Workers::PerCpu, fds)?);
    Ok(())
}

/// The sockets of a process's fd table left out because of their state, and why.
pub(super) fn held_unmovable(skipped: &[(Tuple, repair::TcpState)]) -> Vec<Unmovable> {
    skipped
        .iter()
        .map(|&(t, s)| Unmovable::held(t, s))
        .collect()
}
