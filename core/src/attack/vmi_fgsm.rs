//! `vmi-fgsm` and `vni-fgsm` (variance tuning; torchattacks `VMIFGSM`/`VNIFGSM`, TransferAttack
//! `VMIFGSM`/`VNIFGSM`):
//! ghat = n(g_t + v_t); m <- mu m + ghat; v_{t+1} = mean_i grad L(c_t + r_i) - g_t, r_i ~
//! U[-beta eps, beta eps] per element (N neighbours, drawn neighbour by neighbour in (N, C, H, W)
//! order, not clipped); x <- Pi(x + alpha sign m); v_0 = 0.
//! VMI: g_t at x_t, c_t = x_t. VNI: g_t at the look-ahead x_t + alpha mu m_t; c_t = x_t
//! (torchattacks, `around=current`) or x_t + alpha mu m_{t+1} with the updated momentum
//! (TransferAttack, `around=look-ahead`).

use ndarray::{Array4, ArrayView4};
use rand_chacha::ChaCha20Rng;

use super::{Around, Attack, AttackConfig, AttackError, Goal, Preset, linf_step, look_ahead, normalise_l1};
use crate::classifier::Classifier;
use crate::transform::scale::neighbour_into;

/// The elements of an owned standard-layout array.
fn flat(a: &Array4<f32>) -> &[f32] {
    a.as_slice().expect("standard layout")
}

fn flat_mut(a: &mut Array4<f32>) -> &mut [f32] {
    a.as_slice_mut().expect("standard layout")
}

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
    Ok(variance_tuned_state(cfg, model, x, goal, rng, nesterov)?.0)
}

/// x_adv, the momentum m and the variance v after the last step.
type State = (Array4<f32>, Array4<f32>, Array4<f32>);

