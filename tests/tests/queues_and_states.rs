//! Connections that move whatever their queues hold and whatever half of them is closed: full
//! send and receive queues (an application or a client that stopped reading), and the
//! half-closed states. Each connection is built by hand between the client host and a server
//! socket on the source, moved through the library in the agent's order, and checked byte-exact
//! both ways, with the ends of stream where they were, and no reset. Needs root; run with
//! `--test-threads=1`.
mod support;

use std::net::{Shutdown, SocketAddr, TcpStream};

use anyhow::{Result, ensure};
use support::pairs::{
    FINAL, Half, SMALL, connect, read_stream, resets, state_of, wait_for_state, write_stream,
};
use tcpmig::repair::TcpState;
use tcpmig_testbed::{Host, TestBed, pattern::Direction};

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
    ensure!(conn.state == half.state(), "moved in {}", conn.state);
    eprintln!("restored in {}", state_of(&moved.sockets[0])?);
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

/// A rule of the client host dropping every segment from the service that carries a FIN:
/// the server's FIN never arrives, while its data and ACKs do. Removed on drop.
struct FinsDropped<'bed> {
    client: &'bed Host,
    program: &'static str,
    rule: Vec<String>,
}

impl<'bed> FinsDropped<'bed> {
    fn insert(client: &'bed Host, service: SocketAddr) -> Result<Self> {
        let program = if service.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        let (ip, port) = (service.ip().to_string(), service.port().to_string());
        let rule = ["INPUT", "-p", "tcp", "-s", &ip, "--sport", &port]
            .into_iter()
            .chain(["--tcp-flags", "FIN", "FIN", "-j", "DROP"])
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let status = client.command(program)?.arg("-I").args(&rule).status()?;
        ensure!(status.success(), "{program} -I {rule:?} in {client}");
        Ok(Self {
            client,
            program,
            rule,
        })
    }
}

impl Drop for FinsDropped<'_> {
    fn drop(&mut self) {
        if let Ok(mut cmd) = self.client.command(self.program) {
            let _ = cmd.arg("-D").args(&self.rule).status();
        }
    }
}

/// CLOSING with our FIN sent and lost (the other CLOSING cases hold it back behind a full
/// queue): the client host drops the server's FIN, the server shuts down, then the client, whose
/// FIN the server takes in FIN_WAIT1. The client sits in FIN_WAIT2 (its FIN acknowledged, ours
/// never seen), the server in CLOSING with everything sent. Moved, then the rule lifted: the
/// destination's FIN goes again and the client reads every byte, then the end of the stream; the
/// destination reads the client's bytes and its end of stream. No reset anywhere.
fn closing_fin_lost(ipv6: bool, port: u16) -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), port);
    let mut pairs = connect(&bed, service, 1)?;
    let pair = &mut pairs[0];
    let client = pair.client_addr()?;
    let (c2s, s2c) = (Direction::ClientToServer, Direction::ServerToClient);
    pair.to_server = write_stream(&pair.client, client, c2s, 0, Some(5 * SMALL))?;
    pair.to_client = write_stream(&pair.server, client, s2c, 0, Some(5 * SMALL))?;
    let dropped = FinsDropped::insert(bed.client(), service)?;
    pair.server.shutdown(Shutdown::Write)?;
    pair.client.shutdown(Shutdown::Write)?;
    wait_for_state(&pair.server, TcpState::Closing)?;
    wait_for_state(&pair.client, TcpState::FinWait2)?;
    let before = resets(&bed)?;
    let moved = support::move_sockets(&bed, service, &[pair.server.try_clone()?])?;
    let conn = &moved.connections[0];
    eprintln!(
        "{}: send queue {} bytes ({} never sent), receive queue {} bytes; restored in {}",
        conn.state,
        conn.send_queue.len(),
        conn.unsent,
        conn.recv_queue.len(),
        state_of(&moved.sockets[0])?
    );
    ensure!(conn.state == TcpState::Closing, "moved in {}", conn.state);
    ensure!(conn.unsent == 0, "{} bytes never sent", conn.unsent);
    drop(dropped);
    Half::Closing.finish(pair, &moved.sockets[0], 0)?;
    let after = resets(&bed)?;
    ensure!(after == before, "{} resets", after - before);
    Ok(())
}

#[test]
fn closing_fin_lost_moves_v4() -> Result<()> {
    closing_fin_lost(false, 7940)
}

#[test]
fn closing_fin_lost_moves_v6() -> Result<()> {
    closing_fin_lost(true, 7941)
}
