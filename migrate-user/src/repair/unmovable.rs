//! The connections of a service that a migration would leave behind, and why: a migration names
//! them before the freeze and refuses unless told to leave them. Repair moves synchronized
//! connections (ESTABLISHED and the half-closed states); what it cannot move is a handshake not
//! complete (SYN_SENT, SYN_RECV) and a connection no process holds yet in an accept queue it
//! cannot take connections from (see [`super::AcceptPlan`]). Closed ones (CLOSE, TIME_WAIT) hold
//! nothing to move.
use std::fmt;

use super::{Filter, RepairError, TcpState};
use crate::{net::Netns, tuple::Tuple};

/// Why a connection does not move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// SYN_SENT or SYN_RECV: repair restores only synchronized connections.
    Handshake,
    /// In an accept queue that the migration does not take connections from (see
    /// [`super::AcceptPlan`]): in no fd table, so nothing moves it; once the address moves, its
    /// client's segments draw resets.
    Unaccepted,
    /// Closed both ways (CLOSE, TIME_WAIT): nothing left to move, the application sees it closed.
    Closed,
    /// A state repair does not know.
    Unknown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Handshake => {
                "its handshake is not complete: repair moves synchronized connections only"
            }
            Reason::Unaccepted => {
                "waiting in the accept queue of a listener the migrated processes do not hold, \
                 or that also queues connections to another address: its client would be reset"
            }
            Reason::Closed => "closed: nothing to move",
            Reason::Unknown => "a state repair does not handle",
        })
    }
}

/// A connection of the service that stays behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unmovable {
    pub tuple: Tuple,
    pub state: TcpState,
    pub reason: Reason,
}

impl Unmovable {
    /// A socket of a process's fd table in `state`, which repair does not handle.
    pub fn held(tuple: Tuple, state: TcpState) -> Self {
        let reason = match state {
            TcpState::SynSent | TcpState::SynRecv => Reason::Handshake,
            TcpState::Close | TcpState::TimeWait => Reason::Closed,
            _ => Reason::Unknown,
        };
        Self {
            tuple,
            state,
            reason,
        }
    }

    /// Whether leaving it loses a connection: all but the closed ones.
    pub fn is_loss(&self) -> bool {
        self.reason != Reason::Closed
    }
}

impl fmt::Display for Unmovable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.tuple, self.state, self.reason)
    }
}

/// A list of connections left behind, printed one per line up to [`Listed::SHOWN`], then how
/// many more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listed(pub Vec<Unmovable>);

impl Listed {
    /// At most this many are named in a message.
    pub const SHOWN: usize = 20;
}

impl fmt::Display for Listed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for unmovable in self.0.iter().take(Self::SHOWN) {
            write!(f, "\n  {unmovable}")?;
        }
        match self.0.len().checked_sub(Self::SHOWN) {
            Some(more) if more > 0 => write!(f, "\n  and {more} more"),
            _ => Ok(()),
        }
    }
}

/// The connections of `filter`'s service waiting in an accept queue (ESTABLISHED or CLOSE_WAIT
/// with no inode: no process holds them) or in a handshake a listener answered (SYN_RECV),
/// seen in `netns`: a listing of every socket, to name them. [`super::wait_until`] tells more
/// cheaply whether any may wait.
pub fn unaccepted(netns: &Netns, filter: &Filter) -> Result<Vec<Unmovable>, RepairError> {
    let all = super::list_tcp_sockets(netns)?;
    Ok(all
        .into_iter()
        .filter(|s| filter.matches(&s.tuple))
        .filter_map(|s| {
            let reason = match s.state {
                TcpState::SynRecv => Reason::Handshake,
                TcpState::Established | TcpState::CloseWait if s.inode == 0 => Reason::Unaccepted,
                _ => return None,
            };
            Some(Unmovable {
                tuple: s.tuple,
                state: s.state,
                reason,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(port: u16, state: TcpState) -> Unmovable {
        let tuple = Tuple {
            local: "10.0.0.1:80".parse().unwrap(),
            remote: std::net::SocketAddr::from(([10, 0, 0, 2], port)),
        };
        Unmovable::held(tuple, state)
    }

    #[test]
    fn closed_ones_are_no_loss() {
        assert!(one(1, TcpState::SynSent).is_loss());
        assert!(one(1, TcpState::SynRecv).is_loss());
        assert!(!one(1, TcpState::Close).is_loss());
        assert!(!one(1, TcpState::TimeWait).is_loss());
    }

    #[test]
    fn a_long_list_names_twenty_and_counts_the_rest() {
        let list = Listed((0..23).map(|k| one(40000 + k, TcpState::SynSent)).collect());
        let text = list.to_string();
        assert_eq!(text.lines().filter(|l| l.contains("SYN_SENT")).count(), 20);
        assert!(text.contains("10.0.0.1:80 <-> 10.0.0.2:40000 SYN_SENT (its handshake"));
        assert!(text.ends_with("\n  and 3 more"), "{text}");
        assert!(
            !Listed(vec![one(1, TcpState::SynSent)])
                .to_string()
                .contains("more")
        );
    }
}
