//! `--mirror`: a server that answers the clients' streams instead of taking commands.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::{Result, ensure};

use super::IDLE_LIMIT;
use super::streams::{Conn, Failure, Streams, chunk, take_checked};
use crate::pattern::{self, Direction};

/// How far a `--mirror` server's answers may lag what it read before it stops reading.
const MIRROR_BACKLOG: u64 = 1 << 20;

/// `--mirror` (see `tcpmig_testbed::peer`): answers every byte read with the byte at the same
/// offset of the outgoing stream, at most [`MIRROR_BACKLOG`] bytes behind, until idle.
pub(super) fn mirror(mut streams: Streams) -> Result<()> {
    let mut last_input = Instant::now();
    while last_input.elapsed() < IDLE_LIMIT {
        let mut polls: Vec<libc::pollfd> = streams
            .conns
            .iter()
            .map(|conn| {
                let owed = conn.read_at - conn.write_at;
                let mut events = 0;
                if conn.failure.is_none() {
                    if owed < MIRROR_BACKLOG {
                        events |= libc::POLLIN;
                    }
                    if owed > 0 {
                        events |= libc::POLLOUT;
                    }
                }
                libc::pollfd {
                    fd: conn.socket.as_raw_fd(),
                    events,
                    revents: 0,
                }
            })
            .collect();
        // SAFETY: a valid array of pollfds of the length passed.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 1000) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            ensure!(error.kind() == ErrorKind::Interrupted, "poll: {error}");
            continue;
        }
        for (conn, poll) in streams.conns.iter_mut().zip(&polls) {
            if poll.revents == 0 || conn.failure.is_some() {
                continue;
            }
            let result = mirror_once(conn, &mut streams.buf, &mut streams.expected);
            match result {
                Ok(true) => last_input = Instant::now(),
                Ok(false) => {}
                Err(failure) => {
                    // Tell the client at once: it reports the early end of its stream.
                    let _ = conn.socket.shutdown(std::net::Shutdown::Both);
                    conn.failure = Some(failure);
                }
            }
        }
    }
    Ok(())
}

/// One non-blocking read (checked) and write on `conn`; whether bytes came in.
pub(super) fn mirror_once(
    conn: &mut Conn,
    buf: &mut [u8],
    expected: &mut [u8],
) -> Result<bool, Failure> {
    let owed = conn.read_at - conn.write_at;
    let mut came = false;
    if owed < MIRROR_BACKLOG {
        match (&conn.socket).read(buf) {
            Ok(0) => return Err(Failure::Eof),
            Ok(got) => {
                take_checked(conn, Direction::ClientToServer, &buf[..got], expected)?;
                came = true;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let owed = chunk(conn.read_at - conn.write_at, buf);
    if owed > 0 {
        pattern::fill(
            conn.client,
            Direction::ServerToClient,
            conn.write_at,
            &mut buf[..owed],
        );
        match (&conn.socket).write(&buf[..owed]) {
            Ok(written) => conn.write_at += written as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(came)
}
