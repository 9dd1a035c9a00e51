//! The rebalance benchmark: `tcpmig migrate --keep-address --select` of a fraction of N busy
//! connections to a destination whose application already serves its own, the service address
//! staying on the source, which steers the moved connections' segments (docs/rebalance.md).
//! Each run on a fresh bed ([`once`]); per fraction, the medians and ranges of the blackout of
//! the moved connections, the pause of those that stayed, what the clients of each saw, and what
//! the steering costs per forwarded segment ([`summary`]).

mod once;
mod summary;

use std::time::Instant;

use serde::Serialize;
use tcpmig_testbed::LoadConfig;

use crate::criu;
use crate::report::OutputDir;
use once::RebalanceRun;

const CONNECTIONS: usize = 10_000;
const QUICK_CONNECTIONS: usize = 1_000;
const FRACTIONS: [f64; 3] = [0.1, 0.3, 0.5];
const QUICK_FRACTIONS: [f64; 1] = [0.3];

#[derive(clap::Args, Clone, Debug, Default)]
pub struct RebalanceArgs {
    /// The service's connections [default: 1000 with --quick, else 10000].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Fractions of them to move, comma-separated [default: 0.3 with --quick, else
    /// 0.1,0.3,0.5].
    #[arg(long, value_delimiter = ',')]
    pub fractions: Vec<f64>,
    /// Rebalances per fraction, each on a fresh bed [default: 1 with --quick, else 3].
    #[arg(long)]
    pub runs: Option<usize>,
}

/// Everything one rebalance benchmark measured (rebalance.json).
#[derive(Serialize)]
pub struct Rebalance {
    pub date_utc: String,
    /// The service's connections, the destination application's own, and the messages per
    /// second over the service's (the destination's at the same interval per connection).
    pub connections: usize,
    pub own_connections: usize,
    pub rate: f64,
    pub points: Vec<FractionPoint>,
    pub wall_s: f64,
}

/// The rebalances of one fraction: the runs that count, and those that failed.
#[derive(Serialize)]
pub struct FractionPoint {
    pub fraction: f64,
    pub moved: usize,
    pub runs: Vec<RebalanceRun>,
    pub failures: Vec<Failure>,
}

/// A run that failed: why, and what it measured if it ran to its end (it lost connections).
#[derive(Serialize)]
pub struct Failure {
    pub run: usize,
    pub why: String,
    pub measured: Option<Box<RebalanceRun>>,
}

/// Runs the benchmark and writes rebalance.{json,md} and rebalance.svg in `out`. Fails at the
/// end, with everything written, if any run failed.
pub fn run(args: &RebalanceArgs, quick: bool, out: &OutputDir) -> anyhow::Result<()> {
    let started = Instant::now();
    let n = (args.connections).unwrap_or(if quick {
        QUICK_CONNECTIONS
    } else {
        CONNECTIONS
    });
    let fractions = match (&args.fractions[..], quick) {
        ([], true) => QUICK_FRACTIONS.to_vec(),
        ([], false) => FRACTIONS.to_vec(),
        (fractions, _) => fractions.to_vec(),
    };
    let runs = args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let bin = criu::binaries()?;
    let mut points = Vec::new();
    for fraction in fractions {
        let mut point = FractionPoint {
            fraction,
            moved: once::moved_of(n, fraction),
            runs: Vec::new(),
            failures: Vec::new(),
        };
        for k in 1..=runs {
            eprintln!(
                "[rebalance {:>4.0} s] {} of {n} connections, run {k}/{runs}",
                started.elapsed().as_secs_f64(),
                point.moved
            );
            let (why, measured) = match once::once(&bin, n, fraction) {
                Ok(run) => match run.broken() {
                    None => {
                        point.runs.push(run);
                        continue;
                    }
                    Some(why) => (why, Some(Box::new(run))),
                },
                Err(e) => (format!("{e:#}"), None),
            };
            eprintln!("run {k} failed: {why}");
            point.failures.push(Failure {
                run: k,
                why,
                measured,
            });
        }
        points.push(point);
    }
    let results = Rebalance {
        date_utc: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        connections: n,
        own_connections: once::OWN_CONNECTIONS,
        rate: LoadConfig::default().rate,
        points,
        wall_s: started.elapsed().as_secs_f64(),
    };
    out.write("rebalance", &results, &summary::markdown(&results))?;
    summary::plot(&results, &out.path().join("rebalance.svg"))?;
    let failed: usize = results.points.iter().map(|p| p.failures.len()).sum();
    anyhow::ensure!(
        failed == 0,
        "{failed} rebalances failed (see rebalance.md in {})",
        out.path().display()
    );
    Ok(())
}
