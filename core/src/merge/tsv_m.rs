//! `tsv-m` (Task Singular Vectors, merge): each 2-D merged tensor: per task the top
//! k = floor(r / T) singular triplets of tau_t; concatenate the U blocks and the V blocks, replace
//! each by its polar factor; delta = polar(U) diag(S) polar(V)^T. Other tensors: mean_t tau_t.
//! theta0 + alpha * delta, alpha 1.0.

use ndarray::{Array1, Array2, Axis};

use super::common::svd_frame;
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params};
use crate::linalg::{LinalgError, polar, svd_top};

pub struct TsvM;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "alpha", default: "1.0", help: "scale of the merged delta" },
    ParamSpec {
        name: "exclude",
        default: "text_projection",
        help: "comma-separated name parts of 2-D tensors averaged instead",
    },
];

/// delta = polar(U) diag(S) polar(V)^T of the stacked triplets (U: m x p, S: p, V: n x p).
pub(crate) fn orthogonalised(u: &Array2<f64>, s: &Array1<f64>, v: &Array2<f64>) -> Result<Array2<f64>, LinalgError> {
    let pu = polar(u.view())?;
    let pv = polar(v.view())?;
    Ok((&pu * &s.view().insert_axis(Axis(0))).dot(&pv.t()))
}

fn tsv(taus: &[Array2<f64>]) -> Result<Array2<f64>, LinalgError> {
    let (m, n) = taus[0].dim();
    let k = m.min(n) / taus.len();
    if k == 0 {
        return Ok(Array2::zeros((m, n)));
    }
    let p = k * taus.len();
    let mut u = Array2::zeros((m, p));
    let mut sv = Array1::zeros(p);
    let mut v = Array2::zeros((n, p));
    for (t, tau) in taus.iter().enumerate() {
        // Only the k kept triplets are computed.
        let d = svd_top(tau.view(), k)?;
        for i in 0..k {
            u.column_mut(t * k + i).assign(&d.u.column(i));
            sv[t * k + i] = d.s[i];
            v.column_mut(t * k + i).assign(&d.v.column(i));
        }
    }
    orthogonalised(&u, &sv, &v)
}

impl MergeMethod for TsvM {
    fn name(&self) -> &'static str {
        "tsv-m"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["tsv", "task-singular-vectors"]
    }
    fn summary(&self) -> &'static str {
        "TSV-M: per matrix keep each task's top r/T singular triplets, orthogonalise the stacked bases; alpha 1.0"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        Ok(MergeOutput::Single(svd_frame(self.name(), input, params, tsv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn orthogonal_task_subspaces_are_kept() {
        // Two tasks with rank-1 task vectors in orthogonal directions in a 4 x 3 matrix: r = 3,
        // k = 1 each; the stacked bases are already orthonormal, so delta = sum of the two.
        let t1 = [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let t2 = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.5, 0.0, 0.0, 0.0];
        let base = set(&[("w", &[4, 3], &[0.5; 12]), ("b", &[1], &[1.0])]);
        let add = |t: &[f32]| -> alloc::vec::Vec<f32> { t.iter().map(|x| x + 0.5).collect() };
        let m = [
            set(&[("w", &[4, 3], &add(&t1)), ("b", &[1], &[2.0])]),
            set(&[("w", &[4, 3], &add(&t2)), ("b", &[1], &[4.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let out = TsvM.merge(&input, &Params::new()).unwrap().single().unwrap();
        let want: alloc::vec::Vec<f32> = t1.iter().zip(&t2).map(|(a, b)| 0.5 + a + b).collect();
        assert_close(&values(&out, "w"), &want, 1e-6);
        assert_close(&values(&out, "b"), &[3.0], 1e-6);
    }

    #[test]
    fn one_task_full_rank_is_that_task() {
        // T = 1: k = r, polar factors of U and V are themselves: delta = tau.
        let tau = [1.0, -2.0, 0.5, 3.0, 0.25, -1.0];
        let base = set(&[("w", &[3, 2], &[0.0; 6])]);
        let m = [set(&[("w", &[3, 2], &tau)])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let out = TsvM.merge(&input, &Params::new()).unwrap().single().unwrap();
        assert_close(&values(&out, "w"), &tau, 1e-5);
    }

    #[test]
    fn overlapping_subspaces_are_orthogonalised() {
        // Same direction u for both tasks: the stacked U = [u, u] has polar factor with
        // orthonormal columns; delta keeps the total singular mass 2 + 1 along two columns.
        let (a, b) = (ndarray::arr1(&[1.0, 0.0]), ndarray::arr1(&[0.0, 1.0]));
        let t1 = ndarray::Array2::from_shape_fn((2, 2), |(i, j)| 2.0 * a[i] * a[j]);
        let t2 = ndarray::Array2::from_shape_fn((2, 2), |(i, j)| a[i] * b[j]);
        let delta = tsv(&[t1, t2]).unwrap();
        // Frobenius norm^2 of polar(U) diag(S) polar(V)^T = sum S^2 = 5.
        let f: f64 = delta.iter().map(|x| x * x).sum();
        assert!((f - 5.0).abs() < 1e-9, "{f}");
    }
}
