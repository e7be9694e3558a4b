//! `mergeattack merge`, `mergeattack methods`, `mergeattack demo`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use mergeattack_core::merge::{
    self, COMMON_PARAMS, MergeError, MergeInput, MergeMethod, MergeOutput, Params, lookup, validate_params,
};
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::weights::{self, Checkpoint, Convention, OutDtype, Pending, WeightsError, Writer};

use mergeattack_core::rng;
use mergeattack_onnx::runtime::{Device, RuntimeError, RuntimeOptions, load_head, load_hf_params, vision_config_for};
use ndarray::Array4;
use rand::RngExt;

use crate::data::mini::Split;
use crate::data::{self, DataError, DataSpec, OpenOptions, Preprocess};
use crate::mergeconfig::{ConfigError, MergeSpec};
use crate::synth::{self, SynthConfig};

/// Merge fine-tuned checkpoints that share one pretrained base.
///
/// Tensors merged by default: the vision encoder (HF `vision_model.*`, or the same names without
/// the prefix; open_clip `visual.*` except `visual.proj`); every other tensor is copied from the
/// base (`--set tensors=all` merges every float tensor). Non-float tensors (`position_ids`) are
/// carried through from the base.
///
/// Per-task methods (`emr`, `tall-masks`) write one file per task next to OUT: for
/// `-o out/merged.safetensors` they are `out/merged.task0.safetensors`, `out/merged.task1.safetensors`,
/// ... in the order of `--models`.
#[derive(Args, Debug)]
#[command(
    after_help = "Per-task methods (emr, tall-masks) write one file per fine-tuned model t next to OUT:\n  -o out/merged.safetensors gives out/merged.task0.safetensors, out/merged.task1.safetensors, ...\nBy default only the vision encoder is merged; other tensors are copied from the base (--set tensors=all merges all).\n\nExamples:\n  mergeattack merge --method ties --base pre.safetensors --models a.safetensors b.safetensors --set k=0.2 -o ties.safetensors\n  mergeattack merge --config merge.yaml -o merged.safetensors\n\nYAML (mergekit style; paths relative to the file):\n  merge_method: task_arithmetic\n  base_model: pre.safetensors\n  models:\n    - model: a.safetensors\n      parameters: {weight: 1.0}\n    - model: b.safetensors\n  parameters: {lambda: 0.3}"
)]
pub struct MergeArgs {
    /// Merge method (see `mergeattack methods`); aliases such as `task_arithmetic` work.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub method: Option<String>,
    /// The pretrained checkpoint (theta0), safetensors.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub base: Option<PathBuf>,
    /// The fine-tuned checkpoints, one per task, in task order.
    #[arg(long, num_args = 1.., conflicts_with = "config")]
    pub models: Vec<PathBuf>,
    /// Method parameter `key=value` (repeatable); fractions such as `1/5` are accepted.
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "config")]
    pub set: Vec<String>,
    /// Per-model weights, one per `--models` entry (normalised to sum 1 by the methods that use them).
    #[arg(long, num_args = 1.., conflicts_with = "config")]
    pub weights: Vec<String>,
    /// A mergekit-style YAML config instead of the flags above.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output dtype: input (each tensor as stored in the base), f32, f16 or bf16 [default: f32,
    /// or the config's `dtype`].
    #[arg(long)]
    pub dtype: Option<OutDtype>,
    /// Output safetensors file.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub data: DataMergeArgs,
}

/// What the data-dependent methods (`fisher`, `regmean`, `adamerging`, any `+surgery`) need
/// besides the checkpoints.
#[derive(Args, Debug, Clone, Default)]
pub struct DataMergeArgs {
    /// Images per task, one data spec per `--models` entry in the same order (see `mergeattack data
    /// list`): `mini:TASK` takes the train split for fisher/regmean and the test split for
    /// adamerging/+surgery; `mini:TASK:SPLIT` and other kinds are used as given (labels unused).
    #[arg(long, num_args = 1.., value_name = "SPEC")]
    pub data: Vec<String>,
    /// The task heads (`[classes, projection_dim]` per task; the zoo's heads.safetensors).
    #[arg(long)]
    pub heads: Option<PathBuf>,
    /// Head names, one per `--models` entry [default: the tasks of `mini:` specs].
    #[arg(long, num_args = 1..)]
    pub tasks: Vec<String>,
    /// The vision config.json [default: config.json beside --base].
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Images loaded per task and split: a seeded subset, in data-set order.
    #[arg(long, default_value_t = 1000)]
    pub images: usize,
    /// Threads: intra-op threads of the model runs; tensors merged in parallel (one job per
    /// tensor; ties, task-arithmetic and dare also split their global passes); results do not
    /// depend on it.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Images per model run.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Cache holding the mini-suite sources (default: the tool's cache root).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct MethodsArgs {}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for the generated checkpoints and the merged models.
    #[arg(long, default_value = "mergeattack-demo")]
    pub out: PathBuf,
    /// Seed of the generated checkpoints.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Why a merge could not run. Each message is one sentence naming the culprit.
#[derive(Debug, thiserror::Error)]
pub enum MergeCmdError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Merge(MergeError),
    #[error("{0}")]
    Usage(String),
}

