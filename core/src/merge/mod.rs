//! Model merging: one file per method, a registry that maps CLI names to them.
//!
//! Every method sees the base (pretrained) tensors, the fine-tuned models' tensors and the list of
//! tensor names to merge; it returns the merged tensors for exactly those names (the caller copies
//! every other tensor from the base model). Methods that need the task identity at inference
//! (`emr`, `tall-masks`) return a [`PerTaskModel`] that materialises one task's weights at a time.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::tensor::{ParamSet, TensorError};

pub mod adamerging;
mod breadcrumbs;
mod common;
mod consensus;
mod dare;
mod emr;
pub mod executor;
pub mod fisher;
mod iso_c;
mod iso_cts;
mod model_stock;
pub mod regmean;
mod slerp;
pub mod surgery;
mod tall_masks;
mod task_arithmetic;
mod ties;
mod tsv_m;
mod weight_average;

pub use breadcrumbs::Breadcrumbs;
pub use consensus::Consensus;
pub use dare::Dare;
pub use emr::Emr;
pub use executor::{Executor, Sequential};
pub use iso_c::IsoC;
pub use iso_cts::IsoCts;
pub use model_stock::ModelStock;
pub use slerp::Slerp;
pub use tall_masks::TallMasks;
pub use task_arithmetic::TaskArithmetic;
pub use ties::Ties;
pub use tsv_m::TsvM;
pub use weight_average::WeightAverage;

/// What a merge reads.
pub struct MergeInput<'s, 'a> {
    /// theta0, the pretrained weights.
    pub base: &'s ParamSet<'a>,
    /// theta_t, the fine-tuned weights, one per task, in task order.
    pub models: &'s [ParamSet<'a>],
    /// Optional per-model weights (mergekit `parameters.weight`); `None` means equal weights.
    pub model_weights: Option<&'s [f32]>,
    /// Names of the tensors to merge, sorted; every name is present in `base` and each model with
    /// the same shape (the caller checks this with [`ParamSet::check_compatible`]).
    pub names: &'s [String],
    /// Seed of the method's ChaCha streams (DARE's masks).
    pub seed: u64,
}

impl<'s, 'a> MergeInput<'s, 'a> {
    /// Number of fine-tuned models (tasks).
    pub fn tasks(&self) -> usize {
        self.models.len()
    }

    /// The base tensor `name` (present by the contract above).
    pub fn base(&self, name: &str) -> &'s crate::tensor::Tensor<'a> {
        self.base.get(name).expect("merge input names a tensor the base lacks")
    }

    /// Model `t`'s tensor `name` (present by the contract above).
    pub fn model(&self, t: usize, name: &str) -> &'s crate::tensor::Tensor<'a> {
        self.models[t].get(name).expect("merge input names a tensor a model lacks")
    }
}

/// Weights of one task at a time, for methods that keep per-task modulators.
pub trait PerTaskModel {
    fn num_tasks(&self) -> usize;
    /// The merged tensors (the input's `names`) for task `t`.
    fn task(&self, t: usize) -> ParamSet<'static>;
}

/// What a merge returns.
pub enum MergeOutput<'s> {
    /// One merged model: the merged tensors only.
    Single(ParamSet<'static>),
    /// One model per task, materialised on demand.
    PerTask(Box<dyn PerTaskModel + 's>),
}

impl<'s> MergeOutput<'s> {
    /// The single model, or `None` for per-task output.
    pub fn single(self) -> Option<ParamSet<'static>> {
        match self {
            MergeOutput::Single(p) => Some(p),
            MergeOutput::PerTask(_) => None,
        }
    }
}

/// A method parameter with its default, for validation and for `mergeattack methods`.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// `key=value` parameters as the user gave them (from `--set` or a YAML config).
#[derive(Clone, Debug, Default)]
pub struct Params {
    entries: Vec<(String, String)>,
}

/// Parameters every method accepts, handled outside the method itself.
pub const COMMON_PARAMS: &[ParamSpec] = &[
    ParamSpec {
        name: "tensors",
        default: "vision",
        help: "which tensors to merge: vision (the vision encoder) or all",
    },
    ParamSpec { name: "seed", default: "0", help: "seed of the method's random streams" },
];

impl Params {
    pub fn new() -> Self {
        Params::default()
    }

