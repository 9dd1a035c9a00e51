//! Announcing that an address now lives behind this interface's MAC: a gratuitous ARP (IPv4) or
//! an unsolicited neighbour advertisement with the override flag (IPv6). Peers keep a REACHABLE
//! neighbour entry for the old owner otherwise, and the connections stall (docs/tcp-repair.md,
//! "Pitfalls": 0 of 1000 recovered without it). Frames are built here and sent on an AF_PACKET
//! socket bound to the interface, so nothing outside tcpmig (arping, ndisc6) is needed.
//!
//! Receivers (measured on kernel 6.18, tests/tests/net_plane.rs): a gratuitous ARP replaces the
//! MAC of an existing entry with the defaults (arp_accept=0 only stops it creating new entries); a
//! peer with net.ipv4.conf.*.drop_gratuitous_arp=1 ignores it. An unsolicited NA replaces it only
//! with the override flag, and not on a peer whose interface has drop_unsolicited_na=1 (a
//! per-interface setting: the `all` value is not consulted).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use netlink_packet_route::link::LinkLayerType;
use tracing::debug;

use super::{
    NetError, Netns,
    checksum::{fold, sum},
    rtnl::{Session, with_link},
};
use crate::sys::PacketSocket;

/// How many announcements [`super::move_address`] sends: one lost frame must not matter.
pub const ANNOUNCE_COUNT: u32 = 3;
/// Pause between two of them.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(30);
/// Most announcements one call sends: they exist to be quick, not to flood.
pub const MAX_ANNOUNCE_COUNT: u32 = 16;
/// Longest pause between two announcements.
pub const MAX_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);

const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet address of ff02::1, all nodes (RFC 2464: 33:33 + the low 32 bits).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const NA_FLAG_OVERRIDE: u8 = 0x20;
const ND_OPT_TARGET_LL_ADDR: u8 = 2;

/// Sends `count` announcements of `addr` on `dev` in `netns`, `interval` apart: gratuitous ARP
/// for IPv4, unsolicited neighbour advertisement (override set, to ff02::1) for IPv6. Refuses an
/// address that `dev` does not hold, so tcpmig never claims someone else's address.
pub fn announce(
    netns: &Netns,
    dev: &str,
    addr: IpAddr,
    count: u32,
    interval: Duration,
) -> Result<(), NetError> {
    if count == 0 || count > MAX_ANNOUNCE_COUNT || interval > MAX_ANNOUNCE_INTERVAL {
        return Err(NetError::InvalidAnnounce { count, interval });
    }
    with_link(netns, dev, |session| {
        if !session.addresses()?.iter().any(|&(held, _)| held == addr) {
            return Err(NetError::NotOnInterface {
                netns: netns.to_string(),
                dev: dev.to_owned(),
                addr,
            });
        }
        Announcer::open_here(session, addr)?.send(count, interval)
    })
}

/// A packet socket on the interface and the frame announcing one address on it.
pub(super) struct Announcer {
    socket: PacketSocket,
    frame: Vec<u8>,
    netns: String,
    dev: String,
    addr: IpAddr,
}

/// The index and MAC of Ethernet interface `dev` in `netns`: where a frame for another host
/// on its segment leaves, and its source address.
pub fn ethernet_link(netns: &Netns, dev: &str) -> Result<(u32, [u8; 6]), NetError> {
    with_link(netns, dev, |session| {
        Ok((session.link.index, ethernet_mac(session)?))
    })
}

/// The session's interface's MAC; an error if it is not Ethernet.
fn ethernet_mac(session: &Session<'_>) -> Result<[u8; 6], NetError> {
    let link = &session.link;
    match link.mac {
        Some(mac) if link.link_type == LinkLayerType::Ether => Ok(mac),
        _ => Err(NetError::NotEthernet {
            netns: session.netns.to_string(),
            dev: session.dev.to_owned(),
            link_type: link.link_type,
        }),
    }
}

