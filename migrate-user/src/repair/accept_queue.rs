//! Connections a stopped application's kernel completed but the application did not accept:
//! they wait in its listeners' accept queues, in no fd table, so a dump that reads fd tables
//! misses them and their clients are reset once the address moves. Repair cannot restore a
//! socket into a listener's queue, but it can take one out: the migration accept()s them itself,
//! from its own copy of the application's listener, and moves them as ready connections.
//!
//! Handshakes are let finish first. Once new SYNs are held, a handshake the source answered
//! before (a request socket waiting for the client's ACK) or an outgoing connect waiting for its
//! SYN-ACK ends within a round trip: it then lands in the accept queue, or as ESTABLISHED in the
//! fd table, where it moves.
use std::{
    collections::HashMap,
    net::TcpListener,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use super::{DiagSocket, Filter, RepairError, TakenSocket, TcpState, diag, discover};
use crate::net::Netns;

/// sock_diag state bits of handshakes in progress: SYN_SENT, SYN_RECV (a Fast Open child) and
/// the request sockets a listener answered (TCP_NEW_SYN_RECV, 12; listed as SYN_RECV).
const HANDSHAKE_STATES: u32 = 1 << 2 | 1 << 3 | 1 << 12;

/// How long handshakes get to finish: a round trip, with room. One whose client lost its ACK
/// waits a SYN-ACK retransmission (a second): not worth holding the application that long; it
/// is named as unmovable instead.
pub const HANDSHAKE_BOUND: Duration = Duration::from_millis(100);

/// Listeners (LISTEN).
const LISTENING: u32 = 1 << 10;

/// Between two checks of the handshakes or the queues.
const HANDSHAKE_POLL: Duration = Duration::from_millis(1);

/// What waits for a migration's services at one moment: handshakes in progress, and
/// connections queued in their listeners.
#[derive(Debug, Default)]
pub struct Waiting {
    /// Handshakes not complete (SYN_SENT, SYN_RECV, request sockets).
    pub handshakes: usize,
    /// The services' listeners with connections queued (`queued`: how many).
    pub listeners: Vec<DiagSocket>,
}

impl Waiting {
    fn of(listed: Vec<DiagSocket>, filter: &Filter) -> Self {
        let mut waiting = Self::default();
        for socket in listed {
            if socket.state != TcpState::Listen {
                waiting.handshakes += usize::from(filter.matches(&socket.tuple));
            } else if socket.queued > 0 && filter.matches_local(socket.tuple.local) {
                waiting.listeners.push(socket);
            }
        }
        waiting
    }

    /// Connections queued in the listeners.
    pub fn queued(&self) -> usize {
        self.listeners.iter().map(|l| l.queued as usize).sum()
    }

    /// No handshake in progress and no connection queued.
    pub fn is_empty(&self) -> bool {
        self.handshakes == 0 && self.listeners.is_empty()
    }
}

/// Waits, up to `bound`, until `done` holds for what waits for `filter`'s services in `netns`;
/// returns what waits then. One sock_diag listing of the handshakes and listeners a
/// millisecond, from one thread in the namespace: when nothing waits, one listing in all.
pub fn wait_until(
    netns: &Netns,
    filter: &Filter,
    bound: Duration,
    done: impl Fn(&Waiting) -> bool + Sync,
) -> Result<Waiting, RepairError> {
    let deadline = Instant::now() + bound;
    netns.run(|| {
        loop {
            let listed = diag::tcp_sockets_in(HANDSHAKE_STATES | LISTENING).map_err(|source| {
                RepairError::Diag {
                    netns: netns.spec().to_owned(),
                    source,
                }
            })?;
            let waiting = Waiting::of(listed, filter);
            if done(&waiting) || Instant::now() >= deadline {
                return Ok(waiting);
            }
            std::thread::sleep(HANDSHAKE_POLL);
        }
    })?
}

/// How many connections to accept from each listener (by socket inode) of a service: those
/// waiting in its queue when listed. An accept queue is first in, first out, so accepting that
/// many takes exactly them, even if more arrive meanwhile.
#[derive(Debug, Default)]
pub struct AcceptPlan(HashMap<u64, usize>);

impl AcceptPlan {
    /// The listeners of `waiting` (of `filter`'s services in `netns`) with connections queued.
    /// A listener is left out (its connections stay unmovable) when a queued connection on its
    /// port is not on a service (a wildcard listener also serving another address): taking it
    /// would end a connection that is not ours. A filter naming 4-tuples plans nothing, for the
    /// same reason. Lists every socket only if a listener has connections queued.
    pub fn list(netns: &Netns, filter: &Filter, waiting: &Waiting) -> Result<Self, RepairError> {
        if waiting.listeners.is_empty() || filter.picks() {
            return Ok(Self::default());
        }
        let listeners = &waiting.listeners;
        let queued: Vec<DiagSocket> = super::list_tcp_sockets(netns)?
            .into_iter()
            .filter(|s| s.inode == 0 && s.state.repairable())
            .collect();
        let plan = listeners
            .iter()
            .filter(|listener| {
                let port = listener.tuple.local.port();
                (queued.iter())
                    .filter(|s| s.tuple.local.port() == port)
                    .all(|s| filter.matches(&s.tuple))
            })
            .map(|listener| (listener.inode, listener.queued as usize))
            .collect();
        Ok(Self(plan))
    }

    /// Nothing to accept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Accepts the planned connections of `pid`'s listeners (fd number and inode each) into
    /// this process, from our copies of the listeners: `pid` must be stopped, so that nothing
    /// else accepts meanwhile. They come with `source_fd` -1: the process never held them.
    pub fn take(
        &self,
        pid: u32,
        listeners: &[(i32, u64)],
        filter: &Filter,
    ) -> Result<Vec<TakenSocket>, RepairError> {
        let planned: Vec<(i32, usize)> = (listeners.iter())
            .filter_map(|(fd, inode)| Some((*fd, *self.0.get(inode)?)))
            .collect();
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        let pidfd = discover::pidfd_open(pid)?;
        let mut taken = Vec::new();
        for (fd, count) in planned {
            let listener = TcpListener::from(discover::pidfd_getfd(&pidfd, pid, fd)?);
            let error = |source| RepairError::Process {
                pid,
                what: format!("accepting a queued connection from its listener at fd {fd}"),
                source,
            };
            for _ in 0..count {
                // Readable while a connection waits: accept() never blocks, even on a blocking
                // listener. A connection reset while queued has left the queue.
                if !crate::sys::wait_readable(&listener, Instant::now()) {
                    break;
                }
                let (socket, _) = listener.accept().map_err(error)?;
                let (file, identity) =
                    discover::tcp_identity(OwnedFd::from(socket)).map_err(error)?;
                if let Some((tuple, state)) = identity.filter(|(t, _)| filter.matches(t)) {
                    taken.push(TakenSocket {
                        tuple,
                        state,
                        source_fd: -1,
                        fd: file,
                    });
                }
            }
        }
        Ok(taken)
    }
}
