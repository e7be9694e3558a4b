//! One entry point for every merge method — data-free or data-dependent, with or without the
//! `+surgery` suffix — shared by `mergeattack merge` and the study runner.
//!
//! A [`Pool`] holds the pretrained weights, the fine-tuned models and one class head per task; a
//! [`TaskImages`] per task gives the images the data-dependent methods need (train images for
//! `fisher` and `regmean`, unlabelled test images for `adamerging` and `+surgery`). [`merge`]
//! returns a [`Merged`] pool: the merged tensors (one model, or one per task for methods that need
//! the task identity) and, for `+surgery`, one feature-correction module per task. [`Merged::model`]
//! builds the ONNX Runtime classifier of one task, surgery included, so attacks and evaluation go
//! through exactly the model the method defines.

use std::borrow::Cow;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mergeattack_core::merge::{
    self, COMMON_PARAMS, MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, adamerging, fisher,
    regmean, surgery,
};
use mergeattack_core::rng;
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::clip::config::ClipVisionConfig;
use mergeattack_onnx::runtime::{Model, RuntimeError, RuntimeOptions, all_vision_weights};
use ndarray::{Array2, Array4, ArrayD, ArrayView4, Axis, s};
use rand::RngExt;

use crate::exec::Threads;

/// Why a merge could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MergingError {
    #[error("{0}")]
    Merge(MergeError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A method that needs images was given none (or too few) for a task.
    #[error("{method} needs {what} for task `{task}`, but none were given")]
    MissingData { method: String, what: &'static str, task: String },
    /// Anything else about the request, as one sentence.
    #[error("{0}")]
    Invalid(String),
}

impl From<MergeError> for MergingError {
    fn from(e: MergeError) -> Self {
        MergingError::Merge(e)
    }
}

/// The models to merge: CLIP vision weights with HF names.
pub struct Pool<'a> {
    pub config: ClipVisionConfig,
    /// Task names, in the order of `models` and `heads`.
    pub tasks: Vec<String>,
    /// The pretrained weights: every tensor a vision model needs (`vision_model.*`,
    /// `visual_projection.weight`, optionally `logit_scale`).
    pub base: ParamSet<'a>,
    /// The fine-tuned models, one per task; they hold at least the tensors named in `names`.
    pub models: Vec<ParamSet<'a>>,
    /// The tensors to merge (sorted): by default every `vision_model.*` float tensor. Every other
    /// tensor of a merged model is the base model's.
    pub names: Vec<String>,
    /// One class head `[classes, projection_dim]` per task.
    pub heads: Vec<Array2<f32>>,
}

/// Images of one task for the data-dependent methods (NCHW f32 in [0, 1], the model's size).
#[derive(Default, Clone)]
pub struct TaskImages {
    /// Training images (`fisher`, `regmean`); labels are not used by either.
    pub train: Option<Array4<f32>>,
    /// Unlabelled test images (`adamerging`, `+surgery`).
    pub test: Option<Array4<f32>>,
}

/// A merge request.
pub struct Request<'r> {
    /// The CLI method name or alias, possibly with `+surgery`.
    pub method: &'r str,
    /// Method parameters (`key=value`).
    pub params: &'r Params,
    /// Seed of every random draw the method makes.
    pub seed: u64,
    /// Images per task (same order as the pool's tasks); may be empty for data-free methods.
    pub data: &'r [TaskImages],
    /// How the data-dependent methods run the model (device, threads, batch size).
    pub options: RuntimeOptions,
}

/// The result of a merge.
pub struct Merged<'p> {
    /// The canonical method name (with `+surgery` when it applies).
    pub method: String,
    /// The merged tensors (the pool's `names`): one model, or one per task.
    pub weights: MergeOutput<'p>,
    /// `+surgery`: per task, the module's tensors (`surgery.*`), applied after the merged feature.
    pub surgery: Option<Vec<ParamSet<'static>>>,
    /// Wall time of the merge, seconds.
    pub seconds: f64,
}

