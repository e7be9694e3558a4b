//! `iso-c` (Iso-C): each 2-D merged tensor: M = sum_t tau_t = U S V^T, delta = mean(S) U V^T (an
//! isotropic spectrum); other tensors: mean_t tau_t; theta0 + alpha * delta, alpha 1.0.

use super::common::svd_frame;
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params};
use crate::linalg::svd;

pub struct IsoC;

const PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "alpha",
        default: "1.0",
        help: "scale of the merged delta (FusionBench reports ViT-B/32 at 1.5)",
    },
    ParamSpec {
        name: "exclude",
        default: "text_projection",
        help: "comma-separated name parts of 2-D tensors averaged instead",
    },
];

impl MergeMethod for IsoC {
    fn name(&self) -> &'static str {
        "iso-c"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["iso-c-merge", "isoc"]
    }
    fn summary(&self) -> &'static str {
        "Iso-C: per matrix, flatten the spectrum of the summed task vectors to its mean singular value; alpha 1.0"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        let out = svd_frame(self.name(), input, params, |taus| {
            let mut sum = taus[0].clone();
            for t in &taus[1..] {
                sum += t;
            }
            let d = svd(sum.view())?;
            let mean = d.s.mean().unwrap_or(0.0);
            Ok(d.u.dot(&d.v.t()) * mean)
        })?;
        Ok(MergeOutput::Single(out))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn hand_computed() {
        // Sum of task vectors diag(3, 1) (2-D): singular values 3, 1 -> mean 2 -> delta = 2 I.
        // Bias: mean task vector.
        let base = set(&[("w", &[2, 2], &[1.0, 0.0, 0.0, 1.0]), ("b", &[2], &[0.0, 0.0])]);
        let m = [
            set(&[("w", &[2, 2], &[3.0, 0.0, 0.0, 1.0]), ("b", &[2], &[1.0, 2.0])]),
            set(&[("w", &[2, 2], &[2.0, 0.0, 0.0, 2.0]), ("b", &[2], &[3.0, 0.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let out = IsoC.merge(&input, &Params::new()).unwrap().single().unwrap();
        assert_close(&values(&out, "w"), &[3.0, 0.0, 0.0, 3.0], 1e-6);
        assert_close(&values(&out, "b"), &[2.0, 1.0], 1e-6);
        // Excluded 2-D tensors are averaged.
        let mut p = Params::new();
        p.set("exclude", "w");
        p.set("alpha", "0.5");
        let out = IsoC.merge(&input, &p).unwrap().single().unwrap();
        assert_close(&values(&out, "w"), &[1.75, 0.0, 0.0, 1.25], 1e-6);
    }
}
