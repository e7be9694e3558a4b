//! `consensus` (TALL-masks' Consensus Merging): tau_MTL = sum_t tau_t; mask_t = abs(tau_t) >
//! l * abs(tau_MTL - tau_t); keep the entries selected by >= k task masks; theta0 + alpha *
//! (mask . tau_MTL).

use alloc::vec;
use alloc::vec::Vec;

use super::common::{CHUNK, Flat, finite};
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, check_range, require_models};

pub struct Consensus;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "l", default: "0.6", help: "TALL mask threshold lambda_t (>= 0)" },
    ParamSpec { name: "k", default: "2", help: "minimum number of task masks that must select an entry" },
    ParamSpec { name: "alpha", default: "0.3", help: "scale of the masked multi-task vector (finite)" },
];

/// The TALL mask threshold `l` (finite, >= 0).
pub(crate) fn tall_l(params: &Params) -> Result<f32, MergeError> {
    let l = finite(params, "l", 0.6)?;
    check_range("l", f64::from(l), l >= 0.0, ">= 0")?;
    Ok(l)
}

/// Visit every chunk: `f(k, off, taus, mtl)` with taus[t * CHUNK + i] = tau_t and mtl[i] = sum_t.
pub(crate) fn for_each_chunk(flat: &Flat<'_>, mut f: impl FnMut(usize, usize, &[f32], &[f32])) {
    let tasks = flat.tasks();
    let mut taus = vec![0.0f32; tasks * CHUNK];
    let mut mtl = vec![0.0f32; CHUNK];
    for k in 0..flat.names.len() {
        for off in (0..flat.len(k)).step_by(CHUNK) {
            let len = CHUNK.min(flat.len(k) - off);
            mtl[..len].iter_mut().for_each(|x| *x = 0.0);
            for t in 0..tasks {
                let b = &mut taus[t * CHUNK..t * CHUNK + len];
                flat.tau(t, k, off, b);
                for (m, &x) in mtl[..len].iter_mut().zip(b.iter()) {
                    *m += x;
                }
            }
            f(k, off, &taus, &mtl[..len]);
        }
    }
}

impl MergeMethod for Consensus {
    fn name(&self) -> &'static str {
        "consensus"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["consensus-merging", "consensus-ta"]
    }
    fn summary(&self) -> &'static str {
        "Consensus: keep summed task-vector entries that >= k=2 TALL masks (l=0.6) select; theta0 + 0.3 * kept"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn tensorwise(&self, _params: &Params) -> bool {
        true
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        super::common::reject_weights(self.name(), input)?;
        let l = tall_l(params)?;
        let min = params.usize_or("k", 2)?;
        let alpha = finite(params, "alpha", 0.3)?;
        let flat = Flat::new(input);
        let tasks = flat.tasks();
        let mut values: Vec<Vec<f32>> = (0..flat.names.len()).map(|k| vec![0.0; flat.len(k)]).collect();
        for_each_chunk(&flat, |k, off, taus, mtl| {
            let base = &flat.base[k][off..off + mtl.len()];
            let out = &mut values[k][off..off + mtl.len()];
            for i in 0..mtl.len() {
                let votes = (0..tasks)
                    .filter(|&t| {
                        let x = taus[t * CHUNK + i];
                        x.abs() > l * (mtl[i] - x).abs()
                    })
                    .count();
                out[i] = if votes >= min { base[i] + alpha * mtl[i] } else { base[i] };
            }
        });
        Ok(MergeOutput::Single(flat.output(values)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn hand_computed() {
        let base = set(&[("a", &[3], &[0.0, 0.0, 0.0])]);
        let m = [
            set(&[("a", &[3], &[1.0, 1.0, 0.1])]),
            set(&[("a", &[3], &[1.0, -1.0, 0.1])]),
            set(&[("a", &[3], &[1.0, 0.2, 5.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        let mut p = Params::new();
        p.set("alpha", "1");
        let out = Consensus.merge(&input, &p).unwrap().single().unwrap();
        // Entry 0: mtl 3; each |1| > 0.6 * 2: no (1 < 1.2): 0 votes -> dropped.
        // Entry 1: mtl 0.2; |1| > 0.6*0.8 yes, |-1| > 0.6*1.2 yes, |0.2| > 0 yes: 3 votes -> 0.2.
        // Entry 2: mtl 5.2; 0.1 > 0.6*5.1 no (twice); 5 > 0.6*0.2 yes: 1 vote -> dropped.
        assert_close(&values(&out, "a"), &[0.0, 0.2, 0.0], 1e-6);
        p.set("k", "1");
        p.set("l", "0.4");
        let out = Consensus.merge(&input, &p).unwrap().single().unwrap();
        // l = 0.4: entry 0: 1 > 0.8 yes (3 votes) -> 3; entry 2: 1 vote -> 5.2.
        assert_close(&values(&out, "a"), &[3.0, 0.2, 5.2], 1e-6);
    }
}
