//! The one interface attacks, metrics and data-dependent merges see of a model.
//!
//! Images are NCHW f32 in [0, 1]; the model normalises inside. Implemented by the ONNX Runtime
//! session wrapper (`mergeattack-onnx`), by closed-form models in tests, and by ensembles.

use alloc::string::String;
use core::fmt;
use ndarray::{Array1, Array2, Array4, ArrayView2, ArrayView4};

/// A failure inside a model (runtime error, bad shape). Carries one sentence for the user.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelError(pub String);

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Per-sample cross-entropy and its input gradient.
#[derive(Clone, Debug)]
pub struct LossGrad {
    /// Logits, [N, classes].
    pub logits: Array2<f32>,
    /// Cross-entropy of each sample, [N].
    pub loss: Array1<f32>,
    /// d loss_i / d x_i for each sample i (the gradient of the *sum* of the per-sample losses;
    /// divide by N for the batch mean), [N, C, H, W].
    pub grad: Array4<f32>,
}

/// A differentiable image classifier.
pub trait Classifier {
    /// Number of classes (width of the logits).
    fn num_classes(&self) -> usize;

    /// Expected image shape (C, H, W).
    fn image_shape(&self) -> (usize, usize, usize);

    /// Logits for a batch, [N, classes].
    fn logits(&mut self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>, ModelError>;

    /// Logits, per-sample cross-entropy against `labels`, and the gradient of the summed loss
    /// with respect to the pixels.
    fn loss_grad(&mut self, x: ArrayView4<'_, f32>, labels: &[usize]) -> Result<LossGrad, ModelError>;

    /// Vector-Jacobian product through the logits: returns the logits and
    /// d (sum_ij dlogits_ij * logits_ij) / d x. Used by losses other than cross-entropy (C&W) and
    /// by logit-averaging ensembles.
    fn logits_vjp(
        &mut self,
        x: ArrayView4<'_, f32>,
        dlogits: ArrayView2<'_, f32>,
    ) -> Result<(Array2<f32>, Array4<f32>), ModelError>;

    /// Image features (the projected embedding before the head), [N, d], when the model has them.
    fn features(&mut self, _x: ArrayView4<'_, f32>) -> Result<Option<Array2<f32>>, ModelError> {
        Ok(None)
    }
}
