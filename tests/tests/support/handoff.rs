//! Receiving a hand-over (`tcpmig restore --handoff`): its text and the fds sent with it over a
//! Unix socket.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

/// Handed-over fds told apart: the connections, and the listeners (SO_ACCEPTCONN).
pub fn split_listeners(fds: Vec<OwnedFd>) -> Result<(Vec<OwnedFd>, Vec<TcpListener>)> {
    let (mut connections, mut listeners) = (Vec::new(), Vec::new());
    for fd in fds {
        if socket2::SockRef::from(&fd).is_listener()? {
            listeners.push(TcpListener::from(fd));
        } else {
            connections.push(fd);
        }
    }
    Ok((connections, listeners))
}

/// Waits, up to `bound`, for the non-blocking `listener` to give a connection.
pub fn accept_within(listener: &TcpListener, bound: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + bound;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting a connection on a handed-over listener"),
        }
    }
}

/// Waits until `deadline` for a hand-over's connection on `listener` (non-blocking), calling
/// `waiting` between tries (to fail early when the sender is gone), and reads it whole.
pub fn receive_handoff_on(
    listener: &std::os::unix::net::UnixListener,
    deadline: Instant,
    mut waiting: impl FnMut() -> Result<()>,
) -> Result<(String, Vec<OwnedFd>)> {
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                waiting()?;
                ensure!(Instant::now() < deadline, "no hand-over connected in time");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    // Until the sender's end closes; ours closes when `stream` drops, which tells the sender
    // that we hold the fds.
    receive_fds(&stream)
}

/// Reads the whole handoff: its text, and every fd sent with it (recvmsg from the first byte on).
fn receive_fds(stream: &std::os::unix::net::UnixStream) -> Result<(String, Vec<OwnedFd>)> {
    let mut text = Vec::new();
    let mut fds = Vec::new();
    let mut data = vec![0u8; 64 * 1024];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((253 * size_of::<libc::c_int>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: a zeroed msghdr with valid buffers; the kernel writes at most their sizes and
        // every fd it passes is taken into an OwnedFd once.
        let got = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let got = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if got < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let count =
                        ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<libc::c_int>();
                    let first = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    for k in 0..count {
                        fds.push(OwnedFd::from_raw_fd(first.add(k).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            got as usize
        };
        if got == 0 {
            return Ok((String::from_utf8(text)?, fds));
        }
        text.extend_from_slice(&data[..got]);
    }
}
