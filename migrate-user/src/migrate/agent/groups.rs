//! Groups of connections, each in a shard of its own: at most one application process's worth
//! of fds each. The image is cut into one part per group and each group works on its part on its
//! own thread.
use std::{collections::HashMap, net::SocketAddr};

use crate::{
    migrate::{ExpectedService, MigrateError},
    net::Netns,
    repair::{Connection, RestoredAhead, RestoredSocket, RestoredSockets, SocketPool},
    shard::{self, Shard},
    tuple::Tuple,
};

use super::AgentConfig;

/// One group of connections, in its shard: the pool made on Prepare, the restored sockets in
/// repair mode, then the live ones.
#[derive(Default)]
pub(super) struct Group {
    pub(super) pool: Option<SocketPool>,
    /// Its share of the pre-copy, restored ahead of the freeze.
    pub(super) ahead: Option<RestoredAhead>,
    pub(super) restored: Option<RestoredSockets>,
    pub(super) live: Vec<RestoredSocket>,
}

/// `count` shards for groups of connections.
pub(super) fn spawn_groups(count: usize) -> Result<Vec<Shard<Group>>, MigrateError> {
    (0..count)
        .map(|k| Shard::spawn(format!("group-{k}")).map_err(MigrateError::GroupThread))
        .collect()
}

/// `total` split evenly into the fewest groups of at most `max` (one group when there are none).
pub(super) fn group_sizes(total: usize, max: usize) -> Vec<usize> {
    let groups = total.div_ceil(max.max(1)).max(1);
    (0..groups)
        .map(|k| total / groups + usize::from(k < total % groups))
        .collect()
}

/// How many sockets of a group of `size` (of `total` connections) each service gets: its share
/// of the source's count, the first service the rest. The image is cut into groups in its own
/// order, so a group's mix of services is known only then: a connection without a socket of its
/// address in its group's pool gets a fresh one.
pub(super) fn pool_shares(
    size: usize,
    total: usize,
    services: &[ExpectedService],
) -> Vec<(SocketAddr, usize)> {
    let share = |s: &ExpectedService| {
        (size * s.connections as usize)
            .checked_div(total)
            .unwrap_or(0)
    };
    let others: usize = services.iter().skip(1).map(share).sum();
    (services.iter().enumerate())
        .map(|(k, s)| (s.service, if k == 0 { size - others } else { share(s) }))
        .collect()
}

/// Runs `work` on every group's thread, side by side, inside the agent's namespace, with the
/// group's part and its pool (an empty one when it has none left); returns each outcome, in
/// group order.
pub(super) fn on_each_group<R: Send + 'static>(
    config: &AgentConfig,
    groups: &[Shard<Group>],
    parts: Vec<Vec<Connection>>,
    work: impl Fn(&mut Group, &Netns, SocketPool, Vec<Connection>) -> Result<R, MigrateError>
    + Clone
    + Send
    + 'static,
) -> Vec<Result<R, MigrateError>> {
    let started: Vec<_> = groups
        .iter()
        .zip(parts)
        .map(|(group, part)| {
            let (spec, work) = (config.netns.clone(), work.clone());
            group.start(move |group| {
                let netns = Netns::open(&spec)?;
                let pool = group.pool.take().unwrap_or_else(SocketPool::none);
                work(group, &netns, pool, part)
            })
        })
        .collect();
    started.into_iter().map(shard::Pending::wait).collect()
}

/// `connections` cut into one part per group, in order, in the fewest groups of at most `max`
/// (more groups are started when the existing ones are too few).
pub(super) fn split_evenly(
    mut connections: Vec<Connection>,
    groups: &mut Vec<Shard<Group>>,
    max: usize,
) -> Result<Vec<Vec<Connection>>, MigrateError> {
    let sizes = group_sizes(connections.len(), max);
    if sizes.len() > groups.len() {
        groups.extend(spawn_groups(sizes.len() - groups.len())?);
    }
    // Cut from the end, so each group's connections keep their order.
    let mut parts: Vec<Vec<Connection>> = Vec::with_capacity(groups.len());
    for &size in sizes.iter().rev() {
        parts.push(connections.split_off(connections.len() - size));
    }
    parts.reverse();
    parts.resize_with(groups.len(), Vec::new);
    Ok(parts)
}

/// One part per group: each connection of the pre-copy to the group that holds its socket
/// (the fd is in that group's table), the others to the group with the fewest, while it has
/// fewer than `max` (more groups are started when all are full).
pub(super) fn split_by_precopy(
    connections: Vec<Connection>,
    groups: &mut Vec<Shard<Group>>,
    ahead: &HashMap<Tuple, usize>,
    max: usize,
) -> Result<Vec<Vec<Connection>>, MigrateError> {
    let mut parts: Vec<Vec<Connection>> = groups.iter().map(|_| Vec::new()).collect();
    let mut others = Vec::new();
    for conn in connections {
        match ahead.get(&conn.tuple) {
            Some(&k) => parts[k].push(conn),
            None => others.push(conn),
        }
    }
    for conn in others {
        let fewest = parts
            .iter()
            .enumerate()
            .min_by_key(|(_, part)| part.len())
            .map(|(k, part)| (k, part.len()));
        match fewest {
            Some((k, len)) if len < max => parts[k].push(conn),
            _ => {
                groups.extend(spawn_groups(1)?);
                parts.push(vec![conn]);
            }
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dual-stack service of 600 IPv4 and 300 IPv6 connections in groups of at most 400: each
    /// group's pool in proportion, every expected connection with a socket.
    #[test]
    fn each_group_pools_each_service_in_proportion() {
        let v4: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        let services = [
            ExpectedService {
                service: v4,
                connections: 600,
            },
            ExpectedService {
                service: v6,
                connections: 300,
            },
        ];
        let sizes = group_sizes(900, 400);
        assert_eq!(sizes, vec![300, 300, 300]);
        for size in sizes {
            assert_eq!(
                pool_shares(size, 900, &services),
                vec![(v4, 200), (v6, 100)]
            );
        }
        // Odd counts: the first service takes what rounding leaves.
        let odd = [
            ExpectedService {
                service: v4,
                connections: 7,
            },
            ExpectedService {
                service: v6,
                connections: 3,
            },
        ];
        assert_eq!(pool_shares(5, 10, &odd), vec![(v4, 4), (v6, 1)]);
        assert_eq!(pool_shares(0, 0, &services), vec![(v4, 0), (v6, 0)]);
    }
}
