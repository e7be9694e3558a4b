//! Transfer attacks: one file per attack family, a registry that maps CLI names to them.
//!
//! Usage (what `mergeattack attack` does):
//! ```ignore
//! let mut cfg = AttackConfig::preset("mi-fgsm", Preset::TorchAttacks)?; // lookup + defaults
//! cfg.set("eps", "16/255")?;                                            // overrides, validated
//! let x_adv = cfg.run(&mut model, x.view(), &labels, None, &mut rng)?; // quantised x_adv
//! ```
//! Images are NCHW f32 in [0, 1]. `g_t` is the gradient of the batch-mean cross-entropy (targeted:
//! the negated loss toward the target labels). The rules, defaults and random-draw order are those
//! of METHODS.md, section "Attacks"; every random draw comes from the `ChaCha20Rng` the caller
//! passes, so the same seed and inputs give bitwise-same outputs.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use ndarray::{Array4, ArrayView4, Axis as NdAxis, Zip};
use rand_chacha::ChaCha20Rng;

use crate::classifier::{Classifier, ModelError};
use crate::merge::parse_number;
use crate::transform::TransformError;
use crate::transform::diversity::{DiVariant, Diversity};

mod bim;
mod cw_l2;
mod di_fgsm;
pub mod ensemble;
mod fgsm;
mod mi_fgsm;
mod pgd_l2;
mod si_ni_fgsm;
mod ti_fgsm;
mod vmi_fgsm;

#[cfg(test)]
pub(crate) mod reference;

pub use bim::{Bim, Pgd};
pub use cw_l2::CwL2;
pub use di_fgsm::DiFgsm;
pub use ensemble::{Ensemble, EnsembleMode};
pub use fgsm::Fgsm;
pub use mi_fgsm::{MiFgsm, NiFgsm};
pub use pgd_l2::PgdL2;
pub use si_ni_fgsm::SiNiFgsm;
pub use ti_fgsm::TiFgsm;
pub use vmi_fgsm::{VmiFgsm, VniFgsm};

/// Where the hyper-parameter defaults come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// torchattacks (the default): eps 8/255, alpha 2/255, 10 steps, DI shrink variant.
    TorchAttacks,
    /// TransferAttack: eps 16/255, alpha 1.6/255, 10 steps, mu 1, DI expand variant, VMI N 20.
    TransferAttack,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::TorchAttacks, Preset::TransferAttack];

    pub fn name(self) -> &'static str {
        match self {
            Preset::TorchAttacks => "torchattacks",
            Preset::TransferAttack => "transferattack",
        }
    }

    pub fn parse(s: &str) -> Result<Self, AttackError> {
        let n = normalise(s).replace('-', "");
        Preset::ALL.into_iter().find(|p| p.name() == n).ok_or_else(|| AttackError::BadChoice {
            param: "preset".into(),
            value: s.to_string(),
            choices: "torchattacks, transferattack",
        })
    }
}

/// How adversarial images are rounded to 8 bits before any target sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// floor(x * 255) / 255, as both references do when saving images (the default).
    Floor,
    /// round-half-even(x * 255) / 255.
    Round,
    /// Leave the f32 values.
    None,
}

impl Quantize {
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Floor => "floor",
            Quantize::Round => "round",
            Quantize::None => "none",
        }
    }

    /// Quantise in place.
    pub fn apply(self, x: &mut Array4<f32>) {
        match self {
            Quantize::Floor => x.mapv_inplace(|v| libm::floorf(v * 255.0) / 255.0),
            Quantize::Round => x.mapv_inplace(|v| libm::rintf(v * 255.0) / 255.0),
            Quantize::None => {}
        }
    }
}

/// The perturbation budget's norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    Linf,
    L2,
    /// No budget (C&W minimises the distance instead).
    Unbounded,
}

/// Centre of VNI's neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Around {
    /// Around x_t (torchattacks).
    Current,
    /// Around the look-ahead point built from the already-updated momentum (TransferAttack).
    LookAhead,
}

impl Around {
    pub fn name(self) -> &'static str {
        match self {
            Around::Current => "current",
            Around::LookAhead => "look-ahead",
        }
    }
}

