//! `cargo xtask ...`: the project's own commands, so that a fresh clone needs no Makefile.
//!
//! Tests and benchmarks touch kernel state (namespaces, eBPF programs, pins), so they run as
//! root and one test at a time.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check that setup.sh has been run: toolchain, bpf-linker, CRIU, bpffs.
    Check,
    /// Build tcpmig (and its eBPF programs), then run every test, one at a time.
    Test {
        /// Extra arguments for the test harness (a test name filter, say).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every fuzz target for a while (libFuzzer through cargo-fuzz), from the committed
    /// seeds plus the local corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the soak test: 100 migrations back and forth of 1,000 connections under traffic
    /// (a few minutes; not part of `test`).
    Soak,
    /// Run the benchmarks (release build); --quick is the short run CI uses.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Check => check(),
        Task::Test { args } => test(&args),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Soak => soak(),
        Task::Bench { args } => bench(&args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("tests and benchmarks create network namespaces and load eBPF programs: run as root");
    }
    Ok(())
}

fn check() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (what, program, arg) in [
        ("bpf-linker (setup.sh builds it)", "bpf-linker", "--version"),
        ("CRIU >= 4.2 (setup.sh builds it)", "criu", "--version"),
        ("iproute2", "ip", "-V"),
        ("tcpdump", "tcpdump", "--version"),
    ] {
        let ok = Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|out| out.status.success());
        if !ok {
            missing.push(what);
        }
    }
    if !Path::new("/sys/fs/bpf/").exists() {
        missing.push("/sys/fs/bpf");
    }
    if !missing.is_empty() {
        bail!("missing: {}; run ./setup.sh as root", missing.join(", "));
    }
    println!("setup looks complete");
    Ok(())
}

fn test(args: &[String]) -> anyhow::Result<()> {
    build_for_tests()?;
    let mut test = cargo();
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "migrate-ebpf",
        "--",
        "--test-threads=1",
    ]);
    test.args(args);
    run(test)
}

/// Integration tests in tests/ run the tcpmig binary: builds it (and the eBPF object) first.
fn build_for_tests() -> anyhow::Result<()> {
    require_root()?;
    check()?;
    let mut build = cargo();
    build.args(["build", "--package", "tcpmig-cli", "--bins"]);
    run(build)
}

fn soak() -> anyhow::Result<()> {
    build_for_tests()?;
    let mut test = cargo();
    test.args([
        "test",
        "--package",
        "tcpmig-testbed",
        "--test",
        "soak",
        "--",
    ])
    .args(["--ignored", "--nocapture", "--test-threads=1"]);
    run(test)
}

/// The fuzz targets, in migrate-user/fuzz (their seeds in `seeds/<target>/`).
const FUZZ_TARGETS: &[&str] = &["image_decode", "transport_frames"];

fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let dir = workspace_root().join("migrate-user/fuzz");
    for target in FUZZ_TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut run_target = cargo();
        run_target
            .current_dir(&dir)
            // The pinned stable toolchain (aya needs >= 1.98, newer than the machine's nightly)
            // accepts the sanitizer flags with RUSTC_BOOTSTRAP.
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"));
        run(run_target)?;
    }
    Ok(())
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    check()?;
    // The benchmarks run the tcpmig binary and the test bed's tcpmig-peer (the CRIU references'
    // server, the repair benchmark's peers).
    let mut build = cargo();
    build.args([
        "build",
        "--release",
        "--package",
        "tcpmig-cli",
        "--package",
        "tcpmig-testbed",
        "--bins",
    ]);
    run(build)?;
    let mut bench = cargo();
    bench.args(["run", "--release", "--package", "tcpmig-bench", "--"]);
    bench.args(args);
    run(bench)
}