impl From<MergeError> for MergeCmdError {
    fn from(e: MergeError) -> Self {
        MergeCmdError::Merge(e)
    }
}

/// What a merge did.
#[derive(Debug)]
pub struct MergeReport {
    pub method: String,
    /// Effective parameters: the method's defaults overridden by the user's values, then the
    /// common ones.
    pub params: Vec<(String, String)>,
    pub merged: usize,
    pub copied: usize,
    pub carried: usize,
    pub models: usize,
    pub outputs: Vec<PathBuf>,
    pub seconds: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Path of task `t`'s output for per-task methods: `<dir>/<stem>.task<t>.<ext>`.
pub fn task_output_path(out: &Path, t: usize) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "merged".into());
    let ext = out.extension().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "safetensors".into());
    out.with_file_name(format!("{stem}.task{t}.{ext}"))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Refuse an output path that is also one of the inputs (it would be overwritten mid-read).
fn check_outputs_are_not_inputs(spec: &MergeSpec, outs: &[PathBuf]) -> Result<(), MergeCmdError> {
    let inputs: Vec<&Path> =
        std::iter::once(spec.base.as_path()).chain(spec.models.iter().map(PathBuf::as_path)).collect();
    for o in outs {
        if let Some(i) = inputs.iter().find(|i| same_file(i, o)) {
            return Err(MergeCmdError::Usage(format!(
                "the output `{}` is also an input (`{}`): choose another output path",
                o.display(),
                i.display()
            )));
        }
    }
    Ok(())
}

/// The common `seed` parameter (default 0).
fn seed_param(params: &Params) -> Result<u64, MergeError> {
    match params.get("seed") {
        None => Ok(0),
        Some(s) => s.parse().map_err(|_| MergeError::BadValue {
            param: "seed".into(),
            value: s.into(),
            expected: "a non-negative integer",
        }),
    }
}

/// Run a merge from files to files on one thread. Nothing is written unless every check passes
/// and the merge succeeds; outputs are written to temporary files and renamed at the end.
pub fn merge_files(spec: &MergeSpec, out: &Path) -> Result<MergeReport, MergeCmdError> {
    merge_files_threads(spec, out, 1)
}

