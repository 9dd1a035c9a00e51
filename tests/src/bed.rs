//! The bed: four hosts, each a network namespace with one veth `eth0` whose peer is a port of
//! the bridge `br0` in a namespace of its own: the client, the source, the destination, and a
//! second destination (`third`: where a rebalance moves connections on to). The namespaces are a
//! [`Namespaces`] group (suffixes `cli`, `src`, `dst`, `thd`, `br`), removed with the bed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::namespaces::{Namespace, Namespaces};
use crate::wait_until;

/// The one interface of every host.
pub const IFACE: &str = "eth0";
/// The bridge joining the hosts, in the bridge namespace.
pub const BRIDGE: &str = "br0";
/// The hosts' IPv4 subnet, 198.18.0.0/24 (the benchmarking range, RFC 2544).
pub const PREFIX_V4: u8 = 24;
/// The hosts' IPv6 subnet, fd54:636d::/64 (unique local).
pub const PREFIX_V6: u8 = 64;
/// The service address, on the source's `eth0` at first; a migration moves it.
pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The IPv6 service address, on the source's `eth0` at first.
pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0xfd54, 0x636d, 0, 0, 0, 0, 0, 0x100);

/// The bed's prefix length for an address of `ip`'s family: [`PREFIX_V4`] or [`PREFIX_V6`].
pub fn prefix_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { PREFIX_V4 } else { PREFIX_V6 }
}

/// Links come up within milliseconds; this bounds a broken setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The part a host plays; it fixes the host's addresses and name suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Source,
    Destination,
    Third,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Client, Role::Source, Role::Destination, Role::Third];

    /// The host's own IPv4 address: 198.18.0.{1,2,3,4}.
    pub fn v4(self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, self.number())
    }

    /// The host's own IPv6 address: fd54:636d::{1,2,3,4}.
    pub fn v6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd54, 0x636d, 0, 0, 0, 0, 0, self.number().into())
    }

    fn number(self) -> u8 {
        self as u8 + 1
    }

    /// Suffix of the host's namespace name, also the name of its port on the bridge.
    fn suffix(self) -> &'static str {
        match self {
            Role::Client => "cli",
            Role::Source => "src",
            Role::Destination => "dst",
            Role::Third => "thd",
        }
    }
}

/// One host of a bed: a [`Namespace`] with `eth0` and the addresses of its [`Role`]. Code and
/// processes enter it with the namespace's methods ([`Namespace::run`], [`Namespace::command`]).
pub struct Host {
    role: Role,
    netns: Namespace,
}

impl Deref for Host {
    type Target = Namespace;

    fn deref(&self) -> &Namespace {
        &self.netns
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.netns.fmt(f)
    }
}

impl Host {
    pub fn role(&self) -> Role {
        self.role
    }

    pub fn v4(&self) -> Ipv4Addr {
        self.role.v4()
    }

    pub fn v6(&self) -> Ipv6Addr {
        self.role.v6()
    }

    /// Whether its `eth0` holds `ip` with the bed's prefix length of that family.
    pub fn holds(&self, ip: IpAddr) -> Result<bool> {
        let out = self.ip(&["-j", "addr", "show", "dev", IFACE])?;
        let links: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing ip -j output")?;
        let (local, prefix) = (ip.to_string(), prefix_len(ip));
        Ok(links
            .iter()
            .filter_map(|link| link["addr_info"].as_array())
            .flatten()
            .any(|addr| addr["local"] == local.as_str() && addr["prefixlen"] == prefix))
    }

