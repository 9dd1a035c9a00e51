//! The source's side of a hold: a capture socket on the service's interface that takes nothing
//! until the freeze begins, then keeps the segments to the service's addresses the freeze drops, in the
//! kernel's queue, until the destination is live.
use std::net::SocketAddr;

use nix::net::if_::if_nametoindex;

use super::{
    HoldBudget, HoldError, HoldReport,
    filter::{Segments, services_filter},
    held::{HeldPackets, MAX_PACKET},
};
use crate::{net::Netns, sys::CaptureSocket};

/// Every protocol: sockets bound to one protocol see a frame only after tc ingress, where the
/// freeze has dropped it; the filter picks IPv4 or IPv6.
const ETH_P_ALL: u16 = 0x0003;

/// A hold, opened before the freeze (its socket takes nothing yet).
pub struct Hold {
    socket: CaptureSocket,
    services: Vec<SocketAddr>,
    dev: String,
    /// What was taken so far, against the budget.
    report: HoldReport,
    /// Whether a filter other than "nothing" was set.
    begun: bool,
}

impl Hold {
    /// Opens the capture socket on `dev` in `netns` for the segments to `services` (both
    /// families of a dual-stack service: one socket of every protocol sees them all).
    pub fn open(
        netns: &Netns,
        dev: &str,
        services: &[SocketAddr],
        budget: HoldBudget,
    ) -> Result<Self, HoldError> {
        let capture = |what| {
            let (dev, services) = (dev.to_owned(), services.to_vec());
            move |source| HoldError::Capture {
                services,
                dev,
                what,
                source,
            }
        };
        let socket = netns.run(|| {
            let ifindex = if_nametoindex(dev)
                .map_err(|errno| capture("looking up the interface")(errno.into()))?;
            CaptureSocket::bind(ifindex, ETH_P_ALL, budget.queue_bytes())
                .map_err(capture("opening the capture socket"))
        })??;
        Ok(Self {
            socket,
            services: services.to_vec(),
            dev: dev.to_owned(),
            begun: false,
            report: HoldReport {
                budget: Some(budget),
                ..HoldReport::default()
            },
        })
    }

    /// A freeze is about to start: from now on the `segments` to the service that come in are
    /// kept. First only the SYNs, while new connections alone are held back (the application
    /// is stopped, its connections not yet frozen), then every segment, as the service
    /// freezes; a segment that arrives between this and the freeze is both delivered here and
    /// replayed there, where TCP discards it as a duplicate.
    pub fn begin(&mut self, segments: Segments) -> Result<(), HoldError> {
        self.socket
            .set_filter(&services_filter(&self.services, segments))
            .map_err(self.error("setting the capture filter"))?;
        if !self.begun {
            // Resets the statistics: drops from here on are the hold's.
            self.socket
                .take_dropped()
                .map_err(self.error("reading the capture statistics"))?;
            self.begun = true;
        }
        Ok(())
    }

    /// What was held so far, in arrival order, within the budget; the hold goes on.
    pub fn take(&mut self) -> Result<HeldPackets, HoldError> {
        let budget = self.report.budget.unwrap_or(HoldBudget::NONE);
        let left = HoldBudget {
            bytes: budget.bytes.saturating_sub(self.report.bytes as usize),
            packets: budget.packets.saturating_sub(self.report.packets as usize),
        };
        let mut held = HeldPackets::default();
        let mut buffer = vec![0u8; MAX_PACKET];
        // Bounded by what the queue holds: the senders are waiting for the freeze's end.
        while let Some(len) = self
            .socket
            .recv(&mut buffer)
            .map_err(self.error("reading a held segment"))?
        {
            if len > buffer.len() {
                self.report.too_long += 1;
            } else if !held.push(&buffer[..len], &left) {
                self.report.over_budget += 1;
            }
        }
        self.report.packets += held.len() as u64;
        self.report.bytes += held.bytes();
        Ok(held)
    }

    /// Stops holding: the rest of what was held, and the report of the whole hold. The socket
    /// stays open: closing a packet socket waits for an RCU grace period (about 10 ms here), so
    /// it goes later, off the path that waits ([`Hold::close_in_background`]).
    pub fn finish(&mut self) -> Result<(HeldPackets, HoldReport), HoldError> {
        // Nothing more comes in: the queue is drained to its end.
        self.socket
            .set_filter(&[nothing()])
            .map_err(self.error("closing the capture filter"))?;
        let held = self.take()?;
        self.report.queue_full = self
            .socket
            .take_dropped()
            .map_err(self.error("reading the capture statistics"))?
            .into();
        Ok((held, self.report))
    }

    /// Closes the capture socket on a thread of its own: its close waits for an RCU grace
    /// period that nobody needs to wait for.
    pub fn close_in_background(self) {
        std::thread::spawn(move || drop(self));
    }

    fn error(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> HoldError + use<> {
        let (services, dev) = (self.services.clone(), self.dev.clone());
        move |source| HoldError::Capture {
            services,
            dev,
            what,
            source,
        }
    }
}

/// A filter that takes nothing.
fn nothing() -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }
}
