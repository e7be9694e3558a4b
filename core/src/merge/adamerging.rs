//! `adamerging`: merging coefficients learnt by minimising the prediction entropy on unlabelled
//! test images (Yang et al., ICLR 2024; METHODS.md).
//!
//! Layer-wise (default): one raw coefficient per task per merged tensor, initialised to 0.3;
//! lambda = clamp(raw, 0, 1) in the forward pass (the raw value's gradient is 0 outside [0, 1], as
//! torch's clamp gives it; never projected); theta = theta0 + sum_t lambda_{t,i} tau_{t,i}.
//! Task-wise: one coefficient per task for every tensor. The loss of a batch is the mean over its
//! images of the entropy of softmax(logits) (log_softmax, no eps); an iteration sums the per-batch
//! means of 2 batches of 16 per task and takes one Adam step (lr 1e-3, betas 0.9/0.999, no weight
//! decay); 500 iterations.
//!
//! The engine computes the loss and dL/dW for the merged tensors in one pass (the entropy inside
//! the graph); [`entropy_dlogits`] is the same objective on the host (its reference in tests, and
//! a logits cotangent for a logits VJP). The chain rule to the coefficients is here:
//! dL/draw_{t,i} = <dL/dW_i, tau_{t,i}> inside the clamp.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Zip};

use super::{MergeError, MergeInput, ParamSpec, Params, check_range, require_models};
use crate::optim::{Adam, AdamConfig};
use crate::tensor::ParamSet;

/// The method's parameters with their defaults.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "granularity", default: "layer", help: "layer (one coefficient per task per tensor) or task" },
    ParamSpec { name: "init", default: "0.3", help: "initial coefficient" },
    ParamSpec { name: "clamp", default: "true", help: "clamp the coefficients to [0, 1] in the forward pass" },
    ParamSpec { name: "steps", default: "500", help: "Adam iterations" },
    ParamSpec { name: "lr", default: "1e-3", help: "Adam learning rate" },
    ParamSpec { name: "batch", default: "16", help: "unlabelled test images per batch" },
    ParamSpec { name: "batches", default: "2", help: "batches per task per iteration" },
];

/// Layer-wise or task-wise coefficients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Layer,
    Task,
}

/// Parsed parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaMergingConfig {
    pub granularity: Granularity,
    pub init: f32,
    pub clamp: bool,
    pub steps: usize,
    pub lr: f32,
    pub batch: usize,
    pub batches: usize,
}

impl AdaMergingConfig {
    pub fn from_params(p: &Params) -> Result<AdaMergingConfig, MergeError> {
        let granularity = match p.choice_or("granularity", &["layer", "task"], "layer")? {
            "task" => Granularity::Task,
            _ => Granularity::Layer,
        };
        let init = p.f64_or("init", 0.3)?;
        let lr = p.f64_or("lr", 1e-3)?;
        check_range("lr", lr, lr > 0.0, "> 0")?;
        let steps = p.usize_or("steps", 500)?;
        let batch = p.usize_or("batch", 16)?;
        check_range("batch", batch as f64, batch >= 1, ">= 1")?;
        let batches = p.usize_or("batches", 2)?;
        check_range("batches", batches as f64, batches >= 1, ">= 1")?;
        Ok(AdaMergingConfig {
            granularity,
            init: init as f32,
            clamp: p.bool_or("clamp", true)?,
            steps,
            lr: lr as f32,
            batch,
            batches,
        })
    }
}

/// The mean entropy of softmax over the rows of `logits` and its cotangent: dH_i/dz_j =
/// -p_j (log p_j + H_i), divided by the number of rows (the loss is the batch mean).
pub fn entropy_dlogits(logits: ArrayView2<'_, f32>) -> (f64, Array2<f32>) {
    let n = logits.nrows();
    let mut d = Array2::zeros(logits.raw_dim());
    let mut total = 0.0f64;
    for (z, mut drow) in logits.outer_iter().zip(d.outer_iter_mut()) {
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + libm::log(z.iter().map(|&v| libm::exp(v as f64 - m)).sum::<f64>());
        let lp: Vec<f64> = z.iter().map(|&v| v as f64 - lse).collect();
        let h: f64 = -lp.iter().map(|&l| libm::exp(l) * l).sum::<f64>();
        total += h;
        for (dj, &l) in drow.iter_mut().zip(&lp) {
            *dj = (-libm::exp(l) * (l + h) / n as f64) as f32;
        }
    }
    (total / n.max(1) as f64, d)
}

