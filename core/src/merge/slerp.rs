//! `slerp` (mergekit's): per tensor, spherical interpolation between the raw weights of exactly two
//! models, theta_1 at t = 0 and theta_2 at t = 1; linear when the normalised tensors are nearly
//! parallel (abs(dot) > 0.9995).

use alloc::vec::Vec;

use super::common::{Flat, unit};
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params};

pub struct Slerp;

const PARAMS: &[ParamSpec] =
    &[ParamSpec { name: "t", default: "0.5", help: "interpolation position in [0, 1] (0: first model, 1: second)" }];

/// The coefficients (s0, s1) of slerp between `a` and `b` at `t`.
pub(crate) fn coefficients(a: &[f32], b: &[f32], t: f64) -> (f64, f64) {
    let (mut aa, mut bb, mut ab) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        aa += x * x;
        bb += y * y;
        ab += x * y;
    }
    let na = libm::sqrt(aa);
    let nb = libm::sqrt(bb);
    let na = if na > 1e-8 { na } else { 1.0 };
    let nb = if nb > 1e-8 { nb } else { 1.0 };
    let dot = ab / (na * nb);
    if dot.abs() > 0.9995 {
        return (1.0 - t, t);
    }
    let theta0 = libm::acos(dot);
    let sin0 = libm::sin(theta0);
    let theta_t = theta0 * t;
    (libm::sin(theta0 - theta_t) / sin0, libm::sin(theta_t) / sin0)
}

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }
    fn summary(&self) -> &'static str {
        "spherical interpolation of two models' weights per tensor, t 0.5 (exactly 2 models)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        if input.tasks() != 2 {
            return Err(MergeError::ModelCount {
                method: "slerp",
                needs: "exactly 2 fine-tuned models",
                got: input.tasks(),
            });
        }
        let t = unit(params, "t", 0.5)?;
        super::common::reject_weights(self.name(), input)?;
        let flat = Flat::new(input);
        let values: Vec<Vec<f32>> = (0..flat.names.len())
            .map(|k| {
                let (a, b) = (&flat.models[0][k], &flat.models[1][k]);
                let (s0, s1) = coefficients(a, b, t);
                a.iter().zip(b.iter()).map(|(&x, &y)| (s0 * f64::from(x) + s1 * f64::from(y)) as f32).collect()
            })
            .collect();
        Ok(MergeOutput::Single(flat.output(values)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn run(t: &str, m: &[crate::tensor::ParamSet<'static>]) -> Result<crate::tensor::ParamSet<'static>, MergeError> {
        let base = set(&[("a", &[2], &[0.0, 0.0]), ("b", &[3], &[0.0; 3])]);
        let names = names(&base);
        let input = MergeInput { base: &base, models: m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("t", t);
        Ok(Slerp.merge(&input, &p)?.single().unwrap())
    }

    fn models() -> [crate::tensor::ParamSet<'static>; 2] {
        [
            set(&[("a", &[2], &[2.0, 0.0]), ("b", &[3], &[1.0, 2.0, 3.0])]),
            set(&[("a", &[2], &[0.0, 1.0]), ("b", &[3], &[2.0, 4.0, 6.0001])]),
        ]
    }

    #[test]
    fn endpoints_and_midpoint() {
        let m = models();
        for (t, w) in [("0", 0), ("1", 1)] {
            let out = run(t, &m).unwrap();
            for n in ["a", "b"] {
                assert_close(&values(&out, n), &values(&m[w], n), 0.0);
            }
        }
        // a: orthogonal, t = 0.5: s0 = s1 = sin(pi/4)/sin(pi/2) = 0.7071.
        let out = run("0.5", &m).unwrap();
        let s = core::f32::consts::FRAC_1_SQRT_2;
        assert_close(&values(&out, "a"), &[2.0 * s, s], 1e-6);
        // b: nearly parallel: linear interpolation.
        assert_close(&values(&out, "b"), &[1.5, 3.0, 4.50005], 1e-5);
    }

    #[test]
    fn needs_two_models_and_t_in_range() {
        let m = models();
        assert!(matches!(run("0.5", &m[..1]), Err(MergeError::ModelCount { got: 1, .. })));
        assert!(matches!(run("1.5", &m), Err(MergeError::OutOfRange { param, .. }) if param == "t"));
    }
}
