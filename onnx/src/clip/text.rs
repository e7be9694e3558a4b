//! The CLIP text tower (forward only) and zero-shot heads.
//!
//! Graph: token embedding + position embedding -> pre-LN blocks with a causal mask ->
//! pooled at the end-of-text token -> final LayerNorm -> `text_projection` (no bias). Initializer
//! names are the HF `CLIPModel` names (`text_model.*`, `text_projection.weight`). Inputs:
//! `input_ids` [N, L] int64 (L = `max_position_embeddings`) and `eot_rows` [N] int64, the flat row
//! `i * L + position of the end-of-text token of text i`, which [`TextModel`] computes the way HF
//! does (the first `eos_token_id`, or the arg-max id for legacy configs with `eos_token_id` 2).
//! Pooling before the final LayerNorm equals HF's LayerNorm-then-pool (LayerNorm is per token).
//! Output: `text_embeds` [N, projection_dim], unnormalised.

use std::path::Path;

use mergeattack_core::tensor::ParamSet;
use ndarray::{Array2, ArrayView2, Axis};
use ort::session::Session;
use ort::value::TensorRef;

use super::config::ClipTextConfig;
use super::tokenizer::ClipTokenizer;
use crate::graph::{Dim, ElemType, Graph};
use crate::runtime::{BoundWeights, RuntimeError, RuntimeOptions, create_session, external_shapes};

/// Build the text graph for `cfg` in the float type `float` (F32 for the tool, F64 for tests).
pub fn build(cfg: &ClipTextConfig, float: ElemType) -> Graph {
    let (d, l, h) = (cfg.hidden_size, cfg.max_position_embeddings, cfg.num_attention_heads);
    let hd = d / h;
    let eps = cfg.layer_norm_eps;
    let mut g = Graph::new("clip_text", float);
    let ids = g.input("input_ids", ElemType::I64, &[Dim::n(), Dim::Fixed(l as i64)]);
    let eot = g.input("eot_rows", ElemType::I64, &[Dim::n()]);
    let tok = g.weight("text_model.embeddings.token_embedding.weight", &[cfg.vocab_size, d]);
    let pos = g.weight("text_model.embeddings.position_embedding.weight", &[l, d]);
    let emb = g.gather(tok, ids, 0);
    let mut x = g.add(emb, pos);
    // Causal mask: 0 on and below the diagonal, a large negative number above it.
    let mask: Vec<f64> = (0..l * l).map(|k| if k % l > k / l { -1e9 } else { 0.0 }).collect();
    let mask = g.const_float(&[l, l], &mask);
    let scale = g.scalar((hd as f64).powf(-0.5));
    for i in 0..cfg.num_hidden_layers {
        let p = format!("text_model.encoder.layers.{i}.");
        let w = |g: &mut Graph, n: &str, shape: &[usize]| g.weight(&format!("{p}{n}"), shape);
        let ln1g = w(&mut g, "layer_norm1.weight", &[d]);
        let ln1b = w(&mut g, "layer_norm1.bias", &[d]);
        let hn = g.layer_norm(x, ln1g, ln1b, eps);
        let proj = |g: &mut Graph, name: &str, input| {
            let wt = w(g, &format!("self_attn.{name}.weight"), &[d, d]);
            let b = w(g, &format!("self_attn.{name}.bias"), &[d]);
            g.linear(input, wt, Some(b))
        };
        let q = proj(&mut g, "q_proj", hn);
        let k = proj(&mut g, "k_proj", hn);
        let v = proj(&mut g, "v_proj", hn);
        let heads = |g: &mut Graph, t| {
            let r = g.reshape(t, &[0, l as i64, h as i64, hd as i64]);
            g.transpose(r, &[0, 2, 1, 3])
        };
        let q = g.mul(q, scale);
        let qh = heads(&mut g, q);
        let kr = g.reshape(k, &[0, l as i64, h as i64, hd as i64]);
        let kt = g.transpose(kr, &[0, 2, 3, 1]);
        let vh = heads(&mut g, v);
        let scores = g.matmul(qh, kt);
        let scores = g.add(scores, mask);
        let att = g.softmax(scores, -1);
        let o = g.matmul(att, vh);
        let o = g.transpose(o, &[0, 2, 1, 3]);
        let o = g.reshape(o, &[0, l as i64, d as i64]);
        let o = proj(&mut g, "out_proj", o);
        x = g.add(x, o);
        let ln2g = w(&mut g, "layer_norm2.weight", &[d]);
        let ln2b = w(&mut g, "layer_norm2.bias", &[d]);
        let hn = g.layer_norm(x, ln2g, ln2b, eps);
        let f1w = w(&mut g, "mlp.fc1.weight", &[cfg.intermediate_size, d]);
        let f1b = w(&mut g, "mlp.fc1.bias", &[cfg.intermediate_size]);
        let f2w = w(&mut g, "mlp.fc2.weight", &[d, cfg.intermediate_size]);
        let f2b = w(&mut g, "mlp.fc2.bias", &[d]);
        let a = g.linear(hn, f1w, Some(f1b));
        let a = if cfg.hidden_act == "gelu" { g.gelu(a) } else { g.quick_gelu(a) };
        let m = g.linear(a, f2w, Some(f2b));
        x = g.add(x, m);
    }
    let rows = g.reshape(x, &[-1, d as i64]);
    let pooled = g.gather(rows, eot, 0);
    let fg = g.weight("text_model.final_layer_norm.weight", &[d]);
    let fb = g.weight("text_model.final_layer_norm.bias", &[d]);
    let pooled = g.layer_norm(pooled, fg, fb, eps);
    let tp = g.weight("text_projection.weight", &[cfg.projection_dim, d]);
    let out = g.linear(pooled, tp, None);
    g.output(out, "text_embeds");
    g
}

