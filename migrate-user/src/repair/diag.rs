//! Lists the TCP sockets of the calling thread's network namespace with one sock_diag dump per
//! address family (NETLINK_SOCK_DIAG, inet_diag_req_v2): 4-tuple, state and inode of each, for
//! discovery (the dump reads socket state with a BPF iterator, see kernel_state.rs).
use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use super::TcpState;
use crate::tuple::{Tuple, canonical};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// A dump that stops answering for this long is reported as an error, not waited on forever.
const RECV_TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 5,
    tv_usec: 0,
};
/// Bound on the datagrams one dump may take (each carries tens of sockets).
const MAX_DATAGRAMS: usize = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Request {
    header: NlMsgHdr,
    body: DiagReqV2,
}

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub tuple: Tuple,
    pub state: TcpState,
    pub inode: u64,
}

/// Every TCP socket (IPv4 and IPv6, all states) of the calling thread's namespace.
pub fn tcp_sockets() -> io::Result<Vec<DiagSocket>> {
    let mut sockets = Vec::new();
    for family in FAMILIES {
        dump_family(family, |msg| {
            sockets.push(DiagSocket {
                tuple: msg.tuple(),
                state: TcpState::from_kernel(msg.state),
                inode: u64::from(msg.inode),
            });
        })?;
    }
    Ok(sockets)
}

const FAMILIES: [u8; 2] = [libc::AF_INET as u8, libc::AF_INET6 as u8];

/// One sock_diag dump of `family`, every state: `each` gets every socket's message.
fn dump_family(family: u8, mut each: impl FnMut(&DiagMsg)) -> io::Result<()> {
    // SAFETY: plain socket(2); owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    super::sockopt::set(
        sock.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &RECV_TIMEOUT,
    )?;
    let request = Request {
        header: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            seq: 1,
            pid: 0,
        },
        body: DiagReqV2 {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            states: u32::MAX,
            ..Default::default()
        },
    };
    // SAFETY: `request` is readable for its size.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            std::ptr::from_ref(&request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // Netlink fills at most 32 KiB per datagram.
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_DATAGRAMS {
        // SAFETY: `buf` is writable for its length.
        let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_datagram(&buf[..got as usize], &mut each)? {
            return Ok(());
        }
    }
    Err(io::Error::other("sock_diag dump did not end"))
}

/// Hands the sockets of one datagram to `each`; true once the dump is complete.
fn parse_datagram(mut data: &[u8], each: &mut impl FnMut(&DiagMsg)) -> io::Result<bool> {
    while data.len() >= size_of::<NlMsgHdr>() {
        let header: NlMsgHdr = read_struct(data);
        let len = header.len as usize;
        if len < size_of::<NlMsgHdr>() || len > data.len() {
            return Err(io::Error::other("malformed sock_diag answer"));
        }
        let payload = &data[size_of::<NlMsgHdr>()..len];
        match libc::c_int::from(header.kind) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let errno = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            _ if payload.len() >= size_of::<DiagMsg>() => {
                let msg: DiagMsg = read_struct(payload);
                each(&msg);
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let advance = (len + 3) & !3;
        data = data.get(advance..).unwrap_or_default();
    }
    Ok(false)
}

impl DiagMsg {
    fn tuple(&self) -> Tuple {
        Tuple {
            local: address(self.family, self.id.src, self.id.sport),
            remote: address(self.family, self.id.dst, self.id.dport),
        }
    }
}

fn read_struct<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked; T is plain data and read unaligned.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
}

fn address(family: u8, bytes: [u8; 16], port: [u8; 2]) -> SocketAddr {
    let ip: IpAddr = if libc::c_int::from(family) == libc::AF_INET {
        Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    } else {
        Ipv6Addr::from(bytes).into()
    };
    canonical(SocketAddr::new(ip, u16::from_be_bytes(port)))
}
