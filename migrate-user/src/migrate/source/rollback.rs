//! Undoing a migration on the source when it fails before the agent's GoingLive.
use std::time::Duration;

use super::{Rebalancing, phases::Run};
use crate::{
    freeze::{Freeze, Steering},
    migrate::{MigrateError, MovedAddress, chain, guard::Note, transport::Message},
    net,
    repair::DumpedSockets,
    shard,
};

/// A failure before GoingLive: the agent is told (unless it is the side that failed or
/// refused), the guard too, and the source rolls back.
pub(super) async fn abort(run: Run<'_>, cause: MigrateError) -> MigrateError {
    if !matches!(
        cause,
        MigrateError::Remote { .. } | MigrateError::Refused { .. }
    ) {
        // Best effort: the agent may be gone, which is often why we roll back.
        let abort = Message::Abort {
            reason: chain(&cause),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), run.link.send(&abort)).await;
    }
    // Past Committing, the guard must now roll back too if we die.
    if let Err(error) = run.guardian.note(&Note::RollingBack) {
        tracing::warn!(%error, "telling the guard about the rollback");
    }
    rollback(run, cause)
}

/// Undoes what the source did, in reverse: addresses back, sockets out of repair mode, freeze
/// removed, application resumed.
fn rollback(run: Run<'_>, cause: MigrateError) -> MigrateError {
    tracing::warn!(%cause, "rolling back");
    let Run {
        config,
        netns,
        mut held,
        addresses,
        report,
        rebalancing,
        ..
    } = run;
    if report.accepted > 0 {
        // They were in no fd table of the application, and no call puts a connection back
        // into an accept queue.
        tracing::warn!(
            connections = report.accepted,
            "the connections taken from the accept queues end here: their clients see the \
             connection closed"
        );
    }
    let mut result: Result<(), MigrateError> = Ok(());
    if held.address_deleted {
        // All of them, even after a failure; adding one that is still there is a no-op.
        for MovedAddress { ip, prefix_len } in addresses {
            let added = net::add_address(netns, &config.dev, ip, prefix_len);
            result = result.and(added.map_err(Into::into));
        }
    }
    let rolled_back = shard::run_all(&held.shards, |_, sockets| {
        sockets.prepared = None;
        sockets.dumped.take().map(DumpedSockets::rollback)
    });
    for outcome in rolled_back.into_iter().flatten() {
        result = result.and(outcome.map_err(Into::into));
    }
    result = result.and(Freeze::remove(held.freeze.keep()).map_err(Into::into));
    // Made for this migration: its entries, if any, forward to an agent that dropped them.
    if let Some(name) = rebalancing.as_ref().and_then(Rebalancing::steering_name) {
        result = result.and(Steering::remove(&name).map_err(Into::into));
    }
    // Dropping the stopped trees resumes them.
    held.stopped.clear();
    match result {
        Ok(()) => MigrateError::RolledBack {
            cause: Box::new(cause),
        },
        Err(rollback) => MigrateError::RollbackFailed {
            cause: Box::new(cause),
            rollback: Box::new(rollback),
        },
    }
}