/// [`merge_files`] on `threads` threads: tensorwise methods merge their tensors in parallel, and
/// methods with a global step (ties, dare over ties) run their per-tensor passes as jobs on the
/// threads ([`crate::merging::merge_data_free`]), with bitwise the same result whatever the
/// thread count.
pub fn merge_files_threads(spec: &MergeSpec, out: &Path, threads: usize) -> Result<MergeReport, MergeCmdError> {
    let start = Instant::now();
    let method = lookup(&spec.method)?;
    validate_params(method, &spec.params)?;
    let tensors = spec.params.choice_or("tensors", &["vision", "all"], "vision")?;
    let seed = seed_param(&spec.params)?;
    let mut method_params = Params::new();
    for k in spec.params.keys().filter(|k| !COMMON_PARAMS.iter().any(|c| c.name == *k)) {
        method_params.set(k, spec.params.get(k).unwrap_or_default());
    }
    if spec.models.is_empty() {
        return Err(MergeCmdError::Usage(
            "no fine-tuned models were given: pass them with --models FT1 FT2 ... (or `models:` in the YAML config)"
                .into(),
        ));
    }
    if let Some(w) = &spec.weights
        && w.len() != spec.models.len()
    {
        return Err(MergeCmdError::Usage(format!(
            "--weights has {} value(s) but {} fine-tuned model(s) were given: pass one weight per model",
            w.len(),
            spec.models.len()
        )));
    }
    let mut outs = vec![out.to_path_buf()];
    if method.per_task() {
        outs = (0..spec.models.len()).map(|t| task_output_path(out, t)).collect();
    }
    check_outputs_are_not_inputs(spec, &outs)?;

    let base = Checkpoint::open(&spec.base)?;
    let models = spec.models.iter().map(Checkpoint::open).collect::<Result<Vec<_>, _>>()?;
    let selection: Vec<String> = if tensors == "all" {
        base.float_names().map(String::from).collect()
    } else {
        let conv = Convention::detect(base.float_names())
            .ok_or_else(|| WeightsError::NoVisionTensors { path: base.shown() })?;
        tracing::info!("{}: {} names", base.shown(), conv.label());
        base.float_names().filter(|n| conv.is_vision_encoder(n)).map(String::from).collect()
    };
    if selection.is_empty() {
        return Err(WeightsError::NoVisionTensors { path: base.shown() }.into());
    }
    for m in &models {
        m.check_against_base(&base, selection.iter().map(String::as_str))?;
    }
    let base_params = base.params()?;
    weights::check_finite(&base_params, &base.shown(), selection.iter().map(String::as_str))?;
    let mut model_params = Vec::with_capacity(models.len());
    for m in &models {
        let p = m.params_for(selection.iter().map(String::as_str))?;
        weights::check_finite(&p, &m.shown(), selection.iter().map(String::as_str))?;
        model_params.push(p);
    }

    let input = MergeInput {
        base: &base_params,
        models: &model_params,
        model_weights: spec.weights.as_deref(),
        names: &selection,
        seed,
    };
    let bar = spinner(format!("merging with {}", method.name()));
    let output = crate::merging::merge_data_free(method, &input, &method_params, threads, Some(&bar))?;

    let mut params: Vec<(String, String)> = method
        .params()
        .iter()
        .map(|p| (p.name.to_string(), method_params.get(p.name).unwrap_or(p.default).to_string()))
        .collect();
    params.push(("tensors".into(), tensors.into()));
    params.push(("seed".into(), seed.to_string()));
    let meta = Meta { method, params: &params, base: &base, models: &models, weights: spec.weights.as_deref() };
    let hashes = meta.hashes();

    let mut pending: Vec<Pending> = Vec::new();
    match output {
        MergeOutput::Single(merged) => {
            bar.set_message(format!("writing {}", out.display()));
            pending.push(write_output(
                out,
                &base,
                &base_params,
                &merged,
                &selection,
                spec.dtype,
                &meta,
                &hashes,
                None,
            )?);
        }
        MergeOutput::PerTask(per_task) => {
            if per_task.num_tasks() != models.len() {
                return Err(MergeError::Numerical {
                    method: method.name(),
                    detail: format!("returned {} task models for {} inputs", per_task.num_tasks(), models.len()),
                }
                .into());
            }
            for (t, path) in outs.iter().enumerate() {
                bar.set_message(format!("writing {}", path.display()));
                let merged = per_task.task(t);
                pending.push(write_output(
                    path,
                    &base,
                    &base_params,
                    &merged,
                    &selection,
                    spec.dtype,
                    &meta,
                    &hashes,
                    Some(t),
                )?);
            }
        }
    }
    let mut bytes_written = 0u64;
    let written_paths: Vec<PathBuf> = pending.iter().map(|p| p.path().to_path_buf()).collect();
    for p in pending {
        p.commit()?;
    }
    for p in &written_paths {
        bytes_written += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    }
    bar.finish_and_clear();
    let bytes_read = std::iter::once(&base).chain(&models).map(|c| c.len_bytes() as u64).sum();
    let float_count = base.float_names().count();
    Ok(MergeReport {
        method: method.name().to_string(),
        params,
        merged: selection.len(),
        copied: float_count - selection.len(),
        carried: base.non_float_names().count(),
        models: models.len(),
        outputs: written_paths,
        seconds: start.elapsed().as_secs_f64(),
        bytes_read,
        bytes_written,
    })
}

/// Provenance written into every output's `__metadata__`.
struct Meta<'a> {
    method: &'static dyn MergeMethod,
    params: &'a [(String, String)],
    base: &'a Checkpoint,
    models: &'a [Checkpoint],
    weights: Option<&'a [f32]>,
}

