//! Shared machinery of the data-free methods: flat views of the inputs, task-vector sources that
//! produce chunks of tau_t on demand (plain, DARE-dropped, breadcrumbs-masked), and the task
//! arithmetic and TIES kernels that run over those sources chunk by chunk, so that no method keeps
//! a full copy of every task vector in memory.

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use ndarray::{ArrayD, IxDyn};

use super::{MergeError, MergeInput, Params, check_range};
use crate::tensor::{ParamSet, Tensor};

/// Entries per chunk: small enough that T chunks stay in L1/L2, large enough to amortise calls.
pub(crate) const CHUNK: usize = 4096;

/// The entries of a tensor in standard (row-major) order, borrowed when the layout allows it.
pub(crate) fn flat<'t>(t: &'t Tensor<'_>) -> Cow<'t, [f32]> {
    match t.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.iter().copied().collect()),
    }
}

/// An owned tensor of `shape` from row-major values.
pub(crate) fn array(shape: &[usize], values: Vec<f32>) -> ArrayD<f32> {
    ArrayD::from_shape_vec(IxDyn(shape), values).expect("value count matches the shape")
}

/// The merge input as flat slices: `base[k]`, `models[t][k]` for tensor `k` of `names`.
pub(crate) struct Flat<'s> {
    pub names: &'s [String],
    pub shapes: Vec<Vec<usize>>,
    pub base: Vec<Cow<'s, [f32]>>,
    pub models: Vec<Vec<Cow<'s, [f32]>>>,
}

impl<'s> Flat<'s> {
    pub fn new(input: &MergeInput<'s, '_>) -> Self {
        let names = input.names;
        let shapes = names.iter().map(|n| input.base(n).shape().to_vec()).collect();
        let base = names.iter().map(|n| flat(input.base(n))).collect();
        let models = (0..input.tasks()).map(|t| names.iter().map(|n| flat(input.model(t, n))).collect()).collect();
        Flat { names, shapes, base, models }
    }

    pub fn tasks(&self) -> usize {
        self.models.len()
    }

    pub fn len(&self, k: usize) -> usize {
        self.base[k].len()
    }

    /// Total entries over the merged tensors.
    pub fn total(&self) -> usize {
        self.base.iter().map(|b| b.len()).sum()
    }

    /// Start of each tensor in the global entry index (tensors concatenated in `names` order).
    pub fn offsets(&self) -> Vec<usize> {
        self.base
            .iter()
            .scan(0usize, |off, b| {
                let o = *off;
                *off += b.len();
                Some(o)
            })
            .collect()
    }

    /// tau_t of tensor `k`, entries `[off, off + out.len())`.
    #[inline]
    pub fn tau(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
        let b = &self.base[k][off..off + out.len()];
        let m = &self.models[t][k][off..off + out.len()];
        for ((o, &x), &y) in out.iter_mut().zip(m).zip(b) {
            *o = x - y;
        }
    }

    /// An owned output set from one row-major vector per tensor.
    pub fn output(&self, values: Vec<Vec<f32>>) -> ParamSet<'static> {
        let mut out = ParamSet::new();
        for ((name, shape), v) in self.names.iter().zip(&self.shapes).zip(values) {
            out.insert_owned(name.clone(), array(shape, v));
        }
        out
    }
}

/// The base tensors only, kept by per-task outputs to add their deltas to.
pub(crate) struct Base<'s> {
    names: &'s [String],
    shapes: Vec<Vec<usize>>,
    base: Vec<Cow<'s, [f32]>>,
}

impl<'s> Base<'s> {
    /// Keep the base of `flat`, dropping the views of the fine-tuned models.
    pub fn of(flat: Flat<'s>) -> Self {
        Base { names: flat.names, shapes: flat.shapes, base: flat.base }
    }

    /// theta0 + delta(k, g, i) for entry i of tensor k, whose global index is g.
    pub fn materialise(&self, delta: impl Fn(usize, usize, usize) -> f32) -> ParamSet<'static> {
        let mut out = ParamSet::new();
        let mut g = 0;
        for (k, b) in self.base.iter().enumerate() {
            let v: Vec<f32> = b.iter().enumerate().map(|(i, &x)| x + delta(k, g + i, i)).collect();
            g += b.len();
            out.insert_owned(self.names[k].clone(), array(&self.shapes[k], v));
        }
        out
    }
}

