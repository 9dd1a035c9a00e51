//! `tcpmig dump`, `tcpmig restore` (being written).
use clap::Args;

#[derive(Args)]
pub struct DumpArgs {}

#[derive(Args)]
pub struct RestoreArgs {}

pub fn dump(_args: DumpArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpmig dump is not implemented yet")
}

pub fn restore(_args: RestoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpmig restore is not implemented yet")
}
