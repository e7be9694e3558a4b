//! ONNX Runtime sessions for the CLIP graphs: device and thread choice, weights bound as external
//! initializers ([`create_session`], the text tower), and [`Model`], the CLIP vision classifier
//! that implements [`mergeattack_core::classifier::Classifier`].
//!
//! One graph per architecture (cached per process, keyed by config, class count and outputs); one
//! session per purpose, created on first use: a forward pass never pays for a backward graph.
//! On the CPU a [`Model`] holds one copy of its weights (issue 3):
//! - the sessions attacks repeat (forward, loss + input gradient, logits VJP) read them as shared
//!   initializers in their forward nodes, which ONNX Runtime pre-packs once per model for all of
//!   them (`create_packed_session`), and feed them to their backward nodes as graph inputs
//!   (packing those too would add another copy): ~7% fewer CPU seconds per ViT-B/32 forward +
//!   input gradient, 1.7 GB peak at batch 32 (1.4 GB all fed; binding every weight per session
//!   as before, 2.6-2.8 GB);
//! - the other sessions (weight gradients, Grams: training) take every weight as a graph input fed
//!   with each run: no copies, made in milliseconds.
//!
//! [`Model::update_weights`] copies new values into the model's tensors and drops the packed
//! sessions (remade on next use); outputs stay bitwise deterministic for any thread count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use mergeattack_core::classifier::{Classifier, LossGrad, ModelError};
use mergeattack_core::tensor::ParamSet;
use ndarray::{Array1, Array2, Array4, ArrayD, ArrayView2, ArrayView4, IxDyn, s};
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorRef};

use crate::clip::config::{ClipVisionConfig, ConfigError};
use crate::clip::vision::{self, DwObjective, GRAD_PREFIX, VisionOutputs};
use crate::graph::{ElemType, Graph};
use crate::library::{self, LibraryError};
use crate::weights::{Checkpoint, Convention, WeightsError};

/// Where sessions run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// The CUDA execution provider; fails loudly when it cannot be registered.
    Cuda,
    /// CUDA when it can be registered, else the CPU (with a warning).
    Auto,
}

impl std::str::FromStr for Device {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(RuntimeError::Options(format!("unknown device `{s}` (expected cpu, cuda or auto)"))),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        })
    }
}

/// How sessions are made and inputs split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub device: Device,
    /// Intra-op threads of each session (default 2). Outputs do not depend on it.
    pub threads: usize,
    /// Images per session run; larger inputs are split (default 32).
    pub batch_size: usize,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions { device: Device::Cpu, threads: 2, batch_size: 32 }
    }
}

/// Everything that can go wrong loading or running a model; each message is one sentence that
/// names the file, tensor or value.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Library(#[from] LibraryError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("tensor `{name}` is missing in {source_name}{hint}")]
    MissingTensor { name: String, source_name: String, hint: String },
    #[error("tensor `{name}` has shape {got:?} in {source_name} but the model configuration needs {expected:?}")]
    TensorShape { name: String, source_name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Options(String),
    #[error("heads file {path}: {detail}")]
    Heads { path: String, detail: String },
    #[error("no config.json for {path}: pass --config (an HF CLIPModel or CLIPVisionModel config.json)")]
    NoConfig { path: String },
    #[error("the CUDA execution provider could not be registered: {0}")]
    Cuda(String),
    #[error("ONNX Runtime failed to {context}: {detail}")]
    Ort { context: String, detail: String },
}

impl RuntimeError {
    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> RuntimeError {
        let context = context.into();
        move |e| RuntimeError::Ort { context, detail: e.to_string() }
    }
}

impl From<RuntimeError> for ModelError {
    fn from(e: RuntimeError) -> ModelError {
        ModelError(e.to_string())
    }
}

/// Weights converted once into ONNX Runtime values, shared by every session of a model.
#[derive(Clone)]
pub struct BoundWeights {
    values: Vec<(String, Arc<DynValue>)>,
    shapes: Vec<Vec<usize>>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for BoundWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundWeights").field("tensors", &self.values.len()).finish()
    }
}

impl BoundWeights {
    /// Bind the graph's external initializers (`required`: names and static shapes) from `params`.
    /// A missing tensor or a shape mismatch is an error naming the tensor, `source_name` and both
    /// shapes; a NaN or infinity too. Tensors of `params` the graph does not use are ignored.
    pub fn bind(
        required: &[(String, Vec<usize>)],
        params: &ParamSet<'_>,
        source_name: &str,
        hint: impl Fn(&str) -> String,
    ) -> Result<BoundWeights, RuntimeError> {
        // ort loads its default library on first use of its API: load the pinned one first.
        library::environment()?;
        let mut values = Vec::with_capacity(required.len());
        let mut shapes = Vec::with_capacity(required.len());
        for (name, shape) in required {
            let Some(t) = params.get(name) else {
                return Err(RuntimeError::MissingTensor {
                    name: name.clone(),
                    source_name: source_name.into(),
                    hint: hint(name),
                });
            };
            if t.shape() != shape.as_slice() {
                return Err(RuntimeError::TensorShape {
                    name: name.clone(),
                    source_name: source_name.into(),
                    expected: shape.clone(),
                    got: t.shape().to_vec(),
                });
            }
            if let Some(index) = t.iter().position(|v| !v.is_finite()) {
                return Err(RuntimeError::Input(format!(
                    "tensor `{name}` in {source_name} holds a NaN or infinite value at flat index {index}"
                )));
            }
            let data: Vec<f32> = t.as_standard_layout().iter().copied().collect();
            let value =
                Tensor::from_array((shape.clone(), data)).map_err(RuntimeError::ort("create a weight tensor"))?;
            values.push((name.clone(), Arc::new(value.into_dyn())));
            shapes.push(shape.clone());
        }
        let index = values.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        Ok(BoundWeights { values, shapes, index })
    }

    /// The bound value called `name`.
    pub fn get(&self, name: &str) -> Option<&DynValue> {
        self.index.get(name).map(|&i| &*self.values[i].1)
    }

    /// The shared value called `name`; a missing one is an error naming it.
    fn value(&self, name: &str) -> Result<&Arc<DynValue>, RuntimeError> {
        self.index.get(name).map(|&i| &self.values[i].1).ok_or_else(|| RuntimeError::MissingTensor {
            name: name.into(),
            source_name: "the bound weights".into(),
            hint: String::new(),
        })
    }

    /// The shape `name` is bound with.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|&i| self.shapes[i].as_slice())
    }

    /// Overwrite the data of bound tensor `i` with `data` (same element count, standard order).
    /// The value is written in place when no session holds it, else replaced by a new value.
    fn overwrite(&mut self, i: usize, data: &ndarray::CowArray<'_, f32, IxDyn>) -> Result<(), RuntimeError> {
        let slot = &mut self.values[i].1;
        if let Some(v) = Arc::get_mut(slot) {
            let (_, dst) = v.try_extract_tensor_mut::<f32>().map_err(RuntimeError::ort("write a weight tensor"))?;
            match data.as_slice() {
                Some(src) => dst.copy_from_slice(src),
                None => dst.iter_mut().zip(data.iter()).for_each(|(d, s)| *d = *s),
            }
        } else {
            let flat: Vec<f32> = data.iter().copied().collect();
            let value = Tensor::from_array((self.shapes[i].clone(), flat))
                .map_err(RuntimeError::ort("create a weight tensor"))?;
            *slot = Arc::new(value.into_dyn());
        }
        Ok(())
    }

    /// Names of the bound tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.iter().map(|(n, _)| n.as_str())
    }
}

/// The external initializers of `graph` with their (fixed) shapes.
pub fn external_shapes(graph: &Graph) -> Vec<(String, Vec<usize>)> {
    let external = graph.external_initializers();
    graph
        .initializers()
        .into_iter()
        .filter(|(n, _)| external.contains(n))
        .map(|(n, dims)| {
            let shape = dims.iter().map(|d| d.fixed().expect("initializer shapes are fixed") as usize).collect();
            (n, shape)
        })
        .collect()
}

/// Register the execution provider `opts.device` asks for. Returns the device actually used.
fn register_device(
    builder: ort::session::builder::SessionBuilder,
    device: Device,
) -> Result<(ort::session::builder::SessionBuilder, Device), RuntimeError> {
    match device {
        Device::Cpu => Ok((builder, Device::Cpu)),
        #[cfg(feature = "cuda")]
        Device::Cuda | Device::Auto => {
            use ort::ep::ExecutionProvider;
            let why = if <ort::ep::CUDA as ExecutionProvider>::is_available().unwrap_or(false) {
                let mut builder = builder;
                match ort::ep::CUDA::default().with_device_id(0).register(&mut builder) {
                    Ok(()) => return Ok((builder, Device::Cuda)),
                    Err(e) if device == Device::Cuda => return Err(RuntimeError::Cuda(e.to_string())),
                    Err(e) => {
                        tracing::warn!("--device auto: CUDA could not be registered ({e}); running on the CPU");
                        return Ok((builder, Device::Cpu));
                    }
                }
            } else {
                "the loaded ONNX Runtime library has no CUDA execution provider (use the onnxruntime-gpu library via \
                 ORT_DYLIB_PATH, with the CUDA 13 and cuDNN 9 libraries on the loader path)"
            };
            if device == Device::Cuda {
                return Err(RuntimeError::Cuda(why.into()));
            }
            tracing::warn!("--device auto: {why}; running on the CPU");
            Ok((builder, Device::Cpu))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(RuntimeError::Cuda(
            "this build has no CUDA support (rebuild with `--features mergeattack-onnx/cuda`)".into(),
        )),
        #[cfg(not(feature = "cuda"))]
        Device::Auto => {
            tracing::warn!("--device auto: this build has no CUDA support; running on the CPU");
            Ok((builder, Device::Cpu))
        }
    }
}

/// A session builder with `opts`' threads, deterministic compute and spinning intra-op threads.
///
/// Spinning (ONNX Runtime's default, like OpenMP's in PyTorch): a thread that finishes its share
/// of one node's work spins briefly for the next before it sleeps. On the 2-core VM of the engine
/// benchmark it made a ViT-B/32 forward + input gradient 5-8% faster in wall time than sleeping
/// threads (alternated A/B passes, same CPU time, bitwise the same outputs). Where sessions share
/// few cores with other work, `MERGEATTACK_ORT_CONFIG=session.intra_op.allow_spinning=0` turns it
/// off (`scripts/test.sh` does, for tests that run side by side on a 2-core CI).
fn session_builder(opts: &RuntimeOptions) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    let env = library::environment()?;
    if opts.threads == 0 {
        return Err(RuntimeError::Options("--threads must be at least 1".into()));
    }
    let e = RuntimeError::ort("configure a session");
    let mut b = Session::builder(env).map_err(e)?;
    b = b.with_intra_threads(opts.threads).map_err(|e| RuntimeError::ort("set the thread count")(e.into()))?;
    b = b.with_inter_threads(1).map_err(|e| RuntimeError::ort("set the thread count")(e.into()))?;
    b = b.with_deterministic_compute(true).map_err(|e| RuntimeError::ort("ask for deterministic compute")(e.into()))?;
    b = b.with_intra_op_spinning(true).map_err(|e| RuntimeError::ort("turn on spinning")(e.into()))?;
    // Peak memory (issue 3): ONNX Runtime's CPU arena keeps every chunk it ever grew (a backward
    // pass of ViT-B/32 at batch 32 left ~1.2 GB resident and peaked ~1.3 GB above that), and the
    // memory pattern pre-plans one block per input shape. Without both, activations are allocated
    // and freed per tensor; outputs are unchanged and the cost was within the noise here.
    b = b.with_memory_pattern(false).map_err(|e| RuntimeError::ort("turn off the memory pattern")(e.into()))?;
    disable_cpu_arena(&mut b)?;
    keep_freed_memory();
    b = crate::graph::custom::register(b).map_err(RuntimeError::ort("register the fused backward kernels"))?;
    b = diagnostics(b)?;
    b = config_entries(b)?;
    Ok(b)
}

