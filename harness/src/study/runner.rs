//! The study runner: `mergeattack study`.
//!
//! Work is ordered so that everything is done once and reused:
//! - the model pool is resolved (the built-in zoo is built or found in the cache) and loaded once;
//! - each merge method is merged once per run (a merge spans every task) and kept in memory;
//! - per dataset, the test images (a fixed, seeded subset of `images_per_task` images) are loaded
//!   once, and the clean outputs of the surrogates, the fine-tuned model and the reference are
//!   computed once;
//! - per dataset x attack x surrogate x eps the adversarial batch is crafted once, on the
//!   surrogate, from the stream `rng::stream(seed, [dataset, attack, surrogate, eps])`, and every
//!   merged target is evaluated on it;
//! - per dataset x method, the merged target of the task is built once (one ONNX Runtime session)
//!   and evaluated clean and on every adversarial batch.
//!
//! Each finished setting is written in one store transaction with its phase seconds (shared work
//! is split evenly over the settings that share it, so the per-setting seconds add up to the
//! run's time). Settings already in the store are skipped, so a killed run resumes where it
//! stopped; `--shard i/n` runs every n-th setting. A method that cannot merge a pool of this size
//! (`slerp` takes exactly two models) is skipped with a note and recorded as skipped.
//! Nothing here reads the clock or the thread count for a result: the same config and seed give
//! bitwise the same metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mergeattack_core::attack::{AttackConfig, Ensemble, EnsembleMode, Preset};
use mergeattack_core::classifier::Classifier;
use mergeattack_core::merge::Params;
use mergeattack_core::metrics::{self, GradientAlignment, Outcomes, RepresentationBias};
use mergeattack_core::rng;
use mergeattack_core::stats;
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::clip::config::ClipVisionConfig;
use mergeattack_onnx::runtime::{self, Device, Model, RuntimeOptions};
use ndarray::{Array2, Array4, s};
use rand::RngExt;
use sha2::{Digest, Sha256};

use super::config::{Setting, Shard, StudyConfig, Surrogate};
use super::setting::{Estimate, Metrics, Phases, SettingKey, SettingRecord};
use super::store::{RunInfo, Store, StoreError};
use crate::data::mini::Split;
use crate::data::spec::{DataSpec, OpenOptions};
use crate::merging::{self, Merged, Pool, Request, TaskImages};
use crate::report::{self, ReportError, ReportSummary};
use crate::zoo;

/// Train images per task given to `fisher` and `regmean` (METHODS.md: the first 256).
pub const MERGE_TRAIN_IMAGES: usize = 256;

/// Phase names of the runner, in report order.
pub const PHASES: &[&str] = &["load", "merge", "craft", "evaluate", "metrics"];

/// What can stop a study; each is one sentence naming the culprit.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Report(#[from] ReportError),
    /// Bad input: a model file, a dataset, a config value.
    #[error("{0}")]
    Input(String),
    /// A failure while running (a model, an attack, a merge).
    #[error("{0}")]
    Failed(String),
}

fn input(msg: impl Into<String>) -> RunError {
    RunError::Input(msg.into())
}

/// How to run a study.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub shard: Shard,
    /// Overrides the config's `threads`.
    pub threads: Option<usize>,
    /// Results store (default: `<out>/results.sqlite`).
    pub store: Option<PathBuf>,
    /// Output directory (default: the config's `output`).
    pub out: Option<PathBuf>,
    /// Cache root (mini-suite data, zoo); default: the tool's cache root.
    pub cache_dir: Option<PathBuf>,
    /// The command line, recorded in the store.
    pub argv: Vec<String>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Write the report at the end.
    pub report: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            shard: Shard::ALL,
            threads: None,
            store: None,
            out: None,
            cache_dir: None,
            argv: Vec::new(),
            progress: false,
            report: true,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The study hash stored with every setting (config hash, and the zoo's key when a built-in
    /// zoo supplies the models).
    pub study_hash: String,
    pub store: PathBuf,
    pub out: PathBuf,
    /// Settings of this shard.
    pub planned: usize,
    /// Settings of this shard that were already in the store.
    pub already_done: usize,
    /// Settings finished by this run.
    pub finished: usize,
    /// Settings skipped by this run, with the reason.
    pub skipped: Vec<(SettingKey, String)>,
    /// Seconds per phase ([`PHASES`] order) spent by this run.
    pub phase_seconds: Vec<(String, f64)>,
    /// Wall seconds of the whole run.
    pub wall_seconds: f64,
    /// Seconds spent building or finding the zoo (not a study phase).
    pub zoo_seconds: f64,
    /// The report, when written.
    pub report: Option<(PathBuf, ReportSummary)>,
}

/// The models of the study, resolved to files.
struct Resolved {
    config: ClipVisionConfig,
    /// Names under which each dataset's head and zoo models are found.
    zoo_tasks: Vec<String>,
    pretrained: PathBuf,
    finetuned: Vec<PathBuf>,
    reference: Vec<Option<PathBuf>>,
    heads: PathBuf,
    zoo_key: Option<String>,
}

fn mini_task(spec: &str) -> Option<String> {
    match spec.parse::<DataSpec>() {
        Ok(DataSpec::Mini { task, .. }) => Some(task),
        _ => None,
    }
}

/// The configuration of the built-in zoo a study uses (`None` without `models.zoo`): `default` or
/// `reduced`, built for exactly the study's mini-suite tasks when it lacks one of them.
pub fn zoo_config(cfg: &StudyConfig) -> Option<zoo::config::ZooConfig> {
    let m = &cfg.models;
    m.zoo.as_ref()?;
    let mut zcfg = match m.zoo_config.as_deref() {
        Some("reduced") => zoo::config::ZooConfig::reduced(),
        _ => zoo::config::ZooConfig::default(),
    };
    let mut need: Vec<String> = Vec::new();
    for d in &cfg.datasets {
        if m.finetuned.contains_key(&d.name) {
            continue;
        }
        if let Some(t) = mini_task(&d.data).filter(|t| !need.contains(t)) {
            need.push(t);
        }
    }
    if !need.iter().all(|t| zcfg.tasks.contains(t)) {
        zcfg.tasks = need;
    }
    Some(zcfg)
}

