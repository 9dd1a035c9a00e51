//! Where benchmark results go, and the statistics they are reported with.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

pub struct OutputDir(PathBuf);

impl OutputDir {
    /// target/bench/<UTC yyyymmdd-hhmmss>/ in the workspace.
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
    pub fn of(samples: &[Duration]) -> Self {
        assert!(!samples.is_empty(), "at least one sample");
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        Self {
            median_us: us[us.len() / 2],
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
