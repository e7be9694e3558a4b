//! CLIP configuration from an HF `config.json` (a `CLIPModel` config with nested `vision_config`
//! and `text_config`, or a `CLIPVisionModel`/`CLIPVisionModelWithProjection` config with the
//! vision fields at top level), or built in code.

use std::path::Path;

use serde_json::Value;

/// The vision tower's sizes (CLIP.md).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub num_channels: usize,
    /// `quick_gelu` (CLIP) or `gelu` (erf).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

/// The text tower's sizes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub eos_token_id: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("config {path} is not valid JSON: {detail}")]
    Json { path: String, detail: String },
    #[error("config {path}: `{key}` {problem}")]
    Field { path: String, key: String, problem: String },
    #[error("config: {0}")]
    Inconsistent(String),
}

impl ClipVisionConfig {
    /// OpenAI CLIP ViT-B/32.
    pub fn vit_b32() -> Self {
        ClipVisionConfig {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            patch_size: 32,
            image_size: 224,
            num_channels: 3,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Token positions: patches + CLS.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    /// Check that the sizes fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Inconsistent(m));
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("patch_size", self.patch_size),
            ("image_size", self.image_size),
            ("num_channels", self.num_channels),
            ("projection_dim", self.projection_dim),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return bad(format!("vision `{k}` is 0"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "vision hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return bad(format!("vision hidden_act `{}` is not quick_gelu or gelu", self.hidden_act));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return bad(format!("vision layer_norm_eps {} is not in (0, 1)", self.layer_norm_eps));
        }
        Ok(())
    }

    /// Read the vision config from an HF `config.json` of either shape.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let (v, p) = read_json(path)?;
        Self::from_json(&v, &p)
    }

    /// Parse the vision config from a parsed `config.json`; `path` is used in messages.
    pub fn from_json(v: &Value, path: &str) -> Result<Self, ConfigError> {
        let (vision, top_projection) = match v.get("vision_config") {
            Some(vc) => (vc, v.get("projection_dim")),
            None => (v, None),
        };
        let f =
            Fields { v: vision, path, prefix: if v.get("vision_config").is_some() { "vision_config." } else { "" } };
        let projection_dim = match top_projection.and_then(Value::as_u64) {
            Some(p) => p as usize,
            None => f.usize_or("projection_dim", 512)?,
        };
        let cfg = ClipVisionConfig {
            hidden_size: f.usize_or("hidden_size", 768)?,
            num_hidden_layers: f.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: f.usize_or("num_attention_heads", 12)?,
            intermediate_size: f.usize_or("intermediate_size", 3072)?,
            patch_size: f.usize_or("patch_size", 32)?,
            image_size: f.usize_or("image_size", 224)?,
            num_channels: f.usize_or("num_channels", 3)?,
            hidden_act: f.str_or("hidden_act", "quick_gelu")?,
            layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
            projection_dim,
        };
        cfg.validate().map_err(|e| match e {
            ConfigError::Inconsistent(m) => ConfigError::Inconsistent(format!("{path}: {m}")),
            e => e,
        })?;
        Ok(cfg)
    }
}

impl ClipTextConfig {
    /// Parse the text config from a `CLIPModel` `config.json` (`text_config`); `None` when the
    /// file holds a vision-only config.
    pub fn from_json(v: &Value, path: &str) -> Result<Option<Self>, ConfigError> {
        let Some(tc) = v.get("text_config") else { return Ok(None) };
        let f = Fields { v: tc, path, prefix: "text_config." };
        let projection_dim = match v.get("projection_dim").and_then(Value::as_u64) {
            Some(p) => p as usize,
            None => f.usize_or("projection_dim", 512)?,
        };
        let cfg = ClipTextConfig {
            hidden_size: f.usize_or("hidden_size", 512)?,
            num_hidden_layers: f.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: f.usize_or("num_attention_heads", 8)?,
            intermediate_size: f.usize_or("intermediate_size", 2048)?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 77)?,
            vocab_size: f.usize_or("vocab_size", 49408)?,
            hidden_act: f.str_or("hidden_act", "quick_gelu")?,
            layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
            projection_dim,
            eos_token_id: tc.get("eos_token_id").and_then(Value::as_i64),
        };
        if cfg.hidden_size == 0
            || cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(ConfigError::Inconsistent(format!(
                "{path}: text hidden_size {} is not a positive multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        Ok(Some(cfg))
    }
}

/// Read and parse a JSON file; returns the value and the path as text.
pub fn read_json(path: &Path) -> Result<(Value, String), ConfigError> {
    let p = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: p.clone(), detail: e.to_string() })?;
    let v = serde_json::from_str(&text).map_err(|e| ConfigError::Json { path: p.clone(), detail: e.to_string() })?;
    Ok((v, p))
}

struct Fields<'a> {
    v: &'a Value,
    path: &'a str,
    prefix: &'a str,
}

impl Fields<'_> {
    fn err(&self, key: &str, problem: &str) -> ConfigError {
        ConfigError::Field { path: self.path.into(), key: format!("{}{key}", self.prefix), problem: problem.into() }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| self.err(key, "is not a non-negative integer")),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| self.err(key, "is not a number")),
        }
    }
    fn str_or(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default.into()),
            Some(x) => x.as_str().map(String::from).ok_or_else(|| self.err(key, "is not a string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_config_shapes() {
        let full = serde_json::json!({"model_type": "clip", "projection_dim": 512,
            "vision_config": {"hidden_size": 768, "patch_size": 32}, "text_config": {"hidden_size": 512}});
        assert_eq!(ClipVisionConfig::from_json(&full, "c").unwrap(), ClipVisionConfig::vit_b32());
        let vision = serde_json::json!({"model_type": "clip_vision_model", "hidden_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512, "patch_size": 8,
            "image_size": 32, "projection_dim": 64});
        let c = ClipVisionConfig::from_json(&vision, "c").unwrap();
        assert_eq!((c.hidden_size, c.num_positions(), c.projection_dim), (128, 17, 64));
        assert!(ClipTextConfig::from_json(&vision, "c").unwrap().is_none());
    }

    #[test]
    fn inconsistent_sizes_are_named() {
        let bad = serde_json::json!({"hidden_size": 100, "num_attention_heads": 12});
        let e = ClipVisionConfig::from_json(&bad, "c").unwrap_err().to_string();
        assert!(e.contains("hidden_size 100"), "{e}");
        let bad = serde_json::json!({"patch_size": "x"});
        let e = ClipVisionConfig::from_json(&bad, "c").unwrap_err().to_string();
        assert!(e.contains("`patch_size` is not a non-negative integer"), "{e}");
    }
}
