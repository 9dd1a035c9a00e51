//! Finds a process's TCP connections: sock_diag in its network namespace gives each socket's
//! 4-tuple, state and inode; /proc/PID/fd maps inodes to the process's fds; pidfd_getfd copies
//! those fds into this process. [`catch_up`] finds, once the process is stopped, the sockets it
//! opened or closed since.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
};

use super::{DiagSocket, Filter, RepairError, TcpState, diag};
use crate::{
    net::Netns,
    sys::tcp_repair as so,
    tuple::{Tuple, canonical},
};

/// A connection taken from a process: our own fd of its socket.
#[derive(Debug)]
pub struct TakenSocket {
    pub tuple: Tuple,
    pub state: TcpState,
    /// The fd number in the process it was taken from.
    pub source_fd: i32,
    pub fd: OwnedFd,
}

/// What [`discover`] found in the process.
#[derive(Debug, Default)]
pub struct Discovery {
    /// Connections to dump, in a state repair handles.
    pub sockets: Vec<TakenSocket>,
    /// Listening sockets of the process that match the filter's port or service: a migration
    /// usually wants to know that new connections are accepted there.
    pub listening: Vec<SocketAddr>,
    /// Those listeners' fd numbers in the process and socket inodes: what a migration accepts
    /// the waiting connections from ([`super::AcceptPlan`]).
    pub listeners: Vec<(i32, u64)>,
    /// Matching connections left out because of their state (SYN_SENT, SYN_RECV, CLOSE).
    pub skipped: Vec<(Tuple, TcpState)>,
    /// The socket inodes of those in a handshake (SYN_SENT, SYN_RECV): a migration looks at
    /// them again once they had a round trip to finish ([`catch_up`] takes them then).
    pub handshakes: Vec<u64>,
    /// The inode of every socket in the process's fd table, taken or not: what a later
    /// [`catch_up`] compares the table with.
    pub seen: HashSet<u64>,
}

impl Discovery {
    pub fn into_fds(self) -> Vec<OwnedFd> {
        self.sockets.into_iter().map(|s| s.fd).collect()
    }
}

/// Every TCP socket of `netns` (sock_diag, IPv4 and IPv6).
pub fn list_tcp_sockets(netns: &Netns) -> Result<Vec<DiagSocket>, RepairError> {
    netns
        .run(diag::tcp_sockets)?
        .map_err(|source| RepairError::Diag {
            netns: netns.spec().to_owned(),
            source,
        })
}

/// How many repairable connections each of `services` has in `netns`, whoever holds them, from
/// one listing: announced by a migration before it stops the application, so that the
/// destination gets sockets of each address ready for them.
pub fn count_connections(
    netns: &Netns,
    services: &[SocketAddr],
) -> Result<Vec<usize>, RepairError> {
    let filters: Vec<Filter> = services.iter().map(|&s| Filter::service(s)).collect();
    let mut counts = vec![0; services.len()];
    for socket in list_tcp_sockets(netns)?
        .iter()
        .filter(|s| s.state.repairable())
    {
        if let Some(k) = filters.iter().position(|f| f.matches(&socket.tuple)) {
            counts[k] += 1;
        }
    }
    Ok(counts)
}

/// The TCP sockets of a namespace whose local end `filter` selects, by inode: one listing
/// serves the discovery in several processes.
pub struct SocketsByInode(HashMap<u64, DiagSocket>);

impl SocketsByInode {
    pub fn list(netns: &Netns, filter: &Filter) -> Result<Self, RepairError> {
        Ok(Self(
            list_tcp_sockets(netns)?
                .into_iter()
                .filter(|s| filter.matches_local(s.tuple.local))
                .map(|s| (s.inode, s))
                .collect(),
        ))
    }
}

/// The connections of process `pid` (whose sockets live in `netns`) that `filter` selects, with
/// their fds taken into this process.
pub fn discover(netns: &Netns, pid: u32, filter: &Filter) -> Result<Discovery, RepairError> {
    discover_among(&SocketsByInode::list(netns, filter)?, netns, pid, filter)
}

