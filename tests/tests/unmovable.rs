//! Connections that cannot move, and those that can only with help, through `tcpmig migrate` and
//! `tcpmig agent`. One waiting in the accept queue of a listener the application does not hold
//! makes the migration refuse before the freeze, naming it, and the application carries on;
//! `--skip-unmovable` moves the others and lists it. Those waiting in the application's own
//! listener's queue are taken from it and move, and the listener the agent hands over takes new
//! connections; a handshake in progress at the discovery moves once complete. And every state
//! that moves, at once in one process, 1,000 connections: full queues, ESTABLISHED, CLOSE_WAIT,
//! LAST_ACK, CLOSING, FIN_WAIT1, FIN_WAIT2 and the accept queue, handed by the agent to a new
//! holder, byte-exact with the ends of stream where due, no reset. `tcpmig dump` names what it
//! leaves. The application is a `sleep` holding the server sockets the test built. Needs root;
//! run with `--test-threads=1`.
mod support;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::OwnedFd, unix::net::UnixListener},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use support::pairs::{
    ClientHalf, Pair, SMALL, accept_pairs, check_every_state, connect_begun, every_state, join,
    resets, split, write_stream,
};
use tcpmig_testbed::{ChildGuard, TestBed, TokenFile, containers::DropRule, pattern::Direction};

/// Established connections beside the unmovable one.
const KEPT: usize = 3;

/// A process of the source host holding `fds` (and nothing else of the service).
fn holder(bed: &TestBed, fds: Vec<OwnedFd>) -> Result<ChildGuard<'_>> {
    let mut cmd = bed.source().command_with_listen_fds("/bin/sleep", fds)?;
    cmd.arg("600");
    bed.source().spawn(&mut cmd)
}

/// KEPT connections accepted from `listener`, with SMALL bytes queued unread each way.
fn kept_pairs(bed: &TestBed, listener: &TcpListener) -> Result<Vec<Pair>> {
    let mut pairs = accept_pairs(bed, listener, KEPT)?;
    for pair in &mut pairs {
        pair.queue_both_ways()?;
    }
    Ok(pairs)
}

/// `n` connections to `service` (whose listener is there) left in its accept queue, SMALL bytes
/// written by each client: the clients.
fn queue_unaccepted(bed: &TestBed, service: SocketAddr, n: usize) -> Result<Vec<ClientHalf>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let client = bed.client().run(|| TcpStream::connect(service))??;
        let at = client.local_addr()?;
        let to_server = write_stream(&client, at, Direction::ClientToServer, 0, Some(SMALL))?;
        clients.push((client, 0, to_server));
    }
    // Lets the last handshakes and bytes land in the queue.
    std::thread::sleep(std::time::Duration::from_millis(100));
    Ok(clients)
}

/// KEPT connections to `service` with SMALL bytes queued unread each way, and one more left
/// in the listener's accept queue: the listener, the pairs and that client.
fn with_one_unaccepted(
    bed: &TestBed,
    service: SocketAddr,
) -> Result<(TcpListener, Vec<Pair>, TcpStream)> {
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let pairs = kept_pairs(bed, &listener)?;
    let waiting = bed.client().run(|| TcpStream::connect(service))??;
    Ok((listener, pairs, waiting))
}

/// What an agent handed over: the server ends joined to the clients, and the listeners.
struct HandedOver {
    pairs: Vec<Pair>,
    listeners: Vec<TcpListener>,
}

