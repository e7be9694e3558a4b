//! `mergeattack export`: a merged (or any) CLIP vision checkpoint plus a classification head as a
//! self-contained forward-only ONNX model for deployment (pixels in [0, 1] -> logits, features).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use mergeattack_onnx::export::{ExternalData, export};
use mergeattack_onnx::runtime::{VisionWeights, load_head};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Vision weights: a safetensors file or a directory (HF CLIPModel / CLIPVisionModel names,
    /// with or without the `vision_model.` prefix, or open_clip names).
    #[arg(long, value_name = "WEIGHTS")]
    pub model: PathBuf,
    /// The HF config.json (CLIPModel or CLIPVisionModel); default: config.json beside the weights.
    #[arg(long, value_name = "CONFIG")]
    pub config: Option<PathBuf>,
    /// A checkpoint that supplies tensors the weights file lacks (the pretrained CLIPModel's
    /// `visual_projection.weight` and `logit_scale` for a vision-only fine-tuned file).
    #[arg(long, value_name = "PRETRAINED")]
    pub base: Option<PathBuf>,
    /// Classification heads: one safetensors file with a [classes, projection_dim] tensor per task.
    #[arg(long, value_name = "HEADS")]
    pub head: PathBuf,
    /// Which head of the heads file (needed when it holds several).
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
    /// Where the weights go: embedded (`never` external), an external `<out>.data` file
    /// (`always`), or external only above ~1.5 GB (`auto`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub external_data: String,
    /// The ONNX file to write (atomically).
    #[arg(short, long, value_name = "OUT.onnx")]
    pub output: PathBuf,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let t = std::time::Instant::now();
    let weights = VisionWeights::load(&args.model, args.config.as_deref(), args.base.as_deref())?;
    let (task, head) = load_head(&args.head, args.task.as_deref())?;
    let mode = match args.external_data.as_str() {
        "always" => ExternalData::Always,
        "never" => ExternalData::Never,
        _ => ExternalData::Auto,
    };
    let s = export(&weights, head.view(), &args.output, mode)
        .with_context(|| format!("exporting to {}", args.output.display()))?;
    println!(
        "wrote {} ({} parameters, head `{task}` with {} classes, {:.1} MB{}) in {:.2?}",
        s.model.display(),
        s.parameters,
        s.classes,
        s.bytes as f64 / 1e6,
        s.data.as_ref().map(|d| format!(", weights in {}", d.display())).unwrap_or_default(),
        t.elapsed()
    );
    println!(
        "inputs: pixels [N, {c}, {s}, {s}] f32 in [0, 1] (RGB, CLIP normalisation inside); outputs: logits [N, {}], features [N, {}]",
        s.classes,
        weights.config.projection_dim,
        c = weights.config.num_channels,
        s = weights.config.image_size
    );
    Ok(())
}