impl Merged<'_> {
    /// True when evaluating task `t` needs the task identity (per-task weights or surgery).
    pub fn needs_task_id(&self) -> bool {
        matches!(self.weights, MergeOutput::PerTask(_)) || self.surgery.is_some()
    }

    /// The merged tensors of task `t` (borrowed when the method gives one model).
    pub fn task_tensors(&self, t: usize) -> Cow<'_, ParamSet<'static>> {
        match &self.weights {
            MergeOutput::Single(p) => Cow::Borrowed(p),
            MergeOutput::PerTask(m) => Cow::Owned(m.task(t)),
        }
    }

    /// The full parameter set of task `t`: the base model's tensors overlaid with the merged ones
    /// (and the task's surgery tensors, if any).
    pub fn task_params<'s>(&'s self, pool: &'s Pool<'_>, t: usize) -> ParamSet<'s> {
        let mut out = self.task_params_without_surgery(pool, t);
        if let Some(s) = &self.surgery {
            for (name, tensor) in s[t].iter() {
                out.insert_view(name, tensor.view());
            }
        }
        out
    }

    /// The base model's tensors overlaid with task `t`'s merged ones (no surgery).
    fn task_params_without_surgery<'s>(&'s self, pool: &'s Pool<'_>, t: usize) -> ParamSet<'s> {
        let merged = self.task_tensors(t);
        let mut out = ParamSet::new();
        for (name, tensor) in pool.base.iter() {
            out.insert_view(name, tensor.view());
        }
        for (name, tensor) in merged.iter() {
            out.insert_owned(name, tensor.to_owned());
        }
        out
    }

    /// The classifier of task `t` (its head, its weights, its surgery module).
    pub fn model(&self, pool: &Pool<'_>, t: usize, options: RuntimeOptions) -> Result<Model, MergingError> {
        let params = self.task_params(pool, t);
        let name = format!("{} merge (task {})", self.method, pool.tasks[t]);
        Ok(Model::from_params(pool.config.clone(), &params, pool.heads[t].view(), options, &name)?)
    }
}

/// True when `method` (a name or alias, possibly with `+surgery`) needs images.
pub fn needs_data(method: &str) -> bool {
    let (base, surgery) = split_surgery(method);
    surgery || data_method(base).is_some()
}

/// The data-dependent methods this module dispatches itself (not in the core registry).
pub const DATA_METHODS: &[&str] = &["fisher", "regmean", "adamerging"];

/// The canonical data-dependent method `name` stands for (`_`/`-` and case ignored; `fisher_merging`,
/// `regmean` and `ada_merging` accepted), if any.
pub fn data_method(name: &str) -> Option<&'static str> {
    let n = name.trim().to_ascii_lowercase().replace('_', "-");
    match n.as_str() {
        "fisher" | "fisher-merging" => Some("fisher"),
        "regmean" | "reg-mean" | "regmean-merging" => Some("regmean"),
        "adamerging" | "ada-merging" | "layer-wise-adamerging" => Some("adamerging"),
        _ => None,
    }
}

/// The parameters (with defaults) of a data-dependent method.
pub fn data_method_params(name: &str) -> &'static [ParamSpec] {
    match data_method(name) {
        Some("fisher") => fisher::PARAMS,
        Some("regmean") => regmean::PARAMS,
        Some("adamerging") => adamerging::PARAMS,
        _ => &[],
    }
}

/// `adamerging+surgery` -> (`adamerging`, true).
pub fn split_surgery(method: &str) -> (&str, bool) {
    match method.strip_suffix("+surgery") {
        Some(base) => (base, true),
        None => (method, false),
    }
}