/// `tcpmig migrate --json EXTRA` of `pid`'s connections to `service`, to an agent that hands
/// them over on a Unix socket: the migration's report, and what the agent handed over, the
/// server ends joined to `clients`.
fn migrate_handing_over(
    bed: &TestBed,
    pid: u32,
    service: SocketAddr,
    extra: &[&str],
    clients: Vec<ClientHalf>,
) -> Result<(serde_json::Value, HandedOver)> {
    let port = service.port();
    let token = TokenFile::new(bed, &format!("unmovable-{port}"), "unmovable token")?;
    let scratch = support::Scratch::new(bed)?;
    let socket = scratch.path("handoff.sock");
    let unix = UnixListener::bind(&socket)?;
    unix.set_nonblocking(true)?;
    let mut agent = support::start_handoff_agent(bed.destination(), &token.0, &[], &socket)?;
    let (source, destination) = (bed.source(), bed.destination());
    let link = support::insecure(&token.0);
    let mut cmd = support::migrate_command_for(
        source,
        destination,
        &[pid],
        service,
        &link,
        support::STEP_TIMEOUT_SECS,
    )?;
    cmd.args(extra).arg("--json");
    let mut migrate = support::Running::spawn(source, cmd)?;
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let report = serde_json::from_str(&stdout)?;
    let handed = handed_over(&unix, clients)?;
    agent.finish()?;
    Ok((report, handed))
}

fn handed_over(listener: &UnixListener, clients: Vec<ClientHalf>) -> Result<HandedOver> {
    let deadline = Instant::now() + support::COMMAND_TIMEOUT;
    let (_, fds) = support::receive_handoff_on(listener, deadline, || Ok(()))?;
    let (servers, listeners) = support::split_listeners(fds)?;
    let pairs = join(clients, servers.into_iter().map(TcpStream::from).collect())?;
    Ok(HandedOver { pairs, listeners })
}

/// A connection in the accept queue of a listener the application does not hold (the test
/// does): nothing can take it, so `migrate` fails naming its 4-tuple and state, rolled back
/// before the freeze; the application runs on, every connection carries on byte-exact, the
/// waiting one is still there to accept, nothing is left attached.
#[test]
fn a_connection_waiting_in_the_accept_queue_refuses_the_migration() -> Result<()> {
    const PORT: u16 = 8310;
    let bed = TestBed::new()?;
    let service = support::service(PORT);
    let (listener, mut pairs, waiting) = with_one_unaccepted(&bed, service)?;
    let mut fds = Vec::new();
    for pair in &pairs {
        fds.push(OwnedFd::from(pair.server.try_clone()?));
    }
    let app = holder(&bed, fds)?;
    let before = resets(&bed)?;
    refused_naming(&bed, app.pid(), service, &waiting)?;
    for pair in &mut pairs {
        pair.carries_on()?;
    }
    listener.set_nonblocking(true)?;
    let (_, peer) = listener.accept().context("the waiting connection")?;
    ensure!(peer == waiting.local_addr()?, "accepted {peer}");
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

/// `tcpmig migrate` of `pid`'s connections on `service` fails before the freeze, naming the
/// connection of `waiting` (a client) as waiting in an accept queue, and rolls back: the
/// application runs on and nothing is left attached.
fn refused_naming(bed: &TestBed, pid: u32, service: SocketAddr, waiting: &TcpStream) -> Result<()> {
    let port = service.port();
    let token = TokenFile::new(bed, &format!("refuse-{port}"), "refusal token")?;
    let scratch = support::Scratch::new(bed)?;
    let socket = scratch.path("handoff.sock");
    let mut agent = support::start_handoff_agent(bed.destination(), &token.0, &[], &socket)?;
    let (source, destination) = (bed.source(), bed.destination());
    let mut migrate =
        support::start_unpaused_migrate(source, destination, &[pid], port, &token.0, &[])?;
    let migrate_pid = migrate.child.pid();
    let stderr = migrate.fails_saying("cannot move")?;
    eprintln!("{stderr}");
    let named = format!("{service} <-> {} ESTABLISHED", waiting.local_addr()?);
    for want in [
        named.as_str(),
        "accept queue",
        "--skip-unmovable",
        "rolled back",
    ] {
        ensure!(stderr.contains(want), "no {want:?} in: {stderr}");
    }
    agent.finish()?;
    ensure!(
        support::process_state(pid).is_some_and(|s| s != 'T'),
        "the application is not running"
    );
    support::nothing_left(bed, &[format!("migrate-{migrate_pid}")], bed.source())
}

/// The application's listener on every address of the port (0.0.0.0) holds a connection to
/// the service and one to another address of the host, neither accepted: taking from that queue
/// would end the other address's connection, which is not the service's. So `migrate` takes
/// nothing from it, refuses naming the service's connection, and after the rollback both are
/// still there to accept, in their order; the accepted connection carries on, no reset.
#[test]
fn a_wildcard_listener_also_queueing_another_address_is_not_taken_from() -> Result<()> {
    const PORT: u16 = 8317;
    let bed = TestBed::new()?;
    let service = support::service(PORT);
    let other = SocketAddr::new(bed.source().v4().into(), PORT);
    let any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), PORT);
    let listener = bed.source().run(|| TcpListener::bind(any))??;
    let client = bed.client().run(|| TcpStream::connect(service))??;
    let (server, _) = listener.accept()?;
    let mut pair = Pair {
        client,
        server,
        to_client: 0,
        to_server: 0,
    };
    pair.queue_both_ways()?;
    let waiting = [service, other].map(|to| bed.client().run(|| TcpStream::connect(to)));
    let [to_service, to_other] = waiting;
    let (to_service, to_other) = (to_service??, to_other??);
    // Lets the handshakes land in the queue.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let fds = vec![
        OwnedFd::from(listener.try_clone()?),
        OwnedFd::from(pair.server.try_clone()?),
    ];
    let app = holder(&bed, fds)?;
    let before = resets(&bed)?;
    refused_naming(&bed, app.pid(), service, &to_service)?;
    pair.carries_on()?;
    listener.set_nonblocking(true)?;
    for waiting in [&to_service, &to_other] {
        let (_, peer) = listener.accept().context("a waiting connection")?;
        ensure!(peer == waiting.local_addr()?, "accepted {peer}");
    }
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

