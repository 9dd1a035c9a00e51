//! Where restored connections go: the same options for `tcpmig restore` and `tcpmig agent`.
use std::{ffi::OsString, path::PathBuf};

use clap::{ArgGroup, Args};

#[derive(Args)]
#[command(group(
    ArgGroup::new("target")
        .required(true)
        .multiple(true)
        .args(["exec", "handoff", "command"])
))]
pub struct HandTo {
    /// Hand the connections to the command given after `--` (`-- CMD` alone means the same),
    /// inside the target namespace, as fds 3, 4, ... with LISTEN_FDS, LISTEN_PID and
    /// LISTEN_FDNAMES set (systemd socket activation, Accept=yes style). `restore` becomes the
    /// command (it keeps tcpmig's pid, so whoever started tcpmig supervises it); `agent` starts
    /// it once per group (see --max-per-process) and waits for them all. tcpmig's report goes
    /// to stderr, stdout is the command's.
    #[arg(long, requires = "command")]
    pub exec: bool,
    /// Send the connections to the application listening on this Unix socket, with SCM_RIGHTS:
    /// messages of at most 253 fds, each with the text `tcpmig-fds N` and one name per line
    /// (LOCALIP.PORT-REMOTEIP.PORT); waits for the receiver to close the connection.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["exec", "command"])]
    pub handoff: Option<PathBuf>,
    /// The command for --exec and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}
