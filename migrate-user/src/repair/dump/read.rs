//! The dump proper, in the blackout: one pass of the state reader over the sockets' namespace,
//! then repair mode on each socket and a peek of each queue that holds bytes.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use bytes::Bytes;

use super::{DumpedSockets, PreparedDump, leave_repair, prepare::PreparedSocket};
use crate::{
    net::Netns,
    repair::{
        self, Connection, Negotiated, Phase, RepairError, SocketOptions, SocketState, StateReader,
    },
    sys::tcp_repair::{self as so, Queue},
    tuple::Tuple,
};

impl PreparedDump {
    /// Dumps the sockets. Their traffic must be frozen (see the freeze plane): repair mode alone
    /// does not stop a socket from receiving and sending. On error every socket is taken out of
    /// repair mode again and the error names the first connection that failed.
    ///
    /// One pass of the state reader over the sockets' namespace gives each socket's addresses,
    /// state, sequence numbers, window, negotiated options, queue lengths, buffers and mark;
    /// each socket then costs repair on, and two calls per queue that holds bytes (selection
    /// and peek). Sockets of another namespace than the first's are found by further passes,
    /// one per namespace.
    pub fn dump(self, reader: &mut StateReader) -> Result<DumpedSockets, RepairError> {
        let mut outcomes: Vec<Option<Outcome>> = self.sockets.iter().map(|_| None).collect();
        let mut listed = Vec::new();
        // Each round settles the first socket not dumped yet, or reads one more namespace.
        for _ in 0..=2 * self.sockets.len() {
            let Some(first) = outcomes.iter().position(Option::is_none) else {
                break;
            };
            let fd = self.sockets[first].fd.as_fd();
            match states_of_netns(fd, reader, &mut listed) {
                Ok(Some(states)) => self.dump_found(&states, &mut outcomes),
                Ok(None) => {
                    outcomes[first] = Some(Outcome::failed(not_connected(
                        fd,
                        io::Error::other(
                            "not among the TCP sockets of its namespace (on the reader's port)",
                        ),
                    )));
                }
                Err(error) => {
                    for outcome in outcomes.iter_mut().skip(first + 1).filter(|o| o.is_none()) {
                        *outcome = Some(Outcome::failed(RepairError::StateIterator {
                            netns: Some("of an earlier socket".to_owned()),
                            error: io::Error::other("not dumped"),
                        }));
                    }
                    outcomes[first] = Some(Outcome::failed(error));
                }
            }
        }
        self.settle(outcomes, false)
    }

    /// [`dump`](Self::dump) with the states of one pass of the reader, made after the freeze:
    /// several dumps of one namespace (the shards of a migration) share one pass. A socket not
    /// in `states` fails the dump. A socket in a state repair does not handle (its peer closed it
    /// since it was taken: CLOSE) is left to its application, as a discovery leaves it,
    /// and listed in [`DumpedSockets::skipped`].
    pub fn dump_read(
        self,
        states: &HashMap<u64, SocketState>,
    ) -> Result<DumpedSockets, RepairError> {
        // Settled batch by batch as they come: no second array of outcomes (50,000 of them
        // are 14 MB).
        let batches = repair::sharded(self.workers, &self.sockets, |batch| {
            batch
                .iter()
                .map(|socket| dump_one(socket, states))
                .collect::<Vec<_>>()
        });
        self.settle(batches.into_iter().flatten(), true)
    }

    /// Dumps the sockets not settled yet that `states` holds.
    fn dump_found(&self, states: &HashMap<u64, SocketState>, outcomes: &mut [Option<Outcome>]) {
        let todo: Vec<(usize, &PreparedSocket)> = self
            .sockets
            .iter()
            .enumerate()
            .filter(|(i, _)| outcomes[*i].is_none())
            .collect();
        let results = repair::sharded(self.workers, &todo, |batch| {
            batch
                .iter()
                .map(|(_, socket)| dump_one(socket, states))
                .collect::<Vec<_>>()
        });
        for ((i, _), result) in todo.iter().zip(results.into_iter().flatten()) {
            outcomes[*i] = result;
        }
    }

