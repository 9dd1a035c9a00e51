//! Containers on the test bed: a server in a runc or podman container whose network namespace is
//! a bed host's, checkpointed by the runtime (CRIU, `--tcp-established`) and restored into another
//! host's namespace, as from one machine to another.
//!
//! No registry is reachable, so the root filesystem is a few empty directories with the host's
//! /usr bind-mounted read-only (on Debian 12 /bin, /lib, /lib64 and /sbin are links into /usr), and
//! the program the container runs bind-mounted beside it. The container names its network
//! namespace by a path of its own, a bind mount of the host's namespace; between the checkpoint
//! and the restore that path is made to name the destination host's namespace, the way one name
//! (/run/netns/NAME, say) names another namespace on another machine. Both runtimes run the
//! container with runc: crun fails on these machines' hybrid cgroups (shared notes,
//! containers.md). The container's stdio is /dev/null and its program writes to files in a
//! directory shared with it: CRIU cannot dump an fd on a host file outside the container's mounts.
use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use crate::Namespace;

pub mod scenario;

/// Bound on one runtime command: a checkpoint or restore of 10,000 connections takes seconds.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(180);
/// The image podman runs, imported from the same root filesystem.
const PODMAN_IMAGE: &str = "localhost/tcpmig-testbed-rootfs";
/// Where the container sees the shared directory and its program.
const SHARED: &str = "/work";
const PROGRAM: &str = "/tcpmig-peer";
/// The program's stdout and stderr, in the shared directory.
const OUT: &str = "server.out";
const ERR: &str = "server.err";
/// The file limit of the container's processes: this machine's hard limit.
const NOFILE: u32 = 20_000;

/// The container runtime driving CRIU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Runc,
    /// podman with `--runtime runc`.
    Podman,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Runc, Runtime::Podman];

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Podman => "podman",
        }
    }
}

/// What keeps the connections while the runtime checkpoints and restores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lock {
    /// tcpmig's hook: the container's annotation `org.criu.config` names this CRIU
    /// configuration file (`tcpmig criu-hook --install` wrote it).
    Hook(PathBuf),
    /// CRIU's own network lock (iptables, namespace-wide in a container's namespace); the
    /// service address is moved by hand. With `skip-in-flight`: without it CRIU refuses to dump
    /// a listener with connections in its accept queue, which new connections arriving during
    /// the checkpoint leave there (those are lost).
    Criu,
    /// No lock at all (`network-lock skip`, `skip-in-flight` and no hook): the negative
    /// control.
    Nothing,
}

/// A running (or checkpointed) container; dropping it removes the container and the mount that
/// names its network namespace.
pub struct Container {
    runtime: Runtime,
    dir: PathBuf,
    id: String,
    netns: PathBuf,
}

impl Container {
    /// Starts `program ARGS` (a tcpmig-peer binary) as the only process of a new container in
    /// `host`'s network namespace, with `dir` (which must exist and be empty) as its directory:
    /// bundle, images, logs, and the directory shared with it.
    pub fn start(
        runtime: Runtime,
        dir: &Path,
        host: &Namespace,
        program: &Path,
        args: &[String],
        lock: &Lock,
    ) -> Result<Self> {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "tcpmig-test-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        fs::create_dir_all(dir.join("shared"))?;
        let netns = dir.join("net");
        fs::write(&netns, "")?;
        mount_bind(&host.path(), &netns)?;
        let container = Self {
            runtime,
            dir: dir.to_owned(),
            id,
            netns,
        };
        let criu_conf = container.criu_conf(lock)?;
        let command = format!(
            "exec {PROGRAM} {} >{SHARED}/{OUT} 2>{SHARED}/{ERR}",
            args.join(" ")
        );
        match runtime {
            Runtime::Runc => container.run_runc(program, &command, criu_conf.as_deref())?,
            Runtime::Podman => container.run_podman(program, &command, criu_conf.as_deref())?,
        }
        Ok(container)
    }

    /// The CRIU configuration file the annotation names.
    fn criu_conf(&self, lock: &Lock) -> Result<Option<PathBuf>> {
        let options = match lock {
            Lock::Hook(conf) => return Ok(Some(conf.clone())),
            Lock::Criu => "skip-in-flight\n",
            Lock::Nothing => "network-lock skip\nskip-in-flight\n",
        };
        let conf = self.dir.join("criu.conf");
        fs::write(&conf, options)?;
        Ok(Some(conf))
    }

