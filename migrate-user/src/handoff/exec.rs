//! Socket activation: the connections as fds 3, 4, ... of a command this process becomes, or
//! of children it starts (see the module docs of [`crate::handoff`]).
use std::{
    convert::Infallible,
    ffi::OsString,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    process::{Child, ExitStatus},
};

use super::{ExecCommand, HandoffError, LISTEN_FDS_START, listen_fdnames};
use crate::{
    repair::RestoredSocket,
    sys::{self, Execve, PlacedFds},
};

/// Replaces this process by `command` with `sockets` as fds 3, 4, ... and LISTEN_FDS,
/// LISTEN_PID and LISTEN_FDNAMES set (see the module docs). The calling thread must be in the
/// namespace the command should run in. Returns only on error.
///
/// # Examples
/// `tcpmig restore --exec -- my-server` in a few lines:
/// ```no_run
/// use std::{ffi::OsString, path::Path};
///
/// use tcpmig::{
///     handoff::{self, ExecCommand},
///     image,
///     net::Netns,
///     repair,
/// };
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let connections = image::read_file(Path::new("connections.img"))?;
/// // Checked before anything is restored: a missing program must not cost the connections.
/// let command = ExecCommand::prepare(&[OsString::from("my-server")], connections.len())?;
/// let committed = repair::restore(&Netns::current()?, &connections)?.commit();
/// match handoff::exec_with_fds(committed.sockets, command)? {}
/// # }
/// ```
pub fn exec_with_fds(
    sockets: Vec<RestoredSocket>,
    command: ExecCommand,
) -> Result<Infallible, HandoffError> {
    let names = listen_fdnames(&sockets);
    let count = sockets.len();
    // Left open for the command, which replaces us.
    place_fds(sockets)?;
    let mut exec = std::process::Command::new(&command.program);
    exec.args(&command.args)
        .env("LISTEN_FDS", count.to_string())
        .env("LISTEN_PID", std::process::id().to_string());
    match names {
        Some(names) => exec.env("LISTEN_FDNAMES", names),
        None => exec.env_remove("LISTEN_FDNAMES"),
    };
    let error = exec.exec();
    Err(HandoffError::Exec {
        program: command.program,
        source: error,
    })
}

/// Starts `command` with `sockets` as fds 3, 4, ... and the variables of socket activation
/// (LISTEN_PID is the child's pid, written between fork and exec), plus `env`; see the module
/// docs. The child inherits the calling thread's fd table and namespace, and gets SIGTERM when
/// that thread ends. The sockets are closed here once the child has them.
pub fn spawn_with_fds(
    sockets: Vec<RestoredSocket>,
    command: &ExecCommand,
    env: &[(&str, String)],
) -> Result<Child, HandoffError> {
    let count = sockets.len();
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| !name.as_bytes().starts_with(b"LISTEN_"))
        .collect();
    vars.push(("LISTEN_FDS".into(), count.to_string().into()));
    if let Some(names) = listen_fdnames(&sockets) {
        vars.push(("LISTEN_FDNAMES".into(), names.into()));
    }
    vars.extend(env.iter().map(|(name, value)| (name.into(), value.into())));
    let preparing = |source| HandoffError::Prepare {
        program: command.program.clone(),
        source,
    };
    let exec =
        Execve::new(&command.program, &command.args, &vars, "LISTEN_PID").map_err(preparing)?;
    let placed = place_fds(sockets)?;
    // The child has its copies (or failed): ours, at 3.., are closed.
    sys::spawn_execve(exec, placed).map_err(|source| HandoffError::Spawn {
        program: command.program.clone(),
        source,
    })
}

/// Waits for every child and returns the first unsuccessful exit status, or success.
pub fn wait_all(children: Vec<Child>) -> Result<ExitStatus, HandoffError> {
    let (mut first_failure, mut last) = (None, None);
    for mut child in children {
        let exited = child.wait().map_err(|source| HandoffError::Wait {
            pid: child.id(),
            source,
        })?;
        if !exited.success() {
            first_failure.get_or_insert(exited);
        }
        last = Some(exited);
    }
    first_failure.or(last).ok_or(HandoffError::NoneStarted)
}

/// The sockets' fds at 3, 4, ... without close-on-exec.
fn place_fds(sockets: Vec<RestoredSocket>) -> Result<PlacedFds, HandoffError> {
    let fds = sockets.into_iter().map(|s| s.fd).collect();
    sys::place_fds(fds, LISTEN_FDS_START).map_err(HandoffError::PlaceFds)
}
