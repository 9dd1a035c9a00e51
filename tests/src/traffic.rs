//! Many verifiable connections from the client host to the service address on the source host,
//! spread over `tcpmig-peer` processes so that none exceeds the file limit.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::bed::{SERVICE_V4, TestBed};
use crate::peer::{Peer, PeerArgs, PeerCommand, Report, StreamArgs, command_all};

/// Most sockets one peer process holds: the hard RLIMIT_NOFILE here is 20,000 and cannot be
/// raised, so larger counts are sharded over processes (shard k uses port + k).
pub const MAX_SOCKETS_PER_PEER: usize = 15_000;

/// Servers on the source and clients on the client host, with `stream.bytes` bytes queued unread
/// in both directions of every connection. The fields are public so a migration test can replace
/// a server by one that adopted its sockets on another host. Dropping it kills the processes.
pub struct Traffic<'bed> {
    /// Shard k listens on the service port + k ([`Traffic::open_at`]), or all on the service port
    /// ([`Traffic::open_shared`]).
    pub servers: Vec<Peer<'bed>>,
    /// Shard k connects to server shard k.
    pub clients: Vec<Peer<'bed>>,
    pub stream: StreamArgs,
}

/// Both sides' reports after a `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub client: Report,
    pub server: Report,
}

impl Verification {
    /// Whether both sides hold exactly `connections` connections, all verified.
    pub fn all_verified(&self, connections: u64) -> bool {
        [&self.client, &self.server]
            .iter()
            .all(|side| side.connections == connections && side.all_verified())
    }
}

impl<'bed> Traffic<'bed> {
    /// `connections` connections to the IPv4 service address, `bytes` bytes each way.
    pub fn open(
        bed: &'bed TestBed,
        peer_bin: &Path,
        connections: usize,
        bytes: u64,
        port: u16,
    ) -> Result<Self> {
        Self::open_at(
            bed,
            peer_bin,
            SocketAddr::new(SERVICE_V4.into(), port),
            connections,
            StreamArgs::new(bytes),
        )
    }

    /// `connections` connections to `service` (shard k on its port + k) with the given streams;
    /// returns once every peer is `ready`.
    pub fn open_at(
        bed: &'bed TestBed,
        peer_bin: &Path,
        service: SocketAddr,
        connections: usize,
        stream: StreamArgs,
    ) -> Result<Self> {
        let shards = shard_sizes(connections);
        let mut addrs = Vec::with_capacity(shards.len());
        for k in 0..shards.len() {
            let port = u16::try_from(k)
                .ok()
                .and_then(|k| service.port().checked_add(k));
            addrs.push(SocketAddr::new(
                service.ip(),
                port.context("service port + shard overflows")?,
            ));
        }
        let mut servers = Vec::with_capacity(shards.len());
        for (&addr, &count) in addrs.iter().zip(&shards) {
            servers.push(Peer::start(
                bed.source(),
                peer_bin,
                &PeerArgs::server(addr, count, stream),
            )?);
        }
        for server in &mut servers {
            server.expect_line("listening")?;
        }
        let mut clients = Vec::with_capacity(shards.len());
        for (&addr, &count) in addrs.iter().zip(&shards) {
            clients.push(Peer::start(
                bed.client(),
                peer_bin,
                &PeerArgs::client(addr, count, stream),
            )?);
        }
        for peer in clients.iter_mut().chain(&mut servers) {
            peer.expect_line("ready")?;
        }
        Ok(Self {
            servers,
            clients,
            stream,
        })
    }

    /// `per_server[k]` connections to server k, every server listening on `service` itself with
    /// SO_REUSEPORT, as the processes of a multi-process server share its port. The servers start
    /// one after the other, each steering the port's new connections to itself once it listens
    /// (`--reuseport`), so each gets exactly its count while the earlier ones keep their
    /// listeners; one client process per server. Every connection goes to one address:port, so
    /// the client host's ephemeral ports are widened to 1024-65535 (at most about 64,000
    /// connections): connect() tries ports of one parity first, and in the default 28,000 each
    /// connection past 14,000 scanned all of them (17 s instead of 2 for 24,000 here).
    pub fn open_shared(
        bed: &'bed TestBed,
        peer_bin: &Path,
        service: SocketAddr,
        per_server: &[usize],
        stream: StreamArgs,
    ) -> Result<Self> {
        bed.client()
            .set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let mut servers = Vec::with_capacity(per_server.len());
        let mut clients = Vec::with_capacity(per_server.len());
        for (index, &count) in per_server.iter().enumerate() {
            ensure!(
                count <= MAX_SOCKETS_PER_PEER,
                "{count} connections for server {index}: at most {MAX_SOCKETS_PER_PEER}"
            );
            let args = PeerArgs::shared_server(service, index, count, stream);
            let mut server = Peer::start(bed.source(), peer_bin, &args)?;
            server.expect_line("listening")?;
            let args = PeerArgs::client(service, count, stream);
            let mut client = Peer::start(bed.client(), peer_bin, &args)?;
            client.expect_line("ready")?;
            // Accepted all its connections: the next server may take the port's new ones.
            server.expect_line("ready")?;
            servers.push(server);
            clients.push(client);
        }
        Ok(Self {
            servers,
            clients,
            stream,
        })
    }

    /// The server processes, the ones a migration dumps.
    pub fn server_pids(&self) -> Vec<u32> {
        self.servers.iter().map(Peer::pid).collect()
    }

    /// Every process of this traffic.
    pub fn pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .chain(&self.clients)
            .map(Peer::pid)
            .collect()
    }

    /// Checks every byte in both directions up to `--bytes`.
    pub fn verify(&mut self) -> Result<Verification> {
        self.on_both_sides(PeerCommand::Verify { until: None })
    }

    /// Checks every byte in both directions up to offset `until`, after [`Traffic::send_all`].
    pub fn verify_until(&mut self, until: u64) -> Result<Verification> {
        self.on_both_sides(PeerCommand::Verify { until: Some(until) })
    }

    /// Writes `bytes` more bytes on both directions of every connection, without reading them.
    pub fn send_all(&mut self, bytes: u64) -> Result<Verification> {
        self.on_both_sides(PeerCommand::Send { bytes })
    }

    fn on_both_sides(&mut self, command: PeerCommand) -> Result<Verification> {
        Ok(Verification {
            client: command_all(&mut self.clients, command)?,
            server: command_all(&mut self.servers, command)?,
        })
    }

    /// Checks what the clients received (the servers' streams).
    pub fn verify_clients(&mut self) -> Result<Report> {
        command_all(&mut self.clients, PeerCommand::Verify { until: None })
    }

    /// Checks what the servers received (the clients' streams).
    pub fn verify_servers(&mut self) -> Result<Report> {
        command_all(&mut self.servers, PeerCommand::Verify { until: None })
    }
}

/// Splits `connections` into the fewest shards of at most [`MAX_SOCKETS_PER_PEER`], evenly.
fn shard_sizes(connections: usize) -> Vec<usize> {
    let shards = connections.div_ceil(MAX_SOCKETS_PER_PEER).max(1);
    (0..shards)
        .map(|k| connections / shards + usize::from(k < connections % shards))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_stay_under_the_limit_and_add_up() {
        for connections in [0, 1, 10_000, 15_000, 15_001, 50_000] {
            let sizes = shard_sizes(connections);
            assert_eq!(sizes.iter().sum::<usize>(), connections);
            assert!(sizes.iter().all(|&s| s <= MAX_SOCKETS_PER_PEER));
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
        assert_eq!(shard_sizes(15_001), [7_501, 7_500]);
    }
}
