//! `mergeattack attacks`: the transfer attacks, their presets and defaults; `mergeattack attack`:
//! craft adversarial images on a surrogate CLIP model through ONNX Runtime, evaluate them on it
//! and on other checkpoints with the same head (METHODS.md "Attacks" and "Metrics").

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use mergeattack_core::attack::{self, AttackConfig, PARAMS, Preset, STUDY_DEFAULT};
use mergeattack_core::classifier::Classifier;
use mergeattack_core::metrics::{self, Outcomes};
use mergeattack_core::rng::stream;
use mergeattack_onnx::runtime::{Device, Model, RuntimeOptions, VisionWeights, load_head, vision_config_for};
use ndarray::{Array4, ArrayView2};
use rand::RngExt;

use crate::data::{self, DataSpec, OpenOptions, Preprocess};

#[derive(Args, Debug)]
pub struct AttacksArgs {
    /// Show only this preset's defaults (torchattacks or transferattack).
    #[arg(long)]
    pub preset: Option<String>,
    /// Also explain every hyper-parameter key (for `--set key=value`).
    #[arg(long)]
    pub params: bool,
}

/// The listing as text.
pub fn listing(preset: Option<Preset>, params: bool) -> String {
    let presets: Vec<Preset> = match preset {
        Some(p) => vec![p],
        None => Preset::ALL.to_vec(),
    };
    let mut out = String::new();
    for a in attack::registry() {
        let _ = writeln!(out, "{:<12} {}", a.name(), a.summary());
        if !a.aliases().is_empty() {
            let _ = writeln!(out, "{:<12}   aliases: {}", "", a.aliases().join(", "));
        }
        for p in &presets {
            let cfg = AttackConfig::for_attack(*a, *p);
            let default = if *p == Preset::TorchAttacks { " (default)" } else { "" };
            let _ = writeln!(out, "{:<12}   {}{}: {}", "", p.name(), default, cfg.describe());
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "study default: {}", STUDY_DEFAULT.join(", "));
    let _ = writeln!(
        out,
        "ensemble surrogate: several models as one (logit averaging, TransferAttack's default; or loss averaging)"
    );
    let _ = writeln!(out, "x_adv is quantised to 8 bits by floor(x * 255) / 255 unless quantize=round|none");
    if params {
        let _ = writeln!(out);
        let _ = writeln!(out, "parameters (fractions such as 8/255 accepted):");
        for p in PARAMS {
            let _ = writeln!(out, "  {:<14} {}", p.name, p.help);
        }
    }
    out
}

pub fn attacks(args: AttacksArgs) -> anyhow::Result<()> {
    let preset = args.preset.as_deref().map(Preset::parse).transpose().map_err(|e| anyhow::anyhow!("{e}"))?;
    print!("{}", listing(preset, args.params));
    Ok(())
}

// ---- `mergeattack attack` ----

/// Crafts adversarial images on a surrogate CLIP model and measures them on it and on other
/// checkpoints.
#[derive(Args, Debug)]
#[command(after_help = ATTACK_HELP)]
pub struct AttackArgs {
    /// The surrogate: CLIP vision weights (a safetensors file or a directory; HF CLIPModel /
    /// CLIPVisionModel names, with or without the `vision_model.` prefix, or open_clip names).
    #[arg(long, value_name = "WEIGHTS")]
    pub model: PathBuf,
    /// The HF config.json; default: config.json beside the weights (also used for an --eval
    /// checkpoint that has none beside it).
    #[arg(long, value_name = "CONFIG")]
    pub config: Option<PathBuf>,
    /// A checkpoint that supplies tensors a weights file lacks (the pretrained CLIPModel's
    /// `visual_projection.weight` and `logit_scale` for vision-only fine-tunes); used for every model.
    #[arg(long, value_name = "PRETRAINED")]
    pub base: Option<PathBuf>,
    /// Classification heads: a safetensors file with one [classes, projection_dim] tensor per task,
    /// optionally `:TASK` to pick one. Default: the `heads.safetensors` in the model's folder or
    /// one or two folders above it (the zoo layout). The task defaults to the `mini:` data spec's
    /// task, else the file's only head.
    #[arg(long, value_name = "FILE[:TASK]")]
    pub head: Option<String>,
    /// The attack: a name or alias from `mergeattack attacks`.
    #[arg(long, value_name = "NAME")]
    pub attack: String,
    /// Where the defaults come from: torchattacks or transferattack.
    #[arg(long, default_value = "torchattacks")]
    pub preset: String,
    /// Perturbation budget (fractions such as 8/255 accepted).
    #[arg(long)]
    pub eps: Option<String>,
    /// Step size (fractions accepted).
    #[arg(long)]
    pub alpha: Option<String>,
    /// Iterations.
    #[arg(long)]
    pub steps: Option<String>,
    /// Any other hyper-parameter (`mergeattack attacks --params` lists the keys); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// 8-bit quantisation of the adversarial images: floor (the default), round or none.
    #[arg(long)]
    pub quantize: Option<String>,
    /// Targeted attack: each image toward a class drawn uniformly among the others (seeded), or
    /// toward --target-class.
    #[arg(long)]
    pub targeted: bool,
    /// Targeted attack toward this class for every image (implies --targeted).
    #[arg(long, value_name = "CLASS")]
    pub target_class: Option<usize>,
    /// Images: mini:TASK[:SPLIT], idx:IMAGES[,LABELS], folder:PATH, parquet:PATH, npy:IMAGES,LABELS.
    #[arg(long, value_name = "SPEC")]
    pub data: String,
    /// Attack N images spread evenly over the data set (image floor(i * len / N) for i < N), so a
    /// class-sorted split keeps every class.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Images per attack batch (and per ONNX Runtime run).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// How images reach the model's size: auto (CLIP resize + centre crop when their size differs),
    /// clip, resize (plain bicubic), or none (refuse images of another size).
    #[arg(long, default_value = "auto", value_parser = ["auto", "clip", "resize", "none"])]
    pub preprocess: String,
    /// Seed of every random draw (start points, DI, VMI neighbours, random targets).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ONNX Runtime intra-op threads (results do not depend on it).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// More checkpoints to evaluate the adversarial images on, each with the same head.
    #[arg(long, value_name = "TARGET", num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// Write the adversarial images: `adv.npy` (NCHW f32, plus `adv.labels.npy`), or a directory
    /// (a name without extension, ending in `/`, or existing) with adv.npy, labels.npy and one PNG
    /// per image.
    #[arg(short, long, value_name = "adv.npy|DIR/")]
    pub output: Option<PathBuf>,
    /// Cache holding the mini-suite sources (default: the tool's cache root).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

const ATTACK_HELP: &str = "\
The table: per model (the surrogate first, then each --eval) on the attacked images:
  acc      clean top-1 accuracy
  asr_all  share of all images misclassified after the attack
  asr_cc   the same over the images the model classifies correctly when clean (n/a if none)
  hit      (targeted attacks) share of adversarial images classified as their target class
Adversarial images are quantised (floor(x*255)/255 by default) before any model sees them.
Same inputs and --seed: the same bytes, whatever --threads.

Output names: -o adv.npy writes adv.npy [N,3,S,S] f32 and adv.labels.npy [N] int64;
-o out/ writes out/adv.npy, out/labels.npy and out/<index>_label<y>.png (index in the data set).

Examples:
  mergeattack attack --model zoo/finetuned/digits --attack pgd --data mini:digits --limit 64 \\
      --eval zoo/finetuned/fashion-coarse zoo/pretrained -o adv/
  mergeattack attack --model vit-b32-mnist --head heads.safetensors:mnist --attack mi-fgsm \\
      --eps 16/255 --set mu=1 --data parquet:mnist/test.parquet --eval merged.safetensors";

/// One model of the table: where it came from and its top-1 predictions.
struct Row {
    name: String,
    role: &'static str,
    clean: Vec<usize>,
    adv: Vec<usize>,
}

fn argmax_rows(logits: &ndarray::Array2<f32>) -> Vec<usize> {
    logits
        .rows()
        .into_iter()
        .map(|r| {
            let mut best = 0;
            for (j, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = j;
                }
            }
            best
        })
        .collect()
}

/// The heads file and task a run uses.
fn resolve_head(args: &AttackArgs, spec: &DataSpec) -> anyhow::Result<(PathBuf, Option<String>)> {
    let mini_task = match spec {
        DataSpec::Mini { task, .. } => Some(task.clone()),
        _ => None,
    };
    if let Some(h) = &args.head {
        let p = PathBuf::from(h);
        if p.is_file() {
            return Ok((p, mini_task));
        }
        if let Some((file, task)) = h.rsplit_once(':')
            && !task.is_empty()
            && !task.contains('/')
        {
            let fp = PathBuf::from(file);
            anyhow::ensure!(fp.is_file(), "heads file {file} does not exist");
            return Ok((fp, Some(task.to_string())));
        }
        anyhow::bail!("heads file {h} does not exist");
    }
    let start = if args.model.is_dir() {
        args.model.clone()
    } else {
        args.model.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mut dir = Some(start.as_path());
    for _ in 0..3 {
        let Some(d) = dir else { break };
        let cand = d.join("heads.safetensors");
        if cand.is_file() {
            return Ok((cand, mini_task));
        }
        dir = d.parent();
    }
    anyhow::bail!(
        "no heads.safetensors in the folder of {} or the two above it: give --head FILE[:TASK]",
        args.model.display()
    )
}

/// Where the adversarial images go while they are written, and their final place.
enum Output {
    File { adv: PathBuf, labels: PathBuf, tmp_adv: tempfile::NamedTempFile, tmp_labels: tempfile::NamedTempFile },
    Dir { dest: PathBuf, stage: tempfile::TempDir },
}

/// A stream of adversarial images into the staged `.npy` (+ PNGs), renamed into place by
/// [`Writer::finish`]; dropped unfinished, it leaves nothing behind.
struct Writer {
    out: Output,
    npy: std::io::BufWriter<std::fs::File>,
    labels: Vec<i64>,
}

fn npy_parent(p: &Path) -> &Path {
    p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

impl Writer {
    /// Check the destination and stage the files (before any work, so a bad -o fails at once).
    fn create(path: &Path, shape: [usize; 4]) -> anyhow::Result<Writer> {
        let text = path.to_string_lossy();
        let is_dir = text.ends_with('/')
            || text.ends_with(std::path::MAIN_SEPARATOR)
            || path.is_dir()
            || path.extension().is_none();
        let parent = npy_parent(path);
        anyhow::ensure!(parent.is_dir(), "output folder {} does not exist", parent.display());
        let header = data::npy::to_bytes("<f4", &shape, &[]);
        if is_dir {
            let dest = PathBuf::from(text.trim_end_matches(['/', std::path::MAIN_SEPARATOR]));
            if dest.is_dir() {
                let mut entries =
                    std::fs::read_dir(&dest).with_context(|| format!("cannot read {}", dest.display()))?;
                if entries.next().is_some() && !dest.join("adv.npy").is_file() {
                    anyhow::bail!(
                        "output directory {} exists and is not an earlier attack output (no adv.npy): choose another -o",
                        dest.display()
                    );
                }
            } else if dest.exists() {
                anyhow::bail!("output {} exists and is not a directory", dest.display());
            }
            let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adv".into());
            let stage = tempfile::Builder::new()
                .prefix(&format!(".{name}.partial-"))
                .tempdir_in(npy_parent(&dest))
                .with_context(|| format!("cannot create a staging folder beside {}", dest.display()))?;
            let f = std::fs::File::create(stage.path().join("adv.npy"))
                .with_context(|| format!("cannot write in {}", stage.path().display()))?;
            let mut npy = std::io::BufWriter::new(f);
            npy.write_all(&header)?;
            Ok(Writer { out: Output::Dir { dest, stage }, npy, labels: Vec::new() })
        } else {
            anyhow::ensure!(
                path.extension().is_some_and(|e| e == "npy"),
                "-o {}: expected a .npy file or a directory (a name without extension, or ending in /)",
                path.display()
            );
            anyhow::ensure!(!path.is_dir(), "-o {} is a directory", path.display());
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let labels = path.with_file_name(format!("{stem}.labels.npy"));
            let tmp = || {
                tempfile::NamedTempFile::new_in(parent)
                    .with_context(|| format!("cannot create a temporary file in {}", parent.display()))
            };
            let (tmp_adv, tmp_labels) = (tmp()?, tmp()?);
            let mut npy = std::io::BufWriter::new(tmp_adv.reopen()?);
            npy.write_all(&header)?;
            Ok(Writer {
                out: Output::File { adv: path.to_path_buf(), labels, tmp_adv, tmp_labels },
                npy,
                labels: Vec::new(),
            })
        }
    }

    /// Append a batch: its pixels to the .npy, its labels, and in directory mode one PNG per image
    /// named with its index in the data set and its label.
    fn push(&mut self, adv: &Array4<f32>, labels: &[usize], index: &[usize], width: usize) -> anyhow::Result<()> {
        let std = adv.as_standard_layout();
        for v in std.iter() {
            self.npy.write_all(&v.to_le_bytes())?;
        }
        self.labels.extend(labels.iter().map(|&l| l as i64));
        if let Output::Dir { stage, .. } = &self.out {
            let (_, _, h, w) = adv.dim();
            for (j, &y) in labels.iter().enumerate() {
                let mut px = Vec::with_capacity(h * w * 3);
                for yy in 0..h {
                    for xx in 0..w {
                        for k in 0..3 {
                            px.push((adv[[j, k, yy, xx]].clamp(0.0, 1.0) * 255.0).round() as u8);
                        }
                    }
                }
                let name = format!("{:0width$}_label{y}.png", index[j]);
                image::save_buffer_with_format(
                    stage.path().join(&name),
                    &px,
                    w as u32,
                    h as u32,
                    image::ExtendedColorType::Rgb8,
                    image::ImageFormat::Png,
                )
                .with_context(|| format!("cannot write {name}"))?;
            }
        }
        Ok(())
    }

    /// Complete the files and move them into place; returns what was written.
    fn finish(self) -> anyhow::Result<String> {
        let Writer { out, npy, labels } = self;
        npy.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        let label_npy = data::npy::to_bytes("<i8", &[labels.len()], &label_bytes);
        match out {
            Output::File { adv, labels: lpath, tmp_adv, mut tmp_labels } => {
                tmp_labels.write_all(&label_npy)?;
                tmp_labels.as_file().sync_all()?;
                tmp_labels
                    .persist(&lpath)
                    .map_err(|e| e.error)
                    .with_context(|| format!("cannot write {}", lpath.display()))?;
                tmp_adv
                    .persist(&adv)
                    .map_err(|e| e.error)
                    .with_context(|| format!("cannot write {}", adv.display()))?;
                Ok(format!("{} and {}", adv.display(), lpath.display()))
            }
            Output::Dir { dest, stage } => {
                std::fs::write(stage.path().join("labels.npy"), &label_npy)?;
                let staged = stage.keep();
                if dest.exists() {
                    // An earlier output (checked at creation): move it aside, move the new one in,
                    // then delete the old one.
                    let old = tempfile::Builder::new().prefix(".old-attack-").tempdir_in(npy_parent(&dest))?.keep();
                    std::fs::remove_dir(&old)?;
                    std::fs::rename(&dest, &old).with_context(|| format!("cannot replace {}", dest.display()))?;
                    if let Err(e) = std::fs::rename(&staged, &dest) {
                        let _ = std::fs::rename(&old, &dest);
                        let _ = std::fs::remove_dir_all(&staged);
                        return Err(e).with_context(|| format!("cannot write {}", dest.display()));
                    }
                    std::fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
                } else if let Err(e) = std::fs::rename(&staged, &dest) {
                    let _ = std::fs::remove_dir_all(&staged);
                    return Err(e).with_context(|| format!("cannot write {}", dest.display()));
                }
                Ok(format!("{}/ (adv.npy, labels.npy, {} PNGs)", dest.display(), labels.len()))
            }
        }
    }
}

/// Load a vision checkpoint with `head`. `config`: the config.json to use (None: the one beside
/// the weights).
fn load_model(
    weights: &Path,
    config: Option<&Path>,
    base: Option<&Path>,
    head: ArrayView2<'_, f32>,
    opts: &RuntimeOptions,
) -> anyhow::Result<Model> {
    anyhow::ensure!(weights.exists(), "model {} does not exist", weights.display());
    if let Some(b) = base {
        anyhow::ensure!(b.exists(), "--base {} does not exist", b.display());
    }
    let v = VisionWeights::load(weights, config, base)?;
    Model::from_params(v.config, &v.params, head, opts.clone(), &v.source)
        .map_err(|e| anyhow::anyhow!("model {}: {e}", v.source))
}

/// The config for an --eval checkpoint: the one beside it, else --config.
fn target_config<'a>(weights: &Path, config: Option<&'a Path>) -> Option<&'a Path> {
    if vision_config_for(weights, None).is_ok() { None } else { config }
}

fn fmt_metric(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.4}"),
        None => "n/a".into(),
    }
}

