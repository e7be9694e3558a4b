//! `cw-l2` (Carlini-Wagner L2, torchattacks `CW`): w_0 = atanh(clamp(2x - 1, -1+1e-6, 1-1e-6)),
//! x' = (tanh w + 1)/2; minimise sum over the batch of ‖x' - x‖2^2 + c max(Z_y - max_{j != y} Z_j,
//! -kappa) (targeted: max(max_{j != t} Z_j - Z_t, -kappa)) with Adam (torch defaults: betas 0.9,
//! 0.999, eps 1e-8). Success is judged on the logits before each optimiser step; per image the
//! successful x' of smallest L2 is kept (strictly smaller replaces); an image never fooled is
//! returned clean; every max(steps/10, 1) steps the loop stops if the batch cost rose since the
//! last check.
//!
//! Labelled deviations from torchattacks: the clamp in w_0 (the reference leaves pixels at 0 or 1
//! at +-inf), and the margin uses the true max over j != y (the reference masks with a multiply,
//! so a negative logit can lose to the masked zeros).

use alloc::vec;
use ndarray::{Array2, Array4, ArrayView4, Axis, Zip};
use rand_chacha::ChaCha20Rng;

use super::{Attack, AttackConfig, AttackError, Goal, Norm, Preset};
use crate::classifier::Classifier;

pub struct CwL2;

/// Index of the largest entry of `z` other than `skip` (first on ties).
fn max_other(z: &[f32], skip: usize) -> usize {
    let mut best = usize::MAX;
    for (j, &v) in z.iter().enumerate() {
        if j != skip && (best == usize::MAX || v > z[best]) {
            best = j;
        }
    }
    best
}

/// Index of the largest entry (first on ties).
fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = j;
        }
    }
    best
}

impl Attack for CwL2 {
    fn name(&self) -> &'static str {
        "cw-l2"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["cw", "cwl2"]
    }
    fn summary(&self) -> &'static str {
        "Carlini-Wagner L2: Adam on tanh-space w, L2^2 + c * margin loss, smallest successful L2 kept"
    }
    fn norm(&self) -> Norm {
        Norm::Unbounded
    }
    fn params(&self) -> &'static [&'static str] {
        &["steps", "c", "kappa", "lr"]
    }
    fn configure(&self, _preset: Preset, cfg: &mut AttackConfig) {
        // No TransferAttack counterpart: both presets keep torchattacks' defaults.
        cfg.steps = 50;
        cfg.c = 1.0;
        cfg.kappa = 0.0;
        cfg.lr = 0.01;
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
        let (c, kappa, lr) = (cfg.c as f32, cfg.kappa as f32, cfg.lr as f32);
        let (b1, b2, adam_eps) = (0.9f32, 0.999f32, 1e-8f32);
        let x = x.as_standard_layout().into_owned();
        let n = x.dim().0;
        let lim = 1.0 - 1e-6f32;
        let mut w = x.mapv(|v| libm::atanhf((2.0 * v - 1.0).clamp(-lim, lim)));
        let mut best = x.clone();
        let mut best_l2 = vec![1e10f32; n];
        let mut prev_cost = 1e10f64;
        let mut m1 = Array4::<f32>::zeros(x.dim());
        let mut m2 = Array4::<f32>::zeros(x.dim());
        let check_every = (cfg.steps / 10).max(1);
        for step in 0..cfg.steps {
            let th = w.mapv(libm::tanhf);
            let xp = th.mapv(|t| 0.5 * (t + 1.0));
            let l2: ndarray::Array1<f32> =
                Zip::from(xp.axis_iter(Axis(0))).and(x.axis_iter(Axis(0))).map_collect(|a, b| {
                    a.iter().zip(b).map(|(p, q)| f64::from(p - q) * f64::from(p - q)).sum::<f64>() as f32
                });
            let z = model.logits(xp.view())?;
            if z.dim() != (n, model.num_classes()) {
                return Err(AttackError::ModelOutput(alloc::format!(
                    "the model returned logits of shape {:?} for a batch of {n}",
                    z.dim()
                )));
            }
            let mut dl = Array2::<f32>::zeros(z.dim());
            let mut f_sum = 0.0f64;
            let mut success = vec![false; n];
            for (i, zi) in z.axis_iter(Axis(0)).enumerate() {
                let zi = zi.to_vec();
                let y = goal.labels[i];
                let o = max_other(&zi, y);
                let (up, down) = if goal.targeted { (o, y) } else { (y, o) };
                let d = zi[up] - zi[down];
                f_sum += f64::from(d.max(-kappa));
                if d >= -kappa {
                    dl[[i, up]] = c;
                    dl[[i, down]] = -c;
                }
                let pred = argmax(&zi);
                success[i] = if goal.targeted { pred == y } else { pred != y };
            }
            let cost = l2.iter().map(|v| f64::from(*v)).sum::<f64>() + f64::from(c) * f_sum;
            // d cost / d x' = 2 (x' - x) + vjp of the margin; d x' / d w = (1 - tanh^2 w) / 2.
            let mut gx = Array4::<f32>::zeros(x.dim());
            Zip::from(&mut gx).and(&xp).and(&x).for_each(|g, &p, &q| *g = 2.0 * (p - q));
            if dl.iter().any(|v| *v != 0.0) {
                let (_, gm) = model.logits_vjp(xp.view(), dl.view())?;
                if gm.dim() != x.dim() {
                    return Err(AttackError::ModelOutput(alloc::format!(
                        "the model returned an input gradient of shape {:?} for images of shape {:?}",
                        gm.dim(),
                        x.dim()
                    )));
                }
                gx += &gm;
            }
            let t = (step + 1) as i32;
            let bc1 = 1.0 - libm::powf(b1, t as f32);
            let bc2 = 1.0 - libm::powf(b2, t as f32);
            let step_size = lr / bc1;
            let bc2_sqrt = libm::sqrtf(bc2);
            Zip::from(&mut w).and(&mut m1).and(&mut m2).and(&gx).and(&th).for_each(|w, m1, m2, &g, &t| {
                let g = g * ((1.0 - t * t) * 0.5);
                *m1 += (g - *m1) * (1.0 - b1);
                *m2 = *m2 * b2 + (1.0 - b2) * g * g;
                let denom = libm::sqrtf(*m2) / bc2_sqrt + adam_eps;
                *w -= step_size * (*m1 / denom);
            });
            for i in 0..n {
                if success[i] && best_l2[i] > l2[i] {
                    best_l2[i] = l2[i];
                    best.index_axis_mut(Axis(0), i).assign(&xp.index_axis(Axis(0), i));
                }
            }
            if step % check_every == 0 {
                if cost > prev_cost {
                    return Ok(best);
                }
                prev_cost = cost;
            }
        }
        Ok(best)
    }
}