/// Something that produces (possibly sparsified) task vectors chunk by chunk.
pub(crate) trait TaskVectors {
    /// Write tau_t of tensor `k`, entries `[off, off + out.len())`, into `out`.
    fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]);
}

impl TaskVectors for Flat<'_> {
    fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
        self.tau(t, k, off, out)
    }
}

/// A finite float parameter.
pub(crate) fn finite(params: &Params, key: &str, default: f64) -> Result<f32, MergeError> {
    let v = params.f64_or(key, default)?;
    check_range(key, v, v.is_finite() && (v as f32).is_finite(), "a finite number")?;
    Ok(v as f32)
}

/// A fraction in (0, 1].
pub(crate) fn density(params: &Params, key: &str, default: f64) -> Result<f64, MergeError> {
    let v = params.f64_or(key, default)?;
    check_range(key, v, v > 0.0 && v <= 1.0, "in (0, 1]")?;
    Ok(v)
}

/// A fraction in [0, 1).
pub(crate) fn drop_rate(params: &Params, key: &str, default: f64) -> Result<f64, MergeError> {
    let v = params.f64_or(key, default)?;
    check_range(key, v, (0.0..1.0).contains(&v), "in [0, 1)")?;
    Ok(v)
}

/// A fraction in [0, 1].
pub(crate) fn unit(params: &Params, key: &str, default: f64) -> Result<f64, MergeError> {
    let v = params.f64_or(key, default)?;
    check_range(key, v, (0.0..=1.0).contains(&v), "in [0, 1]")?;
    Ok(v)
}

/// Per-model scale factors for task-vector sums: the raw `model_weights` (any finite value, as in
/// mergekit's `weight`), or 1 each.
pub(crate) fn raw_weights(input: &MergeInput<'_, '_>) -> Result<Vec<f32>, MergeError> {
    let t = input.tasks();
    match input.model_weights {
        None => Ok(vec![1.0; t]),
        Some(w) if w.len() != t => Err(MergeError::BadValue {
            param: "weight".into(),
            value: format!("{} weights for {} models", w.len(), t),
            expected: "one weight per fine-tuned model",
        }),
        Some(w) => match w.iter().find(|x| !x.is_finite()) {
            Some(bad) => {
                Err(MergeError::OutOfRange { param: "weight".into(), value: f64::from(*bad), allowed: "finite" })
            }
            None => Ok(w.to_vec()),
        },
    }
}

/// Refuse per-model weights for a method that has no use for them (rather than ignore them).
pub(crate) fn reject_weights(method: &'static str, input: &MergeInput<'_, '_>) -> Result<(), MergeError> {
    match input.model_weights {
        None => Ok(()),
        Some(_) => Err(MergeError::UnknownParam {
            method,
            param: "weight".into(),
            known: String::from(
                "no per-model weights; weight-average, task-arithmetic, dare and breadcrumbs take them",
            ),
        }),
    }
}

/// theta0 + sum_t coef_t * tau_t, with tau_t from `src`.
pub(crate) fn weighted_sum(flat: &Flat<'_>, src: &dyn TaskVectors, coef: &[f32]) -> ParamSet<'static> {
    let mut buf = vec![0.0f32; CHUNK];
    let mut values = Vec::with_capacity(flat.names.len());
    for k in 0..flat.names.len() {
        let n = flat.len(k);
        let mut out = vec![0.0f32; n];
        for (c, acc) in out.chunks_mut(CHUNK).enumerate() {
            let off = c * CHUNK;
            let buf = &mut buf[..acc.len()];
            for (t, &w) in coef.iter().enumerate() {
                src.fill(t, k, off, buf);
                for (a, &x) in acc.iter_mut().zip(buf.iter()) {
                    *a += w * x;
                }
            }
            for (a, &b) in acc.iter_mut().zip(&flat.base[k][off..off + buf.len()]) {
                *a += b;
            }
        }
        values.push(out);
    }
    flat.output(values)
}

/// Sort key of an entry for magnitude ranks: the bits of abs(x) (monotone for non-negative
/// floats) above, and the index (ties: the lower index ranks higher) below.
#[inline]
pub(crate) fn mag_key(x: f32, idx: usize) -> u64 {
    (u64::from(x.abs().to_bits()) << 32) | u64::from(u32::MAX - idx as u32)
}

/// The key of rank `r` (0-based, ascending) among the entries of `tau` (whole tensor).
pub(crate) fn key_at_rank(tau: &[f32], r: usize, scratch: &mut Vec<u64>) -> u64 {
    scratch.clear();
    scratch.extend(tau.iter().enumerate().map(|(i, &x)| mag_key(x, i)));
    *scratch.select_nth_unstable(r).1
}

/// How TIES trims: entries with abs >= a global threshold, or per tensor the top keys.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Scope {
    Global,
    Tensor,
}

