//! `criu dump` + `criu restore` of a server holding N idle connections, source to destination
//! namespace with the service address moved, under each network lock: CRIU's iptables lock, its
//! nftables lock, tcpmig's hook, and no lock at all (`skip`, unsafe with traffic: the baseline).
//!
//! Time spent locking: for the tcpmig hook, the hooks' own wall time (TCPMIG_REPORT); for CRIU's
//! locks, the wall time minus that of the unlocked run of the same N, in the same run. A CRIU
//! failure (the nftables lock above ~500 connections) is recorded with its message. CRIU's
//! iptables restore at 5,000 connections takes minutes: it is stopped at [`RESTORE_CAP`] and
//! recorded as "over the cap", not extrapolated.
use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use tcpmig_testbed::{
    ChildGuard, Host, IFACE, PREFIX_V4, Peer, PeerArgs, PeerCommand, SERVICE_V4, StreamArgs,
    TestBed, command_all,
};

const PORT: u16 = 8080;
const DUMP_CAP: Duration = Duration::from_secs(180);
/// CRIU's iptables unlock is quadratic (notes/criu.md): 5,000 connections would take minutes.
const RESTORE_CAP: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lock {
    Skip,
    Iptables,
    Nftables,
    Tcpmig,
}

impl Lock {
    const ALL: [Lock; 4] = [Lock::Skip, Lock::Iptables, Lock::Nftables, Lock::Tcpmig];
}

/// One CRIU invocation: its wall time, or why it did not finish.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Done { seconds: f64 },
    OverCap { cap_seconds: f64 },
    Failed { error: String },
    NotRun,
}

impl Outcome {
    pub(crate) fn seconds(&self) -> Option<f64> {
        match self {
            Outcome::Done { seconds } => Some(*seconds),
            _ => None,
        }
    }