/// Every hyper-parameter of every attack; each attack reads the keys it lists in
/// [`Attack::params`]. Build it with [`AttackConfig::preset`], change it with
/// [`AttackConfig::set`].
#[derive(Clone)]
pub struct AttackConfig {
    attack: &'static dyn Attack,
    preset: Preset,
    /// Perturbation budget (L-inf or L2 by the attack's norm).
    pub eps: f64,
    /// Step size.
    pub alpha: f64,
    /// Iterations (C&W: optimiser steps).
    pub steps: usize,
    /// Momentum decay mu.
    pub mu: f64,
    /// PGD's uniform random start.
    pub random_start: bool,
    /// DI's probability of transforming (0: no DI and no draws).
    pub di_prob: f64,
    pub di_variant: DiVariant,
    pub resize_rate: f64,
    /// TI kernel length (odd) and width.
    pub kernel_len: usize,
    pub nsig: f64,
    /// VMI/VNI: neighbours N, radius factor beta, and VNI's neighbour centre.
    pub neighbours: usize,
    pub beta: f64,
    pub around: Around,
    /// SI: number of scaled copies.
    pub scales: usize,
    /// C&W: constant c, confidence kappa, Adam learning rate.
    pub c: f64,
    pub kappa: f64,
    pub lr: f64,
    /// 8-bit quantisation of the result.
    pub quantize: Quantize,
}

/// A hyper-parameter: its key (as `--set key=value` takes it) and what it means.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub help: &'static str,
}

/// Every key, in listing order.
pub const PARAMS: &[ParamSpec] = &[
    ParamSpec { name: "eps", help: "perturbation budget (L-inf: in [0, 1]; L2: >= 0)" },
    ParamSpec { name: "alpha", help: "step size" },
    ParamSpec { name: "steps", help: "iterations (>= 1)" },
    ParamSpec { name: "mu", help: "momentum decay (alias decay)" },
    ParamSpec { name: "random-start", help: "uniform random start in the eps ball (true/false)" },
    ParamSpec { name: "di-prob", help: "DI probability of transforming, in [0, 1] (0: no DI)" },
    ParamSpec { name: "di-variant", help: "DI variant: shrink (torchattacks) or expand (TransferAttack)" },
    ParamSpec { name: "resize-rate", help: "DI resize rate (< 1 for shrink, > 1 for expand)" },
    ParamSpec { name: "kernel-len", help: "TI Gaussian kernel length (odd)" },
    ParamSpec { name: "nsig", help: "TI Gaussian kernel half-width in standard deviations" },
    ParamSpec { name: "neighbours", help: "VMI/VNI neighbours N (alias n)" },
    ParamSpec { name: "beta", help: "VMI/VNI neighbourhood radius factor (radius beta * eps)" },
    ParamSpec { name: "around", help: "VNI neighbours around x_t (current) or the look-ahead point (look-ahead)" },
    ParamSpec { name: "scales", help: "SI scaled copies x / 2^i, i < scales (alias m)" },
    ParamSpec { name: "c", help: "C&W weight of the margin loss" },
    ParamSpec { name: "kappa", help: "C&W confidence" },
    ParamSpec { name: "lr", help: "C&W Adam learning rate" },
    ParamSpec { name: "quantize", help: "8-bit quantisation of x_adv: floor, round or none" },
];

fn canonical_key(key: &str) -> String {
    let k = normalise(key);
    match k.as_str() {
        "decay" => "mu".into(),
        "n" => "neighbours".into(),
        "neighbors" => "neighbours".into(),
        "m" => "scales".into(),
        "diversity-prob" => "di-prob".into(),
        "len-kernel" => "kernel-len".into(),
        _ => k,
    }
}

impl AttackConfig {
    /// The defaults of attack `name` (CLI name or alias) under `preset`.
    pub fn preset(name: &str, preset: Preset) -> Result<Self, AttackError> {
        Ok(Self::for_attack(lookup(name)?, preset))
    }