pub fn attack(args: AttackArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    // 1. The attack and its hyper-parameters: refused before anything is loaded.
    let preset = Preset::parse(&args.preset).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = AttackConfig::preset(&args.attack, preset).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (k, v) in [("eps", &args.eps), ("alpha", &args.alpha), ("steps", &args.steps), ("quantize", &args.quantize)] {
        if let Some(v) = v {
            cfg.set(k, v).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    for pair in &args.set {
        let (k, v) = pair.split_once('=').ok_or_else(|| anyhow::anyhow!("--set `{pair}` is not KEY=VALUE"))?;
        cfg.set(k.trim(), v.trim()).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(args.limit != Some(0), "--limit must be at least 1");
    let device: Device = args.device.parse()?;
    let opts = RuntimeOptions { device, threads: args.threads, batch_size: args.batch_size };
    anyhow::ensure!(args.threads >= 1, "--threads must be at least 1");

    // 2. Head, models, data.
    let spec: DataSpec = args.data.parse()?;
    anyhow::ensure!(args.model.exists(), "model {} does not exist", args.model.display());
    let (head_file, task) = resolve_head(&args, &spec)?;
    let (head_name, head) = load_head(&head_file, task.as_deref())
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace("with --task", "with --head FILE:TASK")))?;
    let classes = head.nrows();
    let mut surrogate = load_model(&args.model, args.config.as_deref(), args.base.as_deref(), head.view(), &opts)?;
    let (_, size, _) = surrogate.image_shape();
    let mut targets = Vec::new();
    for t in &args.eval {
        let m = load_model(t, target_config(t, args.config.as_deref()), args.base.as_deref(), head.view(), &opts)?;
        let (_, ts, _) = m.image_shape();
        anyhow::ensure!(
            ts == size,
            "--eval {} takes {ts}x{ts} images but the surrogate {} takes {size}x{size}",
            t.display(),
            args.model.display()
        );
        targets.push(m);
    }
    let dopts = OpenOptions { cache_dir: args.cache_dir.clone(), strict: false, classes: None };
    let data_set = data::open(&spec, &dopts)?;
    // Numbered classes (npy, idx) only need their labels below the head's class count; named
    // classes (mini, folder, parquet with names) must match it.
    let numbered = data_set.class_names() == data::Dataset::numbered_classes(data_set.num_classes()).as_slice();
    anyhow::ensure!(
        data_set.num_classes() == classes || (numbered && data_set.num_classes() < classes),
        "data {} has {} classes but head `{head_name}` in {} has {classes}",
        data_set.name,
        data_set.num_classes(),
        head_file.display()
    );
    let pre = match args.preprocess.as_str() {
        "clip" => Preprocess::Clip(size),
        "resize" => Preprocess::Resize(size),
        "none" => Preprocess::Native,
        _ if data_set.output_size() == Some((size, size)) => Preprocess::Native,
        _ => Preprocess::Clip(size),
    };
    if let (Preprocess::Native, Some((w, h))) = (pre, data_set.output_size()) {
        anyhow::ensure!(
            (w, h) == (size, size),
            "data {} has {w}x{h} images but model {} takes {size}x{size} (drop --preprocess none to resize them)",
            data_set.name,
            args.model.display()
        );
    }
    anyhow::ensure!(!data_set.is_empty(), "data {} holds no images", data_set.name);
    // The images attacked and their indices in the data set.
    let (data_set, index) = match args.limit {
        Some(l) if l < data_set.len() => {
            let len = data_set.len();
            let index: Vec<usize> = (0..l).map(|i| i * len / l).collect();
            (data_set.subset(data_set.name.clone(), &index), index)
        }
        _ => {
            let len = data_set.len();
            (data_set, (0..len).collect())
        }
    };
    let data_set = data_set.with_preprocess(pre);
    let n = data_set.len();
    if let Some(k) = args.target_class {
        anyhow::ensure!(k < classes, "--target-class {k} is out of range: head `{head_name}` has {classes} classes");
    }
    let targeted = args.targeted || args.target_class.is_some();
    let target_labels: Option<Vec<usize>> = targeted.then(|| match args.target_class {
        Some(k) => vec![k; n],
        None => {
            // Uniform among the other classes, one draw per image in data order.
            let mut rng = stream(args.seed, &[b"attack-target"]);
            data_set
                .labels()
                .iter()
                .map(|&y| {
                    if classes < 2 {
                        return y as usize;
                    }
                    let r = rng.random_range(0..classes - 1);
                    if r >= y as usize { r + 1 } else { r }
                })
                .collect()
        }
    });
    let mut writer = match &args.output {
        Some(o) => Some(Writer::create(o, [n, 3, size, size])?),
        None => None,
    };
    tracing::info!("loaded models and data in {:.2?}", t0.elapsed());

    // 3. Craft batch by batch on the surrogate; every model sees the quantised images.
    let mut rows: Vec<Row> = std::iter::once((args.model.display().to_string(), "surrogate"))
        .chain(args.eval.iter().map(|p| (p.display().to_string(), "target")))
        .map(|(name, role)| Row { name, role, clean: Vec::new(), adv: Vec::new() })
        .collect();
    let mut labels_all = Vec::with_capacity(n);
    let batches = n.div_ceil(args.batch_size);
    let pb = indicatif::ProgressBar::new(batches as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} batches {elapsed_precise} ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(cfg.attack().name());
    let width = index.last().map_or(1, |i| i.to_string().len()).max(5);
    let attack_name = cfg.attack().name();
    let t_attack = std::time::Instant::now();
    for start in (0..n).step_by(args.batch_size) {
        let end = (start + args.batch_size).min(n);
        let batch = data_set.batch(start..end)?;
        let (_, c, h, w) = batch.images.dim();
        anyhow::ensure!(
            (c, h, w) == (3, size, size),
            "data {} has {w}x{h} images but model {} takes {size}x{size} (drop --preprocess none to resize them)",
            data_set.name,
            args.model.display()
        );
        let mut rng = stream(args.seed, &[b"attack", attack_name.as_bytes(), &(start as u64).to_le_bytes()]);
        let tgt = target_labels.as_ref().map(|t| &t[start..end]);
        let adv = cfg
            .run(&mut surrogate, batch.images.view(), &batch.labels, tgt, &mut rng)
            .map_err(|e| anyhow::anyhow!("attacking images {start}..{end} of {}: {e}", data_set.name))?;
        let models = std::iter::once(&mut surrogate).chain(targets.iter_mut());
        for (row, m) in rows.iter_mut().zip(models) {
            let clean = m.logits(batch.images.view()).map_err(|e| anyhow::anyhow!("{}: {e}", row.name))?;
            let adv_logits = m.logits(adv.view()).map_err(|e| anyhow::anyhow!("{}: {e}", row.name))?;
            row.clean.extend(argmax_rows(&clean));
            row.adv.extend(argmax_rows(&adv_logits));
        }
        if let Some(wr) = writer.as_mut() {
            wr.push(&adv, &batch.labels, &index[start..end], width)?;
        }
        labels_all.extend(batch.labels.iter().copied());
        pb.inc(1);
    }
    pb.finish_and_clear();
    let attack_time = t_attack.elapsed();

    // 4. The table.
    println!(
        "attack {} [{}] {} on {} images of {} (head `{head_name}` from {}, {classes} classes){}",
        attack_name,
        cfg.preset_used().name(),
        cfg.describe(),
        n,
        data_set.name,
        head_file.display(),
        match (&target_labels, args.target_class) {
            (Some(_), Some(k)) => format!(", targeted toward class {k}"),
            (Some(_), None) => ", targeted toward random other classes".into(),
            _ => String::new(),
        }
    );
    println!();
    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    let hit_head = if targeted { " hit    |" } else { "" };
    println!("| {:<name_w$} | role      | images | acc    | asr_all | asr_cc |{hit_head}", "model");
    println!(
        "|{}|-----------|--------|--------|---------|--------|{}",
        "-".repeat(name_w + 2),
        if targeted { "--------|" } else { "" }
    );
    for row in &rows {
        let o = Outcomes::new(&labels_all, &row.clean, &row.adv).map_err(|e| anyhow::anyhow!("{e}"))?;
        let hit = match &target_labels {
            Some(t) => {
                let hits = row.adv.iter().zip(t).filter(|(a, t)| a == t).count();
                format!(" {:<6} |", fmt_metric(Some(hits as f64 / n as f64)))
            }
            None => String::new(),
        };
        println!(
            "| {:<name_w$} | {:<9} | {:>6} | {:<6} | {:<7} | {:<6} |{hit}",
            row.name,
            row.role,
            n,
            fmt_metric(metrics::acc(&o)),
            fmt_metric(metrics::asr_all(&o)),
            fmt_metric(metrics::asr_cc(&o)),
        );
    }
    println!();
    println!("crafted and evaluated in {:.2?} ({:.3} s per image)", attack_time, attack_time.as_secs_f64() / n as f64);
    if let Some(wr) = writer {
        let what = wr.finish()?;
        println!("wrote {what}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_attack_with_both_presets() {
        let text = listing(None, true);
        for a in attack::registry() {
            assert!(text.lines().any(|l| l.starts_with(a.name())), "{} missing", a.name());
        }
        assert!(text.contains("torchattacks (default): eps=8/255 alpha=2/255 steps=10 mu=1 quantize=floor"));
        assert!(
            text.contains(
                "transferattack: eps=16/255 alpha=1.6/255 steps=10 mu=1 neighbours=20 beta=1.5 quantize=floor"
            )
        );
        assert!(text.contains("  beta "));
        let one = listing(Some(Preset::TransferAttack), false);
        assert!(!one.contains("torchattacks (default)"));
        assert!(!one.contains("parameters"));
    }

    #[test]
    fn bad_preset_is_one_sentence() {
        let e = attacks(AttacksArgs { preset: Some("foolbox".into()), params: false }).unwrap_err();
        assert_eq!(e.to_string(), "attack parameter `preset` = `foolbox` is not one of: torchattacks, transferattack");
    }
}
