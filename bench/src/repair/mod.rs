//! Socket-plane cost at N idle connections (1 byte queued in each receive queue, as in
//! docs/tcp-repair.md): dump and restore with the library (sharded over the CPUs), cold and
//! with a pre-copy, and in the same run the reference: a plain one-thread loop of the minimal
//! syscalls of the documented dump and restore orders, written directly with libc ([`plain`]),
//! with no allocation per socket.
//!
//! The migrating ends live in this process, their peers in a `tcpmig-peer` client (the test
//! bed's traffic process, one byte sent on each connection): at 10,000 connections both ends in
//! one process would pass the 20,000 fd limit. The connections move back and forth between two
//! namespaces that both have the service address, as between two hosts: each restore happens
//! while the source's sockets still exist, as in a migration. The peers have a namespace of their
//! own, joined to the first by a veth pair, as remote clients would: the state reader's pass
//! walks the migrating ends only. All three are a test bed [`Namespaces`] group, made for the run
//! and deleted afterwards.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use tcpmig::{
    image,
    migrate::PRECOPY_QUIET,
    net::Netns,
    repair::{
        self, Connection, DumpedSockets, PreparedDump, RestoredAhead, SocketPool, StateReader,
        Workers,
    },
    shard::Shard,
};
use tcpmig_testbed::{Namespace, Namespaces, Peer, PeerArgs, StreamArgs};

use crate::criu::sibling;

#[derive(Clone, Debug, Serialize)]
pub struct RepairBench {
    pub connections: usize,
    pub cpus: usize,
    /// Library, before the freeze: loading the state reader, reading the options only the
    /// application sets, making the destination's sockets (socket, repair on, bind).
    pub setup_ms: f64,
    /// Library, sharded, inside the blackout: one state-reader pass, repair on, peeks.
    pub dump_us_per_conn: f64,
    /// Library, sharded, inside the blackout: state onto the pooled sockets ... repair off.
    pub restore_us_per_conn: f64,
    /// With a pre-copy: the setup above plus one state-reader pass, the receive queues' peeks
    /// and the restore of the connections ahead of the freeze.
    pub precopy_setup_ms: f64,
    /// With a pre-copy, inside the blackout: one state-reader pass and repair on (the queues
    /// did not move).
    pub precopy_dump_us_per_conn: f64,
    /// With a pre-copy, inside the blackout: the timestamps set anew ... repair off.
    pub precopy_restore_us_per_conn: f64,
    pub precopy_total_ms: f64,
    /// The plain one-thread libc loop of the same syscalls.
    pub plain_dump_us_per_conn: f64,
    pub plain_restore_us_per_conn: f64,
    /// Dump + restore: what the blackout pays.
    pub total_ms: f64,
    pub plain_total_ms: f64,
    /// total / plain total: the design's goal is at most 0.5.
    pub ratio: f64,
    /// (setup + total) / plain total: the whole work, wherever it is done.
    pub ratio_with_setup: f64,
    /// precopy total / plain total.
    pub precopy_ratio: f64,
    pub image_bytes: usize,
    /// One-minute load average when the run ended (other users of the machine).
    pub load_average: f64,
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Rounds of library and plain loop per N; the best time of each is reported.
const ROUNDS: usize = 3;

/// The migrating ends' address, on their side of the veth pair (and in the second namespace).
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 2);

/// The namespaces of a run, in this order: the first and the second place of the migrating
/// ends, and their peers'.
fn namespaces() -> anyhow::Result<Namespaces<3>> {
    let group = Namespaces::new(["src", "dst", "cli"])?;
    let [first, second, peers] = group.members();
    first.ip_batch(&[format!(
        "link add veth0 type veth peer name veth0 netns {}",
        peers.name()
    )])?;
    // The second namespace's veth0 leads nowhere: idle connections send nothing.
    second.ip_batch(&[
        "link add veth0 type veth peer name veth1".into(),
        "link set veth1 up".into(),
    ])?;
    for (netns, address) in [(first, LOCAL_IP), (second, LOCAL_IP), (peers, PEER_IP)] {
        netns.ip_batch(&[
            format!("addr add {address}/24 dev veth0"),
            "link set veth0 up".into(),
        ])?;
    }
    Ok(group)
}

