//! Socket-plane cost at N idle connections (1 byte queued in each receive queue, as in
//! notes/tcp-repair.md): dump and restore with the library (sharded over the CPUs), and in the
//! same run the reference: a plain one-thread loop of the minimal syscalls of the notes' dump and
//! restore orders, written directly with libc ([`plain`]), with no allocation per socket.
//!
//! The migrating ends live in this process, the peers in a `python3` child: at 10,000
//! connections both ends in one process would pass the 20,000 fd limit. The peers have a network
//! namespace of their own, as remote clients would: the state reader's pass then walks the
//! migrating ends only. Both namespaces are made for the run, joined by a veth pair, and deleted
//! afterwards.
use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    os::fd::OwnedFd,
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use tcpmig::{
    image,
    net::Netns,
    repair::{self, Connection, SocketPool, StateReader, Workers},
};

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
    pub image_bytes: usize,
    /// One-minute load average when the run ended (other users of the machine).
    pub load_average: f64,
}

/// Peers: connect N times, send one byte on each, say "ready", hold until stdin closes.
const PEER: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port))
    s.sendall(b"x")
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"#;

const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Rounds of library and plain loop per N; the best time of each is reported.
const ROUNDS: usize = 3;

/// The migrating ends' address, on their side of the veth pair.
const LOCAL_IP: &str = "198.18.255.1";
const PEER_IP: &str = "198.18.255.2";

/// The two namespaces of a run: `name` for the migrating ends, `peers` for their peers.
struct Namespaces {
    name: String,
    peers: String,
}

impl Namespaces {
    fn new() -> anyhow::Result<Self> {
        let name = format!("tcpmig-bench-{}", std::process::id());
        let ns = Self {
            peers: format!("{name}-peers"),
            name,
        };
        // Whatever was made is removed when `ns` drops, if a step fails.
        for netns in [&ns.name, &ns.peers] {
            ip(&["netns", "add", netns])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n", &ns.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
            "netns", &ns.peers,
        ])?;
        for (netns, address) in [(&ns.name, LOCAL_IP), (&ns.peers, PEER_IP)] {
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "veth0",
            ])?;
            ip(&["-n", netns, "link", "set", "veth0", "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for netns in [&self.name, &self.peers] {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    ensure!(status.success(), "ip {} failed", args.join(" "));
    Ok(())
}

/// The peer process; closing its stdin ends it, and drop also kills it (by its pid).
struct Peers {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(n: usize) -> anyhow::Result<RepairBench> {
    let ns = Namespaces::new()?;
    let netns = Netns::open(&ns.name)?;
    let listener = netns.run(|| TcpListener::bind((LOCAL_IP, 0)))??;
    let port = listener.local_addr()?.port().to_string();
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", &ns.peers, "python3", "-c", PEER, LOCAL_IP, &port,
        ])
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the python3 peers")?;
    let stdout = child.stdout.take().context("peer stdout")?;
    let peers = Peers {
        stdin: child.stdin.take(),
        child,
    };
    let fds = accept(&listener, n)?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(line.trim() == "ready", "peers failed to connect: {line:?}");
    // Let the last bytes and ACKs land.
    std::thread::sleep(Duration::from_millis(200));

    // Library and plain loop take turns on the same connections, which come back live after
    // each round; the best of each is kept, so that a burst of load on this shared machine
    // during one round does not decide the ratio.
    let mut best = [Duration::MAX; 5];
    let mut image_bytes = 0;
    let mut fds = fds;
    let local = listener.local_addr()?;
    for _ in 0..ROUNDS {
        let (library, conns, live) = round(&netns, local, fds)?;
        image_bytes = image::encode(&conns).len();
        let (plain_dump, plain_restore, live) = plain::round(&netns, live)?;
        ensure!(
            live.len() == n,
            "{} of {n} connections came back",
            live.len()
        );
        for (best, time) in best.iter_mut().zip([
            library.setup,
            library.dump,
            library.restore,
            plain_dump,
            plain_restore,
        ]) {
            *best = (*best).min(time);
        }
        fds = live;
    }
    let [setup, dump, restore, plain_dump, plain_restore] = best;
    drop(fds);
    drop(peers);

    let per_conn = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let total = dump + restore;
    let plain_total = plain_dump + plain_restore;
    Ok(RepairBench {
        connections: n,
        cpus: std::thread::available_parallelism().map_or(1, |c| c.get()),
        setup_ms: setup.as_secs_f64() * 1e3,
        dump_us_per_conn: per_conn(dump),
        restore_us_per_conn: per_conn(restore),
        plain_dump_us_per_conn: per_conn(plain_dump),
        plain_restore_us_per_conn: per_conn(plain_restore),
        total_ms: total.as_secs_f64() * 1e3,
        plain_total_ms: plain_total.as_secs_f64() * 1e3,
        ratio: total.as_secs_f64() / plain_total.as_secs_f64(),
        ratio_with_setup: (setup + total).as_secs_f64() / plain_total.as_secs_f64(),
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

/// Setup as a migration does it before the freeze (state reader, options, a pool of sockets for
/// `local`) (timed), dump (timed), silent close, restore and repair off (timed); returns the
/// live sockets.
fn round(
    netns: &Netns,
    local: SocketAddr,
    fds: Vec<OwnedFd>,
) -> anyhow::Result<(Timed, Vec<Connection>, Vec<OwnedFd>)> {
    let started = Instant::now();
    let n = fds.len();
    let mut reader = StateReader::load(Some(local.port()))?;
    let prepared = repair::prepare_dump(Workers::PerCpu, fds)?;
    let setup = started.elapsed();
    let started = Instant::now();
    let dumped = prepared.dump(&mut reader)?;
    let dump = started.elapsed();
    let conns = dumped.connections().to_vec();
    dumped.commit();
    // The pool is made after the source's sockets are closed: both use the same port here.
    let started = Instant::now();
    let pool = SocketPool::prepare(Workers::PerCpu, netns, local, n)?;
    let setup = setup + started.elapsed();
    let started = Instant::now();
    let committed = repair::restore_with_pool(Workers::PerCpu, netns, &conns, pool)?.commit();
    let restore = started.elapsed();
    if let Some(failure) = committed.failures.into_iter().next() {
        return Err(failure.into());
    }
    let fds = committed.sockets.into_iter().map(|s| s.fd).collect();
    Ok((
        Timed {
            setup,
            dump,
            restore,
        },
        conns,
        fds,
    ))
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
         | N | setup before the freeze (ms) | dump | restore | one-thread dump | one-thread \
         restore | dump + restore | one-thread total | ratio | ratio with setup | load |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |\n",
            r.connections,
            r.setup_ms,
            r.dump_us_per_conn,
            r.restore_us_per_conn,
            r.plain_dump_us_per_conn,
            r.plain_restore_us_per_conn,
            r.total_ms,
            r.plain_total_ms,
            r.ratio,
            r.ratio_with_setup,
            r.load_average
        ));
    }
    md.push_str(
        "\nSetup: what a migration does before the freeze (loading the BPF state reader, reading \
         the options only the application sets, making the destination's sockets: socket, \
         repair on, bind); dump + restore is what the blackout pays; the one-thread loop does \
         all of its calls after the freeze.\n",
    );
    md
}

