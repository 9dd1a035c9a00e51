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
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    IFACE, LoadConfig, LoadReport, LoadRun, PREFIX_V4, ProbeArgs, ProbeReport, ProbeRun,
    SERVICE_V4, TestBed,
    containers::{self, Container, Lock, Runtime},
};

mod criu_bed;

use criu_bed::{TempDir, install_hook, nothing_left};

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
const PORT: u16 = 8080;
const READY: Duration = Duration::from_secs(30);

/// What the clients saw of one migration.
struct Seen {
    load: LoadReport,
    /// Attempts through the migration, and after it.
    probe: ProbeReport,
    after: ProbeReport,
    checkpoint: Duration,
    restore: Duration,
}

/// The server in a container of `runtime` with `n` clients sending, checkpointed and restored
/// from the source host into the destination under `lock`; `hook` makes `lock` tcpmig's hook.
fn migrate(runtime: Runtime, n: usize, hook: bool, lock: Lock) -> Result<Seen> {
    containers::check_installed()?;
    let bed = TestBed::new()?;
    let dir = TempDir::new(&format!("{}-{n}", runtime.name()))?;
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let address = format!("{SERVICE_V4}/{PREFIX_V4}");
    let lock = if hook {
        let report = dir.0.join("hooks.jsonl");
        let settings = format!(
            "TCPMIG_DEV={IFACE}\nTCPMIG_ADDRESS={address}\nTCPMIG_SERVICES={service}\n\
             TCPMIG_DEADLINE=30\nTCPMIG_REPORT={}\n",
            report.display()
        );
        Lock::Hook(install_hook(&dir, &settings)?)
    } else {
        lock
    };
    let args = ["echo-server", "--listen", &service.to_string()].map(str::to_owned);
    let container = Container::start(
        runtime,
        &dir.0.join("container"),
        bed.source(),
        Path::new(PEER),
        &args,
        &lock,
    )?;
    container.wait_for_line("ready", READY)?;
    let config = LoadConfig {
        rate: 5_000.0,
        duration: Duration::from_secs(6),
        drain: Duration::from_secs(5),
        ..LoadConfig::default()
    };
    let mut load = LoadRun::start(&bed, Path::new(PEER), service, n, &config)?;
    let probe = ProbeRun::start(bed.client(), Path::new(PEER), &ProbeArgs::new(service))?;
    std::thread::sleep(Duration::from_millis(500));
    // CRIU locks nothing on the restore side of a namespace it did not create: for the
    // reference, the destination drops the service's segments itself until the restore ends,
    // as CRIU's namespace-wide lock would (without it the destination's kernel resets them).
    let destination_lock = (lock == Lock::Criu)
        .then(|| containers::DropRule::insert(bed.destination(), SERVICE_V4.into()))
        .transpose()?;
    let checkpoint = container.checkpoint()?;
    if !matches!(lock, Lock::Hook(_)) {
        // The restored sockets bind to it (the hook moves it itself).
        containers::move_address(bed.source(), bed.destination(), &address, IFACE)?;
    }
    let restore = container.restore(bed.destination())?;
    drop(destination_lock);
    load.mark()?;
    std::thread::sleep(Duration::from_millis(300));
    let probe = probe.finish()?;
    let after = ProbeRun::start(bed.client(), Path::new(PEER), &ProbeArgs::new(service))?;
    std::thread::sleep(Duration::from_millis(200));
    let after = after.finish()?;
    let load = load.finish()?;
    let restored = container.pid()?;
    let netns = Netns::open(bed.destination().name())?.inode();
    ensure!(
        criu_bed::netns_inode_of(restored)? == netns,
        "the container was not restored into the destination host's namespace"
    );
    if matches!(lock, Lock::Hook(_)) {
        let hooks = std::fs::read_to_string(dir.0.join("hooks.jsonl")).unwrap_or_default();
        for action in [
            "\"action\":\"network-lock\"",
            "\"action\":\"network-unlock\"",
        ] {
            ensure!(
                hooks.contains(action),
                "no {action} in the hook's report (the settings file's TCPMIG_REPORT): {hooks}"
            );
        }
        drop(container);
        nothing_left(&bed)?;
    }
    let seen = Seen {
        load,
        probe,
        after,
        checkpoint,
        restore,
    };
    eprintln!(
        "{} {} N={n}: checkpoint {:?}, restore {:?}; clients: {} verified, {} resets, longest \
         stall {:.1} ms; new connections through it: {} of {} served, {} refused, {} hanging",
        runtime.name(),
        lock.name(),
        seen.checkpoint,
        seen.restore,
        seen.load.verified,
        seen.load.resets,
        seen.load.max_stall.max_ms,
        seen.probe.served,
        seen.probe.attempted,
        seen.probe.refused,
        seen.probe.hanging(),
    );
    Ok(seen)
}

/// Every connection kept byte-exact with no reset, and new connections served after the
/// migration; with the hook also every one attempted through it (none refused or left hanging).
fn all_kept(seen: &Seen, n: usize, hook: bool) -> Result<()> {
    let load = &seen.load;
    ensure!(
        load.lost() == 0 && load.verified == n as u64 && load.missing == 0,
        "connections lost: {load:?}"
    );
    let mut probes = vec![("after", &seen.after)];
    if hook {
        probes.push(("through", &seen.probe));
    }
    for (when, probe) in probes {
        ensure!(
            probe.attempted > 0
                && probe.refused == 0
                && probe.failed == 0
                && probe.hanging() == 0
                && probe.served == probe.attempted,
            "new connections {when} the migration: {probe:?}"
        );
    }
    Ok(())
}

fn with_hook(runtime: Runtime, n: usize) -> Result<()> {
    let started = Instant::now();
    let seen = migrate(runtime, n, true, Lock::Nothing)?;
    all_kept(&seen, n, true)?;
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}

#[test]
fn runc_with_the_hook_keeps_1000_connections() -> Result<()> {
    with_hook(Runtime::Runc, 1_000)
}

#[test]
fn podman_with_the_hook_keeps_1000_connections() -> Result<()> {
    with_hook(Runtime::Podman, 1_000)
}

/// The reference: CRIU's own lock, in the container's namespace, keeps the established
/// connections too (at a cost the container benchmark measures); those attempted during the
/// checkpoint are lost (skip-in-flight).
#[test]
fn runc_with_criu_lock_keeps_them_too() -> Result<()> {
    let seen = migrate(Runtime::Runc, 200, false, Lock::Criu)?;
    all_kept(&seen, 200, false)
}

/// No lock: the clients' segments reach sockets that the dump changes under CRIU (it refuses
/// then), or that it has closed (the source's kernel answers with resets), or that the
/// destination has not restored yet (resets too): the checks fail one way or the other.
#[test]
fn runc_without_a_lock_loses_connections() -> Result<()> {
    match migrate(Runtime::Runc, 200, false, Lock::Nothing) {
        Err(error) => {
            let message = format!("{error:#}");
            ensure!(
                message.contains("runc checkpoint"),
                "failed elsewhere than in the checkpoint: {message}"
            );
        }
        Ok(seen) => ensure!(
            seen.load.resets > 0 && all_kept(&seen, 200, false).is_err(),
            "no lock and no reset: the test cannot see a loss ({:?})",
            seen.load
        ),
    }
    Ok(())
}
