//! A route-netlink session bound to one network namespace. rtnetlink is async; each call gets a
//! small current-thread runtime on a thread that has entered the namespace, so that the netlink
//! socket, created on that thread, talks to that namespace and no other.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use netlink_packet_route::{
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
    link::{LinkAttribute, LinkLayerType, LinkMessage},
};
use rtnetlink::{AddressMessageBuilder, Handle, packet_core::ErrorMessage};
use tokio::runtime::Runtime;

use super::{NetError, NetlinkError, Netns};

/// What the network plane needs to know about an interface.
pub(super) struct Link {
    pub(super) index: u32,
    pub(super) link_type: LinkLayerType,
    /// Hardware address, when it is an Ethernet one.
    pub(super) mac: Option<[u8; 6]>,
}

/// One interface in one namespace, with a netlink connection open there; it lives on a thread
/// inside that namespace (see [`with_link`]).
pub(super) struct Session<'a> {
    runtime: Runtime,
    handle: Handle,
    pub(super) link: Link,
    pub(super) netns: &'a Netns,
    pub(super) dev: &'a str,
}

impl Session<'_> {
    /// Wraps a netlink failure with where it happened and a hint chosen by its errno.
    pub(super) fn netlink_error(&self, action: String, source: NetlinkError) -> NetError {
        netlink_error(self.netns, self.dev, action, source)
    }

    /// Every address of the interface with its prefix length.
    pub(super) fn addresses(&self) -> Result<Vec<(IpAddr, u8)>, NetError> {
        let request = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.link.index)
            .execute();
        let messages: Vec<AddressMessage> = self
            .runtime
            .block_on(request.try_collect())
            .map_err(|e| self.netlink_error("listing addresses".to_owned(), e.into()))?;
        Ok(messages
            .iter()
            .filter_map(|message| Some((local_address(message)?, message.header.prefix_len)))
            .collect())
    }

    /// IPv6 addresses skip duplicate address detection: a migrated address must be usable at
    /// once. Fails with the raw error so that the caller can treat EEXIST its way.
    pub(super) fn add_address(&self, addr: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        let mut request = self.handle.address().add(self.link.index, addr, prefix_len);
        if addr.is_ipv6() {
            request.message_mut().header.flags = AddressHeaderFlags::Nodad;
        }
        Ok(self.runtime.block_on(request.execute())?)
    }

    /// Fails with the raw error so that the caller can treat EADDRNOTAVAIL its way.
    pub(super) fn delete_address(&self, addr: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
        // The kernel matches a deletion on the local address and the prefix length.
        let index = self.link.index;
        let message = match addr {
            IpAddr::V4(ip) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(ip, prefix_len)
                .build(),
            IpAddr::V6(ip) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(ip, prefix_len)
                .build(),
        };
        Ok(self
            .runtime
            .block_on(self.handle.address().del(message).execute())?)
    }
}

/// Opens a netlink connection in the calling thread's namespace, driven by its own runtime.
fn connect() -> Result<(Runtime, Handle), NetlinkError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    // The tokio socket registers with the runtime's reactor, hence `enter`.
    let (connection, handle, _) = {
        let _context = runtime.enter();
        rtnetlink::new_connection()?
    };
    runtime.spawn(connection);
    Ok((runtime, handle))
}

/// `None` when the namespace has no interface of that name.
fn find_link(runtime: &Runtime, handle: &Handle, dev: &str) -> Result<Option<Link>, NetlinkError> {
    let mut request = std::pin::pin!(handle.link().get().match_name(dev).execute());
    match runtime.block_on(request.try_next()) {
        Ok(message) => Ok(message.map(Link::from)),
        Err(error) if errno_of(&error) == Some(libc::ENODEV) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

impl From<LinkMessage> for Link {
    fn from(message: LinkMessage) -> Self {
        let mac = message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            });
        Self {
            index: message.header.index,
            link_type: message.header.link_layer_type,
            mac,
        }
    }
}

/// The interface's own address: IFA_LOCAL for IPv4 (IFA_ADDRESS is the peer on point-to-point
/// links), IFA_ADDRESS for IPv6.
fn local_address(message: &AddressMessage) -> Option<IpAddr> {
    let find = |want_local: bool| {
        message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                AddressAttribute::Local(ip) if want_local => Some(*ip),
                AddressAttribute::Address(ip) if !want_local => Some(*ip),
                _ => None,
            })
    };
    find(true).or_else(|| find(false))
}

impl<'a> Session<'a> {
    /// Opens a session in the calling thread's namespace, which must be `netns`.
    fn open_here(netns: &'a Netns, dev: &'a str) -> Result<Self, NetError> {
        let failed = |action, source| netlink_error(netns, dev, action, source);
        let (runtime, handle) =
            connect().map_err(|e| failed("opening a netlink socket".to_owned(), e))?;
        let link = find_link(&runtime, &handle, dev)
            .map_err(|e| failed(format!("looking up interface {dev}"), e))?
            .ok_or_else(|| NetError::NoInterface {
                netns: netns.to_string(),
                dev: dev.to_owned(),
            })?;
        Ok(Session {
            runtime,
            handle,
            link,
            netns,
            dev,
        })
    }

    /// Closes the session without waiting for its runtime: the way to drop it from inside
    /// another runtime, where a blocking drop panics.
    pub(super) fn close_in_background(self) {
        self.runtime.shutdown_background();
    }

    /// Opens a session inside `netns` from any thread: its netlink socket stays bound to that
    /// namespace, so the session works from whichever thread uses it.
    pub(super) fn open(netns: &'a Netns, dev: &'a str) -> Result<Self, NetError> {
        netns.run(|| Self::open_here(netns, dev))?
    }
}

/// Runs `f` on a thread inside `netns` with a netlink session there and `dev` looked up.
pub(super) fn with_link<T: Send>(
    netns: &Netns,
    dev: &str,
    f: impl FnOnce(&Session<'_>) -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    netns.run(|| f(&Session::open_here(netns, dev)?))?
}

fn netlink_error(netns: &Netns, dev: &str, action: String, source: NetlinkError) -> NetError {
    NetError::Netlink {
        netns: netns.to_string(),
        dev: dev.to_owned(),
        action,
        hint: hint(errno(&source)),
        source: Box::new(source),
    }
}

fn errno_of(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(ErrorMessage {
            code: Some(code), ..
        }) => Some(-code.get()),
        _ => None,
    }
}

/// The errno behind a failure, if the kernel or the OS gave one.
pub(super) fn errno(error: &NetlinkError) -> Option<i32> {
    match error {
        NetlinkError::Rtnetlink(error) => errno_of(error),
        NetlinkError::Socket(error) => error.raw_os_error(),
    }
}

fn hint(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EPERM | libc::EACCES) => {
            "tcpmig needs CAP_NET_ADMIN in that network namespace: run it as root"
        }
        Some(libc::EINVAL) => "the kernel rejected the request: check the address and prefix",
        Some(libc::ENETDOWN) => "bring the interface up first (`ip link set DEV up`)",
        _ => "check the interface and its addresses with `ip addr` in that network namespace",
    }
}
