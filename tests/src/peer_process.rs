//! The body of `tcpmig-peer` (one side of the bed's verifiable TCP traffic), a library function so
//! that other binaries (`tcpmig demo`) can act as a peer too. The command line, the streams and
//! the stdin/stdout protocol are documented in [`crate::peer`].

mod mirror;
mod sockets;
mod streams;

use std::env;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::peer::{PeerArgs, PeerCommand, ScriptReport};
use crate::sys;
use mirror::mirror;
use sockets::{accept, adopt, connect, listen};
use streams::{Side, Streams};

/// How long a peer waits for its next command before deciding its test is gone.
const IDLE_LIMIT: Duration = Duration::from_secs(600);

/// Runs a peer with these arguments until `exit` or the end of stdin (or its script's end).
pub fn run(args: PeerArgs) -> Result<()> {
    sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let stream = *args.stream();
    let deadline = Instant::now() + stream.timeout();
    let mut script = &[][..];
    // A listening server keeps its listener, as a real one would, but accepts no more.
    let (side, sockets, _listener) = match &args {
        PeerArgs::Server(server) => match server.listen {
            Some(addr) => {
                let listener = listen(addr, server.reuseport)?;
                say("listening")?;
                let sockets = accept(&listener, addr, server.expect, deadline)?;
                if server.mirror {
                    say("ready")?;
                    return mirror(Streams::new(Side::Server, sockets, stream)?);
                }
                (Side::Server, sockets, Some(listener))
            }
            None => {
                script = &server.script;
                (Side::Server, adopt()?, None)
            }
        },
        PeerArgs::Client(client) => (
            Side::Client,
            connect(client.connect, client.count, deadline)?,
            None,
        ),
    };
    let mut streams = Streams::new(side, sockets, stream)?;
    streams.send(stream.bytes.saturating_sub(stream.sent_already), deadline);
    if !script.is_empty() {
        return run_script(&mut streams, script);
    }
    say("ready")?;
    serve_commands(&mut streams)
}

/// Writes `line` in one write(), so that processes sharing the pipe never interleave lines.
fn say(line: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(format!("{line}\n").as_bytes())?;
    stdout.flush().context("writing to stdout")
}

/// Answers commands until `exit` or the end of stdin.
fn serve_commands(streams: &mut Streams) -> Result<()> {
    // Our own buffer on a clone of fd 0, not std's Stdin, whose buffer a poll of the fd cannot see.
    let mut stdin = BufReader::new(File::from(io::stdin().as_fd().try_clone_to_owned()?));
    loop {
        let waiting = !stdin.buffer().is_empty()
            || sys::poll_until(
                stdin.get_ref().as_fd(),
                libc::POLLIN,
                Instant::now() + IDLE_LIMIT,
            )?;
        ensure!(waiting, "no command for {IDLE_LIMIT:?}");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 || !streams.execute(line.trim_end().parse()?) {
            return Ok(());
        }
        say(&serde_json::to_string(&streams.report())?)?;
    }
}

/// `--script`: runs the commands, then prints the [`ScriptReport`], tagged with this process's
/// place among `tcpmig agent`'s children.
fn run_script(streams: &mut Streams, script: &[PeerCommand]) -> Result<()> {
    let shard_var = |name| {
        env::var(name)
            .ok()
            .map(|value| value.parse().with_context(|| format!("{name}={value:?}")))
            .transpose()
    };
    let (shard, shards) = (shard_var("TCPMIG_SHARD")?, shard_var("TCPMIG_SHARDS")?);
    for &command in script {
        if !streams.execute(command) {
            break;
        }
    }
    let report = ScriptReport {
        pid: std::process::id(),
        shard,
        shards,
        report: streams.report(),
    };
    say(&serde_json::to_string(&report)?)
}
