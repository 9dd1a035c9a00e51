//! A rebalance on the source (`migrate --keep-address`): the connections the selector picks
//! move, the others and the addresses stay. Where the address is on the source's interface, a
//! steering forwards the moved connections' segments to the destination from the commit on
//! (docs/rebalance.md); where it is not (the source held it quietly: a connection moved here
//! before goes back, or on), the host holding the address forwards them, and the agent there
//! takes them back from its steering.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use super::{SourceConfig, distinct, prefix_of};
use crate::{
    freeze::{NextHop, Steering},
    migrate::{MigrateError, MovedAddress, Selector},
    net::{self, Netns},
    repair,
    tuple::Tuple,
};

/// The hidden subcommand of the tcpmig binary that sweeps a steering until it is empty
/// ([`crate::freeze::Steering::keep`]).
pub const STEER_KEEPER_COMMAND: &str = "steer-keeper";

/// How a rebalance chooses and then follows its connections (`--keep-address`).
#[derive(Clone, Debug)]
pub struct KeepAddress {
    /// Which of the services' connections move; all of them when None (a move back).
    pub select: Option<Selector>,
    /// A moved connection's steering entry goes this long after the client closed it (its last
    /// ACK forwarded), ...
    pub steer_grace: Duration,
    /// ... or after this long without a segment, whatever its state (a client that vanished).
    pub steer_idle: Duration,
}

/// What a rebalance holds on the source.
pub(super) struct Rebalancing {
    /// The connections picked, for the discovery's filter and the freeze.
    pub(super) picked: Arc<HashSet<Tuple>>,
    /// The service's connections when they were picked.
    pub(super) of: usize,
    /// This host answers ARP and ND for the addresses (they are on the interface): it must steer.
    answers: bool,
    /// The name of this migration's steering, made once the agent gives a MAC to steer to.
    name: String,
    steering: Option<Steering>,
    /// The agent's MAC (from Prepared), where the steering sends.
    steer_to: Option<[u8; 6]>,
}

impl Rebalancing {
    /// Picks the connections among those of `services` that a process holds (one waiting in
    /// an accept queue is none of them).
    pub(super) fn start(
        config: &SourceConfig,
        keep: &KeepAddress,
        netns: &Netns,
        services: &[SocketAddr],
    ) -> Result<Self, MigrateError> {
        let answers = answers_for(netns, config, services)?;
        let filter = repair::Filter::services(services);
        let held: Vec<Tuple> = (repair::list_tcp_sockets(netns)?.into_iter())
            .filter(|s| s.inode != 0 && s.state.repairable() && filter.matches_local(s.tuple.local))
            .map(|s| s.tuple)
            .collect();
        let picked = match &keep.select {
            Some(select) => select.select(&held),
            None => held.clone(),
        };
        if picked.is_empty() {
            return Err(MigrateError::NoConnections {
                pid: config.pids[0],
                services: services.to_vec(),
            });
        }
        Ok(Self {
            picked: Arc::new(picked.into_iter().collect()),
            of: held.len(),
            answers,
            name: format!("rebalance-{}", std::process::id()),
            steering: None,
            steer_to: None,
        })
    }

    /// The steering this migration may make: a rollback removes it.
    pub(super) fn planned_steering(&self) -> String {
        self.name.clone()
    }

    /// On the agent's Prepared. When its host lacks the addresses, the moved connections'
    /// segments must reach it through this host: the steering is attached now, before the
    /// application stops (loading the program takes milliseconds), to its `mac`. When it has
    /// them (a move back to the host that forwarded them here), nothing forwards to it.
    pub(super) fn prepared(
        &mut self,
        netns: &Netns,
        dev: &str,
        mac: Option<[u8; 6]>,
        has_addresses: bool,
    ) -> Result<(), MigrateError> {
        match (has_addresses, self.answers) {
            (true, true) => return Err(MigrateError::AddressOnBothHosts),
            (true, false) => return Ok(()),
            _ => {}
        }
        let mac = mac.ok_or(MigrateError::NoSteerTarget)?;
        self.steering = Some(Steering::attach(netns, dev, &self.name)?);
        self.steer_to = Some(mac);
        Ok(())
    }

    /// How many of the picked connections are on each of `services`: the agent's pools.
    pub(super) fn counts(&self, services: &[SocketAddr]) -> Vec<usize> {
        services
            .iter()
            .map(|&service| {
                let filter = repair::Filter::service(service);
                (self.picked.iter())
                    .filter(|t| filter.matches_local(t.local))
                    .count()
            })
            .collect()
    }

    /// Forwards `tuples` (the connections dumped) to the agent's MAC, through the interface.
    pub(super) fn steer(
        &mut self,
        netns: &Netns,
        dev: &str,
        tuples: &[Tuple],
    ) -> Result<(), MigrateError> {
        let Some(steering) = &mut self.steering else {
            return Ok(());
        };
        let dst_mac = self.steer_to.ok_or(MigrateError::NoSteerTarget)?;
        let (ifindex, src_mac) = net::ethernet_link(netns, dev)?;
        tracing::info!(
            connections = tuples.len(),
            steering = steering.name(),
            "steering the moved connections to the agent"
        );
        steering.steer(
            tuples,
            NextHop {
                ifindex,
                src_mac,
                dst_mac,
            },
        )?;
        Ok(())
    }

    /// The steering's name, when this host steers.
    pub(super) fn steering_name(&self) -> Option<String> {
        self.steering.as_ref().map(|s| s.name().to_owned())
    }
}

/// Whether every service address is on the source's interface: then this host answers for it,
/// and steers. Otherwise it must hold none there (a quiet copy, on `lo`).
fn answers_for(
    netns: &Netns,
    config: &SourceConfig,
    services: &[SocketAddr],
) -> Result<bool, MigrateError> {
    let ips = distinct(services.iter().map(SocketAddr::ip));
    let on_dev = ips
        .iter()
        .filter(|&&ip| prefix_of(netns, config, ip).is_ok())
        .count();
    match on_dev {
        0 => Ok(false),
        n if n == ips.len() => Ok(true),
        _ => Err(MigrateError::MixedAddresses {
            dev: config.dev.clone(),
        }),
    }
}

/// The addresses a rebalance's agent holds quietly: each service address, as a host address.
pub(super) fn quiet_addresses(services: &[SocketAddr]) -> Vec<MovedAddress> {
    distinct(services.iter().map(SocketAddr::ip))
        .into_iter()
        .map(|ip: IpAddr| MovedAddress {
            ip,
            prefix_len: if ip.is_ipv4() { 32 } else { 128 },
        })
        .collect()
}

/// Starts `exe steer-keeper` for the steering `name`, detached (its own process group, no
/// stdio): it outlives this migration as long as a moved connection does.
pub(super) fn start_keeper(exe: &Path, name: &str, keep: &KeepAddress) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt as _;
    Command::new(exe)
        .arg(STEER_KEEPER_COMMAND)
        .arg(name)
        .arg("--grace")
        .arg(keep.steer_grace.as_secs_f64().to_string())
        .arg("--idle")
        .arg(keep.steer_idle.as_secs_f64().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}
