//! CRIU action-script hook: tcpmig's freeze replaces CRIU's network lock.
//!
//! CRIU runs an action script by its path, without arguments, once per action, with
//! CRTOOLS_SCRIPT_ACTION, CRTOOLS_IMAGE_DIR and (mostly) CRTOOLS_INIT_PID set, in CRIU's own
//! network namespace (notes/criu.md). Each action is one short process, so everything that must
//! last from one action to the next is pinned (the freeze), written beside the images
//! ([`SIDECAR`]), or held by a detached [`guard`] process.
//!
//! | CRIU mode | freeze on dump | after the dump | freeze on restore | lift on restore |
//! |---|---|---|---|---|
//! | task in CRIU's netns, `--network-lock skip` | pre-dump | post-dump | pre-restore | post-restore |
//! | task in its own netns (`--external net[...]`) | network-lock | post-dump | setup-namespaces | network-unlock |
//!
//! The source freeze after a successful dump: it holds until the service address has left the
//! source (the hook deletes it itself at post-dump when [`Config::address`] is set; otherwise the
//! guard waits for someone to), because the dumped sockets are gone and the source kernel would
//! answer the clients' segments with resets. It never outlives its deadline: the programs let
//! traffic pass by themselves then, and the guard removes programs and pins.
mod config;
mod guard;

use std::{
    collections::{BTreeSet, HashSet},
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

pub use self::{
    config::{CONFIG_ENV, Config, DEFAULT_CONFIG},
    guard::{GuardOutcome, GuardSpec, guard},
};
use crate::{
    freeze::{self, Freeze, FreezeError, RemoveOnDrop},
    net::{self, NetError, Netns, NetnsError},
    repair::{self, Filter, RepairError},
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
    #[error("configuration: {0}")]
    Config(String),
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
            Ok(pid) => Some(pid.parse().map_err(|_| {
                CriuError::Config(format!("CRTOOLS_INIT_PID={pid:?} is not a pid"))
            })?),
            Err(_) => None,
        };
        Ok(Self {
            action,
            image_dir,
            init_pid,
            criu_pid: criu_ancestor(),
        })
    }

    fn init_pid(&self) -> Result<u32, CriuError> {
        self.init_pid.ok_or(CriuError::NotCriu("CRTOOLS_INIT_PID"))
    }
}

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

/// What the hook knows about a dump, kept beside the images so that the restore (on another
/// host) freezes the same connections and knows the mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sidecar {
    /// The task had its own network namespace (`--external net[...]`).
    pub external_netns: bool,
    pub services: Vec<SocketAddr>,
    /// (local, remote) of every dumped connection.
    pub tuples: Vec<(SocketAddr, SocketAddr)>,
}

impl Sidecar {
    fn tuples(&self) -> Vec<Tuple> {
        self.tuples
            .iter()
            .map(|&(local, remote)| Tuple { local, remote })
            .collect()
    }

    /// The addresses the connections use on this side: the ones to announce.
    fn local_addresses(&self) -> BTreeSet<IpAddr> {
        self.services
            .iter()
            .map(SocketAddr::ip)
            .chain(self.tuples.iter().map(|(local, _)| local.ip()))
            .map(|ip| ip.to_canonical())
            .collect()
    }

    fn read(image_dir: &Path) -> Result<Option<Self>, CriuError> {
        let path = image_dir.join(SIDECAR);
        let step = "reading the connection list the dump left beside the images";
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| CriuError::Io {
                    step,
                    path,
                    source: io::Error::other(e),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CriuError::Io { step, path, source }),
        }
    }

    fn write(&self, image_dir: &Path) -> Result<(), CriuError> {
        let path = image_dir.join(SIDECAR);
        let text = serde_json::to_string(self).expect("the sidecar serializes");
        fs::write(&path, text).map_err(|source| CriuError::Io {
            step: "writing the connection list beside the images",
            path,
            source,
        })
    }
}

