//! kill -9 of either side of a migration at each of its phases, on the test bed, with 500
//! connections carrying unread data both ways (an image of about 750 KB: three pieces).
//!
//! The source (`tcpmig migrate`) is killed where its test hook pauses it
//! (`TCPMIG_TEST_PAUSE_AT`), and mid-dump by watching its sockets enter repair mode. Before the
//! commit its guard must roll the source back: every connection carries on there, byte-exact,
//! with no reset. After the commit the guard finishes it: every connection carries on at the
//! destination. The agent is killed where its own hook pauses it: the source must notice and
//! roll back, and a second migration must then succeed (and clean up what the dead agent left).
//! An agent that comes back after the source gave up must not go live. Nothing may be left:
//! freezes, programs, a second copy of the address.
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test faults -- --test-threads=1`.
mod support;

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use support::{
    BYTES, COMMAND_TIMEOUT, MORE, STEP_TIMEOUT_SECS, adopted_stream, carries_on, migrate_to,
    migrate_to_paused_agent, nothing_left, process_state, queued_traffic, start_agent,
    start_migrate, wait_exited,
};
use tcpmig_testbed::TokenFile;
use tcpmig_testbed::{StreamArgs, TestBed, sys::take_fd};

const N: usize = 500;
const PORT: u16 = 8100;

/// Kills `tcpmig migrate` at `phase` (or, with `mid_dump`, in the dump that follows) and checks
/// where the connections carry on.
fn kill_source_at(phase: &str, mid_dump: bool) -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "faults", "fault token")?;
    let server_pid = traffic.server_pids()[0];
    let agent = start_agent(bed.destination(), &token.0, adopted_stream(), &[])?;
    let agent_pid = agent.pid();
    let (source, destination) = (bed.source(), bed.destination());
    let mut migrate = start_migrate(
        source,
        destination,
        &[server_pid],
        PORT,
        &token.0,
        STEP_TIMEOUT_SECS,
        &[],
        Some(phase),
    )?;
    let migrate_pid = migrate.child.pid();
    let pause = format!("test pause at {phase}");
    migrate.stderr.wait_for(&pause, COMMAND_TIMEOUT)?;
    let mut agent = Some(agent);
    let committed = matches!(phase, "committed" | "finishing");
    let stderr = if mid_dump {
        kill_mid_dump(&mut migrate, server_pid)?
    } else {
        migrate.kill()?
    };
    if committed {
        ensure!(stderr.contains("commit finished"), "{stderr}");
        let mut adopter = agent.take().context("the agent")?;
        adopter.expect_line("ready")?;
        wait_exited(server_pid, COMMAND_TIMEOUT).context("the old server must be ended")?;
        traffic.servers = vec![adopter];
    } else {
        ensure!(
            stderr.contains("died before the commit: rolled back"),
            "{stderr}"
        );
        ensure!(
            !matches!(process_state(server_pid), Some('T') | None),
            "the server must run again"
        );
        // It noticed, dropped what it restored (silently) and removed its freeze.
        wait_exited(agent_pid, COMMAND_TIMEOUT)?;
    }
    carries_on(&mut traffic, N)?;
    drop(agent);
    let holder = if committed { destination } else { source };
    nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
        holder,
    )
}

/// From the pause after the freeze: lets the dump start and kills `migrate` once a quarter of
/// the sockets are in repair mode (the middle of the first dump thread's batch). Returns the
/// stderr of `migrate` and its guard.
fn kill_mid_dump(migrate: &mut support::Running<'_>, server_pid: u32) -> Result<String> {
    let sockets = connections_of(server_pid)?;
    ensure!(sockets.len() == N, "{} connections found", sockets.len());
    let watched = &sockets[N / 4];
    migrate.resume()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !in_repair(watched) {
        ensure!(Instant::now() < deadline, "the dump did not start");
        std::hint::spin_loop();
    }
    let pid = libc::pid_t::try_from(migrate.child.pid())?;
    // SAFETY: our own child, not reaped yet: the pid is still its own.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Counted right after the kill, before the guard's rollback (which may have begun).
    let caught = sockets.iter().filter(|fd| in_repair(fd)).count();
    eprintln!("killed mid-dump: {caught} of {N} sockets in repair mode");
    ensure!(caught > 0, "the watched socket was in repair mode");
    migrate.kill()
}

/// Our own fds of `pid`'s connections (not its listener), in fd order, as the dump takes them.
fn connections_of(pid: u32) -> Result<Vec<OwnedFd>> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    let mut sockets = Vec::new();
    for fd in fds {
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
            continue;
        };
        if !link.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let taken = take_fd(pid, fd)?;
        let raw = taken.as_raw_fd();
        // SAFETY: a zeroed sockaddr_storage is a valid buffer of the length passed.
        let connected = unsafe {
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of_val(&addr) as libc::socklen_t;
            libc::getpeername(raw, (&raw mut addr).cast(), &mut len) == 0
        };
        if connected {
            sockets.push(taken);
        }
    }
    Ok(sockets)
}

fn in_repair(fd: &OwnedFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(TCP_REPAIR) into a valid int.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_REPAIR,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    ret == 0 && value == 1
}

#[test]
fn source_killed_after_the_discovery_with_the_application_running() -> Result<()> {
    // The guard knows the sockets but not the stop: nothing to resume, nothing in repair mode.
    kill_source_at("discovered", false)
}

#[test]
fn source_killed_with_the_application_stopped() -> Result<()> {
    kill_source_at("stopped", false)
}

#[test]
fn source_killed_after_the_freeze() -> Result<()> {
    kill_source_at("frozen", false)
}

#[test]
fn source_killed_mid_dump() -> Result<()> {
    // Paused after the freeze, then killed by watching the sockets (see kill_mid_dump).
    kill_source_at("frozen", true)
}

#[test]
fn source_killed_after_the_dump() -> Result<()> {
    kill_source_at("dumped", false)
}

#[test]
fn source_killed_mid_transfer() -> Result<()> {
    kill_source_at("mid-transfer", false)
}

#[test]
fn source_killed_after_the_restore() -> Result<()> {
    kill_source_at("restored", false)
}

#[test]
fn source_killed_before_the_commit_with_the_address_deleted() -> Result<()> {
    kill_source_at("address-deleted", false)
}

#[test]
fn source_killed_right_after_sending_commit() -> Result<()> {
    kill_source_at("committed", false)
}

#[test]
fn source_killed_after_the_agent_confirmed() -> Result<()> {
    kill_source_at("finishing", false)
}

/// Kills the agent at `phase`: the source must roll back by itself; then a second migration
/// must succeed and leave nothing behind, the dead agent's freeze included.
fn kill_agent_at(phase: &str) -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "faults", "fault token")?;
    let destination = bed.destination();
    let server_pid = traffic.server_pids()[0];
    let (mut dead_agent, mut migrate) =
        migrate_to_paused_agent(&bed, server_pid, PORT, &token.0, phase, STEP_TIMEOUT_SECS)?;
    let dead_pid = dead_agent.child.pid();
    let first_pid = migrate.child.pid();
    dead_agent.kill()?;
    migrate
        .fails_saying("rolled back: the connections carry on at the source")
        .context("the migration")?;
    carries_on(&mut traffic, N)?;

    // carries_on left both sides at BYTES + 2 MORE written and read; MORE more stay unread.
    ensure!(traffic.send_all(MORE)?.all_verified(N as u64), "queueing");
    let stream = StreamArgs {
        sent_already: BYTES + 3 * MORE,
        received_already: BYTES + 2 * MORE,
        ..StreamArgs::new(BYTES)
    };
    let agent = start_agent(destination, &token.0, stream, &[])?;
    let agent_pid = agent.pid();
    let second_pid = migrate_to(&bed, &mut traffic, agent, server_pid, PORT, &token.0)
        .context("the second migration")?;
    let after = traffic.verify_until(BYTES + 3 * MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "after the second migration: {after:?}"
    );
    ensure!(after.client.resets + after.server.resets == 0, "{after:?}");
    nothing_left(
        &bed,
        &[
            format!("migrate-{first_pid}"),
            format!("agent-{dead_pid}"),
            format!("migrate-{second_pid}"),
            format!("agent-{agent_pid}"),
        ],
        destination,
    )
}

#[test]
fn agent_killed_before_the_image() -> Result<()> {
    kill_agent_at("agent-prepared")
}

#[test]
fn agent_killed_after_the_restore() -> Result<()> {
    kill_agent_at("agent-restored")
}

#[test]
fn agent_killed_on_commit_before_going_live() -> Result<()> {
    // The source has deleted its address and sent Commit: without GoingLive it must roll back,
    // since the agent's repair-mode sockets went silently with it.
    kill_agent_at("agent-commit")
}

/// An agent that stalls after the restore past the source's wait, then reads Commit: the source
/// has rolled back, so the agent must refuse to go live (else both sides would hold the
/// connections and the address).
#[test]
fn an_agent_that_reads_commit_too_late_does_not_go_live() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "faults", "fault token")?;
    let source = bed.source();
    let server_pid = traffic.server_pids()[0];
    let (mut agent, mut migrate) =
        migrate_to_paused_agent(&bed, server_pid, PORT, &token.0, "agent-restored", "2")?;
    let agent_pid = agent.child.pid();
    let migrate_pid = migrate.child.pid();
    let stderr = migrate
        .fails_saying("waiting for the agent to go live")
        .context("the migration")?;
    ensure!(stderr.contains("rolled back"), "{stderr}");
    agent.resume()?;
    agent
        .fails_saying("Commit arrived")
        .context("the agent must refuse")?;
    carries_on(&mut traffic, N)?;
    nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
        source,
    )
}
