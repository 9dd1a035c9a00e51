//! The test bed itself, on real namespaces (needs root). Every test builds its own bed with unique
//! names, so they may run one at a time or concurrently.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tcpmig_testbed::peer::{PeerArgs, PeerCommand, StreamArgs};
use tcpmig_testbed::{
    IFACE, Namespaces, Peer, Role, SERVICE_V4, SERVICE_V6, TestBed, Traffic,
    namespaces_with_prefix, netns_path, sweep_stale, sys,
};

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");

fn peer_bin() -> &'static Path {
    Path::new(PEER)
}

/// Asserts that the bed with this prefix and the processes it started are all gone.
fn assert_gone(prefix: &str, pids: &[u32]) -> Result<()> {
    assert_eq!(
        namespaces_with_prefix(prefix)?,
        Vec::<String>::new(),
        "namespaces left"
    );
    let alive: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&pid| sys::pid_alive(pid))
        .collect();
    assert!(
        alive.is_empty(),
        "processes of the bed still alive: {alive:?}"
    );
    Ok(())
}

#[test]
fn small_bed_carries_v4_and_v6_traffic() -> Result<()> {
    let bed = TestBed::new()?;
    for host in [bed.client(), bed.source(), bed.destination()] {
        assert!(netns_path(host.name()).exists(), "{host}");
    }
    let addresses = bed.source().ip(&["-brief", "addr", "show", "dev", IFACE])?;
    for address in [SERVICE_V4.to_string(), SERVICE_V6.to_string()] {
        assert!(
            addresses.contains(&address),
            "{address} not on the source: {addresses}"
        );
    }
    bed.source().set_sysctl("net.ipv4.tcp_timestamps", "0")?;
    assert_eq!(bed.source().sysctl("net.ipv4.tcp_timestamps")?, "0");
    assert_eq!(
        bed.client().sysctl("net.ipv4.tcp_timestamps")?,
        "1",
        "sysctls are per host"
    );

    let connections = 10;
    for service in [SERVICE_V4.into(), SERVICE_V6.into()] {
        let service = SocketAddr::new(service, 7000);
        // A plain connect from a thread inside the client host, before any peer runs: refused,
        // which proves the path to the service address and back.
        let refused = bed
            .client()
            .run(|| TcpStream::connect_timeout(&service, Duration::from_secs(5)))?;
        assert_eq!(
            refused.unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{service}"
        );

        let mut traffic = Traffic::open_at(
            &bed,
            peer_bin(),
            service,
            connections,
            StreamArgs::new(1500),
        )?;
        let verification = traffic.verify()?;
        assert!(
            verification.all_verified(connections as u64),
            "{service}: {verification:?}"
        );
        assert_eq!(verification.server.bytes_in, 1500 * connections as u64);
    }
    Ok(())
}

/// The acceptance test: 10,000 connections with unread bytes queued both ways, every byte
/// checked, then nothing left behind.
#[test]
fn ten_thousand_connections_verified_then_nothing_left() -> Result<()> {
    let connections = 10_000;
    let started = Instant::now();
    let bed = TestBed::new()?;
    let prefix = bed.prefix().to_owned();
    let built = started.elapsed();

    let mut traffic = Traffic::open(&bed, peer_bin(), connections, 1024, 8080)?;
    let opened = started.elapsed();
    let verification = traffic.verify()?;
    let verified = started.elapsed();
    for side in [&verification.client, &verification.server] {
        assert_eq!(side.connections, connections as u64, "{verification:?}");
        assert_eq!(side.verified, connections as u64, "{verification:?}");
        assert_eq!(
            (side.mismatched, side.resets, side.timeouts, side.errors),
            (0, 0, 0, 0),
            "{verification:?}"
        );
    }

    let pids = bed.started_pids();
    assert_eq!(
        pids.len(),
        2,
        "one server and one client below the per-process socket cap"
    );
    drop(traffic);
    drop(bed);
    assert_gone(&prefix, &pids)?;
    println!(
        "bed {built:?}, {connections} connections ready {:?}, verified {:?}, torn down {:?}",
        opened - built,
        verified - opened,
        started.elapsed() - verified
    );
    Ok(())
}

#[test]
fn bed_is_removed_when_a_test_panics() -> Result<()> {
    let mut seen = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let bed = TestBed::new().expect("bed");
        let mut sleeper = bed.destination().command("sleep").expect("command");
        sleeper.arg("60");
        let child = bed.destination().spawn(&mut sleeper).expect("spawn");
        seen = Some((bed.prefix().to_owned(), child.pid()));
        // The panic starts inside the host and continues in the test thread.
        bed.client()
            .run(|| panic!("deliberate panic inside the client host"))
    }));
    let payload = outcome.expect_err("the panic propagates out of Host::run");
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"deliberate panic inside the client host")
    );
    let (prefix, pid) = seen.context("the bed was built")?;
    assert_gone(&prefix, &[pid])
}

