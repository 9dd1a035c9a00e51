//! The C allocator's one setting tcpmig changes.

/// Heap arenas `tcpmig migrate` lets glibc make (glibc's default: 8 per CPU).
const MIGRATE_ARENAS: libc::c_int = 2;

/// Bounds glibc's heap arenas, so that the blocks one shard thread frees are reused by the
/// others instead of staying resident in its own arena.
///
/// `tcpmig migrate` reads and dumps its sockets on a thread per shard; with an arena per thread
/// the memory each one freed stayed resident while the next phase allocated afresh elsewhere. At
/// 50,000 connections two arenas took its peak from 66.2-66.5 to 46.7-50.3 MiB, the blackout
/// unchanged (medians of three runs: 86.0 against 88.7 ms at 10,000, 397.9 against 388.5 ms at
/// 50,000). One arena: 44-46 MiB, slower at 10,000; a fixed 128 KiB mmap threshold: 38.7 MiB,
/// but 14% more blackout, every large buffer faulting in fresh pages. Call it before threads
/// start. Should glibc refuse, memory stays as it was.
pub fn limit_heap_arenas() {
    // SAFETY: mallopt only changes an allocator parameter; M_ARENA_MAX takes a count, and
    // arenas already made stay valid.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MIGRATE_ARENAS) };
}