/// Position of the end-of-text token of each row, the way HF `CLIPTextModel` pools: the first
/// `eos_token_id` (the arg-max id when the config has the legacy `eos_token_id` 2 or none).
pub fn eot_positions(ids: ArrayView2<'_, i64>, eos_token_id: Option<i64>) -> Vec<usize> {
    ids.axis_iter(Axis(0))
        .map(|row| match eos_token_id {
            Some(e) if e != 2 => row.iter().position(|&t| t == e).unwrap_or(0),
            _ => {
                // First maximum, like torch.argmax.
                let mut best = 0;
                for (i, &t) in row.iter().enumerate() {
                    if t > row[best] {
                        best = i;
                    }
                }
                best
            }
        })
        .collect()
}

/// The CLIP text tower on ONNX Runtime.
pub struct TextModel {
    config: ClipTextConfig,
    session: Session,
    batch_size: usize,
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel").field("config", &self.config).finish()
    }
}

impl TextModel {
    /// A text model from HF-named weights (`text_model.*`, `text_projection.weight`).
    pub fn from_params(
        config: ClipTextConfig,
        params: &ParamSet<'_>,
        opts: &RuntimeOptions,
        name: &str,
    ) -> Result<TextModel, RuntimeError> {
        let g = build(&config, ElemType::F32);
        let weights = BoundWeights::bind(&external_shapes(&g), params, name, |_| {
            " (zero-shot heads need a CLIPModel checkpoint with the text tower)".into()
        })?;
        let session = create_session(&g.to_bytes(), &weights, None, opts)?;
        Ok(TextModel { config, session, batch_size: opts.batch_size.max(1) })
    }

