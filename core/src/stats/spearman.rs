//! Spearman rank correlation, like `scipy.stats.spearmanr(x, y)` (two-sided).
//!
//! rho is the Pearson correlation of the average ranks (numpy `corrcoef`: covariance over n - 1,
//! divided by each standard deviation in turn, clipped to [-1, 1]); the p-value comes from
//! t = rho sqrt((n - 2) / ((rho + 1)(1 - rho))) with n - 2 degrees of freedom, p = 2 P(T > |t|)
//! (0 when |rho| = 1).

use super::rank::average_ranks;
use super::special::student_t_sf;
use super::{StatsError, check_finite};

const TEST: &str = "Spearman correlation";

/// Result of [`spearman`].
#[derive(Clone, Debug, PartialEq)]
pub struct Spearman {
    /// Spearman's rho (scipy's `statistic`).
    pub rho: f64,
    /// Two-sided p-value.
    pub pvalue: f64,
    /// Number of pairs.
    pub n: usize,
}

/// Spearman correlation of paired finite samples `x`, `y` (n >= 3, neither constant).
pub fn spearman(x: &[f64], y: &[f64]) -> Result<Spearman, StatsError> {
    if x.len() != y.len() {
        return Err(StatsError::LengthMismatch { test: TEST, expected: x.len(), got: y.len() });
    }
    let n = x.len();
    if n < 3 {
        return Err(StatsError::TooFew { test: TEST, needed: 3, got: n });
    }
    check_finite(TEST, x)?;
    check_finite(TEST, y)?;
    if x.iter().all(|&v| v == x[0]) || y.iter().all(|&v| v == y[0]) {
        return Err(StatsError::Degenerate { test: TEST, why: "an input is constant" });
    }
    let (rx, _) = average_ranks(x);
    let (ry, _) = average_ranks(y);
    let nf = n as f64;
    let mx = rx.iter().sum::<f64>() / nf;
    let my = ry.iter().sum::<f64>() / nf;
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        let (dx, dy) = (a - mx, b - my);
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    let dof = nf - 2.0;
    let rho = (sxy / (nf - 1.0) / libm::sqrt(sxx / (nf - 1.0)) / libm::sqrt(syy / (nf - 1.0))).clamp(-1.0, 1.0);
    let denom = (rho + 1.0) * (1.0 - rho);
    let pvalue = if denom <= 0.0 {
        0.0
    } else {
        let t = rho * libm::sqrt(dof / denom);
        2.0 * student_t_sf(t.abs(), dof)
    };
    Ok(Spearman { rho, pvalue, n })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::special::assert_rel;
    use alloc::vec::Vec;

    fn lin(n: usize, mul: usize, modulus: usize, off: f64) -> Vec<f64> {
        (1..=n).map(|i| ((i * mul) % modulus) as f64 - off).collect()
    }

    fn check(name: &str, x: &[f64], y: &[f64], rho: f64, pvalue: f64) {
        let r = spearman(x, y).unwrap();
        assert_rel(r.rho, rho, 1e-12, name);
        assert_rel(r.pvalue, pvalue, 1e-9, name);
    }

    /// scipy 1.17.1 `scipy.stats.spearmanr(x, y)`, printed by scripts/stats_reference.py.
    #[test]
    fn matches_scipy() {
        let x: Vec<f64> = (1..=10).map(f64::from).collect();
        let y = [2.0, 1.0, 4.0, 3.0, 7.0, 5.0, 6.0, 9.0, 8.0, 9.0];
        check("s_pos_ties", &x, &y, 0.917_937_370_956_897_6, 0.000_179_530_217_788_984_48);
        let x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0];
        let y = [-2.0, -7.0, -1.0, -8.0, -2.0, -8.0, -1.0, -8.0, -2.0, -8.0, -4.0];
        check("s_neg_ties", &x, &y, -0.138_456_765_146_769_5, 0.684_750_304_810_899_8);
        let x = lin(40, 13, 17, 0.0);
        let y: Vec<f64> = lin(40, 7, 23, 0.0).iter().zip(&x).map(|(a, b)| a - 0.5 * b).collect();
        check("s_n40", &x, &y, -0.099_745_931_944_308_96, 0.540_289_855_696_484_5);
        check("s_n3", &[1.0, 2.0, 3.0], &[2.0, 1.0, 3.0], 0.5, 0.666_666_666_666_666_6);
        let x = lin(25, 1, 1000, 0.0);
        let y: Vec<f64> = lin(25, 3, 5, 0.0).iter().zip(&x).map(|(a, b)| a - b).collect();
        check("s_strong_neg_n25", &x, &y, -0.983_846_153_846_153_8, 1.094_892_923_846_165_8e-18);
    }

    #[test]
    fn perfect_and_degenerate() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let r = spearman(&x, &[1.0, 4.0, 9.0, 16.0]).unwrap();
        assert_eq!((r.rho, r.pvalue), (1.0, 0.0));
        let r = spearman(&x, &[4.0, 3.0, 2.0, 1.0]).unwrap();
        assert_eq!((r.rho, r.pvalue), (-1.0, 0.0));
        assert!(matches!(spearman(&x, &[1.0; 4]), Err(StatsError::Degenerate { .. })));
        assert!(matches!(spearman(&x, &[1.0; 3]), Err(StatsError::LengthMismatch { .. })));
        assert!(matches!(spearman(&x[..2], &x[..2]), Err(StatsError::TooFew { .. })));
    }
}
