//! The guard: a detached process, started by the action that freezes, that removes the freeze
//! once nobody else will. Action scripts are short-lived and CRIU calls no action when it fails
//! or when a successful dump leaves the source, so without it a freeze would stay pinned.
//!
//! It waits for CRIU to exit (never before: it may be CRIU's child, and CRIU takes an unknown
//! child's exit for a failure), then:
//! - freeze already removed (post-restore, or post-dump that moved the address): nothing to do;
//! - the dumped task is gone (the dump succeeded, its sockets were closed silently): hold the
//!   freeze until no address of its connections is local to the source any more, because the
//!   source kernel would answer their segments with resets;
//! - otherwise (failed dump or restore, `--leave-running`): remove it now.
//!
//! At the deadline it removes the freeze whatever happens (its programs let traffic through by
//! then anyway).
use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{CriuError, Step as _, remove_freeze};
use crate::{freeze, net::Netns};

/// How often the guard looks again.
const POLL: Duration = Duration::from_millis(20);

/// What the guard is told, as one JSON argument.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GuardSpec {
    pub name: String,
    pub criu_pid: u32,
    /// The dumped root task (source side only).
    pub task_pid: Option<u32>,
    /// Addresses whose departure from the source ends a successful dump's freeze.
    pub addresses: Vec<IpAddr>,
    pub deadline_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuardOutcome {
    /// Someone else removed the freeze.
    AlreadyRemoved,
    /// CRIU failed or left the task running: the freeze was removed at once.
    RemovedAfterFailure,
    /// The address left the source after a successful dump.
    RemovedAfterMove,
    /// The deadline came first.
    RemovedAtDeadline,
}

/// Starts `tcpmig criu-hook --guard SPEC` inside `netns`, detached (own session, no stdio, no
/// inherited fds), and returns without waiting.
pub(super) fn spawn(netns: &Netns, spec: &GuardSpec) -> Result<(), CriuError> {
    let step = "starting the guard process";
    let json = serde_json::to_string(spec).expect("the guard spec serializes");
    let target = std::fs::File::open(netns_path(netns)).map_err(|source| CriuError::Io {
        step,
        path: netns_path(netns).into(),
        source,
    })?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("tcpmig")
        .args(["criu-hook", "--guard", &json])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let ns_fd = target.as_raw_fd();
    crate::sys::detach_into_netns_on_spawn(&mut cmd, ns_fd);
    cmd.spawn().map_err(|source| CriuError::Io {
        step,
        path: "/proc/self/exe".into(),
        source,
    })?;
    Ok(())
}

/// Opened again by path (alive at this point) for the child's setns.
fn netns_path(netns: &Netns) -> String {
    let spec = netns.spec();
    if spec.contains('/') {
        spec.to_owned()
    } else {
        format!("/run/netns/{spec}")
    }
}

/// The guard's work (see the module docs); runs in the namespace of the freeze.
pub fn guard(spec: &GuardSpec) -> Result<GuardOutcome, CriuError> {
    let deadline = Instant::now() + Duration::from_secs_f64(spec.deadline_s);
    let criu = pidfd(spec.criu_pid);
    // Opened now, while it surely exists: its pid may be reused later.
    let task = spec.task_pid.map(pidfd);
    let criu_gone = wait_until(deadline, || Ok(criu.as_ref().is_none_or(exited)))?;
    let pinned = || Path::new(freeze::PIN_ROOT).join(&spec.name).exists();
    if !pinned() {
        return Ok(GuardOutcome::AlreadyRemoved);
    }
    let dumped = criu_gone
        && task
            .as_ref()
            .is_some_and(|fd| fd.as_ref().is_none_or(exited));
    let outcome = if !criu_gone {
        GuardOutcome::RemovedAtDeadline
    } else if !dumped {
        GuardOutcome::RemovedAfterFailure
    } else {
        let netns = Netns::current().step("opening the guard's network namespace")?;
        let moved = wait_until(deadline, || {
            Ok(!pinned() || !any_local(&netns, &spec.addresses)?)
        })?;
        if moved {
            GuardOutcome::RemovedAfterMove
        } else {
            GuardOutcome::RemovedAtDeadline
        }
    };
    remove_freeze(&spec.name)?;
    Ok(outcome)
}

/// Polls `done` every [`POLL`] until it is true (true) or the deadline passes (false).
fn wait_until(
    deadline: Instant,
    mut done: impl FnMut() -> Result<bool, CriuError>,
) -> Result<bool, CriuError> {
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}

/// Whether one of `addresses` is local in `netns`: the kernel's own answer, a bind to it
/// (net.ipv4.ip_nonlocal_bind must be off, its default).
fn any_local(netns: &Netns, addresses: &[IpAddr]) -> Result<bool, CriuError> {
    netns
        .run(|| {
            addresses
                .iter()
                .any(|&ip| TcpListener::bind(SocketAddr::new(ip, 0)).is_ok())
        })
        .step("checking the service address")
}

/// `None` when the process is already gone.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    crate::sys::pidfd_open(pid).ok()
}

/// A pidfd polls readable once its process has exited.
fn exited(fd: &OwnedFd) -> bool {
    crate::sys::pidfd_wait_exit(fd, std::time::Instant::now())
}