fn resolve(cfg: &StudyConfig, cache_dir: Option<&Path>) -> Result<Resolved, RunError> {
    let m = &cfg.models;
    let zoo_tasks: Vec<String> =
        cfg.datasets.iter().map(|d| mini_task(&d.data).unwrap_or_else(|| d.name.clone())).collect();
    let (zoo_dir, zoo_key) = match m.zoo.as_deref() {
        None => (None, None),
        Some(_) => {
            if let Some((d, _)) = cfg
                .datasets
                .iter()
                .zip(&zoo_tasks)
                .find(|(d, t)| !m.finetuned.contains_key(&d.name) && !zoo::config::ALL_TASKS.contains(&t.as_str()))
            {
                return Err(input(format!(
                    "dataset `{}` ({}) is not a mini-suite task, so the zoo has no model for it: give models.finetuned.{}",
                    d.name, d.data, d.name
                )));
            }
            let zcfg = zoo_config(cfg).expect("the study names a zoo");
            let root = crate::setup::cache_root(cache_dir);
            let key = zoo::cache_key("mini", &zcfg);
            let dir = root.join("zoo").join(&key);
            let t = Instant::now();
            match zoo::build(&root, &zcfg, &dir, None)
                .map_err(|e| input(format!("building the mini zoo failed: {e:#}")))?
            {
                zoo::Built::Cached(p) => tracing::info!("mini zoo found at {}", p.display()),
                zoo::Built::Trained(p, _) => {
                    tracing::info!("mini zoo built at {} in {:.1}s", p.display(), t.elapsed().as_secs_f64())
                }
            }
            (Some(dir), Some(key))
        }
    };
    let from_zoo = |what: &str, key: &str| -> Result<PathBuf, RunError> {
        zoo_dir
            .as_ref()
            .map(|d| d.join(what))
            .ok_or_else(|| input(format!("study config: key `models.{key}` is required unless models.zoo is set")))
    };
    let pretrained = match &m.pretrained {
        Some(p) => PathBuf::from(p),
        None => from_zoo("pretrained", "pretrained")?,
    };
    let heads = match &m.heads {
        Some(p) => PathBuf::from(p),
        None => from_zoo("heads.safetensors", "heads")?,
    };
    let mut finetuned = Vec::new();
    let mut reference = Vec::new();
    for (d, t) in cfg.datasets.iter().zip(&zoo_tasks) {
        finetuned.push(match m.finetuned.get(&d.name) {
            Some(p) => PathBuf::from(p),
            None => from_zoo(&format!("finetuned/{t}"), &format!("finetuned.{}", d.name))?,
        });
        reference.push(match m.reference.get(&d.name) {
            Some(p) => Some(PathBuf::from(p)),
            None => zoo_dir.as_ref().map(|z| z.join("reference").join(t)).filter(|p| p.exists()),
        });
    }
    for p in std::iter::once(&pretrained).chain(&finetuned).chain(reference.iter().flatten()).chain([&heads]) {
        if !p.exists() {
            return Err(input(format!("model file {} does not exist", p.display())));
        }
    }
    let config = runtime::vision_config_for(&pretrained, None).map_err(|e| input(e.to_string()))?;
    Ok(Resolved { config, zoo_tasks, pretrained, finetuned, reference, heads, zoo_key })
}

