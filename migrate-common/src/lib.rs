//! Map keys and values shared by the freeze programs (kernel side) and tcpmig (user side).
//!
//! Everything is `#[repr(C)]` with explicit padding so both sides agree byte for byte; addresses
//! are stored as 16 bytes (IPv4 in the first 4, the rest zero) and ports in host byte order.
#![no_std]

/// skb mark CRIU puts on its own packets (libsoccr's FIN injection); its network lock lets them
/// through, and so must ours.
pub const CRIU_SKB_MARK: u32 = 0xC114;

/// Capacity of the frozen-services map.
pub const MAX_SERVICES: u32 = 1024;
/// Capacity of the frozen-4-tuples map: enough for the largest migration we test (100,000).
pub const MAX_TUPLES: u32 = 262_144;

/// Pinned map names, under `/sys/fs/bpf/tcpmig/<freeze name>/`.
pub const SERVICES_MAP: &str = "SERVICES";
pub const TUPLES_MAP: &str = "TUPLES";
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Address family tags used in keys (not AF_* values, so that zeroed memory is never valid).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A service: every TCP connection whose local side is `addr:port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// One connection, seen from the host that owns it (local = the migrating side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// What a frozen entry carries. The program ignores entries whose deadline has passed, so a
/// crashed migration can never leave a permanent blackhole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreezeValue {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) after which traffic passes again.
    pub deadline_ns: u64,
    /// When the freeze was set, CLOCK_MONOTONIC nanoseconds (for `tcpmig status`).
    pub since_ns: u64,
    /// [`SCOPE_ALL`] or [`SCOPE_NEW_CONNECTIONS`].
    pub scope: u32,
    pub _pad: u32,
}

/// The entry stops every segment of its connections, both ways.
pub const SCOPE_ALL: u32 = 0;
/// The entry stops only new connections (SYNs in); established ones pass. Set when the
/// application stops, so that no handshake completes into an accept queue it will never read.
pub const SCOPE_NEW_CONNECTIONS: u32 = 1;

/// Capacity of the steering map: connections moved away whose segments the source forwards.
pub const MAX_STEERED: u32 = 262_144;
/// Pinned map name of the steering program, under `/sys/fs/bpf/tcpmig/<steering name>/`.
pub const STEER_MAP: &str = "STEER";

/// Where the steering program sends a moved connection's segments, and what it saw of them.
/// User space writes the first three fields; the program updates the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerValue {
    /// The destination host's MAC: the frame's new destination.
    pub dst_mac: [u8; 6],
    /// This host's MAC on `ifindex`: the frame's new source (the client's MAC must not be seen
    /// coming from this port, or a bridge would learn it here).
    pub src_mac: [u8; 6],
    /// The interface the frame leaves by (redirected to its egress).
    pub ifindex: u32,
    /// Segments forwarded.
    pub packets: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last one; user space sets it at the steering.
    pub last_ns: u64,
    /// TCP flags seen from the client so far (FIN 0x01, RST 0x04): an ending connection.
    pub flags_seen: u32,
    pub _pad: u32,
}

/// Indexes into the per-CPU counters array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New connection attempts (SYN without ACK) to a frozen service, dropped silently.
    SynDropped = 0,
    /// Segments of frozen connections dropped on ingress.
    IngressDropped = 1,
    /// Segments of frozen connections dropped on egress.
    EgressDropped = 2,
    /// Segments that matched an entry whose deadline had passed and were let through.
    PassedAfterDeadline = 3,
    /// Egress segments carrying CRIU's mark, let through.
    CriuMarkPassed = 4,
}

impl Counter {
    pub const ALL: [Counter; 5] = [
        Counter::SynDropped,
        Counter::IngressDropped,
        Counter::EgressDropped,
        Counter::PassedAfterDeadline,
        Counter::CriuMarkPassed,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Counter::SynDropped => "syn_dropped",
            Counter::IngressDropped => "ingress_dropped",
            Counter::EgressDropped => "egress_dropped",
            Counter::PassedAfterDeadline => "passed_after_deadline",
            Counter::CriuMarkPassed => "criu_mark_passed",
        }
    }
}

/// Most byte ranges of a socket one [`StateRecord`] holds.
pub const STATE_SPANS: usize = 8;
/// Longest range, and the limits that let the verifier prove every copy stays in the record: a
/// range starts before `STATE_SPAN_START_MAX` in the record and is shorter than
/// `STATE_SPAN_LEN_MAX`.
pub const STATE_SPAN_LEN_MAX: u32 = 127;
pub const STATE_SPAN_START_MAX: u32 = 255;
pub const STATE_RECORD_BYTES: usize = 384;

/// What the tcp_state iterator writes for each TCP socket: the byte ranges of its struct
/// tcp_sock user space asked for (from the kernel's BTF), one after the other, so the program
/// knows no kernel layout.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StateRecord {
    pub bytes: [u8; STATE_RECORD_BYTES],
}

#[cfg(feature = "user")]
mod user {
    // Each of these is plain #[repr(C)] integers and byte arrays with explicit padding: every bit
    // pattern is valid and there are no implicit padding bytes, which is what Pod asks.
    // SAFETY: as above; the service address, port and explicit pad byte.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above; two addresses, two ports, the family and explicit pad bytes.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above; two u64s.
    unsafe impl aya::Pod for super::FreezeValue {}
    // SAFETY: as above; one byte array.
    unsafe impl aya::Pod for super::StateRecord {}
    // SAFETY: as above; two MACs, then u32, u64, u64, u32 and an explicit pad u32.
    unsafe impl aya::Pod for super::SteerValue {}
}
