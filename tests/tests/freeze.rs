//! The freeze plane on the test bed, driven through the `tcpmig` command as an operator would:
//! frozen services drop everything in both directions and new SYNs silently, other traffic
//! flows, deadlines lift a freeze whose owner died, bad input leaves nothing behind.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use tcpmig::{freeze, net::Netns};
use tcpmig_testbed::{
    Capture, Host, IFACE, StreamArgs, TestBed, Traffic, tcpmig, tcpmig_bin, tcpmig_ok,
};

const PEER: &str = env!("CARGO_BIN_EXE_tcpmig-peer");
const BYTES: u64 = 1024;
const MORE: u64 = 512;

fn freeze_args<'a>(netns: &'a str, dev: &'a str, service: &'a str, name: &'a str) -> Vec<&'a str> {
    vec![
        "freeze",
        "--netns",
        netns,
        "--dev",
        dev,
        "--service",
        service,
        "--name",
        name,
        "--deadline",
        "120",
    ]
}

/// Removes the named freeze when the test ends, however it ends.
struct FreezeCleanup(String);

impl Drop for FreezeCleanup {
    fn drop(&mut self) {
        let _ = freeze::remove(&self.0);
    }
}

fn status_json(bed: &TestBed) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&tcpmig_ok([
        "status",
        "--netns",
        bed.source().name(),
        "--json",
    ])?)?)
}

fn nothing_left(bed: &TestBed, name: &str) -> Result<()> {
    ensure!(
        !Path::new(freeze::PIN_ROOT).join(name).exists(),
        "pins of {name} left"
    );
    let attached = freeze::attached_programs(&Netns::open(bed.source().name())?, IFACE)?;
    ensure!(attached.is_empty(), "programs left attached: {attached:?}");
    Ok(())
}

fn connect(host: &Host, to: SocketAddr, timeout: Duration) -> Result<std::io::Result<TcpStream>> {
    host.run(|| TcpStream::connect_timeout(&to, timeout))
}

/// Sum of Recv-Q over the established TCP connections of `host` on `port` (either side).
fn queued_bytes(host: &Host, port: u16) -> Result<u64> {
    let mut cmd = host.command("ss")?;
    cmd.args(["-Htn", "state", "established"]);
    let out = cmd.output()?;
    ensure!(out.status.success(), "ss failed in {}", host.name());
    let text = String::from_utf8(out.stdout)?;
    let port_suffix = format!(":{port}");
    Ok(text
        .lines()
        .filter(|line| line.split_whitespace().any(|w| w.ends_with(&port_suffix)))
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

fn frozen_service_holds_everything(ipv6: bool) -> Result<()> {
    const N: usize = 1_000;
    const PORT: u16 = 7100;
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(ipv6), PORT);
    let mut traffic = Traffic::open_at(&bed, Path::new(PEER), service, N, StreamArgs::new(BYTES))?;
    ensure!(
        traffic.verify()?.all_verified(N as u64),
        "traffic before the freeze"
    );

    let name = format!("{}-svc", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    let service_arg = service.to_string();
    tcpmig_ok(freeze_args(bed.source().name(), IFACE, &service_arg, &name))?;
    let capture = Capture::start(bed.client(), PORT)?;

    // Both directions write while frozen: nothing may arrive on either side.
    traffic.send_all(MORE)?;
    for _ in 0..3 {
        let attempt = connect(bed.client(), service, Duration::from_millis(700))?;
        let error = attempt
            .err()
            .context("a new connection went through a frozen service")?;
        ensure!(
            error.kind() == std::io::ErrorKind::TimedOut,
            "new SYN answered: {error}"
        );
    }
    ensure!(
        queued_bytes(bed.source(), PORT)? == 0,
        "client data reached the source"
    );
    ensure!(
        queued_bytes(bed.client(), PORT)? == 0,
        "source data reached the client"
    );

    let packets = capture.stop()?;
    let syns = packets.iter().filter(|p| p.contains("Flags [S],")).count();
    let answers: Vec<&String> = packets
        .iter()
        .filter(|p| p.contains("Flags [S.]") || p.contains("Flags [R"))
        .collect();
    ensure!(syns >= 3, "capture saw {syns} SYNs");
    ensure!(
        answers.is_empty(),
        "SYN-ACK or RST seen while frozen: {answers:?}"
    );

    let status = status_json(&bed)?;
    let counters = &status["freezes"][0]["counters"];
    ensure!(counters["syn_dropped"].as_u64() >= Some(3), "{counters}");
    ensure!(counters["ingress_dropped"].as_u64() > Some(0), "{counters}");
    ensure!(counters["egress_dropped"].as_u64() > Some(0), "{counters}");

    tcpmig_ok(["unfreeze", "--netns", bed.source().name(), "--name", &name])?;
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "after the unfreeze every connection carries on byte-exact: {after:?}"
    );
    ensure!(after.client.resets + after.server.resets == 0);
    connect(bed.client(), service, Duration::from_secs(3))?
        .context("a new connection after the unfreeze")?;
    nothing_left(&bed, &name)
}

#[test]
fn frozen_service_drops_both_directions_and_new_syns_v4() -> Result<()> {
    frozen_service_holds_everything(false)
}

#[test]
fn frozen_service_drops_both_directions_and_new_syns_v6() -> Result<()> {
    frozen_service_holds_everything(true)
}

/// Listens on `addr` in `host` and answers each connection with the byte it receives.
fn echo_once(host: &Host, addr: SocketAddr) -> Result<std::thread::JoinHandle<()>> {
    let listener = host.run(|| TcpListener::bind(addr))??;
    Ok(std::thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut byte = [0u8];
            if stream.read_exact(&mut byte).is_ok() {
                let _ = stream.write_all(&byte);
            }
        }
    }))
}