/// A group of namespaces other than a bed: only known suffixes, each once, `lo` up in each, and
/// gone with what it ran after a drop or a panic.
#[test]
fn namespace_groups_are_removed_on_drop_and_on_panic() -> Result<()> {
    assert!(Namespaces::new(["eth"]).is_err(), "an unknown suffix");
    assert!(Namespaces::new(["lo", "lo"]).is_err(), "a suffix twice");
    let group = Namespaces::new(["src", "lo"])?;
    let prefix = group.prefix().to_owned();
    assert_eq!(namespaces_with_prefix(&prefix)?.len(), 2);
    for netns in group.members() {
        let lo: serde_json::Value =
            serde_json::from_str(&netns.ip(&["-j", "link", "show", "lo"])?)?;
        let flags = &lo[0]["flags"];
        assert!(
            flags
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "UP")),
            "lo of {netns}: {flags}"
        );
    }
    drop(group);
    assert_gone(&prefix, &[])?;

    let mut seen = None;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let group = Namespaces::new(["lo"]).expect("namespaces");
        let [netns] = group.members();
        let mut sleeper = netns.command("sleep").expect("command");
        sleeper.arg("60");
        let child = netns.spawn(&mut sleeper).expect("spawn");
        seen = Some((group.prefix().to_owned(), child.pid()));
        panic!("deliberate panic with a namespace group");
    }));
    outcome.expect_err("the panic propagates");
    let (prefix, pid) = seen.context("the group was made")?;
    assert_gone(&prefix, &[pid])
}

#[test]
fn a_failing_peer_says_what_failed_where() -> Result<()> {
    let bed = TestBed::new()?;
    let _first = Traffic::open(&bed, peer_bin(), 1, 10, 7500)?;
    let error = Traffic::open(&bed, peer_bin(), 1, 10, 7500)
        .err()
        .context("second bind succeeded")?;
    let message = format!("{error:#}");
    for part in [
        bed.source().name(),
        "binding 198.18.0.100:7500",
        "Address already in use",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    Ok(())
}

/// A hand-over without TCP_REPAIR: the server's sockets are taken with pidfd_getfd and given to a
/// new server on the destination through LISTEN_FDS, as `tcpmig restore --exec` will. Both
/// streams continue where the old server left them, in both directions.
#[test]
fn adopted_sockets_keep_their_streams() -> Result<()> {
    let (connections, bytes, more) = (50, 2000, 300);
    let bed = TestBed::new()?;
    let mut traffic = Traffic::open(&bed, peer_bin(), connections, bytes, 9000)?;
    let old = traffic.servers.remove(0);
    let fds = take_connections(old.pid())?;
    assert_eq!(fds.len(), connections);
    drop(old);

    let stream = StreamArgs {
        sent_already: bytes,
        ..StreamArgs::new(bytes)
    };
    let args = PeerArgs::adopting_server(stream);
    let mut cmd = bed.destination().command_with_listen_fds(peer_bin(), fds)?;
    cmd.args(args.to_args());
    let mut adopted = Peer::spawn(
        bed.destination(),
        cmd,
        "adopting server",
        stream.timeout() * 2,
    )?;
    adopted.expect_line("ready")?;
    traffic.servers.push(adopted);

    let verification = traffic.verify()?;
    assert!(
        verification.all_verified(connections as u64),
        "{verification:?}"
    );
    assert_eq!(
        verification.server.bytes_out, 0,
        "the old server had written everything"
    );

    let server_sent = traffic.servers[0].command(PeerCommand::Send { bytes: more })?;
    assert!(server_sent.all_verified(), "{server_sent:?}");
    let client_got = traffic.clients[0].command(PeerCommand::Verify {
        until: Some(bytes + more),
    })?;
    assert!(client_got.all_verified(), "{client_got:?}");
    assert_eq!(client_got.bytes_in, (bytes + more) * connections as u64);

    let client_sent = traffic.clients[0].command(PeerCommand::Send { bytes: more })?;
    assert!(client_sent.all_verified(), "{client_sent:?}");
    let server_got = traffic.servers[0].command(PeerCommand::Verify {
        until: Some(bytes + more),
    })?;
    assert!(server_got.all_verified(), "{server_got:?}");
    Ok(())
}

/// The connected TCP sockets among the fds of process `pid`, duplicated into this process.
fn take_connections(pid: u32) -> Result<Vec<OwnedFd>> {
    let dir = format!("/proc/{pid}/fd");
    let mut taken = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse().ok())
            .filter(|_| is_socket)
        else {
            continue;
        };
        let socket = TcpStream::from(
            sys::take_fd(pid, fd).with_context(|| format!("taking fd {fd} of {pid}"))?,
        );
        // The listener has no peer: it stays with the old process.
        if socket.peer_addr().is_ok() {
            taken.push(socket.into());
        }
    }
    Ok(taken)
}

#[test]
fn sweep_removes_beds_of_dead_owners_only() -> Result<()> {
    let live = TestBed::new()?;
    // A bed named after a process that has exited.
    let mut exited = Command::new("true").spawn()?;
    exited.wait()?;
    let stale = format!("tmb{}t1x0-br", exited.id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &stale])
            .status()?
            .success()
    );

    // A concurrent test's TestBed::new may sweep it first: check that it is gone, not who did it.
    let swept = sweep_stale();
    let left = netns_path(&stale).exists();
    if left {
        Command::new("ip").args(["netns", "del", &stale]).status()?;
    }
    swept?;
    assert!(!left, "stale bed {stale} not swept");
    assert_eq!(
        namespaces_with_prefix(live.prefix())?.len(),
        Role::ALL.len() + 1,
        "a live owner's bed stays (its hosts and its bridge)"
    );
    Ok(())
}
