//! `model-stock` (mergekit's variant): per tensor, c = mean of the pairwise cosines of the
//! flattened task vectors (norms clamped at 1e-6); t = T c / (1 + (T-1) c);
//! theta = t * mean_t theta_t + (1 - t) * theta0.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use super::common::{CHUNK, Flat};
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, require_models};

pub struct ModelStock;

/// The interpolation ratio t of tensor k.
fn ratio(flat: &Flat<'_>, k: usize) -> Result<f64, MergeError> {
    let tasks = flat.tasks();
    let mut gram = vec![0.0f64; tasks * tasks];
    let mut taus = vec![0.0f32; tasks * CHUNK];
    for off in (0..flat.len(k)).step_by(CHUNK) {
        let len = CHUNK.min(flat.len(k) - off);
        for t in 0..tasks {
            flat.tau(t, k, off, &mut taus[t * CHUNK..t * CHUNK + len]);
        }
        for i in 0..tasks {
            for j in i..tasks {
                let a = &taus[i * CHUNK..i * CHUNK + len];
                let b = &taus[j * CHUNK..j * CHUNK + len];
                gram[i * tasks + j] += a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>();
            }
        }
    }
    let norm = |i: usize| libm::sqrt(gram[i * tasks + i]).max(1e-6);
    let mut c = 0.0;
    let mut pairs = 0usize;
    for i in 0..tasks {
        for j in i + 1..tasks {
            c += (gram[i * tasks + j] / (norm(i) * norm(j))).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    c /= pairs as f64;
    let den = 1.0 + (tasks as f64 - 1.0) * c;
    if den.abs() < 1e-12 {
        return Err(MergeError::Numerical {
            method: "model-stock",
            detail: format!("tensor `{}`: the mean task-vector cosine {c} makes 1 + (T-1) c zero", flat.names[k]),
        });
    }
    Ok(tasks as f64 * c / den)
}

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model-stock"
    }
    fn summary(&self) -> &'static str {
        "Model Stock: per tensor interpolate base and model average by t = T c / (1 + (T-1) c), c the mean task-vector cosine"
    }
    fn params(&self) -> &'static [ParamSpec] {
        &[]
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, _params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 2, "at least 2 fine-tuned models")?;
        super::common::reject_weights(self.name(), input)?;
        let flat = Flat::new(input);
        let tasks = flat.tasks();
        let mut values = Vec::with_capacity(flat.names.len());
        for k in 0..flat.names.len() {
            let t = ratio(&flat, k)? as f32;
            let inv = 1.0 / tasks as f32;
            let base = &flat.base[k];
            let mut out = vec![0.0f32; flat.len(k)];
            for m in &flat.models {
                for (o, &x) in out.iter_mut().zip(m[k].iter()) {
                    *o += x;
                }
            }
            for (o, &b) in out.iter_mut().zip(base.iter()) {
                *o = t * (*o * inv) + (1.0 - t) * b;
            }
            values.push(out);
        }
        Ok(MergeOutput::Single(flat.output(values)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn run(
        base: &crate::tensor::ParamSet<'static>,
        m: &[crate::tensor::ParamSet<'static>],
    ) -> crate::tensor::ParamSet<'static> {
        let names = names(base);
        let input = MergeInput { base, models: m, model_weights: None, names: &names, seed: 0 };
        ModelStock.merge(&input, &Params::new()).unwrap().single().unwrap()
    }

    #[test]
    fn identical_task_vectors_give_the_model() {
        let base = set(&[("a", &[3], &[1.0, 2.0, 3.0])]);
        let m = [set(&[("a", &[3], &[2.0, 2.5, 2.0])]), set(&[("a", &[3], &[2.0, 2.5, 2.0])])];
        assert_close(&values(&run(&base, &m), "a"), &[2.0, 2.5, 2.0], 1e-6);
    }

    #[test]
    fn hand_computed() {
        // Orthogonal task vectors: c = 0, t = 0 -> base. 60 degrees: c = 0.5, T = 2: t = 1/1.5 = 2/3.
        let base = set(&[("a", &[2], &[0.0, 0.0]), ("b", &[2], &[1.0, 1.0])]);
        let h = libm::sqrtf(3.0) / 2.0;
        let m = [
            set(&[("a", &[2], &[1.0, 0.0]), ("b", &[2], &[2.0, 1.0])]),
            set(&[("a", &[2], &[0.0, 3.0]), ("b", &[2], &[1.5, 1.0 + h])]),
        ];
        let out = run(&base, &m);
        assert_close(&values(&out, "a"), &[0.0, 0.0], 1e-6);
        let t = 2.0 / 3.0;
        assert_close(&values(&out, "b"), &[1.0 + t * 0.75, 1.0 + t * h / 2.0], 1e-6);
    }

    #[test]
    fn one_model_is_refused() {
        let base = set(&[("a", &[1], &[0.0])]);
        let m = [set(&[("a", &[1], &[1.0])])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        assert!(matches!(ModelStock.merge(&input, &Params::new()), Err(MergeError::ModelCount { .. })));
    }
}
