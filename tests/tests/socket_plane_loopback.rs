//! Socket plane on real sockets, one host: loopback connections in a network namespace of the
//! test bed (removed on drop, also on panic), dumped with the library, passed through the
//! image, closed silently and restored in place; every byte is checked both ways and the
//! namespace's RST counter must not move. Needs root (CAP_NET_ADMIN, CAP_SYS_PTRACE).
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use tcpmig::{
    image,
    net::Netns,
    repair::{self, Filter, RepairError, TcpState},
    tuple::Tuple,
};
use tcpmig_testbed::{Namespace, Namespaces};

/// A namespace of the test bed with only `lo` up, deleted on drop (also on panic).
struct TestNetns {
    namespace: Namespace,
    netns: Netns,
    /// Last: the namespace goes after the handles on it.
    _group: Namespaces<1>,
}

impl TestNetns {
    fn new() -> Self {
        let group = Namespaces::new(["lo"]).expect("making a namespace");
        let [namespace] = group.members().clone();
        Self {
            netns: Netns::open(namespace.name()).expect("open the new namespace"),
            namespace,
            _group: group,
        }
    }

    /// RSTs sent in this namespace so far (Tcp OutRsts).
    fn resets_sent(&self) -> u64 {
        self.tcp_counter("OutRsts")
    }

    /// One of the namespace's Tcp counters in /proc/net/snmp.
    fn tcp_counter(&self, name: &str) -> u64 {
        self.namespace.tcp_counter(name).unwrap()
    }
}

/// Byte `offset` of direction `dir` of connection `k`: streams differ, so a swap shows.
fn pattern(k: usize, dir: usize, offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| ((i + k * 13 + dir * 101) % 251) as u8)
        .collect()
}

const TO_SERVER: usize = 0;
const TO_CLIENT: usize = 1;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Loopback connections whose server ends are the ones migrated.
struct Connections {
    servers: Vec<TcpStream>,
    clients: Vec<TcpStream>,
    /// Bytes written so far per connection and direction, and bytes read.
    written: Vec<[usize; 2]>,
    read: Vec<[usize; 2]>,
    listener: TcpListener,
}

impl Connections {
    fn open(ns: &TestNetns, n: usize, loopback: &str) -> Self {
        ns.netns
            .run(|| {
                let listener = TcpListener::bind((loopback, 0)).unwrap();
                let mut servers = Vec::with_capacity(n);
                let mut clients = Vec::with_capacity(n);
                for _ in 0..n {
                    clients.push(TcpStream::connect(listener.local_addr().unwrap()).unwrap());
                    servers.push(listener.accept().unwrap().0);
                }
                for stream in servers.iter().chain(&clients) {
                    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                }
                Self {
                    servers,
                    clients,
                    written: vec![[0; 2]; n],
                    read: vec![[0; 2]; n],
                    listener,
                }
            })
            .unwrap()
    }

    fn write(&mut self, k: usize, dir: usize, len: usize) {
        let data = pattern(k, dir, self.written[k][dir], len);
        let stream = if dir == TO_SERVER {
            &self.clients[k]
        } else {
            &self.servers[k]
        };
        (&*stream).write_all(&data).unwrap();
        self.written[k][dir] += len;
    }

    /// Unread bytes both ways on every connection; on the first few, the server also writes
    /// until its socket refuses more, so that its send queue holds unacknowledged and never-sent
    /// bytes behind the client's full receive window.
    fn load(&mut self, flooded: usize) {
        for k in 0..self.servers.len() {
            self.write(k, TO_SERVER, 100 + k % 50);
            self.write(k, TO_CLIENT, 200 + k % 70);
        }
        for k in 0..flooded.min(self.servers.len()) {
            let server = &self.servers[k];
            server.set_nonblocking(true).unwrap();
            let chunk = 64 * 1024;
            for _ in 0..64 {
                let data = pattern(k, TO_CLIENT, self.written[k][TO_CLIENT], chunk);
                match (&*server).write(&data) {
                    Ok(n) => self.written[k][TO_CLIENT] += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("flooding connection {k}: {e}"),
                }
            }
            server.set_nonblocking(false).unwrap();
        }
        // Let delayed ACKs and window updates settle: the peers are idle afterwards.
        std::thread::sleep(Duration::from_millis(250));
    }