    pub(crate) fn cell(&self) -> String {
        match self {
            Outcome::Done { seconds } => format!("{seconds:.3}"),
            Outcome::OverCap { cap_seconds } => format!("> {cap_seconds:.0} (stopped)"),
            Outcome::Failed { .. } => "crash".to_owned(),
            Outcome::NotRun => "-".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CriuRun {
    pub connections: usize,
    pub lock: Lock,
    pub dump: Outcome,
    pub restore: Outcome,
    /// tcpmig: time in the hooks of the dump (pre-dump, post-dump) and of the restore.
    pub hook_dump_s: Option<f64>,
    pub hook_restore_s: Option<f64>,
}

/// One line of the hook's report (TCPMIG_REPORT).
#[derive(Deserialize)]
pub(crate) struct HookLine {
    pub(crate) action: String,
    pub(crate) took_us: f64,
}

pub fn run(ns: &[usize]) -> anyhow::Result<Vec<CriuRun>> {
    let bin = binaries()?;
    let mut runs = Vec::new();
    for &n in ns {
        for lock in Lock::ALL {
            eprintln!("criu bench: {n} connections, {lock:?} lock");
            runs.push(one(&bin, n, lock)?);
        }
    }
    Ok(runs)
}

/// tcpmig and tcpmig-peer, built beside this benchmark.
pub(crate) struct Binaries {
    pub(crate) tcpmig: PathBuf,
    pub(crate) peer: PathBuf,
}

pub(crate) fn binaries() -> anyhow::Result<Binaries> {
    Ok(Binaries {
        tcpmig: sibling("tcpmig")?,
        peer: sibling("tcpmig-peer")?,
    })
}

/// A binary of the workspace built beside this benchmark (target/release/NAME).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("benchmark directory")?.join(name);
    ensure!(
        path.exists(),
        "{} missing: cargo build --release -p tcpmig-cli -p tcpmig-testbed",
        path.display()
    );
    Ok(path)
}

/// A scratch directory for images, logs and the hook link; removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One migration of a mirror server with `n` idle connections, on a fresh bed.
fn one(bin: &Binaries, n: usize, lock: Lock) -> anyhow::Result<CriuRun> {
    let bed = TestBed::new()?;
    let scratch = Scratch(std::env::temp_dir().join(format!("tcpmig-bench-criu-{}", bed.prefix())));
    let images = scratch.0.join("images");
    fs::create_dir_all(&images)?;
    let (mut server, _client) = start_mirror(&bed, bin, n, &scratch)?;
    let pid = server.pid();
    let hook = if lock == Lock::Tcpmig {
        Some(install_hook(bin, &scratch)?)
    } else {
        None
    };
    let reports = scratch.0.join("hooks.jsonl");
    let criu = |host: &Host, args: &[&str], cap: Duration| -> Outcome {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", host.path().display()))
            .arg("criu")
            .args(args)
            .arg("-D")
            .arg(&images)
            .args(["--tcp-established", "-o", "criu.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let network_lock = match lock {
            Lock::Iptables => "iptables",
            Lock::Nftables => "nftables",
            Lock::Skip | Lock::Tcpmig => "skip",
        };
        cmd.args(["--network-lock", network_lock]);
        if let Some(hook) = &hook {
            cmd.arg("--action-script")
                .arg(hook)
                .env("TCPMIG_DEV", IFACE)
                .env("TCPMIG_ADDRESS", format!("{SERVICE_V4}/{PREFIX_V4}"))
                .env("TCPMIG_REPORT", &reports);
        }
        match run_capped(&mut cmd, cap) {
            Ok(Some(took)) => Outcome::Done {
                seconds: took.as_secs_f64(),
            },
            Ok(None) => Outcome::OverCap {
                cap_seconds: cap.as_secs_f64(),
            },
            Err(error) => Outcome::Failed {
                error: format!("{error:#}: {}", log_error(&images.join("criu.log"))),
            },
        }
    };
    let dump = criu(bed.source(), &["dump", "-t", &pid.to_string()], DUMP_CAP);
    let mut restore = Outcome::NotRun;
    if dump.seconds().is_some() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "the dumped server still runs");
            std::thread::sleep(Duration::from_millis(5));
        }
        if hook.is_none() {
            move_address(&bed)?;
        }
        restore = criu(
            bed.destination(),
            &["restore", "--restore-detached"],
            RESTORE_CAP,
        );
        // SAFETY: the pid CRIU restored for this run (whatever the outcome, it is ours to end).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let (hook_dump_s, hook_restore_s) = hook_times(&reports, hook.is_some())?;
    Ok(CriuRun {
        connections: n,
        lock,
        dump,
        restore,
        hook_dump_s,
        hook_restore_s,
    })
}

/// Starts a `--mirror` server (in a session of its own, for CRIU) on the source and a client of
/// `n` connections, and checks every byte of both before the dump. The guard and the client
/// keep them alive.
fn start_mirror<'bed>(
    bed: &'bed TestBed,
    bin: &Binaries,
    n: usize,
    scratch: &Scratch,
) -> anyhow::Result<(ChildGuard<'bed>, Peer<'bed>)> {
    let service = SocketAddr::new(SERVICE_V4.into(), PORT);
    let stream = StreamArgs::new(64);
    let mut server_cmd = bed.source().command(&bin.peer)?;
    server_cmd
        .args(PeerArgs::mirror_server(service, n, stream).to_args())
        .stdin(Stdio::null())
        .stdout(fs::File::create(scratch.0.join("server.out"))?)
        .stderr(Stdio::null());
    // SAFETY: setsid only: CRIU wants the task in its own session, without a terminal.
    unsafe {
        server_cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
    };
    let server = bed.source().spawn(&mut server_cmd)?;
    wait_for(&scratch.0.join("server.out"), "listening")?;
    let mut client = Peer::start(
        bed.client(),
        &bin.peer,
        &PeerArgs::client(service, n, stream),
    )?;
    client.expect_line("ready")?;
    wait_for(&scratch.0.join("server.out"), "ready")?;
    let report = command_all(
        std::slice::from_mut(&mut client),
        PeerCommand::Verify { until: None },
    )?;
    ensure!(
        report.all_verified(),
        "connections before the dump: {report:?}"
    );
    Ok((server, client))
}

