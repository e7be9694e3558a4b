//! The CLIP ViT vision graph (CLIP.md, ENGINE.md): pixels in [0, 1] -> image feature -> cosine
//! logits against a class-embedding head, with the gradients attacks, training and RegMean need.
//!
//! Entry point: [`build_vision`]. Inputs: `pixels` [N, C, H, W] (always), `labels` int64 [N] (when
//! a loss is needed), `dlogits` [N, classes] (when a logits VJP is requested). Outputs (each only
//! when selected in [`VisionOutputs`]): `logits` [N, classes], `loss` [N] (per-sample cross-entropy),
//! `dx` [N, C, H, W] = d(sum of losses)/d pixels, `dx_dlogits` [N, C, H, W] = d(sum(dlogits *
//! logits))/d pixels, `features` [N, projection_dim] (unnormalised), `grad.<initializer name>`
//! (see [`DwObjective`]) and `gram.<weight name>` [in, in] (mean X^T X over all token rows of the
//! batch, for every q/k/v/out/fc1/fc2 weight).
//!
//! Weights are external initializers named exactly like the HF `CLIPModel` tensors with their HF
//! shapes (`vision_model.embeddings.patch_embedding.weight` [D, C, p, p], linear weights
//! [out, in], `visual_projection.weight` [proj, D]) plus `head.class_embeddings` [classes, proj] and
//! `logit_scale` [] (a log, like CLIP). Only the weights the selected outputs use are declared:
//! [`Graph::external_initializers`] lists the names to supply at session creation.

use crate::clip::config::{ClipVisionConfig, ConfigError};
use crate::graph::{Dim, ElemType, Graph, Value};

/// CLIP's per-channel pixel mean and standard deviation (RGB).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Input and output names.
pub const PIXELS: &str = "pixels";
pub const LABELS: &str = "labels";
pub const DLOGITS: &str = "dlogits";
/// Input of the entropy objective: `[N, classes]`, 1 where a row's class counts, 0 elsewhere.
pub const COLUMN_MASK: &str = "column_mask";
/// Input of the entropy objective: `[N]`, each row's weight in the objective.
pub const ROW_WEIGHTS: &str = "row_weights";
/// Output of the entropy objective: `[N]`, each row's entropy over its selected columns.
pub const ENTROPY: &str = "entropy";
/// What the column mask adds to an unselected logit: large enough that its probability is
/// exactly 0 in f32 for any logit scale CLIP uses (at most 100), finite so that `p log p` stays 0
/// (never `0 * -inf`, which would be NaN) and so do the gradients.
pub const MASK_OFFSET: f64 = 1e9;
pub const LOGITS: &str = "logits";
pub const LOSS: &str = "loss";
pub const DX: &str = "dx";
pub const DX_DLOGITS: &str = "dx_dlogits";
pub const FEATURES: &str = "features";
/// Prefix of the weight-gradient outputs (`grad.<initializer name>`).
pub const GRAD_PREFIX: &str = "grad.";
/// Prefix of the Gram outputs (`gram.<weight name>`).
pub const GRAM_PREFIX: &str = "gram.";
/// The class-embedding head and the logit scale.
pub const HEAD: &str = "head.class_embeddings";
pub const LOGIT_SCALE: &str = "logit_scale";
/// The Representation Surgery weights (see [`VisionOutputs::surgery`]).
pub const SURGERY_DOWN: &str = "surgery.down";
pub const SURGERY_UP: &str = "surgery.up";

/// Which scalar the weight gradients (`grad.*`) differentiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DwObjective {
    /// The sum over the batch of the per-sample cross-entropy losses (needs `labels`).
    LossSum,
    /// `sum(dlogits * logits)` for the `dlogits` input: back-propagates any loss of the logits.
    Dlogits,
    /// AdaMerging's objective (METHODS.md), computed in the graph: `sum_i row_weights[i] * H_i`,
    /// `H_i = -sum_j p_ij log p_ij` with `log p_i = log_softmax(logits_i - MASK_OFFSET * (1 -
    /// column_mask_i))`: each row's entropy over its own columns only (inputs [`COLUMN_MASK`] and
    /// [`ROW_WEIGHTS`]; the per-row entropies are the [`ENTROPY`] output).
    Entropy,
}

/// The outputs a vision graph computes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VisionOutputs {
    pub logits: bool,
    pub loss: bool,
    pub dx: bool,
    pub dx_dlogits: bool,
    pub features: bool,
    pub dw: Option<DwObjective>,
    /// The weights `grad.*` outputs are made for (`None`: every weight the graph declares). The
    /// backward pass stops where nothing below needs a gradient (e.g. fine-tuning the last blocks
    /// only never differentiates the first ones). Names the graph does not declare are an error.
    pub dw_wrt: Option<Vec<String>>,
    /// The per-row entropy output ([`ENTROPY`], inputs [`COLUMN_MASK`] and [`ROW_WEIGHTS`] not
    /// needed for it alone: the mask is).
    pub entropy: bool,
    pub grams: bool,
    /// Representation Surgery (METHODS.md `+surgery`) of this rank: the projected image feature f
    /// becomes f - W_up ReLU(W_down f) (weights [`SURGERY_DOWN`] `[rank, projection_dim]` and
    /// [`SURGERY_UP`] `[projection_dim, rank]`) before the `features` output, the normalisation
    /// and the head, so logits, loss and every gradient go through it. Not an output by itself.
    pub surgery: Option<usize>,
}

impl VisionOutputs {
    /// What an attack step needs: logits, per-sample loss and its pixel gradient.
    pub fn attack() -> Self {
        VisionOutputs { logits: true, loss: true, dx: true, ..Default::default() }
    }
    /// Logits only (evaluation).
    pub fn logits() -> Self {
        VisionOutputs { logits: true, ..Default::default() }
    }
    fn needs_head(&self) -> bool {
        self.logits || self.loss || self.dx || self.dx_dlogits || self.dw.is_some() || self.entropy
    }
    fn needs_mask(&self) -> bool {
        self.entropy || self.dw == Some(DwObjective::Entropy)
    }
    fn needs_labels(&self) -> bool {
        self.loss || self.dx || self.dw == Some(DwObjective::LossSum)
    }
    fn needs_dlogits(&self) -> bool {
        self.dx_dlogits || self.dw == Some(DwObjective::Dlogits)
    }
    fn needs_features(&self) -> bool {
        self.needs_head() || self.features
    }
}

