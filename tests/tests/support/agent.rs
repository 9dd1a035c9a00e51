//! Starting `tcpmig agent` on a host of the bed, in the ways the tests need it.
use super::*;

/// `tcpmig agent` on `host`, listening on its own address, pausing at `pause_at` if given; the
/// command after `--` is the caller's to add.
pub fn agent_command(
    host: &Host,
    token: &Path,
    extra: &[&str],
    pause_at: Option<&str>,
) -> Result<Command> {
    agent_command_with(host, &insecure(token), extra, pause_at)
}

/// `--insecure --token-file TOKEN`: the link of most tests, which test what it carries.
pub fn insecure(token: &Path) -> Vec<String> {
    vec![
        "--insecure".into(),
        "--token-file".into(),
        token.display().to_string(),
    ]
}

/// [`agent_command`] whose link is secured by `link` (TLS files or [`insecure`]).
pub fn agent_command_with(
    host: &Host,
    link: &[String],
    extra: &[&str],
    pause_at: Option<&str>,
) -> Result<Command> {
    agent_command_on(host, IFACE, link, extra, pause_at)
}

/// [`agent_command_with`] taking the address over `dev` instead of the bed's interface.
pub fn agent_command_on(
    host: &Host,
    dev: &str,
    link: &[String],
    extra: &[&str],
    pause_at: Option<&str>,
) -> Result<Command> {
    let mut cmd = host.command(tcpmig_bin())?;
    cmd.arg("agent")
        .arg("--listen")
        .arg(SocketAddr::new(host.v4().into(), AGENT_PORT).to_string())
        .args(["--netns", host.name(), "--dev", dev])
        .args(["--timeout", STEP_TIMEOUT_SECS])
        .args(link)
        .args(extra);
    if let Some(phase) = pause_at {
        cmd.env("TCPMIG_TEST_PAUSE_AT", phase);
    }
    Ok(cmd)
}

/// The agent on `host`; once the connections are live it becomes an adopting `tcpmig-peer`
/// server that goes on from `stream`'s offsets.
pub fn start_agent<'bed>(
    host: &'bed Host,
    token: &Path,
    stream: StreamArgs,
    extra: &[&str],
) -> Result<Peer<'bed>> {
    let mut cmd = agent_command(host, token, extra, None)?;
    cmd.arg("--")
        .arg(PEER)
        .args(PeerArgs::adopting_server(stream).to_args());
    Peer::spawn(host, cmd, "tcpmig agent", COMMAND_TIMEOUT)
}

/// An agent that never gets to hand anything over (its command is /bin/true), with its stdin
/// (to continue a test pause) and stderr at hand.
pub fn start_plain_agent<'bed>(
    host: &'bed Host,
    token: &Path,
    extra: &[&str],
    pause_at: Option<&str>,
) -> Result<Running<'bed>> {
    let mut cmd = agent_command(host, token, extra, pause_at)?;
    cmd.args(["--", "/bin/true"]);
    Running::spawn(host, cmd)
}

/// An agent that sends the connections to the Unix socket `path` (`--handoff`).
pub fn start_handoff_agent<'bed>(
    host: &'bed Host,
    token: &Path,
    extra: &[&str],
    path: &Path,
) -> Result<Running<'bed>> {
    let mut cmd = agent_command(host, token, extra, None)?;
    cmd.arg("--handoff").arg(path);
    Running::spawn(host, cmd)
}

/// The agent on `host`, handing the connections to adopting `tcpmig-peer` servers that go on
/// from `stream`'s offsets, run `script` and print a [`ScriptReport`] each: the way to check
/// the processes it starts when it splits the connections (they share its stdout). The reports
/// are on the stdout [`Running::finish`] returns; [`script_reports`] reads them.
pub fn start_scripted_agent<'bed>(
    host: &'bed Host,
    token: &Path,
    stream: StreamArgs,
    script: Vec<PeerCommand>,
    extra: &[&str],
) -> Result<Running<'bed>> {
    let mut cmd = agent_command(host, token, extra, None)?;
    cmd.arg("--")
        .arg(PEER)
        .args(PeerArgs::scripted_adopting_server(stream, script).to_args());
    Running::spawn(host, cmd)
}

/// The [`ScriptReport`] lines of a scripted agent's stdout, one per process it handed over to.
pub fn script_reports(stdout: &str) -> Result<Vec<ScriptReport>> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).with_context(|| format!("an adopter's report: {line:?}"))
        })
        .collect()
}

/// An agent on the destination that pauses at `pause` (a test hook), and `tcpmig migrate` of
/// `pid` to it (`--timeout timeout`); returns (agent, migrate) once the agent is paused there.
pub fn migrate_to_paused_agent<'bed>(
    bed: &'bed TestBed,
    pid: u32,
    port: u16,
    token: &Path,
    pause: &str,
    timeout: &str,
) -> Result<(Running<'bed>, Running<'bed>)> {
    let (source, destination) = (bed.source(), bed.destination());
    let mut agent = start_plain_agent(destination, token, &[], Some(pause))?;
    let migrate = start_migrate(source, destination, &[pid], port, token, timeout, &[], None)?;
    agent
        .stderr
        .wait_for(&format!("test pause at {pause}"), COMMAND_TIMEOUT)?;
    Ok((agent, migrate))
}
