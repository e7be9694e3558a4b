//! `regmean`: regression-mean merging (Jin et al.; FusionBench's defaults, METHODS.md).
//!
//! For every linear layer with input Gram matrices G_t (mean of X^T X over the token rows of the
//! task's train images, from the engine): off-diagonal entries times `alpha` (0.95), the diagonal
//! kept, then W^T = (sum_t G_t)^-1 sum_t G_t W_t^T, solved in f64 with
//! [`crate::linalg::solve_spd`] (Cholesky; no explicit inverse). Every other merged tensor is
//! weight-averaged.
//!
//! Ill-conditioned systems are regularised and reported, never turned into NaN: when an input
//! dimension is (numerically) dead in every task (a diagonal entry of sum_t G_t at or below
//! 1e-10 times the largest) the solve uses sum_t G_t + r I on the left and sum_t G_t W_t^T +
//! r mean_t W_t^T on the right, r = 1e-6 times the largest diagonal entry, so a dead input's column
//! is the weight average and the rest moves by O(1e-6). A layer whose Grams are all zero is
//! weight-averaged; one whose solve is not finite falls back to the weight average. Each such event
//! is a [`Note`].

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ndarray::{Array2, ArrayD, ArrayView2, Ix2, Zip};

use super::{MergeError, MergeInput, ParamSpec, Params, check_range, require_models};
use crate::linalg::solve_spd;
use crate::tensor::ParamSet;

/// The method's parameters with their defaults.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "alpha", default: "0.95", help: "scale of the Grams' off-diagonal entries (1 = plain RegMean)" },
    ParamSpec { name: "examples", default: "256", help: "shuffled train images per task for the Grams" },
];

/// A diagonal entry at or below this share of the largest marks a dead input dimension.
pub const DEAD_RATIO: f64 = 1e-10;
/// The ridge added to an ill-conditioned system, relative to its largest diagonal entry.
pub const RIDGE: f64 = 1e-6;

/// Parsed parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegMeanConfig {
    pub alpha: f64,
    pub examples: usize,
}

impl RegMeanConfig {
    pub fn from_params(p: &Params) -> Result<RegMeanConfig, MergeError> {
        let alpha = p.f64_or("alpha", 0.95)?;
        check_range("alpha", alpha, (0.0..=1.0).contains(&alpha), "in [0, 1]")?;
        let examples = p.usize_or("examples", 256)?;
        check_range("examples", examples as f64, examples >= 1, ">= 1")?;
        Ok(RegMeanConfig { alpha, examples })
    }
}

/// Something the merge regularised or fell back on, for the log and the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub tensor: String,
    pub detail: String,
}

impl core::fmt::Display for Note {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "regmean, tensor `{}`: {}", self.tensor, self.detail)
    }
}

