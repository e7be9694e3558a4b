//! Evaluating the zoo: accuracy table, forgetting matrix, merges (WA, TA with lambda chosen on
//! validation, TIES) per task and averaged, and the share of the gap they close.

use anyhow::{Result, anyhow};
use mergeattack_core::merge::{MergeInput, Params, lookup};
use mergeattack_core::tensor::ParamSet;
use std::cell::RefCell;

use ndarray::{Array2, ArrayView4};
use serde::Serialize;

use super::config::ZooConfig;
use super::train::{TaskData, bar, correct_share, eval_model};

/// One row of the accuracy table.
#[derive(Clone, Debug, Serialize)]
pub struct TaskRow {
    pub task: String,
    pub pretrained_head: f64,
    pub finetuned: f64,
    pub reference: f64,
    pub weight_average: f64,
    pub task_arithmetic: f64,
    pub ties: f64,
}

/// What the build measured.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub key: String,
    pub regime: String,
    pub config: ZooConfig,
    pub rows: Vec<TaskRow>,
    pub mean: TaskRow,
    pub ta_lambda: f32,
    /// lambda -> mean validation accuracy of task arithmetic.
    pub ta_validation: Vec<(f32, f64)>,
    pub ties_lambda: f32,
    /// lambda -> mean validation accuracy of TIES.
    pub ties_validation: Vec<(f32, f64)>,
    /// (merge mean - pretrained+head mean) / (fine-tuned mean - pretrained+head mean).
    pub gap_closed: GapClosed,
    /// forgetting[s][t] = acc on t of the model fine-tuned on s - pretrained+head acc on t.
    pub forgetting: Vec<Vec<f64>>,
    /// Mean of the off-diagonal forgetting entries.
    pub mean_forgetting: f64,
    pub bar: Bar,
    pub times_s: Vec<(String, f64)>,
    pub pretrain_loss_first_last: (f64, f64),
    /// Per task: the steps the fine-tuned and reference weights were trained for (fewer than
    /// `finetune_steps` when early stopping kept an earlier checkpoint).
    pub finetune_kept_steps: Vec<(String, usize, usize)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GapClosed {
    pub weight_average: f64,
    pub task_arithmetic: f64,
    pub ties: f64,
}

/// The bar of the data-and-zoo issue.
#[derive(Clone, Debug, Serialize)]
pub struct Bar {
    /// Every fine-tune at least +10 points over pretrained+head.
    pub finetune_gain: bool,
    /// WA, TA and TIES strictly between pretrained+head and fine-tuned on average.
    pub merges_between: bool,
    /// Every merge closes at least a third of the gap on average.
    pub third_of_gap: bool,
}

fn merged<'a>(
    method: &str,
    base: &ParamSet<'a>,
    models: &[ParamSet<'a>],
    set: &[(&str, String)],
) -> Result<ParamSet<'static>> {
    let names: Vec<String> = base.names().map(String::from).collect();
    let input = MergeInput { base, models, model_weights: None, names: &names, seed: 0 };
    let mut p = Params::new();
    for (k, v) in set {
        p.set(*k, v.clone());
    }
    let m = lookup(method).map_err(|e| anyhow!("{e}"))?;
    let out = m.merge(&input, &p).map_err(|e| anyhow!("{method}: {e}"))?;
    out.single().ok_or_else(|| anyhow!("{method} gave per-task models"))
}

/// What [`evaluate`] measured.
pub struct Evaluated {
    pub rows: Vec<TaskRow>,
    /// forgetting[s][t] = acc on t of the model fine-tuned on s - pretrained+head acc on t.
    pub forgetting: Vec<Vec<f64>>,
    /// Task arithmetic: chosen lambda and lambda -> mean validation accuracy.
    pub ta: (f32, Vec<(f32, f64)>),
    /// TIES: the same.
    pub ties: (f32, Vec<(f32, f64)>),
}

