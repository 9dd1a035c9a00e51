//! A process that keeps copies of our files so that their last close happens there: closing the
//! last fd of a tcx link detaches its program after an RCU grace period (about 15 ms each on
//! these machines, under load), which the agent would otherwise pay between the end of the
//! blackout and the hand-over to the application. The keeper holds no capability: it empties
//! its sets before it starts holding.
use std::{io, os::fd::OwnedFd};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::wait::{WaitStatus, waitpid},
    unistd::{ForkResult, fork, pipe2, read},
};

/// A detached process holding a copy of the calling thread's fd table until it is released
/// (or this process ends or execs: the release end is close-on-exec), then exiting.
#[must_use = "the keeper lets go only once released or when this process ends"]
pub struct FdKeeper {
    release: OwnedFd,
}

impl FdKeeper {
    /// Lets the keeper close its copies and exit.
    pub fn release(self) {
        drop(self.release);
    }
}

/// The child's exit status when it could not empty its capability sets.
const CAPABILITIES_KEPT: i32 = 3;

/// Starts a keeper (a grandchild, so that nobody has to reap it): from now on, the files of
/// the calling thread's fd table are closed for the last time by it, once this process closed
/// its own fds and called [`FdKeeper::release`]. The keeper has no capability.
pub fn keep_files() -> io::Result<FdKeeper> {
    let (wait_end, release) = pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the children of this multi-threaded process call only async-signal-safe functions
    // (close, capset, fork, read, _exit) and never return into Rust code that could need a lock
    // another thread held at the fork.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(release);
            if super::clear_after_fork().is_err() {
                // SAFETY: ends this child at once, without running any destructor or atexit hook.
                unsafe { libc::_exit(CAPABILITIES_KEPT) }
            }
            // SAFETY: as above.
            if let Ok(ForkResult::Child) = unsafe { fork() } {
                let mut byte = [0u8; 1];
                // Returns at EOF: every copy of the release end is closed.
                while read(&wait_end, &mut byte) == Err(Errno::EINTR) {}
            }
            // SAFETY: ends this child at once, without running any destructor or atexit hook.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(wait_end);
            let status = loop {
                match waitpid(child, None) {
                    Err(Errno::EINTR) => continue,
                    Ok(status) => break status,
                    Err(errno) => return Err(errno.into()),
                }
            };
            if status == WaitStatus::Exited(child, CAPABILITIES_KEPT) {
                return Err(io::Error::other(
                    "the keeper process could not empty its capability sets (capset)",
                ));
            }
            Ok(FdKeeper { release })
        }
    }
}
