//! Percentile bootstrap intervals over image indices (METHODS.md "Statistics").
//!
//! One resample draws `n` image indices uniformly with replacement from a seeded ChaCha stream
//! (each index is `random_range(0..n as u64)`, so the draws are the same on every platform); the
//! statistic is recomputed on the resampled index list. A statistic over several quantities (a ratio,
//! a ratio of ratios, a pair of models) must read all of them through the same index list: that is
//! the joint resampling the definitions ask for. The interval is the 2.5 and 97.5 percentiles of the
//! resampled statistics with numpy's default `linear` rule ([`percentile_sorted`]).
//!
//! Resamples where the statistic is not available (it returns `None`, e.g. a zero denominator, or a
//! non-finite value) are **dropped**: the percentiles are taken over the kept ones, and
//! [`BootstrapCi::dropped`] says how many were dropped so the report can show it.

use alloc::vec::Vec;

use rand::{Rng, RngExt};

use super::StatsError;

/// Resamples per interval in the study.
pub const DEFAULT_RESAMPLES: usize = 1000;

/// A point estimate and its bootstrap 95% percentile interval.
#[derive(Clone, Debug, PartialEq)]
pub struct BootstrapCi {
    /// The statistic on the original sample (indices 0..n in order); `None` if not available.
    pub estimate: Option<f64>,
    /// 2.5th percentile of the kept resampled statistics; `None` if every resample was dropped.
    pub lo: Option<f64>,
    /// 97.5th percentile of the kept resampled statistics; `None` if every resample was dropped.
    pub hi: Option<f64>,
    /// Resamples whose statistic was available.
    pub kept: usize,
    /// Resamples whose statistic was not available (`None` or non-finite), left out of the interval.
    pub dropped: usize,
}

/// The `q`-th percentile (q in [0, 100]) of ascending `sorted` values, like `numpy.percentile` with
/// its default `method='linear'`: virtual index h = (n - 1) * (q / 100), i = floor(h), g = h - i;
/// at or past the last index the last value; otherwise a = v[i], b = v[i+1] and the value is
/// `a + (b - a) * g` when g < 0.5, `b - (b - a) * (1 - g)` when g >= 0.5 (numpy's `_lerp`).
/// `None` for an empty slice or q outside [0, 100].
pub fn percentile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 || !(0.0..=100.0).contains(&q) {
        return None;
    }
    let h = (n - 1) as f64 * (q / 100.0);
    if h >= (n - 1) as f64 {
        return Some(sorted[n - 1]);
    }
    let i = libm::floor(h) as usize;
    let g = h - i as f64;
    let (a, b) = (sorted[i], sorted[i + 1]);
    let diff = b - a;
    Some(if g >= 0.5 { b - diff * (1.0 - g) } else { a + diff * g })
}

/// [`percentile_sorted`] of unsorted finite values (sorted ascending first).
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile_sorted(&v, q)
}

/// Bootstrap 95% percentile interval of `stat` over `n` items with `resamples` resamples drawn from
/// `rng`. `stat` receives a list of item indices (0..n for the estimate, a resample otherwise).
pub fn bootstrap_ci<R, F>(n: usize, resamples: usize, rng: &mut R, mut stat: F) -> Result<BootstrapCi, StatsError>
where
    R: Rng + ?Sized,
    F: FnMut(&[usize]) -> Option<f64>,
{
    if n == 0 {
        return Err(StatsError::TooFew { test: "bootstrap", needed: 1, got: 0 });
    }
    if resamples == 0 {
        return Err(StatsError::TooFew { test: "bootstrap (resamples)", needed: 1, got: 0 });
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let estimate = stat(&idx).filter(|v| v.is_finite());
    let mut values = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        for slot in idx.iter_mut() {
            *slot = rng.random_range(0..n as u64) as usize;
        }
        if let Some(v) = stat(&idx).filter(|v| v.is_finite()) {
            values.push(v);
        }
    }
    values.sort_by(f64::total_cmp);
    Ok(BootstrapCi {
        estimate,
        lo: percentile_sorted(&values, 2.5),
        hi: percentile_sorted(&values, 97.5),
        kept: values.len(),
        dropped: resamples - values.len(),
    })
}

