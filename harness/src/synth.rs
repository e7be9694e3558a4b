//! Deterministic synthetic CLIP-shaped checkpoints (HF `CLIPModel` names) for the demo, the merge
//! tests and the merge benchmark.
//!
//! Every tensor is drawn from its own ChaCha stream (`rng::stream(seed, ["synth", role, name])`),
//! so the values depend only on the seed, the role and the name, never on the drawing order.
//! Fine-tuned models are the pretrained weights plus a small task vector on the vision encoder
//! only (as the real CLIP fine-tunes: `visual_projection`, the text tower and `logit_scale` frozen).

use std::path::{Path, PathBuf};

use mergeattack_core::rng;
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::weights::{Dtype, WeightsError, Writer};
use ndarray::{ArrayD, IxDyn};
use rand::RngExt;

/// The shape of a synthetic CLIP ViT.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub width: usize,
    pub layers: usize,
    pub patch: usize,
    pub image: usize,
    pub intermediate: usize,
    pub projection: usize,
    /// Width of the text-tower-like tensors (`text_model.*`, `text_projection`); 0 leaves them out.
    pub text_width: usize,
    pub text_vocab: usize,
}

impl SynthConfig {
    /// The demo's tiny CLIP: width 64, 2 layers, patch 8, image 32.
    pub fn tiny() -> Self {
        SynthConfig {
            width: 64,
            layers: 2,
            patch: 8,
            image: 32,
            intermediate: 256,
            projection: 32,
            text_width: 32,
            text_vocab: 100,
        }
    }

    /// The vision tower of CLIP ViT-B/32 (88 M parameters) with `visual_projection` and
    /// `logit_scale`, without the text tower.
    pub fn vit_b32() -> Self {
        SynthConfig {
            width: 768,
            layers: 12,
            patch: 32,
            image: 224,
            intermediate: 3072,
            projection: 512,
            text_width: 0,
            text_vocab: 0,
        }
    }

    /// Number of positions (patches + CLS).
    pub fn positions(&self) -> usize {
        (self.image / self.patch).pow(2) + 1
    }