/// `MERGEATTACK_ORT_CONFIG=key=value,key=value` (a diagnostic for engine work, e.g. thread-pool
/// settings compared with `MERGEATTACK_BENCH_AB`): ONNX Runtime session configuration entries
/// set after the tool's own (`session.intra_op.allow_spinning=1` turns spinning back on).
fn config_entries(
    mut b: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    let Ok(list) = std::env::var("MERGEATTACK_ORT_CONFIG") else {
        return Ok(b);
    };
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((key, value)) = entry.split_once('=') else {
            return Err(RuntimeError::Options(format!("MERGEATTACK_ORT_CONFIG entry `{entry}` is not key=value")));
        };
        b = b
            .with_config_entry(key.trim(), value.trim())
            .map_err(|e| RuntimeError::ort(format!("set session option `{key}`"))(e.into()))?;
    }
    Ok(b)
}

/// `MERGEATTACK_FED_WEIGHTS=1` (a diagnostic for engine work, e.g. before/after comparisons in
/// one benchmark run): CPU sessions feed every weight with each run, none pre-packs.
fn fed_weights_forced() -> bool {
    std::env::var_os("MERGEATTACK_FED_WEIGHTS").is_some_and(|v| v == "1")
}

/// `MERGEATTACK_ORT_PROFILE=<prefix>` (a diagnostic for engine work): every session writes ONNX
/// Runtime's profile (`<prefix>-sN_<date>.json`, kernel times) and its optimised graph
/// (`<prefix>-sN.onnx`: which fusions applied), N counting the sessions of the process.
fn diagnostics(
    b: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    let Some(prefix) = std::env::var_os("MERGEATTACK_ORT_PROFILE") else {
        return Ok(b);
    };
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = format!("{}-s{k}", prefix.to_string_lossy());
    let e = |e: ort::Error| RuntimeError::Ort { context: "turn on profiling".into(), detail: e.to_string() };
    let b = b.with_profiling(&base).map_err(|x| e(x.into()))?;
    b.with_optimized_model_path(format!("{base}.onnx")).map_err(|x| e(x.into()))
}

/// Without the arena every activation is a `malloc`; glibc serves blocks above its mmap threshold
/// (128 KiB at first, [32, 50, 3072] f32 is 19.7 MB) with fresh `mmap`s and trims freed memory
/// at the top of the heap back to the kernel, so each run page-faulted and zeroed every large
/// activation again: 0.7 of 11.6 CPU seconds per ViT-B/32 forward + input gradient at batch 32
/// went to the kernel. Serving blocks up to 32 MiB (glibc's maximum) from the heap and keeping up
/// to 1 GiB of freed heap for reuse took that to 0.04 s with the same peak RSS (1749 vs 1764 MB).
/// Process-wide and set once; other allocators and platforms are left alone.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            unsafe extern "C" {
                fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
            }
            const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
            const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
            // SAFETY: mallopt only changes allocator tuning parameters; both values are in range.
            let ok = unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 };
            if !ok {
                tracing::debug!("mallopt refused the allocator settings; large activations stay mmapped");
            }
        });
    }
}

/// Turn off the CPU memory arena of the sessions `b` makes (ort has no safe wrapper for it).
fn disable_cpu_arena(b: &mut ort::session::builder::SessionBuilder) -> Result<(), RuntimeError> {
    use ort::AsPointer;
    let api = ort::api();
    // SAFETY: `b` owns a valid OrtSessionOptions for the duration of the call; a returned status
    // is ours to read and release.
    unsafe {
        let status = (api.DisableCpuMemArena)(b.ptr_mut());
        if !status.0.is_null() {
            let msg = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
            (api.ReleaseStatus)(status.0);
            return Err(RuntimeError::Ort { context: "turn off the CPU memory arena".into(), detail: msg });
        }
    }
    Ok(())
}

/// A session for a graph whose weights are graph inputs (fed with every run).
fn create_fed_session(bytes: &[u8], opts: &RuntimeOptions) -> Result<Session, RuntimeError> {
    let (mut b, _used) = register_device(session_builder(opts)?, opts.device)?;
    crate::graph::custom::commit(&mut b, bytes).map_err(RuntimeError::ort("create a session"))
}

/// A session for the graph `bytes` with `weights` as external initializers.
/// `required` names the external initializers the graph declares (all of `weights` when `None`).
pub fn create_session(
    bytes: &[u8],
    weights: &BoundWeights,
    required: Option<&[(String, Vec<usize>)]>,
    opts: &RuntimeOptions,
) -> Result<Session, RuntimeError> {
    let mut b = session_builder(opts)?;
    let chosen: Vec<&(String, Arc<DynValue>)> = match required {
        None => weights.values.iter().collect(),
        Some(req) => req
            .iter()
            .map(|(n, _)| {
                weights.values.iter().find(|(w, _)| w == n).ok_or_else(|| RuntimeError::MissingTensor {
                    name: n.clone(),
                    source_name: "the bound weights".into(),
                    hint: String::new(),
                })
            })
            .collect::<Result<_, _>>()?,
    };
    for (name, value) in chosen {
        b = b
            .with_external_initializer(name, Arc::clone(value))
            .map_err(|e| RuntimeError::ort(format!("bind weight `{name}`"))(e.into()))?;
    }
    let (mut b, _used) = register_device(b, opts.device)?;
    crate::graph::custom::commit(&mut b, bytes).map_err(RuntimeError::ort("create a session"))
}

/// A session for a graph from [`Graph::to_bytes_backward_weights_as_inputs`] whose forward reads
/// `weights` as shared initializers (no copy; ONNX Runtime pre-packs them for its matrix products,
/// once per model: `packed` holds the packed copies all such sessions of the model share) and
/// whose backward nodes read them from the `.bwd` graph inputs fed with every run.
///
/// Constant folding is off: it would turn each `Transpose(W)` into a new, unshared initializer
/// (a transposed copy per session, packed per session); without it ONNX Runtime fuses the
/// transpose into its matrix product, which packs the shared `W` itself.
fn create_packed_session(
    bytes: &[u8],
    weights: &BoundWeights,
    required: &[(String, Vec<usize>)],
    opts: &RuntimeOptions,
    packed: &ort::session::builder::PrepackedWeights,
) -> Result<Session, RuntimeError> {
    let mut b = session_builder(opts)?;
    b = b
        .with_disabled_optimizers("ConstantFolding")
        .map_err(|e| RuntimeError::ort("turn off constant folding")(e.into()))?;
    for (name, _) in required {
        let value = weights.value(name)?;
        // The graph declares its weights as external data: bind that first (else ONNX Runtime
        // looks for the file), then share the same buffer, which makes the packed copies shareable.
        b = b
            .with_external_initializer(name, Arc::clone(value))
            .map_err(|e| RuntimeError::ort(format!("bind weight `{name}`"))(e.into()))?;
        b = b
            .with_initializer(name, Arc::clone(value))
            .map_err(|e| RuntimeError::ort(format!("share weight `{name}`"))(e.into()))?;
    }
    b = b.with_prepacked_weights(packed).map_err(|e| RuntimeError::ort("share pre-packed weights")(e.into()))?;
    crate::graph::custom::commit(&mut b, bytes).map_err(RuntimeError::ort("create a session"))
}

/// Load weights from `path` (a safetensors file, or a directory holding `model.safetensors` or a
/// single `.safetensors` file) with their names turned into HF `CLIPModel` names (open_clip
/// converted, a prefix-less `CLIPVisionModel` given its `vision_model.` prefix). Returns the owned
/// tensors and the file actually read.
pub fn load_hf_params(path: &Path) -> Result<(ParamSet<'static>, PathBuf), RuntimeError> {
    let file = weights_file(path)?;
    let ck = Checkpoint::open(&file)?;
    let params = ck.params()?;
    let names: Vec<&str> = params.names().collect();
    let out = match Convention::detect(names.iter().copied()) {
        Some(Convention::OpenClip) => crate::weights::open_clip_to_hf(&params)?.into_owned(),
        Some(Convention::HfVision) => {
            let mut out = ParamSet::new();
            for (n, t) in params.iter() {
                let hf = if crate::weights::names::HF_VISION_ROOTS.iter().any(|r| n.starts_with(r)) {
                    format!("vision_model.{n}")
                } else {
                    n.to_string()
                };
                out.insert_owned(hf, t.to_owned());
            }
            out
        }
        _ => params.into_owned(),
    };
    Ok((out, file))
}

/// The safetensors file for a weights path (file, or directory with `model.safetensors` or exactly
/// one `.safetensors` file).
pub fn weights_file(path: &Path) -> Result<PathBuf, RuntimeError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let direct = path.join("model.safetensors");
    if direct.is_file() {
        return Ok(direct);
    }
    let shown = path.display().to_string();
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| WeightsError::Open { path: shown.clone(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(RuntimeError::Input(format!("directory {shown} holds no .safetensors file"))),
        _ => Err(RuntimeError::Input(format!(
            "directory {shown} holds several .safetensors files and no model.safetensors: name the file"
        ))),
    }
}

/// The vision config for weights at `path`: `config` when given, else `config.json` beside the
/// weights (in the directory itself when `path` is a directory).
pub fn vision_config_for(path: &Path, config: Option<&Path>) -> Result<ClipVisionConfig, RuntimeError> {
    if let Some(c) = config {
        return Ok(ClipVisionConfig::from_file(c)?);
    }
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
    let beside = dir.join("config.json");
    if beside.is_file() {
        return Ok(ClipVisionConfig::from_file(&beside)?);
    }
    Err(RuntimeError::NoConfig { path: path.display().to_string() })
}

