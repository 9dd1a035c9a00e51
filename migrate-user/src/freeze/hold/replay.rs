//! The destination's side of a hold: the held packets go into this host's own stack through a
//! raw IP socket ([`TcpInjector`], which says why that path reaches TCP as if the client had just
//! sent them, and recomputes their checksums). The replies (ACK, SYN-ACK) leave by the usual
//! route.
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::HoldError;
use crate::{
    net::{InjectError, Netns, TcpInjector},
    tuple::Addresses,
};

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Packets handed to the stack.
    pub replayed: u64,
    /// Packets that were not IP/TCP to one of the services, or that the socket refused, and the
    /// first reason.
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl ReplayReport {
    /// Adds the counts of another replay (the first failure stays the first).
    pub fn absorb(&mut self, other: ReplayReport) {
        self.replayed += other.replayed;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

/// Raw sockets in the destination's namespace, one per service (both families for a dual-stack
/// service), opened before the blackout. Each sends to its service only: the held packets come
/// from the source over the link, and an authenticated source must still not make them send
/// anything else.
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
            match self.send(&mut scratch) {
                Ok(()) => report.replayed += 1,
                Err(error) => {
                    report.failed += 1;
                    report
                        .first_failure
                        .get_or_insert_with(|| failure(&error, &self.services));
                }
            }
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