    /// The defaults of `attack` under `preset`.
    pub fn for_attack(attack: &'static dyn Attack, preset: Preset) -> Self {
        let ta = preset == Preset::TransferAttack;
        let mut cfg = AttackConfig {
            attack,
            preset,
            eps: if ta { 16.0 / 255.0 } else { 8.0 / 255.0 },
            alpha: if ta { 1.6 / 255.0 } else { 2.0 / 255.0 },
            steps: 10,
            mu: 1.0,
            random_start: false,
            di_prob: 0.0,
            di_variant: if ta { DiVariant::Expand } else { DiVariant::Shrink },
            resize_rate: if ta { 1.1 } else { 0.9 },
            kernel_len: 15,
            nsig: 3.0,
            neighbours: if ta { 20 } else { 5 },
            beta: 1.5,
            around: if ta { Around::LookAhead } else { Around::Current },
            scales: 5,
            c: 1.0,
            kappa: 0.0,
            lr: 0.01,
            quantize: Quantize::Floor,
        };
        attack.configure(preset, &mut cfg);
        cfg
    }

    pub fn attack(&self) -> &'static dyn Attack {
        self.attack
    }

    pub fn preset_used(&self) -> Preset {
        self.preset
    }

    /// Override one hyper-parameter from its text (`8/255` fractions accepted). Keys the attack
    /// does not use are refused, naming the keys it takes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), AttackError> {
        let k = canonical_key(key);
        if !(k == "quantize" || self.attack.params().contains(&k.as_str())) {
            return Err(AttackError::UnknownParam {
                attack: self.attack.name(),
                param: key.to_string(),
                known: self.attack.params().iter().chain(&["quantize"]).copied().collect::<Vec<_>>().join(", "),
            });
        }
        let num = |v: &str| {
            parse_number(v).ok_or_else(|| AttackError::BadValue {
                param: k.clone(),
                value: v.to_string(),
                expected: "a number (a fraction such as 8/255 is fine)",
            })
        };
        let int = |v: &str| {
            v.trim().parse::<usize>().map_err(|_| AttackError::BadValue {
                param: k.clone(),
                value: v.to_string(),
                expected: "a non-negative integer",
            })
        };
        let choice =
            |v: &str, choices: &'static str| AttackError::BadChoice { param: k.clone(), value: v.to_string(), choices };
        match k.as_str() {
            "eps" => self.eps = num(value)?,
            "alpha" => self.alpha = num(value)?,
            "steps" => self.steps = int(value)?,
            "mu" => self.mu = num(value)?,
            "random-start" => {
                self.random_start = match value.trim() {
                    "true" => true,
                    "false" => false,
                    v => return Err(choice(v, "true, false")),
                }
            }
            "di-prob" => self.di_prob = num(value)?,
            "di-variant" => {
                self.di_variant = match normalise(value).as_str() {
                    "shrink" => DiVariant::Shrink,
                    "expand" => DiVariant::Expand,
                    _ => return Err(choice(value, "shrink, expand")),
                }
            }
            "resize-rate" => self.resize_rate = num(value)?,
            "kernel-len" => self.kernel_len = int(value)?,
            "nsig" => self.nsig = num(value)?,
            "neighbours" => self.neighbours = int(value)?,
            "beta" => self.beta = num(value)?,
            "around" => {
                self.around = match normalise(value).as_str() {
                    "current" => Around::Current,
                    "look-ahead" | "lookahead" => Around::LookAhead,
                    _ => return Err(choice(value, "current, look-ahead")),
                }
            }
            "scales" => self.scales = int(value)?,
            "c" => self.c = num(value)?,
            "kappa" => self.kappa = num(value)?,
            "lr" => self.lr = num(value)?,
            "quantize" => {
                self.quantize = match normalise(value).as_str() {
                    "floor" => Quantize::Floor,
                    "round" => Quantize::Round,
                    "none" => Quantize::None,
                    _ => return Err(choice(value, "floor, round, none")),
                }
            }
            _ => unreachable!("every listed key is handled"),
        }
        Ok(())
    }

    /// Range checks of the keys the attack uses.
    pub fn validate(&self) -> Result<(), AttackError> {
        let uses = |k: &str| self.attack.params().contains(&k);
        let range = |param: &'static str, value: f64, ok: bool, allowed: &'static str| {
            if ok && value.is_finite() { Ok(()) } else { Err(AttackError::OutOfRange { param, value, allowed }) }
        };
        if uses("eps") {
            match self.attack.norm() {
                Norm::Linf => range("eps", self.eps, (0.0..=1.0).contains(&self.eps), "in [0, 1] for an L-inf attack")?,
                _ => range("eps", self.eps, self.eps >= 0.0, ">= 0")?,
            }
        }
        if uses("alpha") {
            range("alpha", self.alpha, self.alpha >= 0.0, ">= 0")?;
        }
        if uses("steps") && self.steps == 0 {
            return Err(AttackError::OutOfRange { param: "steps", value: 0.0, allowed: ">= 1" });
        }
        if uses("mu") {
            range("mu", self.mu, self.mu >= 0.0, ">= 0")?;
        }
        if uses("di-prob") {
            range("di-prob", self.di_prob, (0.0..=1.0).contains(&self.di_prob), "in [0, 1]")?;
            if self.di_prob > 0.0 {
                match self.di_variant {
                    DiVariant::Shrink => range(
                        "resize-rate",
                        self.resize_rate,
                        self.resize_rate > 0.0 && self.resize_rate < 1.0,
                        "in (0, 1) for the shrink variant",
                    )?,
                    DiVariant::Expand => {
                        range("resize-rate", self.resize_rate, self.resize_rate > 1.0, "> 1 for the expand variant")?
                    }
                }
            }
        }
        if uses("kernel-len") && self.kernel_len.is_multiple_of(2) {
            return Err(AttackError::OutOfRange {
                param: "kernel-len",
                value: self.kernel_len as f64,
                allowed: "an odd number",
            });
        }
        if uses("nsig") {
            range("nsig", self.nsig, self.nsig > 0.0, "> 0")?;
        }
        if uses("neighbours") && self.neighbours == 0 {
            return Err(AttackError::OutOfRange { param: "neighbours", value: 0.0, allowed: ">= 1" });
        }
        if uses("beta") {
            range("beta", self.beta, self.beta >= 0.0, ">= 0")?;
        }
        if uses("scales") && !(1..=32).contains(&self.scales) {
            return Err(AttackError::OutOfRange { param: "scales", value: self.scales as f64, allowed: "in 1..=32" });
        }
        if uses("c") {
            range("c", self.c, self.c >= 0.0, ">= 0")?;
        }
        if uses("kappa") {
            range("kappa", self.kappa, self.kappa >= 0.0, ">= 0")?;
        }
        if uses("lr") {
            range("lr", self.lr, self.lr > 0.0, "> 0")?;
        }
        Ok(())
    }

    /// The DI setting, or `None` when DI is off (probability 0).
    pub(crate) fn diversity(&self) -> Option<Diversity> {
        (self.di_prob > 0.0).then_some(Diversity {
            variant: self.di_variant,
            rate: self.resize_rate,
            prob: self.di_prob,
        })
    }

    /// `key=value` for every key the attack uses, fractions of 255 written as such.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let linf = self.attack.norm() == Norm::Linf;
        for key in self.attack.params().iter().chain(&["quantize"]) {
            let v = match *key {
                "eps" if linf => fraction(self.eps),
                "alpha" if linf => fraction(self.alpha),
                "eps" => format!("{}", self.eps),
                "alpha" => format!("{}", self.alpha),
                "steps" => format!("{}", self.steps),
                "mu" => format!("{}", self.mu),
                "random-start" => format!("{}", self.random_start),
                "di-prob" => format!("{}", self.di_prob),
                "di-variant" => self.di_variant.name().into(),
                "resize-rate" => format!("{}", self.resize_rate),
                "kernel-len" => format!("{}", self.kernel_len),
                "nsig" => format!("{}", self.nsig),
                "neighbours" => format!("{}", self.neighbours),
                "beta" => format!("{}", self.beta),
                "around" => self.around.name().into(),
                "scales" => format!("{}", self.scales),
                "c" => format!("{}", self.c),
                "kappa" => format!("{}", self.kappa),
                "lr" => format!("{}", self.lr),
                "quantize" => self.quantize.name().into(),
                other => format!("?{other}"),
            };
            parts.push(format!("{key}={v}"));
        }
        parts.join(" ")
    }

    /// Validate, craft and quantise: the adversarial batch for `x` (N, C, H, W in [0, 1]).
    /// `labels` are the true classes; with `target` the attack is targeted toward those classes.
    pub fn run(
        &self,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        labels: &[usize],
        target: Option<&[usize]>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError> {
        self.validate()?;
        check_inputs(&*model, x, labels, target)?;
        let goal = Goal { labels: target.unwrap_or(labels), targeted: target.is_some() };
        let mut adv = self.attack.craft(self, model, x, &goal, rng)?;
        if adv.dim() != x.dim() {
            return Err(AttackError::ModelOutput(format!(
                "attack `{}` returned shape {:?} for images of shape {:?}",
                self.attack.name(),
                adv.dim(),
                x.dim()
            )));
        }
        if let Some(v) = adv.iter().find(|v| !v.is_finite()) {
            return Err(AttackError::ModelOutput(format!(
                "attack `{}` produced a non-finite pixel ({v}): the model's gradient is not finite",
                self.attack.name()
            )));
        }
        self.quantize.apply(&mut adv);
        Ok(adv)
    }
}

