//! `mergeattack setup [--cache-dir DIR] [--only NAME...]`: fetch the pinned external artifacts.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::setup::{self, Outcome};

#[derive(Args, Debug)]
pub struct SetupArgs {
    /// Cache directory (default: $MERGEATTACK_CACHE, else $XDG_CACHE_HOME/mergeattack, else ~/.cache/mergeattack).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Fetch only these artifacts (onnxruntime, fashion-mnist, mnist, optdigits, animals, emoji, textures).
    #[arg(long, value_name = "NAME", num_args = 1..)]
    pub only: Vec<String>,
    /// List the pinned artifacts and whether the cache holds them; fetch nothing.
    #[arg(long)]
    pub list: bool,
}

pub fn run(a: SetupArgs) -> anyhow::Result<()> {
    let root = setup::cache_root(a.cache_dir.as_deref());
    let root = std::path::absolute(&root).with_context(|| format!("invalid cache directory {}", root.display()))?;
    if a.list {
        for art in setup::ARTIFACTS {
            let state = match setup::check(&root, art) {
                setup::CacheState::Ready => "ready".to_string(),
                setup::CacheState::Incomplete(bad) => format!("missing {}", bad.join(", ")),
            };
            println!("{:<14} {:<28} {:<60} {state}", art.name, art.version, art.package_file);
        }
        return Ok(());
    }
    let t = Instant::now();
    let reports = setup::run(&root, &a.only)?;
    for r in &reports {
        let what = match r.outcome {
            Outcome::AlreadyPresent => "present",
            Outcome::Fetched => "fetched",
        };
        println!("{:<14} {what} ({:.1} s)", r.name, r.seconds);
    }
    println!("cache {} ready in {:.1} s", root.display(), t.elapsed().as_secs_f64());
    Ok(())
}
