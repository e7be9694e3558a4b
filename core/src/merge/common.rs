//! Shared machinery of the data-free methods: flat views of the inputs, task-vector sources that
//! produce chunks of tau_t on demand (plain, DARE-dropped, breadcrumbs-masked), and the task
//! arithmetic and TIES kernels that run over those sources chunk by chunk, so that no method keeps
//! a full copy of every task vector in memory.

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{ArrayD, IxDyn};

use super::executor::{Executor, Sequential, map_jobs};
use super::{MergeError, MergeInput, Params, check_range};
use crate::cpu::{Simd, prefetch};
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

    /// The tensor indices, largest first (ties in tensor order): the order in which the kernels
    /// hand their per-tensor jobs to an executor, so that the big ones do not finish last.
    pub fn largest_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.names.len()).collect();
        order.sort_by_key(|&k| core::cmp::Reverse(self.len(k)));
        order
    }

    /// One empty output vector per tensor with room for its entries, allocated on the calling
    /// thread: per-tensor jobs on other threads fill them, so every merge output comes from the
    /// caller's heap whatever the executor (another thread's allocations would come from its own
    /// allocator arena, which the next merge on the caller's thread cannot reuse: fresh pages,
    /// faulted and zeroed again; on this VM that cost task-arithmetic its 2-thread speed-up).
    pub fn output_buffers(&self) -> Vec<Vec<f32>> {
        (0..self.names.len()).map(|k| Vec::with_capacity(self.len(k))).collect()
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
pub(crate) trait TaskVectors: Sync {
    /// Write tau_t of tensor `k`, entries `[off, off + out.len())`, into `out`.
    fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]);

    /// True when this source is the plain task vectors of the `Flat` the kernels are given
    /// (tau_t = theta_t - theta0, nothing dropped or scaled): the kernels then read the models and
    /// the base directly instead of filling buffers.
    fn plain(&self) -> bool {
        false
    }
}

impl TaskVectors for Flat<'_> {
    fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
        self.tau(t, k, off, out)
    }
    fn plain(&self) -> bool {
        true
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

/// Lanes of the register-blocked kernels: each block of `LANES` entries is carried through every
/// task in registers (the compiler keeps `[f32; LANES]` in vector registers).
const LANES: usize = 16;

/// Lanes of the TIES block kernel (its per-lane state is five arrays: more lanes spill registers).
const TIES_LANES: usize = 8;

/// Per task, the slices the kernels read at one chunk: the model entries themselves (plain task
/// vectors, `sub` = the base) or tau_t filled by the source into `bufs` (`sub` = zeros), so that
/// tau = m - sub is exact in both cases (x - 0 = x, also for -0).
struct ChunkRows<'a> {
    rows: Vec<&'a [f32]>,
    sub: &'a [f32],
}

/// Scratch for [`chunk_rows`]: per-task fill buffers of `stride` entries and a zero row.
struct RowScratch {
    bufs: Vec<f32>,
    zeros: Vec<f32>,
    stride: usize,
}

impl RowScratch {
    /// `direct`: every chunk comes straight from the `Flat` (no buffers needed). `len`: the longest
    /// chunk to be filled (at most [`CHUNK`]).
    fn new(tasks: usize, direct: bool, len: usize) -> Self {
        let stride = len.clamp(1, CHUNK);
        if direct {
            RowScratch { bufs: Vec::new(), zeros: Vec::new(), stride }
        } else {
            RowScratch { bufs: vec![0.0; tasks * stride], zeros: vec![0.0; stride], stride }
        }
    }
}

/// The rows of tensor `k`, entries `[off, off + len)`: straight from `flat` when `src` is the plain
/// task vectors and nothing is applied to them, else filled by `src` (and trimmed by `pre`).
#[allow(clippy::too_many_arguments)]
fn chunk_rows<'a>(
    flat: &'a Flat<'_>,
    src: &dyn TaskVectors,
    scratch: &'a mut RowScratch,
    k: usize,
    off: usize,
    len: usize,
    pre: Option<&Trim>,
) -> ChunkRows<'a> {
    if src.plain() && pre.is_none() {
        ChunkRows {
            rows: flat.models.iter().map(|m| &m[k][off..off + len]).collect(),
            sub: &flat.base[k][off..off + len],
        }
    } else {
        for (t, b) in scratch.bufs.chunks_exact_mut(scratch.stride).enumerate() {
            src.fill(t, k, off, &mut b[..len]);
            if let Some(trim) = pre {
                trim.apply(t, k, off, &mut b[..len]);
            }
        }
        let stride = scratch.stride;
        ChunkRows { rows: scratch.bufs.chunks_exact(stride).map(|b| &b[..len]).collect(), sub: &scratch.zeros[..len] }
    }
}

/// `out[i] = add[i] + sum_t w_t * (rows[t][i] - sub[i])` for one chunk, with the f32 operations of
/// every entry in the order of the reference (acc = 0, acc += w_t * tau_t in task order, acc + add),
/// so the result does not depend on the blocking. Blocks of [`LANES`] entries stay in registers
/// through every task: each input entry is loaded once and nothing is stored but the output.
fn weighted_chunk(rows: &[&[f32]], w: &[f32], sub: &[f32], add: &[f32], out: &mut [f32]) {
    let len = out.len();
    let full = len / LANES * LANES;
    for j in (0..full).step_by(LANES) {
        let s: &[f32; LANES] = sub[j..j + LANES].try_into().expect("block");
        let mut a = [0.0f32; LANES];
        for (m, &w) in rows.iter().zip(w) {
            let m: &[f32; LANES] = m[j..j + LANES].try_into().expect("block");
            for l in 0..LANES {
                a[l] += w * (m[l] - s[l]);
            }
        }
        let d: &[f32; LANES] = add[j..j + LANES].try_into().expect("block");
        for (o, (&a, &d)) in out[j..j + LANES].iter_mut().zip(a.iter().zip(d)) {
            *o = a + d;
        }
    }
    for j in full..len {
        let mut a = 0.0f32;
        for (m, &w) in rows.iter().zip(w) {
            a += w * (m[j] - sub[j]);
        }
        out[j] = a + add[j];
    }
}

/// theta0 + sum_t coef_t * tau_t, with tau_t from `src`, on the calling thread.
pub(crate) fn weighted_sum(flat: &Flat<'_>, src: &dyn TaskVectors, coef: &[f32]) -> ParamSet<'static> {
    weighted_sum_on(flat, src, coef, &Sequential)
}

/// [`weighted_sum`] with one job per tensor on `exec` (each entry's result does not depend on
/// which job computes it: bitwise the same for any executor).
///
/// Each output entry is written once (no zero fill first): chunks are computed into a small
/// buffer and appended to an output reserved at full size.
pub(crate) fn weighted_sum_on(
    flat: &Flat<'_>,
    src: &dyn TaskVectors,
    coef: &[f32],
    exec: &dyn Executor,
) -> ParamSet<'static> {
    let tensor = |k: usize, mut out: Vec<f32>| {
        let n = flat.len(k);
        let mut scratch = RowScratch::new(flat.tasks(), src.plain(), n);
        let mut tmp = vec![0.0f32; n.min(CHUNK)];
        for off in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - off);
            let rows = chunk_rows(flat, src, &mut scratch, k, off, len, None);
            let tmp = &mut tmp[..len];
            weighted_chunk(&rows.rows, coef, rows.sub, &flat.base[k][off..off + len], tmp);
            out.extend_from_slice(tmp);
        }
        out
    };
    let values = map_jobs(exec, flat.output_buffers(), &flat.largest_first(), tensor);
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

/// Per tensor, per task: keep exactly floor(k n) entries by magnitude (mergekit's `magnitude`).
/// `keys[t][k]`; one job per tensor on `exec`.
fn tensor_keys(flat: &Flat<'_>, src: &dyn TaskVectors, k: f64, exec: &dyn Executor) -> Vec<Vec<Option<u64>>> {
    let tasks = flat.tasks();
    let per_tensor = |kk: usize, (): ()| -> Vec<Option<u64>> {
        let n = flat.len(kk);
        let keep = libm::floor(k * n as f64) as usize;
        if keep == 0 {
            return vec![None; tasks];
        }
        let mut scratch = Vec::new();
        let mut tau = vec![0.0f32; n];
        (0..tasks)
            .map(|t| {
                src.fill(t, kk, 0, &mut tau);
                Some(key_at_rank(&tau, n - keep, &mut scratch))
            })
            .collect()
    };
    let by_tensor = map_jobs(exec, vec![(); flat.names.len()], &flat.largest_first(), per_tensor);
    (0..tasks).map(|t| by_tensor.iter().map(|keys| keys[t]).collect()).collect()
}

/// Buckets of the magnitude histogram: the top 16 bits of abs(x) (sign bit clear: 2^15 buckets).
const BUCKETS: usize = 1 << 15;
const BUCKET_SHIFT: u32 = 16;

/// Counting tables per task in the histogram pass: consecutive entries count into different
/// tables (summed at the end), so that runs of one bucket do not serialise on a single counter.
/// Each table is padded so that the tables do not alias one another at 4 KiB strides.
const TABLES: usize = 4;
const TABLE_STRIDE: usize = BUCKETS + 16;

/// One histogram pass over every task: per task, counts of the top 16 bits of abs(tau_t).
/// u32 counts keep each task's table at 128 KiB; d < 2^32 entries per model.
fn magnitude_histograms(flat: &Flat<'_>, src: &dyn TaskVectors) -> Vec<u32> {
    let tasks = flat.tasks();
    let mut tables = vec![0u32; TABLES * tasks * TABLE_STRIDE];
    let mut scratch = RowScratch::new(tasks, src.plain(), CHUNK);
    let bucket = |x: f32| x.abs().to_bits() >> BUCKET_SHIFT;
    let mut idx = vec![0u32; CHUNK];
    for kk in 0..flat.names.len() {
        for off in (0..flat.len(kk)).step_by(CHUNK) {
            let len = CHUNK.min(flat.len(kk) - off);
            let rows = chunk_rows(flat, src, &mut scratch, kk, off, len, None);
            let s = rows.sub;
            for (t, m) in rows.rows.iter().enumerate() {
                let mine = &mut tables[TABLES * t * TABLE_STRIDE..TABLES * (t + 1) * TABLE_STRIDE];
                let (h0, rest) = mine.split_at_mut(TABLE_STRIDE);
                let (h1, rest) = rest.split_at_mut(TABLE_STRIDE);
                let (h2, h3) = rest.split_at_mut(TABLE_STRIDE);
                let (h0, h1, h2, h3) = (&mut h0[..BUCKETS], &mut h1[..BUCKETS], &mut h2[..BUCKETS], &mut h3[..BUCKETS]);
                // The bucket indices first (a vectorised streaming loop), then the counts from L1:
                // counting straight from the streamed rows stalls on the cache misses.
                let idx = &mut idx[..len];
                for ((i, &m), &s) in idx.iter_mut().zip(m.iter()).zip(s) {
                    *i = bucket(m - s);
                }
                let mut quads = idx.chunks_exact(TABLES);
                for q in &mut quads {
                    h0[q[0] as usize] += 1;
                    h1[q[1] as usize] += 1;
                    h2[q[2] as usize] += 1;
                    h3[q[3] as usize] += 1;
                }
                for &i in quads.remainder() {
                    h0[i as usize] += 1;
                }
            }
        }
    }
    // Task t's table at [t B, (t + 1) B).
    let mut hist = vec![0u32; tasks * BUCKETS];
    for (t, h) in hist.chunks_exact_mut(BUCKETS).enumerate() {
        for part in tables[TABLES * t * TABLE_STRIDE..TABLES * (t + 1) * TABLE_STRIDE].chunks_exact(TABLE_STRIDE) {
            for (a, &b) in h.iter_mut().zip(part) {
                *a += b;
            }
        }
    }
    hist
}

