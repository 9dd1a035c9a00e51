//! What the migration tests share: traffic with queued bytes, running `tcpmig agent` and
//! `tcpmig migrate` (of one process or several) on the bed, reading their stderr line by line,
//! checking that the connections carry on, receiving a hand-over over a Unix socket, and that
//! nothing is left behind.
#![allow(dead_code)] // Each test crate uses its own part.

mod agent;
mod announce;
mod handoff;
mod moved;
pub mod pairs;

#[allow(unused_imports)] // Each test crate uses its own part.
pub use agent::*;
#[allow(unused_imports)] // Each test crate uses its own part.
pub use announce::{announced_by, na_defaults};
#[allow(unused_imports)] // Each test crate uses its own part.
pub use handoff::{accept_within, receive_handoff_on, split_listeners};
#[allow(unused_imports)] // Each test crate uses its own part.
pub use moved::{Moved, move_sockets};

use std::{
    io::Read,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use tcpmig::{
    freeze::{self, Freeze, RemoveOnDrop},
    net::Netns,
    repair,
    tuple::{self, Tuple},
};
use tcpmig_testbed::{
    ChildGuard, Host, IFACE, Peer, PeerArgs, PeerCommand, SERVICE_V4, StreamArgs, TestBed, Traffic,
    line_reader, peer::ScriptReport, tcpmig_bin,
};

pub const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
/// Bytes each way verified before a migration.
pub const BYTES: u64 = 1024;
/// Bytes each way queued unread after that: the image carries them in the socket queues.
pub const MORE: u64 = 700;
pub const AGENT_PORT: u16 = 7070;
/// `--timeout` of both commands: a dead peer is noticed within this.
pub const STEP_TIMEOUT_SECS: &str = "5";
/// Bound on a whole migration command and on the guard after it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The bed's IPv4 service address on `port`.
pub fn service(port: u16) -> SocketAddr {
    SocketAddr::new(SERVICE_V4.into(), port)
}

/// `n` connections to the service on `port`, verified once, then MORE bytes each way left unread.
pub fn queued_traffic(bed: &TestBed, n: usize, port: u16) -> Result<Traffic<'_>> {
    queued_traffic_at(bed, n, service(port))
}

/// [`queued_traffic`] to `service`, of either family.
pub fn queued_traffic_at(bed: &TestBed, n: usize, service: SocketAddr) -> Result<Traffic<'_>> {
    let stream = StreamArgs::new(BYTES);
    queue(
        Traffic::open_at(bed, Path::new(PEER), service, n, stream)?,
        n,
    )
}

/// Like [`queued_traffic`], with `per_server[k]` connections to server process k, all on the
/// service's `port` ([`Traffic::open_shared`]).
pub fn queued_shared_traffic<'bed>(
    bed: &'bed TestBed,
    per_server: &[usize],
    port: u16,
) -> Result<Traffic<'bed>> {
    let stream = StreamArgs::new(BYTES);
    let traffic = Traffic::open_shared(bed, Path::new(PEER), service(port), per_server, stream)?;
    queue(traffic, per_server.iter().sum())
}

/// Verifies the first BYTES of the `n` connections both ways, then writes MORE each way unread.
fn queue(mut traffic: Traffic<'_>, n: usize) -> Result<Traffic<'_>> {
    ensure!(traffic.verify()?.all_verified(n as u64), "before");
    ensure!(traffic.send_all(MORE)?.all_verified(n as u64), "queueing");
    Ok(traffic)
}

/// Where the servers' streams of [`queued_traffic`] stand when they are stopped: what an adopting
/// server goes on from.
pub fn adopted_stream() -> StreamArgs {
    StreamArgs {
        sent_already: BYTES + MORE,
        received_already: BYTES,
        ..StreamArgs::new(BYTES)
    }
}

/// After a rollback (or a migration whose adopting servers joined `traffic`): the `n` connections
/// of [`queued_traffic`] deliver what was queued, then carry MORE both ways, without a reset.
pub fn carries_on(traffic: &mut Traffic<'_>, n: usize) -> Result<()> {
    let n = n as u64;
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(after.all_verified(n), "queued data: {after:?}");
    ensure!(traffic.send_all(MORE)?.all_verified(n), "writing on");
    let more = traffic.verify_until(BYTES + 2 * MORE)?;
    ensure!(more.all_verified(n), "still flowing: {more:?}");
    ensure!(more.client.resets + more.server.resets == 0, "{more:?}");
    Ok(())
}

/// A child's stderr, line by line, read on a thread of its own (which ends with the pipe).
pub struct Lines {
    lines: Receiver<String>,
    /// Everything read so far, for error messages.
    pub seen: String,
}

impl Lines {
    pub fn new(pipe: impl Read + Send + 'static) -> Result<Self> {
        Ok(Self {
            lines: line_reader(pipe, "tcpmig-stderr")?,
            seen: String::new(),
        })
    }

    /// Waits for a line containing `want`.
    pub fn wait_for(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(want);
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if found {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "no line with {want:?} within {timeout:?}; stderr: {}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("stderr closed before a line with {want:?}: {}", self.seen)
                }
            }
        }
    }

    /// Reads until the pipe closes (every process holding it is gone) and returns all of it.
    pub fn until_closed(&mut self, timeout: Duration) -> Result<&str> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(&self.seen),
                Err(RecvTimeoutError::Timeout) => {
                    bail!("stderr still open after {timeout:?}: {}", self.seen)
                }
            }
        }
    }
}