    /// The MAC address of its `eth0`, as `ip link` prints it (`02:54:...`), which its neighbours
    /// learn for its addresses.
    pub fn mac(&self) -> Result<String> {
        let out = self.ip(&["-j", "link", "show", "dev", IFACE])?;
        let links: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing ip -j output")?;
        links
            .first()
            .and_then(|link| link["address"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no MAC address on {IFACE} in {self}"))
    }
}

/// Three hosts on a bridge. Dropping it kills what its hosts still run and deletes its namespaces,
/// which removes the veths and the bridge with them.
pub struct TestBed {
    hosts: [Host; 4],
    /// Declared last: the namespaces go after the hosts' handles.
    namespaces: Namespaces<5>,
}

impl TestBed {
    /// Builds a bed (after removing the stale ones of dead test processes). Needs root.
    pub fn new() -> Result<Self> {
        Self::build(true)
    }

    /// A bed whose source does not hold the service address: for tests of the network plane,
    /// which add and move it themselves.
    pub fn without_service() -> Result<Self> {
        Self::build(false)
    }

    fn build(with_service: bool) -> Result<Self> {
        let namespaces = Namespaces::new([
            "br",
            Role::Client.suffix(),
            Role::Source.suffix(),
            Role::Destination.suffix(),
            Role::Third.suffix(),
        ])?;
        let [_, cli, src, dst, thd] = namespaces.members();
        let hosts = [
            (Role::Client, cli),
            (Role::Source, src),
            (Role::Destination, dst),
            (Role::Third, thd),
        ]
        .map(|(role, netns)| Host {
            role,
            netns: netns.labelled(format!("{role:?} host (netns {})", netns.name())),
        });
        let bed = Self { hosts, namespaces };
        // On error `bed` is dropped here, which removes whatever was built.
        bed.wire(with_service)
            .with_context(|| format!("building test bed {} (needs root)", bed.prefix()))?;
        Ok(bed)
    }

    /// The bridge, a veth per host with its addresses, and the ports up and forwarding.
    fn wire(&self, with_service: bool) -> Result<()> {
        let bridge = self.bridge();
        bridge.ip_batch(&[
            // No multicast snooping: IPv6 neighbour discovery must not depend on MLD reports.
            format!("link add {BRIDGE} type bridge mcast_snooping 0"),
            format!("link set {BRIDGE} up"),
        ])?;
        for host in &self.hosts {
            let mut lines = vec![
                // Created from inside the host, so nothing ever appears in the root namespace.
                format!(
                    "link add {IFACE} type veth peer name {} netns {}",
                    host.role.suffix(),
                    bridge.name()
                ),
                format!("addr add {}/{PREFIX_V4} dev {IFACE}", host.v4()),
                format!("addr add {}/{PREFIX_V6} dev {IFACE} nodad", host.v6()),
            ];
            if with_service && host.role == Role::Source {
                lines.push(format!("addr add {SERVICE_V4}/{PREFIX_V4} dev {IFACE}"));
                lines.push(format!(
                    "addr add {SERVICE_V6}/{PREFIX_V6} dev {IFACE} nodad"
                ));
            }
            lines.push(format!("link set {IFACE} up"));
            host.ip_batch(&lines)?;
        }
        let ports: Vec<String> = Role::ALL
            .iter()
            .flat_map(|role| {
                let port = role.suffix();
                [
                    format!("link set {port} master {BRIDGE}"),
                    format!("link set {port} up"),
                ]
            })
            .collect();
        bridge.ip_batch(&ports)?;
        wait_until("the bridge ports to forward", SETUP_TIMEOUT, || {
            self.ports_forwarding()
        })
    }

    /// Whether every bridge port is up (so is its veth peer) and forwarding.
    fn ports_forwarding(&self) -> Result<bool> {
        let out = self
            .bridge()
            .ip(&["-j", "-d", "link", "show", "master", BRIDGE])?;
        let ports: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("parsing ip -j output")?;
        Ok(ports.len() == self.hosts.len()
            && ports.iter().all(|port| {
                port["operstate"] == "UP"
                    && port["linkinfo"]["info_slave_data"]["state"] == "forwarding"
            }))
    }

    fn bridge(&self) -> &Namespace {
        &self.namespaces.members()[0]
    }

    /// The prefix of this bed's namespace names; see
    /// [`namespaces_with_prefix`](crate::namespaces_with_prefix).
    pub fn prefix(&self) -> &str {
        self.namespaces.prefix()
    }

    /// The namespace holding the bridge.
    pub fn bridge_netns(&self) -> String {
        self.bridge().name().to_owned()
    }

    pub fn host(&self, role: Role) -> &Host {
        &self.hosts[role as usize]
    }

    pub fn client(&self) -> &Host {
        self.host(Role::Client)
    }

    pub fn source(&self) -> &Host {
        self.host(Role::Source)
    }

    pub fn destination(&self) -> &Host {
        self.host(Role::Destination)
    }

    /// A second destination: where a rebalance moves connections on to.
    pub fn third(&self) -> &Host {
        self.host(Role::Third)
    }

    /// The service address of one family: [`SERVICE_V6`] if `ipv6`, else [`SERVICE_V4`].
    pub fn service(ipv6: bool) -> IpAddr {
        if ipv6 {
            SERVICE_V6.into()
        } else {
            SERVICE_V4.into()
        }
    }

    /// Every pid started through this bed so far, to check after the drop that none survived.
    pub fn started_pids(&self) -> Vec<u32> {
        self.namespaces.started_pids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(Role::Destination.v4(), Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(Role::Client.v6().to_string(), "fd54:636d::1");
        assert_eq!(SERVICE_V6.to_string(), "fd54:636d::100");
    }
}
