//! Optimisers for training the mini zoo: Adam (with bias correction and optional decoupled weight
//! decay, as in AdamW) and a cosine learning-rate schedule with linear warm-up. Pure, no_std.

use alloc::vec;
use alloc::vec::Vec;

/// Adam hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (AdamW): `p -= lr * weight_decay * p` before the Adam step; 0 = off.
    pub weight_decay: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Adam state for a fixed list of parameter slots (one per tensor).
#[derive(Clone, Debug)]
pub struct Adam {
    cfg: AdamConfig,
    t: u32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Adam {
    /// State for slots of the given sizes.
    pub fn new(cfg: AdamConfig, sizes: &[usize]) -> Adam {
        Adam {
            cfg,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.t
    }

    /// Start a new step (advances the bias-correction counter); call once before the slots' updates.
    pub fn begin_step(&mut self) {
        self.t += 1;
    }

    /// Update slot `slot` in place with gradient `grad` at learning rate `lr`.
    ///
    /// Panics if the slot or lengths do not match the sizes given to [`Adam::new`] (a programming
    /// error, never user input) or if [`Adam::begin_step`] was not called.
    pub fn update(&mut self, slot: usize, param: &mut [f32], grad: &[f32], lr: f32) {
        assert!(self.t > 0, "Adam::begin_step must be called before update");
        let (m, v) = (&mut self.m[slot], &mut self.v[slot]);
        assert!(param.len() == m.len() && grad.len() == m.len(), "slot {slot} size mismatch");
        let c = self.cfg;
        let t = self.t as f32;
        let bc1 = 1.0 - libm::powf(c.beta1, t);
        let bc2 = 1.0 - libm::powf(c.beta2, t);
        let step = lr / bc1;
        for i in 0..param.len() {
            let g = grad[i];
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g * g;
            if c.weight_decay != 0.0 {
                param[i] -= lr * c.weight_decay * param[i];
            }
            param[i] -= step * m[i] / (libm::sqrtf(v[i] / bc2) + c.eps);
        }
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warm-up from `base/warmup` to `base` over
/// `warmup` steps, then cosine decay from `base` to `min_lr` at the last step.
pub fn cosine_lr(step: usize, total: usize, warmup: usize, base: f32, min_lr: f32) -> f32 {
    if step < warmup {
        return base * (step + 1) as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let p = ((step - warmup) as f32 / (span.saturating_sub(1).max(1)) as f32).min(1.0);
    min_lr + 0.5 * (base - min_lr) * (1.0 + libm::cosf(core::f32::consts::PI * p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_hand_computed_steps() {
        // One scalar, lr 0.1, defaults. Step 1, g = 0.5: m = 0.05, v = 0.00025,
        // mhat = 0.5, vhat = 0.25, p = 1 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.9 (to 1e-7).
        // Step 2, g = -1: m = 0.045 - 0.1 = -0.055, v = 0.00024975 + 0.001 = 0.00124975,
        // mhat = -0.055 / 0.19 = -0.289473684, vhat = 0.00124975 / 0.001999 = 0.625187594,
        // p = 0.9 + 0.1 * 0.289473684 / 0.790688 = 0.936610...
        let mut a = Adam::new(AdamConfig::default(), &[1]);
        let mut p = [1.0f32];
        a.begin_step();
        a.update(0, &mut p, &[0.5], 0.1);
        assert!((p[0] - 0.9).abs() < 1e-6, "{}", p[0]);
        a.begin_step();
        a.update(0, &mut p, &[-1.0], 0.1);
        let expect = 0.9 + 0.1 * 0.289_473_684_f64 / 0.625_187_594_f64.sqrt();
        assert!((f64::from(p[0]) - expect).abs() < 1e-6, "{} vs {expect}", p[0]);
        assert!((expect - 0.936_610).abs() < 1e-5);
    }

    #[test]
    fn adam_weight_decay_is_decoupled() {
        // Zero gradient: only the decay acts, p *= 1 - lr * wd.
        let cfg = AdamConfig { weight_decay: 0.1, ..AdamConfig::default() };
        let mut a = Adam::new(cfg, &[2]);
        let mut p = [2.0f32, -4.0];
        a.begin_step();
        a.update(0, &mut p, &[0.0, 0.0], 0.5);
        assert_eq!(p, [2.0 * 0.95, -4.0 * 0.95]);
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays() {
        assert!((cosine_lr(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-6);
        assert!((cosine_lr(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-6);
        assert!((cosine_lr(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-6);
        // Halfway through the decay (step 10 + 89/2): 0.5.
        let mid = cosine_lr(10, 100, 10, 1.0, 0.0) + cosine_lr(99, 100, 10, 1.0, 0.0);
        assert!((mid - 1.0).abs() < 1e-6);
        assert!(cosine_lr(99, 100, 10, 1.0, 0.1) - 0.1 < 1e-6);
        let a = cosine_lr(30, 100, 10, 1.0, 0.0);
        let b = cosine_lr(60, 100, 10, 1.0, 0.0);
        assert!(a > b && b > 0.0);
    }
}
