//! Steering, the packet path of a rebalance (issue 20): some of a server's connections move to
//! the destination host while the service address stays on the source. The source's steering
//! program forwards the moved connections' segments (client to server) to the destination's MAC;
//! the destination holds the service address on `lo` without answering ARP or ND for it, and
//! answers the clients directly. The connections are built by hand, moved through the library
//! (frozen by 4-tuple, dumped, restored, steered, committed) and checked byte-exact both ways,
//! the moved ones served by the destination and the others by the source, with no reset. Once
//! the moved ones close, a sweep removes their entries. Needs root; run with `--test-threads=1`.
mod support;

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::OwnedFd,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use support::pairs::{FINAL, Pair, SMALL, connect, read_stream, resets, write_stream};
use tcpmig::{
    freeze::{Freeze, NextHop, RemoveOnDrop, Steering},
    net::{self, Netns},
    repair,
    tuple::{Tuple, canonical},
};
use tcpmig_testbed::{IFACE, TestBed, pattern::Direction};

/// Connections to the service, and how many of them move.
const N: usize = 20;
const MOVED: usize = 6;
const FREEZE_TTL: Duration = Duration::from_secs(120);

/// Removes a steering when the test ends, also on a failure.
struct SteeringGuard(String);

impl Drop for SteeringGuard {
    fn drop(&mut self) {
        if let Err(error) = Steering::remove(&self.0) {
            eprintln!("removing steering {}: {error}", self.0);
        }
    }
}

/// The 4-tuple of a server socket, as the source sees it.
fn tuple_of(server: &TcpStream) -> Result<Tuple> {
    Ok(Tuple {
        local: canonical(server.local_addr()?),
        remote: canonical(server.peer_addr()?),
    })
}

/// The service address on the destination's `lo`, answered for by nobody there: the clients
/// keep reaching the source, which forwards the moved connections' segments.
fn quiet_service_address(bed: &TestBed, dst: &Netns, ip: IpAddr) -> Result<()> {
    let destination = bed.destination();
    destination.set_sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
    destination.set_sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    let host_len = if ip.is_ipv4() { 32 } else { 128 };
    net::add_address(dst, "lo", ip, host_len)?;
    Ok(())
}

/// SMALL bytes each way, read; then FINAL more each way, read.
fn exchanges(pair: &mut Pair) -> Result<()> {
    let client = pair.client_addr()?;
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    for _ in 0..2 {
        let end = write_stream(&pair.client, client, c2s, pair.to_server, Some(SMALL))?;
        read_stream(&pair.server, client, c2s, (pair.to_server, end), false)?;
        pair.to_server = end;
        let end = write_stream(&pair.server, client, s2c, pair.to_client, Some(FINAL))?;
        read_stream(&pair.client, client, s2c, (pair.to_client, end), false)?;
        pair.to_client = end;
    }
    Ok(())
}