/// The peers: a `tcpmig-peer` client in `netns` that opens `n` connections to `local` and sends
/// one byte on each; it says `ready` then holds them until it is dropped.
fn start_peers(netns: &Namespace, local: SocketAddr, n: usize) -> anyhow::Result<Peer<'_>> {
    let stream = StreamArgs {
        timeout_secs: SETUP_TIMEOUT.as_secs(),
        ..StreamArgs::new(1)
    };
    Peer::start(
        netns,
        &sibling("tcpmig-peer")?,
        &PeerArgs::client(local, n, stream),
    )
}

pub fn run(n: usize) -> anyhow::Result<RepairBench> {
    let ns = namespaces()?;
    let [first, second, peer_netns] = ns.members();
    // Declared after `ns`: the hosts' sockets close before the namespaces go.
    let hosts = [Host::start("source")?, Host::start("destination")?];
    let listening_in = first.name().to_owned();
    let local = hosts[0].run(move |host| -> anyhow::Result<SocketAddr> {
        let listener = Netns::open(&listening_in)?
            .run(|| TcpListener::bind((IpAddr::from(LOCAL_IP), 0)))??;
        let local = listener.local_addr()?;
        host.listener = Some(listener);
        Ok(local)
    })?;
    let mut peers = start_peers(peer_netns, local, n)?;
    hosts[0].run(move |host| -> anyhow::Result<()> {
        let listener = host.listener.take().context("the listener")?;
        host.fds = accept(&listener, n)?;
        Ok(())
    })?;
    peers.expect_line("ready")?;
    // Let the last bytes and ACKs land.
    std::thread::sleep(Duration::from_millis(200));

    // Library (cold and with a pre-copy) and plain loop take turns on the same connections,
    // each moving them to the other namespace; the best of each is kept, so that a burst of
    // load on this shared machine during one round does not decide the ratio. The library
    // moves them to the other host too (fd table); the plain loop closes its sockets before it
    // restores them, in its own table.
    let mut best = [Duration::MAX; 8];
    let mut image_bytes = 0;
    let mut places = [first.name().to_owned(), second.name().to_owned()];
    let (mut from, mut to) = (&hosts[0], &hosts[1]);
    for _ in 0..ROUNDS {
        let mut times = Vec::with_capacity(best.len());
        for precopy in [false, true] {
            let (library, image) = round(from, to, &places[1], local, precopy)?;
            places.swap(0, 1);
            (from, to) = (to, from);
            image_bytes = image;
            times.extend([library.setup, library.dump, library.restore]);
        }
        let into = places[1].clone();
        let (plain_dump, plain_restore, live) =
            from.run(move |host| -> anyhow::Result<(Duration, Duration, usize)> {
                let fds = std::mem::take(&mut host.fds);
                let (dump, restore, live) = plain::round(&Netns::open(&into)?, fds)?;
                host.fds = live;
                Ok((dump, restore, host.fds.len()))
            })?;
        places.swap(0, 1);
        ensure!(live == n, "{live} of {n} connections came back");
        times.extend([plain_dump, plain_restore]);
        for (best, time) in best.iter_mut().zip(times) {
            *best = (*best).min(time);
        }
    }
    let [
        setup,
        dump,
        restore,
        precopy_setup,
        precopy_dump,
        precopy_restore,
        plain_dump,
        plain_restore,
    ] = best;
    drop(hosts);
    drop(peers);

    let per_conn = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let total = dump + restore;
    let precopy_total = precopy_dump + precopy_restore;
    let plain_total = plain_dump + plain_restore;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(RepairBench {
        connections: n,
        cpus: std::thread::available_parallelism().map_or(1, |c| c.get()),
        setup_ms: ms(setup),
        dump_us_per_conn: per_conn(dump),
        restore_us_per_conn: per_conn(restore),
        precopy_setup_ms: ms(precopy_setup),
        precopy_dump_us_per_conn: per_conn(precopy_dump),
        precopy_restore_us_per_conn: per_conn(precopy_restore),
        precopy_total_ms: ms(precopy_total),
        plain_dump_us_per_conn: per_conn(plain_dump),
        plain_restore_us_per_conn: per_conn(plain_restore),
        total_ms: ms(total),
        plain_total_ms: ms(plain_total),
        ratio: total.as_secs_f64() / plain_total.as_secs_f64(),
        ratio_with_setup: (setup + total).as_secs_f64() / plain_total.as_secs_f64(),
        precopy_ratio: precopy_total.as_secs_f64() / plain_total.as_secs_f64(),
        image_bytes,
        load_average: load_average()?,
    })
}

