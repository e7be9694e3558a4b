//! `breadcrumbs`: per tensor and task, drop the top gamma = 1% of the task vector by magnitude and
//! the smallest entries so that a density of 0.9 remains (mergekit's `magnitude_outliers`), then
//! task arithmetic with lambda 0.3.

use alloc::vec::Vec;

use super::common::{Flat, TaskVectors, density, drop_rate, finite, key_at_rank, mag_key, raw_weights, weighted_sum};
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, require_models};

pub struct Breadcrumbs;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "gamma", default: "0.01", help: "fraction of the largest entries dropped per tensor, in [0, 1)" },
    ParamSpec { name: "density", default: "0.9", help: "fraction of entries kept per tensor, in (0, 1]" },
    ParamSpec { name: "lambda", default: "0.3", help: "scale of the summed sparse task vectors (finite)" },
];

/// Kept ascending magnitude ranks [lo, hi) per tensor, as magnitude keys (hi None: up to the top).
type Band = Option<(u64, Option<u64>)>;

struct BreadcrumbVectors<'f, 's> {
    flat: &'f Flat<'s>,
    bands: Vec<Vec<Band>>,
}

impl TaskVectors for BreadcrumbVectors<'_, '_> {
    fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
        self.flat.tau(t, k, off, out);
        match self.bands[t][k] {
            None => out.iter_mut().for_each(|x| *x = 0.0),
            Some((lo, hi)) => {
                for (i, x) in out.iter_mut().enumerate() {
                    let key = mag_key(*x, off + i);
                    if key < lo || hi.is_some_and(|h| key >= h) {
                        *x = 0.0;
                    }
                }
            }
        }
    }
}

/// The ranks mergekit keeps for `n` entries: [n_bot, n_bot + floor(density n)).
pub(crate) fn kept_ranks(n: usize, density: f64, gamma: f64) -> (usize, usize) {
    let target = libm::floor(density * n as f64) as usize;
    let top = libm::floor(gamma * n as f64) as usize;
    let bot = n.saturating_sub(target + top);
    (bot, bot + target)
}

impl MergeMethod for Breadcrumbs {
    fn name(&self) -> &'static str {
        "breadcrumbs"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["model-breadcrumbs"]
    }
    fn summary(&self) -> &'static str {
        "Model Breadcrumbs: per tensor drop the top 1% and the smallest entries (density 0.9 kept), task arithmetic lambda 0.3"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        let gamma = drop_rate(params, "gamma", 0.01)?;
        let dens = density(params, "density", 0.9)?;
        let lambda = finite(params, "lambda", 0.3)?;
        let coef: Vec<f32> = raw_weights(input)?.iter().map(|w| lambda * w).collect();
        let flat = Flat::new(input);
        let mut scratch = Vec::new();
        let mut tau = Vec::new();
        let bands = (0..flat.tasks())
            .map(|t| {
                (0..flat.names.len())
                    .map(|k| {
                        let n = flat.len(k);
                        let (lo, hi) = kept_ranks(n, dens, gamma);
                        if lo == hi {
                            return None;
                        }
                        tau.resize(n, 0.0);
                        flat.tau(t, k, 0, &mut tau);
                        let lo_key = key_at_rank(&tau, lo, &mut scratch);
                        let hi_key = (hi < n).then(|| key_at_rank(&tau, hi, &mut scratch));
                        Some((lo_key, hi_key))
                    })
                    .collect()
            })
            .collect();
        let src = BreadcrumbVectors { flat: &flat, bands };
        Ok(MergeOutput::Single(weighted_sum(&flat, &src, &coef)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn ranks_follow_mergekit() {
        assert_eq!(kept_ranks(100, 0.9, 0.01), (9, 99));
        assert_eq!(kept_ranks(100, 1.0, 0.01), (0, 100));
        assert_eq!(kept_ranks(10, 0.5, 0.2), (3, 8));
    }

    #[test]
    fn hand_computed() {
        let base = set(&[("a", &[10], &[0.0; 10]), ("b", &[2], &[1.0, 1.0])]);
        let tau1 = [0.5, -9.0, 0.1, 3.0, -0.2, 4.0, 0.3, -5.0, 6.0, 0.05];
        let m = [
            set(&[("a", &[10], &tau1), ("b", &[2], &[2.0, 3.0])]),
            set(&[("a", &[10], &[1.0; 10]), ("b", &[2], &[1.0, 0.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("gamma", "0.2");
        p.set("density", "0.5");
        p.set("lambda", "1");
        let out = Breadcrumbs.merge(&input, &p).unwrap().single().unwrap();
        // a, task 1: ascending abs 0.05 0.1 0.2 0.3 0.5 3 4 5 6 9 -> keep ranks 3..8: 0.3 0.5 3 4 5.
        // a, task 2: all equal: ties broken by index (lower index ranks higher), ranks 3..8 are
        // indices 6, 5, 4, 3, 2. b (n = 2): floor(0.5*2) = 1 kept, top floor(0.4) = 0, so rank 1
        // (the largest): task 1 keeps 2 of [1, 2], task 2 keeps -1 of [0, -1].
        assert_close(&values(&out, "a"), &[0.5, 0.0, 1.0, 4.0, 1.0, 5.0, 1.3, -5.0, 0.0, 0.0], 1e-6);
        assert_close(&values(&out, "b"), &[1.0, 1.0 + 2.0 - 1.0], 1e-6);
    }
}