/// Runs one CRIU action. On error nothing this action attached is left, and a failed post-dump
/// also lifts the dump's freeze (CRIU then lets the tasks run on at the source).
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
            // pre-dump locks a task in CRIU's netns; network-lock comes only for an external one.
            if (env.action == Action::NetworkLock) == external {
                lock_source(env, config, &task, &mut report)?;
            }
        }
        Action::PostDump => {
            let task = task_netns(env)?;
            let name = freeze_name(&task);
            let result = post_dump(env, config, &task, &name, &mut report);
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
                    lock_destination(env, config, &netns, &sidecar, &mut report)?;
                } else {
                    unlock(config, &netns, &sidecar, &mut report)?;
                }
            }
        }
        Action::SetupNamespaces => {
            let sidecar = Sidecar::read(&env.image_dir)?.unwrap_or_default();
            lock_destination(env, config, &task_netns(env)?, &sidecar, &mut report)?;
        }
        // Also after a failed dump: the freeze is lifted and the tasks run on.
        Action::NetworkUnlock => {
            let sidecar = Sidecar::read(&env.image_dir)?.unwrap_or_default();
            unlock(config, &task_netns(env)?, &sidecar, &mut report)?;
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

/// Freezes the dumped tree's connections (or the configured services) and starts the guard.
fn lock_source(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let (name, mut freeze) = attach_freeze(netns, config)?;
    let addresses: BTreeSet<IpAddr> = if config.services.is_empty() {
        let tuples = tree_connections(netns, env.init_pid()?)?;
        freeze
            .freeze_tuples(&tuples, config.deadline)
            .step("freezing the process tree's connections")?;
        report.connections = tuples.len();
        tuples.iter().map(|t| t.local.ip().to_canonical()).collect()
    } else {
        freeze
            .freeze_services(&config.services, config.deadline)
            .step("freezing the services")?;
        report.services = config.services.len();
        config.services.iter().map(SocketAddr::ip).collect()
    };
    let spec = GuardSpec {
        name: name.clone(),
        criu_pid: env.criu_pid,
        task_pid: env.init_pid,
        addresses: addresses.into_iter().collect(),
        deadline_s: config.deadline.as_secs_f64(),
    };
    guard::spawn(netns, &spec)?;
    freeze.keep();
    report.freeze = Some(name);
    Ok(())
}

/// Checks that every dumped connection was frozen, records them for the restore, and moves the
/// address off the source when configured (then the freeze is no longer needed).
fn post_dump(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    name: &str,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let tuples = tree_connections(netns, env.init_pid()?)?;
    let unfrozen = freeze::unfrozen(netns, &tuples).step("checking the freeze")?;
    if let Some(&first) = unfrozen.first() {
        return Err(CriuError::NotFrozen {
            count: unfrozen.len(),
            first,
        });
    }
    Sidecar {
        external_netns: !same_netns(netns)?,
        services: config.services.clone(),
        tuples: tuples.iter().map(|t| (t.local, t.remote)).collect(),
    }
    .write(&env.image_dir)?;
    report.connections = tuples.len();
    report.freeze = Some(name.to_owned());
    if let Some((addr, prefix_len)) = config.address {
        match net::delete_address(netns, &config.dev, addr, prefix_len) {
            Ok(()) | Err(NetError::AddressMissing { .. }) => {}
            Err(source) => {
                return Err(CriuError::Net {
                    step: "deleting the service address from the source",
                    source: Box::new(source),
                });
            }
        }
        remove_freeze(name)?;
    }
    Ok(())
}

/// Freezes the connections to restore before their address is on the destination, then adds it
/// when configured.
fn lock_destination(
    env: &HookEnv,
    config: &Config,
    netns: &Netns,
    sidecar: &Sidecar,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let (name, mut freeze) = attach_freeze(netns, config)?;
    let services = if config.services.is_empty() {
        &sidecar.services
    } else {
        &config.services
    };
    freeze
        .freeze_services(services, config.deadline)
        .step("freezing the services")?;
    freeze
        .freeze_tuples(&sidecar.tuples(), config.deadline)
        .step("freezing the connections to restore")?;
    report.services = services.len();
    report.connections = sidecar.tuples.len();
    if let Some((addr, prefix_len)) = config.address {
        net::add_address(netns, &config.dev, addr, prefix_len)
            .step("adding the service address on the destination")?;
    }
    guard::spawn(
        netns,
        &GuardSpec {
            name: name.clone(),
            criu_pid: env.criu_pid,
            task_pid: None,
            addresses: Vec::new(),
            deadline_s: config.deadline.as_secs_f64(),
        },
    )?;
    freeze.keep();
    report.freeze = Some(name);
    Ok(())
}

/// Announces the connections' addresses from their new home, then lifts and removes the freeze:
/// CRIU switches repair off right after, with traffic flowing.
fn unlock(
    config: &Config,
    netns: &Netns,
    sidecar: &Sidecar,
    report: &mut HookReport,
) -> Result<(), CriuError> {
    let name = freeze_name(netns);
    let mut addresses = sidecar.local_addresses();
    addresses.extend(config.address.map(|(addr, _)| addr));
    for addr in addresses {
        match net::announce(
            netns,
            &config.dev,
            addr,
            net::ANNOUNCE_COUNT,
            net::ANNOUNCE_INTERVAL,
        ) {
            // Not ours to announce (a failed dump's unlock, an address on another interface).
            Ok(()) | Err(NetError::NotOnInterface { .. }) => {}
            Err(source) => {
                let _ = freeze::remove(&name);
                return Err(CriuError::Net {
                    step: "announcing the service address",
                    source: Box::new(source),
                });
            }
        }
    }
    remove_freeze(&name)?;
    report.freeze = Some(name);
    report.connections = sidecar.tuples.len();
    Ok(())
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

/// Every TCP connection of the process tree rooted at `root`, in any state.
fn tree_connections(netns: &Netns, root: u32) -> Result<Vec<Tuple>, CriuError> {
    let mut tuples = BTreeSet::new();
    for pid in process_tree(root) {
        let found = match repair::discover(netns, pid, &Filter::default()) {
            Ok(found) => found,
            // A child that exited since it was listed has no connections left.
            Err(RepairError::Process { .. }) if pid != root => continue,
            Err(source) => {
                return Err(CriuError::Repair {
                    step: "listing the process tree's connections",
                    source: Box::new(source),
                });
            }
        };
        tuples.extend(found.sockets.iter().map(|s| s.tuple));
        tuples.extend(found.skipped.iter().map(|(tuple, _)| *tuple));
    }
    debug!(root, count = tuples.len(), "connections of the tree");
    Ok(tuples.into_iter().collect())
}

/// `root` and its descendants, from /proc/PID/task/TID/children (bounded: each pid once).
fn process_tree(root: u32) -> Vec<u32> {
    let mut seen = HashSet::from([root]);
    let mut order = vec![root];
    let mut next = 0;
    while let Some(&pid) = order.get(next) {
        next += 1;
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if seen.insert(child) {
                    order.push(child);
                }
            }
        }
    }
    order
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

/// Whether this process was started as the action script (argv[0]'s file name).
pub fn invoked_as_hook(argv0: &Path) -> bool {
    argv0.file_name().is_some_and(|name| name == HOOK_NAME)
}

/// Makes `dir/tcpmig-criu-hook` a link to `exe` (replacing an older link there); returns its path.
pub fn install(dir: &Path, exe: &Path) -> Result<PathBuf, CriuError> {
    let link = dir.join(HOOK_NAME);
    let io_error = |step| {
        let path = link.clone();
        move |source| CriuError::Io { step, path, source }
    };
    match fs::symlink_metadata(&link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::remove_file(&link).map_err(io_error("replacing the old link"))?;
        }
        Ok(_) => {
            return Err(CriuError::Config(format!(
                "{} exists and is not a link: remove it or choose another --dir",
                link.display()
            )));
        }
        Err(_) => {}
    }
    fs::create_dir_all(dir).map_err(io_error("creating the directory"))?;
    std::os::unix::fs::symlink(exe, &link).map_err(io_error("creating the link"))?;
    Ok(link)
}

/// Parses a duration in seconds as the configuration gives it.
fn seconds(value: &str, what: &str) -> Result<Duration, CriuError> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            CriuError::Config(format!(
                "{what}={value:?}: give a positive number of seconds"
            ))
        })
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

    #[test]
    fn sidecar_lists_local_addresses_once() {
        let sidecar = Sidecar {
            external_netns: false,
            services: vec!["198.18.0.100:80".parse().unwrap()],
            tuples: vec![(
                "[::ffff:198.18.0.100]:80".parse().unwrap(),
                "198.18.0.1:4000".parse().unwrap(),
            )],
        };
        assert_eq!(sidecar.local_addresses().len(), 1);
    }
}