fn load_average() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    text.split_whitespace()
        .next()
        .and_then(|load| load.parse().ok())
        .context("parsing /proc/loadavg")
}

/// The library's times of one round.
struct Timed {
    setup: Duration,
    dump: Duration,
    restore: Duration,
}

/// One side's sockets, in an fd table of its own (a [`Shard`]), as on two hosts: the source's
/// and the destination's 10,000 sockets do not fit in one table. Its fds are used and closed
/// only on its thread.
#[derive(Default)]
struct Host {
    listener: Option<TcpListener>,
    /// The live connections it holds.
    fds: Vec<OwnedFd>,
    /// Source side of a round.
    reader: Option<StateReader>,
    prepared: Option<PreparedDump>,
    dumped: Option<DumpedSockets>,
    /// Destination side of a round.
    pool: Option<SocketPool>,
    ahead: Option<RestoredAhead>,
}

impl Host {
    fn start(name: &str) -> anyhow::Result<Shard<Host>> {
        Shard::spawn(format!("bench-{name}")).context("starting a host thread")
    }
}

/// One migration of the connections `from` holds to `to`, restored in namespace `into`: setup
/// as a migration does it before the freeze ([`prepare`], timed), dump (timed), restore and
/// repair off (timed), and the source's silent close. Returns the image's size.
fn round(
    from: &Shard<Host>,
    to: &Shard<Host>,
    into: &str,
    local: SocketAddr,
    precopy: bool,
) -> anyhow::Result<(Timed, usize)> {
    if precopy {
        // Only connections quiet for that long are pre-copied; the last round restored these.
        std::thread::sleep(PRECOPY_QUIET + Duration::from_millis(100));
    }
    let setup = prepare(from, to, into, local, precopy)?;
    let (dump, connections) = from.run(|host| -> anyhow::Result<(Duration, Vec<Connection>)> {
        let (Some(prepared), Some(mut reader)) = (host.prepared.take(), host.reader.take()) else {
            bail!("nothing prepared");
        };
        let started = Instant::now();
        let dumped = prepared.dump(&mut reader)?;
        let dump = started.elapsed();
        let connections = dumped.connections().to_vec();
        host.dumped = Some(dumped);
        Ok((dump, connections))
    })?;
    let image_bytes = image::encode(&connections).len();
    let restore = restore(to, into, connections, precopy)?;
    from.run(|host| host.dumped.take().map(DumpedSockets::commit));
    Ok((
        Timed {
            setup,
            dump,
            restore,
        },
        image_bytes,
    ))
}

/// The setup before the freeze, timed: the state reader, the options, a pool of sockets for
/// `local` in `into`; with `precopy`, also a reader pass, the pre-copy and its restore.
fn prepare(
    from: &Shard<Host>,
    to: &Shard<Host>,
    into: &str,
    local: SocketAddr,
    precopy: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let into = into.to_owned();
    let netns = move || Netns::open(&into);
    let n = from.run(|host| host.fds.len());
    let to_netns = netns.clone();
    to.run(move |host| -> anyhow::Result<()> {
        host.pool = Some(SocketPool::prepare(
            Workers::PerCpu,
            &to_netns()?,
            local,
            n,
        )?);
        Ok(())
    })?;
    let ahead = from.run(move |host| -> anyhow::Result<Vec<Connection>> {
        let mut reader = StateReader::load(Some(local.port()))?;
        let fds = std::mem::take(&mut host.fds);
        let mut prepared = repair::prepare_dump(Workers::PerCpu, fds)?;
        let ahead = if precopy {
            prepared.precopy(&reader.read(&prepared.netns()?)?, PRECOPY_QUIET)
        } else {
            Vec::new()
        };
        host.reader = Some(reader);
        host.prepared = Some(prepared);
        Ok(ahead)
    })?;
    if precopy {
        ensure!(
            ahead.len() == n,
            "{} of {n} connections pre-copied",
            ahead.len()
        );
        let to_netns = netns.clone();
        to.run(move |host| -> anyhow::Result<()> {
            let netns = to_netns()?;
            let pool = host.pool.take().context("the pool")?;
            host.ahead = Some(repair::restore_ahead(Workers::PerCpu, &netns, ahead, pool)?);
            // The connections that moved since get fresh sockets.
            host.pool = Some(SocketPool::prepare(Workers::PerCpu, &netns, local, 0)?);
            Ok(())
        })?;
    }
    Ok(started.elapsed())
}

