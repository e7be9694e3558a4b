//! The study configuration (TOML), its validation, its stable hash, the enumeration of its
//! settings and `--shard i/n` selection.
//!
//! `examples/study.toml` documents every key; [`DEFAULT_TOML`] (the mini zoo, 192 settings) and
//! [`SMOKE_TOML`] (8 settings) are built in. Errors name the file, the line and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::setting::SettingKey;

/// The merging methods of METHODS.md: the core registry's, then the data-dependent ones
/// `merging` dispatches (a `+surgery` suffix is accepted on each).
pub fn known_methods() -> Vec<&'static str> {
    let data_free = mergeattack_core::merge::registry().iter().map(|m| m.name());
    data_free.chain(crate::merging::DATA_METHODS.iter().copied()).collect()
}

/// The attacks of METHODS.md.
pub const KNOWN_ATTACKS: &[&str] = &[
    "fgsm",
    "bim",
    "pgd",
    "pgd-l2",
    "mi-fgsm",
    "ni-fgsm",
    "di-fgsm",
    "ti-fgsm",
    "vmi-fgsm",
    "vni-fgsm",
    "si-ni-fgsm",
    "cw-l2",
];

/// Attack presets.
pub const KNOWN_PRESETS: &[&str] = &["torchattacks", "transferattack"];

/// The built-in default study: the mini zoo's 4 tasks x 8 methods x 6 attacks (192 settings).
pub const DEFAULT_TOML: &str = r#"
seed = 0
device = "cpu"
threads = 2
output = "study-out"
images_per_task = 256
batch_size = 32
eps = ["8/255"]
surrogates = ["finetuned"]


datasets = [
  { name = "digits-colour", data = "mini:digits-colour" },
  { name = "fashion-coarse-colour", data = "mini:fashion-coarse-colour" },
  { name = "animals-colour", data = "mini:animals-colour" },
  { name = "optdigits", data = "mini:optdigits" },
]
methods = [
  { name = "weight-average" },
  { name = "task-arithmetic" },
  { name = "ties" },
  { name = "emr" },
  { name = "tsv-m" },
  { name = "adamerging" },
  { name = "task-arithmetic+surgery" },
  { name = "adamerging+surgery" },
]
attacks = [
  { name = "fgsm" },
  { name = "pgd" },
  { name = "mi-fgsm" },
  { name = "di-fgsm" },
  { name = "ti-fgsm" },
  { name = "vmi-fgsm" },
]

[models]
zoo = "mini"
"#;

/// The built-in smoke study (CI): 2 tasks x 2 methods x 2 attacks, few images, on the reduced
/// (CI) configuration of the mini zoo built for its two tasks.
pub const SMOKE_TOML: &str = r#"
seed = 0
device = "cpu"
threads = 2
output = "study-smoke"
images_per_task = 16
batch_size = 8
eps = ["8/255"]
surrogates = ["finetuned"]


datasets = [
  { name = "digits", data = "mini:digits" },
  { name = "fashion", data = "mini:fashion" },
]
methods = [{ name = "weight-average" }, { name = "task-arithmetic" }]
attacks = [{ name = "fgsm" }, { name = "pgd" }]

[models]
zoo = "mini"
zoo_config = "reduced"
"#;

/// The zoo configurations a study can name with `models.zoo_config`.
pub const ZOO_CONFIGS: &[&str] = &["default", "reduced"];

/// A configuration error: one sentence naming the file, the line and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read study config {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{file} line {line}: {message}")]
    Syntax { file: String, line: usize, message: String },
    #[error("{file}: {message}")]
    NoLine { file: String, message: String },
    #[error("{file} line {line}, key `{key}`: {message}")]
    Invalid { file: String, line: usize, key: String, message: String },
    #[error("{file}: key `{key}`: {message}")]
    Missing { file: String, key: String, message: String },
    #[error("bad --shard `{0}`: expected i/n with 0 <= i < n, e.g. 0/4")]
    Shard(String),
}

