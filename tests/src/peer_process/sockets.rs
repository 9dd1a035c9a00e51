//! How a peer gets its connections: listening and accepting (with an SO_REUSEPORT group if
//! asked), adopting handed-over fds, or connecting.

use std::env;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use socket2::{Domain, Socket, Type};

use crate::sys;

/// Accept backlog; the kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: libc::c_int = 65_535;
/// Socket activation hands over fds from this number on.
const LISTEN_FDS_START: RawFd = 3;

/// Listens on `addr`; with `reuseport`, as that listener of the port's SO_REUSEPORT group, and
/// steering the group's new connections to itself.
pub(super) fn listen(addr: SocketAddr, reuseport: Option<usize>) -> Result<TcpListener> {
    let listener = match reuseport {
        None => TcpListener::bind(addr),
        Some(_) => bind_reuseport(addr),
    }
    .with_context(|| format!("binding {addr}"))?;
    sys::set_backlog(&listener, LISTEN_BACKLOG).with_context(|| format!("listen on {addr}"))?;
    if let Some(index) = reuseport {
        // Only once listening: a program attached before joins no group (the socket's own,
        // dropped when it joins the port's).
        steer_to(&listener, index)
            .with_context(|| format!("steering {addr} to listener {index}"))?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A socket bound to `addr` with SO_REUSEADDR (as std binds) and SO_REUSEPORT; listen() makes it
/// a listener.
pub(super) fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Attaches to the listener's SO_REUSEPORT group a classic BPF program that picks listener
/// `index` (in the order they joined) for every new connection.
pub(super) fn steer_to(listener: &TcpListener, index: usize) -> io::Result<()> {
    let index = u32::try_from(index).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    set_socket_option(listener, libc::SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// setsockopt(SOL_SOCKET, `option`) with `value` (the kernel copies it).
pub(super) fn set_socket_option<T>(
    socket: &impl AsRawFd,
    option: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is valid for the size passed.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn accept(
    listener: &TcpListener,
    addr: SocketAddr,
    count: usize,
    deadline: Instant,
) -> Result<Vec<TcpStream>> {
    let mut sockets = Vec::with_capacity(count);
    while sockets.len() < count {
        match listener.accept() {
            Ok((socket, _)) => sockets.push(socket),
            // A connection reset before it was accepted is the client's to report.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) =>
            {
                let more = sys::poll_until(listener.as_fd(), libc::POLLIN, deadline)?;
                ensure!(
                    more,
                    "accepted {} of {count} connections on {addr} before the deadline",
                    sockets.len()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("accepting on {addr}")),
        }
    }
    Ok(sockets)
}

/// Takes the connected sockets handed over by socket activation (LISTEN_PID, LISTEN_FDS). A
/// listener among them (the agent hands over its own, which takes new connections from the
/// address move on) is closed: a peer serves only the connections it is handed.
pub(super) fn adopt() -> Result<Vec<TcpStream>> {
    let var =
        |name| env::var(name).with_context(|| format!("{name} is not set (--from-listen-fds)"));
    let pid: u32 = var("LISTEN_PID")?.parse().context("LISTEN_PID")?;
    ensure!(
        pid == std::process::id(),
        "LISTEN_PID is {pid}, not this process ({})",
        std::process::id()
    );
    let count: RawFd = var("LISTEN_FDS")?.parse().context("LISTEN_FDS")?;
    let mut sockets = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        let socket = Socket::from(
            sys::claim_inherited_fd(fd).with_context(|| format!("LISTEN_FDS fd {fd}"))?,
        );
        if socket.is_listener().unwrap_or(false) {
            continue;
        }
        let socket = TcpStream::from(socket);
        socket
            .peer_addr()
            .with_context(|| format!("LISTEN_FDS fd {fd} is not a connected TCP socket"))?;
        sockets.push(socket);
    }
    Ok(sockets)
}

pub(super) fn connect(addr: SocketAddr, count: usize, deadline: Instant) -> Result<Vec<TcpStream>> {
    (0..count)
        .map(|i| {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "opened {i} of {count} connections to {addr} before the deadline"
            );
            TcpStream::connect_timeout(&addr, left)
                .with_context(|| format!("connection {i} of {count} to {addr}"))
        })
        .collect()
}