/// Weights of `path` in HF names, tensors it lacks taken from `base`, checked against `names`.
fn load_filled(path: &Path, base: &ParamSet<'static>, names: &[String]) -> Result<ParamSet<'static>, RunError> {
    let (mut p, file) = runtime::load_hf_params(path).map_err(|e| input(e.to_string()))?;
    let shown = file.display().to_string();
    base.check_compatible(&p, &shown, names.iter().map(String::as_str)).map_err(|e| input(e.to_string()))?;
    p.check_finite(&shown).map_err(|e| input(e.to_string()))?;
    for (n, t) in base.iter() {
        if !p.contains(n) {
            p.insert(n, t.clone());
        }
    }
    Ok(p)
}

/// The study hash: the config's hash, with the zoo's cache key when the zoo supplies models (a
/// rebuilt zoo is another study).
pub fn study_hash(cfg: &StudyConfig, zoo_key: Option<&str>) -> String {
    match zoo_key {
        None => cfg.hash(),
        Some(k) => {
            let mut h = Sha256::new();
            h.update(cfg.hash().as_bytes());
            h.update(b"\0zoo\0");
            h.update(k.as_bytes());
            h.finalize().iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

fn device_of(cfg: &StudyConfig) -> Device {
    if cfg.device.starts_with("cuda") {
        if cfg.device != "cuda" && cfg.device != "cuda:0" {
            tracing::warn!("device {}: the CUDA execution provider uses its default device", cfg.device);
        }
        Device::Cuda
    } else {
        Device::Cpu
    }
}

fn argmax(logits: &Array2<f32>) -> Vec<usize> {
    logits
        .outer_iter()
        .map(|row| {
            let mut best = 0usize;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = j;
                }
            }
            best
        })
        .collect()
}

/// A surrogate of one dataset: a model of the per-dataset model table, or an ensemble of them.
#[derive(Clone)]
enum SurrogateRef {
    One(String),
    Ensemble(Vec<String>),
}

fn model_key(s: &Surrogate) -> Result<String, RunError> {
    Ok(match s {
        Surrogate::Finetuned => "finetuned".into(),
        Surrogate::Pretrained => "pretrained".into(),
        Surrogate::File(p) => format!("file:{p}"),
        Surrogate::Ensemble(_) => {
            return Err(input(format!("surrogate `{s}`: an ensemble inside an ensemble is not supported")));
        }
    })
}

fn surrogate_ref(s: &Surrogate) -> Result<SurrogateRef, RunError> {
    match s {
        Surrogate::Ensemble(v) => Ok(SurrogateRef::Ensemble(v.iter().map(model_key).collect::<Result<_, _>>()?)),
        other => Ok(SurrogateRef::One(model_key(other)?)),
    }
}

/// Run `f` on the classifier a surrogate names (an [`Ensemble`] of logits for an ensemble).
fn with_surrogate<R>(
    models: &mut BTreeMap<String, Model>,
    s: &SurrogateRef,
    f: impl FnOnce(&mut dyn Classifier) -> Result<R, RunError>,
) -> Result<R, RunError> {
    match s {
        SurrogateRef::One(k) => f(models.get_mut(k).expect("surrogate models are loaded")),
        SurrogateRef::Ensemble(keys) => {
            let mut members: Vec<&mut dyn Classifier> = Vec::new();
            for (k, m) in models.iter_mut() {
                if keys.contains(k) {
                    members.push(m);
                }
            }
            let mut e = Ensemble::new(members, EnsembleMode::Logits).map_err(|e| RunError::Failed(e.to_string()))?;
            f(&mut e)
        }
    }
}

fn model_err(what: &str) -> impl Fn(mergeattack_core::classifier::ModelError) -> RunError + '_ {
    move |e| RunError::Failed(format!("{what}: {e}"))
}

fn logits_of(c: &mut dyn Classifier, x: &Array4<f32>, what: &str) -> Result<Vec<usize>, RunError> {
    Ok(argmax(&c.logits(x.view()).map_err(model_err(what))?))
}

fn grad_of(c: &mut dyn Classifier, x: &Array4<f32>, labels: &[usize], what: &str) -> Result<Array4<f32>, RunError> {
    Ok(c.loss_grad(x.view(), labels).map_err(model_err(what))?.grad)
}

/// Predictions of one model: clean, and on the adversarial batch of each (attack, surrogate, eps).
struct Preds {
    clean: Vec<usize>,
    adv: BTreeMap<AdvKey, Vec<usize>>,
}

/// (attack label, surrogate, eps text).
type AdvKey = (String, String, String);

/// An adversarial batch of one dataset and what was measured on it once.
struct AdvSet {
    /// The surrogate's predictions on it (white-box).
    surrogate: Vec<usize>,
    /// The reference's predictions on it.
    reference: Option<Vec<usize>>,
    /// Seconds of crafting, and of evaluating surrogate and reference on it.
    craft_s: f64,
    eval_s: f64,
    /// Pending settings that use it.
    users: usize,
    images: Array4<f32>,
}

/// A merge done once per run: the merged pool, or the reason it was skipped.
enum MergeState<'p> {
    Done(Box<Merged<'p>>, f64),
    Skipped(String),
}

/// Running phase totals of this run.
#[derive(Default)]
struct Totals(BTreeMap<&'static str, f64>);

impl Totals {
    fn add(&mut self, phase: &'static str, s: f64) {
        *self.0.entry(phase).or_default() += s;
    }
}

/// Run a study.
pub fn run(cfg: &StudyConfig, opts: &RunOptions) -> Result<RunSummary, RunError> {
    let wall = Instant::now();
    let mut totals = Totals::default();
    let threads = opts.threads.unwrap_or(cfg.threads);
    if threads == 0 {
        return Err(input("--threads must be at least 1"));
    }
    let out = opts.out.clone().unwrap_or_else(|| cfg.output.clone());
    let store_path = opts.store.clone().unwrap_or_else(|| out.join("results.sqlite"));
    if let Some(parent) = store_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| input(format!("cannot create {}: {e}", parent.display())))?;
    }

    // Attacks and methods are checked before any work.
    let attack_cfgs = attack_configs(cfg)?;
    for m in &cfg.methods {
        let (base, _) = merging::split_surgery(&m.name);
        if !merging::DATA_METHODS.contains(&base) {
            let method =
                mergeattack_core::merge::lookup(base).map_err(|e| input(format!("method `{}`: {e}", m.label)))?;
            mergeattack_core::merge::validate_params(method, &params_of(&m.params))
                .map_err(|e| input(format!("method `{}`: {e}", m.label)))?;
        }
    }
    let surrogates: Vec<SurrogateRef> = cfg.surrogates.iter().map(surrogate_ref).collect::<Result<_, _>>()?;

    // The models (the zoo is built or found first; its time is not a study phase).
    let t_zoo = Instant::now();
    let res = resolve(cfg, opts.cache_dir.as_deref())?;
    let zoo_seconds = t_zoo.elapsed().as_secs_f64();
    let t_load = Instant::now();
    let hash = study_hash(cfg, res.zoo_key.as_deref());
    let mut store = Store::open(&store_path)?;
    if let Some(other) = store.config_hashes()?.into_iter().find(|h| *h != hash) {
        return Err(input(format!(
            "results store {} holds another study (hash {}…; this study's is {}…): give another --store or --out",
            store_path.display(),
            &other[..other.len().min(12)],
            &hash[..12]
        )));
    }
    let planned = cfg.shard_settings(opts.shard);
    let done = store.done_keys(&hash)?;
    let pending: Vec<Setting> = planned.iter().filter(|s| !done.contains(&s.key)).cloned().collect();
    let already_done = planned.len() - pending.len();
    tracing::info!(
        "study {}…: {} settings in this shard, {} already done, {} to run",
        &hash[..12],
        planned.len(),
        already_done,
        pending.len()
    );
    store.begin_run(&RunInfo {
        config_hash: hash.clone(),
        code_version: format!("mergeattack {}", env!("CARGO_PKG_VERSION")),
        seed: cfg.seed,
        argv: opts.argv.clone(),
    })?;

    let mut summary = RunSummary {
        study_hash: hash.clone(),
        store: store_path.clone(),
        out: out.clone(),
        planned: planned.len(),
        already_done,
        finished: 0,
        skipped: Vec::new(),
        phase_seconds: Vec::new(),
        wall_seconds: 0.0,
        zoo_seconds,
        report: None,
    };

    if !pending.is_empty() {
        // The pool, loaded once.
        let (base, _) = runtime::load_hf_params(&res.pretrained).map_err(|e| input(e.to_string()))?;
        let names: Vec<String> = base.names().filter(|n| n.starts_with("vision_model.")).map(String::from).collect();
        if names.is_empty() {
            return Err(input(format!("{} holds no vision_model.* tensors", res.pretrained.display())));
        }
        let mut models = Vec::new();
        for p in &res.finetuned {
            models.push(load_filled(p, &base, &names)?);
        }
        let mut heads = Vec::new();
        for (d, t) in cfg.datasets.iter().zip(&res.zoo_tasks) {
            let task = if head_names(&res.heads)?.contains(&d.name) { d.name.as_str() } else { t.as_str() };
            let (_, h) = runtime::load_head(&res.heads, Some(task)).map_err(|e| input(e.to_string()))?;
            if h.ncols() != res.config.projection_dim {
                return Err(input(format!(
                    "head `{task}` in {} has {} columns but the models' projection_dim is {}",
                    res.heads.display(),
                    h.ncols(),
                    res.config.projection_dim
                )));
            }
            heads.push(h);
        }
        let mut files: BTreeMap<String, ParamSet<'static>> = BTreeMap::new();
        for s in &cfg.surrogates {
            let members: Vec<&Surrogate> = match s {
                Surrogate::Ensemble(v) => v.iter().collect(),
                one => vec![one],
            };
            for m in members {
                if let Surrogate::File(p) = m
                    && !files.contains_key(p)
                {
                    files.insert(p.clone(), load_filled(Path::new(p), &base, &names)?);
                }
            }
        }
        let mut references = Vec::new();
        for r in &res.reference {
            references.push(match r {
                Some(p) => Some(load_filled(p, &base, &names)?),
                None => None,
            });
        }
        let pool = Pool {
            config: res.config.clone(),
            tasks: cfg.datasets.iter().map(|d| d.name.clone()).collect(),
            base,
            models,
            names,
            heads,
        };
        totals.add("load", t_load.elapsed().as_secs_f64());
        let rt = RuntimeOptions { device: device_of(cfg), threads, batch_size: cfg.batch_size };
        let ctx = Ctx { cfg, out: &out, opts, rt, pool: &pool, files: &files, references: &references, res: &res };
        sweep(&ctx, &pending, &surrogates, &attack_cfgs, &mut store, &hash, &mut totals, &mut summary)?;
    } else {
        totals.add("load", t_load.elapsed().as_secs_f64());
    }
    store.finish_run()?;
    drop(store);

    summary.phase_seconds = PHASES.iter().map(|p| (p.to_string(), totals.0.get(p).copied().unwrap_or(0.0))).collect();
    if opts.report {
        let dir = out.join("report");
        match report::write_report(std::slice::from_ref(&store_path), &dir) {
            Ok(r) => summary.report = Some((dir, r)),
            Err(ReportError::Empty(_)) => tracing::warn!("no finished setting yet: no report written"),
            Err(e) => return Err(e.into()),
        }
    }
    summary.wall_seconds = wall.elapsed().as_secs_f64();
    Ok(summary)
}

