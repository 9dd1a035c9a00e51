//! The dump side of the hook: freeze the task's connections before CRIU dumps them (pre-dump
//! or network-lock), then check and record them for the restore (post-dump).
use std::{
    collections::{BTreeSet, HashSet},
    fs,
    net::{IpAddr, SocketAddr},
};

use tracing::debug;

use super::{
    Config, CriuError, GuardSpec, HookEnv, HookReport, Sidecar, Step as _, attach_freeze, guard,
    remove_freeze, same_netns,
};
use crate::{
    freeze::{self, RemoveOnDrop},
    net::{self, NetError, Netns},
    repair::{self, Filter, RepairError},
    tuple::Tuple,
};

/// Before CRIU stops the tasks of a task in its own netns (pre-dump there; its lock comes at
/// network-lock, after CRIU has stopped them): stops new connections to the configured services,
/// so that none completes into a listener's accept queue that the stopped server cannot empty
/// (CRIU refuses to dump such "in-flight" connections). Starts the guard.
pub(super) fn hold_new_connections(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let (name, mut freeze) = attach_freeze(netns, config)?;
    freeze
        .freeze_new_connections(&config.services, config.deadline)
        .step("stopping new connections to the services")?;
    settle_accept_queues(netns, &config.services)?;
    report.services = config.services.len();
    let addresses = config.services.iter().map(SocketAddr::ip).collect();
    keep_freeze(env, config, netns, (name, freeze), Some(addresses), report)
}

/// How a lock ends: the guard started for the freeze `name` (holding it while `guard`'s
/// addresses are local) unless one runs already (`None`), then the freeze kept past this
/// process and named in the report.
fn keep_freeze(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    (name, freeze): (String, RemoveOnDrop),
    guard: Option<BTreeSet<IpAddr>>,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    if let Some(addresses) = guard {
        start_guard(env, config, netns, &name, addresses)?;
    }
    freeze.keep();
    report.freeze = Some(name);
    Ok(())
}

/// While the application still runs (CRIU stops it after the pre-dump): lets the handshakes in
/// progress finish and the application accept what they put in its queues, up to twice
/// [`repair::HANDSHAKE_BOUND`]. What still waits then fails CRIU's dump ("in-flight"), named in
/// the hook's log first.
fn settle_accept_queues(netns: &Netns, services: &[SocketAddr]) -> Result<(), CriuError> {
    let filter = Filter::services(services);
    let bound = 2 * repair::HANDSHAKE_BOUND;
    let waiting = repair::wait_until(netns, &filter, bound, repair::Waiting::is_empty)
        .step("waiting for the handshakes and accept queues of the services")?;
    if !waiting.is_empty() {
        tracing::warn!(
            handshakes = waiting.handshakes,
            queued = waiting.queued(),
            "connections still in a handshake or an accept queue: CRIU refuses to dump them"
        );
    }
    Ok(())
}

/// Freezes the dumped tree's connections (or the configured services) and starts the guard
/// unless the pre-dump has ([`hold_new_connections`]).
pub(super) fn lock_source(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    guarded: bool,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let (name, mut freeze) = attach_freeze(netns, config)?;
    let addresses: BTreeSet<IpAddr> = if config.services.is_empty() {
        let tuples = tree_connections(netns, env.init_pid()?)?;
        freeze
            .freeze_tuples(&tuples, config.deadline)
            .step("freezing the process tree's connections")?;
        report.connections = tuples.len();
        tuples.iter().map(|t| t.local.ip().to_canonical()).collect()
    } else {
        freeze
            .freeze_services(&config.services, config.deadline)
            .step("freezing the services")?;
        report.services = config.services.len();
        config.services.iter().map(SocketAddr::ip).collect()
    };
    let guard = (!guarded).then_some(addresses);
    keep_freeze(env, config, netns, (name, freeze), guard, report)
}

/// The guard of the freeze `name`, holding it while `addresses` are local to the source.
fn start_guard(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    name: &str,
    addresses: BTreeSet<IpAddr>,
) -> Result<(), CriuError> {
    let spec = GuardSpec {
        name: name.to_owned(),
        criu_pid: env.criu_pid,
        task_pid: env.init_pid,
        addresses: addresses.into_iter().collect(),
        deadline_s: config.deadline.as_secs_f64(),
    };
    guard::spawn(netns, &spec)
}

/// Checks that every dumped connection was frozen, records them for the restore, and moves the
/// address off the source when configured (then the freeze is no longer needed).
pub(super) fn post_dump(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    name: &str,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let tuples = tree_connections(netns, env.init_pid()?)?;
    let unfrozen = freeze::unfrozen(netns, &tuples).step("checking the freeze")?;
    if let Some(&first) = unfrozen.first() {
        return Err(CriuError::NotFrozen {
            count: unfrozen.len(),
            first,
        });
    }
    Sidecar {
        external_netns: !same_netns(netns)?,
        services: config.services.clone(),
        tuples: tuples.iter().map(|t| (t.local, t.remote)).collect(),
    }
    .write(&env.image_dir)?;
    report.connections = tuples.len();
    report.freeze = Some(name.to_owned());
    if let Some((addr, prefix_len)) = config.address {
        match net::delete_address(netns, &config.dev, addr, prefix_len) {
            Ok(()) | Err(NetError::AddressMissing { .. }) => {}
            Err(source) => {
                return Err(CriuError::Net {
                    step: "deleting the service address from the source",
                    source: Box::new(source),
                });
            }
        }
        remove_freeze(name)?;
    }
    Ok(())
}

/// Every TCP connection of the process tree rooted at `root`, in any state.
fn tree_connections(netns: &Netns, root: u32) -> Result<Vec<Tuple>, CriuError> {
    let mut tuples = BTreeSet::new();
    for pid in process_tree(root) {
        let found = match repair::discover(netns, pid, &Filter::default()) {
            Ok(found) => found,
            // A child that exited since it was listed has no connections left.
            Err(RepairError::Process { .. }) if pid != root => continue,
            Err(source) => {
                return Err(CriuError::Repair {
                    step: "listing the process tree's connections",
                    source: Box::new(source),
                });
            }
        };
        tuples.extend(found.sockets.iter().map(|s| s.tuple));
        tuples.extend(found.skipped.iter().map(|(tuple, _)| *tuple));
    }
    debug!(root, count = tuples.len(), "connections of the tree");
    Ok(tuples.into_iter().collect())
}

/// `root` and its descendants, from /proc/PID/task/TID/children (bounded: each pid once).
fn process_tree(root: u32) -> Vec<u32> {
    let mut seen = HashSet::from([root]);
    let mut order = vec![root];
    let mut next = 0;
    while let Some(&pid) = order.get(next) {
        next += 1;
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if seen.insert(child) {
                    order.push(child);
                }
            }
        }
    }
    order
}
