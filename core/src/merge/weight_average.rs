//! `weight-average`: theta = sum_t w_t theta_t with w_t = 1/T (or the normalised per-model weights).

use ndarray::{ArrayD, Zip};

use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, normalised_weights, require_models};
use crate::tensor::ParamSet;

pub struct WeightAverage;

impl MergeMethod for WeightAverage {
    fn name(&self) -> &'static str {
        "weight-average"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["linear", "average", "simple-average"]
    }
    fn summary(&self) -> &'static str {
        "mean of the fine-tuned weights (per-model weights optional)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        &[]
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, _params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        let w = normalised_weights(input)?;
        let mut out = ParamSet::new();
        for name in input.names {
            let mut acc = ArrayD::<f32>::zeros(input.base(name).raw_dim());
            for (t, wt) in w.iter().enumerate() {
                Zip::from(&mut acc).and(input.model(t, name)).for_each(|a, &x| *a += wt * x);
            }
            out.insert_owned(name.clone(), acc);
        }
        Ok(MergeOutput::Single(out))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn averages_and_weights() {
        let base = set(&[("a", &[2], &[0.0, 0.0])]);
        let m = [set(&[("a", &[2], &[1.0, 2.0])]), set(&[("a", &[2], &[3.0, 6.0])])];
        let names = names(&base);
        let mut input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let out = WeightAverage.merge(&input, &Params::new()).unwrap().single().unwrap();
        assert_close(&values(&out, "a"), &[2.0, 4.0], 0.0);
        let w = [3.0, 1.0];
        input.model_weights = Some(&w);
        let out = WeightAverage.merge(&input, &Params::new()).unwrap().single().unwrap();
        assert_close(&values(&out, "a"), &[1.5, 3.0], 1e-7);
    }
}
