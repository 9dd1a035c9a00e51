//! Security of migrations on the test bed: the agent refuses sources without the token (and
//! goes on waiting for the right one) and images above its limit; token files open to others are
//! refused; images and pins are root-only; every command that needs CAP_NET_ADMIN or CAP_BPF says
//! so when it lacks it, before touching anything; once listening, the agent keeps only the
//! capabilities it uses, and the application it starts gets none but those it is given.
//!
//! Run one at a time: `cargo test -p tcpmig-testbed --test security -- --test-threads=1`.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

use anyhow::{Context as _, Result, ensure};
use support::{
    AGENT_PORT, BYTES, COMMAND_TIMEOUT, MORE, Running, agent_command, migrate_to, nothing_left,
    process_state, queued_traffic, run_tcpmig, start_agent, start_plain_agent, start_plain_migrate,
};
use tcpmig::{
    freeze::{Freeze, PIN_ROOT, RemoveOnDrop},
    migrate::{MAX_HANDSHAKE_FRAME, Message, PROTOCOL_VERSION},
    net::Netns,
    sys::{CapabilitySet, ThreadCapabilities},
};
use tcpmig_testbed::TokenFile;
use tcpmig_testbed::{IFACE, SERVICE_V4, StreamArgs, TestBed};

const N: usize = 50;
const PORT: u16 = 8300;

/// One frame of the migrate-agent link: a 4-byte length, tag 0 and a JSON message.
fn message_frame(message: &Message) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(message)?;
    let mut frame = u32::try_from(body.len() + 1)?.to_be_bytes().to_vec();
    frame.push(0);
    frame.extend(body);
    Ok(frame)
}

/// Connects to the agent from the client host, writes `bytes`, and returns what it answered
/// before closing the connection.
fn talk_to_agent(bed: &TestBed, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let agent = SocketAddr::new(bed.destination().v4().into(), AGENT_PORT);
    bed.client().run(move || -> Result<Vec<u8>> {
        // The agent may not listen yet.
        let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
        let mut stream = loop {
            match TcpStream::connect_timeout(&agent, COMMAND_TIMEOUT) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        stream.write_all(&bytes)?;
        let mut answer = Vec::new();
        match stream.read_to_end(&mut answer) {
            Ok(_) => Ok(answer),
            // Refused with unread bytes in its buffer: the agent's close is a reset.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(answer),
            Err(e) => Err(e.into()),
        }
    })?
}

#[test]
fn agent_refuses_sources_without_the_token_and_waits_for_the_right_one() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "right", "the right token")?;
    let wrong = TokenFile::new(&bed, "wrong", "a wrong token")?;
    let destination = bed.destination();
    let stream = StreamArgs {
        sent_already: BYTES + MORE,
        received_already: BYTES,
        ..StreamArgs::new(BYTES)
    };
    let agent = start_agent(destination, &token.0, stream, &[])?;
    let agent_pid = agent.pid();
    // A Hello with the wrong token: answered Refused.
    let hello = message_frame(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        token: "guess".into(),
    })?;
    let answer = String::from_utf8_lossy(&talk_to_agent(&bed, hello)?).into_owned();
    ensure!(
        answer.contains("refused") && answer.contains("wrong token"),
        "{answer:?}"
    );
    // A frame announced far above the handshake's limit: dropped before anything is buffered.
    let mut huge = u32::try_from(64 * MAX_HANDSHAKE_FRAME)?
        .to_be_bytes()
        .to_vec();
    huge.extend([0u8; 64]);
    ensure!(
        talk_to_agent(&bed, huge)?.is_empty(),
        "no answer to a huge frame"
    );
    // Garbage and silence.
    ensure!(talk_to_agent(&bed, b"GET / HTTP/1.0\r\n\r\n".to_vec())?.is_empty());
    // `tcpmig migrate` with the wrong token: refused before anything is touched.
    let server_pid = traffic.server_pids()[0];
    let mut refused = start_plain_migrate(&bed, server_pid, PORT, &wrong.0)?;
    let (status, _, stderr) = refused.finish()?;
    ensure!(!status.success(), "{stderr}");
    ensure!(
        stderr.contains("wrong token") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    ensure!(
        process_state(server_pid) != Some('T'),
        "the server must run"
    );
    // The agent still waits, and takes the right source.
    let migrate_pid = migrate_to(&bed, &mut traffic, agent, server_pid, PORT, &token.0)?;
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "at the destination: {after:?}"
    );
    nothing_left(
        &bed,
        &[
            format!("migrate-{migrate_pid}"),
            format!("agent-{agent_pid}"),
        ],
        destination,
    )
}

