//! Waiting for a termination signal without being killed by it.
use std::{io, time::Duration};

/// Blocks until SIGINT or SIGTERM arrives or `timeout` passes; returns whether a signal came.
/// The signals are blocked first, so they are taken here instead of killing the process.
pub fn wait_for_termination(timeout: Duration) -> io::Result<bool> {
    // SAFETY: sigset operations on a local, zero-initialised set; sigtimedwait with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            if libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) >= 0 {
                return Ok(true);
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(false),
                Some(libc::EINTR) => continue,
                _ => return Err(error),
            }
        }
    }
}
