//! The CRIU tests' bed: a migration's directory, hook and CRIU runs, and the processes CRIU
//! dumps and restores.
#![allow(dead_code)] // The CRIU and the container tests each use their own part.
mod mirror;

#[allow(unused_imports)] // The container tests do not run the mirror scenario.
pub use mirror::*;

use std::{
    fs,
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use tcpmig::{freeze, net::Netns};
use tcpmig_testbed::{ChildGuard, Host, IFACE, SERVICE_V4, TestBed, prefix_len, tcpmig_bin};

pub const CRIU_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a freeze may last; the guard removes what is left by then.
pub const DEADLINE_S: &str = "30";
/// The key CRIU pairs the task's netns with between `--external` and `--inherit-fd`.
pub const NETNS_KEY: &str = "tcpmig-net";
/// The fd the destination netns is passed to `criu restore` on.
pub const NETNS_FD: i32 = 10;

/// Where the task's network namespace is relative to CRIU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// CRIU runs in the source (then destination) netns, like the task.
    SameNetns,
    /// CRIU runs outside; the task's netns is external to the dump.
    ExternalNetns,
}

/// A directory removed with its contents when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("tcpmig-criu-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("images"))?;
        Ok(Self(path))
    }

    pub fn images(&self) -> PathBuf {
        self.0.join("images")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("TCPMIG_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Kills a process tree that is not our child (the restored server) by pids, and waits for it.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pids = tree_pids(self.0);
        for &pid in &pids {
            // SAFETY: signalling the pids CRIU restored for this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = wait_gone(&pids);
    }
}

/// `root` and its children (the servers here are at most two levels deep).
pub fn tree_pids(root: u32) -> Vec<u32> {
    let children = fs::read_to_string(format!("/proc/{root}/task/{root}/children"));
    std::iter::once(root)
        .chain(
            children
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok()),
        )
        .collect()
}

/// Waits (bounded) until none of `pids` exists, zombies included: CRIU restores the same pids.
pub fn wait_gone(pids: &[u32]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        ensure!(Instant::now() < deadline, "pids {pids:?} still exist");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Installs the hook in `dir/hook` with `settings` as its settings file (`dir/settings.conf`);
/// returns the path of the CRIU configuration file that selects it.
pub fn install_hook(dir: &TempDir, settings: &str) -> Result<PathBuf> {
    tcpmig_testbed::containers::scenario::install_hook(&tcpmig_bin(), &dir.0, settings)
}

/// Runs `cmd` to completion within `timeout` (killed by pid after it).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting criu")?;
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "exited with {status}");
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The namespaces' view of what is left: pins, programs, CRIU's rules.
pub fn leftovers(bed: &TestBed) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for host in [bed.source(), bed.destination()] {
        let netns = Netns::open(host.name())?;
        let pin = Path::new(freeze::PIN_ROOT).join(format!("criu-{}", netns.inode()));
        if pin.exists() {
            left.push(format!("pin {}", pin.display()));
        }
        for program in freeze::attached_programs(&netns, IFACE)? {
            left.push(format!("{program} on {IFACE} in {host}"));
        }
        for (tool, args) in [
            ("nft", &["list", "ruleset"][..]),
            ("iptables-save", &[][..]),
        ] {
            let out = host.command(tool)?.args(args).output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("CRIU") || text.contains("0xc114") {
                left.push(format!("{tool} rules in {host}: {text}"));
            }
        }
    }
    Ok(left)
}

/// Waits (bounded) for the guards to finish, then checks nothing is left.
pub fn nothing_left(bed: &TestBed) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = leftovers(bed)?;
        if left.is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The inode of `pid`'s network namespace.
pub fn netns_inode_of(pid: u32) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// One migration's hosts, hook and files.
pub struct Migration<'bed> {
    pub bed: &'bed TestBed,
    pub mode: Mode,
    pub dir: TempDir,
    /// CRIU's options selecting the hook, as `tcpmig criu-hook --install --settings` wrote them.
    pub criu_conf: PathBuf,
    /// TCPMIG_DEV for the hook.
    pub dev: &'static str,
    /// The address the hook moves (TCPMIG_ADDRESS, with the bed's prefix length of its family).
    pub service: IpAddr,
}

