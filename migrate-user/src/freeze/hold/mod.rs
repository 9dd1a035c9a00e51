//! Hold and replay: what a freeze drops on the source is kept, and delivered to the destination
//! once its sockets are live, so that a client whose segment (or SYN) met the freeze is answered
//! at the end of the blackout instead of after its retransmission timer (200 ms and more, 1 s for
//! a SYN).
//!
//! A packet socket on the service's interface sees the frames arriving there before the freeze
//! program on tc ingress drops them ([`Hold`], on the source). Its classic BPF filter takes the
//! TCP segments to the service's address and port, from the freeze on; they wait in the
//! socket's kernel queue, costing no CPU during the blackout. Once the destination is live, the
//! source reads them and sends them out of its interface to the destination's MAC
//! ([`Forwarder`]); what the destination's own freeze held goes into its stack through a raw IP
//! socket ([`Replayer`]). docs/hold-replay.md says why these paths were chosen over the others (the
//! migration link, a tun device, a BPF qdisc). The hold is bounded ([`HoldBudget`]): past it, segments are dropped as without a
//! hold, and counted ([`HoldReport`]).
mod capture;
mod filter;
mod held;
mod replay;

use std::net::SocketAddr;

pub use self::{
    capture::Hold,
    filter::Segments,
    held::{HeldPackets, HoldBudget, HoldReport, MAX_PACKET},
    replay::{Forwarder, ReplayReport, Replayer},
};
use crate::{net::NetnsError, tuple::Addresses};

/// What can fail while holding or replaying.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("holding the segments to {} on {dev}: {what}", Addresses(services))]
    Capture {
        services: Vec<SocketAddr>,
        dev: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("opening a raw IP socket in {netns} to replay held segments")]
    ReplaySocket {
        netns: String,
        source: std::io::Error,
    },
    #[error("the held segments are corrupt at byte {at}")]
    Corrupt { at: usize },
    #[error("opening a packet socket on {dev} to forward the held segments to the destination")]
    Forward { dev: String, source: std::io::Error },
}
