//! Soak: 100 migrations back and forth between the bed's two hosts of 1,000 connections, with
//! the clients writing all the time and the server answering between migrations. Every byte is
//! checked both ways; no connection may be lost or reset. Each agent reports its resident memory
//! once the connections are live there: the first and the last must be alike, and so must this
//! process's own at the start and the end.
//!
//! Opt-in (a few minutes): `cargo xtask soak`, which runs
//! `cargo test -p tcpmig-testbed --test soak -- --ignored --nocapture --test-threads=1`.
mod support;

use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use support::{PEER, nothing_left, start_agent, start_unpaused_migrate, wait_exited};
use tcpmig_testbed::TokenFile;
use tcpmig_testbed::{
    Peer, PeerCommand, Report, SERVICE_V4, StreamArgs, TestBed, Traffic, command_all,
};

const N: usize = 1_000;
const MIGRATIONS: usize = 100;
const PORT: u16 = 8400;
const INITIAL: u64 = 1024;
/// What each client writes per round, every ROUND_PAUSE, while the server keeps up.
const ROUND: u64 = 64;
const ROUND_PAUSE: Duration = Duration::from_millis(20);
/// Most bytes per connection written by the clients and not read by a server yet.
const UNREAD_BUDGET: u64 = 16 << 10;
/// What the server writes per connection before each migration (still in flight when it starts;
/// 100 of them fit in the clients' receive queues).
const BURST: u64 = 256;
/// Bound on the whole soak.
const SOAK_LIMIT: Duration = Duration::from_secs(1800);

#[test]
#[ignore = "long: run by `cargo xtask soak`"]
fn hundred_migrations_back_and_forth_under_traffic() -> Result<()> {
    let own_start = resident_kib("self");
    let bed = TestBed::new()?;
    let token = TokenFile::new(&bed, "soak", "soak token")?;
    let stream = StreamArgs {
        timeout_secs: 60,
        ..StreamArgs::new(INITIAL)
    };
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let mut traffic = Traffic::open_at(&bed, Path::new(PEER), service, N, stream)?;
    ensure!(traffic.verify()?.all_verified(N as u64), "before");
    let server = traffic.servers.pop().context("one server")?;
    let clients = &mut traffic.clients;
    // Per connection: client bytes written past INITIAL, and read by a server; server bytes
    // written in all.
    let sent = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let server_sent = AtomicU64::new(INITIAL);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (server, runs) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| keep_writing(clients, &stop, &sent, &read));
        let result =
            migrate_back_and_forth(&bed, &token, stream, server, &sent, &read, &server_sent);
        stop.store(true, Ordering::Relaxed);
        let written = writer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        result.and_then(|done| written.map(|_| done))
    })?;
    let client_bytes = INITIAL + sent.load(Ordering::Acquire);
    let mut server = server;
    // Everything the clients wrote reached the last server, everything the servers wrote
    // reached the clients.
    let to_server = catch_up(&mut server, &sent, &read)?;
    let to_client = command_all(
        &mut traffic.clients,
        PeerCommand::Verify {
            until: Some(server_sent.load(Ordering::Acquire)),
        },
    )?;
    for (what, report) in [
        ("to the server", &to_server),
        ("to the clients", &to_client),
    ] {
        ensure!(
            report.all_verified() && report.connections == N as u64,
            "{what}: {report:?}"
        );
        ensure!(report.resets == 0, "{what}: {report:?}");
    }
    let own_end = resident_kib("self");
    let blackouts: Vec<f64> = runs.iter().map(|r| r.blackout_ms).collect();
    let (first, last) = (&runs[0], &runs[runs.len() - 1]);
    eprintln!(
        "soak: {MIGRATIONS} migrations of {N} connections in {:.0} s, 0 lost, 0 reset; every \
         byte verified: {client_bytes} per connection from the clients, {} from the servers",
        started.elapsed().as_secs_f64(),
        to_client.bytes_in / N as u64,
    );
    eprintln!(
        "blackout ms: min {:.1}, median {:.1}, max {:.1}",
        percentile(&blackouts, 0.0),
        percentile(&blackouts, 0.5),
        percentile(&blackouts, 1.0)
    );
    eprintln!(
        "agent resident KiB at the end of its run (peak): first {} ({}), last {} ({}); this \
         test process: start {own_start}, end {own_end}",
        first.resident_kib, first.peak_kib, last.resident_kib, last.peak_kib
    );
    ensure!(
        last.peak_kib <= first.peak_kib + first.peak_kib / 4,
        "agent memory grew: {first:?} -> {last:?}"
    );
    ensure!(
        own_end <= own_start + (64 << 10),
        "the test process grew: {own_start} -> {own_end}"
    );
    // The address ends where the last migration put it: after an even number, the source.
    nothing_left(&bed, &[], bed.source())?;
    drop(server);
    Ok(())
}