/// [`discover`] among sockets listed already with the same filter.
pub fn discover_among(
    listed: &SocketsByInode,
    netns: &Netns,
    pid: u32,
    filter: &Filter,
) -> Result<Discovery, RepairError> {
    let by_inode = &listed.0;
    let mut discovery = Discovery::default();
    let mut wanted = Vec::new();
    for (fd, inode) in socket_fds(pid)? {
        // dup()ed fds share a socket: take it once.
        if !discovery.seen.insert(inode) {
            continue;
        }
        let Some(socket) = by_inode.get(&inode) else {
            continue;
        };
        if socket.state == TcpState::Listen {
            if filter.matches_local(socket.tuple.local) {
                discovery.listening.push(socket.tuple.local);
                discovery.listeners.push((fd, inode));
            }
        } else if filter.matches(&socket.tuple) {
            if socket.state.repairable() {
                wanted.push((fd, *socket));
            } else if filter.tuples.contains(&socket.tuple) {
                return Err(RepairError::UnsupportedState {
                    tuple: socket.tuple,
                    state: socket.state,
                });
            } else {
                discovery.skipped.push((socket.tuple, socket.state));
                if matches!(socket.state, TcpState::SynSent | TcpState::SynRecv) {
                    discovery.handshakes.push(inode);
                }
            }
        }
    }
    if let Some(missing) = filter
        .tuples
        .iter()
        .find(|t| !wanted.iter().any(|(_, s)| s.tuple == **t))
    {
        return Err(RepairError::NotOwned {
            tuple: *missing,
            pid,
            netns: netns.spec().to_owned(),
        });
    }
    let pidfd = pidfd_open(pid)?;
    super::raise_fd_limit();
    for (fd, socket) in wanted {
        discovery.sockets.push(TakenSocket {
            tuple: socket.tuple,
            state: socket.state,
            source_fd: fd,
            fd: pidfd_getfd(&pidfd, pid, fd)?,
        });
    }
    Ok(discovery)
}

/// What [`catch_up`] found in a stopped process's fd table.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// Connections `filter` selects that the process opened (accepted) since the discovery.
    pub sockets: Vec<TakenSocket>,
    /// Matching connections it opened since, left out because of their state.
    pub skipped: Vec<(Tuple, TcpState)>,
    /// Which of the sockets taken before it closed since (ascending indices into them).
    pub closed: Vec<usize>,
}

/// Past this many numbers in a process's fd table per socket it held at discovery, the
/// catch-up lists the table instead of probing every number.
const PROBE_RATIO: usize = 4;

/// A socket taken from the process before: its fd number there, our fd of it, its inode.
pub type Taken<'a> = (i32, BorrowedFd<'a>, u64);

