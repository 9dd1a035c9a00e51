//! Bulk dump: each socket into repair mode and its state read, in the order of
//! notes/tcp-repair.md; the commit that disconnects them silently, or the rollback.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use bytes::Bytes;

use super::{
    Connection, Keepalive, Negotiated, Phase, RepairError, SocketOptions, Workers,
    diag::{self, DiagState},
    sockopt::{self as so, Queue, RepairWindow},
};
use crate::{net::Netns, tuple::Tuple};

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

    /// The connections live on elsewhere: disconnects each socket while it is still in repair
    /// mode (connect(AF_UNSPEC), which sends nothing: no FIN, no RST) and closes our fds. The
    /// process we took the fds from may still hold the same sockets: disconnected, they run no
    /// retransmission or keepalive timer any more, and once out of repair mode (without the
    /// window probe, which a closed socket does not send anyway) its reads fail with
    /// ECONNABORTED instead of EPERM. Failures are logged: the sockets are closed either way.
    pub fn commit(mut self) {
        let fds = std::mem::take(&mut self.fds);
        let connections = std::mem::take(&mut self.connections);
        let pairs: Vec<(OwnedFd, Tuple)> = fds
            .into_iter()
            .zip(connections.iter().map(|c| c.tuple))
            .collect();
        super::sharded(self.workers, &pairs, |batch| {
            for (fd, tuple) in batch {
                let fd = fd.as_fd();
                let result = so::disconnect(fd)
                    .map_err(|e| ("connect(AF_UNSPEC)", e))
                    .and_then(|()| {
                        so::set_repair(fd, so::REPAIR_OFF_NO_WP).map_err(|e| ("TCP_REPAIR=-1", e))
                    });
                if let Err((op, error)) = result {
                    tracing::warn!(%tuple, op, %error, "disconnecting a committed socket");
                }
            }
        });
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
///
/// One sock_diag dump of the sockets' namespace gives each socket's addresses, state, negotiated
/// options, queue lengths, mark and TOS; each socket then costs only the calls that have no
/// bulk form (its cookie to find it there, the options sock_diag lacks, repair on, mss_clamp,
/// timestamp, queue sequences, peeks of non-empty queues, window), all in one pass while its
/// kernel structures are in the cache. Sockets of another namespace than the first's are found
/// by further sock_diag dumps, one per namespace.
pub fn dump_with(workers: Workers, fds: Vec<OwnedFd>) -> Result<DumpedSockets, RepairError> {
    super::check_net_admin()?;
    let mut outcomes: Vec<Option<Outcome>> = fds.iter().map(|_| None).collect();
    let mut listed = Vec::new();
    // Each round settles the first socket not dumped yet, or lists one more namespace.
    for _ in 0..=2 * fds.len() {
        let Some(first) = outcomes.iter().position(Option::is_none) else {
            break;
        };
        let fd = fds[first].as_fd();
        let states = match states_of_netns(fd, &mut listed) {
            Ok(Some(states)) => states,
            Ok(None) => {
                outcomes[first] = Some(Outcome::failed(not_connected(
                    fd,
                    io::Error::other("sock_diag does not list it as a TCP socket"),
                )));
                continue;
            }
            Err(error) => {
                for outcome in outcomes.iter_mut().skip(first + 1).filter(|o| o.is_none()) {
                    *outcome = Some(Outcome::failed(RepairError::Diag {
                        netns: "of an earlier socket".to_owned(),
                        source: io::Error::other("not dumped"),
                    }));
                }
                outcomes[first] = Some(Outcome::failed(error));
                continue;
            }
        };
        let todo: Vec<(usize, BorrowedFd<'_>)> = fds
            .iter()
            .enumerate()
            .filter(|(i, _)| outcomes[*i].is_none())
            .map(|(i, fd)| (i, fd.as_fd()))
            .collect();
        let results = super::sharded(workers, &todo, |batch| {
            batch
                .iter()
                .map(|(_, fd)| dump_one(*fd, &states))
                .collect::<Vec<_>>()
        });
        for ((i, _), result) in todo.iter().zip(results.into_iter().flatten()) {
            outcomes[*i] = result;
        }
    }
    let mut connections = Vec::with_capacity(fds.len());
    let mut first_error = None;
    let mut in_repair = Vec::with_capacity(fds.len());
    for (fd, outcome) in fds.into_iter().zip(outcomes) {
        let outcome = outcome.unwrap_or_else(|| {
            Outcome::failed(not_connected(fd.as_fd(), io::Error::other("not dumped")))
        });
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

/// The sock_diag states of the namespace `fd` belongs to, or None when that namespace was
/// listed already (`fd` is then not a TCP socket there).
fn states_of_netns(
    fd: BorrowedFd<'_>,
    listed: &mut Vec<u64>,
) -> Result<Option<HashMap<u64, DiagState>>, RepairError> {
    let namespace = so::socket_netns(fd).map_err(|error| not_connected(fd, error))?;
    let path = format!("/proc/self/fd/{}", namespace.as_raw_fd());
    let netns = Netns::open(&path)?;
    if listed.contains(&netns.inode()) {
        return Ok(None);
    }
    listed.push(netns.inode());
    netns
        .run(diag::socket_states)?
        .map(Some)
        .map_err(|source| RepairError::Diag {
            netns: format!("of socket fd {}", fd.as_raw_fd()),
            source,
        })
}

fn not_connected(fd: BorrowedFd<'_>, error: io::Error) -> RepairError {
    RepairError::NotConnected {
        fd: fd.as_raw_fd(),
        error,
    }
}

/// One socket's dump: `entered` is set once it is in repair mode (and must leave it on error).
struct Outcome {
    entered: Option<(Tuple, SocketOptions)>,
    result: Result<Connection, RepairError>,
}

impl Outcome {
    fn failed(error: RepairError) -> Self {
        Self {
            entered: None,
            result: Err(error),
        }
    }
}

/// Options (SO_REUSEADDR must be read before repair mode forces it on), TCP_REPAIR=1, then the
/// repair state; None when `states` does not hold the socket (another namespace).
fn dump_one(fd: BorrowedFd<'_>, states: &HashMap<u64, DiagState>) -> Option<Outcome> {
    let cookie = match so::get::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE) {
        Ok(cookie) => cookie,
        Err(error) => return Some(Outcome::failed(not_connected(fd, error))),
    };
    let diag = states.get(&cookie)?;
    let tuple = diag.tuple;
    if !diag.state.repairable() {
        return Some(Outcome::failed(RepairError::UnsupportedState {
            tuple,
            state: diag.state,
        }));
    }
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple,
            phase: Phase::Dump,
            op,
            error: source,
        }
    };
    let entered = read_options(fd, diag)
        .map_err(fail("reading socket options"))
        .and_then(|options| {
            so::set_repair(fd, so::REPAIR_ON).map_err(fail("TCP_REPAIR=1"))?;
            Ok(options)
        });
    Some(match entered {
        Ok(options) => Outcome {
            entered: Some((tuple, options)),
            result: read_state(fd, diag, options),
        },
        Err(error) => Outcome::failed(error),
    })
}

/// The options sock_diag does not report; mark, TOS and buffer sizes come from `diag`.
fn read_options(fd: BorrowedFd<'_>, diag: &DiagState) -> io::Result<SocketOptions> {
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
    let ipv4 = diag.tuple.local.is_ipv4();
    // sock_diag reports the traffic class of an AF_INET6 socket, but a v4-mapped connection
    // sends with its IP_TOS, restored on an AF_INET socket.
    let tos = if ipv4 && diag.ipv6_socket {
        let (level, name) = tos_option(true);
        so::get_int(fd, level, name)? as u8
    } else {
        diag.tos
    };
    // Only needed, and so only kept, for a queue that holds bytes.
    let buffer = |size, queued| if queued == 0 { 0 } else { size };
    Ok(SocketOptions {
        nodelay: flag(libc::SOL_TCP, libc::TCP_NODELAY)?,
        keepalive,
        user_timeout_ms: so::get_int(fd, libc::SOL_TCP, libc::TCP_USER_TIMEOUT)? as u32,
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        nonblocking: so::is_nonblocking(fd)?,
        sndbuf: buffer(diag.sndbuf, diag.outq),
        rcvbuf: buffer(diag.rcvbuf, diag.inq),
        mark: diag.mark,
        tos,
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

/// The per-socket repair state, in repair mode.
fn read_state(
    fd: BorrowedFd<'_>,
    diag: &DiagState,
    options: SocketOptions,
) -> Result<Connection, RepairError> {
    let tuple = diag.tuple;
    let fail = |op| {
        move |source| RepairError::Socket {
            tuple,
            phase: Phase::Dump,
            op,
            error: source,
        }
    };
    let mss = so::get_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG).map_err(fail("TCP_MAXSEG"))?;
    let timestamps = diag.options & so::TCPI_OPT_TIMESTAMPS != 0;
    // Only restored when the connection uses timestamps.
    let timestamp: u32 = if timestamps {
        so::get(fd, libc::SOL_TCP, so::TCP_TIMESTAMP).map_err(fail("TCP_TIMESTAMP"))?
    } else {
        0
    };
    // Our FIN takes one sequence number and counts in the queue lengths, but carries no data.
    let fin = u32::from(diag.state.fin_sent());
    so::select_queue(fd, Queue::Send).map_err(fail("TCP_REPAIR_QUEUE=SEND"))?;
    let write_seq: u32 =
        so::get(fd, libc::SOL_TCP, so::TCP_QUEUE_SEQ).map_err(fail("TCP_QUEUE_SEQ (send)"))?;
    let send_queue = peek(fd, tuple, "send", diag.outq.saturating_sub(fin))?;
    so::select_queue(fd, Queue::Recv).map_err(fail("TCP_REPAIR_QUEUE=RECV"))?;
    let recv_seq: u32 =
        so::get(fd, libc::SOL_TCP, so::TCP_QUEUE_SEQ).map_err(fail("TCP_QUEUE_SEQ (receive)"))?;
    let recv_queue = peek(fd, tuple, "receive", diag.inq)?;
    let window: RepairWindow =
        so::get(fd, libc::SOL_TCP, so::TCP_REPAIR_WINDOW).map_err(fail("TCP_REPAIR_WINDOW"))?;
    Ok(Connection {
        tuple,
        state: diag.state,
        send_seq: write_seq.wrapping_sub(fin),
        recv_seq,
        window,
        negotiated: Negotiated {
            timestamps,
            sack: diag.options & so::TCPI_OPT_SACK != 0,
            wscale: (diag.options & so::TCPI_OPT_WSCALE != 0)
                .then_some((diag.wscales & 0xf, diag.wscales >> 4)),
            mss: mss as u16,
        },
        timestamp,
        options,
        send_queue,
        unsent: diag.notsent.saturating_sub(fin),
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