/// A perturbation budget: the spelling from the config (the setting key) and its value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Eps {
    pub text: String,
    pub value: f64,
}

/// Where the models come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelPool {
    /// A built-in zoo (`mini`): pretrained, fine-tuned, reference models and heads come from it;
    /// explicit entries below override it.
    pub zoo: Option<String>,
    /// Which configuration of the built-in zoo: `default` (absent) or `reduced` (the CI zoo). The
    /// zoo is built for the study's tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zoo_config: Option<String>,
    pub pretrained: Option<String>,
    pub heads: Option<String>,
    /// Fine-tuned model per dataset name.
    pub finetuned: BTreeMap<String, String>,
    /// Unmerged reference model per dataset name (for `rtasr_ref_*`); optional.
    pub reference: BTreeMap<String, String>,
}

/// A dataset (task) of the study.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dataset {
    pub name: String,
    /// A data spec, e.g. `mini:digits`.
    pub data: String,
}

/// A merge method with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodSpec {
    /// The name used in setting keys (unique within the study).
    pub label: String,
    /// The CLI method name, possibly with `+surgery`.
    pub name: String,
    pub params: BTreeMap<String, String>,
}

impl MethodSpec {
    /// True for `...+surgery`.
    pub fn surgery(&self) -> bool {
        self.name.ends_with("+surgery")
    }
    /// The method name without the `+surgery` suffix.
    pub fn base(&self) -> &str {
        self.name.strip_suffix("+surgery").unwrap_or(&self.name)
    }
}

/// An attack with its preset and overrides (eps comes from the study's eps list).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttackSpec {
    pub label: String,
    pub name: String,
    pub preset: String,
    pub overrides: BTreeMap<String, String>,
}

/// The model the attacks are crafted on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Surrogate {
    /// The task's own fine-tuned model.
    Finetuned,
    /// The pretrained backbone (with the task's head).
    Pretrained,
    /// A checkpoint file.
    File(String),
    /// Logit average of several surrogates.
    Ensemble(Vec<Surrogate>),
}

impl fmt::Display for Surrogate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Surrogate::Finetuned => f.write_str("finetuned"),
            Surrogate::Pretrained => f.write_str("pretrained"),
            Surrogate::File(p) => f.write_str(p),
            Surrogate::Ensemble(v) => {
                f.write_str("ensemble:[")?;
                for (i, s) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{s}")?;
                }
                f.write_str("]")
            }
        }
    }
}

impl Surrogate {
    /// Parse `finetuned`, `pretrained`, `ensemble:[a,b,...]` or a checkpoint path (which must
    /// contain `/` or end with `.safetensors`, so that a misspelt keyword is not taken for a file).
    pub fn parse(s: &str) -> Result<Surrogate, String> {
        let s = s.trim();
        match s {
            "finetuned" => Ok(Surrogate::Finetuned),
            "pretrained" => Ok(Surrogate::Pretrained),
            _ => {
                if let Some(rest) = s.strip_prefix("ensemble:") {
                    let inner = rest
                        .trim()
                        .strip_prefix('[')
                        .and_then(|r| r.strip_suffix(']'))
                        .ok_or_else(|| format!("ensemble surrogate `{s}` must be written ensemble:[a,b,...]"))?;
                    let parts: Vec<&str> = split_top_level(inner);
                    if parts.len() < 2 {
                        return Err(format!("ensemble surrogate `{s}` needs at least two members"));
                    }
                    return parts.into_iter().map(Surrogate::parse).collect::<Result<_, _>>().map(Surrogate::Ensemble);
                }
                if s.contains('/') || s.ends_with(".safetensors") {
                    Ok(Surrogate::File(s.to_string()))
                } else {
                    Err(format!(
                        "unknown surrogate `{s}` (expected finetuned, pretrained, ensemble:[...] or a .safetensors path)"
                    ))
                }
            }
        }
    }
}

/// Split at commas that are not inside brackets.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