/// One migration as the soak saw it.
#[derive(Debug)]
struct Run {
    blackout_ms: f64,
    resident_kib: u64,
    peak_kib: u64,
}

/// The migrations, each from the host that holds the server to the other one. Returns the last
/// server (an adopting peer) and what each migration reported.
fn migrate_back_and_forth<'bed>(
    bed: &'bed TestBed,
    token: &TokenFile,
    stream: StreamArgs,
    mut server: Peer<'bed>,
    sent: &AtomicU64,
    read: &AtomicU64,
    server_sent: &AtomicU64,
) -> Result<(Peer<'bed>, Vec<Run>)> {
    let mut hosts = [bed.source(), bed.destination()];
    let mut runs = Vec::with_capacity(MIGRATIONS);
    let deadline = Instant::now() + SOAK_LIMIT;
    for i in 0..MIGRATIONS {
        ensure!(
            Instant::now() < deadline,
            "the soak took over {SOAK_LIMIT:?}"
        );
        let [from, to] = hosts;
        // The server reads what came, writes a burst that is still in flight, and idles.
        catch_up(&mut server, sent, read)?;
        let wrote = server.command(PeerCommand::Send { bytes: BURST })?;
        ensure!(wrote.all_verified(), "server burst: {wrote:?}");
        let written = server_sent.fetch_add(BURST, Ordering::AcqRel) + BURST;
        let adopted = StreamArgs {
            sent_already: written,
            received_already: INITIAL + read.load(Ordering::Acquire),
            ..stream
        };
        let mut agent = start_agent(to, &token.0, adopted, &[])?;
        let old_pid = server.pid();
        let mut migrate =
            start_unpaused_migrate(from, to, &[old_pid], PORT, &token.0, &["--json"])?;
        agent
            .expect_line("ready")
            .with_context(|| format!("migration {i}"))?;
        let (status, stdout, stderr) = migrate.finish()?;
        ensure!(status.success(), "migration {i}: {stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("migration {i} printed {stdout:?}"))?;
        ensure!(report["kept"] == N, "migration {i}: {report}");
        wait_exited(old_pid, support::COMMAND_TIMEOUT)?;
        drop(std::mem::replace(&mut server, agent));
        let destination = &report["destination"];
        runs.push(Run {
            blackout_ms: report["blackout_ms"].as_f64().unwrap_or(f64::NAN),
            resident_kib: destination["resident_kib"].as_u64().unwrap_or(0),
            peak_kib: destination["peak_resident_kib"].as_u64().unwrap_or(0),
        });
        hosts = [to, from];
    }
    Ok((server, runs))
}

/// Has `server` read everything the clients wrote so far.
fn catch_up(server: &mut Peer<'_>, sent: &AtomicU64, read: &AtomicU64) -> Result<Report> {
    let upto = sent.load(Ordering::Acquire);
    let report = server.command(PeerCommand::Verify {
        until: Some(INITIAL + upto),
    })?;
    ensure!(report.all_verified(), "server reading: {report:?}");
    read.store(upto, Ordering::Release);
    Ok(report)
}

/// The clients: a round of writes every ROUND_PAUSE while the servers keep up, migrations or
/// not, until told to stop (what the servers write waits in their receive queues, checked at the
/// end). Returns the bytes written per connection.
fn keep_writing(
    clients: &mut [Peer<'_>],
    stop: &AtomicBool,
    sent: &AtomicU64,
    read: &AtomicU64,
) -> Result<u64> {
    let deadline = Instant::now() + SOAK_LIMIT;
    while !stop.load(Ordering::Relaxed) {
        ensure!(Instant::now() < deadline, "the soak did not end");
        let written = sent.load(Ordering::Acquire);
        if written + ROUND - read.load(Ordering::Acquire) <= UNREAD_BUDGET {
            let wrote = command_all(clients, PeerCommand::Send { bytes: ROUND })?;
            ensure!(wrote.all_verified(), "clients writing: {wrote:?}");
            sent.store(written + ROUND, Ordering::Release);
        }
        std::thread::sleep(ROUND_PAUSE);
    }
    Ok(sent.load(Ordering::Acquire))
}

/// VmRSS of /proc/PID/status, in KiB.
fn resident_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