/// The loop; returns x_adv with the final momentum m and variance v (tests compare all three).
fn variance_tuned_state(
    cfg: &AttackConfig,
    model: &mut dyn Classifier,
    x: ArrayView4<'_, f32>,
    goal: &Goal<'_>,
    rng: &mut ChaCha20Rng,
    nesterov: bool,
) -> Result<State, AttackError> {
    let (eps, alpha, mu) = (cfg.eps as f32, cfg.alpha as f32, cfg.mu as f32);
    let radius = (cfg.beta * cfg.eps) as f32;
    let n = cfg.neighbours;
    let mut adv = x.as_standard_layout().into_owned();
    let mut m = Array4::<f32>::zeros(x.dim());
    let mut v = Array4::<f32>::zeros(x.dim());
    // Buffers reused across steps and neighbours (no allocation and page faulting of a batch-sized
    // array per model call): g + v, the neighbour, and the sum of the neighbours' gradients.
    let mut gv = Array4::<f32>::zeros(x.dim());
    let mut nb = Array4::<f32>::zeros(x.dim());
    let mut acc = Array4::<f32>::zeros(x.dim());
    for _ in 0..cfg.steps {
        let g = if nesterov {
            goal.grad(model, look_ahead(&adv, &m, alpha * mu).view())?
        } else {
            goal.grad(model, adv.view())?
        };
        let g = g.as_standard_layout();
        let gs = g.as_slice().expect("standard layout");
        // m <- mu m + n(g + v) (the arithmetic of `momentum_update`, on a reused buffer).
        for ((o, &a), &b) in flat_mut(&mut gv).iter_mut().zip(gs).zip(flat(&v)) {
            *o = a + b;
        }
        normalise_l1(&mut gv);
        for (m, &d) in flat_mut(&mut m).iter_mut().zip(flat(&gv)) {
            *m = d + *m * mu;
        }
        let ahead;
        let centre = if nesterov && cfg.around == Around::LookAhead {
            ahead = look_ahead(&adv, &m, alpha * mu);
            ahead.view()
        } else {
            adv.view()
        };
        let centre = centre.as_standard_layout();
        let centre = centre.as_slice().expect("standard layout");
        flat_mut(&mut acc).fill(0.0);
        for _ in 0..n {
            neighbour_into(centre, radius, rng, flat_mut(&mut nb));
            let gi = goal.grad(model, nb.view())?;
            let gi = gi.as_standard_layout();
            for (a, &b) in flat_mut(&mut acc).iter_mut().zip(gi.as_slice().expect("standard layout")) {
                *a += b;
            }
        }
        let inv = n as f32;
        for ((v, &a), &g) in flat_mut(&mut v).iter_mut().zip(flat(&acc)).zip(gs) {
            *v = a / inv - g;
        }
        linf_step(x, &mut adv, &m, alpha, eps);
    }
    Ok((adv, m, v))
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

#[cfg(test)]
mod tests {
    use ndarray::Zip;

    use super::super::reference::{LogReg, batch};
    use super::super::{Quantize, momentum_update};
    use super::*;
    use crate::rng::stream;
    use crate::transform::scale::neighbour;

    /// The loop as first written (fresh arrays per call, `momentum_update`, `neighbour`): the
    /// buffered loop must give the same bits.
    fn plain(
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
        nesterov: bool,
    ) -> State {
        let (eps, alpha, mu) = (cfg.eps as f32, cfg.alpha as f32, cfg.mu as f32);
        let radius = (cfg.beta * cfg.eps) as f32;
        let mut adv = x.as_standard_layout().into_owned();
        let mut m = Array4::<f32>::zeros(x.dim());
        let mut v = Array4::<f32>::zeros(x.dim());
        for _ in 0..cfg.steps {
            let g = if nesterov {
                goal.grad(model, look_ahead(&adv, &m, alpha * mu).view()).unwrap()
            } else {
                goal.grad(model, adv.view()).unwrap()
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
            for _ in 0..cfg.neighbours {
                let nb = neighbour(centre, radius, rng);
                acc += &goal.grad(model, nb.view()).unwrap();
            }
            let inv = cfg.neighbours as f32;
            Zip::from(&mut v).and(&acc).and(&g).for_each(|v, &a, &g| *v = a / inv - g);
            linf_step(x, &mut adv, &m, alpha, eps);
        }
        (adv, m, v)
    }

    #[test]
    fn buffered_loop_is_bitwise_the_plain_loop() {
        let shape = (3, 9, 11);
        let model = LogReg::new(5, shape, 4, 0.05);
        let (x, labels) = batch(6, 2, shape, 4);
        let target: alloc::vec::Vec<usize> = labels.iter().map(|y| (y + 1) % 4).collect();
        for preset in Preset::ALL {
            for (nesterov, name) in [(false, "vmi-fgsm"), (true, "vni-fgsm")] {
                for tgt in [None, Some(target.as_slice())] {
                    let mut cfg = AttackConfig::preset(name, preset).unwrap();
                    cfg.steps = 3;
                    cfg.quantize = Quantize::None;
                    let goal = Goal { labels: tgt.unwrap_or(&labels), targeted: tgt.is_some() };
                    let mut r1 = stream(9, &[b"vmi-bits"]);
                    let mut r2 = stream(9, &[b"vmi-bits"]);
                    let got =
                        variance_tuned_state(&cfg, &mut model.clone(), x.view(), &goal, &mut r1, nesterov).unwrap();
                    let want = plain(&cfg, &mut model.clone(), x.view(), &goal, &mut r2, nesterov);
                    // x_adv, and the momentum and variance whose low bits x_adv's signs would hide.
                    for (what, a, b) in [("x_adv", &got.0, &want.0), ("m", &got.1, &want.1), ("v", &got.2, &want.2)] {
                        assert!(
                            a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{what}: {name} {preset:?} targeted {}",
                            tgt.is_some()
                        );
                    }
                    let (p, q): (u64, u64) = (rand::RngExt::random(&mut r1), rand::RngExt::random(&mut r2));
                    assert_eq!(p, q, "same stream position");
                }
            }
        }
    }
}
