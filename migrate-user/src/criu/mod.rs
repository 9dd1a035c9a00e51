//! CRIU action-script hook: tcpmig's freeze replaces CRIU's network lock.
//!
//! CRIU runs an action script by its path, without arguments, once per action, with
//! CRTOOLS_SCRIPT_ACTION, CRTOOLS_IMAGE_DIR and (mostly) CRTOOLS_INIT_PID set, in CRIU's own
//! network namespace (docs/criu.md: the actions in order, and what CRIU does in each). Each
//! action is one short process, so everything that must last from one action to the next is
//! pinned (the freeze), written beside the images ([`SIDECAR`]), or held by a detached [`guard`]
//! process. The dump side's actions are in dump.rs, the restore side's in restore.rs, the
//! settings in config.rs.
//!
//! | CRIU mode | freeze on dump | after the dump | freeze on restore | lift on restore |
//! |---|---|---|---|---|
//! | task in CRIU's netns, `--network-lock skip` | pre-dump | post-dump | pre-restore | post-restore |
//! | task in its own netns (`--external net[...]`) | network-lock (new connections at pre-dump) | post-dump | setup-namespaces | network-unlock |
//!
//! The source freeze after a successful dump: it holds until the service address has left the
//! source (the hook deletes it itself at post-dump when [`Config::address`] is set; otherwise the
//! guard waits for someone to), because the dumped sockets are gone and the source kernel would
//! answer the clients' segments with resets. It never outlives its deadline: the programs let
//! traffic pass by themselves then, and the guard removes programs and pins.
mod config;
mod dump;
mod env;
mod guard;
mod install;
mod restore;
mod sidecar;

use std::{
    fs, io,
    num::ParseIntError,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::Serialize;
use tracing::{debug, info};

pub use self::{
    config::{CONFIG_ENV, Config, ConfigError, DEFAULT_CONFIG},
    env::{Action, HookEnv},
    guard::{GuardOutcome, GuardSpec, guard},
    install::{Installed, install, install_with_settings},
    sidecar::Sidecar,
};
use crate::{
    freeze::{self, Freeze, FreezeError, RemoveOnDrop},
    net::{NetError, Netns, NetnsError},
    repair::RepairError,
    tuple::Tuple,
};

/// The name the tcpmig binary answers to as an action script.
pub const HOOK_NAME: &str = "tcpmig-criu-hook";
/// What the hook writes beside CRIU's images at post-dump and reads on restore.
pub const SIDECAR: &str = "tcpmig-criu.json";

/// Failures of the hook; each names the step that failed (the sources are boxed: a freeze or
/// repair error is large).
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("{0} is not set: tcpmig-criu-hook must be run by CRIU (--action-script)")]
    NotCriu(&'static str),
    #[error("CRTOOLS_INIT_PID={value:?} is not a pid: tcpmig-criu-hook must be run by CRIU")]
    InitPid {
        value: String,
        source: ParseIntError,
    },
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{step}")]
    Freeze {
        step: &'static str,
        source: Box<FreezeError>,
    },
    #[error("{step}")]
    Net {
        step: &'static str,
        source: Box<NetError>,
    },
    #[error("{step}")]
    Netns {
        step: &'static str,
        source: Box<NetnsError>,
    },
    #[error("{step}")]
    Repair {
        step: &'static str,
        source: Box<RepairError>,
    },
    #[error("{step}: {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "reading the connection list the dump left beside the images: {} is corrupt",
        path.display()
    )]
    CorruptSidecar {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{} exists and is not tcpmig's (a link or a script it wrote): remove it or choose \
         another --dir",
        path.display()
    )]
    NotALink { path: PathBuf },
    #[error(
        "{} holds whitespace or a newline, which CRIU's configuration file cannot carry",
        path.display()
    )]
    UnusablePath { path: PathBuf },
    #[error(
        "checking the dumped connections: {count} were not frozen (first: {first}); they were \
         opened after pre-dump: set TCPMIG_SERVICES to freeze the whole service instead"
    )]
    NotFrozen { count: usize, first: Tuple },
}

/// Attaches a step name to the errors of one plane.
trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, CriuError>;
}

macro_rules! step_from {
    ($error:ty, $variant:ident) => {
        impl<T> Step<T> for Result<T, $error> {
            fn step(self, step: &'static str) -> Result<T, CriuError> {
                self.map_err(|source| CriuError::$variant {
                    step,
                    source: Box::new(source),
                })
            }
        }
    };
}
step_from!(FreezeError, Freeze);
step_from!(NetError, Net);
step_from!(NetnsError, Netns);
step_from!(RepairError, Repair);

/// What one action did, for logs and `TCPMIG_REPORT`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HookReport {
    pub action: String,
    /// The freeze acted on, if any.
    pub freeze: Option<String>,
    /// Connections (4-tuples) frozen or checked.
    pub connections: usize,
    /// Services frozen whole.
    pub services: usize,
    /// Wall time of the action, from the hook's start to its end.
    pub took_us: f64,
}

