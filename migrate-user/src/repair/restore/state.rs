//! Each connection's state on its socket, in the order of docs/tcp-repair.md: sequence numbers,
//! connect, negotiated options, timestamp, queues, window, socket options.
use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use super::{
    Pending,
    fin::PeerFin,
    queue::{QueueState, fill_queue},
    socket::{LocalAddresses, repair_socket, set_blocking},
};
use crate::{
    net::{Netns, TcpInjector},
    repair::{Connection, Phase, RepairError, SocketOptions, dump::tos_option},
    sys::tcp_repair::{self as so, Queue, RepairOpt},
};

/// TCP_TIMESTAMP, for a connection that uses timestamps.
pub(super) fn set_timestamp(fd: BorrowedFd<'_>, conn: &Connection) -> Result<(), RepairError> {
    if !conn.negotiated.timestamps {
        return Ok(());
    }
    so::set(fd, libc::SOL_TCP, so::TCP_TIMESTAMP, &conn.timestamp).map_err(RepairError::socket(
        conn.tuple,
        Phase::Restore,
        "TCP_TIMESTAMP",
    ))
}

/// Restores `conn` on `pooled` (a socket of a [`SocketPool`](super::SocketPool) bound to its local
/// address), or on a fresh socket: sequence numbers and connect, negotiated options and
/// timestamp, queues, window, socket options.
pub(super) fn restore_one(
    conn: &Connection,
    netns: &Netns,
    pooled: Option<OwnedFd>,
    local: &mut LocalAddresses,
) -> Result<Pending, RepairError> {
    let tuple = conn.tuple;
    if !conn.state.repairable() {
        return Err(RepairError::UnsupportedState {
            tuple,
            state: conn.state,
        });
    }
    let fail = |op| RepairError::socket(tuple, Phase::Restore, op);
    let fd = socket_for(conn, pooled, local)?;
    let s = fd.as_fd();
    let (mut send, recv) = queues(conn);
    connect_in_repair(s, conn, netns, &send, &recv)?;
    let (options, count) = repair_options(conn);
    so::set_slice(s, libc::SOL_TCP, so::TCP_REPAIR_OPTIONS, &options[..count])
        .map_err(fail("TCP_REPAIR_OPTIONS"))?;
    set_timestamp(s, conn)?;
    let in_repair = if resend_sent_part(s, conn)? {
        0
    } else {
        send.data.len()
    };
    send.data = &send.data[..in_repair];
    for (q, selected) in [(&recv, true), (&send, false)] {
        fill_queue(s, tuple, q, selected)?;
    }
    so::set(s, libc::SOL_TCP, so::TCP_REPAIR_WINDOW, &conn.window)
        .map_err(fail("TCP_REPAIR_WINDOW"))?;
    apply_options(s, tuple.local.is_ipv4(), &conn.options).map_err(fail("socket options"))?;
    Ok(Pending {
        tuple,
        fd,
        options: conn.options,
        tail: conn.send_queue.slice(in_repair..),
        shutdown: conn.state.fin_sent(),
        peer_fin: peer_fin(conn)?,
        probe: in_repair > 0,
    })
}

/// For a connection whose peer's FIN was received, the FIN to hand its socket at the commit, on
/// a raw socket made here, inside the destination's namespace.
fn peer_fin(conn: &Connection) -> Result<Option<PeerFin>, RepairError> {
    if !conn.state.fin_received() {
        return Ok(None);
    }
    let injector = TcpInjector::open(conn.tuple.local).map_err(RepairError::socket(
        conn.tuple,
        Phase::Restore,
        "raw socket for the peer's FIN (CAP_NET_RAW)",
    ))?;
    Ok(Some(PeerFin::new(conn, injector)))
}

/// The most TCP options a segment carries: each segment holds at least its MSS less these.
const MAX_OPTIONS: u32 = 40;

/// Whether the part of the send queue already sent is sent again as new data after repair-off:
/// when the restored socket's first flight (its congestion window) holds all of it.
///
/// Bytes queued in repair mode count as sent: a peer that misses them gets them after a tail
/// loss probe (1 s) and the first retransmission timeout, which a restored socket without an
/// RTT estimate takes at 3 s. Sent anew they go out at once, and a peer that has them already
/// drops them as duplicates. Only when one flight holds them: a peer that got everything the
/// source sent (only its ACKs were lost) acknowledges the source's snd_nxt, the kernel ignores
/// an ACK beyond its own snd_nxt, and bytes still in flight in repair mode count against the
/// congestion window; a connection that never reached the source's snd_nxt would stall for good.
fn resend_sent_part(s: BorrowedFd<'_>, conn: &Connection) -> Result<bool, RepairError> {
    let sent = conn.sent_part().len();
    if sent == 0 {
        return Ok(false);
    }
    let info =
        so::tcp_info(s).map_err(RepairError::socket(conn.tuple, Phase::Restore, "TCP_INFO"))?;
    let (cwnd, mss) = (info.tcpi_snd_cwnd, info.tcpi_snd_mss);
    let flight = cwnd as usize * mss.saturating_sub(MAX_OPTIONS) as usize;
    tracing::trace!(tuple = %conn.tuple, cwnd, mss, sent, flight, "first flight");
    Ok(sent <= flight)
}

/// The pooled socket (made blocking when the connection's was), or a fresh one.
fn socket_for(
    conn: &Connection,
    pooled: Option<OwnedFd>,
    local: &mut LocalAddresses,
) -> Result<OwnedFd, RepairError> {
    let fail = |op| RepairError::socket(conn.tuple, Phase::Restore, op);
    match pooled {
        Some(fd) => {
            if !conn.options.nonblocking {
                set_blocking(fd.as_fd()).map_err(fail("clearing O_NONBLOCK"))?;
            }
            Ok(fd)
        }
        None => repair_socket(&conn.tuple.local, conn.options.nonblocking, local)
            .map_err(|(op, source)| fail(op)(source)),
    }
}