/// Everything but the timings and key: the measurements.
#[allow(clippy::needless_range_loop)]
pub fn evaluate(
    cfg: &ZooConfig,
    tasks: &[TaskData],
    pretrained: &ParamSet<'static>,
    heads: &[Array2<f32>],
    finetuned: &[ParamSet<'static>],
    reference: &[ParamSet<'static>],
) -> Result<Evaluated> {
    let n = tasks.len();
    // One model per task head; each evaluated encoder is copied into it (no session rebuilt).
    let mut models = Vec::with_capacity(n);
    for t in 0..n {
        models.push(RefCell::new(eval_model(cfg, pretrained, heads[t].view())?));
    }
    let run = |p: &ParamSet<'_>, t: usize, x: ArrayView4<'_, f32>, labels: &[usize]| -> Result<f64> {
        let mut m = models[t].borrow_mut();
        m.update_weights(p)?;
        Ok(correct_share(&m.forward(x)?.0, labels))
    };
    let acc = |p: &ParamSet<'_>, t: usize| run(p, t, tasks[t].test.view(), &tasks[t].test_labels);
    let val = |p: &ParamSet<'_>, t: usize| run(p, t, tasks[t].val.view(), &tasks[t].val_labels);
    let total = n * (n + 5) + (cfg.ta_lambdas.len() + cfg.ties_lambdas.len()) * n;
    let pb = bar(total, "evaluating");
    let mut pt = Vec::new();
    for t in 0..n {
        pt.push(acc(pretrained, t)?);
        pb.inc(1);
    }
    let mut cross = vec![vec![0.0; n]; n];
    for s in 0..n {
        for t in 0..n {
            cross[s][t] = acc(&finetuned[s], t)?;
            pb.inc(1);
        }
    }
    let wa = merged("weight-average", pretrained, finetuned, &[])?;
    // lambda chosen by the mean validation accuracy (the first of equal bests).
    let choose = |method: &str, grid: &[f32], extra: &[(&str, String)]| -> Result<Chosen> {
        let mut curve = Vec::new();
        let mut best: Option<(f32, f64, ParamSet<'static>)> = None;
        for &lam in grid {
            let mut set: Vec<(&str, String)> = extra.to_vec();
            set.push(("lambda", lam.to_string()));
            let m = merged(method, pretrained, finetuned, &set)?;
            let mut s = 0.0;
            for t in 0..n {
                s += val(&m, t)?;
                pb.inc(1);
            }
            let v = s / n as f64;
            curve.push((lam, v));
            if best.as_ref().is_none_or(|b| v > b.1) {
                best = Some((lam, v, m));
            }
        }
        let (lambda, _, m) = best.expect("at least one lambda");
        Ok((lambda, curve, m))
    };
    let (ta_lambda, ta_curve, ta) = choose("task-arithmetic", &cfg.ta_lambdas, &[])?;
    let (ties_lambda, ties_curve, ties) = choose("ties", &cfg.ties_lambdas, &[("k", cfg.ties_k.to_string())])?;
    let mut rows = Vec::new();
    for t in 0..n {
        let r = TaskRow {
            task: tasks[t].name.clone(),
            pretrained_head: pt[t],
            finetuned: cross[t][t],
            reference: acc(&reference[t], t)?,
            weight_average: acc(&wa, t)?,
            task_arithmetic: acc(&ta, t)?,
            ties: acc(&ties, t)?,
        };
        pb.inc(4);
        rows.push(r);
    }
    pb.finish();
    let forgetting = (0..n).map(|s| (0..n).map(|t| cross[s][t] - pt[t]).collect()).collect();
    Ok(Evaluated { rows, forgetting, ta: (ta_lambda, ta_curve), ties: (ties_lambda, ties_curve) })
}

type Chosen = (f32, Vec<(f32, f64)>, ParamSet<'static>);

/// Column means.
pub fn mean_row(rows: &[TaskRow]) -> TaskRow {
    let n = rows.len().max(1) as f64;
    let m = |f: fn(&TaskRow) -> f64| rows.iter().map(f).sum::<f64>() / n;
    TaskRow {
        task: "mean".into(),
        pretrained_head: m(|r| r.pretrained_head),
        finetuned: m(|r| r.finetuned),
        reference: m(|r| r.reference),
        weight_average: m(|r| r.weight_average),
        task_arithmetic: m(|r| r.task_arithmetic),
        ties: m(|r| r.ties),
    }
}

/// Share of the gap, the bar and the mean forgetting from the table.
pub fn judge(rows: &[TaskRow], forgetting: &[Vec<f64>]) -> (TaskRow, GapClosed, Bar, f64) {
    let mean = mean_row(rows);
    let gap = mean.finetuned - mean.pretrained_head;
    let share = |v: f64| if gap.abs() > 1e-12 { (v - mean.pretrained_head) / gap } else { 0.0 };
    let g = GapClosed {
        weight_average: share(mean.weight_average),
        task_arithmetic: share(mean.task_arithmetic),
        ties: share(mean.ties),
    };
    let merges = [mean.weight_average, mean.task_arithmetic, mean.ties];
    let bar = Bar {
        finetune_gain: rows.iter().all(|r| r.finetuned >= r.pretrained_head + 0.10),
        merges_between: merges.iter().all(|&m| m > mean.pretrained_head && m < mean.finetuned),
        third_of_gap: [g.weight_average, g.task_arithmetic, g.ties].iter().all(|&s| s >= 1.0 / 3.0),
    };
    let n = forgetting.len();
    let off: Vec<f64> = (0..n).flat_map(|s| (0..n).filter(move |&t| t != s).map(move |t| forgetting[s][t])).collect();
    let mf = if off.is_empty() { 0.0 } else { off.iter().sum::<f64>() / off.len() as f64 };
    (mean, g, bar, mf)
}

/// The summary as Markdown.
pub fn markdown(s: &Summary) -> String {
    let mut o = String::new();
    o.push_str("# Mini zoo summary\n\n");
    o.push_str(&format!("Regime: **{}**.\n\nCache key: `{}`.\n\n", s.regime, s.key));
    o.push_str(&format!(
        "Tasks fine-tuned and merged: {}. Pretraining (SimCLR, label-free): {} steps x {} images pooled from {}.\n\n",
        s.rows.iter().map(|r| r.task.as_str()).collect::<Vec<_>>().join(", "),
        s.config.pretrain_steps,
        s.config.pretrain_batch,
        s.config.pretrain_pool().join(", ")
    ));
    let curve = |c: &[(f32, f64)]| c.iter().map(|(l, v)| format!("{l}: {v:.3}")).collect::<Vec<_>>().join(", ");
    o.push_str(&format!(
        "Lambdas chosen on validation (mean validation accuracy per lambda): task arithmetic {} ({}); TIES (k {}) {} ({}).\n\n",
        s.ta_lambda,
        curve(&s.ta_validation),
        s.config.ties_k,
        s.ties_lambda,
        curve(&s.ties_validation)
    ));
    o.push_str("| task | pretrained+head | fine-tuned | reference | WA | TA | TIES |\n|---|---|---|---|---|---|---|\n");
    for r in s.rows.iter().chain(std::iter::once(&s.mean)) {
        o.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.task, r.pretrained_head, r.finetuned, r.reference, r.weight_average, r.task_arithmetic, r.ties
        ));
    }
    o.push_str(&format!(
        "\nShare of the gap closed (mean): WA {:.0}%, TA {:.0}%, TIES {:.0}%.\n\n",
        100.0 * s.gap_closed.weight_average,
        100.0 * s.gap_closed.task_arithmetic,
        100.0 * s.gap_closed.ties
    ));
    o.push_str(&format!(
        "Bar: every fine-tune >= +10 points: {}; merges strictly between on average: {}; a third of the gap: {}.\n\n",
        yes(s.bar.finetune_gain),
        yes(s.bar.merges_between),
        yes(s.bar.third_of_gap)
    ));
    o.push_str("Forgetting matrix (row: model fine-tuned on; column: task evaluated; accuracy minus pretrained+head):\n\n| fine-tuned on |");
    for r in &s.rows {
        o.push_str(&format!(" {} |", r.task));
    }
    o.push_str("\n|---|");
    o.push_str(&"---|".repeat(s.rows.len()));
    o.push('\n');
    for (i, row) in s.forgetting.iter().enumerate() {
        o.push_str(&format!("| {} |", s.rows[i].task));
        for v in row {
            o.push_str(&format!(" {v:+.3} |"));
        }
        o.push('\n');
    }
    o.push_str(&format!("\nMean off-diagonal forgetting: {:+.3}.\n\n", s.mean_forgetting));
    if s.config.finetune_eval_every > 0 {
        o.push_str(&format!(
            "Early stopping on validation every {} steps; steps kept (fine-tuned / reference): {}.\n\n",
            s.config.finetune_eval_every,
            s.finetune_kept_steps.iter().map(|(t, a, b)| format!("{t} {a}/{b}")).collect::<Vec<_>>().join(", ")
        ));
    }
    o.push_str(&format!(
        "Pretraining NT-Xent: {:.3} at the first step, {:.3} at the last.\n\nTimes: {}.\n",
        s.pretrain_loss_first_last.0,
        s.pretrain_loss_first_last.1,
        s.times_s.iter().map(|(k, v)| format!("{k} {v:.1} s")).collect::<Vec<_>>().join(", ")
    ));
    o
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pt: f64, ft: f64, m: f64) -> TaskRow {
        TaskRow {
            task: "t".into(),
            pretrained_head: pt,
            finetuned: ft,
            reference: ft,
            weight_average: m,
            task_arithmetic: m,
            ties: m,
        }
    }

    #[test]
    fn judge_computes_gap_share_bar_and_off_diagonal_forgetting() {
        let rows = [row(0.4, 0.8, 0.6), row(0.5, 0.7, 0.5)];
        let f = vec![vec![0.3, -0.1], vec![-0.3, 0.2]];
        let (mean, g, bar, mf) = judge(&rows, &f);
        assert!((mean.finetuned - 0.75).abs() < 1e-12);
        // gap 0.3, merge mean 0.55 - 0.45 = 0.1 -> one third.
        assert!((g.ties - 1.0 / 3.0).abs() < 1e-12);
        assert!(bar.finetune_gain && bar.merges_between);
        assert!((mf + 0.2).abs() < 1e-12);
        let (_, _, bar2, _) = judge(&[row(0.4, 0.45, 0.42)], &[vec![0.05]]);
        assert!(!bar2.finetune_gain);
    }
}
