//! A rebalance on the destination (Prepare with `keep_address`): the service addresses stay on
//! the source, which answers ARP and ND for them and forwards the moved connections' segments
//! here. This host holds each address quietly, on `lo`, so that its stack takes those segments
//! and its restored sockets answer from the address, without ever answering ARP or ND for it
//! (docs/rebalance.md). When this host answers for the address already (a connection moved away
//! comes back), the address stays as it is, and the connections leave this host's steerings.
use std::{io, net::IpAddr};

use crate::{
    freeze::Steering,
    migrate::{MigrateError, MovedAddress},
    net::{self, Netns},
    tuple::Tuple,
};

/// The device that holds a quiet address.
const QUIET_DEV: &str = "lo";

/// Where a rebalance's addresses go on this host, decided on Prepare.
pub(super) struct QuietAddresses {
    /// The addresses this host does not have yet: added to `lo` on the commit.
    missing: Vec<MovedAddress>,
}

impl QuietAddresses {
    /// Looks up which of `addresses` this host has on some interface already.
    pub(super) fn prepare(netns: &Netns, addresses: &[MovedAddress]) -> Result<Self, MigrateError> {
        let mut missing = Vec::new();
        for address in addresses {
            if !netns.run(|| is_local(address.ip))?? {
                missing.push(*address);
            }
        }
        Ok(Self { missing })
    }

    /// Whether this host has every address already (on any interface).
    pub(super) fn holds_all(&self) -> bool {
        self.missing.is_empty()
    }

    /// On the commit: the missing addresses on `lo`, after ARP is told to answer only for the
    /// addresses of the interface asked on (`arp_ignore` 1) and never to use them as a source
    /// (`arp_announce` 2). An address on `lo` draws no neighbour advertisement: IPv6 needs
    /// nothing more.
    pub(super) fn claim(&self, netns: &Netns) -> Result<(), MigrateError> {
        if self.missing.iter().any(|a| a.ip.is_ipv4()) {
            netns
                .run(|| {
                    at_least("net/ipv4/conf/all/arp_ignore", 1)?;
                    at_least("net/ipv4/conf/all/arp_announce", 2)
                })?
                .map_err(|source| MigrateError::QuietAddress { source })?;
        }
        for address in &self.missing {
            net::add_address(netns, QUIET_DEV, address.ip, address.prefix_len)?;
        }
        Ok(())
    }
}

/// Whether `ip` is an address of this namespace: a socket can bind to it.
fn is_local(ip: IpAddr) -> Result<bool, MigrateError> {
    match std::net::UdpSocket::bind((ip, 0)) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(source) => Err(MigrateError::QuietAddress { source }),
    }
}

/// Raises the sysctl `key` (under /proc/sys, of the calling thread's namespace) to `value`,
/// leaving a higher value as the operator set it.
fn at_least(key: &str, value: u32) -> io::Result<()> {
    let path = format!("/proc/sys/{key}");
    let current: u32 = std::fs::read_to_string(&path)?.trim().parse().unwrap_or(0);
    if current < value {
        std::fs::write(&path, value.to_string())?;
    }
    Ok(())
}

/// Takes `tuples` out of every steering of this host (of `netns`): they were moved away and
/// forwarded from here, and are back. Returns how many entries went.
pub(super) fn take_back(netns: &Netns, tuples: &[Tuple]) -> Result<usize, MigrateError> {
    let mut taken = 0;
    for name in Steering::list_in(netns)? {
        taken += Steering::open(&name)?.unsteer(tuples)?;
    }
    Ok(taken)
}
