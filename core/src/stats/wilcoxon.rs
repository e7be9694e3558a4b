//! Wilcoxon signed-rank test, like `scipy.stats.wilcoxon(d)` with its defaults (scipy 1.17:
//! `zero_method='wilcox'`, `correction=False`, `alternative='two-sided'`, `method='auto'`).
//!
//! Zero differences are dropped before ranking (n = the nonzero count); |d| gets average ranks;
//! W+ and W- are the rank sums of the positive and negative differences; the statistic is
//! min(W+, W-). The p-value method follows scipy's 'auto' rule, which looks at len(d) with the
//! zeros included:
//! - len(d) > 50: normal approximation;
//! - len(d) <= 50, no ties and no zeros: exact null distribution of W+ (all 2^n sign patterns),
//!   p = min(1, 2 min(P(W+ <= w), P(W+ >= w)));
//! - ties or zeros and len(d) <= 13: exhaustive sign-flip permutation of the nonzero differences
//!   (the null distribution of W+ with the tied ranks), p as above;
//! - otherwise the normal approximation z = (W+ - n(n+1)/4) / sigma,
//!   sigma^2 = n(n+1)(2n+1)/24 - sum(t^3 - t)/48, p = 2 Phi(-|z|), no continuity correction.
//!
//! The exact and permutation null distributions are counted in integers (twice the ranks, which are
//! multiples of 1/2), so they carry no rounding at all.

use alloc::vec;
use alloc::vec::Vec;

use super::rank::{average_ranks, tie_term};
use super::special::normal_sf;
use super::{StatsError, check_finite};

const TEST: &str = "Wilcoxon signed-rank test";

/// Which p-value computation the 'auto' rule picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WilcoxonMethod {
    Exact,
    Permutation,
    Normal,
}

/// Result of [`wilcoxon`].
#[derive(Clone, Debug, PartialEq)]
pub struct Wilcoxon {
    /// min(W+, W-) (scipy's `statistic`).
    pub statistic: f64,
    /// Two-sided p-value.
    pub pvalue: f64,
    pub method: WilcoxonMethod,
    /// Rank sum of the positive differences.
    pub w_plus: f64,
    /// Rank sum of the negative differences.
    pub w_minus: f64,
    /// Number of nonzero differences (those ranked).
    pub n: usize,
    /// Number of zero differences dropped.
    pub zeros: usize,
    /// The z statistic, -|z|, for the normal approximation.
    pub z: Option<f64>,
}

/// Number of sign patterns of items with (doubled, integer) ranks `ranks2` per value of the doubled
/// positive rank sum: `counts[s]` = #{subsets with sum s}.
fn subset_sum_counts(ranks2: &[u64]) -> Vec<u64> {
    let total: u64 = ranks2.iter().sum();
    let mut counts = vec![0u64; total as usize + 1];
    counts[0] = 1;
    let mut reach = 0usize;
    for &r in ranks2 {
        let r = r as usize;
        for s in (0..=reach).rev() {
            if counts[s] != 0 {
                counts[s + r] += counts[s];
            }
        }
        reach += r;
    }
    counts
}

/// Two-sided p from the null counts of the doubled statistic and the observed doubled W+.
fn two_sided_from_counts(counts: &[u64], observed2: usize, n: usize) -> f64 {
    let le: u64 = counts[..=observed2].iter().sum();
    let ge: u64 = counts[observed2..].iter().sum();
    let total = libm::ldexp(1.0, n as i32);
    (2.0 * (le.min(ge) as f64) / total).min(1.0)
}