/// Read one task's head (`[classes, projection_dim]`) from a heads safetensors file. With `task`
/// `None` the file must hold exactly one tensor.
pub fn load_head(path: &Path, task: Option<&str>) -> Result<(String, Array2<f32>), RuntimeError> {
    let shown = path.display().to_string();
    let ck = Checkpoint::open(path)?;
    let params = ck.params()?;
    let names: Vec<String> = params.names().map(String::from).collect();
    let name = match task {
        Some(t) => {
            if !params.contains(t) {
                return Err(RuntimeError::Heads {
                    path: shown,
                    detail: format!("no head for task `{t}` (it has: {})", names.join(", ")),
                });
            }
            t.to_string()
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(RuntimeError::Heads {
                path: shown,
                detail: format!("it holds {} heads ({}): choose one with --task", names.len(), names.join(", ")),
            });
        }
    };
    let t = params.get(&name).expect("checked above");
    if t.ndim() != 2 || t.shape()[0] == 0 {
        return Err(RuntimeError::Heads {
            path: shown,
            detail: format!("head `{name}` has shape {:?}, expected [classes, projection_dim]", t.shape()),
        });
    }
    if let Some(i) = t.iter().position(|v| !v.is_finite()) {
        return Err(RuntimeError::Heads {
            path: shown,
            detail: format!("head `{name}` holds a NaN or infinity at {i}"),
        });
    }
    let a = t.view().into_dimensionality::<ndarray::Ix2>().expect("2-D").to_owned();
    Ok((name, a))
}

/// CLIP's trained `logit_scale` (ln 100), used when a checkpoint has none (vision-only files).
pub const DEFAULT_LOGIT_SCALE: f32 = 4.605_170_2;

pub use vision::{HEAD, LOGIT_SCALE};

/// A tensor's name, shape and f32 data in standard (C) order.
pub type NamedData = (String, Vec<usize>, Vec<f32>);

/// A vision checkpoint read from disk in HF names, with its config.
#[derive(Debug)]
pub struct VisionWeights {
    pub config: ClipVisionConfig,
    pub params: ParamSet<'static>,
    /// The weights file, for messages.
    pub source: String,
}

impl VisionWeights {
    /// Read `weights` (file or directory, HF or open_clip names), its config (`config`, else
    /// `config.json` beside the weights) and fill tensors it lacks from `fallback`.
    pub fn load(weights: &Path, config: Option<&Path>, fallback: Option<&Path>) -> Result<VisionWeights, RuntimeError> {
        let cfg = vision_config_for(weights, config)?;
        let (mut params, file) = load_hf_params(weights)?;
        if let Some(fb) = fallback {
            let (base, _) = load_hf_params(fb)?;
            for (n, t) in base.iter() {
                if !params.contains(n) {
                    params.insert(n, t.clone());
                }
            }
        }
        Ok(VisionWeights { config: cfg, params, source: file.display().to_string() })
    }

    /// The rank of the Representation Surgery block these weights carry (`surgery.*` tensors of a
    /// `+surgery` merge), or `None`.
    pub fn surgery_rank(&self) -> Result<Option<usize>, RuntimeError> {
        surgery_rank_of(&self.config, &self.params, &self.source)
    }

    /// The weights of a vision graph with `head` bound and checked: every tensor of
    /// [`all_vision_weights_with_surgery`] with its shape (logit_scale defaulting to ln 100), in
    /// graph order.
    pub fn graph_params(&self, head: ArrayView2<'_, f32>) -> Result<Vec<NamedData>, RuntimeError> {
        let all = model_params(&self.config, &self.params, head, &self.source)?;
        let surgery = surgery_rank_of(&self.config, &all, &self.source)?;
        let mut out = Vec::new();
        for (name, shape) in all_vision_weights_with_surgery(&self.config, head.nrows(), surgery) {
            let t = all.get(&name).ok_or_else(|| RuntimeError::MissingTensor {
                name: name.clone(),
                source_name: self.source.clone(),
                hint: missing_hint(&name),
            })?;
            if t.shape() != shape.as_slice() {
                return Err(RuntimeError::TensorShape {
                    name,
                    source_name: self.source.clone(),
                    expected: shape,
                    got: t.shape().to_vec(),
                });
            }
            if let Some(index) = t.iter().position(|v| !v.is_finite()) {
                return Err(RuntimeError::Input(format!(
                    "tensor `{name}` in {} holds a NaN or infinite value at flat index {index}",
                    self.source
                )));
            }
            out.push((name, shape, t.as_standard_layout().iter().copied().collect()));
        }
        Ok(out)
    }
}

/// The rank of the Representation Surgery block the weights carry: a `surgery.down`
/// [rank, projection_dim] turns it on (`surgery.up` is then required with shape
/// [projection_dim, rank]; binding names what is wrong), no `surgery.down` means none.
fn surgery_rank_of(config: &ClipVisionConfig, all: &ParamSet<'_>, source: &str) -> Result<Option<usize>, RuntimeError> {
    match all.get(vision::SURGERY_DOWN) {
        None => Ok(None),
        Some(t) if t.ndim() == 2 && t.shape()[0] > 0 => Ok(Some(t.shape()[0])),
        Some(t) => Err(RuntimeError::TensorShape {
            name: vision::SURGERY_DOWN.into(),
            source_name: source.into(),
            expected: vec![1, config.projection_dim],
            got: t.shape().to_vec(),
        }),
    }
}

fn missing_hint(n: &str) -> String {
    if n == "visual_projection.weight" {
        " (vision-only checkpoints lack it: take it from the pretrained CLIPModel, e.g. with --base)".to_string()
    } else {
        String::new()
    }
}

/// The vision tensors of `params` plus the head and logit_scale (ln 100 when absent; a [1]-shaped
/// scale becomes a scalar), checked against the config's projection size.
fn model_params<'p>(
    config: &ClipVisionConfig,
    params: &'p ParamSet<'_>,
    head: ArrayView2<'_, f32>,
    name: &str,
) -> Result<ParamSet<'p>, RuntimeError> {
    config.validate()?;
    let classes = head.nrows();
    if classes == 0 || head.ncols() != config.projection_dim {
        return Err(RuntimeError::Input(format!(
            "the head has shape {:?} but the model needs [classes, {}] (projection_dim)",
            head.shape(),
            config.projection_dim
        )));
    }
    let mut all = ParamSet::new();
    for (n, t) in params.iter() {
        if n.starts_with("vision_model.")
            || n == "visual_projection.weight"
            || n == LOGIT_SCALE
            || n.starts_with("surgery.")
        {
            all.insert_view(n, t.view());
        }
    }
    if !all.contains(LOGIT_SCALE) {
        tracing::info!("{name} has no logit_scale; using CLIP's ln 100");
        all.insert_owned(LOGIT_SCALE, ArrayD::from_elem(IxDyn(&[]), DEFAULT_LOGIT_SCALE));
    } else if all.get(LOGIT_SCALE).is_some_and(|t| t.len() == 1 && t.ndim() != 0) {
        let v = all.get(LOGIT_SCALE).expect("present").iter().copied().next().expect("one value");
        all.insert_owned(LOGIT_SCALE, ArrayD::from_elem(IxDyn(&[]), v));
    }
    all.insert_owned(HEAD, head.to_owned().into_dyn());
    Ok(all)
}

/// What a session of a [`Model`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Purpose {
    /// logits, features
    Forward,
    /// logits, loss, dx
    LossGrad,
    /// logits, dx from dlogits
    Vjp,
    /// logits, loss, grad.* of the summed loss
    WeightGrad,
    /// logits, grad.* of sum(dlogits * logits)
    WeightVjp,
    /// logits, entropy, grad.* of the weighted sum of masked row entropies (AdaMerging)
    WeightEntropy,
    /// logits, gram.*
    Grams,
}

impl Purpose {
    /// Whether sessions for this purpose pre-pack the weights (see [`create_packed_session`]).
    fn packs_weights(self) -> bool {
        matches!(self, Purpose::Forward | Purpose::LossGrad | Purpose::Vjp)
    }

    fn outputs(self, surgery: Option<usize>) -> VisionOutputs {
        let mut o = VisionOutputs { logits: true, surgery, ..Default::default() };
        match self {
            Purpose::Forward => o.features = true,
            Purpose::LossGrad => {
                o.loss = true;
                o.dx = true;
            }
            Purpose::Vjp => o.dx_dlogits = true,
            Purpose::WeightGrad => {
                o.loss = true;
                o.dw = Some(DwObjective::LossSum);
            }
            Purpose::WeightVjp => o.dw = Some(DwObjective::Dlogits),
            Purpose::WeightEntropy => {
                o.entropy = true;
                o.dw = Some(DwObjective::Entropy);
            }
            Purpose::Grams => {
                o.logits = false;
                o.grams = true;
            }
        }
        o
    }
}

/// The weights a gradient graph differentiates: sorted names, `None` for all of them.
type Subset = Option<Vec<String>>;

type GraphKey = (String, usize, Option<usize>, Purpose, Subset);

/// A serialised graph with the external initializers it needs and its output names.
struct CachedGraph {
    /// The graph with its weights as external initializers (bound at session creation).
    bytes: Vec<u8>,
    /// The graph with its weights as inputs after the regular ones.
    fed_bytes: Vec<u8>,
    /// The graph whose forward reads the weights as initializers and whose backward reads them
    /// from inputs (`aliases`: input name, weight name).
    packed_bytes: Vec<u8>,
    aliases: Vec<(String, String)>,
    required: Vec<(String, Vec<usize>)>,
    outputs: Vec<String>,
}

/// The graph for an architecture, class count, surgery rank, purpose and (for weight gradients)
/// subset of weights to differentiate, built once per process.
fn cached_graph(
    cfg: &ClipVisionConfig,
    classes: usize,
    surgery: Option<usize>,
    purpose: Purpose,
    subset: &Subset,
) -> Result<Arc<CachedGraph>, RuntimeError> {
    static CACHE: OnceLock<Mutex<HashMap<GraphKey, Arc<CachedGraph>>>> = OnceLock::new();
    let key = (serde_json::to_string(cfg).expect("config serialises"), classes, surgery, purpose, subset.clone());
    let cache = CACHE.get_or_init(Default::default);
    if let Some(g) = cache.lock().expect("graph cache").get(&key) {
        return Ok(Arc::clone(g));
    }
    let outputs = VisionOutputs { dw_wrt: subset.clone(), ..purpose.outputs(surgery) };
    let g = vision::build_vision(cfg, classes, &outputs, ElemType::F32)?;
    let entry = Arc::new(CachedGraph {
        bytes: g.to_bytes(),
        fed_bytes: g.to_bytes_weights_as_inputs(),
        packed_bytes: g.to_bytes_backward_weights_as_inputs(),
        aliases: g.backward_weight_aliases(),
        required: external_shapes(&g),
        outputs: g.output_names(),
    });
    cache.lock().expect("graph cache").insert(key, Arc::clone(&entry));
    Ok(entry)
}

