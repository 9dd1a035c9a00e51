//! The classic BPF filter of a hold: TCP segments to the service's addresses and ports (one
//! alternative each: a dual-stack service has an IPv4 and an IPv6 one), read from the network
//! header on (the capture socket is SOCK_DGRAM). The socket takes every protocol
//! (ETH_P_ALL): only those sockets see a frame before tc ingress, so the filter checks the
//! frame's protocol itself, in the kernel's ancillary data. Non-first IPv4 fragments carry no
//! TCP header and are not taken; IPv6 extension headers before TCP are not followed (the freeze
//! programs let those pass too). Before the freeze, while only new connections are held back,
//! the filter takes only SYNs (SYN set, ACK not).
use std::net::{IpAddr, SocketAddr};

const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
const LD_B_IND: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_IND) as u16;
const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const LDX_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const IPPROTO_TCP: u32 = 6;
const TCP_SYN: u32 = 0x02;
const TCP_ACK: u32 = 0x10;
/// Where classic BPF reads skb->protocol (SKF_AD_OFF + SKF_AD_PROTOCOL).
const SKB_PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
/// Whole frames: a GSO frame from a veth peer can be 64 KiB.
const ACCEPT_BYTES: u32 = 1 << 18;

/// A check that drops the frame when it fails (jumps are fixed up once the program is complete).
enum Step {
    Load(u16, u32),
    /// Continue when the accumulator equals `k`, else drop.
    Equal(u32),
    /// Drop when any bit of `k` is set in the accumulator.
    NoBits(u32),
    /// Keep only the bits of `k` in the accumulator.
    Mask(u32),
}

/// Which segments to the service a hold takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segments {
    /// Every one (the service is frozen).
    All,
    /// Only SYNs (only new connections are held back).
    Syns,
}

/// The filter program for `segments` to any of `services`: one block of checks per service, a
/// failed check trying the next block (the last one's, dropping the frame).
pub(super) fn services_filter(
    services: &[SocketAddr],
    segments: Segments,
) -> Vec<libc::sock_filter> {
    let blocks: Vec<Vec<Step>> = (services.iter())
        .map(|&service| service_steps(service, segments))
        .collect();
    assemble(&blocks)
}

/// The checks that a frame is one of `segments` to `service`.
fn service_steps(service: SocketAddr, segments: Segments) -> Vec<Step> {
    let port = u32::from(service.port());
    let mut steps = match service.ip() {
        IpAddr::V4(ip) => vec![
            Step::Load(LD_H_ABS, SKB_PROTOCOL),
            Step::Equal(ETH_P_IP),
            Step::Load(LD_B_ABS, 9),
            Step::Equal(IPPROTO_TCP),
            Step::Load(LD_H_ABS, 6),
            Step::NoBits(0x1fff),
            Step::Load(LD_W_ABS, 16),
            Step::Equal(u32::from(ip)),
            Step::Load(LDX_MSH, 0),
            Step::Load(LD_H_IND, 2),
            Step::Equal(port),
        ],
        IpAddr::V6(ip) => {
            let mut steps = vec![
                Step::Load(LD_H_ABS, SKB_PROTOCOL),
                Step::Equal(ETH_P_IPV6),
                Step::Load(LD_B_ABS, 6),
                Step::Equal(IPPROTO_TCP),
            ];
            for (k, word) in ip.octets().as_chunks::<4>().0.iter().enumerate() {
                let word = u32::from_be_bytes(*word);
                steps.push(Step::Load(LD_W_ABS, 24 + 4 * k as u32));
                steps.push(Step::Equal(word));
            }
            steps.push(Step::Load(LD_H_ABS, 40 + 2));
            steps.push(Step::Equal(port));
            steps
        }
    };
    if segments == Segments::Syns {
        // The flags byte, 13 into the TCP header (X still holds the IPv4 header's length).
        steps.push(match service.ip() {
            IpAddr::V4(_) => Step::Load(LD_B_IND, 13),
            IpAddr::V6(_) => Step::Load(LD_B_ABS, 40 + 13),
        });
        steps.push(Step::Mask(TCP_SYN | TCP_ACK));
        steps.push(Step::Equal(TCP_SYN));
    }
    steps
}

