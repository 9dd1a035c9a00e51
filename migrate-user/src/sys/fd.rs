//! Putting descriptors at fixed numbers for a command about to be executed (socket activation's
//! fds 3, 4, ...): dup2 onto numbers no Rust value owns, which only raw calls can do.
use std::{
    io,
    ops::Range,
    os::fd::{IntoRawFd, OwnedFd, RawFd},
};

/// Fds put at consecutive numbers by [`place_fds`], without close-on-exec. No Rust value owns
/// them: they are for a command this process executes (dropping this leaves them open for it)
/// or spawns (then [`PlacedFds::close`] closes this process's copies).
#[derive(Debug)]
pub struct PlacedFds {
    numbers: Range<RawFd>,
}

impl PlacedFds {
    /// Closes the placed fds (once a spawned child has its copies).
    pub fn close(self) {
        for fd in self.numbers {
            // SAFETY: these numbers hold the fds place_fds put there, which nothing else owns.
            unsafe { libc::close(fd) };
        }
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Puts fd i at `start + i` without close-on-exec, closing its old number. Sockets sitting on
/// each other's targets form chains (i's target holds j, j's holds k, ...) that end at a number
/// no socket holds, or come back to i: a chain is placed from its end, a cycle after moving i to
/// a spare number. So at most one fd more than the sockets is ever open, whatever their order:
/// 19,933 fit under a 20,000 limit. Whatever else sits in the range must be close-on-exec and
/// unused by this thread's fd table from now on: it is simply replaced (the callers run in a
/// table of their own, see [`crate::shard`], or exec next).
#[doc(alias = "dup2")]
pub fn place_fds(fds: Vec<OwnedFd>, start: RawFd) -> io::Result<PlacedFds> {
    let end = start + fds.len() as RawFd;
    let slot = |fd: RawFd| (start..end).contains(&fd).then(|| (fd - start) as usize);
    let target = |index: usize| start + index as RawFd;
    // The fds leave Rust's ownership here: after exec they are the command's.
    let mut at: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    // The socket on each target number, while it is not yet placed.
    let mut occupant = vec![None; at.len()];
    for (index, &fd) in at.iter().enumerate() {
        if let Some(s) = slot(fd) {
            occupant[s] = Some(index);
        }
    }
    let mut placed = vec![false; at.len()];
    let mut chain = Vec::new();
    for first in 0..at.len() {
        if placed[first] {
            continue;
        }
        if at[first] == target(first) {
            // SAFETY: F_SETFD on an fd we hold.
            check(unsafe { libc::fcntl(at[first], libc::F_SETFD, 0) })?;
            placed[first] = true;
            occupant[first] = None;
            continue;
        }
        chain.clear();
        chain.push(first);
        // The socket on the last one's target; the walk ends within all of them (each socket
        // sits on one number, so it can only come back to `first`).
        while let Some(next) = occupant[*chain.last().expect("never empty")] {
            if next == first {
                // SAFETY: duplicating an fd we hold.
                let spare = check(unsafe { libc::fcntl(at[first], libc::F_DUPFD_CLOEXEC, end) })?;
                // SAFETY: closing its old number, which we hold and nothing else uses.
                unsafe { libc::close(at[first]) };
                occupant[slot(at[first]).expect("a cycle is inside the range")] = None;
                at[first] = spare;
                break;
            }
            chain.push(next);
        }
        for &index in chain.iter().rev() {
            // SAFETY: dup2 and close on fds we hold; the target holds nothing still needed.
            unsafe {
                check(libc::dup2(at[index], target(index)))?;
                libc::close(at[index]);
            }
            if let Some(s) = slot(at[index]) {
                occupant[s] = None;
            }
            at[index] = target(index);
            placed[index] = true;
        }
    }
    Ok(PlacedFds {
        numbers: start..end,
    })
}

#[cfg(test)]
mod tests {
    use std::os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    };

    use nix::{
        fcntl::{FcntlArg, fcntl},
        sys::socket::{AddressFamily, SockFlag, SockType, socket},
    };

    use super::*;
    use crate::handoff::max_fds_per_process;

    /// In a shard, whose fd table is its own: fds 3.. are only copies of the test harness's.
    #[test]
    fn fds_in_any_order_are_placed_with_one_spare_number() {
        let shard: crate::shard::Shard<()> = crate::shard::Shard::spawn("place".into()).unwrap();
        let checked = shard.run(|_| -> io::Result<usize> {
            let n = max_fds_per_process()?;
            let mut fds: Vec<OwnedFd> = (0..n)
                .map(|_| {
                    let (family, kind) = (AddressFamily::Inet, SockType::Datagram);
                    socket(family, kind, SockFlag::SOCK_CLOEXEC, None).map_err(io::Error::from)
                })
                .collect::<io::Result<_>>()?;
            // Reversed and rotated: chains, cycles and sockets already in place.
            fds.reverse();
            fds.rotate_left(n / 3);
            let inode = |fd: RawFd| {
                std::fs::metadata(format!("/proc/thread-self/fd/{fd}")).map(|m| m.ino())
            };
            let wanted = fds
                .iter()
                .map(|fd| inode(fd.as_raw_fd()))
                .collect::<io::Result<Vec<_>>>()?;
            let placed = place_fds(fds, 3)?;
            for (fd, wanted) in (3..).zip(&wanted) {
                assert_eq!(inode(fd)?, *wanted, "fd {fd}");
                // SAFETY: place_fds left the fd open; it is closed below, after this use.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                assert_eq!(fcntl(borrowed, FcntlArg::F_GETFD)?, 0, "fd {fd}");
            }
            placed.close();
            Ok(wanted.len())
        });
        assert!(checked.unwrap() > 10_000);
    }
}
