//! `vmi-fgsm` and `vni-fgsm` (variance tuning; torchattacks `VMIFGSM`/`VNIFGSM`, TransferAttack
//! `VMIFGSM`/`VNIFGSM`):
//! ghat = n(g_t + v_t); m <- mu m + ghat; v_{t+1} = mean_i grad L(c_t + r_i) - g_t, r_i ~
//! U[-beta eps, beta eps] per element (N neighbours, drawn neighbour by neighbour in (N, C, H, W)
//! order, not clipped); x <- Pi(x + alpha sign m); v_0 = 0.
//! VMI: g_t at x_t, c_t = x_t. VNI: g_t at the look-ahead x_t + alpha mu m_t; c_t = x_t
//! (torchattacks, `around=current`) or x_t + alpha mu m_{t+1} with the updated momentum
//! (TransferAttack, `around=look-ahead`).

use ndarray::{Array4, ArrayView4, Zip};
use rand_chacha::ChaCha20Rng;

use super::{Around, Attack, AttackConfig, AttackError, Goal, Preset, linf_step, look_ahead, momentum_update};
use crate::classifier::Classifier;
use crate::transform::scale::neighbour;

pub struct VmiFgsm;
pub struct VniFgsm;

fn configure(preset: Preset, cfg: &mut AttackConfig) {
    cfg.mu = 1.0;
    cfg.beta = 1.5;
    cfg.neighbours = match preset {
        Preset::TorchAttacks => 5,
        Preset::TransferAttack => 20,
    };
}

fn variance_tuned(
    cfg: &AttackConfig,
    model: &mut dyn Classifier,
    x: ArrayView4<'_, f32>,
    goal: &Goal<'_>,
    rng: &mut ChaCha20Rng,
    nesterov: bool,
) -> Result<Array4<f32>, AttackError> {
    let (eps, alpha, mu) = (cfg.eps as f32, cfg.alpha as f32, cfg.mu as f32);
    let radius = (cfg.beta * cfg.eps) as f32;
    let n = cfg.neighbours;
    let mut adv = x.as_standard_layout().into_owned();
    let mut m = Array4::<f32>::zeros(x.dim());
    let mut v = Array4::<f32>::zeros(x.dim());
    for _ in 0..cfg.steps {
        let g = if nesterov {
            goal.grad(model, look_ahead(&adv, &m, alpha * mu).view())?
        } else {
            goal.grad(model, adv.view())?
        };
        let mut gv = g.clone();
        Zip::from(&mut gv).and(&v).for_each(|a, &b| *a += b);
        momentum_update(&mut m, gv, mu);
        let ahead;
        let centre = if nesterov && cfg.around == Around::LookAhead {
            ahead = look_ahead(&adv, &m, alpha * mu);
            ahead.view()
        } else {
            adv.view()
        };
        let mut acc = Array4::<f32>::zeros(x.dim());
        for _ in 0..n {
            let nb = neighbour(centre, radius, rng);
            let gi = goal.grad(model, nb.view())?;
            acc += &gi;
        }
        let inv = n as f32;
        Zip::from(&mut v).and(&acc).and(&g).for_each(|v, &a, &g| *v = a / inv - g);
        linf_step(x, &mut adv, &m, alpha, eps);
    }
    Ok(adv)
}

impl Attack for VmiFgsm {
    fn name(&self) -> &'static str {
        "vmi-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["vmifgsm", "vmi"]
    }
    fn summary(&self) -> &'static str {
        "variance-tuned MI: n(g + v) into the momentum, v from N uniform neighbours of x_t"
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps", "alpha", "steps", "mu", "neighbours", "beta"]
    }
    fn configure(&self, preset: Preset, cfg: &mut AttackConfig) {
        configure(preset, cfg);
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        variance_tuned(cfg, model, x, goal, rng, false)
    }
}

impl Attack for VniFgsm {
    fn name(&self) -> &'static str {
        "vni-fgsm"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["vnifgsm", "vni"]
    }
    fn summary(&self) -> &'static str {
        "variance-tuned NI: VMI with the gradient at the Nesterov look-ahead"
    }
    fn params(&self) -> &'static [&'static str] {
        &["eps", "alpha", "steps", "mu", "neighbours", "beta", "around"]
    }
    fn configure(&self, preset: Preset, cfg: &mut AttackConfig) {
        configure(preset, cfg);
    }
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        variance_tuned(cfg, model, x, goal, rng, true)
    }
}
