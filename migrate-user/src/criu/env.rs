//! What CRIU tells an action script: the action, the image directory and the task, in
//! CRTOOLS_* variables; and which process is CRIU itself, which the guard outlives.
use std::{fs, path::PathBuf};

use super::CriuError;

/// A CRIU action, from CRTOOLS_SCRIPT_ACTION.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    PreDump,
    NetworkLock,
    PostDump,
    PreRestore,
    SetupNamespaces,
    PostRestore,
    NetworkUnlock,
    /// Actions the hook has nothing to do in (pre-resume, post-resume, orphan-pts-master...).
    Other(String),
}

impl Action {
    /// CRIU's name for it.
    pub fn name(&self) -> &str {
        match self {
            Self::PreDump => "pre-dump",
            Self::NetworkLock => "network-lock",
            Self::PostDump => "post-dump",
            Self::PreRestore => "pre-restore",
            Self::SetupNamespaces => "setup-namespaces",
            Self::PostRestore => "post-restore",
            Self::NetworkUnlock => "network-unlock",
            Self::Other(name) => name,
        }
    }

    /// The action CRIU names `name`; one the hook does not act in is [`Action::Other`].
    pub fn parse(name: &str) -> Self {
        match name {
            "pre-dump" => Self::PreDump,
            "network-lock" => Self::NetworkLock,
            "post-dump" => Self::PostDump,
            "pre-restore" => Self::PreRestore,
            "setup-namespaces" => Self::SetupNamespaces,
            "post-restore" => Self::PostRestore,
            "network-unlock" => Self::NetworkUnlock,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// What CRIU tells an action script.
#[derive(Clone, Debug)]
pub struct HookEnv {
    pub action: Action,
    pub image_dir: PathBuf,
    pub init_pid: Option<u32>,
    /// CRIU's main process, which the guard outlives.
    pub criu_pid: u32,
}

impl HookEnv {
    /// Reads the CRTOOLS_* variables; CRIU's pid is the topmost `criu` ancestor of this process
    /// (setup-namespaces runs in a child of CRIU that becomes the restored task).
    pub fn from_env() -> Result<Self, CriuError> {
        let var = |name| std::env::var(name).map_err(|_| CriuError::NotCriu(name));
        let action = Action::parse(&var("CRTOOLS_SCRIPT_ACTION")?);
        let image_dir = PathBuf::from(var("CRTOOLS_IMAGE_DIR")?);
        let init_pid = match std::env::var("CRTOOLS_INIT_PID") {
            Ok(value) => Some(
                value
                    .parse()
                    .map_err(|source| CriuError::InitPid { value, source })?,
            ),
            Err(_) => None,
        };
        Ok(Self {
            action,
            image_dir,
            init_pid,
            criu_pid: criu_ancestor(),
        })
    }

    pub(super) fn init_pid(&self) -> Result<u32, CriuError> {
        self.init_pid.ok_or(CriuError::NotCriu("CRTOOLS_INIT_PID"))
    }
}

/// The topmost ancestor of this process whose command is `criu`; our parent if none is.
fn criu_ancestor() -> u32 {
    let parent = |pid: u32| -> Option<(u32, String)> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let ppid = tail.split_whitespace().nth(1)?.parse().ok()?;
        Some((ppid, comm))
    };
    let mut found = std::os::unix::process::parent_id();
    let mut pid = found;
    // Bounded: process trees are not deeper than this.
    for _ in 0..64 {
        match parent(pid) {
            Some((ppid, comm)) if comm == "criu" => {
                found = pid;
                pid = ppid;
            }
            _ => break,
        }
    }
    found
}