/// The reference: what a C programmer writes from notes/tcp-repair.md, one socket after the other
/// on one thread, state into a preallocated array, queue bytes into one preallocated buffer.
mod plain {
    use std::{
        io,
        mem::{size_of, zeroed},
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        time::{Duration, Instant},
    };

    use tcpmig::net::Netns;

    const TCP_REPAIR: i32 = 19;
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_QUEUE_SEQ: i32 = 21;
    const TCP_REPAIR_OPTIONS: i32 = 22;
    const TCP_TIMESTAMP: i32 = 24;
    const TCP_REPAIR_WINDOW: i32 = 29;
    const RECV_QUEUE: i32 = 1;
    const SEND_QUEUE: i32 = 2;
    const SIOCINQ: u64 = 0x541B;
    const SIOCOUTQ: u64 = 0x5411;
    const SIOCOUTQNSD: u64 = 0x894B;
    /// Queue bytes one socket may hold in this benchmark.
    const MAX_QUEUE: usize = 64;

    #[derive(Clone, Copy)]
    struct State {
        local: libc::sockaddr_storage,
        remote: libc::sockaddr_storage,
        name_len: libc::socklen_t,
        options: u8,
        wscales: u8,
        mss: i32,
        timestamp: u32,
        send_seq: u32,
        recv_seq: u32,
        outq: i32,
        inq: i32,
        window: [u32; 5],
    }

