//! Commit: every restored socket given its peer's FIN if it had one, out of repair mode, its
//! never-sent tail sent and its FIN sent again: the connections are live.
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};

use nix::sys::socket::{Shutdown, shutdown};

use super::{Pending, RestoredSockets, queue::send_all};
use crate::{
    repair::{self, Phase, RepairError},
    sys::tcp_repair as so,
    tuple::Tuple,
};

/// A live restored connection, out of repair mode.
#[derive(Debug)]
pub struct RestoredSocket {
    pub tuple: Tuple,
    pub fd: OwnedFd,
}

/// The result of [`RestoredSockets::commit`]: the connections that are live, and those that
/// failed to leave repair mode (already closed silently).
#[derive(Debug, Default)]
pub struct Committed {
    pub sockets: Vec<RestoredSocket>,
    pub failures: Vec<RepairError>,
}

impl RestoredSockets {
    /// Hands the peer's FIN to the half-closed sockets (the service address must be local by
    /// now), takes every socket out of repair mode (with a window probe where data stays in flight:
    /// those peers resynchronise at once), sends the tails of the send queues normally (so what
    /// a peer misses goes out at once, not on a retransmission timer), sends our FIN again for
    /// connections that had sent it, and sets SO_REUSEADDR where the source had it
    /// (O_NONBLOCK was set at socket()). Sharded over threads.
    pub fn commit(mut self) -> Committed {
        let pending = std::mem::take(&mut self.pending);
        let results = repair::sharded(self.workers, &pending, |batch| {
            batch.iter().map(go_live).collect::<Vec<_>>()
        });
        let mut committed = Committed::default();
        for (p, result) in pending.into_iter().zip(results.into_iter().flatten()) {
            match result {
                Ok(()) => committed.sockets.push(RestoredSocket {
                    tuple: p.tuple,
                    fd: p.fd,
                }),
                Err(error) => {
                    // Back into repair mode first, so that closing sends nothing.
                    let _ = so::set_repair(p.fd.as_fd(), so::REPAIR_ON);
                    committed.failures.push(error);
                }
            }
        }
        committed
    }
}

fn go_live(p: &Pending) -> Result<(), RepairError> {
    let fd = p.fd.as_fd();
    let fail = |op| RepairError::socket(p.tuple, Phase::Commit, op);
    // No TCP_REPAIR_QUEUE=NO_QUEUE first: the kernel ignores the selected queue once repair is
    // off. The window probe (TCP_REPAIR=0) makes the peer acknowledge at once what it already
    // has of our data left in flight in repair mode, instead of at our next retransmission;
    // with nothing in flight (the usual case: what was sent goes again with the tail) it
    // changes nothing (the window was restored), and costs a round trip of packets per socket
    // (64 ms of the commit at 10,000 connections), so those leave without it (-1).
    if let Some(fin) = &p.peer_fin {
        fin.deliver(fd, p.tuple)?;
    }
    let (value, op) = if p.probe {
        (so::REPAIR_OFF, "TCP_REPAIR=0")
    } else {
        (so::REPAIR_OFF_NO_WP, "TCP_REPAIR=-1")
    };
    so::set_repair(fd, value).map_err(fail(op))?;
    send_tail(p)?;
    if p.shutdown {
        shutdown(fd.as_raw_fd(), Shutdown::Write)
            .map_err(|errno| fail("shutdown(SHUT_WR): our FIN again")(errno.into()))?;
    }
    if p.options.reuseaddr {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(fail("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// Sends the tail of the send queue as new data, all of it at once: the application writes after
/// it. Nagle stays off meanwhile: it could hold back a last short segment that ends the part
/// already sent, and a peer that had it already acknowledges past our snd_nxt until it goes, an
/// ACK the kernel ignores (docs/tcp-repair.md). TCP_NOTSENT_LOWAT is lifted meanwhile too: with
/// the peer's window closed, a send stops once the unsent bytes pass it (the namespace's
/// tcp_notsent_lowat when the socket has none), and nothing would drain them.
fn send_tail(p: &Pending) -> Result<(), RepairError> {
    if p.tail.is_empty() {
        return Ok(());
    }
    let fd = p.fd.as_fd();
    let fail = |op| RepairError::socket(p.tuple, Phase::Commit, op);
    let set = |option, value, op| so::set_int(fd, libc::SOL_TCP, option, value).map_err(fail(op));
    if !p.options.nodelay {
        set(libc::TCP_NODELAY, 1, "TCP_NODELAY")?;
    }
    set(libc::TCP_NOTSENT_LOWAT, i32::MAX, "TCP_NOTSENT_LOWAT")?;
    send_all(fd, &p.tail, (so::SO_SNDBUFFORCE, p.options.sndbuf)).map_err(|(left, error)| {
        RepairError::UnsentTooLarge {
            tuple: p.tuple,
            left,
            error,
        }
    })?;
    // 0: the namespace's default again, as on a fresh socket.
    set(libc::TCP_NOTSENT_LOWAT, 0, "TCP_NOTSENT_LOWAT")?;
    if !p.options.nodelay {
        set(libc::TCP_NODELAY, 0, "TCP_NODELAY")?;
    }
    Ok(())
}
