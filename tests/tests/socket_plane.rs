//! The socket plane across hosts, driven through `tcpmig` as an operator would: connections from
//! the client host to a server on the source host, with unread bytes queued both ways and
//! unacknowledged and never-sent bytes in the server's send queues, are frozen, dumped, the
//! service address moves to the destination (with its announcement), they are restored there
//! and handed to a new server process; every byte is checked both ways, no RST may appear, and a
//! new connection reaches the destination. Also: rollback on the source, and bad input that must
//! leave the destination empty and the source untouched. Needs root; run with
//! `--test-threads=1`.
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
use support::{Scratch, receive_handoff_on};
use tcpmig::{
    freeze::{Freeze, RemoveOnDrop},
    image,
    net::{self, Netns},
    repair,
    tuple::{self, Tuple},
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

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn tcpmig_ok(args: &[OsString]) -> Result<String> {
    let out = tcpmig(args)?;
    ensure!(
        out.status.success(),
        "tcpmig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A failing tcpmig run: non-zero exit and one line on stderr that contains `named`.
fn tcpmig_fails(args: &[OsString], named: &str) -> Result<String> {
    let out = tcpmig(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "tcpmig {args:?} should fail");
    ensure!(stderr.lines().count() == 1, "one line expected: {stderr:?}");
    ensure!(
        stderr.to_lowercase().contains(&named.to_lowercase()),
        "{stderr:?} should say {named:?}"
    );
    eprint!("refused as expected: {stderr}");
    Ok(stderr)
}

/// `tcpmig freeze` of `service` in `host`; the guard removes the freeze however the test ends.
fn freeze(host: &Host, service: SocketAddr, name: &str) -> Result<RemoveOnDrop> {
    tcpmig_ok(&os(&[
        "freeze",
        "--netns",
        host.name(),
        "--dev",
        IFACE,
        "--service",
        &service.to_string(),
        "--name",
        name,
        "--deadline",
        FREEZE_DEADLINE,
    ]))?;
    Ok(RemoveOnDrop::new(Freeze::open(name)?))
}

fn unfreeze(host: &Host, name: &str) -> Result<()> {
    tcpmig_ok(&os(&["unfreeze", "--netns", host.name(), "--name", name])).map(drop)
}

/// Established TCP connections of `host` whose local port is `port`, from `ss`.
fn established_on(host: &Host, port: u16) -> Result<Vec<String>> {
    let mut cmd = host.command("ss")?;
    cmd.args([
        "-Htni",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{port}"),
    ]);
    let out = cmd.output()?;
    ensure!(out.status.success(), "ss failed in {host}");
    // With -i every connection is its address line and an indented details line.
    let text = String::from_utf8(out.stdout)?;
    let mut connections = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = connections.last_mut() {
                *last = format!("{last} {}", line.trim());
            }
        } else {
            connections.push(line.to_owned());
        }
    }
    Ok(connections)
}

/// The number after `key:` in an `ss -i` line (0 when absent).
fn ss_field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix(':')?.parse().ok())
        .unwrap_or(0)
}

/// Established connections of `host` that went straight to CLOSED so far (Tcp EstabResets: an
/// RST received or sent), from its snmp counters.
fn resets(host: &Host) -> Result<u64> {
    let snmp = host.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("snmp names")?,
        tcp.next().context("snmp values")?,
    );
    let column = names
        .split_whitespace()
        .position(|n| n == "EstabResets")
        .context("EstabResets column")?;
    values
        .split_whitespace()
        .nth(column)
        .context("EstabResets value")?
        .parse()
        .context("EstabResets")
}

fn sysctls(bed: &TestBed, settings: &[(&str, &str)]) -> Result<()> {
    for host in [bed.client(), bed.source(), bed.destination()] {
        for (key, value) in settings {
            host.set_sysctl(key, value)?;
        }
    }
    Ok(())
}

