//! A packet socket that sends whole Ethernet frames on one interface: how tcpmig announces an
//! address (gratuitous ARP, unsolicited neighbour advertisement) without arping or ndisc6.
use std::{
    io, mem,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// An AF_PACKET socket bound to one interface that only sends (protocol 0: it receives nothing).
pub struct PacketSocket {
    fd: OwnedFd,
    destination: libc::sockaddr_ll,
}

impl PacketSocket {
    pub fn bind(ifindex: u32, ethertype: u16, destination_mac: [u8; 6]) -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut address = sockaddr_ll(ifindex, 0, destination_mac);
        // SAFETY: `address` is a valid sockaddr_ll of the length passed.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                sockaddr_ll_len(),
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        address.sll_protocol = ethertype.to_be();
        Ok(Self {
            fd,
            destination: address,
        })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` and `destination` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&self.destination).cast(),
                sockaddr_ll_len(),
            )
        };
        match usize::try_from(sent) {
            Ok(sent) if sent == frame.len() => Ok(()),
            Ok(sent) => Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                frame.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }
}

fn sockaddr_ll(ifindex: u32, ethertype: u16, mac: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = [0u8; 8];
    addr[..6].copy_from_slice(&mac);
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: i32::try_from(ifindex).expect("interface indexes fit in an int"),
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: addr,
    }
}

fn sockaddr_ll_len() -> libc::socklen_t {
    mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t
}