    /// Set `key` to `value`, replacing an earlier value.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            e.1 = value;
        } else {
            self.entries.push((key, value));
        }
    }

    /// Parse `key=value`.
    pub fn set_pair(&mut self, pair: &str) -> Result<(), MergeError> {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(MergeError::BadValue { param: pair.to_string(), value: String::new(), expected: "key=value" });
        };
        self.set(k.trim(), v.trim());
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// A float parameter (fractions such as `8/255` accepted), or `default` when absent.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64, MergeError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_number(v).ok_or_else(|| MergeError::BadValue {
                param: key.to_string(),
                value: v.to_string(),
                expected: "a number (a fraction such as 8/255 is fine)",
            }),
        }
    }

    /// A non-negative integer parameter, or `default` when absent.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize, MergeError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| MergeError::BadValue {
                param: key.to_string(),
                value: v.to_string(),
                expected: "a non-negative integer",
            }),
        }
    }

    /// A parameter that must be one of `choices`, or `default` when absent.
    pub fn choice_or<'c>(&self, key: &str, choices: &[&'c str], default: &'c str) -> Result<&'c str, MergeError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => choices.iter().copied().find(|c| *c == v).ok_or_else(|| MergeError::BadChoice {
                param: key.to_string(),
                value: v.to_string(),
                choices: choices.join(", "),
            }),
        }
    }

    /// A boolean parameter (`true`/`false`), or `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, MergeError> {
        match self.get(key) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => {
                Err(MergeError::BadValue { param: key.to_string(), value: v.to_string(), expected: "true or false" })
            }
        }
    }
}

/// Parse a float written as a decimal or as a fraction `a/b`. Rejects NaN and infinities.
pub fn parse_number(s: &str) -> Option<f64> {
    let s = s.trim();
    let v = match s.split_once('/') {
        Some((a, b)) => {
            let a: f64 = a.trim().parse().ok()?;
            let b: f64 = b.trim().parse().ok()?;
            if b == 0.0 {
                return None;
            }
            a / b
        }
        None => s.parse().ok()?,
    };
    v.is_finite().then_some(v)
}

/// Check a value against a range and name the parameter when it is outside.
pub fn check_range(param: &str, value: f64, ok: bool, allowed: &'static str) -> Result<(), MergeError> {
    if ok { Ok(()) } else { Err(MergeError::OutOfRange { param: param.to_string(), value, allowed }) }
}

/// Why a merge could not run.
#[derive(Clone, Debug, PartialEq)]
pub enum MergeError {
    Tensor(TensorError),
    UnknownMethod { name: String, known: String },
    UnknownParam { method: &'static str, param: String, known: String },
    BadValue { param: String, value: String, expected: &'static str },
    BadChoice { param: String, value: String, choices: String },
    OutOfRange { param: String, value: f64, allowed: &'static str },
    ModelCount { method: &'static str, needs: &'static str, got: usize },
    Numerical { method: &'static str, detail: String },
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeError::Tensor(e) => write!(f, "{e}"),
            MergeError::UnknownMethod { name, known } => {
                write!(f, "unknown merge method `{name}` (known: {known})")
            }
            MergeError::UnknownParam { method, param, known } => {
                write!(f, "merge method `{method}` has no parameter `{param}` (it takes: {known})")
            }
            MergeError::BadValue { param, value, expected } => {
                write!(f, "parameter `{param}` = `{value}` is not {expected}")
            }
            MergeError::BadChoice { param, value, choices } => {
                write!(f, "parameter `{param}` = `{value}` is not one of: {choices}")
            }
            MergeError::OutOfRange { param, value, allowed } => {
                write!(f, "parameter `{param}` = {value} is out of range: it must be {allowed}")
            }
            MergeError::ModelCount { method, needs, got } => {
                write!(f, "merge method `{method}` needs {needs}, but {got} fine-tuned model(s) were given")
            }
            MergeError::Numerical { method, detail } => write!(f, "merge method `{method}` failed: {detail}"),
        }
    }
}

impl From<TensorError> for MergeError {
    fn from(e: TensorError) -> Self {
        MergeError::Tensor(e)
    }
}

/// A merging method.
pub trait MergeMethod: Sync {
    /// The CLI name (kebab-case).
    fn name(&self) -> &'static str;
    /// Other accepted names besides the snake_case spelling of `name`.
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// One line: the rule and its default.
    fn summary(&self) -> &'static str;
    /// The method's own parameters with their defaults.
    fn params(&self) -> &'static [ParamSpec];
    /// True when the method returns one model per task (task identity needed at inference).
    fn per_task(&self) -> bool {
        false
    }
    /// True when each merged tensor depends only on the inputs' tensors of the same name (and the
    /// seed), never on the other tensors: then disjoint subsets of `names` can be merged apart (on
    /// parallel threads, say) with bitwise the same result. `params` are this method's own.
    fn tensorwise(&self, _params: &Params) -> bool {
        false
    }
    /// Merge. `params` holds only this method's own keys (validated by [`validate_params`]).
    fn merge<'s>(&self, input: &MergeInput<'s, '_>, params: &Params) -> Result<MergeOutput<'s>, MergeError>;
    /// [`merge`](Self::merge) with its independent jobs run by `exec` (on several threads, say),
    /// with bitwise the same result as `merge` whatever the executor. The default ignores `exec`;
    /// methods whose kernels split into jobs (`ties`, `task-arithmetic`) override it.
    fn merge_on<'s>(
        &self,
        input: &MergeInput<'s, '_>,
        params: &Params,
        exec: &dyn Executor,
    ) -> Result<MergeOutput<'s>, MergeError> {
        let _ = exec;
        self.merge(input, params)
    }
}