    fn server_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.servers)
            .into_iter()
            .map(OwnedFd::from)
            .collect()
    }

    /// Duplicates of the server ends, which stay with the "application" (as pidfd_getfd gives).
    fn duplicated_server_fds(&self) -> Vec<OwnedFd> {
        self.servers
            .iter()
            .map(|s| s.try_clone().unwrap().into())
            .collect()
    }

    /// The server ends, in client order, from sockets restored in any order.
    fn adopt(&mut self, restored: Vec<repair::RestoredSocket>) {
        let mut by_tuple: HashMap<Tuple, OwnedFd> =
            restored.into_iter().map(|s| (s.tuple, s.fd)).collect();
        self.servers = self
            .clients
            .iter()
            .map(|client| {
                let tuple = Tuple {
                    local: client.peer_addr().unwrap(),
                    remote: client.local_addr().unwrap(),
                };
                let server = TcpStream::from(by_tuple.remove(&tuple).expect("restored"));
                server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                server
            })
            .collect();
    }

    /// Reads everything written so far, both ways, checks it byte by byte, then exchanges a
    /// little more to show the connections are alive.
    fn verify(&mut self) {
        for round in 0..2 {
            for k in 0..self.clients.len() {
                for dir in [TO_SERVER, TO_CLIENT] {
                    let stream = if dir == TO_SERVER {
                        &self.servers[k]
                    } else {
                        &self.clients[k]
                    };
                    let len = self.written[k][dir] - self.read[k][dir];
                    let mut got = vec![0u8; len];
                    (&*stream)
                        .read_exact(&mut got)
                        .unwrap_or_else(|e| panic!("connection {k} dir {dir}: {e}"));
                    assert!(
                        got == pattern(k, dir, self.read[k][dir], len),
                        "connection {k} dir {dir}: bytes differ"
                    );
                    self.read[k][dir] += len;
                }
                if round == 0 {
                    self.write(k, TO_SERVER, 1000);
                    self.write(k, TO_CLIENT, 1000);
                }
            }
        }
    }
}

/// Dump, image round trip, silent close, restore in place, verify: the whole source+destination
/// path on one host.
fn migrate_in_place(n: usize, loopback: &str) {
    let ns = TestNetns::new();
    let mut conns = Connections::open(&ns, n, loopback);
    conns.load(8);
    let resets = ns.resets_sent();
    let started = Instant::now();
    let dumped = repair::dump(conns.server_fds()).expect("dump");
    let dump_time = started.elapsed();
    let queued: usize = dumped
        .connections()
        .iter()
        .map(|c| c.send_queue.len())
        .sum();
    let unsent: u32 = dumped.connections().iter().map(|c| c.unsent).sum();
    assert!(
        queued > 0 && unsent > 0,
        "the load must leave unsent bytes ({queued}, {unsent})"
    );
    let image = image::encode(dumped.connections());
    let decoded = image::decode(&image).expect("decode");
    assert_eq!(decoded, dumped.connections());
    dumped.commit();
    let started = Instant::now();
    let restored = repair::restore(&ns.netns, &decoded).expect("restore");
    let restore_time = started.elapsed();
    let committed = restored.commit();
    assert!(committed.failures.is_empty(), "{:?}", committed.failures);
    conns.adopt(committed.sockets);
    conns.verify();
    assert_eq!(ns.resets_sent(), resets, "no RST may be sent");
    eprintln!(
        "{n} connections ({loopback}): dump {dump_time:?}, restore {restore_time:?}, image {} bytes",
        image.len()
    );
}

