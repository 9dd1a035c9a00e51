//! Small libc wrappers shared by the library and `tcpmig-peer`, so that the `unsafe` code of the
//! test bed sits in one place.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it. Needs no capability, and one
/// process with thousands of sockets needs it (the soft default is often 1024). Only makes
/// syscalls, so it is also safe between fork and exec.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to write to and read from.
    unsafe {
        check(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit))?;
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            check(libc::setrlimit(libc::RLIMIT_NOFILE, &limit))?;
        }
    }
    Ok(limit.rlim_cur)
}

/// Waits until `fd` has one of `events` (`libc::POLLIN`, `libc::POLLOUT`), an error or a hangup;
/// `Ok(false)` once `deadline` passed. A deadline in the past still checks once, without waiting.
pub fn poll_until(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    deadline: Instant,
) -> io::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let millis =
            libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        let mut pollfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        match check(unsafe { libc::poll(&mut pollfd, 1, millis) }) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Moves the calling thread into the network namespace that `netns` refers to. Only makes a
/// syscall, so it is also safe between fork and exec.
pub fn enter_netns(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// Sets the accept backlog of a listening socket. std listens with 128, too few for thousands of
/// clients connecting at once; on Linux, listen() on a listening socket only updates the backlog
/// (capped by net.core.somaxconn, 4096 in a new namespace).
pub fn set_backlog(listener: &TcpListener, backlog: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::listen(listener.as_raw_fd(), backlog) }).map(drop)
}

/// Takes ownership of an fd this process inherited (socket activation), after checking that it
/// is open, and marks it close-on-exec.
pub fn claim_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on any number is harmless; the fd is only wrapped once it is known to be
    // open, and nothing else in this process owns an inherited fd.
    unsafe {
        check(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Whether a process with this pid exists (an unreaped zombie counts as existing).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe {
        libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

/// Duplicates fd `fd` of process `pid` into this process (pidfd_getfd, needs ptrace rights over
/// it; root has them). This is how a migration tool takes the sockets of a running server.
pub fn take_fd(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: plain syscalls; each returned fd is new and owned by us from here on.
    unsafe {
        let pidfd = check(libc::syscall(libc::SYS_pidfd_open, pid, 0) as libc::c_int)?;
        let pidfd = OwnedFd::from_raw_fd(pidfd);
        let taken =
            check(libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) as libc::c_int)?;
        Ok(OwnedFd::from_raw_fd(taken))
    }
}

/// Puts fds at fixed numbers in a child process: fd `i` of the plan becomes `first + i`, as socket
/// activation (LISTEN_FDS) wants. Prepared before fork (it allocates), applied between fork and
/// exec (it only makes syscalls).
pub struct FdPlan {
    fds: Vec<OwnedFd>,
    first: RawFd,
    /// Where each fd currently is in the child.
    at: Vec<RawFd>,
    /// For every target number, the index of the fd that sat there before the plan ran.
    occupant: Vec<Option<usize>>,
}

impl FdPlan {
    pub fn new(fds: Vec<OwnedFd>, first: RawFd) -> Self {
        let at: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut occupant = vec![None; fds.len()];
        for (index, &fd) in at.iter().enumerate() {
            if let Some(slot) = fd
                .checked_sub(first)
                .and_then(|s| occupant.get_mut(s as usize))
            {
                *slot = Some(index);
            }
        }
        Self {
            fds,
            first,
            at,
            occupant,
        }
    }

    /// Places the fds in order. An fd still to be placed that sits on the current target is first
    /// moved above the target range, so no fd is lost; placed fds lose close-on-exec.
    pub fn apply(&mut self) -> io::Result<()> {
        let end = self.first + self.fds.len() as RawFd;
        for index in 0..self.fds.len() {
            let target = self.first + index as RawFd;
            if let Some(later) = self.occupant[index].filter(|&o| o > index) {
                // SAFETY: duplicating an fd we own; the copy is closed on exec unless placed.
                self.at[later] = check(unsafe { libc::fcntl(target, libc::F_DUPFD_CLOEXEC, end) })?;
            }
            // SAFETY: dup2 onto a number that holds nothing we still need (see above).
            unsafe {
                if self.at[index] == target {
                    check(libc::fcntl(target, libc::F_SETFD, 0))?;
                } else {
                    check(libc::dup2(self.at[index], target))?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fd at exactly `number` (which must be free), referring to a new pipe.
    fn pipe_at(number: RawFd) -> OwnedFd {
        let mut ends = [0; 2];
        // SAFETY: valid out-array; each fd is closed once, here or by the returned OwnedFd.
        unsafe {
            check(libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC)).unwrap();
            let moved = check(libc::fcntl(ends[0], libc::F_DUPFD_CLOEXEC, number)).unwrap();
            libc::close(ends[0]);
            libc::close(ends[1]);
            assert_eq!(moved, number, "fd {number} was taken");
            OwnedFd::from_raw_fd(moved)
        }
    }

    fn inode(fd: RawFd) -> Option<u64> {
        // SAFETY: a zeroed stat is a valid out-value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into the valid out-value; a bad fd only fails.
        (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some(stat.st_ino)
    }

    /// Sources sitting on each other's targets, in cycles, plus one outside the range: every fd
    /// must still land where the plan says, without close-on-exec. Checked in a forked child.
    #[test]
    fn fd_plan_places_permuted_fds() {
        const FIRST: RawFd = 1000;
        let fds: Vec<OwnedFd> = [1003, 1001, 1010, 1000, 1002]
            .into_iter()
            .map(pipe_at)
            .collect();
        let expected: Vec<u64> = fds
            .iter()
            .map(|fd| inode(fd.as_raw_fd()).unwrap())
            .collect();
        let mut plan = FdPlan::new(fds, FIRST);
        // SAFETY: the child makes only syscalls (no allocation) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let placed = plan.apply().is_ok()
                && expected.iter().enumerate().all(|(i, &ino)| {
                    let fd = FIRST + i as RawFd;
                    // SAFETY: F_GETFD only reads flags.
                    inode(fd) == Some(ino) && unsafe { libc::fcntl(fd, libc::F_GETFD) } == 0
                });
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(if placed { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: reaping the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
    }
}
