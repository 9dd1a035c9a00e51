//! Lists the TCP sockets of the calling thread's network namespace with one sock_diag dump per
//! address family (NETLINK_SOCK_DIAG, inet_diag_req_v2): 4-tuple, state and inode of each for
//! discovery, and for the dump everything sock_diag knows of each connection, which saves the
//! dump eight calls per socket.
use std::{
    collections::HashMap,
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
        dump_family(family, 0, u32::MAX, |msg, _| {
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

// Attribute types (include/uapi/linux/inet_diag.h); the request asks for the first four by bit
// `type - 1`, the mark comes unasked when the caller has CAP_NET_ADMIN.
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_TOS: u16 = 5;
const INET_DIAG_TCLASS: u16 = 6;
const INET_DIAG_SKMEMINFO: u16 = 7;
const INET_DIAG_MARK: u16 = 15;
/// struct tcp_info up to tcpi_notsent_bytes (Linux 4.6), which ends at this offset.
const TCP_INFO_NEEDED: usize = 148;
const SK_MEMINFO_RCVBUF: usize = 1;
const SK_MEMINFO_SNDBUF: usize = 3;
/// Sockets that own an fd: not listening (the dump refuses them anyway), not TIME_WAIT or
/// NEW_SYN_RECV (no fd).
const FD_STATES: u32 = !(1 << 10 | 1 << 6 | 1 << 12);

/// What sock_diag reports of one socket: all of a dump's state that is not per-socket repair
/// state. Read before TCP_REPAIR=1, it stays valid after because the traffic is frozen.
#[derive(Clone, Copy, Debug)]
pub struct DiagState {
    pub tuple: Tuple,
    pub state: TcpState,
    /// An AF_INET6 socket (possibly carrying a v4-mapped connection).
    pub ipv6_socket: bool,
    /// SIOCINQ, SIOCOUTQ and SIOCOUTQNSD: the same kernel expressions.
    pub inq: u32,
    pub outq: u32,
    pub notsent: u32,
    /// tcpi_options (TCPI_OPT_*), and snd_wscale | rcv_wscale << 4.
    pub options: u8,
    pub wscales: u8,
    pub mark: u32,
    /// IP_TOS of an AF_INET socket or IPV6_TCLASS of an AF_INET6 one.
    pub tos: u8,
    pub rcvbuf: u32,
    pub sndbuf: u32,
}

/// Every TCP socket of the calling thread's namespace that can own an fd, by socket cookie
/// (SO_COOKIE).
pub fn socket_states() -> io::Result<HashMap<u64, DiagState>> {
    let ext = [
        INET_DIAG_INFO,
        INET_DIAG_TOS,
        INET_DIAG_TCLASS,
        INET_DIAG_SKMEMINFO,
    ]
    .iter()
    .fold(0u8, |bits, kind| bits | 1 << (kind - 1));
    let mut states = HashMap::new();
    let mut malformed = false;
    for family in FAMILIES {
        dump_family(
            family,
            ext,
            FD_STATES,
            |msg, attributes| match parse_state(msg, attributes) {
                Some(state) => {
                    let cookie = u64::from(msg.id.cookie[0]) | u64::from(msg.id.cookie[1]) << 32;
                    states.insert(cookie, state);
                }
                None => malformed = true,
            },
        )?;
    }
    if malformed {
        return Err(io::Error::other(
            "sock_diag gave no tcp_info with tcpi_notsent_bytes (Linux 4.6 or later needed)",
        ));
    }
    Ok(states)
}

fn parse_state(msg: &DiagMsg, mut attributes: &[u8]) -> Option<DiagState> {
    let mut state = DiagState {
        tuple: msg.tuple(),
        state: TcpState::from_kernel(msg.state),
        ipv6_socket: libc::c_int::from(msg.family) == libc::AF_INET6,
        inq: msg.rqueue,
        outq: msg.wqueue,
        notsent: 0,
        options: 0,
        wscales: 0,
        mark: 0,
        tos: 0,
        rcvbuf: 0,
        sndbuf: 0,
    };
    let mut info = false;
    // struct nlattr { u16 len; u16 type; } then the payload, 4-byte aligned.
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        let payload = attributes.get(4..len)?;
        let u32_at = |index: usize| {
            payload
                .get(index * 4..index * 4 + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind {
            INET_DIAG_INFO if payload.len() >= TCP_INFO_NEEDED => {
                state.options = payload[5];
                state.wscales = payload[6];
                state.notsent = u32_at(TCP_INFO_NEEDED / 4 - 1)?;
                info = true;
            }
            INET_DIAG_TOS | INET_DIAG_TCLASS => state.tos = *payload.first()?,
            INET_DIAG_SKMEMINFO => {
                state.rcvbuf = u32_at(SK_MEMINFO_RCVBUF)?;
                state.sndbuf = u32_at(SK_MEMINFO_SNDBUF)?;
            }
            INET_DIAG_MARK => state.mark = u32_at(0)?,
            _ => {}
        }
        attributes = attributes.get((len + 3) & !3..).unwrap_or_default();
    }
    info.then_some(state)
}

/// One sock_diag dump of `family`: `each` gets every socket's message and its attributes.
fn dump_family(
    family: u8,
    ext: u8,
    states: u32,
    mut each: impl FnMut(&DiagMsg, &[u8]),
) -> io::Result<()> {
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
            ext,
            states,
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
fn parse_datagram(mut data: &[u8], each: &mut impl FnMut(&DiagMsg, &[u8])) -> io::Result<bool> {
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
                each(&msg, &payload[size_of::<DiagMsg>()..]);
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
