//! `mergeattack report STORE... -o DIR`: tables, findings and plots from one or more results
//! stores (e.g. the shards of one study).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Arguments of `mergeattack report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Results stores (SQLite files written by `mergeattack study`); read together.
    #[arg(required = true, num_args = 1.., value_name = "STORE")]
    pub stores: Vec<PathBuf>,
    /// Output directory (created if needed; existing report files are replaced).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
}

/// Write the report and say where it is.
pub fn run(args: ReportArgs) -> Result<()> {
    let summary = crate::report::write_report(&args.stores, &args.output)?;
    println!("report of {} settings written to {}", summary.settings, args.output.display());
    for f in &summary.files {
        println!("  {}", f.display());
    }
    Ok(())
}
