//! The clock the eBPF programs read.
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns(): deadlines in the maps are on it.
pub fn monotonic_now() -> Duration {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC always exists");
    Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32)
}
