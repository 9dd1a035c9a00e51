//! Queue fill: the bytes of the send and receive queues written under TCP_REPAIR_QUEUE, and the
//! never-sent tail sent once repair mode is off.
use std::{io, os::fd::BorrowedFd};

use crate::{
    repair::{Phase, RepairError},
    sys::tcp_repair::{self as so, Queue},
    tuple::Tuple,
};

/// Sends all of `data` (in repair mode: into the selected queue) without waiting: nothing
/// drains a queue in repair mode, nor a send queue whose peer's window is closed, and one
/// connection must not hold up the others. When the buffer is full it is grown once, to the
/// source's size or four times what is left, whichever is larger: the source's socket held these
/// bytes, a fresh one starts smaller. Errors carry the number of bytes left.
pub(super) fn send_all(
    fd: BorrowedFd<'_>,
    mut data: &[u8],
    (force_option, source_size): (libc::c_int, u32),
) -> Result<(), (usize, io::Error)> {
    let mut grown = false;
    while !data.is_empty() {
        let full = match so::send(fd, data, libc::MSG_DONTWAIT) {
            Ok(0) => io::Error::from_raw_os_error(libc::EAGAIN),
            Ok(n) => {
                data = &data[n..];
                continue;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => e,
            Err(e) => return Err((data.len(), e)),
        };
        if grown {
            return Err((data.len(), full));
        }
        let size = (source_size as usize)
            .max(4 * data.len())
            .min(i32::MAX as usize);
        // The kernel doubles the value it is given.
        so::set_int(
            fd,
            libc::SOL_SOCKET,
            force_option,
            (size / 2) as libc::c_int,
        )
        .map_err(|e| (data.len(), e))?;
        grown = true;
    }
    Ok(())
}

/// One repair queue of a connection being restored.
pub(super) struct QueueState<'a> {
    pub(super) queue: Queue,
    pub(super) name: &'static str,
    /// TCP_QUEUE_SEQ: the sequence number of the queue's first byte.
    pub(super) seq: u32,
    pub(super) data: &'a [u8],
    /// The force option that grows its buffer, and the source's buffer size.
    pub(super) grow: (libc::c_int, u32),
}

impl QueueState<'_> {
    pub(super) fn seq_op(&self) -> &'static str {
        match self.queue {
            Queue::Recv => "TCP_QUEUE_SEQ (receive)",
            Queue::Send => "TCP_QUEUE_SEQ (send)",
        }
    }

    pub(super) fn fill_op(&self) -> &'static str {
        match self.queue {
            Queue::Recv => "restoring the receive queue",
            Queue::Send => "restoring the send queue",
        }
    }
}

/// Queues the bytes of `q` under its TCP_REPAIR_QUEUE (selected first unless it still is).
pub(super) fn fill_queue(
    fd: BorrowedFd<'_>,
    tuple: Tuple,
    q: &QueueState<'_>,
    selected: bool,
) -> Result<(), RepairError> {
    if q.data.is_empty() {
        return Ok(());
    }
    if !selected {
        so::select_queue(fd, q.queue).map_err(RepairError::socket(
            tuple,
            Phase::Restore,
            q.fill_op(),
        ))?;
    }
    send_all(fd, q.data, q.grow).map_err(|(left, error)| RepairError::QueueTooLarge {
        tuple,
        queue: q.name,
        left,
        error,
    })
}
