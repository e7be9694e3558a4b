//! Weight-name conventions of CLIP checkpoints (CLIP.md "Weight names").
//!
//! - [`Convention::HfClip`]: HF `CLIPModel` (and older `CLIPVisionModel` files): the vision
//!   encoder's names start with `vision_model.`.
//! - [`Convention::HfVision`]: HF `CLIPVisionModel` saved by transformers >= 5: the same names
//!   without the `vision_model.` prefix (`embeddings.`, `pre_layrnorm.`, `encoder.`, `post_layernorm.`).
//! - [`Convention::OpenClip`]: open_clip state dicts: `visual.` prefix, fused q/k/v, `visual.proj`.
//!
//! The default merge selection (METHODS.md "Which tensors are merged") is the vision encoder only;
//! `visual_projection`, `visual.proj`, the text tower and `logit_scale` are copied from the base.

use mergeattack_core::tensor::{ParamSet, Tensor};
use ndarray::{Axis, CowArray, Slice};

use super::WeightsError;

/// Name roots of the HF vision encoder once the `vision_model.` prefix is dropped.
pub const HF_VISION_ROOTS: [&str; 4] = ["embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."];

/// How a checkpoint names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convention {
    HfClip,
    HfVision,
    OpenClip,
}

impl Convention {
    /// Detect the convention from tensor names; `None` when no vision-encoder name is present.
    pub fn detect<'n>(names: impl IntoIterator<Item = &'n str>) -> Option<Convention> {
        let names: Vec<&str> = names.into_iter().collect();
        if names.iter().any(|n| n.starts_with("vision_model.")) {
            Some(Convention::HfClip)
        } else if names.iter().any(|n| n.starts_with("visual.")) {
            Some(Convention::OpenClip)
        } else if names.iter().any(|n| HF_VISION_ROOTS.iter().any(|r| n.starts_with(r))) {
            Some(Convention::HfVision)
        } else {
            None
        }
    }

    /// True when `name` belongs to the vision encoder (the default merge selection).
    pub fn is_vision_encoder(self, name: &str) -> bool {
        match self {
            Convention::HfClip => name.starts_with("vision_model."),
            Convention::HfVision => HF_VISION_ROOTS.iter().any(|r| name.starts_with(r)),
            Convention::OpenClip => name.starts_with("visual.") && name != "visual.proj",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Convention::HfClip => "HF CLIPModel (vision_model.*)",
            Convention::HfVision => "HF CLIPVisionModel without prefix",
            Convention::OpenClip => "open_clip (visual.*)",
        }
    }
}

/// open_clip per-block suffix -> HF per-layer suffix (besides the fused in_proj).
const BLOCK_RENAMES: [(&str, &str); 10] = [
    ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("ln_1.weight", "layer_norm1.weight"),
    ("ln_1.bias", "layer_norm1.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.fc2.bias"),
    ("ln_2.weight", "layer_norm2.weight"),
    ("ln_2.bias", "layer_norm2.bias"),
];

/// Top-level open_clip vision names -> HF names.
const TOP_RENAMES: [(&str, &str); 7] = [
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
];

/// Convert the vision tower of an open_clip state dict to HF `CLIPModel` names: the fused
/// `in_proj_{weight,bias}` [3D, D] / [3D] are split into q, k, v (rows 0..D, D..2D, 2D..3D), and
/// `visual.proj` [D, P] is transposed into `visual_projection.weight` [P, D]. `logit_scale` is kept;
/// other non-`visual.` tensors (the text tower) are left out. Renamed tensors stay borrowed.
pub fn open_clip_to_hf<'a>(p: &ParamSet<'a>) -> Result<ParamSet<'a>, WeightsError> {
    let err = |name: &str, detail: String| WeightsError::Convert { name: name.into(), detail };
    let mut out = ParamSet::new();
    for (name, t) in p.iter() {
        if name == "logit_scale" {
            out.insert(name, t.clone());
            continue;
        }
        let Some(rest) = name.strip_prefix("visual.") else { continue };
        if let Some((_, hf)) = TOP_RENAMES.iter().find(|(oc, _)| *oc == name) {
            out.insert(*hf, t.clone());
            continue;
        }
        if rest == "proj" {
            if t.ndim() != 2 {
                return Err(err(name, format!("expected a 2-D [width, projection] matrix, got shape {:?}", t.shape())));
            }
            let transposed = t.view().reversed_axes().as_standard_layout().into_owned();
            out.insert_owned("visual_projection.weight", transposed.into_dyn());
            continue;
        }
        let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
            return Err(err(name, "not a known open_clip ViT vision tensor".into()));
        };
        let Some((layer, suffix)) = block.split_once('.') else {
            return Err(err(name, "not a known open_clip ViT vision tensor".into()));
        };
        let layer: usize = layer.parse().map_err(|_| err(name, format!("`{layer}` is not a block index")))?;
        let prefix = format!("vision_model.encoder.layers.{layer}.");
        if let Some((_, hf)) = BLOCK_RENAMES.iter().find(|(oc, _)| *oc == suffix) {
            out.insert(format!("{prefix}{hf}"), t.clone());
            continue;
        }
        let kind = match suffix {
            "attn.in_proj_weight" => "weight",
            "attn.in_proj_bias" => "bias",
            _ => return Err(err(name, "not a known open_clip ViT vision tensor".into())),
        };
        let rows = t.shape().first().copied().unwrap_or(0);
        let ok_rank = if kind == "weight" { t.ndim() == 2 } else { t.ndim() == 1 };
        if !ok_rank || rows == 0 || !rows.is_multiple_of(3) {
            return Err(err(
                name,
                format!("expected a fused q/k/v {kind} with 3*width rows, got shape {:?}", t.shape()),
            ));
        }
        let d = rows / 3;
        for (i, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let slice: Tensor<'static> =
                CowArray::from(t.slice_axis(Axis(0), Slice::from(i * d..(i + 1) * d)).to_owned());
            out.insert(format!("{prefix}self_attn.{part}.{kind}"), slice);
        }
    }
    Ok(out)
}
