//! Handing restored connections to the application that serves them: the last step of a restore
//! or a migration (docs/architecture.md).
//!
//! # Exec: socket activation
//! [`exec_with_fds`] replaces the calling process by a command (like `exec` in a shell, or
//! systemd-socket-activate): the command keeps tcpmig's pid, so a supervisor (systemd, a
//! container runtime, a test) that started `tcpmig restore --exec` now supervises the
//! application, its exit status is the command's, and `LISTEN_PID` is simply that pid. The
//! connections are fds 3, 4, ... with `LISTEN_FDS=<count>`, `LISTEN_PID=<pid>` and
//! `LISTEN_FDNAMES` (one name per fd, `:`-separated: the [`fd_name`] of each connection, or
//! `connection` for all of them, systemd's name with `Accept=yes`, when the names together pass
//! the kernel's 128 KiB limit on one environment string, from about 3,500 connections on; left
//! out from 11,915 connections on, where even those pass it). Every other fd of tcpmig is
//! close-on-exec.
//!
//! # Several processes
//! More connections than one process can hold (its fd limit, see [`max_fds_per_process`]) are
//! handed to several: [`spawn_with_fds`] starts the command once per group of connections, with
//! the same variables as above, LISTEN_PID being the child's own pid, plus `TCPMIG_SHARD` (its
//! group, from 0) and `TCPMIG_SHARDS` (how many). The children share tcpmig's stdin, stdout and
//! stderr, and get SIGTERM when the thread that started them ends; [`wait_all`] waits for them.
//!
//! # Unix socket: SCM_RIGHTS
//! [`send_fds`] connects to a Unix socket (SOCK_SEQPACKET if the listener is one, else
//! SOCK_STREAM) and sends the connections in messages of at most [`MAX_FDS_PER_MESSAGE`] fds.
//! Each message's bytes are a header line `tcpmig-fds <n>\n` and then `n` lines, one
//! [`fd_name`] per line, the k-th name for the k-th fd of the message's SCM_RIGHTS. tcpmig then
//! shuts down its side and waits (up to [`RECEIVER_TIMEOUT`]) for the receiver to close the
//! connection, which says it holds the fds. Receivers read with recvmsg and room for 253 fds from
//! the first byte on (a plain read() discards fds); on SOCK_STREAM one recvmsg returns at most
//! one message's fds, so read lines until `n` names arrived. Python:
//! `data, fds, _, _ = socket.recv_fds(conn, 65536, 253)`.
mod exec;
mod unix;

use std::{
    ffi::{OsStr, OsString},
    io,
    net::SocketAddr,
    os::{fd::RawFd, unix::ffi::OsStrExt as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

pub use self::{
    exec::{exec_with_fds, spawn_with_fds, wait_all},
    unix::send_fds,
};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::{net::NetnsError, repair::RestoredSocket, tuple::Tuple};

/// Most fds one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// How long [`send_fds`] waits for the receiver to close the connection.
pub const RECEIVER_TIMEOUT: Duration = Duration::from_secs(30);
const LISTEN_FDS_START: RawFd = 3;
/// MAX_ARG_STRLEN: the longest single argument or environment string execve accepts.
const MAX_ENV_STRING: usize = 32 * 4096;
/// Fds the command needs besides the connections (stdio, libraries, its own files).
const SPARE_FDS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("--exec needs a command")]
    EmptyCommand,
    #[error("{program}: not found or not executable (looked in {looked}); nothing was restored")]
    NotExecutable { program: String, looked: String },
    #[error(
        "{count} connections need {count} fds plus {SPARE_FDS} spare, above this process's hard \
         limit of {limit} open files: split the migration or raise the limit (ulimit -Hn)"
    )]
    TooManyFds { count: usize, limit: u64 },
    #[error("connecting to the receiver's Unix socket {path}; is the receiver listening?")]
    Connect { path: PathBuf, source: io::Error },
    #[error("handing the connections over: raising RLIMIT_NOFILE to its hard limit")]
    FdLimit(#[source] io::Error),
    #[error("handing the connections over: moving them to fds 3..")]
    PlaceFds(#[source] io::Error),
    #[error("handing the connections over: preparing {}", .program.display())]
    Prepare { program: PathBuf, source: io::Error },
    #[error("handing the connections over: executing {}", .program.display())]
    Exec { program: PathBuf, source: io::Error },
    #[error("handing the connections over: starting {}", .program.display())]
    Spawn { program: PathBuf, source: io::Error },
    #[error("handing the connections over: waiting for process {pid}")]
    Wait { pid: u32, source: io::Error },
    #[error("handing the connections over: no process was started")]
    NoneStarted,
    #[error("handing the connections over: sending to {}", .path.display())]
    Send { path: PathBuf, source: io::Error },
    #[error(
        "handing the connections over: waiting for the receiver at {} to close the connection",
        .path.display()
    )]
    ReceiverClose { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("handing the connections over: limiting the application's capabilities to {caps}")]
    Capabilities {
        caps: crate::sys::CapabilitySet,
        #[source]
        source: crate::sys::CapabilityError,
    },
}

