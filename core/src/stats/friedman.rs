//! Friedman test, like `scipy.stats.friedmanchisquare(*samples)`, plus mean ranks.
//!
//! One sample per treatment (merge method), each holding one value per block (a (dataset, attack)
//! setting). Within each block the k values are ranked **ascending** with ties averaged: rank 1 is
//! the smallest value, so for a vulnerability measure (e.g. rtasr) rank 1 = least vulnerable.
//! Q = [12/(n k (k+1)) sum_j R_j^2 - 3 n (k+1)] / [1 - sum(t^3 - t)/(n k (k^2 - 1))], p from the
//! chi-square distribution with k - 1 degrees of freedom.

use alloc::vec;
use alloc::vec::Vec;

use super::rank::{average_ranks, tie_term};
use super::special::chi2_sf;
use super::{StatsError, check_finite};

const TEST: &str = "Friedman test";

/// Result of [`friedman`].
#[derive(Clone, Debug, PartialEq)]
pub struct Friedman {
    /// The tie-corrected statistic Q (scipy's `statistic`).
    pub statistic: f64,
    /// p-value, P(chi2_{k-1} >= Q).
    pub pvalue: f64,
    /// Number of treatments (samples).
    pub k: usize,
    /// Number of blocks.
    pub n: usize,
    /// Mean rank of each treatment over the blocks, in sample order (ascending ranks in a block).
    pub mean_ranks: Vec<f64>,
}

/// Friedman test of `samples` (k >= 3 samples of n >= 1 finite values each; see the module docs).
pub fn friedman(samples: &[&[f64]]) -> Result<Friedman, StatsError> {
    let k = samples.len();
    if k < 3 {
        return Err(StatsError::TooFew { test: "Friedman test (samples)", needed: 3, got: k });
    }
    let n = samples[0].len();
    if n == 0 {
        return Err(StatsError::TooFew { test: "Friedman test (blocks)", needed: 1, got: 0 });
    }
    for s in samples {
        if s.len() != n {
            return Err(StatsError::LengthMismatch { test: TEST, expected: n, got: s.len() });
        }
        check_finite(TEST, s)?;
    }
    let mut rank_sums = vec![0.0; k];
    let mut ties = 0.0;
    let mut block = vec![0.0; k];
    for i in 0..n {
        for (b, s) in block.iter_mut().zip(samples) {
            *b = s[i];
        }
        let (ranks, groups) = average_ranks(&block);
        for (sum, r) in rank_sums.iter_mut().zip(&ranks) {
            *sum += r;
        }
        ties += tie_term(&groups);
    }
    let (kf, nf) = (k as f64, n as f64);
    let c = 1.0 - ties / (kf * (kf * kf - 1.0) * nf);
    if c <= 0.0 {
        return Err(StatsError::Degenerate { test: TEST, why: "every block is all tied" });
    }
    let ssbn: f64 = rank_sums.iter().map(|r| r * r).sum();
    let statistic = (12.0 / (kf * nf * (kf + 1.0)) * ssbn - 3.0 * nf * (kf + 1.0)) / c;
    let pvalue = chi2_sf(statistic, kf - 1.0);
    let mean_ranks = rank_sums.iter().map(|r| r / nf).collect();
    Ok(Friedman { statistic, pvalue, k, n, mean_ranks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::special::assert_rel;

    fn lin(n: usize, mul: usize, modulus: usize, off: f64) -> Vec<f64> {
        (1..=n).map(|i| ((i * mul) % modulus) as f64 - off).collect()
    }

    fn check(name: &str, samples: &[Vec<f64>], statistic: f64, pvalue: f64, mean_ranks: &[f64]) {
        let refs: Vec<&[f64]> = samples.iter().map(|s| s.as_slice()).collect();
        let r = friedman(&refs).unwrap();
        assert_rel(r.statistic, statistic, 1e-12, name);
        assert_rel(r.pvalue, pvalue, 1e-9, name);
        assert_eq!(r.mean_ranks.len(), mean_ranks.len());
        for (got, want) in r.mean_ranks.iter().zip(mean_ranks) {
            assert_rel(*got, *want, 1e-14, name);
        }
    }

    /// scipy 1.17.1 `scipy.stats.friedmanchisquare(*samples)` and mean of
    /// `scipy.stats.rankdata(..., axis=1)`, printed by scripts/stats_reference.py.
    #[test]
    fn matches_scipy() {
        let ties = [
            vec![1.0, 2.0, 3.0, 4.0, 2.0, 1.0],
            vec![2.0, 2.0, 1.0, 4.0, 3.0, 2.0],
            vec![3.0, 1.0, 2.0, 1.0, 3.0, 3.0],
            vec![4.0, 3.0, 3.0, 2.0, 1.0, 4.0],
        ];
        let mr = [2.25, 2.416_666_666_666_666_5, 2.25, 3.083_333_333_333_333_5];
        check("f_k4_n6_ties", &ties, 1.821_428_571_428_574_5, 0.610_282_977_763_825_7, &mr);
        let k3 = [
            lin(10, 3, 7, 0.0),
            lin(10, 5, 11, 0.0).iter().map(|v| v + 0.5).collect(),
            lin(10, 2, 13, 0.0).iter().map(|v| v + 0.25).collect(),
        ];
        check("f_k3_n10", &k3, 5.600_000_000_000_008_5, 0.060_810_062_625_217_69, &[1.4, 2.4, 2.2]);
        let k8: Vec<Vec<f64>> = (0..8).map(|j| lin(42, j + 2, 5 + j, 0.0)).collect();
        let mr = [
            3.428_571_428_571_428_4,
            2.857_142_857_142_857,
            4.214_285_714_285_714,
            4.690_476_190_476_191,
            4.119_047_619_047_619,
            5.416_666_666_666_667,
            5.928_571_428_571_429,
            5.345_238_095_238_095,
        ];
        check("f_k8_n42_ties", &k8, 58.087_606_837_606_82, 3.632_106_131_971_193_5e-10, &mr);
    }

    #[test]
    fn rank_direction_and_degenerate_inputs() {
        // Treatment 0 always smallest: mean rank 1 (least vulnerable when values are vulnerability).
        let a = [0.1, 0.2, 0.3];
        let b = [0.5, 0.6, 0.7];
        let c = [0.9, 0.8, 0.75];
        let r = friedman(&[&a, &b, &c]).unwrap();
        assert_eq!(r.mean_ranks, [1.0, 2.0, 3.0]);
        // Q = 12/(3*3*4) * (9 + 36 + 81) - 3*3*4 = 6, p = exp(-3) (chi-square, 2 df).
        assert_rel(r.statistic, 6.0, 1e-14, "Q");
        assert_rel(r.pvalue, libm::exp(-3.0), 1e-13, "p");
        assert!(matches!(friedman(&[&a, &a, &a]), Err(StatsError::Degenerate { .. })));
        assert!(matches!(friedman(&[&a, &b]), Err(StatsError::TooFew { .. })));
        assert!(matches!(friedman(&[&a, &b, &c[..2]]), Err(StatsError::LengthMismatch { .. })));
    }
}