    /// The dumped sockets, or the first error after taking every socket out of repair mode.
    /// With `leave_unsupported`, a socket in a state repair does not handle is no error: it is
    /// left out (out of repair mode if the pre-copy put it there) and listed as skipped.
    fn settle(
        mut self,
        outcomes: impl IntoIterator<Item = Option<Outcome>>,
        leave_unsupported: bool,
    ) -> Result<DumpedSockets, RepairError> {
        let sockets = std::mem::take(&mut self.sockets);
        let workers = self.workers;
        let mut connections = Vec::with_capacity(sockets.len());
        let mut first_error = None;
        let mut in_repair = Vec::with_capacity(sockets.len());
        let mut skipped = Vec::new();
        for (socket, outcome) in sockets.into_iter().zip(outcomes) {
            let fd = socket.fd;
            let outcome = outcome.unwrap_or_else(|| {
                Outcome::failed(not_connected(
                    fd.as_fd(),
                    io::Error::other("not among the TCP sockets the state reader found"),
                ))
            });
            match outcome.result {
                Ok(conn) => {
                    connections.push(conn);
                    in_repair.push(fd);
                }
                Err(error) => {
                    let entered = outcome
                        .entered
                        .or(socket.precopied.as_ref().map(|p| p.tuple));
                    if let Some(tuple) = entered
                        && let Err(rollback) =
                            leave_repair(fd.as_fd(), tuple, socket.options.reuseaddr)
                    {
                        tracing::warn!(%rollback, "rolling back a socket whose dump failed");
                    }
                    match error {
                        RepairError::UnsupportedState { tuple, state } if leave_unsupported => {
                            skipped.push((tuple, state));
                        }
                        error => {
                            first_error.get_or_insert(error);
                        }
                    }
                }
            }
        }
        let dumped = DumpedSockets {
            fds: in_repair,
            connections,
            skipped,
            workers,
        };
        match first_error {
            // Dropping `dumped` rolls the others back.
            Some(error) => Err(error),
            None => Ok(dumped),
        }
    }
}

/// The states of the namespace `fd` belongs to, or None when that namespace was read already
/// (`fd` is then not a TCP socket there).
fn states_of_netns(
    fd: BorrowedFd<'_>,
    reader: &mut StateReader,
    listed: &mut Vec<u64>,
) -> Result<Option<HashMap<u64, SocketState>>, RepairError> {
    let netns = socket_netns(fd)?;
    if listed.contains(&netns.inode()) {
        return Ok(None);
    }
    listed.push(netns.inode());
    reader.read(&netns).map(Some)
}

/// The network namespace `fd` belongs to. Through thread-self: the calling thread may have an
/// fd table of its own (a [`Shard`](crate::shard::Shard)).
pub(super) fn socket_netns(fd: BorrowedFd<'_>) -> Result<Netns, RepairError> {
    let namespace = so::socket_netns(fd).map_err(|error| not_connected(fd, error))?;
    Ok(Netns::open(&format!(
        "/proc/thread-self/fd/{}",
        namespace.as_raw_fd()
    ))?)
}

pub(super) fn not_connected(fd: BorrowedFd<'_>, error: io::Error) -> RepairError {
    RepairError::NotConnected {
        fd: fd.as_raw_fd(),
        error,
    }
}