/// How TIES aggregates the entries that agree with the elected sign.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Aggregate {
    Sum,
    Mean,
}

/// TIES options.
pub(crate) struct TiesOptions {
    pub k: f64,
    pub lambda: f32,
    pub aggregate: Aggregate,
    pub scope: Scope,
}

/// Per task: the global abs threshold (global scope) or per tensor the lowest kept key.
enum Trim {
    /// Keep abs >= threshold (threshold None: keep everything).
    Global(Vec<Option<f32>>),
    /// `keys[t][k]`: keep entries whose magnitude key is >= it (None: keep none).
    Tensor(Vec<Vec<Option<u64>>>),
}

impl Trim {
    #[inline]
    fn apply(&self, t: usize, k: usize, off: usize, buf: &mut [f32]) {
        match self {
            Trim::Global(thr) => {
                if let Some(thr) = thr[t] {
                    for x in buf.iter_mut() {
                        if x.abs() < thr {
                            *x = 0.0;
                        }
                    }
                }
            }
            Trim::Tensor(keys) => match keys[t][k] {
                None => buf.iter_mut().for_each(|x| *x = 0.0),
                Some(kmin) => {
                    for (i, x) in buf.iter_mut().enumerate() {
                        if mag_key(*x, off + i) < kmin {
                            *x = 0.0;
                        }
                    }
                }
            },
        }
    }
}

/// Global thresholds by a two-pass radix selection: a histogram of the top 16 bits of abs(x) per
/// task, then an exact selection inside the one bucket that holds the wanted rank. Entry rank
/// (1-based, ascending abs) d - floor(d k) is the threshold; when that is 0 everything is kept.
fn global_thresholds(flat: &Flat<'_>, src: &dyn TaskVectors, k: f64) -> Vec<Option<f32>> {
    let tasks = flat.tasks();
    let d = flat.total();
    let keep = libm::floor(d as f64 * k) as usize;
    let rank = d - keep.min(d); // 1-based rank of the threshold; 0 = keep all
    if rank == 0 {
        return vec![None; tasks];
    }
    let q = rank - 1;
    const BUCKETS: usize = 1 << 15;
    // u32 counts keep each task's table at 128 KiB (L2-resident); d < 2^32 entries per model.
    let mut hist = vec![0u32; tasks * BUCKETS];
    let mut buf = vec![0.0f32; CHUNK];
    for kk in 0..flat.names.len() {
        for off in (0..flat.len(kk)).step_by(CHUNK) {
            let len = CHUNK.min(flat.len(kk) - off);
            for t in 0..tasks {
                src.fill(t, kk, off, &mut buf[..len]);
                let h = &mut hist[t * BUCKETS..(t + 1) * BUCKETS];
                for x in &buf[..len] {
                    h[(x.abs().to_bits() >> 16) as usize] += 1;
                }
            }
        }
    }
    // The bucket of rank q per task, and q's rank inside it.
    let mut target = Vec::with_capacity(tasks);
    for t in 0..tasks {
        let h = &hist[t * BUCKETS..(t + 1) * BUCKETS];
        let mut cum = 0usize;
        let mut found = (BUCKETS - 1, 0usize, 0usize);
        for (b, &c) in h.iter().enumerate() {
            let c = c as usize;
            if cum + c > q {
                found = (b, q - cum, c);
                break;
            }
            cum += c;
        }
        target.push(found);
    }
    let mut members: Vec<Vec<u32>> = target.iter().map(|&(_, _, c)| Vec::with_capacity(c)).collect();
    for kk in 0..flat.names.len() {
        for off in (0..flat.len(kk)).step_by(CHUNK) {
            let len = CHUNK.min(flat.len(kk) - off);
            for t in 0..tasks {
                src.fill(t, kk, off, &mut buf[..len]);
                let b = target[t].0 as u32;
                for x in &buf[..len] {
                    let bits = x.abs().to_bits();
                    if bits >> 16 == b {
                        members[t].push(bits);
                    }
                }
            }
        }
    }
    members.iter_mut().zip(&target).map(|(m, &(_, r, _))| Some(f32::from_bits(*m.select_nth_unstable(r).1))).collect()
}

