//! `ties`: TIES-Merging (trim, elect sign, disjoint merge), FusionBench's variant by default: one
//! global trim over all merged tensors, `dis-sum` aggregation, lambda 0.3.

use super::common::{Aggregate, Flat, Scope, TiesOptions, density, finite, ties_on};
use super::{
    Executor, MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, Sequential, require_models,
};

pub struct Ties;

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "k",
        default: "0.2",
        help: "fraction of each task vector's entries kept by magnitude, in (0, 1]",
    },
    ParamSpec { name: "lambda", default: "0.3", help: "scale of the merged task vector (finite)" },
    ParamSpec { name: "aggregate", default: "dis-sum", help: "dis-sum or dis-mean (mean over the agreeing entries)" },
    ParamSpec {
        name: "scope",
        default: "global",
        help: "global (one trim over all merged tensors) or tensor (mergekit: per tensor)",
    },
];

/// Read the TIES options (`lambda` default given by the caller).
pub(crate) fn options(params: &Params, lambda_default: f64) -> Result<TiesOptions, MergeError> {
    let k = density(params, "k", 0.2)?;
    let lambda = finite(params, "lambda", lambda_default)?;
    let aggregate = match params.choice_or("aggregate", &["dis-sum", "dis-mean"], "dis-sum")? {
        "dis-mean" => Aggregate::Mean,
        _ => Aggregate::Sum,
    };
    let scope = match params.choice_or("scope", &["global", "tensor"], "global")? {
        "tensor" => Scope::Tensor,
        _ => Scope::Global,
    };
    Ok(TiesOptions { k, lambda, aggregate, scope })
}

