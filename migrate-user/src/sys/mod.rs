//! Every raw kernel interface of the library, behind safe, typed functions named after the call
//! (`#[doc(alias)]` gives the kernel's name). Above this module the library is safe Rust: an
//! `unsafe` block elsewhere is a bug to move here. nix is used where it has the call; what nix and
//! aya lack (pidfd_getfd, pidfd_send_signal, close_range, the bpf(2) batch commands, the
//! TCP_REPAIR socket options) is written here once, each block with its `SAFETY:` argument.
//!
//! - `bpf`: bpf(2) commands aya does not offer;
//! - `pidfd`: process handles, taking another process's sockets, comparing its files with ours,
//!   signalling it;
//! - [`tcp_repair`]: the TCP_REPAIR socket options and the socket calls a restore makes;
//! - `ns`: entering network namespaces, private fd tables;
//! - `fd`, `exec`: fds at fixed numbers, a command told its own pid (socket activation);
//! - `packet`: sending whole Ethernet frames (the address announcements), copying arriving ones
//!   (the hold of a freeze);
//! - `keeper`: a process that closes our files for the last time, off our path;
//! - `caps`, `capset`: capability checks, sets of capabilities by name, dropping them;
//! - the eBPF programs' clock, waiting for SIGTERM, the allocator's setting.
mod bpf;
mod caps;
mod capset;
mod clock;
mod exec;
mod fd;
mod keeper;
mod malloc;
mod ns;
mod packet;
mod pidfd;
mod signal;
pub mod tcp_repair;
mod wait;

pub use bpf::{detach_pinned_link, map_delete_batch, map_update_batch, prog_test_run};
pub use caps::{
    Capability, CapabilityError, CapabilitySet, MissingCapability, has_capability,
    missing_capability, require_capabilities,
};
pub use capset::{
    ThreadCapabilities, clear_after_fork, confine_for_exec, drop_all_but, require_single_thread,
};
pub use clock::monotonic_now;
pub use exec::{Execve, spawn_execve};
pub use fd::{PlacedFds, place_fds};
pub use keeper::{FdKeeper, keep_files};
pub use malloc::limit_heap_arenas;
pub use ns::{detach_into_netns_on_spawn, enter_netns, unshare_fd_table};
pub use packet::{CaptureSocket, PacketSocket};
pub use pidfd::{pidfd_getfd, pidfd_open, pidfd_send_signal, pidfd_wait_exit, same_file};
pub use signal::wait_for_termination;
pub use wait::wait_readable;
