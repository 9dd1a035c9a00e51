//! Standalone migration: the source and destination state machines and their transport.
//!
//! `tcpmig migrate` ([`migrate()`]) runs on the source, `tcpmig agent` ([`agent()`]) on the
//! destination. The steps (docs/architecture.md, "One migration, step by step"), with a
//! two-phase commit:
//!
//! 1. connect and handshake (protocol version, shared token); the source attaches its freeze
//!    programs; on Prepare the agent attaches its own (unpinned: they go with the agent) and
//!    makes a pool of sockets bound to each service, one per connection the source counted
//!    there. A dual-stack service moves in one migration: every step covers each of its
//!    services (`--service` once per address).
//! 2. the source stops the application's process tree (SIGSTOP), finds its connections and reads
//!    the options only the application sets, freezes the service (one map update: the blackout
//!    starts) and dumps the sockets (one pass of a BPF iterator, then repair mode on each), which
//!    stay in repair mode. With `--precopy`, before the freeze, it also reads the connections
//!    quiet for [`PRECOPY_QUIET`] and sends their image; the agent restores them ahead on its
//!    pool and answers Precopied, and after the freeze keeps those the dump finds unchanged.
//! 3. the image streams to the agent, which restores the sockets in repair mode on its pool and
//!    freezes the service (before the address exists there, so nothing is answered with an RST);
//!    it answers Restored.
//! 4. the source has deleted the service addresses while the agent restored, and sends Commit
//!    once it has Restored; the agent adds the addresses (netlink session opened on Prepare),
//!    announces each (gratuitous ARP / unsolicited NA), unfreezes and takes the sockets out of
//!    repair mode (the blackout ends), and answers Committed.
//! 5. the source closes its repair-mode sockets silently, ends the application if asked, and
//!    removes its freeze.
//!
//! Any failure before the agent answers Commit with GoingLive (the agent refuses, the restore
//! fails, the link drops, a timeout) rolls back on both sides: the source's sockets leave repair
//! mode, its freeze goes, the application resumes, and the agent closes what it restored
//! silently. The agent sends GoingLive before it changes anything on Commit, and refuses a Commit
//! that reaches it after half the time the source waits for that answer, so both sides agree.
//!
//! `tcpmig migrate` can be killed at any point: before it stops the application it starts a
//! guard process ([`guard()`]) that watches it and, if it dies before recording the decision to
//! commit, rolls the source back the same way (or, after that decision, finishes the commit).
//!
//! Test hook: with `TCPMIG_TEST_PAUSE_AT=<phase>` in its environment, either side logs
//! `test pause at <phase>` when it reaches that phase and waits (at most a minute) for a line on
//! its stdin, so that a test can kill it there. The phases are the `test_pause` calls in
//! source.rs and agent.rs.
mod agent;
pub mod checkpoint;
mod guard;
mod process;
mod report;
mod select;
mod source;
mod tls;
mod token;
mod transport;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

pub use self::{
    agent::{
        AgentConfig, AgentOutcome, DEFAULT_MAX_IMAGE_BYTES, LiveConnections, agent,
        kept_capabilities,
    },
    guard::{GuardOutcome, guard},
    process::StoppedTree,
    report::{AgentReport, Dropped, LeftConnection, Phases, RebalanceReport, Report},
    select::{SelectError, Selector},
    source::{KeepAddress, PRECOPY_QUIET, STEER_KEEPER_COMMAND, SourceConfig, migrate},
    tls::{ClientSecurity, ServerSecurity, TlsError, TlsFiles},
    token::Token,
    transport::{
        ExpectedService, Frame, FrameCodec, FrameError, MAX_FRAME, MAX_HANDSHAKE_FRAME, Message,
        PROTOCOL_VERSION,
    },
};
use crate::{
    freeze::FreezeError,
    image::ImageError,
    net::{NetError, NetnsError},
    repair::RepairError,
    sys::Capability,
    tuple::Addresses,
};