/// Merge one linear layer: `weights` are the tasks' W_t `[out, in]`, `grams` their G_t `[in, in]`
/// (already in f64 or not: they are read as f32 views and summed in f64). Returns the merged W and
/// a note when the system had to be regularised.
pub fn merge_linear(
    name: &str,
    weights: &[ArrayView2<'_, f32>],
    grams: &[ArrayView2<'_, f32>],
    alpha: f64,
) -> Result<(Array2<f32>, Option<Note>), MergeError> {
    let t = weights.len();
    if t == 0 || grams.len() != t {
        return Err(MergeError::Numerical {
            method: "regmean",
            detail: format!("tensor `{name}`: {} weights and {} Gram matrices", t, grams.len()),
        });
    }
    let (out_dim, in_dim) = weights[0].dim();
    for (k, (w, g)) in weights.iter().zip(grams).enumerate() {
        if w.dim() != (out_dim, in_dim) || g.dim() != (in_dim, in_dim) {
            return Err(MergeError::Numerical {
                method: "regmean",
                detail: format!(
                    "tensor `{name}`: model {k} has weight {:?} and Gram {:?}, expected [{out_dim}, {in_dim}] and [{in_dim}, {in_dim}]",
                    w.shape(),
                    g.shape()
                ),
            });
        }
        if let Some(i) = g.iter().position(|v| !v.is_finite()) {
            return Err(MergeError::Numerical {
                method: "regmean",
                detail: format!("the Gram matrix of `{name}` for model {k} holds a NaN or infinity at flat index {i}"),
            });
        }
    }
    let mean_wt = || {
        let mut m = Array2::<f64>::zeros((in_dim, out_dim));
        for w in weights {
            Zip::from(&mut m).and(&w.t()).for_each(|a, &x| *a += f64::from(x) / t as f64);
        }
        m
    };
    // A = sum_t G'_t, B = sum_t G'_t W_t^T (G' with off-diagonals times alpha).
    let mut a = Array2::<f64>::zeros((in_dim, in_dim));
    let mut b = Array2::<f64>::zeros((in_dim, out_dim));
    for (w, g) in weights.iter().zip(grams) {
        let mut gr = g.mapv(f64::from);
        for ((i, j), v) in gr.indexed_iter_mut() {
            if i != j {
                *v *= alpha;
            }
        }
        let wt = w.t().mapv(f64::from);
        b += &gr.dot(&wt);
        a += &gr;
    }
    let max_diag = (0..in_dim).fold(0.0f64, |m, i| m.max(a[[i, i]]));
    let to_f32 = |x: &Array2<f64>| x.t().mapv(|v| v as f32);
    if max_diag <= 0.0 || !max_diag.is_finite() {
        let note = Note { tensor: name.into(), detail: "every Gram matrix is zero: weight-averaged".into() };
        return Ok((to_f32(&mean_wt()), Some(note)));
    }
    let dead = (0..in_dim).filter(|&i| a[[i, i]] <= DEAD_RATIO * max_diag).count();
    let mut note = None;
    if dead > 0 {
        let r = RIDGE * max_diag;
        for i in 0..in_dim {
            a[[i, i]] += r;
        }
        b.scaled_add(r, &mean_wt());
        note = Some(Note {
            tensor: name.into(),
            detail: format!(
                "{dead} of {in_dim} input dimensions carry no signal (ill-conditioned system): regularised with \
                 a ridge of {r:.3e} toward the weight average"
            ),
        });
    }
    let x = solve_spd(a.view(), b.view())
        .map_err(|e| MergeError::Numerical { method: "regmean", detail: format!("tensor `{name}`: {e}") })?;
    if x.iter().any(|v| !v.is_finite() || v.abs() > f32::MAX as f64) {
        let note = Note { tensor: name.into(), detail: "the solve was not finite: weight-averaged".into() };
        return Ok((to_f32(&mean_wt()), Some(note)));
    }
    Ok((to_f32(&x), note))
}

/// Merge: `grams[t]` holds task t's Gram matrices keyed by weight name (the engine's `gram.` prefix
/// removed). Merged 2-D tensors with a Gram in every task are solved; the others are averaged.
pub fn merge(
    input: &MergeInput<'_, '_>,
    grams: &[ParamSet<'_>],
    cfg: &RegMeanConfig,
) -> Result<(ParamSet<'static>, Vec<Note>), MergeError> {
    require_models("regmean", input, 1, "at least 1 fine-tuned model")?;
    if grams.len() != input.tasks() {
        return Err(MergeError::Numerical {
            method: "regmean",
            detail: format!("{} Gram sets for {} models", grams.len(), input.tasks()),
        });
    }
    let t = input.tasks();
    let mut out = ParamSet::new();
    let mut notes = Vec::new();
    for name in input.names {
        let base = input.base(name);
        let solved = base.ndim() == 2 && grams.iter().all(|g| g.contains(name));
        if solved {
            let ws: Vec<ArrayView2<'_, f32>> = (0..t)
                .map(|k| input.model(k, name).view().into_dimensionality::<Ix2>().expect("2-D like the base"))
                .collect();
            let gs: Vec<ArrayView2<'_, f32>> = grams
                .iter()
                .map(|g| {
                    g.get(name).expect("checked").view().into_dimensionality::<Ix2>().map_err(|_| {
                        MergeError::Numerical { method: "regmean", detail: format!("the Gram of `{name}` is not 2-D") }
                    })
                })
                .collect::<Result<_, _>>()?;
            let (w, note) = merge_linear(name, &ws, &gs, cfg.alpha)?;
            notes.extend(note);
            out.insert_owned(name.clone(), w.into_dyn());
        } else {
            let mut acc = ArrayD::<f32>::zeros(base.raw_dim());
            for k in 0..t {
                Zip::from(&mut acc).and(input.model(k, name)).for_each(|a, &x| *a += x / t as f32);
            }
            out.insert_owned(name.clone(), acc);
        }
    }
    if let Some(n) = out.iter().find(|(_, v)| v.iter().any(|x| !x.is_finite())).map(|(n, _)| n.to_string()) {
        return Err(MergeError::Numerical { method: "regmean", detail: format!("tensor `{n}` is not finite") });
    }
    Ok((out, notes))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use alloc::vec;
    use rand::RngExt;

    fn rand_mat(rng: &mut rand_chacha::ChaCha20Rng, r: usize, c: usize) -> Array2<f32> {
        Array2::from_shape_fn((r, c), |_| rng.random_range(-1.0f32..1.0))
    }

    /// f64 reference by normal equations of the stacked least-squares problem
    /// min_W sum_t ‖X_t W^T - X_t W_t^T‖^2, solved by Gaussian elimination with partial pivoting.
    #[allow(clippy::needless_range_loop)]
    fn reference(xs: &[Array2<f64>], ws: &[Array2<f64>]) -> Array2<f64> {
        let n = xs[0].ncols();
        let o = ws[0].nrows();
        let mut a = vec![vec![0.0; n + o]; n];
        for (x, w) in xs.iter().zip(ws) {
            let g = x.t().dot(x);
            let b = g.dot(&w.t());
            for i in 0..n {
                for j in 0..n {
                    a[i][j] += g[[i, j]];
                }
                for j in 0..o {
                    a[i][n + j] += b[[i, j]];
                }
            }
        }
        for c in 0..n {
            let p = (c..n).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs())).unwrap();
            a.swap(c, p);
            for r in 0..n {
                if r != c {
                    let f = a[r][c] / a[c][c];
                    for k in c..n + o {
                        a[r][k] -= f * a[c][k];
                    }
                }
            }
        }
        Array2::from_shape_fn((o, n), |(j, i)| a[i][n + j] / a[i][i])
    }

    #[test]
    fn one_linear_layer_equals_the_closed_form_least_squares_merge() {
        let mut rng = crate::rng::stream(3, &[b"regmean-test"]);
        let (rows, din, dout) = (40, 6, 4);
        let xs: Vec<Array2<f32>> = (0..3).map(|_| rand_mat(&mut rng, rows, din)).collect();
        let ws: Vec<Array2<f32>> = (0..3).map(|_| rand_mat(&mut rng, dout, din)).collect();
        // Grams as the engine gives them: the mean over rows (the 1/rows cancels in the solve).
        let gs: Vec<Array2<f32>> = xs.iter().map(|x| x.t().dot(x) / rows as f32).collect();
        let wv: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let gv: Vec<_> = gs.iter().map(|g| g.view()).collect();
        let (got, note) = merge_linear("w", &wv, &gv, 1.0).unwrap();
        assert!(note.is_none());
        let want = reference(
            &xs.iter().map(|x| x.mapv(f64::from)).collect::<Vec<_>>(),
            &ws.iter().map(|w| w.mapv(f64::from)).collect::<Vec<_>>(),
        );
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
        }
        // The merged layer beats every fine-tuned W_t on the pooled regression objective.
        let cost = |w: &Array2<f32>| -> f64 {
            xs.iter().zip(&ws).map(|(x, wt)| (x.dot(&w.t()) - x.dot(&wt.t())).mapv(|v| f64::from(v * v)).sum()).sum()
        };
        for w in &ws {
            assert!(cost(&got) <= cost(w));
        }
    }

    #[test]
    fn alpha_scales_off_diagonals_only() {
        // With alpha = 0 each output column solves a diagonal system: per input dimension j,
        // W[:, j] = sum_t G_t[j,j] W_t[:, j] / sum_t G_t[j,j].
        let ws = [ndarray::array![[1.0f32, 2.0], [3.0, 4.0]], ndarray::array![[5.0f32, -2.0], [0.0, 1.0]]];
        let gs = [ndarray::array![[2.0f32, 0.7], [0.7, 1.0]], ndarray::array![[1.0f32, -0.3], [-0.3, 3.0]]];
        let wv: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let gv: Vec<_> = gs.iter().map(|g| g.view()).collect();
        let (got, _) = merge_linear("w", &wv, &gv, 0.0).unwrap();
        let want = ndarray::array![
            [(2.0 * 1.0 + 5.0) / 3.0, (2.0 * 1.0 + -2.0 * 3.0) / 4.0],
            [(3.0 * 2.0 + 0.0) / 3.0, (4.0 * 1.0 + 1.0 * 3.0) / 4.0]
        ];
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn dead_inputs_are_regularised_and_reported_never_nan() {
        // Input 2 is zero in every task: the system is singular there.
        let mut rng = crate::rng::stream(4, &[b"regmean-dead"]);
        let mut xs: Vec<Array2<f32>> = (0..2).map(|_| rand_mat(&mut rng, 20, 3)).collect();
        for x in &mut xs {
            x.column_mut(2).fill(0.0);
        }
        let ws: Vec<Array2<f32>> = (0..2).map(|_| rand_mat(&mut rng, 2, 3)).collect();
        let gs: Vec<Array2<f32>> = xs.iter().map(|x| x.t().dot(x) / 20.0).collect();
        let wv: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let gv: Vec<_> = gs.iter().map(|g| g.view()).collect();
        for alpha in [1.0, 0.95] {
            let (got, note) = merge_linear("layer.w", &wv, &gv, alpha).unwrap();
            let note = note.expect("reported");
            assert!(note.to_string().contains("`layer.w`") && note.detail.contains("1 of 3"), "{note}");
            assert!(got.iter().all(|v| v.is_finite()));
            // The dead column is the weight average.
            for o in 0..2 {
                let avg = (ws[0][[o, 2]] + ws[1][[o, 2]]) / 2.0;
                assert!((got[[o, 2]] - avg).abs() < 1e-4, "{} vs {avg}", got[[o, 2]]);
            }
        }
        // All-zero Grams: the weight average, reported.
        let zeros = [Array2::<f32>::zeros((3, 3)), Array2::<f32>::zeros((3, 3))];
        let zv: Vec<_> = zeros.iter().map(|g| g.view()).collect();
        let (got, note) = merge_linear("z", &wv, &zv, 0.95).unwrap();
        assert!(note.unwrap().detail.contains("zero"));
        assert!((got[[1, 1]] - (ws[0][[1, 1]] + ws[1][[1, 1]]) / 2.0).abs() < 1e-6);
        // A NaN Gram is an error naming the tensor.
        let mut bad = gs[0].clone();
        bad[[0, 1]] = f32::NAN;
        let bv = [bad.view(), gs[1].view()];
        assert!(merge_linear("q", &wv, &bv, 0.95).unwrap_err().to_string().contains("`q`"));
    }

    #[test]
    fn other_tensors_are_averaged_and_grams_are_used_for_matrices() {
        let base = set(&[("b", &[2], &[0.0, 0.0]), ("w", &[1, 2], &[0.0, 0.0])]);
        let m = [
            set(&[("b", &[2], &[1.0, 2.0]), ("w", &[1, 2], &[1.0, 0.0])]),
            set(&[("b", &[2], &[3.0, 0.0]), ("w", &[1, 2], &[0.0, 1.0])]),
        ];
        let g = [set(&[("w", &[2, 2], &[1.0, 0.0, 0.0, 0.0])]), set(&[("w", &[2, 2], &[0.0, 0.0, 0.0, 1.0])])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let cfg = RegMeanConfig::from_params(&Params::new()).unwrap();
        let (out, notes) = merge(&input, &g, &cfg).unwrap();
        assert!(notes.is_empty());
        assert_close(&values(&out, "b"), &[2.0, 1.0], 1e-7);
        // Task 0 sees only input 0, task 1 only input 1: each keeps its own column.
        assert_close(&values(&out, "w"), &[1.0, 1.0], 1e-6);
        let mut p = Params::new();
        p.set("alpha", "1.5");
        assert!(RegMeanConfig::from_params(&p).unwrap_err().to_string().contains("`alpha`"));
    }
}
