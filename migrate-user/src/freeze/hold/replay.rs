//! Delivering held packets once the sockets are live. The source's hold goes out of its
//! interface to the destination's MAC ([`Forwarder`]): the destination's kernel takes the frames
//! as if the clients had just sent them there, and nothing crosses the migration link. What the
//! destination's own freeze held goes into its own stack through a raw IP socket ([`Replayer`];
//! [`TcpInjector`] says why that path reaches TCP as if the client had just sent them). Both
//! recompute the checksums (a frame captured on a veth may carry only the partial checksum of
//! offload). The replies (ACK, SYN-ACK) leave by the usual route.
use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::HoldError;
use crate::{
    net::{self, InjectError, Netns, TcpInjector},
    sys::PacketSocket,
    tuple::{Addresses, Tuple},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Packets handed to the stack.
    pub replayed: u64,
    /// Packets that were not IP/TCP to one of the services, or that the socket refused, and the
    /// first reason.
    pub failed: u64,
    pub first_failure: Option<String>,
    /// In a rebalance, held packets of connections that stayed (delivered at the source too):
    /// not forwarded.
    #[serde(default)]
    pub stayed: u64,
}

impl ReplayReport {
    /// Counts one packet's outcome.
    fn count(&mut self, sent: Result<(), InjectError>, services: &[SocketAddr]) {
        match sent {
            Ok(()) => self.replayed += 1,
            Err(error) => {
                self.failed += 1;
                (self.first_failure).get_or_insert_with(|| failure(&error, services));
            }
        }
    }