    fn run_runc(&self, program: &Path, command: &str, criu_conf: Option<&Path>) -> Result<()> {
        let bundle = self.dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        make_rootfs(&rootfs)?;
        self.run(
            Command::new("runc").args(["spec", "--bundle"]).arg(&bundle),
            "runc spec",
        )?;
        let config = bundle.join("config.json");
        let mut spec: Value = serde_json::from_str(&fs::read_to_string(&config)?)?;
        self.patch_spec(&mut spec, program, command, criu_conf)?;
        fs::write(&config, serde_json::to_vec_pretty(&spec)?)?;
        self.run(
            self.runc()
                .args(["run", "--detach", "--bundle"])
                .arg(&bundle)
                .arg(&self.id),
            "runc run",
        )?;
        Ok(())
    }

    /// runc's default spec, made to run `command` in the shared directory's set-up.
    fn patch_spec(
        &self,
        spec: &mut Value,
        program: &Path,
        command: &str,
        criu_conf: Option<&Path>,
    ) -> Result<()> {
        let process = &mut spec["process"];
        process["terminal"] = json!(false);
        process["args"] = json!(["sh", "-c", command]);
        process["rlimits"] = json!([{ "type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE }]);
        spec["root"] = json!({ "path": "rootfs", "readonly": true });
        let mounts = spec["mounts"]
            .as_array_mut()
            .context("runc spec without mounts")?;
        for (source, destination, mode) in [
            (Path::new("/usr"), "/usr", "ro"),
            (program, PROGRAM, "ro"),
            (&self.dir.join("shared"), SHARED, "rw"),
        ] {
            mounts.push(json!({
                "destination": destination, "type": "bind", "source": source,
                "options": ["rbind", mode],
            }));
        }
        mounts.push(json!({ "destination": "/tmp", "type": "tmpfs", "source": "tmpfs" }));
        let namespaces = spec["linux"]["namespaces"]
            .as_array_mut()
            .context("runc spec without namespaces")?;
        for namespace in namespaces {
            if namespace["type"] == "network" {
                namespace["path"] = json!(self.netns);
            }
        }
        if let Some(conf) = criu_conf {
            spec["annotations"] = json!({ "org.criu.config": conf });
        }
        Ok(())
    }

    fn run_podman(&self, program: &Path, command: &str, criu_conf: Option<&Path>) -> Result<()> {
        self.import_podman_image()?;
        let mut run = Command::new("podman");
        run.args(["run", "--detach", "--runtime", "runc", "--name", &self.id])
            .arg(format!("--network=ns:{}", self.netns.display()))
            .args(["--volume", "/usr:/usr:ro"])
            .arg(format!("--volume={}:{PROGRAM}:ro", program.display()))
            .arg(format!(
                "--volume={}:{SHARED}",
                self.dir.join("shared").display()
            ))
            // podman's default process limit is above what root may set here without
            // CAP_SYS_RESOURCE.
            .arg(format!("--ulimit=nofile={NOFILE}:{NOFILE}"))
            .arg("--ulimit=nproc=4096:4096");
        if let Some(conf) = criu_conf {
            run.arg(format!("--annotation=org.criu.config={}", conf.display()));
        }
        run.args([PODMAN_IMAGE, "sh", "-c", command]);
        self.run(&mut run, "podman run")?;
        Ok(())
    }

    /// `podman import` of the root filesystem, once per machine.
    fn import_podman_image(&self) -> Result<()> {
        let exists = Command::new("podman")
            .args(["image", "exists", PODMAN_IMAGE])
            .status()?;
        if exists.success() {
            return Ok(());
        }
        let rootfs = self.dir.join("rootfs");
        make_rootfs(&rootfs)?;
        let tar = self.dir.join("rootfs.tar");
        self.run(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            "tar",
        )?;
        self.run(
            Command::new("podman")
                .args(["import", "--quiet"])
                .arg(&tar)
                .arg(PODMAN_IMAGE),
            "podman import",
        )?;
        Ok(())
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new("runc");
        cmd.arg("--root").arg(self.dir.join("runc"));
        cmd
    }

    /// Waits (bounded) until the container's program prints `line`.
    pub fn wait_for_line(&self, line: &str, timeout: Duration) -> Result<()> {
        let shared = self.dir.join("shared");
        let deadline = Instant::now() + timeout;
        while !fs::read_to_string(shared.join(OUT))
            .unwrap_or_default()
            .lines()
            .any(|l| l == line)
        {
            ensure!(
                Instant::now() < deadline,
                "the container's program did not say {line:?}; its stderr: {}",
                fs::read_to_string(shared.join(ERR)).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The pid of the container's process, as the host sees it.
    pub fn pid(&self) -> Result<u32> {
        let out = match self.runtime {
            Runtime::Runc => {
                let state = self.run(self.runc().args(["state", &self.id]), "runc state")?;
                let state: Value = serde_json::from_str(&state)?;
                state["pid"].to_string()
            }
            Runtime::Podman => self.run(
                Command::new("podman").args(["inspect", "--format", "{{.State.Pid}}", &self.id]),
                "podman inspect",
            )?,
        };
        out.trim().parse().context("the container's pid")
    }

    /// Checkpoints the container with its established connections (runc: into the image
    /// directory; podman: exported to an archive, and the stopped container removed, as it would
    /// not exist on another machine); returns the runtime command's wall time.
    pub fn checkpoint(&self) -> Result<Duration> {
        // Where CRIU's log will be, found before the clock starts (podman inspect takes time).
        let (mut cmd, log) = match self.runtime {
            Runtime::Runc => {
                let mut cmd = self.runc();
                cmd.args(["checkpoint", "--tcp-established", "--image-path"])
                    .arg(self.dir.join("images"))
                    .arg("--work-path")
                    .arg(self.dir.join("checkpoint"))
                    .arg(&self.id);
                (cmd, Some(self.dir.join("checkpoint/dump.log")))
            }
            Runtime::Podman => {
                let mut cmd = Command::new("podman");
                cmd.args(["container", "checkpoint", "--tcp-established", "--export"])
                    .arg(self.archive())
                    .arg(&self.id);
                (cmd, Some(self.podman_dir().join("dump.log")))
            }
        };
        let started = Instant::now();
        self.run_runtime(&mut cmd, "checkpoint", log)?;
        let took = started.elapsed();
        if self.runtime == Runtime::Podman {
            self.run(Command::new("podman").args(["rm", &self.id]), "podman rm")?;
        }
        Ok(took)
    }

    /// Restores the checkpoint into `host`'s network namespace; returns the runtime command's wall
    /// time.
    pub fn restore(&self, host: &Namespace) -> Result<Duration> {
        unmount(&self.netns)?;
        mount_bind(&host.path(), &self.netns)?;
        let (mut cmd, log) = match self.runtime {
            Runtime::Runc => {
                let mut cmd = self.runc();
                cmd.args(["restore", "--detach", "--tcp-established", "--image-path"])
                    .arg(self.dir.join("images"))
                    .arg("--work-path")
                    .arg(self.dir.join("restore"))
                    .arg("--bundle")
                    .arg(self.dir.join("bundle"))
                    .arg(&self.id);
                (cmd, Some(self.dir.join("restore/restore.log")))
            }
            Runtime::Podman => {
                let mut cmd = Command::new("podman");
                cmd.args(["container", "restore", "--tcp-established", "--import"])
                    .arg(self.archive());
                (cmd, None)
            }
        };
        let started = Instant::now();
        self.run_runtime(&mut cmd, "restore", log)?;
        Ok(started.elapsed())
    }

    /// Runs the runtime's `action` command; on failure the error carries the errors of CRIU's
    /// `log` when the runtime keeps one.
    fn run_runtime(&self, cmd: &mut Command, action: &str, log: Option<PathBuf>) -> Result<()> {
        let what = format!("{} {action}", self.runtime.name());
        self.run(cmd, &what).map(drop).map_err(|e| match &log {
            Some(log) => e.context(self.criu_log(log)),
            None => e,
        })
    }

    fn archive(&self) -> PathBuf {
        self.dir.join("checkpoint.tar.gz")
    }

    /// Where podman keeps the container's files, CRIU's logs among them.
    fn podman_dir(&self) -> PathBuf {
        let out = self.run(
            Command::new("podman").args(["inspect", "--format", "{{.StaticDir}}", &self.id]),
            "podman inspect",
        );
        PathBuf::from(out.unwrap_or_default().trim())
    }

    /// The errors of one of CRIU's logs, for a failure's message: what the action script
    /// printed (CRIU logs a script's stderr; runc and podman show neither), and CRIU's last
    /// errors.
    fn criu_log(&self, log: &Path) -> String {
        let text = fs::read_to_string(log).unwrap_or_default();
        let hook = text.lines().filter(|l| l.starts_with("tcpmig"));
        let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
        let last = errors[errors.len().saturating_sub(3)..].iter().copied();
        format!(
            "CRIU's {}: {}",
            log.display(),
            hook.chain(last).collect::<Vec<_>>().join(" | ")
        )
    }

    /// Runs `cmd` to completion within [`RUNTIME_TIMEOUT`] (killed by pid after it), stdin
    /// closed; its stdout, or an error with its stderr.
    fn run(&self, cmd: &mut Command, what: &str) -> Result<String> {
        let out = self.dir.join("command.out");
        let err = self.dir.join("command.err");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let deadline = Instant::now() + RUNTIME_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{what} did not finish within {RUNTIME_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stderr = fs::read_to_string(&err).unwrap_or_default();
        ensure!(status.success(), "{what}: {status}: {}", stderr.trim());
        Ok(fs::read_to_string(&out)?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = match self.runtime {
            Runtime::Runc => self.run(self.runc().args(["delete", "--force", &self.id]), "runc"),
            Runtime::Podman => self.run(
                Command::new("podman").args(["rm", "--force", "--time", "0", &self.id]),
                "podman rm",
            ),
        };
        let _ = unmount(&self.netns);
    }
}

/// Empty mount points (the program's a file), /usr for the host's, and the host's links into
/// /usr.
fn make_rootfs(rootfs: &Path) -> Result<()> {
    for dir in ["usr", "proc", "dev", "sys", "tmp", "etc", &SHARED[1..]] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::write(rootfs.join(&PROGRAM[1..]), "")?;
    for link in ["bin", "lib", "lib64", "sbin"] {
        let host = Path::new("/").join(link);
        let target = fs::read_link(&host).with_context(|| {
            format!(
                "{} is not a link into /usr (a merged-/usr system is needed)",
                host.display()
            )
        })?;
        std::os::unix::fs::symlink(target, rootfs.join(link))?;
    }
    Ok(())
}

fn mount_bind(source: &Path, target: &Path) -> Result<()> {
    let status = Command::new("mount")
        .arg("--bind")
        .arg(source)
        .arg(target)
        .status()?;
    ensure!(
        status.success(),
        "mount --bind {} {}",
        source.display(),
        target.display()
    );
    Ok(())
}

fn unmount(target: &Path) -> Result<()> {
    let status = Command::new("umount").arg(target).status()?;
    ensure!(status.success(), "umount {}", target.display());
    Ok(())
}

/// The service address `addr` leaves `from` and is put on `to`, announced (what CRIU's own
/// lock, or none, leaves to the operator; tcpmig's hook does it itself).
pub fn move_address(from: &Namespace, to: &Namespace, addr: &str, dev: &str) -> Result<()> {
    from.ip(&["addr", "del", addr, "dev", dev])?;
    to.ip(&["addr", "add", addr, "dev", dev])?;
    let ip = addr.split('/').next().unwrap_or(addr);
    let status = to
        .command("arping")?
        .args(["-q", "-U", "-c", "1", "-I", dev, ip])
        .status()?;
    ensure!(status.success(), "arping -U {ip} in {to}");
    Ok(())
}

/// An iptables rule dropping the TCP segments to one address in a host, removed on drop: the
/// restore side of CRIU's namespace-wide lock, which CRIU does not take for a namespace it did not
/// create.
pub struct DropRule<'a> {
    host: &'a Namespace,
    rule: Vec<String>,
}

impl<'a> DropRule<'a> {
    pub fn insert(host: &'a Namespace, addr: IpAddr) -> Result<Self> {
        let rule: Vec<String> = ["INPUT", "-d", &addr.to_string(), "-p", "tcp", "-j", "DROP"]
            .map(str::to_owned)
            .to_vec();
        let status = host.command("iptables")?.arg("-I").args(&rule).status()?;
        ensure!(status.success(), "iptables -I {rule:?} in {host}");
        Ok(Self { host, rule })
    }
}

impl Drop for DropRule<'_> {
    fn drop(&mut self) {
        if let Ok(mut cmd) = self.host.command("iptables") {
            let _ = cmd.arg("-D").args(&self.rule).status();
        }
    }
}

/// Fails unless `runc` and `podman` are installed (setup.sh installs them).
pub fn check_installed() -> Result<()> {
    for runtime in Runtime::ALL {
        if Command::new(runtime.name())
            .arg("--version")
            .output()
            .is_err()
        {
            bail!("{} is not installed: run ./setup.sh", runtime.name());
        }
    }
    Ok(())
}