fn round_trip(host: &Host, to: SocketAddr) -> Result<()> {
    let mut stream = connect(host, to, Duration::from_secs(2))??;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"x")?;
    let mut byte = [0u8];
    stream.read_exact(&mut byte)?;
    ensure!(&byte == b"x");
    Ok(())
}

/// The scope a migration sets when it stops the application: new connections are stopped (a
/// SYN gets no answer), established ones carry on both ways; widened to the whole service, the
/// established one stops too.
#[test]
fn new_connections_scope_stops_only_syns() -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(false), 7300);
    let listener = bed.source().run(|| TcpListener::bind(service))??;
    let mut client = connect(bed.client(), service, Duration::from_secs(2))??;
    let (mut server, _) = listener.accept()?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let netns = Netns::open(bed.source().name())?;
    let name = format!("{}-new", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    let mut frozen = freeze::Freeze::attach(&netns, IFACE, &name)?;
    frozen.freeze_new_connections(&[service], Duration::from_secs(30))?;

    server.write_all(b"still here")?;
    let mut answer = [0u8; 10];
    client.read_exact(&mut answer)?;
    ensure!(
        &answer == b"still here",
        "the established connection stopped"
    );
    ensure!(
        connect(bed.client(), service, Duration::from_millis(700))?.is_err(),
        "a new connection got through"
    );
    let entries = &frozen.status()?.services;
    ensure!(
        entries.len() == 1 && entries[0].new_connections_only,
        "status: {entries:?}"
    );

    frozen.freeze_services(&[service], Duration::from_secs(30))?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    server.write_all(b"x")?;
    ensure!(
        client.read(&mut answer).is_err(),
        "the widened freeze let a segment through"
    );
    ensure!(!frozen.status()?.services[0].new_connections_only);
    frozen.remove()?;
    nothing_left(&bed, &name)
}