/// Where task t's global threshold lies after the histogram: abs bit patterns below `lo` are
/// trimmed, from `hi` on kept; the nonzero ones in `[lo, hi)` (one bucket) are decided once the
/// exact threshold is known: it is the entry of 0-based rank `rank` among the bucket's `count`
/// entries (ascending), zeros first. `lo = hi = 0`: keep everything.
#[derive(Clone, Copy, Debug)]
struct Band {
    lo: u32,
    hi: u32,
    rank: usize,
    count: usize,
}

/// Per task, the band holding the entry of 1-based rank d - floor(d k) (the threshold; rank 0:
/// keep all).
fn bands(flat: &Flat<'_>, hist: &[u32], k: f64) -> Vec<Band> {
    let d = flat.total();
    let keep = libm::floor(d as f64 * k) as usize;
    let rank = d - keep.min(d);
    (0..flat.tasks())
        .map(|t| {
            if rank == 0 {
                return Band { lo: 0, hi: 0, rank: 0, count: 0 };
            }
            let q = rank - 1;
            let h = &hist[t * BUCKETS..(t + 1) * BUCKETS];
            let mut cum = 0usize;
            for (b, &c) in h.iter().enumerate() {
                let c = c as usize;
                if cum + c > q {
                    let lo = (b as u32) << BUCKET_SHIFT;
                    return Band { lo, hi: lo + (1 << BUCKET_SHIFT), rank: q - cum, count: c };
                }
                cum += c;
            }
            unreachable!("the histogram counts every entry")
        })
        .collect()
}

/// Exact thresholds by a second pass that collects each band's members (the fallback when the
/// bands hold too many entries to defer them).
fn band_thresholds(flat: &Flat<'_>, src: &dyn TaskVectors, bands: &[Band]) -> Vec<Option<f32>> {
    let tasks = flat.tasks();
    let mut members: Vec<Vec<u32>> = bands.iter().map(|b| Vec::with_capacity(b.count)).collect();
    let mut buf = vec![0.0f32; CHUNK];
    for kk in 0..flat.names.len() {
        for off in (0..flat.len(kk)).step_by(CHUNK) {
            let len = CHUNK.min(flat.len(kk) - off);
            for t in 0..tasks {
                if bands[t].hi == 0 {
                    continue;
                }
                src.fill(t, kk, off, &mut buf[..len]);
                let Band { lo, hi, .. } = bands[t];
                for x in &buf[..len] {
                    let bits = x.abs().to_bits();
                    if bits >= lo && bits < hi {
                        members[t].push(bits);
                    }
                }
            }
        }
    }
    members
        .iter_mut()
        .zip(bands)
        .map(|(m, b)| (b.hi > 0).then(|| f32::from_bits(*m.select_nth_unstable(b.rank).1)))
        .collect()
}

/// How the merge pass trims: exactly, or by sampled windows whose undecided entries it defers
/// (and whose trimmed entries it counts).
enum Mode<'a> {
    Exact(&'a Trim),
    Windows(&'a [Option<Window>]),
}

/// Entries the window pass could not decide in one tensor: their position, base value and every
/// task's value there (one column per task, untrimmed: the settling trims them by the exact
/// thresholds, and those lie in the windows, so a value below its window is trimmed there too;
/// a -0 kept by a zero threshold adds exactly as the +0 of a trimmed value).
struct Deferred {
    at: Vec<u32>,
    base: Vec<f32>,
    values: Vec<Vec<f32>>,
}

/// What one merge pass leaves: the outputs (final except at the deferred and undecided entries),
/// the running sum of elected signs, the entries with a zero trimmed sum (in entry order), the
/// deferred entries (one list per tensor, in tensor order), per task the count of entries trimmed
/// by its window (abs bits below `lo`; window mode), and whether more than the deferral limit were
/// deferred (the pass then stops early and leaves the rest unset).
struct PassOut {
    values: Vec<Vec<f32>>,
    sign_total: i64,
    undecided: Vec<(usize, usize)>,
    deferred: Vec<Deferred>,
    below: Vec<u64>,
    overflow: bool,
}

impl PassOut {
    /// Deferred entries over all tensors.
    fn deferred_count(&self) -> usize {
        self.deferred.iter().map(|d| d.at.len()).sum()
    }
}

/// One tensor's share of a [`PassOut`].
struct TensorPass {
    values: Vec<f32>,
    sign_total: i64,
    undecided: Vec<(usize, usize)>,
    deferred: Deferred,
    below: Vec<u64>,
    overflow: bool,
}

/// Per task, how the merge pass trims, by abs bit patterns (below 2^31 for abs values, so they
/// compare as i32): values whose pattern is above `keep_above` are kept, the others become 0; the
/// kept ones up to `band_top` lie in the task's band, where its threshold may still fall (their
/// entry is deferred until it is known).
#[derive(Clone, Copy)]
struct Cut {
    keep_above: i32,
    band_top: i32,
}

impl Cut {
    /// Keep the abs bit patterns from `lo` on; the band is `[lo, hi)` (empty when `hi <= lo`).
    fn new(lo: u32, hi: u32) -> Cut {
        let clamp = |v: i64| v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
        Cut { keep_above: clamp(i64::from(lo) - 1), band_top: clamp(i64::from(hi) - 1) }
    }

    /// Keep the abs values from `threshold` on (everything when None); no band.
    fn exact(threshold: Option<f32>) -> Cut {
        let lo = threshold.map_or(0, f32::to_bits);
        Cut::new(lo, lo)
    }
}

/// All ones for true, zero for false.
#[inline(always)]
fn mask(c: bool) -> u32 {
    u32::from(c).wrapping_neg()
}

/// The kernels' per-block lane masks (one `u16` per [`TIES_LANES`] entries, bit `l` for lane
/// `l`): the low byte marks the deferred entries (some value in its task's band: the sign is not
/// elected here, the output is provisional), the high byte the undecided ones (a zero trimmed sum
/// with nonzero values while the sign of a zero sum is not known yet).
const UNDECIDED_SHIFT: u32 = 8;

/// Positions of the set bits of each byte, in ascending order (then zeros): lets the deferred
/// entries of a block be listed without a branch per entry.
const SET_BITS: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let (mut bit, mut n) = (0, 0);
        while bit < 8 {
            if m & (1 << bit) != 0 {
                table[m][n] = bit as u8;
                n += 1;
            }
            bit += 1;
        }
        m += 1;
    }
    table
};

/// How many bits each byte has set (the baseline x86-64 has no POPCNT instruction).
const SET_COUNT: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut m = 0;
    while m < 256 {
        table[m] = (m as u32).count_ones() as u8;
        m += 1;
    }
    table
};

/// TIES on the `W` entries at `j` of one chunk, carried through every task in registers, in one
/// sweep over the tasks: trim, the trimmed sum, and beside it the sums of the positive and of the
/// negative trimmed values (and their counts for the mean); then the elected sign picks the
/// positive or the negative sum, `out = base + lambda * merged`. The disjoint merge adds, in task
/// order, x where x * e > 0 and 0 elsewhere; with e = +1 that is exactly the sequence of additions
/// of the positive sum (x where x > 0, else 0), with e = -1 that of the negative sum, so the
/// result is bitwise the same, whatever `W`. `COUNT`: add, per task and lane, each kept value's
/// all-ones mask to `kept` (so it holds minus the count of kept values, wrapping). Returns the sum
/// of the elected signs of the decided entries and the block's lane mask (see [`UNDECIDED_SHIFT`];
/// undecided only when `zero_sign` is 0).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn ties_block<const W: usize, const MEAN: bool, const COUNT: bool>(
    rows: &[&[f32]],
    j: usize,
    sub: &[f32],
    base: &[f32],
    cuts: &[Cut],
    zero_sign: f32,
    lambda: f32,
    out: &mut [f32],
    kept: &mut [[u32; TIES_LANES]],
) -> (i32, u32) {
    let s: &[f32; W] = sub[j..j + W].try_into().expect("block");
    let mut sum = [0.0f32; W];
    let mut pos = [0.0f32; W];
    let mut neg = [0.0f32; W];
    let mut npos = [0.0f32; W];
    let mut nneg = [0.0f32; W];
    let mut band = [0u32; W];
    for ((m, &c), kc) in rows.iter().zip(cuts).zip(kept.iter_mut()) {
        let m: &[f32; W] = m[j..j + W].try_into().expect("block");
        let mut keep = [0u32; W];
        for l in 0..W {
            let x = m[l] - s[l];
            let bits = x.abs().to_bits() as i32;
            keep[l] = mask(bits > c.keep_above);
            band[l] |= keep[l] & mask(bits <= c.band_top);
            let x = f32::from_bits(x.to_bits() & keep[l]);
            sum[l] += x;
            pos[l] += if x > 0.0 { x } else { 0.0 };
            neg[l] += if x < 0.0 { x } else { 0.0 };
            if MEAN {
                npos[l] += if x > 0.0 { 1.0 } else { 0.0 };
                nneg[l] += if x < 0.0 { 1.0 } else { 0.0 };
            }
        }
        if COUNT {
            for l in 0..W {
                kc[l] = kc[l].wrapping_add(keep[l]);
            }
        }
    }
    // The election as branch-free lane masks (so that it vectorises at any width): p, q, z are
    // exclusive, so the elected sign is +1 on p, -1 on q, zero_sign on z and 0 on deferred lanes,
    // exactly as the case analysis. Some value is nonzero exactly when the positive sum is > 0
    // or the negative one < 0 (a sum of same-signed values is never smaller in magnitude than any
    // of them).
    let (zs_pos, zs_neg) = (mask(zero_sign > 0.0), mask(zero_sign < 0.0));
    let undecided = mask(zero_sign == 0.0);
    let mut votes = [0i32; W];
    let mut acc = [0.0f32; W];
    let mut cnt = [0.0f32; W];
    let mut lanes = 0u32;
    for l in 0..W {
        let open = mask(band[l] == 0);
        let (gt, lt) = (mask(sum[l] > 0.0), mask(sum[l] < 0.0));
        let p = gt & open;
        let q = lt & open;
        let z = !(gt | lt) & open;
        votes[l] = (p & 1) as i32 - (q & 1) as i32;
        let any = mask(pos[l] > 0.0) | mask(neg[l] < 0.0);
        lanes |= (band[l] & 1) << l | (any & z & undecided & 1) << (l as u32 + UNDECIDED_SHIFT);
        // acc = pos where the elected sign is +1, neg where it is -1, else 0.
        let (pm, nm) = (p | (z & zs_pos), q | (z & zs_neg));
        acc[l] = f32::from_bits((pos[l].to_bits() & pm) | (neg[l].to_bits() & nm));
        if MEAN {
            cnt[l] = f32::from_bits((npos[l].to_bits() & pm) | (nneg[l].to_bits() & nm));
        }
    }
    let total = votes.iter().sum::<i32>();
    let b: &[f32; W] = base[j..j + W].try_into().expect("block");
    for l in 0..W {
        out[j + l] = if MEAN { b[l] + lambda * (acc[l] / cnt[l].max(1.0)) } else { b[l] + lambda * acc[l] };
    }
    (total, lanes)
}

