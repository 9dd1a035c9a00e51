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
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig::{freeze, net::Netns, repair};
use tcpmig_testbed::{IFACE, TestBed, tcpmig};

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

/// A service below port 1024 moves whole: the agent binds its restored sockets and listener to
/// that port after it dropped its other capabilities (it keeps CAP_NET_BIND_SERVICE for this),
/// and the application it hands them to holds none.
#[test]
fn a_service_on_a_privileged_port_moves() -> Result<()> {
    const N: usize = 50;
    const PORT: u16 = 80;
    let bed = TestBed::new()?;
    let mut traffic = support::queued_traffic(&bed, N, PORT)?;
    let token = tcpmig_testbed::TokenFile::new(&bed, "low-port", "low port token")?;
    let stream = tcpmig_testbed::StreamArgs {
        sent_already: support::BYTES + support::MORE,
        received_already: support::BYTES,
        ..tcpmig_testbed::StreamArgs::new(support::BYTES)
    };
    let agent = support::start_agent(bed.destination(), &token.0, stream, &[])?;
    let server_pid = traffic.server_pids()[0];
    support::migrate_to(&bed, &mut traffic, agent, server_pid, PORT, &token.0)?;
    let after = traffic.verify_until(support::BYTES + support::MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "at the destination: {after:?}"
    );
    Ok(())
}

/// How a rollback case breaks the migration.
enum Fault {
    /// The agent stops itself after this many image bytes and the test kills it (-9).
    KillAgentAfter(u64),
    WrongToken,
    /// A live socket with the 4-tuple of one of the connections exists at the destination.
    TupleInUse,
    /// The agent's `--dev` is its loopback: no Ethernet address to announce the service from.
    NotEthernet,
}

fn rollback_case(fault: Fault) -> Result<()> {
    const N: usize = 1_000;
    const PORT: u16 = 8090;
    let bed = TestBed::new()?;
    // Unread data both ways, so the image carries queues.
    let mut traffic = support::queued_traffic(&bed, N, PORT)?;
    let source_token = tcpmig_testbed::TokenFile::new(&bed, "source", "right token")?;
    let agent_token = match fault {
        Fault::WrongToken => tcpmig_testbed::TokenFile::new(&bed, "agent", "another token")?,
        _ => tcpmig_testbed::TokenFile::new(&bed, "agent", "right token\n")?,
    };
    let _blocker = match fault {
        Fault::TupleInUse => Some(hold_tuple_at_destination(&bed, PORT)?),
        _ => None,
    };
    let stop_after = match fault {
        Fault::KillAgentAfter(bytes) => bytes.to_string(),
        _ => String::new(),
    };
    let extra: &[&str] = match fault {
        Fault::KillAgentAfter(_) => &["--stop-after-image-bytes", &stop_after],
        _ => &[],
    };
    let agent = match fault {
        Fault::NotEthernet => {
            let link = support::insecure(&agent_token.0);
            let mut cmd = support::agent_command_on(bed.destination(), "lo", &link, &[], None)?;
            cmd.args(["--", "/bin/true"]);
            support::Running::spawn(bed.destination(), cmd)?
        }
        _ => support::start_plain_agent(bed.destination(), &agent_token.0, extra, None)?,
    };
    let agent_pid = agent.child.pid();
    let mut agent = Some(agent);
    let server_pid = traffic.server_pids()[0];
    let mut migrate = support::start_plain_migrate(&bed, server_pid, PORT, &source_token.0)?;
    let migrate_pid = migrate.child.pid();
    if let Fault::KillAgentAfter(_) = fault {
        wait_for(Duration::from_secs(30), "the agent to stop itself", || {
            Ok(support::process_state(agent_pid) == Some('T'))
        })?;
        // SIGKILL, by the guard.
        agent = None;
    }
    let expected = match fault {
        // Refused at the handshake, before anything was touched.
        Fault::WrongToken => "wrong token (check --token-file on both sides); nothing was changed",
        _ => "rolled back: the connections carry on at the source",
    };
    migrate.fails_saying(expected).context("the migration")?;
    if let (Fault::NotEthernet, Some(agent)) = (&fault, agent.as_mut()) {
        let said = agent.fails_saying("without an Ethernet address")?;
        ensure!(!said.contains("panicked"), "the agent panicked: {said}");
    }
    ensure!(
        !matches!(support::process_state(server_pid), Some('T') | None),
        "the server must run again"
    );
    support::carries_on(&mut traffic, N).context("after the rollback")?;
    drop(agent);
    support::nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
        bed.source(),
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
    let token = tcpmig_testbed::TokenFile::new(&bed, "prepare", "prepare token")?;
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
    // Over every thread's fd table: the pool lives in a thread of its own (one per group).
    let mut sockets = std::collections::HashSet::new();
    for task in std::fs::read_dir(format!("/proc/{agent_pid}/task"))? {
        let fds = std::fs::read_dir(task?.path().join("fd"))?;
        sockets.extend(
            fds.filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:")),
        );
    }
    let sockets = sockets.len();
    ensure!(
        sockets > N,
        "the agent holds {sockets} sockets: no pool of {N}"
    );

    agent.kill()?;
    migrate
        .fails_saying("rolled back")
        .context("the migration")?;
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

/// The agent fails while it prepares (it cannot announce from a loopback): an error, not a
/// panic, and the source rolls back.
#[test]
fn an_agent_that_cannot_announce_refuses_and_rolls_back() -> Result<()> {
    rollback_case(Fault::NotEthernet)
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
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