/// The send and receive queues of `conn`, as the restore writes them.
fn queues(conn: &Connection) -> (QueueState<'_>, QueueState<'_>) {
    let send = QueueState {
        queue: Queue::Send,
        name: "send",
        seq: conn.send_seq.wrapping_sub(conn.send_queue.len() as u32),
        data: conn.sent_part(),
        grow: (so::SO_SNDBUFFORCE, conn.options.sndbuf),
    };
    let recv = QueueState {
        queue: Queue::Recv,
        name: "receive",
        seq: conn.recv_seq.wrapping_sub(conn.recv_queue.len() as u32),
        data: &conn.recv_queue,
        grow: (so::SO_RCVBUFFORCE, conn.options.rcvbuf),
    };
    (send, recv)
}

/// The queues' sequence numbers, then connect in repair mode (which sends nothing). The send
/// queue comes selected (repair_socket), so its sequence number goes first; the receive queue,
/// selected next, keeps its selection through connect for its bytes. Idle connections and those
/// with received bytes need one TCP_REPAIR_QUEUE call.
fn connect_in_repair(
    s: BorrowedFd<'_>,
    conn: &Connection,
    netns: &Netns,
    send: &QueueState<'_>,
    recv: &QueueState<'_>,
) -> Result<(), RepairError> {
    let tuple = conn.tuple;
    let fail = |op| RepairError::socket(tuple, Phase::Restore, op);
    for (q, select) in [(send, false), (recv, true)] {
        if select {
            so::select_queue(s, q.queue)
        } else {
            Ok(())
        }
        .and_then(|()| so::set(s, libc::SOL_TCP, so::TCP_QUEUE_SEQ, &q.seq))
        .map_err(fail(q.seq_op()))?;
    }
    if let Some(mss) = user_mss(conn.negotiated.mss) {
        so::set_int(s, libc::SOL_TCP, libc::TCP_MAXSEG, mss).map_err(fail("TCP_MAXSEG"))?;
    }
    so::connect(s, &tuple.remote).map_err(|source| {
        if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            RepairError::TupleInUse {
                tuple,
                netns: netns.spec().to_owned(),
            }
        } else {
            fail("connect (repair mode)")(source)
        }
    })
}

/// TCP_MAXSEG for a connection that negotiated `mss`, given before the repair connect. That
/// connect sizes the socket's segments from the default MSS clamp (536): the negotiated MSS set
/// later (TCP_REPAIR_OPTIONS) changes the clamp but not that size, and the connection would
/// send 524-byte segments for good. The kernel takes 88 to 32767 (TCP_MIN_MSS, MAX_TCP_WINDOW):
/// larger is lowered (loopback), smaller is left alone, never raised above the peer's.
fn user_mss(mss: u16) -> Option<libc::c_int> {
    (mss >= 88).then(|| libc::c_int::from(mss.min(32767)))
}

/// The negotiated options, in a fixed array: no allocation per socket.
fn repair_options(conn: &Connection) -> ([RepairOpt; 4], usize) {
    let n = &conn.negotiated;
    let candidates = [
        Some(RepairOpt {
            code: so::OPT_MSS,
            val: u32::from(n.mss),
        }),
        n.wscale.map(|(snd, rcv)| RepairOpt {
            code: so::OPT_WINDOW,
            val: u32::from(snd) | (u32::from(rcv) << 16),
        }),
        n.sack.then_some(RepairOpt {
            code: so::OPT_SACK_PERM,
            val: 0,
        }),
        n.timestamps.then_some(RepairOpt {
            code: so::OPT_TIMESTAMP,
            val: 0,
        }),
    ];
    let mut options = [RepairOpt { code: 0, val: 0 }; 4];
    let mut count = 0;
    for option in candidates.into_iter().flatten() {
        options[count] = option;
        count += 1;
    }
    (options, count)
}

/// The options that differ from a fresh socket's; SO_REUSEADDR and O_NONBLOCK wait for commit.
fn apply_options(fd: BorrowedFd<'_>, ipv4: bool, options: &SocketOptions) -> io::Result<()> {
    if options.nodelay {
        so::set_int(fd, libc::SOL_TCP, libc::TCP_NODELAY, 1)?;
    }
    if let Some(keepalive) = options.keepalive {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        so::set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_KEEPIDLE,
            keepalive.idle_s.into(),
        )?;
        so::set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_KEEPINTVL,
            keepalive.interval_s.into(),
        )?;
        so::set_int(fd, libc::SOL_TCP, libc::TCP_KEEPCNT, keepalive.count.into())?;
    }
    if options.user_timeout_ms != 0 {
        so::set_int(
            fd,
            libc::SOL_TCP,
            libc::TCP_USER_TIMEOUT,
            options.user_timeout_ms as libc::c_int,
        )?;
    }
    if options.mark != 0 {
        so::set_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            options.mark as libc::c_int,
        )?;
    }
    if options.tos != 0 {
        let (level, name) = tos_option(ipv4);
        so::set_int(fd, level, name, options.tos.into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::user_mss;

    #[test]
    fn user_mss_stays_within_what_the_kernel_takes() {
        assert_eq!(user_mss(1460), Some(1460));
        // Loopback's MSS is beyond MAX_TCP_WINDOW: lowered, never raised.
        assert_eq!(user_mss(65483), Some(32767));
        assert_eq!(user_mss(88), Some(88));
        assert_eq!(user_mss(48), None);
    }
}