/// One chunk for the TIES kernel: the task rows, what they are measured from (`sub`, the task
/// vectors are `rows[t] - sub`), the base, the per-task cuts, and where its results go: the
/// outputs, one lane mask per block of [`TIES_LANES`] entries (`masks`, `len.div_ceil(8)` of
/// them), and with `COUNT` the per-task kept counts (see [`ties_block`]).
struct Chunk<'a> {
    rows: &'a [&'a [f32]],
    sub: &'a [f32],
    base: &'a [f32],
    cuts: &'a [Cut],
    zero_sign: f32,
    lambda: f32,
    out: &'a mut [f32],
    masks: &'a mut [u16],
    kept: &'a mut [[u32; TIES_LANES]],
}

/// The tail entries of a chunk (past its last full block), one at a time into the last mask.
#[inline(always)]
fn ties_tail<const MEAN: bool, const COUNT: bool>(c: Chunk<'_>, full: usize) -> i32 {
    let Chunk { rows, sub, base, cuts, zero_sign, lambda, out, masks, kept } = c;
    let mut total = 0;
    for j in full..out.len() {
        let (t, lanes) = ties_block::<1, MEAN, COUNT>(rows, j, sub, base, cuts, zero_sign, lambda, out, kept);
        total += t;
        let at = &mut masks[j / TIES_LANES];
        let before = if j == full { 0 } else { *at };
        *at = before | (lanes << (j % TIES_LANES)) as u16;
    }
    total
}

/// [`ties_block`] over one chunk: blocks of [`TIES_LANES`], then one entry at a time. Inlined into
/// each instruction-set variant of [`ties_kernel`].
#[inline(always)]
fn ties_chunk<const MEAN: bool, const COUNT: bool>(c: Chunk<'_>) -> i32 {
    let full = c.out.len() / TIES_LANES * TIES_LANES;
    let mut total = 0;
    for j in (0..full).step_by(TIES_LANES) {
        let (t, lanes) = ties_block::<TIES_LANES, MEAN, COUNT>(
            c.rows,
            j,
            c.sub,
            c.base,
            c.cuts,
            c.zero_sign,
            c.lambda,
            c.out,
            c.kept,
        );
        total += t;
        c.masks[j / TIES_LANES] = lanes as u16;
    }
    total + ties_tail::<MEAN, COUNT>(c, full)
}

/// [`ties_chunk`] in AVX2 registers: each block of [`TIES_LANES`] entries in one 256-bit register
/// per quantity, the same IEEE operations in the same order as [`ties_block`] (sub, abs, trim,
/// the three sums, the election by lane masks, `base + lambda * merged`, no fused multiply-add),
/// so the results are bitwise the same (tested against the naive reference); the tail entries
/// go through [`ties_block`]. `max(x, 0)` and `min(x, 0)` return the second operand for zeros of
/// either sign, so they are exactly `if x > 0 { x } else { 0 }` and `if x < 0 { x } else { 0 }`.
///
/// # Safety
/// The CPU must support AVX2 and POPCNT ([`Simd::detect`] returned [`Simd::Avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
#[allow(unsafe_code, unused_unsafe)]
unsafe fn ties_chunk_avx2<const MEAN: bool, const COUNT: bool>(c: Chunk<'_>) -> i32 {
    use core::arch::x86_64::*;
    const _: () = assert!(TIES_LANES == 8);
    let full = c.out.len() / TIES_LANES * TIES_LANES;
    let mut total = 0i32;
    // SAFETY: AVX2 is enabled for this function; every load and store is of 8 lanes inside a
    // slice bounds-checked just before (`[j..j + 8]`, a `[u32; 8]`).
    unsafe {
        // The cuts as broadcast vectors (the compares read them from memory).
        let mut bounds: Vec<[__m256i; 2]> = Vec::with_capacity(c.cuts.len());
        for cut in c.cuts {
            bounds.push([_mm256_set1_epi32(cut.keep_above), _mm256_set1_epi32(cut.band_top)]);
        }
        let zero = _mm256_setzero_ps();
        let one = _mm256_set1_ps(1.0);
        let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
        let zs_pos = _mm256_set1_epi32(mask(c.zero_sign > 0.0) as i32);
        let zs_neg = _mm256_set1_epi32(mask(c.zero_sign < 0.0) as i32);
        let undecided = _mm256_set1_epi32(mask(c.zero_sign == 0.0) as i32);
        let lambda = _mm256_set1_ps(c.lambda);
        let ld = |v: &[f32], j: usize| _mm256_loadu_ps(v[j..j + 8].as_ptr());
        for j in (0..full).step_by(TIES_LANES) {
            let s = ld(c.sub, j);
            let (mut sum, mut pos, mut neg, mut npos, mut nneg) = (zero, zero, zero, zero, zero);
            let mut band = _mm256_setzero_si256();
            for ((m, b), kc) in c.rows.iter().zip(&bounds).zip(c.kept.iter_mut()) {
                let x = _mm256_sub_ps(ld(m, j), s);
                let bits = _mm256_and_si256(_mm256_castps_si256(x), abs_mask);
                let keep = _mm256_cmpgt_epi32(bits, b[0]);
                band = _mm256_or_si256(band, _mm256_andnot_si256(_mm256_cmpgt_epi32(bits, b[1]), keep));
                if COUNT {
                    let at = kc.as_mut_ptr() as *mut __m256i;
                    _mm256_storeu_si256(at, _mm256_add_epi32(keep, _mm256_loadu_si256(at)));
                }
                let x = _mm256_and_ps(_mm256_castsi256_ps(keep), x);
                sum = _mm256_add_ps(sum, x);
                pos = _mm256_add_ps(pos, _mm256_max_ps(x, zero));
                neg = _mm256_add_ps(neg, _mm256_min_ps(x, zero));
                if MEAN {
                    npos = _mm256_add_ps(npos, _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(x, zero), one));
                    nneg = _mm256_add_ps(nneg, _mm256_and_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, zero), one));
                }
            }
            let open = _mm256_cmpeq_epi32(band, _mm256_setzero_si256());
            let gt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(sum, zero));
            let lt = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(sum, zero));
            let p = _mm256_and_si256(gt, open);
            let q = _mm256_and_si256(lt, open);
            let z = _mm256_andnot_si256(_mm256_or_si256(gt, lt), open);
            let bits = |v: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(v)) as u32;
            total += bits(p).count_ones() as i32 - bits(q).count_ones() as i32;
            let any = _mm256_castps_si256(_mm256_or_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(pos, zero),
                _mm256_cmp_ps::<_CMP_LT_OQ>(neg, zero),
            ));
            let und = _mm256_and_si256(_mm256_and_si256(any, z), undecided);
            c.masks[j / TIES_LANES] = (bits(band) | bits(und) << UNDECIDED_SHIFT) as u16;
            let pm = _mm256_castsi256_ps(_mm256_or_si256(p, _mm256_and_si256(z, zs_pos)));
            let nm = _mm256_castsi256_ps(_mm256_or_si256(q, _mm256_and_si256(z, zs_neg)));
            let mut merged = _mm256_or_ps(_mm256_and_ps(pos, pm), _mm256_and_ps(neg, nm));
            if MEAN {
                let cnt = _mm256_or_ps(_mm256_and_ps(npos, pm), _mm256_and_ps(nneg, nm));
                merged = _mm256_div_ps(merged, _mm256_max_ps(cnt, one));
            }
            let o = _mm256_add_ps(ld(c.base, j), _mm256_mul_ps(lambda, merged));
            _mm256_storeu_ps(c.out[j..j + 8].as_mut_ptr(), o);
        }
    }
    total + ties_tail::<MEAN, COUNT>(c, full)
}

/// The TIES kernel on one chunk, with the aggregation, the trimmed-value counting (`count`) and
/// the instruction set chosen at run time. Returns the sum of the elected signs of the decided
/// entries.
#[allow(unsafe_code)]
fn ties_kernel(simd: Simd, aggregate: Aggregate, count: bool, c: Chunk<'_>) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 {
        // SAFETY: `Simd::Avx2` comes only from `Simd::detect`, which checked the CPU and the OS.
        return unsafe {
            match (aggregate, count) {
                (Aggregate::Sum, false) => ties_chunk_avx2::<false, false>(c),
                (Aggregate::Mean, false) => ties_chunk_avx2::<true, false>(c),
                (Aggregate::Sum, true) => ties_chunk_avx2::<false, true>(c),
                (Aggregate::Mean, true) => ties_chunk_avx2::<true, true>(c),
            }
        };
    }
    let _ = simd;
    match (aggregate, count) {
        (Aggregate::Sum, false) => ties_chunk::<false, false>(c),
        (Aggregate::Mean, false) => ties_chunk::<true, false>(c),
        (Aggregate::Sum, true) => ties_chunk::<false, true>(c),
        (Aggregate::Mean, true) => ties_chunk::<true, true>(c),
    }
}

