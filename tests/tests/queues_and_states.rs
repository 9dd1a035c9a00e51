//! Connections that move whatever their queues hold and whatever half of them is closed: full
//! send and receive queues (an application or a client that stopped reading), and the
//! half-closed states. Each connection is built by hand between the client host and a server
//! socket on the source, moved through the library in the agent's order, and checked byte-exact
//! both ways, with the ends of stream where they were, and no reset. Needs root; run with
//! `--test-threads=1`.
mod support;

use std::net::{Shutdown, SocketAddr, TcpStream};

use anyhow::{Result, ensure};
use support::pairs::{FINAL, Half, SMALL, connect, read_stream, resets, write_stream};
use tcpmig_testbed::{TestBed, pattern::Direction};

/// One connection with both queues full (its client stopped reading, its server too) beside
/// two that keep reading: all three move, the full one's bytes all arrive once the client and
/// the destination's application read again, and a final message written at the destination
/// arrives after them. `settings` are sysctls of the destination.
fn full_queues(ipv6: bool, port: u16, settings: &[(&str, &str)]) -> Result<()> {
    let bed = TestBed::new()?;
    for (key, value) in settings {
        bed.destination().set_sysctl(key, value)?;
    }
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let mut pairs = connect(&bed, service, 3)?;
    for (i, pair) in pairs.iter_mut().enumerate() {
        let client = pair.client_addr()?;
        let limit = (i > 0).then_some(SMALL);
        pair.to_client = write_stream(&pair.server, client, Direction::ServerToClient, 0, limit)?;
        pair.to_server = write_stream(&pair.client, client, Direction::ClientToServer, 0, limit)?;
    }
    let before = resets(&bed)?;
    let servers: Vec<TcpStream> = (pairs.iter())
        .map(|p| p.server.try_clone())
        .collect::<std::io::Result<_>>()?;
    let moved = support::move_sockets(&bed, service, &servers)?;
    let full = &moved.connections[0];
    eprintln!(
        "full connection: send queue {} bytes ({} never sent), receive queue {} bytes; \
         wrote {} to the client, {} to the server",
        full.send_queue.len(),
        full.unsent,
        full.recv_queue.len(),
        pairs[0].to_client,
        pairs[0].to_server,
    );
    ensure!(
        full.send_queue.len() > 32 << 10 && full.recv_queue.len() > 32 << 10,
        "the queues were not full"
    );
    for (pair, server) in pairs.iter().zip(&moved.sockets) {
        let client = pair.client_addr()?;
        let took = read_stream(
            server,
            client,
            Direction::ClientToServer,
            (0, pair.to_server),
            false,
        )?;
        eprintln!(
            "{client}: the destination read {} bytes in {took:?}",
            pair.to_server
        );
        let took = read_stream(
            &pair.client,
            client,
            Direction::ServerToClient,
            (0, pair.to_client),
            false,
        )?;
        eprintln!(
            "{client}: the client read {} bytes in {took:?}",
            pair.to_client
        );
        let end = write_stream(
            server,
            client,
            Direction::ServerToClient,
            pair.to_client,
            Some(FINAL),
        )?;
        server.shutdown(Shutdown::Write)?;
        read_stream(
            &pair.client,
            client,
            Direction::ServerToClient,
            (pair.to_client, end),
            true,
        )?;
    }
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

#[test]
fn full_queues_move_v4() -> Result<()> {
    full_queues(false, 7900, &[])
}

#[test]
fn full_queues_move_v6() -> Result<()> {
    full_queues(true, 7910, &[])
}

/// The never-sent bytes of a full send queue are more than the destination's
/// tcp_notsent_lowat: a plain send of them stops there while the client's window is closed.
#[test]
fn full_queues_move_past_notsent_lowat() -> Result<()> {
    full_queues(false, 7920, &[("net.ipv4.tcp_notsent_lowat", "16384")])
}

/// One connection closed on one side or both as `half` says, with bytes in both queues, moved:
/// the destination's application reads what the client wrote, then the end of the stream where
/// the client had closed, and writes a final message where its side is open; the client reads
/// everything the server wrote, then a clean end of stream. No reset anywhere.
fn half_closed(ipv6: bool, port: u16, half: Half) -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let mut pairs = connect(&bed, service, 1)?;
    let pair = &mut pairs[0];
    let client_read = half.close(pair)?;
    let before = resets(&bed)?;
    let moved = support::move_sockets(&bed, service, &[pair.server.try_clone()?])?;
    let conn = &moved.connections[0];
    eprintln!(
        "{:?}: send queue {} bytes, receive queue {} bytes",
        conn.state,
        conn.send_queue.len(),
        conn.recv_queue.len()
    );
    let state = format!("{:?}", conn.state);
    ensure!(state == format!("{half:?}"), "moved in state {state}");
    half.finish(pair, &moved.sockets[0], client_read)?;
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

#[test]
fn close_wait_moves_v4() -> Result<()> {
    half_closed(false, 7930, Half::CloseWait)
}

#[test]
fn close_wait_moves_v6() -> Result<()> {
    half_closed(true, 7931, Half::CloseWait)
}

#[test]
fn last_ack_moves_v4() -> Result<()> {
    half_closed(false, 7932, Half::LastAck)
}

#[test]
fn last_ack_moves_v6() -> Result<()> {
    half_closed(true, 7933, Half::LastAck)
}

#[test]
fn fin_wait1_moves_v4() -> Result<()> {
    half_closed(false, 7934, Half::FinWait1)
}

#[test]
fn fin_wait1_moves_v6() -> Result<()> {
    half_closed(true, 7935, Half::FinWait1)
}

#[test]
fn fin_wait2_moves_v4() -> Result<()> {
    half_closed(false, 7936, Half::FinWait2)
}

#[test]
fn fin_wait2_moves_v6() -> Result<()> {
    half_closed(true, 7937, Half::FinWait2)
}

#[test]
fn closing_moves_v4() -> Result<()> {
    half_closed(false, 7938, Half::Closing)
}

#[test]
fn closing_moves_v6() -> Result<()> {
    half_closed(true, 7939, Half::Closing)
}
