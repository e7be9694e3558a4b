//! `fisher`: Fisher-weighted averaging (Matena & Raffel; FusionBench's defaults, METHODS.md).
//!
//! Per task t: over the first `examples` (256) train images in order, in batches of `batch` (32),
//! one backward pass per batch of the batch sum of sum_c sqrt(p_c) log p_c with sqrt(p) detached
//! (p = softmax of the task's logits); the batch gradient is squared entry-wise and
//! F_t = sum over batches / examples. Then c_t = 1 / (‖F_t‖2 + 1e-6) (one L2 norm over all merged
//! tensors), normalised to sum 1, and per entry
//! theta = sum_t c_t (F_t + 1e-6) theta_t / sum_t c_t (F_t + 1e-6).
//!
//! The model-dependent part (the batch gradients) is the engine's: this module gives the logits'
//! cotangent of the objective ([`dlogits`]), the accumulation ([`FisherAccumulator`]) and the merge
//! ([`merge`]).

use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Zip};

use super::{MergeError, MergeInput, ParamSpec, Params, check_range, require_models};
use crate::tensor::ParamSet;

/// Added to every Fisher entry and to each Fisher norm (FusionBench's `minimal_fisher_weight`).
pub const MIN_FISHER: f64 = 1e-6;

/// The method's parameters with their defaults.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "examples", default: "256", help: "train images per task (the first ones, in order)" },
    ParamSpec { name: "batch", default: "32", help: "images per backward pass (each batch gradient is squared)" },
];

/// Parsed parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FisherConfig {
    pub examples: usize,
    pub batch: usize,
}

impl FisherConfig {
    pub fn from_params(p: &Params) -> Result<FisherConfig, MergeError> {
        let examples = p.usize_or("examples", 256)?;
        let batch = p.usize_or("batch", 32)?;
        check_range("examples", examples as f64, examples >= 1, ">= 1")?;
        check_range("batch", batch as f64, batch >= 1, ">= 1")?;
        Ok(FisherConfig { examples, batch })
    }
}

/// d/dz of sum over the rows of sum_c sqrt(p_c) log p_c with p = softmax(z) and sqrt(p) held
/// constant: with w = sqrt(p), dz_j = w_j - p_j sum_c w_c.
pub fn dlogits(logits: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut out = Array2::zeros(logits.raw_dim());
    for (z, mut d) in logits.outer_iter().zip(out.outer_iter_mut()) {
        let p = softmax(z.iter().copied());
        let sw: f64 = p.iter().map(|&q| libm::sqrt(q)).sum();
        for (dj, &pj) in d.iter_mut().zip(&p) {
            *dj = (libm::sqrt(pj) - pj * sw) as f32;
        }
    }
    out
}

/// Softmax of one row in f64 (max-shifted).
pub(crate) fn softmax(z: impl Iterator<Item = f32> + Clone) -> Vec<f64> {
    let m = z.clone().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = z.map(|v| libm::exp(v as f64 - m)).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Sums squared batch gradients of one task into its Fisher (f64 accumulators).
pub struct FisherAccumulator {
    names: Vec<alloc::string::String>,
    sums: Vec<ArrayD<f64>>,
    examples: usize,
}

impl FisherAccumulator {
    /// An empty accumulator for the merged tensors `names` with the base's shapes.
    pub fn new(input: &MergeInput<'_, '_>) -> FisherAccumulator {
        FisherAccumulator {
            names: input.names.to_vec(),
            sums: input.names.iter().map(|n| ArrayD::zeros(input.base(n).raw_dim())).collect(),
            examples: 0,
        }
    }

    /// Add one batch's gradient (of the objective summed over the batch's `images`): each tensor
    /// of `grad` named like a merged tensor is squared entry-wise and added. Every merged tensor
    /// must be present with its shape.
    pub fn add_batch<'g>(
        &mut self,
        images: usize,
        grad: impl Fn(&str) -> Option<ArrayViewD<'g, f32>>,
    ) -> Result<(), MergeError> {
        for (name, acc) in self.names.iter().zip(&mut self.sums) {
            let g = grad(name).ok_or_else(|| MergeError::Numerical {
                method: "fisher",
                detail: format!("the engine returned no gradient for tensor `{name}`"),
            })?;
            if g.shape() != acc.shape() {
                return Err(MergeError::Numerical {
                    method: "fisher",
                    detail: format!("the gradient of `{name}` has shape {:?}, expected {:?}", g.shape(), acc.shape()),
                });
            }
            Zip::from(&mut *acc).and(&g).for_each(|a, &x| *a += f64::from(x) * f64::from(x));
        }
        self.examples += images;
        Ok(())
    }

    /// The Fisher: the sums divided by the number of images added.
    pub fn finish(self) -> Result<Fisher, MergeError> {
        if self.examples == 0 {
            return Err(MergeError::Numerical { method: "fisher", detail: "no images were used".to_string() });
        }
        let n = self.examples as f64;
        Ok(Fisher { names: self.names, values: self.sums.into_iter().map(|s| s.mapv(|v| v / n)).collect() })
    }
}

