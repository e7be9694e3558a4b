//! `mergeattack report`: structure of the report from a store filled with known values, golden
//! files (tests/fixtures/report/, regenerate with MERGEATTACK_BLESS=1), byte determinism of the
//! CSV and JSON, the findings on data whose answer is known, and CLI errors.

use std::path::{Path, PathBuf};

use mergeattack_harness::report::{FILES, write_report};
use mergeattack_harness::study::{Estimate, Metrics, Phases, SettingKey, SettingRecord, Store};
use mergeattack_suite::run_cli;

const DATASETS: &[&str] = &["digits", "fashion", "animals", "emoji"];
const ATTACKS: &[&str] = &["fgsm", "pgd"];
/// Methods with their base vulnerability: weight-average the most vulnerable in every block.
const METHODS: &[(&str, f64)] =
    &[("ties", 0.6), ("task-arithmetic", 0.7), ("task-arithmetic+surgery", 0.8), ("weight-average", 0.9)];
const HASH: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

/// The fixture: 4 datasets x 4 methods x 2 attacks, values from a closed form.
fn fixture() -> Vec<SettingRecord> {
    let mut out = Vec::new();
    for (i, d) in DATASETS.iter().enumerate() {
        for (m, v) in METHODS {
            for (j, a) in ATTACKS.iter().enumerate() {
                let (fi, fj) = (i as f64, j as f64);
                let rt = v + 0.01 * fi + 0.02 * fj;
                let asr = 0.9;
                let tasr = rt * asr;
                let tref = 0.5 + 0.01 * fi;
                let x = Metrics {
                    acc_surrogate: Estimate::with_ci(0.95, 0.93, 0.97),
                    // Rank of accuracy follows the vulnerability except for a dataset-driven wobble.
                    acc_merged: Estimate::with_ci(0.5 + 0.3 * v - 0.013 * fi, 0.4, 0.8),
                    acc_reference: Estimate::with_ci(0.9, 0.88, 0.92),
                    asr_wb_all: Estimate::with_ci(asr, 0.85, 0.95),
                    asr_wb_cc: Estimate::with_ci(asr, 0.85, 0.95),
                    tasr_all: Estimate::with_ci(tasr, tasr - 0.05, tasr + 0.05),
                    tasr_cc: Estimate::with_ci(tasr, tasr - 0.05, tasr + 0.05),
                    tasr_ref_all: Estimate::with_ci(tref, tref - 0.05, tref + 0.05),
                    tasr_ref_cc: Estimate::with_ci(tref, tref - 0.05, tref + 0.05),
                    rtasr_wb_all: Estimate::with_ci(rt, rt - 0.05, rt + 0.05),
                    // One n/a (a zero denominator) to exercise the empty cells.
                    rtasr_wb_cc: if i == 3 && j == 1 {
                        Estimate::na()
                    } else {
                        Estimate::with_ci(rt, rt - 0.05, rt + 0.05)
                    },
                    rtasr_ref_all: Estimate::point(tasr / tref),
                    rtasr_ref_cc: Estimate::point(tasr / tref),
                    transfer_rate: Estimate::with_ci(rt * 0.95, rt * 0.9, rt.min(1.0)),
                    grad_align_merged: Estimate::point(0.1 * v),
                    grad_align_reference: Estimate::point(0.05),
                    rep_bias: Estimate::point(1.0 - v + 0.003 * (2.0 * fi + fj)),
                };
                out.push(SettingRecord {
                    key: SettingKey {
                        dataset: d.to_string(),
                        method: m.to_string(),
                        attack: a.to_string(),
                        surrogate: "finetuned".into(),
                        eps: "8/255".into(),
                    },
                    eps_value: 8.0 / 255.0,
                    n_images: 64,
                    needs_task_id: m.ends_with("+surgery"),
                    metrics: x,
                    grad_align_merged_skipped: Some(i as u64),
                    grad_align_reference_skipped: Some(0),
                    seconds: Phases { merge: 2.0, craft: 1.5 + fj, evaluate: 0.25 },
                });
            }
        }
    }
    out
}

fn fill(path: &Path, recs: &[SettingRecord]) {
    let mut s = Store::open(path).unwrap();
    for r in recs {
        s.insert(HASH, r).unwrap();
    }
}