/// The same with `--skip-unmovable`: the established connections move and carry on byte-exact
/// at the destination, and the report lists the one left in the accept queue.
#[test]
fn skip_unmovable_moves_the_others_and_lists_it() -> Result<()> {
    const PORT: u16 = 8311;
    let bed = TestBed::new()?;
    let service = support::service(PORT);
    // The test holds the listener, not the application.
    let (_listener, pairs, waiting) = with_one_unaccepted(&bed, service)?;
    let (fds, clients) = split(pairs);
    let app = holder(&bed, fds)?;
    let (report, HandedOver { mut pairs, .. }) =
        migrate_handing_over(&bed, app.pid(), service, &["--skip-unmovable"], clients)?;
    let left = &report["left"];
    ensure!(
        report["kept"] == KEPT
            && report["skipped"] == 1
            && left.as_array().map(Vec::len) == Some(1),
        "{report}"
    );
    let remote = waiting.local_addr()?.to_string();
    ensure!(
        left[0]["remote"] == remote.as_str()
            && left[0]["local"] == service.to_string().as_str()
            && left[0]["state"] == "ESTABLISHED"
            && left[0]["lost"] == true,
        "{left}"
    );
    for pair in &mut pairs {
        pair.carries_on()?;
    }
    Ok(())
}

/// Connections in all in the every-state migration.
const ALL: usize = 1000;