/// MOVED of N connections to the service move to the destination under steering; all N carry
/// on byte-exact, each moved one answered by the destination's socket; no reset anywhere (the
/// source closed its copies, so a segment that reached its stack would draw one). After the
/// moved ones close both ways, a sweep removes their entries, and the others still carry on.
fn steered_connections_are_served_by_the_destination(ipv6: bool, port: u16) -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let (src, dst) = (
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let mut pairs = connect(&bed, service, N)?;
    for pair in &mut pairs {
        exchanges(pair)?;
    }
    let before = resets(&bed)?;
    quiet_service_address(&bed, &dst, service.ip())?;
    let name = format!("{}-steer", bed.prefix());
    let mut steering = Steering::attach(&src, IFACE, &name)?;
    let _removed = SteeringGuard(name);
    let tuples: Vec<Tuple> = (pairs[..MOVED].iter())
        .map(|p| tuple_of(&p.server))
        .collect::<Result<_>>()?;
    let mut freeze = RemoveOnDrop::new(Freeze::attach(
        &src,
        IFACE,
        &format!("{}-src", bed.prefix()),
    )?);
    freeze.freeze_tuples(&tuples, FREEZE_TTL)?;
    let fds = (pairs[..MOVED].iter())
        .map(|p| Ok(OwnedFd::from(p.server.try_clone()?)))
        .collect::<Result<Vec<_>>>()?;
    let dumped = repair::dump(fds)?;
    let restored = repair::restore(&dst, dumped.connections())?;
    let (ifindex, src_mac) = net::ethernet_link(&src, IFACE)?;
    let (_, dst_mac) = net::ethernet_link(&dst, IFACE)?;
    let next = NextHop {
        ifindex,
        src_mac,
        dst_mac,
    };
    steering.steer(&tuples, next)?;
    let committed = restored.commit();
    ensure!(committed.failures.is_empty(), "{:?}", committed.failures);
    dumped.commit();
    drop(freeze);
    // The source's own copies (the application's, in a rebalance) end for it alone: their
    // reads fail with ECONNABORTED (disconnected in repair mode, which sends nothing), and
    // they close silently. Each moved pair gets the destination's socket.
    for pair in &pairs[..MOVED] {
        let mut byte = [0u8; 1];
        let read = std::io::Read::read(&mut &pair.server, &mut byte);
        ensure!(
            read.as_ref().err().and_then(std::io::Error::raw_os_error) == Some(libc::ECONNABORTED),
            "the source's copy read {read:?}"
        );
    }
    let mut moved: Vec<TcpStream> = (committed.sockets.into_iter())
        .map(|s| TcpStream::from(s.fd))
        .collect();
    for pair in &mut pairs[..MOVED] {
        let client = pair.client_addr()?;
        let k = (moved.iter())
            .position(|s| s.peer_addr().is_ok_and(|peer| peer == client))
            .with_context(|| format!("no restored socket for {client}"))?;
        pair.server = moved.swap_remove(k);
    }
    for (k, pair) in pairs.iter_mut().enumerate() {
        exchanges(pair).with_context(|| format!("connection {k} after the move"))?;
    }
    let entries = steering.entries()?;
    ensure!(
        entries.len() == MOVED
            && entries
                .iter()
                .all(|e| e.packets > 0 && e.dst_mac == dst_mac),
        "{entries:?}"
    );
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    close_moved(&mut pairs[..MOVED])?;
    // The clients' last ACKs are forwarded within a round trip of their FINs.
    std::thread::sleep(Duration::from_millis(100));
    let swept = steering.sweep(Duration::from_millis(50), Duration::from_secs(3600))?;
    ensure!(swept.len() == MOVED, "swept {swept:?}");
    ensure!(steering.entries()?.is_empty(), "entries left");
    // Taking back connections no longer steered (an agent does, from every steering of its
    // namespace) removes nothing and is no error.
    ensure!(steering.unsteer(&swept)? == 0, "unsteered twice");
    for pair in &mut pairs[MOVED..] {
        exchanges(pair)?;
    }
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

/// The destination closes each moved connection, then its client: both read the end.
fn close_moved(pairs: &mut [Pair]) -> Result<()> {
    use std::net::Shutdown;
    for pair in pairs {
        let client = pair.client_addr()?;
        let s2c = Direction::ServerToClient;
        pair.server.shutdown(Shutdown::Write)?;
        read_stream(
            &pair.client,
            client,
            s2c,
            (pair.to_client, pair.to_client),
            true,
        )?;
        pair.client.shutdown(Shutdown::Write)?;
        let c2s = Direction::ClientToServer;
        read_stream(
            &pair.server,
            client,
            c2s,
            (pair.to_server, pair.to_server),
            true,
        )?;
    }
    Ok(())
}

#[test]
fn steered_connections_are_served_by_the_destination_v4() -> Result<()> {
    steered_connections_are_served_by_the_destination(false, 8400)
}

#[test]
fn steered_connections_are_served_by_the_destination_v6() -> Result<()> {
    steered_connections_are_served_by_the_destination(true, 8401)
}