/// Every weight a vision model of `cfg` with `classes` classes binds, with its shape.
pub fn all_vision_weights(cfg: &ClipVisionConfig, classes: usize) -> Vec<(String, Vec<usize>)> {
    let mut v = vision::vision_weight_shapes(cfg);
    v.push((HEAD.into(), vec![classes, cfg.projection_dim]));
    v.push((LOGIT_SCALE.into(), vec![]));
    v
}

/// [`all_vision_weights`] plus the Representation Surgery module of rank `surgery`, if any
/// (`surgery.down` `[rank, projection_dim]`, `surgery.up` `[projection_dim, rank]`).
pub fn all_vision_weights_with_surgery(
    cfg: &ClipVisionConfig,
    classes: usize,
    surgery: Option<usize>,
) -> Vec<(String, Vec<usize>)> {
    let mut v = all_vision_weights(cfg, classes);
    if let Some(r) = surgery {
        v.push((vision::SURGERY_DOWN.into(), vec![r, cfg.projection_dim]));
        v.push((vision::SURGERY_UP.into(), vec![cfg.projection_dim, r]));
    }
    v
}

/// A CLIP vision classifier on ONNX Runtime.
pub struct Model {
    config: ClipVisionConfig,
    classes: usize,
    /// Rank of the Representation Surgery block applied to the feature (`surgery.*` weights).
    surgery: Option<usize>,
    opts: RuntimeOptions,
    weights: BoundWeights,
    sessions: HashMap<(Purpose, Subset), (Session, Arc<CachedGraph>, bool)>,
    /// No session pre-packs (MERGEATTACK_FED_WEIGHTS=1 when the model was made; tests).
    force_fed: bool,
    /// The pre-packed weights the packed sessions share (made with the first of them).
    packed: Option<ort::session::builder::PrepackedWeights>,
    /// Weights fed as inputs with every run (the CPU); else bound as initializers at session
    /// creation (CUDA and auto: fed host weights would cross to the device on every run).
    fed: bool,
    name: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("name", &self.name).field("classes", &self.classes).finish()
    }
}

/// Weight gradients or Gram matrices by name (`grad.<weight>` / `gram.<weight>`).
pub type NamedTensors = Vec<(String, ArrayD<f32>)>;

impl Model {
    /// A model from HF-named vision weights (`vision_model.*`, `visual_projection.weight`, and
    /// optionally `logit_scale`), a head `[classes, projection_dim]` and options. `name` appears in
    /// error messages (e.g. the file the weights came from).
    pub fn from_params(
        config: ClipVisionConfig,
        params: &ParamSet<'_>,
        head: ArrayView2<'_, f32>,
        opts: RuntimeOptions,
        name: &str,
    ) -> Result<Model, RuntimeError> {
        if opts.batch_size == 0 {
            return Err(RuntimeError::Options("--batch-size must be at least 1".into()));
        }
        let all = model_params(&config, params, head, name)?;
        let classes = head.nrows();
        let surgery = surgery_rank_of(&config, &all, name)?;
        let hint = missing_hint;
        let weights =
            BoundWeights::bind(&all_vision_weights_with_surgery(&config, classes, surgery), &all, name, hint)?;
        let fed = opts.device == Device::Cpu;
        Ok(Model {
            config,
            classes,
            surgery,
            opts,
            weights,
            sessions: HashMap::new(),
            force_fed: fed_weights_forced(),
            packed: None,
            fed,
            name: name.into(),
        })
    }