/// One process holding, 1,000 connections in all: one with both queues full, one in each of
/// the half-closed states ([`every_state`]: CLOSE_WAIT, LAST_ACK, CLOSING, FIN_WAIT1,
/// FIN_WAIT2), QUEUED waiting in its listener's accept queue, and ESTABLISHED ones with SMALL
/// bytes queued each way. `migrate` and the agent move them all: every one in the report, none left; at the destination each carries
/// on byte-exact, with the ends of stream where due, and no host sends or counts a reset.
#[test]
fn every_state_at_once_moves_through_migrate_and_the_agent() -> Result<()> {
    const PORT: u16 = 8312;
    let bed = TestBed::new()?;
    let service = support::service(PORT);
    let (pairs, client_read) = every_state(&bed, service, ALL - QUEUED)?;
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let queued = queue_unaccepted(&bed, service, QUEUED)?;
    let before = resets(&bed)?;
    let (mut fds, mut clients) = split(pairs);
    fds.push(OwnedFd::from(listener));
    clients.extend(queued);
    let app = holder(&bed, fds)?;
    let (report, HandedOver { mut pairs, .. }) =
        migrate_handing_over(&bed, app.pid(), service, &[], clients)?;
    ensure!(
        report["connections"] == ALL
            && report["kept"] == ALL
            && report["accepted"] == QUEUED
            && report["skipped"] == 0,
        "{report}"
    );
    eprintln!(
        "queued: send {} (unsent {}), receive {}; blackout {} ms",
        report["send_bytes"], report["unsent_bytes"], report["recv_bytes"], report["blackout_ms"]
    );
    ensure!(report["send_bytes"].as_u64() > Some(64 << 10), "{report}");
    let mut queued = pairs.split_off(ALL - QUEUED);
    check_every_state(&mut pairs, client_read)?;
    for pair in &mut queued {
        pair.carries_on()?;
    }
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

/// Connections waiting, unaccepted, in the application's listener's queue.
const QUEUED: usize = 8;

/// The application's listener holds QUEUED connections it never accepted, each with SMALL bytes
/// from its client, beside KEPT accepted ones: `migrate` takes them from the queue and moves
/// them all (reported as `accepted`); the destination serves every one byte-exact both ways, a
/// new connection after the move is accepted on the listener the agent handed over, and no
/// host sends or counts a reset.
fn the_accept_queue_moves(ipv6: bool, port: u16) -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let pairs = kept_pairs(&bed, &listener)?;
    let queued = queue_unaccepted(&bed, service, QUEUED)?;
    let before = resets(&bed)?;
    let (mut fds, mut clients) = split(pairs);
    fds.push(OwnedFd::from(listener));
    clients.extend(queued);
    let app = holder(&bed, fds)?;
    let (report, handed) = migrate_handing_over(&bed, app.pid(), service, &[], clients)?;
    ensure!(
        report["connections"] == KEPT + QUEUED
            && report["kept"] == KEPT + QUEUED
            && report["accepted"] == QUEUED
            && report["skipped"] == 0,
        "{report}"
    );
    let HandedOver {
        mut pairs,
        listeners,
    } = handed;
    for pair in &mut pairs {
        pair.carries_on()?;
    }
    ensure!(
        listeners.len() == 1,
        "{} listeners handed over",
        listeners.len()
    );
    let client = bed.client().run(|| TcpStream::connect(service))??;
    let server = support::accept_within(&listeners[0], support::COMMAND_TIMEOUT)?;
    server.set_nonblocking(false)?;
    let mut new = Pair {
        client,
        server,
        to_client: 0,
        to_server: 0,
    };
    new.carries_on()?;
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

#[test]
fn the_accept_queue_moves_v4() -> Result<()> {
    the_accept_queue_moves(false, 8313)
}

#[test]
fn the_accept_queue_moves_v6() -> Result<()> {
    the_accept_queue_moves(true, 8314)
}

/// Where the application's outgoing connection from the service's address waits for its peer.
const PEER_PORT: u16 = 9300;

/// A socket on the source bound to `service` connecting to `peer` on the client host, kept in
/// SYN_SENT by the rule that drops its SYN there (until the rule is dropped).
fn syn_sent<'bed>(
    bed: &'bed TestBed,
    service: SocketAddr,
    peer: SocketAddr,
) -> Result<(socket2::Socket, DropRule<'bed>)> {
    let dropping = DropRule::insert(bed.client(), peer.ip())?;
    let outgoing = connect_begun(bed.source(), Some(service), peer)?;
    Ok((outgoing, dropping))
}

