//! `pgd-l2` (torchattacks `PGDL2`): start x + delta with delta a Gaussian draw rescaled to L2 norm
//! r eps, r ~ U(0, 1) per sample; then x <- x + alpha g / (‖g‖2 + 1e-10), the perturbation
//! projected onto the L2 ball of radius eps, and clip01. Norms are per sample over C, H, W.
//!
//! Draw order: the Gaussian entries in (N, C, H, W) order (Box-Muller, two uniforms per entry:
//! `sqrt(-2 ln(1 - u1)) cos(2 pi u2)`), then r for each sample.

use ndarray::{Array4, ArrayView4, Axis, Zip};
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Norm, Preset};
use crate::classifier::Classifier;

pub struct PgdL2;

/// One standard normal draw (Box-Muller in f64, cosine branch).
pub(crate) fn normal(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = rng.random();
    let u2: f64 = rng.random();
    libm::sqrt(-2.0 * libm::log(1.0 - u1)) * libm::cos(2.0 * core::f64::consts::PI * u2)
}

/// Per-sample L2 norms, accumulated in f64.
pub(crate) fn norms(a: &Array4<f32>) -> ndarray::Array1<f32> {
    a.axis_iter(Axis(0))
        .map(|s| libm::sqrt(s.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>()) as f32)
        .collect()
}

impl Attack for PgdL2 {
    fn name(&self) -> &'static str {
        "pgd-l2"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["pgdl2"]
    }
    fn summary(&self) -> &'static str {
        "L2 PGD: random start in the ball, x <- x + alpha g/‖g‖2, project onto the eps ball, clip01"
    }
    fn norm(&self) -> Norm {
        Norm::L2
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps", "alpha", "steps", "random-start"]
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        // No TransferAttack counterpart: both presets keep torchattacks' L2 defaults.
        cfg.eps = 1.0;
        cfg.alpha = 0.2;
        cfg.steps = 10;
        cfg.mu = 0.0;
        cfg.random_start = true;
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        let (eps, alpha) = (cfg.eps as f32, cfg.alpha as f32);
        let x = x.as_standard_layout();
        let mut adv = x.to_owned();
        if cfg.random_start {
            let mut delta = Array4::<f32>::zeros(x.dim());
            for v in delta.iter_mut() {
                *v = normal(rng) as f32;
            }
            let n = norms(&delta);
            for (mut d, &ni) in delta.axis_iter_mut(Axis(0)).zip(&n) {
                let r: f32 = rng.random();
                let f = if ni > 0.0 { r / ni * eps } else { 0.0 };
                d.mapv_inplace(|v| v * f);
            }
            Zip::from(&mut adv).and(&x).and(&delta).for_each(|a, &x, &d| *a = (x + d).clamp(0.0, 1.0));
        }
        for _ in 0..cfg.steps {
            let mut g = goal.grad(model, adv.view())?;
            let gn = norms(&g);
            for (mut gi, &ni) in g.axis_iter_mut(Axis(0)).zip(&gn) {
                let d = ni + 1e-10;
                gi.mapv_inplace(|v| v / d);
            }
            let mut delta = Array4::<f32>::zeros(x.dim());
            Zip::from(&mut delta).and(&adv).and(&x).and(&g).for_each(|d, &a, &x, &g| *d = (a + alpha * g) - x);
            let dn = norms(&delta);
            for (mut di, &ni) in delta.axis_iter_mut(Axis(0)).zip(&dn) {
                if ni > eps {
                    let f = eps / ni;
                    di.mapv_inplace(|v| v * f);
                }
            }
            Zip::from(&mut adv).and(&x).and(&delta).for_each(|a, &x, &d| *a = (x + d).clamp(0.0, 1.0));
        }
        Ok(adv)
    }
}
