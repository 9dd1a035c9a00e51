//! The peer's FIN of a half-closed connection, given back to its restored socket. Repair mode
//! has no way to queue a FIN on the receive side (TCP_REPAIR_QUEUE takes data only), so, as CRIU
//! does, the restore sends the socket the segment the peer sent: FIN|ACK at the FIN's sequence
//! number, from the peer's address, on a raw socket ([`TcpInjector`], the one the hold's replay
//! uses, which also computes the segment's checksums). Sent once the service address is local
//! (the commit), it goes through loopback and never reaches the wire; the socket, still in repair
//! mode, takes it like any segment: the FIN ends its receive queue (the application reads the
//! queued bytes, then the end of the stream) and the state becomes CLOSE_WAIT.
use std::{io, net::IpAddr, os::fd::BorrowedFd, time::Duration};

use crate::{
    net::TcpInjector,
    repair::{Connection, Phase, RepairError, TcpState},
    sys::tcp_repair as so,
    tuple::Tuple,
};

const TCP_HEADER: usize = 20;
const FIN: u8 = 0x01;
const ACK: u8 = 0x10;
const PROTO_TCP: u8 = 6;
/// How many times the commit looks for the FIN taken, 1 ms apart: loopback delivers it before
/// the send returns, as a rule.
const CHECKS: u32 = 50;

/// The segment and the raw socket (made in the destination's namespace, for the connection's
/// local address) that sends it.
pub(super) struct PeerFin {
    injector: TcpInjector,
    /// Checksums left zero: the injector computes them.
    packet: Vec<u8>,
}

impl std::fmt::Debug for PeerFin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerFin")
            .field("to", &self.injector.to())
            .finish()
    }
}

impl PeerFin {
    /// `injector` is opened for `conn`'s local address: it sends nothing else.
    pub(super) fn new(conn: &Connection, injector: TcpInjector) -> Self {
        Self {
            injector,
            packet: fin_packet(conn),
        }
    }

    /// Sends the FIN to `fd` (in repair mode) and checks that it took it: CLOSE_WAIT.
    pub(super) fn deliver(&self, fd: BorrowedFd<'_>, tuple: Tuple) -> Result<(), RepairError> {
        let fail = |op| RepairError::socket(tuple, Phase::Commit, op);
        let mut packet = self.packet.clone();
        self.injector
            .send(&mut packet)
            .map_err(|error| fail("sending the peer's FIN (raw socket)")(io::Error::from(error)))?;
        for _ in 0..CHECKS {
            let state = so::tcp_info(fd).map_err(fail("TCP_INFO"))?.tcpi_state;
            if TcpState::from_kernel(state) == TcpState::CloseWait {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(RepairError::PeerFinNotTaken { tuple })
    }
}

/// The peer's FIN|ACK as an IP packet: sequence number the FIN's, acknowledging our snd_una,
/// with the peer's window (scaled as it sends it, so that taking it changes nothing), no options;
/// checksums zero.
fn fin_packet(conn: &Connection) -> Vec<u8> {
    let (from, to) = (conn.tuple.remote, conn.tuple.local);
    let snd_una = conn.send_seq.wrapping_sub(conn.send_queue.len() as u32);
    let shift = conn.negotiated.wscale.map_or(0, |(snd, _)| snd);
    let window = (conn.window.snd_wnd >> shift).min(u32::from(u16::MAX)) as u16;
    let mut tcp = [0u8; TCP_HEADER];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&conn.recv_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&snd_una.to_be_bytes());
    tcp[12] = ((TCP_HEADER / 4) as u8) << 4;
    tcp[13] = FIN | ACK;
    tcp[14..16].copy_from_slice(&window.to_be_bytes());
    let mut packet = ip_header(from.ip(), to.ip());
    packet.extend_from_slice(&tcp);
    packet
}

/// An IPv4 header (the kernel fills in its checksum and id) or an IPv6 one, for a TCP header
/// alone.
fn ip_header(from: IpAddr, to: IpAddr) -> Vec<u8> {
    match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0];
            h[2..4].copy_from_slice(&(20 + TCP_HEADER as u16).to_be_bytes());
            h.extend_from_slice(&from.octets());
            h.extend_from_slice(&to.octets());
            h
        }
        (from, to) => {
            let mut h = vec![0x60, 0, 0, 0, 0, TCP_HEADER as u8, PROTO_TCP, 64];
            h.extend_from_slice(&v6_octets(from));
            h.extend_from_slice(&v6_octets(to));
            h
        }
    }
}

fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::repair::{Negotiated, RepairWindow, SocketOptions};

    fn half_closed(local: &str, remote: &str) -> Connection {
        Connection {
            tuple: Tuple {
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
            },
            state: TcpState::CloseWait,
            send_seq: 1000,
            recv_seq: 77,
            window: RepairWindow {
                snd_wnd: 1 << 16,
                ..RepairWindow::default()
            },
            negotiated: Negotiated {
                wscale: Some((2, 7)),
                ..Negotiated::default()
            },
            timestamp: 0,
            options: SocketOptions::default(),
            send_queue: Bytes::from_static(b"abc"),
            unsent: 0,
            recv_queue: Bytes::new(),
        }
    }

    /// The FIN comes from the peer at the FIN's sequence number, acknowledges our snd_una, and
    /// carries the window as the peer scales it; checksums are left to the injector.
    #[test]
    fn fin_is_the_peers() {
        let pairs = [
            ("10.0.0.1:80", "10.0.0.2:40000", 20),
            ("[fd00::1]:443", "[fd00::2]:5", 40),
        ];
        for (local, remote, ip_len) in pairs {
            let conn = half_closed(local, remote);
            let packet = fin_packet(&conn);
            assert_eq!(packet.len(), ip_len + TCP_HEADER, "{local}");
            let tcp = &packet[ip_len..];
            let word = |at: usize| u32::from_be_bytes(tcp[at..at + 4].try_into().unwrap());
            assert_eq!(tcp[0..2], conn.tuple.remote.port().to_be_bytes());
            assert_eq!(tcp[2..4], conn.tuple.local.port().to_be_bytes());
            assert_eq!((word(4), word(8)), (77, 997), "seq, ack");
            assert_eq!(tcp[13], FIN | ACK);
            assert_eq!(tcp[14..16], (1u16 << 14).to_be_bytes(), "window >> wscale");
            assert_eq!(tcp[16..18], [0, 0], "checksum");
        }
    }
}
