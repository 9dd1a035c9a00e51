//! SCM_RIGHTS over a Unix socket, to an application that already runs (see the module docs of
//! [`crate::handoff`]).
use std::{
    io::{self, IoSlice, Read as _},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::{ffi::OsStrExt as _, net::UnixStream},
    },
    path::Path,
};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, send,
        sendmsg, socket,
    },
};

use super::{HandoffError, MAX_FDS_PER_MESSAGE, RECEIVER_TIMEOUT, fd_name};
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
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= SUN_PATH_LEN || bytes.contains(&0) {
        return Err(connect_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a valid Unix socket path (at most 107 bytes, no NUL)",
        )));
    }
    let addr = UnixAddr::new(path).map_err(|e| connect_error(e.into()))?;
    let mut last = Errno::EINVAL;
    for kind in [SockType::SeqPacket, SockType::Stream] {
        let fd = socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| connect_error(e.into()))?;
        match connect(fd.as_raw_fd(), &addr) {
            // Both kinds take read/shutdown the same way.
            Ok(()) => return Ok(UnixStream::from(fd)),
            Err(Errno::EPROTOTYPE) => last = Errno::EPROTOTYPE,
            Err(error) => {
                last = error;
                break;
            }
        }
    }
    Err(connect_error(last.into()))
}

/// The size of sockaddr_un's sun_path: a path needs one byte less, for the NUL.
const SUN_PATH_LEN: usize = 108;

/// One sendmsg with `fds` attached to `data`; on a stream socket the kernel may take part of the
/// bytes, the rest follows without fds.
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = sendmsg::<UnixAddr>(
        socket,
        &[IoSlice::new(data)],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    let mut rest = &data[sent..];
    while !rest.is_empty() {
        let sent = send(socket, rest, MsgFlags::MSG_NOSIGNAL)?;
        rest = &rest[sent..];
    }
    Ok(())
}