/// HF names and shapes of the vision tower's weights (without the head and the logit scale), in
/// the order the graph uses them.
pub fn vision_weight_shapes(cfg: &ClipVisionConfig) -> Vec<(String, Vec<usize>)> {
    let (d, c, p, t, i) =
        (cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.num_positions(), cfg.intermediate_size);
    let mut v = vec![
        ("vision_model.embeddings.patch_embedding.weight".to_string(), vec![d, c, p, p]),
        ("vision_model.embeddings.class_embedding".to_string(), vec![d]),
        ("vision_model.embeddings.position_embedding.weight".to_string(), vec![t, d]),
        ("vision_model.pre_layrnorm.weight".to_string(), vec![d]),
        ("vision_model.pre_layrnorm.bias".to_string(), vec![d]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("vision_model.encoder.layers.{l}");
        v.push((format!("{pre}.layer_norm1.weight"), vec![d]));
        v.push((format!("{pre}.layer_norm1.bias"), vec![d]));
        for m in ["q_proj", "k_proj", "v_proj"] {
            v.push((format!("{pre}.self_attn.{m}.weight"), vec![d, d]));
            v.push((format!("{pre}.self_attn.{m}.bias"), vec![d]));
        }
        v.push((format!("{pre}.self_attn.out_proj.weight"), vec![d, d]));
        v.push((format!("{pre}.self_attn.out_proj.bias"), vec![d]));
        v.push((format!("{pre}.layer_norm2.weight"), vec![d]));
        v.push((format!("{pre}.layer_norm2.bias"), vec![d]));
        v.push((format!("{pre}.mlp.fc1.weight"), vec![i, d]));
        v.push((format!("{pre}.mlp.fc1.bias"), vec![i]));
        v.push((format!("{pre}.mlp.fc2.weight"), vec![d, i]));
        v.push((format!("{pre}.mlp.fc2.bias"), vec![d]));
    }
    v.push(("vision_model.post_layernorm.weight".into(), vec![d]));
    v.push(("vision_model.post_layernorm.bias".into(), vec![d]));
    v.push(("visual_projection.weight".into(), vec![cfg.projection_dim, d]));
    v
}

/// Names of the linear weights that get a `gram.<name>` output, in order.
pub fn gram_weight_names(cfg: &ClipVisionConfig) -> Vec<String> {
    let mut v = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("vision_model.encoder.layers.{l}");
        for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            v.push(format!("{pre}.self_attn.{m}.weight"));
        }
        v.push(format!("{pre}.mlp.fc1.weight"));
        v.push(format!("{pre}.mlp.fc2.weight"));
    }
    v
}

/// The built graph with the values tests and callers may want to look at.
pub(crate) struct Built {
    pub(crate) graph: Graph,
    /// The input of every gram weight (before the Gram reduction), by weight name.
    #[allow(dead_code)]
    pub(crate) linear_inputs: Vec<(String, Value)>,
}

/// Build the vision graph for `cfg`, a head of `num_classes` classes, the selected outputs, in
/// float type `float` (F32 for the tool, F64 for gradient checks). See the module documentation.
pub fn build_vision(
    cfg: &ClipVisionConfig,
    num_classes: usize,
    outputs: &VisionOutputs,
    float: ElemType,
) -> Result<Graph, ConfigError> {
    build_inner(cfg, num_classes, outputs, float).map(|b| b.graph)
}

