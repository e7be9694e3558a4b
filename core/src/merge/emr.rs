//! `emr` (EMR-Merging): gamma = sgn(sum_t tau_t) (zero -> -1); M_t = (tau_t * gamma > 0);
//! tau_uni = gamma * max_t abs(M_t . tau_t); s_t = (sum over tensors of mean abs(tau_t)) /
//! (sum over tensors of mean abs(M_t . tau_uni)); task t: theta0 + s_t * M_t . tau_uni.
//! The output keeps tau_uni once, one bit per entry and task, and T scales.

use alloc::vec;
use alloc::vec::Vec;

use super::common::{Base, BitMask, CHUNK, Flat};
use super::consensus::for_each_chunk;
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, PerTaskModel, require_models};
use crate::tensor::ParamSet;

pub struct Emr;

struct EmrModel<'s> {
    base: Base<'s>,
    uni: Vec<Vec<f32>>,
    masks: Vec<BitMask>,
    scales: Vec<f32>,
}

impl EmrModel<'_> {
    /// The rescaling factors s_t.
    #[cfg(test)]
    fn scales(&self) -> &[f32] {
        &self.scales
    }
}

impl PerTaskModel for EmrModel<'_> {
    fn num_tasks(&self) -> usize {
        self.masks.len()
    }
    fn task(&self, t: usize) -> ParamSet<'static> {
        let (m, s) = (&self.masks[t], self.scales[t]);
        self.base.materialise(|k, g, i| if m.get(g) { s * self.uni[k][i] } else { 0.0 })
    }
}

fn emr<'s>(input: &MergeInput<'s, '_>) -> EmrModel<'s> {
    let flat = Flat::new(input);
    let tasks = flat.tasks();
    let offsets = flat.offsets();
    let mut uni: Vec<Vec<f32>> = (0..flat.names.len()).map(|k| vec![0.0; flat.len(k)]).collect();
    let mut masks: Vec<BitMask> = (0..tasks).map(|_| BitMask::new(flat.total())).collect();
    // Per task and tensor: sum abs(tau_t) and sum abs(M_t . tau_uni).
    let mut abs_tau = vec![vec![0.0f64; flat.names.len()]; tasks];
    let mut abs_uni = vec![vec![0.0f64; flat.names.len()]; tasks];
    for_each_chunk(&flat, |k, off, taus, sum| {
        let out = &mut uni[k][off..off + sum.len()];
        for (i, (&s, u)) in sum.iter().zip(out.iter_mut()).enumerate() {
            let gamma = if s > 0.0 { 1.0f32 } else { -1.0 };
            let mut mx = 0.0f32;
            for t in 0..tasks {
                let x = taus[t * CHUNK + i];
                if x * gamma > 0.0 {
                    mx = mx.max(x.abs());
                }
            }
            *u = gamma * mx;
        }
        for t in 0..tasks {
            let (mut a, mut b) = (0.0f64, 0.0f64);
            for (i, &u) in out.iter().enumerate() {
                let x = taus[t * CHUNK + i];
                a += f64::from(x.abs());
                if x * u > 0.0 {
                    // x * gamma > 0 and u = gamma * max != 0 share the sign of gamma.
                    masks[t].set(offsets[k] + off + i);
                    b += f64::from(u.abs());
                }
            }
            abs_tau[t][k] += a;
            abs_uni[t][k] += b;
        }
    });
    let scales = (0..tasks)
        .map(|t| {
            let mut num = 0.0f64;
            let mut den = 0.0f64;
            for k in 0..flat.names.len() {
                let n = flat.len(k).max(1) as f64;
                num += abs_tau[t][k] / n;
                den += abs_uni[t][k] / n;
            }
            if den > 0.0 { (num / den) as f32 } else { 1.0 }
        })
        .collect();
    EmrModel { base: Base::of(flat), uni, masks, scales }
}

impl MergeMethod for Emr {
    fn name(&self) -> &'static str {
        "emr"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["emr-merging"]
    }
    fn summary(&self) -> &'static str {
        "EMR-Merging: unified task vector (elected sign, max magnitude) with per-task masks and rescalers (task id needed)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        &[]
    }
    fn per_task(&self) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, _params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        super::common::reject_weights(self.name(), input)?;
        Ok(MergeOutput::PerTask(alloc::boxed::Box::new(emr(input))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn one_task_is_reconstructed() {
        let base = set(&[("a", &[4], &[1.0, -2.0, 0.5, 0.0]), ("b", &[2], &[0.25, 4.0])]);
        let m = [set(&[("a", &[4], &[1.5, -3.0, 0.5, -1.0]), ("b", &[2], &[0.0, 8.0])])];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let model = emr(&input);
        assert_eq!(model.scales(), &[1.0]);
        let t0 = model.task(0);
        for n in ["a", "b"] {
            assert_close(&values(&t0, n), &values(&m[0], n), 0.0);
        }
    }

    #[test]
    fn hand_computed() {
        // One tensor "a" (zero base) and one "b" (base 1), 2 tasks.
        let base = set(&[("a", &[3], &[0.0, 0.0, 0.0]), ("b", &[1], &[1.0])]);
        let m = [
            set(&[("a", &[3], &[2.0, -1.0, 1.0]), ("b", &[1], &[2.0])]),
            set(&[("a", &[3], &[-1.0, -3.0, -1.0]), ("b", &[1], &[1.0])]),
        ];
        // a: sums [1, -4, 0] -> gamma [+, -, -]; M_0 = [1, 1, 0], M_1 = [0, 1, 1];
        // tau_uni = [2, -3, -1]. b: sum 1 -> +; M_0 = [1], M_1 = [0]; tau_uni = [1].
        // s_0 = (4/3 + 1) / ((2 + 3)/3 + 1) = (7/3) / (8/3) = 7/8;
        // s_1 = (5/3 + 0) / ((3 + 1)/3 + 0) = 5/4.
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let model = emr(&input);
        assert_close(model.scales(), &[0.875, 1.25], 1e-6);
        let t0 = model.task(0);
        assert_close(&values(&t0, "a"), &[1.75, -2.625, 0.0], 1e-6);
        assert_close(&values(&t0, "b"), &[1.875], 1e-6);
        let t1 = model.task(1);
        assert_close(&values(&t1, "a"), &[0.0, -3.75, -1.25], 1e-6);
        assert_close(&values(&t1, "b"), &[1.0], 1e-6);
        assert!(matches!(Emr.merge(&input, &Params::new()), Ok(MergeOutput::PerTask(_))));
    }
}
