//! Which connections a discovery takes: by service, by 4-tuple, or among a chosen set.
use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use crate::tuple::Tuple;

/// Which of a process's connections to take. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Local port of the connections (the service's port).
    pub port: Option<u16>,
    /// Local addresses and ports of the connections: those on any of them (a dual-stack
    /// service has one of each family).
    pub services: Vec<SocketAddr>,
    /// Exactly these connections: each must exist and be in a state repair handles.
    pub tuples: Vec<Tuple>,
    /// Only these connections, when not empty; one a process does not hold is no error (a
    /// rebalance's choice, spread over several processes, some closed since it was made).
    pub among: Arc<HashSet<Tuple>>,
}

impl Filter {
    /// The connections on `service` (address and port).
    pub fn service(service: SocketAddr) -> Self {
        Self::services(&[service])
    }

    /// The connections on any of `services`.
    pub fn services(services: &[SocketAddr]) -> Self {
        Self {
            services: services.to_vec(),
            ..Self::default()
        }
    }

    /// A socket on this local address belongs to the services (a listener on the unspecified
    /// address too).
    pub fn matches_local(&self, local: SocketAddr) -> bool {
        let on = |service: &SocketAddr| {
            let service = crate::tuple::canonical(*service);
            service.port() == local.port()
                && (service.ip() == local.ip() || local.ip().is_unspecified())
        };
        self.port.is_none_or(|port| local.port() == port)
            && (self.services.is_empty() || self.services.iter().any(on))
    }

    /// Only `among` of the services' connections (see [`Filter::among`]).
    pub fn among(services: &[SocketAddr], among: Arc<HashSet<Tuple>>) -> Self {
        Self {
            among,
            ..Self::services(services)
        }
    }

    /// The filter names connections one by one: what waits in accept queues or handshakes is
    /// none of them.
    pub fn picks(&self) -> bool {
        !self.tuples.is_empty() || !self.among.is_empty()
    }

    pub(super) fn matches(&self, tuple: &Tuple) -> bool {
        self.matches_local(tuple.local)
            && (self.tuples.is_empty() || self.tuples.contains(tuple))
            && (self.among.is_empty() || self.among.contains(tuple))
    }
}