#[test]
fn migrate_one() {
    migrate_in_place(1, "127.0.0.1");
}

#[test]
fn migrate_hundred_v6() {
    migrate_in_place(100, "::1");
}

#[test]
fn migrate_hundred() {
    migrate_in_place(100, "127.0.0.1");
}

#[test]
fn migrate_thousand() {
    migrate_in_place(1000, "127.0.0.1");
}

#[test]
fn rollback_leaves_connections_running() {
    let ns = TestNetns::new();
    let mut conns = Connections::open(&ns, 50, "127.0.0.1");
    conns.load(4);
    let resets = ns.resets_sent();
    let fds = conns.duplicated_server_fds();
    let dumped = repair::dump(fds).expect("dump");
    assert_eq!(dumped.len(), 50);
    dumped.rollback().expect("rollback");
    conns.verify();
    // Dropping an unsettled dump rolls back too.
    let fds = conns.duplicated_server_fds();
    drop(repair::dump(fds).expect("dump"));
    conns.verify();
    assert_eq!(ns.resets_sent(), resets);
}

/// A pre-copy leaves its sockets in repair mode; dropping the prepared dump, or rolling back
/// the dump made after it, takes them out again: the connections carry on, byte-exact.
#[test]
fn a_precopy_rolls_back() {
    let ns = TestNetns::new();
    let mut conns = Connections::open(&ns, 50, "127.0.0.1");
    let resets = ns.resets_sent();
    let in_repair = |conns: &Connections| {
        conns
            .duplicated_server_fds()
            .iter()
            .filter(|fd| {
                let mut value = 0i32;
                let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
                // SAFETY: getsockopt into an int of its size, on an fd we own.
                let ret = unsafe {
                    libc::getsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(*fd),
                        libc::SOL_TCP,
                        libc::TCP_REPAIR,
                        (&raw mut value).cast(),
                        &mut len,
                    )
                };
                assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
                value != 0
            })
            .count()
    };
    for dump_first in [false, true] {
        conns.load(4);
        let mut prepared =
            repair::prepare_dump(repair::Workers::PerCpu, conns.duplicated_server_fds()).unwrap();
        let mut reader = repair::StateReader::load(None).unwrap();
        let states = reader.read(&ns.netns).unwrap();
        // Not those whose send queue holds bytes (flooded ones).
        let port = conns.listener.local_addr().unwrap().port();
        let idle = states
            .values()
            .filter(|s| s.tuple.local.port() == port && s.state == TcpState::Established)
            .filter(|s| s.outq == 0)
            .count();
        assert!((40..=50).contains(&idle), "{idle} idle connections");
        // None has been quiet for an hour.
        assert!(
            prepared
                .precopy(&states, Duration::from_secs(3600))
                .is_empty()
        );
        assert_eq!(prepared.precopy(&states, Duration::ZERO).len(), idle);
        assert_eq!(in_repair(&conns), idle);
        if dump_first {
            let dumped = prepared.dump(&mut reader).expect("dump");
            assert_eq!(in_repair(&conns), 50);
            dumped.rollback().expect("rollback");
        } else {
            drop(prepared);
        }
        assert_eq!(in_repair(&conns), 0);
        conns.verify();
    }
    assert_eq!(ns.resets_sent(), resets);
}

