//! The dump's bulk read: a BPF iterator over the TCP sockets of a network namespace that writes,
//! for each socket on the wanted local port, the byte ranges of its struct tcp_sock that user
//! space located with the kernel's BTF (sequence numbers, windows, negotiated options...). One
//! read() of the iterator replaces a dozen calls per socket.
#![no_std]
#![no_main]

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_probe_read_kernel, bpf_seq_write, bpf_skc_to_tcp_sock},
    macros::map,
    maps::PerCpuArray,
};
use migrate_common::{STATE_SPAN_LEN_MAX, STATE_SPAN_START_MAX, STATE_SPANS, StateRecord};

/// struct bpf_iter_meta (include/linux/bpf.h).
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// struct bpf_iter__tcp (net/ipv4/tcp_ipv4.c).
#[repr(C)]
pub struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

/// The ranges to copy, as (offset in struct tcp_sock, length) pairs, set by user space at load.
#[unsafe(no_mangle)]
static SPANS: [u32; 2 * STATE_SPANS] = [0; 2 * STATE_SPANS];
#[unsafe(no_mangle)]
static SPAN_COUNT: u32 = 0;
/// Offset of skc_num (the local port, host order) and the port wanted; 0: every socket.
#[unsafe(no_mangle)]
static PORT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static PORT: u32 = 0;

/// The record being filled (too large for the stack).
#[map(name = "RECORD")]
static RECORD: PerCpuArray<StateRecord> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(link_section = "iter/tcp")]
#[unsafe(no_mangle)]
pub extern "C" fn tcpmig_tcp_state(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a struct bpf_iter__tcp; the verifier checks every access.
    unsafe { write_record(ctx.cast()) };
    0
}

/// # Safety
/// `ctx` is the iterator context the kernel passed to the program.
#[inline(always)]
unsafe fn write_record(ctx: *mut IterTcp) {
    // SAFETY: `ctx` is the kernel's struct bpf_iter__tcp (the caller's contract).
    let (meta, sk_common) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if sk_common.is_null() {
        return;
    }
    // Full TCP sockets only: request and TIME_WAIT sockets give null.
    // SAFETY: a non-null sock_common from the iterator; the helper checks its type.
    let sock = unsafe { bpf_skc_to_tcp_sock(sk_common) }.cast::<u8>();
    if sock.is_null() {
        return;
    }
    // SAFETY: a read of a static; volatile so that the value user space set at load is read,
    // not the 0 the compiler saw.
    let port = unsafe { core::ptr::read_volatile(&PORT) };
    if port != 0 {
        let mut local: u16 = 0;
        // SAFETY: as for PORT.
        let offset = unsafe { core::ptr::read_volatile(&PORT_OFFSET) } as usize;
        // SAFETY: probe_read_kernel checks the kernel address itself and writes 2 bytes into
        // `local`, which has them.
        let read = unsafe {
            bpf_probe_read_kernel(
                (&raw mut local).cast(),
                2,
                sock.wrapping_add(offset).cast::<c_void>(),
            )
        };
        if read != 0 || u32::from(local) != port {
            return;
        }
    }
    let Some(record) = RECORD.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as for PORT.
    let count = unsafe { core::ptr::read_volatile(&SPAN_COUNT) } as usize;
    let mut at: u32 = 0;
    for span in 0..STATE_SPANS {
        if span >= count {
            break;
        }
        // SAFETY: as for PORT; `span` < STATE_SPANS keeps both indices in the array.
        let offset = unsafe { core::ptr::read_volatile(&SPANS[2 * span]) } as usize;
        // SAFETY: as above.
        let len = unsafe { core::ptr::read_volatile(&SPANS[2 * span + 1]) } & STATE_SPAN_LEN_MAX;
        // User space keeps to these bounds; the masks let the verifier see them.
        let start = at & STATE_SPAN_START_MAX;
        // SAFETY: `record` is the valid per-CPU slot; start + len stays inside its bytes
        // (STATE_SPAN_START_MAX + STATE_SPAN_LEN_MAX < STATE_RECORD_BYTES).
        let dst = unsafe { (&raw mut (*record).bytes).cast::<u8>().add(start as usize) };
        // SAFETY: writes `len` bytes at `dst`, inside the record (above); the kernel source is
        // checked by the helper.
        if unsafe {
            bpf_probe_read_kernel(
                dst.cast::<c_void>(),
                len,
                sock.wrapping_add(offset).cast::<c_void>(),
            )
        } != 0
        {
            return;
        }
        at = start + len;
    }
    // SAFETY: `meta` comes from the kernel's iterator context.
    let seq = unsafe { (*meta).seq };
    // SAFETY: the seq_file of this iteration and the whole per-CPU record.
    unsafe {
        bpf_seq_write(
            seq.cast(),
            record.cast::<c_void>(),
            core::mem::size_of::<StateRecord>() as u32,
        )
    };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
