//! `di-fgsm`: the gradient of L(T(x_t)) with DI's random resize and pad T (one draw per batch per
//! step), flowing back through T's adjoint; then MI's update. torchattacks `DIFGSM`: shrink
//! variant, mu 0 (mu 1 is M-DI2-FGSM); TransferAttack `DIM`: expand variant, mu 1.

use ndarray::{Array4, ArrayView4};
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Preset, momentum_iterative};
use crate::classifier::Classifier;

pub struct DiFgsm;

impl Attack for DiFgsm {
    fn name(&self) -> &'static str {
        "di-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["difgsm", "di2-fgsm", "dim"]
    }
    fn summary(&self) -> &'static str {
        "diverse inputs: gradient through a random resize+pad (prob p), then the MI update"
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps", "alpha", "steps", "mu", "di-prob", "di-variant", "resize-rate"]
    }
    fn configure(&self, preset: Preset, cfg: &mut AttackConfig) {
        cfg.di_prob = 0.5;
        cfg.mu = match preset {
            Preset::TorchAttacks => 0.0,
            Preset::TransferAttack => 1.0,
        };
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