#[test]
fn agent_refuses_images_above_its_limit() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "limit", "limit token")?;
    let (source, destination) = (bed.source(), bed.destination());
    // 50 connections with 700 bytes queued each way: about 75 KB.
    let mut agent =
        start_plain_agent(destination, &token.0, &["--max-image-bytes", "20000"], None)?;
    let server_pid = traffic.server_pids()[0];
    let mut migrate = start_plain_migrate(&bed, server_pid, PORT, &token.0)?;
    let migrate_pid = migrate.child.pid();
    let (status, _, stderr) = migrate.finish()?;
    ensure!(!status.success(), "the migration must fail: {stderr}");
    ensure!(stderr.contains("rolled back"), "{stderr}");
    let (status, _, agent_stderr) = agent.finish()?;
    ensure!(!status.success(), "{agent_stderr}");
    ensure!(
        agent_stderr.contains("larger than this agent accepts (20000 bytes)"),
        "{agent_stderr}"
    );
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(after.all_verified(N as u64), "at the source: {after:?}");
    nothing_left(&bed, &[format!("migrate-{migrate_pid}")], source)
}

#[test]
fn token_files_open_to_others_are_refused() -> Result<()> {
    let bed = TestBed::new()?;
    let traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "open", "an open token")?;
    std::fs::set_permissions(&token.0, std::fs::Permissions::from_mode(0o644))?;
    let path = token.0.to_str().context("utf-8 path")?;
    let (source, destination) = (bed.source(), bed.destination());
    let want = format!("token file {path} has mode 0644");
    let listen = SocketAddr::new(destination.v4().into(), support::AGENT_PORT).to_string();
    let (status, stderr) = run_tcpmig(
        destination,
        &[
            "agent",
            "--listen",
            &listen,
            "--dev",
            IFACE,
            "--insecure",
            "--token-file",
            path,
            "--",
            "/bin/true",
        ],
        |_| {},
    )?;
    ensure!(
        !status.success() && stderr.contains(&want),
        "agent: {stderr}"
    );
    let server_pid = traffic.server_pids()[0];
    let service = SocketAddr::new(SERVICE_V4.into(), PORT).to_string();
    let (status, stderr) = run_tcpmig(
        source,
        &[
            "migrate",
            "--pid",
            &server_pid.to_string(),
            "--service",
            &service,
            "--dev",
            IFACE,
            "--to",
            &listen,
            "--insecure",
            "--token-file",
            path,
        ],
        |_| {},
    )?;
    ensure!(
        !status.success() && stderr.contains(&want),
        "migrate: {stderr}"
    );
    ensure!(
        process_state(server_pid) != Some('T'),
        "the server must run"
    );
    Ok(())
}