/// [`bootstrap_ci`] with [`DEFAULT_RESAMPLES`] resamples from the stream
/// `rng::stream(seed, labels)` (labels: the setting and the metric, e.g. `[b"bootstrap", b"asr_cc", ...]`).
pub fn bootstrap_ci_seeded<F>(n: usize, seed: u64, labels: &[&[u8]], stat: F) -> Result<BootstrapCi, StatsError>
where
    F: FnMut(&[usize]) -> Option<f64>,
{
    let mut rng = crate::rng::stream(seed, labels);
    bootstrap_ci(n, DEFAULT_RESAMPLES, &mut rng, stat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::special::assert_rel;

    fn lin(n: usize, mul: usize, modulus: usize, off: f64, scale: f64) -> Vec<f64> {
        (1..=n).map(|i| ((i * mul) % modulus) as f64 - off).map(|v| v * scale).collect()
    }

    /// numpy 2.4.6 `np.percentile(v, q)`, printed by scripts/stats_reference.py.
    #[test]
    fn percentile_matches_numpy() {
        let qs = [0.0, 2.5, 25.0, 50.0, 97.5, 100.0, 33.3];
        let v37 = lin(37, 11, 37, 18.0, 0.125);
        let want37 = [-2.25, -2.1375, -1.125, 0.0, 2.1375, 2.25, -0.751_500_000_000_000_1];
        let v1000 = lin(1000, 7919, 1009, 500.0, 0.001);
        let want1000 =
            [-0.499, -0.474_025_000_000_000_03, -0.24625, 0.0055, 0.483_025, 0.508, -0.162_333_000_000_000_03];
        for (q, w) in qs.iter().zip(want37) {
            assert_eq!(percentile(&v37, *q), Some(w), "v37 q={q}");
        }
        for (q, w) in qs.iter().zip(want1000) {
            let got = percentile(&v1000, *q).unwrap();
            if w == 0.0 {
                assert_eq!(got, w);
            } else {
                assert_rel(got, w, 1e-15, "v1000");
            }
        }
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], 101.0), None);
        assert_eq!(percentile(&[4.0], 2.5), Some(4.0));
    }

    fn mean(values: &[f64], idx: &[usize]) -> Option<f64> {
        Some(idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len() as f64)
    }

    #[test]
    fn deterministic_for_a_seed_and_covers_the_estimate() {
        let x: Vec<f64> = (0..200).map(|i| ((i * 37) % 101) as f64 / 100.0).collect();
        let a = bootstrap_ci_seeded(x.len(), 7, &[b"bootstrap", b"mean"], |idx| mean(&x, idx)).unwrap();
        let b = bootstrap_ci_seeded(x.len(), 7, &[b"bootstrap", b"mean"], |idx| mean(&x, idx)).unwrap();
        let c = bootstrap_ci_seeded(x.len(), 8, &[b"bootstrap", b"mean"], |idx| mean(&x, idx)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.lo, c.lo);
        assert_eq!((a.kept, a.dropped), (DEFAULT_RESAMPLES, 0));
        let (est, lo, hi) = (a.estimate.unwrap(), a.lo.unwrap(), a.hi.unwrap());
        assert!(lo < est && est < hi, "{lo} {est} {hi}");
        // Standard error of the mean is about 0.29 / sqrt(200) = 0.02: the 95% interval spans ~0.08.
        assert!(hi - lo > 0.04 && hi - lo < 0.16, "{lo} {hi}");
    }

    #[test]
    fn resamples_without_a_value_are_dropped_and_counted() {
        // Ratio sum(num)/sum(den) resampled jointly; den is 1 on a single image, so a resample that
        // misses it has no denominator (probability (1 - 1/n)^n, about 0.37 for n = 10).
        let num = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let den = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let ratio = |idx: &[usize]| {
            let d: f64 = idx.iter().map(|&i| den[i]).sum();
            (d > 0.0).then(|| idx.iter().map(|&i| num[i]).sum::<f64>() / d)
        };
        let mut rng = crate::rng::stream(1, &[b"test"]);
        let ci = bootstrap_ci(10, 1000, &mut rng, ratio).unwrap();
        assert_eq!(ci.kept + ci.dropped, 1000);
        assert!(ci.dropped > 250 && ci.dropped < 500, "{}", ci.dropped);
        assert_eq!(ci.estimate, Some(2.0));
        // Every kept resample has the image-0 term and a numerator that counts images 0 and 2.
        assert!(ci.lo.unwrap() >= 1.0);
        let mut rng = crate::rng::stream(1, &[b"test"]);
        let none = bootstrap_ci(10, 50, &mut rng, |_| None).unwrap();
        assert_eq!((none.estimate, none.lo, none.hi, none.kept, none.dropped), (None, None, None, 0, 50));
        assert!(bootstrap_ci(0, 50, &mut rng, |_| Some(1.0)).is_err());
    }
}