/// One task's diagonal Fisher over the merged tensors.
#[derive(Clone, Debug)]
pub struct Fisher {
    pub names: Vec<alloc::string::String>,
    pub values: Vec<ArrayD<f64>>,
}

impl Fisher {
    /// ‖F‖2 over all tensors.
    pub fn norm(&self) -> f64 {
        libm::sqrt(self.values.iter().flat_map(|v| v.iter()).map(|x| x * x).sum::<f64>())
    }
}

/// The normalised coefficients c_t = (1 / (‖F_t‖ + 1e-6)) / sum_s (1 / (‖F_s‖ + 1e-6)).
pub fn coefficients(fishers: &[Fisher]) -> Vec<f64> {
    let raw: Vec<f64> = fishers.iter().map(|f| 1.0 / (f.norm() + MIN_FISHER)).collect();
    let s: f64 = raw.iter().sum();
    raw.into_iter().map(|c| c / s).collect()
}

/// Merge with one Fisher per task (in the input's task order, over the input's names).
pub fn merge(input: &MergeInput<'_, '_>, fishers: &[Fisher]) -> Result<ParamSet<'static>, MergeError> {
    require_models("fisher", input, 1, "at least 1 fine-tuned model")?;
    if fishers.len() != input.tasks() {
        return Err(MergeError::Numerical {
            method: "fisher",
            detail: format!("{} Fisher matrices for {} models", fishers.len(), input.tasks()),
        });
    }
    for f in fishers {
        if f.names.as_slice() != input.names {
            return Err(MergeError::Numerical {
                method: "fisher",
                detail: "a Fisher matrix covers other tensors than the merge".to_string(),
            });
        }
        if f.values.iter().flat_map(|v| v.iter()).any(|x| !x.is_finite()) {
            return Err(MergeError::Numerical {
                method: "fisher",
                detail: "a Fisher matrix holds a NaN or infinite value (the model's gradients overflowed)".to_string(),
            });
        }
    }
    let c = coefficients(fishers);
    let mut out = ParamSet::new();
    for (i, name) in input.names.iter().enumerate() {
        let mut num = ArrayD::<f64>::zeros(input.base(name).raw_dim());
        let mut den = ArrayD::<f64>::zeros(input.base(name).raw_dim());
        for (t, ct) in c.iter().enumerate() {
            Zip::from(&mut num).and(&mut den).and(&fishers[t].values[i]).and(input.model(t, name)).for_each(
                |n, d, &f, &x| {
                    let w = ct * (f + MIN_FISHER);
                    *n += w * f64::from(x);
                    *d += w;
                },
            );
        }
        out.insert_owned(name.clone(), Zip::from(&num).and(&den).map_collect(|&n, &d| (n / d) as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{MergeMethod, WeightAverage};
    use super::*;
    use alloc::vec;

    fn fisher_of(input: &MergeInput<'_, '_>, vals: &[f64]) -> Fisher {
        Fisher {
            names: input.names.to_vec(),
            values: input
                .names
                .iter()
                .map(|n| {
                    let len = input.base(n).len();
                    ArrayD::from_shape_vec(input.base(n).raw_dim(), vals[..len].to_vec()).unwrap()
                })
                .collect(),
        }
    }

    #[test]
    fn equal_fishers_give_the_weight_average() {
        let base = set(&[("a", &[2, 2], &[0.0; 4]), ("b", &[3], &[0.0; 3])]);
        let m = [
            set(&[("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0]), ("b", &[3], &[1.0, -1.0, 0.5])]),
            set(&[("a", &[2, 2], &[-1.0, 0.0, 5.0, 2.0]), ("b", &[3], &[3.0, 1.0, 0.0])]),
            set(&[("a", &[2, 2], &[0.5, 0.5, 0.5, 0.5]), ("b", &[3], &[2.0, 2.0, 2.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let wa = WeightAverage.merge(&input, &Params::new()).unwrap().single().unwrap();
        // Same Fisher per task (varying across entries, even zero): the weights cancel.
        let f = fisher_of(&input, &[0.3, 0.0, 2.0, 1e-9]);
        let out = merge(&input, &[f.clone(), f.clone(), f]).unwrap();
        for n in &names {
            assert_close(&values(&out, n), &values(&wa, n), 1e-6);
        }
    }

    #[test]
    fn matches_a_direct_computation() {
        let base = set(&[("w", &[2], &[0.0, 0.0])]);
        let m = [set(&[("w", &[2], &[1.0, 2.0])]), set(&[("w", &[2], &[3.0, -2.0])])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let f1 = fisher_of(&input, &[3.0, 4.0]); // norm 5
        let f2 = fisher_of(&input, &[0.0, 1.0]); // norm 1
        let out = merge(&input, &[f1, f2]).unwrap();
        let (c1, c2) = (1.0 / (5.0 + 1e-6), 1.0 / (1.0 + 1e-6));
        let e = 1e-6;
        let w0 = (c1 * (3.0 + e) * 1.0 + c2 * e * 3.0) / (c1 * (3.0 + e) + c2 * e);
        let w1 = (c1 * (4.0 + e) * 2.0 + c2 * (1.0 + e) * -2.0) / (c1 * (4.0 + e) + c2 * (1.0 + e));
        assert_close(&values(&out, "w"), &[w0 as f32, w1 as f32], 1e-6);
    }

    #[test]
    fn dlogits_match_finite_differences_of_the_detached_objective() {
        let z = ndarray::array![[0.3f32, -1.2, 2.0], [0.0, 0.0, 0.0]];
        let d = dlogits(z.view());
        for i in 0..2 {
            let p = softmax(z.row(i).iter().copied());
            let w: Vec<f64> = p.iter().map(|q| q.sqrt()).collect();
            // Objective with sqrt(p) frozen at w: sum_c w_c log softmax(z)_c.
            let obj = |zz: &[f64]| {
                let m = zz.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + zz.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                zz.iter().zip(&w).map(|(v, wc)| wc * (v - lse)).sum::<f64>()
            };
            for j in 0..3 {
                let mut a: Vec<f64> = z.row(i).iter().map(|&v| f64::from(v)).collect();
                let h = 1e-6;
                a[j] += h;
                let fp = obj(&a);
                a[j] -= 2.0 * h;
                let fm = obj(&a);
                let fd = (fp - fm) / (2.0 * h);
                assert!((f64::from(d[[i, j]]) - fd).abs() < 1e-6, "[{i},{j}] {} vs {fd}", d[[i, j]]);
            }
        }
    }

    #[test]
    fn accumulator_squares_and_averages() {
        let base = set(&[("w", &[2], &[0.0, 0.0])]);
        let m = [set(&[("w", &[2], &[1.0, 2.0])])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut acc = FisherAccumulator::new(&input);
        let g1 = ndarray::arr1(&[1.0f32, -2.0]).into_dyn();
        let g2 = ndarray::arr1(&[3.0f32, 0.5]).into_dyn();
        acc.add_batch(2, |_| Some(g1.view())).unwrap();
        acc.add_batch(2, |_| Some(g2.view())).unwrap();
        let f = acc.finish().unwrap();
        let got: Vec<f64> = f.values[0].iter().copied().collect();
        assert_eq!(got, [(1.0 + 9.0) / 4.0, (4.0 + 0.25) / 4.0]);
        let mut acc = FisherAccumulator::new(&input);
        assert!(acc.add_batch(1, |_| None).unwrap_err().to_string().contains("`w`"));
        assert!(FisherAccumulator::new(&input).finish().is_err());
    }

    #[test]
    fn params_are_checked() {
        let mut p = Params::new();
        p.set("batch", "0");
        assert!(FisherConfig::from_params(&p).unwrap_err().to_string().contains("`batch`"));
        assert_eq!(FisherConfig::from_params(&Params::new()).unwrap(), FisherConfig { examples: 256, batch: 32 });
    }
}
