//! tcpmig as CRIU's network lock, with real CRIU: a server holding N live connections is dumped on
//! the source (`--network-lock skip --action-script tcpmig-criu-hook`), the hook moves the
//! service address, and CRIU restores the server on the destination; every byte is checked, no
//! connection may be reset, and nothing of CRIU or tcpmig may be left on either host.
//!
//! The dumped server cannot keep pipes to the test, so it is a `tcpmig-peer --mirror` server (or
//! nginx) in its own session with stdio on files; the clients check everything.
use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    ChildGuard, KillGroupOnDrop, Peer, PeerArgs, PeerCommand, Report, SERVICE_V4, StreamArgs,
    TestBed, command_all, tcpmig_bin,
};

mod criu_bed;

use criu_bed::*;

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
const BYTES: u64 = 1024;
/// Bytes each client sends (and gets back) per round of traffic.
const ROUND: u64 = 512;
const PORT: u16 = 8080;

/// Client traffic in rounds (send ROUND, read it back) until `stop`, then two more rounds.
fn traffic_rounds(clients: &mut [Peer<'_>], stop: &AtomicBool) -> Result<(Report, u64)> {
    let mut offset = BYTES;
    let mut after_stop = 0;
    let mut rounds = 0;
    loop {
        if stop.load(Ordering::Relaxed) {
            after_stop += 1;
            if after_stop > 2 {
                break;
            }
        }
        command_all(clients, PeerCommand::Send { bytes: ROUND })?;
        offset += ROUND;
        let report = command_all(
            clients,
            PeerCommand::Verify {
                until: Some(offset),
            },
        )?;
        rounds += 1;
        ensure!(report.all_verified(), "round {rounds}: {report:?}");
        if after_stop > 2 {
            break;
        }
    }
    let report = command_all(
        clients,
        PeerCommand::Verify {
            until: Some(offset),
        },
    )?;
    Ok((report, rounds))
}

/// CRIU killed the dumped tree (`pids`, root first): reap the root, our child, and wait for the
/// rest to be reaped by init, so that their pids are free for the restore.
fn reap(task: &mut ChildGuard<'_>, pids: &[u32]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while task.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "the dumped task still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_gone(pids)
}

/// The acceptance scenario with the mirror server: N connections, traffic running through the
/// dump and the restore, every byte checked, no reset, nothing left.
fn migrate_mirror(mode: Mode, n: usize) -> Result<()> {
    let bed = TestBed::new()?;
    let migration = Migration::new(&bed, mode, &format!("mirror-{n}"))?;
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let stream = StreamArgs::new(BYTES);
    let mut server_cmd = bed.source().command(PEER)?;
    server_cmd.args(PeerArgs::mirror_server(service, n, stream).to_args());
    let mut server = migration.spawn_detached(bed.source(), &mut server_cmd, "server")?;
    let pid = server.pid();
    migration.wait_for_line("server", "listening")?;
    let mut clients = vec![Peer::start(
        bed.client(),
        Path::new(PEER),
        &PeerArgs::client(service, n, stream),
    )?];
    clients[0].expect_line("ready")?;
    migration.wait_for_line("server", "ready")?;
    let report = command_all(&mut clients, PeerCommand::Verify { until: None })?;
    ensure!(report.all_verified(), "before the dump: {report:?}");

    let stop = AtomicBool::new(false);
    let (dumped, restored, (report, rounds)) = std::thread::scope(|scope| -> Result<_> {
        let rounds = scope.spawn(|| traffic_rounds(&mut clients, &stop));
        let migrated = (|| -> Result<_> {
            // Let the rounds run first, so the dump catches traffic in flight.
            std::thread::sleep(Duration::from_millis(200));
            let dumped = migration.dump(pid)?;
            reap(&mut server, &[pid])?;
            let restored = migration.restore()?;
            Ok((dumped, restored))
        })();
        stop.store(true, Ordering::Relaxed);
        let rounds = rounds.join().expect("traffic thread");
        let (dumped, restored) = migrated?;
        Ok((dumped, restored, rounds?))
    })?;
    let _restored_server = KillOnDrop(pid);
    eprintln!("{mode:?} N={n}: dump {dumped:?}, restore {restored:?}, {rounds} rounds: {report:?}");
    let hooks = fs::read_to_string(migration.dir.0.join("hooks.jsonl")).unwrap_or_default();
    eprintln!("hooks: {hooks}");
    for action in ["\"action\":\"post-dump\"", "\"action\":\"post-restore\""] {
        ensure!(
            hooks.contains(action),
            "no {action} in the report the settings file asked for: {hooks}"
        );
    }
    ensure!(
        report.all_verified() && report.connections == n as u64 && report.resets == 0,
        "after the migration: {report:?}"
    );
    let dst = Netns::open(bed.destination().name())?.inode();
    ensure!(
        netns_inode_of(pid)? == dst,
        "the server was not restored in the destination"
    );
    nothing_left(&bed)
}

/// nginx from Debian serving keep-alive HTTP to wrk with `connections` connections: wrk runs
/// through the dump and the restore and must see no error (a reconnect follows an error). Its
/// workers run as root: CRIU reads their rlimits, which needs CAP_SYS_RESOURCE for another user's
/// process, and these machines do not grant it.
fn migrate_nginx(mode: Mode, connections: usize) -> Result<()> {
    const SECONDS: u64 = 8;
    let bed = TestBed::new()?;
    let migration = Migration::new(&bed, mode, &format!("nginx-{connections}"))?;
    let dir = &migration.dir.0;
    let conf = dir.join("nginx.conf");
    fs::write(
        &conf,
        format!(
            "user root; daemon off; master_process on; worker_processes 1;
             worker_rlimit_nofile 20000;
             pid {dir}/nginx.pid; error_log {dir}/error.log warn;
             events {{ worker_connections 8192; }}
             http {{ access_log off; keepalive_timeout 600s; keepalive_requests 1000000000;
               server {{ listen {SERVICE_V4}:{PORT}; location / {{ return 200 \"tcpmig\\n\"; }} }} }}\n",
            dir = dir.display()
        ),
    )?;
    let mut cmd = bed.source().command("nginx")?;
    cmd.arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"));
    let mut nginx = migration.spawn_detached(bed.source(), &mut cmd, "nginx")?;
    let pid = nginx.pid();
    // Dropping `nginx` kills the master only; its workers would outlive a failed test.
    let _workers = KillGroupOnDrop::new(pid);
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed
        .client()
        .run(|| std::net::TcpStream::connect_timeout(&service, Duration::from_millis(200)))?
        .is_err()
    {
        ensure!(Instant::now() < deadline, "nginx does not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut wrk = bed.client().command("wrk")?;
    wrk.args(["-t1", &format!("-c{connections}"), &format!("-d{SECONDS}s")])
        .args(["--timeout", "10s", &format!("http://{service}/")]);
    let mut wrk = migration.spawn_detached(bed.client(), &mut wrk, "wrk")?;
    // Migrate once every connection is open and busy.
    std::thread::sleep(Duration::from_secs(2));
    let tree = tree_pids(pid);
    let dumped = migration.dump(pid)?;
    reap(&mut nginx, &tree)?;
    let restored = migration.restore()?;
    let _restored = KillOnDrop(pid);
    let deadline = Instant::now() + Duration::from_secs(SECONDS + 30);
    while wrk.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "wrk did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fs::read_to_string(dir.join("wrk.out"))?;
    eprintln!("{mode:?} nginx c={connections}: dump {dumped:?}, restore {restored:?}\n{out}");
    ensure!(
        out.contains("requests in") && !out.contains("Socket errors") && !out.contains("Non-2xx"),
        "wrk saw errors:\n{out}"
    );
    let dst = Netns::open(bed.destination().name())?.inode();
    ensure!(
        netns_inode_of(pid)? == dst,
        "nginx was not restored in the destination"
    );
    nothing_left(&bed)
}

/// A hook that fails (no such interface) stops the dump with the step in CRIU's output; the
/// server runs on where it was, its connections intact, and nothing is left.
#[test]
fn failing_hook_stops_criu_and_leaves_nothing() -> Result<()> {
    failed_dump_carries_on(
        "failing",
        |migration| {
            migration.dev = "nosuchdev0";
            Ok(())
        },
        &["pre-dump: attaching the freeze programs", "nosuchdev0"],
    )
}

/// The settings file the installed script names is gone: the checkpoint fails saying so.
#[test]
fn missing_settings_stop_criu_and_leave_nothing() -> Result<()> {
    failed_dump_carries_on(
        "nosettings",
        |migration| Ok(fs::remove_file(migration.dir.0.join("settings.conf"))?),
        &["reading the configuration", "settings.conf"],
    )
}

/// A settings file with an unknown key, or none, is refused when the hook is installed.
#[test]
fn install_checks_the_settings() -> Result<()> {
    let dir = TempDir::new("install")?;
    let bad = dir.0.join("bad.conf");
    fs::write(&bad, "TCPMIG_DEVICE=eth0\n")?;
    for (settings, says) in [
        (bad.as_path(), "unknown key TCPMIG_DEVICE"),
        (
            Path::new("/nonexistent/tcpmig.conf"),
            "/nonexistent/tcpmig.conf",
        ),
    ] {
        let out = Command::new(tcpmig_bin())
            .args(["criu-hook", "--install", "--dir"])
            .arg(dir.0.join("hook"))
            .arg("--settings")
            .arg(settings)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(says),
            "install with {}: {stderr}",
            settings.display()
        );
    }
    ensure!(!dir.0.join("hook").exists(), "nothing installed");
    Ok(())
}

/// A dump whose hook `break_it` broke fails naming what `says`, and the server and its
/// clients carry on.
fn failed_dump_carries_on(
    tag: &str,
    break_it: impl FnOnce(&mut Migration<'_>) -> Result<()>,
    says: &[&str],
) -> Result<()> {
    let bed = TestBed::new()?;
    let mut migration = Migration::new(&bed, Mode::SameNetns, tag)?;
    break_it(&mut migration)?;
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let stream = StreamArgs::new(BYTES);
    let mut server_cmd = bed.source().command(PEER)?;
    server_cmd.args(PeerArgs::mirror_server(service, 10, stream).to_args());
    let _server = migration.spawn_detached(bed.source(), &mut server_cmd, "server")?;
    migration.wait_for_line("server", "listening")?;
    let mut clients = vec![Peer::start(
        bed.client(),
        Path::new(PEER),
        &PeerArgs::client(service, 10, stream),
    )?];
    clients[0].expect_line("ready")?;
    let error = migration
        .dump(_server.pid())
        .err()
        .context("the dump succeeded with a broken hook")?;
    let message = format!("{error:#}");
    ensure!(
        says.iter().all(|part| message.contains(part)),
        "the error does not name {says:?}: {message}"
    );
    command_all(&mut clients, PeerCommand::Send { bytes: ROUND })?;
    let report = command_all(
        &mut clients,
        PeerCommand::Verify {
            until: Some(BYTES + ROUND),
        },
    )?;
    ensure!(report.all_verified(), "after the failed dump: {report:?}");
    nothing_left(&bed)
}

#[test]
fn nginx_same_netns_1() -> Result<()> {
    migrate_nginx(Mode::SameNetns, 1)
}

#[test]
fn nginx_same_netns_100() -> Result<()> {
    migrate_nginx(Mode::SameNetns, 100)
}

#[test]
fn nginx_same_netns_1000() -> Result<()> {
    migrate_nginx(Mode::SameNetns, 1_000)
}

#[test]
fn nginx_external_netns_1000() -> Result<()> {
    migrate_nginx(Mode::ExternalNetns, 1_000)
}

#[test]
fn same_netns_1() -> Result<()> {
    migrate_mirror(Mode::SameNetns, 1)
}

#[test]
fn same_netns_100() -> Result<()> {
    migrate_mirror(Mode::SameNetns, 100)
}

#[test]
fn same_netns_1000() -> Result<()> {
    migrate_mirror(Mode::SameNetns, 1_000)
}

#[test]
fn external_netns_1() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, 1)
}

#[test]
fn external_netns_100() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, 100)
}

#[test]
fn external_netns_1000() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, 1_000)
}