impl fmt::Debug for AttackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}] {}", self.attack.name(), self.preset.name(), self.describe())
    }
}

/// `v` as `k/255` when k has at most one decimal, else as a plain number.
fn fraction(v: f64) -> String {
    let k = v * 255.0;
    let k10 = libm::round(k * 10.0);
    if v > 0.0 && v < 1.0 && (k * 10.0 - k10).abs() < 1e-6 {
        if k10 % 10.0 == 0.0 { format!("{}/255", k10 / 10.0) } else { format!("{:.1}/255", k10 / 10.0) }
    } else {
        format!("{v}")
    }
}

/// The loss an attack climbs: the batch-mean cross-entropy toward `labels`, negated when targeted.
pub struct Goal<'a> {
    /// True labels (untargeted) or target labels (targeted).
    pub labels: &'a [usize],
    pub targeted: bool,
}

impl Goal<'_> {
    /// g = d L / d x at `x`, L = mean CE (untargeted) or -mean CE (targeted).
    pub fn grad(&self, model: &mut dyn Classifier, x: ArrayView4<'_, f32>) -> Result<Array4<f32>, AttackError> {
        let lg = model.loss_grad(x, self.labels)?;
        if lg.grad.dim() != x.dim() {
            return Err(AttackError::ModelOutput(format!(
                "the model returned an input gradient of shape {:?} for images of shape {:?}",
                lg.grad.dim(),
                x.dim()
            )));
        }
        let n = x.dim().0 as f32;
        let s = if self.targeted { -1.0 / n } else { 1.0 / n };
        let mut g = lg.grad;
        g.mapv_inplace(|v| v * s);
        Ok(g)
    }
}