    /// Load weights (see [`load_hf_params`]), the config (`config` or `config.json` beside the
    /// weights), tensors missing from the weights file taken from `fallback` (e.g. the pretrained
    /// `CLIPModel` for a fine-tuned vision-only file), and one task's head.
    pub fn load(
        weights: &Path,
        config: Option<&Path>,
        fallback: Option<&Path>,
        heads: &Path,
        task: Option<&str>,
        opts: RuntimeOptions,
    ) -> Result<Model, RuntimeError> {
        let v = VisionWeights::load(weights, config, fallback)?;
        let (_, head) = load_head(heads, task)?;
        Model::from_params(v.config, &v.params, head.view(), opts, &v.source)
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The rank of the model's Representation Surgery block, if it has one.
    pub fn surgery_rank(&self) -> Option<usize> {
        self.surgery
    }

    pub fn options(&self) -> &RuntimeOptions {
        &self.opts
    }

    /// The graph bytes and weights of this model (for export and tests).
    pub fn bound_weights(&self) -> &BoundWeights {
        &self.weights
    }

    /// Create the session for `purpose` (and weight subset) now (it is otherwise made on first use).
    fn session(&mut self, purpose: Purpose, subset: &Subset) -> Result<(), RuntimeError> {
        let key = (purpose, subset.clone());
        if !self.sessions.contains_key(&key) {
            let graph = cached_graph(&self.config, self.classes, self.surgery, purpose, subset)?;
            let t = std::time::Instant::now();
            // The purposes attacks repeat read pre-packed weights in their forward (issue 3: 5-6%
            // fewer CPU seconds per forward + input gradient on ViT-B/32); the rest stay fed.
            let packed = self.fed && subset.is_none() && purpose.packs_weights() && !self.force_fed;
            let s = if packed {
                let pp = self.packed.get_or_insert_with(ort::session::builder::PrepackedWeights::new).clone();
                create_packed_session(&graph.packed_bytes, &self.weights, &graph.required, &self.opts, &pp)?
            } else if self.fed {
                create_fed_session(&graph.fed_bytes, &self.opts)?
            } else {
                create_session(&graph.bytes, &self.weights, Some(&graph.required), &self.opts)?
            };
            tracing::debug!("{:?} session for {} in {:.2?}", purpose, self.name, t.elapsed());
            self.sessions.insert(key, (s, graph, packed));
        }
        Ok(())
    }

    /// Replace the values of some or all weights (HF names as in [`Model::from_params`], plus
    /// [`HEAD`] and [`LOGIT_SCALE`]) without rebuilding any session: on the CPU the weights are
    /// graph inputs fed with every run, so this only copies the new values into the model's
    /// tensors. Outputs afterwards are bitwise those of a model built from scratch with the new
    /// weights. (On CUDA the sessions hold the weights and are remade on next use.)
    ///
    /// Every tensor of `params` must be a weight of the model with its bound shape (a `[1]`
    /// logit_scale is taken as the scalar) and finite; otherwise nothing changes and the error
    /// names the tensor.
    pub fn update_weights(&mut self, params: &ParamSet<'_>) -> Result<(), RuntimeError> {
        let source = format!("the weight update of {}", self.name);
        let mut slots = Vec::with_capacity(params.len());
        for (name, t) in params.iter() {
            let Some(&i) = self.weights.index.get(name) else {
                return Err(RuntimeError::Input(format!(
                    "tensor `{name}` in {source} is not a weight of the model (expected HF CLIP vision names, \
                     `{HEAD}` or `{LOGIT_SCALE}`)"
                )));
            };
            let want = &self.weights.shapes[i];
            let scalar = name == LOGIT_SCALE && want.is_empty() && t.len() == 1 && t.ndim() == 1;
            if t.shape() != want.as_slice() && !scalar {
                return Err(RuntimeError::TensorShape {
                    name: name.into(),
                    source_name: source,
                    expected: want.clone(),
                    got: t.shape().to_vec(),
                });
            }
            if let Some(index) = t.iter().position(|v| !v.is_finite()) {
                return Err(RuntimeError::Input(format!(
                    "tensor `{name}` in {source} holds a NaN or infinite value at flat index {index}"
                )));
            }
            slots.push((i, t));
        }
        if !self.fed {
            self.sessions.clear();
        } else {
            // Packed sessions hold the old values (and their packed copies): remade on next use.
            self.sessions.retain(|_, (_, _, packed)| !*packed);
            self.packed = None;
        }
        for (i, t) in slots {
            self.weights.overwrite(i, t)?;
        }
        Ok(())
    }

    /// Create the forward session now (session creation is otherwise lazy); returns its duration.
    pub fn warm_up(&mut self) -> Result<std::time::Duration, RuntimeError> {
        let t = std::time::Instant::now();
        self.session(Purpose::Forward, &None)?;
        Ok(t.elapsed())
    }

    fn check_images(&self, x: &ArrayView4<'_, f32>) -> Result<(), RuntimeError> {
        let c = &self.config;
        let want = (c.num_channels, c.image_size, c.image_size);
        let (n, ch, h, w) = x.dim();
        if n == 0 {
            return Err(RuntimeError::Input("the image batch is empty".into()));
        }
        if (ch, h, w) != want {
            return Err(RuntimeError::Input(format!(
                "images have shape [{n}, {ch}, {h}, {w}] but the model takes [N, {}, {}, {}] ({} channels, {}x{} pixels)",
                want.0, want.1, want.2, want.0, want.1, want.2
            )));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(RuntimeError::Input(format!(
                "image {} holds a NaN or infinite pixel (flat index {i} of the batch)",
                i / (ch * h * w)
            )));
        }
        Ok(())
    }

    fn check_labels(&self, labels: &[usize], n: usize) -> Result<Vec<i64>, RuntimeError> {
        if labels.len() != n {
            return Err(RuntimeError::Input(format!("{} labels for {n} images", labels.len())));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| **l >= self.classes) {
            return Err(RuntimeError::Input(format!(
                "label {l} of image {i} is out of range for a head with {} classes",
                self.classes
            )));
        }
        Ok(labels.iter().map(|&l| l as i64).collect())
    }

    fn check_dlogits(&self, d: &ArrayView2<'_, f32>, n: usize) -> Result<(), RuntimeError> {
        if d.dim() != (n, self.classes) {
            return Err(RuntimeError::Input(format!(
                "dlogits have shape {:?} but the batch needs [{n}, {}]",
                d.shape(),
                self.classes
            )));
        }
        if d.iter().any(|v| !v.is_finite()) {
            return Err(RuntimeError::Input("dlogits hold a NaN or infinite value".into()));
        }
        Ok(())
    }

    /// Run `purpose` on one chunk; returns the requested outputs by name.
    fn run_chunk(
        &mut self,
        purpose: Purpose,
        x: ArrayView4<'_, f32>,
        labels: Option<&[i64]>,
        dlogits: Option<ArrayView2<'_, f32>>,
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>, RuntimeError> {
        self.run_chunk_with(purpose, &None, x, labels, dlogits, &[], outputs)
    }

    /// [`Model::run_chunk`] for the gradients of a weight subset, with extra float inputs.
    #[allow(clippy::too_many_arguments)]
    fn run_chunk_with(
        &mut self,
        purpose: Purpose,
        subset: &Subset,
        x: ArrayView4<'_, f32>,
        labels: Option<&[i64]>,
        dlogits: Option<ArrayView2<'_, f32>>,
        extra: &[(&'static str, ndarray::ArrayViewD<'_, f32>)],
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>, RuntimeError> {
        let x = x.as_standard_layout();
        let n = x.dim().0;
        let mut inputs: Vec<(std::borrow::Cow<'static, str>, ort::session::SessionInputValue<'_>)> = Vec::new();
        let xv = TensorRef::from_array_view(x.view()).map_err(RuntimeError::ort("wrap the images"))?;
        inputs.push(("pixels".into(), xv.into()));
        if let Some(l) = labels {
            let lv = TensorRef::from_array_view(([n], l)).map_err(RuntimeError::ort("wrap the labels"))?;
            inputs.push(("labels".into(), lv.into()));
        }
        let d_std = dlogits.map(|d| d.as_standard_layout().into_owned());
        if let Some(d_std) = &d_std {
            let dv = TensorRef::from_array_view(d_std.view()).map_err(RuntimeError::ort("wrap dlogits"))?;
            inputs.push(("dlogits".into(), dv.into()));
        }
        let extra_std: Vec<_> = extra.iter().map(|(n, v)| (*n, v.as_standard_layout())).collect();
        for (name, v) in &extra_std {
            let tv = TensorRef::from_array_view(v.view()).map_err(RuntimeError::ort(format!("wrap {name}")))?;
            inputs.push(((*name).into(), tv.into()));
        }
        self.session(purpose, subset)?;
        let key = (purpose, subset.clone());
        let (session, graph, packed) = self.sessions.get_mut(&key).expect("made above");
        if *packed {
            for (input, name) in &graph.aliases {
                inputs.push((input.clone().into(), (&**self.weights.value(name)?).into()));
            }
        } else if self.fed {
            for (name, _) in &graph.required {
                inputs.push((name.clone().into(), (&**self.weights.value(name)?).into()));
            }
        }
        let out = session.run(inputs).map_err(RuntimeError::ort("run the model"))?;
        let mut res = Vec::with_capacity(outputs.len());
        for name in outputs {
            let v = out.get(*name).ok_or_else(|| RuntimeError::Ort {
                context: "run the model".into(),
                detail: format!("no output `{name}`"),
            })?;
            let a = v.try_extract_array::<f32>().map_err(RuntimeError::ort(format!("read output `{name}`")))?;
            res.push(a.to_owned());
        }
        Ok(res)
    }

    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> + use<> {
        let b = self.opts.batch_size;
        (0..n.div_ceil(b)).map(move |i| (i * b, ((i + 1) * b).min(n)))
    }

    /// Logits and features `[N, projection_dim]` in one forward pass.
    pub fn forward(&mut self, x: ArrayView4<'_, f32>) -> Result<(Array2<f32>, Array2<f32>), RuntimeError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        let mut logits = Array2::zeros((n, self.classes));
        let mut feats = Array2::zeros((n, self.config.projection_dim));
        for (a, b) in self.chunks(n) {
            let r =
                self.run_chunk(Purpose::Forward, x.slice(s![a..b, .., .., ..]), None, None, &["logits", "features"])?;
            logits.slice_mut(s![a..b, ..]).assign(&to2(&r[0])?);
            feats.slice_mut(s![a..b, ..]).assign(&to2(&r[1])?);
        }
        Ok((logits, feats))
    }

    /// Weight gradients of the summed per-sample cross-entropy over the whole batch (chunks are
    /// summed in order), named `grad.<weight name>`; also returns the summed loss. `weights`
    /// selects which gradients to return (`None`: all).
    pub fn weight_grads(
        &mut self,
        x: ArrayView4<'_, f32>,
        labels: &[usize],
        weights: Option<&[&str]>,
    ) -> Result<(f64, NamedTensors), RuntimeError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        let labels = self.check_labels(labels, n)?;
        let (subset, names) = self.grad_subset(weights)?;
        let mut out: Vec<(String, ArrayD<f32>)> = Vec::new();
        let mut total = 0.0f64;
        let mut wanted: Vec<&str> = vec!["loss"];
        wanted.extend(names.iter().map(String::as_str));
        for (a, b) in self.chunks(n) {
            let xs = x.slice(s![a..b, .., .., ..]);
            let r = self.run_chunk_with(Purpose::WeightGrad, &subset, xs, Some(&labels[a..b]), None, &[], &wanted)?;
            total += r[0].iter().map(|&v| f64::from(v)).sum::<f64>();
            accumulate(&mut out, &names, r.into_iter().skip(1));
        }
        Ok((total, out))
    }

    /// Weight gradients of sum(dlogits * logits) (Fisher information, custom losses).
    pub fn weight_vjp(
        &mut self,
        x: ArrayView4<'_, f32>,
        dlogits: ArrayView2<'_, f32>,
        weights: Option<&[&str]>,
    ) -> Result<NamedTensors, RuntimeError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        self.check_dlogits(&dlogits, n)?;
        let (subset, names) = self.grad_subset(weights)?;
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut out: Vec<(String, ArrayD<f32>)> = Vec::new();
        for (a, b) in self.chunks(n) {
            let d = dlogits.slice(s![a..b, ..]);
            let xs = x.slice(s![a..b, .., .., ..]);
            let r = self.run_chunk_with(Purpose::WeightVjp, &subset, xs, None, Some(d), &[], &wanted)?;
            accumulate(&mut out, &names, r.into_iter());
        }
        Ok(out)
    }

    /// AdaMerging's objective in one pass per chunk: each row's entropy of the softmax over its
    /// selected columns (`mask` `[N, classes]`, 1 selected / 0 not, at least one per row; e.g. the
    /// task's block of a stacked multi-task head), and the weight gradients of
    /// `sum_i row_weights[i] * H_i` (chunks summed in order), named `grad.<weight name>`.
    /// `weights` selects the gradients (`None`: all); only those are computed.
    pub fn entropy_weight_grads(
        &mut self,
        x: ArrayView4<'_, f32>,
        mask: ArrayView2<'_, f32>,
        row_weights: &[f32],
        weights: Option<&[&str]>,
    ) -> Result<(Array1<f32>, NamedTensors), RuntimeError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        if mask.dim() != (n, self.classes) {
            return Err(RuntimeError::Input(format!(
                "the column mask has shape {:?} but the batch needs [{n}, {}]",
                mask.shape(),
                self.classes
            )));
        }
        if mask.iter().any(|&v| v != 0.0 && v != 1.0) {
            return Err(RuntimeError::Input("the column mask holds a value other than 0 and 1".into()));
        }
        if let Some(i) = mask.outer_iter().position(|r| r.iter().all(|&v| v == 0.0)) {
            return Err(RuntimeError::Input(format!("row {i} of the column mask selects no class")));
        }
        if row_weights.len() != n {
            return Err(RuntimeError::Input(format!("{} row weights for {n} images", row_weights.len())));
        }
        if let Some(i) = row_weights.iter().position(|v| !v.is_finite()) {
            return Err(RuntimeError::Input(format!("row weight {i} is NaN or infinite")));
        }
        let (subset, names) = self.grad_subset(weights)?;
        let mut wanted: Vec<&str> = vec![vision::ENTROPY];
        wanted.extend(names.iter().map(String::as_str));
        let mut entropy = Array1::zeros(n);
        let mut out: Vec<(String, ArrayD<f32>)> = Vec::new();
        for (a, b) in self.chunks(n) {
            let xs = x.slice(s![a..b, .., .., ..]);
            let m = mask.slice(s![a..b, ..]).into_dyn();
            let w = ndarray::ArrayView1::from(&row_weights[a..b]).into_dyn();
            let extra = [(vision::COLUMN_MASK, m), (vision::ROW_WEIGHTS, w)];
            let r = self.run_chunk_with(Purpose::WeightEntropy, &subset, xs, None, None, &extra, &wanted)?;
            let mut r = r.into_iter();
            let h = r
                .next()
                .expect("entropy")
                .into_dimensionality::<ndarray::Ix1>()
                .map_err(|e| RuntimeError::Ort { context: "read the entropy".into(), detail: e.to_string() })?;
            entropy.slice_mut(s![a..b]).assign(&h);
            accumulate(&mut out, &names, r);
        }
        Ok((entropy, out))
    }

    /// The gradient graph's weight subset for a request (sorted; `None` when it is every weight)
    /// and the `grad.*` output names in the order asked. A name that is not a weight of the model
    /// is an error naming it.
    fn grad_subset(&self, weights: Option<&[&str]>) -> Result<(Subset, Vec<String>), RuntimeError> {
        let all: Vec<String> = all_vision_weights_with_surgery(&self.config, self.classes, self.surgery)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let Some(ws) = weights else {
            return Ok((None, all.iter().map(|w| format!("{GRAD_PREFIX}{w}")).collect()));
        };
        if let Some(bad) = ws.iter().find(|w| !all.iter().any(|a| a == *w)) {
            return Err(RuntimeError::Input(format!("the model has no output `{GRAD_PREFIX}{bad}`")));
        }
        let mut subset: Vec<String> = ws.iter().map(|w| w.to_string()).collect();
        subset.sort();
        subset.dedup();
        let names = ws.iter().map(|w| format!("{GRAD_PREFIX}{w}")).collect();
        Ok((if subset.len() == all.len() { None } else { Some(subset) }, names))
    }

    /// RegMean Gram matrices `gram.<linear weight>`: the mean of X^T X over all token rows of all
    /// images (chunks combined with their row counts).
    pub fn grams(&mut self, x: ArrayView4<'_, f32>) -> Result<NamedTensors, RuntimeError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        let names = self.grad_names(None, "gram.")?;
        let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut out: Vec<(String, ArrayD<f32>)> = Vec::new();
        for (a, b) in self.chunks(n) {
            let w = (b - a) as f32 / n as f32;
            let r = self.run_chunk(Purpose::Grams, x.slice(s![a..b, .., .., ..]), None, None, &wanted)?;
            accumulate(&mut out, &names, r.into_iter().map(|t| t * w));
        }
        Ok(out)
    }

