//! `bim` (I-FGSM) and `pgd`: x_{t+1} = Pi(x_t + alpha sign g_t); BIM starts at x, PGD at
//! clip01(x + U(-eps, eps)) drawn per element in row-major order (torchattacks `BIM`, `PGD`).

use ndarray::{Array4, ArrayView4};
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Preset, linf_step};
use crate::classifier::Classifier;

pub struct Bim;
pub struct Pgd;

const PARAMS: &[&str] = &["eps", "alpha", "steps", "random-start"];

fn configure(cfg: &mut AttackConfig, random_start: bool) {
    cfg.mu = 0.0;
    cfg.random_start = random_start;
}

/// The uniform start x_0 = clip01(x + U(-eps, eps)), one draw per element in (N, C, H, W) order.
pub(crate) fn uniform_start(x: ArrayView4<'_, f32>, eps: f32, rng: &mut ChaCha20Rng) -> Array4<f32> {
    let mut adv = x.as_standard_layout().into_owned();
    for v in adv.iter_mut() {
        let u: f32 = rng.random();
        *v = (*v + (u * (2.0 * eps) - eps)).clamp(0.0, 1.0);
    }
    adv
}

fn iterate(
    cfg: &AttackConfig,
    model: &mut dyn Classifier,
    x: ArrayView4<'_, f32>,
    goal: &Goal<'_>,
    rng: &mut ChaCha20Rng,
) -> Result<Array4<f32>, AttackError> {
    let (eps, alpha) = (cfg.eps as f32, cfg.alpha as f32);
    let mut adv = if cfg.random_start { uniform_start(x, eps, rng) } else { x.to_owned() };
    for _ in 0..cfg.steps {
        let g = goal.grad(model, adv.view())?;
        linf_step(x, &mut adv, &g, alpha, eps);
    }
    Ok(adv)
}

impl Attack for Bim {
    fn name(&self) -> &'static str {
        "bim"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["i-fgsm", "ifgsm"]
    }
    fn summary(&self) -> &'static str {
        "iterative FGSM: x_{t+1} = Pi(x_t + alpha sign g_t), x_0 = x"
    }
    fn params(&self) -> &'static [&'static str] {
        PARAMS
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        configure(cfg, false);
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        iterate(cfg, model, x, goal, rng)
    }
}

impl Attack for Pgd {
    fn name(&self) -> &'static str {
        "pgd"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["pgd-linf"]
    }
    fn summary(&self) -> &'static str {
        "BIM from a uniform random start x_0 = clip01(x + U(-eps, eps))"
    }
    fn params(&self) -> &'static [&'static str] {
        PARAMS
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        configure(cfg, true);
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        iterate(cfg, model, x, goal, rng)
    }
}
