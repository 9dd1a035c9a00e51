//! `tcpmig criu-hook` (being written).
use clap::Args;

#[derive(Args)]
pub struct CriuHookArgs {}

pub fn criu_hook(_args: CriuHookArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpmig criu-hook is not implemented yet")
}

/// Whether this process was started under the hook's name (CRIU runs action scripts with no
/// arguments).
pub fn invoked_as_hook() -> bool {
    false
}

pub fn run_as_hook() -> anyhow::Result<()> {
    anyhow::bail!("tcpmig-criu-hook is not implemented yet")
}
