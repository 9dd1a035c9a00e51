//! runc checkpoint + restore of a container whose echo server holds N connections under load,
//! from the source host's namespace into the destination's, with CRIU's own lock (plus the
//! destination-side drop it does not take for a container's namespace) and with tcpmig's hook:
//! the runtime's times and what the clients saw (the test bed's container scenario, the same as
//! tests/tests/containers.rs).
use std::{fmt::Write as _, fs};

use serde::Serialize;
use tcpmig_testbed::{
    TestBed,
    containers::{
        self, Runtime,
        scenario::{LockKind, Scenario},
    },
};

use crate::criu::binaries;

#[derive(Clone, Debug, Serialize)]
pub struct ContainerRun {
    pub runtime: &'static str,
    pub connections: usize,
    pub lock: LockKind,
    pub checkpoint_s: f64,
    pub restore_s: f64,
    /// The clients' longest stall (an echo due and not come), over all connections.
    pub stall_max_ms: f64,
    pub latency_p99_ms: f64,
    pub resets: u64,
    pub lost: u64,
    /// New connections attempted during the migration, and how many were served.
    pub attempted: u64,
    pub served: u64,
}

pub fn run(ns: &[usize]) -> anyhow::Result<Vec<ContainerRun>> {
    containers::check_installed()?;
    let bin = binaries()?;
    let mut runs = Vec::new();
    for &n in ns {
        for lock in [LockKind::CriuLock, LockKind::TcpmigHook] {
            eprintln!("containers bench: runc, {n} connections, {lock:?}");
            let bed = TestBed::new()?;
            let dir = std::env::temp_dir().join(format!("tcpmig-bench-ct-{}", bed.prefix()));
            fs::create_dir_all(&dir)?;
            let scenario = Scenario {
                runtime: Runtime::Runc,
                connections: n,
                lock,
                tcpmig: &bin.tcpmig,
                peer: &bin.peer,
                dir: &dir,
            };
            let seen = scenario.run(&bed);
            let _ = fs::remove_dir_all(&dir);
            let seen = seen?;
            runs.push(ContainerRun {
                runtime: Runtime::Runc.name(),
                connections: n,
                lock,
                checkpoint_s: seen.checkpoint.as_secs_f64(),
                restore_s: seen.restore.as_secs_f64(),
                stall_max_ms: seen.load.max_stall.max_ms,
                latency_p99_ms: seen.load.latency.p99_ms,
                resets: seen.load.resets,
                lost: seen.load.lost(),
                attempted: seen.probe.attempted,
                served: seen.probe.served,
            });
        }
    }
    Ok(runs)
}

pub fn markdown(runs: &[ContainerRun]) -> String {
    let mut md = String::from(
        "## runc checkpoint + restore under load (seconds; the clients' view in ms)\n\n\
         | N | lock | checkpoint | restore | total | longest stall | latency p99 | lost | new \
         connections served |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let _ = writeln!(
            md,
            "| {} | {:?} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {} of {} |",
            run.connections,
            run.lock,
            run.checkpoint_s,
            run.restore_s,
            run.checkpoint_s + run.restore_s,
            run.stall_max_ms,
            run.latency_p99_ms,
            run.lost,
            run.served,
            run.attempted,
        );
    }
    md
}
