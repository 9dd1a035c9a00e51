//! Network plane: network namespaces, the service address (rtnetlink) and the announcements that
//! make peers send to its new owner at once (gratuitous ARP, unsolicited neighbour advertisement),
//! and, for the freeze and repair planes both, the raw IP socket that hands TCP segments to the
//! local stack (`inject`).
//!
//! Every call takes the [`Netns`] it acts in and does its work on a thread inside it, so the
//! caller's own namespace is never touched by accident; the one exception, the crate-internal
//! `TcpInjector::open`, acts in the caller's: the restore already runs inside the destination's.
mod addr;
mod announce;
mod checksum;
mod inject;
mod listener;
mod netns;
mod rtnl;
mod takeover;

use std::{io, net::IpAddr, time::Duration};

pub use addr::{add_address, delete_address, has_address, move_address};
pub use announce::{
    ANNOUNCE_COUNT, ANNOUNCE_INTERVAL, MAX_ANNOUNCE_COUNT, MAX_ANNOUNCE_INTERVAL, announce,
    ethernet_link,
};
pub(crate) use inject::{InjectError, TcpInjector, fix_checksums, tcp_tuple};
pub use listener::listen_ahead;
pub use netns::{Netns, NetnsError};
pub use takeover::Takeover;

/// Failures of the network plane; each names the namespace, interface or address involved and
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("network namespace {netns}: listening on {service} ahead of the address")]
    Listen {
        netns: String,
        service: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("network namespace {netns}: no interface {dev}; list them with `ip link` there")]
    NoInterface { netns: String, dev: String },
    #[error("network namespace {netns}, interface {dev}: {action} failed; {hint}")]
    Netlink {
        netns: String,
        dev: String,
        action: String,
        hint: &'static str,
        /// Boxed: rtnetlink's error can hold a whole netlink message.
        source: Box<NetlinkError>,
    },
    #[error("{addr}/{prefix_len}: the prefix length is at most {max} for this family")]
    InvalidPrefix {
        addr: IpAddr,
        prefix_len: u8,
        max: u8,
    },
    #[error(
        "network namespace {netns}: {addr} is already on {dev} with another prefix length; \
         delete it first or use the prefix it has (`ip addr show dev {dev}` there)"
    )]
    AddressConflict {
        netns: String,
        dev: String,
        addr: IpAddr,
    },
    #[error(
        "network namespace {netns}: {addr}/{prefix_len} is not on {dev}, nothing to delete; \
         check the prefix length with `ip addr show dev {dev}` there"
    )]
    AddressMissing {
        netns: String,
        dev: String,
        addr: IpAddr,
        prefix_len: u8,
    },
    /// The source says where the destination refused the address.
    #[error("moving {addr}/{prefix_len} failed; {rollback}")]
    Move {
        addr: IpAddr,
        prefix_len: u8,
        /// Where the address is now, so the operator knows what to fix.
        rollback: String,
        source: Box<NetError>,
    },
    #[error(
        "network namespace {netns}: refusing to announce {addr} on {dev}, which does not hold it; \
         add the address first"
    )]
    NotOnInterface {
        netns: String,
        dev: String,
        addr: IpAddr,
    },
    #[error(
        "network namespace {netns}: {dev} is a {link_type} interface without an Ethernet \
         address; announcements (ARP/NDP) need an Ethernet one (veth, bridge, NIC)"
    )]
    NotEthernet {
        netns: String,
        dev: String,
        link_type: netlink_packet_route::link::LinkLayerType,
    },
    #[error(
        "{count} announcements {interval:?} apart: send 1 to {MAX_ANNOUNCE_COUNT}, at most \
         {MAX_ANNOUNCE_INTERVAL:?} apart"
    )]
    InvalidAnnounce { count: u32, interval: Duration },
    #[error(
        "network namespace {netns}: sending the announcement of {addr} on {dev} failed; check \
         that {dev} is up (`ip link set {dev} up` there)"
    )]
    Send {
        netns: String,
        dev: String,
        addr: IpAddr,
        source: io::Error,
    },
}

/// One failed netlink exchange; [`NetError::Netlink`] says where it happened.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error(transparent)]
    Rtnetlink(#[from] rtnetlink::Error),
    #[error("netlink socket")]
    Socket(#[from] io::Error),
}