fn head_names(path: &Path) -> Result<Vec<String>, RunError> {
    let ck = mergeattack_onnx::weights::Checkpoint::open(path).map_err(|e| input(e.to_string()))?;
    let p = ck.params().map_err(|e| input(e.to_string()))?;
    Ok(p.names().map(String::from).collect())
}

fn params_of(map: &BTreeMap<String, String>) -> Params {
    let mut p = Params::new();
    for (k, v) in map {
        p.set(k.clone(), v.clone());
    }
    p
}

/// Every (attack label, eps text) -> its configuration, checked.
fn attack_configs(cfg: &StudyConfig) -> Result<BTreeMap<(String, String), AttackConfig>, RunError> {
    let mut out = BTreeMap::new();
    for a in &cfg.attacks {
        let bad = |e: mergeattack_core::attack::AttackError| input(format!("attack `{}`: {e}", a.label));
        let preset = Preset::parse(&a.preset).map_err(bad)?;
        for e in &cfg.eps {
            let mut c = AttackConfig::preset(&a.name, preset).map_err(bad)?;
            for (k, v) in &a.overrides {
                c.set(k, v).map_err(bad)?;
            }
            c.eps = e.value;
            c.validate().map_err(bad)?;
            out.insert((a.label.clone(), e.text.clone()), c);
        }
    }
    Ok(out)
}

/// What the sweep reads.
struct Ctx<'a> {
    cfg: &'a StudyConfig,
    out: &'a Path,
    opts: &'a RunOptions,
    rt: RuntimeOptions,
    pool: &'a Pool<'static>,
    files: &'a BTreeMap<String, ParamSet<'static>>,
    references: &'a [Option<ParamSet<'static>>],
    res: &'a Resolved,
}

