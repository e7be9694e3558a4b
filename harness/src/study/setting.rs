//! One setting of the study (dataset x method x attack x surrogate x eps) and its measured record.
//!
//! The metric list is written once, in [`metrics!`]: it drives the store's columns, the report's
//! CSV header and JSON keys, so they cannot drift apart. Every metric is an [`Estimate`] (value and
//! bootstrap 95% interval); `None` means "n/a" (for instance a zero denominator), never a number.

use std::fmt;

/// The key of a setting inside one study (the store adds the study's config hash).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct SettingKey {
    /// Dataset (task) name, e.g. `digits`.
    pub dataset: String,
    /// Merge method label (the method name unless the config gives a label).
    pub method: String,
    /// Attack label (the attack name unless the config gives a label).
    pub attack: String,
    /// Surrogate spec in canonical form (`finetuned`, `pretrained`, a path, `ensemble:[a,b]`).
    pub surrogate: String,
    /// The perturbation budget as written in the config (e.g. `8/255`).
    pub eps: String,
}

impl fmt::Display for SettingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "(dataset {}, method {}, attack {}, surrogate {}, eps {})",
            self.dataset, self.method, self.attack, self.surrogate, self.eps
        )
    }
}

/// A value with its bootstrap 95% interval; each part may be "n/a".
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Estimate {
    pub value: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

impl Estimate {
    /// A value without an interval.
    pub fn point(value: f64) -> Self {
        Estimate { value: Some(value), lo: None, hi: None }
    }
    /// A value with its interval.
    pub fn with_ci(value: f64, lo: f64, hi: f64) -> Self {
        Estimate { value: Some(value), lo: Some(lo), hi: Some(hi) }
    }
    /// "n/a" (zero denominator, no reference model, ...).
    pub fn na() -> Self {
        Estimate::default()
    }
}

macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Every metric of METHODS.md ("Metrics") for one setting.
        #[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: Estimate,)*
        }

        impl Metrics {
            /// Metric names in column order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];

            /// The metrics in [`Metrics::NAMES`] order.
            pub fn values(&self) -> Vec<&Estimate> {
                vec![$(&self.$name),*]
            }

            /// Mutable access in [`Metrics::NAMES`] order.
            pub fn values_mut(&mut self) -> Vec<&mut Estimate> {
                vec![$(&mut self.$name),*]
            }

            /// A metric by name.
            pub fn get(&self, name: &str) -> Option<&Estimate> {
                match name {
                    $(stringify!($name) => Some(&self.$name),)*
                    _ => None,
                }
            }
        }
    };
}

metrics! {
    /// `acc(S)`: clean accuracy of the surrogate on the task's test images.
    acc_surrogate,
    /// `acc(T_merged)`: clean accuracy of the merged target.
    acc_merged,
    /// `acc(T_ref)`: clean accuracy of the unmerged reference model.
    acc_reference,
    /// White-box `asr_all(S, X_S)`.
    asr_wb_all,
    /// White-box `asr_cc(S, X_S)` (over the images S classifies correctly).
    asr_wb_cc,
    /// `tasr_all(S -> T_merged)`.
    tasr_all,
    /// `tasr_cc(S -> T_merged)` (over the images T_merged classifies correctly).
    tasr_cc,
    /// `tasr_all(S -> T_ref)`.
    tasr_ref_all,
    /// `tasr_cc(S -> T_ref)`.
    tasr_ref_cc,
    /// `tasr_all(S -> T) / asr_all(S, X_S)`.
    rtasr_wb_all,
    /// `tasr_cc(S -> T) / asr_cc(S, X_S)` (numerator over T-correct, denominator over S-correct images).
    rtasr_wb_cc,
    /// `tasr_all(S -> T_merged) / tasr_all(S -> T_ref)`.
    rtasr_ref_all,
    /// `tasr_cc(S -> T_merged) / tasr_cc(S -> T_ref)`.
    rtasr_ref_cc,
    /// P(T fooled | S fooled, both clean-correct).
    transfer_rate,
    /// Mean cosine of the input gradients of S and T_merged on clean images.
    grad_align_merged,
    /// Mean cosine of the input gradients of S and T_ref on clean images.
    grad_align_reference,
    /// Representation bias: mean (1/d) L1 distance of merged and fine-tuned projected features.
    rep_bias,
}

/// Wall-clock seconds spent per phase of a setting.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Phases {
    pub merge: f64,
    pub craft: f64,
    pub evaluate: f64,
}

impl Phases {
    /// Phase names in column order.
    pub const NAMES: &'static [&'static str] = &["merge", "craft", "evaluate"];

    /// The seconds in [`Phases::NAMES`] order.
    pub fn values(&self) -> [f64; 3] {
        [self.merge, self.craft, self.evaluate]
    }
}

/// Everything measured for one finished setting.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SettingRecord {
    pub key: SettingKey,
    /// The numeric value of `key.eps`.
    pub eps_value: f64,
    /// Number of test images attacked.
    pub n_images: u64,
    /// True when the merged model needs the task identity at inference (EMR, TALL masks, surgery).
    pub needs_task_id: bool,
    pub metrics: Metrics,
    /// Images skipped by the surrogate-vs-merged gradient alignment (a zero gradient norm).
    pub grad_align_merged_skipped: Option<u64>,
    /// Images skipped by the surrogate-vs-reference gradient alignment.
    pub grad_align_reference_skipped: Option<u64>,
    pub seconds: Phases,
}

impl SettingRecord {
    /// The first value that is present but not finite, as (name, value): such a record is a bug
    /// upstream and is refused by the store.
    pub fn first_non_finite(&self) -> Option<(String, f64)> {
        if !self.eps_value.is_finite() {
            return Some(("eps_value".into(), self.eps_value));
        }
        for (name, e) in Metrics::NAMES.iter().zip(self.metrics.values()) {
            for (suffix, v) in [("", e.value), ("_lo", e.lo), ("_hi", e.hi)] {
                if let Some(v) = v.filter(|v| !v.is_finite()) {
                    return Some((format!("{name}{suffix}"), v));
                }
            }
        }
        for (name, v) in Phases::NAMES.iter().zip(self.seconds.values()) {
            if !v.is_finite() {
                return Some((format!("seconds_{name}"), v));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_fields_and_lookup() {
        let m = Metrics { rep_bias: Estimate::point(0.5), ..Default::default() };
        assert_eq!(Metrics::NAMES.len(), m.values().len());
        assert_eq!(m.get("rep_bias"), Some(&Estimate::point(0.5)));
        assert_eq!(m.get("nope"), None);
        let idx = Metrics::NAMES.iter().position(|n| *n == "rep_bias").unwrap();
        assert_eq!(m.values()[idx].value, Some(0.5));
    }

    #[test]
    fn non_finite_is_found() {
        let mut r = SettingRecord {
            key: SettingKey {
                dataset: "d".into(),
                method: "m".into(),
                attack: "a".into(),
                surrogate: "finetuned".into(),
                eps: "8/255".into(),
            },
            eps_value: 8.0 / 255.0,
            n_images: 4,
            needs_task_id: false,
            metrics: Metrics::default(),
            grad_align_merged_skipped: None,
            grad_align_reference_skipped: None,
            seconds: Phases::default(),
        };
        assert_eq!(r.first_non_finite(), None);
        r.metrics.tasr_cc.hi = Some(f64::NAN);
        assert_eq!(r.first_non_finite().map(|p| p.0), Some("tasr_cc_hi".to_string()));
    }
}
