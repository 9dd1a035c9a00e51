//! The peer's FIN of a half-closed connection, given back to its restored socket. Repair mode
//! has no way to queue a FIN on the receive side (TCP_REPAIR_QUEUE takes data only), so, as CRIU
//! does, the restore sends the socket the segment the peer sent: FIN|ACK at the FIN's sequence
//! number, from the peer's address, on a raw socket. Sent once the service address is local
//! (the commit), it goes through loopback and never reaches the wire; the socket, still in repair
//! mode, takes it like any segment: the FIN ends its receive queue (the application reads the
//! queued bytes, then the end of the stream) and the state becomes CLOSE_WAIT.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    time::Duration,
};

use crate::{
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

/// The segment and the raw socket (made in the destination's namespace) that sends it.
pub(super) struct PeerFin {
    socket: OwnedFd,
    packet: Vec<u8>,
    to: SocketAddr,
}

impl std::fmt::Debug for PeerFin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerFin").field("to", &self.to).finish()
    }
}

impl PeerFin {
    pub(super) fn new(conn: &Connection, socket: OwnedFd) -> Self {
        Self {
            socket,
            packet: fin_packet(conn),
            to: SocketAddr::new(conn.tuple.local.ip(), 0),
        }
    }

    /// Sends the FIN to `fd` (in repair mode) and checks that it took it: CLOSE_WAIT.
    pub(super) fn deliver(&self, fd: BorrowedFd<'_>, tuple: Tuple) -> Result<(), RepairError> {
        let fail = |op| RepairError::socket(tuple, Phase::Commit, op);
        so::send_packet(self.socket.as_fd(), &self.packet, &self.to)
            .map_err(fail("sending the peer's FIN (raw socket)"))?;
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
/// with the peer's window (scaled as it sends it, so that taking it changes nothing), no options.
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
    let sum = checksum(&pseudo_header(from.ip(), to.ip()), &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
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

/// The pseudo-header of the TCP checksum: addresses, protocol, TCP length.
fn pseudo_header(from: IpAddr, to: IpAddr) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            p.extend_from_slice(&from.octets());
            p.extend_from_slice(&to.octets());
            p.extend_from_slice(&[0, PROTO_TCP]);
            p.extend_from_slice(&(TCP_HEADER as u16).to_be_bytes());
        }
        (from, to) => {
            p.extend_from_slice(&v6_octets(from));
            p.extend_from_slice(&v6_octets(to));
            p.extend_from_slice(&(TCP_HEADER as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, PROTO_TCP]);
        }
    }
    p
}

/// The Internet checksum (RFC 1071) of `a` then `b`, each of even length.
fn checksum(a: &[u8], b: &[u8]) -> u16 {
    let mut sum: u32 = a
        .chunks(2)
        .chain(b.chunks(2))
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::checksum;

    /// RFC 1071's example: the sum of 0001 f203 f4f5 f6f7 is ddf2, its complement 220d.
    #[test]
    fn checksum_is_rfc_1071s() {
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03], &[0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }
}
