//! `si-ni-fgsm` (torchattacks `SINIFGSM`): at the NI look-ahead x~ = x_t + alpha mu m_t,
//! g = mean over i < m of grad_x L(x~ / 2^i) (the chain factor 1/2^i included), then
//! m <- mu m + n(g), x <- Pi(x + alpha sign m).

use ndarray::{Array4, ArrayView4, Zip};
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Preset, linf_step, look_ahead, momentum_update};
use crate::classifier::Classifier;
use crate::transform::scale::scale_copy;

pub struct SiNiFgsm;

impl Attack for SiNiFgsm {
    fn name(&self) -> &'static str {
        "si-ni-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["sinifgsm", "si-ni"]
    }
    fn summary(&self) -> &'static str {
        "scale-invariant NI: gradient averaged over the copies x~ / 2^i of the look-ahead"
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps", "alpha", "steps", "mu", "scales"]
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        cfg.mu = 1.0;
        cfg.scales = 5;
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        _rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        let (eps, alpha, mu) = (cfg.eps as f32, cfg.alpha as f32, cfg.mu as f32);
        let mut adv = x.as_standard_layout().into_owned();
        let mut m = Array4::<f32>::zeros(x.dim());
        for _ in 0..cfg.steps {
            let nes = look_ahead(&adv, &m, alpha * mu);
            let mut acc = Array4::<f32>::zeros(x.dim());
            for i in 0..cfg.scales as u32 {
                let gi = goal.grad(model, scale_copy(nes.view(), i).view())?;
                acc += &scale_copy(gi.view(), i);
            }
            let k = cfg.scales as f32;
            Zip::from(&mut acc).for_each(|a| *a /= k);
            momentum_update(&mut m, acc, mu);
            linf_step(x, &mut adv, &m, alpha, eps);
        }
        Ok(adv)
    }
}
