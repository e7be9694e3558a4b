//! The statistics behind the report's findings (METHODS.md "Statistics"), computed with
//! `mergeattack_core::stats` and stated as measured: held / not held, with the numbers.

use std::collections::BTreeMap;

use mergeattack_core::stats::{self, Friedman, Spearman, Wilcoxon};

use crate::study::store::StoredSetting;

/// The relative transfer metric the findings use.
pub const PRIMARY: &str = "rtasr_wb_all";
/// Significance level for "held".
pub const ALPHA: f64 = 0.05;

fn metric(s: &StoredSetting, name: &str) -> Option<f64> {
    s.record.metrics.get(name).and_then(|e| e.value)
}

/// (config hash, dataset, attack, surrogate, eps): a setting apart from its method.
type Block = (String, String, String, String, String);

/// Block of a setting apart from its method.
fn block(s: &StoredSetting) -> Block {
    let k = &s.record.key;
    (s.config_hash.clone(), k.dataset.clone(), k.attack.clone(), k.surrogate.clone(), k.eps.clone())
}

fn p(v: f64) -> String {
    let v = nz(v);
    if v < 1e-4 { format!("{v:.2e}") } else { format!("{v:.4}") }
}

/// Print a negative zero as 0.
fn nz(v: f64) -> f64 {
    v + 0.0
}

fn verdict(held: bool) -> &'static str {
    if held { "**held**" } else { "**not held**" }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn wilcoxon_line(w: &Wilcoxon) -> String {
    format!(
        "Wilcoxon signed-rank: statistic {:.4}, p = {} ({:?} method; {} nonzero differences, {} zeros dropped; W+ {:.1}, W- {:.1})",
        nz(w.statistic),
        p(w.pvalue),
        w.method,
        w.n,
        w.zeros,
        nz(w.w_plus),
        nz(w.w_minus)
    )
}

fn spearman_line(s: &Spearman) -> String {
    format!("Spearman rho = {:.4}, p = {} (n = {})", nz(s.rho), p(s.pvalue), s.n)
}

/// Merged target vs the unmerged reference: paired tasr differences across settings.
pub fn merged_vs_reference(rows: &[StoredSetting]) -> String {
    let mut out = String::from("### Merged target vs unmerged reference\n\n");
    for (what, m, r) in [("tasr_all", "tasr_all", "tasr_ref_all"), ("tasr_cc", "tasr_cc", "tasr_ref_cc")] {
        let d: Vec<f64> = rows.iter().filter_map(|s| Some(metric(s, m)? - metric(s, r)?)).collect();
        if d.is_empty() {
            out.push_str(&format!("- {what}: n/a (no setting has a reference model result).\n"));
            continue;
        }
        match stats::wilcoxon(&d) {
            Ok(w) => out.push_str(&format!(
                "- {what}(merged) - {what}(reference) over {} settings: mean {:+.4}; {}. The merged model is {} than the reference at alpha {ALPHA}.\n",
                d.len(),
                mean(&d),
                wilcoxon_line(&w),
                if w.pvalue < ALPHA {
                    if mean(&d) > 0.0 { "significantly more fooled" } else { "significantly less fooled" }
                } else {
                    "not significantly differently fooled"
                }
            )),
            Err(e) => out.push_str(&format!("- {what}: n/a ({e}).\n")),
        }
    }
    out.push('\n');
    out
}

/// Finding 1: stronger merging methods (higher merged clean accuracy) are more vulnerable.
pub fn finding1(rows: &[StoredSetting]) -> String {
    let mut out = String::from("### Finding 1: stronger merging methods are more vulnerable\n\n");
    let pairs: Vec<(f64, f64)> =
        rows.iter().filter_map(|s| Some((metric(s, "acc_merged")?, metric(s, PRIMARY)?))).collect();
    let (x, y): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
    match stats::spearman(&x, &y) {
        Ok(s) => {
            let held = s.rho > 0.0 && s.pvalue < ALPHA;
            out.push_str(&format!(
                "Merged clean accuracy vs {PRIMARY} across settings: {}. Finding 1 {} (needs rho > 0 and p < {ALPHA}).\n\n",
                spearman_line(&s),
                verdict(held)
            ));
        }
        Err(e) => out.push_str(&format!("Merged clean accuracy vs {PRIMARY}: not computed ({e}).\n\n")),
    }
    out
}