impl Meta<'_> {
    /// SHA-256 of every input file (base first), hashed on parallel threads.
    fn hashes(&self) -> Vec<String> {
        let files: Vec<&Checkpoint> = std::iter::once(self.base).chain(self.models).collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = files.iter().map(|c| s.spawn(move || c.sha256())).collect();
            handles.into_iter().map(|h| h.join().expect("hash thread")).collect()
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn write_output(
    path: &Path,
    base: &Checkpoint,
    base_params: &ParamSet<'_>,
    merged: &ParamSet<'_>,
    selection: &[String],
    dtype: OutDtype,
    meta: &Meta<'_>,
    hashes: &[String],
    task: Option<usize>,
) -> Result<Pending, MergeCmdError> {
    let mut w = Writer::new();
    for name in selection {
        let t = merged.get(name).ok_or_else(|| MergeError::Numerical {
            method: meta.method.name(),
            detail: format!("it returned no tensor `{name}`"),
        })?;
        let b = base_params.get(name).expect("selection comes from the base");
        if t.shape() != b.shape() {
            return Err(MergeError::Numerical {
                method: meta.method.name(),
                detail: format!("it returned tensor `{name}` with shape {:?} instead of {:?}", t.shape(), b.shape()),
            }
            .into());
        }
        w.float(name.as_str(), t.view(), dtype.resolve(base.dtype(name).expect("base tensor")));
    }
    for (name, t) in base_params.iter() {
        if merged.contains(name) && selection.iter().any(|s| s == name) {
            continue;
        }
        w.float(name, t.view(), dtype.resolve(base.dtype(name).expect("base tensor")));
    }
    for name in base.non_float_names() {
        let (dt, shape, bytes) = base.raw(name).expect("listed tensor");
        w.raw(name, dt, shape, bytes);
    }
    let params: serde_json::Map<String, serde_json::Value> =
        meta.params.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    let mut inputs = vec![serde_json::json!({"role": "base", "file": base.shown(), "sha256": hashes[0]})];
    for (i, m) in meta.models.iter().enumerate() {
        let mut e = serde_json::json!({"role": format!("model{i}"), "file": m.shown(), "sha256": hashes[i + 1]});
        if let Some(w) = meta.weights {
            e["weight"] = serde_json::json!(w[i]);
        }
        inputs.push(e);
    }
    w.meta("format", "pt")
        .meta("mergeattack.method", meta.method.name())
        .meta("mergeattack.parameters", serde_json::Value::Object(params).to_string())
        .meta("mergeattack.inputs", serde_json::Value::Array(inputs).to_string())
        .meta("mergeattack.version", env!("CARGO_PKG_VERSION"));
    if let Some(t) = task {
        w.meta("mergeattack.task", t.to_string());
    }
    Ok(w.write_pending(path)?)
}

/// Open task `t`'s images for a data-dependent merge: the spec (its mini split chosen by `split`
/// when it names none), checked against the head's classes, brought to the model's size with
/// CLIP's preprocessing when it differs, a seeded subset of at most `limit` images.
#[allow(clippy::too_many_arguments)]
fn load_task_images(
    spec_text: &str,
    split: Split,
    task: &str,
    classes: usize,
    size: usize,
    limit: usize,
    seed: u64,
    opts: &OpenOptions,
) -> Result<Array4<f32>, MergeCmdError> {
    let mut spec: DataSpec = spec_text.parse().map_err(|e: DataError| MergeCmdError::Usage(e.to_string()))?;
    if let DataSpec::Mini { split: s, .. } = &mut spec
        && spec_text.matches(':').count() == 1
    {
        *s = split;
    }
    let ds = data::open(&spec, opts).map_err(|e| MergeCmdError::Usage(e.to_string()))?;
    let numbered = ds.class_names() == data::Dataset::numbered_classes(ds.num_classes()).as_slice();
    if !(ds.num_classes() == classes || (numbered && ds.num_classes() < classes)) {
        return Err(MergeCmdError::Usage(format!(
            "data {spec} has {} classes but the head of task `{task}` has {classes}: is it another task's data?",
            ds.num_classes()
        )));
    }
    if ds.is_empty() {
        return Err(MergeCmdError::Usage(format!("data {spec} (task `{task}`) holds no images")));
    }
    let ds = if ds.output_size() == Some((size, size)) { ds } else { ds.with_preprocess(Preprocess::Clip(size)) };
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    let mut r = rng::stream(seed, &[b"merge-data", split.to_string().as_bytes(), task.as_bytes()]);
    for i in (1..idx.len()).rev() {
        let j = r.random_range(0..=i);
        idx.swap(i, j);
    }
    idx.truncate(limit.min(ds.len()));
    idx.sort_unstable();
    let sub = ds.subset(ds.name.clone(), &idx);
    let b = sub.batch(0..sub.len()).map_err(|e| MergeCmdError::Usage(e.to_string()))?;
    Ok(b.images)
}

/// A data-dependent merge (`fisher`, `regmean`, `adamerging`, any method with `+surgery`) from
/// files to files, through [`crate::merging::merge`]. Checkpoints are read with HF names (open_clip
/// files converted) and written as f32 with HF names; a `+surgery` merge (or a per-task method)
/// writes one file per task, `<OUT-stem>.task<t>.<ext>`, holding task t's `surgery.down` and
/// `surgery.up`. Nothing is written unless everything succeeds.
pub fn merge_with_data(spec: &MergeSpec, args: &DataMergeArgs, out: &Path) -> Result<MergeReport, MergeCmdError> {
    use crate::merging::{self, Pool, Request, TaskImages};
    let start = Instant::now();
    let (base_method, surgery) = merging::split_surgery(&spec.method);
    let data_method = merging::data_method(base_method);
    if data_method.is_none() {
        lookup(base_method)?;
    }
    if spec.models.is_empty() {
        return Err(MergeCmdError::Usage(
            "no fine-tuned models were given: pass them with --models FT1 FT2 ... (or `models:` in the YAML config)"
                .into(),
        ));
    }
    if spec.weights.is_some() {
        return Err(MergeCmdError::Usage(format!("merge method `{}` does not take per-model --weights", spec.method)));
    }
    let t = spec.models.len();
    if args.data.is_empty() {
        return Err(MergeCmdError::Usage(format!(
            "merge method `{}` needs images: pass one --data SPEC per fine-tuned model (e.g. --data mini:digits \
             mini:fashion)",
            spec.method
        )));
    }
    if args.data.len() != t {
        return Err(MergeCmdError::Usage(format!(
            "--data has {} spec(s) but {t} fine-tuned model(s) were given: pass one per model, in the same order",
            args.data.len()
        )));
    }
    let heads_path = args.heads.as_ref().ok_or_else(|| {
        MergeCmdError::Usage(format!(
            "merge method `{}` runs the models: pass the task heads with --heads (e.g. the zoo's heads.safetensors)",
            spec.method
        ))
    })?;
    let tasks: Vec<String> = if !args.tasks.is_empty() {
        if args.tasks.len() != t {
            return Err(MergeCmdError::Usage(format!(
                "--tasks has {} name(s) but {t} fine-tuned model(s) were given",
                args.tasks.len()
            )));
        }
        args.tasks.clone()
    } else {
        args.data
            .iter()
            .map(|d| match d.parse::<DataSpec>() {
                Ok(DataSpec::Mini { task, .. }) => Ok(task),
                _ => Err(MergeCmdError::Usage(format!(
                    "cannot tell which head `{d}` goes with: name the heads with --tasks (one per model)"
                ))),
            })
            .collect::<Result<_, _>>()?
    };
    let seed = seed_param(&spec.params)?;
    let tensors = spec.params.choice_or("tensors", &["vision", "all"], "vision")?;
    let device: Device = args.device.parse().map_err(|e: RuntimeError| MergeCmdError::Usage(e.to_string()))?;
    let options = RuntimeOptions { device, threads: args.threads, batch_size: args.batch_size };
    let mut outs = vec![out.to_path_buf()];
    let per_task_method = data_method.is_none() && lookup(base_method)?.per_task();
    if surgery || per_task_method {
        outs = (0..t).map(|k| task_output_path(out, k)).collect();
    }
    check_outputs_are_not_inputs(spec, &outs)?;

    let rt = |e: RuntimeError| MergeCmdError::Usage(e.to_string());
    let config = vision_config_for(&spec.base, args.model_config.as_deref()).map_err(rt)?;
    let (base, base_file) = load_hf_params(&spec.base).map_err(rt)?;
    let names: Vec<String> = base
        .names()
        .filter(|n| {
            tensors == "all" || (n.starts_with("vision_model.") && *n != "vision_model.embeddings.position_ids")
        })
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(WeightsError::NoVisionTensors { path: base_file.display().to_string() }.into());
    }
    let mut models = Vec::with_capacity(t);
    for m in &spec.models {
        let (p, file) = load_hf_params(m).map_err(rt)?;
        let shown = file.display().to_string();
        base.check_compatible(&p, &shown, names.iter().map(String::as_str)).map_err(MergeError::from)?;
        p.check_finite(&shown).map_err(MergeError::from)?;
        models.push(p);
    }
    base.check_finite(&base_file.display().to_string()).map_err(MergeError::from)?;
    let mut heads = Vec::with_capacity(t);
    for task in &tasks {
        heads.push(load_head(heads_path, Some(task)).map_err(rt)?.1);
    }
    let opts = OpenOptions { cache_dir: args.cache_dir.clone(), strict: false, classes: None };
    let needs_train = matches!(data_method, Some("fisher") | Some("regmean"));
    let needs_test = data_method == Some("adamerging") || surgery;
    let mut data = Vec::with_capacity(t);
    for (k, d) in args.data.iter().enumerate() {
        let classes = heads[k].nrows();
        let load = |split| {
            load_task_images(d, split, &tasks[k], classes, config.image_size, args.images, seed, &opts).map(Some)
        };
        data.push(TaskImages {
            train: if needs_train { load(Split::Train)? } else { None },
            test: if needs_test { load(Split::Test)? } else { None },
        });
    }
    let mut method_params = Params::new();
    for k in spec.params.keys().filter(|k| !COMMON_PARAMS.iter().any(|c| c.name == *k)) {
        method_params.set(k, spec.params.get(k).unwrap_or_default());
    }
    let pool = Pool { config, tasks: tasks.clone(), base, models, names: names.clone(), heads };
    let req = Request { method: &spec.method, params: &method_params, seed, data: &data, options };
    let merged = merging::merge(&pool, &req).map_err(|e| MergeCmdError::Usage(e.to_string()))?;

    let mut params: Vec<(String, String)> =
        method_params.keys().map(|k| (k.to_string(), method_params.get(k).unwrap_or_default().to_string())).collect();
    params.push(("tensors".into(), tensors.into()));
    params.push(("seed".into(), seed.to_string()));
    let pjson: serde_json::Map<String, serde_json::Value> =
        params.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
    let inputs_json = serde_json::json!({
        "base": spec.base.display().to_string(),
        "models": spec.models.iter().map(|m| m.display().to_string()).collect::<Vec<_>>(),
        "data": args.data,
        "tasks": tasks,
        "heads": heads_path.display().to_string(),
    });
    let mut pending = Vec::new();
    for (k, path) in outs.iter().enumerate() {
        let p = merged.task_params(&pool, k);
        let mut w = Writer::new();
        w.params(&p, weights::Dtype::F32);
        w.meta("format", "pt")
            .meta("mergeattack.method", merged.method.clone())
            .meta("mergeattack.parameters", serde_json::Value::Object(pjson.clone()).to_string())
            .meta("mergeattack.inputs", inputs_json.to_string())
            .meta("mergeattack.version", env!("CARGO_PKG_VERSION"));
        if outs.len() > 1 {
            w.meta("mergeattack.task", k.to_string());
            w.meta("mergeattack.task_name", tasks[k].clone());
        }
        pending.push(w.write_pending(path)?);
    }
    let mut bytes_written = 0u64;
    for p in pending {
        let path = p.path().to_path_buf();
        p.commit()?;
        bytes_written += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    }
    let bytes_read = std::iter::once(&spec.base)
        .chain(&spec.models)
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(MergeReport {
        method: merged.method.clone(),
        params,
        merged: names.len(),
        copied: pool.base.len() - names.len(),
        carried: 0,
        models: t,
        outputs: outs,
        seconds: start.elapsed().as_secs_f64(),
        bytes_read,
        bytes_written,
    })
}

