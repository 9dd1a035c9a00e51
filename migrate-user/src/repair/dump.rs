//! Bulk dump: every socket into repair mode, then its state in the order of notes/tcp-repair.md.
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};

use bytes::Bytes;

use super::{
    Connection, Keepalive, Negotiated, Phase, RepairError, SocketOptions, TcpState, Workers,
    sockopt::{self as so, Queue, RepairWindow, TcpInfoHead},
};
use crate::tuple::{Tuple, canonical};

/// Sockets in repair mode at the source and their dumped state. They stay frozen in repair
/// mode until [`commit`](Self::commit) or [`rollback`](Self::rollback); dropping the handle
/// without either rolls back, so that a failed migration leaves the connections running where
/// they were.
pub struct DumpedSockets {
    fds: Vec<OwnedFd>,
    connections: Vec<Connection>,
    workers: Workers,
}

impl DumpedSockets {
    pub fn connections(&self) -> &[Connection] {
        &self.connections
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The connections live on elsewhere: closes our fds while they are still in repair mode,
    /// which sends nothing (no FIN, no RST). A process that holds other fds of the same sockets
    /// keeps them in repair mode: its reads and writes fail until it closes them, silently.
    pub fn commit(mut self) {
        self.fds.clear();
    }

    /// Takes every socket out of repair mode and gives back the options repair mode changed:
    /// the connections carry on at the source. The freeze, if any, is the caller's to lift
    /// afterwards.
    pub fn rollback(mut self) -> Result<(), RepairError> {
        let fds = std::mem::take(&mut self.fds);
        let connections = std::mem::take(&mut self.connections);
        rollback_all(self.workers, &fds, &connections)
    }
}

impl Drop for DumpedSockets {
    fn drop(&mut self) {
        if self.fds.is_empty() {
            return;
        }
        tracing::info!(
            count = self.fds.len(),
            "dump neither committed nor rolled back: rolling back"
        );
        if let Err(error) = rollback_all(self.workers, &self.fds, &self.connections) {
            tracing::warn!(%error, "rolling back a dropped dump");
        }
    }
}

fn rollback_all(
    workers: Workers,
    fds: &[OwnedFd],
    connections: &[Connection],
) -> Result<(), RepairError> {
    let pairs: Vec<(&OwnedFd, &Connection)> = fds.iter().zip(connections).collect();
    let errors: Vec<RepairError> = super::sharded(workers, &pairs, |batch| {
        batch
            .iter()
            .filter_map(|(fd, conn)| {
                leave_repair(fd.as_fd(), conn.tuple, conn.options.reuseaddr).err()
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let failed = errors.len();
    match errors.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(RepairError::Rollback {
            failed,
            total: fds.len(),
            first: Box::new(first),
        }),
    }
}

/// Repair off with value 0 (no TCP_REPAIR_QUEUE=NO_QUEUE first: the kernel ignores the selected
/// queue once repair is off, and TCP_REPAIR=1 resets it), which sends a window probe: the peer answers with an ACK carrying
/// its current window, so both ends resynchronise at once instead of on the next timer (notes:
/// 0.07 s against 0.43 s with -1). The probe is an old-sequence segment every peer accepts, and
/// if a freeze still drops it nothing is lost. Repair mode also cleared SO_REUSEADDR, which is
/// set back.
fn leave_repair(fd: BorrowedFd<'_>, tuple: Tuple, reuseaddr: bool) -> Result<(), RepairError> {
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple,
            phase: Phase::Rollback,
            op,
            error: source,
        }
    };
    so::set_repair(fd, so::REPAIR_OFF).map_err(fail("TCP_REPAIR=0"))?;
    if reuseaddr {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(fail("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// Dumps connected TCP sockets. Their traffic must be frozen (see the freeze plane): repair mode
/// alone does not stop a socket from receiving and sending. On error every socket is taken out
/// of repair mode again and the error names the first connection that failed.
pub fn dump(fds: Vec<OwnedFd>) -> Result<DumpedSockets, RepairError> {
    dump_with(Workers::PerCpu, fds)
}

/// [`dump`] with a chosen number of worker threads.
pub fn dump_with(workers: Workers, fds: Vec<OwnedFd>) -> Result<DumpedSockets, RepairError> {
    super::check_net_admin()?;
    let outcomes: Vec<Outcome> = super::sharded(workers, &fds, dump_batch)
        .into_iter()
        .flatten()
        .collect();
    let mut connections = Vec::with_capacity(fds.len());
    let mut first_error = None;
    let mut in_repair = Vec::new();
    for (fd, outcome) in fds.into_iter().zip(outcomes) {
        match outcome.result {
            Ok(conn) => {
                connections.push(conn);
                in_repair.push(fd);
            }
            Err(error) => {
                if let Some((tuple, options)) = outcome.entered
                    && let Err(rollback) = leave_repair(fd.as_fd(), tuple, options.reuseaddr)
                {
                    tracing::warn!(%rollback, "rolling back a socket whose dump failed");
                }
                first_error.get_or_insert(error);
            }
        }
    }
    let dumped = DumpedSockets {
        fds: in_repair,
        connections,
        workers,
    };
    match first_error {
        // Dropping `dumped` rolls the others back.
        Some(error) => Err(error),
        None => Ok(dumped),
    }
}

/// One socket's dump: `entered` is set once it is in repair mode (and must leave it on error).
struct Outcome {
    entered: Option<(Tuple, SocketOptions)>,
    result: Result<Connection, RepairError>,
}

/// First every socket of the batch into repair mode, then the state of each.
fn dump_batch(fds: &[OwnedFd]) -> Vec<Outcome> {
    let entered: Vec<_> = fds.iter().map(|fd| enter(fd.as_fd())).collect();
    fds.iter()
        .zip(entered)
        .map(|(fd, entered)| match entered {
            Ok((tuple, options)) => Outcome {
                entered: Some((tuple, options)),
                result: read_state(fd.as_fd(), tuple, options),
            },
            Err(error) => Outcome {
                entered: None,
                result: Err(error),
            },
        })
        .collect()
}

/// Names and options (SO_REUSEADDR must be read before repair mode forces it on), then
/// TCP_REPAIR=1.
fn enter(fd: BorrowedFd<'_>) -> Result<(Tuple, SocketOptions), RepairError> {
    let names = so::local_addr(fd).and_then(|local| Ok((local, so::peer_addr(fd)?)));
    let tuple = match names {
        Ok((local, remote)) => Tuple {
            local: canonical(local),
            remote: canonical(remote),
        },
        Err(source) => {
            return Err(RepairError::NotConnected {
                fd: fd.as_raw_fd(),
                error: source,
            });
        }
    };
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple,
            phase: Phase::Dump,
            op,
            error: source,
        }
    };
    let options =
        read_options(fd, tuple.local.is_ipv4()).map_err(fail("reading socket options"))?;
    so::set_repair(fd, so::REPAIR_ON).map_err(fail("TCP_REPAIR=1"))?;
    Ok((tuple, options))
}

fn read_options(fd: BorrowedFd<'_>, ipv4: bool) -> std::io::Result<SocketOptions> {
    let flag = |level, name| so::get_int(fd, level, name).map(|v| v != 0);
    let keepalive = if flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? {
        Some(Keepalive {
            idle_s: so::get_int(fd, libc::SOL_TCP, libc::TCP_KEEPIDLE)? as u16,
            interval_s: so::get_int(fd, libc::SOL_TCP, libc::TCP_KEEPINTVL)? as u16,
            count: so::get_int(fd, libc::SOL_TCP, libc::TCP_KEEPCNT)? as u8,
        })
    } else {
        None
    };
    let (tos_level, tos_name) = tos_option(ipv4);
    Ok(SocketOptions {
        nodelay: flag(libc::SOL_TCP, libc::TCP_NODELAY)?,
        keepalive,
        user_timeout_ms: so::get_int(fd, libc::SOL_TCP, libc::TCP_USER_TIMEOUT)? as u32,
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        nonblocking: so::is_nonblocking(fd)?,
        // Read with the queues, only for the queues that hold bytes.
        sndbuf: 0,
        rcvbuf: 0,
        mark: so::get_int(fd, libc::SOL_SOCKET, libc::SO_MARK)? as u32,
        tos: so::get_int(fd, tos_level, tos_name)? as u8,
    })
}

/// IP_TOS for IPv4 sockets, IPV6_TCLASS for IPv6 ones.
pub(super) fn tos_option(ipv4: bool) -> (libc::c_int, libc::c_int) {
    if ipv4 {
        (libc::SOL_IP, libc::IP_TOS)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TCLASS)
    }
}

fn read_state(
    fd: BorrowedFd<'_>,
    tuple: Tuple,
    mut options: SocketOptions,
) -> Result<Connection, RepairError> {
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple,
            phase: Phase::Dump,
            op,
            error: source,
        }
    };
    let info: TcpInfoHead = so::get(fd, libc::SOL_TCP, libc::TCP_INFO).map_err(fail("TCP_INFO"))?;
    let state = TcpState::from_kernel(info.state);
    if !state.repairable() {
        return Err(RepairError::UnsupportedState { tuple, state });
    }
    let (inq, outq, notsent) =
        so::queue_lengths(fd).map_err(fail("SIOCINQ/SIOCOUTQ/SIOCOUTQNSD"))?;
    let buffer = |name, len: u32| match len {
        0 => Ok(0),
        _ => so::get_int(fd, libc::SOL_SOCKET, name).map(|size| size as u32),
    };
    options.sndbuf = buffer(libc::SO_SNDBUF, outq).map_err(fail("SO_SNDBUF"))?;
    options.rcvbuf = buffer(libc::SO_RCVBUF, inq).map_err(fail("SO_RCVBUF"))?;
    let mss = so::get_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG).map_err(fail("TCP_MAXSEG"))?;
    let timestamps = info.options & so::TCPI_OPT_TIMESTAMPS != 0;
    // Only restored when the connection uses timestamps.
    let timestamp: u32 = if timestamps {
        so::get(fd, libc::SOL_TCP, so::TCP_TIMESTAMP).map_err(fail("TCP_TIMESTAMP"))?
    } else {
        0
    };
    // Our FIN takes one sequence number and counts in the queue lengths, but carries no data.
    let fin = u32::from(state.fin_sent());
    so::select_queue(fd, Queue::Send).map_err(fail("TCP_REPAIR_QUEUE=SEND"))?;
    let write_seq: u32 =
        so::get(fd, libc::SOL_TCP, so::TCP_QUEUE_SEQ).map_err(fail("TCP_QUEUE_SEQ (send)"))?;
    let send_queue = peek(fd, tuple, "send", outq.saturating_sub(fin))?;
    so::select_queue(fd, Queue::Recv).map_err(fail("TCP_REPAIR_QUEUE=RECV"))?;
    let recv_seq: u32 =
        so::get(fd, libc::SOL_TCP, so::TCP_QUEUE_SEQ).map_err(fail("TCP_QUEUE_SEQ (receive)"))?;
    let recv_queue = peek(fd, tuple, "receive", inq)?;
    let window: RepairWindow =
        so::get(fd, libc::SOL_TCP, so::TCP_REPAIR_WINDOW).map_err(fail("TCP_REPAIR_WINDOW"))?;
    Ok(Connection {
        tuple,
        state,
        send_seq: write_seq.wrapping_sub(fin),
        recv_seq,
        window,
        negotiated: Negotiated {
            timestamps,
            sack: info.options & so::TCPI_OPT_SACK != 0,
            wscale: (info.options & so::TCPI_OPT_WSCALE != 0)
                .then_some((info.wscales & 0xf, info.wscales >> 4)),
            mss: mss as u16,
        },
        timestamp,
        options,
        send_queue,
        unsent: notsent.saturating_sub(fin),
        recv_queue,
    })
}

/// Reads the selected queue without consuming it; an empty queue costs no syscall. One byte
/// more than expected is asked for, so that data arriving during the dump is noticed.
fn peek(
    fd: BorrowedFd<'_>,
    tuple: Tuple,
    queue: &'static str,
    len: u32,
) -> Result<Bytes, RepairError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let data = so::peek_queue(fd, len as usize + 1).map_err(|source| RepairError::Socket {
        tuple,
        phase: Phase::Dump,
        op: if queue == "send" {
            "peek of the send queue"
        } else {
            "peek of the receive queue"
        },
        error: source,
    })?;
    if data.len() != len as usize {
        return Err(RepairError::QueueChanged {
            tuple,
            queue,
            expected: len as usize,
            got: data.len(),
        });
    }
    Ok(Bytes::from(data))
}
