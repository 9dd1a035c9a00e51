//! Freeze plane: TC programs on the service's interface drop the traffic of frozen services and
//! connections, in both directions, with one map update per service.
//!
//! A freeze has a name. Its programs are attached with tcx links (clsact filters on kernels
//! before 6.6) and everything is pinned under /sys/fs/bpf/tcpmig/<name>/, so a freeze set by one
//! process (a CRIU action script, say) is seen and lifted by another. Every entry carries a
//! deadline after which the programs let traffic pass again by themselves. A freeze attached with
//! [`Freeze::attach_unpinned`] instead lives only as long as its handle: a process that must not
//! leave one behind even when killed (the migration agent) uses that.
mod pins;

use std::{
    ffi::CString,
    io,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, TcAttach},
    },
    util::KernelVersion,
};
use migrate_common::{
    COUNTERS_MAP, Counter, FAMILY_V4, FAMILY_V6, FreezeValue, SERVICES_MAP, ServiceKey, TUPLES_MAP,
    TupleKey,
};
use serde::{Deserialize, Serialize};

pub use self::pins::{PIN_ROOT, ensure_bpffs};
use crate::{
    net::{Netns, NetnsError},
    sys::{self, Capability},
    tuple::{Tuple, canonical},
};

/// The compiled freeze programs, built from migrate-ebpf by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/migrate-ebpf"));

