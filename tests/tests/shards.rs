//! One migration of several server processes that share the service port with SO_REUSEPORT
//! (`tcpmig migrate --pid A --pid B ...`), and an agent that hands the connections to several
//! processes when they do not fit in one (`--max-per-process`; `TCPMIG_SHARD`, `TCPMIG_SHARDS`).
//!
//! Every byte is checked both ways: the old servers read the first BYTES and leave MORE unread
//! each way, the agent's children (scripted `tcpmig-peer` servers, since they share its stdout)
//! read the queued MORE and MORE more that the clients write after the migration, and write MORE
//! more that the clients read after the queued MORE. A refused migration must leave every
//! process's connections at the source, byte-exact.
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test shards -- --test-threads=1`.
mod support;

use std::collections::BTreeSet;
use std::os::{fd::AsRawFd as _, unix::net::UnixListener};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use support::{
    BYTES, COMMAND_TIMEOUT, MORE, Scratch, adopted_stream, carries_on, new_connection_reaches,
    nothing_left, process_state, queued_shared_traffic, receive_handoff_on, script_reports,
    service, start_handoff_agent, start_plain_agent, start_scripted_agent, start_unpaused_migrate,
    wait_exited,
};
use tcpmig_testbed::TokenFile;
use tcpmig_testbed::{Peer, PeerCommand, Report, TestBed, command_all, sys};

const PORT: u16 = 8500;

/// The servers on one port get exactly their counts, keep their listeners, and every byte flows.
#[test]
fn servers_sharing_a_port_get_exact_counts() -> Result<()> {
    const PER_SERVER: [usize; 3] = [30, 50, 20];
    let bed = TestBed::new()?;
    let mut traffic = queued_shared_traffic(&bed, &PER_SERVER, PORT)?;
    for (server, &count) in traffic.servers.iter_mut().zip(&PER_SERVER) {
        let report = server.command(PeerCommand::Verify {
            until: Some(BYTES + MORE),
        })?;
        ensure!(
            report.connections == count as u64 && report.all_verified(),
            "{}: {report:?}",
            server.label()
        );
    }
    let listeners = bed.source().run(|| listeners_on(PORT))??;
    ensure!(
        listeners == PER_SERVER.len(),
        "{listeners} listeners on port {PORT}"
    );
    let clients = command_all(
        &mut traffic.clients,
        PeerCommand::Verify {
            until: Some(BYTES + MORE),
        },
    )?;
    ensure!(
        clients.connections == PER_SERVER.iter().sum::<usize>() as u64 && clients.all_verified(),
        "{clients:?}"
    );
    Ok(())
}

/// Listening TCP sockets on `port` in the calling thread's network namespace.
fn listeners_on(port: u16) -> Result<usize> {
    const LISTEN: &str = "0A";
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
    let local = format!(":{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.get(3) == Some(&LISTEN))
        .filter(|fields| fields.get(1).is_some_and(|l| l.ends_with(&local)))
        .count())
}

#[test]
fn several_processes_move_in_one_migration() -> Result<()> {
    // 750 connections in groups of at most 250: 3 processes.
    migrate_shared(&[300, 200, 250], Some(250), 3, false)
}

/// `--precopy` of idle connections (their bytes queued both ways before the stop): every one
/// is restored ahead, in the two groups, and keeps its socket there.
#[test]
fn a_precopy_keeps_every_idle_connection() -> Result<()> {
    migrate_shared(&[300, 200], Some(250), 2, true)
}

/// `--handoff` of several groups: one connection to the receiver per group, with that group's
/// fds, and every connection live (the clients get the bytes the servers had queued).
#[test]
fn a_handoff_in_several_groups_sends_each_on_its_own_connection() -> Result<()> {
    const PER_SERVER: [usize; 2] = [150, 150];
    const MAX: usize = 100;
    let bed = TestBed::new()?;
    let mut traffic = queued_shared_traffic(&bed, &PER_SERVER, PORT)?;
    let token = TokenFile::new(&bed, "handoff", "handoff token")?;
    let scratch = Scratch::new(&bed)?;
    let socket = scratch.path("handoff.sock");
    let listener = UnixListener::bind(&socket)?;
    listener.set_nonblocking(true)?;
    let (source, destination) = (bed.source(), bed.destination());
    let max = MAX.to_string();
    let mut agent =
        start_handoff_agent(destination, &token.0, &["--max-per-process", &max], &socket)?;
    let servers = traffic.server_pids();
    let mut migrate =
        start_unpaused_migrate(source, destination, &servers, PORT, &token.0, &["--json"])?;
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    let groups = PER_SERVER.iter().sum::<usize>() / MAX;
    ensure!(
        report["destination"]["shards"].as_u64() == Some(groups as u64),
        "{report}"
    );
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut held = Vec::new();
    let mut listeners = 0;
    for group in 0..groups {
        let (text, fds) = receive_handoff_on(&listener, deadline, || Ok(()))
            .with_context(|| format!("group {group}"))?;
        let names = text
            .lines()
            .filter(|l| !l.starts_with("tcpmig-fds "))
            .count();
        // The agent's listener for new connections goes with the first group.
        let expected = MAX + usize::from(group == 0);
        ensure!(
            fds.len() == expected && names == expected,
            "group {group}: {} fds, {names} names",
            fds.len()
        );
        let (connections, handed_listeners) = support::split_listeners(fds)?;
        listeners += handed_listeners.len();
        held.extend(connections);
    }
    ensure!(
        listeners == 1,
        "{listeners} listeners handed over, 1 expected"
    );
    let (status, _, stderr) = agent.finish()?;
    ensure!(status.success(), "the agent failed: {stderr}");
    // Live: every received socket gets what its client sends now, after the MORE the image
    // carried in its receive queue.
    let sent = command_all(&mut traffic.clients, PeerCommand::Send { bytes: MORE })?;
    ensure!(
        sent.connections == held.len() as u64 && sent.resets == 0,
        "{sent:?}"
    );
    for fd in &held {
        let mut queued = 0;
        while queued != 2 * MORE {
            ensure!(
                Instant::now() < deadline,
                "fd {}: {queued} bytes queued, {} expected",
                fd.as_raw_fd(),
                2 * MORE
            );
            std::thread::sleep(Duration::from_millis(2));
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD into an int, on a socket we hold.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            queued = n as u64;
        }
    }
    Ok(())
}

/// 24,000 connections: more than one process holds (its fd table stops at 20,000).
#[test]
fn more_connections_than_one_process_can_hold() -> Result<()> {
    migrate_shared(&[12_000, 12_000], None, 2, false)
}

/// What the agent's children do once they hold the connections: write MORE, then read what was
/// queued and the MORE the clients write after the migration.
fn adopter_script() -> Vec<PeerCommand> {
    vec![
        PeerCommand::Send { bytes: MORE },
        PeerCommand::Verify {
            until: Some(BYTES + 2 * MORE),
        },
    ]
}

/// Migrates servers with `per_server` connections on one port, in one `tcpmig migrate` (with
/// `--precopy` if `precopy`), to an agent with `--max-per-process max_per_process` (its default
/// if `None`) that must hand them to `shards` processes; checks every byte, a new connection,
/// and that nothing is left behind.
fn migrate_shared(
    per_server: &[usize],
    max_per_process: Option<usize>,
    shards: usize,
    precopy: bool,
) -> Result<()> {
    let total = per_server.iter().sum::<usize>();
    let started = Instant::now();
    let bed = TestBed::new()?;
    let mut traffic = queued_shared_traffic(&bed, per_server, PORT)?;
    let opened = started.elapsed();
    let token = TokenFile::new(&bed, "shards", "shards token")?;
    let (source, destination) = (bed.source(), bed.destination());
    let max = max_per_process.map(|max| max.to_string());
    let extra: Vec<&str> = max
        .iter()
        .flat_map(|max| ["--max-per-process", max])
        .collect();
    let mut agent = start_scripted_agent(
        destination,
        &token.0,
        adopted_stream(),
        adopter_script(),
        &extra,
    )?;
    let agent_pid = agent.child.pid();
    let servers = traffic.server_pids();
    let options: &[&str] = if precopy {
        // Only connections quiet for that long are pre-copied.
        std::thread::sleep(tcpmig::migrate::PRECOPY_QUIET + Duration::from_millis(200));
        &["--json", "--precopy"]
    } else {
        &["--json"]
    };
    let mut migrate =
        start_unpaused_migrate(source, destination, &servers, PORT, &token.0, options)?;
    let migrate_pid = migrate.child.pid();
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("tcpmig migrate --json printed {stdout:?}"))?;
    let precopied = if precopy { total } else { 0 };
    for (field, want) in [
        (&report["connections"], total),
        (&report["kept"], total),
        (&report["destination"]["shards"], shards),
        (&report["destination"]["precopied"], precopied),
        (&report["destination"]["kept_precopied"], precopied),
    ] {
        ensure!(field.as_u64() == Some(want as u64), "{report}");
    }
    for &pid in &servers {
        wait_exited(pid, COMMAND_TIMEOUT).context("--stop-source must end every server")?;
    }

    let n = total as u64;
    if let Err(error) = clients_go_on(&mut traffic.clients, n) {
        // Most likely the agent or its children failed: say what they said.
        return Err(error.context(format!("the agent's stderr: {}", agent.kill()?)));
    }
    let (status, stdout, stderr) = agent.finish()?;
    ensure!(status.success(), "the agent or a child failed: {stderr}");
    check_adopters(&stdout, shards, max_per_process, n)?;
    new_connection_reaches(&bed, destination, service(PORT))?;
    nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
        destination,
    )?;
    eprintln!(
        "{total} connections of {} servers in {shards} shards: traffic open in {opened:.1?}, \
         all done in {:.1?}; blackout {} ms; phases {}",
        per_server.len(),
        started.elapsed(),
        report["blackout_ms"],
        report["phases"],
    );
    Ok(())
}

/// The agent's children's reports (its `stdout`): one adopter per shard, each in a process of
/// its own that is gone now, none over `max_per_process`, and together every byte of the `n`
/// connections, without a reset.
fn check_adopters(
    stdout: &str,
    shards: usize,
    max_per_process: Option<usize>,
    n: u64,
) -> Result<()> {
    let adopters = script_reports(stdout)?;
    let shard_set: BTreeSet<Option<usize>> = adopters.iter().map(|a| a.shard).collect();
    ensure!(
        adopters.len() == shards
            && shard_set == (0..shards).map(Some).collect()
            && adopters.iter().all(|a| a.shards == Some(shards)),
        "one adopter per shard expected: {adopters:?}"
    );
    let pids: BTreeSet<u32> = adopters.iter().map(|a| a.pid).collect();
    ensure!(
        pids.len() == shards,
        "adopters share processes: {adopters:?}"
    );
    ensure!(
        pids.iter().all(|&pid| !sys::pid_alive(pid)),
        "adopters outlived the agent: {pids:?}"
    );
    if let Some(max) = max_per_process {
        ensure!(
            adopters.iter().all(|a| a.report.connections <= max as u64),
            "a shard over --max-per-process {max}: {adopters:?}"
        );
    }
    let adopted: Report = adopters.into_iter().map(|a| a.report).sum();
    ensure!(
        adopted.all_verified()
            && adopted.connections == n
            && adopted.resets == 0
            && adopted.bytes_in == n * 2 * MORE
            && adopted.bytes_out == n * MORE,
        "the adopters: {adopted:?}"
    );
    Ok(())
}

/// The clients write MORE more, then read the MORE that was queued and the MORE the adopters
/// wrote: all `n` connections, without a reset.
fn clients_go_on(clients: &mut [Peer<'_>], n: u64) -> Result<()> {
    let sent = command_all(clients, PeerCommand::Send { bytes: MORE })?;
    ensure!(
        sent.all_verified() && sent.connections == n,
        "the clients writing after the migration: {sent:?}"
    );
    let read = command_all(
        clients,
        PeerCommand::Verify {
            until: Some(BYTES + 2 * MORE),
        },
    )?;
    ensure!(
        read.all_verified() && read.connections == n && read.resets == 0,
        "the clients reading after the migration: {read:?}"
    );
    Ok(())
}

/// The agent refuses the image part way (about 1.5 KB a connection against 64 KiB), after every
/// server was stopped, frozen and dumped: every process's connections must carry on.
#[test]
fn a_refused_multi_process_migration_rolls_every_process_back() -> Result<()> {
    const PER_SERVER: [usize; 3] = [200, 150, 100];
    let total = PER_SERVER.iter().sum();
    let bed = TestBed::new()?;
    let mut traffic = queued_shared_traffic(&bed, &PER_SERVER, PORT)?;
    let token = TokenFile::new(&bed, "refused", "refused token")?;
    let (source, destination) = (bed.source(), bed.destination());
    let mut agent =
        start_plain_agent(destination, &token.0, &["--max-image-bytes", "65536"], None)?;
    let agent_pid = agent.child.pid();
    let servers = traffic.server_pids();
    let mut migrate = start_unpaused_migrate(source, destination, &servers, PORT, &token.0, &[])?;
    let migrate_pid = migrate.child.pid();
    migrate
        .fails_saying("rolled back: the connections carry on at the source")
        .context("the migration")?;
    agent
        .fails_saying("larger than this agent accepts")
        .context("the agent must refuse the image")?;
    for &pid in &servers {
        ensure!(
            !matches!(process_state(pid), Some('T') | None),
            "server {pid} must run again"
        );
    }
    carries_on(&mut traffic, total)?;
    nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
        source,
    )
}
