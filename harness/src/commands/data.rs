//! `mergeattack data list` and `mergeattack data show SPEC [--png OUT.png]`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::data::{self, OpenOptions, mini};

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// List the mini-suite tasks with their split sizes and classes.
    List(ListArgs),
    /// Describe a data set (size, classes, label counts) and optionally write a contact sheet.
    Show(ShowArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Cache holding the mini-suite sources (default: the tool's cache root).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Data spec: mini:TASK[:SPLIT], idx:IMAGES[,LABELS], folder:PATH, parquet:PATH, npy:IMAGES,LABELS.
    pub spec: String,
    /// Write a contact sheet of the first images to this PNG.
    #[arg(long, value_name = "OUT.png")]
    pub png: Option<PathBuf>,
    /// Number of images on the contact sheet.
    #[arg(long, default_value_t = 64)]
    pub count: usize,
    /// Resize images to SIZE x SIZE; with --clip, CLIP preprocessing (shorter side + centre crop).
    #[arg(long, value_name = "SIZE")]
    pub size: Option<usize>,
    /// Use CLIP preprocessing with --size.
    #[arg(long, requires = "size")]
    pub clip: bool,
    /// Number of classes (labels must be below it).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Refuse unreadable image files instead of skipping them.
    #[arg(long)]
    pub strict: bool,
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

pub fn run(a: DataArgs) -> anyhow::Result<()> {
    match a.command {
        DataCommand::List(l) => list(l),
        DataCommand::Show(s) => show(s),
    }
}

fn list(a: ListArgs) -> anyhow::Result<()> {
    let root = crate::setup::cache_root(a.cache_dir.as_deref());
    println!("{:<15} {:>6} {:>5} {:>5} {:>7} {:>8}  classes", "task", "train", "val", "test", "classes", "load s");
    for t in mini::TASKS {
        let start = Instant::now();
        match mini::load(&root, t.name) {
            Ok(task) => {
                println!(
                    "{:<15} {:>6} {:>5} {:>5} {:>7} {:>8.2}  {}",
                    t.name,
                    task.train.len(),
                    task.val.len(),
                    task.test.len(),
                    task.test.num_classes(),
                    start.elapsed().as_secs_f64(),
                    task.test.class_names().join(", ")
                );
            }
            Err(e) => println!("{:<15} not available: {e}", t.name),
        }
    }
    Ok(())
}

fn show(a: ShowArgs) -> anyhow::Result<()> {
    let opts = OpenOptions { cache_dir: a.cache_dir.clone(), strict: a.strict, classes: a.classes };
    let start = Instant::now();
    let mut d = data::spec::open_str(&a.spec, &opts)?;
    if let Some(s) = a.size {
        anyhow::ensure!(s > 0, "--size must be positive");
        d = d.with_preprocess(if a.clip { data::Preprocess::Clip(s) } else { data::Preprocess::Resize(s) });
    }
    println!(
        "{}: {} images, {} classes (opened in {:.2} s)",
        d.name,
        d.len(),
        d.num_classes(),
        start.elapsed().as_secs_f64()
    );
    for (name, count) in d.class_names().iter().zip(d.class_counts()) {
        println!("  {count:>6}  {name}");
    }
    if let Some(out) = a.png {
        let n = a.count.min(d.len());
        anyhow::ensure!(n > 0, "{}: no images to show", d.name);
        let b = d.batch(0..n)?;
        data::sheet::write_png(&out, &b.images, (n as f64).sqrt().ceil() as usize)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("wrote {} ({} images, {}x{})", out.display(), n, b.images.dim().3, b.images.dim().2);
    }
    Ok(())
}
