//! The sockets of a dump before the freeze: taken, their application's options read, and
//! (with a pre-copy) their quiet connections read ahead.
use std::{
    collections::HashMap,
    io,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    time::Duration,
};

use bytes::Bytes;

use super::{
    leave_repair,
    read::{not_connected, peek, socket_netns, tos_option, with_send_queue, with_state},
};
use crate::{
    net::Netns,
    repair::{
        self, Connection, Keepalive, RepairError, SocketOptions, SocketState, TcpState, Workers,
    },
    sys::tcp_repair::{self as so, Queue},
    tuple::Tuple,
};

/// Sockets taken for a dump, with their cookies and the options only their application changes
/// (TCP_NODELAY, keepalive, TCP_USER_TIMEOUT, SO_REUSEADDR, O_NONBLOCK, TOS) already read: once the
/// application is stopped these hold still, so they are read before the freeze ([`prepare_dump`],
/// and [`reread_options`](Self::reread_options) for sockets taken while it ran), and the blackout
/// pays only for one pass of the [`StateReader`](repair::StateReader) over the namespace and
/// repair mode on each socket.
pub struct PreparedDump {
    pub(super) sockets: Vec<PreparedSocket>,
    pub(super) workers: Workers,
}

pub(super) struct PreparedSocket {
    pub(super) fd: OwnedFd,
    pub(super) cookie: u64,
    /// Without what the state reader gives at dump time (buffers, mark) and TOS.
    pub(super) options: SocketOptions,
    /// IP_TOS, and IPV6_TCLASS for an AF_INET6 socket: which one the connection uses depends on
    /// whether it is v4-mapped, known from its tuple at dump time.
    pub(super) tos: u8,
    pub(super) tclass: Option<u8>,
    /// Set by [`PreparedDump::precopy`], which leaves the socket in repair mode. Boxed: most
    /// sockets have none, and at 50,000 a hundred bytes each would be 5 MB.
    pub(super) precopied: Option<Box<Precopied>>,
}

/// What the pre-copy read of a socket: its tuple, and its receive queue with where it ended
/// (rcv_nxt). While neither that end nor the queue's length moves, nothing was received or read
/// since and the queue holds the same bytes, which the dump takes from here instead of a peek
/// in the blackout.
pub(super) struct Precopied {
    pub(super) tuple: Tuple,
    pub(super) rcv_nxt: u32,
    pub(super) recv_queue: Bytes,
}

impl PreparedDump {
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The network namespace of the sockets (of the first one: a migration's share one), for
    /// a reader pass before the freeze.
    pub fn netns(&self) -> Result<Netns, RepairError> {
        let first = self
            .sockets
            .first()
            .ok_or_else(|| RepairError::NotConnected {
                fd: -1,
                error: io::Error::other("no socket to dump"),
            })?;
        socket_netns(first.fd.as_fd())
    }

    /// The pre-copy: the connections as they stand in `states` (one reader pass, made before
    /// the freeze, once the application is stopped), for a restore ahead of the freeze (see
    /// [`restore_ahead`](repair::restore_ahead)). Only ESTABLISHED connections with an empty
    /// send queue: only repair mode shows that queue, and selecting it would stall a live
    /// connection's sending. Their receive queues are peeked and kept, so that the dump reuses
    /// those that did not move since, and they enter repair mode now, which a live idle
    /// connection does not notice (it receives, acknowledges and runs its timers as before; only
    /// its stopped application could tell), so that the dump does not pay for it either.
    /// Dropping the prepared dump takes them out of repair mode again. Only connections that
    /// sent and received nothing for at least `quiet` are taken: a busy one would likely move
    /// before the freeze, and then costs more than without a pre-copy (its pre-copied socket is
    /// replaced in the blackout). A socket that cannot be read is left out (the dump reads it in
    /// full), and so are those pre-copied already.
    pub fn precopy(
        &mut self,
        states: &HashMap<u64, SocketState>,
        quiet: Duration,
    ) -> Vec<Connection> {
        let read = repair::sharded(self.workers, &self.sockets, |batch| {
            batch
                .iter()
                .map(|socket| {
                    let state = states.get(&socket.cookie)?;
                    if socket.precopied.is_some()
                        || state.state != TcpState::Established
                        || state.outq != 0
                        || Duration::from_millis(state.quiet_ms.into()) < quiet
                    {
                        return None;
                    }
                    let fd = socket.fd.as_fd();
                    let recv_queue = peek(fd, state.tuple, Queue::Recv, state.inq, false).ok()?;
                    let conn = with_send_queue(fd, state, recv_queue, with_state(socket, state));
                    let conn = conn.ok()?;
                    so::set_repair(fd, so::REPAIR_ON).ok()?;
                    Some(conn)
                })
                .collect::<Vec<_>>()
        });
        let mut connections = Vec::new();
        for (socket, conn) in self.sockets.iter_mut().zip(read.into_iter().flatten()) {
            if let Some(conn) = conn {
                socket.precopied = Some(Box::new(Precopied {
                    tuple: conn.tuple,
                    rcv_nxt: conn.recv_seq,
                    recv_queue: conn.recv_queue.clone(),
                }));
                connections.push(conn);
            }
        }
        connections
    }
}

impl Drop for PreparedDump {
    /// Takes the pre-copied sockets out of repair mode: the connections carry on.
    fn drop(&mut self) {
        self.sockets.iter().for_each(PreparedSocket::release);
    }
}

impl PreparedSocket {
    /// Out of repair mode if the pre-copy put it there: the connection carries on.
    fn release(&self) {
        if let Some(precopied) = &self.precopied
            && let Err(error) =
                leave_repair(self.fd.as_fd(), precopied.tuple, self.options.reuseaddr)
        {
            tracing::warn!(%error, "rolling back a pre-copied socket");
        }
    }
}

impl PreparedDump {
    /// Keeps the sockets `keep` selects by their index, in order; the others are released and
    /// their fds closed: a socket its application closed since it was taken then closes as the
    /// application asked.
    pub fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let sockets = std::mem::take(&mut self.sockets);
        for (k, socket) in sockets.into_iter().enumerate() {
            if keep(k) {
                self.sockets.push(socket);
            } else {
                socket.release();
            }
        }
    }

