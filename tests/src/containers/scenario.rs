//! One container migration under load, shared by the container tests and `tcpmig-bench
//! containers`: an echo server in a container on the source host, `n` clients sending all the
//! time (the open-loop load, every echo checked) and a new connection every 2 ms, the runtime's
//! checkpoint and a restore into the destination host's namespace under one of the locks.
use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use super::{Container, DropRule, Lock, Runtime, move_address};
use crate::{
    IFACE, LoadConfig, LoadReport, LoadRun, PREFIX_V4, ProbeArgs, ProbeReport, ProbeRun,
    SERVICE_V4, TestBed,
};

const PORT: u16 = 8080;
const READY: Duration = Duration::from_secs(30);

/// Which lock a scenario uses; the hook is installed by the scenario itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    TcpmigHook,
    CriuLock,
    NoLock,
}

impl LockKind {
    /// How reports name it.
    pub fn name(self) -> &'static str {
        match self {
            LockKind::TcpmigHook => "tcpmig hook",
            LockKind::CriuLock => "CRIU lock",
            LockKind::NoLock => "no lock",
        }
    }
}

/// What to run, and with which programs.
pub struct Scenario<'a> {
    pub runtime: Runtime,
    pub connections: usize,
    pub lock: LockKind,
    pub tcpmig: &'a Path,
    pub peer: &'a Path,
    /// An empty directory for the hook, the container and the reports.
    pub dir: &'a Path,
}

/// What the clients saw, and the runtime's times.
pub struct Seen {
    pub load: LoadReport,
    /// Connections attempted through the migration, and after it.
    pub probe: ProbeReport,
    pub after: ProbeReport,
    pub checkpoint: Duration,
    pub restore: Duration,
    /// The inode of the restored container's network namespace.
    pub restored_netns: u64,
    /// The hook's report (TCPMIG_REPORT), one JSON line per action.
    pub hooks: String,
}

impl Scenario<'_> {
    /// Runs it on `bed` (whose source carries the service address).
    pub fn run(&self, bed: &TestBed) -> Result<Seen> {
        let service = SocketAddr::new(SERVICE_V4.into(), PORT);
        let address = format!("{SERVICE_V4}/{PREFIX_V4}");
        let report = self.dir.join("hooks.jsonl");
        let lock = match self.lock {
            LockKind::TcpmigHook => Lock::Hook(self.install_hook(&service, &address, &report)?),
            LockKind::CriuLock => Lock::Criu,
            LockKind::NoLock => Lock::Nothing,
        };
        let args = ["echo-server", "--listen", &service.to_string()].map(str::to_owned);
        let container = Container::start(
            self.runtime,
            &self.dir.join("container"),
            bed.source(),
            self.peer,
            &args,
            &lock,
        )?;
        container.wait_for_line("ready", READY)?;
        // The clients send until well after the restore: a checkpoint of 10,000 connections
        // takes seconds, more on a busy machine.
        let config = LoadConfig {
            rate: 5_000.0,
            duration: Duration::from_secs(6 + 2 * (self.connections as u64 / 1_000)),
            drain: Duration::from_secs(5),
            ..LoadConfig::default()
        };
        let mut load = LoadRun::start(bed, self.peer, service, self.connections, &config)?;
        // A SYN the freeze dropped is sent again 1 s, 3 s and 7 s after the first: bound each
        // attempt past the third, so that only a migration longer than that leaves it hanging.
        let probe_args = ProbeArgs {
            timeout_ms: 8_000,
            ..ProbeArgs::new(service)
        };
        let probe = ProbeRun::start(bed.client(), self.peer, &probe_args)?;
        std::thread::sleep(Duration::from_millis(500));
        // CRIU locks nothing on the restore side of a namespace it did not create: for the
        // reference, the destination drops the service's segments itself until the restore
        // ends, as CRIU's namespace-wide lock would (else the destination's kernel resets them).
        let destination_lock = (lock == Lock::Criu)
            .then(|| DropRule::insert(bed.destination(), SERVICE_V4.into()))
            .transpose()?;
        let checkpoint = container.checkpoint()?;
        if !matches!(lock, Lock::Hook(_)) {
            // The restored sockets bind to it (the hook moves it itself).
            move_address(bed.source(), bed.destination(), &address, IFACE)?;
        }
        let restore = container.restore(bed.destination())?;
        drop(destination_lock);
        load.mark()?;
        std::thread::sleep(Duration::from_millis(300));
        let probe = probe.finish()?;
        let after = ProbeRun::start(bed.client(), self.peer, &ProbeArgs::new(service))?;
        std::thread::sleep(Duration::from_millis(200));
        let after = after.finish()?;
        Ok(Seen {
            load: load.finish()?,
            probe,
            after,
            checkpoint,
            restore,
            restored_netns: fs::metadata(format!("/proc/{}/ns/net", container.pid()?))?.ino(),
            hooks: fs::read_to_string(&report).unwrap_or_default(),
        })
    }

    /// Installs the hook with every setting in its file (podman passes CRIU no environment);
    /// returns the CRIU configuration file that selects it.
    fn install_hook(&self, service: &SocketAddr, address: &str, report: &Path) -> Result<PathBuf> {
        let settings = format!(
            "TCPMIG_DEV={IFACE}\nTCPMIG_ADDRESS={address}\nTCPMIG_SERVICES={service}\n\
             TCPMIG_DEADLINE=30\nTCPMIG_REPORT={}\n",
            report.display()
        );
        install_hook(self.tcpmig, self.dir, &settings)
    }
}