    /// The output names of a purpose with a prefix (`grad.`/`gram.`), filtered by `weights`.
    fn grad_names(&self, weights: Option<&[&str]>, prefix: &str) -> Result<Vec<String>, RuntimeError> {
        let purpose = if prefix == "gram." { Purpose::Grams } else { Purpose::WeightGrad };
        let g = cached_graph(&self.config, self.classes, self.surgery, purpose, &None)?;
        let all: Vec<String> = g.outputs.iter().filter(|o| o.starts_with(prefix)).cloned().collect();
        match weights {
            None => Ok(all),
            Some(ws) => ws
                .iter()
                .map(|w| {
                    let n = format!("{prefix}{w}");
                    if all.contains(&n) {
                        Ok(n)
                    } else {
                        Err(RuntimeError::Input(format!("the model has no output `{n}`")))
                    }
                })
                .collect(),
        }
    }
}

fn accumulate(out: &mut Vec<(String, ArrayD<f32>)>, names: &[String], values: impl Iterator<Item = ArrayD<f32>>) {
    for (i, v) in values.enumerate() {
        if let Some((_, acc)) = out.get_mut(i) {
            *acc += &v;
        } else {
            out.push((names[i].clone(), v));
        }
    }
}

fn to2(a: &ArrayD<f32>) -> Result<ArrayView2<'_, f32>, RuntimeError> {
    a.view()
        .into_dimensionality()
        .map_err(|e| RuntimeError::Ort { context: "read an output".into(), detail: e.to_string() })
}

fn to4(a: ArrayD<f32>) -> Result<Array4<f32>, RuntimeError> {
    a.into_dimensionality().map_err(|e| RuntimeError::Ort { context: "read an output".into(), detail: e.to_string() })
}

impl Classifier for Model {
    fn num_classes(&self) -> usize {
        self.classes
    }

    fn image_shape(&self) -> (usize, usize, usize) {
        (self.config.num_channels, self.config.image_size, self.config.image_size)
    }

