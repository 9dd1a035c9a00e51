//! A migration through the library, in the agent's order, for tests that build their connections
//! by hand: the service frozen at the source, dumped, restored at the destination under a freeze
//! of its own, the address moved, the destination unfrozen, then the commit on both sides.

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::OwnedFd,
    time::Duration,
};

use anyhow::{Result, ensure};
use tcpmig::{
    freeze::{Freeze, RemoveOnDrop},
    net::{self, Netns},
    repair,
};
use tcpmig_testbed::{IFACE, TestBed, prefix_len};

/// Bound on the freezes of a library migration.
const FREEZE_TTL: Duration = Duration::from_secs(120);

/// What a library migration moved: the connections as dumped, and their live sockets at the
/// destination, in the same order.
pub struct Moved {
    pub connections: Vec<repair::Connection>,
    pub sockets: Vec<TcpStream>,
}

/// Moves the connections of `servers` (sockets of the source host on `service`) to the
/// destination; every one must move.
pub fn move_sockets(bed: &TestBed, service: SocketAddr, servers: &[TcpStream]) -> Result<Moved> {
    let (src, dst) = (
        Netns::open(bed.source().name())?,
        Netns::open(bed.destination().name())?,
    );
    let freeze = |netns: &Netns, side: &str| -> Result<RemoveOnDrop> {
        let name = format!("{}-{side}", bed.prefix());
        let mut frozen = RemoveOnDrop::new(Freeze::attach(netns, IFACE, &name)?);
        frozen.freeze_services(&[service], FREEZE_TTL)?;
        Ok(frozen)
    };
    let source_freeze = freeze(&src, "src")?;
    let fds = (servers.iter())
        .map(|s| Ok(OwnedFd::from(s.try_clone()?)))
        .collect::<Result<Vec<_>>>()?;
    let dumped = repair::dump(fds)?;
    let dest_freeze = freeze(&dst, "dst")?;
    let restored = repair::restore(&dst, dumped.connections())?;
    let prefix = prefix_len(service.ip());
    net::move_address(&src, IFACE, &dst, IFACE, service.ip(), prefix)?;
    drop(dest_freeze);
    let committed = restored.commit();
    ensure!(committed.failures.is_empty(), "{:?}", committed.failures);
    let connections = dumped.connections().to_vec();
    dumped.commit();
    drop(source_freeze);
    let sockets = (committed.sockets.into_iter())
        .map(|s| TcpStream::from(s.fd))
        .collect();
    Ok(Moved {
        connections,
        sockets,
    })
}
