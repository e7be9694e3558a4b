//! `mergeattack merge`, `mergeattack methods`, `mergeattack demo`.

use clap::Args;

#[derive(Args, Debug)]
pub struct MergeArgs {}

#[derive(Args, Debug)]
pub struct MethodsArgs {}

#[derive(Args, Debug)]
pub struct DemoArgs {}

pub fn run(_args: MergeArgs) -> anyhow::Result<()> {
    anyhow::bail!("merge is not wired yet")
}

pub fn methods(_args: MethodsArgs) -> anyhow::Result<()> {
    for m in mergeattack_core::merge::registry() {
        println!("{:<16} {}", m.name(), m.summary());
    }
    Ok(())
}

pub fn demo(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo is not wired yet")
}