#[test]
fn images_and_pins_are_root_only() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    // An image file that exists, open to all: the dump narrows it.
    let image = std::env::temp_dir().join(format!("{}.image", bed.prefix()));
    std::fs::write(&image, b"old")?;
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644))?;
    let server_pid = traffic.server_pids()[0].to_string();
    let service = SocketAddr::new(SERVICE_V4.into(), PORT).to_string();
    let out = image.to_str().context("utf-8 path")?;
    let args = dump_args(&server_pid, &service, out);
    let (status, stderr) = run_tcpmig(bed.source(), &args, |_| {})?;
    let mode = std::fs::metadata(&image)?.permissions().mode() & 0o777;
    std::fs::remove_file(&image)?;
    ensure!(status.success(), "{stderr}");
    ensure!(mode == 0o600, "image mode {mode:o}");
    // Rolled back: the connections carry on.
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(after.all_verified(N as u64), "after the dump: {after:?}");

    // Pins: the root directory narrowed even if someone opened it, the freeze's own directory,
    // its pins and its metadata closed to group and others.
    std::fs::set_permissions(PIN_ROOT, std::fs::Permissions::from_mode(0o755))?;
    let netns = Netns::open(bed.source().name())?;
    let name = format!("{}-pins", bed.prefix());
    let freeze = RemoveOnDrop::new(Freeze::attach(&netns, IFACE, &name)?);
    let dir = Path::new(PIN_ROOT).join(&name);
    let metadata = Path::new("/run/tcpmig/freeze").join(format!("{name}.json"));
    let mut checked = vec![
        Path::new(PIN_ROOT).to_owned(),
        dir.clone(),
        "/run/tcpmig/freeze".into(),
        metadata,
    ];
    checked.extend(
        std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?,
    );
    ensure!(checked.len() > 5, "pins: {checked:?}");
    for path in &checked {
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        ensure!(mode & 0o077 == 0, "{} has mode {mode:o}", path.display());
    }
    drop(freeze);
    Ok(())
}

/// Runs `args` without the capabilities in `drop` (a root process whose bounding set lacks
/// them gets none of them at exec) and expects an error naming `capability`.
fn without(host: &tcpmig_testbed::Host, drop: &str, args: &[&str], capability: &str) -> Result<()> {
    let bin = tcpmig_testbed::tcpmig_bin();
    let mut setpriv = vec!["--bounding-set", drop, "--inh-caps", "-all", "--"];
    let bin = bin.to_str().context("utf-8 path")?;
    setpriv.push(bin);
    setpriv.extend(args);
    let mut cmd = host.command("setpriv")?;
    cmd.args(&setpriv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = host.spawn(&mut cmd)?;
    let mut lines = support::Lines::new(child.child_mut().stderr.take().context("piped")?)?;
    let stderr = lines.until_closed(COMMAND_TIMEOUT)?.to_owned();
    let status = child.child_mut().wait()?;
    ensure!(
        !status.success() && stderr.contains(&format!("needs {capability}")),
        "tcpmig {} without {drop}: {stderr}",
        args[0]
    );
    Ok(())
}

#[test]
fn commands_without_their_capabilities_say_which() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "caps", "caps token")?;
    let token = token.0.to_str().context("utf-8 path")?.to_owned();
    let (source, destination) = (bed.source(), bed.destination());
    let server_pid = traffic.server_pids()[0].to_string();
    let service = SocketAddr::new(SERVICE_V4.into(), PORT).to_string();
    let listen = SocketAddr::new(destination.v4().into(), AGENT_PORT).to_string();
    let image = std::env::temp_dir().join(format!("{}.image", bed.prefix()));
    let image = image.to_str().context("utf-8 path")?;
    let dump = dump_args(&server_pid, &service, image);
    let restore = [
        "restore",
        "--in",
        image,
        "--netns",
        destination.name(),
        "--handoff",
        image,
    ];
    let migrate = [
        &support::migrate_args(&server_pid, &service, &listen)[..],
        &["--insecure", "--token-file", &token],
    ]
    .concat();
    let agent = [
        "agent",
        "--listen",
        &listen,
        "--dev",
        IFACE,
        "--insecure",
        "--token-file",
        &token,
        "--",
        "/bin/true",
    ];
    for (host, args) in [
        (source, &dump[..]),
        (destination, &restore[..]),
        (source, &migrate[..]),
        (destination, &agent[..]),
    ] {
        without(host, "-net_admin", args, "CAP_NET_ADMIN")?;
        // CAP_SYS_ADMIN would stand in for CAP_BPF, as in the kernel.
        if args[0] != "restore" {
            without(host, "-bpf,-sys_admin", args, "CAP_BPF")?;
        }
    }
    // The agent drops what it no longer uses once listening, which takes CAP_SETPCAP.
    without(destination, "-setpcap", &agent, "CAP_SETPCAP")?;
    // The hold's packet socket, the replay's raw socket and the announcements.
    without(source, "-net_raw", &migrate, "CAP_NET_RAW")?;
    without(destination, "-net_raw", &agent, "CAP_NET_RAW")?;
    ensure!(!Path::new(image).exists(), "nothing written");
    ensure!(
        process_state(traffic.server_pids()[0]) != Some('T'),
        "never stopped"
    );
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(after.all_verified(N as u64), "untouched: {after:?}");
    Ok(())
}

