//! Bulk dump, in the order of docs/tcp-repair.md: [`prepare_dump`] takes the sockets and reads
//! what only their application changes (before the freeze), [`PreparedDump::dump`] puts each
//! into repair mode and reads its state (in the blackout), and the returned [`DumpedSockets`]
//! holds them until the commit that disconnects them silently, or the rollback.
//!
//! [`prepare`] holds the sockets before the freeze (and the pre-copy), [`read`] the dump proper.
mod prepare;
mod read;

use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};

pub use self::prepare::{PreparedDump, prepare_dump};
pub(super) use self::read::tos_option;
use super::{Connection, Phase, RepairError, StateReader, TcpState, Workers};
use crate::sys::tcp_repair as so;
use crate::{repair, tuple::Tuple};

/// Sockets in repair mode at the source and their dumped state. They stay frozen in repair
/// mode until [`commit`](Self::commit) or [`rollback`](Self::rollback); dropping the handle
/// without either rolls back, so that a failed migration leaves the connections running where
/// they were.
pub struct DumpedSockets {
    fds: Vec<OwnedFd>,
    connections: Vec<Connection>,
    /// Left to their application by [`PreparedDump::dump_read`]: their state is one repair does
    /// not handle.
    skipped: Vec<(Tuple, TcpState)>,
    workers: Workers,
}

impl DumpedSockets {
    pub fn connections(&self) -> &[Connection] {
        &self.connections
    }

    /// The connections left out of the dump because of their state, with it.
    pub fn skipped(&self) -> &[(Tuple, TcpState)] {
        &self.skipped
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The connections live on elsewhere: disconnects each socket while it is still in repair
    /// mode (connect(AF_UNSPEC), which sends nothing: no FIN, no RST) and closes our fds. The
    /// process we took the fds from may still hold the same sockets: disconnected, they run no
    /// retransmission or keepalive timer any more, and once out of repair mode (without the
    /// window probe, which a closed socket does not send anyway) its reads fail with
    /// ECONNABORTED instead of EPERM. Failures are logged: the sockets are closed either way.
    pub fn commit(mut self) {
        let fds = std::mem::take(&mut self.fds);
        let connections = std::mem::take(&mut self.connections);
        let pairs: Vec<(OwnedFd, Tuple)> = fds
            .into_iter()
            .zip(connections.iter().map(|c| c.tuple))
            .collect();
        repair::sharded(self.workers, &pairs, |batch| {
            for (fd, tuple) in batch {
                let fd = fd.as_fd();
                let result = so::disconnect(fd)
                    .map_err(|e| ("connect(AF_UNSPEC)", e))
                    .and_then(|()| {
                        so::set_repair(fd, so::REPAIR_OFF_NO_WP).map_err(|e| ("TCP_REPAIR=-1", e))
                    });
                if let Err((op, error)) = result {
                    tracing::warn!(%tuple, op, %error, "disconnecting a committed socket");
                }
            }
        });
    }

    /// Takes every socket out of repair mode and gives back the options repair mode changed:
    /// the connections carry on at the source. The freeze, if any, is the caller's to lift
    /// afterwards.
    pub fn rollback(mut self) -> Result<(), RepairError> {
        let fds = std::mem::take(&mut self.fds);
        let connections = std::mem::take(&mut self.connections);
        rollback_all(self.workers, &fds, &connections)
    }
}

impl Drop for DumpedSockets {
    fn drop(&mut self) {
        if self.fds.is_empty() {
            return;
        }
        tracing::info!(
            count = self.fds.len(),
            "dump neither committed nor rolled back: rolling back"
        );
        if let Err(error) = rollback_all(self.workers, &self.fds, &self.connections) {
            tracing::warn!(%error, "rolling back a dropped dump");
        }
    }
}

fn rollback_all(
    workers: Workers,
    fds: &[OwnedFd],
    connections: &[Connection],
) -> Result<(), RepairError> {
    let pairs: Vec<(&OwnedFd, &Connection)> = fds.iter().zip(connections).collect();
    let errors: Vec<RepairError> = repair::sharded(workers, &pairs, |batch| {
        batch
            .iter()
            .filter_map(|(fd, conn)| {
                leave_repair(fd.as_fd(), conn.tuple, conn.options.reuseaddr).err()
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let failed = errors.len();
    match errors.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(RepairError::Rollback {
            failed,
            total: fds.len(),
            first: Box::new(first),
        }),
    }
}

/// Repair off with value 0 (no TCP_REPAIR_QUEUE=NO_QUEUE first: the kernel ignores the selected
/// queue once repair is off, and TCP_REPAIR=1 resets it), which sends a window probe: the peer
/// answers with an ACK carrying its current window, so both ends resynchronise at once instead of
/// on the next timer (measured: 0.07 s against 0.43 s with -1). The probe is an old-sequence
/// segment every peer accepts, and if a freeze still drops it nothing is lost. Repair mode also
/// cleared SO_REUSEADDR, which is set back.
fn leave_repair(fd: BorrowedFd<'_>, tuple: Tuple, reuseaddr: bool) -> Result<(), RepairError> {
    let fail = |op| RepairError::socket(tuple, Phase::Rollback, op);
    so::set_repair(fd, so::REPAIR_OFF).map_err(fail("TCP_REPAIR=0"))?;
    if reuseaddr {
        so::set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(fail("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// Dumps connected TCP sockets: [`StateReader::load`], [`prepare_dump`] and
/// [`PreparedDump::dump`] in one go, one thread per CPU (see [`prepare_dump`] for the steps
/// apart, which a migration needs to keep the blackout short).
///
/// # Examples
/// ```no_run
/// use tcpmig::{
///     net::Netns,
///     repair::{self, Filter},
/// };
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let netns = Netns::open("/proc/1234/ns/net")?;
/// let found = repair::discover(&netns, 1234, &Filter::service("192.0.2.1:80".parse()?))?;
/// // Freeze the service first: repair mode alone does not stop its traffic.
/// let dumped = repair::dump(found.into_fds())?;
/// println!("{} connections in repair mode", dumped.len());
/// dumped.rollback()?; // they carry on here
/// # Ok(())
/// # }
/// ```
pub fn dump(fds: Vec<OwnedFd>) -> Result<DumpedSockets, RepairError> {
    let mut reader = StateReader::load(None)?;
    prepare_dump(Workers::PerCpu, fds)?.dump(&mut reader)
}