impl<'bed> Migration<'bed> {
    pub fn new(bed: &'bed TestBed, mode: Mode, tag: &str) -> Result<Self> {
        let dir = TempDir::new(tag)?;
        // The report through the settings file, as under podman (which passes no environment).
        let report = dir.0.join("hooks.jsonl");
        let criu_conf = install_hook(&dir, &format!("TCPMIG_REPORT={}\n", report.display()))?;
        Ok(Self {
            bed,
            mode,
            dir,
            criu_conf,
            dev: IFACE,
            service: SERVICE_V4.into(),
        })
    }

    /// Starts `cmd` (made by a host) detached: own session, stdio on files in the temp dir, as
    /// CRIU wants a task without a terminal.
    pub fn spawn_detached(
        &self,
        host: &'bed Host,
        cmd: &mut Command,
        tag: &str,
    ) -> Result<ChildGuard<'bed>> {
        let log = |suffix| fs::File::create(self.dir.0.join(format!("{tag}.{suffix}")));
        cmd.stdin(Stdio::null())
            .stdout(log("out")?)
            .stderr(log("err")?);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        host.spawn(cmd)
    }

    pub fn wait_for_line(&self, tag: &str, line: &str) -> Result<()> {
        let path = self.dir.0.join(format!("{tag}.out"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.lines().any(|l| l == line) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{tag} did not say {line:?}; stderr: {}",
                fs::read_to_string(self.dir.0.join(format!("{tag}.err"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs CRIU with the hook configured, inside `host`'s netns or (external mode) outside;
    /// fails with CRIU's log tail. Returns the wall time.
    pub fn criu(
        &self,
        host: &Host,
        args: &[&str],
        log: &str,
        netns: Option<fs::File>,
    ) -> Result<Duration> {
        let mut cmd = match self.mode {
            Mode::SameNetns => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", host.path().display()))
                    .arg("criu");
                cmd
            }
            Mode::ExternalNetns => Command::new("criu"),
        };
        cmd.args(args)
            .arg("-D")
            .arg(self.dir.images())
            .args(["--tcp-established", "-v4", "-o", log])
            // action-script and network-lock skip, as a container runtime would pass them.
            .arg("--config")
            .arg(&self.criu_conf)
            .env("TCPMIG_DEV", self.dev)
            .env(
                "TCPMIG_ADDRESS",
                format!("{}/{}", self.service, prefix_len(self.service)),
            )
            .env("TCPMIG_DEADLINE", DEADLINE_S)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.0.join(format!("{log}.stderr")))?);
        if let Some(file) = &netns {
            let fd = std::os::fd::AsRawFd::as_raw_fd(file);
            // SAFETY: dup2 and fcntl only, in the child: the duplicate survives exec.
            unsafe {
                cmd.pre_exec(move || {
                    if fd == NETNS_FD {
                        libc::fcntl(fd, libc::F_SETFD, 0);
                    } else if libc::dup2(fd, NETNS_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        run_bounded(&mut cmd, CRIU_TIMEOUT).with_context(|| {
            let log_text = fs::read_to_string(self.dir.images().join(log)).unwrap_or_default();
            let stderr =
                fs::read_to_string(self.dir.0.join(format!("{log}.stderr"))).unwrap_or_default();
            let tail: Vec<&str> = log_text.lines().rev().take(15).collect();
            format!(
                "criu {args:?}; stderr: {stderr}\nlog tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    pub fn dump(&self, pid: u32) -> Result<Duration> {
        let pid = pid.to_string();
        let mut args = vec!["dump", "-t", &pid];
        let external;
        if self.mode == Mode::ExternalNetns {
            let inode = Netns::open(self.bed.source().name())?.inode();
            external = format!("net[{inode}]:{NETNS_KEY}");
            args.extend(["--external", &external]);
        }
        self.criu(self.bed.source(), &args, "dump.log", None)
    }

    pub fn restore(&self) -> Result<Duration> {
        let inherit = format!("fd[{NETNS_FD}]:{NETNS_KEY}");
        let mut args = vec!["restore", "--restore-detached"];
        let mut netns = None;
        if self.mode == Mode::ExternalNetns {
            args.extend(["--inherit-fd", &inherit]);
            netns = Some(fs::File::open(self.bed.destination().path())?);
        }
        self.criu(self.bed.destination(), &args, "restore.log", netns)
    }
}