/// Split `params` into the base method's and the `+surgery` suffix's (`surgery_*` keys), and
/// reject keys neither knows.
fn split_params(
    method: &'static str,
    specs: &'static [ParamSpec],
    surgery: bool,
    params: &Params,
) -> Result<(Params, Params), MergeError> {
    let mut own = Params::new();
    let mut surg = Params::new();
    for k in params.keys() {
        let v = params.get(k).unwrap_or_default();
        if surgery && surgery::PARAMS.iter().any(|p| p.name == k) {
            surg.set(k, v);
        } else if specs.iter().chain(COMMON_PARAMS).any(|p| p.name == k) {
            own.set(k, v);
        } else {
            let mut known: Vec<String> =
                specs.iter().chain(COMMON_PARAMS).map(|p| format!("{}={}", p.name, p.default)).collect();
            if surgery {
                known.extend(surgery::PARAMS.iter().map(|p| format!("{}={}", p.name, p.default)));
            }
            return Err(MergeError::UnknownParam { method, param: k.to_string(), known: known.join(", ") });
        }
    }
    Ok((own, surg))
}

/// Merge the pool.
pub fn merge<'p>(pool: &'p Pool<'_>, req: &Request<'_>) -> Result<Merged<'p>, MergingError> {
    let start = Instant::now();
    if pool.models.len() != pool.tasks.len() || pool.heads.len() != pool.tasks.len() {
        return Err(MergingError::Invalid(format!(
            "the pool has {} task names, {} models and {} heads: they must match",
            pool.tasks.len(),
            pool.models.len(),
            pool.heads.len()
        )));
    }
    let (base_name, with_surgery) = split_surgery(req.method);
    let (name, weights, surgery_params): (&'static str, MergeOutput<'p>, Params) = match data_method(base_name) {
        Some(dm) => {
            let (own, surg) = split_params(dm, data_method_params(dm), with_surgery, req.params)?;
            let what = if dm == "adamerging" { "unlabelled test images" } else { "train images" };
            let images = task_images(pool, req, dm, what, dm == "adamerging")?;
            let input = merge_input(pool, req.seed);
            let merged = match dm {
                "fisher" => run_fisher(pool, &input, &images, &own, &req.options)?,
                "regmean" => run_regmean(pool, &input, &images, &own, req.seed, &req.options)?,
                _ => run_adamerging(pool, &input, &images, &own, req.seed, &req.options)?,
            };
            (dm, MergeOutput::Single(merged), surg)
        }
        None => {
            let method = merge::lookup(base_name)?;
            let (own, surg) = split_params(method.name(), method.params(), with_surgery, req.params)?;
            merge::validate_params(method, &own)?;
            let input = merge_input(pool, req.seed);
            (method.name(), merge_data_free(method, &input, &own, req.options.threads, None)?, surg)
        }
    };
    let mut merged = Merged {
        method: if with_surgery { format!("{name}+surgery") } else { name.to_string() },
        weights,
        surgery: None,
        seconds: 0.0,
    };
    if with_surgery {
        let cfg = surgery::SurgeryConfig::from_params(&surgery_params)?;
        let images = task_images(pool, req, "+surgery", "unlabelled test images", true)?;
        merged.surgery = Some(run_surgery(pool, &merged, &images, &cfg, req.seed, &req.options)?);
    }
    merged.seconds = start.elapsed().as_secs_f64();
    Ok(merged)
}