/// Once `pid` is stopped, after a [`discover_among`] made while it ran, which `seen` the socket
/// inodes of its fd table and took `taken`: what it opened and closed since, without a walk of
/// /proc/PID/fd (a readlink per fd: about 30 ms at 10,000). One kcmp per taken socket tells
/// whether its fd still holds it; every other number of the fd table is probed with
/// pidfd_getfd (a free number fails at once), and a socket there that the discovery did not see
/// is identified with four calls (no sock_diag listing), so that a connection the process
/// accepted in between is moved too.
pub fn catch_up(
    pid: u32,
    taken: &[Taken<'_>],
    seen: &HashSet<u64>,
    filter: &Filter,
) -> Result<CatchUp, RepairError> {
    let size = fd_table_size(pid)?;
    let mut held = still_held(pid, taken)?;
    // A filter that picks its connections one by one takes no new socket: when each taken one
    // is still under its number, nothing else in the table matters (a rebalance that moves 10%
    // of 10,000 connections would otherwise probe 9,000 fds, about 70 ms).
    if filter.picks() && held.iter().all(|&h| h) {
        return Ok(CatchUp::default());
    }
    let mut checked = vec![false; size];
    for (&(fd, _, _), _) in taken.iter().zip(&held).filter(|(_, held)| **held) {
        if let Some(checked) = usize::try_from(fd).ok().and_then(|i| checked.get_mut(i)) {
            *checked = true;
        }
    }
    let by_inode: HashMap<u64, usize> = if held.iter().all(|&h| h) {
        HashMap::new()
    } else {
        taken.iter().enumerate().map(|(k, t)| (t.2, k)).collect()
    };
    let pidfd = pidfd_open(pid)?;
    let mut found = CatchUp::default();
    let mut new = HashSet::new();
    // An fd table grows with the highest fd ever open and never shrinks: when it is mostly
    // free, listing /proc/PID/fd (about 1 us per fd, no readlink) is cheaper than probing every
    // number (about 0.2 us each).
    let numbers = if size > PROBE_RATIO * seen.len().max(256) {
        fd_numbers(pid)?
    } else {
        (0..size).collect()
    };
    let numbers: Vec<i32> = (numbers.into_iter())
        .filter(|&fd| !checked.get(fd).unwrap_or(&false))
        .map(|fd| fd as i32)
        .collect();
    for (fd, file, inode) in probe_sockets(pid, &pidfd, &numbers)? {
        // A taken socket moved to another fd (dup2) is still held.
        if let Some(&k) = by_inode.get(&inode) {
            held[k] = true;
            continue;
        }
        // dup()ed fds share a socket: take it once.
        if seen.contains(&inode) || !new.insert(inode) {
            continue;
        }
        take_new(pid, fd, file, filter, &mut found)?;
    }
    found.closed = (0..taken.len()).filter(|&k| !held[k]).collect();
    Ok(found)
}

/// Whether each of `taken` is still in `pid`'s fd table under its number: one kcmp each, on a
/// thread per CPU. The threads share the calling thread's fd table, where our fds are (a
/// shard's own).
fn still_held(pid: u32, taken: &[Taken<'_>]) -> Result<Vec<bool>, RepairError> {
    let checked = super::sharded(super::Workers::PerCpu, taken, |batch| {
        (batch.iter())
            .map(
                |&(fd, ours, _)| match crate::sys::same_file(pid, fd, ours) {
                    Ok(same) => Ok(same),
                    Err(error) if error.raw_os_error() == Some(libc::EBADF) => Ok(false),
                    Err(source) => Err(process_error(pid, format!("kcmp of its fd {fd}"), source)),
                },
            )
            .collect::<Vec<_>>()
    });
    checked.into_iter().flatten().collect()
}

/// The sockets among `pid`'s fd `numbers`, taken into this thread's fd table with their inodes
/// (a free number fails at once), probed on a thread per CPU.
fn probe_sockets(
    pid: u32,
    pidfd: &OwnedFd,
    numbers: &[i32],
) -> Result<Vec<(i32, OwnedFd, u64)>, RepairError> {
    let probe = |fd: i32| -> Result<Option<(i32, OwnedFd, u64)>, RepairError> {
        let file = match crate::sys::pidfd_getfd(pidfd, fd) {
            Ok(file) => file,
            Err(error) if error.raw_os_error() == Some(libc::EBADF) => return Ok(None),
            Err(source) => {
                return Err(process_error(
                    pid,
                    format!("pidfd_getfd of its fd {fd}"),
                    source,
                ));
            }
        };
        let stat = nix::sys::stat::fstat(&file)
            .map_err(|errno| process_error(pid, format!("fstat of its fd {fd}"), errno.into()))?;
        let socket = stat.st_mode & libc::S_IFMT == libc::S_IFSOCK;
        Ok(socket.then_some((fd, file, stat.st_ino)))
    };
    let probed = super::sharded(super::Workers::PerCpu, numbers, |batch| {
        batch.iter().map(|&fd| probe(fd)).collect::<Vec<_>>()
    });
    let mut sockets = Vec::new();
    for found in probed.into_iter().flatten() {
        sockets.extend(found?);
    }
    Ok(sockets)
}

/// A socket the process opened since the discovery, ours as `file`: taken if `filter` selects
/// it and repair handles its state, counted as skipped if only its state is wrong.
fn take_new(
    pid: u32,
    fd: i32,
    file: OwnedFd,
    filter: &Filter,
    found: &mut CatchUp,
) -> Result<(), RepairError> {
    let (file, identity) = tcp_identity(file).map_err(|source| {
        process_error(
            pid,
            format!("identifying the socket of its fd {fd}"),
            source,
        )
    })?;
    let Some((tuple, state)) = identity.filter(|(tuple, _)| filter.matches(tuple)) else {
        return Ok(());
    };
    if state.repairable() {
        found.sockets.push(TakenSocket {
            tuple,
            state,
            source_fd: fd,
            fd: file,
        });
    } else {
        found.skipped.push((tuple, state));
    }
    Ok(())
}

/// The fd numbers `pid` holds, from the names in /proc/PID/fd.
fn fd_numbers(pid: u32) -> Result<Vec<usize>, RepairError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir)
        .map_err(|source| process_error(pid, format!("reading {dir}"), source))?;
    Ok(entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// The size of `pid`'s fd table (FDSize in /proc/PID/status): every fd it holds is below.
fn fd_table_size(pid: u32) -> Result<usize, RepairError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|source| process_error(pid, format!("reading {path}"), source))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("FDSize:"))
        .and_then(|size| size.trim().parse().ok())
        .ok_or_else(|| {
            let source = io::Error::new(io::ErrorKind::InvalidData, "no FDSize line");
            process_error(pid, format!("reading {path}"), source)
        })
}

