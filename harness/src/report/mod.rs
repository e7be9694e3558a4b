//! The study report: `mergeattack report STORE... -o DIR`, also called at the end of a study.
//!
//! Writes into DIR: `report.md` (headline numbers, the findings as measured, per method x dataset
//! x attack tables, phase timings, skipped settings), `settings.csv` and `settings.json` (every
//! row; byte-identical for identical stores), `metrics.csv` (the same without the timing columns:
//! byte-identical for one config and seed whatever the threads, shards or interruptions),
//! `timings.csv` (seconds per phase of every setting, the runner's `load` and `metrics` included),
//! and SVG plots (`heatmap_rtasr.svg`, `scatter_rtasr_vs_accuracy.svg`,
//! `scatter_bias_vs_rtasr.svg`, `bars_attack_rtasr.svg`) with PNG versions of each (rasterised from
//! the SVG, see [`png`]).
//! Every file is written to a temporary file in DIR and renamed into place.

pub mod findings;
pub mod png;
pub mod svg;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::study::store::{
    PhaseRows, SkippedSetting, StoreError, StoredSetting, read_phases, read_skipped, read_stores,
};

use findings::PRIMARY;

/// What can go wrong while reporting.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("nothing to report: {0} hold no finished settings")]
    Empty(String),
    #[error("cannot write report file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What a report run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    pub settings: usize,
    pub files: Vec<PathBuf>,
}

/// The report file names, in writing order.
pub const FILES: &[&str] = &[
    "settings.csv",
    "settings.json",
    "metrics.csv",
    "timings.csv",
    "heatmap_rtasr.svg",
    "scatter_rtasr_vs_accuracy.svg",
    "scatter_bias_vs_rtasr.svg",
    "bars_attack_rtasr.svg",
    "report.md",
    "heatmap_rtasr.png",
    "scatter_rtasr_vs_accuracy.png",
    "scatter_bias_vs_rtasr.png",
    "bars_attack_rtasr.png",
];

/// Read `stores` together and write the report into `out` (created if needed).
pub fn write_report(stores: &[PathBuf], out: &Path) -> Result<ReportSummary, ReportError> {
    let rows = read_stores(stores)?;
    if rows.is_empty() {
        let names: Vec<String> = stores.iter().map(|p| p.display().to_string()).collect();
        return Err(ReportError::Empty(names.join(", ")));
    }
    std::fs::create_dir_all(out).map_err(|source| ReportError::Io { path: out.to_path_buf(), source })?;
    let names: Vec<String> =
        stores.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    let phases = read_phases(stores)?;
    let skipped = read_skipped(stores)?;
    let contents = [
        table::to_csv(&rows),
        table::to_json(&rows),
        table::to_metrics_csv(&rows),
        table::to_timings_csv(&rows, &phases),
        heatmap(&rows),
        scatter_acc(&rows),
        scatter_bias(&rows),
        attack_bars(&rows),
        markdown(&rows, &names, &phases, &skipped),
    ];
    let mut files = Vec::new();
    let mut svgs: Vec<(String, String)> = Vec::new();
    for (name, text) in FILES.iter().zip(contents) {
        let path = out.join(name);
        write_atomic(&path, text.as_bytes())?;
        files.push(path);
        if let Some(stem) = name.strip_suffix(".svg") {
            svgs.push((format!("{stem}.png"), text));
        }
    }
    // PNG versions of the plots (FILES lists them after the text files, in the same order).
    let raster = png::Rasteriser::new();
    for (name, svg) in svgs {
        let path = out.join(&name);
        let bytes = raster
            .png(&svg, 2.0)
            .map_err(|detail| ReportError::Io { path: path.clone(), source: std::io::Error::other(detail) })?;
        write_atomic(&path, &bytes)?;
        files.push(path);
    }
    tracing::info!("report of {} settings written to {}", rows.len(), out.display());
    Ok(ReportSummary { settings: rows.len(), files })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let io = |source| ReportError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

fn value(s: &StoredSetting, name: &str) -> Option<f64> {
    s.record.metrics.get(name).and_then(|e| e.value)
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 })
}

fn f3(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
}

