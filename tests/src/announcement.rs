//! The address announcements in a capture ([`Capture::stop_raw`](crate::Capture::stop_raw)):
//! gratuitous ARPs and neighbour advertisements, read from the frames themselves so that a test
//! checks what the peers got (MACs, flags), not a printer's summary of it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, ensure};

/// One frame claiming that an address lives behind a MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub address: IpAddr,
    /// The frame's Ethernet source, as `ip link` prints a MAC (`02:54:...`).
    pub from: String,
    /// The MAC the message gives for the address: the ARP sender's, or the NA's target
    /// link-layer address option (None without one).
    pub mac: Option<String>,
    /// The NA's flags; None for an ARP.
    pub flags: Option<NaFlags>,
}

/// The flags of a neighbour advertisement (RFC 4861 4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NaFlags {
    pub router: bool,
    pub solicited: bool,
    pub overriding: bool,
}

const LINKTYPE_ETHERNET: u32 = 1;
const ETH_HEADER: usize = 14;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HEADER: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_TARGET_LL_ADDR: u8 = 2;

/// Every gratuitous ARP (sender address = target address) and every neighbour advertisement in
/// `pcap`, a classic pcap file of Ethernet frames as tcpdump writes it on this host.
pub fn announcements(pcap: &[u8]) -> Result<Vec<Announcement>> {
    Ok(frames(pcap)?.into_iter().filter_map(announcement).collect())
}

/// The frames of a pcap file in this host's byte order (tcpdump writes it so).
fn frames(pcap: &[u8]) -> Result<Vec<&[u8]>> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(pcap.get(at..at + 4)?.try_into().ok()?))
    };
    // Microsecond or nanosecond timestamps.
    ensure!(
        matches!(word(0), Some(0xa1b2_c3d4 | 0xa1b2_3c4d)),
        "not a pcap file of this byte order"
    );
    ensure!(
        word(20) == Some(LINKTYPE_ETHERNET),
        "not an Ethernet capture"
    );
    let mut frames = Vec::new();
    let mut at = 24;
    while at < pcap.len() {
        let length = word(at + 8).map(|n| n as usize);
        let frame = length.and_then(|n| pcap.get(at + 16..at + 16 + n));
        let Some(frame) = frame else {
            anyhow::bail!("a truncated record at byte {at}");
        };
        frames.push(frame);
        at += 16 + frame.len();
    }
    Ok(frames)
}

fn announcement(frame: &[u8]) -> Option<Announcement> {
    let from = mac(frame.get(6..12)?);
    let payload = frame.get(ETH_HEADER..)?;
    match u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?) {
        ETH_P_ARP => gratuitous_arp(payload, from),
        ETH_P_IPV6 => neighbour_advertisement(payload, from),
        _ => None,
    }
}

/// An ARP for Ethernet and IPv4 whose sender and target addresses are the same.
fn gratuitous_arp(arp: &[u8], from: String) -> Option<Announcement> {
    let sender: [u8; 4] = arp.get(14..18)?.try_into().ok()?;
    let target: [u8; 4] = arp.get(24..28)?.try_into().ok()?;
    (arp.get(..6)? == [0, 1, 8, 0, 6, 4] && sender == target).then(|| Announcement {
        address: Ipv4Addr::from(sender).into(),
        from,
        mac: Some(mac(&arp[8..14])),
        flags: None,
    })
}

/// An ICMPv6 neighbour advertisement right after the IPv6 header.
fn neighbour_advertisement(ip: &[u8], from: String) -> Option<Announcement> {
    let icmp = ip.get(IPV6_HEADER..)?;
    if ip.get(6) != Some(&IPPROTO_ICMPV6) || icmp.first() != Some(&ND_NEIGHBOR_ADVERT) {
        return None;
    }
    let bits = *icmp.get(4)?;
    let target: [u8; 16] = icmp.get(8..24)?.try_into().ok()?;
    // Options: type, length in units of 8 bytes, value.
    let mut options = icmp.get(24..)?;
    let mut target_mac = None;
    while let [kind, units, ..] = *options {
        let length = usize::from(units) * 8;
        if length == 0 || options.len() < length {
            break;
        }
        if kind == ND_OPT_TARGET_LL_ADDR && length >= 8 {
            target_mac = Some(mac(&options[2..8]));
        }
        options = &options[length..];
    }
    Some(Announcement {
        address: Ipv6Addr::from(target).into(),
        from,
        mac: target_mac,
        flags: Some(NaFlags {
            router: bits & 0x80 != 0,
            solicited: bits & 0x40 != 0,
            overriding: bits & 0x20 != 0,
        }),
    })
}

fn mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pcap file of `frames`, as tcpdump writes it here.
    fn pcap(frames: &[&[u8]]) -> Vec<u8> {
        let mut file = [
            0xa1b2_c3d4u32,
            0x0004_0002,
            0,
            0,
            262_144,
            LINKTYPE_ETHERNET,
        ]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect::<Vec<_>>();
        for frame in frames {
            let length = frame.len() as u32;
            for word in [0, 0, length, length] {
                file.extend_from_slice(&u32::to_ne_bytes(word));
            }
            file.extend_from_slice(frame);
        }
        file
    }

    const MAC: [u8; 6] = [2, 0x54, 0, 0, 0, 3];

    #[test]
    fn reads_a_gratuitous_arp_and_skips_a_request() {
        let arp = |sender: [u8; 4], target: [u8; 4]| {
            let mut frame = [[0xff; 6], MAC].concat();
            frame.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
            frame.extend_from_slice(&MAC);
            frame.extend_from_slice(&sender);
            frame.extend_from_slice(&[0; 6]);
            frame.extend_from_slice(&target);
            frame
        };
        let gratuitous = arp([198, 18, 0, 100], [198, 18, 0, 100]);
        let request = arp([198, 18, 0, 1], [198, 18, 0, 100]);
        let seen = announcements(&pcap(&[&request, &gratuitous])).unwrap();
        assert_eq!(
            seen,
            [Announcement {
                address: "198.18.0.100".parse().unwrap(),
                from: "02:54:00:00:00:03".into(),
                mac: Some("02:54:00:00:00:03".into()),
                flags: None,
            }]
        );
    }

    #[test]
    fn reads_a_neighbour_advertisement() {
        let target: Ipv6Addr = "fd54:636d::100".parse().unwrap();
        let mut frame = [[0x33, 0x33, 0, 0, 0, 1], MAC].concat();
        frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, IPPROTO_ICMPV6, 255]);
        frame.extend_from_slice(&[0; 32]); // addresses: not read
        frame.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0, 0x20, 0, 0, 0]);
        frame.extend_from_slice(&target.octets());
        frame.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]);
        frame.extend_from_slice(&MAC);
        let seen = announcements(&pcap(&[&frame])).unwrap();
        let flags = NaFlags {
            router: false,
            solicited: false,
            overriding: true,
        };
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].address, IpAddr::from(target));
        assert_eq!(seen[0].mac.as_deref(), Some("02:54:00:00:00:03"));
        assert_eq!(seen[0].flags, Some(flags));
    }
}
