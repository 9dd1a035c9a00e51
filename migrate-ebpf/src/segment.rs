//! The TCP segment a TC program sees, parsed from its Ethernet frame: the connection's 4-tuple
//! seen from this host, and the TCP flags. Shared by the freeze and the steering programs.
use aya_ebpf::programs::TcContext;
use migrate_common::{FAMILY_V4, FAMILY_V6, TupleKey};

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Which way the frame goes: on ingress the local end is the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The TCP header fields the decision needs, with the connection seen from this host.
pub struct Segment {
    pub tuple: TupleKey,
    pub flags: u8,
}

#[inline(always)]
pub fn parse(ctx: &TcContext, direction: Direction) -> Option<Segment> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (family, l4_offset) = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(ETH_HDR_LEN).ok()?;
            let frag: u16 = u16::from_be(ctx.load(ETH_HDR_LEN + 6).ok()?);
            let protocol: u8 = ctx.load(ETH_HDR_LEN + 9).ok()?;
            // Non-first fragments carry no TCP header.
            if protocol != IPPROTO_TCP || frag & 0x1fff != 0 {
                return None;
            }
            let s: [u8; 4] = ctx.load(ETH_HDR_LEN + 12).ok()?;
            let d: [u8; 4] = ctx.load(ETH_HDR_LEN + 16).ok()?;
            src[..4].copy_from_slice(&s);
            dst[..4].copy_from_slice(&d);
            (FAMILY_V4, ETH_HDR_LEN + usize::from(version_ihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            // Extension headers before TCP are not followed: such packets pass.
            let next_header: u8 = ctx.load(ETH_HDR_LEN + 6).ok()?;
            if next_header != IPPROTO_TCP {
                return None;
            }
            src = ctx.load(ETH_HDR_LEN + 8).ok()?;
            dst = ctx.load(ETH_HDR_LEN + 24).ok()?;
            (FAMILY_V6, ETH_HDR_LEN + 40)
        }
        _ => return None,
    };
    let sport = u16::from_be(ctx.load(l4_offset).ok()?);
    let dport = u16::from_be(ctx.load(l4_offset + 2).ok()?);
    let flags: u8 = ctx.load(l4_offset + 13).ok()?;
    let tuple = match direction {
        Direction::Ingress => TupleKey {
            local_addr: dst,
            remote_addr: src,
            local_port: dport,
            remote_port: sport,
            family,
            _pad: [0; 3],
        },
        Direction::Egress => TupleKey {
            local_addr: src,
            remote_addr: dst,
            local_port: sport,
            remote_port: dport,
            family,
            _pad: [0; 3],
        },
    };
    Some(Segment { tuple, flags })
}