/// A running tcpmig command, its stdin (to continue a test pause) and its stderr.
pub struct Running<'bed> {
    pub child: ChildGuard<'bed>,
    pub stdin: ChildStdin,
    pub stderr: Lines,
}

impl<'bed> Running<'bed> {
    pub fn spawn(host: &'bed Host, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = host.spawn(&mut cmd)?;
        let pipes = child.child_mut();
        let stdin = pipes.stdin.take().context("stdin piped")?;
        let stderr = Lines::new(pipes.stderr.take().context("stderr piped")?)?;
        Ok(Self {
            child,
            stdin,
            stderr,
        })
    }
}

/// `tcpmig migrate --stop-source` of every process in `pids` (`--pid` each, in one migration) on
/// `from` to the agent on `to`, with `--timeout timeout`, pausing at `pause_at` if given.
#[allow(clippy::too_many_arguments)]
pub fn start_migrate<'bed>(
    from: &'bed Host,
    to: &Host,
    pids: &[u32],
    port: u16,
    token: &Path,
    timeout: &str,
    extra: &[&str],
    pause_at: Option<&str>,
) -> Result<Running<'bed>> {
    let mut cmd = migrate_command(from, to, pids, port, &insecure(token), timeout)?;
    cmd.args(extra);
    if let Some(phase) = pause_at {
        cmd.env("TCPMIG_TEST_PAUSE_AT", phase);
    }
    Running::spawn(from, cmd)
}

/// `tcpmig migrate --stop-source` of `pids` on `from` to the agent on `to`, its link secured
/// by `link` (TLS files or [`insecure`]); the caller adds what else it needs.
pub fn migrate_command(
    from: &Host,
    to: &Host,
    pids: &[u32],
    port: u16,
    link: &[String],
    timeout: &str,
) -> Result<Command> {
    migrate_command_for(from, to, pids, service(port), link, timeout)
}

/// [`migrate_command`] of the connections on `service`, of either family.
pub fn migrate_command_for(
    from: &Host,
    to: &Host,
    pids: &[u32],
    service: SocketAddr,
    link: &[String],
    timeout: &str,
) -> Result<Command> {
    migrate_command_of(from, to, pids, &[service], link, timeout)
}

/// [`migrate_command`] of the connections on every one of `services` (`--service` each: a
/// dual-stack service), in one migration.
pub fn migrate_command_of(
    from: &Host,
    to: &Host,
    pids: &[u32],
    services: &[SocketAddr],
    link: &[String],
    timeout: &str,
) -> Result<Command> {
    let mut cmd = from.command(tcpmig_bin())?;
    cmd.arg("migrate");
    for pid in pids {
        cmd.args(["--pid", &pid.to_string()]);
    }
    for service in services {
        cmd.args(["--service", &service.to_string()]);
    }
    cmd.args([
        "--dev",
        IFACE,
        "--timeout",
        timeout,
        "--stop-source",
        "--to",
    ])
    .arg(SocketAddr::new(to.v4().into(), AGENT_PORT).to_string())
    .args(link);
    Ok(cmd)
}

/// The arguments of `tcpmig migrate` that move process `pid`'s connections on `service` to the
/// agent at `listen` over the bed's interface, for tests that add the link's options themselves.
pub fn migrate_args<'a>(pid: &'a str, service: &'a str, listen: &'a str) -> [&'a str; 9] {
    [
        "migrate",
        "--pid",
        pid,
        "--service",
        service,
        "--dev",
        IFACE,
        "--to",
        listen,
    ]
}

/// [`start_migrate`] with the usual step timeout and no pause.
pub fn start_unpaused_migrate<'bed>(
    from: &'bed Host,
    to: &Host,
    pids: &[u32],
    port: u16,
    token: &Path,
    extra: &[&str],
) -> Result<Running<'bed>> {
    start_migrate(from, to, pids, port, token, STEP_TIMEOUT_SECS, extra, None)
}

