//! Every state that moves, at once in one process, through real CRIU with tcpmig's hook as its
//! network lock: 1,000 connections held by a `sleep` on the source, with full queues, CLOSE_WAIT,
//! LAST_ACK, FIN_WAIT1, FIN_WAIT2 and CLOSING among the ESTABLISHED ones, dumped and restored
//! on the destination. The hook's report counts every connection; the restored sockets (taken
//! from the restored process) are in the states they were dumped in and carry on byte-exact,
//! with the ends of stream where due, and no host sends or counts a reset but CRIU's own probe:
//! at each start CRIU checks the kernel with a connection on 127.0.0.1 that it ends with a
//! reset, one OutRsts and one EstabResets in the netns it runs in (the source's and the
//! destination's in the same-netns mode, the test's own in the external mode). Those are
//! captured on `lo` and told apart. (A connection still in an accept queue cannot go through
//! CRIU: it dumps fd tables, and refuses a listener with one waiting.) Needs root and CRIU; run
//! with `--test-threads=1`.
mod criu_bed;
mod support;

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::{OwnedFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use criu_bed::{KillOnDrop, Migration, Mode, netns_inode_of, nothing_left, reap};
use support::pairs::{
    Pair, accept_pairs, check_every_state, every_state, join, resets, split, state_of,
};
use tcpmig::{net::Netns, repair::TcpState};
use tcpmig_testbed::{Capture, ChildGuard, SERVICE_V4, SERVICE_V6, TestBed, sys};

/// Connections in each migration.
const ALL: usize = 1000;

/// The fd the holder gets its first socket on (`command_with_listen_fds` starts at 3).
const FIRST_FD: RawFd = 3;

/// A `sleep` of the source holding `fds` at FIRST_FD on: in its own session, stdio on files, as
/// CRIU wants it. Returns once it runs `sleep` (not the shell that execs it).
fn holder<'bed>(migration: &Migration<'bed>, fds: Vec<OwnedFd>) -> Result<ChildGuard<'bed>> {
    let source = migration.bed.source();
    let mut cmd = source.command_with_listen_fds("/bin/sleep", fds)?;
    cmd.arg("600");
    let child = migration.spawn_detached(source, &mut cmd, "holder")?;
    let comm = format!("/proc/{}/comm", child.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_to_string(&comm)?.trim() != "sleep" {
        ensure!(Instant::now() < deadline, "the holder does not run sleep");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

/// The hook's report (one JSON line per action) counts `n` connections at every action that
/// froze or lifted a freeze: post-dump (checked frozen) among them, and the action that lifts
/// the destination's freeze (post-restore, or network-unlock with the netns external).
fn every_connection_reported(migration: &Migration<'_>, n: usize) -> Result<()> {
    let path = migration.dir.0.join("hooks.jsonl");
    let text = fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    eprintln!("hooks: {text}");
    let lines = text
        .lines()
        .map(serde_json::from_str::<serde_json::Value>)
        .collect::<Result<Vec<_>, _>>()?;
    let freezing: Vec<_> = lines.iter().filter(|l| !l["freeze"].is_null()).collect();
    for line in &freezing {
        ensure!(line["connections"] == n, "not {n} connections: {line}");
    }
    let lift = match migration.mode {
        Mode::SameNetns => "post-restore",
        Mode::ExternalNetns => "network-unlock",
    };
    for action in ["post-dump", lift] {
        ensure!(
            freezing.iter().any(|l| l["action"] == action),
            "no {action} in {text}"
        );
    }
    Ok(())
}

/// The restored holder's `n` sockets, from FIRST_FD on, as the dump left them.
fn restored_servers(pid: u32, n: usize) -> Result<Vec<TcpStream>> {
    (0..n)
        .map(|k| {
            let fd = FIRST_FD + k as RawFd;
            let taken = sys::take_fd(pid, fd).with_context(|| format!("fd {fd} of {pid}"))?;
            Ok(TcpStream::from(taken))
        })
        .collect()
}

/// The TCP state of each server socket of `pairs`.
fn server_states(pairs: &[Pair]) -> Result<Vec<TcpState>> {
    pairs.iter().map(|p| state_of(&p.server)).collect()
}

/// Resets that hosts send themselves on `lo` (CRIU's probe, see the module doc), captured on
/// the source and the destination, the hosts CRIU may run in.
struct LoopbackResets<'bed>([Capture<'bed>; 2]);

impl<'bed> LoopbackResets<'bed> {
    fn start(bed: &'bed TestBed) -> Result<Self> {
        let rst = "tcp[tcpflags] & tcp-rst != 0 and src net 127.0.0.0/8 and dst net 127.0.0.0/8";
        let on = |host| Capture::start_on(host, "lo", "criu-probe", rst);
        Ok(Self([on(bed.source())?, on(bed.destination())?]))
    }

    /// What they add to [`resets`]: each counts one OutRsts on its host, and one EstabResets,
    /// which `resets` counts on the destination only.
    fn stop(self) -> Result<u64> {
        let [source, destination] = self.0;
        let (source, destination) = (source.stop()?, destination.stop()?);
        eprintln!("resets on lo: source {source:?}, destination {destination:?}");
        Ok(source.len() as u64 + 2 * destination.len() as u64)
    }
}

