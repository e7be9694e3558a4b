//! Statistics of the study, matching scipy.stats (METHODS.md "Statistics").
//!
//! - [`bootstrap`]: seeded percentile bootstrap intervals over image indices, with numpy's default
//!   (`linear`) percentile rule.
//! - [`wilcoxon`]: `scipy.stats.wilcoxon(d)` with its defaults (method `auto`).
//! - [`spearman`]: `scipy.stats.spearmanr(x, y)`.
//! - [`friedman`]: `scipy.stats.friedmanchisquare(*samples)` plus mean ranks.
//! - [`special`]: normal, Student t and chi-square tails.
//!
//! Inputs must be finite; anything scipy would answer with NaN (too few values, constant input,
//! every value tied) is an error here, never a number.

use core::fmt;

pub mod bootstrap;
pub mod friedman;
pub mod rank;
pub mod spearman;
pub mod special;
pub mod wilcoxon;

pub use bootstrap::{BootstrapCi, DEFAULT_RESAMPLES, bootstrap_ci, bootstrap_ci_seeded, percentile, percentile_sorted};
pub use friedman::{Friedman, friedman};
pub use rank::average_ranks;
pub use spearman::{Spearman, spearman};
pub use wilcoxon::{Wilcoxon, WilcoxonMethod, wilcoxon};

/// Why a statistic cannot be computed.
#[derive(Clone, Debug, PartialEq)]
pub enum StatsError {
    /// Fewer values than the test needs.
    TooFew { test: &'static str, needed: usize, got: usize },
    /// Inputs that must be paired or aligned have different lengths.
    LengthMismatch { test: &'static str, expected: usize, got: usize },
    /// A NaN or infinite input value.
    NonFinite { test: &'static str, index: usize, value: f64 },
    /// The statistic is undefined for this input (constant sample, all zero, all tied).
    Degenerate { test: &'static str, why: &'static str },
}

impl fmt::Display for StatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatsError::TooFew { test, needed, got } => {
                write!(f, "{test} needs at least {needed} values, got {got}")
            }
            StatsError::LengthMismatch { test, expected, got } => {
                write!(f, "{test} needs inputs of equal length, got {got} values where {expected} were expected")
            }
            StatsError::NonFinite { test, index, value } => {
                write!(f, "{test} input value {index} is {value}, not a finite number")
            }
            StatsError::Degenerate { test, why } => write!(f, "{test} is undefined: {why}"),
        }
    }
}

/// Check that every value is finite.
pub(crate) fn check_finite(test: &'static str, values: &[f64]) -> Result<(), StatsError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(StatsError::NonFinite { test, index, value: values[index] }),
        None => Ok(()),
    }
}
