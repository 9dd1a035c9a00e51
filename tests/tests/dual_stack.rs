//! A dual-stack service in one migration (issue 17, item 7): one server process per family
//! (a peer serves one address), 500 connections each with bytes queued both ways, and one
//! `tcpmig migrate` with `--service` for the bed's IPv4 and IPv6 addresses (on different ports:
//! allowed) and both pids. The agent adopts all of them in one process: every byte arrives, none
//! is reset, what the clients sent into the freeze is held and replayed (both families), both
//! addresses end up on the destination only, the clients heard a gratuitous ARP and an
//! unsolicited NA for them, and a new connection to each address is served there. Then a
//! migration that fails after the source deleted both addresses puts both back: the agent
//! killed (`migrate` rolls back) or `migrate` killed (its guard does).
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test dual_stack -- --test-threads=1`.
mod support;

use std::net::SocketAddr;

use anyhow::{Context as _, Result, ensure};
use tcpmig_testbed::{
    Capture, PeerCommand, TestBed, TokenFile, Traffic, announcements, peer::command_all,
};

/// Connections per family.
const N: usize = 500;
const PORT_V4: u16 = 8097;
const PORT_V6: u16 = 8098;

/// The bed's IPv4 and IPv6 service addresses, on their ports.
fn services() -> [SocketAddr; 2] {
    [
        SocketAddr::new(TestBed::service(false), PORT_V4),
        SocketAddr::new(TestBed::service(true), PORT_V6),
    ]
}

/// N queued connections to each service, from one server process per family, as one traffic:
/// verified and carried on together.
fn dual_traffic(bed: &TestBed) -> Result<Traffic<'_>> {
    let [v4, v6] = services();
    let mut ipv4 = support::queued_traffic_at(bed, N, v4)?;
    let ipv6 = support::queued_traffic_at(bed, N, v6)?;
    ipv4.servers.extend(ipv6.servers);
    ipv4.clients.extend(ipv6.clients);
    Ok(ipv4)
}

/// Bytes each client sends during the blackout: one segment per connection, which the source's
/// freeze holds and the destination replays, of both families.
const HELD: u64 = 300;

#[test]
fn both_families_move_in_one_migration() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = dual_traffic(&bed)?;
    let token = TokenFile::new(&bed, "dual", "dual token")?;
    let (source, destination) = (bed.source(), bed.destination());
    let mut agent = support::start_agent(destination, &token.0, support::adopted_stream(), &[])?;
    let agent_pid = agent.pid();
    support::na_defaults(&bed)?;
    let capture = Capture::start_filtered(bed.client(), "announce", "arp or icmp6")?;
    let services = services();
    let (link, timeout) = (support::insecure(&token.0), support::STEP_TIMEOUT_SECS);
    let pids = traffic.server_pids();
    let mut cmd =
        support::migrate_command_of(source, destination, &pids, &services, &link, timeout)?;
    cmd.arg("--json").env("TCPMIG_TEST_PAUSE_AT", "frozen");
    let mut migrate = support::Running::spawn(source, cmd)?;
    let migrate_pid = migrate.child.pid();
    migrate
        .stderr
        .wait_for("test pause at frozen", support::COMMAND_TIMEOUT)?;
    // Into the freeze: held at the source, forwarded to the destination once it is live.
    command_all(&mut traffic.clients, PeerCommand::Send { bytes: HELD })?;
    migrate.resume()?;
    agent.expect_line("ready")?;
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    traffic.servers = vec![agent];
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("tcpmig migrate --json printed {stdout:?}"))?;
    check_report(&report, &services)?;
    support::carries_on(&mut traffic, 2 * N).context("after the move")?;
    let until = support::BYTES + 2 * support::MORE + HELD;
    let held = command_all(
        &mut traffic.servers,
        PeerCommand::Verify { until: Some(until) },
    )?;
    ensure!(
        held.connections == 2 * N as u64 && held.all_verified(),
        "{held:?}"
    );
    let heard = announcements(&capture.stop_raw()?)?;
    let mac = destination.mac()?;
    for service in services {
        support::announced_by(&heard, service.ip(), &mac)?;
        support::new_connection_reaches(&bed, destination, service)?;
    }
    let freezes = [
        format!("migrate-{migrate_pid}"),
        format!("agent-{agent_pid}"),
    ];
    let ips = services.map(|s| s.ip());
    support::nothing_left_of(&bed, &freezes, destination, &ips)
}

/// Every connection moved and kept, both services listed, and what the freeze held (a segment
/// of each connection at least) forwarded to the destination, none failing.
fn check_report(report: &serde_json::Value, services: &[SocketAddr]) -> Result<()> {
    for field in ["connections", "kept"] {
        ensure!(report[field].as_u64() == Some(2 * N as u64), "{report}");
    }
    let listed: Vec<String> = services.iter().map(ToString::to_string).collect();
    ensure!(report["services"] == serde_json::json!(listed), "{report}");
    let (hold, forwarded) = (&report["hold"], &report["forwarded"]);
    ensure!(
        hold["packets"].as_u64() >= Some(2 * N as u64)
            && forwarded["replayed"] == hold["packets"]
            && forwarded["failed"] == 0,
        "held {hold}, forwarded {forwarded}"
    );
    eprintln!(
        "both families, {} connections: blackout {} ms, total {} ms; held {hold}; destination {}",
        2 * N,
        report["blackout_ms"],
        report["total_ms"],
        report["destination"],
    );
    Ok(())
}

/// Who dies once the source has deleted both addresses (its pause `address-deleted`).
#[derive(Clone, Copy)]
enum Dying {
    /// The agent: `migrate` rolls back.
    Agent,
    /// `migrate` itself: its guard rolls back.
    Migrate,
}

/// `dying` is killed once the source deleted both addresses: the source rolls back, both
/// addresses are back on it, and every connection carries on there.
fn failure_after_the_addresses_moved(dying: Dying) -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = dual_traffic(&bed)?;
    let token = TokenFile::new(&bed, "dual", "dual token")?;
    let (source, destination) = (bed.source(), bed.destination());
    let mut agent = support::start_plain_agent(destination, &token.0, &[], None)?;
    let agent_pid = agent.child.pid();
    let services = services();
    let (link, timeout) = (support::insecure(&token.0), support::STEP_TIMEOUT_SECS);
    let pids = traffic.server_pids();
    let mut cmd =
        support::migrate_command_of(source, destination, &pids, &services, &link, timeout)?;
    cmd.env("TCPMIG_TEST_PAUSE_AT", "address-deleted");
    let mut migrate = support::Running::spawn(source, cmd)?;
    let migrate_pid = migrate.child.pid();
    let pause = "test pause at address-deleted";
    migrate.stderr.wait_for(pause, support::COMMAND_TIMEOUT)?;
    for service in services {
        ensure!(
            !source.holds(service.ip())?,
            "{service} still on the source"
        );
    }
    match dying {
        Dying::Agent => {
            agent.kill()?;
            migrate.resume()?;
            let rolled_back = "rolled back: the connections carry on at the source";
            migrate.fails_saying(rolled_back).context("the migration")?;
        }
        Dying::Migrate => {
            let said = migrate.kill()?;
            ensure!(
                said.contains("died before the commit: rolled back"),
                "{said}"
            );
            // It noticed, dropped what it restored (silently) and removed its freeze.
            support::wait_exited(agent_pid, support::COMMAND_TIMEOUT)?;
        }
    }
    support::carries_on(&mut traffic, 2 * N).context("after the rollback")?;
    let freezes = [
        format!("migrate-{migrate_pid}"),
        format!("agent-{agent_pid}"),
    ];
    let ips = services.map(|s| s.ip());
    support::nothing_left_of(&bed, &freezes, source, &ips)
}

#[test]
fn an_agent_dying_after_the_addresses_moved_puts_both_back() -> Result<()> {
    failure_after_the_addresses_moved(Dying::Agent)
}

/// The guard knows both addresses.
#[test]
fn migrate_dying_after_the_addresses_moved_has_its_guard_put_both_back() -> Result<()> {
    failure_after_the_addresses_moved(Dying::Migrate)
}