/// The blocks, each but the last followed by a jump to "accept", then "accept" and "drop": a
/// failed check jumps to the next block, or from the last block to "drop". No block: a program
/// that takes nothing.
fn assemble(blocks: &[Vec<Step>]) -> Vec<libc::sock_filter> {
    let instruction = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let drop = instruction(RET, 0, 0, 0);
    if blocks.is_empty() {
        return vec![drop];
    }
    let count: usize = blocks.iter().map(Vec::len).sum::<usize>() + blocks.len() - 1;
    let (accept_at, drop_at) = (count, count + 1);
    let mut program = Vec::with_capacity(count + 2);
    for (b, steps) in blocks.iter().enumerate() {
        let last = b + 1 == blocks.len();
        // Where a failed check goes: past this block and its jump.
        let next = if last {
            drop_at
        } else {
            program.len() + steps.len() + 1
        };
        for step in steps {
            // Jumps count from the instruction after this one.
            let to_next = u8::try_from(next - program.len() - 1).expect("filters are short");
            program.push(match *step {
                Step::Load(code, k) => instruction(code, 0, 0, k),
                Step::Equal(k) => instruction(JEQ, 0, to_next, k),
                Step::NoBits(k) => instruction(JSET, to_next, 0, k),
                Step::Mask(k) => instruction(AND, 0, 0, k),
            });
        }
        if !last {
            let to_accept = (accept_at - program.len() - 1) as u32;
            program.push(instruction(JA, 0, 0, to_accept));
        }
    }
    program.push(instruction(RET, 0, 0, ACCEPT_BYTES));
    program.push(drop);
    program
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program the way the kernel does, on the instructions it uses, for a frame of
    /// `protocol`.
    fn run(program: &[libc::sock_filter], protocol: u32, packet: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |at: usize, size: usize| -> Option<u32> {
            if at == SKB_PROTOCOL as usize {
                return Some(protocol);
            }
            let bytes = packet.get(at..at + size)?;
            Some(bytes.iter().fold(0, |v, &b| (v << 8) | u32::from(b)))
        };
        loop {
            let i = program[pc];
            pc += 1;
            match i.code {
                LD_B_ABS => a = load(i.k as usize, 1).unwrap_or_default(),
                LD_H_ABS => a = load(i.k as usize, 2).unwrap_or_default(),
                LD_W_ABS => a = load(i.k as usize, 4).unwrap_or_default(),
                LD_H_IND => a = load((x + i.k) as usize, 2).unwrap_or_default(),
                LD_B_IND => a = load((x + i.k) as usize, 1).unwrap_or_default(),
                AND => a &= i.k,
                LDX_MSH => x = 4 * (load(i.k as usize, 1).unwrap_or_default() & 0xf),
                JEQ => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                JSET => pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf }),
                JA => pc += i.k as usize,
                RET => return i.k,
                other => panic!("instruction {other:#x}"),
            }
        }
    }

    fn ipv4_tcp(dst: [u8; 4], dport: u16, frag: u16, proto: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn ipv4_takes_only_segments_to_the_service() {
        let filter = services_filter(&["10.0.0.2:80".parse().unwrap()], Segments::All);
        assert_eq!(
            run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 2], 80, 0, 6)),
            ACCEPT_BYTES
        );
        // Don't-fragment set: still taken.
        assert_eq!(
            run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 2], 80, 0x4000, 6)),
            ACCEPT_BYTES
        );
        assert_eq!(
            run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 2], 81, 0, 6)),
            0
        );
        assert_eq!(
            run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 3], 80, 0, 6)),
            0
        );
        assert_eq!(
            run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 2], 80, 0, 17)),
            0
        );
        assert_eq!(
            run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 2], 80, 0x0010, 6)),
            0
        );
        // IP options move the TCP header.
        let mut options = ipv4_tcp([10, 0, 0, 2], 80, 0, 6);
        options[0] = 0x46;
        options.splice(20..20, [1, 1, 1, 0]);
        assert_eq!(run(&filter, ETH_P_IP, &options), ACCEPT_BYTES);
        // The same bytes in a frame of another protocol (ARP, say).
        assert_eq!(run(&filter, 0x0806, &ipv4_tcp([10, 0, 0, 2], 80, 0, 6)), 0);
    }

    #[test]
    fn ipv6_takes_only_segments_to_the_service() {
        let filter = services_filter(&["[fd00::2]:443".parse().unwrap()], Segments::All);
        let packet = |dst: &str, next: u8, dport: u16| {
            let mut p = vec![0u8; 60];
            p[0] = 0x60;
            p[6] = next;
            let dst: std::net::Ipv6Addr = dst.parse().unwrap();
            p[24..40].copy_from_slice(&dst.octets());
            p[42..44].copy_from_slice(&dport.to_be_bytes());
            p
        };
        assert_eq!(
            run(&filter, ETH_P_IPV6, &packet("fd00::2", 6, 443)),
            ACCEPT_BYTES
        );
        assert_eq!(run(&filter, ETH_P_IPV6, &packet("fd00::3", 6, 443)), 0);
        assert_eq!(run(&filter, ETH_P_IPV6, &packet("fd00::2", 6, 80)), 0);
        assert_eq!(run(&filter, ETH_P_IPV6, &packet("fd00::2", 17, 443)), 0);
        assert_eq!(run(&filter, ETH_P_IP, &packet("fd00::2", 6, 443)), 0);
    }

    #[test]
    fn before_the_freeze_only_syns_are_taken() {
        let syn_only = |flags: u8, options: bool| {
            let mut p = ipv4_tcp([10, 0, 0, 2], 80, 0, 6);
            p[33] = flags;
            if options {
                p[0] = 0x46;
                p.splice(20..20, [1, 1, 1, 0]);
            }
            let filter = services_filter(&["10.0.0.2:80".parse().unwrap()], Segments::Syns);
            run(&filter, ETH_P_IP, &p)
        };
        assert_eq!(syn_only(0x02, false), ACCEPT_BYTES);
        assert_eq!(syn_only(0x02, true), ACCEPT_BYTES);
        // SYN-ACK, ACK, data, FIN: not new connections.
        for flags in [0x12, 0x10, 0x18, 0x11] {
            assert_eq!(syn_only(flags, false), 0, "flags {flags:#x}");
        }
        let filter = services_filter(&["[fd00::2]:443".parse().unwrap()], Segments::Syns);
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[6] = 6;
        p[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p[42..44].copy_from_slice(&443u16.to_be_bytes());
        p[53] = 0x02;
        assert_eq!(run(&filter, ETH_P_IPV6, &p), ACCEPT_BYTES);
        p[53] = 0x10;
        assert_eq!(run(&filter, ETH_P_IPV6, &p), 0);
    }

    /// A dual-stack service: segments to either address and port are taken, each only on its
    /// own port, in both orders of the blocks.
    #[test]
    fn several_services_take_the_segments_of_each() {
        let v4: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:443".parse().unwrap();
        let mut p6 = vec![0u8; 60];
        p6[0] = 0x60;
        p6[6] = 6;
        p6[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p6[42..44].copy_from_slice(&443u16.to_be_bytes());
        for services in [[v4, v6], [v6, v4]] {
            let filter = services_filter(&services, Segments::All);
            let v4_to = |port| run(&filter, ETH_P_IP, &ipv4_tcp([10, 0, 0, 2], port, 0, 6));
            assert_eq!(v4_to(80), ACCEPT_BYTES);
            assert_eq!(v4_to(443), 0);
            assert_eq!(run(&filter, ETH_P_IPV6, &p6), ACCEPT_BYTES);
            let mut other = p6.clone();
            other[42..44].copy_from_slice(&80u16.to_be_bytes());
            assert_eq!(run(&filter, ETH_P_IPV6, &other), 0);
            assert_eq!(run(&filter, 0x0806, &p6), 0);
        }
        assert_eq!(run(&services_filter(&[], Segments::All), ETH_P_IP, &p6), 0);
    }
}
