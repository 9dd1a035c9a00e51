//! A listener for the service on the destination, made before the address is there: from the
//! moment the address moves, a new connection is accepted here (its SYN, held during the
//! blackout and replayed, or sent anew), and the application takes the listener with the
//! connections, the way socket activation hands listeners over.
use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket,
        sockopt::{IpFreebind, ReuseAddr},
    },
};

use super::{NetError, Netns};

/// Connections the kernel completes before the application accepts them: thousands of clients
/// may come back at once.
const BACKLOG: i32 = 4096;

/// Listens on `service` in `netns` (the address may not be there yet: IP_FREEBIND). Returns None
/// when something there listens on it already: new connections go to that listener then. Like
/// the restored connections, it is non-blocking.
pub fn listen_ahead(netns: &Netns, service: SocketAddr) -> Result<Option<OwnedFd>, NetError> {
    let made = netns.run(|| -> Result<OwnedFd, Errno> {
        let family = if service.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let fd = socket(family, SockType::Stream, flags, None)?;
        setsockopt(&fd, ReuseAddr, &true)?;
        setsockopt(&fd, IpFreebind, &true)?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(service))?;
        listen(&fd, Backlog::new(BACKLOG)?)?;
        Ok(fd)
    })?;
    match made {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::EADDRINUSE) => Ok(None),
        Err(errno) => Err(NetError::Listen {
            netns: netns.to_string(),
            service,
            source: errno.into(),
        }),
    }
}
