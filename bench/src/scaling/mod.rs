//! The scaling benchmark: tcpmig's standalone migration (`tcpmig migrate` + `tcpmig agent`) of
//! N live connections under open-loop load, several times per N, and in the same run the
//! references for the same N: CRIU's iptables and nftables locks ([`crate::freeze`]), real CRIU
//! dump + restore with its lock and with the tcpmig hook ([`crate::criu`]), and a plain
//! one-thread loop of the repair syscalls ([`crate::repair`]).
//!
//! Caps, said in the output too: real CRIU runs up to [`CRIU_MAX`]; the repair loop up to
//! [`REPAIR_MAX`] (both ends of its connections live in one process); CRIU's iptables lock past
//! 1,000 connections is extrapolated by [`crate::freeze`]. The migrations have none: past the
//! file limit of one process, one migration moves several servers ([`migration`]).

mod clients;
mod goals;
mod migration;
mod summary;

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tcpmig_testbed::LoadConfig;

use crate::criu::{self, CriuRun};
use crate::freeze::{self, FreezeResult};
use crate::repair::{self, RepairBench};
use crate::report::OutputDir;
use migration::MigrationRun;

const FULL_NS: [usize; 6] = [1, 10, 100, 1_000, 10_000, 50_000];
const QUICK_NS: [usize; 4] = [1, 10, 100, 1_000];
/// Real CRIU up to this N: its iptables restore at 5,000 already hits the 120 s cap.
const CRIU_MAX: usize = 5_000;
/// In CI, CRIU's own locks at 1,000 would take most of the time budget.
const CRIU_MAX_QUICK: usize = 100;
/// The repair bench holds both ends of N connections in one process: 2N fds.
const REPAIR_MAX: usize = 10_000;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct ScalingArgs {
    /// Connection counts, comma-separated [default: 1,10,100,1000 with --quick, else
    /// 1,10,100,1000,10000,50000].
    #[arg(long, value_delimiter = ',')]
    pub connections: Vec<usize>,
    /// Migrations per connection count [default: 2 with --quick, else 3].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Migrations only: no CRIU locks, real CRIU or plain repair loop.
    #[arg(long)]
    pub no_references: bool,
    /// Every migration with `tcpmig migrate --precopy`.
    #[arg(long)]
    pub precopy: bool,
    /// Every migration over a plaintext link (`--insecure`, with a token) instead of mutual
    /// TLS: the difference is what TLS costs.
    #[arg(long)]
    pub insecure: bool,
    /// The clients' messages per second over all connections [default: 20000]; at 2000 each
    /// of 10,000 connections sends every 5 s, and most are quiet at any moment.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
}

/// Everything one scaling run measured (scaling.json).
#[derive(Serialize)]
pub struct Scaling {
    pub machine: Machine,
    /// The migrations ran with `--precopy`.
    pub precopy: bool,
    /// The migrations ran over a plaintext link, not mutual TLS.
    pub insecure: bool,
    /// The clients' messages per second over all connections.
    pub rate: f64,
    pub migrations: Vec<MigrationPoint>,
    pub freeze: Vec<FreezeResult>,
    pub repair: Vec<RepairBench>,
    pub criu: Vec<CriuRun>,
    pub wall_s: f64,
}

/// The migrations at one N: every run, and why there are fewer than asked.
#[derive(Serialize)]
pub struct MigrationPoint {
    pub connections: usize,
    pub runs: Vec<MigrationRun>,
    pub failures: Vec<String>,
}

/// Where the numbers come from: results on a shared machine mean little without its load.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub date_utc: String,
    pub cpus: usize,
    pub kernel: String,
    /// /proc/loadavg's 1, 5 and 15 minute averages when the run started and when it ended.
    pub load_start: String,
    pub load_end: String,
}

impl Machine {
    fn now() -> anyhow::Result<Self> {
        let load = load_average()?;
        Ok(Self {
            date_utc: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            load_start: load.clone(),
            load_end: load,
        })
    }
}

