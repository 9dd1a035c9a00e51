//! `tcpmig migrate`, `tcpmig agent` (being written).
use clap::Args;

#[derive(Args)]
pub struct MigrateArgs {}

#[derive(Args)]
pub struct AgentArgs {}

pub fn migrate(_args: MigrateArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpmig migrate is not implemented yet")
}

pub fn agent(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpmig agent is not implemented yet")
}