    fn logits(&mut self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>, ModelError> {
        Ok(self.forward(x)?.0)
    }

    fn loss_grad(&mut self, x: ArrayView4<'_, f32>, labels: &[usize]) -> Result<LossGrad, ModelError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        let labels = self.check_labels(labels, n)?;
        let mut logits = Array2::zeros((n, self.classes));
        let mut loss = Array1::zeros(n);
        let mut grad = Array4::zeros(x.raw_dim());
        for (a, b) in self.chunks(n) {
            let xs = x.slice(s![a..b, .., .., ..]);
            let r = self.run_chunk(Purpose::LossGrad, xs, Some(&labels[a..b]), None, &["logits", "loss", "dx"])?;
            let mut r = r.into_iter();
            let (l, lo, dx) = (r.next().expect("3"), r.next().expect("3"), r.next().expect("3"));
            logits.slice_mut(s![a..b, ..]).assign(&to2(&l)?);
            loss.slice_mut(s![a..b]).assign(
                &lo.into_dimensionality::<ndarray::Ix1>()
                    .map_err(|e| RuntimeError::Ort { context: "read the loss".into(), detail: e.to_string() })?,
            );
            grad.slice_mut(s![a..b, .., .., ..]).assign(&to4(dx)?);
        }
        Ok(LossGrad { logits, loss, grad })
    }

    fn logits_vjp(
        &mut self,
        x: ArrayView4<'_, f32>,
        dlogits: ArrayView2<'_, f32>,
    ) -> Result<(Array2<f32>, Array4<f32>), ModelError> {
        self.check_images(&x)?;
        let n = x.dim().0;
        self.check_dlogits(&dlogits, n)?;
        let mut logits = Array2::zeros((n, self.classes));
        let mut grad = Array4::zeros(x.raw_dim());
        for (a, b) in self.chunks(n) {
            let xs = x.slice(s![a..b, .., .., ..]);
            let d = dlogits.slice(s![a..b, ..]);
            let mut r = self.run_chunk(Purpose::Vjp, xs, None, Some(d), &["logits", "dx_dlogits"])?.into_iter();
            logits.slice_mut(s![a..b, ..]).assign(&to2(&r.next().expect("2"))?);
            grad.slice_mut(s![a..b, .., .., ..]).assign(&to4(r.next().expect("2"))?);
        }
        Ok((logits, grad))
    }

    fn features(&mut self, x: ArrayView4<'_, f32>) -> Result<Option<Array2<f32>>, ModelError> {
        Ok(Some(self.forward(x)?.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip_tiny")
    }

    fn tiny(opts: RuntimeOptions) -> (VisionWeights, Array2<f32>, Model) {
        let dir = fixture();
        let w = VisionWeights::load(&dir.join("model.safetensors"), None, None).unwrap();
        let (_, head) = load_head(&dir.join("heads.safetensors"), None).unwrap();
        let m = Model::from_params(w.config.clone(), &w.params, head.view(), opts, &w.source).unwrap();
        (w, head, m)
    }

    fn images(n: usize) -> Array4<f32> {
        Array4::from_shape_fn((n, 3, 32, 32), |(i, c, h, w)| ((i * 31 + c * 7 + h * 5 + w * 3) % 23) as f32 / 22.0)
    }

    #[test]
    fn packed_sessions_compute_what_fed_weights_compute() {
        let x = images(5);
        let labels = [0, 1, 2, 3, 4];
        let (w, head, mut packed) = tiny(RuntimeOptions::default());
        let mut fed =
            Model::from_params(w.config.clone(), &w.params, head.view(), RuntimeOptions::default(), "t").unwrap();
        fed.force_fed = true;
        let gp = packed.loss_grad(x.view(), &labels).unwrap();
        let gf = fed.loss_grad(x.view(), &labels).unwrap();
        assert!(packed.sessions.values().all(|s| s.2) && fed.sessions.values().all(|s| !s.2), "session kinds");
        assert!(packed.packed.is_some() && fed.packed.is_none());
        let close = |p: &[f32], q: &[f32]| {
            let m = q.iter().fold(0f32, |a, v| a.max(v.abs()));
            p.iter().zip(q).all(|(u, v)| (u - v).abs() <= 1e-5 * m)
        };
        assert!(close(gp.logits.as_slice().unwrap(), gf.logits.as_slice().unwrap()), "logits");
        assert!(close(gp.grad.as_slice().unwrap(), gf.grad.as_slice().unwrap()), "input gradients");
        let d = Array2::from_shape_fn((5, packed.classes), |(i, j)| (i as f32 - j as f32) * 0.1);
        let (_, vp) = packed.logits_vjp(x.view(), d.view()).unwrap();
        let (_, vf) = fed.logits_vjp(x.view(), d.view()).unwrap();
        assert!(close(vp.as_slice().unwrap(), vf.as_slice().unwrap()), "logits VJP");
        // The gradient and VJP sessions read one pre-packed set; an update drops both, and the
        // remade sessions compute bitwise what a fresh model with the new weights computes.
        assert_eq!(packed.sessions.len(), 2);
        let new = perturbed(&w.params, "vision_model.encoder.layers.0.mlp.fc1.weight", 0.05);
        packed.update_weights(&new).unwrap();
        assert!(packed.sessions.is_empty() && packed.packed.is_none());
        let mut all = w.params.clone();
        for (n, t) in new.iter() {
            all.insert(n, t.clone());
        }
        let mut fresh =
            Model::from_params(w.config.clone(), &all, head.view(), RuntimeOptions::default(), "t").unwrap();
        let (a, b) = (packed.loss_grad(x.view(), &labels).unwrap(), fresh.loss_grad(x.view(), &labels).unwrap());
        assert_eq!(a.grad, b.grad);
        assert_ne!(a.grad, gp.grad, "the update reached the packed sessions");
    }

    #[test]
    fn outputs_do_not_depend_on_threads_and_batches_split_cleanly() {
        let x = images(5);
        let labels = [0, 1, 2, 3, 4];
        let (_, _, mut a) = tiny(RuntimeOptions { threads: 1, batch_size: 32, ..Default::default() });
        let (_, _, mut b) = tiny(RuntimeOptions { threads: 2, batch_size: 32, ..Default::default() });
        let (_, _, mut c) = tiny(RuntimeOptions { threads: 2, batch_size: 2, ..Default::default() });
        let ga = a.loss_grad(x.view(), &labels).unwrap();
        let gb = b.loss_grad(x.view(), &labels).unwrap();
        assert_eq!(ga.logits, gb.logits);
        assert_eq!(ga.grad, gb.grad);
        let gc = c.loss_grad(x.view(), &labels).unwrap();
        let close =
            |p: &Array4<f32>, q: &Array4<f32>| p.iter().zip(q).all(|(u, v)| (u - v).abs() <= 1e-6 * (1.0 + v.abs()));
        assert!(close(&ga.grad, &gc.grad), "split batches give the same gradients");
        let (wa_total, wa) = a.weight_grads(x.view(), &labels, Some(&["visual_projection.weight"])).unwrap();
        let (wc_total, wc) = c.weight_grads(x.view(), &labels, Some(&["visual_projection.weight"])).unwrap();
        assert!((wa_total - wc_total).abs() < 1e-4 * wa_total.abs());
        assert_eq!(wa[0].0, "grad.visual_projection.weight");
        assert!(wa[0].1.iter().zip(wc[0].1.iter()).all(|(u, v)| (u - v).abs() <= 1e-4 * (1.0 + v.abs())));
        let ra = a.grams(x.view()).unwrap();
        let rc = c.grams(x.view()).unwrap();
        assert_eq!(ra.len(), 12, "q, k, v, out, fc1, fc2 of 2 layers");
        for ((na, ta), (nc, tc)) in ra.iter().zip(&rc) {
            assert_eq!(na, nc);
            assert!(ta.iter().zip(tc.iter()).all(|(u, v)| (u - v).abs() <= 1e-5 * (1.0 + v.abs())), "{na}");
        }
    }

    #[test]
    fn entropy_weight_grads_equal_the_host_entropy_through_weight_vjp() {
        use mergeattack_core::merge::adamerging::entropy_dlogits;
        // Chunks of 3 rows: the rows of one group straddle chunks.
        let (_, _, mut m) = tiny(RuntimeOptions { batch_size: 3, ..Default::default() });
        let x = images(5);
        // Rows 0..3 see classes 0..2 (weight 1/3 each), rows 3..5 classes 2..5 (1/2 each).
        let mut mask = Array2::<f32>::zeros((5, 5));
        mask.slice_mut(s![0..3, 0..2]).fill(1.0);
        mask.slice_mut(s![3..5, 2..5]).fill(1.0);
        let rw = [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.5, 0.5];
        let sel = ["vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight", HEAD];
        let (h, g) = m.entropy_weight_grads(x.view(), mask.view(), &rw, Some(&sel)).unwrap();
        // Host reference: the logits, each row's entropy and cotangent over its columns in f64
        // (core), then the logits VJP.
        let (logits, _) = m.forward(x.view()).unwrap();
        let mut dl = Array2::<f32>::zeros((5, 5));
        for (i, cols) in [(0, 0..2), (1, 0..2), (2, 0..2), (3, 2..5), (4, 2..5)] {
            let (hi, di) = entropy_dlogits(logits.slice(s![i..i + 1, cols.clone()]));
            assert!((f64::from(h[i]) - hi).abs() < 1e-5, "row {i}: entropy {} vs host {hi}", h[i]);
            dl.slice_mut(s![i..i + 1, cols]).assign(&(di * rw[i]));
        }
        let want = m.weight_vjp(x.view(), dl.view(), Some(&sel)).unwrap();
        assert_eq!(
            g.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            want.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for ((n, a), (_, b)) in g.iter().zip(&want) {
            let scale = b.iter().fold(0.0f32, |s, v| s.max(v.abs()));
            assert!(scale > 1e-4, "{n}: the reference gradient should not vanish");
            let err = a.iter().zip(b.iter()).fold(0.0f32, |s, (u, v)| s.max((u - v).abs()));
            assert!(err <= 1e-4 * scale, "{n}: max error {err} (scale {scale})");
        }
        // Bad masks and weights are named.
        let e = m.entropy_weight_grads(x.view(), mask.slice(s![.., 0..4]), &rw, None).unwrap_err().to_string();
        assert!(e.contains("[5, 4]") && e.contains("[5, 5]"), "{e}");
        let mut none = mask.clone();
        none.row_mut(4).fill(0.0);
        let e = m.entropy_weight_grads(x.view(), none.view(), &rw, None).unwrap_err().to_string();
        assert!(e.contains("row 4") && e.contains("no class"), "{e}");
        let e = m.entropy_weight_grads(x.view(), mask.view(), &rw[..4], None).unwrap_err().to_string();
        assert!(e.contains("4 row weights for 5 images"), "{e}");
        let e = m.entropy_weight_grads(x.view(), mask.view(), &rw, Some(&["nope"])).unwrap_err().to_string();
        assert!(e.contains("`grad.nope`"), "{e}");
    }

    #[test]
    fn gradients_of_a_weight_subset_equal_those_of_every_weight() {
        let (w, _, mut m) = tiny(RuntimeOptions { batch_size: 3, ..Default::default() });
        let x = images(5);
        let labels = [0, 1, 2, 3, 4];
        let (total, all) = m.weight_grads(x.view(), &labels, None).unwrap();
        assert_eq!(all.len(), w.params.names().filter(|n| n.starts_with("vision_model.")).count() + 3);
        // The last block and the projection, in a caller's order (a zoo fine-tuning scope).
        let mut sel: Vec<&str> = w
            .params
            .names()
            .filter(|n| n.starts_with("vision_model.encoder.layers.1.") || n.contains("post_layernorm"))
            .collect();
        sel.push("visual_projection.weight");
        sel.reverse();
        let (t2, part) = m.weight_grads(x.view(), &labels, Some(&sel)).unwrap();
        assert_eq!(total.to_bits(), t2.to_bits(), "the loss does not depend on the subset");
        assert_eq!(part.len(), sel.len());
        for ((n, g), s) in part.iter().zip(&sel) {
            assert_eq!(n, &format!("grad.{s}"));
            let full = &all.iter().find(|(a, _)| a == n).unwrap().1;
            let err = g.iter().zip(full.iter()).fold(0.0f32, |e, (a, b)| e.max((a - b).abs() / (1.0 + b.abs())));
            assert!(err <= 1e-6, "{n}: {err}");
        }
        // The subset has its own (smaller) graph and session; the full one is kept.
        assert_eq!(m.sessions.len(), 2);
        let key: Subset = Some({
            let mut v: Vec<String> = sel.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        });
        let small = &m.sessions[&(Purpose::WeightGrad, key)].1;
        let big = &m.sessions[&(Purpose::WeightGrad, None)].1;
        assert!(small.bytes.len() < big.bytes.len());
        // Asking for every weight by name shares the full graph.
        let names: Vec<String> = all.iter().map(|(n, _)| n.strip_prefix("grad.").unwrap().to_string()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (_, again) = m.weight_grads(x.view(), &labels, Some(&refs)).unwrap();
        assert_eq!(m.sessions.len(), 2);
        assert_eq!(again, all);
    }

    /// Measurement, not a check: a zoo-style fine-tuning step (the mini zoo's architecture, batch
    /// 64, the last 2 of 4 blocks + post-LayerNorm + projection trained) with the gradient graph of
    /// every weight (as before issue 7) and of the trained subset only. Run on purpose:
    /// `cargo test --release -p mergeattack-onnx subset_step_time -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement (seconds); see the doc comment"]
    fn subset_step_time() {
        let cfg = ClipVisionConfig {
            hidden_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            intermediate_size: 512,
            patch_size: 8,
            image_size: 32,
            num_channels: 3,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 64,
        };
        let mut p = ParamSet::new();
        for (i, (n, shape)) in vision::vision_weight_shapes(&cfg).into_iter().enumerate() {
            let norm = n.contains("norm") && n.ends_with("weight");
            let nd = shape.len();
            let a = ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
                let k = (0..nd).fold(i, |s, a| s * 31 + ix[a]);
                if norm { 1.0 } else { ((k * 7919) % 101) as f32 / 101.0 * 0.1 - 0.05 }
            });
            p.insert_owned(n, a);
        }
        let head = Array2::from_shape_fn((10, 64), |(i, j)| ((i * 13 + j * 7) % 17) as f32 / 17.0 - 0.5);
        let opts = RuntimeOptions { threads: 2, batch_size: 64, ..Default::default() };
        let mut m = Model::from_params(cfg, &p, head.view(), opts, "zoo-style").unwrap();
        let x = Array4::from_shape_fn((64, 3, 32, 32), |(i, c, h, w)| {
            ((i * 31 + c * 7 + h * 5 + w * 3) % 23) as f32 / 22.0
        });
        let labels: Vec<usize> = (0..64).map(|i| i % 10).collect();
        let trained: Vec<String> = p
            .names()
            .filter(|n| {
                n.starts_with("vision_model.encoder.layers.2.")
                    || n.starts_with("vision_model.encoder.layers.3.")
                    || n.starts_with("vision_model.post_layernorm")
                    || *n == "visual_projection.weight"
            })
            .map(String::from)
            .collect();
        let refs: Vec<&str> = trained.iter().map(String::as_str).collect();
        let steps = 30;
        for (label, subset) in [("every weight, then filtered", false), ("trained subset only", true)] {
            let run = |m: &mut Model| {
                if subset {
                    m.weight_grads(x.view(), &labels, Some(&refs)).unwrap()
                } else {
                    let (l, g) = m.weight_grads(x.view(), &labels, None).unwrap();
                    (l, g.into_iter().filter(|(n, _)| refs.iter().any(|r| n == &format!("grad.{r}"))).collect())
                }
            };
            run(&mut m);
            let t = std::time::Instant::now();
            for _ in 0..steps {
                run(&mut m);
            }
            println!(
                "{label}: {:.2} ms per step (batch 64, 2 threads)",
                t.elapsed().as_secs_f64() * 1e3 / steps as f64
            );
        }
    }

    #[test]
    fn surgery_tensors_turn_the_feature_correction_on() {
        let (w, head, mut plain) = tiny(RuntimeOptions::default());
        let x = images(3);
        let d = w.config.projection_dim;
        let r = 2;
        let mut p = w.params.clone();
        let down = ArrayD::from_shape_fn(IxDyn(&[r, d]), |ix| ((ix[0] * 5 + ix[1] * 3) % 7) as f32 / 7.0 - 0.4);
        p.insert_owned(vision::SURGERY_DOWN, down.clone());
        p.insert_owned(vision::SURGERY_UP, ArrayD::zeros(IxDyn(&[d, r])));
        let mut zero = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "s").unwrap();
        assert_eq!(zero.surgery_rank(), Some(r));
        assert_eq!(plain.surgery_rank(), None);
        let (l0, f0) = plain.forward(x.view()).unwrap();
        let (l1, f1) = zero.forward(x.view()).unwrap();
        assert_eq!((l0.clone(), f0.clone()), (l1, f1), "W_up = 0 is the identity");
        let up = ArrayD::from_shape_fn(IxDyn(&[d, r]), |ix| ((ix[0] + 2 * ix[1]) % 5) as f32 / 5.0 - 0.3);
        p.insert_owned(vision::SURGERY_UP, up.clone());
        let mut on = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "s").unwrap();
        let (_, f2) = on.forward(x.view()).unwrap();
        let (down, up) =
            (down.into_dimensionality::<ndarray::Ix2>().unwrap(), up.into_dimensionality::<ndarray::Ix2>().unwrap());
        let want = &f0 - &f0.dot(&down.t()).mapv(|v| v.max(0.0)).dot(&up.t());
        assert!(want.iter().zip(f2.iter()).all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + a.abs())));
        assert!(want != f0, "the correction is active");
        // The in-place update reaches the surgery weights too.
        let mut upd = ParamSet::new();
        upd.insert_owned(vision::SURGERY_UP, ArrayD::zeros(IxDyn(&[d, r])));
        on.update_weights(&upd).unwrap();
        assert_eq!(on.forward(x.view()).unwrap().1, f0);
        // A surgery.down without its surgery.up is named.
        p.remove(vision::SURGERY_UP);
        let e = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "s").unwrap_err();
        assert!(e.to_string().contains("surgery.up"), "{e}");
    }

    /// `params` with every tensor whose name contains `part` shifted by a deterministic pattern.
    fn perturbed(params: &ParamSet<'_>, part: &str, amount: f32) -> ParamSet<'static> {
        let mut out = ParamSet::new();
        for (n, t) in params.iter() {
            if n.contains(part) {
                let mut a = t.to_owned();
                a.iter_mut().enumerate().for_each(|(i, v)| *v += amount * (((i * 7919) % 13) as f32 - 6.0) / 6.0);
                out.insert_owned(n, a);
            }
        }
        out
    }

    #[test]
    fn updated_weights_give_bitwise_the_outputs_of_a_fresh_model() {
        let (w, head, mut m) = tiny(RuntimeOptions { batch_size: 3, ..Default::default() });
        let x = images(5);
        let labels = [0, 1, 2, 3, 4];
        let before = m.loss_grad(x.view(), &labels).unwrap();
        // A subset (one layer's MLP), then everything: each time equal to a model built afresh.
        let mut current = w.params.clone();
        for (part, amount) in
            [("vision_model.encoder.layers.1.mlp", 0.05f32), ("vision_model", 0.02), ("visual_projection", 0.1)]
        {
            let delta = perturbed(&current, part, amount);
            assert!(!delta.is_empty(), "{part}");
            m.update_weights(&delta).unwrap();
            for (n, t) in delta.iter() {
                current.insert_owned(n, t.to_owned());
            }
            let mut fresh =
                Model::from_params(w.config.clone(), &current, head.view(), m.options().clone(), "fresh").unwrap();
            let (got, want) = (m.loss_grad(x.view(), &labels).unwrap(), fresh.loss_grad(x.view(), &labels).unwrap());
            assert_eq!(got.logits, want.logits, "{part}");
            assert_eq!(got.loss, want.loss, "{part}");
            assert_eq!(got.grad, want.grad, "{part}");
            assert_ne!(got.logits, before.logits, "{part}: the update changed the outputs");
            assert_eq!(m.forward(x.view()).unwrap(), fresh.forward(x.view()).unwrap(), "{part}");
            let sel = Some(&["vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight"][..]);
            let (lg, g) = m.weight_grads(x.view(), &labels, sel).unwrap();
            let (lw, gw) = fresh.weight_grads(x.view(), &labels, sel).unwrap();
            assert_eq!(lg.to_bits(), lw.to_bits(), "{part}");
            assert_eq!(g, gw, "{part}");
        }
        // The head and the scale are weights too; a [1]-shaped scale is taken as the scalar.
        let mut hs = ParamSet::new();
        let head2 = head.mapv(|v| v * 0.5 + 0.01);
        hs.insert_owned(HEAD, head2.clone().into_dyn());
        hs.insert_owned(LOGIT_SCALE, ArrayD::from_elem(IxDyn(&[1]), 3.0f32));
        m.update_weights(&hs).unwrap();
        current.insert_owned(LOGIT_SCALE, ArrayD::from_elem(IxDyn(&[]), 3.0f32));
        let mut fresh =
            Model::from_params(w.config.clone(), &current, head2.view(), m.options().clone(), "fresh").unwrap();
        assert_eq!(m.logits(x.view()).unwrap(), fresh.logits(x.view()).unwrap());
        // Fed weights: outputs do not depend on the thread count either.
        let (_, _, mut one) = tiny(RuntimeOptions { threads: 1, batch_size: 3, ..Default::default() });
        let mut all = perturbed(&current, "vis", 0.0);
        all.insert_owned(HEAD, head2.into_dyn());
        all.insert_owned(LOGIT_SCALE, ArrayD::from_elem(IxDyn(&[]), 3.0f32));
        one.update_weights(&all).unwrap();
        let (a, b) = (one.loss_grad(x.view(), &labels).unwrap(), m.loss_grad(x.view(), &labels).unwrap());
        assert_eq!((a.logits, a.grad), (b.logits, b.grad));
        // Back to the start: the first outputs again.
        let mut back = perturbed(&w.params, "vis", 0.0);
        assert!(back.contains("visual_projection.weight") && back.contains("vision_model.pre_layrnorm.bias"));
        back.insert_owned(HEAD, head.clone().into_dyn());
        let scale = w.params.get(LOGIT_SCALE).map_or(DEFAULT_LOGIT_SCALE, |t| t.iter().copied().next().unwrap());
        back.insert_owned(LOGIT_SCALE, ArrayD::from_elem(IxDyn(&[]), scale));
        m.update_weights(&back).unwrap();
        assert_eq!(m.loss_grad(x.view(), &labels).unwrap().grad, before.grad);
    }

    #[test]
    fn bad_weight_updates_are_named_and_change_nothing() {
        let (w, _, mut m) = tiny(RuntimeOptions::default());
        let x = images(2);
        let want = m.logits(x.view()).unwrap();
        let good = perturbed(&w.params, "vision_model.encoder.layers.0", 0.1);
        let mut bad = good.clone();
        bad.insert_owned("vision_model.encoder.layers.9.mlp.fc1.weight", ArrayD::zeros(IxDyn(&[2, 2])));
        let e = m.update_weights(&bad).unwrap_err().to_string();
        assert!(e.contains("`vision_model.encoder.layers.9.mlp.fc1.weight`") && e.contains("not a weight"), "{e}");
        let mut bad = good.clone();
        bad.insert_owned("vision_model.encoder.layers.0.mlp.fc1.bias", ArrayD::zeros(IxDyn(&[3])));
        let e = m.update_weights(&bad).unwrap_err().to_string();
        assert!(
            e.contains("`vision_model.encoder.layers.0.mlp.fc1.bias` has shape [3]") && e.contains("needs [64]"),
            "{e}"
        );
        let mut bad = good.clone();
        let mut t = bad.get("vision_model.encoder.layers.0.layer_norm1.weight").unwrap().to_owned();
        t[[5]] = f32::INFINITY;
        bad.insert_owned("vision_model.encoder.layers.0.layer_norm1.weight", t);
        let e = m.update_weights(&bad).unwrap_err().to_string();
        assert!(e.contains("layer_norm1.weight") && e.contains("NaN or infinite value at flat index 5"), "{e}");
        assert_eq!(m.logits(x.view()).unwrap(), want, "failed updates leave the weights alone");
        m.update_weights(&good).unwrap();
        assert_ne!(m.logits(x.view()).unwrap(), want);
    }

    #[test]
    fn bad_images_and_labels_are_named() {
        let (_, _, mut m) = tiny(RuntimeOptions::default());
        let e = m.logits(Array4::zeros((2, 3, 16, 32)).view()).unwrap_err().0;
        assert!(e.contains("[2, 3, 16, 32]") && e.contains("[N, 3, 32, 32]"), "{e}");
        let e = m.logits(Array4::zeros((2, 1, 32, 32)).view()).unwrap_err().0;
        assert!(e.contains("3 channels"), "{e}");
        let mut x = images(3);
        x[[1, 2, 3, 4]] = f32::NAN;
        let e = m.logits(x.view()).unwrap_err().0;
        assert!(e.contains("image 1 holds a NaN"), "{e}");
        let e = m.loss_grad(images(2).view(), &[0, 9]).unwrap_err().0;
        assert!(e.contains("label 9 of image 1") && e.contains("5 classes"), "{e}");
        let e = m.logits(Array4::zeros((0, 3, 32, 32)).view()).unwrap_err().0;
        assert!(e.contains("empty"), "{e}");
        let e = m.logits_vjp(images(2).view(), Array2::zeros((2, 4)).view()).unwrap_err().0;
        assert!(e.contains("dlogits have shape [2, 4]"), "{e}");
    }

    #[test]
    fn bad_weights_and_heads_are_named() {
        let (w, head, _) = tiny(RuntimeOptions::default());
        let mut p = w.params.clone();
        p.remove("vision_model.encoder.layers.1.mlp.fc1.bias");
        let e = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "ft.safetensors")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "tensor `vision_model.encoder.layers.1.mlp.fc1.bias` is missing in ft.safetensors");
        let mut p = w.params.clone();
        p.insert_owned("vision_model.post_layernorm.weight", ArrayD::zeros(IxDyn(&[31])));
        let e = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "ft.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`vision_model.post_layernorm.weight` has shape [31]") && e.contains("needs [32]"), "{e}");
        let mut p = w.params.clone();
        let mut bad = p.get("vision_model.pre_layrnorm.bias").unwrap().to_owned();
        bad[[3]] = f32::NAN;
        p.insert_owned("vision_model.pre_layrnorm.bias", bad);
        let e = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "ft.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pre_layrnorm.bias") && e.contains("NaN"), "{e}");
        let mut p = w.params.clone();
        p.remove("visual_projection.weight");
        let e = Model::from_params(w.config.clone(), &p, head.view(), RuntimeOptions::default(), "ft.safetensors")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pretrained CLIPModel"), "{e}");
        let e = Model::from_params(
            w.config.clone(),
            &w.params,
            Array2::zeros((3, 8)).view(),
            RuntimeOptions::default(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[3, 8]") && e.contains("projection_dim"), "{e}");
        let e = load_head(&fixture().join("heads.safetensors"), Some("cars")).unwrap_err().to_string();
        assert!(e.contains("no head for task `cars` (it has: random)"), "{e}");
        let e = load_head(&fixture().join("model.safetensors"), None).unwrap_err().to_string();
        assert!(e.contains("choose one with --task"), "{e}");
    }

    #[test]
    fn configs_and_options_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("bad.json");
        std::fs::write(&cfg, r#"{"hidden_size": 32, "num_attention_heads": 3}"#).unwrap();
        let e = vision_config_for(&fixture().join("model.safetensors"), Some(&cfg)).unwrap_err().to_string();
        assert!(
            e.contains("bad.json") && e.contains("hidden_size 32 is not divisible by num_attention_heads 3"),
            "{e}"
        );
        let e = vision_config_for(&tmp.path().join("w.safetensors"), None).unwrap_err().to_string();
        assert!(e.contains("no config.json") && e.contains("--config"), "{e}");
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda);
        assert!("tpu".parse::<Device>().unwrap_err().to_string().contains("unknown device `tpu`"));
        let (w, head, _) = tiny(RuntimeOptions::default());
        let zero = RuntimeOptions { batch_size: 0, ..Default::default() };
        assert!(Model::from_params(w.config.clone(), &w.params, head.view(), zero, "f").is_err());
        #[cfg(not(feature = "cuda"))]
        {
            let cuda = RuntimeOptions { device: Device::Cuda, ..Default::default() };
            let mut m = Model::from_params(w.config.clone(), &w.params, head.view(), cuda, "f").unwrap();
            let e = m.logits(images(1).view()).unwrap_err().0;
            assert!(e.contains("CUDA") && e.contains("no CUDA support"), "{e}");
        }
    }

    #[test]
    fn prefixless_vision_files_load_like_hf() {
        let (w, head, mut m) = tiny(RuntimeOptions::default());
        let want = m.logits(images(2).view()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        // A prefix-less CLIPVisionModel file (transformers >= 5), config beside it.
        let mut bare = ParamSet::new();
        for (n, t) in w.params.iter() {
            if let Some(rest) = n.strip_prefix("vision_model.") {
                bare.insert_view(rest, t.view());
            } else if n == "visual_projection.weight" {
                bare.insert_view(n, t.view());
            }
        }
        let file = tmp.path().join("vision.safetensors");
        crate::weights::save(&file, &bare, &[]).unwrap();
        std::fs::copy(fixture().join("config.json"), tmp.path().join("config.json")).unwrap();
        let v = VisionWeights::load(&file, None, None).unwrap();
        // No logit_scale in the file: CLIP's ln 100 is used, which is also the fixture's value.
        let mut m2 =
            Model::from_params(v.config.clone(), &v.params, head.view(), RuntimeOptions::default(), "v").unwrap();
        assert_eq!(m2.logits(images(2).view()).unwrap(), want);
    }
}
