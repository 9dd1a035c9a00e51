//! The line protocol of `tcpmig-peer`: the commands on its stdin ([`PeerCommand`]) and the
//! reports on its stdout ([`Report`], [`ScriptReport`]).

use std::fmt;
use std::iter::Sum;
use std::ops::AddAssign;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// A command on a peer's stdin; `Display` and `FromStr` are the wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCommand {
    /// Read and check every incoming stream up to offset `until` (default: `--bytes`).
    Verify {
        until: Option<u64>,
    },
    /// Write the next `bytes` bytes of every outgoing stream.
    Send {
        bytes: u64,
    },
    Exit,
}

impl fmt::Display for PeerCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Verify { until: None } => write!(f, "verify"),
            Self::Verify { until: Some(until) } => write!(f, "verify {until}"),
            Self::Send { bytes } => write!(f, "send {bytes}"),
            Self::Exit => write!(f, "exit"),
        }
    }
}

impl FromStr for PeerCommand {
    type Err = anyhow::Error;

    fn from_str(line: &str) -> Result<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |word: &str| {
            word.parse::<u64>()
                .with_context(|| format!("bad number in {line:?}"))
        };
        Ok(match words[..] {
            ["verify"] => Self::Verify { until: None },
            ["verify", until] => Self::Verify {
                until: Some(number(until)?),
            },
            ["send", bytes] => Self::Send {
                bytes: number(bytes)?,
            },
            ["exit"] => Self::Exit,
            _ => bail!("unknown command {line:?}"),
        })
    }
}

/// What a peer says after a command. Every connection is in exactly one state, counted here:
/// verified (no failure so far: every byte read matched, every write completed), mismatched (a
/// wrong byte, or end of stream before the expected end), reset (ECONNRESET or EPIPE), timed out
/// (no progress before the deadline, or ETIMEDOUT), or failed with another error. A connection
/// that failed stays failed and is skipped by later commands. Byte counts are totals since start.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub connections: u64,
    pub verified: u64,
    pub mismatched: u64,
    pub resets: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The first failure, with the connection's addresses and stream offset.
    pub first_failure: Option<String>,
}

impl Report {
    /// Whether every connection is verified (and there is at least one).
    pub fn all_verified(&self) -> bool {
        self.connections > 0 && self.verified == self.connections
    }
}

impl AddAssign for Report {
    fn add_assign(&mut self, other: Self) {
        self.connections += other.connections;
        self.verified += other.verified;
        self.mismatched += other.mismatched;
        self.resets += other.resets;
        self.timeouts += other.timeouts;
        self.errors += other.errors;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.first_failure = self.first_failure.take().or(other.first_failure);
    }
}

impl Sum for Report {
    fn sum<I: Iterator<Item = Self>>(reports: I) -> Self {
        reports.fold(Self::default(), |mut total, report| {
            total += report;
            total
        })
    }
}

/// The one line a `--script` peer prints when its script is done: its [`Report`] and which of
/// `tcpmig agent`'s children it is (its pid, `TCPMIG_SHARD` and `TCPMIG_SHARDS`, `None` when
/// unset), since those children share one stdout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptReport {
    pub pid: u32,
    pub shard: Option<usize>,
    pub shards: Option<usize>,
    pub report: Report,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_back() {
        for command in [
            PeerCommand::Verify { until: None },
            PeerCommand::Verify { until: Some(4096) },
            PeerCommand::Send { bytes: 100 },
            PeerCommand::Exit,
        ] {
            assert_eq!(command.to_string().parse::<PeerCommand>().unwrap(), command);
        }
        assert!("verify x".parse::<PeerCommand>().is_err());
        assert!("dance".parse::<PeerCommand>().is_err());
    }

    #[test]
    fn reports_add_up() {
        let one = Report {
            connections: 2,
            verified: 1,
            resets: 1,
            first_failure: Some("reset".into()),
            ..Report::default()
        };
        let total: Report = [Report::default(), one.clone(), one].into_iter().sum();
        assert_eq!((total.connections, total.verified, total.resets), (4, 2, 2));
        assert_eq!(total.first_failure.as_deref(), Some("reset"));
        assert!(!total.all_verified());
    }
}
