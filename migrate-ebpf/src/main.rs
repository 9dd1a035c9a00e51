//! Freeze programs: TC classifiers on ingress and egress of the service's interface.
//!
//! A packet is dropped when its TCP connection belongs to a frozen service (one map entry per
//! {address, port}, whatever the number of connections) or is a frozen 4-tuple, and the entry's
//! deadline has not passed. New SYNs to a frozen service are dropped silently, so the client
//! retries instead of seeing a reset. An entry of the new-connections scope drops only those
//! SYNs. Everything that is not TCP over IPv4/IPv6 passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use migrate_common::{
    CRIU_SKB_MARK, Counter, FAMILY_V4, FAMILY_V6, FreezeValue, MAX_SERVICES, MAX_TUPLES,
    SCOPE_NEW_CONNECTIONS, ServiceKey, TupleKey,
};

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, FreezeValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "TUPLES")]
static TUPLES: HashMap<TupleKey, FreezeValue> = HashMap::pinned(MAX_TUPLES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

#[classifier]
pub fn tcpmig_ingress(ctx: TcContext) -> i32 {
    decide(&ctx, Direction::Ingress)
}

#[classifier]
pub fn tcpmig_egress(ctx: TcContext) -> i32 {
    decide(&ctx, Direction::Egress)
}

#[inline(always)]
fn decide(ctx: &TcContext, direction: Direction) -> i32 {
    match classify(ctx, direction) {
        Some(Verdict::Drop(counter)) => {
            count(counter);
            TC_ACT_SHOT
        }
        Some(Verdict::PassExpired) => {
            count(Counter::PassedAfterDeadline);
            TC_ACT_OK
        }
        Some(Verdict::PassMarked) => {
            count(Counter::CriuMarkPassed);
            TC_ACT_OK
        }
        None => TC_ACT_OK,
    }
}

enum Verdict {
    Drop(Counter),
    PassExpired,
    PassMarked,
}

/// The TCP header fields the decision needs, with the connection seen from this host.
struct Segment {
    tuple: TupleKey,
    flags: u8,
}

#[inline(always)]
fn classify(ctx: &TcContext, direction: Direction) -> Option<Verdict> {
    let segment = parse(ctx, direction)?;
    let entry = lookup(&segment.tuple)?;
    // SAFETY: a helper with no arguments and no side effects.
    if unsafe { bpf_ktime_get_ns() } >= entry.deadline_ns {
        return Some(Verdict::PassExpired);
    }
    let syn = segment.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if entry.scope == SCOPE_NEW_CONNECTIONS && !(direction == Direction::Ingress && syn) {
        return None;
    }
    match direction {
        Direction::Ingress if syn => Some(Verdict::Drop(Counter::SynDropped)),
        Direction::Ingress => Some(Verdict::Drop(Counter::IngressDropped)),
        Direction::Egress if skb_mark(ctx) == CRIU_SKB_MARK => Some(Verdict::PassMarked),
        Direction::Egress => Some(Verdict::Drop(Counter::EgressDropped)),
    }
}

/// A frozen service covers every connection on its local address and port; otherwise the exact
/// 4-tuple must be frozen.
#[inline(always)]
fn lookup(tuple: &TupleKey) -> Option<FreezeValue> {
    let service = ServiceKey {
        addr: tuple.local_addr,
        port: tuple.local_port,
        family: tuple.family,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once, before anything could delete the entry.
    if let Some(value) = unsafe { SERVICES.get(&service) } {
        return Some(*value);
    }
    // SAFETY: as above.
    unsafe { TUPLES.get(tuple) }.copied()
}

#[inline(always)]
fn parse(ctx: &TcContext, direction: Direction) -> Option<Segment> {
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

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    // aya-ebpf has a setter for the mark but no getter; the context is a __sk_buff.
    // SAFETY: a TC program's context is a valid __sk_buff; the verifier checks the read.
    unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).mark }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a valid per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