/// `tcpmig dump` of process `pid`'s connections on `service` into `out`, freezing them itself.
fn dump_args<'a>(pid: &'a str, service: &'a str, out: &'a str) -> [&'a str; 9] {
    [
        "dump",
        "--pid",
        pid,
        "--service",
        service,
        "--out",
        out,
        "--freeze-dev",
        IFACE,
    ]
}

/// What the agent keeps once listening, named here rather than taken from the library.
const AGENT_KEEPS: &str =
    "CAP_SYS_ADMIN,CAP_NET_ADMIN,CAP_NET_RAW,CAP_NET_BIND_SERVICE,CAP_SETPCAP";

fn caps(names: &str) -> Result<CapabilitySet> {
    Ok(names.parse()?)
}

/// The capability sets of every thread of process `pid`.
fn thread_capabilities(pid: u32) -> Result<Vec<ThreadCapabilities>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        threads.push(ThreadCapabilities::parse(&status).context("Cap lines")?);
    }
    ensure!(!threads.is_empty(), "no thread in process {pid}");
    Ok(threads)
}

/// Starts `tcpmig agent -v` with `extra` on the destination (then `-- /bin/true`, unless
/// `extra` hands over with `--handoff`), waits until it listens, and checks every thread's sets: `effective` in the effective set, `effective` and `passed_on` in
/// the permitted and bounding sets, nothing inheritable or ambient.
fn agent_listens_with(
    bed: &TestBed,
    token: &Path,
    extra: &[&str],
    effective: CapabilitySet,
    passed_on: CapabilitySet,
) -> Result<()> {
    let mut args = vec!["-v"];
    args.extend(extra);
    let mut cmd = agent_command(bed.destination(), token, &args, None)?;
    if !extra.contains(&"--handoff") {
        cmd = with_command(cmd, &["/bin/true"]);
    }
    let mut agent = Running::spawn(bed.destination(), cmd)?;
    agent
        .stderr
        .wait_for("waiting for a source", COMMAND_TIMEOUT)?;
    let held = effective.union(passed_on);
    for sets in thread_capabilities(agent.child.pid())? {
        let none = CapabilitySet::EMPTY;
        ensure!(
            (sets.effective, sets.permitted, sets.bounding) == (effective, held, held)
                && (sets.inheritable, sets.ambient) == (none, none),
            "agent with {extra:?}: {sets:?}, expected effective {effective}, permitted and \
             bounding {held}"
        );
    }
    agent.kill()?;
    Ok(())
}

fn with_command(mut cmd: std::process::Command, command: &[&str]) -> std::process::Command {
    cmd.arg("--").args(command);
    cmd
}

#[test]
fn the_agent_keeps_only_what_it_uses_once_listening() -> Result<()> {
    let bed = TestBed::new()?;
    let token = TokenFile::new(&bed, "kept", "kept token")?;
    let kept = caps(AGENT_KEEPS)?;
    agent_listens_with(&bed, &token.0, &[], kept, CapabilitySet::EMPTY)?;
    // The application's capabilities stay permitted, not effective, until it starts.
    let nice = caps("sys_nice,CAP_DAC_OVERRIDE")?;
    agent_listens_with(
        &bed,
        &token.0,
        &["--app-caps", "sys_nice,CAP_DAC_OVERRIDE"],
        kept,
        nice,
    )?;
    // Handing over to a running application's Unix socket, which another user may own (the
    // agent connects to it only after a migration: none happens here).
    let socket = "/run/tcpmig-test-never-made.sock";
    let with_dac = kept.union(caps("CAP_DAC_OVERRIDE")?);
    agent_listens_with(
        &bed,
        &token.0,
        &["--handoff", socket],
        with_dac,
        CapabilitySet::EMPTY,
    )?;
    Ok(())
}

