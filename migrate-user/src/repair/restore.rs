//! Bulk restore in the order of notes/tcp-repair.md, and the commit that takes the restored
//! sockets out of repair mode.
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use bytes::Bytes;

use super::{
    Connection, Phase, RepairError, SocketOptions, UNSENT_TIMEOUT, Workers,
    dump::tos_option,
    sockopt::{self as so, Queue, RepairOpt},
};
use crate::{net::Netns, tuple::Tuple};

/// Restored sockets still in repair mode: nothing has been sent to the peers yet. Dropping the
/// handle closes them silently (no FIN, no RST), which is the abort of a two-phase migration.
pub struct RestoredSockets {
    pending: Vec<Pending>,
    workers: Workers,
}

struct Pending {
    tuple: Tuple,
    fd: OwnedFd,
    options: SocketOptions,
    unsent: Bytes,
    shutdown: bool,
}

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
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn tuples(&self) -> impl Iterator<Item = Tuple> + '_ {
        self.pending.iter().map(|p| p.tuple)
    }

    /// Takes every socket out of repair mode (window probe: the peers resynchronise at once),
    /// sends the never-sent tails normally, sends our FIN again for FIN_WAIT connections, and
    /// sets SO_REUSEADDR and O_NONBLOCK where the source had them. Sharded over threads.
    pub fn commit(mut self) -> Committed {
        let pending = std::mem::take(&mut self.pending);
        let deadline = Instant::now() + UNSENT_TIMEOUT;
        let results = super::sharded(self.workers, &pending, |batch| {
            batch
                .iter()
                .map(|p| go_live(p, deadline))
                .collect::<Vec<_>>()
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

impl Drop for RestoredSockets {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            tracing::info!(
                count = self.pending.len(),
                "restored sockets not committed: closing them silently in repair mode"
            );
        }
    }
}

fn go_live(p: &Pending, deadline: Instant) -> Result<(), RepairError> {
    let fd = p.fd.as_fd();
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple: p.tuple,
            phase: Phase::Commit,
            op,
            source,
        }
    };
    so::select_queue(fd, Queue::None).map_err(fail("TCP_REPAIR_QUEUE=NO_QUEUE"))?;
    so::set_repair(fd, so::REPAIR_OFF).map_err(fail("TCP_REPAIR=0"))?;
    send_all(
        fd,
        &p.unsent,
        (so::SO_SNDBUFFORCE, p.options.sndbuf),
        Some(deadline),
    )
    .map_err(|(left, source)| match source.kind() {
        io::ErrorKind::TimedOut => RepairError::UnsentStuck {
            tuple: p.tuple,
            left,
        },
        _ => fail("sending the never-sent tail")(source),
    })?;
    if p.shutdown {
        // SAFETY: shutdown on a valid socket.
        if unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::SHUT_WR) } != 0 {
            return Err(fail("shutdown(SHUT_WR) for FIN_WAIT")(
                io::Error::last_os_error(),
            ));
        }
    }
    if p.options.reuseaddr {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(fail("SO_REUSEADDR"))?;
    }
    if p.options.nonblocking {
        so::set_nonblocking(fd).map_err(fail("O_NONBLOCK"))?;
    }
    Ok(())
}

/// Recreates `connections` inside `netns`, sharded over one thread per CPU, each in repair mode
/// with its queues, sequence numbers, options, timestamp and window. Works before the local
/// address exists there (IP_TRANSPARENT). On error every socket restored so far is closed
/// silently and the error names the connection that failed.
pub fn restore(netns: &Netns, connections: &[Connection]) -> Result<RestoredSockets, RepairError> {
    restore_with(Workers::PerCpu, netns, connections)
}

/// [`restore`] with a chosen number of worker threads (also used by its commit).
pub fn restore_with(
    workers: Workers,
    netns: &Netns,
    connections: &[Connection],
) -> Result<RestoredSockets, RepairError> {
    super::check_net_admin()?;
    let abort = AtomicBool::new(false);
    let batches = super::sharded_in(workers, netns, connections, |batch| {
        let mut restored = Vec::with_capacity(batch.len());
        for conn in batch {
            if abort.load(Ordering::Relaxed) {
                break;
            }
            let result = restore_one(conn, netns);
            if result.is_err() {
                abort.store(true, Ordering::Relaxed);
            }
            restored.push(result);
        }
        restored
    })?;
    let mut pending = Vec::with_capacity(connections.len());
    for result in batches.into_iter().flatten() {
        // Returning early drops `pending`: those sockets close silently in repair mode.
        pending.push(result?);
    }
    Ok(RestoredSockets { pending, workers })
}

