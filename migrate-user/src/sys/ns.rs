//! Namespaces and descriptor tables: the calls that change what the calling thread sees.
use std::{
    io,
    os::{
        fd::{BorrowedFd, RawFd},
        unix::process::CommandExt as _,
    },
    process::Command,
};

use nix::sched::{CloneFlags, setns, unshare};

/// Moves the calling thread into the network namespace `ns` (an open /proc/PID/ns/net or
/// /run/netns/NAME); the process's other threads stay where they are.
#[doc(alias = "setns")]
pub fn enter_netns(ns: BorrowedFd<'_>) -> io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Gives the calling thread a descriptor table of its own (a copy of the process's): its fds
/// then count against the file limit separately.
#[doc(alias = "unshare")]
pub fn unshare_fd_table() -> io::Result<()> {
    unshare(CloneFlags::CLONE_FILES).map_err(io::Error::from)
}

/// Makes `cmd`'s child, between fork and exec, enter the network namespace open as `netns_fd`
/// (which must stay open until `spawn`), start a session of its own, and close every
/// descriptor from 3 on, so that none of the parent's (CRIU's image directory, logs, pipes)
/// lives on in it.
pub fn detach_into_netns_on_spawn(cmd: &mut Command, netns_fd: RawFd) {
    // SAFETY: the hook makes raw syscalls only, no allocation: async-signal-safe, as pre_exec
    // requires.
    unsafe { cmd.pre_exec(move || detach_into_netns(netns_fd)) };
}

fn detach_into_netns(netns_fd: RawFd) -> io::Result<()> {
    // SAFETY: setns and setsid take no pointers; close_range(2) closes descriptors of this
    // process only, and the caller (a pre_exec hook) holds none that Rust code still uses.
    unsafe {
        if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 || libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
    Ok(())
}