/// A validated study configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudyConfig {
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Worker threads (results do not depend on it; not part of the hash).
    pub threads: usize,
    /// Output directory (not part of the hash).
    pub output: PathBuf,
    pub images_per_task: usize,
    pub batch_size: usize,
    pub eps: Vec<Eps>,
    pub surrogates: Vec<Surrogate>,
    pub models: ModelPool,
    pub datasets: Vec<Dataset>,
    pub methods: Vec<MethodSpec>,
    pub attacks: Vec<AttackSpec>,
}

/// One setting of the enumeration.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Position in the full enumeration (0-based).
    pub index: usize,
    pub key: SettingKey,
    pub eps_value: f64,
}

/// `--shard i/n`: the settings whose index is i modulo n (0 <= i < n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Shard(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// The whole study.
    pub const ALL: Shard = Shard { index: 0, count: 1 };
    /// True when setting `index` belongs to this shard.
    pub fn contains(&self, index: usize) -> bool {
        index % self.count == self.index
    }
}

impl StudyConfig {
    /// The built-in default study.
    pub fn default_study() -> StudyConfig {
        StudyConfig::from_toml_str(DEFAULT_TOML, "<built-in default study>")
            .expect("the built-in study config is valid")
    }

    /// The built-in smoke study.
    pub fn smoke() -> StudyConfig {
        StudyConfig::from_toml_str(SMOKE_TOML, "<built-in smoke study>").expect("the built-in smoke config is valid")
    }

