//! The dump's bulk read: the tcp_state BPF iterator (migrate-ebpf/src/tcp_state.rs) walks the
//! TCP sockets of a namespace and copies, for each, the fields the repair getsockopts would
//! return (queue sequences, window, mss_clamp, timestamp offset, negotiated options, queue
//! lengths, buffers, mark), found in struct tcp_sock through the kernel's BTF. One read() for
//! every socket replaces sock_diag plus six calls per socket inside the blackout.
use std::{
    collections::HashMap,
    io::Read as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use aya::{Ebpf, EbpfLoader, programs::Iter};
use migrate_common::{
    STATE_RECORD_BYTES, STATE_SPAN_LEN_MAX, STATE_SPAN_START_MAX, STATE_SPANS, StateRecord,
};

use super::{RepairError, TcpState, btf::Btf};
use crate::sys::tcp_repair::RepairWindow;
use crate::{
    net::Netns,
    tuple::{Tuple, canonical},
};

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp-state"));
const PROGRAM_NAME: &str = "tcpmig_tcp_state";
/// Bound on the reads of one pass (each returns at most a few hundred records).
const MAX_READS: usize = 1 << 20;
/// The fields read, one [`Slot`] each.
const SLOTS: usize = 33;
/// Ranges closer than this are read as one.
const SPAN_GAP: u32 = 48;

/// What the iterator read of one socket, as the dump's getsockopts would have returned it.
#[derive(Clone, Copy, Debug)]
pub struct SocketState {
    pub tuple: Tuple,
    pub state: TcpState,
    /// An AF_INET6 socket (possibly carrying a v4-mapped connection).
    pub ipv6_socket: bool,
    /// TCP_QUEUE_SEQ of the receive queue (rcv_nxt) and of the send queue (write_seq).
    pub rcv_nxt: u32,
    pub write_seq: u32,
    /// SIOCINQ, SIOCOUTQ and SIOCOUTQNSD: the same kernel expressions.
    pub inq: u32,
    pub outq: u32,
    pub notsent: u32,
    pub window: RepairWindow,
    /// TCP_MAXSEG in repair mode.
    pub mss_clamp: u16,
    pub timestamps: bool,
    pub sack: bool,
    /// (snd_wscale, rcv_wscale) when window scaling was negotiated.
    pub wscale: Option<(u8, u8)>,
    /// TCP_TIMESTAMP at the time of the read.
    pub timestamp: u32,
    pub sndbuf: u32,
    pub rcvbuf: u32,
    pub mark: u32,
    /// How many milliseconds before the read the socket last received or sent a segment
    /// (tcp_mstamp): a quiet connection is likely to hold still a while longer. Milliseconds in
    /// a u32 (saturated) rather than a Duration: 50,000 states are kept at once.
    pub quiet_ms: u32,
}

/// The slots of a record, in order: the field each reads, from struct tcp_sock.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Cookie,
    State,
    Family,
    LocalPort,
    RemotePort,
    LocalV4,
    RemoteV4,
    LocalV6Low,
    LocalV6High,
    RemoteV6Low,
    RemoteV6High,
    RcvNxt,
    CopiedSeq,
    SndUna,
    SndNxt,
    WriteSeq,
    SndWl1,
    SndWnd,
    MaxWindow,
    RcvWnd,
    RcvWup,
    TsOffset,
    MssClamp,
    TstampOk,
    SackOk,
    WscaleOk,
    SndWscale,
    RcvWscale,
    UsecTs,
    SndBuf,
    RcvBuf,
    Mark,
    Mstamp,
}

const SOCK: [&str; 3] = ["inet_conn", "icsk_inet", "sk"];
const COMMON: [&str; 4] = ["inet_conn", "icsk_inet", "sk", "__sk_common"];

