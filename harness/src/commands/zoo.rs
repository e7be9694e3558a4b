//! `mergeattack zoo build`: the mini zoo of tiny CLIP-like models trained by the tool.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::zoo::{self, config::ZooConfig};

#[derive(Args, Debug)]
pub struct ZooArgs {
    #[command(subcommand)]
    pub action: ZooAction,
}

#[derive(Subcommand, Debug)]
pub enum ZooAction {
    /// Pretrain, build class heads, fine-tune per task (+ second-seed references), evaluate merges.
    Build(BuildArgs),
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The suite (only `mini` is built in).
    #[arg(long, default_value = "mini")]
    pub suite: String,
    /// A TOML file overriding the zoo configuration's keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Comma-separated tasks (default: the config's).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// The CI configuration (3 tasks, few steps); a --config file overrides its keys.
    #[arg(long)]
    pub reduced: bool,
    /// Output directory (default: <cache>/zoo/<key>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Reuse the pretrained encoder of an earlier zoo (its directory); refused unless it was
    /// pretrained with the same settings. The result is the same bytes as pretraining again.
    #[arg(long)]
    pub pretrained_from: Option<PathBuf>,
    /// Cache holding the mini-suite sources (default: the tool's cache root).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

pub fn run(a: ZooArgs) -> Result<()> {
    match a.action {
        ZooAction::Build(b) => build(b),
    }
}

fn build(a: BuildArgs) -> Result<()> {
    if a.suite != "mini" {
        bail!("unknown suite `{}` (the built-in zoo suite is `mini`)", a.suite);
    }
    let base = if a.reduced { ZooConfig::reduced() } else { ZooConfig::default() };
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("read zoo config {}", p.display()))?;
            // Keys in the file override the base configuration.
            let mut merged = toml::Value::try_from(&base)?;
            let user: toml::Value =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("zoo config {}: {}", p.display(), e.message()))?;
            if let (Some(m), Some(u)) = (merged.as_table_mut(), user.as_table()) {
                for (k, v) in u {
                    m.insert(k.clone(), v.clone());
                }
            }
            ZooConfig::from_toml(&toml::to_string(&merged)?, &p.display().to_string()).map_err(anyhow::Error::msg)?
        }
        None => base,
    };
    if let Some(t) = a.tasks {
        cfg.tasks = t.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    let root = crate::setup::cache_root(a.cache_dir.as_deref());
    let out = a.out.unwrap_or_else(|| root.join("zoo").join(zoo::cache_key("mini", &cfg)));
    match zoo::build(&root, &cfg, &out, a.pretrained_from.as_deref())? {
        zoo::Built::Cached(p) => {
            println!("zoo already built (same suite, config and code version): {}", p.display());
            if let Ok(md) = std::fs::read_to_string(p.join("summary.md")) {
                print!("{md}");
            }
        }
        zoo::Built::Trained(p, s) => {
            print!("{}", zoo::eval::markdown(&s));
            println!("\nzoo written to {}", p.display());
        }
    }
    Ok(())
}