impl Announcer {
    /// Builds the frame from the interface's MAC and binds the socket; the calling thread must
    /// be in the session's namespace (a packet socket belongs to the one it was made in).
    pub(super) fn open_here(session: &Session<'_>, addr: IpAddr) -> Result<Self, NetError> {
        let (netns, dev) = (session.netns.to_string(), session.dev.to_owned());
        let link = &session.link;
        let mac = ethernet_mac(session)?;
        let (frame, ethertype, destination) = match addr {
            IpAddr::V4(ip) => (gratuitous_arp(mac, ip), ETH_P_ARP, BROADCAST),
            IpAddr::V6(ip) => (neighbour_advertisement(mac, ip), ETH_P_IPV6, ALL_NODES_MAC),
        };
        match PacketSocket::bind(link.index, ethertype, destination) {
            Ok(socket) => Ok(Self {
                socket,
                frame,
                netns,
                dev,
                addr,
            }),
            Err(source) => Err(NetError::Send {
                netns,
                dev,
                addr,
                source,
            }),
        }
    }

    /// Sends `count` announcements, `interval` apart.
    pub(super) fn send(&self, count: u32, interval: Duration) -> Result<(), NetError> {
        for round in 0..count {
            if round > 0 {
                std::thread::sleep(interval);
            }
            self.socket
                .send(&self.frame)
                .map_err(|source| NetError::Send {
                    netns: self.netns.clone(),
                    dev: self.dev.clone(),
                    addr: self.addr,
                    source,
                })?;
        }
        debug!(netns = self.netns, dev = self.dev, addr = %self.addr, count, ?interval, "address announced");
        Ok(())
    }
}

/// ARP request with sender = target = `ip`, broadcast: how Linux itself announces (arp_notify),
/// and what peers accept to update an existing entry whatever net.ipv4.conf.*.arp_accept says.
fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = ethernet_header(BROADCAST, mac, ETH_P_ARP);
    frame.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame.extend_from_slice(&[6, 4]); // address lengths
    frame.extend_from_slice(&1u16.to_be_bytes()); // ARPOP_REQUEST
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]); // target MAC unknown, as the kernel sends it
    frame.extend_from_slice(&ip.octets());
    frame
}

/// Unsolicited neighbour advertisement (RFC 4861 7.2.6) from `ip` to ff02::1, hop limit 255
/// (receivers drop any other), override flag set so that existing entries take the new MAC,
/// with the target link-layer address option.
fn neighbour_advertisement(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, NA_FLAG_OVERRIDE, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]); // length in units of 8 bytes
    icmp.extend_from_slice(&mac);
    let checksum = icmpv6_checksum(ip, all_nodes, &icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = ethernet_header(ALL_NODES_MAC, mac, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class or flow label
    let payload_len = u16::try_from(icmp.len()).expect("a neighbour advertisement is 32 bytes");
    frame.extend_from_slice(&payload_len.to_be_bytes());
    frame.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&all_nodes.octets());
    frame.extend_from_slice(&icmp);
    frame
}

fn ethernet_header(destination: [u8; 6], source: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(128);
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// Internet checksum of `message` over the IPv6 pseudo-header (RFC 8200 8.1). A message that
/// already carries its correct checksum sums to 0.
fn icmpv6_checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    let length = u32::try_from(message.len()).expect("an ICMPv6 message fits in a u32");
    let pseudo_header = [
        &source.octets()[..],
        &destination.octets(),
        &length.to_be_bytes(),
        &[0, 0, 0, IPPROTO_ICMPV6],
    ]
    .concat();
    !fold(sum(&pseudo_header) + sum(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x2a];

    #[test]
    fn gratuitous_arp_names_the_address_twice() {
        let ip = Ipv4Addr::new(198, 18, 0, 7);
        let frame = gratuitous_arp(MAC, ip);
        assert_eq!(frame.len(), 42);
        assert_eq!(&frame[0..6], &BROADCAST);
        assert_eq!(&frame[22..28], &MAC);
        assert_eq!(&frame[28..32], &ip.octets());
        assert_eq!(&frame[38..42], &ip.octets());
    }

    #[test]
    fn neighbour_advertisement_checksum_verifies() {
        let ip: Ipv6Addr = "fd54:636d::7".parse().unwrap();
        let frame = neighbour_advertisement(MAC, ip);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(frame[21], 255, "hop limit");
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        assert_eq!(icmpv6_checksum(ip, all_nodes, &frame[54..]), 0);
        assert_eq!(&frame[80..86], &MAC, "target link-layer address option");
    }
}