/// An address a migration moves: deleted from the source's interface and added to the
/// destination's with the prefix length it had on the source. A dual-stack service moves two, one
/// per family; services on several ports of one address move it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MovedAddress {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// How long either side waits for each step of the other by default.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The freezes' deadline: if tcpmig dies mid-migration, traffic passes again after this.
pub const FREEZE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("token file {path}; write the shared token into it (mode 0600)")]
    TokenFile { path: PathBuf, source: io::Error },
    #[error(
        "token file {path} has mode {mode:04o} and owner uid {uid}: it must belong to uid {euid} \
         and be closed to group and others (`chown {euid} {path} && chmod 600 {path}`)"
    )]
    TokenFileMode {
        path: PathBuf,
        mode: u32,
        uid: u32,
        euid: u32,
    },
    #[error(transparent)]
    MissingCapability(#[from] crate::sys::MissingCapability),
    #[error("the application's capabilities (nothing was changed)")]
    AppCapabilities(#[source] crate::sys::CapabilityError),
    #[error(
        "dropping every capability but {kept} once listening (nothing was changed): the agent \
         does not go on with more than it needs"
    )]
    DropCapabilities {
        kept: crate::sys::CapabilitySet,
        #[source]
        source: crate::sys::CapabilityError,
    },
    /// Boxed: its file paths and rustls error would double the size of every Result here.
    #[error(transparent)]
    Tls(Box<TlsError>),
    #[error(
        "a plaintext link (--insecure) needs a token: give --token-file, or use TLS \
         (nothing was changed)"
    )]
    InsecureWithoutToken,
    #[error(
        "the image is larger than this agent accepts ({limit} bytes): raise --max-image-bytes \
         on the agent or migrate fewer connections"
    )]
    ImageTooLarge { limit: u64 },
    #[error(
        "Commit arrived {after_ms} ms after Restored, past half of the {limit_ms} ms the source \
         waits for the answer: the source may have rolled back, so the connections restored \
         here were dropped (silently)"
    )]
    LateCommit { after_ms: u64, limit_ms: u64 },
    #[error("the migration's guard process: {what}")]
    Guard {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("connecting to the agent at {to}; check that `tcpmig agent` listens there")]
    Connect { to: SocketAddr, source: io::Error },
    #[error("link to {peer} while {step}")]
    Link {
        peer: SocketAddr,
        step: &'static str,
        source: io::Error,
    },
    #[error("link to {peer}: no answer within {secs} s while {step}; is the other side alive?")]
    Timeout {
        peer: SocketAddr,
        step: &'static str,
        secs: f64,
    },
    #[error("link to {peer} closed while {step}: the other side stopped or crashed")]
    Closed {
        peer: SocketAddr,
        step: &'static str,
    },
    #[error("link to {peer}: got {got} while {step}; run the same tcpmig version on both sides")]
    Protocol {
        peer: SocketAddr,
        step: &'static str,
        got: String,
    },
    #[error("the agent refused the migration: {reason}; nothing was changed")]
    Refused { reason: String },
    #[error("the other side failed while {step}: {error}")]
    Remote { step: &'static str, error: String },
    #[error("the source aborted the migration: {reason}")]
    Aborted { reason: String },
    #[error("process {pid}: {what} failed; check the pid and that tcpmig runs as root")]
    Process {
        pid: u32,
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "{ip} is not on {dev} in the network namespace of process {pid}: pass the service \
         address the connections use (`ip addr show dev {dev}` there)"
    )]
    NoAddress {
        ip: std::net::IpAddr,
        dev: String,
        pid: u32,
    },
    #[error(
        "process {pid} has no connection on {} to migrate",
        Addresses(services)
    )]
    NoConnections { pid: u32, services: Vec<SocketAddr> },
    #[error(
        "{count} connection(s) of {} cannot move:{list}\n(--skip-unmovable moves the \
         others and leaves these)",
        Addresses(services),
        count = list.0.len()
    )]
    Unmovable {
        services: Vec<SocketAddr>,
        list: crate::repair::Listed,
    },
    #[error(
        "some service addresses are on {dev} and some are not: a rebalance keeps each address \
         where it is, so give the services of one host (nothing was changed)"
    )]
    MixedAddresses { dev: String },
    #[error(
        "the agent's interface has no Ethernet address to steer the moved connections to: a \
         rebalance needs the destination on the source's Ethernet segment (nothing was changed)"
    )]
    NoSteerTarget,
    #[error(
        "the agent's host has the service addresses too, as this one does on its interface: the \
         moved connections' segments would reach this host's stack, which has no socket for \
         them (nothing was changed)"
    )]
    AddressOnBothHosts,
    #[error(
        "--keep-address with --stop-source would end the connections that stay (nothing was \
         changed)"
    )]
    KeepAddressStopsSource,
    #[error("holding the service address quietly on this host (lo, arp_ignore, arp_announce)")]
    QuietAddress { source: io::Error },
    #[error("starting the async runtime (nothing was changed)")]
    Runtime(#[source] io::Error),
    #[error("no process to migrate: give at least one pid (nothing was changed)")]
    NoProcess,
    #[error("no service to migrate: give at least one --service (nothing was changed)")]
    NoService,
    #[error("process {pid} is given twice (nothing was changed)")]
    DuplicatePid { pid: u32 },
    #[error(
        "process {pid} is in another network namespace than process {first}: one migration moves \
         the connections of one namespace (nothing was changed)"
    )]
    NetnsMismatch { pid: u32, first: u32 },
    #[error(
        "socket inode {inode} is held by two of the processes given: give only one of them \
         (nothing was changed)"
    )]
    SharedSocket { inode: u64 },
    #[error("listening on {listen} (nothing was changed)")]
    Listen {
        listen: SocketAddr,
        source: io::Error,
    },
    #[error("accepting on {listen} (nothing was changed)")]
    Accept {
        listen: SocketAddr,
        source: io::Error,
    },
    #[error("no source connected to {listen} (nothing was changed)")]
    NoSource { listen: SocketAddr },
    #[error("refused the source at {peer}: {reason} (nothing was changed)")]
    RefusedSource { peer: SocketAddr, reason: Refusal },
    #[error("starting a thread for a group of connections (nothing was changed)")]
    GroupThread(#[source] io::Error),
    #[error(transparent)]
    Repair(#[from] RepairError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Hold(#[from] crate::freeze::hold::HoldError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{cause}; rolled back: the connections carry on at the source")]
    RolledBack { cause: Box<MigrateError> },
    #[error(
        "{cause}; rolling back failed too ({rollback}): check the connections at the source, \
         `tcpmig status` and `tcpmig unfreeze --all`"
    )]
    RollbackFailed {
        cause: Box<MigrateError>,
        rollback: Box<MigrateError>,
    },
    #[error(
        "the agent started going live but did not confirm it ({cause}); the source had already \
         given up the address and closed its sockets: the connections are at the destination if \
         the agent finished, see its log"
    )]
    InDoubt { cause: Box<MigrateError> },
}

