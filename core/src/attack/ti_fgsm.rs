//! `ti-fgsm`: g <- K * g before n(), K the normalised 15x15 Gaussian (nsig 3), a depthwise
//! convolution with zero 'same' padding. torchattacks `TIFGSM`: with DI (shrink, 0.9, p 0.5) and
//! mu 0; TransferAttack `TIM`: MI (mu 1) plus the kernel, without DI.

use ndarray::{Array4, ArrayView4};
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Preset, momentum_iterative};
use crate::classifier::Classifier;
use crate::transform::gaussian::GaussianKernel;

pub struct TiFgsm;

impl Attack for TiFgsm {
    fn name(&self) -> &'static str {
        "ti-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["tifgsm", "tim"]
    }
    fn summary(&self) -> &'static str {
        "translation-invariant: Gaussian-smoothed gradient (optionally through DI), MI update"
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps", "alpha", "steps", "mu", "kernel-len", "nsig", "di-prob", "di-variant", "resize-rate"]
    }
    fn configure(&self, preset: Preset, cfg: &mut AttackConfig) {
        match preset {
            Preset::TorchAttacks => {
                cfg.di_prob = 0.5;
                cfg.mu = 0.0;
            }
            Preset::TransferAttack => {
                cfg.di_prob = 0.0;
                cfg.mu = 1.0;
            }
        }
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        let kernel = GaussianKernel::new(cfg.kernel_len, cfg.nsig)?;
        momentum_iterative(cfg, model, x, goal, rng, false, Some(&kernel))
    }
}