    /// Load the text tower of an HF `CLIPModel` safetensors file (or directory) with the
    /// `text_config` of its `config.json` (`config`, or the one beside the weights).
    pub fn load(weights: &Path, config: Option<&Path>, opts: &RuntimeOptions) -> Result<TextModel, RuntimeError> {
        let file = crate::runtime::weights_file(weights)?;
        let cfg_path = match config {
            Some(c) => c.to_path_buf(),
            None => file.parent().map(|p| p.join("config.json")).unwrap_or_else(|| "config.json".into()),
        };
        let (v, shown) = super::config::read_json(&cfg_path)?;
        let cfg = ClipTextConfig::from_json(&v, &shown)?.ok_or_else(|| {
            RuntimeError::Input(format!("{shown} has no text_config: zero-shot heads need a CLIPModel config"))
        })?;
        let ck = crate::weights::Checkpoint::open(&file)?;
        let params = ck.params()?;
        TextModel::from_params(cfg, &params, opts, &file.display().to_string())
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Text embeddings `[N, projection_dim]` (unnormalised) for token ids `[N, L]`.
    pub fn embed(&mut self, ids: ArrayView2<'_, i64>) -> Result<Array2<f32>, RuntimeError> {
        let (n, l) = ids.dim();
        let ctx = self.config.max_position_embeddings;
        if l != ctx {
            return Err(RuntimeError::Input(format!("token ids have {l} positions but the text tower takes {ctx}")));
        }
        if let Some(&t) = ids.iter().find(|&&t| t < 0 || t as usize >= self.config.vocab_size) {
            return Err(RuntimeError::Input(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                self.config.vocab_size
            )));
        }
        let mut out = Array2::zeros((n, self.config.projection_dim));
        let mut start = 0;
        while start < n {
            let end = (start + self.batch_size).min(n);
            let chunk = ids.slice(ndarray::s![start..end, ..]).as_standard_layout().into_owned();
            let rows: Vec<i64> = eot_positions(chunk.view(), self.config.eos_token_id)
                .into_iter()
                .enumerate()
                .map(|(i, p)| (i * l + p) as i64)
                .collect();
            let iv = TensorRef::from_array_view(chunk.view()).map_err(RuntimeError::ort("wrap token ids"))?;
            let rv = TensorRef::from_array_view(([rows.len()], &rows[..])).map_err(RuntimeError::ort("wrap rows"))?;
            let res = self
                .session
                .run(ort::inputs!["input_ids" => iv, "eot_rows" => rv])
                .map_err(RuntimeError::ort("run the text tower"))?;
            let e = res["text_embeds"].try_extract_array::<f32>().map_err(RuntimeError::ort("read text_embeds"))?;
            let e = e
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| RuntimeError::Ort { context: "read text_embeds".into(), detail: e.to_string() })?;
            out.slice_mut(ndarray::s![start..end, ..]).assign(&e);
            start = end;
        }
        Ok(out)
    }

    /// A zero-shot head `[classes, projection_dim]`: for each class, every template (with `{}`
    /// replaced by the class name) is embedded and L2-normalised, the embeddings are averaged and
    /// the mean is L2-normalised again (in f64).
    pub fn zeroshot_head<S: AsRef<str>, T: AsRef<str>>(
        &mut self,
        tokenizer: &ClipTokenizer,
        classes: &[S],
        templates: &[T],
    ) -> Result<Array2<f32>, RuntimeError> {
        if classes.is_empty() || templates.is_empty() {
            return Err(RuntimeError::Input("zero-shot heads need at least one class and one template".into()));
        }
        if let Some(t) = templates.iter().find(|t| !t.as_ref().contains("{}")) {
            return Err(RuntimeError::Input(format!("template {:?} has no `{{}}` for the class name", t.as_ref())));
        }
        if tokenizer.context_length() != self.config.max_position_embeddings {
            return Err(RuntimeError::Input(format!(
                "the tokenizer's context length {} differs from the text tower's {}",
                tokenizer.context_length(),
                self.config.max_position_embeddings
            )));
        }
        let mut head = Array2::zeros((classes.len(), self.config.projection_dim));
        for (c, mut row) in classes.iter().zip(head.rows_mut()) {
            let texts: Vec<String> = templates.iter().map(|t| t.as_ref().replace("{}", c.as_ref())).collect();
            let ids = tokenizer.encode_batch(&texts).map_err(|e| RuntimeError::Input(e.to_string()))?;
            let emb = self.embed(ids.view())?;
            let mut mean = vec![0f64; self.config.projection_dim];
            for e in emb.rows() {
                let norm = e.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
                for (m, &v) in mean.iter_mut().zip(e) {
                    *m += f64::from(v) / norm / templates.len() as f64;
                }
            }
            let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
            row.iter_mut().zip(&mean).for_each(|(o, m)| *o = (m / norm) as f32);
        }
        Ok(head)
    }
}