    /// Read and validate a TOML file.
    pub fn from_file(path: &Path) -> Result<StudyConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        StudyConfig::from_toml_str(&text, &path.display().to_string())
    }

    /// Parse and validate TOML text; `file` names it in errors.
    pub fn from_toml_str(text: &str, file: &str) -> Result<StudyConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => ConfigError::Syntax {
                file: file.to_string(),
                line: line_of(text, span.start),
                message: e.message().trim().to_string(),
            },
            None => ConfigError::NoLine { file: file.to_string(), message: e.message().trim().to_string() },
        })?;
        Validator { text, file }.validate(raw)
    }

    /// SHA-256 (hex) of a canonical serialisation of everything that can change results: every
    /// key except `output` and `threads`. Independent of comments, key order and layout.
    pub fn hash(&self) -> String {
        let mut v = serde_json::to_value(self).expect("the config serialises");
        if let serde_json::Value::Object(m) = &mut v {
            m.remove("output");
            m.remove("threads");
        }
        let mut canon = String::new();
        canonical_json(&v, &mut canon);
        let digest = Sha256::digest(canon.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every setting, in a fixed order: datasets, then methods, attacks, surrogates and eps, each
    /// in the order the config lists them (eps varies fastest).
    pub fn settings(&self) -> Vec<Setting> {
        let mut out = Vec::new();
        for d in &self.datasets {
            for m in &self.methods {
                for a in &self.attacks {
                    for s in &self.surrogates {
                        for e in &self.eps {
                            out.push(Setting {
                                index: out.len(),
                                key: SettingKey {
                                    dataset: d.name.clone(),
                                    method: m.label.clone(),
                                    attack: a.label.clone(),
                                    surrogate: s.to_string(),
                                    eps: e.text.clone(),
                                },
                                eps_value: e.value,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// The settings of one shard, in enumeration order.
    pub fn shard_settings(&self, shard: Shard) -> Vec<Setting> {
        self.settings().into_iter().filter(|s| shard.contains(s.index)).collect()
    }

    /// The method spec with this label.
    pub fn method(&self, label: &str) -> Option<&MethodSpec> {
        self.methods.iter().find(|m| m.label == label)
    }

    /// The attack spec with this label.
    pub fn attack(&self, label: &str) -> Option<&AttackSpec> {
        self.attacks.iter().find(|a| a.label == label)
    }
}

/// JSON with object keys sorted, no whitespace.
fn canonical_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

// ---- raw (as written) form ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    seed: Option<Spanned<i64>>,
    device: Option<Spanned<String>>,
    threads: Option<Spanned<i64>>,
    output: Option<String>,
    images_per_task: Option<Spanned<i64>>,
    batch_size: Option<Spanned<i64>>,
    eps: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    surrogates: Option<Spanned<Vec<Spanned<String>>>>,
    models: Spanned<RawModels>,
    datasets: Spanned<Vec<Spanned<RawDataset>>>,
    methods: Spanned<Vec<Spanned<RawMethod>>>,
    attacks: Spanned<Vec<Spanned<RawAttack>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModels {
    zoo: Option<Spanned<String>>,
    zoo_config: Option<Spanned<String>>,
    pretrained: Option<String>,
    heads: Option<String>,
    #[serde(default)]
    finetuned: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    reference: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: Spanned<String>,
    data: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMethod {
    name: Spanned<String>,
    label: Option<Spanned<String>>,
    #[serde(default)]
    params: BTreeMap<String, Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttack {
    name: Spanned<String>,
    label: Option<Spanned<String>>,
    preset: Option<Spanned<String>>,
    #[serde(default)]
    overrides: BTreeMap<String, Spanned<toml::Value>>,
}

struct Validator<'a> {
    text: &'a str,
    file: &'a str,
}

impl Validator<'_> {
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            file: self.file.to_string(),
            line: line_of(self.text, span.start),
            key: key.into(),
            message: message.into(),
        })
    }

    fn positive(&self, v: Option<Spanned<i64>>, key: &str, default: i64) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default as usize),
            Some(s) if *s.get_ref() >= 1 => Ok(*s.get_ref() as usize),
            Some(s) => self.err(s.span(), key, format!("must be at least 1, got {}", s.get_ref())),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<StudyConfig, ConfigError> {
        let seed = match raw.seed {
            None => 0,
            Some(s) if *s.get_ref() >= 0 => *s.get_ref() as u64,
            Some(s) => return self.err(s.span(), "seed", format!("must be >= 0, got {}", s.get_ref())),
        };
        let device = match raw.device {
            None => "cpu".to_string(),
            Some(d) => {
                let v = d.get_ref().trim();
                let ok = v == "cpu"
                    || v == "cuda"
                    || v.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                if !ok {
                    return self.err(
                        d.span(),
                        "device",
                        format!("unknown device `{v}` (expected cpu, cuda or cuda:N)"),
                    );
                }
                v.to_string()
            }
        };
        let threads = self.positive(raw.threads, "threads", 2)?;
        let images_per_task = self.positive(raw.images_per_task, "images_per_task", 256)?;
        let batch_size = self.positive(raw.batch_size, "batch_size", 32)?;
        let output = PathBuf::from(raw.output.unwrap_or_else(|| "study-out".into()));

        let eps = match raw.eps {
            None => vec![Eps { text: "8/255".into(), value: 8.0 / 255.0 }],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return self.err(list.span(), "eps", "the eps list is empty");
                }
                let mut out: Vec<Eps> = Vec::new();
                for (i, e) in list.get_ref().iter().enumerate() {
                    let key = format!("eps[{i}]");
                    let text = match scalar_text(e.get_ref()) {
                        Some(t) => t,
                        None => return self.err(e.span(), key, "expected a number or a fraction such as \"8/255\""),
                    };
                    let value = match mergeattack_core::merge::parse_number(&text) {
                        Some(v) if v > 0.0 => v,
                        _ => return self.err(e.span(), key, format!("`{text}` is not a positive number")),
                    };
                    if out.iter().any(|x| x.text == text) {
                        return self.err(e.span(), key, format!("eps `{text}` is listed twice"));
                    }
                    out.push(Eps { text, value });
                }
                out
            }
        };

        let surrogates = match raw.surrogates {
            None => vec![Surrogate::Finetuned],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return self.err(list.span(), "surrogates", "the surrogate list is empty");
                }
                let mut out: Vec<Surrogate> = Vec::new();
                for (i, s) in list.get_ref().iter().enumerate() {
                    let key = format!("surrogates[{i}]");
                    let parsed = match Surrogate::parse(s.get_ref()) {
                        Ok(p) => p,
                        Err(m) => return self.err(s.span(), key, m),
                    };
                    if out.contains(&parsed) {
                        return self.err(s.span(), key, format!("surrogate `{parsed}` is listed twice"));
                    }
                    out.push(parsed);
                }
                out
            }
        };

        // Datasets.
        if raw.datasets.get_ref().is_empty() {
            return self.err(raw.datasets.span(), "datasets", "no datasets listed");
        }
        let mut datasets: Vec<Dataset> = Vec::new();
        for (i, d) in raw.datasets.get_ref().iter().enumerate() {
            let d = d.get_ref();
            let name = d.name.get_ref().trim().to_string();
            if name.is_empty() || name.contains(['/', ',', '[', ']']) {
                return self.err(d.name.span(), format!("datasets[{i}].name"), format!("bad dataset name `{name}`"));
            }
            if datasets.iter().any(|x| x.name == name) {
                return self.err(
                    d.name.span(),
                    format!("datasets[{i}].name"),
                    format!("dataset `{name}` is listed twice"),
                );
            }
            let data = d.data.get_ref().trim().to_string();
            if !data.contains(':') && !data.contains('/') {
                return self.err(
                    d.data.span(),
                    format!("datasets[{i}].data"),
                    format!("`{data}` is not a data spec (e.g. mini:digits, or a path)"),
                );
            }
            datasets.push(Dataset { name, data });
        }

        // Models.
        let rm = raw.models.into_inner();
        let zoo = match rm.zoo {
            None => None,
            Some(z) if z.get_ref() == "mini" => Some("mini".to_string()),
            Some(z) => return self.err(z.span(), "models.zoo", format!("unknown zoo `{}` (known: mini)", z.get_ref())),
        };
        for (table, map) in [("finetuned", &rm.finetuned), ("reference", &rm.reference)] {
            for (k, v) in map {
                if !datasets.iter().any(|d| &d.name == k) {
                    return self.err(v.span(), format!("models.{table}.{k}"), format!("`{k}` is not a listed dataset"));
                }
            }
        }
        if zoo.is_none() {
            if rm.pretrained.is_none() {
                return Err(self.missing("models.pretrained", "required unless models.zoo is set"));
            }
            if let Some(d) = datasets.iter().find(|d| !rm.finetuned.contains_key(&d.name)) {
                return Err(self.missing(
                    &format!("models.finetuned.{}", d.name),
                    "every dataset needs a fine-tuned model unless models.zoo is set",
                ));
            }
        }
        let zoo_config = match rm.zoo_config {
            None => None,
            Some(z) if zoo.is_none() => {
                return self.err(z.span(), "models.zoo_config", "needs models.zoo (a built-in zoo) to apply to");
            }
            Some(z) if z.get_ref() == "default" => None,
            Some(z) if ZOO_CONFIGS.contains(&z.get_ref().as_str()) => Some(z.get_ref().clone()),
            Some(z) => {
                return self.err(
                    z.span(),
                    "models.zoo_config",
                    format!("unknown zoo configuration `{}` (known: {})", z.get_ref(), ZOO_CONFIGS.join(", ")),
                );
            }
        };
        let models = ModelPool {
            zoo,
            zoo_config,
            pretrained: rm.pretrained,
            heads: rm.heads,
            finetuned: rm.finetuned.into_iter().map(|(k, v)| (k, v.into_inner())).collect(),
            reference: rm.reference.into_iter().map(|(k, v)| (k, v.into_inner())).collect(),
        };

        // Methods.
        if raw.methods.get_ref().is_empty() {
            return self.err(raw.methods.span(), "methods", "no merge methods listed");
        }
        let mut methods: Vec<MethodSpec> = Vec::new();
        for (i, m) in raw.methods.get_ref().iter().enumerate() {
            let m = m.get_ref();
            let name = m.name.get_ref().trim().to_ascii_lowercase().replace('_', "-");
            let base = name.strip_suffix("+surgery").unwrap_or(&name);
            let known = known_methods();
            if !known.contains(&base) {
                return self.err(
                    m.name.span(),
                    format!("methods[{i}].name"),
                    format!(
                        "unknown merge method `{}` (known: {}; any may end in +surgery)",
                        m.name.get_ref(),
                        known.join(", ")
                    ),
                );
            }
            let mut params = BTreeMap::new();
            for (k, v) in &m.params {
                match scalar_text(v.get_ref()) {
                    Some(t) => {
                        params.insert(k.clone(), t);
                    }
                    None => {
                        return self.err(
                            v.span(),
                            format!("methods[{i}].params.{k}"),
                            "expected a number, string or boolean",
                        );
                    }
                }
            }
            // Methods that core already implements also get their parameter names checked.
            if let Ok(method) = mergeattack_core::merge::lookup(base) {
                let mut p = mergeattack_core::merge::Params::new();
                for (k, v) in &params {
                    p.set(k.clone(), v.clone());
                }
                if let Err(e) = mergeattack_core::merge::validate_params(method, &p) {
                    let span = m.params.values().next().map(|v| v.span()).unwrap_or(m.name.span());
                    return self.err(span, format!("methods[{i}].params"), e.to_string());
                }
            }
            let (label, lspan) = match &m.label {
                Some(l) => (l.get_ref().trim().to_string(), l.span()),
                None => (name.clone(), m.name.span()),
            };
            if label.is_empty() || label.contains(['/', ',']) {
                return self.err(lspan, format!("methods[{i}].label"), format!("bad label `{label}`"));
            }
            if methods.iter().any(|x| x.label == label) {
                return self.err(
                    lspan,
                    format!("methods[{i}]"),
                    format!("method label `{label}` is used twice (give each entry a distinct `label`)"),
                );
            }
            methods.push(MethodSpec { label, name, params });
        }

        // Attacks.
        if raw.attacks.get_ref().is_empty() {
            return self.err(raw.attacks.span(), "attacks", "no attacks listed");
        }
        let mut attacks: Vec<AttackSpec> = Vec::new();
        for (i, a) in raw.attacks.get_ref().iter().enumerate() {
            let a = a.get_ref();
            let name = a.name.get_ref().trim().to_ascii_lowercase().replace('_', "-");
            if !KNOWN_ATTACKS.contains(&name.as_str()) {
                return self.err(
                    a.name.span(),
                    format!("attacks[{i}].name"),
                    format!("unknown attack `{}` (known: {})", a.name.get_ref(), KNOWN_ATTACKS.join(", ")),
                );
            }
            let preset = match &a.preset {
                None => "torchattacks".to_string(),
                Some(p) if KNOWN_PRESETS.contains(&p.get_ref().as_str()) => p.get_ref().clone(),
                Some(p) => {
                    return self.err(
                        p.span(),
                        format!("attacks[{i}].preset"),
                        format!("unknown preset `{}` (known: {})", p.get_ref(), KNOWN_PRESETS.join(", ")),
                    );
                }
            };
            let mut overrides = BTreeMap::new();
            for (k, v) in &a.overrides {
                let key = format!("attacks[{i}].overrides.{k}");
                if k == "eps" {
                    return self.err(
                        v.span(),
                        key,
                        "eps comes from the study's `eps` list, not from an attack override",
                    );
                }
                match scalar_text(v.get_ref()) {
                    Some(t) => {
                        overrides.insert(k.clone(), t);
                    }
                    None => return self.err(v.span(), key, "expected a number, string or boolean"),
                }
            }
            let (label, lspan) = match &a.label {
                Some(l) => (l.get_ref().trim().to_string(), l.span()),
                None => (name.clone(), a.name.span()),
            };
            if label.is_empty() || label.contains(['/', ',']) {
                return self.err(lspan, format!("attacks[{i}].label"), format!("bad label `{label}`"));
            }
            if attacks.iter().any(|x| x.label == label) {
                return self.err(
                    lspan,
                    format!("attacks[{i}]"),
                    format!("attack label `{label}` is used twice (give each entry a distinct `label`)"),
                );
            }
            attacks.push(AttackSpec { label, name, preset, overrides });
        }

        Ok(StudyConfig {
            seed,
            device,
            threads,
            output,
            images_per_task,
            batch_size,
            eps,
            surrogates,
            models,
            datasets,
            methods,
            attacks,
        })
    }

    fn missing(&self, key: &str, message: &str) -> ConfigError {
        ConfigError::Missing { file: self.file.to_string(), key: key.to_string(), message: message.to_string() }
    }
}

/// A scalar TOML value as text (numbers in their shortest round-trip form).
fn scalar_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.trim().replace(' ', "")),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) if f.is_finite() => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_parse_and_have_the_documented_sizes() {
        let d = StudyConfig::default_study();
        assert_eq!((d.datasets.len(), d.methods.len(), d.attacks.len()), (4, 8, 6));
        assert_eq!(d.settings().len(), 192);
        let s = StudyConfig::smoke();
        assert_eq!(s.settings().len(), 8);
        assert_ne!(d.hash(), s.hash());
    }

    #[test]
    fn hash_ignores_layout_output_and_threads_but_not_seed() {
        let a = StudyConfig::from_toml_str(SMOKE_TOML, "a").unwrap();
        let moved = format!(
            "# comment\noutput = \"elsewhere\"\nthreads = 7\n{}",
            SMOKE_TOML.replace("output = \"study-smoke\"\n", "").replace("threads = 2\n", "")
        );
        let b = StudyConfig::from_toml_str(&moved, "b").unwrap();
        assert_eq!(a.hash(), b.hash());
        let c = StudyConfig::from_toml_str(&SMOKE_TOML.replace("seed = 0", "seed = 1"), "c").unwrap();
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.hash().len(), 64);
    }

    #[test]
    fn surrogate_specs_round_trip() {
        for s in [
            "finetuned",
            "pretrained",
            "models/x.safetensors",
            "ensemble:[finetuned,pretrained]",
            "ensemble:[pretrained,ensemble:[a.safetensors,finetuned]]",
        ] {
            assert_eq!(Surrogate::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            Surrogate::parse("ensemble:[finetuned, pretrained]").unwrap().to_string(),
            "ensemble:[finetuned,pretrained]"
        );
        assert!(Surrogate::parse("finetune").unwrap_err().contains("unknown surrogate `finetune`"));
        assert!(Surrogate::parse("ensemble:[finetuned]").is_err());
    }

    #[test]
    fn shard_parsing() {
        assert_eq!("1/4".parse::<Shard>().unwrap(), Shard { index: 1, count: 4 });
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let text = SMOKE_TOML.replace("{ name = \"pgd\" }", "{ name = \"pgd\", overrides = { eps = 0.1 } }");
        let e = StudyConfig::from_toml_str(&text, "s.toml").unwrap_err().to_string();
        let line = text.lines().position(|l| l.contains("overrides")).unwrap() + 1;
        assert_eq!(
            e,
            format!(
                "s.toml line {line}, key `attacks[1].overrides.eps`: eps comes from the study's `eps` list, not from an attack override"
            )
        );
        let text = SMOKE_TOML.replace("eps = [\"8/255\"]", "eps = [\"8/255\", \"-1\"]");
        let e = StudyConfig::from_toml_str(&text, "s.toml").unwrap_err().to_string();
        assert!(e.starts_with("s.toml line 8, key `eps[1]`"), "{e}");
        let text = SMOKE_TOML.replace("zoo = \"mini\"", "pretrained = \"p.safetensors\"");
        let e = StudyConfig::from_toml_str(&text, "s.toml").unwrap_err().to_string();
        assert!(e.contains("models.finetuned.digits"), "{e}");
    }
}