/// The name of a connection in LISTEN_FDNAMES and in the Unix socket protocol:
/// `LOCALIP.PORT-REMOTEIP.PORT` as tcpdump writes it, with the colons of IPv6 addresses written
/// `_` (LISTEN_FDNAMES separates names with colons).
pub fn fd_name(tuple: &Tuple) -> String {
    let end = |addr: SocketAddr| format!("{}.{}", addr.ip(), addr.port()).replace(':', "_");
    format!("{}-{}", end(tuple.local), end(tuple.remote))
}

/// A command checked before anything is restored: a missing program must not cost the
/// connections.
#[derive(Debug)]
pub struct ExecCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl ExecCommand {
    /// Resolves `command[0]` (through PATH when it has no `/`) and checks that this process can
    /// hold `connections` fds for it.
    pub fn prepare(command: &[OsString], connections: usize) -> Result<Self, HandoffError> {
        let (program, args) = command.split_first().ok_or(HandoffError::EmptyCommand)?;
        let limit = raise_nofile_limit().map_err(HandoffError::FdLimit)?;
        if connections > room_under(limit) {
            return Err(HandoffError::TooManyFds {
                count: connections,
                limit,
            });
        }
        Ok(Self {
            program: resolve(program)?,
            args: args.to_vec(),
        })
    }
}

fn resolve(program: &OsStr) -> Result<PathBuf, HandoffError> {
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let found = if program.as_bytes().contains(&b'/') {
        Some(PathBuf::from(program)).filter(|p| executable(p))
    } else {
        std::env::split_paths(&path_var)
            .map(|dir| dir.join(program))
            .find(|p| executable(p))
    };
    found.ok_or_else(|| HandoffError::NotExecutable {
        program: program.to_string_lossy().into_owned(),
        looked: if program.as_bytes().contains(&b'/') {
            "that path".to_owned()
        } else {
            format!("PATH={}", path_var.to_string_lossy())
        },
    })
}

/// Most connections one process can be handed: its hard fd limit less stdio and the spare fds
/// it needs for itself.
pub fn max_fds_per_process() -> io::Result<usize> {
    Ok(room_under(raise_nofile_limit()?))
}

/// Connections a command can be handed under an fd limit of `limit`.
fn room_under(limit: u64) -> usize {
    limit.saturating_sub(LISTEN_FDS_START as u64 + SPARE_FDS) as usize
}

/// The connections' names, or `connection` for each, whichever fits in one environment string;
/// None when neither does (execve would fail with E2BIG).
fn listen_fdnames(sockets: &[RestoredSocket]) -> Option<String> {
    fdnames(sockets.iter().map(|s| &s.tuple).collect())
}

/// The names joined, or `connection` for each when they do not fit in one environment string
/// (built only until they pass it: at 10,000 connections the whole list cost 3.5 ms of the
/// hand-over), or None when even those do not.
fn fdnames(tuples: Vec<&Tuple>) -> Option<String> {
    let limit = MAX_ENV_STRING - "LISTEN_FDNAMES=".len();
    let mut joined = String::new();
    for (k, tuple) in tuples.iter().enumerate() {
        if k > 0 {
            joined.push(':');
        }
        joined.push_str(&fd_name(tuple));
        if joined.len() >= limit {
            let generic = vec!["connection"; tuples.len()].join(":");
            return (generic.len() < limit).then_some(generic);
        }
    }
    Some(joined)
}

/// Raises the soft RLIMIT_NOFILE to the hard one (no capability needed) and returns it: a bulk
/// restore or dump holds one fd per connection.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        soft = hard;
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
    }
    Ok(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_no_colons() {
        let tuple = Tuple {
            local: "[fd54:636d::100]:80".parse().unwrap(),
            remote: "198.18.0.1:40000".parse().unwrap(),
        };
        assert_eq!(fd_name(&tuple), "fd54_636d__100.80-198.18.0.1.40000");
    }

    #[test]
    fn names_fall_back_to_connection_then_to_none() {
        let tuples: Vec<Tuple> = (0..12_000)
            .map(|k| Tuple {
                local: "198.18.0.100:80".parse().unwrap(),
                remote: SocketAddr::from(([198, 18, 0, 1], 1024 + k as u16)),
            })
            .collect();
        for (n, expected) in [(100, Some(false)), (5_000, Some(true)), (12_000, None)] {
            let names = fdnames(tuples[..n].iter().collect());
            assert_eq!(
                names.map(|names| names.starts_with("connection:")),
                expected,
                "{n} connections"
            );
        }
    }

    #[test]
    fn missing_programs_are_refused_before_anything_happens() {
        let error = ExecCommand::prepare(&["tcpmig-no-such-program".into()], 1).unwrap_err();
        assert!(
            matches!(error, HandoffError::NotExecutable { .. }),
            "{error}"
        );
        assert!(matches!(
            ExecCommand::prepare(&[], 1),
            Err(HandoffError::EmptyCommand)
        ));
    }
}
