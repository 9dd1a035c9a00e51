//! TCP segments handed to this host's own stack through a raw IP socket (IPPROTO_RAW: the packet
//! is sent whole, source address included). Sent to a local address, a packet is routed through
//! the loopback device with its route already attached, so it reaches TCP as if it had just
//! arrived from its source (no reverse-path check, no freeze on the way), and never reaches the
//! wire. Two planes need this, so it lives here, below both: the hold's replay
//! ([`crate::freeze::hold::Replayer`]) and the peer's FIN of a restored half-closed connection
//! (`repair::restore`).
//!
//! Checksums are computed here, before each send: a frame captured on a veth may carry only the
//! partial checksum of offload, which the loopback path would then check and reject, and a
//! segment built by tcpmig is left with zero checksums.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto,
    socket,
};

use super::checksum::{fold, sum};

const IPPROTO_TCP: u8 = 6;

/// Why a segment was not handed to the stack.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("a packet of {len} bytes is not TCP over IP of the socket's family")]
    NotTcp { len: usize },
    #[error("a packet to {destination} is not for {allowed}: not sent")]
    Elsewhere {
        destination: SocketAddr,
        allowed: SocketAddr,
    },
    #[error("sending a segment to {destination}: {source}")]
    Send {
        destination: SocketAddr,
        source: io::Error,
    },
}

/// For callers that report bare I/O errors: a failed send is its OS error.
impl From<InjectError> for io::Error {
    fn from(error: InjectError) -> Self {
        match error {
            InjectError::Send { source, .. } => source,
            refused => io::Error::new(io::ErrorKind::InvalidInput, refused),
        }
    }
}

/// A raw IP socket that sends TCP segments to one local address and port only: the packets it
/// sends may come from elsewhere (the hold's come from the source over the link), and must not
/// make it send anything else.
#[derive(Debug)]
pub struct TcpInjector {
    socket: OwnedFd,
    to: SocketAddr,
}

impl TcpInjector {
    /// Opens the socket for `to`'s family in the current thread's network namespace (run it in
    /// another with [`Netns::run`](super::Netns::run)). Needs CAP_NET_RAW.
    pub fn open(to: SocketAddr) -> io::Result<Self> {
        let family = if to.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let flags = SockFlag::SOCK_CLOEXEC;
        let socket = socket(family, SockType::Raw, flags, SockProtocol::Raw)?;
        Ok(Self { socket, to })
    }

    /// The one address and port it sends to.
    pub fn to(&self) -> SocketAddr {
        self.to
    }

    /// Makes the checksums of `packet` (a whole IP packet) right and sends it, if it is a TCP
    /// segment to [`to`](Self::to).
    pub fn send(&self, packet: &mut [u8]) -> Result<(), InjectError> {
        let destination = checked_for(packet, self.to)?;
        let sent = match destination.ip() {
            IpAddr::V4(ip) => {
                let to = SockaddrIn::from(SocketAddrV4::new(ip, 0));
                sendto(self.socket.as_raw_fd(), packet, &to, MsgFlags::empty())
            }
            IpAddr::V6(ip) => {
                let to = SockaddrIn6::from(SocketAddrV6::new(ip, 0, 0, 0));
                sendto(self.socket.as_raw_fd(), packet, &to, MsgFlags::empty())
            }
        };
        sent.map(drop).map_err(|errno| InjectError::Send {
            destination,
            source: errno.into(),
        })
    }
}

/// Makes `packet` ready to send (see [`fix_checksums`]) if it is a TCP packet to `allowed`.
fn checked_for(packet: &mut [u8], allowed: SocketAddr) -> Result<SocketAddr, InjectError> {
    let len = packet.len();
    let destination =
        fix_checksums(packet, allowed.is_ipv4()).ok_or(InjectError::NotTcp { len })?;
    if destination != allowed {
        return Err(InjectError::Elsewhere {
            destination,
            allowed,
        });
    }
    Ok(destination)
}

/// The connection a TCP packet to a local socket belongs to: local = its destination, remote =
/// its source. None when it is not a whole IPv4 or IPv6 TCP packet.
pub(crate) fn tcp_tuple(packet: &[u8]) -> Option<crate::tuple::Tuple> {
    let (source, destination, header_len): (IpAddr, IpAddr, usize) = match *packet.first()? >> 4 {
        4 if packet.get(9) == Some(&IPPROTO_TCP) => {
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            (src.into(), dst.into(), usize::from(packet[0] & 0x0f) * 4)
        }
        6 if packet.get(6) == Some(&IPPROTO_TCP) => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            (src.into(), dst.into(), 40)
        }
        _ => return None,
    };
    let ports = packet.get(header_len..header_len + 4)?;
    Some(crate::tuple::Tuple {
        local: SocketAddr::new(destination, u16::from_be_bytes([ports[2], ports[3]])),
        remote: SocketAddr::new(source, u16::from_be_bytes([ports[0], ports[1]])),
    })
}