    /// Our fd of each socket, in order.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.sockets.iter().map(|socket| socket.fd.as_fd())
    }

    /// Adds the sockets of `other`, prepared later, after these.
    pub fn append(&mut self, mut other: PreparedDump) {
        self.sockets.append(&mut other.sockets);
    }

    /// Reads again what only the application changes, for a dump prepared while it ran (it may
    /// have set an option since; once it is stopped they hold still). Returns the index and
    /// SO_REUSEADDR of each socket whose options changed.
    pub fn reread_options(&mut self) -> Result<Vec<(usize, bool)>, RepairError> {
        let read = repair::sharded(self.workers, &self.sockets, |batch| {
            batch
                .iter()
                .map(|socket| read_options(socket.fd.as_fd(), socket.tclass.is_some()))
                .collect::<Vec<_>>()
        });
        let mut changed = Vec::new();
        let read = read.into_iter().flatten();
        for (k, (socket, read)) in self.sockets.iter_mut().zip(read).enumerate() {
            let now = read.map_err(|error| not_connected(socket.fd.as_fd(), error))?;
            if now != (socket.options, socket.tos, socket.tclass) {
                (socket.options, socket.tos, socket.tclass) = now;
                changed.push((k, socket.options.reuseaddr));
            }
        }
        Ok(changed)
    }
}

/// Reads what only the sockets' application changes, sharded like the dump: call it once the
/// application is stopped, before the freeze, or earlier and then
/// [`reread_options`](PreparedDump::reread_options) once it is stopped. Changes nothing on the
/// sockets.
///
/// # Examples
/// The dump of a process's connections on one service: taken, prepared, then (once their
/// traffic is frozen, see [`crate::freeze`]) put into repair mode and read. They stay in repair
/// mode until the commit (or the rollback, which dropping `dumped` also does).
/// ```no_run
/// use tcpmig::{
///     image,
///     net::Netns,
///     repair::{self, Filter, StateReader, Workers},
/// };
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (pid, service) = (1234, "192.0.2.1:80".parse()?);
/// let netns = Netns::open(&format!("/proc/{pid}/ns/net"))?;
/// let found = repair::discover(&netns, pid, &Filter::service(service))?;
/// let mut reader = StateReader::load(Some(service.port()))?;
/// let prepared = repair::prepare_dump(Workers::PerCpu, found.into_fds())?;
/// // Freeze the service here: the blackout starts.
/// let dumped = prepared.dump(&mut reader)?;
/// let image = image::encode(dumped.connections());
/// // Restore `image` elsewhere, then close these sockets without a FIN:
/// dumped.commit();
/// # drop(image);
/// # Ok(())
/// # }
/// ```
pub fn prepare_dump(workers: Workers, fds: Vec<OwnedFd>) -> Result<PreparedDump, RepairError> {
    repair::check_net_admin()?;
    let read = repair::sharded(workers, &fds, |batch| {
        batch
            .iter()
            .map(|fd| prepare_one(fd.as_fd()))
            .collect::<Vec<_>>()
    });
    let mut sockets = Vec::with_capacity(fds.len());
    for (fd, read) in fds.into_iter().zip(read.into_iter().flatten()) {
        let (cookie, options, tos, tclass) =
            read.map_err(|error| not_connected(fd.as_fd(), error))?;
        sockets.push(PreparedSocket {
            fd,
            cookie,
            options,
            tos,
            tclass,
            precopied: None,
        });
    }
    Ok(PreparedDump { sockets, workers })
}

/// Cookie, then the options only the application changes.
fn prepare_one(fd: BorrowedFd<'_>) -> io::Result<(u64, SocketOptions, u8, Option<u8>)> {
    let cookie = so::get::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE)?;
    let ipv6 = so::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)? == libc::AF_INET6;
    let (options, tos, tclass) = read_options(fd, ipv6)?;
    Ok((cookie, options, tos, tclass))
}

/// The options only the application changes, with TOS and (on an AF_INET6 socket) TCLASS.
/// SO_REUSEADDR must be read before repair mode, which forces it on.
fn read_options(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<(SocketOptions, u8, Option<u8>)> {
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
    let options = SocketOptions {
        nodelay: flag(libc::SOL_TCP, libc::TCP_NODELAY)?,
        keepalive,
        user_timeout_ms: so::get_int(fd, libc::SOL_TCP, libc::TCP_USER_TIMEOUT)? as u32,
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        nonblocking: so::is_nonblocking(fd)?,
        ..SocketOptions::default()
    };
    let (level, name) = tos_option(true);
    let tos = so::get_int(fd, level, name)? as u8;
    let tclass = if ipv6 {
        let (level, name) = tos_option(false);
        Some(so::get_int(fd, level, name)? as u8)
    } else {
        None
    };
    Ok((options, tos, tclass))
}
