//! Waiting, bounded, for one descriptor to become readable.
use std::{os::fd::AsFd, time::Instant};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
};

/// Waits until `fd` polls readable or `deadline` passes (a signal does not cut the wait short);
/// returns whether it is readable. `deadline` in the past checks without waiting.
pub fn wait_readable(fd: impl AsFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let timeout =
            PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap_or(PollTimeout::ZERO);
        match poll(&mut fds, timeout) {
            Ok(ready) if ready > 0 => return true,
            Err(Errno::EINTR) if !left.is_zero() => {}
            Err(_) => return false,
            Ok(_) if left.is_zero() => return false,
            Ok(_) => {}
        }
    }
}