/// Each slot: its field's path in tcp_sock, its width in bits (bitfields: from BTF), a byte
/// added to its offset (the second half of an IPv6 address), and whether a kernel may lack it.
fn layout() -> [(Slot, Vec<&'static str>, u32, u32, bool); SLOTS] {
    let common = |name| [&COMMON[..], &[name]].concat();
    let sock = |name| [&SOCK[..], &[name]].concat();
    let tcp = |name| vec![name];
    let rx_opt = |name| vec!["rx_opt", name];
    [
        (Slot::Cookie, common("skc_cookie"), 64, 0, false),
        (Slot::State, common("skc_state"), 8, 0, false),
        (Slot::Family, common("skc_family"), 16, 0, false),
        (Slot::LocalPort, common("skc_num"), 16, 0, false),
        (Slot::RemotePort, common("skc_dport"), 16, 0, false),
        (Slot::LocalV4, common("skc_rcv_saddr"), 32, 0, false),
        (Slot::RemoteV4, common("skc_daddr"), 32, 0, false),
        (Slot::LocalV6Low, common("skc_v6_rcv_saddr"), 64, 0, true),
        (Slot::LocalV6High, common("skc_v6_rcv_saddr"), 64, 8, true),
        (Slot::RemoteV6Low, common("skc_v6_daddr"), 64, 0, true),
        (Slot::RemoteV6High, common("skc_v6_daddr"), 64, 8, true),
        (Slot::RcvNxt, tcp("rcv_nxt"), 32, 0, false),
        (Slot::CopiedSeq, tcp("copied_seq"), 32, 0, false),
        (Slot::SndUna, tcp("snd_una"), 32, 0, false),
        (Slot::SndNxt, tcp("snd_nxt"), 32, 0, false),
        (Slot::WriteSeq, tcp("write_seq"), 32, 0, false),
        (Slot::SndWl1, tcp("snd_wl1"), 32, 0, false),
        (Slot::SndWnd, tcp("snd_wnd"), 32, 0, false),
        (Slot::MaxWindow, tcp("max_window"), 32, 0, false),
        (Slot::RcvWnd, tcp("rcv_wnd"), 32, 0, false),
        (Slot::RcvWup, tcp("rcv_wup"), 32, 0, false),
        (Slot::TsOffset, tcp("tsoffset"), 32, 0, false),
        (Slot::MssClamp, rx_opt("mss_clamp"), 16, 0, false),
        (Slot::TstampOk, rx_opt("tstamp_ok"), 1, 0, false),
        (Slot::SackOk, rx_opt("sack_ok"), 8, 0, false),
        (Slot::WscaleOk, rx_opt("wscale_ok"), 1, 0, false),
        (Slot::SndWscale, rx_opt("snd_wscale"), 8, 0, false),
        (Slot::RcvWscale, rx_opt("rcv_wscale"), 8, 0, false),
        // Linux 6.7: timestamps in microseconds on some routes.
        (Slot::UsecTs, tcp("tcp_usec_ts"), 1, 0, true),
        (Slot::SndBuf, sock("sk_sndbuf"), 32, 0, false),
        (Slot::RcvBuf, sock("sk_rcvbuf"), 32, 0, false),
        (Slot::Mark, sock("sk_mark"), 32, 0, false),
        // CLOCK_MONOTONIC in microseconds, refreshed by every segment in or out.
        (Slot::Mstamp, tcp("tcp_mstamp"), 64, 0, false),
    ]
}

/// How to get a slot's value: from the 8 bytes at `at` in the record, shifted and masked.
#[derive(Clone, Copy, Default)]
struct Extract {
    at: usize,
    shift: u32,
    bits: u32,
    /// The field does not exist in this kernel: the value is 0.
    absent: bool,
}

/// The loaded iterator program and the layout of its records. Load it before the blackout
/// (the BTF parse and the verifier take tens of milliseconds); each [`read`](Self::read) is one
/// pass over a namespace's sockets.
pub struct StateReader {
    ebpf: Ebpf,
    extract: [Extract; SLOTS],
}

fn load_error(error: impl std::fmt::Display) -> RepairError {
    RepairError::StateIterator {
        netns: None,
        error: std::io::Error::other(error.to_string()),
    }
}

/// The iterator program of the loaded object.
fn iterator(ebpf: &mut Ebpf) -> Result<&mut Iter, RepairError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or_else(|| load_error(format!("no program {PROGRAM_NAME} in the object")))?
        .try_into()
        .map_err(load_error)
}

