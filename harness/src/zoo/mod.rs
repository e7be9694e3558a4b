//! The mini zoo: tiny CLIP-like ViTs trained by the tool (DATA.md "The mini zoo").
//!
//! `build` pretrains a shared encoder with SimCLR, computes fixed class-mean heads, fine-tunes one
//! model per task (head frozen) plus a second-seed reference, evaluates merges, and writes
//! everything in the layout of a real CLIP pool, cached by a hash of suite, config and code version.

pub mod augment;
pub mod config;
pub mod eval;
pub mod train;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::weights;
use ndarray::Array2;
use sha2::{Digest, Sha256};

use config::ZooConfig;

/// Bumped whenever training or evaluation code changes what a build produces.
pub const ZOO_CODE_VERSION: &str = "zoo-2";

/// The cache key: suite, config and code version.
pub fn cache_key(suite: &str, cfg: &ZooConfig) -> String {
    let mut h = Sha256::new();
    h.update(b"mergeattack zoo\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"\0");
    h.update(ZOO_CODE_VERSION.as_bytes());
    h.update(b"\0");
    h.update(suite.as_bytes());
    h.update(b"\0");
    h.update(serde_json::to_string(cfg).expect("config serialises").as_bytes());
    let d = h.finalize();
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The key of the pretraining alone (what decides the pretrained encoder's bytes): a zoo whose
/// key differs only in later settings can reuse an earlier zoo's encoder.
pub fn pretrain_key(suite: &str, cfg: &ZooConfig) -> String {
    let v = serde_json::json!({
        "suite": suite,
        "version": env!("CARGO_PKG_VERSION"),
        "code": PRETRAIN_CODE_VERSION,
        "seed": cfg.seed,
        "tasks": cfg.pretrain_pool(),
        "vision": cfg.vision(),
        "pretrain_steps": cfg.pretrain_steps,
        "pretrain_batch": cfg.pretrain_batch,
        "pretrain_lr": cfg.pretrain_lr,
        "pretrain_warmup": cfg.pretrain_warmup,
        "temperature": cfg.temperature,
        "weight_decay": cfg.weight_decay,
    });
    let d = Sha256::digest(format!("mergeattack zoo pretraining\0{v}").as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Bumped whenever pretraining code changes the encoder it produces.
pub const PRETRAIN_CODE_VERSION: &str = "pretrain-1";

const META_PRETRAIN_KEY: &str = "mergeattack_pretrain_key";
const META_LOSS_FIRST: &str = "mergeattack_pretrain_loss_first";
const META_LOSS_LAST: &str = "mergeattack_pretrain_loss_last";

/// The pretrained encoder of an earlier zoo (`from`: the zoo directory or its `pretrained/`
/// folder) and its first and last pretraining losses, if it was pretrained with `cfg`'s settings.
pub fn reuse_pretrained(from: &Path, cfg: &ZooConfig) -> Result<(ParamSet<'static>, (f64, f64))> {
    let file = [from.join("pretrained").join("model.safetensors"), from.join("model.safetensors")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("{} holds no pretrained encoder (no pretrained/model.safetensors)", from.display())
        })?;
    let ck = weights::Checkpoint::open(&file)?;
    let want = pretrain_key("mini", cfg);
    let meta = ck.metadata();
    match meta.get(META_PRETRAIN_KEY) {
        Some(k) if *k == want => {}
        Some(k) => bail!(
            "{} was pretrained with other settings (pretraining key {k}, this config needs {want}): it cannot be reused",
            file.display()
        ),
        None => bail!("{} records no pretraining key: it cannot be reused", file.display()),
    }
    let loss = |k: &str| -> Result<f64> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("{} records no valid `{k}`", file.display()))
    };
    let losses = (loss(META_LOSS_FIRST)?, loss(META_LOSS_LAST)?);
    let params = ck.params()?.into_owned();
    let expected: Vec<String> =
        mergeattack_onnx::clip::vision::vision_weight_shapes(&cfg.vision()).into_iter().map(|(n, _)| n).collect();
    let got: Vec<String> = params.names().map(String::from).collect();
    if got != {
        let mut e = expected.clone();
        e.sort();
        e
    } {
        bail!("{} does not hold exactly the encoder tensors of this config", file.display());
    }
    Ok((params, losses))
}

/// What `build` did.
pub enum Built {
    /// A zoo with this key was already there.
    Cached(PathBuf),
    /// Trained now; the summary.
    Trained(PathBuf, Box<eval::Summary>),
}

fn write_config(dir: &Path, cfg: &ZooConfig) -> Result<()> {
    let mut v = serde_json::to_value(cfg.vision())?;
    v["model_type"] = "clip_vision_model".into();
    v["architectures"] = serde_json::json!(["CLIPVisionModelWithProjection"]);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("write {}", dir.join("config.json").display()))
}

fn write_model(dir: &Path, cfg: &ZooConfig, params: &ParamSet<'_>, role: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    weights::save(dir.join("model.safetensors"), params, &[("format", "pt"), ("mergeattack_zoo", role)])
        .with_context(|| format!("write {}", dir.join("model.safetensors").display()))?;
    write_config(dir, cfg)
}

/// The key recorded in a finished zoo directory, if any.
pub fn existing_key(out: &Path) -> Option<String> {
    let s = std::fs::read_to_string(out.join("summary.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&s).ok()?;
    v.get("key")?.as_str().map(String::from)
}

/// Build (or find) the zoo for `cfg` from the mini-suite cache at `data_root` into `out`.
///
/// `pretrained_from`: reuse the pretrained encoder of an earlier zoo with the same pretraining
/// settings (the output is byte-identical to pretraining again).
pub fn build(data_root: &Path, cfg: &ZooConfig, out: &Path, pretrained_from: Option<&Path>) -> Result<Built> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let key = cache_key("mini", cfg);
    if out.exists() {
        match existing_key(out) {
            Some(k) if k == key => return Ok(Built::Cached(out.to_path_buf())),
            Some(k) => bail!(
                "{} holds a zoo built with another configuration (key {k}, wanted {key}): choose another --out or remove it",
                out.display()
            ),
            None => bail!("{} exists and is not a finished zoo: choose another --out or remove it", out.display()),
        }
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".zoo-building-")
        .tempdir_in(parent)
        .with_context(|| format!("create a temporary directory in {}", parent.display()))?;
    let dir = tmp.path();
    let mut times: Vec<(String, f64)> = Vec::new();

    let t = Instant::now();
    // The fine-tuned tasks first, then any task that only pretraining uses.
    let loaded = train::load_tasks(data_root, cfg)?;
    let tasks = &loaded[..cfg.tasks.len()];
    times.push(("data".into(), t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let (pretrained, loss_first_last) = match pretrained_from {
        Some(from) => reuse_pretrained(from, cfg)?,
        None => {
            let (p, losses) = train::pretrain(cfg, &loaded)?;
            let fl = (losses.first().copied().unwrap_or(f64::NAN), losses.last().copied().unwrap_or(f64::NAN));
            (p, fl)
        }
    };
    times.push((
        if pretrained_from.is_some() { "pretraining (reused)" } else { "pretraining" }.into(),
        t.elapsed().as_secs_f64(),
    ));
    {
        let pdir = dir.join("pretrained");
        std::fs::create_dir_all(&pdir).with_context(|| format!("create {}", pdir.display()))?;
        let (k, a, b) =
            (pretrain_key("mini", cfg), format!("{:?}", loss_first_last.0), format!("{:?}", loss_first_last.1));
        let meta = [
            ("format", "pt"),
            ("mergeattack_zoo", "pretrained"),
            (META_PRETRAIN_KEY, k.as_str()),
            (META_LOSS_FIRST, a.as_str()),
            (META_LOSS_LAST, b.as_str()),
        ];
        weights::save(pdir.join("model.safetensors"), &pretrained, &meta)
            .with_context(|| format!("write {}", pdir.join("model.safetensors").display()))?;
        write_config(&pdir, cfg)?;
    }

    let t = Instant::now();
    let mut heads: Vec<Array2<f32>> = Vec::new();
    for task in tasks {
        heads.push(train::class_head(cfg, &pretrained, task)?);
    }
    let mut hp = ParamSet::new();
    for (task, h) in tasks.iter().zip(&heads) {
        hp.insert_owned(task.name.clone(), h.clone().into_dyn());
    }
    weights::save(dir.join("heads.safetensors"), &hp, &[("format", "pt")]).context("write heads.safetensors")?;
    times.push(("heads".into(), t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let pb = train::bar(2 * tasks.len() * cfg.finetune_steps, "fine-tuning");
    let mut finetuned = Vec::new();
    let mut kept_steps = Vec::new();
    let mut reference = Vec::new();
    for (task, head) in tasks.iter().zip(&heads) {
        pb.set_message(format!("fine-tuning {}", task.name));
        let (ft, ft_steps) = train::finetune(cfg, &pretrained, head.view(), task, "finetune", &pb)?;
        write_model(&dir.join("finetuned").join(&task.name), cfg, &ft, "finetuned")?;
        finetuned.push(ft);
        pb.set_message(format!("reference {}", task.name));
        let (rf, rf_steps) = train::finetune(cfg, &pretrained, head.view(), task, "reference", &pb)?;
        kept_steps.push((task.name.clone(), ft_steps, rf_steps));
        write_model(&dir.join("reference").join(&task.name), cfg, &rf, "reference")?;
        reference.push(rf);
    }
    pb.finish();
    times.push(("fine-tuning".into(), t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let ev = eval::evaluate(cfg, tasks, &pretrained, &heads, &finetuned, &reference)?;
    let (rows, forgetting) = (ev.rows, ev.forgetting);
    times.push(("evaluation".into(), t.elapsed().as_secs_f64()));
    let (mean, gap_closed, bar, mean_forgetting) = eval::judge(&rows, &forgetting);
    let summary = eval::Summary {
        key: key.clone(),
        regime: cfg.scope().map_err(anyhow::Error::msg)?.describe(),
        config: cfg.clone(),
        rows,
        mean,
        ta_lambda: ev.ta.0,
        ta_validation: ev.ta.1,
        ties_lambda: ev.ties.0,
        ties_validation: ev.ties.1,
        gap_closed,
        forgetting,
        mean_forgetting,
        bar,
        times_s: times,
        pretrain_loss_first_last: loss_first_last,
        finetune_kept_steps: kept_steps,
    };
    std::fs::write(dir.join("summary.md"), eval::markdown(&summary)).context("write summary.md")?;
    // Timings vary run to run: keep them out of the byte-compared summary.json, in times.json.
    let mut js = serde_json::to_value(&summary)?;
    js.as_object_mut().expect("object").remove("times_s");
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&js)? + "\n")
        .context("write summary.json")?;
    std::fs::write(dir.join("times.json"), serde_json::to_string_pretty(&summary.times_s)? + "\n")
        .context("write times.json")?;
    let kept = tmp.keep();
    std::fs::rename(&kept, out).with_context(|| format!("move the finished zoo to {}", out.display()))?;
    Ok(Built::Trained(out.to_path_buf(), Box::new(summary)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pretraining_key_follows_the_pretraining_pool_not_the_fine_tuned_tasks() {
        let five: Vec<String> =
            ["digits", "fashion", "fashion-coarse", "animals", "textures"].iter().map(|s| s.to_string()).collect();
        let a = ZooConfig { tasks: five.clone(), pretrain_tasks: vec![], ..ZooConfig::default() };
        let b = ZooConfig {
            tasks: vec!["digits".into(), "animals".into()],
            pretrain_tasks: five.clone(),
            finetune_lr: 1e-4,
            ..ZooConfig::default()
        };
        assert_eq!(pretrain_key("mini", &a), pretrain_key("mini", &b));
        assert_ne!(cache_key("mini", &a), cache_key("mini", &b));
        // Another pool, or the same tasks in another order (another sample stream): another key.
        let c = ZooConfig { pretrain_tasks: five[..4].to_vec(), ..b.clone() };
        assert_ne!(pretrain_key("mini", &b), pretrain_key("mini", &c));
        let mut rev = five;
        rev.reverse();
        let d = ZooConfig { pretrain_tasks: rev, ..b.clone() };
        assert_ne!(pretrain_key("mini", &b), pretrain_key("mini", &d));
    }
}