/// Runs one CRIU action. On error nothing this action attached is left, and a failed post-dump
/// also lifts the dump's freeze (CRIU then lets the tasks run on at the source).
///
/// # Examples
/// What the `tcpmig-criu-hook` binary does when CRIU runs it:
/// ```no_run
/// use tcpmig::criu::{self, Config, HookEnv};
///
/// # fn main() -> Result<(), criu::CriuError> {
/// let env = HookEnv::from_env()?;
/// let report = criu::run_hook(&env, &Config::from_env()?)?;
/// eprintln!("{}: {} connections", report.action, report.connections);
/// # Ok(())
/// # }
/// ```
pub fn run_hook(env: &HookEnv, config: &Config) -> Result<HookReport, CriuError> {
    let started = Instant::now();
    let mut report = HookReport {
        action: env.action.name().to_owned(),
        ..HookReport::default()
    };
    match &env.action {
        Action::PreDump | Action::NetworkLock => {
            let task = task_netns(env)?;
            let external = !same_netns(&task)?;
            // pre-dump locks a task in CRIU's netns; network-lock comes only for an external
            // one, after CRIU stopped its tasks: new connections stop at pre-dump there.
            let hold_first = external && !config.services.is_empty();
            if (env.action == Action::NetworkLock) == external {
                dump::lock_source(env, config, &task, hold_first, &mut report)?;
            } else if hold_first {
                dump::hold_new_connections(env, config, &task, &mut report)?;
            }
        }
        Action::PostDump => {
            let task = task_netns(env)?;
            let name = freeze_name(&task);
            let result = dump::post_dump(env, config, &task, &name, &mut report);
            if result.is_err() {
                // CRIU rolls the dump back: the connections go on at the source.
                let _ = freeze::remove(&name);
            }
            result?;
        }
        // pre-restore and post-restore act only when the task shares CRIU's netns;
        // setup-namespaces and network-unlock come only when it does not.
        Action::PreRestore | Action::PostRestore => {
            let sidecar = Sidecar::read(&env.image_dir)?.unwrap_or_default();
            if !sidecar.external_netns {
                let netns = stable_netns("/proc/self/ns/net")?;
                if env.action == Action::PreRestore {
                    restore::lock_destination(env, config, &netns, &sidecar, &mut report)?;
                } else {
                    restore::unlock(config, &netns, &sidecar, &mut report)?;
                }
            }
        }
        Action::SetupNamespaces => {
            let sidecar = Sidecar::read(&env.image_dir)?.unwrap_or_default();
            restore::lock_destination(env, config, &task_netns(env)?, &sidecar, &mut report)?;
        }
        // Also after a failed dump: the freeze is lifted and the tasks run on.
        Action::NetworkUnlock => {
            let sidecar = Sidecar::read(&env.image_dir)?.unwrap_or_default();
            restore::unlock(config, &task_netns(env)?, &sidecar, &mut report)?;
        }
        Action::Other(action) => debug!(action, "nothing to do"),
    }
    report.took_us = started.elapsed().as_secs_f64() * 1e6;
    info!(?report, "criu hook done");
    Ok(report)
}

/// This namespace's freeze, attached on the configured interface, nothing frozen yet; removed
/// again if the hook fails before it keeps it.
fn attach_freeze(netns: &Netns, config: &Config) -> Result<(String, RemoveOnDrop), CriuError> {
    let name = freeze_name(netns);
    let freeze = Freeze::attach(netns, &config.dev, &name).step("attaching the freeze programs")?;
    Ok((name, RemoveOnDrop::new(freeze)))
}

fn remove_freeze(name: &str) -> Result<(), CriuError> {
    match freeze::remove(name) {
        Ok(()) | Err(FreezeError::NotFound(_)) => Ok(()),
        Err(source) => Err(CriuError::Freeze {
            step: "removing the freeze",
            source: Box::new(source),
        }),
    }
}

/// One freeze per network namespace, whatever process opens it.
fn freeze_name(netns: &Netns) -> String {
    format!("criu-{}", netns.inode())
}

/// The task's namespace, named by /run/netns when it has a name there: the freeze records it, and
/// /proc/PID/ns/net dies with the task.
fn task_netns(env: &HookEnv) -> Result<Netns, CriuError> {
    let path = format!("/proc/{}/ns/net", env.init_pid()?);
    stable_netns(&path)
}

fn stable_netns(path: &str) -> Result<Netns, CriuError> {
    let step = "opening the network namespace";
    let netns = Netns::open(path).step(step)?;
    let named = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .find_map(|name| {
            Netns::open(&name)
                .ok()
                .filter(|ns| ns.inode() == netns.inode())
        });
    Ok(named.unwrap_or(netns))
}

fn same_netns(netns: &Netns) -> Result<bool, CriuError> {
    let own = Netns::current().step("opening CRIU's network namespace")?;
    Ok(own.inode() == netns.inode())
}

/// Whether this process was started as the action script (the file name of `argv[0]`).
pub fn invoked_as_hook(argv0: &Path) -> bool {
    argv0.file_name().is_some_and(|name| name == HOOK_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_name_is_recognised_through_a_path() {
        assert!(invoked_as_hook(Path::new(
            "/usr/local/bin/tcpmig-criu-hook"
        )));
        assert!(invoked_as_hook(Path::new("tcpmig-criu-hook")));
        assert!(!invoked_as_hook(Path::new("/usr/bin/tcpmig")));
    }

    #[test]
    fn actions_parse() {
        for name in [
            "pre-dump",
            "network-lock",
            "setup-namespaces",
            "post-resume",
        ] {
            assert_eq!(Action::parse(name).name(), name);
        }
        assert_eq!(Action::parse("pre-dump"), Action::PreDump);
        assert_eq!(Action::parse("network-unlock"), Action::NetworkUnlock);
        assert_eq!(
            Action::parse("post-resume"),
            Action::Other("post-resume".into())
        );
    }
}
