//! Where benchmark results go, and the statistics they are reported with.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

pub struct OutputDir(PathBuf);

impl OutputDir {
    /// `target/bench/<UTC yyyymmdd-hhmmss>/` in the workspace.
    pub fn create() -> anyhow::Result<Self> {
        let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/bench")
            .join(stamp);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `<name>.json` and `<name>.md`, and prints the Markdown.
    pub fn write(
        &self,
        name: &str,
        results: &impl serde::Serialize,
        markdown: &str,
    ) -> anyhow::Result<()> {
        fs::write(
            self.0.join(format!("{name}.json")),
            serde_json::to_string_pretty(results)?,
        )?;
        fs::write(self.0.join(format!("{name}.md")), markdown)?;
        println!("{markdown}");
        Ok(())
    }

    /// Writes `<name>.csv`: a header line and one line per row (the cells must not hold commas).
    pub fn write_csv(
        &self,
        name: &str,
        header: &[&str],
        rows: &[Vec<String>],
    ) -> anyhow::Result<()> {
        let mut csv = header.join(",");
        csv.push('\n');
        for row in rows {
            anyhow::ensure!(
                row.len() == header.len() && row.iter().all(|cell| !cell.contains(',')),
                "{name}.csv: row {row:?} does not fit the header"
            );
            csv.push_str(&row.join(","));
            csv.push('\n');
        }
        let path = self.0.join(format!("{name}.csv"));
        fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))
    }
}

/// Median and spread of repeated measurements, in microseconds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Stats {
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub runs: usize,
}

impl Stats {
    /// Of values in milliseconds (as the migration and the load generator report them).
    pub fn of_ms(samples: &[f64]) -> Self {
        let durations: Vec<Duration> = samples
            .iter()
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3))
            .collect();
        Self::of(&durations)
    }

    pub fn of(samples: &[Duration]) -> Self {
        assert!(!samples.is_empty(), "at least one sample");
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        Self {
            // The mean of the middle two for an even count: with 2 runs, not the larger one.
            median_us: (us[(us.len() - 1) / 2] + us[us.len() / 2]) / 2.0,
            min_us: us[0],
            max_us: us[us.len() - 1],
            runs: us.len(),
        }
    }
}

/// Runs `f` `runs` times and returns the statistics of its durations.
pub fn measure(
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<Duration>,
) -> anyhow::Result<Stats> {
    let samples = (0..runs).map(|_| f()).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Stats::of(&samples))
}