fn distinct<F: Fn(&StoredSetting) -> String>(rows: &[StoredSetting], f: F) -> Vec<String> {
    rows.iter().map(f).collect::<BTreeSet<_>>().into_iter().collect()
}

/// Mean of a metric per (row label, column label), over everything else.
fn grid<R, C>(rows: &[StoredSetting], metric: &str, r: R, c: C) -> BTreeMap<(String, String), Vec<f64>>
where
    R: Fn(&StoredSetting) -> String,
    C: Fn(&StoredSetting) -> String,
{
    let mut g: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for s in rows {
        if let Some(v) = value(s, metric) {
            g.entry((r(s), c(s))).or_default().push(v);
        }
    }
    g
}

fn md_grid(rows: &[StoredSetting], metric: &str, filter: &dyn Fn(&StoredSetting) -> bool) -> String {
    let sub: Vec<StoredSetting> = rows.iter().filter(|s| filter(s)).cloned().collect();
    let methods = distinct(&sub, |s| s.record.key.method.clone());
    let datasets = distinct(&sub, |s| s.record.key.dataset.clone());
    let g = grid(&sub, metric, |s| s.record.key.method.clone(), |s| s.record.key.dataset.clone());
    let mut out =
        format!("| method | {} | mean |\n|---|{}---:|\n", datasets.join(" | "), "---:|".repeat(datasets.len()));
    for m in &methods {
        let mut all = Vec::new();
        let cells: Vec<String> = datasets
            .iter()
            .map(|d| {
                let v = g.get(&(m.clone(), d.clone()));
                if let Some(v) = v {
                    all.extend_from_slice(v);
                }
                f3(v.and_then(|v| mean(v)))
            })
            .collect();
        out.push_str(&format!("| {m} | {} | {} |\n", cells.join(" | "), f3(mean(&all))));
    }
    out
}

