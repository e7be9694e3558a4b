//! `iso-cts` (Iso-CTS): each 2-D merged tensor: a common subspace (the top k_c left singular
//! vectors of sum_t tau_t, with their right vectors) plus d task-specific directions per task (top-d
//! triplets of (I - U_c U_c^T) tau_t); the stacked U and V are replaced by their polar factors and
//! every singular value by their mean. Other tensors: mean_t tau_t. theta0 + alpha * delta.

use ndarray::{Array1, Array2};

use super::common::{svd_frame, unit};
use super::tsv_m::orthogonalised;
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params};
use crate::linalg::{LinalgError, svd, svd_top};

pub struct IsoCts;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "alpha", default: "1.0", help: "scale of the merged delta" },
    ParamSpec {
        name: "common-fraction",
        default: "0.8",
        help: "share of the rank given to the common subspace, in [0, 1]",
    },
    ParamSpec {
        name: "exclude",
        default: "text_projection",
        help: "comma-separated name parts of 2-D tensors averaged instead",
    },
];

/// (k_c, d): r - k_c = d T with d T = round_half_even((r - floor(f r)) / T) * T (at most r).
pub(crate) fn split(r: usize, tasks: usize, fraction: f64) -> (usize, usize) {
    let common = libm::floor(fraction * r as f64) as usize;
    let per_task = libm::rint((r - common.min(r)) as f64 / tasks as f64) as usize;
    let per_task = per_task.min(r / tasks);
    (r - per_task * tasks, per_task)
}

fn iso_cts(taus: &[Array2<f64>], fraction: f64) -> Result<Array2<f64>, LinalgError> {
    let (m, n) = taus[0].dim();
    let r = m.min(n);
    let tasks = taus.len();
    let (kc, d) = split(r, tasks, fraction);
    let mut sum = taus[0].clone();
    for t in &taus[1..] {
        sum += t;
    }
    let common = svd(sum.view())?;
    let mut u = Array2::zeros((m, r));
    let mut sv = Array1::zeros(r);
    let mut v = Array2::zeros((n, r));
    // Task-specific parts first, then the common ones (FusionBench's order).
    let uc = common.u.select(ndarray::Axis(1), &(0..kc).collect::<alloc::vec::Vec<_>>());
    for (t, tau) in taus.iter().enumerate() {
        if d == 0 {
            break;
        }
        let proj = tau - &uc.dot(&uc.t().dot(tau));
        let ts = svd_top(proj.view(), d)?;
        for i in 0..d {
            u.column_mut(t * d + i).assign(&ts.u.column(i));
            sv[t * d + i] = ts.s[i];
            v.column_mut(t * d + i).assign(&ts.v.column(i));
        }
    }
    for i in 0..kc {
        u.column_mut(tasks * d + i).assign(&common.u.column(i));
        sv[tasks * d + i] = common.s[i];
        v.column_mut(tasks * d + i).assign(&common.v.column(i));
    }
    let mean = sv.mean().unwrap_or(0.0);
    orthogonalised(&u, &Array1::from_elem(r, mean), &v)
}

impl MergeMethod for IsoCts {
    fn name(&self) -> &'static str {
        "iso-cts"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["isocts"]
    }
    fn summary(&self) -> &'static str {
        "Iso-CTS: common (80% of the rank) plus task-specific singular directions, isotropic spectrum; alpha 1.0"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        let fraction = unit(params, "common-fraction", 0.8)?;
        Ok(MergeOutput::Single(svd_frame(self.name(), input, params, |taus| iso_cts(taus, fraction))?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn split_matches_the_reference() {
        assert_eq!(split(768, 8, 0.8), (616, 19));
        assert_eq!(split(50, 8, 0.8), (42, 1));
        assert_eq!(split(3, 2, 0.0), (1, 1));
        assert_eq!(split(10, 4, 0.8), (10, 0));
    }

    #[test]
    fn hand_computed() {
        // 2 tasks, 3 x 2 matrices, fraction 0.5: r = 2, common floor(1) = 1, per task
        // round(1/2) = 0 (half to even) -> k_c = 2, d = 0: Iso-C on the sum (both directions).
        // Sum = diag-like [[3, 0], [0, 1], [0, 0]]: mean singular value 2: delta = 2 * [[1,0],[0,1],[0,0]].
        let base = set(&[("w", &[3, 2], &[0.0; 6])]);
        let m = [
            set(&[("w", &[3, 2], &[2.0, 0.0, 0.0, 1.0, 0.0, 0.0])]),
            set(&[("w", &[3, 2], &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("common-fraction", "0.5");
        let out = IsoCts.merge(&input, &p).unwrap().single().unwrap();
        assert_close(&values(&out, "w"), &[2.0, 0.0, 0.0, 2.0, 0.0, 0.0], 1e-6);
        // Fraction 0: r = 2, per task round(2/2) = 1: k_c = 0, one direction per task: task 1
        // (e1, 2), task 2 (e1, 1): stacked U = [e1, e1] -> polar gives an orthonormal pair;
        // every singular value 1.5: the Frobenius norm^2 of delta is 2 * 1.5^2.
        p.set("common-fraction", "0");
        let out = IsoCts.merge(&input, &p).unwrap().single().unwrap();
        let f: f32 = values(&out, "w").iter().map(|x| x * x).sum();
        assert!((f - 4.5).abs() < 1e-5, "{f}");
    }
}