/// One chunked pass: trim, elect signs, disjoint merge; entries that `mode`'s windows leave
/// undecided are written provisionally and listed in `deferred` (room made in tensor k's list for
/// `room[k]` of them, none when `room` is empty; at most `limit` in all: past that the pass stops
/// with `overflow` set).
///
/// One job per tensor on `exec`; the jobs' lists are joined in tensor order and their counts
/// summed (integers), so the result is bitwise that of one pass over the tensors in order, for any
/// executor. The deferral limit is checked against a count shared by the jobs, so `overflow` is
/// set exactly when the whole pass defers more than `limit` entries.
#[allow(clippy::too_many_arguments)]
fn merge_pass(
    flat: &Flat<'_>,
    src: &dyn TaskVectors,
    opt: &TiesOptions,
    mode: Mode<'_>,
    room: &[usize],
    limit: usize,
    simd: Simd,
    exec: &dyn Executor,
) -> PassOut {
    let tasks = flat.tasks();
    // Tensor scope trims by per-entry keys: those rows are filled and trimmed first.
    let pre = match mode {
        Mode::Exact(trim @ Trim::Tensor(_)) => Some(trim),
        _ => None,
    };
    let cuts: Vec<Cut> = match mode {
        Mode::Exact(Trim::Global(thr)) => thr.iter().map(|&t| Cut::exact(t)).collect(),
        Mode::Exact(Trim::Tensor(_)) => vec![Cut::exact(None); tasks],
        Mode::Windows(windows) => {
            windows.iter().map(|w| w.map_or(Cut::exact(None), |w| Cut::new(w.lo, w.hi))).collect()
        }
    };
    let count = matches!(mode, Mode::Windows(_));
    let deferred_so_far = AtomicUsize::new(0);
    // Each job's output and deferred lists are allocated here, on the calling thread (see
    // [`Flat::output_buffers`]).
    let buffers: Vec<(Vec<f32>, Deferred)> = flat
        .output_buffers()
        .into_iter()
        .enumerate()
        .map(|(kk, out)| {
            let room = room.get(kk).map_or(0, |&r| r.min(flat.len(kk)).min(limit));
            let deferred = Deferred {
                at: Vec::with_capacity(room),
                base: Vec::with_capacity(room),
                values: (0..tasks).map(|_| Vec::with_capacity(room)).collect(),
            };
            (out, deferred)
        })
        .collect();
    let job = |kk: usize, (out, deferred): (Vec<f32>, Deferred)| {
        let shared = Shared { flat, src, opt, pre, cuts: &cuts, count, limit, simd, deferred_so_far: &deferred_so_far };
        tensor_pass(&shared, kk, out, deferred)
    };
    let parts = map_jobs(exec, buffers, &flat.largest_first(), job);
    let mut pass = PassOut {
        values: Vec::with_capacity(parts.len()),
        sign_total: 0,
        undecided: Vec::new(),
        deferred: Vec::with_capacity(parts.len()),
        below: vec![0; tasks],
        overflow: false,
    };
    for part in parts {
        pass.values.push(part.values);
        pass.sign_total += part.sign_total;
        pass.undecided.extend_from_slice(&part.undecided);
        pass.deferred.push(part.deferred);
        pass.below.iter_mut().zip(&part.below).for_each(|(a, b)| *a += b);
        pass.overflow |= part.overflow;
    }
    pass.overflow |= pass.deferred_count() > limit;
    pass
}

/// What every job of [`merge_pass`] reads.
struct Shared<'a, 's> {
    flat: &'a Flat<'s>,
    src: &'a dyn TaskVectors,
    opt: &'a TiesOptions,
    pre: Option<&'a Trim>,
    cuts: &'a [Cut],
    count: bool,
    limit: usize,
    simd: Simd,
    deferred_so_far: &'a AtomicUsize,
}

/// [`merge_pass`] on tensor `kk`, writing into `out` and `deferred` (empty, with capacity); stops
/// early (overflow) once the jobs together have deferred more than the limit.
fn tensor_pass(sh: &Shared<'_, '_>, kk: usize, mut out: Vec<f32>, mut deferred: Deferred) -> TensorPass {
    let Shared { flat, src, opt, pre, cuts, count, limit, simd, deferred_so_far } = *sh;
    let tasks = flat.tasks();
    let n = flat.len(kk);
    let stride = n.clamp(1, CHUNK);
    let mut scratch = RowScratch::new(tasks, src.plain() && pre.is_none(), stride);
    let mut masks = vec![0u16; stride.div_ceil(TIES_LANES)];
    let mut kept = vec![[0u32; TIES_LANES]; tasks];
    // Chunk positions of the deferred entries, 8 slots of room past the last.
    let mut picked = vec![0u16; stride + TIES_LANES];
    let mut subs: Vec<f32> = Vec::with_capacity(stride);
    let mut sign_total: i64 = 0;
    let mut undecided: Vec<(usize, usize)> = Vec::new();
    // The elected sign of a zero sum: +1 (tensor scope) or undecided (0) until the end.
    let zero_sign = if opt.scope == Scope::Tensor { 1.0 } else { 0.0 };
    for off in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - off);
        let base = &flat.base[kk][off..off + len];
        let rows = chunk_rows(flat, src, &mut scratch, kk, off, len, pre);
        // The chunk's outputs go straight into `out` (zeroed first: its lines are then in cache).
        out.resize(off + len, 0.0);
        let chunk = Chunk {
            rows: &rows.rows,
            sub: rows.sub,
            base,
            cuts,
            zero_sign,
            lambda: opt.lambda,
            out: &mut out[off..off + len],
            masks: &mut masks[..len.div_ceil(TIES_LANES)],
            kept: &mut kept,
        };
        let total = ties_kernel(simd, opt.aggregate, count, chunk);
        sign_total += i64::from(total);
        // The deferred lanes of each block listed without a branch per block (each writes 8
        // slots, then advances by its count); the rare undecided ones one by one.
        let mut picks = 0;
        for (b, &m) in masks[..len.div_ceil(TIES_LANES)].iter().enumerate() {
            let first = (b * TIES_LANES) as u16;
            let def = usize::from(m as u8);
            for (slot, &lane) in picked[picks..picks + TIES_LANES].iter_mut().zip(&SET_BITS[def]) {
                *slot = first + u16::from(lane);
            }
            picks += usize::from(SET_COUNT[def]);
            let mut und = u32::from(m) >> UNDECIDED_SHIFT;
            while und != 0 {
                undecided.push((kk, off + b * TIES_LANES + und.trailing_zeros() as usize));
                und &= und - 1;
            }
        }
        let picked = &picked[..picks];
        if !picked.is_empty() {
            deferred.at.extend(picked.iter().map(|&i| (off + usize::from(i)) as u32));
            deferred.base.extend(picked.iter().map(|&i| base[usize::from(i)]));
            // What the rows are measured from, gathered once for every task.
            subs.clear();
            subs.extend(picked.iter().map(|&i| rows.sub[usize::from(i)]));
            for (col, m) in deferred.values.iter_mut().zip(&rows.rows) {
                let m = &m[..len];
                col.extend(picked.iter().zip(&subs).map(|(&i, &s)| m[usize::from(i)] - s));
            }
            let so_far = deferred_so_far.fetch_add(picked.len(), Ordering::Relaxed) + picked.len();
            if so_far > limit {
                return TensorPass { values: out, sign_total, undecided, deferred, below: Vec::new(), overflow: true };
            }
        }
    }
    // Per task, the values below its cut: all but the kept ones.
    let below = kept.iter().map(|k| n as u64 - k.iter().map(|&c| u64::from(c.wrapping_neg())).sum::<u64>()).collect();
    TensorPass { values: out, sign_total, undecided, deferred, below, overflow: false }
}

/// Decide the deferred entries: per task the exact threshold from the count of entries below its
/// window and the deferred values inside it, then the entries themselves with the kernel of the
/// pass (exact cuts) and their outputs written in place in `pass` (one job per tensor on `exec`).
/// Returns the thresholds, or None (and leaves `pass` as it was) when some task's threshold is not
/// in its window.
fn settle(
    windows: &[Option<Window>],
    q: usize,
    opt: &TiesOptions,
    pass: &mut PassOut,
    simd: Simd,
    exec: &dyn Executor,
) -> Option<Vec<Option<f32>>> {
    let tasks = windows.len();
    let deferred = &pass.deferred;
    // Per task (one job each): the threshold, Err(()) when it is not in the window.
    let threshold = |t: usize, (): ()| -> Result<Option<f32>, ()> {
        let Some(w) = windows[t] else { return Ok(None) };
        let c = pass.below[t] as usize;
        if q < c {
            // Below the window: only the zeros (lo = 1) may hold the threshold.
            return if w.lo > 1 { Err(()) } else { Ok(Some(0.0)) };
        }
        // The task's deferred values inside its window: counted, then compacted without a branch
        // per value (one slot of slack takes the writes of the values outside).
        let width = w.hi - w.lo;
        let inside = |x: &f32| x.abs().to_bits().wrapping_sub(w.lo) < width;
        let count: usize =
            deferred.iter().map(|d| d.values[t].iter().map(|x| usize::from(inside(x))).sum::<usize>()).sum();
        let mut members = vec![0u32; count + 1];
        let mut n = 0;
        for d in deferred {
            for x in &d.values[t] {
                members[n] = x.abs().to_bits();
                n += usize::from(inside(x));
            }
        }
        members.truncate(count);
        if q - c >= members.len() {
            return Err(());
        }
        Ok(Some(f32::from_bits(*members.select_nth_unstable(q - c).1)))
    };
    let order: Vec<usize> = (0..tasks).collect();
    let thresholds: Vec<Option<f32>> =
        map_jobs(exec, vec![(); tasks], &order, threshold).into_iter().collect::<Result<_, ()>>().ok()?;
    let cuts: Vec<Cut> = thresholds.iter().map(|&t| Cut::exact(t)).collect();
    // Per tensor (one job each): decide its deferred entries into its output.
    let decide = |kk: usize, (d, values): (&Deferred, &mut Vec<f32>)| -> (i64, Vec<(usize, usize)>) {
        let n = d.at.len();
        let stride = n.clamp(1, CHUNK);
        let zeros = vec![0.0f32; stride];
        let mut masks = vec![0u16; stride.div_ceil(TIES_LANES)];
        let mut out = vec![0.0f32; stride];
        let mut kept = vec![[0u32; TIES_LANES]; tasks];
        let mut sign_total = 0i64;
        let mut undecided = Vec::new();
        for off in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - off);
            let rows: Vec<&[f32]> = d.values.iter().map(|col| &col[off..off + len]).collect();
            let chunk = Chunk {
                rows: &rows,
                sub: &zeros[..len],
                base: &d.base[off..off + len],
                cuts: &cuts,
                zero_sign: 0.0,
                lambda: opt.lambda,
                out: &mut out[..len],
                masks: &mut masks[..len.div_ceil(TIES_LANES)],
                kept: &mut kept,
            };
            let total = ties_kernel(simd, opt.aggregate, false, chunk);
            sign_total += i64::from(total);
            let at = &d.at[off..off + len];
            // The deferred entries are sparse in the outputs: each one's output line is prefetched
            // [`SETTLE_AHEAD`] entries ahead, so that many misses overlap.
            for (e, (&i, &v)) in at.iter().zip(&out[..len]).enumerate() {
                if let Some(&next) = d.at.get(off + e + SETTLE_AHEAD) {
                    prefetch(&values[next as usize]);
                }
                values[i as usize] = v;
            }
            for (b, &m) in masks[..len.div_ceil(TIES_LANES)].iter().enumerate() {
                let mut und = u32::from(m) >> UNDECIDED_SHIFT;
                while und != 0 {
                    undecided.push((kk, at[b * TIES_LANES + und.trailing_zeros() as usize] as usize));
                    und &= und - 1;
                }
            }
        }
        (sign_total, undecided)
    };
    let items: Vec<(&Deferred, &mut Vec<f32>)> = pass.deferred.iter().zip(pass.values.iter_mut()).collect();
    // Largest lists first.
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&k| core::cmp::Reverse(items[k].0.at.len()));
    for (sign_total, undecided) in map_jobs(exec, items, &order, decide) {
        pass.sign_total += sign_total;
        pass.undecided.extend_from_slice(&undecided);
    }
    Some(thresholds)
}

