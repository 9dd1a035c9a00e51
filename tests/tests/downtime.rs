//! What the clients see of a migration: 500 connections sending all the time and a new
//! connection tried every 2 ms through it (the test bed's loaded migration, as the scaling bench
//! runs it). Counts, never times: every byte kept, no reset, every new connection served, and
//! in the clients' namespace no retransmission timeout and no SYN retransmission; then a hold
//! budget so small that it overflows, counted, and recovered by the clients' retransmissions.
//!
//! Run with `cargo xtask test` (root, the tcpmig binary built).

mod support;

use std::path::Path;

use anyhow::{Result, ensure};
use support::PEER;
use tcpmig_testbed::{
    loaded::{LoadedMigration, Outcome, Programs},
    tcpmig_bin,
};

const CONNECTIONS: usize = 500;

fn migrate_under_load(migrate_args: &[&str]) -> Result<Outcome> {
    let tcpmig = tcpmig_bin();
    let programs = Programs {
        tcpmig: &tcpmig,
        peer: Path::new(PEER),
    };
    let loaded = LoadedMigration {
        connections: CONNECTIONS,
        rate: None,
        migrate_args,
        insecure: false,
    };
    loaded.run(&programs)
}

/// Every connection kept byte-exact, none broken, and every new connection served.
fn nothing_lost(outcome: &Outcome) -> Result<()> {
    let (report, load) = (&outcome.report, &outcome.load);
    // A prober's connection its client has closed (CLOSE_WAIT) may be skipped: it was served.
    ensure!(
        report["kept"] == report["connections"],
        "kept {} of {} (skipped {})",
        report["kept"],
        report["connections"],
        report["skipped"]
    );
    ensure!(
        load.lost() == 0 && load.missing == 0 && load.verified == CONNECTIONS as u64,
        "the clients lost connections or bytes: {load:#?}"
    );
    let new = &outcome.new_connections;
    // When each unserved one was tried, from the end of the blackout (negative: before it).
    let unserved: Vec<_> = new
        .unserved
        .iter()
        .map(|u| {
            let ms = (u.at_ns as f64 - outcome.live_ns as f64) / 1e6;
            format!("{:?} at {ms:.1} ms", u.outcome)
        })
        .collect();
    ensure!(
        new.attempted > 0 && new.served == new.attempted,
        "new connections: {} of {} served, {} refused, {} hanging, {} failed ({:?}); unserved, \
         from the end of a {} ms blackout after {} ms stopped: {unserved:?}",
        new.served,
        new.attempted,
        new.refused,
        new.hanging(),
        new.failed,
        new.first_failure,
        report["blackout_ms"],
        report["stop_to_freeze_ms"],
    );
    Ok(())
}

#[test]
fn clients_wait_for_no_timer() -> Result<()> {
    let outcome = migrate_under_load(&[])?;
    nothing_lost(&outcome)?;
    let tcp = &outcome.client_tcp;
    ensure!(
        tcp.timeouts == 0 && tcp.syn_retrans == 0,
        "the clients waited for their timers: {tcp:?}"
    );
    let hold = &outcome.report["hold"];
    let forwarded = &outcome.report["forwarded"];
    ensure!(
        hold["over_budget"] == 0
            && forwarded["failed"] == 0
            && forwarded["replayed"] == hold["packets"],
        "held {hold}, forwarded {forwarded}"
    );
    ensure!(
        outcome.report["destination"]["listener"] == true,
        "no listener handed to the application: {}",
        outcome.report
    );
    Ok(())
}

#[test]
fn a_hold_that_overflows_is_counted_and_recovered() -> Result<()> {
    let outcome = migrate_under_load(&["--hold-packets", "5"])?;
    let hold = &outcome.report["hold"];
    ensure!(
        hold["packets"] == 5 && hold["over_budget"].as_u64() > Some(0),
        "the hold should have overflowed: {hold}"
    );
    nothing_lost(&outcome)
}
