//! `tall-masks`: per task t, theta0 + mask_t . tau_MTL with tau_MTL = sum_t tau_t and
//! mask_t = abs(tau_t) > l * abs(tau_MTL - tau_t), l = 0.6. Needs the task identity at inference;
//! the output keeps tau_MTL once plus one bit per entry and task.

use alloc::vec;
use alloc::vec::Vec;

use super::common::{Base, BitMask, CHUNK, Flat};
use super::consensus::{for_each_chunk, tall_l};
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, PerTaskModel, require_models};
use crate::tensor::ParamSet;

pub struct TallMasks;

const PARAMS: &[ParamSpec] = &[ParamSpec { name: "l", default: "0.6", help: "mask threshold lambda_t (>= 0)" }];

/// tau_MTL and the per-task masks.
struct TallModel<'s> {
    base: Base<'s>,
    mtl: Vec<Vec<f32>>,
    masks: Vec<BitMask>,
}

impl PerTaskModel for TallModel<'_> {
    fn num_tasks(&self) -> usize {
        self.masks.len()
    }
    fn task(&self, t: usize) -> ParamSet<'static> {
        let m = &self.masks[t];
        self.base.materialise(|k, g, i| if m.get(g) { self.mtl[k][i] } else { 0.0 })
    }
}

impl MergeMethod for TallMasks {
    fn name(&self) -> &'static str {
        "tall-masks"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["tall-mask", "tallmasks"]
    }
    fn summary(&self) -> &'static str {
        "TALL masks: per task theta0 + mask_t . sum of task vectors, mask_t = |tau_t| > 0.6 |tau_MTL - tau_t| (task id needed)"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn per_task(&self) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        super::common::reject_weights(self.name(), input)?;
        let l = tall_l(params)?;
        let flat = Flat::new(input);
        let tasks = flat.tasks();
        let mut mtl_all: Vec<Vec<f32>> = (0..flat.names.len()).map(|k| vec![0.0; flat.len(k)]).collect();
        let mut masks: Vec<BitMask> = (0..tasks).map(|_| BitMask::new(flat.total())).collect();
        let offsets = flat.offsets();
        for_each_chunk(&flat, |k, off, taus, mtl| {
            mtl_all[k][off..off + mtl.len()].copy_from_slice(mtl);
            for (t, mask) in masks.iter_mut().enumerate() {
                for (i, &m) in mtl.iter().enumerate() {
                    let x = taus[t * CHUNK + i];
                    if x.abs() > l * (m - x).abs() {
                        mask.set(offsets[k] + off + i);
                    }
                }
            }
        });
        let base = Base::of(flat);
        Ok(MergeOutput::PerTask(alloc::boxed::Box::new(TallModel { base, mtl: mtl_all, masks })))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn hand_computed() {
        let base = set(&[("a", &[3], &[0.0, 0.0, 0.0]), ("b", &[1], &[1.0])]);
        let m = [
            set(&[("a", &[3], &[1.0, 1.0, 0.1]), ("b", &[1], &[2.0])]),
            set(&[("a", &[3], &[1.0, -1.0, 0.1]), ("b", &[1], &[1.0])]),
            set(&[("a", &[3], &[1.0, 0.2, 5.0]), ("b", &[1], &[1.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let MergeOutput::PerTask(model) = TallMasks.merge(&input, &Params::new()).unwrap() else {
            panic!("tall-masks returns per-task weights")
        };
        assert_eq!(model.num_tasks(), 3);
        // mtl: a = [3, 0.2, 5.2], b = [1]. Masks (l = 0.6): task 0: [no, yes, no], b: 1 > 0 yes;
        // task 1: [no, yes, no], b: 0 > 0.6 no; task 2: [no, yes, yes], b: no.
        let t0 = model.task(0);
        assert_close(&values(&t0, "a"), &[0.0, 0.2, 0.0], 1e-6);
        assert_close(&values(&t0, "b"), &[2.0], 1e-6);
        let t1 = model.task(1);
        assert_close(&values(&t1, "a"), &[0.0, 0.2, 0.0], 1e-6);
        assert_close(&values(&t1, "b"), &[1.0], 1e-6);
        let t2 = model.task(2);
        assert_close(&values(&t2, "a"), &[0.0, 0.2, 5.2], 1e-6);
    }
}
