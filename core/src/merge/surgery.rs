//! `+surgery`: Representation Surgery (Yang et al., ICML 2024; METHODS.md), a suffix on any
//! merge method.
//!
//! Per task, with the merge frozen, a feature correction f' = f - W_up ReLU(W_down f) on the
//! merged model's projected image feature f (raw, unnormalised); rank 16; W_down `[r, d]`
//! Kaiming-uniform with a = sqrt 5 (torch's `nn.Linear` default: U(-1/sqrt d, 1/sqrt d)),
//! W_up `[d, r]` zeros, no bias. Loss: mean abs(f' - f_t) against the task's fine-tuned feature of
//! the same image. Adam lr 1e-3; 500 iterations, each with 2 batches of 16 per task and an Adam
//! step per batch. The engine computes the features once (the encoders are frozen); everything
//! here runs on feature matrices.
//!
//! FusionBench variant (`surgery_normalize=true`): FusionBench's `compute_features` L2-normalises
//! the projected feature of both the merged and the fine-tuned model, so the module is trained on
//! u = f/‖f‖ against f_t/‖f_t‖ and corrects u. The same module applied to the raw feature gives
//! f - W_up ReLU(W_down f) = ‖f‖ (u - W_up ReLU(W_down u)) (ReLU is positively homogeneous and
//! there is no bias), and the logits are cosines, so the vision graph's block on the raw feature
//! yields exactly FusionBench's logits: only the training inputs change ([`normalize_rows`]).

use alloc::vec::Vec;

use ndarray::{Array2, ArrayView2};
use rand::RngExt;

use super::{MergeError, ParamSpec, Params, check_range};
use crate::optim::{Adam, AdamConfig};

/// Tensor names of a task's module in a parameter set (the vision graph's optional block).
pub const DOWN: &str = "surgery.down";
pub const UP: &str = "surgery.up";

/// Parameters of the `+surgery` suffix (prefixed so that they do not collide with the base
/// method's) with their defaults.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "surgery_rank", default: "16", help: "rank of the feature correction" },
    ParamSpec { name: "surgery_steps", default: "500", help: "iterations (each: `surgery_batches` Adam steps)" },
    ParamSpec { name: "surgery_lr", default: "1e-3", help: "Adam learning rate" },
    ParamSpec { name: "surgery_batch", default: "16", help: "unlabelled test images per batch" },
    ParamSpec { name: "surgery_batches", default: "2", help: "batches (and Adam steps) per task per iteration" },
    ParamSpec {
        name: "surgery_normalize",
        default: "false",
        help: "FusionBench variant: train on L2-normalised features (with surgery_steps=1000 surgery_batches=1)",
    },
];

/// Parsed parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SurgeryConfig {
    pub rank: usize,
    pub steps: usize,
    pub lr: f32,
    pub batch: usize,
    pub batches: usize,
    /// Train on L2-normalised merged and fine-tuned features (FusionBench).
    pub normalize: bool,
}

impl SurgeryConfig {
    pub fn from_params(p: &Params) -> Result<SurgeryConfig, MergeError> {
        let rank = p.usize_or("surgery_rank", 16)?;
        check_range("surgery_rank", rank as f64, rank >= 1, ">= 1")?;
        let lr = p.f64_or("surgery_lr", 1e-3)?;
        check_range("surgery_lr", lr, lr > 0.0, "> 0")?;
        let batch = p.usize_or("surgery_batch", 16)?;
        check_range("surgery_batch", batch as f64, batch >= 1, ">= 1")?;
        let batches = p.usize_or("surgery_batches", 2)?;
        check_range("surgery_batches", batches as f64, batches >= 1, ">= 1")?;
        Ok(SurgeryConfig {
            rank,
            steps: p.usize_or("surgery_steps", 500)?,
            lr: lr as f32,
            batch,
            batches,
            normalize: p.bool_or("surgery_normalize", false)?,
        })
    }
}

/// Each row of `f` divided by its L2 norm (an f64 sum); a zero row stays zero (FusionBench would
/// divide by 0).
pub fn normalize_rows(f: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut out = f.to_owned();
    for mut row in out.outer_iter_mut() {
        let n = libm::sqrt(row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>());
        if n > 0.0 {
            row.mapv_inplace(|v| (f64::from(v) / n) as f32);
        }
    }
    out
}

/// One task's feature correction.
#[derive(Clone, Debug)]
pub struct Surgery {
    /// W_down `[rank, d]`.
    pub down: Array2<f32>,
    /// W_up `[d, rank]`.
    pub up: Array2<f32>,
    adam: Adam,
}