fn load_average() -> anyhow::Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    Ok(text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// Runs the scaling benchmark and writes scaling.{json,md,csv}, scaling-runs.csv, blackout.svg
/// and phases.svg (and the references' own freeze/repair/criu files) in `out`. Fails at the end,
/// with everything written, if any migration failed.
pub fn run(args: &ScalingArgs, quick: bool, out: &OutputDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut machine = Machine::now()?;
    let ns = match (&args.connections[..], quick) {
        ([], true) => QUICK_NS.to_vec(),
        ([], false) => FULL_NS.to_vec(),
        (ns, _) => ns.to_vec(),
    };
    let runs = args.runs.unwrap_or(if quick { 2 } else { 3 }).max(1);
    let bin = criu::binaries()?;
    let repair_ns: Vec<usize> = ns.iter().copied().filter(|&n| n <= REPAIR_MAX).collect();
    let references = if args.no_references {
        0
    } else {
        2 + repair_ns.len()
    };
    let progress = Progress::new(ns.len() * runs + references, started);
    let mut migrations = Vec::new();
    for &n in &ns {
        let mut point = MigrationPoint {
            connections: n,
            runs: Vec::new(),
            failures: Vec::new(),
        };
        for k in 1..=runs {
            progress.begin(&format!("migration of {n} connections, run {k}/{runs}"));
            match migration::once(&bin, n, args) {
                Ok(run) => point.runs.push(run),
                Err(e) => {
                    progress.say(&format!("migration of {n} connections failed: {e:#}"));
                    point.failures.push(format!("{e:#}"));
                }
            }
        }
        migrations.push(point);
    }
    let (mut freeze, mut repair, mut criu) = (Vec::new(), Vec::new(), Vec::new());
    if !args.no_references {
        progress.begin(&format!(
            "references: CRIU's locks and tcpmig's freeze at {ns:?}"
        ));
        freeze = freeze::run(&ns)?;
        out.write("freeze", &freeze, &freeze::markdown(&freeze))?;
        for &n in &repair_ns {
            progress.begin(&format!("reference: plain repair loop at {n}"));
            repair.push(repair::run(n)?);
        }
        out.write("repair", &repair, &repair::markdown(&repair))?;
        let criu_max = if quick { CRIU_MAX_QUICK } else { CRIU_MAX };
        // Past its cap, CRIU still runs at the cap: the nearest it gets to the larger N.
        let mut criu_ns: Vec<usize> = ns.iter().map(|&n| n.min(criu_max)).collect();
        criu_ns.dedup();
        progress.begin(&format!(
            "references: real CRIU dump + restore at {criu_ns:?}"
        ));
        criu = criu::run(&criu_ns)?;
        out.write("criu", &criu, &criu::markdown(&criu))?;
    }
    machine.load_end = load_average()?;
    let scaling = Scaling {
        machine,
        precopy: args.precopy,
        insecure: args.insecure,
        rate: args.rate.unwrap_or(LoadConfig::default().rate),
        migrations,
        freeze,
        repair,
        criu,
        wall_s: started.elapsed().as_secs_f64(),
    };
    summary::write(out, &scaling)?;
    progress.finish();
    let failed: usize = scaling.migrations.iter().map(|m| m.failures.len()).sum();
    anyhow::ensure!(
        failed == 0,
        "{failed} migrations failed (see scaling.md in {})",
        out.path().display()
    );
    Ok(())
}

/// The run's progress: a bar on a terminal, one line per step otherwise (CI's log).
struct Progress {
    bar: ProgressBar,
    started: Instant,
}

impl Progress {
    fn new(steps: usize, started: Instant) -> Self {
        let style = ProgressStyle::with_template("{bar:30} {pos}/{len} steps, {elapsed} {msg}")
            .expect("a valid template");
        Self {
            bar: ProgressBar::new(steps as u64).with_style(style),
            started,
        }
    }

    /// A step starts: the one before it is done.
    fn begin(&self, what: &str) {
        if self.bar.message().is_empty() {
            self.bar
                .enable_steady_tick(std::time::Duration::from_millis(500));
        } else {
            self.bar.inc(1);
        }
        let load = load_average().unwrap_or_default();
        self.bar.set_message(format!("{what} (load {load})"));
        if self.bar.is_hidden() {
            eprintln!(
                "[scaling {:>4.0} s, load {load}] {what}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// A line above the bar.
    fn say(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    fn finish(&self) {
        self.bar.finish_with_message("done");
        if self.bar.is_hidden() {
            eprintln!(
                "[scaling {:>4.0} s] done",
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
