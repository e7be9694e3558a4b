//! `mi-fgsm` and `ni-fgsm`: m_{t+1} = mu m_t + n(g_t), x_{t+1} = Pi(x_t + alpha sign m_{t+1}),
//! m_0 = 0; NI takes g at the look-ahead x_t + alpha mu m_t (torchattacks `MIFGSM`, `NIFGSM`;
//! TransferAttack `MIFGSM`, `NIFGSM`).

use ndarray::{Array4, ArrayView4};
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Preset, momentum_iterative};
use crate::classifier::Classifier;

pub struct MiFgsm;
pub struct NiFgsm;

const PARAMS: &[&str] = &["eps", "alpha", "steps", "mu"];

impl Attack for MiFgsm {
    fn name(&self) -> &'static str {
        "mi-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["mifgsm", "mi"]
    }
    fn summary(&self) -> &'static str {
        "momentum: m <- mu m + n(g), x <- Pi(x + alpha sign m)"
    }
    fn params(&self) -> &'static [&'static str] {
        PARAMS
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        cfg.mu = 1.0;
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        momentum_iterative(cfg, model, x, goal, rng, false, None)
    }
}

impl Attack for NiFgsm {
    fn name(&self) -> &'static str {
        "ni-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["nifgsm", "ni"]
    }
    fn summary(&self) -> &'static str {
        "MI with the gradient at the Nesterov look-ahead x + alpha mu m"
    }
    fn params(&self) -> &'static [&'static str] {
        PARAMS
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        cfg.mu = 1.0;
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        momentum_iterative(cfg, model, x, goal, rng, true, None)
    }
}