/// The loss of a batch and the gradients of both matrices.
pub struct LossGrad {
    pub loss: f64,
    pub down: Array2<f32>,
    pub up: Array2<f32>,
}

impl Surgery {
    /// A fresh module for features of width `d`: W_down ~ U(-1/sqrt d, 1/sqrt d) drawn row-major
    /// from `rng`, W_up = 0.
    pub fn new(d: usize, rank: usize, rng: &mut impl rand::Rng) -> Surgery {
        // Kaiming-uniform, a = sqrt 5: gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in).
        let bound = libm::sqrtf(2.0 / 6.0) * libm::sqrtf(3.0 / d as f32);
        let down = Array2::from_shape_simple_fn((rank, d), || rng.random_range(-bound..bound));
        Surgery { down, up: Array2::zeros((d, rank)), adam: Adam::new(AdamConfig::default(), &[rank * d, d * rank]) }
    }

    /// A module from stored matrices (e.g. read back from a file).
    pub fn from_parts(down: Array2<f32>, up: Array2<f32>) -> Result<Surgery, MergeError> {
        let (r, d) = down.dim();
        if up.dim() != (d, r) || r == 0 || d == 0 {
            return Err(MergeError::Numerical {
                method: "surgery",
                detail: alloc::format!(
                    "`{DOWN}` is {:?} and `{UP}` is {:?}: expected [r, d] and [d, r]",
                    down.shape(),
                    up.shape()
                ),
            });
        }
        Ok(Surgery { adam: Adam::new(AdamConfig::default(), &[r * d, d * r]), down, up })
    }

    pub fn rank(&self) -> usize {
        self.down.nrows()
    }

    pub fn width(&self) -> usize {
        self.down.ncols()
    }

    /// f' = f - ReLU(f W_down^T) W_up^T for the rows of `f` `[n, d]`.
    pub fn apply(&self, f: ArrayView2<'_, f32>) -> Array2<f32> {
        let a = f.dot(&self.down.t()).mapv(|v| v.max(0.0));
        &f - &a.dot(&self.up.t())
    }

    /// mean abs(f' - target) over all entries and its gradients (sign(0) = 0, as torch's).
    pub fn loss_grad(&self, f: ArrayView2<'_, f32>, target: ArrayView2<'_, f32>) -> Result<LossGrad, MergeError> {
        if f.dim() != target.dim() || f.ncols() != self.width() || f.nrows() == 0 {
            return Err(MergeError::Numerical {
                method: "surgery",
                detail: alloc::format!(
                    "features {:?} and fine-tuned features {:?} for a module of width {}",
                    f.shape(),
                    target.shape(),
                    self.width()
                ),
            });
        }
        let count = f.len() as f64;
        let h = f.dot(&self.down.t());
        let a = h.mapv(|v| v.max(0.0));
        let out = &f - &a.dot(&self.up.t());
        let loss = out.iter().zip(target.iter()).map(|(&o, &t)| f64::from((o - t).abs())).sum::<f64>() / count;
        // dL/df' = sign(f' - target) / count.
        let de = ndarray::Zip::from(&out).and(&target).map_collect(|&o, &t| {
            let e = o - t;
            (if e > 0.0 {
                1.0
            } else if e < 0.0 {
                -1.0
            } else {
                0.0
            }) / count as f32
        });
        // f' = f - a up^T: dup = -de^T a; da = -de up; dh = da * (h > 0); ddown = dh^T f.
        let dup = -de.t().dot(&a);
        let mut dh = -de.dot(&self.up);
        ndarray::Zip::from(&mut dh).and(&h).for_each(|g, &x| {
            if x <= 0.0 {
                *g = 0.0;
            }
        });
        let ddown = dh.t().dot(&f);
        Ok(LossGrad { loss, down: ddown, up: dup })
    }

    /// One Adam step on both matrices.
    pub fn step(&mut self, g: &LossGrad, lr: f32) {
        self.adam.begin_step();
        let (down, up) = (self.down.as_slice_mut().expect("standard"), self.up.as_slice_mut().expect("standard"));
        self.adam.update(0, down, g.down.as_standard_layout().as_slice().expect("standard"), lr);
        self.adam.update(1, up, g.up.as_standard_layout().as_slice().expect("standard"), lr);
    }
}

/// The cyclic order in which a task's images are visited: a fresh permutation of `0..n` from
/// `rng` for every pass over the data (like a shuffling data loader).
pub struct Sampler {
    n: usize,
    order: Vec<usize>,
    pos: usize,
}

impl Sampler {
    pub fn new(n: usize) -> Sampler {
        Sampler { n, order: Vec::new(), pos: 0 }
    }