/// `tcpmig dump` of an application holding an accepted connection and one in SYN_SENT (its SYN
/// dropped): one connection in the image, and the one it left named with its 4-tuple, state
/// and reason, in the JSON report and in the text.
#[test]
fn tcpmig_dump_names_what_it_leaves() -> Result<()> {
    const PORT: u16 = 8316;
    let bed = TestBed::new()?;
    let service = support::service(PORT);
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let pairs = accept_pairs(&bed, &listener, 1)?;
    drop(listener);
    let peer = SocketAddr::new(bed.client().v4().into(), PEER_PORT);
    let (outgoing, _dropping) = syn_sent(&bed, service, peer)?;
    let (mut fds, _clients) = split(pairs);
    fds.push(OwnedFd::from(outgoing));
    let app = holder(&bed, fds)?;
    let scratch = support::Scratch::new(&bed)?;
    let image = scratch.path("dump.img");
    let dump = |json: bool| -> Result<String> {
        let mut cmd = bed.source().command(tcpmig_testbed::tcpmig_bin())?;
        cmd.arg("dump").arg("--pid").arg(app.pid().to_string());
        cmd.arg("--service").arg(service.to_string());
        cmd.arg("--out").arg(&image);
        cmd.args(["--freeze-dev", tcpmig_testbed::IFACE]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let report: serde_json::Value = serde_json::from_str(&dump(true)?)?;
    let left = &report["left"];
    ensure!(
        report["connections"] == 1
            && report["skipped"] == 1
            && left[0]["remote"] == peer.to_string().as_str()
            && left[0]["state"] == "SYN_SENT"
            && left[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("handshake")),
        "{report}"
    );
    let text = dump(false)?;
    let named = format!("{service} <-> {peer} SYN_SENT (its handshake");
    ensure!(text.contains(&named), "no {named:?} in: {text}");
    Ok(())
}

/// A connection of the application's, from the service's address, in SYN_SENT when `migrate`
/// discovers the sockets (its peer's host drops the SYN): not refused then. The drop ends while
/// `migrate` pauses after the discovery; the kernel's SYN retransmission completes the
/// handshake, and the catch-up, once the application is stopped, takes the now ESTABLISHED
/// connection: it moves beside an accepted one, both carry on byte-exact at the destination,
/// nothing left, no reset.
#[test]
fn a_handshake_in_progress_at_the_discovery_moves_once_complete() -> Result<()> {
    const PORT: u16 = 8315;
    let bed = TestBed::new()?;
    let service = support::service(PORT);
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let pairs = kept_pairs(&bed, &listener)?;
    // A listener would keep the service's port from the outgoing socket.
    drop(listener);
    let peer = SocketAddr::new(bed.client().v4().into(), PEER_PORT);
    let peer_listener = bed.client().run(|| TcpListener::bind(peer))??;
    let (outgoing, dropping) = syn_sent(&bed, service, peer)?;
    let ours = outgoing.try_clone()?;
    let (mut fds, mut clients) = split(pairs);
    fds.push(OwnedFd::from(outgoing));
    let app = holder(&bed, fds)?;
    let before = resets(&bed)?;
    let token = TokenFile::new(&bed, "handshake", "handshake token")?;
    let scratch = support::Scratch::new(&bed)?;
    let socket = scratch.path("handoff.sock");
    let unix = UnixListener::bind(&socket)?;
    unix.set_nonblocking(true)?;
    let mut agent = support::start_handoff_agent(bed.destination(), &token.0, &[], &socket)?;
    let (source, destination) = (bed.source(), bed.destination());
    let mut migrate = support::start_migrate(
        source,
        destination,
        &[app.pid()],
        PORT,
        &token.0,
        support::STEP_TIMEOUT_SECS,
        &["--json"],
        Some("discovered"),
    )?;
    let pause = "test pause at discovered";
    migrate.stderr.wait_for(pause, support::COMMAND_TIMEOUT)?;
    ensure!(
        ours.peer_addr().is_err(),
        "connected before the discovery: nothing tested"
    );
    drop(dropping);
    // The SYN goes again after the kernel's 1 s retransmission timeout.
    let deadline = Instant::now() + support::COMMAND_TIMEOUT;
    while ours.peer_addr().is_err() {
        ensure!(
            Instant::now() < deadline,
            "the outgoing handshake never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (answered, _) = peer_listener.accept()?;
    let to_server = write_stream(&answered, peer, Direction::ClientToServer, 0, Some(SMALL))?;
    answered.set_nonblocking(false)?;
    clients.push((answered, 0, to_server));
    migrate.resume()?;
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(
        report["connections"] == KEPT + 1 && report["skipped"] == 0,
        "{report}"
    );
    let HandedOver { mut pairs, .. } = handed_over(&unix, clients)?;
    agent.finish()?;
    for pair in &mut pairs {
        pair.carries_on()?;
    }
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}
