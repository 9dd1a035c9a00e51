//! New connections at the destination's end of the blackout: a client whose SYN reaches the
//! destination after the address moved there but before its freeze is lifted (the agent paused
//! between the two) is answered once the freeze lifts, from what the agent held, not after the
//! client's one-second SYN retransmission; the connection is accepted on the listener the
//! agent hands over. Needs root; run with `--test-threads=1`.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixListener,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use support::COMMAND_TIMEOUT;
use tcpmig_testbed::{TestBed, TokenFile, nstat::TcpCounters};

const PORT: u16 = 8420;

#[test]
fn a_syn_the_destination_freeze_drops_is_answered_when_it_lifts() -> Result<()> {
    let bed = TestBed::new()?;
    let traffic = support::queued_traffic(&bed, 10, PORT)?;
    let token = TokenFile::new(&bed, "held-syn", "held syn token")?;
    let scratch = support::Scratch::new(&bed)?;
    let socket = scratch.path("handoff.sock");
    let unix = UnixListener::bind(&socket)?;
    unix.set_nonblocking(true)?;
    let destination = bed.destination();
    let mut cmd = support::agent_command(destination, &token.0, &[], Some("agent-claimed"))?;
    cmd.arg("--handoff").arg(&socket);
    let mut agent = support::Running::spawn(destination, cmd)?;
    let server = traffic.server_pids()[0];
    let mut migrate = support::start_unpaused_migrate(
        bed.source(),
        destination,
        &[server],
        PORT,
        &token.0,
        &["--json"],
    )?;
    agent
        .stderr
        .wait_for("test pause at agent-claimed", COMMAND_TIMEOUT)?;
    // The address is on the destination and announced; its freeze is still on.
    let before = TcpCounters::read_in(bed.client())?;
    let client = support::pairs::connect_begun(bed.client(), None, support::service(PORT))?;
    std::thread::sleep(Duration::from_millis(50));
    agent.resume()?;
    let (status, stdout, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout)?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let (_, fds) = support::receive_handoff_on(&unix, deadline, || Ok(()))?;
    agent.finish()?;
    let (_, listeners) = support::split_listeners(fds)?;
    ensure!(
        listeners.len() == 1,
        "{} listeners handed over",
        listeners.len()
    );
    let mut served = support::accept_within(&listeners[0], COMMAND_TIMEOUT)?;
    let mut client = TcpStream::from(client);
    client.set_nonblocking(false)?;
    ensure!(
        served.peer_addr()? == client.local_addr()?,
        "accepted another connection"
    );
    client.write_all(b"held")?;
    let mut word = [0u8; 4];
    served.read_exact(&mut word)?;
    ensure!(&word == b"held", "read {word:?}");
    let counted = TcpCounters::read_in(bed.client())?.since(&before);
    let here = &report["destination"]["held_here"];
    eprintln!(
        "held here {here}, replay {}, client {counted:?}",
        report["destination"]["replay"]
    );
    ensure!(
        counted.syn_retrans == 0,
        "the client retransmitted its SYN: {counted:?}"
    );
    ensure!(
        here["packets"].as_u64() >= Some(1),
        "nothing held: {report}"
    );
    ensure!(report["destination"]["replay"]["failed"] == 0, "{report}");
    Ok(())
}
