//! `task-arithmetic`: theta0 + lambda * sum_t w_t tau_t (lambda 0.3, w_t = 1 or the per-model
//! weights as given, like mergekit's `weight`).

use super::common::{Flat, finite, raw_weights, weighted_sum_on};
use super::{
    Executor, MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, Sequential, require_models,
};

pub struct TaskArithmetic;

const PARAMS: &[ParamSpec] =
    &[ParamSpec { name: "lambda", default: "0.3", help: "scale of the summed task vectors (finite)" }];

impl MergeMethod for TaskArithmetic {
    fn name(&self) -> &'static str {
        "task-arithmetic"
    }
    fn summary(&self) -> &'static str {
        "theta0 + lambda * sum of the task vectors (per-model weights optional), lambda 0.3"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        self.merge_on(input, params, &Sequential)
    }
    /// One job per tensor on `exec` (bitwise the same result).
    fn merge_on<'s>(
        &self,
        input: &MergeInput<'s, '_>,
        params: &Params,
        exec: &dyn Executor,
    ) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        let lambda = finite(params, "lambda", 0.3)?;
        let coef: alloc::vec::Vec<f32> = raw_weights(input)?.iter().map(|w| lambda * w).collect();
        let flat = Flat::new(input);
        Ok(MergeOutput::Single(weighted_sum_on(&flat, &flat, &coef, exec)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::WeightAverage;
    use super::super::testutil::*;
    use super::*;

    fn inputs() -> (crate::tensor::ParamSet<'static>, [crate::tensor::ParamSet<'static>; 3]) {
        let base = set(&[("a", &[2], &[1.0, -1.0]), ("b", &[1, 3], &[0.0, 0.5, 2.0])]);
        let m = [
            set(&[("a", &[2], &[2.0, -1.0]), ("b", &[1, 3], &[1.0, 0.5, 1.0])]),
            set(&[("a", &[2], &[0.0, 1.0]), ("b", &[1, 3], &[0.25, 0.5, 2.0])]),
            set(&[("a", &[2], &[1.5, -3.0]), ("b", &[1, 3], &[-1.0, 1.5, 2.0])]),
        ];
        (base, m)
    }

    #[test]
    fn hand_computed() {
        let (base, m) = inputs();
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("lambda", "0.5");
        let out = TaskArithmetic.merge(&input, &p).unwrap().single().unwrap();
        // tau sums: a = [1 - 1 + 0.5, 0 + 2 - 2] = [0.5, 0]; b = [1 + 0.25 - 1, 0 + 0 + 1, -1 + 0 + 0]
        assert_close(&values(&out, "a"), &[1.25, -1.0], 1e-7);
        assert_close(&values(&out, "b"), &[0.125, 1.0, 1.5], 1e-7);
        // Per-model weights scale each task vector.
        let w = [2.0, 0.0, -1.0];
        let input = MergeInput { model_weights: Some(&w), ..input };
        let out = TaskArithmetic.merge(&input, &p).unwrap().single().unwrap();
        // a: 0.5 * (2*[1, 0] - [0.5, -2]) = [0.75, 1]
        assert_close(&values(&out, "a"), &[1.75, 0.0], 1e-7);
    }

    #[test]
    fn lambda_one_over_t_is_weight_averaging() {
        let (base, m) = inputs();
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("lambda", "1/3");
        let ta = TaskArithmetic.merge(&input, &p).unwrap().single().unwrap();
        let wa = WeightAverage.merge(&input, &Params::new()).unwrap().single().unwrap();
        for n in &names {
            assert_close(&values(&ta, n), &values(&wa, n), 1e-6);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let (base, m) = inputs();
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m[..0], model_weights: None, names: &names, seed: 0 };
        assert!(matches!(TaskArithmetic.merge(&input, &Params::new()), Err(MergeError::ModelCount { .. })));
        let input = MergeInput { models: &m, ..input };
        let mut p = Params::new();
        p.set("lambda", "1e300");
        let e = TaskArithmetic.merge(&input, &p).err().unwrap();
        assert!(matches!(&e, MergeError::OutOfRange { param, .. } if param == "lambda"), "{e}");
    }
}