    /// The next `batch` indices: consecutive entries of the current permutation; a new
    /// permutation starts when fewer than `batch` entries are left (a batch never spans two passes
    /// unless `batch` > n).
    pub fn next(&mut self, batch: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        if self.n == 0 {
            return out;
        }
        if batch <= self.n && self.pos + batch > self.order.len() {
            self.reshuffle(rng);
        }
        while out.len() < batch {
            if self.pos >= self.order.len() {
                self.reshuffle(rng);
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }

    fn reshuffle(&mut self, rng: &mut impl rand::Rng) {
        self.order = (0..self.n).collect();
        for i in (1..self.n).rev() {
            let j = rng.random_range(0..=i);
            self.order.swap(i, j);
        }
        self.pos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(seed: u64, n: usize, d: usize) -> Array2<f32> {
        let mut rng = crate::rng::stream(seed, &[b"surgery-test"]);
        Array2::from_shape_simple_fn((n, d), || rng.random_range(-1.0f32..1.0))
    }

    #[test]
    fn init_is_kaiming_uniform_and_deterministic() {
        let d = 64;
        let s = Surgery::new(d, 16, &mut crate::rng::stream(1, &[b"s"]));
        let t = Surgery::new(d, 16, &mut crate::rng::stream(1, &[b"s"]));
        assert_eq!(s.down, t.down);
        let bound = 1.0 / (d as f32).sqrt();
        assert!(s.down.iter().all(|v| v.abs() <= bound));
        assert!(s.down.iter().any(|v| v.abs() > 0.9 * bound));
        assert!(s.up.iter().all(|&v| v == 0.0));
        // With W_up = 0 the module is the identity.
        let f = feats(2, 3, d);
        assert_eq!(s.apply(f.view()), f);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (n, d, r) = (5, 6, 3);
        let mut s = Surgery::new(d, r, &mut crate::rng::stream(3, &[b"s"]));
        s.up = feats(4, d, r);
        let f = feats(5, n, d);
        let target = feats(6, n, d);
        let g = s.loss_grad(f.view(), target.view()).unwrap();
        let loss64 = |down: &Array2<f64>, up: &Array2<f64>| -> f64 {
            let f = f.mapv(f64::from);
            let a = f.dot(&down.t()).mapv(|v| v.max(0.0));
            let o = &f - &a.dot(&up.t());
            o.iter().zip(target.iter()).map(|(o, &t)| (o - f64::from(t)).abs()).sum::<f64>() / (n * d) as f64
        };
        let (d0, u0) = (s.down.mapv(f64::from), s.up.mapv(f64::from));
        assert!((loss64(&d0, &u0) - g.loss).abs() < 1e-6);
        let h = 1e-5;
        let mut active = 0;
        for idx in 0..r * d {
            let (i, j) = (idx / d, idx % d);
            let mut p = d0.clone();
            p[[i, j]] += h;
            let lp = loss64(&p, &u0);
            p[[i, j]] -= 2.0 * h;
            let fd = (lp - loss64(&p, &u0)) / (2.0 * h);
            active += usize::from(fd != 0.0);
            assert!((f64::from(g.down[[i, j]]) - fd).abs() < 1e-5, "down[{i},{j}] {} vs {fd}", g.down[[i, j]]);
        }
        assert!(active > 0);
        for idx in 0..d * r {
            let (i, j) = (idx / r, idx % r);
            let mut p = u0.clone();
            p[[i, j]] += h;
            let lp = loss64(&d0, &p);
            p[[i, j]] -= 2.0 * h;
            let fd = (lp - loss64(&d0, &p)) / (2.0 * h);
            assert!((f64::from(g.up[[i, j]]) - fd).abs() < 1e-5, "up[{i},{j}] {} vs {fd}", g.up[[i, j]]);
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn normalized_variant_gradient_matches_finite_differences_and_its_logits_need_no_new_block() {
        let (n, d, r) = (5, 6, 3);
        let mut s = Surgery::new(d, r, &mut crate::rng::stream(13, &[b"s"]));
        s.up = feats(14, d, r);
        let mut f = feats(15, n, d) * 3.0;
        f.row_mut(4).fill(0.0);
        let target = feats(16, n, d) * 0.2;
        let cfg = |v: &str| {
            let mut p = Params::new();
            p.set("surgery_normalize", v);
            SurgeryConfig::from_params(&p)
        };
        assert!(cfg("true").unwrap().normalize && !cfg("false").unwrap().normalize);
        assert!(!SurgeryConfig::from_params(&Params::new()).unwrap().normalize, "off by default");
        assert!(cfg("maybe").is_err());
        let (u, ut) = (normalize_rows(f.view()), normalize_rows(target.view()));
        assert_eq!(u.row(4).iter().filter(|v| **v != 0.0).count(), 0, "a zero row stays zero");
        // The FusionBench loss in f64, normalisation included: mean abs(u - up relu(down u) - t/|t|).
        let loss64 = |down: &Array2<f64>, up: &Array2<f64>| -> f64 {
            let mut total = 0.0;
            for i in 0..n {
                let fi: Vec<f64> = f.row(i).iter().map(|&v| f64::from(v)).collect();
                let ti: Vec<f64> = target.row(i).iter().map(|&v| f64::from(v)).collect();
                let (nf, nt) =
                    (fi.iter().map(|v| v * v).sum::<f64>().sqrt(), ti.iter().map(|v| v * v).sum::<f64>().sqrt());
                let ui: Vec<f64> = fi.iter().map(|v| if nf > 0.0 { v / nf } else { 0.0 }).collect();
                let a: Vec<f64> = (0..r).map(|k| (0..d).map(|j| down[[k, j]] * ui[j]).sum::<f64>().max(0.0)).collect();
                for j in 0..d {
                    let o = ui[j] - (0..r).map(|k| up[[j, k]] * a[k]).sum::<f64>();
                    total += (o - ti[j] / nt).abs();
                }
            }
            total / (n * d) as f64
        };
        let g = s.loss_grad(u.view(), ut.view()).unwrap();
        let (d0, u0) = (s.down.mapv(f64::from), s.up.mapv(f64::from));
        assert!((loss64(&d0, &u0) - g.loss).abs() < 1e-6);
        let h = 1e-5;
        let mut active = 0;
        for (which, shape) in [(0, (r, d)), (1, (d, r))] {
            for i in 0..shape.0 {
                for j in 0..shape.1 {
                    let (mut dp, mut up) = (d0.clone(), u0.clone());
                    let p = if which == 0 { &mut dp } else { &mut up };
                    p[[i, j]] += h;
                    let lp = loss64(&dp, &up);
                    let p = if which == 0 { &mut dp } else { &mut up };
                    p[[i, j]] -= 2.0 * h;
                    let fd = (lp - loss64(&dp, &up)) / (2.0 * h);
                    let an = f64::from(if which == 0 { g.down[[i, j]] } else { g.up[[i, j]] });
                    active += usize::from(fd != 0.0);
                    assert!((an - fd).abs() < 1e-5, "{which} [{i},{j}]: {an} vs {fd}");
                }
            }
        }
        assert!(active > r * d, "most entries should see a gradient ({active})");
        // The module on the raw feature is ‖f‖ times the module on the normalised one.
        let raw = s.apply(f.view());
        let on_unit = s.apply(u.view());
        for i in 0..n {
            let nf = libm::sqrt(f.row(i).iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()) as f32;
            for j in 0..d {
                assert!((raw[[i, j]] - nf * on_unit[[i, j]]).abs() < 1e-5, "[{i},{j}]");
            }
        }
    }

    #[test]
    fn training_reduces_the_distance_to_the_fine_tuned_features() {
        // The fine-tuned feature is a low-rank correction of the merged one: f_t = f - relu(f A^T) B^T.
        let (n, d, r) = (64, 8, 4);
        let f = feats(7, n, d);
        let a = feats(8, r, d);
        let b = feats(9, d, r) * 0.5;
        let target = &f - &f.dot(&a.t()).mapv(|v| v.max(0.0)).dot(&b.t());
        let mut s = Surgery::new(d, r, &mut crate::rng::stream(10, &[b"s"]));
        let before = s.loss_grad(f.view(), target.view()).unwrap().loss;
        for _ in 0..400 {
            let g = s.loss_grad(f.view(), target.view()).unwrap();
            s.step(&g, 1e-2);
        }
        let after = s.loss_grad(f.view(), target.view()).unwrap().loss;
        assert!(after < 0.5 * before, "{before} -> {after}");
        assert!(s.loss_grad(f.view(), feats(12, 3, d).view()).is_err());
    }

    #[test]
    fn sampler_visits_distinct_images_within_a_pass() {
        let mut rng = crate::rng::stream(11, &[b"sampler"]);
        let mut s = Sampler::new(10);
        // Passes of 8 draws (two batches of 4; the 2 left over start a new permutation).
        for _ in 0..3 {
            let mut pass = s.next(4, &mut rng);
            pass.extend(s.next(4, &mut rng));
            let mut sorted = pass.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 8, "{pass:?}");
        }
        let mut s = Sampler::new(3);
        let b = s.next(5, &mut rng);
        assert_eq!(b.len(), 5);
        assert!(b.iter().all(|&i| i < 3));
        assert!(Sampler::new(0).next(2, &mut rng).is_empty());
    }
}
