//! The echo server takes connections handed over on its Unix socket while it serves its own
//! (`echo-server --handoff-socket`, what a rebalance's destination runs): HANDED connections
//! accepted on the source by the test, sent with tcpmig's own sender in several messages, each
//! echo byte-exact, and the server's own clients carry on, without a reset. Needs root; run with
//! `--test-threads=1`.
mod support;

use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use support::pairs::{SMALL, connect, read_stream, resets, write_stream};
use support::{PEER, Scratch, service};
use tcpmig::{handoff, repair::RestoredSocket, tuple::Tuple};
use tcpmig_testbed::{TestBed, echo::HandoffEcho, pattern::Direction};

const PORT: u16 = 9300;
/// Eight messages of at most 253 fds.
const HANDED: usize = 2000;
/// The server's own clients, connected before the hand-over.
const OWN: usize = 3;
/// Bound on the server's taking the hand-over (tcpmig waits as long for its close).
const HANDED_TIMEOUT: Duration = Duration::from_secs(30);

/// `client` sends `len` bytes of its stream from `offset`, and the same come back.
fn echoes(client: &TcpStream, offset: u64, len: u64) -> Result<()> {
    let at = client.local_addr()?;
    let c2s = Direction::ClientToServer;
    let end = write_stream(client, at, c2s, offset, Some(len))?;
    read_stream(client, at, c2s, (offset, end), false)?;
    Ok(())
}

/// A server socket as tcpmig's sender takes it.
fn restored(server: TcpStream) -> Result<RestoredSocket> {
    let tuple = Tuple {
        local: server.local_addr()?,
        remote: server.peer_addr()?,
    };
    Ok(RestoredSocket {
        tuple,
        fd: server.into(),
    })
}

#[test]
fn takes_handed_connections_while_serving() -> Result<()> {
    // Both ends of every handed connection are in this process until the hand-over.
    handoff::raise_nofile_limit()?;
    let bed = TestBed::new()?;
    let scratch = Scratch::new(&bed)?;
    let socket = scratch.path("echo.sock");
    let mut echo = HandoffEcho::start(bed.source(), Path::new(PEER), service(PORT), &socket)?;
    let own = (0..OWN)
        .map(|_| Ok(bed.client().run(|| TcpStream::connect(service(PORT)))??))
        .collect::<Result<Vec<_>>>()?;
    for client in &own {
        echoes(client, 0, SMALL)?;
    }

    let (servers, clients): (Vec<_>, Vec<_>) = connect(&bed, service(PORT + 1), HANDED)?
        .into_iter()
        .map(|pair| (pair.server, pair.client))
        .unzip();
    let sockets = servers
        .into_iter()
        .map(restored)
        .collect::<Result<Vec<_>>>()?;
    handoff::send_fds(&sockets, &socket)?;
    // The server holds its own copies now: the handed connections are its alone.
    drop(sockets);
    let handed = echo.handed(HANDED_TIMEOUT)?;
    ensure!(handed == HANDED, "the server took {handed} of {HANDED}");

    for (k, client) in clients.iter().enumerate() {
        echoes(client, 0, SMALL).map_err(|e| e.context(format!("handed connection {k}")))?;
    }
    for client in &own {
        echoes(client, SMALL, SMALL)?;
    }
    ensure!(resets(&bed)? == 0, "resets on the bed");
    Ok(())
}
