//! The restore of a pre-copy: connections restored ahead of the freeze, and the restore proper
//! that keeps those the dump finds unchanged.
use std::{collections::HashMap, os::fd::AsFd as _};

use super::{
    Pending, RestoredSockets, SocketPool, restore_on_pool, restore_with_pool, state::set_timestamp,
};
use crate::{
    net::Netns,
    repair::{self, Connection, RepairError, Workers},
    tuple::Tuple,
};

/// Connections restored ahead of the freeze from a pre-copy
/// ([`PreparedDump::precopy`](repair::PreparedDump::precopy)), in repair mode: nothing has been
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
        let timed = repair::sharded(workers, &kept, |batch| {
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
