//! Named network namespaces, managed with iproute2 (`ip netns`, `ip -n NS ...`) as an operator
//! would, so a failing step can be replayed by hand from the error message.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// `ip` itself only needs milliseconds; this bounds a hung one.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// The path of a named network namespace: `/run/netns/NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Opens a named namespace (close-on-exec) for `setns`.
pub(crate) fn open(name: &str) -> Result<OwnedFd> {
    let path = netns_path(name);
    let file = File::open(&path).with_context(|| format!("opening netns {}", path.display()))?;
    Ok(file.into())
}

/// Names of all named namespaces.
pub(crate) fn list() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.with_context(|| format!("listing {NETNS_DIR}"))?,
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        names.extend(entry.file_name().to_str().map(str::to_owned));
    }
    names.sort();
    Ok(names)
}

/// Runs `ip [-n NETNS] ARGS` and returns its stdout.
pub(crate) fn ip(netns: Option<&str>, args: &[&str]) -> Result<String> {
    run_ip(netns, args, "")
}

/// Runs several `ip` commands, one per line, in one `ip [-n NETNS] -batch -`.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    run_ip(netns, &["-batch", "-"], &lines.join("\n")).map(drop)
}

/// Deletes named namespaces, carrying on past failures; the interfaces inside go with them.
pub(crate) fn delete(names: &[String]) -> Result<()> {
    let lines: Vec<String> = names
        .iter()
        .map(|name| format!("netns del {name}"))
        .collect();
    run_ip(None, &["-force", "-batch", "-"], &lines.join("\n")).map(drop)
}

fn run_ip(netns: Option<&str>, args: &[&str], input: &str) -> Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(netns) = netns {
        cmd.args(["-n", netns]);
    }
    cmd.args(args);
    let shown = format!(
        "ip {}",
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let context = if input.is_empty() {
        shown
    } else {
        format!("{shown} <<< {input:?}")
    };
    run_bounded(&mut cmd, input, IP_TIMEOUT).with_context(|| context)
}

/// Runs a short command with `input` on stdin, killing it after `timeout`. Its output must fit in
/// the pipe buffers (64 KiB each), which holds for the `ip` commands used here.
fn run_bounded(cmd: &mut Command, input: &str, timeout: Duration) -> Result<String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning")?;
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // Our own child, not yet reaped: its pid cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            bail!("no exit within {timeout:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .context("no stdout pipe")?
        .read_to_string(&mut stdout)?;
    child
        .stderr
        .take()
        .context("no stderr pipe")?
        .read_to_string(&mut stderr)?;
    if !status.success() {
        bail!("{status}: {}", stderr.trim());
    }
    written.context("writing stdin")?;
    Ok(stdout)
}
