//! runc and podman checkpoint + restore of a container whose echo server holds N connections
//! under load, from the source host's namespace into the destination's, with CRIU's own lock
//! (plus the destination-side drop it does not take for a container's namespace) and with
//! tcpmig's hook: the runtime's times, the time spent in the hook's actions, and what the
//! clients saw (the test bed's container scenario, the same as tests/tests/containers.rs).
use std::{fmt::Write as _, fs, path::Path};

use serde::Serialize;
use tcpmig_testbed::{
    TestBed,
    containers::{
        self, Runtime,
        scenario::{LockKind, Scenario},
    },
};

use crate::{
    criu::{HookLine, binaries},
    plot::{self, Point},
};

#[derive(Clone, Debug, Serialize)]
pub struct ContainerRun {
    pub runtime: &'static str,
    pub connections: usize,
    pub lock: LockKind,
    pub checkpoint_s: f64,
    pub restore_s: f64,
    /// With the hook: the time spent in its actions, dump and restore together (its report).
    pub hook_s: Option<f64>,
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
    let mut runs = Vec::new();
    for &n in ns {
        for runtime in Runtime::ALL {
            for lock in [LockKind::CriuLock, LockKind::TcpmigHook] {
                eprintln!(
                    "containers bench: {}, {n} connections, {lock:?}",
                    runtime.name()
                );
                match one(runtime, n, lock) {
                    Ok(run) => runs.push(run),
                    // The other runs still say something; the table shows which is missing.
                    Err(error) => eprintln!("containers bench: failed: {error:#}"),
                }
            }
        }
    }
    Ok(runs)
}

/// One migration on a fresh bed.
fn one(runtime: Runtime, n: usize, lock: LockKind) -> anyhow::Result<ContainerRun> {
    let bin = binaries()?;
    let bed = TestBed::new()?;
    let dir = std::env::temp_dir().join(format!("tcpmig-bench-ct-{}", bed.prefix()));
    fs::create_dir_all(&dir)?;
    let scenario = Scenario {
        runtime,
        connections: n,
        lock,
        tcpmig: &bin.tcpmig,
        peer: &bin.peer,
        dir: &dir,
    };
    let seen = scenario.run(&bed);
    let _ = fs::remove_dir_all(&dir);
    let seen = seen?;
    let hook_s = (lock == LockKind::TcpmigHook)
        .then(|| {
            seen.hooks
                .lines()
                .map(|line| Ok(serde_json::from_str::<HookLine>(line)?.took_us / 1e6))
                .sum::<anyhow::Result<f64>>()
        })
        .transpose()?;
    Ok(ContainerRun {
        runtime: runtime.name(),
        connections: n,
        lock,
        checkpoint_s: seen.checkpoint.as_secs_f64(),
        restore_s: seen.restore.as_secs_f64(),
        hook_s,
        stall_max_ms: seen.load.max_stall.max_ms,
        latency_p99_ms: seen.load.latency.p99_ms,
        resets: seen.load.resets,
        lost: seen.load.lost(),
        attempted: seen.probe.attempted,
        served: seen.probe.served,
    })
}

/// The runtimes' checkpoint + restore time and the clients' longest stall against N, one line
/// per runtime and lock (one run each: the range is the point itself).
pub fn plot(runs: &[ContainerRun], dir: &Path) -> anyhow::Result<()> {
    let point = |run: &ContainerRun, what: &str, ms: f64| Point {
        method: format!("{} {}, {what}", run.runtime, run.lock.name()),
        connections: run.connections,
        median_ms: ms,
        min_ms: ms,
        max_ms: ms,
    };
    let mut points: Vec<Point> = runs
        .iter()
        .map(|r| {
            point(
                r,
                "checkpoint + restore",
                (r.checkpoint_s + r.restore_s) * 1e3,
            )
        })
        .collect();
    points.extend(
        runs.iter()
            .map(|r| point(r, "clients' longest stall", r.stall_max_ms)),
    );
    plot::against_connections(
        &dir.join("containers.svg"),
        "Container checkpoint + restore under load, and what the clients saw",
        "time (ms)",
        &points,
    )
}

pub fn markdown(runs: &[ContainerRun]) -> String {
    let mut md = String::from(
        "## Container checkpoint + restore under load (seconds; the clients' view in ms)\n\n\
         | runtime | N | lock | checkpoint | restore | total | in the hook | longest stall | \
         latency p99 | lost | new connections served |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.1} | {:.1} | {} | {} of {} |",
            run.runtime,
            run.connections,
            run.lock.name(),
            run.checkpoint_s,
            run.restore_s,
            run.checkpoint_s + run.restore_s,
            run.hook_s.map_or("-".to_owned(), |s| format!("{s:.3}")),
            run.stall_max_ms,
            run.latency_p99_ms,
            run.lost,
            run.served,
            run.attempted,
        );
    }
    md
}