/// Per tensor, per task: keep exactly floor(k n) entries by magnitude (mergekit's `magnitude`).
fn tensor_keys(flat: &Flat<'_>, src: &dyn TaskVectors, k: f64) -> Vec<Vec<Option<u64>>> {
    let mut scratch = Vec::new();
    (0..flat.tasks())
        .map(|t| {
            (0..flat.names.len())
                .map(|kk| {
                    let n = flat.len(kk);
                    let keep = libm::floor(k * n as f64) as usize;
                    if keep == 0 {
                        return None;
                    }
                    let mut tau = vec![0.0f32; n];
                    src.fill(t, kk, 0, &mut tau);
                    Some(key_at_rank(&tau, n - keep, &mut scratch))
                })
                .collect()
        })
        .collect()
}

/// The TIES merge of the task vectors from `src`: trim, elect, disjoint merge, theta0 + lambda *
/// merged (see METHODS.md).
pub(crate) fn ties(flat: &Flat<'_>, src: &dyn TaskVectors, opt: &TiesOptions) -> ParamSet<'static> {
    let tasks = flat.tasks();
    let trim = match opt.scope {
        Scope::Global => Trim::Global(global_thresholds(flat, src, opt.k)),
        Scope::Tensor => Trim::Tensor(tensor_keys(flat, src, opt.k)),
    };
    let mut bufs = vec![0.0f32; tasks * CHUNK];
    let mut scratch = vec![0.0f32; 4 * CHUNK];
    let mut sign_total: i64 = 0;
    let mut undecided: Vec<(usize, usize)> = Vec::new();
    let mut values = Vec::with_capacity(flat.names.len());
    for kk in 0..flat.names.len() {
        let n = flat.len(kk);
        let mut out = vec![0.0f32; n];
        for (c, o) in out.chunks_mut(CHUNK).enumerate() {
            let off = c * CHUNK;
            let len = o.len();
            for t in 0..tasks {
                let b = &mut bufs[t * CHUNK..t * CHUNK + len];
                src.fill(t, kk, off, b);
                trim.apply(t, kk, off, b);
            }
            let base = &flat.base[kk][off..off + len];
            // Branch-free over entries (t outer, entries inner) so that the loops vectorise.
            let (sum, rest) = scratch.split_at_mut(CHUNK);
            let (asum, rest) = rest.split_at_mut(CHUNK);
            let (acc, cnt) = rest.split_at_mut(CHUNK);
            let (sum, asum, acc, cnt) = (&mut sum[..len], &mut asum[..len], &mut acc[..len], &mut cnt[..len]);
            sum.fill(0.0);
            asum.fill(0.0);
            acc.fill(0.0);
            cnt.fill(0.0);
            for t in 0..tasks {
                let b = &bufs[t * CHUNK..t * CHUNK + len];
                for ((s, a), &x) in sum.iter_mut().zip(asum.iter_mut()).zip(b) {
                    *s += x;
                    *a += x.abs();
                }
            }
            // The elected sign: +1, -1, or 0 for a zero sum (tensor scope: +1).
            let zero_sign = if opt.scope == Scope::Tensor { 1.0 } else { 0.0 };
            for (i, s) in sum.iter_mut().enumerate() {
                *s = if *s > 0.0 {
                    sign_total += 1;
                    1.0
                } else if *s < 0.0 {
                    sign_total -= 1;
                    -1.0
                } else {
                    if zero_sign == 0.0 && asum[i] > 0.0 {
                        undecided.push((kk, off + i));
                    }
                    zero_sign
                };
            }
            for t in 0..tasks {
                let b = &bufs[t * CHUNK..t * CHUNK + len];
                for (((a, c), &x), &e) in acc.iter_mut().zip(cnt.iter_mut()).zip(b).zip(sum.iter()) {
                    let keep = x * e > 0.0;
                    *a += if keep { x } else { 0.0 };
                    *c += if keep { 1.0 } else { 0.0 };
                }
            }
            match opt.aggregate {
                Aggregate::Sum => {
                    for ((o, &b), &a) in o.iter_mut().zip(base).zip(acc.iter()) {
                        *o = b + opt.lambda * a;
                    }
                }
                Aggregate::Mean => {
                    for (((o, &b), &a), &c) in o.iter_mut().zip(base).zip(acc.iter()).zip(cnt.iter()) {
                        *o = b + opt.lambda * (a / c.max(1.0));
                    }
                }
            }
        }
        values.push(out);
    }
    // Entries whose trimmed sum is exactly zero take the sign of the sum of the sign vector
    // (FusionBench: positive selects the positive entries, otherwise the negative ones).
    let mut one = vec![0.0f32; tasks];
    for (kk, i) in undecided {
        for (t, v) in one.iter_mut().enumerate() {
            src.fill(t, kk, i, core::slice::from_mut(v));
            trim.apply(t, kk, i, core::slice::from_mut(v));
        }
        let merged = disjoint(tasks, |t| one[t], sign_total > 0, opt.aggregate);
        values[kk][i] = flat.base[kk][i] + opt.lambda * merged;
    }
    flat.output(values)
}

#[inline]
fn disjoint(tasks: usize, v: impl Fn(usize) -> f32, positive: bool, agg: Aggregate) -> f32 {
    let mut s = 0.0f32;
    let mut count = 0u32;
    for t in 0..tasks {
        let x = v(t);
        if (positive && x > 0.0) || (!positive && x < 0.0) {
            s += x;
            count += 1;
        }
    }
    match agg {
        Aggregate::Sum => s,
        Aggregate::Mean => s / count.max(1) as f32,
    }
}

/// Bit masks, one bit per entry over all merged tensors (in `names` order).
#[derive(Clone, Debug)]
pub(crate) struct BitMask {
    words: Vec<u64>,
}

impl BitMask {
    pub fn new(len: usize) -> Self {
        BitMask { words: vec![0; len.div_ceil(64)] }
    }
    #[inline]
    pub fn set(&mut self, i: usize) {
        self.words[i / 64] |= 1 << (i % 64);
    }
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64] >> (i % 64) & 1 == 1
    }
}