/// [`start_unpaused_migrate`] of process `pid` from the bed's source to its destination, with
/// no extra argument.
pub fn start_plain_migrate<'bed>(
    bed: &'bed TestBed,
    pid: u32,
    port: u16,
    token: &Path,
) -> Result<Running<'bed>> {
    start_unpaused_migrate(bed.source(), bed.destination(), &[pid], port, token, &[])
}

/// A migration of `server_pid` (port `port`) to `agent`, waiting on the destination, that must
/// succeed; the agent, now the adopting server, joins `traffic`. Returns migrate's pid (its freeze
/// is named after it).
pub fn migrate_to<'bed>(
    bed: &'bed TestBed,
    traffic: &mut Traffic<'bed>,
    agent: Peer<'bed>,
    server_pid: u32,
    port: u16,
    token: &Path,
) -> Result<u32> {
    let (migrate_pid, _) =
        migrate_service_to(bed, traffic, agent, server_pid, service(port), token, &[])?;
    Ok(migrate_pid)
}

/// [`migrate_to`] of the connections on `service`, of either family, with `extra` arguments;
/// returns migrate's pid and its stdout (its report, with `--json`).
pub fn migrate_service_to<'bed>(
    bed: &'bed TestBed,
    traffic: &mut Traffic<'bed>,
    agent: Peer<'bed>,
    server_pid: u32,
    service: SocketAddr,
    token: &Path,
    extra: &[&str],
) -> Result<(u32, String)> {
    let pids = [server_pid];
    migrate_services_to(bed, traffic, agent, &pids, &[service], token, extra)
}

/// [`migrate_service_to`] of the connections of `pids` on every one of `services`, in one
/// migration.
pub fn migrate_services_to<'bed>(
    bed: &'bed TestBed,
    traffic: &mut Traffic<'bed>,
    mut agent: Peer<'bed>,
    pids: &[u32],
    services: &[SocketAddr],
    token: &Path,
    extra: &[&str],
) -> Result<(u32, String)> {
    let (source, destination) = (bed.source(), bed.destination());
    let link = insecure(token);
    let mut cmd = migrate_command_of(
        source,
        destination,
        pids,
        services,
        &link,
        STEP_TIMEOUT_SECS,
    )?;
    cmd.args(extra);
    let mut migrate = Running::spawn(source, cmd)?;
    let migrate_pid = migrate.child.pid();
    agent.expect_line("ready")?;
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    traffic.servers = vec![agent];
    Ok((migrate_pid, stdout))
}

impl Running<'_> {
    /// Waits (bounded) for the command to exit; returns its status, its stdout and everything
    /// said on its stderr (by it and its guard, for `migrate`).
    pub fn finish(&mut self) -> Result<(std::process::ExitStatus, String, String)> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "tcpmig did not end in {COMMAND_TIMEOUT:?}: {}",
                self.stderr.seen
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stdout = String::new();
        if let Some(pipe) = self.child.child_mut().stdout.as_mut() {
            pipe.read_to_string(&mut stdout)?;
        }
        let stderr = self.stderr.until_closed(COMMAND_TIMEOUT)?.to_owned();
        Ok((status, stdout, stderr))
    }

    /// [`Running::finish`] of a command that must fail, saying `want` on its stderr; returns that
    /// stderr.
    pub fn fails_saying(&mut self, want: &str) -> Result<String> {
        let (status, _, stderr) = self.finish()?;
        ensure!(!status.success(), "it must fail ({status}): {stderr}");
        ensure!(stderr.contains(want), "no {want:?} in its stderr: {stderr}");
        Ok(stderr)
    }

    /// Kills it (-9) and waits until whatever it started that holds its stderr (the guard of
    /// `migrate`) is done too; returns all of that stderr.
    pub fn kill(&mut self) -> Result<String> {
        self.child.child_mut().kill()?;
        self.child.child_mut().wait()?;
        Ok(self.stderr.until_closed(COMMAND_TIMEOUT)?.to_owned())
    }

    /// Lets it go on from a test pause.
    pub fn resume(&mut self) -> Result<()> {
        std::io::Write::write_all(&mut self.stdin, b"\n")?;
        Ok(())
    }
}

