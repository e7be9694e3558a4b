//! Training the mini zoo: SimCLR pretraining of the shared encoder, class-mean heads, and
//! per-task fine-tuning (head frozen) with Adam; every draw from a seeded ChaCha stream.

use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mergeattack_core::optim::{Adam, AdamConfig, cosine_lr};
use mergeattack_core::rng::stream;
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::clip::ClipVisionConfig;
use mergeattack_onnx::clip::vision::vision_weight_shapes;
use mergeattack_onnx::runtime::{Device, Model, RuntimeOptions};
use ndarray::{Array2, Array4, ArrayD, ArrayView2, ArrayView4, Axis, IxDyn, s};
use rand::RngExt;

use super::augment;
use super::config::{Scope, ZooConfig};
use crate::data::mini;

/// One task's images, decoded once (NCHW f32 in [0,1]).
pub struct TaskData {
    pub name: String,
    pub classes: usize,
    pub train: Array4<f32>,
    pub train_labels: Vec<usize>,
    pub val: Array4<f32>,
    pub val_labels: Vec<usize>,
    pub test: Array4<f32>,
    pub test_labels: Vec<usize>,
    /// Horizontal flips keep the label (not for digits).
    pub flip_ok: bool,
}

fn whole(d: &crate::data::Dataset, limit: usize) -> Result<(Array4<f32>, Vec<usize>)> {
    let b = d.batch(0..d.len()).with_context(|| format!("decode {}", d.name))?;
    if limit == 0 || limit >= d.len() {
        return Ok((b.images, b.labels));
    }
    // An evenly strided subset (the splits are stratified, the stride keeps every class).
    let idx: Vec<usize> = (0..limit).map(|i| i * d.len() / limit).collect();
    Ok((b.images.select(Axis(0), &idx), idx.iter().map(|&i| b.labels[i]).collect()))
}

/// Load the configured tasks from the mini-suite cache at `root`: the fine-tuned `tasks` in order,
/// then the pretraining-only tasks of `pretrain_tasks`.
pub fn load_tasks(root: &Path, cfg: &ZooConfig) -> Result<Vec<TaskData>> {
    let mut out = Vec::new();
    let extra = cfg.pretrain_pool().iter().filter(|t| !cfg.tasks.contains(t));
    for name in cfg.tasks.iter().chain(extra) {
        let t = mini::load(root, name)
            .with_context(|| format!("load mini-suite task `{name}` (run `mergeattack setup`)"))?;
        let (train, train_labels) = whole(&t.train, 0)?;
        let (val, val_labels) = whole(&t.val, cfg.val_limit)?;
        let (test, test_labels) = whole(&t.test, cfg.eval_limit)?;
        let size = cfg.image_size;
        if train.dim().2 != size || train.dim().3 != size {
            anyhow::bail!(
                "task `{name}` has {}x{} images but the zoo config needs {size}x{size}",
                train.dim().3,
                train.dim().2
            );
        }
        out.push(TaskData {
            name: name.clone(),
            classes: t.train.num_classes(),
            train,
            train_labels,
            val,
            val_labels,
            test,
            test_labels,
            flip_ok: !matches!(name.as_str(), "digits" | "optdigits" | "digits-colour"),
        });
    }
    Ok(out)
}

