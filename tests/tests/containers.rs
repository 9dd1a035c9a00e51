//! Container runtimes with real CRIU: an echo server in a runc or podman container on the source
//! host holds N connections whose clients send all the time; the runtime checkpoints it with its
//! established connections and restores it into the destination host's network namespace.
//! tcpmig's hook is selected the way a container runtime user would select it, by the
//! container's annotation `org.criu.config` naming the CRIU configuration file that
//! `tcpmig criu-hook --install --settings` wrote, with every setting in the file (podman passes
//! CRIU no environment) and nothing global changed. Every echo is checked byte for byte, resets
//! are counted, and a new connection is attempted every 2 ms through the migration.
//!
//! The same scenario runs with CRIU's own lock (the reference: it works for a container's
//! namespace, locking all of it) and with no lock at all (the clients see resets: the test can
//! fail).
use std::path::Path;

use anyhow::{Result, ensure};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    TestBed,
    containers::{
        self, Runtime,
        scenario::{LockKind, Scenario, Seen},
    },
    tcpmig_bin,
};

mod criu_bed;

use criu_bed::{TempDir, nothing_left};

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");

/// The scenario on a new bed; checks that the container runs in the destination host's
/// namespace, and with the hook that its report has the container actions and that nothing of
/// the hook is left on either host.
fn migrate(runtime: Runtime, connections: usize, lock: LockKind) -> Result<Seen> {
    containers::check_installed()?;
    let bed = TestBed::new()?;
    let dir = TempDir::new(&format!("{}-{connections}", runtime.name()))?;
    let tcpmig = tcpmig_bin();
    let scenario = Scenario {
        runtime,
        connections,
        lock,
        tcpmig: &tcpmig,
        peer: Path::new(PEER),
        dir: &dir.0,
    };
    let seen = scenario.run(&bed)?;
    eprintln!(
        "{} {lock:?} N={connections}: {}",
        runtime.name(),
        seen.summary()
    );
    let netns = Netns::open(bed.destination().name())?.inode();
    ensure!(
        seen.restored_netns == netns,
        "the container was not restored into the destination host's namespace"
    );
    if lock == LockKind::TcpmigHook {
        for action in [
            "\"action\":\"network-lock\"",
            "\"action\":\"network-unlock\"",
        ] {
            ensure!(
                seen.hooks.contains(action),
                "no {action} in the hook's report (the settings file's TCPMIG_REPORT): {}",
                seen.hooks
            );
        }
        // The container is gone with the scenario: the hook's freezes and guards must be too
        // (CRIU's own lock stays on the source on purpose: docs/criu.md).
        nothing_left(&bed)?;
    }
    Ok(seen)
}

#[test]
fn runc_with_the_hook_keeps_1000_connections() -> Result<()> {
    migrate(Runtime::Runc, 1_000, LockKind::TcpmigHook)?.all_kept(1_000, true)
}

#[test]
fn podman_with_the_hook_keeps_1000_connections() -> Result<()> {
    migrate(Runtime::Podman, 1_000, LockKind::TcpmigHook)?.all_kept(1_000, true)
}

/// The reference: CRIU's own lock, in the container's namespace, keeps the established
/// connections too (at a cost `tcpmig-bench containers` measures); those attempted during the
/// checkpoint are lost (skip-in-flight).
#[test]
fn runc_with_criu_lock_keeps_them_too() -> Result<()> {
    migrate(Runtime::Runc, 200, LockKind::CriuLock)?.all_kept(200, false)
}

/// No lock: the clients' segments reach sockets that the dump changes under CRIU (it refuses
/// then), or that it has closed (the source's kernel answers with resets), or that the
/// destination has not restored yet (resets too): the checks fail one way or the other.
#[test]
fn runc_without_a_lock_loses_connections() -> Result<()> {
    match migrate(Runtime::Runc, 200, LockKind::NoLock) {
        Err(error) => {
            let message = format!("{error:#}");
            ensure!(
                message.contains("runc checkpoint"),
                "failed elsewhere than in the checkpoint: {message}"
            );
        }
        Ok(seen) => ensure!(
            seen.load.resets > 0 && seen.all_kept(200, false).is_err(),
            "no lock and no reset: the test cannot see a loss ({:?})",
            seen.load
        ),
    }
    Ok(())
}
