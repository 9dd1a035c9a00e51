//! The service address: add, delete, test and move it between namespaces with rtnetlink.
use std::net::IpAddr;

use tracing::{debug, info, warn};

use super::{
    NetError, Netns, announce,
    announce::{ANNOUNCE_COUNT, ANNOUNCE_INTERVAL},
    rtnl::{Session, errno, with_link},
};

/// Puts `addr/prefix_len` on `dev` in `netns`. Already there with that prefix: nothing to do.
/// IPv6 addresses skip duplicate address detection so that they are usable at once.
pub fn add_address(netns: &Netns, dev: &str, addr: IpAddr, prefix_len: u8) -> Result<(), NetError> {
    check_prefix(addr, prefix_len)?;
    with_link(netns, dev, |session| add_with(session, addr, prefix_len))
}

/// [`add_address`] on an open session.
pub(super) fn add_with(
    session: &Session<'_>,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<(), NetError> {
    let (netns, dev) = (session.netns, session.dev);
    let error = match session.add_address(addr, prefix_len) {
        Ok(()) => {
            info!(%netns, dev, %addr, prefix_len, "address added");
            return Ok(());
        }
        Err(error) => error,
    };
    if errno(&error) != Some(libc::EEXIST) {
        return Err(session.netlink_error(format!("adding {addr}/{prefix_len}"), error));
    }
    // IPv6 refuses a second prefix length for the same address with EEXIST too.
    if session.addresses()?.contains(&(addr, prefix_len)) {
        debug!(%netns, dev, %addr, prefix_len, "address already there");
        Ok(())
    } else {
        Err(NetError::AddressConflict {
            netns: netns.to_string(),
            dev: dev.to_owned(),
            addr,
        })
    }
}

/// Removes `addr/prefix_len` from `dev` in `netns`; [`NetError::AddressMissing`] if it is not
/// there. Deleting an IPv4 primary address also deletes its secondaries unless the namespace has
/// `net.ipv4.conf.DEV.promote_secondaries=1` (kernel behaviour).
pub fn delete_address(
    netns: &Netns,
    dev: &str,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<(), NetError> {
    check_prefix(addr, prefix_len)?;
    with_link(netns, dev, |session| {
        match session.delete_address(addr, prefix_len) {
            Ok(()) => {
                info!(%netns, dev, %addr, prefix_len, "address deleted");
                Ok(())
            }
            Err(error) if errno(&error) == Some(libc::EADDRNOTAVAIL) => {
                Err(NetError::AddressMissing {
                    netns: netns.to_string(),
                    dev: dev.to_owned(),
                    addr,
                    prefix_len,
                })
            }
            Err(error) => {
                Err(session.netlink_error(format!("deleting {addr}/{prefix_len}"), error))
            }
        }
    })
}

/// Whether `dev` in `netns` holds exactly `addr/prefix_len`.
pub fn has_address(
    netns: &Netns,
    dev: &str,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<bool, NetError> {
    with_link(netns, dev, |session| {
        Ok(session.addresses()?.contains(&(addr, prefix_len)))
    })
}

/// Moves the service address: deletes it on the source, adds it on the destination, then
/// announces it from there ([`ANNOUNCE_COUNT`] times, [`ANNOUNCE_INTERVAL`] apart) so that peers
/// stop sending to the source's MAC at once.
///
/// Safe to retry: an address already gone from the source or already on the destination is not
/// an error. If the destination refuses it, the address goes back on the source (when it was
/// taken from there) so that the connections can go on where they were.
pub fn move_address(
    from_netns: &Netns,
    from_dev: &str,
    to_netns: &Netns,
    to_dev: &str,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<(), NetError> {
    let taken = match delete_address(from_netns, from_dev, addr, prefix_len) {
        Ok(()) => true,
        Err(NetError::AddressMissing { .. }) => {
            warn!(%from_netns, from_dev, %addr, prefix_len, "address already gone from the source");
            false
        }
        Err(error) => return Err(error),
    };
    if let Err(error) = add_address(to_netns, to_dev, addr, prefix_len) {
        let rollback = if !taken {
            "the address is on neither side: add it where it belongs".to_owned()
        } else {
            match add_address(from_netns, from_dev, addr, prefix_len) {
                Ok(()) => {
                    format!("the address is back on {from_dev} in network namespace {from_netns}")
                }
                Err(rollback) => format!(
                    "putting it back on the source failed too ({rollback}): the address is on \
                     neither side, add it where it belongs"
                ),
            }
        };
        return Err(NetError::Move {
            addr,
            prefix_len,
            rollback,
            source: Box::new(error),
        });
    }
    announce(to_netns, to_dev, addr, ANNOUNCE_COUNT, ANNOUNCE_INTERVAL)
}

/// Catches a wrong prefix before the kernel answers a bare EINVAL.
pub(super) fn check_prefix(addr: IpAddr, prefix_len: u8) -> Result<(), NetError> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(NetError::InvalidPrefix {
            addr,
            prefix_len,
            max,
        });
    }
    Ok(())
}
