//! Groups of connections, each in a shard of its own: at most one application process's worth
//! of fds each. The image is cut into one part per group and each group works on its part on its
//! own thread.
use std::collections::HashMap;

use crate::{
    migrate::MigrateError,
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
