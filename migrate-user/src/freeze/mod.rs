//! Freeze plane: TC programs on the service's interface drop the traffic of frozen services and
//! connections, in both directions, with one map update per service.
//!
//! A freeze has a name. Its programs are attached with tcx links (clsact filters on kernels
//! before 6.6) and everything is pinned under `/sys/fs/bpf/tcpmig/<name>/`, so a freeze set by one
//! process (a CRIU action script, say) is seen and lifted by another. Every entry carries a
//! deadline after which the programs let traffic pass again by themselves. A freeze attached with
//! [`Freeze::attach_unpinned`] instead lives only as long as its handle: a process that must not
//! leave one behind even when killed (the migration agent) uses that. Where the freeze sits in a
//! migration: docs/architecture.md; in a CRIU dump: docs/criu.md.
//!
//! The steps live in their own files: attach (load, attach, detach), entries (services and
//! 4-tuples, their map keys), status (entries and counters), and pins (what lets a freeze
//! outlive its process). [`hold`] keeps what the freeze drops, for the destination.
//!
//! # Why the programs do not log (no aya-log)
//! The rare events (an entry's deadline passing, which lets traffic flow again) are counted,
//! not logged. A log needs a reader: aya-log's user side drains the programs' log buffer from
//! the process that loaded them. A pinned freeze outlives that process (an action script lives
//! for milliseconds), and a deadline passes precisely when nobody is left (a migration that
//! crashed), so the lines would sit unread. The programs have no timer either: a deadline
//! "passes" for them on each packet that arrives after it, so a log would be per packet. The
//! per-CPU counters are pinned with the maps and outlive every process: `passed_after_deadline`
//! counts the packets let through after a deadline, and `tcpmig status` reports them with each
//! entry's deadline ("deadline passed"). The programs hold no packets (a [`hold`] keeps them in
//! a socket, and reports its own overflow).
mod attach;
mod entries;
pub mod hold;
mod pins;
mod status;
mod steer;

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{links::FdLink, tc},
};
use migrate_common::{COUNTERS_MAP, FreezeValue, SERVICES_MAP, ServiceKey, TUPLES_MAP, TupleKey};
use serde::{Deserialize, Serialize};

use self::attach::{Pin, attach_programs};
pub use self::{
    attach::{attached_programs, check_privileges, test_run_ingress},
    entries::{service_key, tuple_key, unfrozen},
    pins::{PIN_ROOT, ensure_bpffs},
    status::{
        Counters, FreezeStatus, FrozenEntry, SteeredStatus, SteeringStatus, statuses,
        steering_statuses,
    },
    steer::{NextHop, STEER_ROOT, SteerCost, Steered, Steering},
};
use crate::{
    net::{Netns, NetnsError},
    sys,
};

