//! Taking over a service address inside a migration's blackout. Opening a netlink session in a
//! namespace, looking up the interface and binding a packet socket take milliseconds (a thread
//! enters the namespace, a runtime starts, a link dump runs): [`Takeover::prepare`] does it all
//! before the freeze, so that the blackout pays for one netlink request and one frame.
use std::{net::IpAddr, time::Duration};

use super::{
    NetError, Netns,
    addr::{add_with, check_prefix},
    announce::{Announcer, MAX_ANNOUNCE_COUNT},
    rtnl::Session,
};

/// An interface ready to take `addr/prefix_len`.
pub struct Takeover<'a> {
    /// Always Some until dropped.
    session: Option<Session<'a>>,
    announcer: Announcer,
    addr: IpAddr,
    prefix_len: u8,
}

impl<'a> Takeover<'a> {
    /// Opens everything in `netns`; changes nothing there.
    pub fn prepare(
        netns: &'a Netns,
        dev: &'a str,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<Self, NetError> {
        check_prefix(addr, prefix_len)?;
        let session = Session::open(netns, dev)?;
        let opened = || -> Result<Announcer, NetError> {
            netns.run(|| Announcer::open_here(&session, addr))?
        };
        let announcer = match opened() {
            Ok(announcer) => announcer,
            Err(error) => {
                // Dropped here, its runtime would panic inside the agent's own.
                session.close_in_background();
                return Err(error);
            }
        };
        Ok(Self {
            session: Some(session),
            announcer,
            addr,
            prefix_len,
        })
    }

    /// Adds the address (already there with that prefix: nothing to do) and sends `announcements`
    /// announcements of it, back to back. The netlink request runs on a thread of its own: the
    /// session's runtime cannot be driven from inside the caller's, if it has one.
    pub fn claim(&self, announcements: u32) -> Result<(), NetError> {
        if announcements == 0 || announcements > MAX_ANNOUNCE_COUNT {
            return Err(NetError::InvalidAnnounce {
                count: announcements,
                interval: Duration::ZERO,
            });
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let session = self.session.as_ref().expect("open until dropped");
                    add_with(session, self.addr, self.prefix_len)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        self.announcer.send(announcements, Duration::ZERO)
    }
}

impl Drop for Takeover<'_> {
    /// The agent holds a takeover across its async steps: its session must not block the drop.
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.close_in_background();
        }
    }
}