impl StateReader {
    /// Loads the program; with `port`, it reports only sockets of that local port.
    pub fn load(port: Option<u16>) -> Result<Self, RepairError> {
        super::check_net_admin()?;
        let btf = Btf::from_sys_fs().map_err(load_error)?;
        let mut offsets = [0u32; SLOTS];
        let mut extract = [Extract::default(); SLOTS];
        for (i, (slot, path, bits, extra_byte, optional)) in layout().into_iter().enumerate() {
            debug_assert_eq!(slot as usize, i);
            let Some(field) = btf.field("tcp_sock", &path) else {
                if optional {
                    extract[i].absent = true;
                    continue;
                }
                return Err(load_error(format!(
                    "the kernel's struct tcp_sock has no field {}",
                    path.join(".")
                )));
            };
            offsets[i] = field.bit_offset / 8 + extra_byte;
            extract[i] = Extract {
                at: 0,
                shift: field.bit_offset % 8,
                bits: if field.bitfield_bits == 0 {
                    bits
                } else {
                    field.bitfield_bits
                },
                absent: false,
            };
        }
        // Before aya parses the same BTF again: the two together were half of the peak memory
        // of a migration of 50,000 connections.
        drop(btf);
        let spans = spans(&offsets, &mut extract)?;
        let span_count = (spans.len() / 2) as u32;
        let mut span_table = [0u32; 2 * STATE_SPANS];
        span_table[..spans.len()].copy_from_slice(&spans);
        let port_offset = offsets[Slot::LocalPort as usize];
        let port = u32::from(port.unwrap_or(0));
        let mut ebpf = EbpfLoader::new()
            .override_global("SPANS", &span_table[..], true)
            .override_global("SPAN_COUNT", &span_count, true)
            .override_global("PORT_OFFSET", &port_offset, true)
            .override_global("PORT", &port, true)
            .load(PROGRAM)
            .map_err(load_error)?;
        let kernel_btf = aya::Btf::from_sys_fs().map_err(load_error)?;
        iterator(&mut ebpf)?
            .load("tcp", &kernel_btf)
            .map_err(load_error)?;
        Ok(Self { ebpf, extract })
    }

    /// Every full TCP socket of `netns` (on the port given at load), by socket cookie. Cookies
    /// exist only once asked for: SO_COOKIE each socket before.
    pub fn read(&mut self, netns: &Netns) -> Result<HashMap<u64, SocketState>, RepairError> {
        let fail = |error: std::io::Error| RepairError::StateIterator {
            netns: Some(netns.spec().to_owned()),
            error,
        };
        let program = iterator(&mut self.ebpf)?;
        let link_id = program.attach().map_err(load_error)?;
        let link = program.take_link(link_id).map_err(load_error)?;
        // The iterator walks the namespace of the thread that creates it.
        let mut file = netns
            .run(move || link.into_file())?
            .map_err(|e| fail(std::io::Error::other(e.to_string())))?;
        // Taken after the freeze, before the pass: no segment the peers saw carries a later
        // timestamp.
        let clock = crate::sys::monotonic_now().as_nanos() as u64;
        let record_len = size_of::<StateRecord>();
        // Decoded as they come: 50,000 records are 19 MB of bytes, a fifth of that decoded.
        let mut states = HashMap::new();
        let mut chunk = vec![0u8; 256 << 10];
        let mut filled = 0;
        let mut decoding = Duration::ZERO;
        let mut finished = false;
        for _ in 0..MAX_READS {
            let got = file.read(&mut chunk[filled..]).map_err(fail)?;
            if got == 0 {
                finished = true;
                break;
            }
            filled += got;
            let started = Instant::now();
            let whole = filled - filled % record_len;
            states.extend(
                chunk[..whole]
                    .chunks_exact(record_len)
                    .map(|record| self.decode(record, clock)),
            );
            chunk.copy_within(whole..filled, 0);
            filled -= whole;
            decoding += started.elapsed();
        }
        if !finished {
            return Err(fail(std::io::Error::other("the iterator did not end")));
        }
        if filled != 0 {
            return Err(fail(std::io::Error::other(format!(
                "the iterator ended inside a {record_len}-byte record ({filled} bytes of it)"
            ))));
        }
        tracing::debug!(elapsed = ?decoding, "decoded the iterator's records");
        Ok(states)
    }

