//! ONNX Runtime sessions for the CLIP graphs: device and thread choice, weights bound as external
//! initializers, and [`Model`], the CLIP vision classifier that implements
//! [`mergeattack_core::classifier::Classifier`].
//!
//! One graph per architecture (cached per process, keyed by config, class count and outputs); one
//! session per weight set and purpose, created on first use: a forward pass never pays for a
//! backward graph. Weights are copied once into ONNX Runtime values that every session of a model
//! shares (ENGINE.md: external initializers keep the graph bytes small and outputs bitwise
//! deterministic for any thread count).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mergeattack_core::classifier::ModelError;
use mergeattack_core::tensor::ParamSet;
use ndarray::Array2;
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use crate::clip::config::{ClipVisionConfig, ConfigError};
use crate::graph::Graph;
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
            let value = Tensor::from_array((shape.clone(), data)).map_err(RuntimeError::ort("create a weight tensor"))?;
            values.push((name.clone(), Arc::new(value.into_dyn())));
        }
        Ok(BoundWeights { values })
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
            let available = ort::ep::CUDA::default().is_available().unwrap_or(false);
            if available {
                let ep = ort::ep::CUDA::default().with_device_id(0).build().error_on_failure();
                match builder.with_execution_providers([ep]) {
                    Ok(b) => return Ok((b, Device::Cuda)),
                    Err(e) if device == Device::Cuda => return Err(RuntimeError::Cuda(e.to_string())),
                    Err(e) => {
                        tracing::warn!("CUDA unavailable ({e}); running on the CPU");
                        return Ok((e.recover(), Device::Cpu));
                    }
                }
            }
            let why = "the loaded ONNX Runtime library has no CUDA execution provider (use the onnxruntime-gpu \
                       library via ORT_DYLIB_PATH, with the CUDA 13 and cuDNN 9 libraries on the loader path)";
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

/// A session for the graph `bytes` with `weights` as external initializers.
pub fn create_session(bytes: &[u8], weights: &BoundWeights, opts: &RuntimeOptions) -> Result<Session, RuntimeError> {
    let env = library::environment()?;
    if opts.threads == 0 {
        return Err(RuntimeError::Options("--threads must be at least 1".into()));
    }
    let e = RuntimeError::ort("configure a session");
    let mut b = Session::builder(env).map_err(e)?;
    b = b.with_intra_threads(opts.threads).map_err(|e| RuntimeError::ort("set the thread count")(e.into()))?;
    b = b.with_inter_threads(1).map_err(|e| RuntimeError::ort("set the thread count")(e.into()))?;
    b = b.with_deterministic_compute(true).map_err(|e| RuntimeError::ort("ask for deterministic compute")(e.into()))?;
    b = b.with_intra_op_spinning(false).map_err(|e| RuntimeError::ort("turn off spinning")(e.into()))?;
    for (name, value) in &weights.values {
        b = b
            .with_external_initializer(name, Arc::clone(value))
            .map_err(|e| RuntimeError::ort(format!("bind weight `{name}`"))(e.into()))?;
    }
    let (mut b, _used) = register_device(b, opts.device)?;
    b.commit_from_memory(bytes).map_err(RuntimeError::ort("create a session"))
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
        return Err(RuntimeError::Heads { path: shown, detail: format!("head `{name}` holds a NaN or infinity at {i}") });
    }
    let a = t.view().into_dimensionality::<ndarray::Ix2>().expect("2-D").to_owned();
    Ok((name, a))
}

