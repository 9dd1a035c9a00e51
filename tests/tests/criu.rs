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
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    KillGroupOnDrop, Peer, PeerArgs, PeerCommand, SERVICE_V4, StreamArgs, TestBed, command_all,
    tcpmig_bin,
};

mod criu_bed;

use criu_bed::*;

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
    migrate_mirror(Mode::SameNetns, 1, SERVICE_V4.into())
}

#[test]
fn same_netns_100() -> Result<()> {
    migrate_mirror(Mode::SameNetns, 100, SERVICE_V4.into())
}

#[test]
fn same_netns_1000() -> Result<()> {
    migrate_mirror(Mode::SameNetns, 1_000, SERVICE_V4.into())
}

#[test]
fn external_netns_1() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, 1, SERVICE_V4.into())
}

#[test]
fn external_netns_100() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, 100, SERVICE_V4.into())
}

#[test]
fn external_netns_1000() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, 1_000, SERVICE_V4.into())
}