/// Run a data-free method. When the method is tensorwise for these parameters
/// ([`MergeMethod::tensorwise`]) and `threads` > 1, the tensors are merged one at a time on
/// `threads` threads (largest first, each thread taking the next one left), which gives bitwise
/// the same tensors as one call over all of them; the first error in tensor order is returned.
/// `bar`, if given, counts the tensors merged. Any other method with `threads` > 1 runs its
/// kernels' jobs on a [`Threads`] executor ([`MergeMethod::merge_on`]: global-scope TIES splits
/// its passes by tensor), again with bitwise the same result as on one thread.
pub fn merge_data_free<'s>(
    method: &'static dyn MergeMethod,
    input: &MergeInput<'s, '_>,
    params: &Params,
    threads: usize,
    bar: Option<&ProgressBar>,
) -> Result<MergeOutput<'s>, MergeError> {
    let n = input.names.len();
    if threads <= 1 || n < 2 {
        return method.merge(input, params);
    }
    if method.per_task() || !method.tensorwise(params) {
        return method.merge_on(input, params, &Threads::new(threads));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(input.base(&input.names[i]).len()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    if let Some(b) = bar {
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg}: {pos}/{len} tensors, {elapsed_precise}, ETA {eta}")
                .expect("template"),
        );
        b.set_length(n as u64);
        b.set_position(0);
    }
    let mut parts: Vec<(usize, Result<ParamSet<'static>, MergeError>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.min(n))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = order.get(j) else { break };
                        let one = MergeInput { names: std::slice::from_ref(&input.names[i]), ..*input };
                        let r = method.merge(&one, params).and_then(|out| {
                            out.single().ok_or_else(|| MergeError::Numerical {
                                method: method.name(),
                                detail: "a tensorwise method returned per-task output".into(),
                            })
                        });
                        let failed = r.is_err();
                        done.push((i, r));
                        if let Some(b) = bar {
                            b.inc(1);
                        }
                        if failed {
                            break;
                        }
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("merge worker")).collect()
    });
    parts.sort_by_key(|(i, _)| *i);
    let mut out = ParamSet::new();
    for (i, part) in parts {
        let mut part = part?;
        let name = &input.names[i];
        let t = part.remove(name).ok_or_else(|| MergeError::Numerical {
            method: method.name(),
            detail: format!("it returned no tensor `{name}`"),
        })?;
        out.insert(name.clone(), t);
    }
    Ok(MergeOutput::Single(out))
}

fn merge_input<'s, 'a>(pool: &'s Pool<'a>, seed: u64) -> MergeInput<'s, 'a> {
    MergeInput { base: &pool.base, models: &pool.models, model_weights: None, names: &pool.names, seed }
}

/// Task t's images of the kind the method needs, checked against the model's input size.
fn task_images<'r>(
    pool: &Pool<'_>,
    req: &'r Request<'_>,
    method: &str,
    what: &'static str,
    test: bool,
) -> Result<Vec<ArrayView4<'r, f32>>, MergingError> {
    let c = &pool.config;
    let want = (c.num_channels, c.image_size, c.image_size);
    let mut out = Vec::with_capacity(pool.tasks.len());
    for (t, task) in pool.tasks.iter().enumerate() {
        let missing = || MergingError::MissingData { method: method.to_string(), what, task: task.clone() };
        let ti = req.data.get(t).ok_or_else(missing)?;
        let x = if test { ti.test.as_ref() } else { ti.train.as_ref() }.ok_or_else(missing)?;
        if x.dim().0 == 0 {
            return Err(missing());
        }
        let (n, ch, h, w) = x.dim();
        if (ch, h, w) != want {
            return Err(MergingError::Invalid(format!(
                "{method}: the {what} of task `{task}` have shape [{n}, {ch}, {h}, {w}] but the model takes \
                 [N, {}, {}, {}] ({}x{} pixels): were they prepared for another model or task?",
                want.0, want.1, want.2, want.1, want.2
            )));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(MergingError::Invalid(format!(
                "{method}: image {} of task `{task}` holds a NaN or infinite pixel",
                i / (ch * h * w)
            )));
        }
        out.push(x.view());
    }
    Ok(out)
}

/// The full parameter set of fine-tuned model t: the base overlaid with every tensor of the model.
fn finetuned_params<'s>(pool: &'s Pool<'_>, t: usize) -> ParamSet<'s> {
    let mut p = ParamSet::new();
    for (n, v) in pool.base.iter() {
        p.insert_view(n, v.view());
    }
    for (n, v) in pool.models[t].iter() {
        p.insert_view(n, v.view());
    }
    p
}

/// The names among `names` that the vision graph binds (others get no gradient).
fn graph_names(pool: &Pool<'_>) -> Vec<String> {
    let graph: std::collections::HashSet<String> =
        all_vision_weights(&pool.config, 1).into_iter().map(|(n, _)| n).collect();
    pool.names.iter().filter(|n| graph.contains(*n)).cloned().collect()
}