/// What can fail in the freeze plane; each names the freeze or interface concerned.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error(transparent)]
    MissingCapability(#[from] sys::MissingCapability),
    #[error("invalid freeze name {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("no interface {dev} in network namespace {netns}")]
    UnknownInterface { dev: String, netns: String },
    #[error("freeze {name} already exists on {dev} in another network namespace or interface")]
    NameInUse { name: String, dev: String },
    #[error(
        "freeze {0} is pinned under {PIN_ROOT}/{0}: remove it (`tcpmig unfreeze`) or choose \
         another name"
    )]
    Pinned(String),
    #[error("no freeze named {0} (nothing pinned under {PIN_ROOT}/{0})")]
    NotFound(String),
    #[error("mounting bpffs for {PIN_ROOT}")]
    Bpffs(#[source] std::io::Error),
    #[error("freeze {name}: {what}")]
    Io {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("loading the freeze programs")]
    Load(#[from] aya::EbpfError),
    #[error("loading or attaching a freeze program")]
    Program(#[from] aya::programs::ProgramError),
    #[error("reading or writing a freeze map")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning a freeze link under {PIN_ROOT}")]
    Pin(#[from] aya::pin::PinError),
    #[error("taking over a freeze link")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("adding a clsact qdisc on {dev}")]
    Clsact { dev: String, source: tc::TcError },
    #[error("freeze {name}: corrupt metadata {path}")]
    Metadata {
        name: String,
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// How the programs are attached: recorded so that another process can detach them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

/// What `tcpmig status` and `unfreeze` need to know about a freeze besides its maps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeInfo {
    pub name: String,
    /// The namespace as given (a name under /run/netns or a path), reopened to detach.
    pub netns: String,
    pub netns_inode: u64,
    pub dev: String,
    pub ifindex: u32,
    pub attach: AttachMode,
}

/// An attached freeze, its maps open. A pinned one ([`Freeze::attach`]) stays attached after this
/// handle (and the process) is gone, until [`Freeze::remove`] or `tcpmig unfreeze`; an unpinned
/// one ([`Freeze::attach_unpinned`]) is detached when the handle drops.
///
/// # Examples
/// Freeze a service for the time of a dump, then let its traffic through again (needs root):
/// ```no_run
/// use std::{net::SocketAddr, time::Duration};
///
/// use tcpmig::{freeze::Freeze, net::Netns};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let netns = Netns::current()?;
/// let mut freeze = Freeze::attach(&netns, "eth0", "example")?;
/// let service: SocketAddr = "192.0.2.10:80".parse()?;
/// // Every connection of the service, whatever their number; at most 10 s.
/// freeze.freeze_services(&[service], Duration::from_secs(10))?;
/// // ... dump the connections ...
/// freeze.thaw_services(&[service])?;
/// freeze.remove()?;
/// # Ok(())
/// # }
/// ```
pub struct Freeze {
    info: FreezeInfo,
    services: HashMap<MapData, ServiceKey, FreezeValue>,
    tuples: HashMap<MapData, TupleKey, FreezeValue>,
    tuples_fd: OwnedFd,
    counters: PerCpuArray<MapData, u64>,
    links: Links,
}

/// What keeps a freeze's programs attached.
enum Links {
    /// Pins (tcx) or the qdisc (clsact): they outlive the handle and the process.
    Pinned,
    /// The handle's own tcx links: the kernel detaches them when their last fd closes, also when
    /// the process is killed. Clsact filters (kernels before 6.6) are deleted when the handle
    /// drops; a killed process leaves those behind.
    Owned { _links: Vec<FdLink> },
}

impl Freeze {
    /// Attaches the freeze programs to `dev` in `netns` under `name`, or opens the freeze of
    /// that name if it is already attached there: attaching ten times leaves one program per
    /// direction. Nothing is frozen yet.
    pub fn attach(netns: &Netns, dev: &str, name: &str) -> Result<Self, FreezeError> {
        check_privileges()?;
        validate_name(name)?;
        ensure_bpffs().map_err(FreezeError::Bpffs)?;
        if let Some(info) = pins::read_info(name)? {
            if info.netns_inode != netns.inode() || info.dev != dev {
                return Err(FreezeError::NameInUse {
                    name: name.to_owned(),
                    dev: info.dev,
                });
            }
            if pins::links_present(name) {
                return Self::open_with(info);
            }
        }
        let dir = pins::PinDir::create(name)?;
        let (info, _) = netns.run(|| attach_programs(netns, dev, name, dir.path(), Pin::Yes))??;
        pins::write_info(&info)?;
        dir.keep();
        Self::open_with(info)
    }

    /// Attaches the freeze programs to `dev` in `netns` for as long as the returned handle lives:
    /// nothing is pinned and no metadata is written, so a process killed at any point leaves
    /// nothing attached (tcx), and other processes (`tcpmig status`, `unfreeze`) do not see it.
    /// Nothing is frozen yet.
    pub fn attach_unpinned(netns: &Netns, dev: &str, name: &str) -> Result<Self, FreezeError> {
        check_privileges()?;
        validate_name(name)?;
        ensure_bpffs().map_err(FreezeError::Bpffs)?;
        if pins::dir(name).exists() || pins::read_info(name)?.is_some() {
            return Err(FreezeError::Pinned(name.to_owned()));
        }
        // The programs declare their maps pinned by name, which the loader always honours: they
        // are pinned in the freeze's directory for the time of the attach, and this guard removes
        // it (the open maps live on). A process killed meanwhile leaves only that directory,
        // which `remove` deletes.
        let dir = pins::PinDir::create(name)?;
        let (info, links) =
            netns.run(|| attach_programs(netns, dev, name, dir.path(), Pin::No))??;
        let freeze = Self::open_with_links(info, links)?;
        drop(dir);
        Ok(freeze)
    }

    /// Opens an existing freeze by name, from any process.
    pub fn open(name: &str) -> Result<Self, FreezeError> {
        check_privileges()?;
        validate_name(name)?;
        let info = pins::read_info(name)?.ok_or_else(|| FreezeError::NotFound(name.to_owned()))?;
        Self::open_with(info)
    }

    /// Names of all freezes pinned on this machine.
    pub fn list() -> Result<Vec<String>, FreezeError> {
        pins::list_names()
    }

    fn open_with(info: FreezeInfo) -> Result<Self, FreezeError> {
        Self::open_with_links(info, Links::Pinned)
    }

    /// Opens the maps pinned for `info`, with `links` keeping the programs attached.
    fn open_with_links(info: FreezeInfo, links: Links) -> Result<Self, FreezeError> {
        let dir = pins::dir(&info.name);
        let open = |map: &str| -> Result<Map, FreezeError> {
            Ok(Map::from_map_data(MapData::from_pin(dir.join(map))?)?)
        };
        let tuples_data = MapData::from_pin(dir.join(TUPLES_MAP))?;
        let tuples_fd = tuples_data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| FreezeError::Io {
                name: info.name.clone(),
                what: "duplicating the tuples map fd",
                source,
            })?;
        Ok(Self {
            services: HashMap::try_from(open(SERVICES_MAP)?)?,
            tuples: HashMap::try_from(Map::from_map_data(tuples_data)?)?,
            tuples_fd,
            counters: PerCpuArray::try_from(open(COUNTERS_MAP)?)?,
            info,
            links,
        })
    }

    /// Where this freeze is attached, as recorded for other processes.
    pub fn info(&self) -> &FreezeInfo {
        &self.info
    }

    /// Detaches the programs and removes every pin and the metadata of this freeze: traffic
    /// flows, and nothing of tcpmig is left on the interface.
    pub fn remove(self) -> Result<(), FreezeError> {
        let info = self.info.clone();
        let pinned = matches!(self.links, Links::Pinned);
        // An unpinned freeze detaches as it drops.
        drop(self);
        if pinned {
            remove_by_info(&info)
        } else {
            Ok(())
        }
    }
}

impl Freeze {
    /// [`Freeze::remove`] without waiting for the kernel to detach the programs, for a freeze of
    /// this process's own tcx links (unpinned): a keeper process holds copies of the links and
    /// closes them last, so the detach (an RCU grace period per program: 25-30 ms for the two
    /// here) happens there. The agent's freeze goes this way just before the hand-over.
    pub fn remove_in_background(self) -> Result<(), FreezeError> {
        if !matches!(self.links, Links::Owned { .. }) || self.info.attach != AttachMode::Tcx {
            return self.remove();
        }
        let keeper = sys::keep_files().map_err(|source| FreezeError::Io {
            name: self.info.name.clone(),
            what: "starting a process to detach the programs",
            source,
        })?;
        drop(self);
        keeper.release();
        Ok(())
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        // Owned tcx links detach as their fds close, after this; clsact filters need a request.
        if matches!(self.links, Links::Owned { .. })
            && self.info.attach == AttachMode::Clsact
            && let Err(error) = attach::detach_clsact(&self.info)
        {
            tracing::warn!(name = %self.info.name, %error, "detaching the freeze's filters");
        }
    }
}

/// Removes a freeze by name (programs, links, pins, metadata).
pub fn remove(name: &str) -> Result<(), FreezeError> {
    validate_name(name)?;
    match pins::read_info(name)? {
        Some(info) => remove_by_info(&info),
        // A process killed while attaching pinned some of it but wrote no metadata yet: tcx
        // links detach by their pins alone.
        None if pins::dir(name).exists() => {
            attach::detach_tcx_links(name)?;
            pins::remove_all(name)
        }
        None => Err(FreezeError::NotFound(name.to_owned())),
    }
}

/// Removes every freeze attached in `netns`; returns their names.
pub fn remove_all_in(netns: &Netns) -> Result<Vec<String>, FreezeError> {
    let mut removed = Vec::new();
    for info in infos(Some(netns))? {
        remove_by_info(&info)?;
        removed.push(info.name);
    }
    Ok(removed)
}

fn remove_by_info(info: &FreezeInfo) -> Result<(), FreezeError> {
    attach::detach(info)?;
    pins::remove_all(&info.name)
}

/// What is recorded of every freeze, or of those in `netns`.
fn infos(netns: Option<&Netns>) -> Result<Vec<FreezeInfo>, FreezeError> {
    let mut infos = Vec::new();
    for name in pins::list_names()? {
        match pins::read_info(&name)? {
            Some(info) if netns.is_none_or(|ns| ns.inode() == info.netns_inode) => infos.push(info),
            _ => {}
        }
    }
    Ok(infos)
}

/// The freeze name used when none is given: the namespace's name, or its inode for a path.
pub fn default_name(netns: &Netns) -> String {
    let spec = netns.spec();
    if spec.contains('/') {
        format!("ns{}", netns.inode())
    } else {
        spec.to_owned()
    }
}

/// The RAII form: removes the freeze when dropped, for callers whose freeze must not outlive
/// them (tests, and migrations until they commit to keeping it).
pub struct RemoveOnDrop(Option<Freeze>);

impl RemoveOnDrop {
    /// Takes charge of `freeze`: dropping the guard removes it.
    pub fn new(freeze: Freeze) -> Self {
        Self(Some(freeze))
    }

    /// Keeps the freeze pinned after this guard is gone.
    pub fn keep(mut self) -> Freeze {
        self.0.take().expect("freeze present until kept or dropped")
    }
}

impl std::ops::Deref for RemoveOnDrop {
    type Target = Freeze;
    fn deref(&self) -> &Freeze {
        self.0
            .as_ref()
            .expect("freeze present until kept or dropped")
    }
}

impl std::ops::DerefMut for RemoveOnDrop {
    fn deref_mut(&mut self) -> &mut Freeze {
        self.0
            .as_mut()
            .expect("freeze present until kept or dropped")
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(freeze) = self.0.take() {
            let name = freeze.info.name.clone();
            if let Err(error) = freeze.remove() {
                tracing::warn!(%name, %error, "removing freeze");
            }
        }
    }
}

/// Names become directory and file names: nothing that could climb out of them.
fn validate_name(name: &str) -> Result<(), FreezeError> {
    let valid = (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(FreezeError::InvalidName(name.to_owned()))
    }
}
