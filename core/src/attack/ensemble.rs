//! The `ensemble` surrogate: several classifiers seen as one [`Classifier`].
//!
//! - [`EnsembleMode::Logits`] (TransferAttack's default): the logits are the mean of the models'
//!   logits and the loss is the cross-entropy of that mean; the input gradient is the sum over
//!   models of each model's VJP with `(softmax(mean) - onehot) / K`.
//! - [`EnsembleMode::Losses`]: the loss is the mean of the models' cross-entropies and the gradient
//!   the mean of their gradients (the reported logits are still the mean logits).
//!
//! `logits_vjp` is linear in the logits, so in both modes it is the VJP of the mean logits (margin
//! losses such as C&W's see the averaged logits).

use alloc::format;
use alloc::vec::Vec;
use ndarray::{Array1, Array2, Array4, ArrayView2, ArrayView4, Axis};

use super::AttackError;
use crate::classifier::{Classifier, LossGrad, ModelError};

/// How an ensemble combines its models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnsembleMode {
    Logits,
    Losses,
}

/// Several models with the same classes and input shape.
pub struct Ensemble<'m> {
    models: Vec<&'m mut dyn Classifier>,
    mode: EnsembleMode,
    classes: usize,
    shape: (usize, usize, usize),
}

impl<'m> Ensemble<'m> {
    /// An ensemble of `models` (at least one, all with the same classes and image shape).
    pub fn new(models: Vec<&'m mut dyn Classifier>, mode: EnsembleMode) -> Result<Self, AttackError> {
        let Some(first) = models.first() else {
            return Err(AttackError::Ensemble("an ensemble needs at least one model".into()));
        };
        let (classes, shape) = (first.num_classes(), first.image_shape());
        for (k, m) in models.iter().enumerate() {
            if m.num_classes() != classes || m.image_shape() != shape {
                return Err(AttackError::Ensemble(format!(
                    "ensemble model {k} has {} classes and input {:?}, but model 0 has {classes} classes and input {shape:?}",
                    m.num_classes(),
                    m.image_shape()
                )));
            }
        }
        Ok(Ensemble { models, mode, classes, shape })
    }

    pub fn mode(&self) -> EnsembleMode {
        self.mode
    }

    fn mean_logits(&mut self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let k = self.models.len() as f32;
        let mut acc = Array2::<f32>::zeros((x.dim().0, self.classes));
        for m in self.models.iter_mut() {
            acc += &m.logits(x)?;
        }
        acc.mapv_inplace(|v| v / k);
        Ok(acc)
    }
}

/// Per-sample cross-entropy of `z` against `labels` and d(sum of losses)/dz, in f64.
pub(crate) fn cross_entropy(z: &Array2<f32>, labels: &[usize]) -> (Array1<f32>, Array2<f32>) {
    let mut loss = Array1::<f32>::zeros(z.dim().0);
    let mut dz = Array2::<f32>::zeros(z.dim());
    for (i, zi) in z.axis_iter(Axis(0)).enumerate() {
        let mx = zi.iter().fold(f64::NEG_INFINITY, |a, b| a.max(f64::from(*b)));
        let e: Vec<f64> = zi.iter().map(|v| libm::exp(f64::from(*v) - mx)).collect();
        let s: f64 = e.iter().sum();
        loss[i] = (libm::log(s) + mx - f64::from(zi[labels[i]])) as f32;
        for (j, ej) in e.iter().enumerate() {
            dz[[i, j]] = (ej / s - if j == labels[i] { 1.0 } else { 0.0 }) as f32;
        }
    }
    (loss, dz)
}

impl Classifier for Ensemble<'_> {
    fn num_classes(&self) -> usize {
        self.classes
    }

    fn image_shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    fn logits(&mut self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>, ModelError> {
        self.mean_logits(x)
    }

    fn loss_grad(&mut self, x: ArrayView4<'_, f32>, labels: &[usize]) -> Result<LossGrad, ModelError> {
        let k = self.models.len() as f32;
        match self.mode {
            EnsembleMode::Logits => {
                let z = self.mean_logits(x)?;
                let (loss, mut dz) = cross_entropy(&z, labels);
                dz.mapv_inplace(|v| v / k);
                let mut grad = Array4::<f32>::zeros(x.dim());
                for m in self.models.iter_mut() {
                    grad += &m.logits_vjp(x, dz.view())?.1;
                }
                Ok(LossGrad { logits: z, loss, grad })
            }
            EnsembleMode::Losses => {
                let mut z = Array2::<f32>::zeros((x.dim().0, self.classes));
                let mut loss = Array1::<f32>::zeros(x.dim().0);
                let mut grad = Array4::<f32>::zeros(x.dim());
                for m in self.models.iter_mut() {
                    let lg = m.loss_grad(x, labels)?;
                    z += &lg.logits;
                    loss += &lg.loss;
                    grad += &lg.grad;
                }
                for a in [&mut z.view_mut().into_dyn(), &mut loss.view_mut().into_dyn()] {
                    a.mapv_inplace(|v| v / k);
                }
                grad.mapv_inplace(|v| v / k);
                Ok(LossGrad { logits: z, loss, grad })
            }
        }
    }

    fn logits_vjp(
        &mut self,
        x: ArrayView4<'_, f32>,
        dlogits: ArrayView2<'_, f32>,
    ) -> Result<(Array2<f32>, Array4<f32>), ModelError> {
        let k = self.models.len() as f32;
        let d = dlogits.mapv(|v| v / k);
        let mut z = Array2::<f32>::zeros((x.dim().0, self.classes));
        let mut grad = Array4::<f32>::zeros(x.dim());
        for m in self.models.iter_mut() {
            let (zi, gi) = m.logits_vjp(x, d.view())?;
            z += &zi;
            grad += &gi;
        }
        z.mapv_inplace(|v| v / k);
        Ok((z, grad))
    }
}
