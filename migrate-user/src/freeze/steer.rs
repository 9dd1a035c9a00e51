//! Steering: the source host forwards the segments of connections it moved to another host
//! while keeping their service address (a rebalance). Clients keep sending to this host (the
//! address and its ARP/ND answers stay here); the steering program, first on the interface's
//! ingress, gives each frame of a moved connection the destination host's MAC and sends it out
//! again, before the freeze or the stack sees it. The destination answers the clients directly
//! (the service address on a device there that does not answer ARP), so only the client-to-server
//! direction crosses this host. docs/rebalance.md draws the path.
//!
//! Steerings are pinned under `/sys/fs/bpf/tcpmig-steer/<name>/` (the program's tcx link and its
//! map), apart from the freezes, so they outlive the process that set them (a moved connection
//! lives on long after its migration) and any process can list, sweep or remove them. tcx only
//! (Linux 6.6 or later): the program must run before a freeze on the same interface.
use std::{
    fs, io,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        TcAttachType,
        links::{FdLink, LinkOrder},
        tc::TcAttach,
    },
};
use migrate_common::{STEER_MAP, SteerValue, TupleKey};

use super::{
    FreezeError, attach, check_privileges, ensure_bpffs,
    entries::{socket_addr, tuple_key},
    pins::io_error,
    validate_name,
};
use crate::{net::Netns, sys, tuple::Tuple};

/// The compiled steering program, built from migrate-ebpf by build.rs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer"));

const PROGRAM_NAME: &str = "tcpmig_steer";
pub const STEER_ROOT: &str = "/sys/fs/bpf/tcpmig-steer";
/// Where each steering notes the network namespace (its inode) and interface it is attached in:
/// one host's namespaces share its bpffs, and a steering belongs to one of them.
const PLACE_ROOT: &str = "/run/tcpmig/steer";

/// TCP flags the program notes from the client: a connection ending.
const FIN: u32 = 0x01;
const RST: u32 = 0x04;

/// Where a moved connection's frames go: the destination host's MAC, through this host's
/// interface (`ifindex`, whose own MAC becomes the frames' source).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// One steered connection and what the program saw of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steered {
    pub tuple: Tuple,
    pub dst_mac: [u8; 6],
    pub packets: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last forwarded segment, or of the steering if none.
    pub last_ns: u64,
    /// The client sent a FIN, or a RST.
    pub fin: bool,
    pub rst: bool,
}

/// A steering program attached to an interface, and its map of moved connections.
pub struct Steering {
    name: String,
    map: HashMap<MapData, TupleKey, SteerValue>,
}

impl Steering {
    /// Attaches the steering program to the ingress of `dev` in `netns`, first among the tcx
    /// programs there, pinned under `name`; or opens the steering of that name if it exists.
    pub fn attach(netns: &Netns, dev: &str, name: &str) -> Result<Self, FreezeError> {
        check_privileges()?;
        validate_name(name)?;
        ensure_bpffs().map_err(FreezeError::Bpffs)?;
        let dir = dir(name);
        if dir.join(PROGRAM_NAME).exists() {
            return Self::open(name);
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_error(name, "creating the pin directory"))?;
        let attached = netns
            .run(|| attach_here(netns, dev, &dir))?
            .and_then(|()| note_place(name, netns, dev));
        if let Err(error) = attached {
            // Nothing half-made stays pinned.
            let _ = fs::remove_dir_all(&dir);
            let _ = fs::remove_file(Path::new(PLACE_ROOT).join(name));
            return Err(error);
        }
        Self::open(name)
    }

    /// The steerings attached in `netns`.
    pub fn list_in(netns: &Netns) -> Result<Vec<String>, FreezeError> {
        let mut names = Self::list()?;
        names.retain(|name| Self::place(name).is_some_and(|(inode, _)| inode == netns.inode()));
        Ok(names)
    }

    /// Where the steering `name` is attached: its network namespace's inode and interface (None
    /// for one whose note is gone).
    pub fn place(name: &str) -> Option<(u64, String)> {
        let place = fs::read_to_string(Path::new(PLACE_ROOT).join(name)).ok()?;
        let (inode, dev) = place.trim().split_once(' ')?;
        Some((inode.parse().ok()?, dev.to_owned()))
    }