/// A minimal XML well-formedness check: balanced tags, quoted attributes, escaped text.
fn check_xml(text: &str) -> Result<(), String> {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    let mut root = None;
    while let Some(lt) = rest.find('<') {
        let between = &rest[..lt];
        if between.contains('>')
            || between.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "").replace("&quot;", "").contains('&')
        {
            return Err(format!("bad text `{between}`"));
        }
        let gt = rest[lt..].find('>').ok_or("unclosed tag")? + lt;
        let tag = &rest[lt + 1..gt];
        rest = &rest[gt + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if !tag.matches('"').count().is_multiple_of(2) {
            return Err(format!("unbalanced quotes in <{tag}>"));
        }
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open) if open == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
            continue;
        }
        let name = tag.split_whitespace().next().ok_or("empty tag")?.trim_end_matches('/').to_string();
        root.get_or_insert(name.clone());
        if !tag.ends_with('/') {
            stack.push(name);
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed {stack:?}"));
    }
    if root.as_deref() != Some("svg") {
        return Err(format!("root is {root:?}"));
    }
    Ok(())
}

#[test]
fn the_xml_checker_can_fail() {
    assert!(check_xml("<svg><g></svg>").is_err());
    assert!(check_xml("<svg><text>a & b</text></svg>").is_err());
    assert!(check_xml("<svg x=\"1></svg>").is_err());
    assert!(check_xml("<svg><rect/><text>a &amp; b</text></svg>").is_ok());
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/report")
}

/// Compare with a committed file, or rewrite it when MERGEATTACK_BLESS is set.
fn golden(name: &str, got: &str) {
    let path = fixtures().join(name);
    if std::env::var_os("MERGEATTACK_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (MERGEATTACK_BLESS=1 writes it)", path.display()));
    assert!(got == want, "{} differs from the golden file (MERGEATTACK_BLESS=1 rewrites it)", path.display());
}