/// One socket's dump: `entered` is set once it is in repair mode (and must leave it on error).
struct Outcome {
    entered: Option<Tuple>,
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

/// The receive queue's bytes, TCP_REPAIR=1, the send queue's bytes, and the options completed
/// from `state`; None when `states` does not hold the socket (another namespace).
fn dump_one(socket: &PreparedSocket, states: &HashMap<u64, SocketState>) -> Option<Outcome> {
    let fd = socket.fd.as_fd();
    let state = states.get(&socket.cookie)?;
    let tuple = state.tuple;
    if !state.state.repairable() {
        return Some(Outcome::failed(RepairError::UnsupportedState {
            tuple,
            state: state.state,
        }));
    }
    // A pre-copied socket is in repair mode already; the others are read before it, as any
    // reader would: no queue to select.
    let in_repair = socket.precopied.is_some();
    let unmoved = socket
        .precopied
        .as_ref()
        .filter(|p| (p.rcv_nxt, p.recv_queue.len()) == (state.rcv_nxt, state.inq as usize));
    let recv_queue = match unmoved {
        Some(precopied) => precopied.recv_queue.clone(),
        None => match peek(fd, tuple, Queue::Recv, received_data(state), in_repair) {
            Ok(bytes) => bytes,
            Err(error) => return Some(Outcome::failed(error)),
        },
    };
    if !in_repair && let Err(error) = so::set_repair(fd, so::REPAIR_ON) {
        return Some(Outcome::failed(RepairError::socket(
            tuple,
            Phase::Dump,
            "TCP_REPAIR=1",
        )(error)));
    }
    Some(Outcome {
        entered: Some(tuple),
        result: with_send_queue(fd, state, recv_queue, with_state(socket, state)),
    })
}

/// The socket's options with what the state reader gives: mark, buffer sizes, and the TOS the
/// connection sends with (IP_TOS for IPv4 and v4-mapped connections, the traffic class for
/// IPv6 ones).
pub(super) fn with_state(socket: &PreparedSocket, state: &SocketState) -> SocketOptions {
    // Only needed, and so only kept, for a queue that holds bytes.
    let buffer = |size, queued| if queued == 0 { 0 } else { size };
    let tos = match socket.tclass {
        Some(tclass) if !state.tuple.local.is_ipv4() => tclass,
        _ => socket.tos,
    };
    SocketOptions {
        sndbuf: buffer(state.sndbuf, state.outq),
        rcvbuf: buffer(state.rcvbuf, state.inq),
        mark: state.mark,
        tos,
        ..socket.options
    }
}

/// IP_TOS for IPv4 sockets, IPV6_TCLASS for IPv6 ones.
pub(in crate::repair) fn tos_option(ipv4: bool) -> (libc::c_int, libc::c_int) {
    if ipv4 {
        (libc::SOL_IP, libc::IP_TOS)
    } else {
        (libc::SOL_IPV6, libc::IPV6_TCLASS)
    }
}

/// The connection from `state` and its queues; the send queue is read here, in repair mode
/// (only repair mode shows it).
pub(super) fn with_send_queue(
    fd: BorrowedFd<'_>,
    state: &SocketState,
    recv_queue: Bytes,
    options: SocketOptions,
) -> Result<Connection, RepairError> {
    let tuple = state.tuple;
    // Our FIN takes one sequence number and counts in the queue lengths, but carries no data.
    let fin = u32::from(state.state.fin_sent());
    let send_queue = peek(fd, tuple, Queue::Send, state.outq.saturating_sub(fin), true)?;
    // The peer's FIN: rcv_nxt counts it, and so may the window's left edge (rcv_wup). Moved back
    // one with the right edge kept, or a restore with rcv_nxt before the FIN refuses the window.
    let peer_fin = u32::from(state.state.fin_received());
    let mut window = state.window;
    window.rcv_wup = window.rcv_wup.wrapping_sub(peer_fin);
    window.rcv_wnd += peer_fin;
    Ok(Connection {
        tuple,
        state: state.state,
        send_seq: state.write_seq.wrapping_sub(fin),
        recv_seq: state.rcv_nxt.wrapping_sub(peer_fin),
        window,
        negotiated: Negotiated {
            timestamps: state.timestamps,
            sack: state.sack,
            wscale: state.wscale,
            mss: state.mss_clamp,
        },
        // Only restored when the connection uses timestamps.
        timestamp: if state.timestamps { state.timestamp } else { 0 },
        options,
        send_queue,
        unsent: state.notsent.saturating_sub(fin),
        recv_queue,
    })
}

/// The bytes of the receive queue. The peer's FIN takes one sequence number and counts in its
/// length (rcv_nxt - copied_seq) until the application has read the end of the stream.
fn received_data(state: &SocketState) -> u32 {
    state
        .inq
        .saturating_sub(u32::from(state.state.fin_received()))
}

/// Reads `queue` without consuming it: in repair mode (always, for the send queue, which only
/// it shows) with the queue selected first, or the receive queue as any reader would. An empty
/// queue costs no call. One byte more than expected is asked for, so that data arriving during
/// the dump is noticed.
pub(super) fn peek(
    fd: BorrowedFd<'_>,
    tuple: Tuple,
    queue: Queue,
    len: u32,
    in_repair: bool,
) -> Result<Bytes, RepairError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let fail = |op| RepairError::socket(tuple, Phase::Dump, op);
    let name = match queue {
        Queue::Send => "send",
        Queue::Recv => "receive",
    };
    if in_repair {
        so::select_queue(fd, queue).map_err(fail(match queue {
            Queue::Send => "TCP_REPAIR_QUEUE=SEND",
            Queue::Recv => "TCP_REPAIR_QUEUE=RECV",
        }))?;
    }
    let data = so::peek_queue(fd, len as usize + 1).map_err(fail(match queue {
        Queue::Send => "peek of the send queue",
        Queue::Recv => "peek of the receive queue",
    }))?;
    if data.len() != len as usize {
        return Err(RepairError::QueueChanged {
            tuple,
            queue: name,
            expected: len as usize,
            got: data.len(),
        });
    }
    Ok(Bytes::from(data))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Shutdown, TcpListener, TcpStream},
        os::fd::OwnedFd,
        time::Duration,
    };

    use super::*;
    use crate::repair::{TcpState, Workers, prepare_dump};

    /// Two loopback connections, one closed by its client after it was prepared (CLOSE_WAIT at
    /// the server, with bytes unread): dump_read moves both, the closed one with its receive
    /// queue and its rcv_nxt without the peer's FIN.
    #[test]
    fn dump_read_moves_a_connection_its_peer_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let service = listener.local_addr().unwrap();
        let mut clients: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(service).unwrap())
            .collect();
        let servers: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
        let fds: Vec<OwnedFd> = (servers.iter())
            .map(|s| s.as_fd().try_clone_to_owned().unwrap())
            .collect();
        let prepared = prepare_dump(Workers::One, fds).unwrap();
        std::io::Write::write_all(&mut clients[1], b"last words").unwrap();
        clients[1].shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));

        let mut reader = StateReader::load(Some(service.port())).unwrap();
        let states = reader.read(&Netns::current().unwrap()).unwrap();
        let cookie: u64 = so::get(servers[1].as_fd(), libc::SOL_SOCKET, libc::SO_COOKIE).unwrap();
        let closed = &states[&cookie];
        let dumped = prepared.dump_read(&states).unwrap();
        assert_eq!(dumped.len(), 2);
        assert!(dumped.skipped().is_empty());
        let conn = &dumped.connections()[1];
        assert_eq!(conn.state, TcpState::CloseWait);
        assert_eq!(&conn.recv_queue[..], b"last words");
        assert_eq!(conn.recv_seq, closed.rcv_nxt.wrapping_sub(1));
        dumped.rollback().unwrap();
    }
}
