//! The entries of a freeze: services (one map update covers every connection of a service) and
//! single connections (4-tuples, written in batches), each with the deadline after which the
//! programs ignore it.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    time::Duration,
};

use aya::maps::MapError;
use migrate_common::{
    FAMILY_V4, FAMILY_V6, FreezeValue, SCOPE_ALL, SCOPE_NEW_CONNECTIONS, ServiceKey, TupleKey,
};

use super::{Freeze, FreezeError, infos};
use crate::{
    net::Netns,
    sys,
    tuple::{Tuple, canonical},
};

impl Freeze {
    /// Freezes every connection of each service (local address and port): one map update per
    /// service, whatever the number of connections.
    pub fn freeze_services(
        &mut self,
        services: &[SocketAddr],
        ttl: Duration,
    ) -> Result<(), FreezeError> {
        self.insert_services(services, freeze_value(ttl))
    }

    /// Stops only the new connections to each service (SYNs in), for `ttl`: its established
    /// connections carry on. [`Freeze::freeze_services`] later widens the same entries.
    pub fn freeze_new_connections(
        &mut self,
        services: &[SocketAddr],
        ttl: Duration,
    ) -> Result<(), FreezeError> {
        let value = FreezeValue {
            scope: SCOPE_NEW_CONNECTIONS,
            ..freeze_value(ttl)
        };
        self.insert_services(services, value)
    }

    fn insert_services(
        &mut self,
        services: &[SocketAddr],
        value: FreezeValue,
    ) -> Result<(), FreezeError> {
        for &service in services {
            self.services.insert(&service_key(service), &value, 0)?;
        }
        Ok(())
    }

    /// Freezes these connections only, in batches (BPF_MAP_UPDATE_BATCH).
    pub fn freeze_tuples(&mut self, tuples: &[Tuple], ttl: Duration) -> Result<(), FreezeError> {
        let keys: Vec<TupleKey> = tuples.iter().map(tuple_key).collect();
        let values = vec![freeze_value(ttl); keys.len()];
        sys::map_update_batch(self.tuples_fd.as_fd(), &keys, &values).map_err(|source| {
            FreezeError::Io {
                name: self.info.name.clone(),
                what: "batch update of the tuples map",
                source,
            }
        })
    }

    /// Lifts the freeze of these services; one that is not frozen is no error.
    pub fn thaw_services(&mut self, services: &[SocketAddr]) -> Result<(), FreezeError> {
        for &service in services {
            match self.services.remove(&service_key(service)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Lifts the freeze of these connections, in batches.
    pub fn thaw_tuples(&mut self, tuples: &[Tuple]) -> Result<(), FreezeError> {
        let keys: Vec<TupleKey> = tuples.iter().map(tuple_key).collect();
        self.delete_tuple_keys(&keys)
    }

    /// Lifts every entry of this freeze; the programs stay attached, idle.
    pub fn thaw_all(&mut self) -> Result<(), FreezeError> {
        let services = self.services.keys().collect::<Result<Vec<_>, _>>()?;
        for key in services {
            self.services.remove(&key)?;
        }
        let tuples = self.tuples.keys().collect::<Result<Vec<_>, _>>()?;
        self.delete_tuple_keys(&tuples)
    }

    fn delete_tuple_keys(&mut self, keys: &[TupleKey]) -> Result<(), FreezeError> {
        sys::map_delete_batch(self.tuples_fd.as_fd(), keys).map_err(|source| FreezeError::Io {
            name: self.info.name.clone(),
            what: "batch delete from the tuples map",
            source,
        })
    }

    /// Whether the traffic of `tuple` is dropped now: a service or 4-tuple entry covers it and
    /// its deadline has not passed.
    pub fn is_frozen(&self, tuple: &Tuple) -> Result<bool, FreezeError> {
        let now = u64::try_from(sys::monotonic_now().as_nanos()).unwrap_or(u64::MAX);
        let live = |entry: Result<FreezeValue, MapError>| match entry {
            Ok(value) => Ok(value.deadline_ns > now),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(FreezeError::Map(e)),
        };
        Ok(live(self.services.get(&service_key(tuple.local), 0))?
            || live(self.tuples.get(&tuple_key(tuple), 0))?)
    }
}

/// The tuples of `tuples` that no freeze attached in `netns` covers now.
pub fn unfrozen(netns: &Netns, tuples: &[Tuple]) -> Result<Vec<Tuple>, FreezeError> {
    let freezes = infos(Some(netns))?
        .into_iter()
        .map(Freeze::open_with)
        .collect::<Result<Vec<_>, _>>()?;
    let mut left = Vec::new();
    for tuple in tuples {
        let mut covered = false;
        for freeze in &freezes {
            if freeze.is_frozen(tuple)? {
                covered = true;
                break;
            }
        }
        if !covered {
            left.push(*tuple);
        }
    }
    Ok(left)
}

/// An entry frozen from now until `ttl` from now (CLOCK_MONOTONIC, the programs' clock).
fn freeze_value(ttl: Duration) -> FreezeValue {
    let now = sys::monotonic_now();
    FreezeValue {
        deadline_ns: u64::try_from(now.saturating_add(ttl).as_nanos()).unwrap_or(u64::MAX),
        since_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
        scope: SCOPE_ALL,
        _pad: 0,
    }
}

/// The family and the 16 address bytes of a key; a v4-mapped v6 address counts as v4, as the
/// programs see it.
fn addr_bytes(addr: SocketAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match canonical(addr).ip() {
        IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            (FAMILY_V4, bytes)
        }
        IpAddr::V6(ip) => (FAMILY_V6, ip.octets()),
    }
}

/// The address a key holds, back.
pub(super) fn socket_addr(family: u8, bytes: [u8; 16], port: u16) -> SocketAddr {
    let ip: IpAddr = if family == FAMILY_V4 {
        Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    } else {
        Ipv6Addr::from(bytes).into()
    };
    SocketAddr::new(ip, port)
}

/// The services map's key for `service`.
pub fn service_key(service: SocketAddr) -> ServiceKey {
    let (family, addr) = addr_bytes(service);
    ServiceKey {
        addr,
        port: service.port(),
        family,
        _pad: 0,
    }
}

/// The tuples map's key for `tuple`.
pub fn tuple_key(tuple: &Tuple) -> TupleKey {
    let (family, local_addr) = addr_bytes(tuple.local);
    let (_, remote_addr) = addr_bytes(tuple.remote);
    TupleKey {
        local_addr,
        remote_addr,
        local_port: tuple.local.port(),
        remote_port: tuple.remote.port(),
        family,
        _pad: [0; 3],
    }
}
