//! The socket plane across hosts, driven through `tcpmig` as an operator would: connections from
//! the client host to a server on the source host, with unread bytes queued both ways and
//! unacknowledged and never-sent bytes in the server's send queues, are frozen, dumped, the
//! service address moves to the destination (with its announcement), they are restored there
//! and handed to a new server process; every byte is checked both ways, no RST may appear, and a
//! new connection reaches the destination. Also: rollback on the source, and bad input that must
//! leave the destination empty and the source untouched. Needs root; run with
//! `--test-threads=1`.
mod helpers;
#[path = "../support/mod.rs"]
mod support;

use std::{
    ffi::OsString,
    io::Read as _,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::net::UnixListener,
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use helpers::*;
use support::{Scratch, receive_handoff_on};
use tcpmig::{
    freeze::{Freeze, RemoveOnDrop},
    image,
    net::{self, Netns},
    repair,
    tuple::Tuple,
};
use tcpmig_testbed::{
    Host, IFACE, Peer, PeerArgs, PeerCommand, Report, StreamArgs, TestBed, Traffic, command_all,
    tcpmig, tcpmig_bin,
};

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
/// Written both ways at first and left unread: the receive queues hold it.
const BYTES: u64 = 1024;
/// Written by every server while frozen: beyond the congestion window, so part of it is sent
/// (and dropped: unacknowledged) and part never leaves the send queue.
const SERVER_FROZEN: u64 = 24 * 1024;
/// Written by every client while frozen: dropped at the source, retransmitted to the
/// destination.
const CLIENT_FROZEN: u64 = 1000;
/// Exchanged both ways after the migration.
const AFTER: u64 = 4096;
const FREEZE_DEADLINE: &str = "120";

/// Bound on each peer command. The debug-build tcpmig of `cargo xtask test` takes seconds to
/// move 10,000 connections, and peers whose segments were dropped meanwhile retransmit with
/// exponential backoff: the last client caught up about 20 s after the freeze on a quiet machine,
/// and past 30 s on a loaded one. Catching up is not what these tests measure (the benchmark
/// does); every byte arriving exactly once, with no reset, is.
const STREAM_TIMEOUT_SECS: u64 = 120;

/// Streams of `bytes` bytes each way, with this file's bound.
fn stream(bytes: u64) -> StreamArgs {
    StreamArgs {
        timeout_secs: STREAM_TIMEOUT_SECS,
        ..StreamArgs::new(bytes)
    }
}

/// The stream offsets a server that takes over the migrated sockets starts from.
fn adopted_stream() -> StreamArgs {
    StreamArgs {
        sent_already: BYTES + SERVER_FROZEN,
        ..stream(BYTES + SERVER_FROZEN)
    }
}

/// How the restored connections reach the new server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handoff {
    /// `tcpmig restore --exec -- tcpmig-peer server --from-listen-fds ...`
    Exec,
    /// `tcpmig restore --handoff SOCKET` to this test, which starts the server with the fds.
    Unix,
    /// In this test, in the agent's order: a pool of this many sockets bound to the service
    /// before its address reaches the destination, the restore on it, the address moved, then
    /// the commit; the server gets the fds. Half the connections are restored as blocking
    /// sockets, which the pool's (non-blocking) sockets must become.
    Pool(usize),
}