/// Installs `tcpmig criu-hook` in the scratch directory and returns the hook's path.
fn install_hook(bin: &Binaries, scratch: &Scratch) -> anyhow::Result<PathBuf> {
    let out = Command::new(&bin.tcpmig)
        .args(["criu-hook", "--install", "--dir"])
        .arg(&scratch.0)
        .output()?;
    ensure!(out.status.success(), "installing the hook");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// What CRIU's own lock runs would otherwise need done by hand.
fn move_address(bed: &TestBed) -> anyhow::Result<()> {
    let addr = format!("{SERVICE_V4}/{PREFIX_V4}");
    bed.source().ip(&["addr", "del", &addr, "dev", IFACE])?;
    bed.destination()
        .ip(&["addr", "add", &addr, "dev", IFACE])?;
    Ok(())
}

/// Seconds spent in the hooks of the dump and of the restore.
fn hook_times(path: &Path, used: bool) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    if !used {
        return Ok((None, None));
    }
    let text = fs::read_to_string(path).unwrap_or_default();
    let (mut dump, mut restore) = (0.0, 0.0);
    for line in text.lines() {
        let hook: HookLine = serde_json::from_str(line).context("hook report")?;
        match hook.action.as_str() {
            "pre-dump" | "network-lock" | "post-dump" => dump += hook.took_us / 1e6,
            _ => restore += hook.took_us / 1e6,
        }
    }
    Ok((Some(dump), Some(restore)))
}

/// The line of a CRIU log that says why it failed: glibc's FD_SETSIZE abort if there, else the
/// last error (the first is often the harmless RLIMIT_NOFILE one of every run here).
fn log_error(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .find(|line| line.contains("out of range"))
        .or_else(|| lines.iter().rev().find(|line| line.contains("Error")))
        .map_or("no error in the log", |line| line)
        .to_owned()
}

fn wait_for(path: &Path, line: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| l == line)
    {
        ensure!(Instant::now() < deadline, "the server did not say {line:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The wall time of `cmd`, `None` if it ran past `cap` (then it is killed by pid).
fn run_capped(cmd: &mut Command, cap: Duration) -> anyhow::Result<Option<Duration>> {
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting criu")?;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("criu exited with {status}");
            }
            return Ok(Some(started.elapsed()));
        }
        if started.elapsed() > cap {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn markdown(runs: &[CriuRun]) -> String {
    let mut md = String::from(
        "## CRIU dump + restore against N (seconds; lock = wall time minus the unlocked run, \
         tcpmig = time in its hooks)\n\n\
         | N | lock | dump | restore | dump + restore | time locking | vs tcpmig |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for run in runs {
        let skip = runs
            .iter()
            .find(|r| r.connections == run.connections && r.lock == Lock::Skip);
        let total = |r: &CriuRun| Some(r.dump.seconds()? + r.restore.seconds()?);
        let locking = |r: &CriuRun| match r.lock {
            Lock::Skip => Some(0.0),
            Lock::Tcpmig => Some(r.hook_dump_s? + r.hook_restore_s?),
            Lock::Iptables | Lock::Nftables => Some((total(r)? - total(skip?)?).max(0.0)),
        };
        let tcpmig = runs
            .iter()
            .find(|r| r.connections == run.connections && r.lock == Lock::Tcpmig)
            .and_then(locking);
        let ratio = match (locking(run), tcpmig, run.lock) {
            (Some(lock), Some(ours), Lock::Iptables | Lock::Nftables) if ours > 0.0 => {
                format!("{:.1}x", lock / ours)
            }
            _ => "-".to_owned(),
        };
        let cell = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let _ = writeln!(
            md,
            "| {} | {:?} | {} | {} | {} | {} | {ratio} |",
            run.connections,
            run.lock,
            run.dump.cell(),
            run.restore.cell(),
            cell(total(run)),
            cell(locking(run)),
        );
    }
    for run in runs {
        for outcome in [&run.dump, &run.restore] {
            if let Outcome::Failed { error } = outcome {
                let _ = writeln!(md, "\n{:?} at N = {}: {error}", run.lock, run.connections);
            }
        }
    }
    md
}