fn spinner(msg: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// `mergeattack merge`.
pub fn run(args: MergeArgs) -> anyhow::Result<()> {
    let mut spec = match &args.config {
        Some(path) => MergeSpec::from_yaml(path)?,
        None => {
            let mut params = Params::new();
            for pair in &args.set {
                params.set_pair(pair).map_err(MergeCmdError::from)?;
            }
            let weights = if args.weights.is_empty() {
                None
            } else {
                let parsed = args
                    .weights
                    .iter()
                    .map(|w| {
                        merge::parse_number(w)
                            .map(|v| v as f32)
                            .ok_or_else(|| MergeCmdError::Usage(format!("--weights value `{w}` is not a number")))
                    })
                    .collect::<Result<Vec<f32>, _>>()?;
                Some(parsed)
            };
            MergeSpec {
                method: args.method.clone().unwrap_or_default(),
                base: args.base.clone().unwrap_or_default(),
                models: args.models.clone(),
                weights,
                params,
                dtype: OutDtype::F32,
            }
        }
    };
    if let Some(d) = args.dtype {
        spec.dtype = d;
    }
    let r = if crate::merging::needs_data(&spec.method) {
        merge_with_data(&spec, &args.data, &args.output)?
    } else {
        if !args.data.data.is_empty() {
            tracing::warn!("merge method `{}` uses no images: --data is ignored", spec.method);
        }
        merge_files_threads(&spec, &args.output, args.data.threads)?
    };
    print_summary(&r);
    Ok(())
}

fn print_summary(r: &MergeReport) {
    let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("method:   {} ({})", r.method, params.join(", "));
    println!(
        "tensors:  {} merged, {} copied from the base, {} non-float carried through; {} fine-tuned models",
        r.merged, r.copied, r.carried, r.models
    );
    println!(
        "time:     {:.3} s ({:.2} GB read, {:.2} GB written)",
        r.seconds,
        r.bytes_read as f64 / 1e9,
        r.bytes_written as f64 / 1e9
    );
    if r.outputs.len() == 1 {
        println!("wrote:    {}", r.outputs[0].display());
    } else {
        println!("wrote {} per-task files (task t uses model t's weights):", r.outputs.len());
        for (t, p) in r.outputs.iter().enumerate() {
            println!("  task {t}: {}", p.display());
        }
    }
}

/// `mergeattack methods`: a table of every registry method.
pub fn methods(_args: MethodsArgs) -> anyhow::Result<()> {
    print!("{}", methods_table());
    Ok(())
}

/// The text of `mergeattack methods`: a table (name, per-task, summary), then each method's
/// aliases and parameters with their defaults.
pub fn methods_table() -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let reg = merge::registry();
    let w = reg.iter().map(|m| m.name().len()).max().unwrap_or(0).max("METHOD".len());
    let _ = writeln!(s, "{:<w$}  {:<8}  SUMMARY", "METHOD", "PER-TASK");
    for m in reg {
        let _ = writeln!(s, "{:<w$}  {:<8}  {}", m.name(), if m.per_task() { "yes" } else { "no" }, m.summary());
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Parameters (set with --set key=value; defaults shown):");
    for m in reg {
        let aliases =
            if m.aliases().is_empty() { String::new() } else { format!(" (aliases: {})", m.aliases().join(", ")) };
        let _ = writeln!(s, "{}{aliases}", m.name());
        if m.params().is_empty() {
            let _ = writeln!(s, "  (no parameters)");
        }
        let pw = m.params().iter().map(|p| p.name.len() + p.default.len() + 1).max().unwrap_or(0);
        for p in m.params() {
            let _ = writeln!(s, "  {:<pw$}  {}", format!("{}={}", p.name, p.default), p.help);
        }
    }
    let _ = writeln!(
        s,
        "\nData-dependent methods (need --data SPEC per model and --heads; see `mergeattack merge --help`):"
    );
    let data_rows: [(&str, &str); 3] = [
        ("fisher", "Fisher-weighted average (diagonal Fisher of each fine-tuned model on its train images)"),
        ("regmean", "RegMean: per linear layer the least-squares merge under the train inputs' Grams; rest averaged"),
        ("adamerging", "coefficients learnt by minimising prediction entropy on unlabelled test images (Adam)"),
    ];
    for (name, summary) in data_rows {
        let _ = writeln!(s, "{name}  {summary}");
        for p in crate::merging::data_method_params(name) {
            let _ = writeln!(s, "  {:<18}  {}", format!("{}={}", p.name, p.default), p.help);
        }
    }
    let _ = writeln!(
        s,
        "+surgery (suffix on any method, e.g. adamerging+surgery): per-task Representation Surgery on the merged \
         feature, trained toward the fine-tuned features on unlabelled test images; writes one file per task"
    );
    for p in mergeattack_core::merge::surgery::PARAMS {
        let _ = writeln!(s, "  {:<18}  {}", format!("{}={}", p.name, p.default), p.help);
    }
    let _ = writeln!(s, "every method");
    for p in COMMON_PARAMS {
        let _ = writeln!(s, "  {:<14}  {}", format!("{}={}", p.name, p.default), p.help);
    }
    let _ = writeln!(
        s,
        "\nPer-task methods write <OUT-stem>.task<t>.<ext> next to OUT, one per fine-tuned model t (see `mergeattack merge --help`)."
    );
    s
}

/// One row of the demo table.
#[derive(Debug)]
pub struct DemoRow {
    pub method: &'static str,
    pub models: usize,
    pub seconds: f64,
    /// L2 norm of (merged - pretrained) over the merged tensors (mean over tasks for per-task methods).
    pub delta_norm: f64,
    /// L2 distance to each fine-tuned model over the merged tensors (per-task: task t's model).
    pub distances: Vec<f64>,
}

/// L2 distance between two checkpoints over `names`.
fn distance(a: &Checkpoint, b: &Checkpoint, names: &[String]) -> Result<f64, WeightsError> {
    let mut s = 0f64;
    for n in names {
        let (x, y) = (a.tensor(n)?, b.tensor(n)?);
        let (Some(x), Some(y)) = (x, y) else { continue };
        s += x.iter().zip(y.iter()).map(|(p, q)| f64::from(p - q).powi(2)).sum::<f64>();
    }
    Ok(s.sqrt())
}

/// Generate the demo checkpoints in `dir`, merge them with every registry method, return the rows.
pub fn run_demo(dir: &Path, seed: u64) -> Result<Vec<DemoRow>, MergeCmdError> {
    let cfg = SynthConfig::tiny();
    let tasks = 4;
    let (base_path, ft_paths) = synth::write_set(dir, &cfg, tasks, seed, 0.05)?;
    let base = Checkpoint::open(&base_path)?;
    let fts = ft_paths.iter().map(Checkpoint::open).collect::<Result<Vec<_>, _>>()?;
    let names: Vec<String> = base.float_names().filter(|n| n.starts_with("vision_model.")).map(String::from).collect();
    let mut rows = Vec::new();
    for m in merge::registry() {
        let out = dir.join(format!("merged-{}.safetensors", m.name()));
        let mut spec = MergeSpec {
            method: m.name().into(),
            base: base_path.clone(),
            models: ft_paths.clone(),
            weights: None,
            params: Params::new(),
            dtype: OutDtype::F32,
        };
        let report = match merge_files(&spec, &out) {
            Err(MergeCmdError::Merge(MergeError::ModelCount { .. })) => {
                // Methods for exactly two models (slerp) merge the first two.
                spec.models.truncate(2);
                merge_files(&spec, &out)?
            }
            other => other?,
        };
        let merged = report.outputs.iter().map(Checkpoint::open).collect::<Result<Vec<_>, _>>()?;
        let (delta_norm, distances) = if merged.len() == 1 {
            let d =
                fts[..spec.models.len()].iter().map(|f| distance(&merged[0], f, &names)).collect::<Result<_, _>>()?;
            (distance(&merged[0], &base, &names)?, d)
        } else {
            let d = merged.iter().zip(&fts).map(|(m, f)| distance(m, f, &names)).collect::<Result<_, _>>()?;
            let deltas = merged.iter().map(|m| distance(m, &base, &names)).collect::<Result<Vec<_>, _>>()?;
            (deltas.iter().sum::<f64>() / deltas.len() as f64, d)
        };
        rows.push(DemoRow { method: m.name(), models: report.models, seconds: report.seconds, delta_norm, distances });
    }
    Ok(rows)
}

/// `mergeattack demo`.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let rows = run_demo(&args.out, args.seed)?;
    println!(
        "tiny CLIP (width 64, 2 layers, patch 8, image 32), 4 fine-tuned models, seed {}; files in {}",
        args.seed,
        args.out.display()
    );
    println!("norms and distances are L2 over the merged vision-encoder tensors; per-task methods: task t vs model t");
    print!("{:<18} {:>6} {:>9} {:>11}", "method", "models", "seconds", "|delta|");
    for t in 0..4 {
        print!(" {:>9}", format!("d(ft{t})"));
    }
    println!();
    for r in &rows {
        print!("{:<18} {:>6} {:>9.4} {:>11.5}", r.method, r.models, r.seconds, r.delta_norm);
        for d in &r.distances {
            print!(" {d:>9.5}");
        }
        println!();
    }
    Ok(())
}
