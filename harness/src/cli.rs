//! Command-line contract (DESIGN.md). Each subcommand's arguments and code live in
//! `commands/<name>.rs`; this file only dispatches and reports errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;

#[derive(Parser, Debug)]
#[command(
    name = "mergeattack",
    version,
    about = "Merge CLIP ViT checkpoints, craft transfer attacks, measure whether they transfer."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Merge fine-tuned checkpoints into one model (or one per task).
    Merge(commands::merge::MergeArgs),
    /// Export a CLIP vision checkpoint + head as a forward-only ONNX model (pixels -> logits, features).
    Export(commands::export::ExportArgs),
    /// List the merging methods with their parameters and defaults.
    Methods(commands::merge::MethodsArgs),
    /// Merge generated CLIP-shaped checkpoints end to end (the built-in demo).
    Demo(commands::merge::DemoArgs),
    /// List the transfer attacks with their presets and defaults.
    Attacks(commands::attack::AttacksArgs),
    /// Craft adversarial images on a surrogate CLIP model and measure them on it and other checkpoints.
    Attack(Box<commands::attack::AttackArgs>),
    /// Fetch the pinned external artifacts (ONNX Runtime, mini-suite data) into the cache.
    Setup(commands::setup::SetupArgs),
    /// List the mini-suite tasks, or describe a data set and draw a contact sheet.
    Data(commands::data::DataArgs),
    /// Tables, findings and plots (Markdown, CSV, JSON, SVG) from one or more results stores.
    Report(commands::report::ReportArgs),
    /// Build the mini zoo of tiny CLIP-like models trained by the tool.
    Zoo(commands::zoo::ZooArgs),
    /// Run a study: merges x datasets x attacks, every metric with intervals, resumable, then the report.
    Study(commands::study::StudyArgs),
}

/// Parse arguments, run, and map errors to exit code 2 with one sentence.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Merge(a) => commands::merge::run(a),
        Command::Export(a) => commands::export::run(a),
        Command::Methods(a) => commands::merge::methods(a),
        Command::Demo(a) => commands::merge::demo(a),
        Command::Attacks(a) => commands::attack::attacks(a),
        Command::Attack(a) => commands::attack::attack(*a),
        Command::Setup(a) => commands::setup::run(a),
        Command::Data(a) => commands::data::run(a),
        Command::Report(a) => commands::report::run(a),
        Command::Zoo(a) => commands::zoo::run(a),
        Command::Study(a) => commands::study::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_sentence(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line.
pub fn one_sentence(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