/// The learnt coefficients and their optimiser.
#[derive(Clone, Debug)]
pub struct Coefficients {
    pub granularity: Granularity,
    pub clamp: bool,
    /// Merged tensor names (the input's), in order.
    pub names: Vec<String>,
    pub tasks: usize,
    /// Raw values, `[tasks, groups]` row-major (groups: one per tensor, or one).
    pub raw: Vec<f32>,
    adam: Adam,
}

impl Coefficients {
    /// Initial coefficients for `input`.
    pub fn new(input: &MergeInput<'_, '_>, cfg: &AdaMergingConfig) -> Result<Coefficients, MergeError> {
        require_models("adamerging", input, 1, "at least 1 fine-tuned model")?;
        check_range("init", f64::from(cfg.init), cfg.init.is_finite(), "finite")?;
        let groups = match cfg.granularity {
            Granularity::Layer => input.names.len(),
            Granularity::Task => 1,
        };
        let n = input.tasks() * groups;
        Ok(Coefficients {
            granularity: cfg.granularity,
            clamp: cfg.clamp,
            names: input.names.to_vec(),
            tasks: input.tasks(),
            raw: vec![cfg.init; n],
            adam: Adam::new(AdamConfig::default(), &[n]),
        })
    }

    fn groups(&self) -> usize {
        self.raw.len() / self.tasks
    }

    fn group_of(&self, tensor: usize) -> usize {
        match self.granularity {
            Granularity::Layer => tensor,
            Granularity::Task => 0,
        }
    }

    /// The effective coefficient lambda_{t, tensor} (clamped when configured).
    pub fn lambda(&self, t: usize, tensor: usize) -> f32 {
        let r = self.raw[t * self.groups() + self.group_of(tensor)];
        if self.clamp { r.clamp(0.0, 1.0) } else { r }
    }

