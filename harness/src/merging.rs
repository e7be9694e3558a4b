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

use mergeattack_core::merge::{self, MergeError, MergeInput, MergeOutput, Params};
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::clip::config::ClipVisionConfig;
use mergeattack_onnx::runtime::{Model, RuntimeError, RuntimeOptions};
use ndarray::{Array2, Array4};

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
        let merged = self.task_tensors(t);
        let mut out = ParamSet::new();
        for (name, tensor) in pool.base.iter() {
            out.insert_view(name, tensor.view());
        }
        for (name, tensor) in merged.iter() {
            out.insert_owned(name, tensor.to_owned());
        }
        if let Some(s) = &self.surgery {
            for (name, tensor) in s[t].iter() {
                out.insert_view(name, tensor.view());
            }
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
    surgery || DATA_METHODS.contains(&base)
}

/// The data-dependent methods this module dispatches itself (not in the core registry).
pub const DATA_METHODS: &[&str] = &["fisher", "regmean", "adamerging"];

/// `adamerging+surgery` -> (`adamerging`, true).
pub fn split_surgery(method: &str) -> (&str, bool) {
    match method.strip_suffix("+surgery") {
        Some(base) => (base, true),
        None => (method, false),
    }
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
    let (base_name, surgery) = split_surgery(req.method);
    if surgery || DATA_METHODS.contains(&base_name) {
        return Err(MergingError::Invalid(format!(
            "merge method `{}` needs the data-dependent merging of issue 7, which is not built yet",
            req.method
        )));
    }
    let method = merge::lookup(base_name)?;
    merge::validate_params(method, req.params)?;
    let input =
        MergeInput { base: &pool.base, models: &pool.models, model_weights: None, names: &pool.names, seed: req.seed };
    let weights = method.merge(&input, req.params)?;
    Ok(Merged { method: method.name().to_string(), weights, surgery: None, seconds: start.elapsed().as_secs_f64() })
}