fn normal(rng: &mut rand_chacha::ChaCha20Rng) -> f32 {
    // Box-Muller on two uniform draws in (0, 1].
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Random initial weights as HF `CLIPVisionModel` initialises them (factor 1): LayerNorm weight 1 /
/// bias 0, other biases 0, class embedding N(0, d^-1), patch and position embeddings N(0, 0.02^2),
/// q/k/v and fc2 N(0, d^-1 (2L)^-1), out_proj N(0, d^-1), fc1 N(0, (2d)^-1), projection N(0, d^-1).
pub fn init_params(vision: &ClipVisionConfig, seed: u64) -> ParamSet<'static> {
    let d = vision.hidden_size as f32;
    let l = vision.num_hidden_layers as f32;
    let in_proj = d.powf(-0.5) * (2.0 * l).powf(-0.5);
    let mut p = ParamSet::new();
    for (name, shape) in vision_weight_shapes(vision) {
        let n: usize = shape.iter().product();
        let is_ln = name.contains("layer_norm") || name.contains("layrnorm") || name.contains("layernorm");
        let std = if name.ends_with("class_embedding") {
            d.powf(-0.5)
        } else if name.contains("q_proj") || name.contains("k_proj") || name.contains("v_proj") || name.contains("fc2")
        {
            in_proj
        } else if name.contains("out_proj") || name == "visual_projection.weight" {
            d.powf(-0.5)
        } else if name.contains("fc1") {
            (2.0 * d).powf(-0.5)
        } else {
            0.02
        };
        let data: Vec<f32> = if is_ln && name.ends_with(".weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let mut rng = stream(seed, &[b"zoo", b"init", name.as_bytes()]);
            (0..n).map(|_| std * normal(&mut rng)).collect()
        };
        p.insert_owned(name, ArrayD::from_shape_vec(IxDyn(&shape), data).expect("shape"));
    }
    p
}

fn options(cfg: &ZooConfig, batch: usize) -> RuntimeOptions {
    RuntimeOptions { device: Device::Cpu, threads: cfg.threads, batch_size: batch.max(1) }
}

/// A bar with ETA on stderr (hidden when stderr is not a terminal).
pub fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// NT-Xent (SimCLR) on unit vectors `u` [2B, P] where rows i and i^1 are the two views of one
/// image: mean over rows of -s(i, pos) + log sum_{k != i} exp(s(i, k)), s = u.u / tau. Returns the
/// loss and dL/du (computed in f64).
pub fn nt_xent(u: ArrayView2<'_, f32>, tau: f32) -> (f64, Array2<f32>) {
    let (n, p) = u.dim();
    let tau = f64::from(tau);
    let uf = u.mapv(f64::from);
    let sim = uf.dot(&uf.t()) / tau;
    let mut g = Array2::<f64>::zeros((n, n)); // dL/dsim
    let mut loss = 0.0;
    for i in 0..n {
        let pos = i ^ 1;
        let m = (0..n).filter(|&k| k != i).map(|k| sim[[i, k]]).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = (0..n).filter(|&k| k != i).map(|k| (sim[[i, k]] - m).exp()).sum();
        loss += -sim[[i, pos]] + m + z.ln();
        for k in 0..n {
            if k != i {
                g[[i, k]] = (sim[[i, k]] - m).exp() / z / n as f64;
            }
        }
        g[[i, pos]] -= 1.0 / n as f64;
    }
    let du = (&g + &g.t()).dot(&uf) / tau;
    debug_assert_eq!(du.dim(), (n, p));
    (loss / n as f64, du.mapv(|v| v as f32))
}