    /// Every float tensor: (HF name, shape).
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (w, i) = (self.width, self.intermediate);
        let mut s: Vec<(String, Vec<usize>)> = vec![
            ("vision_model.embeddings.class_embedding".into(), vec![w]),
            ("vision_model.embeddings.patch_embedding.weight".into(), vec![w, 3, self.patch, self.patch]),
            ("vision_model.embeddings.position_embedding.weight".into(), vec![self.positions(), w]),
            ("vision_model.pre_layrnorm.weight".into(), vec![w]),
            ("vision_model.pre_layrnorm.bias".into(), vec![w]),
            ("vision_model.post_layernorm.weight".into(), vec![w]),
            ("vision_model.post_layernorm.bias".into(), vec![w]),
            ("visual_projection.weight".into(), vec![self.projection, w]),
            ("logit_scale".into(), vec![]),
        ];
        for l in 0..self.layers {
            let p = format!("vision_model.encoder.layers.{l}.");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                s.push((format!("{p}self_attn.{proj}.weight"), vec![w, w]));
                s.push((format!("{p}self_attn.{proj}.bias"), vec![w]));
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                s.push((format!("{p}{ln}.weight"), vec![w]));
                s.push((format!("{p}{ln}.bias"), vec![w]));
            }
            s.push((format!("{p}mlp.fc1.weight"), vec![i, w]));
            s.push((format!("{p}mlp.fc1.bias"), vec![i]));
            s.push((format!("{p}mlp.fc2.weight"), vec![w, i]));
            s.push((format!("{p}mlp.fc2.bias"), vec![w]));
        }
        if self.text_width > 0 {
            let t = self.text_width;
            s.push(("text_model.embeddings.token_embedding.weight".into(), vec![self.text_vocab, t]));
            s.push(("text_model.final_layer_norm.weight".into(), vec![t]));
            s.push(("text_projection.weight".into(), vec![self.projection, t]));
        }
        s.sort();
        s
    }

    /// Total float entries per checkpoint.
    pub fn numel(&self) -> usize {
        self.shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Uniform values in [-scale, scale] from the stream of (seed, role, name).
fn uniform(seed: u64, role: &str, name: &str, n: usize, scale: f32) -> Vec<f32> {
    let mut r = rng::stream(seed, &[b"synth", role.as_bytes(), name.as_bytes()]);
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// The pretrained checkpoint: LayerNorm weights near 1, biases small, matrices ~ U(+-1/sqrt(fan_in)),
/// `logit_scale` = ln 100.
pub fn pretrained(cfg: &SynthConfig, seed: u64) -> ParamSet<'static> {
    let mut p = ParamSet::new();
    for (name, shape) in cfg.shapes() {
        let n: usize = shape.iter().product();
        let values = if name == "logit_scale" {
            vec![100f32.ln()]
        } else if name.ends_with("norm.weight") || (name.contains("layer_norm") && name.ends_with(".weight")) {
            uniform(seed, "pretrained", &name, n, 0.1).into_iter().map(|v| 1.0 + v).collect()
        } else if shape.len() >= 2 {
            let fan_in: usize = shape[1..].iter().product();
            uniform(seed, "pretrained", &name, n, 1.0 / (fan_in as f32).sqrt())
        } else {
            uniform(seed, "pretrained", &name, n, 0.02)
        };
        p.insert_owned(name, ArrayD::from_shape_vec(IxDyn(&shape), values).expect("shape"));
    }
    p
}

/// Fine-tuned model `task`: the pretrained weights plus a task vector on the vision encoder,
/// entries ~ U(+-scale) (relative to 1/sqrt(fan_in) for matrices).
pub fn finetuned(cfg: &SynthConfig, pre: &ParamSet<'_>, task: usize, seed: u64, scale: f32) -> ParamSet<'static> {
    let role = format!("task{task}");
    let mut p = ParamSet::new();
    for (name, shape) in cfg.shapes() {
        let base = pre.get(&name).expect("pretrained has every synthetic tensor");
        if !name.starts_with("vision_model.") {
            p.insert_owned(name, base.to_owned());
            continue;
        }
        let n: usize = shape.iter().product();
        let s = if shape.len() >= 2 { scale / (shape[1..].iter().product::<usize>() as f32).sqrt() } else { scale };
        let tau = uniform(seed, &role, &name, n, s);
        let values: Vec<f32> = base.iter().zip(tau).map(|(b, t)| b + t).collect();
        p.insert_owned(name, ArrayD::from_shape_vec(IxDyn(&shape), values).expect("shape"));
    }
    p
}

/// Write a synthetic checkpoint: every float tensor as F32 plus an I64
/// `vision_model.embeddings.position_ids` [1, positions] (as older HF files hold), which merges
/// carry through unchanged.
pub fn write(path: &Path, cfg: &SynthConfig, params: &ParamSet<'_>) -> Result<(), WeightsError> {
    let ids: Vec<u8> = (0..cfg.positions() as i64).flat_map(|i| i.to_le_bytes()).collect();
    let mut w = Writer::new();
    w.params(params, Dtype::F32);
    w.raw("vision_model.embeddings.position_ids", Dtype::I64, &[1, cfg.positions()], &ids);
    w.meta("format", "pt").meta("mergeattack.synthetic", "true");
    w.write(path)
}

/// Write `pretrained.safetensors` and `finetuned-{t}.safetensors` (t < tasks) into `dir`; returns
/// (pretrained path, fine-tuned paths). Files that already exist are overwritten.
pub fn write_set(
    dir: &Path,
    cfg: &SynthConfig,
    tasks: usize,
    seed: u64,
    scale: f32,
) -> Result<(PathBuf, Vec<PathBuf>), WeightsError> {
    std::fs::create_dir_all(dir).map_err(|source| WeightsError::Write { path: dir.display().to_string(), source })?;
    let pre = pretrained(cfg, seed);
    let base = dir.join("pretrained.safetensors");
    write(&base, cfg, &pre)?;
    let mut fts = Vec::new();
    for t in 0..tasks {
        let ft = finetuned(cfg, &pre, t, seed, scale);
        let path = dir.join(format!("finetuned-{t}.safetensors"));
        write(&path, cfg, &ft)?;
        fts.push(path);
    }
    Ok((base, fts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b32_has_88m_parameters_and_tiny_is_small() {
        let n = SynthConfig::vit_b32().numel();
        // HF CLIPVisionModelWithProjection of ViT-B/32: 87,849,216 parameters (87,456,000 in the
        // vision encoder + 393,216 in visual_projection); plus logit_scale.
        assert_eq!(n, 87_849_216 + 1);
        assert_eq!(SynthConfig::tiny().positions(), 17);
    }

    #[test]
    fn deterministic_and_task_vectors_only_on_the_vision_encoder() {
        let cfg = SynthConfig::tiny();
        let a = pretrained(&cfg, 3);
        let b = pretrained(&cfg, 3);
        let c = pretrained(&cfg, 4);
        let name = "vision_model.encoder.layers.1.mlp.fc1.weight";
        assert_eq!(a.get(name).unwrap(), b.get(name).unwrap());
        assert_ne!(a.get(name).unwrap(), c.get(name).unwrap());
        let ft = finetuned(&cfg, &a, 0, 3, 0.01);
        assert_eq!(ft.get("logit_scale").unwrap(), a.get("logit_scale").unwrap());
        assert_eq!(ft.get("text_projection.weight").unwrap(), a.get("text_projection.weight").unwrap());
        let d: f32 = (ft.get(name).unwrap() - a.get(name).unwrap()).iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(d > 0.0 && d <= 0.01 / 8.0 + 1e-6, "{d}");
    }
}