    /// theta0 + sum_t lambda_{t,i} tau_{t,i} for every merged tensor.
    pub fn merged(&self, input: &MergeInput<'_, '_>) -> ParamSet<'static> {
        let mut out = ParamSet::new();
        for (i, name) in input.names.iter().enumerate() {
            let b = input.base(name);
            let mut acc: ArrayD<f32> = b.to_owned();
            for t in 0..self.tasks {
                let l = self.lambda(t, i);
                Zip::from(&mut acc).and(input.model(t, name)).and(b).for_each(|a, &x, &x0| *a += l * (x - x0));
            }
            out.insert_owned(name.clone(), acc);
        }
        out
    }

    /// dL/draw for the weight gradient `grad` (dL/dW of each merged tensor, by name): per task and
    /// tensor <dL/dW_i, tau_{t,i}> (f64 sums), summed over the tensors of a group, and zero where
    /// the clamp is inactive (raw outside [0, 1]).
    pub fn gradient<'g>(
        &self,
        input: &MergeInput<'_, '_>,
        grad: impl Fn(&str) -> Option<ArrayViewD<'g, f32>>,
    ) -> Result<Vec<f32>, MergeError> {
        let groups = self.groups();
        let mut g = vec![0.0f64; self.raw.len()];
        for (i, name) in input.names.iter().enumerate() {
            let dw = grad(name).ok_or_else(|| MergeError::Numerical {
                method: "adamerging",
                detail: format!("the engine returned no gradient for tensor `{name}`"),
            })?;
            let b = input.base(name);
            if dw.shape() != b.shape() {
                return Err(MergeError::Numerical {
                    method: "adamerging",
                    detail: format!("the gradient of `{name}` has shape {:?}, expected {:?}", dw.shape(), b.shape()),
                });
            }
            for t in 0..self.tasks {
                let mut dot = 0.0f64;
                Zip::from(&dw).and(input.model(t, name)).and(b).for_each(|&d, &x, &x0| {
                    dot += f64::from(d) * f64::from(x - x0);
                });
                g[t * groups + self.group_of(i)] += dot;
            }
        }
        let out: Vec<f32> = g
            .iter()
            .zip(&self.raw)
            .map(|(&v, &r)| if self.clamp && !(0.0..=1.0).contains(&r) { 0.0 } else { v as f32 })
            .collect();
        if out.iter().any(|v| !v.is_finite()) {
            return Err(MergeError::Numerical {
                method: "adamerging",
                detail: "the coefficient gradient is not finite".to_string(),
            });
        }
        Ok(out)
    }

    /// One Adam step with gradient `grad` (from [`Coefficients::gradient`]).
    pub fn step(&mut self, grad: &[f32], lr: f32) {
        self.adam.begin_step();
        self.adam.update(0, &mut self.raw, grad, lr);
    }

    /// The effective coefficients `[tasks, groups]` (for logs and reports).
    pub fn lambdas(&self) -> Array2<f32> {
        let groups = self.groups();
        Array2::from_shape_fn((self.tasks, groups), |(t, k)| {
            let r = self.raw[t * groups + k];
            if self.clamp { r.clamp(0.0, 1.0) } else { r }
        })
    }

    /// A one-line summary: mean, min and max effective coefficient per task.
    pub fn describe(&self) -> String {
        let l = self.lambdas();
        let mut s = String::new();
        for (t, row) in l.outer_iter().enumerate() {
            let mean = row.iter().sum::<f32>() / row.len() as f32;
            let min = row.iter().copied().fold(f32::INFINITY, f32::min);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if t > 0 {
                s.push_str("; ");
            }
            s.push_str(&format!("task {t}: mean {mean:.3} [{min:.3}, {max:.3}]"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn input_fixture() -> (ParamSet<'static>, [ParamSet<'static>; 2], Vec<String>) {
        let base = set(&[("a", &[2], &[0.5, -0.5]), ("b", &[3], &[0.0, 1.0, 2.0])]);
        let m = [
            set(&[("a", &[2], &[1.5, 0.5]), ("b", &[3], &[1.0, 1.0, 0.0])]),
            set(&[("a", &[2], &[0.5, 0.5]), ("b", &[3], &[-1.0, 3.0, 2.0])]),
        ];
        let n = names(&base);
        (base, m, n)
    }

    #[test]
    fn entropy_and_its_cotangent_match_finite_differences() {
        let z = ndarray::array![[0.3f32, -1.2, 2.0, 0.0], [5.0, 5.0, -3.0, 1.0]];
        let (h, d) = entropy_dlogits(z.view());
        let ent = |zz: &Array2<f64>| -> f64 {
            let mut s = 0.0;
            for r in zz.outer_iter() {
                let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                s -= r.iter().map(|v| (v - lse).exp() * (v - lse)).sum::<f64>();
            }
            s / zz.nrows() as f64
        };
        let z64 = z.mapv(f64::from);
        assert!((h - ent(&z64)).abs() < 1e-12);
        for i in 0..2 {
            for j in 0..4 {
                let mut a = z64.clone();
                a[[i, j]] += 1e-6;
                let fp = ent(&a);
                a[[i, j]] -= 2e-6;
                let fm = ent(&a);
                let fd = (fp - fm) / 2e-6;
                assert!((f64::from(d[[i, j]]) - fd).abs() < 1e-7, "[{i},{j}] {} vs {fd}", d[[i, j]]);
            }
        }
    }

    /// A closed-form loss of the merged weights, L(W) = sum_i <c_i, W_i> + 0.5 ‖W‖^2: the
    /// coefficient gradient from dL/dW must equal finite differences of L(theta(raw)).
    #[test]
    #[allow(clippy::needless_range_loop)]
    fn coefficient_gradient_matches_finite_differences() {
        let (base, m, names) = input_fixture();
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let c = set(&[("a", &[2], &[0.7, -0.2]), ("b", &[3], &[0.1, 0.4, -0.9])]);
        let loss = |p: &ParamSet<'_>| -> f64 {
            names
                .iter()
                .map(|n| {
                    p.get(n)
                        .unwrap()
                        .iter()
                        .zip(c.get(n).unwrap().iter())
                        .map(|(&w, &ci)| f64::from(ci) * f64::from(w) + 0.5 * f64::from(w) * f64::from(w))
                        .sum::<f64>()
                })
                .sum()
        };
        for gran in [Granularity::Layer, Granularity::Task] {
            let cfg = AdaMergingConfig { granularity: gran, ..AdaMergingConfig::from_params(&Params::new()).unwrap() };
            let mut co = Coefficients::new(&input, &cfg).unwrap();
            // Some coefficients inside [0, 1], one outside (its gradient must be 0).
            let k = co.raw.len();
            for (i, r) in co.raw.iter_mut().enumerate() {
                *r = 0.15 + 0.2 * i as f32;
            }
            co.raw[k - 1] = if gran == Granularity::Layer { 1.3 } else { co.raw[k - 1] };
            let merged = co.merged(&input);
            let dw: ParamSet<'static> = names
                .iter()
                .map(|n| {
                    let g = Zip::from(merged.get(n).unwrap()).and(c.get(n).unwrap()).map_collect(|&w, &ci| w + ci);
                    (n.clone(), ndarray::CowArray::from(g))
                })
                .collect();
            let g = co.gradient(&input, |n| dw.get(n).map(|t| t.view())).unwrap();
            for j in 0..k {
                let h = 1e-3f32;
                let mut cp = co.clone();
                cp.raw[j] += h;
                let lp = loss(&cp.merged(&input));
                cp.raw[j] -= 2.0 * h;
                let lm = loss(&cp.merged(&input));
                let fd = (lp - lm) / (2.0 * f64::from(h));
                assert!((f64::from(g[j]) - fd).abs() < 2e-3, "{gran:?} coefficient {j}: {} vs {fd}", g[j]);
            }
            if gran == Granularity::Layer {
                assert_eq!(g[k - 1], 0.0, "outside the clamp");
            }
        }
    }

    #[test]
    fn merged_weights_follow_the_coefficients() {
        let (base, m, names) = input_fixture();
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("granularity", "task");
        let cfg = AdaMergingConfig::from_params(&p).unwrap();
        let co = Coefficients::new(&input, &cfg).unwrap();
        // Task-wise at init: task arithmetic with lambda 0.3.
        let out = co.merged(&input);
        assert_close(&values(&out, "a"), &[0.5 + 0.3 * 1.0 + 0.3 * 0.0, -0.5 + 0.3 * 1.0 + 0.3 * 1.0], 1e-6);
        assert!(co.describe().contains("task 1: mean 0.300"));
        let mut co2 = co.clone();
        co2.raw = vec![-0.5, 2.0];
        let out = co2.merged(&input);
        assert_close(&values(&out, "b"), &[0.0 - 1.0, 1.0 + 2.0, 2.0], 1e-6);
        co2.clamp = false;
        assert_eq!(co2.lambda(0, 0), -0.5);
    }

    #[test]
    fn adam_moves_the_coefficients_against_the_gradient() {
        let (base, m, names) = input_fixture();
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let cfg = AdaMergingConfig::from_params(&Params::new()).unwrap();
        let mut co = Coefficients::new(&input, &cfg).unwrap();
        co.step(&[1.0, -1.0, 0.0, 2.0], 1e-3);
        assert_close(&co.raw, &[0.3 - 1e-3, 0.3 + 1e-3, 0.3, 0.3 - 1e-3], 1e-6);
        let mut p = Params::new();
        p.set("granularity", "neuron");
        assert!(AdaMergingConfig::from_params(&p).unwrap_err().to_string().contains("granularity"));
    }
}
