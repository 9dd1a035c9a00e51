//! The steps the socket-plane tests share: running `tcpmig` and reading its reports, loading
//! connections with unacknowledged and unsent bytes, counting resets, and the library-side
//! restores (on a pool, through a Unix socket).

use super::*;

pub(super) fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

pub(super) fn tcpmig_ok(args: &[OsString]) -> Result<String> {
    let out = tcpmig(args)?;
    ensure!(
        out.status.success(),
        "tcpmig {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A failing tcpmig run: non-zero exit and one line on stderr that contains `named`.
pub(super) fn tcpmig_fails(args: &[OsString], named: &str) -> Result<String> {
    let out = tcpmig(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "tcpmig {args:?} should fail");
    ensure!(stderr.lines().count() == 1, "one line expected: {stderr:?}");
    ensure!(
        stderr.to_lowercase().contains(&named.to_lowercase()),
        "{stderr:?} should say {named:?}"
    );
    eprint!("refused as expected: {stderr}");
    Ok(stderr)
}

/// `tcpmig freeze` of `service` in `host`; the guard removes the freeze however the test ends.
pub(super) fn freeze(host: &Host, service: SocketAddr, name: &str) -> Result<RemoveOnDrop> {
    tcpmig_ok(&os(&[
        "freeze",
        "--netns",
        host.name(),
        "--dev",
        IFACE,
        "--service",
        &service.to_string(),
        "--name",
        name,
        "--deadline",
        FREEZE_DEADLINE,
    ]))?;
    Ok(RemoveOnDrop::new(Freeze::open(name)?))
}

pub(super) fn unfreeze(host: &Host, name: &str) -> Result<()> {
    tcpmig_ok(&os(&["unfreeze", "--netns", host.name(), "--name", name])).map(drop)
}

/// Established TCP connections of `host` whose local port is `port`, from `ss`.
pub(super) fn established_on(host: &Host, port: u16) -> Result<Vec<String>> {
    let mut cmd = host.command("ss")?;
    cmd.args([
        "-Htni",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{port}"),
    ]);
    let out = cmd.output()?;
    ensure!(out.status.success(), "ss failed in {host}");
    // With -i every connection is its address line and an indented details line.
    let text = String::from_utf8(out.stdout)?;
    let mut connections = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = connections.last_mut() {
                *last = format!("{last} {}", line.trim());
            }
        } else {
            connections.push(line.to_owned());
        }
    }
    Ok(connections)
}

/// The number after `key:` in an `ss -i` line (0 when absent).
pub(super) fn ss_field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix(':')?.parse().ok())
        .unwrap_or(0)
}

/// Established connections of `host` that went straight to CLOSED so far (Tcp EstabResets: an
/// RST received or sent), from its snmp counters.
pub(super) fn resets(host: &Host) -> Result<u64> {
    host.tcp_counter("EstabResets")
}

pub(super) fn sysctls(bed: &TestBed, settings: &[(&str, &str)]) -> Result<()> {
    for host in [bed.client(), bed.source(), bed.destination()] {
        for (key, value) in settings {
            host.set_sysctl(key, value)?;
        }
    }
    Ok(())
}

/// Both streams of every connection checked up to their ends, and no failure.
pub(super) fn verify(
    traffic: &mut Traffic<'_>,
    to_client: u64,
    to_server: u64,
    n: u64,
) -> Result<()> {
    let clients = command_all(
        &mut traffic.clients,
        PeerCommand::Verify {
            until: Some(to_client),
        },
    )?;
    let servers = command_all(
        &mut traffic.servers,
        PeerCommand::Verify {
            until: Some(to_server),
        },
    )?;
    for (side, report) in [("clients", &clients), ("servers", &servers)] {
        ensure!(
            report.connections == n && report.all_verified() && report.resets == 0,
            "{side}: {report:?}"
        );
    }
    Ok(())
}

/// Connections with both data the peer has not acknowledged and data never sent, among those
/// of `host` on `port`.
pub(super) fn with_unacked_and_unsent(host: &Host, port: u16) -> Result<(usize, Option<String>)> {
    let connections = established_on(host, port)?;
    let (loaded, other): (Vec<_>, Vec<_>) = connections
        .into_iter()
        .partition(|c| ss_field(c, "unacked") > 0 && ss_field(c, "notsent") > 0);
    Ok((loaded.len(), other.into_iter().next()))
}

/// Opens `n` connections to `service` and loads them: for a moment the client host loses every
/// segment of them (a 4-tuple freeze there), so what the servers write next goes out but stays
/// unacknowledged up to their congestion window and the rest is never sent, and what the clients
/// write stays unacknowledged too; then the service is frozen on the source (`tcpmig freeze`)
/// and the loss ends. A freeze on the source alone would not do: its egress drop is reported to
/// TCP as a local send failure, so nothing would count as sent.
pub(super) fn loaded_traffic<'bed>(
    bed: &'bed TestBed,
    service: SocketAddr,
    n: usize,
) -> Result<(Traffic<'bed>, RemoveOnDrop, String)> {
    let mut traffic = Traffic::open_at(bed, Path::new(PEER), service, n, stream(BYTES))?;
    let loss = super::support::client_loses_everything(bed, service, n, Duration::from_secs(120))?;
    let wrote = |report: Report, bytes: u64| report.bytes_out == bytes * n as u64;
    let servers = command_all(
        &mut traffic.servers,
        PeerCommand::Send {
            bytes: SERVER_FROZEN,
        },
    )?;
    ensure!(wrote(servers, SERVER_FROZEN + BYTES), "servers' writes");
    let clients = command_all(
        &mut traffic.clients,
        PeerCommand::Send {
            bytes: CLIENT_FROZEN,
        },
    )?;
    ensure!(wrote(clients, CLIENT_FROZEN + BYTES), "clients' writes");
    let name = format!("{}-src", bed.prefix());
    let guard = freeze(bed.source(), service, &name)?;
    drop(loss);
    let (loaded, other) = with_unacked_and_unsent(bed.source(), service.port())?;
    ensure!(
        loaded == n,
        "{loaded} of {n} connections hold both unacknowledged and never-sent bytes; one \
         that does not: {other:?}"
    );
    Ok((traffic, guard, name))
}