fn markdown(rows: &[StoredSetting], stores: &[String], phases: &PhaseRows, skipped: &[SkippedSetting]) -> String {
    let mut md = String::from("# mergeattack study report\n\n");
    let hashes = distinct(rows, |s| s.config_hash.clone());
    let datasets = distinct(rows, |s| s.record.key.dataset.clone());
    let methods = distinct(rows, |s| s.record.key.method.clone());
    let attacks = distinct(rows, |s| s.record.key.attack.clone());
    let surrogates = distinct(rows, |s| s.record.key.surrogate.clone());
    let eps = distinct(rows, |s| s.record.key.eps.clone());
    md.push_str("## Headline\n\n");
    md.push_str(&format!(
        "- Stores: {}; studies (config hashes): {}.\n- Settings: **{}** ({} datasets x {} methods x {} attacks x {} surrogates x {} eps).\n",
        stores.join(", "),
        hashes.iter().map(|h| format!("`{}`", &h[..h.len().min(12)])).collect::<Vec<_>>().join(", "),
        rows.len(),
        datasets.len(),
        methods.len(),
        attacks.len(),
        surrogates.len(),
        eps.len()
    ));
    let prim: Vec<f64> = rows.iter().filter_map(|s| value(s, PRIMARY)).collect();
    let share = |v: &[f64]| (!v.is_empty()).then(|| v.iter().filter(|&&x| x > 0.95).count() as f64 / v.len() as f64);
    md.push_str(&format!(
        "- {PRIMARY}: mean **{}**, median **{}**, share of settings above 0.95: **{}** ({} settings with a value).\n\n",
        f3(mean(&prim)),
        f3(median(&prim)),
        f3(share(&prim)),
        prim.len()
    ));
    md.push_str("| metric | settings with a value | mean | median | share > 0.95 |\n|---|---:|---:|---:|---:|\n");
    for m in [
        "acc_surrogate",
        "acc_merged",
        "acc_reference",
        "asr_wb_all",
        "asr_wb_cc",
        "tasr_all",
        "tasr_cc",
        "rtasr_wb_all",
        "rtasr_wb_cc",
        "rtasr_ref_all",
        "rtasr_ref_cc",
        "transfer_rate",
        "grad_align_merged",
        "grad_align_reference",
        "rep_bias",
    ] {
        let v: Vec<f64> = rows.iter().filter_map(|s| value(s, m)).collect();
        md.push_str(&format!("| {m} | {} | {} | {} | {} |\n", v.len(), f3(mean(&v)), f3(median(&v)), f3(share(&v))));
    }
    md.push_str(
        "\nDefinitions (METHODS.md): rtasr_wb_all = tasr_all(S->T) / asr_all(S, X_S); rtasr_wb_cc = tasr_cc(S->T) / \
         asr_cc(S, X_S), whose numerator is over the images T classifies correctly and whose denominator is over the \
         images S classifies correctly; rtasr_ref_* = tasr_*(S->T_merged) / tasr_*(S->T_ref); transfer_rate = P(T \
         fooled | S fooled, both clean-correct). A zero denominator gives n/a. Intervals (in the CSV/JSON) are \
         bootstrap 95% percentile intervals.\n\n",
    );
    let per_task: Vec<String> =
        distinct(&rows.iter().filter(|s| s.record.needs_task_id).cloned().collect::<Vec<_>>(), |s| {
            s.record.key.method.clone()
        });
    if !per_task.is_empty() {
        md.push_str(&format!("Methods that need the task identity at inference: {}.\n\n", per_task.join(", ")));
    }

    md.push_str("## Findings\n\n");
    md.push_str(&format!("All findings use {PRIMARY} across settings; significance level {}.\n\n", findings::ALPHA));
    md.push_str(&findings::merged_vs_reference(rows));
    md.push_str(&findings::finding1(rows));
    md.push_str(&findings::finding2(rows));
    md.push_str(&findings::finding3(rows).0);

    md.push_str("## Tables\n\n");
    md.push_str(&format!(
        "### Merged clean accuracy (acc_merged), method x dataset\n\n{}\n",
        md_grid(rows, "acc_merged", &|_| true)
    ));
    md.push_str(&format!("### {PRIMARY}, method x dataset, all attacks\n\n{}\n", md_grid(rows, PRIMARY, &|_| true)));
    for a in &attacks {
        md.push_str(&format!(
            "### {PRIMARY}, method x dataset, attack {a}\n\n{}\n",
            md_grid(rows, PRIMARY, &|s| &s.record.key.attack == a)
        ));
    }
    for a in &attacks {
        md.push_str(&format!(
            "### tasr_all, method x dataset, attack {a}\n\n{}\n",
            md_grid(rows, "tasr_all", &|s| &s.record.key.attack == a)
        ));
    }

    md.push_str("## Phase timings\n\nSeconds per phase, summed over settings (and the mean per setting).\n\n");
    md.push_str("| method | settings | merge | craft | evaluate | total |\n|---|---:|---:|---:|---:|---:|\n");
    let mut tot = [0.0f64; 3];
    for m in &methods {
        let sub: Vec<&StoredSetting> = rows.iter().filter(|s| &s.record.key.method == m).collect();
        let mut t = [0.0f64; 3];
        for s in &sub {
            for (a, b) in t.iter_mut().zip(s.record.seconds.values()) {
                *a += b;
            }
        }
        for (a, b) in tot.iter_mut().zip(t) {
            *a += b;
        }
        let n = sub.len() as f64;
        md.push_str(&format!(
            "| {m} | {} | {:.1} ({:.2}) | {:.1} ({:.2}) | {:.1} ({:.2}) | {:.1} |\n",
            sub.len(),
            t[0],
            t[0] / n,
            t[1],
            t[1] / n,
            t[2],
            t[2] / n,
            t.iter().sum::<f64>()
        ));
    }
    md.push_str(&format!(
        "| all | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n\n",
        rows.len(),
        tot[0],
        tot[1],
        tot[2],
        tot.iter().sum::<f64>()
    ));

    md.push_str(&runner_phases(rows, phases));
    if !skipped.is_empty() {
        md.push_str(&format!("## Skipped settings\n\n{} settings were not run:\n\n", skipped.len()));
        let mut by_reason: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for s in skipped {
            *by_reason.entry((s.key.method.as_str(), s.reason.as_str())).or_default() += 1;
        }
        for ((m, r), n) in by_reason {
            md.push_str(&format!("- method {m}: {n} settings; {r}\n"));
        }
        md.push('\n');
    }
    md.push_str("## Plots\n\n");
    for (f, what) in [
        ("heatmap_rtasr.svg", "mean rtasr_wb_all by method x dataset"),
        ("scatter_rtasr_vs_accuracy.svg", "rtasr_wb_all vs merged clean accuracy"),
        ("scatter_bias_vs_rtasr.svg", "representation bias vs rtasr_wb_all"),
        ("bars_attack_rtasr.svg", "mean rtasr_wb_all per attack"),
    ] {
        md.push_str(&format!("- [{what}]({f})\n"));
    }
    md.push_str("\nData: [settings.csv](settings.csv), [settings.json](settings.json).\n");
    md
}

