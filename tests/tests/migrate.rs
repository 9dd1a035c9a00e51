//! Standalone migration (`tcpmig migrate` + `tcpmig agent`) on the test bed.
//!
//! Scale: `tcpmig demo --json` runs the whole scenario (clients writing all the time, the old
//! server's queued data flowing, hand-over to an adopting server, every byte checked both ways,
//! a new connection to the destination) and these tests check its report.
//!
//! Rollback: the agent killed -9 in the middle of the image, a wrong token, a restore that fails
//! (a 4-tuple already live at the destination). Every connection must carry on at the source
//! byte-exact, and no freeze, program, pin or address may be left on either side.
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test migrate -- --test-threads=1`.
mod support;

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig::{freeze, net::Netns, repair};
use tcpmig_testbed::{
    ChildGuard, IFACE, PREFIX_V4, Role, SERVICE_V4, TestBed, Traffic, tcpmig, tcpmig_bin,
};

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
const BYTES: u64 = 2048;
const MORE: u64 = 700;
const AGENT_PORT: u16 = 7070;

/// Runs `tcpmig demo --connections n --json` and checks its report.
fn demo(n: usize) -> Result<()> {
    let out = tcpmig(["demo", "--connections", &n.to_string(), "--json"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "tcpmig demo failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let field = |name: &str| report[name].as_u64().unwrap_or(u64::MAX);
    ensure!(
        field("kept") == n as u64,
        "not every connection kept: {report}"
    );
    for failure in ["resets", "mismatched", "failed"] {
        ensure!(field(failure) == 0, "{failure}: {report}");
    }
    ensure!(field("sent_during_migration") > 0, "{report}");
    ensure!(report["new_connection"] == true, "{report}");
    let migration = &report["migration"];
    ensure!(migration["source_stopped"] == true, "{migration}");
    eprintln!(
        "{n} connections: blackout {:.1} ms, catch-up at most {:.1} ms after it; phases {}; \
         destination {}",
        report["blackout_ms"].as_f64().unwrap_or_default(),
        report["catch_up_ms"].as_f64().unwrap_or_default(),
        migration["phases"],
        migration["destination"],
    );
    Ok(())
}

#[test]
fn one_connection_under_traffic() -> Result<()> {
    demo(1)
}

#[test]
fn thousand_connections_under_traffic() -> Result<()> {
    demo(1_000)
}

#[test]
fn ten_thousand_connections_under_traffic() -> Result<()> {
    demo(10_000)
}

/// A file holding `token`, removed when dropped.
struct TokenFile(PathBuf);

impl TokenFile {
    fn new(bed: &TestBed, which: &str, token: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}-{which}.token", bed.prefix()));
        std::fs::write(&path, token)?;
        // tcpmig refuses token files that group or others can read.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self(path))
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How a rollback case breaks the migration.
enum Fault {
    /// The agent stops itself after this many image bytes and the test kills it (-9).
    KillAgentAfter(u64),
    WrongToken,
    /// A live socket with the 4-tuple of one of the connections exists at the destination.
    TupleInUse,
}

fn rollback_case(fault: Fault) -> Result<()> {
    const N: usize = 1_000;
    const PORT: u16 = 8090;
    let bed = TestBed::new()?;
    let mut traffic = Traffic::open(&bed, Path::new(PEER), N, BYTES, PORT)?;
    ensure!(traffic.verify()?.all_verified(N as u64), "before");
    // Unread data both ways, so the image carries queues.
    ensure!(traffic.send_all(MORE)?.all_verified(N as u64), "queueing");
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let source_token = TokenFile::new(&bed, "source", "right token")?;
    let agent_token = match fault {
        Fault::WrongToken => TokenFile::new(&bed, "agent", "another token")?,
        _ => TokenFile::new(&bed, "agent", "right token\n")?,
    };
    let _blocker = match fault {
        Fault::TupleInUse => Some(hold_tuple_at_destination(&bed, PORT)?),
        _ => None,
    };
    let mut agent = Some(start_agent(&bed, &agent_token.0, &fault)?);
    let agent_pid = agent.as_ref().map_or(0, ChildGuard::pid);
    let server_pid = traffic.server_pids()[0];
    let mut migrate = start_migrate(&bed, server_pid, service, &source_token.0)?;
    let migrate_pid = migrate.pid();
    if let Fault::KillAgentAfter(_) = fault {
        wait_for(Duration::from_secs(30), "the agent to stop itself", || {
            Ok(process_state(agent_pid) == Some('T'))
        })?;
        // SIGKILL, by the guard.
        agent = None;
    }
    let (status, stderr) = finish(&mut migrate, Duration::from_secs(60))?;
    ensure!(!status.success(), "the migration must fail");
    let expected = match fault {
        // Refused at the handshake, before anything was touched.
        Fault::WrongToken => "wrong token (check --token-file on both sides); nothing was changed",
        _ => "rolled back: the connections carry on at the source",
    };
    ensure!(stderr.contains(expected), "{stderr}");
    ensure!(
        !matches!(process_state(server_pid), Some('T') | None),
        "the server must run again"
    );

    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "after the rollback: {after:?}"
    );
    ensure!(traffic.send_all(MORE)?.all_verified(N as u64), "writing on");
    let more = traffic.verify_until(BYTES + 2 * MORE)?;
    ensure!(more.all_verified(N as u64), "still flowing: {more:?}");
    ensure!(more.client.resets + more.server.resets == 0);
    drop(agent);
    nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
    )
}

#[test]
fn agent_killed_in_the_middle_of_the_image_rolls_back() -> Result<()> {
    // 1,000 connections with 700 unread bytes each way: an image of about 1.5 MB.
    rollback_case(Fault::KillAgentAfter(700 << 10))
}

/// On Prepare, before the source freezes, the agent has its pool of sockets and its freeze
/// programs attached, unpinned: not listed, nothing under the pin root, and a kill at that point
/// leaves nothing behind.
#[test]
fn agent_is_ready_on_prepare_with_nothing_pinned() -> Result<()> {
    const N: usize = 200;
    const PORT: u16 = 8095;
    let bed = TestBed::new()?;
    let mut traffic = support::queued_traffic(&bed, N, PORT)?;
    let token = support::TokenFile::new(&bed, "prepare", "prepare token")?;
    let (source, destination) = (bed.source(), bed.destination());
    let server_pid = traffic.server_pids()[0];
    let (mut agent, mut migrate) = support::migrate_to_paused_agent(
        &bed,
        server_pid,
        PORT,
        &token.0,
        "agent-prepared",
        support::STEP_TIMEOUT_SECS,
    )?;
    let agent_pid = agent.child.pid();
    let migrate_pid = migrate.child.pid();

    let attached = freeze::attached_programs(&Netns::open(destination.name())?, IFACE)?;
    ensure!(attached.len() == 2, "programs on Prepare: {attached:?}");
    let name = format!("agent-{agent_pid}");
    ensure!(
        !freeze::Freeze::list()?.contains(&name),
        "the agent's freeze is listed"
    );
    ensure!(
        !Path::new(freeze::PIN_ROOT).join(&name).exists(),
        "the agent's freeze is pinned"
    );
    let sockets = std::fs::read_dir(format!("/proc/{agent_pid}/fd"))?
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count();
    ensure!(
        sockets > N,
        "the agent holds {sockets} sockets: no pool of {N}"
    );

    agent.kill()?;
    let (status, _, stderr) = migrate.finish()?;
    ensure!(!status.success(), "the migration must fail: {stderr}");
    ensure!(stderr.contains("rolled back"), "{stderr}");
    let after = traffic.verify_until(support::BYTES + support::MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "after the rollback: {after:?}"
    );
    support::nothing_left(&bed, &[format!("migrate-{migrate_pid}"), name], source)
}

#[test]
fn wrong_token_rolls_back() -> Result<()> {
    rollback_case(Fault::WrongToken)
}

#[test]
fn failed_restore_rolls_back() -> Result<()> {
    rollback_case(Fault::TupleInUse)
}

fn start_agent<'bed>(bed: &'bed TestBed, token: &Path, fault: &Fault) -> Result<ChildGuard<'bed>> {
    let host = bed.destination();
    let mut cmd = host.command(tcpmig_bin())?;
    cmd.arg("agent")
        .arg("--listen")
        .arg(SocketAddr::new(Role::Destination.v4().into(), AGENT_PORT).to_string())
        .args(["--netns", host.name(), "--dev", IFACE, "--timeout", "5"])
        .arg("--token-file")
        .arg(token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Fault::KillAgentAfter(bytes) = fault {
        cmd.args(["--stop-after-image-bytes", &bytes.to_string()]);
    }
    cmd.args(["--", "/bin/true"]);
    host.spawn(&mut cmd)
}

fn start_migrate<'bed>(
    bed: &'bed TestBed,
    pid: u32,
    service: SocketAddr,
    token: &Path,
) -> Result<ChildGuard<'bed>> {
    let host = bed.source();
    let mut cmd = host.command(tcpmig_bin())?;
    cmd.arg("migrate")
        .args(["--pid", &pid.to_string(), "--service", &service.to_string()])
        .args(["--dev", IFACE, "--timeout", "5", "--stop-source", "--to"])
        .arg(SocketAddr::new(Role::Destination.v4().into(), AGENT_PORT).to_string())
        .arg("--token-file")
        .arg(token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    host.spawn(&mut cmd)
}

/// Waits (bounded) for `child` to exit; returns its status and stderr.
fn finish(
    child: &mut ChildGuard<'_>,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String)> {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "tcpmig migrate did not end in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(pipe) = child.child_mut().stderr.as_mut() {
        std::io::Read::read_to_string(pipe, &mut stderr)?;
    }
    Ok((status, stderr))
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A socket in the destination with the 4-tuple of one of the client's connections, made live
/// in repair mode (no packet sent): the agent's restore of that connection must fail. Closed
/// silently when dropped.
fn hold_tuple_at_destination(bed: &TestBed, port: u16) -> Result<OwnedFd> {
    let client = Netns::open(bed.client().name())?;
    let tuple = repair::list_tcp_sockets(&client)?
        .into_iter()
        .map(|s| s.tuple)
        .find(|t| t.remote.port() == port)
        .context("a client connection")?;
    let (local, remote) = (tuple.remote, tuple.local);
    bed.destination().run(move || -> Result<OwnedFd> {
        let sockaddr = |addr: SocketAddr| {
            let SocketAddr::V4(v4) = addr else {
                unreachable!("IPv4 bed service")
            };
            libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            }
        };
        let (local, remote) = (sockaddr(local), sockaddr(remote));
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let one: libc::c_int = 1;
        let opt_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: plain socket syscalls with valid pointers and lengths; the fd is owned at once.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let raw = fd.as_raw_fd();
            let ok = libc::setsockopt(raw, libc::SOL_TCP, 19, (&raw const one).cast(), opt_len)
                == 0
                && libc::setsockopt(
                    raw,
                    libc::SOL_IP,
                    libc::IP_TRANSPARENT,
                    (&raw const one).cast(),
                    opt_len,
                ) == 0
                && libc::bind(raw, (&raw const local).cast(), len) == 0
                && libc::connect(raw, (&raw const remote).cast(), len) == 0;
            ensure!(ok, "holding {tuple}: {}", std::io::Error::last_os_error());
            Ok(fd)
        }
    })?
}

/// No freeze of this migration, no tcpmig program on either interface, and the service address
/// on the source only.
fn nothing_left(bed: &TestBed, freezes: &[String]) -> Result<()> {
    let names = freeze::Freeze::list()?;
    ensure!(
        !names.iter().any(|n| freezes.contains(n)),
        "freezes left: {names:?}"
    );
    let ip = IpAddr::from(SERVICE_V4);
    for (host, has) in [(bed.source(), true), (bed.destination(), false)] {
        let netns = Netns::open(host.name())?;
        let attached = freeze::attached_programs(&netns, IFACE)?;
        ensure!(attached.is_empty(), "programs left on {host}: {attached:?}");
        ensure!(
            tcpmig::net::has_address(&netns, IFACE, ip, PREFIX_V4)? == has,
            "service address on {host}: expected {has}"
        );
    }
    Ok(())
}
