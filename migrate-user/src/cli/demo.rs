//! `tcpmig demo` (being written).
use clap::Args;

#[derive(Args)]
pub struct DemoArgs {}

pub fn demo(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("tcpmig demo is not implemented yet")
}
