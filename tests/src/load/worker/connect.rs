//! Opening the worker's connections: nonblocking connects from fixed local ports, a bounded
//! number in flight.

use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use super::{CONNECTS_IN_FLIGHT, FIRST_PORT, WorkerArgs, poll_once};
use crate::load::{duration_ns, now_ns};

/// Opens `args.connections` connections, [`CONNECTS_IN_FLIGHT`] at a time, registered for
/// writability (which is how a nonblocking connect completes) under their index.
pub(super) fn connect_all(poll: &mut Poll, args: &WorkerArgs) -> anyhow::Result<Vec<TcpStream>> {
    let n = args.connections;
    let timeout = Duration::from_millis(args.connect_timeout_ms);
    let deadline = now_ns() + duration_ns(timeout);
    let mut streams: Vec<TcpStream> = Vec::with_capacity(n);
    let mut done = Vec::with_capacity(n);
    let mut established = 0;
    let mut events = Events::with_capacity(1024);
    while established < n {
        while streams.len() < n && streams.len() - established < CONNECTS_IN_FLIGHT {
            let port = u32::try_from(streams.len())
                .ok()
                .and_then(|i| args.first_id.checked_add(i))
                .and_then(|id| u16::try_from(id).ok()?.checked_add(FIRST_PORT))
                .context("more connections than ports to connect from")?;
            let mut stream = connect_from(args.from, port, args.connect)
                .with_context(|| format!("connecting from port {port} to {}", args.connect))?;
            poll.registry()
                .register(&mut stream, Token(streams.len()), Interest::WRITABLE)?;
            streams.push(stream);
            done.push(false);
        }
        let left = deadline.saturating_sub(now_ns());
        if left == 0 {
            bail!(
                "{established} of {n} connections to {} established within {timeout:?}",
                args.connect
            );
        }
        poll_once(poll, &mut events, left)?;
        for event in &events {
            let i = event.token().0;
            if done[i] {
                continue;
            }
            let stream = &streams[i];
            if let Some(e) = stream.take_error()? {
                bail!("connecting to {}: {e}", args.connect);
            }
            match stream.peer_addr() {
                Ok(_) => {
                    // Small messages must not wait for the previous one's ACK (Nagle).
                    stream.set_nodelay(true)?;
                    done[i] = true;
                    established += 1;
                }
                Err(e) if e.kind() == ErrorKind::NotConnected => {}
                Err(e) => bail!("connecting to {}: {e}", args.connect),
            }
        }
    }
    Ok(streams)
}

/// Starts a nonblocking connect to `service` from local port `port` of `from` (any address when
/// None).
pub(super) fn connect_from(
    from: Option<IpAddr>,
    port: u16,
    service: SocketAddr,
) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(service),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    let local = from.unwrap_or(match service {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    socket.bind(&SocketAddr::new(local, port).into())?;
    match socket.connect(&service.into()) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
        _ => {}
    }
    Ok(TcpStream::from_std(socket.into()))
}
