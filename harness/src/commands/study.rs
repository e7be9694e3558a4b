//! `mergeattack study [--config F] [--smoke] [--shard i/n] [--threads N] [--store PATH] [--out DIR]`:
//! run the sweep (merges x datasets x attacks x surrogates x eps), store every finished setting,
//! and write the report.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::study::config::{Shard, StudyConfig};
use crate::study::runner::{self, RunOptions};

/// Arguments of `mergeattack study`.
#[derive(Args, Debug)]
pub struct StudyArgs {
    /// Study configuration (TOML; `examples/study.toml` documents every key). Without it, the
    /// built-in default study on the mini zoo.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The built-in smoke study (CI: 2 tasks x 2 methods x 2 attacks on the reduced zoo).
    #[arg(long, conflicts_with = "config")]
    pub smoke: bool,
    /// Run only every n-th setting, starting at i (0-based), e.g. 3/8.
    #[arg(long, value_name = "i/n")]
    pub shard: Option<String>,
    /// Worker threads (overrides the config's `threads`; results do not depend on it).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Results store (default: <out>/results.sqlite). Rerunning with the same store resumes.
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Output directory (default: the config's `output`); the report goes to <out>/report.
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Cache holding the mini-suite data and the zoo (default: the tool's cache root).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Do not write the report at the end.
    #[arg(long)]
    pub no_report: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Run the study and say where the results are.
pub fn run(args: StudyArgs) -> Result<()> {
    let cfg = match (&args.config, args.smoke) {
        (Some(p), _) => StudyConfig::from_file(p)?,
        (None, true) => StudyConfig::smoke(),
        (None, false) => StudyConfig::default_study(),
    };
    let shard = match &args.shard {
        Some(s) => s.parse::<Shard>()?,
        None => Shard::ALL,
    };
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    let opts = RunOptions {
        shard,
        threads: args.threads,
        store: args.store.clone(),
        out: args.out.clone(),
        cache_dir: args.cache_dir.clone(),
        argv: std::env::args().collect(),
        progress: !args.quiet,
        report: !args.no_report,
    };
    if cfg.models.zoo.is_some() {
        // The built-in zoo trains on the mini suite: fetch whatever pinned artifact the cache
        // lacks (SHA-256 verified; a no-op when all are there), so the default study runs from a
        // fresh clone with this one command.
        let root = crate::setup::cache_root(args.cache_dir.as_deref());
        crate::setup::run(&root, &[])?;
    }
    let s = runner::run(&cfg, &opts)?;
    println!(
        "study {}: {} settings in this shard, {} already stored, {} finished now, {} skipped",
        &s.study_hash[..12],
        s.planned,
        s.already_done,
        s.finished,
        s.skipped.len()
    );
    let mut reasons: Vec<(&str, &str)> = s.skipped.iter().map(|(k, r)| (k.method.as_str(), r.as_str())).collect();
    reasons.dedup();
    for (m, r) in reasons {
        println!("  skipped method {m}: {r}");
    }
    let phases: Vec<String> = s.phase_seconds.iter().map(|(p, v)| format!("{p} {v:.1}s")).collect();
    println!("phases: {}; zoo {:.1}s; wall {:.1}s", phases.join(", "), s.zoo_seconds, s.wall_seconds);
    println!("results store: {}", s.store.display());
    if let Some((dir, r)) = &s.report {
        println!("report of {} settings: {}", r.settings, dir.join("report.md").display());
    }
    Ok(())
}