/// Both streams of every connection checked up to their ends, and no failure.
fn verify(traffic: &mut Traffic<'_>, to_client: u64, to_server: u64, n: u64) -> Result<()> {
    let clients = command_all(
        &mut traffic.clients,
        PeerCommand::Verify {
            until: Some(to_client),
        },
    )?;
    let servers = command_all(
        &mut traffic.servers,
        PeerCommand::Verify {
            until: Some(to_server),
        },
    )?;
    for (side, report) in [("clients", &clients), ("servers", &servers)] {
        ensure!(
            report.connections == n && report.all_verified() && report.resets == 0,
            "{side}: {report:?}"
        );
    }
    Ok(())
}

/// Connections with both data the peer has not acknowledged and data never sent, among those
/// of `host` on `port`.
fn with_unacked_and_unsent(host: &Host, port: u16) -> Result<(usize, Option<String>)> {
    let connections = established_on(host, port)?;
    let (loaded, other): (Vec<_>, Vec<_>) = connections
        .into_iter()
        .partition(|c| ss_field(c, "unacked") > 0 && ss_field(c, "notsent") > 0);
    Ok((loaded.len(), other.into_iter().next()))
}

/// Opens `n` connections to `service` and loads them: for a moment the client host loses every
/// segment of them (a 4-tuple freeze there), so what the servers write next goes out but stays
/// unacknowledged up to their congestion window and the rest is never sent, and what the clients
/// write stays unacknowledged too; then the service is frozen on the source (`tcpmig freeze`)
/// and the loss ends. A freeze on the source alone would not do: its egress drop is reported to
/// TCP as a local send failure, so nothing would count as sent.
fn loaded_traffic<'bed>(
    bed: &'bed TestBed,
    service: SocketAddr,
    n: usize,
) -> Result<(Traffic<'bed>, RemoveOnDrop, String)> {
    let mut traffic = Traffic::open_at(bed, Path::new(PEER), service, n, stream(BYTES))?;
    let client_ns = Netns::open(bed.client().name())?;
    let tuples: Vec<Tuple> = repair::list_tcp_sockets(&client_ns)?
        .into_iter()
        .filter(|s| s.tuple.remote == tuple::canonical(service))
        .map(|s| s.tuple)
        .collect();
    ensure!(tuples.len() == n, "{} client sockets found", tuples.len());
    let mut loss = RemoveOnDrop::new(Freeze::attach(
        &client_ns,
        IFACE,
        &format!("{}-loss", bed.prefix()),
    )?);
    loss.freeze_tuples(&tuples, Duration::from_secs(120))?;
    let wrote = |report: Report, bytes: u64| report.bytes_out == bytes * n as u64;
    let servers = command_all(
        &mut traffic.servers,
        PeerCommand::Send {
            bytes: SERVER_FROZEN,
        },
    )?;
    ensure!(wrote(servers, SERVER_FROZEN + BYTES), "servers' writes");
    let clients = command_all(
        &mut traffic.clients,
        PeerCommand::Send {
            bytes: CLIENT_FROZEN,
        },
    )?;
    ensure!(wrote(clients, CLIENT_FROZEN + BYTES), "clients' writes");
    let name = format!("{}-src", bed.prefix());
    let guard = freeze(bed.source(), service, &name)?;
    drop(loss);
    let (loaded, other) = with_unacked_and_unsent(bed.source(), service.port())?;
    ensure!(
        loaded == n,
        "{loaded} of {n} connections hold both unacknowledged and never-sent bytes; one \
         that does not: {other:?}"
    );
    Ok((traffic, guard, name))
}

fn dump_args(pid: u32, service: SocketAddr, out: &Path, then: &str) -> Vec<OsString> {
    let mut args = os(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--service",
        &service.to_string(),
        "--then",
        then,
        "--json",
        "--out",
    ]);
    args.push(out.into());
    args
}

/// Checks the dump's report: every connection, with queued bytes of each kind.
fn check_dump_report(json: &str, n: usize) -> Result<()> {
    let report: serde_json::Value = serde_json::from_str(json)?;
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    ensure!(count("connections") == n as u64, "{report}");
    ensure!(count("recv_bytes") == BYTES * n as u64, "{report}");
    ensure!(
        count("unsent_bytes") > 0 && count("send_bytes") > count("unsent_bytes"),
        "{report}"
    );
    Ok(())
}