impl MergeMethod for Ties {
    fn name(&self) -> &'static str {
        "ties"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["ties-merging"]
    }
    fn summary(&self) -> &'static str {
        "TIES: keep the top k=0.2 of each task vector (global trim), elect signs, sum the agreeing entries; lambda 0.3"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    /// Per-tensor trim only: the global trim's thresholds depend on every tensor.
    fn tensorwise(&self, params: &Params) -> bool {
        params.get("scope") == Some("tensor")
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        self.merge_on(input, params, &Sequential)
    }
    /// The passes over the tensors run as jobs on `exec` (bitwise the same result).
    fn merge_on<'s>(
        &self,
        input: &MergeInput<'s, '_>,
        params: &Params,
        exec: &dyn Executor,
    ) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        super::common::reject_weights(self.name(), input)?;
        let opt = options(params, 0.3)?;
        let flat = Flat::new(input);
        Ok(MergeOutput::Single(ties_on(&flat, &flat, &opt, exec)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::tensor::ParamSet;

    fn run(base: &ParamSet<'static>, m: &[ParamSet<'static>], kv: &[(&str, &str)]) -> ParamSet<'static> {
        let names = names(base);
        let input = MergeInput { base, models: m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        for (k, v) in kv {
            p.set(*k, *v);
        }
        Ties.merge(&input, &p).unwrap().single().unwrap()
    }

    /// Two tensors, 3 tasks, d = 5 entries; k = 0.2: the threshold is the (5 - 1)-th smallest abs
    /// value, so the 2 largest per task survive (global trim).
    #[test]
    fn hand_computed_global() {
        let base = set(&[("a", &[2], &[0.0, 0.0]), ("b", &[3], &[1.0, 1.0, 1.0])]);
        let m = [
            // tau: a [3, -1], b [0.5, -2, 0.1] -> keep 3, -2
            set(&[("a", &[2], &[3.0, -1.0]), ("b", &[3], &[1.5, -1.0, 1.1])]),
            // tau: a [-4, 0.2], b [1, 0.3, -0.5] -> keep -4, 1
            set(&[("a", &[2], &[-4.0, 0.2]), ("b", &[3], &[2.0, 1.3, 0.5])]),
            // tau: a [2, 0], b [0, -1, -3] -> keep 2, -3
            set(&[("a", &[2], &[2.0, 0.0]), ("b", &[3], &[1.0, 0.0, -2.0])]),
        ];
        // Trimmed sums: a0 = 3 - 4 + 2 = 1 (+): 3 + 2 = 5; a1 = 0; b0 = 1 (+): 1; b1 = -2: -2; b2 = -3: -3.
        let out = run(&base, &m, &[("k", "0.2"), ("lambda", "1")]);
        assert_close(&values(&out, "a"), &[5.0, 0.0], 1e-6);
        assert_close(&values(&out, "b"), &[2.0, -1.0, -2.0], 1e-6);
        // dis-mean divides by the agreeing count.
        let out = run(&base, &m, &[("k", "0.2"), ("lambda", "1"), ("aggregate", "dis-mean")]);
        assert_close(&values(&out, "a"), &[2.5, 0.0], 1e-6);
        assert_close(&values(&out, "b"), &[2.0, -1.0, -2.0], 1e-6);
    }

    /// A zero trimmed sum with nonzero entries takes the sign of the sum of the elected signs.
    #[test]
    fn zero_sum_takes_majority_sign() {
        let base = set(&[("a", &[3], &[0.0, 0.0, 0.0])]);
        let m = [set(&[("a", &[3], &[1.0, 2.0, 2.0])]), set(&[("a", &[3], &[-1.0, 1.0, 1.0])])];
        // k = 1: nothing trimmed; signs +, +, +: majority +; entry 0 sums to 0 -> keeps +1.
        let out = run(&base, &m, &[("k", "1"), ("lambda", "1")]);
        assert_close(&values(&out, "a"), &[1.0, 3.0, 3.0], 0.0);
        let m = [set(&[("a", &[3], &[1.0, -2.0, -2.0])]), set(&[("a", &[3], &[-1.0, 1.0, 1.0])])];
        let out = run(&base, &m, &[("k", "1"), ("lambda", "1")]);
        assert_close(&values(&out, "a"), &[-1.0, -2.0, -2.0], 0.0);
        // mergekit scope: a zero sum elects +1.
        let out = run(&base, &m, &[("k", "1"), ("lambda", "1"), ("scope", "tensor")]);
        assert_close(&values(&out, "a"), &[1.0, -2.0, -2.0], 0.0);
    }

    #[test]
    fn tensor_scope_keeps_int_k_n_per_tensor() {
        let base = set(&[("a", &[4], &[0.0; 4]), ("b", &[2], &[0.0; 2])]);
        let m = [set(&[("a", &[4], &[1.0, -4.0, 3.0, 2.0]), ("b", &[2], &[10.0, 20.0])])];
        // k = 0.5: a keeps -4, 3; b keeps 20.
        let out = run(&base, &m, &[("k", "0.5"), ("lambda", "1"), ("scope", "tensor")]);
        assert_close(&values(&out, "a"), &[0.0, -4.0, 3.0, 0.0], 0.0);
        assert_close(&values(&out, "b"), &[0.0, 20.0], 0.0);
        // Global: threshold = the (6 - 3)-th smallest abs value, 3: keeps 3, -4, 10, 20.
        let out = run(&base, &m, &[("k", "0.5"), ("lambda", "1")]);
        assert_close(&values(&out, "a"), &[0.0, -4.0, 3.0, 0.0], 0.0);
        assert_close(&values(&out, "b"), &[10.0, 20.0], 0.0);
    }

    #[test]
    fn k_one_single_task_is_task_arithmetic() {
        let base = set(&[("a", &[3], &[0.5, 1.0, -2.0]), ("b", &[2], &[0.0, 3.0])]);
        let m = [set(&[("a", &[3], &[1.5, -1.0, -2.0]), ("b", &[2], &[0.25, 1.0])])];
        let out = run(&base, &m, &[("k", "1"), ("lambda", "1")]);
        for n in ["a", "b"] {
            assert_close(&values(&out, n), &values(&m[0], n), 1e-6);
        }
        let out = run(&base, &m, &[("k", "1")]);
        assert_close(&values(&out, "a"), &[0.8, 0.4, -2.0], 1e-6);
    }

    /// Many entries with a spread of magnitudes: the radix selection equals a sort-based threshold.
    #[test]
    fn global_threshold_matches_sorting() {
        let mut rng = crate::rng::stream(3, &[b"test"]);
        use rand::RngExt;
        let n = 10_000;
        let vals = |rng: &mut rand_chacha::ChaCha20Rng| -> alloc::vec::Vec<f32> {
            (0..n).map(|_| (rng.random::<f32>() - 0.5) * libm::powf(10.0, rng.random::<f32>() * 4.0 - 4.0)).collect()
        };
        let (v1, v2) = (vals(&mut rng), vals(&mut rng));
        let base = set(&[("a", &[n / 2], &[0.0; 5000]), ("b", &[n / 2], &[0.0; 5000])]);
        let m = [set(&[("a", &[n / 2], &v1[..5000]), ("b", &[n / 2], &v1[5000..])])];
        let _ = v2;
        let out = run(&base, &m, &[("k", "0.137"), ("lambda", "1")]);
        let mut abs: alloc::vec::Vec<f32> = v1.iter().map(|x| x.abs()).collect();
        abs.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let keep = (n as f64 * 0.137) as usize;
        let thr = abs[n - keep - 1];
        let want: alloc::vec::Vec<f32> = v1.iter().map(|&x| if x.abs() >= thr { x } else { 0.0 }).collect();
        let got: alloc::vec::Vec<f32> = values(&out, "a").into_iter().chain(values(&out, "b")).collect();
        assert_close(&got, &want, 0.0);
    }

    #[test]
    fn k_out_of_range_is_named() {
        let base = set(&[("a", &[1], &[0.0])]);
        let m = [set(&[("a", &[1], &[1.0])])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let w = [1.0];
        let weighted = MergeInput { model_weights: Some(&w), ..input };
        let e = Ties.merge(&weighted, &Params::new()).err().unwrap();
        assert!(alloc::format!("{e}").contains("`weight`"), "{e}");
        for bad in ["0", "1.5", "-0.1"] {
            let mut p = Params::new();
            p.set("k", bad);
            let e = Ties.merge(&input, &p).err().unwrap();
            assert!(matches!(&e, MergeError::OutOfRange { param, .. } if param == "k"), "{e}");
        }
    }
}