/// `tcpmig criu-hook --install` (`tcpmig` the binary) into `dir/hook` with `settings` as its
/// settings file, written to `dir/settings.conf`; returns the path of the CRIU configuration file
/// that selects the hook.
pub fn install_hook(tcpmig: &Path, dir: &Path, settings: &str) -> Result<PathBuf> {
    let path = dir.join("settings.conf");
    fs::write(&path, settings)?;
    let out = Command::new(tcpmig)
        .args(["criu-hook", "--install", "--dir"])
        .arg(dir.join("hook"))
        .arg("--settings")
        .arg(&path)
        .output()
        .context("running tcpmig criu-hook --install")?;
    ensure!(
        out.status.success(),
        "tcpmig criu-hook --install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    Ok(PathBuf::from(
        stdout.lines().nth(1).context("criu.conf's path")?,
    ))
}

impl Seen {
    /// Every connection kept byte-exact with no reset, and new connections served after the
    /// migration; with `through`, also every one attempted through it (none refused or
    /// hanging).
    pub fn all_kept(&self, connections: usize, through: bool) -> Result<()> {
        let load = &self.load;
        ensure!(
            load.lost() == 0 && load.verified == connections as u64 && load.missing == 0,
            "connections lost: {load:?}"
        );
        let mut probes = vec![("after", &self.after)];
        if through {
            probes.push(("through", &self.probe));
        }
        for (when, probe) in probes {
            ensure!(
                probe.attempted > 0
                    && probe.refused == 0
                    && probe.failed == 0
                    && probe.hanging() == 0
                    && probe.served == probe.attempted,
                "new connections {when} the migration: {} of {} served, {} refused, {} \
                 hanging, {} failed (first: {:?})",
                probe.served,
                probe.attempted,
                probe.refused,
                probe.hanging(),
                probe.failed,
                probe.first_failure
            );
        }
        Ok(())
    }

    /// One line for the logs.
    pub fn summary(&self) -> String {
        format!(
            "checkpoint {:?}, restore {:?}; clients: {} verified, {} resets, longest stall \
             {:.1} ms; new connections through it: {} of {} served, {} refused, {} hanging",
            self.checkpoint,
            self.restore,
            self.load.verified,
            self.load.resets,
            self.load.max_stall.max_ms,
            self.probe.served,
            self.probe.attempted,
            self.probe.refused,
            self.probe.hanging(),
        )
    }
}
