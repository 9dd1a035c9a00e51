//! Process file descriptors: a handle on a process that cannot be confused with a later process
//! of the same pid. nix has none of these calls, so they are made here, once.
use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::Instant,
};

/// Turns a syscall's result into the new fd it returned.
fn owned_fd(raw: libc::c_long) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

/// A pidfd for `pid` (close-on-exec).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags, no pointers.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) })
}

/// A duplicate, in this process, of the target's descriptor `fd` (close-on-exec). Needs
/// PTRACE_MODE_ATTACH_REALCREDS over the target (CAP_SYS_PTRACE for another user's process).
pub fn pidfd_getfd(pidfd: impl AsFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) takes a pidfd, a number in the target's table and flags.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_fd().as_raw_fd(), fd, 0) })
}

/// Whether the descriptor `fd` of process `pid` and our descriptor `ours` are the same open file
/// (kcmp(2) KCMP_FILE): one call, no path lookup. EBADF when `pid` has no descriptor `fd`.
/// `ours` is looked up in the calling thread's fd table (kcmp is given its thread id): a shard's
/// thread has a table of its own, which the process id would not name.
#[doc(alias = "kcmp")]
pub fn same_file(pid: u32, fd: RawFd, ours: impl AsFd) -> io::Result<bool> {
    const KCMP_FILE: libc::c_int = 0;
    let ours = ours.as_fd().as_raw_fd();
    // SAFETY: kcmp(2) takes two pids, a type and two descriptor numbers, no pointers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid as libc::pid_t,
            nix::unistd::gettid().as_raw(),
            KCMP_FILE,
            fd,
            ours,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret == 0)
}

/// Sends `signal` to the process behind `pidfd`, never to a recycled pid.
pub fn pidfd_send_signal(pidfd: impl AsFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) on a valid pidfd with no siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the process behind `pidfd` exits (a pidfd polls readable then, zombie or reaped)
/// or `deadline` passes; returns whether it exited. `deadline` in the past checks without waiting.
pub fn pidfd_wait_exit(pidfd: impl AsFd, deadline: Instant) -> bool {
    super::wait_readable(pidfd, deadline)
}
