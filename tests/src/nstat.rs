//! The TCP counters of one network namespace that tell how its clients lived through a
//! migration, as `nstat` shows them: segments retransmitted (`Tcp: RetransSegs` of
//! /proc/net/snmp), retransmission timeouts, SYN retransmissions and tail loss probes
//! (`TcpExt: TCPTimeouts TCPSynRetrans TCPLossProbes` of /proc/net/netstat), and fast
//! retransmits (`TcpExt: TCPFastRetrans`), which say how the others recovered. Read them before
//! and after ([`TcpCounters::read_in`]) and take the difference ([`TcpCounters::since`]).
//!
//! /proc/net is /proc/self/net, and /proc/self is the thread group: its namespace is the main
//! thread's, not that of a thread that entered another one. So the counters are read from
//! /proc/thread-self/net by a thread inside the namespace.

use std::fs;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::Namespace;

const SNMP: &str = "/proc/thread-self/net/snmp";
const NETSTAT: &str = "/proc/thread-self/net/netstat";

/// The counters of one namespace, or the difference between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpCounters {
    /// Segments retransmitted, for whatever reason (`TcpRetransSegs`).
    pub retrans_segs: u64,
    /// Retransmission timer expiries (`TcpExtTCPTimeouts`): a connection waited out its RTO.
    pub timeouts: u64,
    /// SYNs (and SYN-ACKs) sent again (`TcpExtTCPSynRetrans`): a connect waited 1 s or more.
    pub syn_retrans: u64,
    /// Tail loss probes sent (`TcpExtTCPLossProbes`): an unacked tail, probed after about 2 RTT.
    pub loss_probes: u64,
    /// Segments resent on duplicate ACKs or SACKs (`TcpExtTCPFastRetrans`), without a timer.
    pub fast_retrans: u64,
}

impl TcpCounters {
    /// The counters of the namespace the calling thread is in.
    pub fn read() -> anyhow::Result<Self> {
        let snmp = fs::read_to_string(SNMP).with_context(|| format!("reading {SNMP}"))?;
        let netstat = fs::read_to_string(NETSTAT).with_context(|| format!("reading {NETSTAT}"))?;
        Self::parse(&snmp, &netstat)
    }

    /// The counters of `namespace`, read by a thread inside it.
    pub fn read_in(namespace: &Namespace) -> anyhow::Result<Self> {
        namespace.run(Self::read)?
    }

    /// From the texts of /proc/net/snmp and /proc/net/netstat.
    pub fn parse(snmp: &str, netstat: &str) -> anyhow::Result<Self> {
        Ok(Self {
            retrans_segs: counter(snmp, "Tcp", "RetransSegs")?,
            timeouts: counter(netstat, "TcpExt", "TCPTimeouts")?,
            syn_retrans: counter(netstat, "TcpExt", "TCPSynRetrans")?,
            loss_probes: counter(netstat, "TcpExt", "TCPLossProbes")?,
            fast_retrans: counter(netstat, "TcpExt", "TCPFastRetrans")?,
        })
    }

    /// What happened between the reading `before` and this one.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            retrans_segs: self.retrans_segs.saturating_sub(before.retrans_segs),
            timeouts: self.timeouts.saturating_sub(before.timeouts),
            syn_retrans: self.syn_retrans.saturating_sub(before.syn_retrans),
            loss_probes: self.loss_probes.saturating_sub(before.loss_probes),
            fast_retrans: self.fast_retrans.saturating_sub(before.fast_retrans),
        }
    }
}

/// Field `name` of the `group` lines: each group is a line of names (`Tcp: RtoAlgorithm ...`)
/// followed by a line of values in the same order.
pub(crate) fn counter(text: &str, group: &str, name: &str) -> anyhow::Result<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} lines");
    };
    let Some(at) = names.split_whitespace().position(|n| n == name) else {
        bail!("no {group} {name}");
    };
    let value = values
        .split_whitespace()
        .nth(at)
        .with_context(|| format!("{group} {name} has no value"))?;
    // RFC 1213's counters are unsigned, but the kernel prints a few Tcp fields signed.
    value
        .parse::<u64>()
        .or_else(|_| value.parse::<i64>().map(|v| v.max(0).unsigned_abs()))
        .with_context(|| format!("{group} {name} = {value:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP_SAMPLE: &str = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 1234
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 1005 3 2 0 1000 91234 92345 17 0 4 0
Udp: InDatagrams NoPorts
Udp: 5 0
";

    const NETSTAT_SAMPLE: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv TCPFastRetrans TCPTimeouts TCPLossProbes TCPLossProbeRecovery TCPSynRetrans
TcpExt: 0 0 6 9 4 1 3
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
";

    #[test]
    fn parses_and_subtracts_a_sample() {
        let after = TcpCounters::parse(SNMP_SAMPLE, NETSTAT_SAMPLE).unwrap();
        assert_eq!(
            after,
            TcpCounters {
                retrans_segs: 17,
                timeouts: 9,
                syn_retrans: 3,
                loss_probes: 4,
                fast_retrans: 6,
            }
        );
        let before = TcpCounters {
            retrans_segs: 10,
            timeouts: 9,
            syn_retrans: 1,
            loss_probes: 5,
            fast_retrans: 0,
        };
        assert_eq!(
            after.since(&before),
            TcpCounters {
                retrans_segs: 7,
                timeouts: 0,
                syn_retrans: 2,
                loss_probes: 0,
                fast_retrans: 6,
            }
        );
        assert_eq!(counter(SNMP_SAMPLE, "Tcp", "MaxConn").unwrap(), 0);
        assert!(TcpCounters::parse(SNMP_SAMPLE, "IpExt: A\nIpExt: 0\n").is_err());
        assert!(counter(SNMP_SAMPLE, "Tcp", "NoSuchField").is_err());
    }

    /// This process's own namespace: whatever the counts, all four fields exist.
    #[test]
    fn reads_the_calling_threads_namespace() {
        TcpCounters::read().unwrap();
    }

    /// A new namespace starts from zero, and a connect whose SYN a full accept queue drops
    /// shows as a SYN retransmission there, not in the caller's namespace (needs root, and
    /// the namespace lock like every test that makes namespaces).
    #[test]
    fn counts_a_syn_retransmission_in_a_namespace() {
        use std::net::SocketAddr;
        use std::time::{Duration, Instant};

        use socket2::{Domain, Socket, Type};

        let group = crate::Namespaces::new(["lo"]).expect("making a namespace (needs root)");
        let [namespace] = group.members();
        let fresh = TcpCounters::read_in(namespace).unwrap();
        assert_eq!(
            fresh,
            TcpCounters::default(),
            "a new namespace counts nothing"
        );
        let counted = namespace.run(|| {
            let addr: SocketAddr = "127.0.0.1:7".parse().unwrap();
            let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            listener.bind(&addr.into()).unwrap();
            // Backlog 0: one connection fills the accept queue, the SYNs after it are dropped.
            listener.listen(0).unwrap();
            let clients: Vec<Socket> = (0..3)
                .map(|_| {
                    let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                    client.set_nonblocking(true).unwrap();
                    let _ = client.connect(&addr.into());
                    client
                })
                .collect();
            // The first retry comes 1 s after the SYN.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let now = TcpCounters::read().unwrap();
                if now.syn_retrans > 0 || Instant::now() >= deadline {
                    drop(clients);
                    return now;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let counted = counted.unwrap().since(&fresh);
        assert!(counted.syn_retrans > 0, "{counted:?}");
        assert!(counted.retrans_segs >= counted.syn_retrans, "{counted:?}");
    }
}
