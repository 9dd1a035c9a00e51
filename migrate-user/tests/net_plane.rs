//! The network plane on real network namespaces (root and iproute2 needed). Each test builds its
//! own LAN: namespaces A (source) and B (destination), each with an eth0 veth whose other end is
//! a port of bridge br0 in namespace P (the peer, a client of the service). Only addresses of
//! 198.18.0.0/24 and fd54:636d::/64 are used, only inside these namespaces, and the guard deletes
//! the namespaces even when a test fails.
use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use tcpmig::net::{
    NetError, Netns, add_address, announce, delete_address, has_address, move_address,
};

const MAC_A: &str = "02:54:00:00:00:0a";
const MAC_B: &str = "02:54:00:00:00:0b";
const WRONG_MAC: &str = "02:00:00:00:00:01";
const PORT: u16 = 8080;

/// Runs `ip ARGS`, fails the test with its stderr if it fails, returns its stdout.
fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("ip prints UTF-8")
}

/// Polls `condition` every 10 ms for at most `limit`.
fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Three namespaces on one bridge; dropping it deletes them (and so every link in them).
struct Lan {
    names: Vec<String>,
}

impl Lan {
    fn new(test: &str) -> Self {
        let prefix = format!("tnp{}-{test}", std::process::id());
        let mut lan = Self { names: Vec::new() };
        for side in ["a", "b", "p"] {
            let name = format!("{prefix}-{side}");
            ip(&["netns", "add", &name]);
            lan.names.push(name);
        }
        let p = lan.names[2].clone();
        ip(&["-n", &p, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &p, "link", "set", "br0", "up"]);
        for (ns, port, mac) in [(&lan.names[0], "va", MAC_A), (&lan.names[1], "vb", MAC_B)] {
            ip(&[
                "-n", ns, "link", "add", "eth0", "address", mac, "type", "veth", "peer", "name",
                port, "netns", &p,
            ]);
            ip(&["-n", &p, "link", "set", port, "master", "br0", "up"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        ip(&["-n", &p, "addr", "add", "198.18.0.1/24", "dev", "br0"]);
        ip(&[
            "-n",
            &p,
            "addr",
            "add",
            "fd54:636d::1/64",
            "dev",
            "br0",
            "nodad",
        ]);
        lan
    }

    fn open(&self, index: usize) -> Netns {
        Netns::open(&self.names[index]).expect("opening the test namespace")
    }

    fn a(&self) -> Netns {
        self.open(0)
    }

    fn b(&self) -> Netns {
        self.open(1)
    }

    fn p(&self) -> Netns {
        self.open(2)
    }

    /// The MAC P's neighbour table holds for `addr`, if any.
    fn peer_lladdr(&self, addr: IpAddr) -> Option<String> {
        let shown = ip(&[
            "-n",
            &self.names[2],
            "neigh",
            "show",
            "to",
            &addr.to_string(),
            "dev",
            "br0",
        ]);
        let mut words = shown.split_whitespace();
        words.find(|&word| word == "lladdr")?;
        words.next().map(str::to_owned)
    }

    /// Gives P a neighbour entry for `addr` with a MAC nobody has, as a stale cache would be.
    fn poison_peer(&self, addr: IpAddr) {
        let addr = addr.to_string();
        let p = &self.names[2];
        ip(&[
            "-n", p, "neigh", "replace", &addr, "lladdr", WRONG_MAC, "dev", "br0", "nud", "stale",
        ]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for name in &self.names {
            let deleted = Command::new("ip").args(["netns", "del", name]).status();
            if !matches!(deleted, Ok(status) if status.success()) {
                eprintln!("could not delete network namespace {name}: {deleted:?}");
            }
        }
    }
}

fn addr(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn peer_of(service: IpAddr) -> IpAddr {
    addr(if service.is_ipv4() {
        "198.18.0.1"
    } else {
        "fd54:636d::1"
    })
}

fn add_has_delete(test: &str, service: IpAddr, prefix_len: u8) {
    let lan = Lan::new(test);
    let a = lan.a();
    assert!(!has_address(&a, "eth0", service, prefix_len).unwrap());
    add_address(&a, "eth0", service, prefix_len).unwrap();
    add_address(&a, "eth0", service, prefix_len).expect("adding twice is not an error");
    assert!(has_address(&a, "eth0", service, prefix_len).unwrap());
    assert!(!has_address(&a, "eth0", service, prefix_len - 1).unwrap());

    let shown = ip(&["-n", &lan.names[0], "addr", "show", "dev", "eth0"]);
    let line = shown
        .lines()
        .find(|line| line.contains(&format!("{service}/{prefix_len}")))
        .unwrap_or_else(|| panic!("ip addr does not list {service}: {shown}"));
    assert!(!line.contains("tentative"), "usable at once: {line}");

    delete_address(&a, "eth0", service, prefix_len).unwrap();
    assert!(!has_address(&a, "eth0", service, prefix_len).unwrap());
    let again = delete_address(&a, "eth0", service, prefix_len);
    assert!(
        matches!(again, Err(NetError::AddressMissing { .. })),
        "{again:?}"
    );
    let unknown = add_address(&a, "nosuch0", service, prefix_len);
    assert!(
        matches!(unknown, Err(NetError::NoInterface { .. })),
        "{unknown:?}"
    );
}

#[test]
fn add_has_delete_v4() {
    add_has_delete("addv4", addr("198.18.0.10"), 24);
}

#[test]
fn add_has_delete_v6() {
    add_has_delete("addv6", addr("fd54:636d::10"), 64);
}

#[test]
fn v6_address_with_another_prefix_is_a_conflict() {
    let lan = Lan::new("conflict");
    let a = lan.a();
    let service = addr("fd54:636d::10");
    add_address(&a, "eth0", service, 64).unwrap();
    let other = add_address(&a, "eth0", service, 120);
    assert!(
        matches!(other, Err(NetError::AddressConflict { .. })),
        "{other:?}"
    );
}

/// A listener on every address of `netns`, so that it can exist before the service address does.
fn listen(netns: &Netns, service: IpAddr) -> TcpListener {
    let any: IpAddr = if service.is_ipv4() {
        addr("0.0.0.0")
    } else {
        addr("::")
    };
    let listener = netns
        .run(|| TcpListener::bind((any, PORT)))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

/// The peer address of the next connection `listener` accepts within a second.
fn accepted(listener: &TcpListener) -> Option<IpAddr> {
    let mut peer = None;
    wait_until(Duration::from_secs(1), || {
        peer = listener.accept().ok().map(|(_, from)| from.ip());
        peer.is_some()
    });
    peer
}

/// Connects from P within `limit` (a client that still sends to the old MAC would time out).
fn peer_connects(lan: &Lan, service: IpAddr, limit: Duration) -> std::io::Result<TcpStream> {
    let target = SocketAddr::new(service, PORT);
    lan.p()
        .run(|| TcpStream::connect_timeout(&target, limit))
        .unwrap()
}

fn move_then_connect(test: &str, service: IpAddr, prefix_len: u8) {
    let lan = Lan::new(test);
    let (a, b) = (lan.a(), lan.b());
    let (on_a, on_b) = (listen(&a, service), listen(&b, service));

    add_address(&a, "eth0", service, prefix_len).unwrap();
    let _before = peer_connects(&lan, service, Duration::from_secs(2)).expect("connect to A");
    assert_eq!(accepted(&on_a), Some(peer_of(service)));
    assert_eq!(lan.peer_lladdr(service).as_deref(), Some(MAC_A));

    move_address(&a, "eth0", &b, "eth0", service, prefix_len).unwrap();
    assert!(!has_address(&a, "eth0", service, prefix_len).unwrap());
    assert!(has_address(&b, "eth0", service, prefix_len).unwrap());
    assert_eq!(lan.peer_lladdr(service).as_deref(), Some(MAC_B));
    // P's entry for A was REACHABLE: without the announcement the SYN would go to A and be lost.
    let _after = peer_connects(&lan, service, Duration::from_secs(1)).expect("connect to B");
    assert_eq!(accepted(&on_b), Some(peer_of(service)));

    move_address(&a, "eth0", &b, "eth0", service, prefix_len).expect("a retried move succeeds");
}

#[test]
fn move_v4_then_peer_connects() {
    move_then_connect("movev4", addr("198.18.0.100"), 24);
}

#[test]
fn move_v6_then_peer_connects() {
    move_then_connect("movev6", addr("fd54:636d::100"), 64);
}

#[test]
fn failed_move_puts_the_address_back() {
    let lan = Lan::new("rollback");
    let (a, b) = (lan.a(), lan.b());
    let service = addr("198.18.0.100");
    add_address(&a, "eth0", service, 24).unwrap();
    let moved = move_address(&a, "eth0", &b, "nosuch0", service, 24);
    assert!(matches!(moved, Err(NetError::Move { .. })), "{moved:?}");
    assert!(has_address(&a, "eth0", service, 24).unwrap());
}

/// P holds a STALE entry with a wrong MAC for the service; B's announcement corrects it.
fn announcement_fixes_neighbour(test: &str, service: IpAddr, prefix_len: u8) {
    let lan = Lan::new(test);
    let b = lan.b();
    add_address(&b, "eth0", service, prefix_len).unwrap();
    lan.poison_peer(service);
    assert_eq!(lan.peer_lladdr(service).as_deref(), Some(WRONG_MAC));

    announce(&b, "eth0", service, 3, Duration::from_millis(20)).unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || {
            lan.peer_lladdr(service).as_deref() == Some(MAC_B)
        }),
        "P still has {:?} for {service}",
        lan.peer_lladdr(service)
    );
}

#[test]
fn gratuitous_arp_fixes_stale_neighbour() {
    announcement_fixes_neighbour("garp", addr("198.18.0.100"), 24);
}

#[test]
fn neighbour_advertisement_fixes_stale_neighbour() {
    announcement_fixes_neighbour("na", addr("fd54:636d::100"), 64);
}

#[test]
fn announce_refuses_what_it_must_not_send() {
    let lan = Lan::new("refuse");
    let b = lan.b();
    let service = addr("198.18.0.100");
    let interval = Duration::from_millis(20);
    let unheld = announce(&b, "eth0", service, 1, interval);
    assert!(
        matches!(unheld, Err(NetError::NotOnInterface { .. })),
        "{unheld:?}"
    );

    ip(&["-n", &lan.names[1], "link", "set", "lo", "up"]);
    let loopback = announce(&b, "lo", addr("127.0.0.1"), 1, interval);
    assert!(
        matches!(loopback, Err(NetError::NotEthernet { .. })),
        "{loopback:?}"
    );

    add_address(&b, "eth0", service, 24).unwrap();
    let flood = announce(&b, "eth0", service, 1000, interval);
    assert!(
        matches!(flood, Err(NetError::InvalidAnnounce { .. })),
        "{flood:?}"
    );
}