/// The state letter of /proc/PID/stat; `None` once it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits (bounded) until `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn wait_exited(pid: u32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !matches!(process_state(pid), None | Some('Z' | 'X')) {
        ensure!(
            Instant::now() < deadline,
            "pid {pid} still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A new client reaches `service` at `host` (where it moved), beside the connections there, and a
/// new server there exchanges BYTES each way with it, checked.
pub fn new_connection_reaches(bed: &TestBed, host: &Host, service: SocketAddr) -> Result<()> {
    let stream = StreamArgs::new(BYTES);
    let peer = Path::new(PEER);
    let mut server = Peer::start(host, peer, &PeerArgs::server(service, 1, stream))?;
    server.expect_line("listening")?;
    let mut client = Peer::start(bed.client(), peer, &PeerArgs::client(service, 1, stream))?;
    client.expect_line("ready")?;
    server.expect_line("ready")?;
    for peer in [&mut client, &mut server] {
        let report = peer.command(PeerCommand::Verify { until: None })?;
        ensure!(
            report.connections == 1 && report.all_verified(),
            "a new connection to {service} in {host}, {}: {report:?}",
            peer.label()
        );
    }
    Ok(())
}

/// No freeze named in `freezes`, no tcpmig program on either host's interface, and the service
/// address on `holder` only.
pub fn nothing_left(bed: &TestBed, freezes: &[String], holder: &Host) -> Result<()> {
    nothing_left_of(bed, freezes, holder, &[SERVICE_V4.into()])
}

/// [`nothing_left`] with each of `services` (the bed's, of either family) on `holder` only.
pub fn nothing_left_of(
    bed: &TestBed,
    freezes: &[String],
    holder: &Host,
    services: &[IpAddr],
) -> Result<()> {
    let names = freeze::Freeze::list()?;
    ensure!(
        !names.iter().any(|n| freezes.contains(n)),
        "freezes left: {names:?}"
    );
    for host in [bed.source(), bed.destination()] {
        let netns = Netns::open(host.name())?;
        let attached = freeze::attached_programs(&netns, IFACE)?;
        ensure!(attached.is_empty(), "programs left on {host}: {attached:?}");
        let has = host.name() == holder.name();
        for &ip in services {
            ensure!(host.holds(ip)? == has, "{ip} on {host}: expected {has}");
        }
    }
    Ok(())
}

/// Runs `tcpmig ARGS` in `host` to the end (bounded) with `setup` applied to the command;
/// returns its status and stderr.
pub fn run_tcpmig(
    host: &Host,
    args: &[&str],
    setup: impl FnOnce(&mut Command),
) -> Result<(std::process::ExitStatus, String)> {
    let mut cmd = host.command(tcpmig_bin())?;
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    setup(&mut cmd);
    let mut child = host.spawn(&mut cmd)?;
    let mut stderr = Lines::new(child.child_mut().stderr.take().context("stderr piped")?)?;
    let text = stderr.until_closed(COMMAND_TIMEOUT)?.to_owned();
    let status = child
        .wait_timeout(COMMAND_TIMEOUT)?
        .with_context(|| format!("tcpmig {args:?} did not end"))?;
    Ok((status, text))
}

/// A temporary directory for images and sockets, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(bed: &TestBed) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{}-sp", bed.prefix()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The client host loses every segment of its `n` connections to `service`, both ways (a
/// 4-tuple freeze in its namespace, for `ttl`), until the guard drops.
pub fn client_loses_everything(
    bed: &TestBed,
    service: SocketAddr,
    n: usize,
    ttl: Duration,
) -> Result<RemoveOnDrop> {
    let client_ns = Netns::open(bed.client().name())?;
    let tuples: Vec<Tuple> = repair::list_tcp_sockets(&client_ns)?
        .into_iter()
        .filter(|s| s.tuple.remote == tuple::canonical(service))
        .map(|s| s.tuple)
        .collect();
    ensure!(tuples.len() == n, "{} client sockets found", tuples.len());
    let mut loss = RemoveOnDrop::new(Freeze::attach(
        &client_ns,
        IFACE,
        &format!("{}-loss", bed.prefix()),
    )?);
    loss.freeze_tuples(&tuples, ttl)?;
    Ok(loss)
}

/// An adopting `tcpmig-peer` server of the restored sockets `fds` on the bed's destination
/// (socket activation), going on from `taken_over`; returns once it said `ready`.
pub fn adopt_on_destination(
    bed: &TestBed,
    fds: Vec<OwnedFd>,
    taken_over: StreamArgs,
) -> Result<Peer<'_>> {
    let mut cmd = bed.destination().command_with_listen_fds(PEER, fds)?;
    cmd.args(PeerArgs::adopting_server(taken_over).to_args());
    let mut server = Peer::spawn(
        bed.destination(),
        cmd,
        "server of the restored sockets",
        taken_over.timeout() + Duration::from_secs(10),
    )?;
    server.expect_line("ready")?;
    Ok(server)
}
