//! `dare`: drop each task-vector entry with probability p (keep where u > p, u ~ U(0,1] from the
//! ChaCha stream `(seed, "dare", task index, tensor name)`), rescale the kept entries, then merge
//! with task arithmetic (lambda 0.3) or the full TIES (lambda 0.5).

use alloc::vec::Vec;

use rand_chacha::rand_core::Rng;

use super::common::{Flat, TaskVectors, drop_rate, finite, raw_weights, ties_on, weighted_sum_on};
use super::executor::{Executor, Sequential};
use super::{MergeError, MergeInput, MergeMethod, MergeOutput, ParamSpec, Params, require_models};

pub struct Dare;

const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "p", default: "0.5", help: "drop probability, in [0, 1)" },
    ParamSpec {
        name: "base",
        default: "task-arithmetic",
        help: "task-arithmetic or ties (TIES's k, aggregate, scope apply)",
    },
    ParamSpec {
        name: "rescale",
        default: "inverse",
        help: "inverse (times 1/(1-p)) or l1 (mergekit: keep each tensor's L1 norm)",
    },
    ParamSpec { name: "lambda", default: "0.3", help: "scale of the merged task vector; 0.5 when base=ties" },
    ParamSpec { name: "k", default: "0.2", help: "base=ties: fraction kept by the TIES trim" },
    ParamSpec { name: "aggregate", default: "dis-sum", help: "base=ties: dis-sum or dis-mean" },
    ParamSpec { name: "scope", default: "global", help: "base=ties: global or tensor trim" },
];

/// DARE-dropped task vectors, generated chunk by chunk from seekable streams.
pub(crate) struct DareVectors<'f, 's> {
    flat: &'f Flat<'s>,
    p: f64,
    seed: u64,
    /// `scale[t][k]`: the factor applied to the kept entries of tensor k of task t.
    scale: Vec<Vec<f32>>,
}

impl DareVectors<'_, '_> {
    /// The dropped, unscaled entries.
    fn fill_unscaled(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
        self.flat.tau(t, k, off, out);
        if self.p == 0.0 {
            return;
        }
        let mut rng =
            crate::rng::stream(self.seed, &[b"dare", &(t as u64).to_le_bytes(), self.flat.names[k].as_bytes()]);
        rng.set_word_pos(off as u128);
        for x in out.iter_mut() {
            // u in (0, 1]: 24 random bits, plus one.
            let u = f64::from((rng.next_u32() >> 8) + 1) * (1.0 / 16_777_216.0);
            if u <= self.p {
                *x = 0.0;
            }
        }
    }
}

impl TaskVectors for DareVectors<'_, '_> {
    fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
        self.fill_unscaled(t, k, off, out);
        let s = self.scale[t][k];
        if s != 1.0 {
            out.iter_mut().for_each(|x| *x *= s);
        }
    }
}