#[test]
fn other_ports_and_addresses_flow_during_a_freeze() -> Result<()> {
    let bed = TestBed::new()?;
    let frozen = SocketAddr::new(TestBed::service(false), 7200);
    let other_port = SocketAddr::new(TestBed::service(false), 7201);
    let other_addr = SocketAddr::new(IpAddr::V4(bed.source().v4()), 7200);
    let _frozen_listener = bed.source().run(|| TcpListener::bind(frozen))??;
    let echoes = [
        echo_once(bed.source(), other_port)?,
        echo_once(bed.source(), other_addr)?,
    ];

    let name = format!("{}-other", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    let frozen_arg = frozen.to_string();
    tcpmig_ok(freeze_args(bed.source().name(), IFACE, &frozen_arg, &name))?;
    ensure!(
        connect(bed.client(), frozen, Duration::from_millis(700))?.is_err(),
        "the frozen service must not answer"
    );
    round_trip(bed.client(), other_port)?;
    round_trip(bed.client(), other_addr)?;
    for echo in echoes {
        echo.join().expect("echo thread");
    }
    tcpmig_ok(["unfreeze", "--netns", bed.source().name(), "--name", &name])?;
    nothing_left(&bed, &name)
}

#[test]
fn deadline_lifts_a_freeze_whose_owner_was_killed() -> Result<()> {
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(false), 7300);
    let _listener = bed.source().run(|| TcpListener::bind(service))??;
    let name = format!("{}-deadline", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    let service_arg = service.to_string();
    let mut args = freeze_args(bed.source().name(), IFACE, &service_arg, &name);
    args.truncate(args.len() - 2);
    args.extend(["--deadline", "2", "--hold"]);
    let mut cmd = Command::new(tcpmig_bin());
    cmd.args(&args).stdout(Stdio::piped()).stdin(Stdio::null());
    let mut owner = bed.source().spawn(&mut cmd)?;
    let stdout = owner.child_mut().stdout.take().context("owner stdout")?;
    let first = BufReader::new(stdout).lines().next();
    ensure!(
        matches!(&first, Some(Ok(line)) if line.starts_with("frozen")),
        "freeze --hold said {first:?}"
    );
    ensure!(
        connect(bed.client(), service, Duration::from_millis(500))?.is_err(),
        "frozen while the owner lives"
    );

    // SAFETY: SIGKILL to the child we started, by pid.
    unsafe { libc::kill(owner.pid() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    loop {
        if connect(bed.client(), service, Duration::from_millis(250))?.is_ok() {
            break;
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(3),
            "traffic still blocked 3 s after the owner died"
        );
    }
    // The programs and pins outlive the owner by design; the entry has simply expired.
    let status = tcpmig_ok(["status", "--netns", bed.source().name()])?;
    ensure!(status.contains("deadline passed"), "{status}");
    tcpmig_ok(["unfreeze", "--netns", bed.source().name(), "--all"])?;
    nothing_left(&bed, &name)
}

#[test]
fn ten_freezes_attach_one_program_per_direction() -> Result<()> {
    let bed = TestBed::new()?;
    let name = format!("{}-ten", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    for port in 7400..7410 {
        let service = SocketAddr::new(TestBed::service(false), port).to_string();
        tcpmig_ok(freeze_args(bed.source().name(), IFACE, &service, &name))?;
    }
    let attached = freeze::attached_programs(&Netns::open(bed.source().name())?, IFACE)?;
    ensure!(attached.len() == 2, "attached: {attached:?}");
    let status = status_json(&bed)?;
    ensure!(status["freezes"][0]["services"].as_array().map(Vec::len) == Some(10));
    tcpmig_ok(["unfreeze", "--netns", bed.source().name(), "--name", &name])?;
    nothing_left(&bed, &name)
}

#[test]
fn bad_input_is_one_clear_line_and_leaves_nothing() -> Result<()> {
    let bed = TestBed::new()?;
    let ns = bed.source().name();
    let name = format!("{}-bad", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    let missing_ns = format!("{}-nosuch", bed.prefix());
    // (command, what its error must name)
    let cases = [
        (
            freeze_args(ns, "nosuch0", "198.18.0.100:80", &name),
            "nosuch0",
        ),
        (
            freeze_args(&missing_ns, IFACE, "198.18.0.100:80", &name),
            &missing_ns,
        ),
        (
            freeze_args(ns, IFACE, "198.18.0.100", &name),
            "198.18.0.100",
        ),
        (
            freeze_args(ns, IFACE, "300.1.1.1:80", &name),
            "300.1.1.1:80",
        ),
    ];
    for (args, named) in &cases {
        check_one_line_error(&tcpmig(args)?, named)?;
    }

    let mut unprivileged = Command::new("setpriv");
    unprivileged
        .args([
            "--bounding-set",
            "-net_admin,-bpf,-sys_admin",
            "--inh-caps",
            "-all",
        ])
        .arg(tcpmig_bin())
        .args(freeze_args(ns, IFACE, "198.18.0.100:80", &name));
    check_one_line_error(&unprivileged.output()?, "CAP_NET_ADMIN")?;
    nothing_left(&bed, &name)
}

fn check_one_line_error(out: &Output, named: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "should fail: {stderr}");
    ensure!(stderr.lines().count() == 1, "one line expected: {stderr:?}");
    ensure!(stderr.contains(named), "{stderr:?} should name {named}");
    Ok(())
}

#[test]
fn tuples_of_pid_freezes_that_process_only() -> Result<()> {
    const N: usize = 20;
    const PORT: u16 = 7500;
    let bed = TestBed::new()?;
    let service = SocketAddr::new(TestBed::service(false), PORT);
    let mut traffic = Traffic::open_at(&bed, Path::new(PEER), service, N, StreamArgs::new(BYTES))?;
    ensure!(traffic.verify()?.all_verified(N as u64));
    let name = format!("{}-pid", bed.prefix());
    let _cleanup = FreezeCleanup(name.clone());
    let pid = traffic.server_pids()[0].to_string();
    let ns = bed.source().name();
    tcpmig_ok([
        "freeze",
        "--netns",
        ns,
        "--dev",
        IFACE,
        "--tuples-of-pid",
        &pid,
        "--name",
        &name,
        "--deadline",
        "120",
    ])?;
    ensure!(status_json(&bed)?["freezes"][0]["tuple_count"].as_u64() == Some(N as u64));

    traffic.send_all(MORE)?;
    // The port itself is not frozen: a new connection still gets the kernel's handshake.
    connect(bed.client(), service, Duration::from_secs(2))?
        .context("a new connection to the same port")?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        queued_bytes(bed.source(), PORT)? == 0,
        "frozen connections delivered data"
    );

    tcpmig_ok(["unfreeze", "--netns", ns, "--name", &name])?;
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(after.all_verified(N as u64), "{after:?}");
    nothing_left(&bed, &name)
}
