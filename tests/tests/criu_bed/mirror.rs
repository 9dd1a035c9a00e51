//! The CRIU tests' main scenario: a `tcpmig-peer --mirror` server that CRIU dumps and restores
//! while its clients send rounds of traffic through it, every byte checked.
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use tcpmig::net::Netns;
use tcpmig_testbed::{
    ChildGuard, Peer, PeerArgs, PeerCommand, Report, StreamArgs, TestBed, command_all,
};

use super::*;

pub const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
pub const BYTES: u64 = 1024;
/// Bytes each client sends (and gets back) per round of traffic.
pub const ROUND: u64 = 512;
pub const PORT: u16 = 8080;

/// Client traffic in rounds (send ROUND, read it back) until `stop`, then two more rounds.
pub fn traffic_rounds(clients: &mut [Peer<'_>], stop: &AtomicBool) -> Result<(Report, u64)> {
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
pub fn reap(task: &mut ChildGuard<'_>, pids: &[u32]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while task.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "the dumped task still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_gone(pids)
}

/// The acceptance scenario with the mirror server on the bed's service address `ip` (either
/// family, the hook's TCPMIG_ADDRESS): N connections, traffic running through the dump and the
/// restore, every byte checked, no reset, the address on the destination only, nothing left.
pub fn migrate_mirror(mode: Mode, n: usize, ip: IpAddr) -> Result<()> {
    let bed = TestBed::new()?;
    let mut migration = Migration::new(&bed, mode, &format!("mirror-{n}"))?;
    migration.service = ip;
    let service = SocketAddr::new(ip, PORT);
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
    eprintln!(
        "{mode:?} {ip} N={n}: dump {dumped:?}, restore {restored:?}, {rounds} rounds: {report:?}"
    );
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
    ensure!(
        bed.destination().holds(ip)? && !bed.source().holds(ip)?,
        "{ip} is not on the destination only"
    );
    nothing_left(&bed)
}