/// Seconds per phase of the study runner (load, merge, craft, evaluate, metrics), when the store
/// holds phases beyond the record's: shared work is split over the settings that share it, so the
/// sums are the runs' time per phase.
fn runner_phases(rows: &[StoredSetting], phases: &PhaseRows) -> String {
    let mut names: Vec<String> = Vec::new();
    for v in phases.values() {
        for (p, _) in v {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
    }
    if names.iter().all(|n| crate::study::Phases::NAMES.contains(&n.as_str())) {
        return String::new();
    }
    let order = crate::study::runner::PHASES;
    names.sort_by_key(|n| order.iter().position(|p| p == n).unwrap_or(order.len()));
    let mut sums = vec![0.0f64; names.len()];
    for s in rows {
        if let Some(v) = phases.get(&(s.config_hash.clone(), s.record.key.clone())) {
            for (p, secs) in v {
                if let Some(i) = names.iter().position(|n| n == p) {
                    sums[i] += secs;
                }
            }
        }
    }
    let total: f64 = sums.iter().sum();
    let mut md = String::from(
        "### Study runner phases\n\nSeconds per phase summed over settings (shared work split over the settings sharing it; the zoo build is not included).\n\n",
    );
    md.push_str(&format!("| {} | total |\n|{}---:|\n", names.join(" | "), "---:|".repeat(names.len())));
    md.push_str(&format!(
        "| {} | {:.1} |\n\n",
        sums.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" | "),
        total
    ));
    md
}

fn heatmap(rows: &[StoredSetting]) -> String {
    let methods = distinct(rows, |s| s.record.key.method.clone());
    let datasets = distinct(rows, |s| s.record.key.dataset.clone());
    let g = grid(rows, PRIMARY, |s| s.record.key.method.clone(), |s| s.record.key.dataset.clone());
    let values: Vec<Vec<Option<f64>>> = methods
        .iter()
        .map(|m| datasets.iter().map(|d| g.get(&(m.clone(), d.clone())).and_then(|v| mean(v))).collect())
        .collect();
    let vmax = values.iter().flatten().flatten().fold(1.0f64, |a, &b| a.max(b));
    svg::heatmap(&format!("mean {PRIMARY} (method x dataset)"), &methods, &datasets, &values, vmax)
}

fn scatter_of(rows: &[StoredSetting], x: &str, y: &str, title: &str, xl: &str, yl: &str) -> String {
    let methods = distinct(rows, |s| s.record.key.method.clone());
    let points: Vec<(f64, f64, usize)> = rows
        .iter()
        .filter_map(|s| {
            let g = methods.iter().position(|m| m == &s.record.key.method)?;
            Some((value(s, x)?, value(s, y)?, g))
        })
        .collect();
    svg::scatter(title, xl, yl, &points, &methods)
}

fn scatter_acc(rows: &[StoredSetting]) -> String {
    scatter_of(rows, "acc_merged", PRIMARY, &format!("{PRIMARY} vs merged clean accuracy"), "acc_merged", PRIMARY)
}

fn scatter_bias(rows: &[StoredSetting]) -> String {
    scatter_of(rows, "rep_bias", PRIMARY, &format!("representation bias vs {PRIMARY}"), "rep_bias", PRIMARY)
}

fn attack_bars(rows: &[StoredSetting]) -> String {
    let attacks = distinct(rows, |s| s.record.key.attack.clone());
    let values: Vec<Option<f64>> = attacks
        .iter()
        .map(|a| {
            mean(
                &rows
                    .iter()
                    .filter(|s| &s.record.key.attack == a)
                    .filter_map(|s| value(s, PRIMARY))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    svg::bars(&format!("mean {PRIMARY} per attack"), PRIMARY, &attacks, &values)
}