fn restore_args(image: &Path, host: &Host) -> Vec<OsString> {
    let mut args = os(&["restore", "--in"]);
    args.push(image.into());
    args.extend(os(&["--netns", host.name()]));
    args
}

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

/// The image restored in `netns` on a pool of `size` sockets made first, every other connection
/// as a blocking socket; returns the sockets, in repair mode, and those tuples.
fn restore_on_a_pool(
    netns: &Netns,
    image: &Path,
    service: SocketAddr,
    size: usize,
) -> Result<(repair::RestoredSockets, Vec<Tuple>)> {
    let pool = repair::SocketPool::prepare(repair::Workers::PerCpu, netns, service, size)?;
    ensure!(pool.len() == size, "a pool of {} sockets", pool.len());
    let mut conns = image::decode(&std::fs::read(image)?)?;
    let mut blocking = Vec::new();
    for conn in conns.iter_mut().step_by(2) {
        conn.options.nonblocking = false;
        blocking.push(conn.tuple);
    }
    let restored = repair::restore_with_pool(repair::Workers::PerCpu, netns, &conns, pool)?;
    ensure!(restored.len() == conns.len(), "{} restored", restored.len());
    Ok((restored, blocking))
}

/// Takes the pooled sockets out of repair mode; checks that exactly the `blocking` ones are
/// blocking, and returns their fds.
fn commit_pooled(restored: repair::RestoredSockets, blocking: &[Tuple]) -> Result<Vec<OwnedFd>> {
    let committed = restored.commit();
    ensure!(
        committed.failures.is_empty(),
        "commit: {:?}",
        committed.failures
    );
    for socket in &committed.sockets {
        // SAFETY: F_GETFL on an fd we own.
        let flags = unsafe { libc::fcntl(socket.fd.as_raw_fd(), libc::F_GETFL) };
        ensure!(flags >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
        ensure!(
            (flags & libc::O_NONBLOCK == 0) == blocking.contains(&socket.tuple),
            "{}: O_NONBLOCK is {}",
            socket.tuple,
            flags & libc::O_NONBLOCK != 0
        );
    }
    Ok(committed.sockets.into_iter().map(|s| s.fd).collect())
}

/// `tcpmig restore --handoff` to a Unix socket of this test; returns the fds received.
fn receive_handoff(scratch: &Scratch, image: &Path, host: &Host, n: usize) -> Result<Vec<OwnedFd>> {
    let socket = scratch.path("handoff.sock");
    let listener = UnixListener::bind(&socket)?;
    let mut args = restore_args(image, host);
    args.push("--handoff".into());
    args.push(socket.clone().into());
    let mut restore = Command::new(tcpmig_bin());
    restore
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = host.spawn(&mut restore)?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, fds) = receive_handoff_on(&listener, deadline, || {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.child_mut().stderr.take() {
                pipe.read_to_string(&mut stderr)?;
            }
            bail!("tcpmig restore --handoff exited ({status}) before connecting: {stderr}");
        }
        Ok(())
    })
    .context("tcpmig restore --handoff")?;
    let lines: Vec<&str> = text.lines().collect();
    let headers = lines
        .iter()
        .filter(|l| l.starts_with("tcpmig-fds "))
        .count();
    ensure!(
        fds.len() == n && lines.len() == n + headers && headers == n.div_ceil(253),
        "received {} fds and {} lines ({headers} headers) for {n} connections",
        fds.len(),
        lines.len()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "tcpmig restore did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    ensure!(status.success(), "tcpmig restore --handoff: {status}");
    Ok(fds)
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
    let mut cmd = bed.destination().command_with_listen_fds(PEER, fds)?;
    let taken_over = StreamArgs {
        sent_already: BYTES,
        ..stream(BYTES)
    };
    cmd.args(PeerArgs::adopting_server(taken_over).to_args());
    let server = Peer::spawn(
        bed.destination(),
        cmd,
        "server of the restored sockets",
        taken_over.timeout() + Duration::from_secs(10),
    )?;
    let old_servers = std::mem::replace(&mut traffic.servers, vec![server]);
    traffic.servers[0].expect_line("ready")?;
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