const INGRESS_PROGRAM: &str = "tcpmig_ingress";
const EGRESS_PROGRAM: &str = "tcpmig_egress";

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
    Bpffs(#[source] io::Error),
    #[error("freeze {name}: {what}")]
    Io {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("loading the freeze programs")]
    Load(#[from] aya::EbpfError),
    #[error("freeze program")]
    Program(#[from] aya::programs::ProgramError),
    #[error("freeze map")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning")]
    Pin(#[from] aya::pin::PinError),
    #[error("freeze link")]
    Link(#[from] aya::programs::links::LinkError),
    #[error("attaching clsact on {dev}")]
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
    pub netns: String,
    pub netns_inode: u64,
    pub dev: String,
    pub ifindex: u32,
    pub attach: AttachMode,
}

/// One frozen entry as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FrozenEntry {
    pub service: Option<SocketAddr>,
    pub tuple: Option<(SocketAddr, SocketAddr)>,
    /// Seconds since the entry was frozen.
    pub frozen_for_s: f64,
    /// Seconds until the programs let its traffic through again (negative: expired).
    pub deadline_in_s: f64,
}

/// Totals of the per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub syn_dropped: u64,
    pub ingress_dropped: u64,
    pub egress_dropped: u64,
    pub passed_after_deadline: u64,
    pub criu_mark_passed: u64,
}

impl Counters {
    fn set(&mut self, counter: Counter, value: u64) {
        match counter {
            Counter::SynDropped => self.syn_dropped = value,
            Counter::IngressDropped => self.ingress_dropped = value,
            Counter::EgressDropped => self.egress_dropped = value,
            Counter::PassedAfterDeadline => self.passed_after_deadline = value,
            Counter::CriuMarkPassed => self.criu_mark_passed = value,
        }
    }

    /// Segments and SYNs dropped in both directions.
    pub fn dropped(&self) -> u64 {
        self.syn_dropped + self.ingress_dropped + self.egress_dropped
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FreezeStatus {
    #[serde(flatten)]
    pub info: FreezeInfo,
    pub services: Vec<FrozenEntry>,
    /// Frozen 4-tuples, listed when there are few (see `tuple_count` otherwise).
    pub tuples: Vec<FrozenEntry>,
    pub tuple_count: usize,
    pub counters: Counters,
}

/// Status lists tuples one by one only up to this many.
const STATUS_TUPLE_LIST_MAX: usize = 32;

/// An attached freeze, its maps open. A pinned one ([`Freeze::attach`]) stays attached after this
/// handle (and the process) is gone, until [`Freeze::remove`] or `tcpmig unfreeze`; an unpinned
/// one ([`Freeze::attach_unpinned`]) is detached when the handle drops.
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

    pub fn info(&self) -> &FreezeInfo {
        &self.info
    }

    /// Freezes every connection of each service (local address and port): one map update per
    /// service, whatever the number of connections.
    pub fn freeze_services(
        &mut self,
        services: &[SocketAddr],
        ttl: Duration,
    ) -> Result<(), FreezeError> {
        let value = freeze_value(ttl);
        for &service in services {
            self.services.insert(&service_key(service), &value, 0)?;
        }
        Ok(())
    }

    /// Freezes these connections only, in batches (BPF_MAP_UPDATE_BATCH).
    pub fn freeze_tuples(&mut self, tuples: &[Tuple], ttl: Duration) -> Result<(), FreezeError> {
        let keys: Vec<TupleKey> = tuples.iter().map(tuple_key).collect();
        let values = vec![freeze_value(ttl); keys.len()];
        sys::map_update_batch(self.tuples_fd.as_fd(), &keys, &values).map_err(|source| {
            FreezeError::Io {
                name: self.info.name.clone(),
                what: "batch update of the tuples map",
                source,
            }
        })
    }

    pub fn thaw_services(&mut self, services: &[SocketAddr]) -> Result<(), FreezeError> {
        for &service in services {
            match self.services.remove(&service_key(service)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub fn thaw_tuples(&mut self, tuples: &[Tuple]) -> Result<(), FreezeError> {
        let keys: Vec<TupleKey> = tuples.iter().map(tuple_key).collect();
        self.delete_tuple_keys(&keys)
    }

    /// Lifts every entry of this freeze; the programs stay attached, idle.
    pub fn thaw_all(&mut self) -> Result<(), FreezeError> {
        let services = self.services.keys().collect::<Result<Vec<_>, _>>()?;
        for key in services {
            self.services.remove(&key)?;
        }
        let tuples = self.tuples.keys().collect::<Result<Vec<_>, _>>()?;
        self.delete_tuple_keys(&tuples)
    }

    fn delete_tuple_keys(&mut self, keys: &[TupleKey]) -> Result<(), FreezeError> {
        sys::map_delete_batch(self.tuples_fd.as_fd(), keys).map_err(|source| FreezeError::Io {
            name: self.info.name.clone(),
            what: "batch delete from the tuples map",
            source,
        })
    }

    /// Whether the traffic of `tuple` is dropped now: a service or 4-tuple entry covers it and
    /// its deadline has not passed.
    pub fn is_frozen(&self, tuple: &Tuple) -> Result<bool, FreezeError> {
        let now = u64::try_from(sys::monotonic_now().as_nanos()).unwrap_or(u64::MAX);
        let live = |entry: Result<FreezeValue, aya::maps::MapError>| match entry {
            Ok(value) => Ok(value.deadline_ns > now),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(FreezeError::Map(e)),
        };
        Ok(live(self.services.get(&service_key(tuple.local), 0))?
            || live(self.tuples.get(&tuple_key(tuple), 0))?)
    }

    pub fn counters(&self) -> Result<Counters, FreezeError> {
        let mut counters = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = self.counters.get(&(counter as u32), 0)?;
            counters.set(counter, per_cpu.iter().sum());
        }
        Ok(counters)
    }

    pub fn status(&self) -> Result<FreezeStatus, FreezeError> {
        let now = sys::monotonic_now();
        let services = self
            .services
            .iter()
            .map(|entry| entry.map(|(key, value)| frozen_entry(now, &value, Some(key), None)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tuples = Vec::new();
        let mut tuple_count = 0;
        for entry in self.tuples.iter() {
            let (key, value) = entry?;
            tuple_count += 1;
            if tuples.len() < STATUS_TUPLE_LIST_MAX {
                tuples.push(frozen_entry(now, &value, None, Some(key)));
            }
        }
        Ok(FreezeStatus {
            info: self.info.clone(),
            services,
            tuples,
            tuple_count,
            counters: self.counters()?,
        })
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

impl Drop for Freeze {
    fn drop(&mut self) {
        // Owned tcx links detach as their fds close, after this; clsact filters need a request.
        if matches!(self.links, Links::Owned { .. })
            && self.info.attach == AttachMode::Clsact
            && let Err(error) = detach_clsact(&self.info)
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
            detach_tcx_links(name)?;
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

/// The tuples of `tuples` that no freeze attached in `netns` covers now.
pub fn unfrozen(netns: &Netns, tuples: &[Tuple]) -> Result<Vec<Tuple>, FreezeError> {
    let freezes = infos(Some(netns))?
        .into_iter()
        .map(Freeze::open_with)
        .collect::<Result<Vec<_>, _>>()?;
    let mut left = Vec::new();
    for tuple in tuples {
        let mut covered = false;
        for freeze in &freezes {
            if freeze.is_frozen(tuple)? {
                covered = true;
                break;
            }
        }
        if !covered {
            left.push(*tuple);
        }
    }
    Ok(left)
}

/// The status of every freeze, or of those in `netns`.
pub fn statuses(netns: Option<&Netns>) -> Result<Vec<FreezeStatus>, FreezeError> {
    infos(netns)?
        .into_iter()
        .map(|info| Freeze::open_with(info)?.status())
        .collect()
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

fn remove_by_info(info: &FreezeInfo) -> Result<(), FreezeError> {
    match info.attach {
        AttachMode::Tcx => detach_tcx_links(&info.name)?,
        AttachMode::Clsact => detach_clsact(info)?,
    }
    pins::remove_all(&info.name)
}

fn detach_clsact(info: &FreezeInfo) -> Result<(), FreezeError> {
    let netns = Netns::open(&info.netns)?;
    netns.run(|| {
        for (program, attach_type) in programs() {
            // Already gone (interface deleted, say) is fine: we are removing it.
            let _ = tc::qdisc_detach_program(info.ifindex, attach_type.into(), program);
        }
    })?;
    Ok(())
}

fn detach_tcx_links(name: &str) -> Result<(), FreezeError> {
    for (program, _) in programs() {
        match sys::detach_pinned_link(&pins::dir(name).join(program)) {
            // Already gone (a half-made freeze, or the interface was deleted) is fine: we are
            // removing it.
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOLINK)) => {}
            Err(source) => {
                return Err(FreezeError::Io {
                    name: name.to_owned(),
                    what: "detaching a program",
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The RAII form: removes the freeze when dropped, for callers whose freeze must not outlive
/// them (tests, and migrations until they commit to keeping it).
pub struct RemoveOnDrop(Option<Freeze>);

impl RemoveOnDrop {
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

fn programs() -> [(&'static str, TcAttachType); 2] {
    [
        (INGRESS_PROGRAM, TcAttachType::Ingress),
        (EGRESS_PROGRAM, TcAttachType::Egress),
    ]
}

/// Whether [`attach_programs`] pins the tcx links or hands them over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pin {
    Yes,
    No,
}

/// Loads the programs (their maps pinned in `dir`) and attaches them; runs inside `netns`. The
/// tcx links are pinned in `dir`, or returned with [`Pin::No`].
fn attach_programs(
    netns: &Netns,
    dev: &str,
    name: &str,
    dir: &Path,
    pin: Pin,
) -> Result<(FreezeInfo, Links), FreezeError> {
    let unknown = || FreezeError::UnknownInterface {
        dev: dev.to_owned(),
        netns: netns.spec().to_owned(),
    };
    let dev_c = CString::new(dev).map_err(|_| unknown())?;
    // SAFETY: valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(dev_c.as_ptr()) };
    if ifindex == 0 {
        return Err(unknown());
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(PROGRAMS)?;
    // tcx needs 6.6; an unreadable version is taken as new enough, and attach says otherwise.
    let tcx = KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0));
    let attach = if tcx {
        AttachMode::Tcx
    } else {
        AttachMode::Clsact
    };
    if attach == AttachMode::Clsact {
        match tc::qdisc_add_clsact(ifindex) {
            // An existing clsact (ours or someone's) is what we need.
            Ok(()) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(FreezeError::Clsact {
                    dev: dev.to_owned(),
                    source,
                });
            }
        }
    }
    let mut owned = Vec::new();
    for (program, attach_type) in programs() {
        let classifier: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or_else(|| aya::programs::ProgramError::UnexpectedProgramType)?
            .try_into()?;
        classifier.load()?;
        let link_id = classifier.attach(ifindex, TcAttach::Auto(attach_type))?;
        let link = classifier.take_link(link_id)?;
        match (attach, pin) {
            (AttachMode::Tcx, Pin::Yes) => {
                let link: FdLink = link.try_into()?;
                let _: PinnedLink = link.pin(dir.join(program))?;
            }
            (AttachMode::Tcx, Pin::No) => owned.push(link.try_into()?),
            // A clsact filter stays on the qdisc once our handle is gone; remove() (or the
            // unpinned handle's drop) deletes it.
            (AttachMode::Clsact, _) => std::mem::forget(link),
        }
    }
    let info = FreezeInfo {
        name: name.to_owned(),
        netns: netns.spec().to_owned(),
        netns_inode: netns.inode(),
        dev: dev.to_owned(),
        ifindex,
        attach,
    };
    let links = match pin {
        Pin::Yes => Links::Pinned,
        Pin::No => Links::Owned { _links: owned },
    };
    Ok((info, links))
}

/// Names of the tcpmig programs attached with tcx on `dev` in `netns`, both directions: how a
/// test or an operator checks that nothing of ours is left on an interface.
pub fn attached_programs(netns: &Netns, dev: &str) -> Result<Vec<String>, FreezeError> {
    let dev_c = CString::new(dev).map_err(|_| FreezeError::UnknownInterface {
        dev: dev.to_owned(),
        netns: netns.spec().to_owned(),
    })?;
    netns.run(|| {
        let mut names = Vec::new();
        for (_, attach_type) in programs() {
            let (_, infos) = SchedClassifier::query_tcx(dev_c.as_c_str(), attach_type)?;
            names.extend(
                infos
                    .iter()
                    .filter_map(|info| info.name_as_str().map(str::to_owned))
                    .filter(|name| name.starts_with("tcpmig_")),
            );
        }
        Ok(names)
    })?
}

/// Fails early, naming the capability, instead of with a bare EPERM from the bpf syscall.
pub fn check_privileges() -> Result<(), FreezeError> {
    sys::require_capabilities(
        "freezing traffic with eBPF",
        &[Capability::NetAdmin, Capability::Bpf],
    )?;
    Ok(())
}

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

fn freeze_value(ttl: Duration) -> FreezeValue {
    let now = sys::monotonic_now();
    FreezeValue {
        deadline_ns: u64::try_from(now.saturating_add(ttl).as_nanos()).unwrap_or(u64::MAX),
        since_ns: u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
    }
}

fn frozen_entry(
    now: Duration,
    value: &FreezeValue,
    service: Option<ServiceKey>,
    tuple: Option<TupleKey>,
) -> FrozenEntry {
    let now_ns = now.as_nanos() as f64;
    FrozenEntry {
        service: service.map(|key| socket_addr(key.family, key.addr, key.port)),
        tuple: tuple.map(|key| {
            (
                socket_addr(key.family, key.local_addr, key.local_port),
                socket_addr(key.family, key.remote_addr, key.remote_port),
            )
        }),
        frozen_for_s: (now_ns - value.since_ns as f64) / 1e9,
        deadline_in_s: (value.deadline_ns as f64 - now_ns) / 1e9,
    }
}

fn addr_bytes(addr: SocketAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0u8; 16];
    match canonical(addr).ip() {
        std::net::IpAddr::V4(ip) => {
            bytes[..4].copy_from_slice(&ip.octets());
            (FAMILY_V4, bytes)
        }
        std::net::IpAddr::V6(ip) => (FAMILY_V6, ip.octets()),
    }
}

fn socket_addr(family: u8, bytes: [u8; 16], port: u16) -> SocketAddr {
    let ip: std::net::IpAddr = if family == FAMILY_V4 {
        std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    } else {
        std::net::Ipv6Addr::from(bytes).into()
    };
    SocketAddr::new(ip, port)
}

pub fn service_key(service: SocketAddr) -> ServiceKey {
    let (family, addr) = addr_bytes(service);
    ServiceKey {
        addr,
        port: service.port(),
        family,
        _pad: 0,
    }
}

pub fn tuple_key(tuple: &Tuple) -> TupleKey {
    let (family, local_addr) = addr_bytes(tuple.local);
    let (_, remote_addr) = addr_bytes(tuple.remote);
    TupleKey {
        local_addr,
        remote_addr,
        local_port: tuple.local.port(),
        remote_port: tuple.remote.port(),
        family,
        _pad: [0; 3],
    }
}

/// Runs the ingress program once on a raw Ethernet frame (BPF_PROG_TEST_RUN), with the maps of
/// freeze `name`; returns the TC verdict. For tests and `tcpmig` self checks.
pub fn test_run_ingress(name: &str, frame: &[u8]) -> Result<i32, FreezeError> {
    let dir = pins::dir(name);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&dir)
        .load(PROGRAMS)?;
    let classifier: &mut SchedClassifier = ebpf
        .program_mut(INGRESS_PROGRAM)
        .ok_or_else(|| aya::programs::ProgramError::UnexpectedProgramType)?
        .try_into()?;
    classifier.load()?;
    let verdict =
        sys::prog_test_run(classifier.fd()?.as_fd(), frame).map_err(|source| FreezeError::Io {
            name: name.to_owned(),
            what: "BPF_PROG_TEST_RUN",
            source,
        })?;
    Ok(verdict as i32)
}
