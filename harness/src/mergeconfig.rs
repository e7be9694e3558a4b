//! What `mergeattack merge` is asked to do, from flags or from a mergekit-style YAML file:
//!
//! ```yaml
//! merge_method: task_arithmetic     # CLI name or alias
//! base_model: pretrained.safetensors
//! models:
//!   - model: ft-mnist.safetensors
//!     parameters: {weight: 1.0}      # optional per-model weight
//!   - model: ft-svhn.safetensors
//! parameters: {lambda: 0.3}         # the method's parameters (and `tensors`, `seed`)
//! dtype: float32                    # optional: input, float32, float16, bfloat16
//! ```
//! Paths are relative to the YAML file's directory. Unknown keys are an error naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergeattack_core::merge::Params;
use mergeattack_onnx::weights::OutDtype;
use serde::Deserialize;

/// A merge request.
#[derive(Clone, Debug)]
pub struct MergeSpec {
    pub method: String,
    pub base: PathBuf,
    pub models: Vec<PathBuf>,
    /// Per-model weights (mergekit `parameters.weight`), one per model, or `None`.
    pub weights: Option<Vec<f32>>,
    pub params: Params,
    pub dtype: OutDtype,
}

/// A problem with a YAML merge config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read merge config `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("merge config `{path}`: {detail}")]
    Invalid { path: String, detail: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlConfig {
    merge_method: Option<String>,
    base_model: Option<String>,
    #[serde(default)]
    models: Vec<YamlModel>,
    #[serde(default)]
    parameters: BTreeMap<String, serde_yaml::Value>,
    dtype: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlModel {
    model: String,
    #[serde(default)]
    parameters: Option<YamlModelParams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct YamlModelParams {
    weight: Option<serde_yaml::Value>,
}

/// A YAML scalar as the string `--set` would have given.
fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl MergeSpec {
    /// Read a mergekit-style YAML config.
    pub fn from_yaml(path: &Path) -> Result<MergeSpec, ConfigError> {
        let shown = path.display().to_string();
        let invalid = |detail: String| ConfigError::Invalid { path: shown.clone(), detail };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        let cfg: YamlConfig = serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { dir.join(p) };
        let method = cfg.merge_method.ok_or_else(|| invalid("`merge_method` is required".into()))?;
        let base =
            cfg.base_model.ok_or_else(|| invalid("`base_model` (the pretrained checkpoint) is required".into()))?;
        let mut params = Params::new();
        for (k, v) in &cfg.parameters {
            let s = scalar(v).ok_or_else(|| invalid(format!("parameter `{k}` must be a number, string or boolean")))?;
            params.set(k.as_str(), s);
        }
        let mut weights = Vec::new();
        for m in &cfg.models {
            let w = match m.parameters.as_ref().and_then(|p| p.weight.as_ref()) {
                None => None,
                Some(v) => {
                    let s = scalar(v).unwrap_or_default();
                    let w = mergeattack_core::merge::parse_number(&s)
                        .ok_or_else(|| invalid(format!("the weight `{s}` of model `{}` is not a number", m.model)))?;
                    Some(w as f32)
                }
            };
            weights.push(w);
        }
        let weights = if weights.iter().any(Option::is_some) {
            Some(weights.into_iter().map(|w| w.unwrap_or(1.0)).collect())
        } else {
            None
        };
        let dtype = match cfg.dtype {
            None => OutDtype::F32,
            Some(d) => d.parse().map_err(|e: String| invalid(format!("`dtype`: {e}")))?,
        };
        Ok(MergeSpec {
            method,
            base: resolve(&base),
            models: cfg.models.iter().map(|m| resolve(&m.model)).collect(),
            weights,
            params,
            dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("merge.yaml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn reads_mergekit_style_yaml_relative_to_its_directory() {
        let (dir, p) = write(
            "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n  - model: a.safetensors\n    parameters:\n      weight: 2\n  - model: /abs/b.safetensors\nparameters:\n  lambda: 0.5\n  k: 1/5\ndtype: bfloat16\n",
        );
        let s = MergeSpec::from_yaml(&p).unwrap();
        assert_eq!(s.method, "task_arithmetic");
        assert_eq!(s.base, dir.path().join("base.safetensors"));
        assert_eq!(s.models, [dir.path().join("a.safetensors"), PathBuf::from("/abs/b.safetensors")]);
        assert_eq!(s.weights, Some(vec![2.0, 1.0]));
        assert_eq!(s.params.get("lambda"), Some("0.5"));
        assert_eq!(s.params.get("k"), Some("1/5"));
        assert_eq!(s.dtype, OutDtype::BF16);
    }

    #[test]
    fn unknown_keys_are_named() {
        let (_d, p) = write("merge_method: ties\nbase_model: b\nmodels: []\nlamda: 3\n");
        let e = MergeSpec::from_yaml(&p).unwrap_err().to_string();
        assert!(e.contains("`lamda`") && e.contains("merge.yaml"), "{e}");
        let (_d, p) =
            write("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {density: 0.5}\n");
        let e = MergeSpec::from_yaml(&p).unwrap_err().to_string();
        assert!(e.contains("`density`"), "{e}");
    }
}