fn process_error(pid: u32, what: String, source: io::Error) -> RepairError {
    RepairError::Process { pid, what, source }
}

/// The tuple and state of a connected TCP socket (IPv4 or IPv6); `None` for any other socket, a
/// listener or one not connected. Gives the fd back.
pub(super) fn tcp_identity(fd: OwnedFd) -> io::Result<(OwnedFd, Option<(Tuple, TcpState)>)> {
    let option = |name| so::get_int(fd.as_fd(), libc::SOL_SOCKET, name);
    let domain = option(libc::SO_DOMAIN)?;
    if option(libc::SO_PROTOCOL)? != libc::IPPROTO_TCP
        || (domain != libc::AF_INET && domain != libc::AF_INET6)
    {
        return Ok((fd, None));
    }
    // tcpi_state is the first byte of struct tcp_info.
    let info: [u8; 8] = so::get(fd.as_fd(), libc::SOL_TCP, libc::TCP_INFO)?;
    let state = TcpState::from_kernel(info[0]);
    let stream = TcpStream::from(fd);
    let addresses = stream
        .local_addr()
        .and_then(|local| Ok((local, stream.peer_addr()?)));
    let fd = OwnedFd::from(stream);
    match addresses {
        Ok((local, remote)) if state != TcpState::Listen => {
            let tuple = Tuple {
                local: canonical(local),
                remote: canonical(remote),
            };
            Ok((fd, Some((tuple, state))))
        }
        Ok(_) => Ok((fd, None)),
        Err(error) if error.raw_os_error() == Some(libc::ENOTCONN) => Ok((fd, None)),
        Err(error) => Err(error),
    }
}

/// (fd, socket inode) for every socket fd of `pid`, from the socket:[INODE] links in /proc.
fn socket_fds(pid: u32) -> Result<Vec<(i32, u64)>, RepairError> {
    let dir = format!("/proc/{pid}/fd");
    let process_error = |source| RepairError::Process {
        pid,
        what: format!("reading {dir}"),
        source,
    };
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(process_error)? {
        let entry = entry.map_err(process_error)?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // An fd closed since read_dir listed it is simply not there any more.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok());
        if let Some(inode) = inode {
            fds.push((fd, inode));
        }
    }
    Ok(fds)
}

pub(super) fn pidfd_open(pid: u32) -> Result<OwnedFd, RepairError> {
    crate::sys::pidfd_open(pid).map_err(|source| RepairError::Process {
        pid,
        what: "pidfd_open".to_owned(),
        source,
    })
}

