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
    CRIU_SKB_MARK, Counter, FreezeValue, MAX_SERVICES, MAX_TUPLES, SCOPE_NEW_CONNECTIONS,
    ServiceKey, TupleKey,
};
use segment::{Direction, TCP_FLAG_ACK, TCP_FLAG_SYN, parse};

#[allow(
    dead_code,
    reason = "shared with the steering, which looks at FIN and RST too"
)]
mod segment;

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, FreezeValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "TUPLES")]
static TUPLES: HashMap<TupleKey, FreezeValue> = HashMap::pinned(MAX_TUPLES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

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
