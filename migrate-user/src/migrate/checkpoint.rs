//! A migration to a file (`tcpmig dump`): a process's connections, frozen, dumped into one image,
//! then either kept here (a checkpoint: the sockets leave repair mode) or given up (closed
//! silently: the connections now live in the image only, for `tcpmig restore` elsewhere).
//!
//! The steps are those of a standalone migration's source, without the agent: what needs no
//! freeze first (discovery, loading the state reader, the options only the application sets),
//! then the freeze, the dump, the image, the ending.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    freeze::{self, Freeze, FreezeError, RemoveOnDrop},
    image::{self, ImageError},
    migrate::LeftConnection,
    net::{Netns, NetnsError},
    repair::{self, Connection, Filter, RepairError, Workers},
    tuple::Tuple,
};

/// How many connections an error lists by name.
const NAMED_IN_ERRORS: usize = 3;

/// What a dump does with the source sockets once the image is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Then {
    /// Leave repair mode: the connections carry on here. A freeze the dump made is lifted.
    Rollback,
    /// Close the sockets silently (no FIN, no RST). The freeze must stay until the connections
    /// are restored elsewhere, or the peers' next segments draw RSTs here; a freeze the dump made
    /// stays pinned until its deadline.
    Commit,
}

/// One dump of a process's connections into an image file.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use tcpmig::migrate::checkpoint::{Checkpoint, Then};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let report = Checkpoint {
///     pid: 4242,
///     netns: None,
///     port: Some(8080),
///     service: None,
///     out: "/var/lib/tcpmig/app.img".into(),
///     // Freeze exactly these connections on eth0 first (needs CAP_BPF and CAP_NET_ADMIN).
///     freeze_dev: Some("eth0".into()),
///     deadline: Duration::from_secs(30),
///     then: Then::Rollback,
/// }
/// .run()?;
/// println!("{} connections in {} bytes", report.connections, report.image_bytes);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub pid: u32,
    /// Network namespace of the process's sockets; `None`: /proc/PID/ns/net.
    pub netns: Option<String>,
    /// Only connections on this local port.
    pub port: Option<u16>,
    /// Only connections of this service (local address and port).
    pub service: Option<SocketAddr>,
    /// The image file (mode 0600: it holds the connections' queued bytes).
    pub out: PathBuf,
    /// Freeze exactly the dumped 4-tuples on this interface first, in a freeze named dump-PID;
    /// `None`: they must be frozen already, and the dump refuses otherwise.
    pub freeze_dev: Option<String>,
    /// After this, that freeze lets traffic pass again by itself.
    pub deadline: Duration,
    pub then: Then,
}

/// Bytes the connections carry in their queues.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Queued {
    /// Sent but unacknowledged, or never sent (`unsent_bytes` of them).
    pub send_bytes: u64,
    pub unsent_bytes: u64,
    /// Received and acknowledged but not read by the application.
    pub recv_bytes: u64,
}

impl Queued {
    pub fn of(connections: &[Connection]) -> Self {
        connections.iter().fold(Self::default(), |mut q, c| {
            q.send_bytes += c.send_queue.len() as u64;
            q.unsent_bytes += u64::from(c.unsent);
            q.recv_bytes += c.recv_queue.len() as u64;
            q
        })
    }
}

