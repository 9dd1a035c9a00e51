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

/// A packet socket that copies the frames arriving on one interface which its classic BPF
/// filter accepts, without the Ethernet header (SOCK_DGRAM), and never sends: how a freeze holds
/// what it drops (packet taps run before tc ingress, see `freeze::hold`). It is created with a
/// filter that accepts nothing, so nothing is queued before [`CaptureSocket::set_filter`].
pub struct CaptureSocket {
    fd: OwnedFd,
}

impl CaptureSocket {
    /// Bound to `ifindex` for `ethertype` frames, with a queue of `queue_bytes` (kernel
    /// accounting, SO_RCVBUFFORCE) and a filter that accepts nothing.
    pub fn bind(ifindex: u32, ethertype: u16, queue_bytes: usize) -> io::Result<Self> {
        use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};
        // Protocol 0 receives nothing until bound: the filter is in place before any frame.
        // SAFETY: plain socket(2); the fd is owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let socket = Self { fd };
        socket.set_filter(&[libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        }])?;
        // The kernel doubles the value it is given.
        setsockopt(
            &socket.fd,
            RcvBufForce,
            &(queue_bytes / 2).min(i32::MAX as usize),
        )?;
        let one: libc::c_int = 1;
        // SAFETY: an int option, passed with its size.
        let ignore = unsafe {
            libc::setsockopt(
                socket.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                std::ptr::from_ref(&one).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ignore != 0 {
            return Err(io::Error::last_os_error());
        }
        let address = sockaddr_ll(ifindex, ethertype, [0; 6]);
        // SAFETY: `address` is a valid sockaddr_ll of the length passed.
        let bound = unsafe {
            libc::bind(
                socket.fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                sockaddr_ll_len(),
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    /// Replaces the classic BPF filter (SO_ATTACH_FILTER, atomically).
    #[doc(alias = "SO_ATTACH_FILTER")]
    pub fn set_filter(&self, program: &[libc::sock_filter]) -> io::Result<()> {
        let len = u16::try_from(program.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fprog = libc::sock_fprog {
            len,
            // The kernel copies the program and never writes through this pointer.
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: `fprog` points at `len` valid instructions for the duration of the call.
        let set = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                std::ptr::from_ref(&fprog).cast(),
                mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next queued frame into `buf`, without waiting: its whole length (larger than `buf`
    /// when it was cut, MSG_TRUNC), or None when the queue is empty.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of its length.
        let got = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        match usize::try_from(got) {
            Ok(len) => Ok(Some(len)),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Frames the kernel dropped because the queue was full since the last call (reading the
    /// statistics resets them).
    #[doc(alias = "PACKET_STATISTICS")]
    pub fn take_dropped(&self) -> io::Result<u32> {
        let mut stats = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` and `len` are valid for writes and `len` is the size of `stats`.
        let got = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                std::ptr::from_mut(&mut stats).cast(),
                &raw mut len,
            )
        };
        if got != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stats.tp_drops)
    }
}
