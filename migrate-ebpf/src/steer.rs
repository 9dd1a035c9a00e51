//! The steering program: a TC classifier on the ingress of the source's interface that forwards
//! the segments of connections moved to another host (a rebalance keeps the service address
//! here, so their clients keep sending here). A moved connection's frame gets the destination
//! host's MAC, this host's as its source, and leaves by the same interface; every other frame
//! goes on to the next program (the freeze) and the stack. One map entry per moved connection,
//! added and removed by user space; the program counts the segments and notes FIN and RST.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use migrate_common::{MAX_STEERED, SteerValue, TupleKey};
use segment::{Direction, TCP_FLAG_FIN, TCP_FLAG_RST, parse};

#[allow(
    dead_code,
    reason = "shared with the freeze, which parses egress frames and SYNs too"
)]
mod segment;

#[map(name = "STEER")]
static STEER: HashMap<TupleKey, SteerValue> = HashMap::pinned(MAX_STEERED, 0);

#[classifier]
pub fn tcpmig_steer(ctx: TcContext) -> i32 {
    // TC_ACT_UNSPEC is tcx's "next": the freeze after us still sees what we do not forward.
    steer(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[inline(always)]
fn steer(ctx: &TcContext) -> Option<i32> {
    let segment = parse(ctx, Direction::Ingress)?;
    let entry = STEER.get_ptr_mut(&segment.tuple)?;
    // SAFETY: a pointer into the map's value, valid while this program runs; concurrent
    // updates from other CPUs may lose a count, which is only statistics.
    let (dst_mac, src_mac, ifindex) = unsafe {
        (*entry).packets += 1;
        (*entry).last_ns = bpf_ktime_get_ns();
        (*entry).flags_seen |= u32::from(segment.flags & (TCP_FLAG_FIN | TCP_FLAG_RST));
        ((*entry).dst_mac, (*entry).src_mac, (*entry).ifindex)
    };
    ctx.store(0, &dst_mac, 0).ok()?;
    ctx.store(6, &src_mac, 0).ok()?;
    // SAFETY: a helper taking plain integers; it only records where the frame goes.
    Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