/// The test images of dataset `t`: a fixed seeded subset of `images_per_task` images.
fn load_images(
    ctx: &Ctx<'_>,
    t: usize,
    split: Option<Split>,
    limit: usize,
) -> Result<(Array4<f32>, Vec<usize>), RunError> {
    let d = &ctx.cfg.datasets[t];
    let classes = ctx.pool.heads[t].nrows();
    let mut spec: DataSpec = d.data.parse().map_err(|e| input(format!("dataset `{}`: {e}", d.name)))?;
    if let (Some(want), DataSpec::Mini { split, .. }) = (split, &mut spec) {
        *split = want;
    }
    let oo = OpenOptions { cache_dir: ctx.opts.cache_dir.clone(), strict: false, classes: Some(classes) };
    let ds = crate::data::spec::open(&spec, &oo).map_err(|e| input(format!("dataset `{}`: {e}", d.name)))?;
    if ds.num_classes() != classes {
        return Err(input(format!(
            "dataset `{}` ({}) has {} classes but its head in {} has {} rows",
            d.name,
            d.data,
            ds.num_classes(),
            ctx.res.heads.display(),
            classes
        )));
    }
    if ds.is_empty() {
        return Err(input(format!("dataset `{}` ({spec}) holds no images", d.name)));
    }
    // A fixed subset: the first `limit` of a seeded permutation, in data-set order.
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    let purpose = match split {
        Some(s) => format!("images:{s}"),
        None => "images".to_string(),
    };
    let mut r = rng::stream(ctx.cfg.seed, &[purpose.as_bytes(), d.name.as_bytes()]);
    for i in (1..idx.len()).rev() {
        let j = r.random_range(0..=i as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(limit.min(ds.len()));
    idx.sort_unstable();
    let sub = ds.subset(d.name.clone(), &idx);
    let b = sub.batch(0..sub.len()).map_err(|e| input(format!("dataset `{}`: {e}", d.name)))?;
    let (_, c, h, w) = b.images.dim();
    let sz = ctx.pool.config.image_size;
    if (c, h, w) != (3, sz, sz) {
        return Err(input(format!("dataset `{}` gives images of {c}x{h}x{w} but the models take 3x{sz}x{sz}", d.name)));
    }
    Ok((b.images, b.labels))
}

/// The images the data-dependent methods need, per task.
fn merge_data(ctx: &Ctx<'_>, method: &str) -> Result<Vec<TaskImages>, RunError> {
    let (base, surgery) = merging::split_surgery(method);
    let mut out = Vec::new();
    for t in 0..ctx.cfg.datasets.len() {
        let mut ti = TaskImages::default();
        if base == "fisher" || base == "regmean" {
            ti.train = Some(load_images(ctx, t, Some(Split::Train), MERGE_TRAIN_IMAGES)?.0);
        }
        if base == "adamerging" || surgery {
            ti.test = Some(load_images(ctx, t, None, ctx.cfg.images_per_task)?.0);
        }
        out.push(ti);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn sweep(
    ctx: &Ctx<'_>,
    pending: &[Setting],
    surrogates: &[SurrogateRef],
    attack_cfgs: &BTreeMap<(String, String), AttackConfig>,
    store: &mut Store,
    hash: &str,
    totals: &mut Totals,
    summary: &mut RunSummary,
) -> Result<(), RunError> {
    let cfg = ctx.cfg;
    let pb = if ctx.opts.progress {
        ProgressBar::with_draw_target(Some(pending.len() as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} settings, ETA {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let surrogate_of: BTreeMap<String, SurrogateRef> =
        cfg.surrogates.iter().map(|s| s.to_string()).zip(surrogates.iter().cloned()).collect();
    // Pending settings per method (the merge's seconds are shared by them).
    let mut per_method: BTreeMap<&str, usize> = BTreeMap::new();
    for s in pending {
        *per_method.entry(s.key.method.as_str()).or_default() += 1;
    }
    let mut merges: HashMap<String, MergeState<'_>> = HashMap::new();

    for (t, d) in cfg.datasets.iter().enumerate() {
        let todo: Vec<&Setting> = pending.iter().filter(|s| s.key.dataset == d.name).collect();
        if todo.is_empty() {
            continue;
        }
        pb.set_message(format!("{}: loading", d.name));
        let t0 = Instant::now();
        let (x, labels) = load_images(ctx, t, None, cfg.images_per_task)?;
        let n = labels.len();
        // The models of this dataset other than the merged targets.
        let head = ctx.pool.heads[t].view();
        let mk = |p: &ParamSet<'_>, what: &str| -> Result<Model, RunError> {
            Model::from_params(ctx.pool.config.clone(), p, head, ctx.rt.clone(), &format!("{what} ({})", d.name))
                .map_err(|e| input(e.to_string()))
        };
        let mut table: BTreeMap<String, Model> = BTreeMap::new();
        table.insert("finetuned".into(), mk(&ctx.pool.models[t], "fine-tuned model")?);
        let needed: BTreeSet<String> = surrogates
            .iter()
            .flat_map(|s| match s {
                SurrogateRef::One(k) => vec![k.clone()],
                SurrogateRef::Ensemble(v) => v.clone(),
            })
            .collect();
        for k in &needed {
            if k == "pretrained" {
                table.insert(k.clone(), mk(&ctx.pool.base, "pretrained model")?);
            } else if let Some(p) = k.strip_prefix("file:") {
                table.insert(k.clone(), mk(&ctx.files[p], p)?);
            }
        }
        let mut reference = match &ctx.references[t] {
            Some(p) => Some(mk(p, "reference model")?),
            None => None,
        };
        let dir = ctx.out.join("adversarial").join(&d.name);
        save_images(&dir, "clean.npy", &x)?;
        let lab: Vec<u8> = labels.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect();
        write_atomic(&dir.join("labels.npy"), &crate::data::npy::to_bytes("<i8", &[n], &lab))?;
        let load_s = t0.elapsed().as_secs_f64();
        totals.add("load", load_s);

        // Clean outputs computed once per dataset.
        let t0 = Instant::now();
        let ft = table.get_mut("finetuned").expect("inserted");
        let (_, ft_features) = ft.forward(x.view()).map_err(|e| RunError::Failed(e.to_string()))?;
        let mut s_clean: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut s_grad: BTreeMap<String, Array4<f32>> = BTreeMap::new();
        for (name, sref) in &surrogate_of {
            if !todo.iter().any(|s| &s.key.surrogate == name) {
                continue;
            }
            let what = format!("surrogate {name} on {}", d.name);
            let (p, g) =
                with_surrogate(&mut table, sref, |c| Ok((logits_of(c, &x, &what)?, grad_of(c, &x, &labels, &what)?)))?;
            s_clean.insert(name.clone(), p);
            s_grad.insert(name.clone(), g);
        }
        let (r_clean, r_grad) = match reference.as_mut() {
            Some(r) => {
                let what = format!("reference model of {}", d.name);
                (Some(logits_of(r, &x, &what)?), Some(grad_of(r, &x, &labels, &what)?))
            }
            None => (None, None),
        };
        let clean_s = t0.elapsed().as_secs_f64();
        totals.add("evaluate", clean_s);

        // Adversarial batches: crafted once per (attack, surrogate, eps) on the surrogate.
        let mut advs: BTreeMap<AdvKey, AdvSet> = BTreeMap::new();
        for s in &todo {
            let k = (s.key.attack.clone(), s.key.surrogate.clone(), s.key.eps.clone());
            if let Some(a) = advs.get_mut(&k) {
                a.users += 1;
                continue;
            }
            pb.set_message(format!("{}: crafting {} on {}", d.name, k.0, k.1));
            let acfg = &attack_cfgs[&(k.0.clone(), k.2.clone())];
            let sref = &surrogate_of[&k.1];
            let t0 = Instant::now();
            let mut r = rng::stream(cfg.seed, &[d.name.as_bytes(), k.0.as_bytes(), k.1.as_bytes(), k.2.as_bytes()]);
            let what = format!("surrogate {} on {}", k.1, d.name);
            let images = with_surrogate(&mut table, sref, |c| {
                let mut adv = Array4::<f32>::zeros(x.dim());
                let bs = cfg.batch_size.max(1);
                for a in (0..n).step_by(bs) {
                    let b = (a + bs).min(n);
                    let xa = acfg
                        .run(c, x.slice(s![a..b, .., .., ..]), &labels[a..b], None, &mut r)
                        .map_err(|e| RunError::Failed(format!("attack `{}` on {what}: {e}", k.0)))?;
                    adv.slice_mut(s![a..b, .., .., ..]).assign(&xa);
                }
                Ok(adv)
            })?;
            let craft_s = t0.elapsed().as_secs_f64();
            save_images(&ctx.out.join("adversarial").join(&d.name), &adv_file_name(&k), &images)?;
            let t0 = Instant::now();
            let surrogate = with_surrogate(&mut table, sref, |c| logits_of(c, &images, &what))?;
            let reference = match reference.as_mut() {
                Some(m) => Some(logits_of(m, &images, "reference model")?),
                None => None,
            };
            let eval_s = t0.elapsed().as_secs_f64();
            totals.add("craft", craft_s);
            totals.add("evaluate", eval_s);
            advs.insert(k, AdvSet { surrogate, reference, craft_s, eval_s, users: 1, images });
        }
        drop(table);

        // Merged targets: one per method, evaluated clean and on every adversarial batch.
        for m in &cfg.methods {
            let mine: Vec<&&Setting> = todo.iter().filter(|s| s.key.method == m.label).collect();
            if mine.is_empty() {
                continue;
            }
            if !merges.contains_key(&m.label) {
                pb.set_message(format!("merging {}", m.label));
                let t0 = Instant::now();
                let state = merge_once(ctx, m)?;
                let secs = t0.elapsed().as_secs_f64();
                totals.add("merge", secs);
                merges.insert(
                    m.label.clone(),
                    match state {
                        Ok(mg) => MergeState::Done(Box::new(mg), secs),
                        Err(reason) => MergeState::Skipped(reason),
                    },
                );
            }
            let (merged, merge_s) = match &merges[&m.label] {
                MergeState::Skipped(reason) => {
                    for s in &mine {
                        store.mark_skipped(hash, &s.key, reason)?;
                        summary.skipped.push((s.key.clone(), reason.clone()));
                        pb.inc(1);
                    }
                    continue;
                }
                MergeState::Done(mg, secs) => (mg, *secs),
            };
            pb.set_message(format!("{}: evaluating {}", d.name, m.label));
            let t0 = Instant::now();
            let mut target = merged.model(ctx.pool, t, ctx.rt.clone()).map_err(|e| RunError::Failed(e.to_string()))?;
            let what = format!("merged model {} on {}", m.label, d.name);
            let (logits, m_features) =
                target.forward(x.view()).map_err(|e| RunError::Failed(format!("{what}: {e}")))?;
            let m_clean = argmax(&logits);
            let m_grad = grad_of(&mut target, &x, &labels, &what)?;
            let bias = metrics::representation_bias(m_features.view(), ft_features.view())
                .map_err(|e| RunError::Failed(e.to_string()))?;
            let mut ga: BTreeMap<String, (GradientAlignment, Option<GradientAlignment>)> = BTreeMap::new();
            for (name, g) in &s_grad {
                let gm = metrics::gradient_alignment(g.view().into_dyn(), m_grad.view().into_dyn())
                    .map_err(|e| RunError::Failed(e.to_string()))?;
                let gr = match &r_grad {
                    Some(rg) => Some(
                        metrics::gradient_alignment(g.view().into_dyn(), rg.view().into_dyn())
                            .map_err(|e| RunError::Failed(e.to_string()))?,
                    ),
                    None => None,
                };
                ga.insert(name.clone(), (gm, gr));
            }
            let target_clean_s = t0.elapsed().as_secs_f64();
            totals.add("evaluate", target_clean_s);
            let mut preds = Preds { clean: m_clean, adv: BTreeMap::new() };

            for s in &mine {
                let k = (s.key.attack.clone(), s.key.surrogate.clone(), s.key.eps.clone());
                let adv = &advs[&k];
                let t0 = Instant::now();
                let p = logits_of(&mut target, &adv.images, &what)?;
                preds.adv.insert(k.clone(), p);
                let adv_eval_s = t0.elapsed().as_secs_f64();
                totals.add("evaluate", adv_eval_s);

                let t0 = Instant::now();
                let (gm, gr) = &ga[&s.key.surrogate];
                let inputs = SettingInputs {
                    labels: &labels,
                    surrogate: (&s_clean[&s.key.surrogate], &adv.surrogate),
                    target: (&preds.clean, &preds.adv[&k]),
                    reference: r_clean.as_deref().zip(adv.reference.as_deref()),
                    ga_merged: gm,
                    ga_reference: gr.as_ref(),
                    bias: &bias,
                };
                let metrics = compute_metrics(cfg.seed, &s.key, &inputs)?;
                let metrics_s = t0.elapsed().as_secs_f64();
                totals.add("metrics", metrics_s);

                let share = |secs: f64, users: usize| secs / users.max(1) as f64;
                let rec = SettingRecord {
                    key: s.key.clone(),
                    eps_value: s.eps_value,
                    n_images: n as u64,
                    needs_task_id: merged.needs_task_id(),
                    grad_align_merged_skipped: Some(gm.skipped as u64),
                    grad_align_reference_skipped: gr.as_ref().map(|g| g.skipped as u64),
                    metrics,
                    seconds: Phases {
                        merge: share(merge_s, per_method[m.label.as_str()]),
                        craft: share(adv.craft_s, adv.users),
                        evaluate: share(clean_s, todo.len())
                            + share(adv.eval_s, adv.users)
                            + share(target_clean_s, mine.len())
                            + adv_eval_s,
                    },
                };
                let extra = [("load", share(load_s, todo.len())), ("metrics", metrics_s)];
                store.insert_timed(hash, &rec, &extra)?;
                summary.finished += 1;
                let f = |e: &Estimate| e.value.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
                tracing::info!(
                    "{}: acc_merged {} asr_wb_all {} tasr_all {} rtasr_wb_all {} rtasr_ref_all {} rep_bias {}",
                    s.key,
                    f(&rec.metrics.acc_merged),
                    f(&rec.metrics.asr_wb_all),
                    f(&rec.metrics.tasr_all),
                    f(&rec.metrics.rtasr_wb_all),
                    f(&rec.metrics.rtasr_ref_all),
                    f(&rec.metrics.rep_bias)
                );
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    Ok(())
}

/// `<attack>__<surrogate>__<eps>.npy` with characters other than letters, digits, `-`, `.` and `_`
/// replaced by `_`.
pub fn adv_file_name(k: &AdvKey) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' }).collect()
    };
    format!("{}__{}__{}.npy", clean(&k.0), clean(&k.1), clean(&k.2))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    use std::io::Write;
    let io = |e: std::io::Error| RunError::Failed(format!("cannot write {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Save NCHW images in [0, 1] as `.npy`: u8 `[n, 3, h, w]` when every pixel is a multiple of
/// 1/255 (8-bit quantised adversarial images, clean images), else f32.
fn save_images(dir: &Path, name: &str, x: &Array4<f32>) -> Result<(), RunError> {
    let shape = [x.dim().0, x.dim().1, x.dim().2, x.dim().3];
    let bytes: Vec<u8> = x.iter().map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
    let exact = x.iter().zip(&bytes).all(|(&v, &b)| f32::from(b) / 255.0 == v);
    let npy = if exact {
        crate::data::npy::to_bytes("|u1", &shape, &bytes)
    } else {
        let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        crate::data::npy::to_bytes("<f4", &shape, &raw)
    };
    write_atomic(&dir.join(name), &npy)
}

/// Merge one method over the whole pool; `Ok(Err(reason))` when the method cannot merge a pool of
/// this size (e.g. `slerp`, which takes exactly two models, in a study of seven tasks).
fn merge_once<'p>(ctx: &Ctx<'p>, m: &super::config::MethodSpec) -> Result<Result<Merged<'p>, String>, RunError> {
    let data = if merging::needs_data(&m.name) { merge_data(ctx, &m.name)? } else { Vec::new() };
    let params = params_of(&m.params);
    let req = Request { method: &m.name, params: &params, seed: ctx.cfg.seed, data: &data, options: ctx.rt.clone() };
    match merging::merge(ctx.pool, &req) {
        Ok(mg) => {
            tracing::info!("merged {} in {:.2}s", m.label, mg.seconds);
            Ok(Ok(mg))
        }
        Err(e @ merging::MergingError::Merge(mergeattack_core::merge::MergeError::ModelCount { .. })) => {
            let reason = e.to_string();
            tracing::warn!("skipping the settings of method `{}`: {reason}", m.label);
            Ok(Err(reason))
        }
        Err(e) => Err(RunError::Failed(format!("merge method `{}`: {e}", m.label))),
    }
}

/// The per-image outcomes of one setting.
struct SettingInputs<'a> {
    labels: &'a [usize],
    /// (clean, adversarial) predictions.
    surrogate: (&'a [usize], &'a [usize]),
    target: (&'a [usize], &'a [usize]),
    reference: Option<(&'a [usize], &'a [usize])>,
    ga_merged: &'a GradientAlignment,
    ga_reference: Option<&'a GradientAlignment>,
    bias: &'a RepresentationBias,
}

/// Every metric of one setting with its seeded bootstrap 95% interval (METHODS.md).
fn compute_metrics(seed: u64, key: &SettingKey, i: &SettingInputs<'_>) -> Result<Metrics, RunError> {
    let n = i.labels.len();
    let fail = |e: metrics::MetricError| RunError::Failed(format!("setting {key}: {e}"));
    let so = Outcomes::new(i.labels, i.surrogate.0, i.surrogate.1).map_err(fail)?;
    let to = Outcomes::new(i.labels, i.target.0, i.target.1).map_err(fail)?;
    let ro = match i.reference {
        Some((c, a)) => Some(Outcomes::new(i.labels, c, a).map_err(fail)?),
        None => None,
    };
    let boot = |name: &str, stat: &dyn Fn(&[usize]) -> Option<f64>| -> Estimate {
        let labels: [&[u8]; 7] = [
            b"bootstrap",
            name.as_bytes(),
            key.dataset.as_bytes(),
            key.method.as_bytes(),
            key.attack.as_bytes(),
            key.surrogate.as_bytes(),
            key.eps.as_bytes(),
        ];
        match stats::bootstrap_ci_seeded(n, seed, &labels, stat) {
            Ok(ci) if ci.estimate.is_some() => Estimate { value: ci.estimate, lo: ci.lo, hi: ci.hi },
            _ => Estimate::na(),
        }
    };
    let one = |o: &Outcomes<'_>, f: fn(&Outcomes<'_>) -> Option<f64>, name: &str| {
        boot(name, &|idx: &[usize]| f(&o.select(idx).ok()?))
    };
    type Pair = fn(&Outcomes<'_>, &Outcomes<'_>) -> Result<Option<f64>, metrics::MetricError>;
    let two = |a: &Outcomes<'_>, b: &Outcomes<'_>, f: Pair, name: &str| {
        boot(name, &|idx: &[usize]| f(&a.select(idx).ok()?, &b.select(idx).ok()?).ok()?)
    };
    let mut m = Metrics {
        acc_surrogate: one(&so, metrics::acc, "acc_surrogate"),
        acc_merged: one(&to, metrics::acc, "acc_merged"),
        asr_wb_all: one(&so, metrics::asr_all, "asr_wb_all"),
        asr_wb_cc: one(&so, metrics::asr_cc, "asr_wb_cc"),
        tasr_all: one(&to, metrics::tasr_all, "tasr_all"),
        tasr_cc: one(&to, metrics::tasr_cc, "tasr_cc"),
        rtasr_wb_all: two(&so, &to, metrics::rtasr_wb_all, "rtasr_wb_all"),
        rtasr_wb_cc: two(&so, &to, metrics::rtasr_wb_cc, "rtasr_wb_cc"),
        transfer_rate: two(&so, &to, metrics::transfer_rate, "transfer_rate"),
        ..Metrics::default()
    };
    if let Some(ro) = &ro {
        m.acc_reference = one(ro, metrics::acc, "acc_reference");
        m.tasr_ref_all = one(ro, metrics::tasr_all, "tasr_ref_all");
        m.tasr_ref_cc = one(ro, metrics::tasr_cc, "tasr_ref_cc");
        m.rtasr_ref_all = two(&to, ro, metrics::rtasr_ref_all, "rtasr_ref_all");
        m.rtasr_ref_cc = two(&to, ro, metrics::rtasr_ref_cc, "rtasr_ref_cc");
    }
    let gm = &i.ga_merged.per_image;
    m.grad_align_merged = boot("grad_align_merged", &|idx: &[usize]| metrics::mean_defined_at(gm, idx));
    if let Some(gr) = i.ga_reference {
        let gr = &gr.per_image;
        m.grad_align_reference = boot("grad_align_reference", &|idx: &[usize]| metrics::mean_defined_at(gr, idx));
    }
    let bias = &i.bias.per_image;
    m.rep_bias = boot("rep_bias", &|idx: &[usize]| metrics::mean_at(bias, idx));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        let l = ndarray::array![[0.1f32, 0.5, 0.5], [2.0, -1.0, 0.0], [-3.0, -2.0, -2.5]];
        assert_eq!(argmax(&l), vec![1, 0, 1]);
    }

    /// The metrics of a setting from hand-made outcomes, against counts done by hand.
    #[test]
    fn metrics_of_a_setting_by_hand() {
        // 6 images. Surrogate: clean correct on 0..5, fooled on 0,1,2,3. Target: clean correct on
        // 0,1,2,4, fooled on 0,1,5. Reference: clean correct on all, fooled on 0.
        let y = [0usize, 1, 2, 0, 1, 2];
        let s = ([0usize, 1, 2, 0, 1, 0], [1usize, 2, 0, 1, 1, 2]);
        let t = ([0usize, 1, 2, 1, 1, 0], [1usize, 0, 2, 1, 1, 0]);
        let r = (y, [2usize, 1, 2, 0, 1, 2]);
        let per_image = vec![Some(0.25), None, Some(0.75), None, None, None];
        let g = GradientAlignment { mean: Some(0.5), used: 2, skipped: 4, per_image };
        let b = RepresentationBias { mean: Some(2.0), per_image: vec![1.0, 3.0, 1.0, 3.0, 1.0, 3.0] };
        let key = SettingKey {
            dataset: "d".into(),
            method: "m".into(),
            attack: "a".into(),
            surrogate: "finetuned".into(),
            eps: "8/255".into(),
        };
        let inputs = SettingInputs {
            labels: &y,
            surrogate: (&s.0, &s.1),
            target: (&t.0, &t.1),
            reference: Some((&r.0, &r.1)),
            ga_merged: &g,
            ga_reference: None,
            bias: &b,
        };
        let m = compute_metrics(7, &key, &inputs).unwrap();
        let v = |e: Estimate| e.value.unwrap();
        assert_eq!(v(m.acc_surrogate), 5.0 / 6.0);
        assert_eq!(v(m.acc_merged), 4.0 / 6.0);
        assert_eq!(v(m.acc_reference), 1.0);
        // Surrogate fooled (adv != y): images 0,1,2,3 -> 4/6; over its 5 clean-correct: 4/5.
        assert_eq!(v(m.asr_wb_all), 4.0 / 6.0);
        assert_eq!(v(m.asr_wb_cc), 4.0 / 5.0);
        // Target fooled: images 0,1,3,5 (adv 1,0,1,0 vs y 0,1,0,2) -> 4/6; over clean-correct
        // 0,1,2,4: fooled 0,1 -> 2/4.
        assert_eq!(v(m.tasr_all), 4.0 / 6.0);
        assert_eq!(v(m.tasr_cc), 2.0 / 4.0);
        assert_eq!(v(m.rtasr_wb_all), 1.0);
        assert_eq!(v(m.rtasr_wb_cc), (2.0 / 4.0) / (4.0 / 5.0));
        // Reference fooled: image 0 only.
        assert_eq!(v(m.tasr_ref_all), 1.0 / 6.0);
        assert_eq!(v(m.rtasr_ref_all), 4.0);
        // Both clean-correct: 0,1,2,4; S fooled among them: 0,1,2; T fooled among those: 0,1.
        assert_eq!(v(m.transfer_rate), 2.0 / 3.0);
        assert_eq!(v(m.grad_align_merged), 0.5);
        assert_eq!(m.grad_align_reference, Estimate::na());
        assert_eq!(v(m.rep_bias), 2.0);
        // Intervals bracket the estimate and are reproducible.
        let e = m.tasr_all;
        assert!(e.lo.unwrap() <= e.value.unwrap() && e.value.unwrap() <= e.hi.unwrap());
        assert_eq!(compute_metrics(7, &key, &inputs).unwrap(), m);
        assert_ne!(compute_metrics(8, &key, &inputs).unwrap().tasr_all.lo, None);
    }
}