/// One migration of `n` connections to the service on `port`, checked end to end.
fn migrate(n: usize, ipv6: bool, port: u16, settings: &[(&str, &str)], how: Handoff) -> Result<()> {
    let started = Instant::now();
    let bed = TestBed::new()?;
    sysctls(&bed, settings)?;
    let scratch = Scratch::new(&bed)?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let (mut traffic, source_freeze, source_name) = loaded_traffic(&bed, service, n)?;
    let client_resets = resets(bed.client())?;
    let opened = started.elapsed();

    let image = scratch.path("image");
    let server_pid = traffic.servers[0].pid();
    ensure!(traffic.servers.len() == 1, "one server process");
    let dumped = tcpmig_ok(&dump_args(server_pid, service, &image, "commit"))?;
    check_dump_report(&dumped, n)?;

    // Nothing may answer the clients from the destination before the sockets are there.
    let dest_name = format!("{}-dst", bed.prefix());
    let dest_freeze = freeze(bed.destination(), service, &dest_name)?;
    let (prefix, src, dst) = (
        if ipv6 {
            tcpmig_testbed::PREFIX_V6
        } else {
            tcpmig_testbed::PREFIX_V4
        },
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let mut pooled = match how {
        Handoff::Pool(size) => Some(restore_on_a_pool(&dst, &image, service, size)?),
        Handoff::Exec | Handoff::Unix => None,
    };
    net::move_address(&src, IFACE, &dst, IFACE, service.ip(), prefix)?;

    let adopting = PeerArgs::adopting_server(adopted_stream());
    let server = match how {
        Handoff::Exec => {
            let mut cmd = bed.destination().command(tcpmig_bin())?;
            cmd.args(restore_args(&image, bed.destination()))
                .args(["--exec", "--", PEER])
                .args(adopting.to_args());
            Peer::spawn(
                bed.destination(),
                cmd,
                "tcpmig restore --exec",
                adopted_stream().timeout() + Duration::from_secs(30),
            )?
        }
        Handoff::Unix | Handoff::Pool(_) => {
            let fds = match pooled.take() {
                Some((restored, blocking)) => commit_pooled(restored, &blocking)?,
                None => receive_handoff(&scratch, &image, bed.destination(), n)?,
            };
            let mut cmd = bed.destination().command_with_listen_fds(PEER, fds)?;
            cmd.args(adopting.to_args());
            Peer::spawn(
                bed.destination(),
                cmd,
                "server of handed-over sockets",
                adopted_stream().timeout() + Duration::from_secs(10),
            )?
        }
    };
    let old_servers = std::mem::replace(&mut traffic.servers, vec![server]);
    traffic.servers[0].expect_line("ready")?;
    unfreeze(bed.destination(), &dest_name)?;
    drop(dest_freeze);
    let restored = started.elapsed();
    // The old server's sockets are in repair mode: killing it closes them silently.
    drop(old_servers);
    unfreeze(bed.source(), &source_name)?;
    drop(source_freeze);

    verify(
        &mut traffic,
        BYTES + SERVER_FROZEN,
        BYTES + CLIENT_FROZEN,
        n as u64,
    )?;
    let caught_up = started.elapsed();
    command_all(&mut traffic.servers, PeerCommand::Send { bytes: AFTER })?;
    command_all(&mut traffic.clients, PeerCommand::Send { bytes: AFTER })?;
    verify(
        &mut traffic,
        BYTES + SERVER_FROZEN + AFTER,
        BYTES + CLIENT_FROZEN + AFTER,
        n as u64,
    )?;
    ensure!(
        resets(bed.client())? == client_resets,
        "the clients saw resets"
    );
    support::new_connection_reaches(&bed, bed.destination(), service)?;
    eprintln!(
        "{n} connections (ipv6 {ipv6}, {settings:?}): loaded at {opened:?}, restored at \
         {restored:?}, caught up at {caught_up:?}, done at {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn migrate_one_v4() -> Result<()> {
    migrate(1, false, 7500, &[], Handoff::Exec)
}

#[test]
fn migrate_hundred_v4() -> Result<()> {
    migrate(100, false, 7510, &[], Handoff::Exec)
}

#[test]
fn migrate_thousand_v4_through_a_unix_socket() -> Result<()> {
    migrate(1_000, false, 7520, &[], Handoff::Unix)
}

#[test]
fn migrate_ten_thousand_v4() -> Result<()> {
    migrate(10_000, false, 7530, &[], Handoff::Exec)
}

/// More sockets than connections: those left over are closed, and a new listener takes the port.
#[test]
fn migrate_hundred_v4_on_a_larger_pool() -> Result<()> {
    migrate(100, false, 7570, &[], Handoff::Pool(150))
}

/// Fewer sockets than connections: the others get fresh ones.
#[test]
fn migrate_hundred_v6_on_a_smaller_pool() -> Result<()> {
    migrate(100, true, 7580, &[], Handoff::Pool(40))
}

#[test]
fn migrate_hundred_v6() -> Result<()> {
    migrate(100, true, 7540, &[], Handoff::Exec)
}

#[test]
fn migrate_hundred_without_timestamps() -> Result<()> {
    migrate(
        100,
        false,
        7550,
        &[("net.ipv4.tcp_timestamps", "0")],
        Handoff::Exec,
    )
}

#[test]
fn migrate_hundred_without_sack() -> Result<()> {
    migrate(
        100,
        false,
        7560,
        &[("net.ipv4.tcp_sack", "0")],
        Handoff::Exec,
    )
}

/// Dump, then roll back: every connection carries on at the source, byte-exact. The dump
/// freezes the connections itself (--freeze-dev) and lifts that freeze after the rollback.
/// The pre-copy: two servers' connections, idle with unread bytes both ways, are read and
/// restored on the destination ahead of the freeze; then the second server's clients write
/// more (its connections move on), and the first's wrote theirs before the pre-copy. After the
/// freeze and the dump, the restore keeps exactly the first server's pre-copied sockets, redoes
/// the others, and every byte arrives once both ways, with no RST.
#[test]
fn precopy_keeps_what_did_not_move_and_redoes_the_rest() -> Result<()> {
    const PER_SERVER: usize = 50;
    const N: usize = 2 * PER_SERVER;
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(false), 7650);
    let mut traffic = Traffic::open_shared(
        &bed,
        Path::new(PEER),
        service,
        &[PER_SERVER; 2],
        stream(BYTES),
    )?;
    let client_resets = resets(bed.client())?;
    let (src, dst) = (
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let more = PeerCommand::Send {
        bytes: CLIENT_FROZEN,
    };
    traffic.clients[0].command(more)?;
    // Let the ACKs land: the pre-copy takes only empty send queues.
    std::thread::sleep(Duration::from_millis(300));
    let mut fds = Vec::new();
    for pid in traffic.server_pids() {
        fds.extend(repair::discover(&src, pid, &repair::Filter::service(service))?.into_fds());
    }
    let mut reader = repair::StateReader::load(Some(service.port()))?;
    let mut prepared = repair::prepare_dump(repair::Workers::PerCpu, fds)?;
    // Every connection, however recently it moved: what is kept is decided after the freeze.
    let precopy = prepared.precopy(&reader.read(&src)?, Duration::ZERO);
    ensure!(precopy.len() == N, "{} of {N} pre-copied", precopy.len());
    let dest_name = format!("{}-dst", bed.prefix());
    let dest_freeze = freeze(bed.destination(), service, &dest_name)?;
    let pool = repair::SocketPool::prepare(repair::Workers::PerCpu, &dst, service, N)?;
    let ahead = repair::restore_ahead(repair::Workers::PerCpu, &dst, precopy, pool)?;
    traffic.clients[1].command(more)?;
    std::thread::sleep(Duration::from_millis(300));

    let source_name = format!("{}-src", bed.prefix());
    let source_freeze = freeze(bed.source(), service, &source_name)?;
    let dumped = prepared.dump(&mut reader)?;
    let prefix = tcpmig_testbed::PREFIX_V4;
    net::move_address(&src, IFACE, &dst, IFACE, service.ip(), prefix)?;
    let none = repair::SocketPool::prepare(repair::Workers::PerCpu, &dst, service, 0)?;
    let restored = ahead.restore(repair::Workers::PerCpu, &dst, dumped.connections(), none)?;
    ensure!(
        restored.len() == N && restored.precopied() == PER_SERVER,
        "{} restored, {} of them on their pre-copied sockets",
        restored.len(),
        restored.precopied()
    );
    let committed = restored.commit();
    ensure!(committed.failures.is_empty(), "{:?}", committed.failures);
    dumped.commit();
    let fds = committed.sockets.into_iter().map(|s| s.fd).collect();
    let taken_over = StreamArgs {
        sent_already: BYTES,
        ..stream(BYTES)
    };
    let server = support::adopt_on_destination(&bed, fds, taken_over)?;
    let old_servers = std::mem::replace(&mut traffic.servers, vec![server]);
    unfreeze(bed.destination(), &dest_name)?;
    drop(dest_freeze);
    drop(old_servers);
    unfreeze(bed.source(), &source_name)?;
    drop(source_freeze);

    verify(&mut traffic, BYTES, BYTES + CLIENT_FROZEN, N as u64)?;
    command_all(&mut traffic.servers, PeerCommand::Send { bytes: AFTER })?;
    command_all(&mut traffic.clients, PeerCommand::Send { bytes: AFTER })?;
    verify(
        &mut traffic,
        BYTES + AFTER,
        BYTES + CLIENT_FROZEN + AFTER,
        N as u64,
    )?;
    ensure!(
        resets(bed.client())? == client_resets,
        "the clients saw resets"
    );
    support::new_connection_reaches(&bed, bed.destination(), service)
}

#[test]
fn rollback_keeps_every_connection_at_the_source() -> Result<()> {
    const N: usize = 100;
    let bed = TestBed::new()?;
    let scratch = Scratch::new(&bed)?;
    let service = SocketAddr::new(TestBed::service(false), 7600);
    let (mut traffic, source_freeze, source_name) = loaded_traffic(&bed, service, N)?;
    let client_resets = resets(bed.client())?;
    let image = scratch.path("image");
    let pid = traffic.servers[0].pid();
    let dumped = tcpmig_ok(&dump_args(pid, service, &image, "rollback"))?;
    check_dump_report(&dumped, N)?;
    unfreeze(bed.source(), &source_name)?;
    drop(source_freeze);
    verify(
        &mut traffic,
        BYTES + SERVER_FROZEN,
        BYTES + CLIENT_FROZEN,
        N as u64,
    )?;

    // Again, unfrozen: --freeze-dev freezes exactly these connections for the dump.
    let mut args = dump_args(pid, service, &image, "rollback");
    args.extend(os(&["--freeze-dev", IFACE, "--deadline", "60"]));
    let json: serde_json::Value = serde_json::from_str(&tcpmig_ok(&args)?)?;
    ensure!(json["freeze"] == format!("dump-{pid}"), "{json}");
    ensure!(
        Freeze::open(&format!("dump-{pid}")).is_err(),
        "the dump's own freeze is lifted after a rollback"
    );
    command_all(&mut traffic.servers, PeerCommand::Send { bytes: AFTER })?;
    command_all(&mut traffic.clients, PeerCommand::Send { bytes: AFTER })?;
    verify(
        &mut traffic,
        BYTES + SERVER_FROZEN + AFTER,
        BYTES + CLIENT_FROZEN + AFTER,
        N as u64,
    )?;
    ensure!(resets(bed.client())? == client_resets, "resets seen");
    Ok(())
}

/// Bad input gets one clear line and a non-zero exit, the destination keeps no socket, and the
/// source's connections carry on byte-exact.
#[test]
fn bad_input_is_refused_and_leaves_both_hosts_clean() -> Result<()> {
    const N: usize = 20;
    const PORT: u16 = 7700;
    let bed = TestBed::new()?;
    let scratch = Scratch::new(&bed)?;
    let service = SocketAddr::new(TestBed::service(false), PORT);
    let mut traffic = Traffic::open_at(&bed, Path::new(PEER), service, N, StreamArgs::new(BYTES))?;
    let pid = traffic.servers[0].pid();
    let image = scratch.path("image");
    tcpmig_fails(&dump_args(pid, service, &image, "rollback"), "not frozen")?;
    ensure!(!image.exists(), "no image from a refused dump");

    let source_name = format!("{}-src", bed.prefix());
    let source_freeze = freeze(bed.source(), service, &source_name)?;
    let dumped: serde_json::Value =
        serde_json::from_str(&tcpmig_ok(&dump_args(pid, service, &image, "rollback"))?)?;
    ensure!(dumped["connections"] == N, "{dumped}");
    let good = std::fs::read(&image)?;
    let dst = bed.destination();
    let restore_with = |bytes: &[u8], name: &str, expected: &str| -> Result<()> {
        let bad = scratch.path(name);
        std::fs::write(&bad, bytes)?;
        let mut args = restore_args(&bad, dst);
        args.extend(os(&["--exec", "--", PEER, "server", "--from-listen-fds"]));
        tcpmig_fails(&args, expected)?;
        let left = established_on(dst, PORT)?;
        ensure!(
            left.is_empty(),
            "{name}: sockets left on the destination: {left:?}"
        );
        Ok(())
    };
    restore_with(&good[..good.len() / 2], "truncated", "truncated")?;
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    restore_with(&flipped, "flipped", "corrupt")?;
    let mut version = good.clone();
    version[9] = 9;
    restore_with(&version, "version", "version 9")?;

    // Peers the destination has no route to.
    let mut conns = image::decode(&good)?;
    for conn in &mut conns {
        conn.tuple.remote.set_ip(IpAddr::from([192, 0, 2, 1]));
    }
    restore_with(&image::encode(&conns), "unroutable", "192.0.2.1")?;

    // One of the 4-tuples already lives on the destination (restored there, in repair mode).
    let conns = image::decode(&good)?;
    let dst_netns = Netns::open(dst.name())?;
    let held = repair::restore(&dst_netns, &conns[N / 2..N / 2 + 1])?;
    let mut args = restore_args(&image, dst);
    args.extend(os(&["--exec", "--", PEER, "server", "--from-listen-fds"]));
    tcpmig_fails(&args, &conns[N / 2].tuple.to_string())?;
    ensure!(
        established_on(dst, PORT)?.len() == 1,
        "only the socket that was there before may remain"
    );
    drop(held);
    ensure!(established_on(dst, PORT)?.is_empty(), "destination clean");

    unfreeze(bed.source(), &source_name)?;
    drop(source_freeze);
    let after = traffic.verify()?;
    ensure!(
        after.all_verified(N as u64),
        "source connections: {after:?}"
    );
    command_all(&mut traffic.servers, PeerCommand::Send { bytes: AFTER })?;
    command_all(&mut traffic.clients, PeerCommand::Send { bytes: AFTER })?;
    verify(&mut traffic, BYTES + AFTER, BYTES + AFTER, N as u64)
}