/// An agent whose namespace is given as another process's /proc/PID/ns/net keeps
/// CAP_SYS_PTRACE, which opening that file needs once it has fewer capabilities than that
/// process; and moves the connections there.
#[test]
fn an_agent_in_another_process_namespace_keeps_cap_sys_ptrace() -> Result<()> {
    let bed = TestBed::new()?;
    let traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "ptrace", "ptrace token")?;
    let destination = bed.destination();
    let mut holder = destination.command("sleep")?;
    holder.arg("600");
    let holder = destination.spawn(&mut holder)?;
    let netns = format!("/proc/{}/ns/net", holder.pid());
    let listen = SocketAddr::new(destination.v4().into(), AGENT_PORT).to_string();
    let mut cmd = destination.command(tcpmig_testbed::tcpmig_bin())?;
    cmd.args(["-v", "agent", "--listen", &listen, "--netns", &netns])
        .args(["--dev", IFACE])
        .args(support::insecure(&token.0))
        .args(["--", "/bin/true"]);
    let mut agent = Running::spawn(destination, cmd)?;
    agent
        .stderr
        .wait_for("waiting for a source", COMMAND_TIMEOUT)?;
    let kept = caps(&format!("{AGENT_KEEPS},CAP_SYS_PTRACE"))?;
    for sets in thread_capabilities(agent.child.pid())? {
        ensure!(
            (sets.effective, sets.bounding) == (kept, kept),
            "{sets:?}, expected {kept}"
        );
    }
    let mut migrate = start_plain_migrate(&bed, traffic.server_pids()[0], PORT, &token.0)?;
    let (status, _, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let (status, _, stderr) = agent.finish()?;
    ensure!(status.success(), "the agent: {stderr}");
    Ok(())
}

#[test]
fn the_application_gets_no_capability() -> Result<()> {
    let bed = TestBed::new()?;
    let mut traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "app", "app token")?;
    let stream = StreamArgs {
        sent_already: BYTES + MORE,
        received_already: BYTES,
        ..StreamArgs::new(BYTES)
    };
    // One group: the agent becomes the application (same pid).
    let agent = start_agent(bed.destination(), &token.0, stream, &[])?;
    let pid = agent.pid();
    let server_pid = traffic.server_pids()[0];
    migrate_to(&bed, &mut traffic, agent, server_pid, PORT, &token.0)?;
    let none = CapabilitySet::EMPTY;
    for sets in thread_capabilities(pid)? {
        ensure!(
            [
                sets.effective,
                sets.permitted,
                sets.bounding,
                sets.inheritable,
                sets.ambient
            ] == [none; 5],
            "the application: {sets:?}"
        );
    }
    let after = traffic.verify_until(BYTES + MORE)?;
    ensure!(
        after.all_verified(N as u64),
        "at the destination: {after:?}"
    );
    Ok(())
}

#[test]
fn the_application_gets_exactly_the_capabilities_given() -> Result<()> {
    let bed = TestBed::new()?;
    let traffic = queued_traffic(&bed, N, PORT)?;
    let token = TokenFile::new(&bed, "given", "given token")?;
    // Two groups (the application started twice, as children), each printing its sets.
    let extra = [
        "--app-caps",
        "CAP_NET_BIND_SERVICE",
        "--max-per-process",
        "30",
    ];
    let cmd = agent_command(bed.destination(), &token.0, &extra, None)?;
    let print = ["/bin/sh", "-c", "grep ^Cap /proc/self/status"];
    let mut agent = Running::spawn(bed.destination(), with_command(cmd, &print))?;
    let mut migrate = start_plain_migrate(&bed, traffic.server_pids()[0], PORT, &token.0)?;
    let (status, _, stderr) = migrate.finish()?;
    ensure!(status.success(), "the migration failed: {stderr}");
    let (status, stdout, stderr) = agent.finish()?;
    ensure!(status.success(), "the agent: {stderr}");
    // The children's lines may interleave: each set's line, twice, with the same value.
    let given = format!("{:016x}", caps("net_bind_service")?.bits());
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        let values: Vec<&str> = stdout
            .lines()
            .filter_map(|line| line.strip_prefix(set))
            .map(str::trim)
            .collect();
        ensure!(
            values == [given.as_str(); 2],
            "{set} of two children: {stdout}"
        );
    }
    Ok(())
}