/// Entries whose trimmed sum is exactly zero (but not every entry zero) take the sign of the sum of
/// the sign vector (FusionBench: positive selects the positive entries, otherwise the negative
/// ones).
fn resolve_undecided(flat: &Flat<'_>, src: &dyn TaskVectors, trim: &Trim, opt: &TiesOptions, pass: &mut PassOut) {
    let tasks = flat.tasks();
    let mut one = vec![0.0f32; tasks];
    for &(kk, i) in &pass.undecided {
        for (t, v) in one.iter_mut().enumerate() {
            src.fill(t, kk, i, core::slice::from_mut(v));
            trim.apply(t, kk, i, core::slice::from_mut(v));
        }
        let merged = disjoint(tasks, |t| one[t], pass.sign_total > 0, opt.aggregate);
        pass.values[kk][i] = flat.base[kk][i] + opt.lambda * merged;
    }
}

/// At most this many entries are deferred (kept with every task's value) before the merge falls
/// back to the exact path, which finds the thresholds first.
fn deferral_limit(total: usize) -> usize {
    (total / 16).max(1 << 20)
}

/// Where the merge pass looks for task t's global threshold: abs bit patterns below `lo` are
/// trimmed (and counted), from `hi` on kept; the nonzero ones in `[lo, hi)` leave their entry
/// deferred until the threshold is known. `lo >= 1`, so the zeros are among the counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    lo: u32,
    hi: u32,
}

/// How the windows are sampled: one block of [`SAMPLE_BLOCK`] consecutive entries at a random
/// offset in each `stride` entries of the global index (every entry when d <= `full`), the window
/// spanning `z` binomial standard deviations of the sample rank plus `slack` ranks either side of
/// the threshold's expected sample rank, moved by `shift` sample ranks (tests only).
#[derive(Clone, Copy, Debug)]
struct Sampling {
    stride: usize,
    full: usize,
    z: f64,
    slack: f64,
    shift: f64,
}

const SAMPLE_BLOCK: usize = 64;
/// How many pieces ahead the sample prefetches.
const SAMPLE_AHEAD: usize = 2;
/// How many deferred entries ahead the settling prefetches their output lines.
const SETTLE_AHEAD: usize = 32;
/// The sample's pieces are read in this many groups (jobs; the result does not depend on it).
const SAMPLE_GROUPS: usize = 16;
const SAMPLING: Sampling = Sampling { stride: 2048, full: 1 << 17, z: 5.0, slack: SAMPLE_BLOCK as f64, shift: 0.0 };

/// The 0-based rank (ascending abs value, over all d merged entries) of each task's threshold:
/// the entry of 1-based rank d - floor(d k); None when that is 0 (keep everything).
fn threshold_rank(d: usize, k: f64) -> Option<usize> {
    let keep = libm::floor(d as f64 * k) as usize;
    (d - keep.min(d)).checked_sub(1)
}

/// Per task, a window that holds its threshold (rank `q`) with high probability, from the order
/// statistics of a sample of its abs values (the same deterministic positions for every task).
/// Also returns the number of entries the merge pass can be expected to defer (those with some task's
/// value inside its window), estimated from the sample, in all and per tensor.
/// The pieces are read in groups as jobs on `exec`, the windows chosen in one job per task.
fn sample_windows(
    flat: &Flat<'_>,
    src: &dyn TaskVectors,
    q: usize,
    s: Sampling,
    exec: &dyn Executor,
) -> (Vec<Window>, Expected) {
    use rand::RngExt;
    let d = flat.total();
    let stride = if d <= s.full { SAMPLE_BLOCK } else { s.stride.max(SAMPLE_BLOCK) };
    let mut rng = crate::rng::stream(0, &[b"ties-threshold-sample"]);
    let blocks: Vec<(usize, usize)> = (0..d)
        .step_by(stride)
        .map(|start| {
            let span = stride.min(d - start);
            let off =
                if span > SAMPLE_BLOCK { rng.random_range(0..(span - SAMPLE_BLOCK + 1) as u64) as usize } else { 0 };
            (start + off, SAMPLE_BLOCK.min(span - off))
        })
        .collect();
    let offsets = flat.offsets();
    let n_s: usize = blocks.iter().map(|b| b.1).sum();
    let p = (q as f64 + 0.5) / d as f64;
    let center = p * n_s as f64 + s.shift;
    let margin = s.z * libm::sqrt(n_s as f64 * p * (1.0 - p)) + s.slack;
    let (lo_r, hi_r) = (libm::floor(center - margin), libm::ceil(center + margin));
    // The blocks as pieces of tensors: (tensor, offset, length).
    let mut pieces: Vec<(usize, usize, usize)> = Vec::with_capacity(blocks.len() + flat.names.len());
    let mut k = 0;
    for &(mut g, mut left) in &blocks {
        while left > 0 {
            while g >= offsets[k] + flat.len(k) {
                k += 1;
            }
            let off = g - offsets[k];
            let n = left.min(flat.len(k) - off);
            pieces.push((k, off, n));
            g += n;
            left -= n;
        }
    }
    // Piece by piece, every task at once (the pieces are far apart in memory; one piece's rows are
    // independent reads whose cache misses overlap); the pieces in groups, one job each.
    let tasks = flat.tasks();
    let groups: Vec<&[(usize, usize, usize)]> = pieces.chunks(pieces.len().div_ceil(SAMPLE_GROUPS).max(1)).collect();
    let gather = |_: usize, group: &[(usize, usize, usize)]| -> Vec<Vec<u32>> {
        let len: usize = group.iter().map(|p| p.2).sum();
        let mut samples: Vec<Vec<u32>> = (0..tasks).map(|_| Vec::with_capacity(len)).collect();
        let mut buf = [0.0f32; SAMPLE_BLOCK];
        let mut bits = [0u32; SAMPLE_BLOCK];
        // The pieces are far apart: each one's cache lines (every task's and the base's) are
        // prefetched [`SAMPLE_AHEAD`] pieces ahead, so that their misses overlap (plain sources).
        let prefetch_piece = |&(k, off, n): &(usize, usize, usize)| {
            if src.plain() {
                for r in flat.models.iter().map(|m| &m[k][off..off + n]).chain([&flat.base[k][off..off + n]]) {
                    r.iter().step_by(16).chain(r.last()).for_each(prefetch);
                }
            }
        };
        for next in group.iter().take(SAMPLE_AHEAD) {
            prefetch_piece(next);
        }
        for (i, &(k, off, n)) in group.iter().enumerate() {
            if let Some(next) = group.get(i + SAMPLE_AHEAD) {
                prefetch_piece(next);
            }
            for (t, sample) in samples.iter_mut().enumerate() {
                src.fill(t, k, off, &mut buf[..n]);
                for (b, x) in bits.iter_mut().zip(&buf) {
                    *b = x.abs().to_bits();
                }
                sample.extend_from_slice(&bits[..n]);
            }
        }
        samples
    };
    let order: Vec<usize> = (0..groups.len()).collect();
    // parts[g][t]: task t's sampled abs bits in group g (the sample is the groups in order).
    let parts = map_jobs(exec, groups.clone(), &order, gather);
    // Per task (one job each): the window from the order statistics of its whole sample.
    let window = |t: usize, (): ()| -> Window {
        let values: Vec<&[u32]> = parts.iter().map(|part| &part[t][..]).collect();
        let clamp = |r: f64| (r.max(0.0) as usize).min(n_s.saturating_sub(1));
        let (os_lo, os_hi) = order_statistics(&values, clamp(lo_r), clamp(hi_r));
        let lo = if lo_r < 0.0 {
            1
        } else if (lo_r as usize) < n_s {
            os_lo.max(1)
        } else {
            0x8000_0000
        };
        let hi = if hi_r < 0.0 {
            0
        } else if (hi_r as usize) < n_s {
            os_hi + 1
        } else {
            0x8000_0000
        };
        Window { lo: lo.min(0x7fff_ffff), hi: hi.max(lo.min(0x7fff_ffff) + 1) }
    };
    let order: Vec<usize> = (0..tasks).collect();
    let windows = map_jobs(exec, vec![(); tasks], &order, window);
    // Per group (one job each): per piece, its sampled entries (same positions in every task)
    // with some task's value inside its window.
    let count_hits = |g: usize, part: &Vec<Vec<u32>>| -> Vec<usize> {
        let mut inside = vec![0u8; part.first().map_or(0, Vec::len)];
        for (sample, w) in part.iter().zip(&windows) {
            let width = w.hi - w.lo;
            for (f, &bits) in inside.iter_mut().zip(sample) {
                *f |= u8::from(bits.wrapping_sub(w.lo) < width);
            }
        }
        let mut at = 0;
        groups[g]
            .iter()
            .map(|&(_, _, n)| {
                let hits = inside[at..at + n].iter().map(|&f| usize::from(f)).sum();
                at += n;
                hits
            })
            .collect()
    };
    let order: Vec<usize> = (0..parts.len()).collect();
    let hits = map_jobs(exec, parts.iter().collect(), &order, count_hits);
    // Each sampled entry stands for d / n_s entries.
    let scale = d as f64 / n_s.max(1) as f64;
    let mut per_tensor = vec![0.0f64; flat.names.len()];
    for (&(k, _, _), &h) in groups.iter().flat_map(|g| g.iter()).zip(hits.iter().flatten()) {
        per_tensor[k] += h as f64 * scale;
    }
    let hits: usize = hits.iter().flatten().sum();
    (windows, Expected { total: hits as f64 * scale, per_tensor })
}

