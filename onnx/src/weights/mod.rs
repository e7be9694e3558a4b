//! Checkpoint import/export: safetensors files <-> [`ParamSet`].
//!
//! Reading memory-maps the file. Floating-point tensors become f32 tensors of a [`ParamSet`]:
//! little-endian F32 data that is 4-byte aligned in the mapping is borrowed without a copy; F16,
//! BF16, F64 and unaligned F32 data are converted into owned f32 arrays. Every other dtype (the I64
//! `position_ids` of older HF files, ...) is not a float: it is left out of the [`ParamSet`] and
//! can be carried through unchanged when writing ([`Checkpoint::raw`]). Each tensor's input dtype
//! is remembered ([`Checkpoint::dtype`]).
//!
//! Writing ([`Writer`]) produces a safetensors file with a `__metadata__` header, atomically: the
//! bytes go to a temporary file in the destination directory, which is fsynced and then renamed
//! over the destination. [`Writer::write_pending`] stops before the rename so that several files
//! (per-task outputs) can be committed together or not at all.
//!
//! [`names`] knows the naming conventions (HF `CLIPModel`, HF `CLIPVisionModel` without the
//! `vision_model.` prefix, open_clip), the default merge selection and the open_clip -> HF
//! conversion.

pub mod names;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use mergeattack_core::tensor::{ParamSet, Tensor};
use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};
pub use safetensors::Dtype;
use safetensors::SafeTensorError;
use sha2::{Digest, Sha256};

pub use names::{Convention, open_clip_to_hf};

/// A problem reading, checking or writing checkpoint files. Every variant names the file, and the
/// tensor where there is one.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read `{path}`: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("`{path}` is not a valid safetensors file: {detail}")]
    Format { path: String, detail: String },
    #[error("tensor `{name}` is missing in `{path}` (the base model has it)")]
    Missing { name: String, path: String },
    #[error("tensor `{name}` has shape {got:?} in `{path}` but {expected:?} in the base model")]
    Shape { name: String, path: String, expected: Vec<usize>, got: Vec<usize> },
    #[error(
        "tensor `{name}` has dtype {got:?} in `{path}` but {expected:?} in the base model: only floating-point tensors can be merged"
    )]
    Dtype { name: String, path: String, expected: Dtype, got: Dtype },
    #[error("tensor `{name}` in `{path}` holds a non-finite value ({value}) at flat index {index}")]
    NotFinite { name: String, path: String, value: f32, index: usize },
    #[error(
        "cannot tell which tensors of `{path}` form the vision encoder (no `vision_model.`, `visual.` or `encoder.` names); use `--set tensors=all` to merge every float tensor"
    )]
    NoVisionTensors { path: String },
    #[error("open_clip conversion: tensor `{name}`: {detail}")]
    Convert { name: String, detail: String },
    #[error("cannot write `{path}`: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot write tensor `{name}` to `{path}`: {detail}")]
    Encode { name: String, path: String, detail: String },
}

/// True for the dtypes that become f32 tensors of a [`ParamSet`].
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Bytes per element of a dtype (sub-byte dtypes round up; they are only ever copied verbatim).
fn dtype_bytes(dtype: Dtype) -> usize {
    dtype.bitsize().div_ceil(8)
}

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file.
    range: Range<usize>,
}

/// A memory-mapped safetensors file.
pub struct Checkpoint {
    path: PathBuf,
    map: Mmap,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("path", &self.path).field("tensors", &self.entries.len()).finish()
    }
}