pub(super) fn dump_args(pid: u32, service: SocketAddr, out: &Path, then: &str) -> Vec<OsString> {
    let mut args = os(&[
        "dump",
        "--pid",
        &pid.to_string(),
        "--service",
        &service.to_string(),
        "--then",
        then,
        "--json",
        "--out",
    ]);
    args.push(out.into());
    args
}

/// Checks the dump's report: every connection, with queued bytes of each kind.
pub(super) fn check_dump_report(json: &str, n: usize) -> Result<()> {
    let report: serde_json::Value = serde_json::from_str(json)?;
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    ensure!(count("connections") == n as u64, "{report}");
    ensure!(count("recv_bytes") == BYTES * n as u64, "{report}");
    ensure!(
        count("unsent_bytes") > 0 && count("send_bytes") > count("unsent_bytes"),
        "{report}"
    );
    Ok(())
}

pub(super) fn restore_args(image: &Path, host: &Host) -> Vec<OsString> {
    let mut args = os(&["restore", "--in"]);
    args.push(image.into());
    args.extend(os(&["--netns", host.name()]));
    args
}

/// The image restored in `netns` on a pool of `size` sockets made first, every other connection
/// as a blocking socket; returns the sockets, in repair mode, and those tuples.
pub(super) fn restore_on_a_pool(
    netns: &Netns,
    image: &Path,
    service: SocketAddr,
    size: usize,
) -> Result<(repair::RestoredSockets, Vec<Tuple>)> {
    let pool = repair::SocketPool::prepare(repair::Workers::PerCpu, netns, service, size)?;
    ensure!(pool.len() == size, "a pool of {} sockets", pool.len());
    let mut conns = image::decode(&std::fs::read(image)?)?;
    let mut blocking = Vec::new();
    for conn in conns.iter_mut().step_by(2) {
        conn.options.nonblocking = false;
        blocking.push(conn.tuple);
    }
    let restored = repair::restore_with_pool(repair::Workers::PerCpu, netns, &conns, pool)?;
    ensure!(restored.len() == conns.len(), "{} restored", restored.len());
    Ok((restored, blocking))
}

/// Takes the pooled sockets out of repair mode; checks that exactly the `blocking` ones are
/// blocking, and returns their fds.
pub(super) fn commit_pooled(
    restored: repair::RestoredSockets,
    blocking: &[Tuple],
) -> Result<Vec<OwnedFd>> {
    let committed = restored.commit();
    ensure!(
        committed.failures.is_empty(),
        "commit: {:?}",
        committed.failures
    );
    for socket in &committed.sockets {
        // SAFETY: F_GETFL on an fd we own.
        let flags = unsafe { libc::fcntl(socket.fd.as_raw_fd(), libc::F_GETFL) };
        ensure!(flags >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
        ensure!(
            (flags & libc::O_NONBLOCK == 0) == blocking.contains(&socket.tuple),
            "{}: O_NONBLOCK is {}",
            socket.tuple,
            flags & libc::O_NONBLOCK != 0
        );
    }
    Ok(committed.sockets.into_iter().map(|s| s.fd).collect())
}

/// `tcpmig restore --handoff` to a Unix socket of this test; returns the fds received.
pub(super) fn receive_handoff(
    scratch: &Scratch,
    image: &Path,
    host: &Host,
    n: usize,
) -> Result<Vec<OwnedFd>> {
    let socket = scratch.path("handoff.sock");
    let listener = UnixListener::bind(&socket)?;
    let mut args = restore_args(image, host);
    args.push("--handoff".into());
    args.push(socket.clone().into());
    let mut restore = Command::new(tcpmig_bin());
    restore
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = host.spawn(&mut restore)?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (text, fds) = receive_handoff_on(&listener, deadline, || {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.child_mut().stderr.take() {
                pipe.read_to_string(&mut stderr)?;
            }
            bail!("tcpmig restore --handoff exited ({status}) before connecting: {stderr}");
        }
        Ok(())
    })
    .context("tcpmig restore --handoff")?;
    let lines: Vec<&str> = text.lines().collect();
    let headers = lines
        .iter()
        .filter(|l| l.starts_with("tcpmig-fds "))
        .count();
    ensure!(
        fds.len() == n && lines.len() == n + headers && headers == n.div_ceil(253),
        "received {} fds and {} lines ({headers} headers) for {n} connections",
        fds.len(),
        lines.len()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "tcpmig restore did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    ensure!(status.success(), "tcpmig restore --handoff: {status}");
    Ok(fds)
}
