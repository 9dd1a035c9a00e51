//! The migration link over mutual TLS 1.3, on the test bed: 1,000 connections kept byte-exact
//! while a capture of the agent's port holds a TLS 1.3 handshake and none of the connections'
//! queued bytes nor the token (and, as a control, holds them over `--insecure`); every bad peer
//! refused by both commands, naming the TLS failure, before anything is frozen, with the
//! source's connections carrying on; neither command starts without TLS or `--insecure`.
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test tls -- --test-threads=1`.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::Arc,
};

use anyhow::{Context as _, Result, ensure};
use support::{
    AGENT_PORT, BYTES, MORE, PEER, Running, STEP_TIMEOUT_SECS, adopted_stream, agent_command_with,
    carries_on, insecure, migrate_command, nothing_left, process_state, queued_traffic, run_tcpmig,
};
use tcpmig_testbed::{
    Capture, IFACE, Peer, PeerArgs, Pki, TestBed, TokenFile, Traffic,
    pattern::{self, Direction},
    pki::{Identity, Kind},
};

const PORT: u16 = 8400;
/// What a token file holds in these tests: it must never be seen on the wire.
const TOKEN: &str = "tcpmig-tls-test-token-7f3a9c";

/// A migration of the bed's server over `agent_link`/`source_link`, the agent becoming the
/// adopting server; returns the capture of the agent's port.
fn migrate_captured<'bed>(
    bed: &'bed TestBed,
    traffic: &mut Traffic<'bed>,
    agent_link: &[String],
    source_link: &[String],
) -> Result<Vec<u8>> {
    let destination = bed.destination();
    let capture = Capture::start(destination, AGENT_PORT)?;
    let mut cmd = agent_command_with(destination, agent_link, &[], None)?;
    cmd.arg("--")
        .arg(PEER)
        .args(PeerArgs::adopting_server(adopted_stream()).to_args());
    let mut agent = Peer::spawn(destination, cmd, "tcpmig agent", support::COMMAND_TIMEOUT)?;
    let server_pid = traffic.server_pids()[0];
    let mut migrate = spawn_migrate(bed, server_pid, source_link)?;
    agent.expect_line("ready")?;
    let (status, _, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    traffic.servers = vec![agent];
    capture.stop_raw()
}

/// Bytes the clients wrote that the server had not read: they travel in the image.
fn queued_marker(bed: &TestBed) -> Result<Vec<u8>> {
    let client = first_client(bed)?;
    let mut marker = vec![0u8; 32];
    pattern::fill(
        client,
        Direction::ClientToServer,
        BYTES + MORE / 2,
        &mut marker,
    );
    Ok(marker)
}

/// The client end of one connection to the service, from the source's /proc/net/tcp.
fn first_client(bed: &TestBed) -> Result<SocketAddr> {
    let table = bed
        .source()
        .run(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))??;
    table
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (port == PORT && *state == "01").then(|| parse_proc_addr(remote))?
        })
        .context("no established connection to the service in /proc/net/tcp")
}

/// `0100000A:1F90` (little-endian address, big-endian port) as 10.0.0.1:8080.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes());
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A ServerHello's supported_versions extension choosing TLS 1.3 (type 43, length 2, 0x0304).
const TLS13_CHOSEN: [u8; 6] = [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];

#[test]
fn thousand_connections_over_mutual_tls_and_nothing_in_clear() -> Result<()> {
    const N: usize = 1000;
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let pki = Pki::new(&bed, bed.destination().v4().into())?;
    let token = TokenFile::new(&bed, "tls", TOKEN)?;
    let token_args = ["--token-file".to_owned(), token.0.display().to_string()];
    let marker = queued_marker(&bed)?;
    let agent_link = [pki.agent().args(), token_args.to_vec()].concat();
    let source_link = [pki.source().args(), token_args.to_vec()].concat();
    let wire = migrate_captured(&bed, &mut traffic, &agent_link, &source_link)?;
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "at the destination: {after:?}"
    );
    ensure!(
        wire.len() > 100_000,
        "the image crossed: {} bytes",
        wire.len()
    );
    ensure!(contains(&wire, &TLS13_CHOSEN), "no TLS 1.3 ServerHello");
    ensure!(!contains(&wire, &marker), "queued bytes in clear");
    ensure!(!contains(&wire, TOKEN.as_bytes()), "the token in clear");
    Ok(())
}

/// The control: the same capture over `--insecure` sees both, so the checks above can fail.
#[test]
fn plaintext_links_show_the_queued_bytes_and_the_token() -> Result<()> {
    const N: usize = 50;
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "plain", TOKEN)?;
    let marker = queued_marker(&bed)?;
    let link = insecure(&token.0);
    let wire = migrate_captured(&bed, &mut traffic, &link, &link)?;
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "at the destination: {after:?}"
    );
    ensure!(contains(&wire, &marker), "the queued bytes were not seen");
    ensure!(contains(&wire, TOKEN.as_bytes()), "the token was not seen");
    ensure!(!contains(&wire, &TLS13_CHOSEN), "a TLS handshake");
    Ok(())
}

/// One bad pairing: the agent (its command /bin/true) with `agent_link`, `tcpmig migrate` of
/// the bed's server with `source_link`; both must fail saying what they must, and the server
/// must never have been stopped. Returns migrate's pid.
fn refused(
    bed: &TestBed,
    server_pid: u32,
    agent_link: &[String],
    source_link: &[String],
    agent_says: &str,
    migrate_says: &str,
) -> Result<u32> {
    let destination = bed.destination();
    let mut cmd = agent_command_with(destination, agent_link, &[], None)?;
    cmd.args(["--", "/bin/true"]);
    let mut agent = Running::spawn(destination, cmd)?;
    let mut migrate = spawn_migrate(bed, server_pid, source_link)?;
    let migrate_pid = migrate.child.pid();
    let said = migrate.fails_saying(migrate_says)?;
    ensure!(said.contains("nothing was changed"), "migrate: {said}");
    agent.fails_saying(agent_says)?;
    ensure!(
        process_state(server_pid) != Some('T'),
        "the server must run"
    );
    Ok(migrate_pid)
}

/// A case, the agent's link arguments, the source's, and what each must say.
type BadPair<'a> = (&'a str, Vec<String>, Vec<String>, &'a str, &'a str);

#[test]
fn bad_peers_are_refused_before_anything_is_frozen() -> Result<()> {
    const N: usize = 50;
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let server_pid = traffic.server_pids()[0];
    let agent_ip = bed.destination().v4().to_string();
    let pki = Pki::new(&bed, bed.destination().v4().into())?;
    let token = TokenFile::new(&bed, "bad", TOKEN)?;
    let (good_agent, good_source) = (pki.agent().args(), pki.source().args());
    let stranger = pki.issue("stranger", "tcpmig-source", Kind::UnknownCa)?;
    let expired_source = pki.issue("expired-source", "tcpmig-source", Kind::Expired)?;
    let expired_agent = pki.issue("expired-agent", &agent_ip, Kind::Expired)?;
    let wrong_name = [
        good_source.clone(),
        vec!["--tls-name".into(), "other.example".into()],
    ];
    let cases: [BadPair; 6] = [
        (
            "a source certificate of an unknown CA",
            good_agent.clone(),
            stranger.args(),
            "UnknownIssuer",
            "TLS handshake with",
        ),
        (
            "an agent certificate for another name",
            good_agent.clone(),
            wrong_name.concat(),
            "TLS handshake with",
            "certificate not valid for name \"other.example\"",
        ),
        (
            "an expired source certificate",
            good_agent.clone(),
            expired_source.args(),
            "certificate expired",
            "TLS handshake with",
        ),
        (
            "an expired agent certificate",
            expired_agent.args(),
            good_source.clone(),
            "TLS handshake with",
            "certificate expired",
        ),
        (
            "a plaintext source",
            good_agent.clone(),
            insecure(&token.0),
            "speaks plaintext, not TLS",
            "this agent speaks TLS only",
        ),
        (
            "a plaintext agent",
            insecure(&token.0),
            good_source.clone(),
            "speaks TLS and this side was started with --insecure",
            "closed the link during the TLS handshake",
        ),
    ];
    let mut freezes = Vec::new();
    for (case, agent_link, source_link, agent_says, migrate_says) in cases {
        let pid = refused(
            &bed,
            server_pid,
            &agent_link,
            &source_link,
            agent_says,
            migrate_says,
        )
        .with_context(|| case.to_owned())?;
        freezes.push(format!("migrate-{pid}"));
    }
    no_client_certificate(&bed, &pki)?;
    carries_on(&mut traffic, N)?;
    nothing_left(&bed, &freezes, bed.source())
}

/// A TLS client with no certificate, which `tcpmig migrate` cannot be: the agent refuses it,
/// and says so.
fn no_client_certificate(bed: &TestBed, pki: &Pki) -> Result<()> {
    let destination = bed.destination();
    let mut cmd = agent_command_with(destination, &pki.agent().args(), &[], None)?;
    cmd.args(["--", "/bin/true"]);
    let mut agent = Running::spawn(destination, cmd)?;
    let agent_addr = SocketAddr::new(destination.v4().into(), AGENT_PORT);
    let answer = bed
        .client()
        .run(|| anonymous_client(agent_addr, pki.agent()))??;
    ensure!(
        answer.is_err(),
        "a client without a certificate: {answer:?}"
    );
    agent.fails_saying("TLS handshake with")?;
    Ok(())
}

/// Connects to `agent` (retrying while it does not listen yet) with TLS and no client
/// certificate, writes a byte and reads the answer: the error the client got, if any.
fn anonymous_client(agent: SocketAddr, trusted: &Identity) -> Result<Result<Vec<u8>, String>> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&trusted.ca)?;
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(agent.ip().into());
    let deadline = std::time::Instant::now() + support::COMMAND_TIMEOUT;
    let tcp = loop {
        match TcpStream::connect_timeout(&agent, support::COMMAND_TIMEOUT) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other?,
        }
    };
    tcp.set_read_timeout(Some(support::COMMAND_TIMEOUT))?;
    let connection = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let mut answer = Vec::new();
    let talked = tls
        .write_all(b"\0")
        .and_then(|()| tls.read_to_end(&mut answer));
    Ok(talked.map(|_| answer).map_err(|e| e.to_string()))
}

#[test]
fn commands_need_tls_or_insecure_and_usable_files() -> Result<()> {
    const N: usize = 10;
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let server_pid = traffic.server_pids()[0].to_string();
    let pki = Pki::new(&bed, bed.destination().v4().into())?;
    let (source, destination) = (bed.source(), bed.destination());
    let listen = SocketAddr::new(destination.v4().into(), AGENT_PORT).to_string();
    let service = support::service(PORT).to_string();
    let agent = ["agent", "--listen", &listen, "--dev", IFACE];
    let migrate = support::migrate_args(&server_pid, &service, &listen);
    let (agent_files, source_files) = (pki.agent(), pki.source());
    // The source's key with the agent's certificate; a CA file that does not exist.
    let mismatched = Identity {
        key: source_files.key.clone(),
        ..agent_files.clone()
    }
    .args();
    let no_ca = Identity {
        ca: "/nonexistent/ca.pem".into(),
        ..source_files.clone()
    }
    .args();
    let cases: [(&tcpmig_testbed::Host, &[&str], &[String], &str); 4] = [
        (
            destination,
            &agent,
            &[],
            "give --tls-cert, --tls-key and --tls-ca",
        ),
        (
            source,
            &migrate,
            &[],
            "give --tls-cert, --tls-key and --tls-ca",
        ),
        (
            destination,
            &agent,
            &mismatched,
            "does not go with the certificate",
        ),
        (
            source,
            &migrate,
            &no_ca,
            "reading the TLS CA /nonexistent/ca.pem",
        ),
    ];
    for (host, command, link, want) in cases {
        let mut args: Vec<&str> = command.to_vec();
        args.extend(link.iter().map(String::as_str));
        if command[0] == "agent" {
            args.extend(["--", "/bin/true"]);
        }
        let (status, stderr) = run_tcpmig(host, &args, |_| {})?;
        ensure!(
            !status.success() && stderr.contains(want),
            "{args:?}: {stderr}"
        );
    }
    ensure!(
        process_state(traffic.server_pids()[0]) != Some('T'),
        "the server must run"
    );
    carries_on(&mut traffic, N)
}

/// `tcpmig migrate` of `server_pid` from the source to the destination's agent over `link`.
fn spawn_migrate<'bed>(
    bed: &'bed TestBed,
    server_pid: u32,
    link: &[String],
) -> Result<Running<'bed>> {
    let (source, destination) = (bed.source(), bed.destination());
    let cmd = migrate_command(
        source,
        destination,
        &[server_pid],
        PORT,
        link,
        STEP_TIMEOUT_SECS,
    )?;
    Running::spawn(source, cmd)
}
