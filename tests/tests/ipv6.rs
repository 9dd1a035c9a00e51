//! IPv6 end to end (issue 17, item 7): `tcpmig migrate` + `tcpmig agent` with an IPv6 service, and
//! the announcement that moves the clients' neighbour entries, checked on the wire: an
//! unsolicited neighbour advertisement (override set, solicited not) from the destination's MAC.
//! The IPv4 run of the same scenario checks the gratuitous ARP and gives the numbers to compare.
//! Then the CRIU hook moving an IPv6 service (TCPMIG_ADDRESS=fd54:636d::100/64), CRIU in the
//! task's namespace and outside it.
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test ipv6 -- --test-threads=1`.
mod criu_bed;
mod support;

use std::net::SocketAddr;

use anyhow::{Context as _, Result, ensure};
use criu_bed::{Mode, migrate_mirror};
use tcpmig_testbed::{Capture, IFACE, SERVICE_V6, TestBed, TokenFile, announcements};

const N: usize = 1_000;
const PORT: u16 = 8086;

/// N connections to the service of one family with bytes queued both ways move to an agent;
/// every byte arrives, none is reset, a new connection is served by the destination, the
/// address is on the destination only, and the clients heard the destination announce it.
fn migrate_with_agent(ipv6: bool) -> Result<()> {
    let bed = TestBed::new()?;
    let ip = TestBed::service(ipv6);
    let service = SocketAddr::new(ip, PORT);
    let mut traffic = support::queued_traffic_at(&bed, N, service)?;
    let token = TokenFile::new(&bed, "family", "family token")?;
    let destination = bed.destination();
    let agent = support::start_agent(destination, &token.0, support::adopted_stream(), &[])?;
    let agent_pid = agent.pid();
    if ipv6 {
        support::na_defaults(&bed)?;
    }
    let capture = Capture::start_filtered(bed.client(), "announce", "arp or icmp6")?;
    let server_pid = traffic.server_pids()[0];
    let (migrate_pid, stdout) = support::migrate_service_to(
        &bed,
        &mut traffic,
        agent,
        server_pid,
        service,
        &token.0,
        &["--json"],
    )?;
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("tcpmig migrate --json printed {stdout:?}"))?;
    for field in ["connections", "kept"] {
        ensure!(report[field].as_u64() == Some(N as u64), "{report}");
    }
    eprintln!(
        "{ip}, {N} connections: blackout {} ms, stop to freeze {} ms, total {} ms; phases {}; \
         destination {}",
        report["blackout_ms"],
        report["stop_to_freeze_ms"],
        report["total_ms"],
        report["phases"],
        report["destination"],
    );
    support::carries_on(&mut traffic, N).context("after the move")?;
    let heard = announcements(&capture.stop_raw()?)?;
    support::announced_by(&heard, ip, &destination.mac()?)?;
    let entry = bed
        .client()
        .ip(&["neigh", "show", "to", &ip.to_string(), "dev", IFACE])?;
    ensure!(
        entry.contains(&destination.mac()?),
        "the client's neighbour entry for {ip}: {entry}"
    );
    support::new_connection_reaches(&bed, destination, service)?;
    let freezes = [
        format!("migrate-{migrate_pid}"),
        format!("agent-{agent_pid}"),
    ];
    support::nothing_left_of(&bed, &freezes, destination, &[ip])
}

#[test]
fn thousand_ipv6_connections_move() -> Result<()> {
    migrate_with_agent(true)
}

/// The same with IPv4: the gratuitous ARP on the wire, and the numbers to compare.
#[test]
fn thousand_ipv4_connections_move() -> Result<()> {
    migrate_with_agent(false)
}

#[test]
fn criu_hook_ipv6_same_netns() -> Result<()> {
    migrate_mirror(Mode::SameNetns, N, SERVICE_V6.into())
}

#[test]
fn criu_hook_ipv6_external_netns() -> Result<()> {
    migrate_mirror(Mode::ExternalNetns, N, SERVICE_V6.into())
}