/// What a dump did, with the time of each step in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    pub pid: u32,
    pub netns: String,
    pub image: PathBuf,
    pub connections: usize,
    /// Matching connections left out because of their state: `left` lists them.
    pub skipped: usize,
    pub left: Vec<LeftConnection>,
    /// Listening sockets of the process on the filter's port or service.
    pub listening: Vec<SocketAddr>,
    #[serde(flatten)]
    pub queued: Queued,
    pub image_bytes: usize,
    pub then: Then,
    /// The freeze the dump made (`freeze_dev`), if any.
    pub freeze: Option<String>,
    pub discover_us: f64,
    pub freeze_us: f64,
    pub dump_us: f64,
    pub write_us: f64,
    pub then_us: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    MissingCapability(#[from] crate::sys::MissingCapability),
    #[error(
        "process {pid} has no established connection{on} in network namespace {netns}: check \
         --pid, --port, --service and --netns"
    )]
    NoConnections { pid: u32, on: String, netns: String },
    #[error(
        "{unfrozen} of {total} connections are not frozen ({named}): their traffic would change \
         the sockets during the dump; freeze them first (tcpmig freeze --netns {netns} --dev \
         IFACE --service ADDR:PORT) or pass --freeze-dev IFACE"
    )]
    NotFrozen {
        unfrozen: usize,
        total: usize,
        named: String,
        netns: String,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Repair(#[from] RepairError),
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn micros(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e6
}

impl Checkpoint {
    /// Discovers, freezes, dumps and writes the image, then rolls back or commits. On an error
    /// before the end the sockets leave repair mode and a freeze the dump made is lifted: the
    /// connections carry on here.
    pub fn run(&self) -> Result<CheckpointReport, CheckpointError> {
        super::check_privileges(super::Privileged::Dump)?;
        let netns_spec = self
            .netns
            .clone()
            .unwrap_or_else(|| format!("/proc/{}/ns/net", self.pid));
        let netns = Netns::open(&netns_spec)?;
        let filter = Filter {
            port: self.port,
            services: self.service.into_iter().collect(),
            ..Filter::default()
        };
        let started = Instant::now();
        let discovery = repair::discover(&netns, self.pid, &filter)?;
        let discover_us = micros(started.elapsed());
        if discovery.sockets.is_empty() {
            return Err(self.nothing_to_dump(&netns_spec));
        }
        let tuples: Vec<Tuple> = discovery.sockets.iter().map(|s| s.tuple).collect();
        let (skipped, listening) = (discovery.skipped.len(), discovery.listening.clone());
        let left = (discovery.skipped.iter())
            .map(|&(tuple, state)| LeftConnection::from(&repair::Unmovable::held(tuple, state)))
            .collect();

        // What needs no freeze is done before it: loading the socket reader, reading the options.
        let port = self.service.map(|service| service.port()).or(self.port);
        let mut reader = repair::StateReader::load(port)?;
        let prepared = repair::prepare_dump(Workers::PerCpu, discovery.into_fds())?;

        let started = Instant::now();
        let freeze_name = format!("dump-{}", self.pid);
        let own_freeze = self.freeze(&netns, &freeze_name, &tuples)?;
        let freeze_us = micros(started.elapsed());

        // From here on, an error drops `dumped` (rolls back) and then `own_freeze` (lifts it).
        let started = Instant::now();
        let dumped = prepared.dump(&mut reader)?;
        let dump_us = micros(started.elapsed());
        let started = Instant::now();
        let encoded = image::encode(dumped.connections());
        image::write_file(&self.out, &encoded)?;
        let write_us = micros(started.elapsed());
        let queued = Queued::of(dumped.connections());
        let connections = dumped.len();

        let started = Instant::now();
        match self.then {
            Then::Commit => {
                dumped.commit();
                own_freeze.map(RemoveOnDrop::keep);
            }
            Then::Rollback => dumped.rollback()?,
        }
        Ok(CheckpointReport {
            pid: self.pid,
            netns: netns_spec,
            image: self.out.clone(),
            connections,
            skipped,
            left,
            listening,
            queued,
            image_bytes: encoded.len(),
            then: self.then,
            freeze: self.freeze_dev.as_ref().map(|_| freeze_name),
            discover_us,
            freeze_us,
            dump_us,
            write_us,
            then_us: micros(started.elapsed()),
        })
    }

    /// Freezes the tuples itself with `freeze_dev`; otherwise checks that they are frozen.
    fn freeze(
        &self,
        netns: &Netns,
        name: &str,
        tuples: &[Tuple],
    ) -> Result<Option<RemoveOnDrop>, CheckpointError> {
        let Some(dev) = &self.freeze_dev else {
            refuse_unfrozen(netns, tuples)?;
            return Ok(None);
        };
        let mut guard = RemoveOnDrop::new(Freeze::attach(netns, dev, name)?);
        guard.freeze_tuples(tuples, self.deadline)?;
        Ok(Some(guard))
    }

    fn nothing_to_dump(&self, netns: &str) -> CheckpointError {
        CheckpointError::NoConnections {
            pid: self.pid,
            on: match (self.service, self.port) {
                (Some(service), _) => format!(" on {service}"),
                (None, Some(port)) => format!(" on port {port}"),
                (None, None) => String::new(),
            },
            netns: netns.to_owned(),
        }
    }
}

/// A dump of connections whose traffic still flows would miss what arrives meanwhile.
fn refuse_unfrozen(netns: &Netns, tuples: &[Tuple]) -> Result<(), CheckpointError> {
    let left = freeze::unfrozen(netns, tuples)?;
    if left.is_empty() {
        return Ok(());
    }
    let mut named: Vec<String> = left
        .iter()
        .take(NAMED_IN_ERRORS)
        .map(ToString::to_string)
        .collect();
    if left.len() > NAMED_IN_ERRORS {
        named.push("...".to_owned());
    }
    Err(CheckpointError::NotFrozen {
        unfrozen: left.len(),
        total: tuples.len(),
        named: named.join(", "),
        netns: netns.spec().to_owned(),
    })
}
