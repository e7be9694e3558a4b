//! Every stored setting as CSV and JSON rows: fixed column order, fixed row order (the store's
//! ordering), fixed float formatting (Rust's shortest round-trip form), so identical stores give
//! byte-identical files.

use crate::study::setting::{Metrics, Phases};
use crate::study::store::StoredSetting;

/// A cell: text, integer, float or "n/a".
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Na,
}

/// Column names, in order.
pub fn header() -> Vec<String> {
    let mut h: Vec<String> =
        ["config_hash", "dataset", "method", "attack", "surrogate", "eps", "eps_value", "n_images", "needs_task_id"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for m in Metrics::NAMES {
        h.push(m.to_string());
        h.push(format!("{m}_lo"));
        h.push(format!("{m}_hi"));
    }
    h.push("grad_align_merged_skipped".into());
    h.push("grad_align_reference_skipped".into());
    for p in Phases::NAMES {
        h.push(format!("seconds_{p}"));
    }
    h
}

/// One row's cells, in [`header`] order.
pub fn cells(s: &StoredSetting) -> Vec<Cell> {
    let r = &s.record;
    let f = |v: Option<f64>| v.map(Cell::Float).unwrap_or(Cell::Na);
    let mut c = vec![
        Cell::Text(s.config_hash.clone()),
        Cell::Text(r.key.dataset.clone()),
        Cell::Text(r.key.method.clone()),
        Cell::Text(r.key.attack.clone()),
        Cell::Text(r.key.surrogate.clone()),
        Cell::Text(r.key.eps.clone()),
        Cell::Float(r.eps_value),
        Cell::Int(r.n_images as i64),
        Cell::Bool(r.needs_task_id),
    ];
    for e in r.metrics.values() {
        c.extend([f(e.value), f(e.lo), f(e.hi)]);
    }
    for v in [r.grad_align_merged_skipped, r.grad_align_reference_skipped] {
        c.push(v.map(|v| Cell::Int(v as i64)).unwrap_or(Cell::Na));
    }
    for v in r.seconds.values() {
        c.push(Cell::Float(v));
    }
    c
}

/// A float in the shortest form that reads back to the same value.
pub fn fmt_float(v: f64) -> String {
    format!("{v}")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// RFC 4180 CSV with a header line; "n/a" is an empty field; `\n` line ends.
pub fn to_csv(rows: &[StoredSetting]) -> String {
    csv_of(rows, |_| true)
}

/// The CSV of the columns whose name passes `keep`.
fn csv_of(rows: &[StoredSetting], keep: impl Fn(&str) -> bool) -> String {
    let h = header();
    let kept: Vec<bool> = h.iter().map(|c| keep(c)).collect();
    let pick =
        |v: Vec<String>| -> Vec<String> { v.into_iter().zip(&kept).filter(|(_, k)| **k).map(|(c, _)| c).collect() };
    let mut out = pick(h.clone()).join(",");
    out.push('\n');
    for r in rows {
        let line: Vec<String> = cells(r)
            .into_iter()
            .map(|c| match c {
                Cell::Text(s) => csv_field(&s),
                Cell::Int(i) => i.to_string(),
                Cell::Float(v) => fmt_float(v),
                Cell::Bool(b) => (b as u8).to_string(),
                Cell::Na => String::new(),
            })
            .collect();
        out.push_str(&pick(line).join(","));
        out.push('\n');
    }
    out
}

/// [`to_csv`] without the timing columns (`seconds_*`): every result of every setting, and
/// nothing that depends on the machine or the run, so one config and seed give the same bytes
/// whatever the thread count, the sharding or the interruptions.
pub fn to_metrics_csv(rows: &[StoredSetting]) -> String {
    csv_of(rows, |c| !c.starts_with("seconds_"))
}

/// Seconds per phase of every setting: the [`Phases`] of the record plus any further phase rows
/// of the store (the runner's `load` and `metrics`), one column per phase name.
pub fn to_timings_csv(rows: &[StoredSetting], phases: &crate::study::store::PhaseRows) -> String {
    let mut names: Vec<String> = Phases::NAMES.iter().map(|s| s.to_string()).collect();
    for v in phases.values() {
        for (p, _) in v {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
    }
    let mut out = format!(
        "config_hash,dataset,method,attack,surrogate,eps,{}\n",
        names.iter().map(|n| format!("seconds_{n}")).collect::<Vec<_>>().join(",")
    );
    for r in rows {
        let k = &r.record.key;
        let extra = phases.get(&(r.config_hash.clone(), k.clone()));
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                let from_record = Phases::NAMES.iter().position(|p| p == n).map(|i| r.record.seconds.values()[i]);
                let from_rows = extra.and_then(|v| v.iter().find(|(p, _)| p == n).map(|(_, s)| *s));
                from_record.or(from_rows).map(fmt_float).unwrap_or_default()
            })
            .collect();
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            csv_field(&r.config_hash),
            csv_field(&k.dataset),
            csv_field(&k.method),
            csv_field(&k.attack),
            csv_field(&k.surrogate),
            csv_field(&k.eps),
            cells.join(",")
        ));
    }
    out
}

/// A JSON array of objects (keys in [`header`] order); "n/a" is `null`.
pub fn to_json(rows: &[StoredSetting]) -> String {
    let h = header();
    let mut out = String::from("[");
    for (i, r) in rows.iter().enumerate() {
        out.push_str(if i == 0 { "\n  {" } else { ",\n  {" });
        for (j, (name, c)) in h.iter().zip(cells(r)).enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            out.push_str(&serde_json::Value::String(name.clone()).to_string());
            out.push_str(": ");
            let v = match c {
                Cell::Text(s) => serde_json::Value::String(s).to_string(),
                Cell::Int(i) => i.to_string(),
                Cell::Float(v) => {
                    serde_json::Number::from_f64(v).map(|n| n.to_string()).unwrap_or_else(|| "null".into())
                }
                Cell::Bool(b) => b.to_string(),
                Cell::Na => "null".into(),
            };
            out.push_str(&v);
        }
        out.push('}');
    }
    out.push_str(if rows.is_empty() { "]\n" } else { "\n]\n" });
    out
}
