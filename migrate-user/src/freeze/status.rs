//! What a freeze holds and has done, as `tcpmig status` shows it: its entries with their age and
//! deadline, and the totals of the programs' per-CPU counters.
use std::{net::SocketAddr, time::Duration};

use migrate_common::{Counter, FreezeValue, SCOPE_NEW_CONNECTIONS, ServiceKey, TupleKey};
use serde::Serialize;

use super::{Freeze, FreezeError, FreezeInfo, Steering, entries::socket_addr, infos};
use crate::{net::Netns, sys};

/// Status lists tuples one by one only up to this many.
const STATUS_TUPLE_LIST_MAX: usize = 32;

/// One frozen entry as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FrozenEntry {
    pub service: Option<SocketAddr>,
    pub tuple: Option<(SocketAddr, SocketAddr)>,
    /// Seconds since the entry was frozen.
    pub frozen_for_s: f64,
    /// Seconds until the programs let its traffic through again (negative: expired).
    pub deadline_in_s: f64,
    /// Only new connections are stopped (the application is stopped, the freeze to come).
    pub new_connections_only: bool,
}

/// Totals of the per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub syn_dropped: u64,
    pub ingress_dropped: u64,
    pub egress_dropped: u64,
    pub passed_after_deadline: u64,
    pub criu_mark_passed: u64,
}

impl Counters {
    fn set(&mut self, counter: Counter, value: u64) {
        match counter {
            Counter::SynDropped => self.syn_dropped = value,
            Counter::IngressDropped => self.ingress_dropped = value,
            Counter::EgressDropped => self.egress_dropped = value,
            Counter::PassedAfterDeadline => self.passed_after_deadline = value,
            Counter::CriuMarkPassed => self.criu_mark_passed = value,
        }
    }

    /// Segments and SYNs dropped in both directions.
    pub fn dropped(&self) -> u64 {
        self.syn_dropped + self.ingress_dropped + self.egress_dropped
    }
}

/// A freeze as `tcpmig status` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct FreezeStatus {
    #[serde(flatten)]
    pub info: FreezeInfo,
    pub services: Vec<FrozenEntry>,
    /// Frozen 4-tuples, listed when there are few (see `tuple_count` otherwise).
    pub tuples: Vec<FrozenEntry>,
    pub tuple_count: usize,
    pub counters: Counters,
}

impl Freeze {
    /// The programs' counters, summed over the CPUs.
    pub fn counters(&self) -> Result<Counters, FreezeError> {
        let mut counters = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = self.counters.get(&(counter as u32), 0)?;
            counters.set(counter, per_cpu.iter().sum());
        }
        Ok(counters)
    }

    /// The entries of this freeze (tuples listed up to a few dozen) and its counters.
    pub fn status(&self) -> Result<FreezeStatus, FreezeError> {
        let now = sys::monotonic_now();
        let services = self
            .services
            .iter()
            .map(|entry| entry.map(|(key, value)| frozen_entry(now, &value, Some(key), None)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tuples = Vec::new();
        let mut tuple_count = 0;
        for entry in self.tuples.iter() {
            let (key, value) = entry?;
            tuple_count += 1;
            if tuples.len() < STATUS_TUPLE_LIST_MAX {
                tuples.push(frozen_entry(now, &value, None, Some(key)));
            }
        }
        Ok(FreezeStatus {
            info: self.info.clone(),
            services,
            tuples,
            tuple_count,
            counters: self.counters()?,
        })
    }
}

/// The status of every freeze, or of those in `netns`.
pub fn statuses(netns: Option<&Netns>) -> Result<Vec<FreezeStatus>, FreezeError> {
    infos(netns)?
        .into_iter()
        .map(|info| Freeze::open_with(info)?.status())
        .collect()
}

/// A rebalance's steering as `tcpmig status` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct SteeringStatus {
    pub name: String,
    /// The interface it is attached to, and its namespace's inode (None when its note is gone).
    pub dev: Option<String>,
    pub netns_inode: Option<u64>,
    pub connections: Vec<SteeredStatus>,
}

/// One steered connection.
#[derive(Clone, Debug, Serialize)]
pub struct SteeredStatus {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Where its segments go.
    pub to_mac: String,
    pub segments: u64,
    /// Seconds since its last segment (or its steering).
    pub quiet_s: f64,
    pub client_closed: bool,
    pub client_reset: bool,
}

/// Every steering, or those attached in `netns`.
pub fn steering_statuses(netns: Option<&Netns>) -> Result<Vec<SteeringStatus>, FreezeError> {
    let names = match netns {
        Some(netns) => Steering::list_in(netns)?,
        None => Steering::list()?,
    };
    let now = sys::monotonic_now().as_nanos() as f64;
    let mut statuses = Vec::with_capacity(names.len());
    for name in names {
        let place = Steering::place(&name);
        let connections = (Steering::open(&name)?.entries()?.into_iter())
            .map(|e| SteeredStatus {
                local: e.tuple.local,
                remote: e.tuple.remote,
                to_mac: e.dst_mac.map(|b| format!("{b:02x}")).join(":"),
                segments: e.packets,
                quiet_s: (now - e.last_ns as f64) / 1e9,
                client_closed: e.fin,
                client_reset: e.rst,
            })
            .collect();
        statuses.push(SteeringStatus {
            name,
            netns_inode: place.as_ref().map(|(inode, _)| *inode),
            dev: place.map(|(_, dev)| dev),
            connections,
        });
    }
    Ok(statuses)
}

fn frozen_entry(
    now: Duration,
    value: &FreezeValue,
    service: Option<ServiceKey>,
    tuple: Option<TupleKey>,
) -> FrozenEntry {
    let now_ns = now.as_nanos() as f64;
    FrozenEntry {
        service: service.map(|key| socket_addr(key.family, key.addr, key.port)),
        tuple: tuple.map(|key| {
            (
                socket_addr(key.family, key.local_addr, key.local_port),
                socket_addr(key.family, key.remote_addr, key.remote_port),
            )
        }),
        frozen_for_s: (now_ns - value.since_ns as f64) / 1e9,
        deadline_in_s: (value.deadline_ns as f64 - now_ns) / 1e9,
        new_connections_only: value.scope == SCOPE_NEW_CONNECTIONS,
    }
}
