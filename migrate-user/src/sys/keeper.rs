//! A process that keeps copies of our files so that their last close happens there: closing the
//! last fd of a tcx link detaches its program after an RCU grace period (about 15 ms each on
//! these machines, under load), which the agent would otherwise pay between the end of the
//! blackout and the hand-over to the application.
use std::{io, os::fd::OwnedFd};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::wait::waitpid,
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

/// Starts a keeper (a grandchild, so that nobody has to reap it): from now on, the files of
/// the calling thread's fd table are closed for the last time by it, once this process closed
/// its own fds and called [`FdKeeper::release`].
pub fn keep_files() -> io::Result<FdKeeper> {
    let (wait_end, release) = pipe2(OFlag::O_CLOEXEC)?;
    // SAFETY: the children of this multi-threaded process call only async-signal-safe functions
    // (close, fork, read, _exit) and never return into Rust code that could need a lock another
    // thread held at the fork.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(release);
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
            loop {
                match waitpid(child, None) {
                    Err(Errno::EINTR) => continue,
                    Ok(_) => break,
                    Err(errno) => return Err(errno.into()),
                }
            }
            Ok(FdKeeper { release })
        }
    }
}