    fn decode(&self, record: &[u8], clock_ns: u64) -> (u64, SocketState) {
        let raw = |slot: Slot| {
            let at = self.extract[slot as usize].at;
            u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"))
        };
        let value = |slot: Slot| {
            let e = self.extract[slot as usize];
            if e.absent {
                return 0;
            }
            let v = raw(slot) >> e.shift;
            if e.bits >= 64 {
                v
            } else {
                v & ((1 << e.bits) - 1)
            }
        };
        let u32_of = |slot| value(slot) as u32;
        let ipv6_socket = value(Slot::Family) == libc::AF_INET6 as u64;
        let (local_port, remote_port) = (
            value(Slot::LocalPort) as u16,
            u16::from_be(value(Slot::RemotePort) as u16),
        );
        let address = |v4: Slot, v6: [Slot; 2], port| {
            let ip: std::net::IpAddr = if ipv6_socket {
                let mut octets = [0u8; 16];
                octets[..8].copy_from_slice(&raw(v6[0]).to_le_bytes());
                octets[8..].copy_from_slice(&raw(v6[1]).to_le_bytes());
                std::net::Ipv6Addr::from(octets).into()
            } else {
                let b = raw(v4).to_le_bytes();
                std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
            };
            canonical(SocketAddr::new(ip, port))
        };
        let (rcv_nxt, write_seq) = (u32_of(Slot::RcvNxt), u32_of(Slot::WriteSeq));
        // tcp_clock_ts(): CLOCK_MONOTONIC in milliseconds, or microseconds for usec_ts.
        let clock = if value(Slot::UsecTs) != 0 {
            clock_ns / 1_000
        } else {
            clock_ns / 1_000_000
        };
        let state = SocketState {
            tuple: Tuple {
                local: address(
                    Slot::LocalV4,
                    [Slot::LocalV6Low, Slot::LocalV6High],
                    local_port,
                ),
                remote: address(
                    Slot::RemoteV4,
                    [Slot::RemoteV6Low, Slot::RemoteV6High],
                    remote_port,
                ),
            },
            state: TcpState::from_kernel(value(Slot::State) as u8),
            ipv6_socket,
            rcv_nxt,
            write_seq,
            inq: rcv_nxt.wrapping_sub(u32_of(Slot::CopiedSeq)),
            outq: write_seq.wrapping_sub(u32_of(Slot::SndUna)),
            notsent: write_seq.wrapping_sub(u32_of(Slot::SndNxt)),
            window: RepairWindow {
                snd_wl1: u32_of(Slot::SndWl1),
                snd_wnd: u32_of(Slot::SndWnd),
                max_window: u32_of(Slot::MaxWindow),
                rcv_wnd: u32_of(Slot::RcvWnd),
                rcv_wup: u32_of(Slot::RcvWup),
            },
            mss_clamp: value(Slot::MssClamp) as u16,
            timestamps: value(Slot::TstampOk) != 0,
            sack: value(Slot::SackOk) != 0,
            wscale: (value(Slot::WscaleOk) != 0)
                .then(|| (value(Slot::SndWscale) as u8, value(Slot::RcvWscale) as u8)),
            timestamp: (clock as u32).wrapping_add(u32_of(Slot::TsOffset)),
            sndbuf: u32_of(Slot::SndBuf),
            rcvbuf: u32_of(Slot::RcvBuf),
            mark: u32_of(Slot::Mark),
            quiet_ms: u32::try_from((clock_ns / 1_000).saturating_sub(value(Slot::Mstamp)) / 1_000)
                .unwrap_or(u32::MAX),
        };
        (value(Slot::Cookie), state)
    }
}

