//! SCM_RIGHTS over a Unix socket, to an application that already runs (see the module docs of
//! [`crate::handoff`]).
use std::{
    io::{self, Read as _},
    mem::size_of_val,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, net::UnixStream},
    },
    path::Path,
};

use super::{HandoffError, MAX_FDS_PER_MESSAGE, RECEIVER_TIMEOUT, check, fd_name};
use crate::repair::RestoredSocket;

/// Sends `sockets` to the receiver at `path` (see the module docs) and waits for it to close the
/// connection. The receiver holds its own copies then; the caller's can be closed.
pub fn send_fds(sockets: &[RestoredSocket], path: &Path) -> Result<(), HandoffError> {
    let stream = connect_unix(path)?;
    let fd = stream.as_raw_fd();
    let sending = |source| HandoffError::Send {
        path: path.to_owned(),
        source,
    };
    for batch in sockets.chunks(MAX_FDS_PER_MESSAGE) {
        let mut text = format!("tcpmig-fds {}\n", batch.len());
        for socket in batch {
            text.push_str(&fd_name(&socket.tuple));
            text.push('\n');
        }
        let fds: Vec<RawFd> = batch.iter().map(|s| s.fd.as_raw_fd()).collect();
        send_with_fds(fd, text.as_bytes(), &fds).map_err(sending)?;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(sending)?;
    stream
        .set_read_timeout(Some(RECEIVER_TIMEOUT))
        .map_err(sending)?;
    let mut sink = [0u8; 256];
    loop {
        match (&stream).read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(HandoffError::ReceiverClose {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

/// SOCK_SEQPACKET if the listener is one, SOCK_STREAM otherwise.
fn connect_unix(path: &Path) -> Result<UnixStream, HandoffError> {
    let connect_error = |source| HandoffError::Connect {
        path: path.to_owned(),
        source,
    };
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(connect_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a valid Unix socket path (at most 107 bytes, no NUL)",
        )));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let mut last = io::Error::from(io::ErrorKind::InvalidInput);
    for kind in [libc::SOCK_SEQPACKET, libc::SOCK_STREAM] {
        // SAFETY: socket(2); owned at once.
        let raw = check(unsafe { libc::socket(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0) })
            .map_err(connect_error)?;
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: connect(2) with a valid sockaddr_un and its size.
        let ret = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of_val(&addr) as libc::socklen_t,
            )
        };
        if ret == 0 {
            // Both kinds take read/shutdown the same way.
            return Ok(UnixStream::from(fd));
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EPROTOTYPE) {
            break;
        }
    }
    Err(connect_error(last))
}

/// One sendmsg with `fds` attached to `data`; on a stream socket the kernel may take part of the
/// bytes, the rest follows without fds.
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let payload = size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers outlive the call and the control buffer has
    // room for one cmsghdr carrying `fds`.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rest = &data[sent as usize..];
    while !rest.is_empty() {
        // SAFETY: `rest` is readable for its length.
        let sent =
            unsafe { libc::send(socket, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        rest = &rest[sent as usize..];
    }
    Ok(())
}