/// Finding 2: mitigating representation bias (Representation Surgery) makes transfer worse.
pub fn finding2(rows: &[StoredSetting]) -> String {
    let mut out = String::from("### Finding 2: mitigating representation bias increases transferability\n\n");
    let pairs: Vec<(f64, f64)> =
        rows.iter().filter_map(|s| Some((metric(s, "rep_bias")?, metric(s, PRIMARY)?))).collect();
    let (x, y): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
    let bias_held = match stats::spearman(&x, &y) {
        Ok(s) => {
            let held = s.rho < 0.0 && s.pvalue < ALPHA;
            out.push_str(&format!(
                "- Representation bias vs {PRIMARY} across settings: {}; {} (needs rho < 0 and p < {ALPHA}).\n",
                spearman_line(&s),
                if held { "lower bias goes with more transfer" } else { "no significant negative association" }
            ));
            Some(held)
        }
        Err(e) => {
            out.push_str(&format!("- Representation bias vs {PRIMARY}: not computed ({e}).\n"));
            None
        }
    };
    // Pairs: method+surgery vs method on the same block.
    let mut by: BTreeMap<(Block, String), f64> = BTreeMap::new();
    for s in rows {
        if let Some(v) = metric(s, PRIMARY) {
            by.insert((block(s), s.record.key.method.clone()), v);
        }
    }
    let mut d = Vec::new();
    let mut methods = std::collections::BTreeSet::new();
    for ((b, m), v) in &by {
        if let Some(base) = m.strip_suffix("+surgery")
            && let Some(bv) = by.get(&(b.clone(), base.to_string()))
        {
            d.push(v - bv);
            methods.insert(m.clone());
        }
    }
    let pair_held = if d.is_empty() {
        out.push_str("- method+surgery vs method: n/a (no setting has both).\n");
        None
    } else {
        match stats::wilcoxon(&d) {
            Ok(w) => {
                let held = mean(&d) > 0.0 && w.pvalue < ALPHA;
                out.push_str(&format!(
                    "- {PRIMARY}(method+surgery) - {PRIMARY}(method) over {} paired settings ({}): mean {:+.4}; {}; {}.\n",
                    d.len(),
                    methods.into_iter().collect::<Vec<_>>().join(", "),
                    mean(&d),
                    wilcoxon_line(&w),
                    if held { "surgery significantly increases transfer" } else { "no significant increase" }
                ));
                Some(held)
            }
            Err(e) => {
                out.push_str(&format!("- method+surgery vs method: not computed ({e}).\n"));
                None
            }
        }
    };
    let overall = match (bias_held, pair_held) {
        (Some(a), Some(b)) => verdict(a && b).to_string(),
        (Some(a), None) => format!("{} on the bias correlation alone", verdict(a)),
        (None, Some(b)) => format!("{} on the surgery pairs alone", verdict(b)),
        (None, None) => "not testable with these results".to_string(),
    };
    out.push_str(&format!("\nFinding 2 {overall}.\n\n"));
    out
}

/// Finding 3: weight averaging is the most vulnerable (Friedman + mean ranks, rank 1 = least).
pub fn finding3(rows: &[StoredSetting]) -> (String, Option<(Friedman, Vec<String>)>) {
    let mut out = String::from("### Finding 3: weight averaging is the most vulnerable\n\n");
    let methods: Vec<String> = rows
        .iter()
        .map(|s| s.record.key.method.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut blocks: BTreeMap<Block, BTreeMap<String, f64>> = BTreeMap::new();
    for s in rows {
        if let Some(v) = metric(s, PRIMARY) {
            blocks.entry(block(s)).or_default().insert(s.record.key.method.clone(), v);
        }
    }
    let total = blocks.len();
    let complete: Vec<&BTreeMap<String, f64>> = blocks.values().filter(|b| b.len() == methods.len()).collect();
    let samples: Vec<Vec<f64>> = methods.iter().map(|m| complete.iter().map(|b| b[m]).collect()).collect();
    let refs: Vec<&[f64]> = samples.iter().map(|v| v.as_slice()).collect();
    match stats::friedman(&refs) {
        Ok(f) => {
            out.push_str(&format!(
                "Friedman test of {PRIMARY} over {} methods and {} (dataset, attack, surrogate, eps) blocks ({} incomplete blocks left out): Q = {:.4}, p = {}.\n\n",
                f.k,
                f.n,
                total - complete.len(),
                nz(f.statistic),
                p(f.pvalue)
            ));
            let mut order: Vec<(usize, f64)> = f.mean_ranks.iter().copied().enumerate().collect();
            order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            out.push_str("| mean rank (1 = least vulnerable) | method |\n|---:|---|\n");
            for (i, r) in &order {
                out.push_str(&format!("| {r:.3} | {} |\n", methods[*i]));
            }
            let top = order.last().map(|(i, _)| methods[*i].clone()).unwrap_or_default();
            let wa_present = methods.iter().any(|m| m == "weight-average");
            let held = wa_present && top == "weight-average" && f.pvalue < ALPHA;
            out.push_str(&format!(
                "\nMost vulnerable (highest mean rank): {top}. Finding 3 {} (needs weight-average ranked most vulnerable and p < {ALPHA}){}.\n\n",
                verdict(held),
                if wa_present { "" } else { "; weight-average is not among the methods" }
            ));
            (out, Some((f, methods)))
        }
        Err(e) => {
            out.push_str(&format!(
                "Not computed ({e}; {} complete blocks of {} methods).\n\n",
                complete.len(),
                methods.len()
            ));
            (out, None)
        }
    }
}
