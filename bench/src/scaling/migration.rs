//! One measured migration under load ([`LoadedMigration`], the test bed's: echo servers, the
//! open-loop clients, the prober of new connections, the clients' counters, the agent and
//! `tcpmig migrate --json`), read into what the scaling bench tabulates.
//!
//! The clients' catch-up is counted from the end of the blackout as the agent reports it
//! (`live_at_unix_ms`), not from the moment `tcpmig migrate` returned: the source learns of the
//! end only after a round trip and its own clean-up, which would hide part of the catch-up.

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};
use tcpmig_testbed::loaded::{LoadedMigration, Programs};
use tcpmig_testbed::{LoadReport, ProbeReport, TcpCounters};

use super::ScalingArgs;
use crate::criu::Binaries;

/// One migration: the times `tcpmig migrate --json` reported and what the clients saw.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationRun {
    pub connections: usize,
    pub kept: usize,
    pub blackout_ms: f64,
    /// From the application stopped to the freeze: the part of the clients' silence before the
    /// blackout (0 when `tcpmig migrate --json` does not report it).
    pub stop_to_freeze_ms: f64,
    pub total_ms: f64,
    pub phases: Phases,
    /// With `--precopy`: connections restored ahead of the freeze, and those of them that
    /// kept their sockets (they had not moved by the dump).
    pub precopied: usize,
    pub kept_precopied: usize,
    pub load: LoadReport,
    /// The clients' TCP counters over the migration and the rest of the load.
    pub client_tcp: TcpCounters,
    /// New connections tried through the migration.
    pub new_connections: ProbeReport,
    /// Of those not served, how many were tried before the blackout, during it and after it.
    pub unserved_when: [u64; 3],
    /// `tcpmig migrate --json` as printed.
    pub report: serde_json::Value,
}

/// The blackout split into the steps of design.md, in milliseconds, in order.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Phases {
    pub freeze_ms: f64,
    pub dump_ms: f64,
    pub transfer_ms: f64,
    /// From the address deleted on the source to the agent's Restored.
    pub restore_ms: f64,
    /// Deleting the address on the source (while the agent restores), adding and announcing it
    /// on the destination.
    pub address_ms: f64,
    /// Destination unfreeze and the first socket out of repair mode.
    pub unfreeze_ms: f64,
    /// The rest of the blackout: the Commit's way to the agent.
    pub other_ms: f64,
}

impl Phases {
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("freeze", self.freeze_ms),
            ("dump", self.dump_ms),
            ("transfer", self.transfer_ms),
            ("restore", self.restore_ms),
            ("address move", self.address_ms),
            ("unfreeze", self.unfreeze_ms),
            ("other (Commit in flight)", self.other_ms),
        ]
    }
}

/// The fields of `tcpmig migrate --json` used here (README, "Moving a service").
#[derive(Deserialize)]
struct MigrateJson {
    connections: usize,
    kept: usize,
    blackout_ms: f64,
    #[serde(default)]
    stop_to_freeze_ms: f64,
    total_ms: f64,
    phases: SourcePhases,
    destination: AgentJson,
}

#[derive(Deserialize)]
struct SourcePhases {
    freeze_ms: f64,
    dump_ms: f64,
    transfer_ms: f64,
    restore_ms: f64,
    address_ms: f64,
}

#[derive(Deserialize)]
struct AgentJson {
    address_ms: f64,
    live_after_commit_ms: f64,
    #[serde(default)]
    precopied: usize,
    #[serde(default)]
    kept_precopied: usize,
}

impl MigrateJson {
    fn phases(&self) -> Phases {
        let (p, d) = (&self.phases, &self.destination);
        let mut phases = Phases {
            freeze_ms: p.freeze_ms,
            dump_ms: p.dump_ms,
            transfer_ms: p.transfer_ms,
            restore_ms: p.restore_ms,
            address_ms: p.address_ms + d.address_ms,
            unfreeze_ms: (d.live_after_commit_ms - d.address_ms).max(0.0),
            other_ms: 0.0,
        };
        let named: f64 = phases.named().iter().map(|(_, ms)| ms).sum();
        phases.other_ms = (self.blackout_ms - named).max(0.0);
        phases
    }
}

/// Migrates `n` connections under load once, on a bed of its own.
pub fn once(bin: &Binaries, n: usize, args: &ScalingArgs) -> anyhow::Result<MigrationRun> {
    let precopy: &[&str] = if args.precopy { &["--precopy"] } else { &[] };
    let loaded = LoadedMigration {
        connections: n,
        rate: args.rate,
        migrate_args: precopy,
        insecure: args.insecure,
    };
    let programs = Programs {
        tcpmig: &bin.tcpmig,
        peer: &bin.peer,
    };
    let outcome = loaded.run(&programs)?;
    let raw = outcome.report;
    let report: MigrateJson = serde_json::from_value(raw.clone())
        .with_context(|| format!("unexpected `tcpmig migrate --json` output: {raw}"))?;
    // The prober's connections may be open at discovery too.
    ensure!(
        report.connections >= n,
        "tcpmig migrate found {} of the {n} connections",
        report.connections
    );
    let new_connections = outcome.new_connections;
    Ok(MigrationRun {
        connections: n,
        kept: report.kept,
        blackout_ms: report.blackout_ms,
        stop_to_freeze_ms: report.stop_to_freeze_ms,
        total_ms: report.total_ms,
        phases: report.phases(),
        precopied: report.destination.precopied,
        kept_precopied: report.destination.kept_precopied,
        load: outcome.load,
        client_tcp: outcome.client_tcp,
        unserved_when: unserved_when(&new_connections, outcome.live_ns, report.blackout_ms),
        new_connections,
        report: raw,
    })
}

/// How many of the new connections not served were tried before, during and after the blackout
/// that ended at `live_ns` (on the load generator's clock).
fn unserved_when(probe: &ProbeReport, live_ns: u64, blackout_ms: f64) -> [u64; 3] {
    let frozen_ns = live_ns.saturating_sub((blackout_ms * 1e6) as u64);
    let mut when = [0; 3];
    for attempt in &probe.unserved {
        let k = match attempt.at_ns {
            at if at < frozen_ns => 0,
            at if at <= live_ns => 1,
            _ => 2,
        };
        when[k] += 1;
    }
    when
}
