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
    let mut out = header().join(",");
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
        out.push_str(&line.join(","));
        out.push('\n');
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