pub(crate) fn build_inner(
    cfg: &ClipVisionConfig,
    num_classes: usize,
    out: &VisionOutputs,
    float: ElemType,
) -> Result<Built, ConfigError> {
    cfg.validate()?;
    if cfg.num_channels != 3 {
        return Err(ConfigError::Inconsistent(format!(
            "vision num_channels {} is not 3 (CLIP's normalisation is RGB)",
            cfg.num_channels
        )));
    }
    if out.surgery == Some(0) {
        return Err(ConfigError::Inconsistent("the surgery module has rank 0".into()));
    }
    if out.needs_head() && num_classes == 0 {
        return Err(ConfigError::Inconsistent("the classification head has 0 classes".into()));
    }
    if *out == (VisionOutputs { surgery: out.surgery, ..Default::default() }) {
        return Err(ConfigError::Inconsistent("no vision graph output was selected".into()));
    }
    let (c, hw, p, d) = (cfg.num_channels, cfg.image_size, cfg.patch_size, cfg.hidden_size);
    let (gr, t, heads, hd) = (cfg.grid(), cfg.num_positions(), cfg.num_attention_heads, cfg.head_dim());
    let eps = cfg.layer_norm_eps;
    let n = Dim::n();
    let mut g = Graph::new("clip_vision", float);
    let pixels = g.input(PIXELS, float, &[n.clone(), c.into(), hw.into(), hw.into()]);
    let labels = out.needs_labels().then(|| g.input(LABELS, ElemType::I64, std::slice::from_ref(&n)));
    let dlogits = out.needs_dlogits().then(|| g.input(DLOGITS, float, &[n.clone(), num_classes.into()]));
    let column_mask = out.needs_mask().then(|| g.input(COLUMN_MASK, float, &[n.clone(), num_classes.into()]));
    let row_weights =
        (out.dw == Some(DwObjective::Entropy)).then(|| g.input(ROW_WEIGHTS, float, std::slice::from_ref(&n)));
    let mut linear_inputs = Vec::new();
    let w = |g: &mut Graph, name: &str, shape: &[usize]| g.weight(name, shape);

    // (x - mean) / std as one multiply-add.
    let inv_std: Vec<f64> = CLIP_STD.iter().map(|s| 1.0 / s).collect();
    let shift: Vec<f64> = CLIP_MEAN.iter().zip(&CLIP_STD).map(|(m, s)| -m / s).collect();
    let inv_std = g.const_float(&[1, c, 1, 1], &inv_std);
    let shift = g.const_float(&[1, c, 1, 1], &shift);
    let xs = g.mul(pixels, inv_std);
    let xn = g.add(xs, shift);

    // Patch embedding: patchify [N, C, g, p, g, p] -> [N, g, g, C, p, p] -> [N, g*g, C*p*p], then a
    // MatMul by the kernel as [D, C*p*p]^T.
    let (gi, ci, pi, di) = (gr as i64, c as i64, p as i64, d as i64);
    let x6 = g.reshape(xn, &[0, ci, gi, pi, gi, pi]);
    let xt = g.transpose(x6, &[0, 2, 4, 1, 3, 5]);
    let patches = g.reshape(xt, &[0, gi * gi, ci * pi * pi]);
    let wp = w(&mut g, "vision_model.embeddings.patch_embedding.weight", &[d, c, p, p]);
    let wp2 = g.reshape(wp, &[di, ci * pi * pi]);
    let emb = g.linear(patches, wp2, None);

    // [CLS; patches] + positions.
    let cls = w(&mut g, "vision_model.embeddings.class_embedding", &[d]);
    let cls3 = g.reshape(cls, &[1, 1, di]);
    let nshape = g.shape_of(pixels, Some((0, 1)));
    let rest = g.const_i64(&[1, di]);
    let target = g.concat(&[nshape, rest], 0);
    let cls_n = g.expand(cls3, target, vec![n.clone(), Dim::Fixed(1), d.into()]);
    let tokens = g.concat(&[cls_n, emb], 1);
    let pos = w(&mut g, "vision_model.embeddings.position_embedding.weight", &[t, d]);
    let x = g.add(tokens, pos);
    let lw = w(&mut g, "vision_model.pre_layrnorm.weight", &[d]);
    let lb = w(&mut g, "vision_model.pre_layrnorm.bias", &[d]);
    let mut x = g.layer_norm(x, lw, lb, eps);

    let scale = (hd as f64).powf(-0.5);
    let (hi, hdi) = (heads as i64, hd as i64);
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("vision_model.encoder.layers.{l}");
        // Only the CLS token of the last layer's output is used (pooling): there the queries, the
        // attention output, the residual and the MLP run on that one token (keys and values still
        // see all of them), 7% of ViT-B/32's multiply-adds each way. Gram outputs need every
        // token's linear inputs, so they keep the full layer.
        let cls_only = l + 1 == cfg.num_hidden_layers && !out.grams;
        let ln = |g: &mut Graph, x: Value, k: &str| {
            let gw = g.weight(&format!("{pre}.{k}.weight"), &[d]);
            let gb = g.weight(&format!("{pre}.{k}.bias"), &[d]);
            g.layer_norm(x, gw, gb, eps)
        };
        let lin = |g: &mut Graph, x: Value, k: &str, o: usize, i: usize| {
            let lw = g.weight(&format!("{pre}.{k}.weight"), &[o, i]);
            let lb = g.weight(&format!("{pre}.{k}.bias"), &[o]);
            g.linear(x, lw, Some(lb))
        };
        let h = ln(&mut g, x, "layer_norm1");
        for m in ["q_proj", "k_proj", "v_proj"] {
            linear_inputs.push((format!("{pre}.self_attn.{m}.weight"), h));
        }
        let hq = if cls_only { g.slice(h, &[1], &[0], &[1]) } else { h };
        let q = lin(&mut g, hq, "self_attn.q_proj", d, d);
        let k = lin(&mut g, h, "self_attn.k_proj", d, d);
        let v = lin(&mut g, h, "self_attn.v_proj", d, d);
        let q = g.scale(q, scale);
        let q4 = g.reshape(q, &[0, 0, hi, hdi]);
        let qh = g.transpose(q4, &[0, 2, 1, 3]); // [N, H, T, hd]
        let k4 = g.reshape(k, &[0, 0, hi, hdi]);
        let kh = g.transpose(k4, &[0, 2, 3, 1]); // [N, H, hd, T]
        let v4 = g.reshape(v, &[0, 0, hi, hdi]);
        let vh = g.transpose(v4, &[0, 2, 1, 3]); // [N, H, T, hd]
        let s = g.matmul(qh, kh);
        let a = g.softmax(s, -1);
        let o = g.matmul(a, vh);
        let ot = g.transpose(o, &[0, 2, 1, 3]);
        let o3 = g.reshape(ot, &[0, 0, di]);
        linear_inputs.push((format!("{pre}.self_attn.out_proj.weight"), o3));
        let att = lin(&mut g, o3, "self_attn.out_proj", d, d);
        if cls_only {
            x = g.slice(x, &[1], &[0], &[1]);
        }
        x = g.add(x, att);
        let h2 = ln(&mut g, x, "layer_norm2");
        linear_inputs.push((format!("{pre}.mlp.fc1.weight"), h2));
        let f1 = lin(&mut g, h2, "mlp.fc1", cfg.intermediate_size, d);
        let act = if cfg.hidden_act == "gelu" { g.gelu(f1) } else { g.quick_gelu(f1) };
        linear_inputs.push((format!("{pre}.mlp.fc2.weight"), act));
        let f2 = lin(&mut g, act, "mlp.fc2", d, cfg.intermediate_size);
        x = g.add(x, f2);
    }

    if out.grams {
        let mut done: Vec<(Value, Value)> = Vec::new();
        for (name, xin) in &linear_inputs {
            let gm = match done.iter().find(|(v, _)| v == xin) {
                Some((_, gm)) => *gm,
                None => {
                    let width = g.shape(*xin).last().and_then(Dim::fixed).expect("fixed width");
                    let x2 = g.reshape(*xin, &[-1, width]);
                    let xt = g.transpose(x2, &[1, 0]);
                    let gm = g.matmul(xt, x2);
                    let cnt = g.size_of(x2);
                    let cnt = g.cast(cnt, float);
                    let gm = g.scale(gm, width as f64);
                    let gm = g.div(gm, cnt);
                    done.push((*xin, gm));
                    gm
                }
            };
            g.output(gm, &format!("{GRAM_PREFIX}{name}"));
        }
    }

    if out.needs_features() {
        let cls_tok = g.select(x, 1, 0); // [N, D]
        let pw = w(&mut g, "vision_model.post_layernorm.weight", &[d]);
        let pb = w(&mut g, "vision_model.post_layernorm.bias", &[d]);
        let pooled = g.layer_norm(cls_tok, pw, pb, eps);
        let proj = w(&mut g, "visual_projection.weight", &[cfg.projection_dim, d]);
        let mut feat = g.linear(pooled, proj, None);
        if let Some(r) = out.surgery {
            // f' = f - W_up ReLU(W_down f), ReLU as h * (h > 0).
            let down = w(&mut g, SURGERY_DOWN, &[r, cfg.projection_dim]);
            let up = w(&mut g, SURGERY_UP, &[cfg.projection_dim, r]);
            let h = g.linear(feat, down, None);
            let zero = g.scalar(0.0);
            let pos = g.greater(h, zero);
            let mask = g.cast(pos, float);
            let a = g.mul(h, mask);
            let corr = g.linear(a, up, None);
            feat = g.sub(feat, corr);
        }
        if out.features {
            g.output(feat, FEATURES);
        }
        if out.needs_head() {
            let head = w(&mut g, HEAD, &[num_classes, cfg.projection_dim]);
            let ls = w(&mut g, LOGIT_SCALE, &[]);
            let u = g.l2_normalize(feat);
            let hn = g.l2_normalize(head);
            let hnt = g.transpose(hn, &[1, 0]);
            let cos = g.matmul(u, hnt);
            let s = g.exp(ls);
            let logits = g.mul(cos, s);
            if out.logits {
                g.output(logits, LOGITS);
            }
            let mut weight_names = g.external_initializers();
            if let Some(only) = &out.dw_wrt {
                if let Some(bad) = only.iter().find(|w| !weight_names.contains(w)) {
                    return Err(ConfigError::Inconsistent(format!(
                        "no weight gradient can be made for `{bad}`: the vision graph has no such weight"
                    )));
                }
                weight_names.retain(|w| only.contains(w));
            }
            let weights: Vec<Value> = weight_names.iter().map(|nm| g.by_name(nm).expect("declared weight")).collect();
            if let Some(m) = column_mask {
                // Unselected columns get -MASK_OFFSET: p = 0 exactly, p log p = 0, finite gradients.
                let one = g.scalar_as(float, 1.0);
                let off = g.sub(m, one);
                let off = g.scale(off, MASK_OFFSET);
                let z = g.add(logits, off);
                let lp = g.log_softmax(z, -1);
                let p = g.exp(lp);
                let plp = g.mul(p, lp);
                let s = g.reduce_sum(plp, &[-1], false);
                let h = g.neg(s);
                if out.entropy {
                    g.output(h, ENTROPY);
                }
                if let Some(rw) = row_weights {
                    let wh = g.mul(h, rw);
                    let total = g.sum_all(wh);
                    let grads = g.grad(total, &weights);
                    for (nm, gv) in weight_names.iter().zip(grads) {
                        g.output(gv, &format!("{GRAD_PREFIX}{nm}"));
                    }
                }
            }
            if let Some(labels) = labels {
                let lp = g.log_softmax(logits, -1);
                let l2 = g.unsqueeze(labels, &[1]);
                let picked = g.gather_elements(lp, l2, 1);
                let picked = g.squeeze(picked, &[1]);
                let loss = g.neg(picked);
                if out.loss {
                    g.output(loss, LOSS);
                }
                let mut wrt = Vec::new();
                if out.dx {
                    wrt.push(pixels);
                }
                let with_w = out.dw == Some(DwObjective::LossSum);
                if with_w {
                    wrt.extend(&weights);
                }
                if !wrt.is_empty() {
                    let total = g.sum_all(loss);
                    let grads = g.grad(total, &wrt);
                    let mut it = grads.into_iter();
                    if out.dx {
                        g.output(it.next().expect("dx"), DX);
                    }
                    if with_w {
                        for (nm, gv) in weight_names.iter().zip(it) {
                            g.output(gv, &format!("{GRAD_PREFIX}{nm}"));
                        }
                    }
                }
            }
            if let Some(dl) = dlogits {
                let mut wrt = Vec::new();
                if out.dx_dlogits {
                    wrt.push(pixels);
                }
                let with_w = out.dw == Some(DwObjective::Dlogits);
                if with_w {
                    wrt.extend(&weights);
                }
                let grads = g.vjp(&[(logits, dl)], &wrt);
                let mut it = grads.into_iter();
                if out.dx_dlogits {
                    g.output(it.next().expect("dx_dlogits"), DX_DLOGITS);
                }
                if with_w {
                    for (nm, gv) in weight_names.iter().zip(it) {
                        g.output(gv, &format!("{GRAD_PREFIX}{nm}"));
                    }
                }
            }
        }
    }
    Ok(Built { graph: g, linear_inputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::TensorData;
    use crate::graph::test_util::{Feed, TestRng, run, session};

    fn tiny() -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            patch_size: 4,
            image_size: 8,
            num_channels: 3,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 8,
        }
    }
    const CLASSES: usize = 3;
    const N: usize = 2;

    /// Random weights for every initializer the graph declares (LayerNorm scales near 1).
    fn weights(g: &Graph, seed: u64) -> Vec<(String, Vec<f64>)> {
        let mut rng = TestRng::new(seed);
        g.initializers()
            .into_iter()
            .filter(|(n, _)| g.external_initializers().contains(n))
            .map(|(n, s)| {
                let len: i64 = s.iter().map(|d| d.fixed().unwrap()).product();
                let v: Vec<f64> = if n == LOGIT_SCALE {
                    vec![2.0]
                } else if n.ends_with("norm1.weight")
                    || n.ends_with("norm2.weight")
                    || n.contains("layernorm.weight")
                    || n.contains("layrnorm.weight")
                {
                    rng.vec(len as usize, 0.7, 1.3)
                } else {
                    rng.vec(len as usize, -0.5, 0.5)
                };
                (n, v)
            })
            .collect()
    }

    /// Central finite difference of `f` in element `j` of weight `k`.
    fn weight_fd(
        w: &[(String, Vec<f64>)],
        k: usize,
        j: usize,
        h: f64,
        f: impl Fn(&[(String, Vec<f64>)]) -> f64,
    ) -> f64 {
        let at = |sign: f64| {
            let mut w2 = w.to_vec();
            w2[k].1[j] += sign * h;
            f(&w2)
        };
        (at(1.0) - at(-1.0)) / (2.0 * h)
    }

    fn embed(g: &Graph, w: &[(String, Vec<f64>)]) -> Graph {
        let mut g = g.clone();
        for (n, v) in w {
            g.set_initializer_data(n, TensorData::F64(v.clone()));
        }
        g
    }

    fn inputs(seed: u64) -> (Vec<f64>, Vec<i64>, Vec<f64>) {
        let mut rng = TestRng::new(seed);
        (rng.vec(N * 3 * 8 * 8, 0.0, 1.0), vec![2, 0], rng.vec(N * CLASSES, -1.0, 1.0))
    }

    fn feeds(px: &[f64], labels: Option<&[i64]>, dl: Option<&[f64]>) -> Vec<(&'static str, Feed)> {
        let mut f = vec![(PIXELS, Feed::F64(vec![px.len() / 192, 3, 8, 8], px.to_vec()))];
        if let Some(l) = labels {
            f.push((LABELS, Feed::I64(vec![l.len()], l.to_vec())));
        }
        if let Some(d) = dl {
            f.push((DLOGITS, Feed::F64(vec![d.len() / CLASSES, CLASSES], d.to_vec())));
        }
        f
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn forward_outputs_are_consistent() {
        let cfg = tiny();
        let all = VisionOutputs { logits: true, loss: true, features: true, ..Default::default() };
        let g = build_vision(&cfg, CLASSES, &all, ElemType::F64).unwrap();
        let w = weights(&g, 1);
        let mut s = session(&embed(&g, &w));
        let (px, labels, _) = inputs(2);
        let o = run(&mut s, &feeds(&px, Some(&labels), None), &[LOGITS, LOSS, FEATURES]);
        let head = &w.iter().find(|(n, _)| n == HEAD).unwrap().1;
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..N {
            let f = &o[2][i * 8..(i + 1) * 8];
            for c in 0..CLASSES {
                let h = &head[c * 8..(c + 1) * 8];
                let cos = f.iter().zip(h).map(|(a, b)| a * b).sum::<f64>() / (norm(f) * norm(h));
                assert!(close(o[0][i * CLASSES + c], 2f64.exp() * cos, 1e-12));
            }
            let z = &o[0][i * CLASSES..(i + 1) * CLASSES];
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            assert!(close(o[1][i], lse - z[labels[i] as usize], 1e-12));
        }
        // Rows are independent of the batch they are computed in.
        let one = run(&mut s, &feeds(&px[192..], Some(&labels[1..]), None), &[LOGITS]);
        for c in 0..CLASSES {
            assert!(close(one[0][c], o[0][CLASSES + c], 1e-12));
        }
    }

    #[test]
    fn pixel_and_weight_gradients_match_finite_differences() {
        let cfg = tiny();
        let outs = VisionOutputs { loss: true, dx: true, dw: Some(DwObjective::LossSum), ..Default::default() };
        let g = build_vision(&cfg, CLASSES, &outs, ElemType::F64).unwrap();
        let w = weights(&g, 3);
        let (px, labels, _) = inputs(4);
        let mut names = vec![LOSS.to_string(), DX.to_string()];
        names.extend(w.iter().map(|(n, _)| format!("{GRAD_PREFIX}{n}")));
        let nr: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = session(&embed(&g, &w));
        let o = run(&mut s, &feeds(&px, Some(&labels), None), &nr);
        let total = |s: &mut ort::session::Session, px: &[f64]| -> f64 {
            run(s, &feeds(px, Some(&labels), None), &[LOSS])[0].iter().sum()
        };
        let h = 1e-6;
        let mut rng = TestRng::new(5);
        for _ in 0..12 {
            let j = (rng.uniform(0.0, px.len() as f64)) as usize;
            let mut p = px.clone();
            p[j] = px[j] + h;
            let lp = total(&mut s, &p);
            p[j] = px[j] - h;
            let lm = total(&mut s, &p);
            let fd = (lp - lm) / (2.0 * h);
            assert!(close(o[1][j], fd, 1e-6), "dx[{j}]: {} vs finite difference {fd}", o[1][j]);
        }
        // One element of every weight (a new session per perturbation: weights are initializers).
        for (k, (name, v)) in w.iter().enumerate() {
            let j = (rng.uniform(0.0, v.len() as f64)) as usize;
            let fd = weight_fd(&w, k, j, h, |w2| total(&mut session(&embed(&g, w2)), &px));
            let an = o[2 + k][j];
            assert!(close(an, fd, 1e-6), "grad.{name}[{j}]: {an} vs finite difference {fd}");
        }
    }

    #[test]
    fn logits_vjp_matches_finite_differences() {
        let mut cfg = tiny();
        cfg.hidden_act = "gelu".into();
        cfg.num_hidden_layers = 1;
        let outs =
            VisionOutputs { logits: true, dx_dlogits: true, dw: Some(DwObjective::Dlogits), ..Default::default() };
        let g = build_vision(&cfg, CLASSES, &outs, ElemType::F64).unwrap();
        assert!(g.input_names() == [PIXELS, DLOGITS]);
        let w = weights(&g, 6);
        let (px, _, dl) = inputs(7);
        let mut s = session(&embed(&g, &w));
        let proj = format!("{GRAD_PREFIX}visual_projection.weight");
        let o = run(&mut s, &feeds(&px, None, Some(&dl)), &[DX_DLOGITS, &proj]);
        let obj = |s: &mut ort::session::Session, px: &[f64]| -> f64 {
            let l = run(s, &feeds(px, None, Some(&dl)), &[LOGITS]);
            l[0].iter().zip(&dl).map(|(a, b)| a * b).sum()
        };
        // Erf runs in f32 inside this f64 graph (gelu): a coarser step and tolerance.
        let h = 1e-3;
        for j in [0, 17, 100, 191, 250, 383] {
            let mut p = px.clone();
            p[j] = px[j] + h;
            let a = obj(&mut s, &p);
            p[j] = px[j] - h;
            let b = obj(&mut s, &p);
            let fd = (a - b) / (2.0 * h);
            assert!(close(o[0][j], fd, 2e-3), "dx_dlogits[{j}]: {} vs finite difference {fd}", o[0][j]);
        }
        let k = w.iter().position(|(n, _)| n == "visual_projection.weight").unwrap();
        for j in [0, 33, 127] {
            let mut f = [0.0; 2];
            for (side, sign) in [1.0, -1.0].iter().enumerate() {
                let mut w2 = w.clone();
                w2[k].1[j] += sign * h;
                f[side] = obj(&mut session(&embed(&g, &w2)), &px);
            }
            let fd = (f[0] - f[1]) / (2.0 * h);
            assert!(close(o[1][j], fd, 2e-3), "{proj}[{j}]: {} vs finite difference {fd}", o[1][j]);
        }
    }

    /// Sum over the rows of `w_i * H_i`, H_i the entropy of softmax over the row's selected
    /// columns, from logits (f64, independent of the graph), and the per-row entropies.
    fn masked_entropy(logits: &[f64], mask: &[f64], w: &[f64]) -> (f64, Vec<f64>) {
        let mut hs = Vec::new();
        let mut total = 0.0;
        for i in 0..logits.len() / CLASSES {
            let sel: Vec<f64> =
                (0..CLASSES).filter(|&c| mask[i * CLASSES + c] == 1.0).map(|c| logits[i * CLASSES + c]).collect();
            let m = sel.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + sel.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let h = -sel.iter().map(|v| (v - lse).exp() * (v - lse)).sum::<f64>();
            total += w[i] * h;
            hs.push(h);
        }
        (total, hs)
    }

    #[test]
    fn entropy_objective_and_its_weight_gradients_match_finite_differences() {
        let cfg = tiny();
        let outs = VisionOutputs { logits: true, entropy: true, dw: Some(DwObjective::Entropy), ..Default::default() };
        let g = build_vision(&cfg, CLASSES, &outs, ElemType::F64).unwrap();
        assert_eq!(g.input_names(), [PIXELS, COLUMN_MASK, ROW_WEIGHTS]);
        let w = weights(&g, 31);
        let (px, _, _) = inputs(32);
        // Row 0 over classes {0, 1}, row 1 over {1, 2}; rows weighted like two batch means.
        let mask = vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0];
        let rw = vec![0.5, 0.25];
        let feeds = |px: &[f64], mask: &[f64]| {
            let mut f = feeds(px, None, None);
            f.push((COLUMN_MASK, Feed::F64(vec![N, CLASSES], mask.to_vec())));
            f.push((ROW_WEIGHTS, Feed::F64(vec![N], rw.clone())));
            f
        };
        let mut names = vec![LOGITS.to_string(), ENTROPY.to_string()];
        names.extend(w.iter().map(|(n, _)| format!("{GRAD_PREFIX}{n}")));
        let nr: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = session(&embed(&g, &w));
        let o = run(&mut s, &feeds(&px, &mask), &nr);
        let (_, hs) = masked_entropy(&o[0], &mask, &rw);
        for i in 0..N {
            assert!(close(o[1][i], hs[i], 1e-12), "entropy[{i}]: {} vs {}", o[1][i], hs[i]);
            assert!(hs[i] > 1e-3, "row {i} should have a non-trivial entropy");
        }
        let objective = |s: &mut ort::session::Session| -> f64 {
            let l = run(s, &feeds(&px, &mask), &[LOGITS]).remove(0);
            masked_entropy(&l, &mask, &rw).0
        };
        let h = 1e-6;
        let mut rng = TestRng::new(33);
        let mut nonzero = 0;
        for (k, (name, v)) in w.iter().enumerate() {
            let j = (rng.uniform(0.0, v.len() as f64)) as usize;
            let fd = weight_fd(&w, k, j, h, |w2| objective(&mut session(&embed(&g, w2))));
            let an = o[2 + k][j];
            assert!(close(an, fd, 1e-6), "grad.{name}[{j}]: {an} vs finite difference {fd}");
            nonzero += usize::from(fd.abs() > 1e-6);
        }
        assert!(nonzero > w.len() / 2, "most probes should see a gradient ({nonzero} of {})", w.len());
        // A row with one selected column has entropy 0 and no gradient; nothing becomes NaN.
        let one = vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let o1 = run(&mut s, &feeds(&px, &one), &nr);
        assert!(o1.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(o1[1][0], 0.0);
        let (_, h1) = masked_entropy(&o1[0], &one, &rw);
        assert!(close(o1[1][1], h1[1], 1e-12));
        // The same in f32, the tool's type.
        let g32 = build_vision(&cfg, CLASSES, &outs, ElemType::F32).unwrap();
        let b = ort::session::Session::builder(crate::graph::test_util::env()).unwrap();
        let mut b = crate::graph::custom::register(b).unwrap();
        for (n, vals) in &w {
            let v = g32.by_name(n).unwrap();
            let shape: Vec<usize> = g32.shape(v).iter().map(|d| d.fixed().unwrap() as usize).collect();
            let data: Vec<f32> = vals.iter().map(|&x| x as f32).collect();
            let t = ort::value::Tensor::from_array((shape, data)).unwrap().into_dyn();
            b = b.with_external_initializer(n, t).unwrap();
        }
        let mut s32 = crate::graph::custom::commit(&mut b, &g32.to_bytes()).unwrap();
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let o32 = run(
            &mut s32,
            &[
                (PIXELS, Feed::F32(vec![N, 3, 8, 8], f32s(&px))),
                (COLUMN_MASK, Feed::F32(vec![N, CLASSES], f32s(&one))),
                (ROW_WEIGHTS, Feed::F32(vec![N], f32s(&rw))),
            ],
            &nr,
        );
        assert!(o32.iter().flatten().all(|v| v.is_finite()), "f32: the mask offset must not make NaN");
        assert_eq!(o32[1][0], 0.0);
        for k in 2..nr.len() {
            for (a, b) in o32[k].iter().zip(&o1[k]) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{}: f32 {a} vs f64 {b}", nr[k]);
            }
        }
    }

    #[test]
    fn weight_gradients_of_a_subset_equal_the_full_ones_with_a_shorter_backward() {
        let cfg = tiny();
        let full = VisionOutputs { loss: true, dw: Some(DwObjective::LossSum), ..Default::default() };
        let only: Vec<String> =
            vec!["vision_model.encoder.layers.1.mlp.fc2.weight".into(), "visual_projection.weight".into()];
        let part = VisionOutputs { dw_wrt: Some(only.clone()), ..full.clone() };
        let gf = build_vision(&cfg, CLASSES, &full, ElemType::F64).unwrap();
        let gp = build_vision(&cfg, CLASSES, &part, ElemType::F64).unwrap();
        let grads: Vec<String> = gp.output_names().into_iter().filter(|n| n.starts_with(GRAD_PREFIX)).collect();
        assert_eq!(grads, ["grad.vision_model.encoder.layers.1.mlp.fc2.weight", "grad.visual_projection.weight"]);
        assert!(
            gp.node_count() * 2 < gf.node_count(),
            "the backward stops above layer 1's MLP: {} vs {} nodes",
            gp.node_count(),
            gf.node_count()
        );
        let w = weights(&gf, 41);
        let (px, labels, _) = inputs(42);
        let f = run(&mut session(&embed(&gf, &w)), &feeds(&px, Some(&labels), None), &[&grads[0], &grads[1]]);
        let p = run(&mut session(&embed(&gp, &w)), &feeds(&px, Some(&labels), None), &[&grads[0], &grads[1]]);
        for (a, b) in f.iter().flatten().zip(p.iter().flatten()) {
            assert!(close(*a, *b, 1e-12), "{a} vs {b}");
        }
        let bad = VisionOutputs { dw_wrt: Some(vec!["vision_model.nope".into()]), ..full };
        let e = build_vision(&cfg, CLASSES, &bad, ElemType::F64).unwrap_err().to_string();
        assert!(e.contains("`vision_model.nope`"), "{e}");
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn surgery_block_corrects_the_feature_and_its_gradients_match_finite_differences() {
        let cfg = tiny();
        let r = 3;
        let outs = VisionOutputs {
            loss: true,
            dx: true,
            features: true,
            dw: Some(DwObjective::LossSum),
            surgery: Some(r),
            ..Default::default()
        };
        let g = build_vision(&cfg, CLASSES, &outs, ElemType::F64).unwrap();
        let ext = g.external_initializers();
        assert!(ext.contains(&SURGERY_DOWN.to_string()) && ext.contains(&SURGERY_UP.to_string()));
        let w = weights(&g, 21);
        let (px, labels, _) = inputs(22);
        // The feature is f - up relu(down f), with f the feature of the same graph without surgery.
        let plain = VisionOutputs { features: true, ..Default::default() };
        let gp = build_vision(&cfg, CLASSES, &plain, ElemType::F64).unwrap();
        let wp: Vec<(String, Vec<f64>)> = w.iter().filter(|(n, _)| gp.by_name(n).is_some()).cloned().collect();
        let f = run(&mut session(&embed(&gp, &wp)), &feeds(&px, None, None), &[FEATURES]).remove(0);
        let down = &w.iter().find(|(n, _)| n == SURGERY_DOWN).unwrap().1;
        let up = &w.iter().find(|(n, _)| n == SURGERY_UP).unwrap().1;
        let pd = cfg.projection_dim;
        let mut names = vec![LOSS.to_string(), DX.to_string(), FEATURES.to_string()];
        names.extend(w.iter().map(|(n, _)| format!("{GRAD_PREFIX}{n}")));
        let nr: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut s = session(&embed(&g, &w));
        let o = run(&mut s, &feeds(&px, Some(&labels), None), &nr);
        let mut active = 0;
        for i in 0..N {
            let fi = &f[i * pd..(i + 1) * pd];
            let a: Vec<f64> = (0..r).map(|k| (0..pd).map(|j| down[k * pd + j] * fi[j]).sum::<f64>().max(0.0)).collect();
            active += a.iter().filter(|v| **v > 0.0).count();
            for j in 0..pd {
                let want = fi[j] - (0..r).map(|k| up[j * r + k] * a[k]).sum::<f64>();
                assert!(close(o[2][i * pd + j], want, 1e-12), "feature [{i},{j}]");
            }
        }
        assert!(active > 0 && active < N * r, "the test should see both ReLU branches ({active} active)");
        let total = |s: &mut ort::session::Session, px: &[f64]| -> f64 {
            run(s, &feeds(px, Some(&labels), None), &[LOSS])[0].iter().sum()
        };
        let h = 1e-6;
        for j in [3, 50, 101, 250, 377] {
            let mut p = px.clone();
            p[j] += h;
            let lp = total(&mut s, &p);
            p[j] -= 2.0 * h;
            let lm = total(&mut s, &p);
            let fd = (lp - lm) / (2.0 * h);
            assert!(close(o[1][j], fd, 1e-6), "dx[{j}]: {} vs finite difference {fd}", o[1][j]);
        }
        for name in [SURGERY_DOWN, SURGERY_UP] {
            let k = w.iter().position(|(n, _)| n == name).unwrap();
            for j in 0..w[k].1.len() {
                let mut fv = [0.0; 2];
                for (side, sign) in [1.0, -1.0].iter().enumerate() {
                    let mut w2 = w.clone();
                    w2[k].1[j] += sign * h;
                    fv[side] = total(&mut session(&embed(&g, &w2)), &px);
                }
                let fd = (fv[0] - fv[1]) / (2.0 * h);
                let an = o[3 + k][j];
                assert!(close(an, fd, 1e-6), "grad.{name}[{j}]: {an} vs finite difference {fd}");
            }
        }
        let e =
            build_vision(&cfg, CLASSES, &VisionOutputs { surgery: Some(0), ..VisionOutputs::attack() }, ElemType::F64)
                .unwrap_err()
                .to_string();
        assert!(e.contains("rank 0"), "{e}");
    }

    #[test]
    fn grams_are_mean_outer_products_of_linear_inputs() {
        let cfg = tiny();
        let outs = VisionOutputs { grams: true, ..Default::default() };
        let mut built = build_inner(&cfg, CLASSES, &outs, ElemType::F64).unwrap();
        assert!(built.graph.external_initializers().iter().all(|n| n.starts_with("vision_model.encoder")
            || n.starts_with("vision_model.embeddings")
            || n.starts_with("vision_model.pre_layrnorm")));
        let taps: Vec<(String, Value)> = built.linear_inputs.clone();
        for (i, (_, v)) in taps.iter().enumerate() {
            built.graph.output(*v, &format!("tap.{i}"));
        }
        let w = weights(&built.graph, 8);
        let mut s = session(&embed(&built.graph, &w));
        let (px, _, _) = inputs(9);
        let names: Vec<String> = gram_weight_names(&cfg)
            .iter()
            .map(|n| format!("{GRAM_PREFIX}{n}"))
            .chain((0..taps.len()).map(|i| format!("tap.{i}")))
            .collect();
        assert_eq!(taps.len(), gram_weight_names(&cfg).len());
        let nr: Vec<&str> = names.iter().map(String::as_str).collect();
        let o = run(&mut s, &feeds(&px, None, None), &nr);
        let m = taps.len();
        for i in 0..m {
            let x = &o[m + i];
            let width = (o[i].len() as f64).sqrt() as usize;
            let rows = x.len() / width;
            assert_eq!(rows, N * cfg.num_positions());
            for a in 0..width {
                for b in 0..width {
                    let e: f64 = (0..rows).map(|r| x[r * width + a] * x[r * width + b]).sum::<f64>() / rows as f64;
                    assert!(close(o[i][a * width + b], e, 1e-12), "{}[{a},{b}]", names[i]);
                }
            }
        }
    }

    #[test]
    fn f32_outputs_are_bitwise_identical_for_any_thread_count() {
        use ort::session::Session;
        use ort::value::Tensor;
        let cfg = tiny();
        let outs = VisionOutputs { dw: Some(DwObjective::LossSum), grams: true, ..VisionOutputs::attack() };
        let g = build_vision(&cfg, CLASSES, &outs, ElemType::F32).unwrap();
        let bytes = g.to_bytes();
        let w = weights(&g, 10);
        let (px, labels, _) = inputs(11);
        let px: Vec<f32> = px.iter().map(|&v| v as f32).collect();
        let names = g.output_names();
        let mut results: Vec<Vec<Vec<f32>>> = Vec::new();
        for threads in [1, 2, 4] {
            let b = Session::builder(crate::graph::test_util::env()).unwrap().with_intra_threads(threads).unwrap();
            let mut b = crate::graph::custom::register(b).unwrap();
            for (n, vals) in &w {
                let v = g.by_name(n).unwrap();
                let shape: Vec<usize> = g.shape(v).iter().map(|d| d.fixed().unwrap() as usize).collect();
                let data: Vec<f32> = vals.iter().map(|&x| x as f32).collect();
                b = b.with_external_initializer(n, Tensor::from_array((shape, data)).unwrap().into_dyn()).unwrap();
            }
            let mut s = crate::graph::custom::commit(&mut b, &bytes).unwrap();
            let x = Tensor::from_array((vec![N, 3, 8, 8], px.clone())).unwrap();
            let l = Tensor::from_array((vec![N], labels.clone())).unwrap();
            let o = s.run(ort::inputs![PIXELS => x, LABELS => l]).unwrap();
            results.push(names.iter().map(|n| o[n.as_str()].try_extract_tensor::<f32>().unwrap().1.to_vec()).collect());
        }
        assert!(results[0].iter().flatten().all(|v| v.is_finite()));
        for r in &results[1..] {
            for (k, n) in names.iter().enumerate() {
                let same = r[k].iter().zip(&results[0][k]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "output {n} differs between thread counts");
            }
        }
    }

    #[test]
    fn f32_graph_builds_and_names_hf_weights() {
        let cfg = ClipVisionConfig::vit_b32();
        let g = build_vision(&cfg, 10, &VisionOutputs::attack(), ElemType::F32).unwrap();
        let mut expected: Vec<String> = vision_weight_shapes(&cfg).into_iter().map(|(n, _)| n).collect();
        expected.push(HEAD.into());
        expected.push(LOGIT_SCALE.into());
        let mut got = g.external_initializers();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        for (n, shape) in vision_weight_shapes(&cfg) {
            let v = g.by_name(&n).unwrap();
            assert_eq!(g.shape(v), crate::graph::dims(&shape).as_slice(), "{n}");
        }
        assert_eq!(g.output_names(), [LOGITS, LOSS, DX]);
        assert!(g.to_bytes().len() < 200_000, "weights are not embedded");
        let e = build_vision(&cfg, 0, &VisionOutputs::attack(), ElemType::F32).unwrap_err().to_string();
        assert!(e.contains("0 classes"), "{e}");
    }
}