/// One Adam step on the trainable tensors, in place. `grads[slot]` is the gradient of `names[slot]`
/// (the engine returns them in the order asked). With `anchor`, the weights are then pulled toward
/// it (L2-SP, decoupled: w -= lr * l2sp * (w - anchor)).
fn adam_step(
    adam: &mut Adam,
    params: &mut ParamSet<'static>,
    names: &[String],
    grads: &[(String, ArrayD<f32>)],
    scale: f32,
    lr: f32,
    anchor: Option<(&ParamSet<'_>, f32)>,
) {
    adam.begin_step();
    let mut g: Vec<f32> = Vec::new();
    for (slot, name) in names.iter().enumerate() {
        let (gname, gt) = &grads[slot];
        debug_assert_eq!(gname.strip_prefix("grad."), Some(name.as_str()));
        g.clear();
        g.extend(gt.iter().map(|v| v * scale));
        let t = params.get_mut(name).expect("trainable weight present");
        let data = t.as_slice_mut().expect("owned weights are contiguous");
        adam.update(slot, data, &g, lr);
        if let Some((a, l2sp)) = anchor
            && l2sp != 0.0
        {
            let a = a.get(name).expect("anchor has every trainable weight");
            for (w, w0) in data.iter_mut().zip(a.iter()) {
                *w -= lr * l2sp * (*w - *w0);
            }
        }
    }
}

fn sizes(params: &ParamSet<'_>, names: &[String]) -> Vec<usize> {
    names.iter().map(|n| params.get(n).map_or(0, |t| t.len())).collect()
}

/// Pretrain the shared encoder with SimCLR on the pooled train images of the pretraining tasks
/// (`cfg.pretrain_pool()`, in that order; `loaded` must hold each of them). Returns the weights
/// and the per-step losses.
pub fn pretrain(cfg: &ZooConfig, loaded: &[TaskData]) -> Result<(ParamSet<'static>, Vec<f64>)> {
    let tasks: Vec<&TaskData> = cfg
        .pretrain_pool()
        .iter()
        .map(|n| loaded.iter().find(|t| &t.name == n).ok_or_else(|| anyhow::anyhow!("task `{n}` was not loaded")))
        .collect::<Result<_>>()?;
    let vision = cfg.vision();
    let mut params = init_params(&vision, cfg.seed);
    let names: Vec<String> = params.names().map(String::from).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut adam =
        Adam::new(AdamConfig { weight_decay: cfg.weight_decay, ..AdamConfig::default() }, &sizes(&params, &names));
    let pool: Vec<(usize, usize)> =
        tasks.iter().enumerate().flat_map(|(t, d)| (0..d.train_labels.len()).map(move |i| (t, i))).collect();
    let eye = Array2::<f32>::eye(cfg.projection_dim);
    let b = cfg.pretrain_batch;
    let size = cfg.image_size;
    let plane = 3 * size * size;
    let mut losses = Vec::with_capacity(cfg.pretrain_steps);
    let pb = bar(cfg.pretrain_steps, "pretraining (SimCLR)");
    // One model for the whole run (logit scale 0 and an identity head: logits are the unit
    // features); the weights are copied into it before every step, no session is rebuilt.
    let mut run = params.clone();
    run.insert_owned("logit_scale", ArrayD::from_elem(IxDyn(&[]), 0.0));
    let mut model = Model::from_params(vision.clone(), &run, eye.view(), options(cfg, 2 * b), "the zoo encoder")?;
    drop(run);
    for step in 0..cfg.pretrain_steps {
        let mut rng = stream(cfg.seed, &[b"zoo", b"pretrain", &(step as u64).to_le_bytes()]);
        let mut x = Array4::<f32>::zeros((2 * b, 3, size, size));
        {
            let flat = x.as_slice_mut().expect("standard");
            for j in 0..b {
                let (t, i) = pool[rng.random_range(0..pool.len())];
                let img = tasks[t].train.slice(s![i, .., .., ..]);
                let img = img.as_standard_layout();
                let img = img.as_slice().expect("standard");
                for v in 0..2 {
                    let o = 2 * j + v;
                    augment::view(img, size, tasks[t].flip_ok, &mut rng, &mut flat[o * plane..(o + 1) * plane]);
                }
            }
        }
        model.update_weights(&params)?;
        let (u, _) = model.forward(x.view())?;
        let (loss, du) = nt_xent(u.view(), cfg.temperature);
        if !loss.is_finite() {
            anyhow::bail!("pretraining diverged at step {step} (loss {loss}); lower pretrain_lr");
        }
        let grads = model.weight_vjp(x.view(), du.view(), Some(&name_refs))?;
        let lr = cosine_lr(step, cfg.pretrain_steps, cfg.pretrain_warmup, cfg.pretrain_lr, 0.0);
        adam_step(&mut adam, &mut params, &names, &grads, 1.0, lr, None);
        losses.push(loss);
        pb.set_message(format!("pretraining loss {loss:.3}"));
        pb.inc(1);
        if step % 50 == 0 {
            tracing::info!("pretrain step {step}: NT-Xent {loss:.4}, lr {lr:.2e}");
        }
    }
    pb.finish();
    Ok((params, losses))
}

/// Features [N, projection_dim] of `x` under `params`.
pub fn features(cfg: &ZooConfig, params: &ParamSet<'_>, x: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
    let eye = Array2::<f32>::eye(cfg.projection_dim);
    let mut m = Model::from_params(cfg.vision(), params, eye.view(), options(cfg, 256), "the zoo encoder")?;
    Ok(m.forward(x)?.1)
}

/// The class head of a task: the normalised mean of the unit features of each class on the train
/// split (validation images are a separate split and never enter).
pub fn class_head(cfg: &ZooConfig, params: &ParamSet<'_>, task: &TaskData) -> Result<Array2<f32>> {
    let f = features(cfg, params, task.train.view())?;
    let mut head = Array2::<f32>::zeros((task.classes, cfg.projection_dim));
    let mut head64 = Array2::<f64>::zeros((task.classes, cfg.projection_dim));
    for (row, &l) in f.rows().into_iter().zip(&task.train_labels) {
        let n = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt().max(1e-12);
        head64.row_mut(l).zip_mut_with(&row, |h, v| *h += f64::from(*v) / n);
    }
    for (c, row) in head64.rows().into_iter().enumerate() {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n == 0.0 {
            anyhow::bail!("task `{}` has no train image of class {c}", task.name);
        }
        head.row_mut(c).assign(&row.mapv(|v| (v / n) as f32));
    }
    Ok(head)
}

/// Fine-tune `base` on `task` with its frozen head (Adam, mean cross-entropy, warm-up + cosine,
/// optional L2-SP pull toward `base`); `purpose` ("finetune" / "reference") picks the seed stream.
/// With `finetune_eval_every` = k > 0, the weights of the checkpoint (every k steps and the last)
/// with the best validation accuracy are returned (early stopping). Returns the weights and the
/// number of steps they were trained for.
pub fn finetune(
    cfg: &ZooConfig,
    base: &ParamSet<'_>,
    head: ArrayView2<'_, f32>,
    task: &TaskData,
    purpose: &str,
    pb: &ProgressBar,
) -> Result<(ParamSet<'static>, usize)> {
    let scope: Scope = cfg.scope().map_err(anyhow::Error::msg)?;
    let mut params = base.clone().into_owned();
    let names: Vec<String> = params.names().filter(|n| scope.trains(n, cfg.layers)).map(String::from).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut adam =
        Adam::new(AdamConfig { weight_decay: cfg.weight_decay, ..AdamConfig::default() }, &sizes(&params, &names));
    let b = cfg.finetune_batch.min(task.train_labels.len());
    // One model for the whole run: the trained tensors are copied into it before every step (its
    // sessions take the weights as inputs; no session is rebuilt).
    let mut model = Model::from_params(cfg.vision(), &params, head, options(cfg, b), &task.name)?;
    // Early stopping on validation: (accuracy, step, weights) of the best checkpoint so far.
    let mut best: Option<(f64, usize, ParamSet<'static>)> = None;
    for step in 0..cfg.finetune_steps {
        let mut rng =
            stream(cfg.seed, &[b"zoo", purpose.as_bytes(), task.name.as_bytes(), &(step as u64).to_le_bytes()]);
        let idx: Vec<usize> = (0..b).map(|_| rng.random_range(0..task.train_labels.len())).collect();
        let x = task.train.select(Axis(0), &idx);
        let labels: Vec<usize> = idx.iter().map(|&i| task.train_labels[i]).collect();
        model.update_weights(&subset(&params, &names))?;
        let (loss, grads) = model.weight_grads(x.view(), &labels, Some(&name_refs))?;
        if !loss.is_finite() {
            anyhow::bail!("fine-tuning `{}` diverged at step {step}; lower finetune_lr", task.name);
        }
        let lr = cosine_lr(step, cfg.finetune_steps, cfg.finetune_warmup, cfg.finetune_lr, 0.0);
        adam_step(&mut adam, &mut params, &names, &grads, 1.0 / b as f32, lr, Some((base, cfg.finetune_l2sp)));
        if step % 10 == 0 || step + 1 == cfg.finetune_steps {
            tracing::debug!(
                "{purpose} {} step {step}: mean cross-entropy {:.4}, lr {lr:.2e}",
                task.name,
                loss / b as f64
            );
        }
        pb.inc(1);
        let k = cfg.finetune_eval_every;
        if k > 0 && ((step + 1) % k == 0 || step + 1 == cfg.finetune_steps) {
            model.update_weights(&subset(&params, &names))?;
            let v = correct_share(&model.forward(task.val.view())?.0, &task.val_labels);
            tracing::debug!("{purpose} {} step {}: validation accuracy {v:.4}", task.name, step + 1);
            // The first of equal bests: the earliest, smallest task vector.
            if best.as_ref().is_none_or(|(b, _, _)| v > *b) {
                best = Some((v, step + 1, params.clone()));
            }
        }
    }
    if let Some((v, at, p)) = best {
        tracing::info!("{purpose} {}: kept step {at} of {} (validation {v:.4})", task.name, cfg.finetune_steps);
        return Ok((p, at));
    }
    Ok((params, cfg.finetune_steps))
}

/// A model for evaluating encoders with `head` (weights replaced with `update_weights`).
pub fn eval_model(cfg: &ZooConfig, params: &ParamSet<'_>, head: ArrayView2<'_, f32>) -> Result<Model> {
    Ok(Model::from_params(cfg.vision(), params, head, options(cfg, 256), "a zoo model")?)
}

/// Share of rows whose first largest logit is the label.
pub fn correct_share(logits: &Array2<f32>, labels: &[usize]) -> f64 {
    let correct = logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(r, l)| {
            let mut best = 0;
            for (j, v) in r.iter().enumerate() {
                if *v > r[best] {
                    best = j;
                }
            }
            best == **l
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}

/// Views of the `names` tensors of `params`.
fn subset<'p>(params: &'p ParamSet<'_>, names: &[String]) -> ParamSet<'p> {
    let mut out = ParamSet::new();
    for n in names {
        out.insert_view(n.clone(), params.get(n).expect("trainable weight present").view());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_rows(n: usize, p: usize, seed: u64) -> Array2<f32> {
        let mut rng = stream(seed, &[b"t"]);
        let mut u = Array2::from_shape_fn((n, p), |_| normal(&mut rng));
        for mut r in u.rows_mut() {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r /= norm;
        }
        u
    }

    #[test]
    fn nt_xent_gradient_matches_finite_differences() {
        let u = unit_rows(6, 5, 3);
        let (_, du) = nt_xent(u.view(), 0.5);
        // The loss is a function of u as given (not re-normalised): central differences in f64.
        let f = |v: &Array2<f64>| {
            let n = v.nrows();
            let sim = v.dot(&v.t()) / 0.5;
            (0..n)
                .map(|i| {
                    let z: f64 = (0..n).filter(|&k| k != i).map(|k| sim[[i, k]].exp()).sum();
                    -sim[[i, i ^ 1]] + z.ln()
                })
                .sum::<f64>()
                / n as f64
        };
        let base = u.mapv(f64::from);
        let h = 1e-5;
        for i in 0..6 {
            for j in 0..5 {
                let (mut a, mut b) = (base.clone(), base.clone());
                a[[i, j]] += h;
                b[[i, j]] -= h;
                let fd = (f(&a) - f(&b)) / (2.0 * h);
                assert!((fd - f64::from(du[[i, j]])).abs() < 1e-5, "({i},{j}) fd {fd} vs {}", du[[i, j]]);
            }
        }
    }

    /// The in-place step equals Adam on a copy, plus the closed-form L2-SP pull toward the anchor;
    /// untrained tensors are untouched.
    #[test]
    fn adam_step_updates_in_place_and_pulls_toward_the_anchor() {
        let mut p = ParamSet::new();
        p.insert_owned("a", ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0, -2.0, 3.0, 0.5]).unwrap());
        p.insert_owned("frozen", ArrayD::from_elem(IxDyn(&[3]), 7.0));
        let anchor = p.clone();
        let mut p = p.into_owned();
        // Move away from the anchor, then a step with a zero gradient: Adam's m stays 0 only on
        // the first step, so use a fresh optimiser to isolate the pull.
        p.get_mut("a").unwrap().mapv_inplace(|v| v + 1.0);
        let names = vec!["a".to_string()];
        let zero = vec![("grad.a".to_string(), ArrayD::zeros(IxDyn(&[2, 2])))];
        let mut adam = Adam::new(AdamConfig::default(), &[4]);
        adam_step(&mut adam, &mut p, &names, &zero, 1.0, 0.1, Some((&anchor, 0.5)));
        // w = (w0 + 1) - 0.1 * 0.5 * 1 = w0 + 0.95.
        for (w, w0) in p.get("a").unwrap().iter().zip(anchor.get("a").unwrap().iter()) {
            assert!((w - (w0 + 0.95)).abs() < 1e-6, "{w} vs {w0}");
        }
        // With a gradient and no anchor: exactly Adam on a copy (scale applied to the gradient).
        let g = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0.5, -1.0, 2.0, 0.0]).unwrap();
        let mut want: Vec<f32> = p.get("a").unwrap().iter().copied().collect();
        let mut ref_adam = Adam::new(AdamConfig::default(), &[4]);
        ref_adam.begin_step();
        ref_adam.update(0, &mut want, &g.iter().map(|v| v * 0.25).collect::<Vec<_>>(), 0.01);
        let mut adam = Adam::new(AdamConfig::default(), &[4]);
        adam_step(&mut adam, &mut p, &names, &[("grad.a".into(), g)], 0.25, 0.01, None);
        assert_eq!(p.get("a").unwrap().iter().copied().collect::<Vec<_>>(), want);
        assert!(p.get("frozen").unwrap().iter().all(|&v| v == 7.0));
    }

    #[test]
    fn nt_xent_is_lower_when_views_agree() {
        let u = unit_rows(8, 4, 5);
        let mut same = u.clone();
        for i in (0..8).step_by(2) {
            let r = same.row(i).to_owned();
            same.row_mut(i + 1).assign(&r);
        }
        assert!(nt_xent(same.view(), 0.2).0 < nt_xent(u.view(), 0.2).0);
    }

    /// The whole chain (graph VJP of the normalised features, NT-Xent in Rust) against central
    /// differences of the loss in one weight entry, on a tiny encoder.
    #[test]
    fn simclr_weight_gradient_matches_finite_differences() {
        let cfg = ZooConfig {
            width: 16,
            layers: 1,
            heads: 2,
            mlp: 32,
            projection_dim: 8,
            image_size: 8,
            patch_size: 4,
            threads: 1,
            ..ZooConfig::default()
        };
        let vision = cfg.vision();
        let mut params = init_params(&vision, 1);
        // Larger weights so the loss moves measurably.
        let mut scaled = ParamSet::new();
        for (n, t) in params.iter() {
            let f = if n.contains("norm") || n.contains("layrnorm") { 1.0 } else { 10.0 };
            scaled.insert_owned(n, t.to_owned() * f);
        }
        params = scaled;
        params.insert_owned("logit_scale", ArrayD::from_elem(IxDyn(&[]), 0.0));
        let mut rng = stream(2, &[b"x"]);
        let x = Array4::from_shape_fn((4, 3, 8, 8), |_| rng.random::<f32>());
        let eye = Array2::<f32>::eye(8);
        let loss_of = |p: &ParamSet<'_>| -> f64 {
            let mut m = Model::from_params(vision.clone(), p, eye.view(), options(&cfg, 4), "t").unwrap();
            let (u, _) = m.forward(x.view()).unwrap();
            nt_xent(u.view(), 0.5).0
        };
        let mut m = Model::from_params(vision.clone(), &params, eye.view(), options(&cfg, 4), "t").unwrap();
        let (u, _) = m.forward(x.view()).unwrap();
        let (_, du) = nt_xent(u.view(), 0.5);
        let name = "visual_projection.weight";
        let g = m.weight_vjp(x.view(), du.view(), Some(&[name])).unwrap();
        let g = &g[0].1;
        let h = 1e-2f32;
        let mut checked = 0;
        for idx in [[0usize, 0usize], [3, 5], [7, 15]] {
            let mut a = params.clone();
            let mut b = params.clone();
            for (p, d) in [(&mut a, h), (&mut b, -h)] {
                let mut t = p.get(name).unwrap().to_owned();
                t[[idx[0], idx[1]]] += d;
                p.insert_owned(name, t);
            }
            let fd = (loss_of(&a) - loss_of(&b)) / (2.0 * f64::from(h));
            let an = f64::from(g[[idx[0], idx[1]]]);
            assert!((fd - an).abs() < 2e-3 + 0.02 * an.abs(), "{idx:?}: fd {fd} vs analytic {an}");
            checked += 1;
        }
        assert_eq!(checked, 3);
    }
}
