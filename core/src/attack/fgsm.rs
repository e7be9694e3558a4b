//! `fgsm`: x' = clip01(x + eps sign g) (Goodfellow et al.; torchattacks `FGSM`).

use ndarray::{Array4, ArrayView4, Zip};
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Preset, sign};
use crate::classifier::Classifier;

pub struct Fgsm;

impl Attack for Fgsm {
    fn name(&self) -> &'static str {
        "fgsm"
    }
    fn summary(&self) -> &'static str {
        "one signed gradient step of size eps: x' = clip01(x + eps sign g)"
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps"]
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        cfg.steps = 1;
        cfg.alpha = cfg.eps;
        cfg.mu = 0.0;
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        _rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        let eps = cfg.eps as f32;
        let g = goal.grad(model, x)?;
        let mut adv = x.to_owned();
        Zip::from(&mut adv).and(&g).for_each(|a, &g| *a = (*a + eps * sign(g)).clamp(0.0, 1.0));
        Ok(adv)
    }
}