/// An attack.
pub trait Attack: Sync {
    /// The CLI name (kebab-case).
    fn name(&self) -> &'static str;
    /// Other accepted names.
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// One line: the update rule.
    fn summary(&self) -> &'static str;
    /// The budget's norm (L-inf unless the attack says otherwise).
    fn norm(&self) -> Norm {
        Norm::Linf
    }
    /// The keys of [`AttackConfig`] this attack reads (besides `quantize`).
    fn params(&self) -> &'static [&'static str];
    /// Adjust the preset's common defaults to this attack's.
    fn configure(&self, preset: Preset, cfg: &mut AttackConfig);
    /// The unquantised adversarial batch. Inputs and config are validated by the caller
    /// ([`AttackConfig::run`]).
    fn craft(
        &self,
        cfg: &AttackConfig,
        model: &mut dyn Classifier,
        x: ArrayView4<'_, f32>,
        goal: &Goal<'_>,
        rng: &mut ChaCha20Rng,
    ) -> Result<Array4<f32>, AttackError>;
}

static REGISTRY: &[&dyn Attack] =
    &[&Fgsm, &Bim, &Pgd, &PgdL2, &MiFgsm, &NiFgsm, &DiFgsm, &TiFgsm, &VmiFgsm, &VniFgsm, &SiNiFgsm, &CwL2];

/// The study's default six.
pub const STUDY_DEFAULT: [&str; 6] = ["fgsm", "pgd", "mi-fgsm", "di-fgsm", "ti-fgsm", "vmi-fgsm"];

/// Every attack, in listing order.
pub fn registry() -> &'static [&'static dyn Attack] {
    REGISTRY
}

