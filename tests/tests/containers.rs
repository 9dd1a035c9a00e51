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
use std::{fs, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    IFACE, LoadConfig, LoadRun, SERVICE_V4, TestBed,
    containers::{
        self, Container, Lock, Runtime,
        scenario::{LockKind, Scenario, Seen, install_hook},
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

/// The hook's settings file is gone when the runtime checkpoints (an operator's mistake): the
/// checkpoint fails naming it, and the container runs on in the source with every connection
/// intact; nothing of the hook is left.
#[test]
fn runc_checkpoint_with_a_broken_hook_fails_and_the_container_runs_on() -> Result<()> {
    broken_hook(Runtime::Runc)
}

#[test]
fn podman_checkpoint_with_a_broken_hook_fails_and_the_container_runs_on() -> Result<()> {
    broken_hook(Runtime::Podman)
}

fn broken_hook(runtime: Runtime) -> Result<()> {
    containers::check_installed()?;
    let bed = TestBed::new()?;
    let dir = TempDir::new(&format!("{}-broken", runtime.name()))?;
    let service = SocketAddr::new(SERVICE_V4.into(), 8080);
    let settings = format!("TCPMIG_DEV={IFACE}\nTCPMIG_SERVICES={service}\n");
    let conf = install_hook(&tcpmig_bin(), &dir.0, &settings)?;
    let args = ["echo-server", "--listen", &service.to_string()].map(str::to_owned);
    let container = Container::start(
        runtime,
        &dir.0.join("container"),
        bed.source(),
        Path::new(PEER),
        &args,
        &Lock::Hook(conf),
    )?;
    container.wait_for_line("ready", Duration::from_secs(30))?;
    let config = LoadConfig {
        rate: 2_000.0,
        duration: Duration::from_secs(3),
        drain: Duration::from_secs(3),
        ..LoadConfig::default()
    };
    let load = LoadRun::start(&bed, Path::new(PEER), service, 100, &config)?;
    fs::remove_file(dir.0.join("settings.conf"))?;
    let error = container
        .checkpoint()
        .err()
        .context("the container was checkpointed with the hook's settings file gone")?;
    let message = format!("{error:#}");
    eprintln!("{message}");
    ensure!(
        message.contains("settings.conf"),
        "the failure does not name the settings file: {message}"
    );
    let pid = container.pid()?;
    ensure!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the container does not run on"
    );
    let load = load.finish()?;
    ensure!(
        load.lost() == 0 && load.verified == 100 && load.missing == 0,
        "connections lost after the failed checkpoint: {load:?}"
    );
    drop(container);
    nothing_left(&bed)
}