/// Recomputes the TCP checksum (and IPv4's header checksum) of an IP packet of the expected
/// family; returns its destination address and port, or None when it is not a whole TCP packet.
pub(crate) fn fix_checksums(packet: &mut [u8], ipv4: bool) -> Option<SocketAddr> {
    let (destination, header_len, pseudo) = if ipv4 {
        let header_len = usize::from(*packet.first()? & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
        if packet[0] >> 4 != 4 || header_len < 20 || total != packet.len() || packet[9] != 6 {
            return None;
        }
        let tcp_len = u16::try_from(total.checked_sub(header_len)?).ok()?;
        let mut pseudo = sum(&packet[12..20]);
        pseudo += u32::from(IPPROTO_TCP) + u32::from(tcp_len);
        packet[10..12].fill(0);
        let header = !fold(sum(&packet[..header_len]));
        packet[10..12].copy_from_slice(&header.to_be_bytes());
        let dst: [u8; 4] = packet[16..20].try_into().ok()?;
        (IpAddr::V4(Ipv4Addr::from(dst)), header_len, pseudo)
    } else {
        let payload = usize::from(u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]));
        if packet[0] >> 4 != 6
            || packet.get(6) != Some(&IPPROTO_TCP)
            || 40 + payload != packet.len()
        {
            return None;
        }
        let mut pseudo = sum(&packet[8..40]);
        pseudo += u32::from(IPPROTO_TCP) + u32::try_from(payload).ok()?;
        let dst: [u8; 16] = packet[24..40].try_into().ok()?;
        (IpAddr::V6(Ipv6Addr::from(dst)), 40, pseudo)
    };
    let tcp = packet.get_mut(header_len..)?;
    if tcp.len() < 20 {
        return None;
    }
    tcp[16..18].fill(0);
    let checksum = !fold(pseudo + sum(tcp));
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    Some(SocketAddr::new(
        destination,
        u16::from_be_bytes([tcp[2], tcp[3]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN from 10.0.0.1:40000 to 10.0.0.2:80 as the wire has it (checksums from a capture).
    const SYN_V4: [u8; 40] = [
        0x45, 0x00, 0x00, 0x28, 0x00, 0x01, 0x00, 0x00, 0x40, 0x06, 0x66, 0xcd, 10, 0, 0, 1, 10, 0,
        0, 2, 0x9c, 0x40, 0x00, 0x50, 0x00, 0x00, 0x30, 0x39, 0x00, 0x00, 0x00, 0x00, 0x50, 0x02,
        0xfa, 0xf0, 0x00, 0x00, 0x00, 0x00,
    ];

    fn verifies(packet: &[u8], header_len: usize, pseudo: u32) -> bool {
        fold(pseudo + sum(&packet[header_len..])) == 0xffff
    }

    #[test]
    fn ipv4_checksums_are_made_whole() {
        let mut packet = SYN_V4;
        // The offload leaves a partial checksum: anything.
        packet[36..38].copy_from_slice(&[0x12, 0x34]);
        packet[10..12].copy_from_slice(&[0, 0]);
        let to = fix_checksums(&mut packet, true).unwrap();
        assert_eq!(to, "10.0.0.2:80".parse::<SocketAddr>().unwrap());
        assert_eq!(fold(sum(&packet[..20])), 0xffff, "IPv4 header checksum");
        let pseudo = sum(&packet[12..20]) + 6 + 20;
        assert!(verifies(&packet, 20, pseudo), "TCP checksum");
        assert_eq!(&packet[10..12], &SYN_V4[10..12]);
    }

    #[test]
    fn a_packet_belongs_to_the_connection_of_its_destination() {
        let tuple = tcp_tuple(&SYN_V4).expect("a TCP packet");
        assert_eq!(tuple.local, "10.0.0.2:80".parse().unwrap());
        assert_eq!(tuple.remote, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(tcp_tuple(&SYN_V4[..22]), None);
    }

    #[test]
    fn only_packets_to_its_address_are_sent() {
        let service: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(checked_for(&mut SYN_V4.clone(), service).unwrap(), service);
        let other_port = "10.0.0.2:22".parse().unwrap();
        let error = checked_for(&mut SYN_V4.clone(), other_port).unwrap_err();
        assert!(
            matches!(error, InjectError::Elsewhere { allowed, .. } if allowed == other_port),
            "{error}"
        );
        let mut elsewhere = SYN_V4;
        elsewhere[16..20].copy_from_slice(&[192, 0, 2, 1]);
        assert!(checked_for(&mut elsewhere, service).is_err());
        let error = checked_for(&mut SYN_V4[..30].to_vec(), service).unwrap_err();
        assert!(matches!(error, InjectError::NotTcp { len: 30 }), "{error}");
    }

    #[test]
    fn ipv6_checksums_are_made_whole() {
        let mut packet = vec![0u8; 60];
        packet[0] = 0x60;
        packet[4..6].copy_from_slice(&20u16.to_be_bytes());
        packet[6] = 6;
        packet[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        packet[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        packet[40..42].copy_from_slice(&40000u16.to_be_bytes());
        packet[42..44].copy_from_slice(&443u16.to_be_bytes());
        packet[52] = 0x50;
        packet[53] = 0x02;
        let to = fix_checksums(&mut packet, false).unwrap();
        assert_eq!(to, "[fd00::2]:443".parse::<SocketAddr>().unwrap());
        let pseudo = sum(&packet[8..40]) + 6 + 20;
        assert!(verifies(&packet, 40, pseudo));
    }

    #[test]
    fn other_packets_are_refused() {
        let mut udp = SYN_V4;
        udp[9] = 17;
        assert_eq!(fix_checksums(&mut udp, true), None);
        let mut cut = SYN_V4[..30].to_vec();
        assert_eq!(fix_checksums(&mut cut, true), None);
        let mut v4 = SYN_V4;
        assert_eq!(fix_checksums(&mut v4, false), None, "wrong family");
        assert_eq!(fix_checksums(&mut [], true), None);
    }
}