impl From<TlsError> for MigrateError {
    fn from(error: TlsError) -> Self {
        Self::Tls(Box::new(error))
    }
}

/// Why an agent refuses a source at the handshake; the source gets this text in Refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "protocol version {theirs}, this agent speaks {PROTOCOL_VERSION}: run the same tcpmig \
         version on both sides"
    )]
    Protocol { theirs: u16 },
    #[error("wrong token (check --token-file on both sides)")]
    WrongToken,
}

/// An error with its causes, for the other side of the link, which only gets text.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        text.push_str(": ");
        text.push_str(&source.to_string());
        cause = source.source();
    }
    text
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The commands that change sockets, programs or processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privileged {
    Dump,
    Restore,
    Migrate,
    Agent,
}

impl Privileged {
    fn name(self) -> &'static str {
        match self {
            Privileged::Dump => "`tcpmig dump`",
            Privileged::Restore => "`tcpmig restore`",
            Privileged::Migrate => "`tcpmig migrate`",
            Privileged::Agent => "`tcpmig agent`",
        }
    }

    /// Repair mode needs CAP_NET_ADMIN, freezes CAP_BPF, taking another process's fds
    /// CAP_SYS_PTRACE, entering a network namespace CAP_SYS_ADMIN; the migration's hold and
    /// the agent's replay and announcements CAP_NET_RAW; the agent drops the capabilities it
    /// no longer uses with CAP_SETPCAP.
    fn needs(self) -> &'static [Capability] {
        use Capability::{Bpf, NetAdmin, NetRaw, SetPcap, SysAdmin, SysPtrace};
        match self {
            Privileged::Dump => &[NetAdmin, Bpf, SysPtrace, SysAdmin],
            Privileged::Migrate => &[NetAdmin, Bpf, SysPtrace, SysAdmin, NetRaw],
            Privileged::Restore => &[NetAdmin, SysAdmin],
            Privileged::Agent => &[NetAdmin, Bpf, SysAdmin, NetRaw, SetPcap],
        }
    }
}

/// A plaintext link has no check but the token: without one, both commands refuse before
/// anything is touched.
fn require_token_in_plaintext(plaintext: bool, token: Option<&Token>) -> Result<(), MigrateError> {
    match plaintext && token.is_none() {
        true => Err(MigrateError::InsecureWithoutToken),
        false => Ok(()),
    }
}

/// Fails before anything is touched, naming the first capability `command` needs and lacks,
/// instead of with an EPERM halfway through.
pub fn check_privileges(command: Privileged) -> Result<(), crate::sys::MissingCapability> {
    crate::sys::require_capabilities(command.name(), command.needs())
}

/// How long a test pause waits for its line on stdin.
const TEST_PAUSE_LIMIT: Duration = Duration::from_secs(60);

/// The test hook (see the module documentation): at `phase`, if TCPMIG_TEST_PAUSE_AT names it,
/// logs it and waits for a line or the end of stdin, at most [`TEST_PAUSE_LIMIT`].
fn test_pause(phase: &str) {
    if std::env::var_os("TCPMIG_TEST_PAUSE_AT").is_none_or(|at| at != phase) {
        return;
    }
    tracing::warn!("test pause at {phase}");
    let deadline = Instant::now() + TEST_PAUSE_LIMIT;
    let mut byte = 0u8;
    while crate::sys::wait_readable(std::io::stdin(), deadline) {
        // One byte at a time, unbuffered: what follows the line belongs to whoever reads stdin
        // next (the agent's application).
        let read = nix::unistd::read(std::io::stdin(), std::slice::from_mut(&mut byte));
        if read != Ok(1) || byte == b'\n' {
            return;
        }
    }
}

/// This process's resident memory and its peak, in KiB (VmRSS and VmHWM of /proc/self/status).
pub(crate) fn resident_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
