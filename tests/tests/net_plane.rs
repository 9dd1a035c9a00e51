//! The network plane on the test bed's namespaces (root and iproute2 needed): the source (A)
//! and the destination (B) each have an `eth0` on the bed's bridge, the client (P) is a client of
//! the service. The bed is made without the service address, which the tests add and move
//! themselves. Only addresses of 198.18.0.0/24 and fd54:636d::/64 are used, only inside these
//! namespaces, and the bed deletes them even when a test fails.
use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use tcpmig::net::{
    NetError, Netns, add_address, announce, delete_address, has_address, move_address,
};
use tcpmig_testbed::{Host, IFACE, Role, TestBed};

const WRONG_MAC: &str = "02:00:00:00:00:01";
const PORT: u16 = 8080;

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

/// A bed for one test, the network plane's view of its hosts.
struct Lan {
    bed: TestBed,
}

impl Lan {
    fn new() -> Self {
        Self {
            bed: TestBed::without_service().expect("building the test bed"),
        }
    }

    fn open(host: &Host) -> Netns {
        Netns::open(host.name()).expect("opening the test namespace")
    }

    fn a(&self) -> Netns {
        Self::open(self.bed.source())
    }

    fn b(&self) -> Netns {
        Self::open(self.bed.destination())
    }

    fn p(&self) -> Netns {
        Self::open(self.bed.client())
    }

    /// The MAC of A's (the source's) `eth0`.
    fn mac_a(&self) -> String {
        self.bed.source().mac().unwrap()
    }

    /// The MAC of B's (the destination's) `eth0`.
    fn mac_b(&self) -> String {
        self.bed.destination().mac().unwrap()
    }

    /// Runs `ip ARGS` in P (the client), failing the test if it fails.
    fn ip_p(&self, args: &[&str]) -> String {
        self.bed.client().ip(args).unwrap()
    }

    /// The MAC P's neighbour table holds for `addr`, if any.
    fn peer_lladdr(&self, addr: IpAddr) -> Option<String> {
        let shown = self.ip_p(&["neigh", "show", "to", &addr.to_string(), "dev", IFACE]);
        let mut words = shown.split_whitespace();
        words.find(|&word| word == "lladdr")?;
        words.next().map(str::to_owned)
    }

    /// Gives P a neighbour entry for `addr` with a MAC nobody has, as a stale cache would be.
    fn poison_peer(&self, addr: IpAddr) {
        let addr = addr.to_string();
        self.ip_p(&[
            "neigh", "replace", &addr, "lladdr", WRONG_MAC, "dev", IFACE, "nud", "stale",
        ]);
    }
}

fn addr(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

/// P's (the client's) own address of the service's family: 198.18.0.1 or fd54:636d::1.
fn peer_of(service: IpAddr) -> IpAddr {
    if service.is_ipv4() {
        Role::Client.v4().into()
    } else {
        Role::Client.v6().into()
    }
}

fn add_has_delete(service: IpAddr, prefix_len: u8) {
    let lan = Lan::new();
    let a = lan.a();
    assert!(!has_address(&a, "eth0", service, prefix_len).unwrap());
    add_address(&a, "eth0", service, prefix_len).unwrap();
    add_address(&a, "eth0", service, prefix_len).expect("adding twice is not an error");
    assert!(has_address(&a, "eth0", service, prefix_len).unwrap());
    assert!(!has_address(&a, "eth0", service, prefix_len - 1).unwrap());

    let shown = lan
        .bed
        .source()
        .ip(&["addr", "show", "dev", IFACE])
        .unwrap();
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
    add_has_delete(addr("198.18.0.10"), 24);
}

#[test]
fn add_has_delete_v6() {
    add_has_delete(addr("fd54:636d::10"), 64);
}

#[test]
fn v6_address_with_another_prefix_is_a_conflict() {
    let lan = Lan::new();
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

fn move_then_connect(service: IpAddr, prefix_len: u8) {
    let lan = Lan::new();
    let (a, b) = (lan.a(), lan.b());
    let (on_a, on_b) = (listen(&a, service), listen(&b, service));

    add_address(&a, "eth0", service, prefix_len).unwrap();
    let _before = peer_connects(&lan, service, Duration::from_secs(2)).expect("connect to A");
    assert_eq!(accepted(&on_a), Some(peer_of(service)));
    assert_eq!(
        lan.peer_lladdr(service).as_deref(),
        Some(lan.mac_a().as_str())
    );

    move_address(&a, "eth0", &b, "eth0", service, prefix_len).unwrap();
    assert!(!has_address(&a, "eth0", service, prefix_len).unwrap());
    assert!(has_address(&b, "eth0", service, prefix_len).unwrap());
    assert_eq!(
        lan.peer_lladdr(service).as_deref(),
        Some(lan.mac_b().as_str())
    );
    // P's entry for A was REACHABLE: without the announcement the SYN would go to A and be lost.
    let _after = peer_connects(&lan, service, Duration::from_secs(1)).expect("connect to B");
    assert_eq!(accepted(&on_b), Some(peer_of(service)));

    move_address(&a, "eth0", &b, "eth0", service, prefix_len).expect("a retried move succeeds");
}

#[test]
fn move_v4_then_peer_connects() {
    move_then_connect(addr("198.18.0.100"), 24);
}

#[test]
fn move_v6_then_peer_connects() {
    move_then_connect(addr("fd54:636d::100"), 64);
}

#[test]
fn failed_move_puts_the_address_back() {
    let lan = Lan::new();
    let (a, b) = (lan.a(), lan.b());
    let service = addr("198.18.0.100");
    add_address(&a, "eth0", service, 24).unwrap();
    let moved = move_address(&a, "eth0", &b, "nosuch0", service, 24);
    assert!(matches!(moved, Err(NetError::Move { .. })), "{moved:?}");
    assert!(has_address(&a, "eth0", service, 24).unwrap());
}

/// P holds a STALE entry with a wrong MAC for the service; B's announcement corrects it.
fn announcement_fixes_neighbour(service: IpAddr, prefix_len: u8) {
    let lan = Lan::new();
    let b = lan.b();
    add_address(&b, "eth0", service, prefix_len).unwrap();
    lan.poison_peer(service);
    assert_eq!(lan.peer_lladdr(service).as_deref(), Some(WRONG_MAC));

    announce(&b, "eth0", service, 3, Duration::from_millis(20)).unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || {
            lan.peer_lladdr(service).as_deref() == Some(lan.mac_b().as_str())
        }),
        "P still has {:?} for {service}",
        lan.peer_lladdr(service)
    );
}

#[test]
fn gratuitous_arp_fixes_stale_neighbour() {
    announcement_fixes_neighbour(addr("198.18.0.100"), 24);
}

#[test]
fn neighbour_advertisement_fixes_stale_neighbour() {
    announcement_fixes_neighbour(addr("fd54:636d::100"), 64);
}

#[test]
fn announce_refuses_what_it_must_not_send() {
    let lan = Lan::new();
    let b = lan.b();
    let service = addr("198.18.0.100");
    let interval = Duration::from_millis(20);
    let unheld = announce(&b, "eth0", service, 1, interval);
    assert!(
        matches!(unheld, Err(NetError::NotOnInterface { .. })),
        "{unheld:?}"
    );

    // `lo` is up in every namespace of the bed.
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