    fn check(ret: i32) -> io::Result<i32> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn set<T>(fd: i32, level: i32, name: i32, value: &T) -> io::Result<()> {
        // SAFETY: `value` is readable for its size.
        check(unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                std::ptr::from_ref(value).cast(),
                size_of::<T>() as u32,
            )
        })
        .map(drop)
    }

    fn get<T>(fd: i32, level: i32, name: i32, value: &mut T) -> io::Result<()> {
        let mut len = size_of::<T>() as u32;
        // SAFETY: `value` is writable for its size; plain data.
        check(unsafe {
            libc::getsockopt(fd, level, name, std::ptr::from_mut(value).cast(), &mut len)
        })
        .map(drop)
    }

    fn ioctl(fd: i32, request: u64) -> io::Result<i32> {
        let mut value = 0i32;
        // SAFETY: these ioctls write one int.
        check(unsafe { libc::ioctl(fd, request, &mut value) })?;
        Ok(value)
    }

    /// Dump (timed), close in repair mode, restore in `netns` (timed); returns the live sockets.
    pub fn round(
        netns: &Netns,
        fds: Vec<OwnedFd>,
    ) -> anyhow::Result<(Duration, Duration, Vec<OwnedFd>)> {
        let n = fds.len();
        // SAFETY: all-zero is a valid State (plain integers and sockaddr_storage).
        let mut states = vec![unsafe { zeroed::<State>() }; n];
        let mut queues = vec![0u8; n * MAX_QUEUE];
        let started = Instant::now();
        for ((fd, state), queue) in fds
            .iter()
            .zip(&mut states)
            .zip(queues.chunks_mut(MAX_QUEUE))
        {
            dump_one(fd.as_raw_fd(), state, queue)?;
        }
        let dump = started.elapsed();
        drop(fds);
        let (restore, fds) = netns.run(|| -> io::Result<(Duration, Vec<OwnedFd>)> {
            let mut fds = Vec::with_capacity(n);
            let started = Instant::now();
            for (state, queue) in states.iter().zip(queues.chunks(MAX_QUEUE)) {
                fds.push(restore_one(state, queue)?);
            }
            Ok((started.elapsed(), fds))
        })??;
        Ok((dump, restore, fds))
    }

    /// The notes' dump order, peeks skipped for empty queues.
    fn dump_one(fd: i32, s: &mut State, queue: &mut [u8]) -> io::Result<()> {
        set(fd, libc::SOL_TCP, TCP_REPAIR, &1i32)?;
        let mut info = [0u8; 8];
        get(fd, libc::SOL_TCP, libc::TCP_INFO, &mut info)?;
        (s.options, s.wscales) = (info[5], info[6]);
        s.inq = ioctl(fd, SIOCINQ)?;
        s.outq = ioctl(fd, SIOCOUTQ)?;
        ioctl(fd, SIOCOUTQNSD)?;
        get(fd, libc::SOL_TCP, libc::TCP_MAXSEG, &mut s.mss)?;
        get(fd, libc::SOL_TCP, TCP_TIMESTAMP, &mut s.timestamp)?;
        set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &SEND_QUEUE)?;
        get(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &mut s.send_seq)?;
        assert!(
            s.outq == 0 && s.inq as usize <= queue.len(),
            "idle connections only"
        );
        set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &RECV_QUEUE)?;
        get(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &mut s.recv_seq)?;
        if s.inq > 0 {
            // SAFETY: `queue` is writable for inq bytes.
            check(unsafe {
                libc::recv(
                    fd,
                    queue.as_mut_ptr().cast(),
                    s.inq as usize,
                    libc::MSG_PEEK,
                ) as i32
            })?;
        }
        get(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, &mut s.window)?;
        s.name_len = size_of::<libc::sockaddr_storage>() as u32;
        let mut len = s.name_len;
        // SAFETY: the storages are writable for their size.
        unsafe {
            check(libc::getsockname(
                fd,
                std::ptr::from_mut(&mut s.local).cast(),
                &mut s.name_len,
            ))?;
            check(libc::getpeername(
                fd,
                std::ptr::from_mut(&mut s.remote).cast(),
                &mut len,
            ))?;
        }
        Ok(())
    }

    /// The notes' restore order.
    fn restore_one(s: &State, queue: &[u8]) -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2), owned at once.
        let fd = check(unsafe {
            libc::socket(
                i32::from(s.local.ss_family),
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: a fresh fd.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        set(fd, libc::SOL_TCP, TCP_REPAIR, &1i32)?;
        set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &RECV_QUEUE)?;
        set(
            fd,
            libc::SOL_TCP,
            TCP_QUEUE_SEQ,
            &s.recv_seq.wrapping_sub(s.inq as u32),
        )?;
        set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &SEND_QUEUE)?;
        set(fd, libc::SOL_TCP, TCP_QUEUE_SEQ, &s.send_seq)?;
        // SAFETY: the storages hold addresses of `name_len` bytes.
        unsafe {
            check(libc::bind(
                fd,
                std::ptr::from_ref(&s.local).cast(),
                s.name_len,
            ))?;
            check(libc::connect(
                fd,
                std::ptr::from_ref(&s.remote).cast(),
                s.name_len,
            ))?;
        }
        let mut options = [[2u32, s.mss as u32], [0, 0], [0, 0], [0, 0]];
        let mut count = 1;
        if s.options & 4 != 0 {
            options[count] = [
                3,
                u32::from(s.wscales & 0xf) | (u32::from(s.wscales >> 4) << 16),
            ];
            count += 1;
        }
        if s.options & 2 != 0 {
            options[count] = [4, 0];
            count += 1;
        }
        if s.options & 1 != 0 {
            options[count] = [8, 0];
            count += 1;
        }
        // SAFETY: `count` repair options, plain data.
        check(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_TCP,
                TCP_REPAIR_OPTIONS,
                options.as_ptr().cast(),
                (count * 8) as u32,
            )
        })?;
        if s.options & 1 != 0 {
            set(fd, libc::SOL_TCP, TCP_TIMESTAMP, &s.timestamp)?;
        }
        if s.inq > 0 {
            set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &RECV_QUEUE)?;
            // SAFETY: `queue` is readable for inq bytes.
            check(unsafe { libc::send(fd, queue.as_ptr().cast(), s.inq as usize, 0) as i32 })?;
        }
        set(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, &s.window)?;
        set(fd, libc::SOL_TCP, TCP_REPAIR_QUEUE, &0i32)?;
        set(fd, libc::SOL_TCP, TCP_REPAIR, &0i32)?;
        Ok(owned)
    }
}