/// Wilcoxon signed-rank test of the paired differences `d` (see the module documentation).
pub fn wilcoxon(d: &[f64]) -> Result<Wilcoxon, StatsError> {
    if d.is_empty() {
        return Err(StatsError::TooFew { test: TEST, needed: 1, got: 0 });
    }
    check_finite(TEST, d)?;
    let nonzero: Vec<f64> = d.iter().copied().filter(|&v| v != 0.0).collect();
    let n = nonzero.len();
    let zeros = d.len() - n;
    let abs: Vec<f64> = nonzero.iter().map(|v| v.abs()).collect();
    let (ranks, groups) = average_ranks(&abs);
    let has_ties = groups.iter().any(|&t| t > 1);
    let w_plus: f64 = nonzero.iter().zip(&ranks).filter(|(v, _)| **v > 0.0).map(|(_, r)| r).sum();
    let w_minus: f64 = nonzero.iter().zip(&ranks).filter(|(v, _)| **v < 0.0).map(|(_, r)| r).sum();
    let statistic = w_plus.min(w_minus);

    let method = if d.len() > 50 {
        WilcoxonMethod::Normal
    } else if !has_ties && zeros == 0 {
        WilcoxonMethod::Exact
    } else if d.len() <= 13 {
        WilcoxonMethod::Permutation
    } else {
        WilcoxonMethod::Normal
    };

    let (pvalue, z) = match method {
        WilcoxonMethod::Exact | WilcoxonMethod::Permutation => {
            // Doubled ranks are integers (ranks are multiples of 1/2); exact for both branches.
            let ranks2: Vec<u64> = ranks.iter().map(|&r| (2.0 * r) as u64).collect();
            let counts = subset_sum_counts(&ranks2);
            let observed2 = (2.0 * w_plus) as usize;
            (two_sided_from_counts(&counts, observed2, n), None)
        }
        WilcoxonMethod::Normal => {
            let nf = n as f64;
            let mean = nf * (nf + 1.0) * 0.25;
            let var = (nf * (nf + 1.0) * (2.0 * nf + 1.0) - tie_term(&groups) / 2.0) / 24.0;
            if var <= 0.0 {
                return Err(StatsError::Degenerate { test: TEST, why: "every difference is zero" });
            }
            let z = (w_plus - mean) / libm::sqrt(var);
            (2.0 * normal_sf(z.abs()), Some(-z.abs()))
        }
    };
    Ok(Wilcoxon { statistic, pvalue, method, w_plus, w_minus, n, zeros, z })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::special::assert_rel;

    fn lin(n: usize, mul: usize, modulus: usize, off: f64, scale: f64) -> Vec<f64> {
        (1..=n).map(|i| ((i * mul) % modulus) as f64 - off).map(|v| v * scale).collect()
    }

    fn check(name: &str, d: &[f64], method: WilcoxonMethod, statistic: f64, pvalue: f64) {
        let r = wilcoxon(d).unwrap();
        assert_eq!(r.method, method, "{name}");
        assert_rel(r.statistic, statistic, 1e-12, name);
        assert_rel(r.pvalue, pvalue, 1e-10, name);
        assert_eq!(r.w_plus + r.w_minus, (r.n * (r.n + 1)) as f64 / 2.0, "{name}");
    }

    /// scipy 1.17.1 `scipy.stats.wilcoxon(d)` (defaults), printed by scripts/stats_reference.py.
    #[test]
    fn matches_scipy() {
        use WilcoxonMethod::*;
        check("w_exact_10", &[1.5, -0.3, 2.1, 0.8, -1.2, 3.3, 0.45, -0.05, 1.9, 2.7], Exact, 8.0, 0.048828125);
        check("w_exact_30", &lin(30, 37, 61, 30.25, 1.0), Exact, 231.0, 0.983_833_581_209_182_7);
        check("w_exact_50", &lin(50, 37, 61, 30.25, 1.0), Exact, 613.0, 0.818_370_276_580_68);
        let pos: Vec<f64> = (1..=15).map(f64::from).collect();
        check("w_exact_all_pos_15", &pos, Exact, 0.0, 6.103515625e-05);
        check("w_normal_60", &lin(60, 37, 61, 30.25, 1.0), Normal, 900.0, 0.912_073_084_561_836_9);
        check("w_perm_ties_8", &[1.0, -2.0, 2.0, 3.0, -1.0, 4.0, 2.0, -5.0], Permutation, 13.5, 0.578125);
        let zeros12 = [0.0, 1.5, -0.5, 2.0, 0.0, 3.0, -2.0, 1.5, 4.0, 2.5, -1.0, 6.0];
        check("w_perm_zeros_12", &zeros12, Permutation, 8.5, 0.048828125);
        check("w_perm_ties_13", &lin(13, 7, 11, 4.0, 1.0), Permutation, 25.0, 0.294921875);
        check("w_normal_ties_14", &lin(14, 7, 11, 4.0, 1.0), Normal, 25.0, 0.150_578_581_122_907_95);
        check("w_normal_ties_20", &lin(20, 7, 11, 5.0, 1.0), Normal, 76.0, 0.677_699_281_560_240_1);
        check("w_normal_ties_60", &lin(60, 7, 11, 3.0, 0.5), Normal, 253.5, 2.395_621_190_094_849_8e-05);
    }

    #[test]
    fn zeros_are_dropped_and_degenerate_inputs_rejected() {
        let r = wilcoxon(&[0.0, 1.5, -0.5, 2.0, 0.0, 3.0]).unwrap();
        assert_eq!((r.n, r.zeros), (4, 2));
        // All zero: the permutation branch gives p = 1 (as scipy); the normal branch has no variance.
        let r = wilcoxon(&[0.0; 5]).unwrap();
        assert_eq!((r.statistic, r.pvalue), (0.0, 1.0));
        assert!(matches!(wilcoxon(&[0.0; 20]), Err(StatsError::Degenerate { .. })));
        assert!(matches!(wilcoxon(&[]), Err(StatsError::TooFew { .. })));
        assert!(matches!(wilcoxon(&[1.0, f64::NAN]), Err(StatsError::NonFinite { index: 1, .. })));
    }

    #[test]
    fn exact_distribution_is_symmetric_and_sums_to_one() {
        let counts = subset_sum_counts(&[2, 4, 6, 8]);
        assert_eq!(counts.iter().sum::<u64>(), 16);
        for s in 0..counts.len() {
            assert_eq!(counts[s], counts[counts.len() - 1 - s]);
        }
    }
}