/// The application still holds the sockets (we dumped duplicates, as pidfd_getfd gives):
/// after the commit they are disconnected without a word. Its reads fail with ECONNABORTED,
/// and nothing leaves the namespace, neither then nor later from a timer, although the flooded
/// connections had bytes waiting behind a zero window (a live repair-mode socket would probe
/// it); closing them afterwards sends no RST either.
#[test]
fn commit_disconnects_the_applications_sockets() {
    let ns = TestNetns::new();
    let mut conns = Connections::open(&ns, 20, "127.0.0.1");
    conns.load(4);
    let resets = ns.resets_sent();
    let fds = conns.duplicated_server_fds();
    repair::dump(fds).expect("dump").commit();
    let sent = ns.tcp_counter("OutSegs");
    let port = conns.listener.local_addr().unwrap().port();
    let server_ends = repair::list_tcp_sockets(&ns.netns)
        .unwrap()
        .into_iter()
        .filter(|s| s.tuple.local.port() == port && s.state != TcpState::Listen)
        .count();
    assert_eq!(server_ends, 0, "disconnected sockets leave the tables");
    // Longer than the persist and retransmission timers (docs/tcp-repair.md: 0.5 s in repair mode).
    std::thread::sleep(Duration::from_millis(1500));
    for (k, server) in conns.servers.iter().enumerate() {
        let error = (&*server).read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ECONNABORTED),
            "connection {k}: {error}"
        );
    }
    assert_eq!(ns.tcp_counter("OutSegs"), sent, "no segment may leave");
    conns.servers.clear();
    assert_eq!(ns.tcp_counter("OutSegs"), sent, "closing sends nothing");
    assert_eq!(ns.resets_sent(), resets);
}

/// A 4-tuple already live at the destination: clear error, and nothing half-restored left.
#[test]
fn tuple_in_use_is_refused_cleanly() {
    let ns = TestNetns::new();
    let mut conns = Connections::open(&ns, 3, "127.0.0.1");
    conns.load(0);
    let dumped = repair::dump(conns.server_fds()).expect("dump");
    let saved = image::decode(&image::encode(dumped.connections())).unwrap();
    dumped.commit();
    let port = conns.listener.local_addr().unwrap().port();
    let established = || {
        repair::list_tcp_sockets(&ns.netns)
            .unwrap()
            .into_iter()
            .filter(|s| s.tuple.local.port() == port && s.state == TcpState::Established)
            .count()
    };
    assert_eq!(established(), 0);
    // The middle connection comes back first and is live.
    let middle = repair::restore(&ns.netns, &saved[1..2]).unwrap().commit();
    assert!(middle.failures.is_empty());
    assert_eq!(established(), 1);
    let error = repair::restore(&ns.netns, &saved).err().expect("must fail");
    assert!(matches!(error, RepairError::TupleInUse { tuple, .. } if tuple == saved[1].tuple));
    let message = error.to_string();
    assert!(
        message.contains(&saved[1].tuple.to_string()) && message.contains("closed silently"),
        "{message}"
    );
    assert_eq!(
        established(),
        1,
        "the first connection must not stay half-restored"
    );
    // The others are still restorable and every stream is intact.
    let rest = repair::restore(&ns.netns, &[saved[0].clone(), saved[2].clone()])
        .unwrap()
        .commit();
    assert!(rest.failures.is_empty());
    let mut all = middle.sockets;
    all.extend(rest.sockets);
    conns.adopt(all);
    conns.verify();
}

/// Discovery through sock_diag and /proc/self/fd, with a port filter; explicit targets that do
/// not exist are refused by name.
#[test]
fn discover_own_connections() {
    let ns = TestNetns::new();
    let conns = Connections::open(&ns, 20, "127.0.0.1");
    let port = conns.listener.local_addr().unwrap().port();
    let pid = std::process::id();
    let filter = Filter {
        port: Some(port),
        ..Filter::default()
    };
    let found = repair::discover(&ns.netns, pid, &filter).unwrap();
    assert_eq!(found.sockets.len(), 20);
    assert_eq!(found.listening, vec![conns.listener.local_addr().unwrap()]);
    assert!(found.sockets.iter().all(|s| s.tuple.local.port() == port));
    let stranger = Tuple {
        local: SocketAddr::from(([127, 0, 0, 1], port)),
        remote: SocketAddr::from(([127, 0, 0, 1], 1)),
    };
    let filter = Filter {
        tuples: vec![stranger],
        ..Filter::default()
    };
    let error = repair::discover(&ns.netns, pid, &filter).unwrap_err();
    assert!(matches!(error, RepairError::NotOwned { .. }), "{error}");
}