impl Checkpoint {
    /// Map and parse `path`. Fails with a sentence naming the file when it is missing, unreadable,
    /// not a safetensors file, truncated, or has a corrupt header or offsets.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let file = File::open(&path).map_err(|source| WeightsError::Open { path: shown.clone(), source })?;
        let len = file.metadata().map_err(|source| WeightsError::Open { path: shown.clone(), source })?.len();
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(WeightsError::Format { path: shown, detail: "it is a directory".into() });
        }
        if len < 8 {
            return Err(WeightsError::Format {
                path: shown,
                detail: format!("the file has {len} bytes, too few for the 8-byte header length (empty or truncated)"),
            });
        }
        // SAFETY: the mapping is read-only; a file changed by another process while mapped is the
        // usual caveat of every memory-mapped loader (safetensors, transformers) and is documented.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Open { path: shown.clone(), source })?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map[..])
            .map_err(|e| WeightsError::Format { path: shown.clone(), detail: describe_format_error(&e, &map[..]) })?;
        let start = 8 + n;
        let mut entries = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            entries
                .insert(name, Entry { dtype: info.dtype, shape: info.shape.clone(), range: (start + a)..(start + b) });
        }
        let metadata = meta.metadata().clone().map(|m| m.into_iter().collect()).unwrap_or_default();
        Ok(Checkpoint { path, map, entries, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as shown in messages.
    pub fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// The `__metadata__` of the file.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor's name and header entry, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The dtype the file stores tensor `name` in.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// Names of the floating-point tensors.
    pub fn float_names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().filter(|(_, e)| is_float(e.dtype)).map(|(k, _)| k.as_str())
    }

    /// Names of the other tensors (carried through unchanged, never merged).
    pub fn non_float_names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().filter(|(_, e)| !is_float(e.dtype)).map(|(k, _)| k.as_str())
    }

    /// The stored bytes of tensor `name`, with its dtype and shape.
    pub fn raw(&self, name: &str) -> Option<(Dtype, &[usize], &[u8])> {
        self.entries.get(name).map(|e| (e.dtype, e.shape.as_slice(), &self.map[e.range.clone()]))
    }

    /// Tensor `name` as f32: borrowed when the file holds aligned little-endian F32 data, converted
    /// otherwise. `Ok(None)` when the tensor is absent; an error when it is not a float tensor.
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor<'_>>, WeightsError> {
        let Some(e) = self.entries.get(name) else { return Ok(None) };
        let bytes = &self.map[e.range.clone()];
        let shape = IxDyn(&e.shape);
        let bad_shape = |err: ndarray::ShapeError| WeightsError::Format {
            path: self.shown(),
            detail: format!("tensor `{name}`: {err}"),
        };
        let owned = |values: Vec<f32>| -> Result<Tensor<'_>, WeightsError> {
            Ok(CowArray::from(ArrayD::from_shape_vec(shape.clone(), values).map_err(bad_shape)?))
        };
        let t = match e.dtype {
            Dtype::F32 => match (cfg!(target_endian = "little"), bytemuck::try_cast_slice::<u8, f32>(bytes)) {
                (true, Ok(values)) => CowArray::from(ArrayViewD::from_shape(shape.clone(), values).map_err(bad_shape)?),
                _ => owned(f32_from_le(bytes))?,
            },
            Dtype::F16 => {
                owned(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())?
            }
            Dtype::BF16 => {
                owned(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())?
            }
            Dtype::F64 => owned(
                bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32).collect(),
            )?,
            other => {
                return Err(WeightsError::Format {
                    path: self.shown(),
                    detail: format!("tensor `{name}` has dtype {other:?}, which is not a floating-point type"),
                });
            }
        };
        Ok(Some(t))
    }

    /// Every floating-point tensor as a [`ParamSet`].
    pub fn params(&self) -> Result<ParamSet<'_>, WeightsError> {
        self.params_for(self.float_names())
    }

    /// The named floating-point tensors as a [`ParamSet`]; names the file lacks are skipped.
    pub fn params_for<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Result<ParamSet<'_>, WeightsError> {
        let mut p = ParamSet::new();
        for name in names {
            if let Some(t) = self.tensor(name)? {
                p.insert(name, t);
            }
        }
        Ok(p)
    }

    /// Hex SHA-256 of the whole file.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.map[..]))
    }

    /// Size of the file in bytes.
    pub fn len_bytes(&self) -> usize {
        self.map.len()
    }

    /// Check that `self` (a fine-tuned model) holds each of `names` of `base` with the same shape
    /// and a floating-point dtype.
    pub fn check_against_base<'n>(
        &self,
        base: &Checkpoint,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<(), WeightsError> {
        for name in names {
            let Some(b) = base.entry(name) else { continue };
            let Some(m) = self.entry(name) else {
                return Err(WeightsError::Missing { name: name.into(), path: self.shown() });
            };
            if !is_float(m.dtype) || !is_float(b.dtype) {
                return Err(WeightsError::Dtype {
                    name: name.into(),
                    path: self.shown(),
                    expected: b.dtype,
                    got: m.dtype,
                });
            }
            if m.shape != b.shape {
                return Err(WeightsError::Shape {
                    name: name.into(),
                    path: self.shown(),
                    expected: b.shape.clone(),
                    got: m.shape.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Check that every entry of the named tensors of `params` (read from `path`) is finite.
pub fn check_finite<'n>(
    params: &ParamSet<'_>,
    path: &str,
    names: impl IntoIterator<Item = &'n str>,
) -> Result<(), WeightsError> {
    for name in names {
        let Some(t) = params.get(name) else { continue };
        let hit = match t.as_slice() {
            Some(s) => s.iter().copied().enumerate().find(|(_, v)| !v.is_finite()),
            None => t.iter().copied().enumerate().find(|(_, v)| !v.is_finite()),
        };
        if let Some((index, value)) = hit {
            return Err(WeightsError::NotFinite { name: name.into(), path: path.into(), value, index });
        }
    }
    Ok(())
}

fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The safetensors crate's parse errors, said for a user.
fn describe_format_error(e: &SafeTensorError, file: &[u8]) -> String {
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    match e {
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => format!(
            "its first 8 bytes announce a {header_len}-byte JSON header but the file has {} bytes (truncated or not a safetensors file)",
            file.len()
        ),
        SafeTensorError::InvalidHeader(_) => "its header is not UTF-8 text (not a safetensors file)".into(),
        SafeTensorError::InvalidHeaderDeserialization(err) | SafeTensorError::JsonError(err) => {
            format!("its JSON header is corrupt ({err})")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "the tensor data is truncated or has extra bytes (the header's offsets do not end at the end of the file)"
                .into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("the offsets of tensor `{name}` are invalid (overlapping, out of order or out of range)")
        }
        SafeTensorError::TensorInvalidInfo | SafeTensorError::InvalidTensorView(..) => {
            "a tensor's shape, dtype and byte offsets disagree".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}

/// Output dtype choice for [`Writer::float`] callers (`--dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    /// Each tensor in the dtype of the input it comes from.
    Input,
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for OutDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "input" => Ok(OutDtype::Input),
            "f32" | "float32" | "fp32" => Ok(OutDtype::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(OutDtype::F16),
            "bf16" | "bfloat16" => Ok(OutDtype::BF16),
            _ => Err(format!("`{s}` is not an output dtype (input, f32, f16, bf16)")),
        }
    }
}

impl OutDtype {
    /// The dtype to write a float tensor whose input dtype was `input`.
    pub fn resolve(self, input: Dtype) -> Dtype {
        match self {
            OutDtype::Input => {
                if is_float(input) {
                    input
                } else {
                    Dtype::F32
                }
            }
            OutDtype::F32 => Dtype::F32,
            OutDtype::F16 => Dtype::F16,
            OutDtype::BF16 => Dtype::BF16,
        }
    }
}

enum OutData<'a> {
    Float { view: ArrayViewD<'a, f32>, dtype: Dtype },
    Raw { dtype: Dtype, shape: Vec<usize>, bytes: &'a [u8] },
}

impl OutData<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutData::Float { dtype, .. } | OutData::Raw { dtype, .. } => *dtype,
        }
    }
    fn shape(&self) -> Vec<usize> {
        match self {
            OutData::Float { view, .. } => view.shape().to_vec(),
            OutData::Raw { shape, .. } => shape.clone(),
        }
    }
    fn byte_len(&self) -> usize {
        match self {
            OutData::Float { view, dtype } => view.len() * dtype_bytes(*dtype),
            OutData::Raw { bytes, .. } => bytes.len(),
        }
    }
}

/// Collects tensors and metadata, then writes one safetensors file atomically.
#[derive(Default)]
pub struct Writer<'a> {
    tensors: BTreeMap<String, OutData<'a>>,
    metadata: BTreeMap<String, String>,
}

/// A fully written and fsynced temporary file waiting to be renamed over its destination.
/// Dropping it without [`Pending::commit`] deletes the temporary file.
pub struct Pending {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Pending {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rename the temporary file over the destination.
    pub fn commit(self) -> Result<(), WeightsError> {
        let shown = self.path.display().to_string();
        self.tmp.persist(&self.path).map_err(|e| WeightsError::Write { path: shown, source: e.error })?;
        Ok(())
    }
}

impl<'a> Writer<'a> {
    pub fn new() -> Self {
        Writer::default()
    }

    /// Add an f32 tensor, to be stored as `dtype` (F32, F16 or BF16; F64 is written as F64).
    pub fn float(&mut self, name: impl Into<String>, view: ArrayViewD<'a, f32>, dtype: Dtype) -> &mut Self {
        self.tensors.insert(name.into(), OutData::Float { view, dtype });
        self
    }

    /// Add every tensor of `params` as `dtype`.
    pub fn params(&mut self, params: &'a ParamSet<'_>, dtype: Dtype) -> &mut Self {
        for (name, t) in params.iter() {
            self.float(name, t.view(), dtype);
        }
        self
    }

    /// Add a tensor copied verbatim (any dtype).
    pub fn raw(&mut self, name: impl Into<String>, dtype: Dtype, shape: &[usize], bytes: &'a [u8]) -> &mut Self {
        self.tensors.insert(name.into(), OutData::Raw { dtype, shape: shape.to_vec(), bytes });
        self
    }

    /// Add a `__metadata__` entry.
    pub fn meta(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Write and commit `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), WeightsError> {
        self.write_pending(path)?.commit()
    }

    /// Write everything to a temporary file beside `path` and fsync it; [`Pending::commit`] renames it.
    pub fn write_pending(&self, path: impl AsRef<Path>) -> Result<Pending, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let werr = |source: std::io::Error| WeightsError::Write { path: shown.clone(), source };
        // Larger dtypes first (then by name), as the safetensors crate orders them, so that every
        // tensor stays aligned to its element size.
        let mut order: Vec<(&String, &OutData<'a>)> = self.tensors.iter().collect();
        order.sort_by(|(ln, l), (rn, r)| dtype_bytes(r.dtype()).cmp(&dtype_bytes(l.dtype())).then(ln.cmp(rn)));
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            let m: serde_json::Map<String, serde_json::Value> =
                self.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            header.insert("__metadata__".into(), serde_json::Value::Object(m));
        }
        let mut offset = 0usize;
        for (name, data) in &order {
            if let OutData::Float { dtype, .. } = data
                && !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
            {
                return Err(WeightsError::Encode {
                    name: (*name).clone(),
                    path: shown.clone(),
                    detail: format!("cannot store f32 values as {dtype:?}"),
                });
            }
            let n = data.byte_len();
            header.insert(
                (*name).clone(),
                serde_json::json!({"dtype": data.dtype(), "shape": data.shape(), "data_offsets": [offset, offset + n]}),
            );
            offset += n;
        }
        let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header)).expect("JSON of strings");
        header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');

        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp =
            tempfile::Builder::new().prefix(".mergeattack-tmp-").suffix(".part").tempfile_in(&parent).map_err(werr)?;
        {
            let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
            w.write_all(&(header_bytes.len() as u64).to_le_bytes()).map_err(werr)?;
            w.write_all(&header_bytes).map_err(werr)?;
            let mut buf: Vec<u8> = Vec::new();
            for (_, data) in &order {
                match data {
                    OutData::Raw { bytes, .. } => w.write_all(bytes).map_err(werr)?,
                    OutData::Float { view, dtype } => {
                        if *dtype == Dtype::F32
                            && cfg!(target_endian = "little")
                            && let Some(s) = view.as_slice()
                        {
                            w.write_all(bytemuck::cast_slice(s)).map_err(werr)?;
                            continue;
                        }
                        encode(view, *dtype, &mut buf);
                        w.write_all(&buf).map_err(werr)?;
                    }
                }
            }
            w.flush().map_err(werr)?;
        }
        tmp.as_file().sync_all().map_err(werr)?;
        Ok(Pending { tmp, path })
    }
}

/// Encode f32 values (row-major order) as little-endian `dtype` bytes into `buf`.
fn encode(view: &ArrayViewD<'_, f32>, dtype: Dtype, buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(view.len() * dtype_bytes(dtype));
    match dtype {
        Dtype::F32 => view.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => view.iter().for_each(|v| buf.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => view.iter().for_each(|v| buf.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F64 => view.iter().for_each(|v| buf.extend_from_slice(&f64::from(*v).to_le_bytes())),
        _ => unreachable!("checked by write_pending"),
    }
}

/// Write `params` to `path` as F32 with `metadata` (a convenience for generated checkpoints).
pub fn save(path: impl AsRef<Path>, params: &ParamSet<'_>, metadata: &[(&str, &str)]) -> Result<(), WeightsError> {
    let mut w = Writer::new();
    w.params(params, Dtype::F32);
    for (k, v) in metadata {
        w.meta(*k, *v);
    }
    w.write(path)
}

#[cfg(test)]
mod tests;