/// The values of ranks `lo <= hi` (0-based, ascending; `hi` below their count) among the values of
/// `pieces` taken as one sequence: exactly what sorting would give. The values are copied only when
/// the fast path ([`bracketed_order_statistics`]) misses.
fn order_statistics(pieces: &[&[u32]], lo: usize, hi: usize) -> (u32, u32) {
    if let Some(found) = bracketed_order_statistics(pieces, lo, hi) {
        return found;
    }
    let mut scratch: Vec<u32> = Vec::with_capacity(pieces.iter().map(|p| p.len()).sum());
    for piece in pieces {
        scratch.extend_from_slice(piece);
    }
    let (_, &mut a, right) = scratch.select_nth_unstable(lo);
    let b = if hi > lo { *right.select_nth_unstable(hi - lo - 1).1 } else { a };
    (a, b)
}

/// Every how many values the bracketing sub-sample takes one.
const BRACKET_STRIDE: usize = 16;

/// [`order_statistics`] by bracketing: the order statistics of a strided sub-sample a margin
/// below `lo / stride` and above `hi / stride` give bounds `[a, b]`; one pass counts the values
/// below `a` and keeps those inside (a few percent), and the ranks are selected among those. None
/// when the bounds do not hold both ranks (then the values below `a` number more than `lo`, or
/// those up to `b` not more than `hi`).
fn bracketed_order_statistics(pieces: &[&[u32]], lo: usize, hi: usize) -> Option<(u32, u32)> {
    // The sub-sample: every BRACKET_STRIDE-th value of the sequence.
    let mut sub: Vec<u32> = Vec::with_capacity(pieces.iter().map(|p| p.len()).sum::<usize>() / BRACKET_STRIDE + 1);
    let mut at = 0;
    for piece in pieces {
        let first = (BRACKET_STRIDE - at % BRACKET_STRIDE) % BRACKET_STRIDE;
        sub.extend(piece.iter().skip(first).step_by(BRACKET_STRIDE));
        at += piece.len();
    }
    let m = sub.len();
    let margin = 4 * libm::sqrt(m as f64) as usize + 64;
    let (ra, rb) = ((lo / BRACKET_STRIDE).saturating_sub(margin), hi / BRACKET_STRIDE + margin);
    let a = if ra == 0 { 0 } else { *sub.select_nth_unstable(ra).1 };
    let b = if rb >= m { u32::MAX } else { *sub.select_nth_unstable(rb).1 };
    drop(sub);
    // Counted first (vectorised), then the values inside compacted without a branch per value
    // (one slot of slack takes the writes of the values outside).
    let (mut below, mut upto) = (0usize, 0usize);
    for piece in pieces {
        for &x in *piece {
            below += usize::from(x < a);
            upto += usize::from(x <= b);
        }
    }
    if lo < below || hi >= upto {
        return None;
    }
    let mut inside = vec![0u32; upto - below + 1];
    let mut n = 0;
    for piece in pieces {
        for &x in *piece {
            inside[n] = x;
            n += usize::from(x >= a && x <= b);
        }
    }
    inside.truncate(upto - below);
    let (_, &mut x, right) = inside.select_nth_unstable(lo - below);
    let y = if hi > lo { *right.select_nth_unstable(hi - lo - 1).1 } else { x };
    Some((x, y))
}

/// The sample's estimate of the entries the window pass defers: in all and per tensor.
struct Expected {
    total: f64,
    per_tensor: Vec<f64>,
}

/// The TIES merge of the task vectors from `src`: trim, elect, disjoint merge, theta0 + lambda *
/// merged (see METHODS.md).
///
/// Global scope, in one chunked pass over the task vectors: per task a window around its
/// threshold from a small sample of its entries ([`SAMPLING`]), then the merge itself, which
/// counts the entries below each window and sets aside, with their task values, the few entries
/// whose trim depends on where the threshold falls inside a window; those are settled once the
/// exact thresholds are known. The result is bitwise the same as trimming with exact thresholds
/// first (tested). When a threshold turns out not to lie in its window, or the sample predicts (or
/// the pass meets) more than [`deferral_limit`] deferred entries, a full magnitude histogram of
/// every task gives the windows instead (one bucket each, which cannot miss), and when those hold
/// too many entries, the exact path runs: a pass that collects the members of each threshold's
/// bucket, then the merge pass with the exact thresholds.
///
/// The sample of the windows, the merge pass, the settling of the deferred entries and the
/// per-tensor trim keys run as jobs on `exec` (per group of sample pieces, tensor or task),
/// bitwise the same for any executor; the fallbacks' histogram and bucket passes and the few
/// undecided entries stay on the calling thread.
pub(crate) fn ties_on(
    flat: &Flat<'_>,
    src: &dyn TaskVectors,
    opt: &TiesOptions,
    exec: &dyn Executor,
) -> ParamSet<'static> {
    ties_with(flat, src, opt, deferral_limit(flat.total()), SAMPLING, Simd::detect(), exec).0
}

/// Which way [`ties_with`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Per-tensor trim (exact keys first).
    Tensor,
    /// Global trim, sampled windows.
    Sampled,
    /// Global trim, windows from the buckets of a full magnitude histogram.
    Histogram,
    /// Global trim, exact thresholds first.
    Exact,
}

/// The window pass and its settling; None when a threshold is not in its window or the pass
/// deferred more than `limit` entries.
#[allow(clippy::too_many_arguments)]
fn window_pass(
    flat: &Flat<'_>,
    src: &dyn TaskVectors,
    opt: &TiesOptions,
    windows: &[Option<Window>],
    q: usize,
    room: &[usize],
    limit: usize,
    simd: Simd,
    exec: &dyn Executor,
) -> Option<(Trim, PassOut)> {
    let mut pass = merge_pass(flat, src, opt, Mode::Windows(windows), room, limit, simd, exec);
    if pass.overflow {
        return None;
    }
    settle(windows, q, opt, &mut pass, simd, exec).map(|thr| (Trim::Global(thr), pass))
}