/// Find an attack by CLI name or alias; `_` and `-` are interchangeable, case is ignored.
pub fn lookup(name: &str) -> Result<&'static dyn Attack, AttackError> {
    let norm = normalise(name);
    REGISTRY
        .iter()
        .copied()
        .find(|a| normalise(a.name()) == norm || a.aliases().iter().any(|x| normalise(x) == norm))
        .ok_or_else(|| AttackError::UnknownAttack {
            name: name.to_string(),
            known: REGISTRY.iter().map(|a| a.name()).collect::<Vec<_>>().join(", "),
        })
}

fn normalise(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('_', "-")
}

/// Check the batch, labels and targets against the model.
pub fn check_inputs(
    model: &dyn Classifier,
    x: ArrayView4<'_, f32>,
    labels: &[usize],
    target: Option<&[usize]>,
) -> Result<(), AttackError> {
    let (n, c, h, w) = x.dim();
    if n == 0 {
        return Err(AttackError::EmptyBatch);
    }
    let want = model.image_shape();
    if (c, h, w) != want {
        return Err(AttackError::ShapeMismatch { got: (c, h, w), want });
    }
    let classes = model.num_classes();
    for (what, l) in [("labels", Some(labels)), ("target labels", target)] {
        let Some(l) = l else { continue };
        if l.len() != n {
            return Err(AttackError::LabelCount { what, got: l.len(), batch: n });
        }
        if let Some((i, &y)) = l.iter().enumerate().find(|(_, y)| **y >= classes) {
            return Err(AttackError::LabelOutOfRange { what, index: i, label: y, classes });
        }
    }
    if let Some(((i, ci, hi, wi), v)) = x.indexed_iter().find(|(_, v)| !(v.is_finite() && (0.0..=1.0).contains(*v))) {
        return Err(AttackError::BadPixel { image: i, at: (ci, hi, wi), value: *v });
    }
    Ok(())
}