impl MergeMethod for Dare {
    fn name(&self) -> &'static str {
        "dare"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["dare-linear", "dare-task-arithmetic"]
    }
    fn summary(&self) -> &'static str {
        "DARE: drop task-vector entries with p=0.5, rescale by 1/(1-p), then task arithmetic (lambda 0.3) or TIES"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    /// DARE's masks are drawn per (task, tensor); over TIES only with the per-tensor trim.
    fn tensorwise(&self, params: &Params) -> bool {
        params.get("base") != Some("ties") || params.get("scope") == Some("tensor")
    }
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError> {
        self.merge_on(input, params, &Sequential)
    }
    /// Each tensor a job on `exec` (the TIES pass or the weighted sum); bitwise the same result.
    fn merge_on<'s>(
        &self,
        input: &MergeInput<'s, '_>,
        params: &Params,
        exec: &dyn Executor,
    ) -> Result<MergeOutput<'s>, MergeError> {
        require_models(self.name(), input, 1, "at least 1 fine-tuned model")?;
        let p = drop_rate(params, "p", 0.5)?;
        let base = params.choice_or("base", &["task-arithmetic", "ties"], "task-arithmetic")?;
        let l1 = params.choice_or("rescale", &["inverse", "l1"], "inverse")? == "l1";
        let flat = Flat::new(input);
        let tasks = flat.tasks();
        let nk = flat.names.len();
        let mut src = DareVectors { flat: &flat, p, seed: input.seed, scale: alloc::vec![alloc::vec![1.0; nk]; tasks] };
        if l1 {
            let mut buf = alloc::vec![0.0f32; super::common::CHUNK];
            let mut scale = alloc::vec![alloc::vec![1.0f32; nk]; tasks];
            for (t, row) in scale.iter_mut().enumerate() {
                for (k, s) in row.iter_mut().enumerate() {
                    let (mut full, mut kept) = (0.0f64, 0.0f64);
                    for off in (0..flat.len(k)).step_by(buf.len()) {
                        let len = buf.len().min(flat.len(k) - off);
                        flat.tau(t, k, off, &mut buf[..len]);
                        full += buf[..len].iter().map(|x| f64::from(x.abs())).sum::<f64>();
                        src.fill_unscaled(t, k, off, &mut buf[..len]);
                        kept += buf[..len].iter().map(|x| f64::from(x.abs())).sum::<f64>();
                    }
                    if full >= 1e-7 && kept >= 1e-7 {
                        *s = (full / kept) as f32;
                    }
                }
            }
            src.scale = scale;
        } else {
            let s = (1.0 / (1.0 - p)) as f32;
            src.scale.iter_mut().for_each(|r| r.iter_mut().for_each(|x| *x = s));
        }
        let merged = if base == "ties" {
            super::common::reject_weights("dare (base=ties)", input)?;
            let opt = super::ties::options(params, 0.5)?;
            ties_on(&flat, &src, &opt, exec)
        } else {
            let lambda = finite(params, "lambda", 0.3)?;
            let coef: Vec<f32> = raw_weights(input)?.iter().map(|w| lambda * w).collect();
            weighted_sum_on(&flat, &src, &coef, exec)
        };
        Ok(MergeOutput::Single(merged))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{TaskArithmetic, Ties};
    use super::*;
    use crate::tensor::ParamSet;

    fn inputs(n: usize) -> (ParamSet<'static>, [ParamSet<'static>; 2]) {
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1).collect();
        let m1: Vec<f32> = b.iter().enumerate().map(|(i, x)| x + ((i * 13 % 11) as f32 - 5.0) * 0.01).collect();
        let m2: Vec<f32> = b.iter().enumerate().map(|(i, x)| x + ((i * 7 % 5) as f32 - 2.0) * 0.02).collect();
        let h = n / 2;
        let base = set(&[("a", &[h], &b[..h]), ("b", &[n - h], &b[h..])]);
        let m = [
            set(&[("a", &[h], &m1[..h]), ("b", &[n - h], &m1[h..])]),
            set(&[("a", &[h], &m2[..h]), ("b", &[n - h], &m2[h..])]),
        ];
        (base, m)
    }

    fn run(
        method: &dyn MergeMethod,
        base: &ParamSet<'static>,
        m: &[ParamSet<'static>],
        kv: &[(&str, &str)],
        seed: u64,
    ) -> ParamSet<'static> {
        let names = names(base);
        let input = MergeInput { base, models: m, model_weights: None, names: &names, seed };
        let mut p = Params::new();
        for (k, v) in kv {
            p.set(*k, *v);
        }
        method.merge(&input, &p).unwrap().single().unwrap()
    }

    #[test]
    fn p_zero_equals_base_method() {
        let (base, m) = inputs(20_000);
        let d = run(&Dare, &base, &m, &[("p", "0")], 1);
        let ta = run(&TaskArithmetic, &base, &m, &[], 0);
        let d2 = run(&Dare, &base, &m, &[("p", "0"), ("base", "ties")], 1);
        let ti = run(&Ties, &base, &m, &[("lambda", "0.5")], 0);
        for n in ["a", "b"] {
            assert_close(&values(&d, n), &values(&ta, n), 0.0);
            assert_close(&values(&d2, n), &values(&ti, n), 0.0);
        }
    }

    /// Each kept entry equals base + lambda/(1-p) * tau, dropped entries are base; the kept share is
    /// near 1-p; the masks depend on the seed only through the documented stream.
    #[test]
    fn drops_and_rescales() {
        let (base, m) = inputs(40_000);
        let one = &m[..1];
        let out = run(&Dare, &base, one, &[("p", "0.3"), ("lambda", "1")], 5);
        let mut kept = 0usize;
        let mut total = 0usize;
        for n in ["a", "b"] {
            let (o, b, x) = (values(&out, n), values(&base, n), values(&one[0], n));
            for i in 0..o.len() {
                let tau = x[i] - b[i];
                if tau == 0.0 {
                    continue;
                }
                total += 1;
                if o[i] != b[i] {
                    kept += 1;
                    let want = b[i] + tau * (1.0 / 0.7f64) as f32;
                    assert!((o[i] - want).abs() < 1e-6, "{n}[{i}]: {} vs {}", o[i], want);
                }
            }
        }
        let share = kept as f64 / total as f64;
        assert!((share - 0.7).abs() < 0.01, "kept share {share}");
        // The mask of tensor "a" follows the documented stream: first entry kept iff u > p.
        let mut rng = crate::rng::stream(5, &[b"dare", &0u64.to_le_bytes(), b"a"]);
        let mut changed = 0;
        let (o, b) = (values(&out, "a"), values(&base, "a"));
        let x = values(&one[0], "a");
        for i in 0..100 {
            let u = f64::from((rng.next_u32() >> 8) + 1) / 16_777_216.0;
            let tau_nonzero = x[i] != b[i];
            assert_eq!(u > 0.3 && tau_nonzero, o[i] != b[i], "entry {i}");
            changed += usize::from(o[i] != b[i]);
        }
        assert!(changed > 0);
        // Same seed: bitwise same; other seed: other masks.
        let again = run(&Dare, &base, one, &[("p", "0.3"), ("lambda", "1")], 5);
        let other = run(&Dare, &base, one, &[("p", "0.3"), ("lambda", "1")], 6);
        assert_eq!(values(&again, "a"), values(&out, "a"));
        assert_ne!(values(&other, "a"), values(&out, "a"));
    }

    #[test]
    fn l1_rescale_keeps_the_l1_norm() {
        let (base, m) = inputs(10_000);
        let one = &m[..1];
        let out = run(&Dare, &base, one, &[("p", "0.6"), ("lambda", "1"), ("rescale", "l1")], 2);
        for n in ["a", "b"] {
            let (o, b, x) = (values(&out, n), values(&base, n), values(&one[0], n));
            let l1_out: f64 = o.iter().zip(&b).map(|(o, b)| f64::from((o - b).abs())).sum();
            let l1_in: f64 = x.iter().zip(&b).map(|(x, b)| f64::from((x - b).abs())).sum();
            assert!((l1_out / l1_in - 1.0).abs() < 1e-4, "{n}: {l1_out} vs {l1_in}");
        }
    }

    #[test]
    fn p_out_of_range_is_named() {
        let (base, m) = inputs(10);
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 0 };
        for bad in ["1", "-0.1"] {
            let mut p = Params::new();
            p.set("p", bad);
            let e = Dare.merge(&input, &p).err().unwrap();
            assert!(matches!(&e, MergeError::OutOfRange { param, .. } if param == "p"), "{e}");
        }
    }
}