/// The `exclude` parameter of the SVD methods: comma-separated name substrings.
pub(crate) const EXCLUDE_DEFAULT: &str = "text_projection";

/// The shared frame of the SVD methods (`tsv-m`, `iso-c`, `iso-cts`): every 2-D merged tensor whose
/// name contains none of the `exclude` substrings gets `delta = matrix(name, taus)` from the task
/// vectors as f64 matrices; every other tensor gets the mean task vector; theta0 + alpha * delta.
pub(crate) fn svd_frame(
    method: &'static str,
    input: &MergeInput<'_, '_>,
    params: &Params,
    matrix: impl Fn(&[ndarray::Array2<f64>]) -> Result<ndarray::Array2<f64>, crate::linalg::LinalgError>,
) -> Result<ParamSet<'static>, MergeError> {
    super::require_models(method, input, 1, "at least 1 fine-tuned model")?;
    reject_weights(method, input)?;
    let alpha = finite(params, "alpha", 1.0)?;
    let exclude: Vec<&str> =
        params.get("exclude").unwrap_or(EXCLUDE_DEFAULT).split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let flat = Flat::new(input);
    let tasks = flat.tasks();
    let mut values = Vec::with_capacity(flat.names.len());
    for k in 0..flat.names.len() {
        let n = flat.len(k);
        let shape = &flat.shapes[k];
        let name = &flat.names[k];
        let base = &flat.base[k];
        let mut tau = vec![0.0f32; n];
        if shape.len() == 2 && !exclude.iter().any(|p| name.contains(p)) && n > 0 {
            let taus: Vec<ndarray::Array2<f64>> = (0..tasks)
                .map(|t| {
                    flat.tau(t, k, 0, &mut tau);
                    ndarray::Array2::from_shape_fn((shape[0], shape[1]), |(i, j)| f64::from(tau[i * shape[1] + j]))
                })
                .collect();
            let delta =
                matrix(&taus).map_err(|e| MergeError::Numerical { method, detail: format!("tensor `{name}`: {e}") })?;
            let out: Vec<f32> = base.iter().zip(delta.iter()).map(|(&b, &d)| b + alpha * d as f32).collect();
            values.push(out);
        } else {
            let mut acc = vec![0.0f32; n];
            for t in 0..tasks {
                flat.tau(t, k, 0, &mut tau);
                acc.iter_mut().zip(&tau).for_each(|(a, &x)| *a += x);
            }
            let inv = 1.0 / tasks as f32;
            values.push(base.iter().zip(&acc).map(|(&b, &a)| b + alpha * (a * inv)).collect());
        }
    }
    Ok(flat.output(values))
}