/// Groups the 8-byte reads at `offsets` into few ranges of struct tcp_sock, as (offset, length)
/// pairs, and sets where each slot lands in the record. Absent fields read nothing.
fn spans(offsets: &[u32; SLOTS], extract: &mut [Extract; SLOTS]) -> Result<Vec<u32>, RepairError> {
    let mut order: Vec<usize> = (0..SLOTS).filter(|&i| !extract[i].absent).collect();
    order.sort_by_key(|&i| offsets[i]);
    // (start, end) in tcp_sock, and the slots inside.
    let mut ranges: Vec<(u32, u32, Vec<usize>)> = Vec::new();
    for i in order {
        let (start, end) = (offsets[i], offsets[i] + 8);
        match ranges.last_mut() {
            Some(last)
                if start <= last.1 + SPAN_GAP && end.max(last.1) - last.0 <= STATE_SPAN_LEN_MAX =>
            {
                last.1 = last.1.max(end);
                last.2.push(i);
            }
            _ => ranges.push((start, end, vec![i])),
        }
    }
    let mut table = Vec::with_capacity(2 * ranges.len());
    let mut at = 0u32;
    for (start, end, slots) in &ranges {
        if ranges.len() > STATE_SPANS
            || at > STATE_SPAN_START_MAX
            || (at + end - start) as usize > STATE_RECORD_BYTES
        {
            return Err(load_error(
                "this kernel's struct tcp_sock spreads the fields over too many ranges",
            ));
        }
        for &slot in slots {
            extract[slot].at = (at + offsets[slot] - start) as usize;
        }
        table.extend([*start, end - start]);
        at += end - start;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write as _,
        net::{TcpListener, TcpStream},
        os::fd::AsFd as _,
        time::Duration,
    };

    use super::*;
    use crate::sys::tcp_repair::{self as so, Queue};

    /// A loopback connection (root namespace's loopback) with bytes unread at the server: what
    /// the reader finds of the server's socket is what the repair getsockopts say of it.
    #[test]
    fn agrees_with_the_repair_getsockopts() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"hello").unwrap();
        server.write_all(b"0123456789").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let fd = server.as_fd();
        let cookie: u64 = so::get(fd, libc::SOL_SOCKET, libc::SO_COOKIE).unwrap();

        let mut reader = StateReader::load(Some(port)).unwrap();
        let states = reader.read(&Netns::current().unwrap()).unwrap();
        // The listener and the server's end; the client's end is on another local port.
        assert!(states.values().all(|s| s.tuple.local.port() == port));
        assert_eq!(states.len(), 2, "{states:?}");
        let state = states[&cookie];
        assert_eq!(state.tuple.local, server.local_addr().unwrap());
        assert_eq!(state.tuple.remote, server.peer_addr().unwrap());
        assert_eq!(state.state, TcpState::Established);
        assert!(!state.ipv6_socket);
        assert_eq!((state.inq, state.outq, state.notsent), (5, 0, 0));
        // Its last segment was the client's ACK of the 10 bytes, 50 ms before the read.
        assert!((30..10_000).contains(&state.quiet_ms), "{state:?}");
        assert!(
            state.timestamps && state.sack && state.wscale.is_some(),
            "{state:?}"
        );

        so::set_repair(fd, so::REPAIR_ON).unwrap();
        so::select_queue(fd, Queue::Recv).unwrap();
        let rcv_nxt: u32 = so::get(fd, libc::SOL_TCP, so::TCP_QUEUE_SEQ).unwrap();
        so::select_queue(fd, Queue::Send).unwrap();
        let write_seq: u32 = so::get(fd, libc::SOL_TCP, so::TCP_QUEUE_SEQ).unwrap();
        let window: RepairWindow = so::get(fd, libc::SOL_TCP, so::TCP_REPAIR_WINDOW).unwrap();
        let mss = so::get_int(fd, libc::SOL_TCP, libc::TCP_MAXSEG).unwrap();
        let timestamp: u32 = so::get(fd, libc::SOL_TCP, so::TCP_TIMESTAMP).unwrap();
        so::set_repair(fd, so::REPAIR_OFF_NO_WP).unwrap();

        assert_eq!((state.rcv_nxt, state.write_seq), (rcv_nxt, write_seq));
        assert_eq!(state.window, window);
        assert_eq!(i32::from(state.mss_clamp), mss);
        // The same clock (CLOCK_MONOTONIC in milliseconds), read a few milliseconds apart; the
        // kernel's reading, taken after ours, was once 1 ms behind it (CI, 2026-11-22).
        let apart = (timestamp.wrapping_sub(state.timestamp) as i32).unsigned_abs();
        assert!(apart < 1_000, "{timestamp} {state:?}");
    }
}