static REGISTRY: &[&dyn MergeMethod] = &[
    &WeightAverage,
    &TaskArithmetic,
    &Ties,
    &Dare,
    &Breadcrumbs,
    &Consensus,
    &TallMasks,
    &Emr,
    &ModelStock,
    &Slerp,
    &TsvM,
    &IsoC,
    &IsoCts,
];

/// Every data-free merge method, in listing order.
pub fn registry() -> &'static [&'static dyn MergeMethod] {
    REGISTRY
}

/// Find a method by CLI name or alias; `_` and `-` are interchangeable, case is ignored.
pub fn lookup(name: &str) -> Result<&'static dyn MergeMethod, MergeError> {
    let norm = normalise(name);
    REGISTRY
        .iter()
        .copied()
        .find(|m| normalise(m.name()) == norm || m.aliases().iter().any(|a| normalise(a) == norm))
        .ok_or_else(|| MergeError::UnknownMethod {
            name: name.to_string(),
            known: REGISTRY.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        })
}

fn normalise(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('_', "-")
}

/// Reject parameters that neither the method nor [`COMMON_PARAMS`] knows.
pub fn validate_params(method: &dyn MergeMethod, params: &Params) -> Result<(), MergeError> {
    for key in params.keys() {
        let known = method.params().iter().chain(COMMON_PARAMS).any(|p| p.name == key);
        if !known {
            return Err(MergeError::UnknownParam {
                method: method.name(),
                param: key.to_string(),
                known: method
                    .params()
                    .iter()
                    .chain(COMMON_PARAMS)
                    .map(|p| format!("{}={}", p.name, p.default))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(())
}

/// Normalised per-model weights: the given weights divided by their sum, or 1/T each.
pub fn normalised_weights(input: &MergeInput<'_, '_>) -> Result<Vec<f32>, MergeError> {
    let t = input.tasks();
    match input.model_weights {
        None => Ok(alloc::vec![1.0 / t as f32; t]),
        Some(w) => {
            if w.len() != t {
                return Err(MergeError::BadValue {
                    param: "weight".into(),
                    value: format!("{} weights for {} models", w.len(), t),
                    expected: "one weight per fine-tuned model",
                });
            }
            if let Some(bad) = w.iter().find(|x| !x.is_finite() || **x < 0.0) {
                return Err(MergeError::OutOfRange {
                    param: "weight".into(),
                    value: f64::from(*bad),
                    allowed: "finite and >= 0",
                });
            }
            let s: f32 = w.iter().sum();
            if s <= 0.0 {
                return Err(MergeError::OutOfRange {
                    param: "weight".into(),
                    value: f64::from(s),
                    allowed: "a positive sum over the models",
                });
            }
            Ok(w.iter().map(|x| x / s).collect())
        }
    }
}

/// Require at least `min` fine-tuned models.
pub fn require_models(
    method: &'static str,
    input: &MergeInput<'_, '_>,
    min: usize,
    needs: &'static str,
) -> Result<(), MergeError> {
    if input.tasks() < min { Err(MergeError::ModelCount { method, needs, got: input.tasks() }) } else { Ok(()) }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Tiny deterministic inputs for the methods' unit tests.
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    /// A set with one tensor per (name, shape, values).
    pub fn set(tensors: &[(&str, &[usize], &[f32])]) -> ParamSet<'static> {
        let mut p = ParamSet::new();
        for (name, shape, values) in tensors {
            p.insert_owned(*name, ArrayD::from_shape_vec(IxDyn(shape), values.to_vec()).unwrap());
        }
        p
    }

    pub fn names(p: &ParamSet<'_>) -> Vec<String> {
        p.names().map(String::from).collect()
    }

    /// Values of tensor `name`, flattened.
    pub fn values(p: &ParamSet<'_>, name: &str) -> Vec<f32> {
        p.get(name).unwrap().iter().copied().collect()
    }

    pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "entry {i}: got {g}, want {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_accepts_aliases_and_snake_case() {
        assert_eq!(lookup("weight_average").unwrap().name(), "weight-average");
        assert_eq!(lookup("Weight-Average").unwrap().name(), "weight-average");
        assert!(matches!(lookup("nope"), Err(MergeError::UnknownMethod { .. })));
    }

    #[test]
    fn registry_names_aliases_and_defaults() {
        let want = [
            "weight-average",
            "task-arithmetic",
            "ties",
            "dare",
            "breadcrumbs",
            "consensus",
            "tall-masks",
            "emr",
            "model-stock",
            "slerp",
            "tsv-m",
            "iso-c",
            "iso-cts",
        ];
        let got: Vec<&str> = registry().iter().map(|m| m.name()).collect();
        assert_eq!(got, want);
        for m in registry() {
            assert!(!m.summary().is_empty());
            for a in m.aliases() {
                assert_eq!(lookup(a).unwrap().name(), m.name(), "alias {a}");
            }
            // Every documented default is accepted by the method's own parameter parsing.
            let mut p = Params::new();
            for spec in m.params() {
                p.set(spec.name, spec.default);
            }
            validate_params(*m, &p).unwrap();
            assert_eq!(m.per_task(), matches!(m.name(), "emr" | "tall-masks"));
        }
        for (alias, name) in [
            ("linear", "weight-average"),
            ("task_arithmetic", "task-arithmetic"),
            ("ties", "ties"),
            ("dare_linear", "dare"),
            ("breadcrumbs", "breadcrumbs"),
            ("model_stock", "model-stock"),
            ("slerp", "slerp"),
            ("ties_merging", "ties"),
        ] {
            assert_eq!(lookup(alias).unwrap().name(), name);
        }
    }

    /// Every method runs on a small input with its documented defaults given explicitly, with the
    /// same result as with no parameters.
    #[test]
    fn defaults_given_explicitly_change_nothing() {
        use testutil::*;
        let base = set(&[("w", &[3, 2], &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), ("b", &[2], &[1.0, -1.0])]);
        let m = [
            set(&[("w", &[3, 2], &[0.3, 0.1, 0.2, 0.9, 0.5, 0.7]), ("b", &[2], &[1.5, -1.0])]),
            set(&[("w", &[3, 2], &[0.0, 0.2, 0.6, 0.4, 0.1, 0.6]), ("b", &[2], &[0.5, -2.0])]),
        ];
        let names = names(&base);
        let input = MergeInput { base: &base, models: &m, model_weights: None, names: &names, seed: 4 };
        for method in registry() {
            let mut p = Params::new();
            for spec in method.params() {
                // The lambda default of `dare` depends on `base`.
                if !(method.name() == "dare" && spec.name == "lambda") {
                    p.set(spec.name, spec.default);
                }
            }
            let a = method.merge(&input, &Params::new()).unwrap();
            let b = method.merge(&input, &p).unwrap();
            let (a, b) = match (a, b) {
                (MergeOutput::Single(a), MergeOutput::Single(b)) => (a, b),
                (MergeOutput::PerTask(a), MergeOutput::PerTask(b)) => (a.task(1), b.task(1)),
                _ => panic!("{}: output kinds differ", method.name()),
            };
            for n in &names {
                assert_eq!(values(&a, n), values(&b, n), "{} {n}", method.name());
                assert!(values(&a, n).iter().all(|x| x.is_finite()), "{} {n}", method.name());
            }
        }
    }

    /// A method that declares itself tensorwise gives bitwise the same tensors when each tensor is
    /// merged on its own; the fixture is sensitive enough that a method with a global statistic
    /// (EMR's per-task scales, TIES' global trim) does change when split.
    #[test]
    fn tensorwise_methods_merge_each_tensor_alone_identically() {
        use rand::RngExt;
        use testutil::*;
        let shapes: [(&str, &[usize]); 4] = [("a.w", &[6, 4]), ("b.w", &[4, 4]), ("c.b", &[5]), ("d.w", &[3, 7])];
        let mut r = crate::rng::stream(11, &[b"tensorwise-test"]);
        let mut make = |scale: f32, base: Option<&ParamSet<'static>>| {
            let mut p = ParamSet::new();
            for (i, (name, shape)) in shapes.iter().enumerate() {
                let n: usize = shape.iter().product();
                // Tensors of very different magnitudes, so that global statistics differ per tensor.
                let s = scale * [1.0, 0.1, 3.0, 0.02][i];
                let v: Vec<f32> = (0..n)
                    .map(|j| {
                        let b = base.map_or(0.0, |b| b.get(name).unwrap().as_slice().unwrap()[j]);
                        b + s * (r.random::<f32>() - 0.5)
                    })
                    .collect();
                p.insert_owned(*name, ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).unwrap());
            }
            p
        };
        let base = make(1.0, None);
        let models: Vec<ParamSet<'static>> = (0..3).map(|_| make(0.2, Some(&base))).collect();
        let names = names(&base);
        let variants: &[(&str, &[(&str, &str)])] = &[
            ("ties", &[("scope", "tensor")]),
            ("ties", &[("scope", "tensor"), ("aggregate", "dis-mean")]),
            ("dare", &[("p", "0.3")]),
            ("dare", &[("p", "0.3"), ("rescale", "l1")]),
            ("dare", &[("p", "0.3"), ("base", "ties"), ("scope", "tensor")]),
        ];
        let defaults: Vec<(&str, &[(&str, &str)])> = registry().iter().map(|m| (m.name(), &[][..])).collect();
        let mut split_changed = Vec::new();
        for (name, kv) in defaults.iter().chain(variants) {
            let method = lookup(name).unwrap();
            let mut p = Params::new();
            for (k, v) in kv.iter() {
                p.set(*k, *v);
            }
            if validate_params(method, &p).is_err() {
                continue; // a variant this method does not offer
            }
            let models = if method.name() == "slerp" { &models[..2] } else { &models[..] };
            let input = MergeInput { base: &base, models, model_weights: None, names: &names, seed: 9 };
            let task = |out: MergeOutput<'_>| match out {
                MergeOutput::Single(s) => s,
                MergeOutput::PerTask(t) => t.task(0),
            };
            let whole = task(method.merge(&input, &p).unwrap());
            let mut differs = false;
            for n in &names {
                let one = core::slice::from_ref(n);
                let part = task(method.merge(&MergeInput { names: one, ..input }, &p).unwrap());
                let (w, s) = (values(&whole, n), values(&part, n));
                let same = w.iter().zip(&s).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same || !method.tensorwise(&p), "{name} {kv:?}: tensor {n} differs when merged alone");
                differs |= !same;
            }
            if differs {
                split_changed.push(method.name());
            }
        }
        // The fixture does detect cross-tensor statistics.
        assert!(split_changed.contains(&"emr") && split_changed.contains(&"ties"), "{split_changed:?}");
    }

    #[test]
    fn numbers_and_fractions() {
        assert_eq!(parse_number("8/255"), Some(8.0 / 255.0));
        assert_eq!(parse_number(" 0.3 "), Some(0.3));
        assert_eq!(parse_number("1/0"), None);
        assert_eq!(parse_number("nan"), None);
        assert_eq!(parse_number("x"), None);
    }

    #[test]
    fn unknown_parameter_is_named() {
        let mut p = Params::new();
        p.set("lamda", "0.3");
        let e = validate_params(&WeightAverage, &p).unwrap_err();
        assert!(alloc::format!("{e}").contains("`lamda`"));
    }
}