/// The restore of the dumped `connections` in `into` and repair off, timed; the restored
/// sockets become the live connections `to` holds.
fn restore(
    to: &Shard<Host>,
    into: &str,
    connections: Vec<Connection>,
    precopy: bool,
) -> anyhow::Result<Duration> {
    let into = into.to_owned();
    let netns = move || Netns::open(&into);
    to.run(move |host| -> anyhow::Result<Duration> {
        let netns = netns()?;
        let pool = host.pool.take().context("the pool")?;
        let started = Instant::now();
        let restored = match host.ahead.take() {
            Some(ahead) => ahead.restore(Workers::PerCpu, &netns, &connections, pool)?,
            None => repair::restore_with_pool(Workers::PerCpu, &netns, &connections, pool)?,
        };
        let precopied = restored.precopied();
        let committed = restored.commit();
        let restore = started.elapsed();
        // Idle connections do not move: the pre-copy's sockets are all kept, or the time
        // measured is not the one this benchmark reports.
        ensure!(
            precopied == if precopy { connections.len() } else { 0 },
            "{precopied} of {} connections kept their pre-copied sockets",
            connections.len()
        );
        if let Some(failure) = committed.failures.into_iter().next() {
            return Err(failure.into());
        }
        host.fds = committed.sockets.into_iter().map(|s| s.fd).collect();
        Ok(restore)
    })
}

fn accept(listener: &TcpListener, n: usize) -> anyhow::Result<Vec<OwnedFd>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut fds = Vec::with_capacity(n);
    while fds.len() < n {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                fds.push(OwnedFd::from(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {n} peers connected within {SETUP_TIMEOUT:?}",
                        fds.len()
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(fds)
}

pub fn markdown(results: &[RepairBench]) -> String {
    let mut md = String::from(
        "### Bulk dump and restore (microseconds per connection; totals in ms)\n\n\
         | N | setup before the freeze (ms) | dump | restore | dump + restore | ratio | ratio \
         with setup | pre-copy: setup (ms) | dump | restore | dump + restore | ratio | \
         one-thread dump | one-thread restore | one-thread total | load |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} \
             | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} |\n",
            r.connections,
            r.setup_ms,
            r.dump_us_per_conn,
            r.restore_us_per_conn,
            r.total_ms,
            r.ratio,
            r.ratio_with_setup,
            r.precopy_setup_ms,
            r.precopy_dump_us_per_conn,
            r.precopy_restore_us_per_conn,
            r.precopy_total_ms,
            r.precopy_ratio,
            r.plain_dump_us_per_conn,
            r.plain_restore_us_per_conn,
            r.plain_total_ms,
            r.load_average
        ));
    }
    md.push_str(
        "\nSetup: what a migration does before the freeze (loading the BPF state reader, reading \
         the options only the application sets, making the destination's sockets: socket, \
         repair on, bind); dump + restore is what the blackout pays; ratio: against the \
         one-thread loop, which does all of its calls after the freeze. Pre-copy: the setup \
         also reads the connections (one reader pass and the receive queues' peeks) and \
         restores them in repair mode ahead of the freeze; the blackout then pays for one \
         reader pass and repair on at the source, and for the timestamps and repair off at the \
         destination, as long as the connections did not move (idle ones do not).\n",
    );
    md
}

mod plain;