#[test]
fn report_structure_findings_and_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results.sqlite");
    let recs = fixture();
    fill(&store, &recs);
    let out = dir.path().join("report");
    let summary = write_report(&[store], &out).unwrap();
    assert_eq!(summary.settings, 32);
    for f in FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), FILES.len(), "no temporary files left: {leftovers:?}");

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for section in [
        "# mergeattack study report",
        "## Headline",
        "## Findings",
        "### Finding 1",
        "### Finding 2",
        "### Finding 3",
        "### Merged target vs unmerged reference",
        "## Tables",
        "### rtasr_wb_all, method x dataset, attack pgd",
        "## Phase timings",
        "## Plots",
    ] {
        assert!(md.contains(section), "report.md lacks `{section}`");
    }
    assert!(md.contains("Settings: **32** (4 datasets x 4 methods x 2 attacks x 1 surrogates x 1 eps)"), "{md}");
    // Headline numbers from the closed form: rtasr = v + 0.01 i + 0.02 j over v, i, j.
    let all: Vec<f64> = recs.iter().map(|r| r.metrics.rtasr_wb_all.value.unwrap()).collect();
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let share = all.iter().filter(|&&v| v > 0.95).count() as f64 / all.len() as f64;
    assert!((mean - 0.775).abs() < 1e-12);
    assert!(
        md.contains(&format!(
            "rtasr_wb_all: mean **{mean:.3}**, median **0.775**, share of settings above 0.95: **{share:.3}**"
        )),
        "{md}"
    );
    // Weight averaging is the most vulnerable in every block: mean ranks exactly 1..4 and, with
    // n = 8 blocks, k = 4 and no ties, Q = 12/(n k (k+1)) sum R_j^2 - 3 n (k+1) = 24.
    assert!(md.contains("Q = 24.0000"), "{md}");
    assert!(md.contains("| 4.000 | weight-average |") && md.contains("| 1.000 | ties |"), "{md}");
    assert!(md.contains("Most vulnerable (highest mean rank): weight-average. Finding 3 **held**"), "{md}");
    // Surgery raises rtasr by 0.1 in all 8 pairs: every difference positive, W- = 0.
    assert!(md.contains("over 8 paired settings (task-arithmetic+surgery): mean +0.1000"), "{md}");
    assert!(md.contains("W+ 36.0, W- 0.0"), "{md}");
    assert!(md.contains("Methods that need the task identity at inference: task-arithmetic+surgery."));
    assert!(md.contains("| all | 32 | 64.0 | 64.0 | 8.0 | 136.0 |"), "{md}");

    let csv = std::fs::read_to_string(out.join("settings.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 33);
    assert!(lines[0].starts_with("config_hash,dataset,method,attack,surrogate,eps,eps_value,n_images,needs_task_id,acc_surrogate,acc_surrogate_lo,acc_surrogate_hi,"));
    let width = lines[0].split(',').count();
    assert!(lines.iter().all(|l| l.split(',').count() == width));
    assert_eq!(width, 9 + 3 * Metrics::NAMES.len() + 2 + 3);
    // Rows are ordered by dataset, method, attack; the n/a is an empty field.
    assert!(lines[1].starts_with(&format!("{HASH},animals,task-arithmetic,fgsm,finetuned,8/255,")));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("settings.json")).unwrap()).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 32);
    let na = rows.iter().filter(|r| r["rtasr_wb_cc"].is_null()).count();
    assert_eq!(na, 4, "emoji x pgd for each method");
    assert_eq!(rows[0]["method"], "task-arithmetic");

    for f in FILES.iter().filter(|f| f.ends_with(".svg")) {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        check_xml(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let heat = std::fs::read_to_string(out.join("heatmap_rtasr.svg")).unwrap();
    assert_eq!(heat.matches("<rect").count(), 1 + 16, "background + 4 x 4 cells");
    let scatter = std::fs::read_to_string(out.join("scatter_rtasr_vs_accuracy.svg")).unwrap();
    assert_eq!(scatter.matches("<circle").count(), 32 + 4, "points + legend");

    golden("settings.csv", &csv);
    golden("report.md", &md);
}

#[test]
fn csv_and_json_are_byte_identical_for_identical_contents() {
    let dir = tempfile::tempdir().unwrap();
    let recs = fixture();
    let one = dir.path().join("one.sqlite");
    fill(&one, &recs);
    // Same contents, other insertion order, split over two stores (as shards would be).
    let mut rev = recs.clone();
    rev.reverse();
    let (a, b) = (dir.path().join("shard0.sqlite"), dir.path().join("shard1.sqlite"));
    fill(&a, &rev.iter().step_by(2).cloned().collect::<Vec<_>>());
    fill(&b, &rev.iter().skip(1).step_by(2).cloned().collect::<Vec<_>>());
    let (o1, o2) = (dir.path().join("r1"), dir.path().join("r2"));
    write_report(std::slice::from_ref(&one), &o1).unwrap();
    write_report(&[b, a], &o2).unwrap();
    for f in ["settings.csv", "settings.json", "heatmap_rtasr.svg", "bars_attack_rtasr.svg"] {
        let x = std::fs::read(o1.join(f)).unwrap();
        let y = std::fs::read(o2.join(f)).unwrap();
        assert!(x == y, "{f} differs");
    }
    // Rewriting into an existing directory replaces the files with the same bytes.
    let before = std::fs::read(o1.join("settings.csv")).unwrap();
    write_report(&[one], &o1).unwrap();
    assert_eq!(std::fs::read(o1.join("settings.csv")).unwrap(), before);
}

#[test]
fn the_report_command_writes_files_and_rejects_bad_stores() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("results.sqlite");
    fill(&store, &fixture()[..6]);
    let out = dir.path().join("out");
    let (code, stdout, stderr) = run_cli([Path::new("report"), &store, Path::new("-o"), &out]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("report of 6 settings"), "{stdout}");
    assert!(out.join("report.md").is_file());

    let missing = dir.path().join("missing.sqlite");
    let (code, _, stderr) = run_cli([Path::new("report"), &missing, Path::new("-o"), &out]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim(), format!("error: results store {} does not exist", missing.display()));

    let junk = dir.path().join("junk.sqlite");
    std::fs::write(&junk, b"not a database, just some bytes that are long enough to matter.....").unwrap();
    let (code, _, stderr) = run_cli([Path::new("report"), &junk, Path::new("-o"), &out]);
    assert_eq!(code, 2);
    assert!(stderr.starts_with(&format!("error: {} is not a mergeattack results store", junk.display())), "{stderr}");

    let empty = dir.path().join("empty.sqlite");
    drop(Store::open(&empty).unwrap());
    let (code, _, stderr) = run_cli([Path::new("report"), &empty, Path::new("-o"), &dir.path().join("o2")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("nothing to report"), "{stderr}");
    assert!(!dir.path().join("o2").exists(), "no output directory for a failed report");
}