/// [`every_state`]'s connections held by a `sleep`, dumped through the hook in `mode` and
/// restored on the destination: all in the hook's report, each in its dumped state and carrying
/// on byte-exact at the destination with the ends of stream where due, no reset, nothing left.
fn every_state_through_criu(mode: Mode, ip: IpAddr, port: u16) -> Result<()> {
    let bed = TestBed::new()?;
    let mut migration = Migration::new(&bed, mode, &format!("states-{port}"))?;
    migration.service = ip;
    let (pairs, client_read) = every_state(&bed, SocketAddr::new(ip, port), ALL)?;
    let dumped_states = server_states(&pairs)?;
    let before = resets(&bed)?;
    let probes = LoopbackResets::start(&bed)?;
    let (fds, clients) = split(pairs);
    let n = fds.len();
    let mut app = holder(&migration, fds)?;
    let pid = app.pid();
    let dumped = migration.dump(pid)?;
    reap(&mut app, &[pid])?;
    let restored = migration.restore()?;
    let _restored = KillOnDrop(pid);
    eprintln!("{mode:?}: dump {dumped:?}, restore {restored:?}");
    let dst = Netns::open(bed.destination().name())?.inode();
    ensure!(
        netns_inode_of(pid)? == dst,
        "not restored in the destination"
    );
    every_connection_reported(&migration, n)?;
    let mut pairs = join(clients, restored_servers(pid, n)?)?;
    let restored_states = server_states(&pairs)?;
    eprintln!("states dumped {dumped_states:?}, restored {restored_states:?}");
    ensure!(
        restored_states == dumped_states,
        "dumped in {dumped_states:?}, restored in {restored_states:?}"
    );
    check_every_state(&mut pairs, client_read)?;
    let (after, probes) = (resets(&bed)?, probes.stop()?);
    ensure!(
        after == before + probes,
        "{} resets, {probes} of them CRIU's probe",
        after - before
    );
    nothing_left(&bed)
}

#[test]
fn every_state_through_criu_same_netns() -> Result<()> {
    every_state_through_criu(Mode::SameNetns, SERVICE_V4.into(), 8313)
}

#[test]
fn every_state_through_criu_external_netns() -> Result<()> {
    every_state_through_criu(Mode::ExternalNetns, SERVICE_V4.into(), 8314)
}

#[test]
fn every_state_through_criu_same_netns_ipv6() -> Result<()> {
    every_state_through_criu(Mode::SameNetns, SERVICE_V6.into(), 8315)
}

#[test]
fn every_state_through_criu_external_netns_ipv6() -> Result<()> {
    every_state_through_criu(Mode::ExternalNetns, SERVICE_V6.into(), 8316)
}

/// A connection waiting in the accept queue of the `sleep`'s listener cannot go through CRIU,
/// which dumps fd tables: CRIU refuses the dump ("in-flight"), the hook's freeze is lifted, and
/// the `sleep` runs on; an accepted connection carries on byte-exact, the waiting one is still
/// there to accept, and no host resets anything but CRIU's probe.
#[test]
fn a_connection_in_the_accept_queue_fails_the_dump_and_nothing_is_lost() -> Result<()> {
    const PORT: u16 = 8317;
    let bed = TestBed::new()?;
    let migration = Migration::new(&bed, Mode::SameNetns, "queued")?;
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let listener = bed
        .source()
        .run(|| std::net::TcpListener::bind(service))??;
    let mut pairs = accept_pairs(&bed, &listener, 1)?;
    let pair = &mut pairs[0];
    pair.queue_both_ways()?;
    let waiting = bed.client().run(|| TcpStream::connect(service))??;
    let before = resets(&bed)?;
    let probes = LoopbackResets::start(&bed)?;
    let fds = vec![
        OwnedFd::from(listener.try_clone()?),
        OwnedFd::from(pair.server.try_clone()?),
    ];
    let app = holder(&migration, fds)?;
    ensure!(
        migration.dump(app.pid()).is_err(),
        "CRIU dumped an in-flight connection"
    );
    let log = fs::read_to_string(migration.dir.images().join("dump.log"))?;
    let said = log
        .lines()
        .find(|l| l.contains("Error") && l.contains("flight"));
    eprintln!("CRIU: {said:?}");
    ensure!(said.is_some(), "no in-flight connection in CRIU's log");
    ensure!(
        support::process_state(app.pid()).is_some_and(|s| s != 'T'),
        "the holder does not run on"
    );
    nothing_left(&bed)?;
    pair.carries_on()?;
    listener.set_nonblocking(true)?;
    let (_, peer) = listener.accept().context("the waiting connection")?;
    ensure!(peer == waiting.local_addr()?, "accepted {peer}");
    let (after, probes) = (resets(&bed)?, probes.stop()?);
    ensure!(
        after == before + probes,
        "{} resets, {probes} of them CRIU's probe",
        after - before
    );
    Ok(())
}