fn restore_one(conn: &Connection, netns: &Netns) -> Result<Pending, RepairError> {
    let tuple = conn.tuple;
    if !conn.state.repairable() {
        return Err(RepairError::UnsupportedState {
            tuple,
            state: conn.state,
        });
    }
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple,
            phase: Phase::Restore,
            op,
            source,
        }
    };
    let fd = so::new_tcp_socket(&tuple.local).map_err(fail("socket()"))?;
    let s = fd.as_fd();
    so::set_repair(s, so::REPAIR_ON).map_err(fail("TCP_REPAIR=1"))?;
    let (level, transparent) = match tuple.local {
        SocketAddr::V4(_) => (libc::SOL_IP, so::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::SOL_IPV6, so::IPV6_TRANSPARENT),
    };
    so::set_int(s, level, transparent, 1).map_err(fail("IP_TRANSPARENT"))?;
    let sent = conn.sent_part();
    let queue_seq = |queue, seq: u32| {
        so::select_queue(s, queue)?;
        so::set(s, libc::SOL_TCP, so::TCP_QUEUE_SEQ, &seq)
    };
    queue_seq(
        Queue::Recv,
        conn.recv_seq.wrapping_sub(conn.recv_queue.len() as u32),
    )
    .map_err(fail("TCP_QUEUE_SEQ (receive)"))?;
    queue_seq(
        Queue::Send,
        conn.send_seq.wrapping_sub(conn.send_queue.len() as u32),
    )
    .map_err(fail("TCP_QUEUE_SEQ (send)"))?;
    so::bind(s, &tuple.local).map_err(fail("bind"))?;
    so::connect(s, &tuple.remote).map_err(|source| {
        if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            RepairError::TupleInUse {
                tuple,
                netns: netns.spec().to_owned(),
            }
        } else {
            fail("connect (repair mode)")(source)
        }
    })?;
    so::set_slice(
        s,
        libc::SOL_TCP,
        so::TCP_REPAIR_OPTIONS,
        &repair_options(conn),
    )
    .map_err(fail("TCP_REPAIR_OPTIONS"))?;
    if conn.negotiated.timestamps {
        so::set(s, libc::SOL_TCP, so::TCP_TIMESTAMP, &conn.timestamp)
            .map_err(fail("TCP_TIMESTAMP"))?;
    }
    fill_queue(
        s,
        Queue::Recv,
        &conn.recv_queue,
        (so::SO_RCVBUFFORCE, conn.options.rcvbuf),
    )
    .map_err(fail("restoring the receive queue"))?;
    fill_queue(
        s,
        Queue::Send,
        sent,
        (so::SO_SNDBUFFORCE, conn.options.sndbuf),
    )
    .map_err(fail("restoring the send queue"))?;
    so::set(s, libc::SOL_TCP, so::TCP_REPAIR_WINDOW, &conn.window)
        .map_err(fail("TCP_REPAIR_WINDOW"))?;
    apply_options(s, tuple.local.is_ipv4(), &conn.options).map_err(fail("socket options"))?;
    Ok(Pending {
        tuple,
        fd,
        options: conn.options,
        unsent: conn.unsent_part(),
        shutdown: conn.state.fin_sent(),
    })
}

fn repair_options(conn: &Connection) -> Vec<RepairOpt> {
    let n = &conn.negotiated;
    let mut options = vec![RepairOpt {
        code: so::OPT_MSS,
        val: u32::from(n.mss),
    }];
    if let Some((snd, rcv)) = n.wscale {
        options.push(RepairOpt {
            code: so::OPT_WINDOW,
            val: u32::from(snd) | (u32::from(rcv) << 16),
        });
    }
    if n.sack {
        options.push(RepairOpt {
            code: so::OPT_SACK_PERM,
            val: 0,
        });
    }
    if n.timestamps {
        options.push(RepairOpt {
            code: so::OPT_TIMESTAMP,
            val: 0,
        });
    }
    options
}

/// Sends all of `data` (in repair mode: into the selected queue). When the buffer is full it is
/// grown once, to the source's size or four times what is left, whichever is larger: the
/// source's socket held these bytes, a fresh one starts smaller. Then, with a `deadline`, it
/// waits for room; without one, it gives up. Errors carry the number of bytes left.
fn send_all(
    fd: BorrowedFd<'_>,
    mut data: &[u8],
    (force_option, source_size): (libc::c_int, u32),
    deadline: Option<Instant>,
) -> Result<(), (usize, io::Error)> {
    let mut grown = false;
    while !data.is_empty() {
        let no_room = match so::send(fd, data, libc::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(n) => {
                data = &data[n..];
                false
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => true,
            Err(e) => return Err((data.len(), e)),
        };
        if !no_room {
            continue;
        }
        if !grown {
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
            continue;
        }
        let left_ms = deadline.map_or(0, |d| {
            d.saturating_duration_since(Instant::now()).as_millis()
        });
        if left_ms == 0 {
            return Err((data.len(), io::Error::from(io::ErrorKind::TimedOut)));
        }
        so::wait_writable(fd, left_ms.min(1000) as libc::c_int).map_err(|e| (data.len(), e))?;
    }
    Ok(())
}

/// Queues `data` under TCP_REPAIR_QUEUE=`queue`, where nothing can drain it: no waiting.
fn fill_queue(
    fd: BorrowedFd<'_>,
    queue: Queue,
    data: &[u8],
    grow: (libc::c_int, u32),
) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    so::select_queue(fd, queue)?;
    send_all(fd, data, grow, None).map_err(|(left, e)| {
        io::Error::new(
            e.kind(),
            format!("{left} bytes do not fit even in an enlarged buffer: {e}"),
        )
    })
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
