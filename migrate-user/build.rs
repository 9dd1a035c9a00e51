//! Builds the eBPF programs (migrate-ebpf) for the bpf target with aya-build.
//!
//! The inner build uses the toolchain pinned in rust-toolchain.toml (its LLVM must match
//! bpf-linker's) and needs `-Z build-std=core`, so RUSTC_BOOTSTRAP is set for that inner cargo
//! only: this process's environment is inherited by it and by nothing else.
use std::{env, fs, path::Path};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn pinned_toolchain(workspace_root: &Path) -> anyhow::Result<String> {
    let path = workspace_root.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", path.display());
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("no channel in {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let workspace_root = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("migrate-user has no parent directory"))?;
    let toolchain = pinned_toolchain(workspace_root)?;
    let ebpf_dir = workspace_root.join("migrate-ebpf");
    // SAFETY: build scripts are single-threaded; the variables are meant for the child cargo.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    // aya-build turns every line the inner cargo prints into a cargo warning: without this, each
    // fresh build of the library "warns" once per crate the eBPF build compiles. Errors and
    // real warnings of the eBPF crate still come through.
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "migrate-ebpf",
            root_dir: ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