fn progress(len: usize, what: String) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what);
    pb
}

fn run_fisher(
    pool: &Pool<'_>,
    input: &MergeInput<'_, '_>,
    images: &[ArrayView4<'_, f32>],
    params: &Params,
    options: &RuntimeOptions,
) -> Result<ParamSet<'static>, MergingError> {
    let cfg = fisher::FisherConfig::from_params(params)?;
    let names = graph_names(pool);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pb = progress(pool.tasks.len(), "fisher: task Fisher".into());
    let mut fishers = Vec::with_capacity(pool.tasks.len());
    for (t, x) in images.iter().enumerate() {
        let n = cfg.examples.min(x.dim().0);
        if n < cfg.examples {
            tracing::warn!(
                "fisher: task `{}` has {n} train images, fewer than examples={}",
                pool.tasks[t],
                cfg.examples
            );
        }
        let params = finetuned_params(pool, t);
        let label = format!("fine-tuned model {} (fisher)", pool.tasks[t]);
        let mut model =
            Model::from_params(pool.config.clone(), &params, pool.heads[t].view(), options.clone(), &label)?;
        let mut acc = fisher::FisherAccumulator::new(input);
        let zero: std::collections::HashMap<&str, ArrayD<f32>> = pool
            .names
            .iter()
            .filter(|nm| !names.contains(*nm))
            .map(|nm| (nm.as_str(), ArrayD::zeros(pool.base.get(nm).expect("merged names are in the base").raw_dim())))
            .collect();
        let mut a = 0;
        while a < n {
            let b = (a + cfg.batch).min(n);
            let xb = x.slice(s![a..b, .., .., ..]);
            let (logits, _) = model.forward(xb)?;
            let dl = fisher::dlogits(logits.view());
            let grads = model.weight_vjp(xb, dl.view(), Some(&name_refs))?;
            let by_name: std::collections::HashMap<&str, &ArrayD<f32>> =
                grads.iter().map(|(k, v)| (k.strip_prefix("grad.").unwrap_or(k), v)).collect();
            acc.add_batch(b - a, |nm| by_name.get(nm).map(|v| v.view()).or_else(|| zero.get(nm).map(|v| v.view())))?;
            a = b;
        }
        fishers.push(acc.finish()?);
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(fisher::merge(input, &fishers)?)
}

fn run_regmean(
    pool: &Pool<'_>,
    input: &MergeInput<'_, '_>,
    images: &[ArrayView4<'_, f32>],
    params: &Params,
    seed: u64,
    options: &RuntimeOptions,
) -> Result<ParamSet<'static>, MergingError> {
    let cfg = regmean::RegMeanConfig::from_params(params)?;
    let pb = progress(pool.tasks.len(), "regmean: task Grams".into());
    let mut grams = Vec::with_capacity(pool.tasks.len());
    for (t, x) in images.iter().enumerate() {
        let n = x.dim().0;
        if n < cfg.examples {
            tracing::warn!(
                "regmean: task `{}` has {n} train images, fewer than examples={}",
                pool.tasks[t],
                cfg.examples
            );
        }
        // A seeded subset of `examples` images, in increasing index order.
        let mut rng = rng::stream(seed, &[b"regmean", b"examples", pool.tasks[t].as_bytes()]);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            idx.swap(i, j);
        }
        idx.truncate(cfg.examples.min(n));
        idx.sort_unstable();
        let xs = x.select(Axis(0), &idx);
        let params = finetuned_params(pool, t);
        let label = format!("fine-tuned model {} (regmean)", pool.tasks[t]);
        let mut model =
            Model::from_params(pool.config.clone(), &params, pool.heads[t].view(), options.clone(), &label)?;
        let mut g = ParamSet::new();
        for (k, v) in model.grams(xs.view())? {
            g.insert_owned(k.strip_prefix("gram.").unwrap_or(&k).to_string(), v);
        }
        grams.push(g);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let (merged, notes) = regmean::merge(input, &grams, &cfg)?;
    for n in &notes {
        tracing::warn!("{n}");
    }
    Ok(merged)
}

/// One model whose head is every task's head stacked (rows of task t at `offsets[t]..offsets[t+1]`):
/// its logits restricted to task t's columns are exactly task t's logits (the cosine logits are
/// per class row), so one forward and one VJP serve every task.
struct JointModel {
    model: Model,
    offsets: Vec<usize>,
}

impl JointModel {
    fn new(
        pool: &Pool<'_>,
        merged: &ParamSet<'_>,
        options: &RuntimeOptions,
        name: &str,
    ) -> Result<JointModel, MergingError> {
        let mut offsets = vec![0];
        for h in &pool.heads {
            offsets.push(offsets.last().expect("non-empty") + h.nrows());
        }
        let views: Vec<_> = pool.heads.iter().map(|h| h.view()).collect();
        let head = ndarray::concatenate(Axis(0), &views)
            .map_err(|_| MergingError::Invalid("the task heads have different widths".into()))?;
        let mut params = ParamSet::new();
        for (n, v) in pool.base.iter() {
            params.insert_view(n, v.view());
        }
        for (n, v) in merged.iter() {
            params.insert_view(n, v.view());
        }
        let model = Model::from_params(pool.config.clone(), &params, head.view(), options.clone(), name)?;
        Ok(JointModel { model, offsets })
    }
}

fn run_adamerging(
    pool: &Pool<'_>,
    input: &MergeInput<'_, '_>,
    images: &[ArrayView4<'_, f32>],
    params: &Params,
    seed: u64,
    options: &RuntimeOptions,
) -> Result<ParamSet<'static>, MergingError> {
    let cfg = adamerging::AdaMergingConfig::from_params(params)?;
    let mut coef = adamerging::Coefficients::new(input, &cfg)?;
    let names = graph_names(pool);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let zero: std::collections::HashMap<&str, ArrayD<f32>> = pool
        .names
        .iter()
        .filter(|nm| !names.contains(*nm))
        .map(|nm| (nm.as_str(), ArrayD::zeros(pool.base.get(nm).expect("merged names are in the base").raw_dim())))
        .collect();
    let graph_only = |p: ParamSet<'static>| -> ParamSet<'static> {
        p.iter().filter(|(n, _)| names.iter().any(|g| g == n)).map(|(n, v)| (n.to_string(), v.clone())).collect()
    };
    let mut joint = JointModel::new(pool, &coef.merged(input), options, "adamerging merge")?;
    let mut samplers: Vec<surgery::Sampler> = images.iter().map(|x| surgery::Sampler::new(x.dim().0)).collect();
    let mut rngs: Vec<_> =
        pool.tasks.iter().map(|t| rng::stream(seed, &[b"adamerging", b"batches", t.as_bytes()])).collect();
    let classes = *joint.offsets.last().expect("non-empty");
    let per_task = cfg.batches * cfg.batch;
    let total = per_task * pool.tasks.len();
    // Task t's rows see only task t's head columns; each row weighs 1/batch, so the objective is
    // the sum over tasks and batches of the per-batch mean entropies (METHODS.md).
    let mut mask = Array2::<f32>::zeros((total, classes));
    for t in 0..pool.tasks.len() {
        mask.slice_mut(s![t * per_task..(t + 1) * per_task, joint.offsets[t]..joint.offsets[t + 1]]).fill(1.0);
    }
    let row_weights = vec![1.0 / cfg.batch as f32; total];
    let (c, hw) = (pool.config.num_channels, pool.config.image_size);
    let pb = progress(cfg.steps, "adamerging".into());
    let mut last_loss = f64::NAN;
    for step in 0..cfg.steps {
        if step > 0 {
            joint.model.update_weights(&graph_only(coef.merged(input)))?;
        }
        let mut x = Array4::<f32>::zeros((total, c, hw, hw));
        for (t, xt) in images.iter().enumerate() {
            let idx = samplers[t].next(per_task, &mut rngs[t]);
            for (k, &i) in idx.iter().enumerate() {
                x.index_axis_mut(Axis(0), t * per_task + k).assign(&xt.index_axis(Axis(0), i));
            }
        }
        // One pass: the entropies and the weight gradients of the merged tensors only.
        let (entropy, grads) =
            joint.model.entropy_weight_grads(x.view(), mask.view(), &row_weights, Some(&name_refs))?;
        let loss: f64 = entropy.iter().zip(&row_weights).map(|(&h, &w)| f64::from(h) * f64::from(w)).sum();
        let by_name: std::collections::HashMap<&str, &ArrayD<f32>> =
            grads.iter().map(|(k, v)| (k.strip_prefix("grad.").unwrap_or(k), v)).collect();
        let g =
            coef.gradient(input, |nm| by_name.get(nm).map(|v| v.view()).or_else(|| zero.get(nm).map(|v| v.view())))?;
        coef.step(&g, cfg.lr);
        last_loss = loss;
        if step % 50 == 0 {
            tracing::debug!("adamerging step {step}: entropy loss {loss:.5}");
        }
        pb.set_message(format!("adamerging, loss {loss:.4}"));
        pb.inc(1);
    }
    pb.finish_and_clear();
    tracing::info!("adamerging: {} steps, last loss {last_loss:.5}; coefficients {}", cfg.steps, coef.describe());
    Ok(coef.merged(input))
}

/// Train one Representation Surgery module per task on the features of the merged model (task t's
/// weights) and of fine-tuned model t, both computed once on task t's test images (the encoders
/// are frozen). Returns each task's `surgery.down` / `surgery.up`.
fn run_surgery(
    pool: &Pool<'_>,
    merged: &Merged<'_>,
    images: &[ArrayView4<'_, f32>],
    cfg: &surgery::SurgeryConfig,
    seed: u64,
    options: &RuntimeOptions,
) -> Result<Vec<ParamSet<'static>>, MergingError> {
    let pb = progress(pool.tasks.len() * cfg.steps, "surgery".into());
    let mut out = Vec::with_capacity(pool.tasks.len());
    for (t, x) in images.iter().enumerate() {
        let task = &pool.tasks[t];
        pb.set_message(format!("surgery: features {task}"));
        let mp = merged.task_params_without_surgery(pool, t);
        let label = format!("{} merge (task {task}, surgery features)", merged.method);
        let mut m = Model::from_params(pool.config.clone(), &mp, pool.heads[t].view(), options.clone(), &label)?;
        let (_, f) = m.forward(x.view())?;
        drop(m);
        let fp = finetuned_params(pool, t);
        let label = format!("fine-tuned model {task} (surgery features)");
        let mut m = Model::from_params(pool.config.clone(), &fp, pool.heads[t].view(), options.clone(), &label)?;
        let (_, ft) = m.forward(x.view())?;
        drop(m);
        // FusionBench variant: the module learns on unit features; applied to the raw feature by
        // the graph it gives the same logits (see core::merge::surgery).
        let (f, ft) = if cfg.normalize {
            (surgery::normalize_rows(f.view()), surgery::normalize_rows(ft.view()))
        } else {
            (f, ft)
        };
        let d = f.ncols();
        let mut init = rng::stream(seed, &[b"surgery", b"init", task.as_bytes()]);
        let mut module = surgery::Surgery::new(d, cfg.rank, &mut init);
        let mut batches = rng::stream(seed, &[b"surgery", b"batches", task.as_bytes()]);
        let mut sampler = surgery::Sampler::new(f.nrows());
        pb.set_message(format!("surgery: training {task}"));
        let mut loss = f64::NAN;
        let first = module.loss_grad(f.view(), ft.view())?.loss;
        for _ in 0..cfg.steps {
            for _ in 0..cfg.batches {
                let idx = sampler.next(cfg.batch, &mut batches);
                let fb = f.select(Axis(0), &idx);
                let tb = ft.select(Axis(0), &idx);
                let g = module.loss_grad(fb.view(), tb.view())?;
                loss = g.loss;
                module.step(&g, cfg.lr);
            }
            pb.inc(1);
        }
        let last = module.loss_grad(f.view(), ft.view())?.loss;
        tracing::info!(
            "surgery {task}: L1 distance to the fine-tuned features {first:.5} -> {last:.5} (last batch {loss:.5})"
        );
        let mut p = ParamSet::new();
        p.insert_owned(surgery::DOWN, module.down.into_dyn());
        p.insert_owned(surgery::UP, module.up.into_dyn());
        out.push(p);
    }
    pb.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base and `tasks` fine-tuned sets: many tensors of mixed sizes (several span more than one
    /// kernel chunk), task vectors of spread magnitudes.
    fn sets(tasks: usize) -> (ParamSet<'static>, Vec<ParamSet<'static>>, Vec<String>) {
        let sizes: Vec<usize> = (0..24).map(|i| [7000, 300, 12_345, 1, 4096, 900][i % 6] + i).collect();
        let mut r = rng::stream(21, &[b"merging-threads-test"]);
        let mut base = ParamSet::new();
        let mut models: Vec<ParamSet<'static>> = (0..tasks).map(|_| ParamSet::new()).collect();
        for (i, &n) in sizes.iter().enumerate() {
            let name = format!("t{i:02}");
            let b: Vec<f32> = (0..n).map(|_| r.random::<f32>() - 0.5).collect();
            for m in models.iter_mut() {
                let scale = 10f32.powf(r.random::<f32>() * 2.0 - 3.0);
                let v: Vec<f32> = b.iter().map(|&x| x + scale * (r.random::<f32>() - 0.5)).collect();
                m.insert_owned(name.clone(), ArrayD::from_shape_vec(ndarray::IxDyn(&[n]), v).unwrap());
            }
            base.insert_owned(name, ArrayD::from_shape_vec(ndarray::IxDyn(&[n]), b).unwrap());
        }
        let names = base.names().map(String::from).collect();
        (base, models, names)
    }

    fn bits(out: MergeOutput<'_>, names: &[String]) -> Vec<Vec<u32>> {
        let p = out.single().expect("one model");
        names.iter().map(|n| p.get(n).unwrap().iter().map(|x| x.to_bits()).collect()).collect()
    }

    /// Global-scope TIES (not tensorwise: its jobs go to the thread executor) and the tensorwise
    /// methods give bitwise the same tensors on 1 and on 3 threads, and through `merge_on` with 3
    /// threads as with `merge`.
    #[test]
    fn threads_give_bitwise_the_same_merge() {
        let (base, models, names) = sets(4);
        let input = MergeInput { base: &base, models: &models, model_weights: None, names: &names, seed: 3 };
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("ties", &[]),
            ("ties", &[("aggregate", "dis-mean"), ("k", "0.05")]),
            ("ties", &[("k", "1")]),
            ("ties", &[("scope", "tensor")]),
            ("task-arithmetic", &[]),
            ("dare", &[("base", "ties")]),
            ("dare", &[("base", "ties"), ("rescale", "l1"), ("p", "0.3")]),
            ("dare", &[]),
        ];
        for (name, kv) in cases {
            let method = merge::lookup(name).unwrap();
            let mut p = Params::new();
            for (k, v) in kv.iter() {
                p.set(*k, *v);
            }
            let one = bits(merge_data_free(method, &input, &p, 1, None).unwrap(), &names);
            let three = bits(merge_data_free(method, &input, &p, 3, None).unwrap(), &names);
            assert!(one == three, "{name} {kv:?}: 1 and 3 threads differ");
            let on = bits(method.merge_on(&input, &p, &Threads::new(3)).unwrap(), &names);
            assert!(one == on, "{name} {kv:?}: merge_on with 3 threads differs");
        }
    }
}