pub(super) fn pidfd_getfd(pidfd: &OwnedFd, pid: u32, fd: i32) -> Result<OwnedFd, RepairError> {
    crate::sys::pidfd_getfd(pidfd, fd).map_err(|source| RepairError::Process {
        pid,
        what: format!("pidfd_getfd of its fd {fd}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd as _,
        process::{Command, Stdio},
        time::{Duration, Instant},
    };

    use super::*;

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    /// A dual-stack service: connections on either address, a wildcard listener of its port;
    /// nothing else.
    #[test]
    fn a_filter_of_several_services_takes_each() {
        let services: Vec<SocketAddr> = ["10.0.0.1:80", "[fd00::1]:443"]
            .map(|s| s.parse().unwrap())
            .to_vec();
        let filter = Filter::services(&services);
        for local in ["10.0.0.1:80", "[fd00::1]:443", "[::]:80", "0.0.0.0:443"] {
            assert!(filter.matches_local(local.parse().unwrap()), "{local}");
        }
        for local in ["10.0.0.1:443", "[fd00::1]:80", "10.0.0.2:80", "0.0.0.0:22"] {
            assert!(!filter.matches_local(local.parse().unwrap()), "{local}");
        }
    }

    fn taken(discovery: &Discovery) -> Vec<Taken<'_>> {
        (discovery.sockets.iter())
            .map(|t| (t.source_fd, t.fd.as_fd(), inode(t.fd.as_fd())))
            .collect()
    }

    /// Discovery in this process, then one more connection accepted: the catch-up takes it.
    #[test]
    fn catch_up_takes_a_connection_accepted_since() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let service = listener.local_addr().unwrap();
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(service).unwrap())
            .collect();
        let _servers: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
        let pid = std::process::id();
        let netns = Netns::open(&format!("/proc/{pid}/ns/net")).unwrap();
        let filter = Filter::service(service);
        let discovery = discover(&netns, pid, &filter).unwrap();
        assert_eq!(discovery.sockets.len(), 2);
        let taken = taken(&discovery);
        let nothing = catch_up(pid, &taken, &discovery.seen, &filter).unwrap();
        assert!(nothing.sockets.is_empty() && nothing.closed.is_empty());

        let accepted = listener.accept().unwrap().0;
        let found = catch_up(pid, &taken, &discovery.seen, &filter).unwrap();
        assert!(found.closed.is_empty() && found.skipped.is_empty());
        assert_eq!(found.sockets.len(), 1);
        let new = &found.sockets[0];
        assert_eq!(new.source_fd, accepted.as_raw_fd());
        assert_eq!(new.tuple.remote, clients[2].local_addr().unwrap());
        assert_eq!(new.state, TcpState::Established);
    }

    /// A child holding two connections closes one after the discovery: the catch-up says so (in
    /// this process our own fds would still hold the socket).
    #[test]
    fn catch_up_lets_go_of_a_connection_closed_since() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let service = listener.local_addr().unwrap();
        let _clients: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(service).unwrap())
            .collect();
        let servers: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
        // Inherited by the child at the same numbers.
        for server in &servers {
            let inherit = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty());
            nix::fcntl::fcntl(server, inherit).unwrap();
        }
        let closing = servers[0].as_raw_fd();
        let script = format!("echo ready; read x; exec {closing}>&-; echo closed; read y");
        let mut command = Command::new("sh");
        command.args(["-c", &script]);
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        drop(servers);
        let pid = child.id();
        let netns = Netns::open(&format!("/proc/{pid}/ns/net")).unwrap();
        let filter = Filter::service(service);
        let discovery = discover(&netns, pid, &filter).unwrap();
        assert_eq!(discovery.sockets.len(), 2);
        let taken = taken(&discovery);
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin).unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), "closed");
        let found = catch_up(pid, &taken, &discovery.seen, &filter).unwrap();
        let at = taken.iter().position(|t| t.0 == closing);
        assert_eq!(found.closed, Vec::from_iter(at));
        assert!(found.sockets.is_empty());
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