fn ties_with(
    flat: &Flat<'_>,
    src: &dyn TaskVectors,
    opt: &TiesOptions,
    limit: usize,
    sampling: Sampling,
    simd: Simd,
    exec: &dyn Executor,
) -> (ParamSet<'static>, Path) {
    let tasks = flat.tasks();
    let (trim, mut pass, path) = match (opt.scope, threshold_rank(flat.total(), opt.k)) {
        (Scope::Tensor, _) => {
            let trim = Trim::Tensor(tensor_keys(flat, src, opt.k, exec));
            let pass = merge_pass(flat, src, opt, Mode::Exact(&trim), &[], usize::MAX, simd, exec);
            (trim, pass, Path::Tensor)
        }
        (Scope::Global, None) => {
            // Nothing trimmed, nothing deferred.
            let windows = vec![None; tasks];
            let pass = merge_pass(flat, src, opt, Mode::Windows(&windows), &[], usize::MAX, simd, exec);
            (Trim::Global(vec![None; tasks]), pass, Path::Sampled)
        }
        (Scope::Global, Some(q)) => {
            let (windows, expected) = sample_windows(flat, src, q, sampling, exec);
            let windows: Vec<Option<Window>> = windows.into_iter().map(Some).collect();
            let sampled = if expected.total <= limit as f64 {
                // Room for a few more than the sample's estimate.
                let room: Vec<usize> = expected.per_tensor.iter().map(|&e| (e * 1.05) as usize + 256).collect();
                window_pass(flat, src, opt, &windows, q, &room, limit, simd, exec)
            } else {
                None
            };
            match sampled {
                Some((trim, pass)) => (trim, pass, Path::Sampled),
                None => {
                    // A full histogram places each threshold in one bucket: those are the windows
                    // (they cannot miss), unless they hold too many entries to defer.
                    let hist = magnitude_histograms(flat, src);
                    let bands = bands(flat, &hist, opt.k);
                    drop(hist);
                    let windows: Vec<Option<Window>> =
                        bands.iter().map(|b| Some(Window { lo: b.lo.max(1), hi: b.hi })).collect();
                    let counted = bands.iter().map(|b| b.count).sum::<usize>();
                    let bucketed = if counted <= limit {
                        // Room in proportion to each tensor's share of the entries.
                        let d = flat.total() as f64;
                        let room: Vec<usize> = (0..flat.names.len())
                            .map(|k| (counted as f64 * flat.len(k) as f64 / d) as usize + 256)
                            .collect();
                        window_pass(flat, src, opt, &windows, q, &room, limit, simd, exec)
                    } else {
                        None
                    };
                    match bucketed {
                        Some((trim, pass)) => (trim, pass, Path::Histogram),
                        None => {
                            let trim = Trim::Global(band_thresholds(flat, src, &bands));
                            let pass = merge_pass(flat, src, opt, Mode::Exact(&trim), &[], usize::MAX, simd, exec);
                            (trim, pass, Path::Exact)
                        }
                    }
                }
            }
        }
    };
    resolve_undecided(flat, src, &trim, opt, &mut pass);
    (flat.output(pass.values), path)
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

#[cfg(test)]
mod tests {
    use super::super::executor::testexec::{Reverse, Shuffled};
    use super::super::testutil::*;
    use super::*;
    use rand::RngExt;

    /// A test source: the plain task vectors with a fixed pattern of entries dropped and the
    /// rest scaled (like DARE), to run the kernels through a source other than `Flat`.
    struct Masked<'f, 's>(&'f Flat<'s>);

    impl TaskVectors for Masked<'_, '_> {
        fn fill(&self, t: usize, k: usize, off: usize, out: &mut [f32]) {
            self.0.tau(t, k, off, out);
            for (i, x) in out.iter_mut().enumerate() {
                let h = ((off + i) as u64 * 2_654_435_761 + (t * 97 + k * 13) as u64) % 7;
                *x = if h < 3 { 0.0 } else { *x * 1.75 };
            }
        }
    }

    /// TIES straight from METHODS.md, one entry at a time: per task the threshold from a full
    /// sort, trim, sum, elect (a zero sum takes the sign of the sum of the signs), disjoint merge,
    /// with the f32 operations in the kernel's order.
    fn naive(flat: &Flat<'_>, src: &dyn TaskVectors, opt: &TiesOptions) -> Vec<Vec<f32>> {
        let tasks = flat.tasks();
        let d = flat.total();
        let taus: Vec<Vec<f32>> = (0..tasks)
            .map(|t| {
                let mut v = Vec::with_capacity(d);
                for k in 0..flat.names.len() {
                    let mut x = vec![0.0f32; flat.len(k)];
                    src.fill(t, k, 0, &mut x);
                    v.extend(x);
                }
                v
            })
            .collect();
        let rank = d - libm::floor(d as f64 * opt.k) as usize;
        let trimmed: Vec<Vec<f32>> = taus
            .iter()
            .map(|v| {
                if rank == 0 {
                    return v.clone();
                }
                let mut a: Vec<f32> = v.iter().map(|x| x.abs()).collect();
                a.sort_by(f32::total_cmp);
                let thr = a[rank - 1];
                v.iter().map(|&x| if x.abs() >= thr { x } else { 0.0 }).collect()
            })
            .collect();
        let mut signs = vec![0.0f32; d];
        let mut total = 0i64;
        for (g, e) in signs.iter_mut().enumerate() {
            let s = (0..tasks).fold(0.0f32, |s, t| s + trimmed[t][g]);
            *e = if s > 0.0 {
                1.0
            } else if s < 0.0 {
                -1.0
            } else {
                0.0
            };
            total += *e as i64;
        }
        let majority = if total > 0 { 1.0 } else { -1.0 };
        let base: Vec<f32> = flat.base.iter().flat_map(|b| b.iter().copied()).collect();
        let merged: Vec<f32> = (0..d)
            .map(|g| {
                let e = if signs[g] != 0.0 { signs[g] } else { majority };
                let xs: Vec<f32> = (0..tasks).map(|t| trimmed[t][g]).collect();
                merged_entry(base[g], &xs, e, opt)
            })
            .collect();
        let mut out = Vec::new();
        let mut off = 0;
        for k in 0..flat.names.len() {
            out.push(merged[off..off + flat.len(k)].to_vec());
            off += flat.len(k);
        }
        out
    }

    /// The output entry from the trimmed values at one entry and its elected sign `e`, as
    /// METHODS.md states the disjoint merge (the kernel must give the same bits).
    #[inline]
    fn merged_entry(base: f32, xs: &[f32], e: f32, opt: &TiesOptions) -> f32 {
        let mut a = 0.0f32;
        let mut c = 0.0f32;
        for &x in xs {
            let keep = x * e > 0.0;
            a += if keep { x } else { 0.0 };
            c += if keep { 1.0 } else { 0.0 };
        }
        match opt.aggregate {
            Aggregate::Sum => base + opt.lambda * a,
            Aggregate::Mean => base + opt.lambda * (a / c.max(1.0)),
        }
    }

    fn bits(p: &ParamSet<'_>, names: &[String]) -> Vec<Vec<u32>> {
        names.iter().map(|n| values(p, n).iter().map(|x| x.to_bits()).collect()).collect()
    }

    /// The sampled path (windows, deferred entries settled at the end), the exact path (histogram,
    /// bucket members, exact pass) and the naive reference agree bit for bit: dense and sparse task
    /// vectors, repeated magnitudes, a threshold among the zeros, tensors that end mid-chunk, both
    /// aggregations, the plain and a masked source, k from the tails to 1; also with windows forced
    /// narrow (no margin), windows that miss the threshold from above and from below (the exact
    /// path takes over), and a deferral limit of 0.
    #[test]
    fn sampled_windows_equal_exact_thresholds_and_the_naive_reference() {
        let sizes = [(5000usize, "a"), (37, "b"), (CHUNK * 2 + 3, "c"), (1, "d")];
        // Sparse: one block in 256 entries (the default samples every entry of a set this small).
        let sparse = Sampling { stride: 256, full: 0, ..SAMPLING };
        let narrow = Sampling { z: 0.0, slack: 0.0, ..sparse };
        let above = Sampling { shift: 1e12, ..sparse };
        let below = Sampling { shift: -1e12, ..sparse };
        let wide = Sampling { z: 1e9, ..sparse };
        let mut paths = Vec::new();
        for (case, zero_share) in [(0u64, 0.0f32), (1, 0.3), (2, 0.9)] {
            let mut rng = crate::rng::stream(case, &[b"ties-kernel-test"]);
            let tasks = 5;
            let mut draw = |quantise: bool| -> f32 {
                if rng.random::<f32>() < zero_share {
                    return 0.0;
                }
                let x = (rng.random::<f32>() - 0.5) * libm::powf(10.0, rng.random::<f32>() * 3.0 - 3.0);
                if quantise { libm::roundf(x * 256.0) / 256.0 } else { x }
            };
            let base_t: Vec<(&str, Vec<usize>, Vec<f32>)> =
                sizes.iter().map(|&(n, name)| (name, vec![n], (0..n).map(|_| draw(false)).collect())).collect();
            let base = set(&base_t.iter().map(|(n, s, v)| (*n, &s[..], &v[..])).collect::<Vec<_>>());
            let models: Vec<ParamSet<'static>> = (0..tasks)
                .map(|t| {
                    let m: Vec<(&str, Vec<usize>, Vec<f32>)> = base_t
                        .iter()
                        .map(|(n, s, b)| (*n, s.clone(), b.iter().map(|&x| x + draw(t % 2 == 1)).collect()))
                        .collect();
                    set(&m.iter().map(|(n, s, v)| (*n, &s[..], &v[..])).collect::<Vec<_>>())
                })
                .collect();
            let names = names(&base);
            let input = MergeInput { base: &base, models: &models, model_weights: None, names: &names, seed: 0 };
            let flat = Flat::new(&input);
            let masked = Masked(&flat);
            for k in [0.2, 0.05, 0.73, 0.9999, 1e-4, 1.0] {
                for aggregate in [Aggregate::Sum, Aggregate::Mean] {
                    let opt = TiesOptions { k, lambda: 0.3, aggregate, scope: Scope::Global };
                    for src in [&flat as &dyn TaskVectors, &masked] {
                        let reference: Vec<Vec<u32>> =
                            naive(&flat, src, &opt).iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect();
                        let runs = [
                            ("sampled", usize::MAX, sparse),
                            ("default", usize::MAX, SAMPLING),
                            ("limit 0", 0, SAMPLING),
                            ("narrow", usize::MAX, narrow),
                            ("above", usize::MAX, above),
                            ("below", usize::MAX, below),
                            ("wide", flat.total() / 2, wide),
                        ];
                        for (what, limit, sampling) in runs {
                            // The baseline kernel here, the widest this CPU has below (AVX2 on
                            // x86-64 CI machines): both against the reference.
                            let (out, path) = ties_with(&flat, src, &opt, limit, sampling, Simd::Baseline, &Sequential);
                            assert_eq!(bits(&out, &names), reference, "case {case} k {k} {aggregate:?} {what}");
                            paths.push((case, k, what, path));
                            // The jobs run in other orders: the same bits, the same way taken.
                            for exec in [&Reverse as &dyn Executor, &Shuffled] {
                                let (out, p) = ties_with(&flat, src, &opt, limit, sampling, Simd::detect(), exec);
                                let at = "with the jobs reordered";
                                assert_eq!(
                                    bits(&out, &names),
                                    reference,
                                    "case {case} k {k} {aggregate:?} {what} {at}"
                                );
                                assert_eq!(p, path, "case {case} k {k} {aggregate:?} {what} {at}");
                            }
                        }
                    }
                }
            }
        }
        let took = |what: &str, path: Path| paths.iter().filter(|p| p.2 == what && p.3 == path).count();
        // k = 1 keeps everything (no threshold, nothing deferred): the sampled path every time.
        assert!(paths.iter().filter(|p| p.1 == 1.0).all(|p| p.3 == Path::Sampled), "{paths:?}");
        // Every other run of the default and of the sparse sampling stays on the sampled path ...
        assert_eq!(took("sampled", Path::Exact) + took("default", Path::Exact), 0, "{paths:?}");
        // ... a window above the threshold always falls back to the histogram's windows; a
        // deferral limit of 0 leads to the exact thresholds (unless nothing is deferred, as with
        // a threshold among the zeros), and a window predicted to defer more than the limit to
        // the histogram's windows or the exact thresholds ...
        let trimmed = |what: &'static str| paths.iter().filter(move |p| p.2 == what && p.1 < 1.0);
        assert!(trimmed("above").all(|p| p.3 == Path::Histogram), "{paths:?}");
        assert!(trimmed("limit 0").all(|p| p.3 != Path::Histogram), "{paths:?}");
        assert!(took("limit 0", Path::Exact) > 20 && took("wide", Path::Histogram) > 10, "{paths:?}");
        assert!(took("wide", Path::Exact) > 0, "{paths:?}");
        // ... and a window below the threshold too, except where the threshold is among the zeros
        // (the window then starts at 1 and the count of zeros places it).
        assert!(took("below", Path::Histogram) > 0 && took("below", Path::Sampled) > 6, "{paths:?}");
    }

    /// On a larger set (the default sample then reads 1/32 of the entries) the default windows hold
    /// the thresholds and few entries are deferred; the result equals the naive reference.
    /// The order statistics equal sorting's, by the bracketing fast path on ordinary values (with
    /// many repeats) and by the full selection when the sub-sample misleads the bracket.
    #[test]
    fn order_statistics_equal_sorting_on_both_paths() {
        use rand::RngExt;
        let mut rng = crate::rng::stream(5, &[b"order-statistics"]);
        let values: Vec<u32> = (0..50_000).map(|_| rng.random_range(0..20_000u32)).collect();
        let pieces: Vec<&[u32]> = values.chunks(777).collect();
        let mut sorted = values.clone();
        sorted.sort_unstable();
        for (lo, hi) in [(0, 0), (0, 10), (123, 456), (40_000, 40_100), (49_990, 49_999), (25_000, 25_000)] {
            assert_eq!(bracketed_order_statistics(&pieces, lo, hi), Some((sorted[lo], sorted[hi])), "{lo} {hi}");
            assert_eq!(order_statistics(&pieces, lo, hi), (sorted[lo], sorted[hi]));
        }
        // Every sub-sampled value (each BRACKET_STRIDE-th) small, all others large: the bracket
        // around rank 30 000 holds only small values, so the fast path declines.
        let skewed: Vec<u32> = (0..50_000u32)
            .map(|i| if (i as usize).trailing_zeros() >= BRACKET_STRIDE.trailing_zeros() { i } else { 1_000_000 + i })
            .collect();
        let pieces: Vec<&[u32]> = skewed.chunks(1000).collect();
        let mut sorted = skewed.clone();
        sorted.sort_unstable();
        assert_eq!(bracketed_order_statistics(&pieces, 30_000, 30_050), None);
        assert_eq!(order_statistics(&pieces, 30_000, 30_050), (sorted[30_000], sorted[30_050]));
    }

    #[test]
    fn sampled_windows_hold_the_threshold_on_a_larger_set() {
        let mut rng = crate::rng::stream(9, &[b"ties-sample-test"]);
        let n = 400_000;
        let tasks = 3;
        // Tensors of different scales, so that a sample must cover all of them.
        let scales = [1.0f32, 0.01, 0.3, 3.0];
        let base_v: Vec<Vec<f32>> =
            scales.iter().map(|_| (0..n / 4).map(|_| rng.random::<f32>() - 0.5).collect()).collect();
        let tensor_names = ["a", "b", "c", "d"];
        let shape = [n / 4];
        let base = set(&tensor_names.iter().zip(&base_v).map(|(nm, v)| (*nm, &shape[..], &v[..])).collect::<Vec<_>>());
        let model_v: Vec<Vec<Vec<f32>>> = (0..tasks)
            .map(|_| {
                base_v
                    .iter()
                    .zip(scales)
                    .map(|(b, sc)| b.iter().map(|&x| x + sc * (rng.random::<f32>() - 0.5)).collect())
                    .collect()
            })
            .collect();
        let models: Vec<ParamSet<'static>> = model_v
            .iter()
            .map(|m| set(&tensor_names.iter().zip(m).map(|(nm, v)| (*nm, &shape[..], &v[..])).collect::<Vec<_>>()))
            .collect();
        let names = names(&base);
        let input = MergeInput { base: &base, models: &models, model_weights: None, names: &names, seed: 0 };
        let flat = Flat::new(&input);
        let opt = TiesOptions { k: 0.2, lambda: 0.3, aggregate: Aggregate::Sum, scope: Scope::Global };
        let q = threshold_rank(flat.total(), opt.k).unwrap();
        let (windows, estimate) = sample_windows(&flat, &flat, q, SAMPLING, &Sequential);
        // The sample's groups and the tasks' windows as jobs in other orders: the same windows.
        for exec in [&Reverse as &dyn Executor, &Shuffled] {
            let (w, e) = sample_windows(&flat, &flat, q, SAMPLING, exec);
            assert_eq!((w, e.total, e.per_tensor), (windows.clone(), estimate.total, estimate.per_tensor.clone()));
        }
        let windows: Vec<Option<Window>> = windows.into_iter().map(Some).collect();
        let pass =
            merge_pass(&flat, &flat, &opt, Mode::Windows(&windows), &[], usize::MAX, Simd::detect(), &Sequential);
        let deferred = pass.deferred_count();
        assert!(deferred < n / 5, "{deferred} deferred of {n}");
        // The sample's estimate of the deferred entries is close.
        let expected = estimate.total;
        assert!((expected - deferred as f64).abs() < 0.2 * deferred as f64, "{expected} expected, {deferred} deferred");
        // Per tensor too (the tensors differ in scale, so in their share of the deferred entries).
        for (k, (e, part)) in estimate.per_tensor.iter().zip(&pass.deferred).enumerate() {
            let got = part.at.len() as f64;
            assert!((e - got).abs() < 0.25 * got + 1000.0, "tensor {k}: {e} expected, {got} deferred");
        }
        let got: Vec<usize> = pass.deferred.iter().map(|p| p.at.len()).collect();
        assert!(got.iter().max() > Some(&(3 * got.iter().min().unwrap() + 2000)), "{got:?}");
        let reference: Vec<Vec<u32>> =
            naive(&flat, &flat, &opt).iter().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect();
        for exec in [&Sequential as &dyn Executor, &Reverse, &Shuffled] {
            let (out, path) =
                ties_with(&flat, &flat, &opt, deferral_limit(flat.total()), SAMPLING, Simd::detect(), exec);
            assert_eq!(path, Path::Sampled);
            assert_eq!(bits(&out, &names), reference);
        }
        // A deferral limit just below the pass's count overflows (whatever the job order), one at
        // the count does not.
        for exec in [&Sequential as &dyn Executor, &Reverse, &Shuffled] {
            let w = Mode::Windows(&windows);
            assert!(merge_pass(&flat, &flat, &opt, w, &[], deferred - 1, Simd::detect(), exec).overflow);
            let w = Mode::Windows(&windows);
            assert!(!merge_pass(&flat, &flat, &opt, w, &[], deferred, Simd::detect(), exec).overflow);
        }
    }

    /// Random tensors (sizes that end mid-chunk, one of a single entry), `tasks` fine-tuned models
    /// with task vectors of spread magnitudes, some entries exactly equal to the base.
    fn random_input(seed: u64, tasks: usize) -> (ParamSet<'static>, Vec<ParamSet<'static>>) {
        let sizes = [(CHUNK + 77, "a"), (300usize, "b"), (CHUNK * 3 + 5, "c"), (1, "d"), (2 * CHUNK, "e")];
        let mut rng = crate::rng::stream(seed, &[b"executor-test"]);
        let base_t: Vec<(&str, Vec<f32>)> =
            sizes.iter().map(|&(n, name)| (name, (0..n).map(|_| rng.random::<f32>() - 0.5).collect())).collect();
        let to_set = |v: &[(&str, Vec<f32>)]| {
            let shapes: Vec<[usize; 1]> = v.iter().map(|(_, x)| [x.len()]).collect();
            set(&v.iter().zip(&shapes).map(|((n, x), s)| (*n, &s[..], &x[..])).collect::<Vec<_>>())
        };
        let models = (0..tasks)
            .map(|_| {
                let m: Vec<(&str, Vec<f32>)> = base_t
                    .iter()
                    .map(|(n, b)| {
                        let v = b
                            .iter()
                            .map(|&x| {
                                if rng.random::<f32>() < 0.1 {
                                    return x;
                                }
                                x + (rng.random::<f32>() - 0.5) * libm::powf(10.0, rng.random::<f32>() * 3.0 - 3.0)
                            })
                            .collect();
                        (*n, v)
                    })
                    .collect();
                to_set(&m)
            })
            .collect();
        (to_set(&base_t), models)
    }

    /// The weighted sum, one job per tensor, in any job order equals the reference order of f32
    /// operations (acc = 0, acc += w_t tau_t in task order, then + base), for the plain and a
    /// masked source.
    #[test]
    fn weighted_sum_on_any_executor_equals_the_reference() {
        let (base, models) = random_input(3, 4);
        let names = names(&base);
        let input = MergeInput { base: &base, models: &models, model_weights: None, names: &names, seed: 0 };
        let flat = Flat::new(&input);
        let masked = Masked(&flat);
        let coef = [0.3f32, -1.25, 0.7, 2.0];
        for src in [&flat as &dyn TaskVectors, &masked] {
            let reference: Vec<Vec<u32>> = (0..names.len())
                .map(|k| {
                    let n = flat.len(k);
                    let taus: Vec<Vec<f32>> = (0..4)
                        .map(|t| {
                            let mut v = vec![0.0f32; n];
                            src.fill(t, k, 0, &mut v);
                            v
                        })
                        .collect();
                    (0..n)
                        .map(|i| {
                            let acc = (0..4).fold(0.0f32, |a, t| a + coef[t] * taus[t][i]);
                            (acc + flat.base[k][i]).to_bits()
                        })
                        .collect()
                })
                .collect();
            for exec in [&Sequential as &dyn Executor, &Reverse, &Shuffled] {
                assert_eq!(bits(&weighted_sum_on(&flat, src, &coef, exec), &names), reference);
            }
        }
    }

    /// TIES with the per-tensor trim (mergekit: per tensor and task keep exactly floor(k n) entries
    /// by magnitude, ties to the lower index; a zero sum elects +1), in any job order, equals a
    /// naive per-entry computation from sorted keys.
    #[test]
    fn tensor_scope_on_any_executor_equals_the_naive_reference() {
        let (base, models) = random_input(5, 3);
        let names = names(&base);
        let input = MergeInput { base: &base, models: &models, model_weights: None, names: &names, seed: 0 };
        let flat = Flat::new(&input);
        let masked = Masked(&flat);
        for k in [0.2, 0.5, 1e-3, 1.0] {
            for aggregate in [Aggregate::Sum, Aggregate::Mean] {
                let opt = TiesOptions { k, lambda: 0.7, aggregate, scope: Scope::Tensor };
                for src in [&flat as &dyn TaskVectors, &masked] {
                    let reference: Vec<Vec<u32>> = (0..names.len())
                        .map(|kk| {
                            let n = flat.len(kk);
                            let keep = libm::floor(k * n as f64) as usize;
                            let trimmed: Vec<Vec<f32>> = (0..3)
                                .map(|t| {
                                    let mut v = vec![0.0f32; n];
                                    src.fill(t, kk, 0, &mut v);
                                    let mut keys: Vec<u64> =
                                        v.iter().enumerate().map(|(i, &x)| mag_key(x, i)).collect();
                                    keys.sort_unstable();
                                    let kept = &keys[n - keep..];
                                    v.iter()
                                        .enumerate()
                                        .map(|(i, &x)| if kept.binary_search(&mag_key(x, i)).is_ok() { x } else { 0.0 })
                                        .collect()
                                })
                                .collect();
                            (0..n)
                                .map(|i| {
                                    let xs: Vec<f32> = (0..3).map(|t| trimmed[t][i]).collect();
                                    let sum = xs.iter().fold(0.0f32, |a, &x| a + x);
                                    let e = if sum < 0.0 { -1.0 } else { 1.0 };
                                    merged_entry(flat.base[kk][i], &xs, e, &opt).to_bits()
                                })
                                .collect()
                        })
                        .collect();
                    for exec in [&Sequential as &dyn Executor, &Reverse, &Shuffled] {
                        let (out, path) = ties_with(&flat, src, &opt, usize::MAX, SAMPLING, Simd::detect(), exec);
                        assert_eq!(path, Path::Tensor);
                        assert_eq!(bits(&out, &names), reference, "k {k} {aggregate:?}");
                    }
                }
            }
        }
    }
}