    /// Opens the steering `name`, from any process.
    pub fn open(name: &str) -> Result<Self, FreezeError> {
        check_privileges()?;
        validate_name(name)?;
        let path = dir(name).join(STEER_MAP);
        if !path.exists() {
            return Err(FreezeError::NotFound(name.to_owned()));
        }
        let map = Map::from_map_data(MapData::from_pin(path)?)?;
        Ok(Self {
            name: name.to_owned(),
            map: HashMap::try_from(map)?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Forwards the client-to-server segments of `tuples` (connections of this host, local =
    /// the service) to `next`, from the next segment on.
    pub fn steer(&mut self, tuples: &[Tuple], next: NextHop) -> Result<(), FreezeError> {
        let value = SteerValue {
            dst_mac: next.dst_mac,
            src_mac: next.src_mac,
            ifindex: next.ifindex,
            // Quiet from now: an idle connection's entry lives `idle` from its steering on.
            last_ns: sys::monotonic_now().as_nanos() as u64,
            ..SteerValue::default()
        };
        for tuple in tuples {
            self.map.insert(&tuple_key(tuple), &value, 0)?;
        }
        Ok(())
    }

    /// Stops forwarding `tuples`; one that is not steered is no error (the kernel says ENOENT).
    /// Returns how many were.
    pub fn unsteer(&mut self, tuples: &[Tuple]) -> Result<usize, FreezeError> {
        let mut removed = 0;
        for tuple in tuples {
            match self.map.remove(&tuple_key(tuple)) {
                Ok(()) => removed += 1,
                Err(aya::maps::MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(removed)
    }

    /// Every steered connection.
    pub fn entries(&self) -> Result<Vec<Steered>, FreezeError> {
        self.map
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok(Steered {
                    tuple: Tuple {
                        local: socket_addr(key.family, key.local_addr, key.local_port),
                        remote: socket_addr(key.family, key.remote_addr, key.remote_port),
                    },
                    dst_mac: value.dst_mac,
                    packets: value.packets,
                    last_ns: value.last_ns,
                    fin: value.flags_seen & FIN != 0,
                    rst: value.flags_seen & RST != 0,
                })
            })
            .collect()
    }

    /// Removes the entries of connections that ended: reset by the client, or closed by it and
    /// quiet for `grace` (its last ACK forwarded), or quiet for `idle` whatever their state (a
    /// client that vanished). Returns the connections removed.
    pub fn sweep(&mut self, grace: Duration, idle: Duration) -> Result<Vec<Tuple>, FreezeError> {
        let now = sys::monotonic_now();
        let quiet = |steered: &Steered| now.saturating_sub(Duration::from_nanos(steered.last_ns));
        let ended: Vec<Tuple> = (self.entries()?.into_iter())
            .filter(|s| s.rst || (s.fin && quiet(s) >= grace) || quiet(s) >= idle)
            .map(|s| s.tuple)
            .collect();
        self.unsteer(&ended)?;
        Ok(ended)
    }

    /// The names of the steerings pinned on this host.
    pub fn list() -> Result<Vec<String>, FreezeError> {
        let entries = match fs::read_dir(STEER_ROOT) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("*", "listing the steerings")(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("*", "listing the steerings"))?;
            names.extend(entry.file_name().to_str().map(str::to_owned));
        }
        names.sort();
        Ok(names)
    }

    /// Sweeps (see [`Steering::sweep`]) every `every` until no entry is left, then removes the
    /// steering: what keeps a rebalance's steering after the migration ends. Returns how many
    /// entries it swept. It lives as long as the moved connections do.
    pub fn keep(
        name: &str,
        grace: Duration,
        idle: Duration,
        every: Duration,
    ) -> Result<usize, FreezeError> {
        let mut steering = Self::open(name)?;
        let mut swept = 0;
        loop {
            swept += steering.sweep(grace, idle)?.len();
            if steering.entries()?.is_empty() {
                drop(steering);
                Self::remove(name)?;
                return Ok(swept);
            }
            std::thread::sleep(every);
        }
    }

    /// Detaches the steering `name` and removes its pins; one that is not there is no error.
    pub fn remove(name: &str) -> Result<(), FreezeError> {
        validate_name(name)?;
        let dir = dir(name);
        let _ = fs::remove_file(Path::new(PLACE_ROOT).join(name));
        if !dir.exists() {
            return Ok(());
        }
        attach::detach_pinned_link(name, &dir.join(PROGRAM_NAME))?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(name, "removing the steering's pins")(e)),
        }
    }
}

/// What the steering programs of this host cost: the segments they ran on, and their CPU time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerCost {
    pub runs: u64,
    pub cpu: Duration,
}

impl SteerCost {
    /// The kernel counts programs' runs and time only while someone asks it to: this asks, until
    /// the returned fd is closed (BPF_ENABLE_STATS).
    pub fn count() -> Result<std::os::fd::OwnedFd, FreezeError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|source| FreezeError::Io {
            name: PROGRAM_NAME.to_owned(),
            what: "asking the kernel to count the programs' run time",
            source: source.io_error,
        })
    }

    /// The totals so far over every steering program loaded (see [`SteerCost::count`]).
    pub fn now() -> Result<Self, FreezeError> {
        let mut total = Self::default();
        for info in aya::programs::loaded_programs() {
            let info = info?;
            if info.name_as_str() == Some(PROGRAM_NAME) {
                total.runs += info.run_count();
                total.cpu += info.run_time();
            }
        }
        Ok(total)
    }
}

/// Notes where the steering `name` is attached: `<netns inode> <dev>`.
fn note_place(name: &str, netns: &Netns, dev: &str) -> Result<(), FreezeError> {
    let note = io_error(name, "noting where the steering is attached");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(PLACE_ROOT)
        .map_err(io_error(name, "noting where the steering is attached"))?;
    let place = format!("{} {dev}\n", netns.inode());
    fs::write(Path::new(PLACE_ROOT).join(name), place).map_err(note)
}

fn dir(name: &str) -> PathBuf {
    Path::new(STEER_ROOT).join(name)
}

/// Loads the program (its map pinned in `dir`) and attaches it first on `dev`'s ingress, its
/// tcx link pinned in `dir`; runs in the interface's namespace.
fn attach_here(netns: &Netns, dev: &str, dir: &Path) -> Result<(), FreezeError> {
    let ifindex = attach::ifindex(netns, dev)?;
    let mut ebpf = attach::load_object(PROGRAM, dir)?;
    let classifier = attach::classifier(&mut ebpf, PROGRAM_NAME)?;
    let attach = TcAttach::Tcx {
        attach_type: TcAttachType::Ingress,
        order: LinkOrder::first(),
    };
    let link_id = classifier.attach(ifindex, attach)?;
    let link: FdLink = classifier.take_link(link_id)?.try_into()?;
    link.pin(dir.join(PROGRAM_NAME))?;
    Ok(())
}
