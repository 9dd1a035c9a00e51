//! The destination's side of a hold: the held packets go into this host's own stack through a
//! raw IP socket (IPPROTO_RAW: the packet is sent whole, source address included). Sent to a local
//! address, it is routed through the loopback device with its route already attached, so it
//! reaches TCP as if it had just arrived from the client (no reverse-path check, no freeze on
//! the way), and the reply (ACK, SYN-ACK) leaves by the usual route.
//!
//! Checksums are recomputed first: a frame captured on a veth may carry only the partial
//! checksum of offload, which the loopback path would then check and reject.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto,
    socket,
};
use serde::{Deserialize, Serialize};

use super::HoldError;
use crate::{net::Netns, tuple::Addresses};

const IPPROTO_TCP: u8 = 6;

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Packets handed to the stack.
    pub replayed: u64,
    /// Packets that were not IP/TCP of the service's family, or that the socket refused, and the
    /// first reason.
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl ReplayReport {
    /// Adds the counts of another replay (the first failure stays the first).
    pub fn absorb(&mut self, other: ReplayReport) {
        self.replayed += other.replayed;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

/// Raw sockets in the destination's namespace, one per family of the services, opened before the
/// blackout.
pub struct Replayer {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
    /// The only destinations it sends to: the held packets come from the source over the link,
    /// and an authenticated source must still not make these raw sockets send anything else.
    services: Vec<SocketAddr>,
}

impl Replayer {
    /// Opens a socket for each family of `services` in `netns` (both, for a dual-stack service).
    pub fn open(netns: &Netns, services: &[SocketAddr]) -> Result<Self, HoldError> {
        let open = |family| -> Result<OwnedFd, HoldError> {
            let flags = SockFlag::SOCK_CLOEXEC;
            let socket = netns.run(|| socket(family, SockType::Raw, flags, SockProtocol::Raw))?;
            socket.map_err(|errno| HoldError::ReplaySocket {
                netns: netns.to_string(),
                source: errno.into(),
            })
        };
        let any = |ipv4: bool| services.iter().any(|s| s.is_ipv4() == ipv4);
        Ok(Self {
            v4: any(true).then(|| open(AddressFamily::Inet)).transpose()?,
            v6: any(false).then(|| open(AddressFamily::Inet6)).transpose()?,
            services: services.to_vec(),
        })
    }

    /// Hands `packets` to the stack in their order.
    pub fn replay(&self, packets: &[&[u8]]) -> ReplayReport {
        let mut report = ReplayReport::default();
        let mut scratch = Vec::new();
        for packet in packets {
            scratch.clear();
            scratch.extend_from_slice(packet);
            match self.send_one(&mut scratch) {
                Ok(()) => report.replayed += 1,
                Err(reason) => {
                    report.failed += 1;
                    report.first_failure.get_or_insert(reason);
                }
            }
        }
        report
    }

    fn send_one(&self, packet: &mut [u8]) -> Result<(), String> {
        let destination = for_services(packet, &self.services)?;
        // A service's family has its socket: opened for each.
        let socket = |fd: &Option<OwnedFd>| fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
        let sent = match destination.ip() {
            IpAddr::V4(ip) => {
                let to = SockaddrIn::from(SocketAddrV4::new(ip, 0));
                sendto(socket(&self.v4), packet, &to, MsgFlags::empty())
            }
            IpAddr::V6(ip) => {
                let to = SockaddrIn6::from(SocketAddrV6::new(ip, 0, 0, 0));
                sendto(socket(&self.v6), packet, &to, MsgFlags::empty())
            }
        };
        sent.map(drop)
            .map_err(|errno| format!("replaying a segment to {destination}: {errno}"))
    }
}

/// Makes `packet` ready to send (see [`fix_checksums`]) if it is a TCP packet to one of
/// `services`, of its family (the IP version in its first byte).
fn for_services(packet: &mut [u8], services: &[SocketAddr]) -> Result<SocketAddr, String> {
    let ipv4 = packet.first().is_some_and(|b| b >> 4 == 4);
    let destination = fix_checksums(packet, ipv4)
        .ok_or_else(|| format!("a held packet of {} bytes is not TCP", packet.len()))?;
    if !services.contains(&destination) {
        return Err(format!(
            "a held packet to {destination} is not for the service {}: not replayed",
            Addresses(services)
        ));
    }
    Ok(destination)
}

/// Recomputes the TCP checksum (and IPv4's header checksum) of an IP packet of the expected
/// family; returns its destination address and port, or None when it is not a whole TCP packet.
fn fix_checksums(packet: &mut [u8], ipv4: bool) -> Option<SocketAddr> {
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

/// The ones'-complement sum of `bytes` as 16-bit big-endian words, not yet folded.
fn sum(bytes: &[u8]) -> u32 {
    let (words, rest) = bytes.as_chunks::<2>();
    let mut total: u32 = words
        .iter()
        .map(|&w| u32::from(u16::from_be_bytes(w)))
        .fold(0, u32::wrapping_add);
    if let [last] = rest {
        total = total.wrapping_add(u32::from(*last) << 8);
    }
    total
}

fn fold(mut total: u32) -> u16 {
    while total >> 16 != 0 {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
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
    fn only_packets_to_the_service_are_replayed() {
        let service: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(for_services(&mut SYN_V4.clone(), &[service]), Ok(service));
        let other_port = "10.0.0.2:22".parse().unwrap();
        let error = for_services(&mut SYN_V4.clone(), &[other_port]).unwrap_err();
        assert!(error.contains("not for the service 10.0.0.2:22"), "{error}");
        let mut elsewhere = SYN_V4;
        elsewhere[16..20].copy_from_slice(&[192, 0, 2, 1]);
        assert!(for_services(&mut elsewhere, &[service]).is_err());
        // A dual-stack service: either address.
        let dual = [other_port, "[fd00::2]:80".parse().unwrap(), service];
        assert_eq!(for_services(&mut SYN_V4.clone(), &dual), Ok(service));
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