/// Why an attack could not run.
#[derive(Clone, Debug, PartialEq)]
pub enum AttackError {
    UnknownAttack { name: String, known: String },
    UnknownParam { attack: &'static str, param: String, known: String },
    BadValue { param: String, value: String, expected: &'static str },
    BadChoice { param: String, value: String, choices: &'static str },
    OutOfRange { param: &'static str, value: f64, allowed: &'static str },
    EmptyBatch,
    ShapeMismatch { got: (usize, usize, usize), want: (usize, usize, usize) },
    LabelCount { what: &'static str, got: usize, batch: usize },
    LabelOutOfRange { what: &'static str, index: usize, label: usize, classes: usize },
    BadPixel { image: usize, at: (usize, usize, usize), value: f32 },
    Transform(TransformError),
    Model(ModelError),
    ModelOutput(String),
    Ensemble(String),
}

impl fmt::Display for AttackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttackError::UnknownAttack { name, known } => write!(f, "unknown attack `{name}` (known: {known})"),
            AttackError::UnknownParam { attack, param, known } => {
                write!(f, "attack `{attack}` has no parameter `{param}` (it takes: {known})")
            }
            AttackError::BadValue { param, value, expected } => {
                write!(f, "attack parameter `{param}` = `{value}` is not {expected}")
            }
            AttackError::BadChoice { param, value, choices } => {
                write!(f, "attack parameter `{param}` = `{value}` is not one of: {choices}")
            }
            AttackError::OutOfRange { param, value, allowed } => {
                write!(f, "attack parameter `{param}` = {value} is out of range: it must be {allowed}")
            }
            AttackError::EmptyBatch => write!(f, "the batch of images to attack is empty"),
            AttackError::ShapeMismatch { got, want } => write!(
                f,
                "images are {}x{}x{} (CxHxW) but the model expects {}x{}x{}",
                got.0, got.1, got.2, want.0, want.1, want.2
            ),
            AttackError::LabelCount { what, got, batch } => {
                write!(f, "{got} {what} were given for a batch of {batch} images")
            }
            AttackError::LabelOutOfRange { what, index, label, classes } => {
                write!(f, "{what}[{index}] = {label} is out of range: the model has {classes} classes")
            }
            AttackError::BadPixel { image, at, value } => write!(
                f,
                "image {image} has pixel (c={}, y={}, x={}) = {value}, outside [0, 1] (attacks take pixels in [0, 1])",
                at.0, at.1, at.2
            ),
            AttackError::Transform(e) => write!(f, "{e}"),
            AttackError::Model(e) => write!(f, "the model failed: {e}"),
            AttackError::ModelOutput(s) => f.write_str(s),
            AttackError::Ensemble(s) => f.write_str(s),
        }
    }
}

impl From<ModelError> for AttackError {
    fn from(e: ModelError) -> Self {
        AttackError::Model(e)
    }
}

impl From<TransformError> for AttackError {
    fn from(e: TransformError) -> Self {
        AttackError::Transform(e)
    }
}

// ---- the shared arithmetic of the iterative attacks ----

/// sign with sign(0) = 0 (torch's `sign`).
#[inline]
pub(crate) fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// n(g) = g / mean over C,H,W of |g| (accumulated in f64), per sample; a sample with a zero gradient
/// stays zero.
pub(crate) fn normalise_l1(g: &mut Array4<f32>) {
    for mut s in g.axis_iter_mut(NdAxis(0)) {
        let count = s.len() as f64;
        let mean = (s.iter().map(|v| f64::from(libm::fabsf(*v))).sum::<f64>() / count) as f32;
        if mean > 0.0 && mean.is_finite() {
            s.mapv_inplace(|v| v / mean);
        }
    }
}

/// m <- mu m + n(g) (torchattacks: `grad = n(g) + momentum * decay`).
pub(crate) fn momentum_update(m: &mut Array4<f32>, mut g: Array4<f32>, mu: f32) {
    normalise_l1(&mut g);
    Zip::from(m).and(&g).for_each(|m, &g| *m = g + *m * mu);
}

/// x_adv <- Pi(x_adv + alpha sign(dir)): clip the perturbation to [-eps, eps], then x + delta to
/// [0, 1].
pub(crate) fn linf_step(x: ArrayView4<'_, f32>, adv: &mut Array4<f32>, dir: &Array4<f32>, alpha: f32, eps: f32) {
    Zip::from(adv).and(x).and(dir).for_each(|a, &x, &d| {
        let stepped = *a + alpha * sign(d);
        let delta = (stepped - x).clamp(-eps, eps);
        *a = (x + delta).clamp(0.0, 1.0);
    });
}

/// `x + s * m` (the NI look-ahead with s = alpha mu).
pub(crate) fn look_ahead(adv: &Array4<f32>, m: &Array4<f32>, s: f32) -> Array4<f32> {
    let mut out = adv.clone();
    Zip::from(&mut out).and(m).for_each(|o, &m| *o += s * m);
    out
}

/// The common loop of MI, NI, DI and TI: per step, the gradient at `x_t` (or the NI look-ahead)
/// through DI's transform when on, smoothed by TI's kernel when given, normalised, accumulated
/// in the momentum, and a signed step projected by Pi.
pub(crate) fn momentum_iterative(
    cfg: &AttackConfig,
    model: &mut dyn Classifier,
    x: ArrayView4<'_, f32>,
    goal: &Goal<'_>,
    rng: &mut ChaCha20Rng,
    nesterov: bool,
    kernel: Option<&crate::transform::gaussian::GaussianKernel>,
) -> Result<Array4<f32>, AttackError> {
    let (eps, alpha, mu) = (cfg.eps as f32, cfg.alpha as f32, cfg.mu as f32);
    let di = cfg.diversity();
    let w = x.dim().3;
    if let Some(d) = &di {
        if x.dim().2 != w {
            return Err(AttackError::Transform(TransformError(format!(
                "DI needs square images, got {}x{w}",
                x.dim().2
            ))));
        }
        d.bounds(w)?;
    }
    let mut adv = x.to_owned();
    let mut m = Array4::<f32>::zeros(x.dim());
    for _ in 0..cfg.steps {
        let ahead;
        let point = if nesterov {
            ahead = look_ahead(&adv, &m, alpha * mu);
            ahead.view()
        } else {
            adv.view()
        };
        let mut g = match &di {
            Some(d) => {
                let draw = d.draw(w, rng)?;
                let gt = goal.grad(model, draw.apply(point).view())?;
                draw.adjoint(gt.view())
            }
            None => goal.grad(model, point)?,
        };
        if let Some(k) = kernel {
            g = k.apply(g.view());
        }
        momentum_update(&mut m, g, mu);
        linf_step(x, &mut adv, &m, alpha, eps);
    }
    Ok(adv)
}

#[cfg(test)]
mod tests;