    /// Adds the counts of another replay (the first failure stays the first).
    pub fn absorb(&mut self, other: ReplayReport) {
        self.replayed += other.replayed;
        self.failed += other.failed;
        self.stayed += other.stayed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

/// Raw sockets in the destination's namespace, one per service (both families for a dual-stack
/// service), opened before the blackout, for what the destination's own freeze held. Each sends
/// to its service only.
pub struct Replayer {
    injectors: Vec<TcpInjector>,
    services: Vec<SocketAddr>,
}

impl Replayer {
    /// Opens a socket for each of `services` in `netns`.
    pub fn open(netns: &Netns, services: &[SocketAddr]) -> Result<Self, HoldError> {
        let opened: std::io::Result<Vec<TcpInjector>> =
            netns.run(|| services.iter().map(|&s| TcpInjector::open(s)).collect())?;
        let injectors = opened.map_err(|source| HoldError::ReplaySocket {
            netns: netns.to_string(),
            source,
        })?;
        Ok(Self {
            injectors,
            services: services.to_vec(),
        })
    }

    /// Hands `packets` to the stack in their order.
    pub fn replay(&self, packets: &[&[u8]]) -> ReplayReport {
        let mut report = ReplayReport::default();
        let mut scratch = Vec::new();
        for packet in packets {
            scratch.clear();
            scratch.extend_from_slice(packet);
            report.count(self.send(&mut scratch), &self.services);
        }
        report
    }

    /// Sends `packet` by the socket of the service it is for.
    fn send(&self, packet: &mut [u8]) -> Result<(), InjectError> {
        let mut refused = InjectError::NotTcp { len: packet.len() };
        for injector in &self.injectors {
            match injector.send(packet) {
                // Not this service's (or not its family's): the next one may take it.
                Err(error @ (InjectError::Elsewhere { .. } | InjectError::NotTcp { .. })) => {
                    if matches!(error, InjectError::Elsewhere { .. }) {
                        refused = error;
                    }
                }
                sent => return sent,
            }
        }
        Err(refused)
    }
}

/// Packet sockets on the source's interface that send the held segments of the services to one
/// host's MAC, one per IP version, opened once the destination is live.
pub struct Forwarder {
    v4: PacketSocket,
    v6: PacketSocket,
    /// Destination MAC, source MAC: the start of every frame.
    macs: [u8; 12],
    services: Vec<SocketAddr>,
    /// In a rebalance, the connections that moved: the hold took every segment to the services,
    /// and the others' were delivered here.
    only: Option<Arc<HashSet<Tuple>>>,
}

impl Forwarder {
    /// Opens the sockets on `dev` in `netns`, sending to `to_mac` the segments to `services`
    /// (of the connections `only`, when given).
    pub fn open(
        netns: &Netns,
        dev: &str,
        to_mac: [u8; 6],
        services: &[SocketAddr],
        only: Option<Arc<HashSet<Tuple>>>,
    ) -> Result<Self, HoldError> {
        let (ifindex, own_mac) =
            net::ethernet_link(netns, dev).map_err(|source| HoldError::Forward {
                dev: dev.to_owned(),
                source: std::io::Error::other(source),
            })?;
        let opened = netns.run(|| {
            Ok::<_, std::io::Error>((
                PacketSocket::bind(ifindex, ETH_P_IP, to_mac)?,
                PacketSocket::bind(ifindex, ETH_P_IPV6, to_mac)?,
            ))
        })?;
        let (v4, v6) = opened.map_err(|source| HoldError::Forward {
            dev: dev.to_owned(),
            source,
        })?;
        let mut macs = [0; 12];
        macs[..6].copy_from_slice(&to_mac);
        macs[6..].copy_from_slice(&own_mac);
        Ok(Self {
            v4,
            v6,
            macs,
            services: services.to_vec(),
            only,
        })
    }

    /// Sends `packets` in their order, each in a frame of its IP version.
    pub fn forward(&self, packets: &[&[u8]]) -> ReplayReport {
        let mut report = ReplayReport::default();
        let mut frame = Vec::new();
        for packet in packets {
            let moved = |only: &HashSet<Tuple>| {
                net::tcp_tuple(packet).is_some_and(|tuple| only.contains(&tuple))
            };
            if self.only.as_deref().is_some_and(|only| !moved(only)) {
                report.stayed += 1;
                continue;
            }
            report.count(self.send(packet, &mut frame), &self.services);
        }
        report
    }

    /// Frames `packet` (checksums recomputed) if it is TCP to one of the services, and sends it.
    fn send(&self, packet: &[u8], frame: &mut Vec<u8>) -> Result<(), InjectError> {
        let ipv4 = packet.first().is_some_and(|b| b >> 4 == 4);
        frame.clear();
        frame.extend_from_slice(&self.macs);
        let (ethertype, socket) = match ipv4 {
            true => (ETH_P_IP, &self.v4),
            false => (ETH_P_IPV6, &self.v6),
        };
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(packet);
        let len = packet.len();
        let destination =
            net::fix_checksums(&mut frame[14..], ipv4).ok_or(InjectError::NotTcp { len })?;
        if !self.services.contains(&destination) {
            return Err(InjectError::Elsewhere {
                destination,
                allowed: self.services[0],
            });
        }
        socket.send(frame).map_err(|source| InjectError::Send {
            destination,
            source,
        })
    }
}

/// A failure as the report tells it.
fn failure(error: &InjectError, services: &[SocketAddr]) -> String {
    match error {
        InjectError::NotTcp { len } => format!("a held packet of {len} bytes is not TCP"),
        InjectError::Elsewhere { destination, .. } => format!(
            "a held packet to {destination} is not for the service {}: not replayed",
            Addresses(services)
        ),
        InjectError::Send {
            destination,
            source,
        } => format!("replaying a segment to {destination}: {source}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_services() {
        let error = InjectError::Elsewhere {
            destination: "10.0.0.2:80".parse().unwrap(),
            allowed: "10.0.0.2:22".parse().unwrap(),
        };
        let services = [
            "10.0.0.2:22".parse().unwrap(),
            "[fd00::2]:22".parse().unwrap(),
        ];
        let failure = failure(&error, &services);
        assert!(
            failure.contains("not for the service 10.0.0.2:22, [fd00::2]:22"),
            "{failure}"
        );
        assert!(failure.contains("held packet to 10.0.0.2:80"), "{failure}");
    }
}
