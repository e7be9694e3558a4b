//! The study config, setting enumeration and sharding, and the results store: round trip, reading
//! several stores, and resuming after `kill -9` without losing or duplicating a setting.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mergeattack_harness::study::config::{DEFAULT_TOML, SMOKE_TOML};
use mergeattack_harness::study::{
    Estimate, Metrics, Phases, RunInfo, Setting, SettingRecord, Shard, Store, StoredSetting, StudyConfig, read_stores,
};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/study.toml")
}

#[test]
fn the_example_config_parses_and_is_the_built_in_default() {
    let ex = StudyConfig::from_file(&example_path()).unwrap();
    let def = StudyConfig::default_study();
    assert_eq!(ex, def);
    assert_eq!(ex.hash(), def.hash());
    assert_eq!(ex.settings().len(), 4 * 8 * 6);
    let names: Vec<&str> = ex.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "weight-average",
            "task-arithmetic",
            "ties",
            "emr",
            "tsv-m",
            "adamerging",
            "task-arithmetic+surgery",
            "adamerging+surgery"
        ]
    );
    assert!(DEFAULT_TOML.contains("zoo = \"mini\"") && SMOKE_TOML.contains("zoo = \"mini\""));
}

/// Insert `extra` as a new line after the first line containing `after`; returns (text, its line).
fn insert_after(text: &str, after: &str, extra: &str) -> (String, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    for (i, l) in text.lines().enumerate() {
        out.push(l.to_string());
        if at == 0 && l.contains(after) {
            out.push(extra.to_string());
            at = i + 2;
        }
    }
    assert!(at > 0, "`{after}` not found");
    (out.join("\n"), at)
}

#[test]
fn a_bad_key_names_the_key_and_the_line() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let (bad, line) = insert_after(&text, "batch_size", "batch_sise = 3");
    let e = StudyConfig::from_toml_str(&bad, "study.toml").unwrap_err().to_string();
    assert!(e.starts_with(&format!("study.toml line {line}: unknown field `batch_sise`")), "{e}");

    let (bad, line) = insert_after(&text, "[models]", "finetund = {}");
    let e = StudyConfig::from_toml_str(&bad, "study.toml").unwrap_err().to_string();
    assert!(e.starts_with(&format!("study.toml line {line}: unknown field `finetund`")), "{e}");

    let bad = text.replacen("{ name = \"ties\" }", "{ name = \"tiez\" }", 1);
    let line = bad.lines().position(|l| l.contains("tiez")).unwrap() + 1;
    let e = StudyConfig::from_toml_str(&bad, "study.toml").unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("study.toml line {line}, key `methods[2].name`: unknown merge method `tiez`")),
        "{e}"
    );

    let bad = text.replacen("surrogates = [\"finetuned\"]", "surrogates = [\"finetune\"]", 1);
    let line = bad.lines().position(|l| l.contains("\"finetune\"")).unwrap() + 1;
    let e = StudyConfig::from_toml_str(&bad, "study.toml").unwrap_err().to_string();
    assert!(e.starts_with(&format!("study.toml line {line}, key `surrogates[0]`: unknown surrogate")), "{e}");

    let e = StudyConfig::from_file(Path::new("/nonexistent/study.toml")).unwrap_err().to_string();
    assert!(e.starts_with("cannot read study config /nonexistent/study.toml"), "{e}");
}

#[test]
fn settings_enumerate_in_a_fixed_order_and_shards_partition_them() {
    let text = SMOKE_TOML
        .replace("eps = [\"8/255\"]", "eps = [\"4/255\", 0.0625]")
        .replace("surrogates = [\"finetuned\"]", "surrogates = [\"finetuned\", \"ensemble:[finetuned, pretrained]\"]");
    let cfg = StudyConfig::from_toml_str(&text, "t").unwrap();
    let all = cfg.settings();
    assert_eq!(all.len(), 2 * 2 * 2 * 2 * 2);
    assert!(all.iter().enumerate().all(|(i, s)| s.index == i));
    // dataset slowest, eps fastest.
    let first: Vec<String> =
        all[..4].iter().map(|s| format!("{}|{}|{}", s.key.attack, s.key.surrogate, s.key.eps)).collect();
    assert_eq!(
        first,
        [
            "fgsm|finetuned|4/255",
            "fgsm|finetuned|0.0625",
            "fgsm|ensemble:[finetuned,pretrained]|4/255",
            "fgsm|ensemble:[finetuned,pretrained]|0.0625"
        ]
    );
    assert_eq!(all[1].eps_value, 0.0625);
    assert_eq!(all[0].eps_value, 4.0 / 255.0);
    assert_eq!((all[0].key.dataset.as_str(), all[16].key.dataset.as_str()), ("digits", "fashion"));
    let keys: BTreeSet<_> = all.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys.len(), all.len(), "keys are unique");
    assert_eq!(cfg.settings(), all, "enumeration is repeatable");

    let def = StudyConfig::default_study().settings();
    for n in 1..=7 {
        let mut seen: Vec<usize> = Vec::new();
        for i in 0..n {
            let shard: Shard = format!("{i}/{n}").parse().unwrap();
            let part = StudyConfig::default_study().shard_settings(shard);
            assert!(part.windows(2).all(|w| w[0].index < w[1].index));
            assert!(part.iter().all(|s| s.index % n == i));
            assert!(part.len() == def.len() / n || part.len() == def.len() / n + 1);
            seen.extend(part.iter().map(|s| s.index));
        }
        seen.sort();
        assert_eq!(seen, (0..def.len()).collect::<Vec<_>>(), "shards of {n} partition the settings");
    }
}

/// A deterministic record for a setting (stands in for the runner's measurements).
fn synth_record(s: &Setting) -> SettingRecord {
    let x = s.index as f64;
    let mut m = Metrics::default();
    for (j, e) in m.values_mut().into_iter().enumerate() {
        let v = ((x * 0.37 + j as f64 * 0.11).sin() + 1.0) / 2.0;
        *e = if (s.index + j).is_multiple_of(11) {
            Estimate::na()
        } else {
            Estimate::with_ci(v, v * 0.9, (v * 1.1).min(1.0))
        };
    }
    m.rep_bias = Estimate::point(x / 1000.0);
    SettingRecord {
        key: s.key.clone(),
        eps_value: s.eps_value,
        n_images: 16 + (s.index as u64 % 5),
        needs_task_id: s.key.method.contains("surgery") || s.key.method == "emr",
        metrics: m,
        grad_align_merged_skipped: Some(s.index as u64 % 3),
        grad_align_reference_skipped: if s.index.is_multiple_of(2) { None } else { Some(1) },
        seconds: Phases { merge: 0.5, craft: x / 10.0, evaluate: 0.25 },
    }
}

/// The work loop of a study, without models: skip what is done, store the rest one by one.
fn write_all(path: &Path, delay: Duration) {
    let cfg = StudyConfig::default_study();
    let hash = cfg.hash();
    let mut store = Store::open(path).unwrap();
    store
        .begin_run(&RunInfo {
            config_hash: hash.clone(),
            code_version: "test".into(),
            seed: cfg.seed,
            argv: vec!["writer".into()],
        })
        .unwrap();
    for s in cfg.settings() {
        if store.is_done(&hash, &s.key).unwrap() {
            continue;
        }
        store.insert(&hash, &synth_record(&s)).unwrap();
        std::thread::sleep(delay);
    }
    store.finish_run().unwrap();
}

/// Helper process for `kill_9_mid_run_then_resume_loses_and_duplicates_nothing` (which sets the
/// environment); it is not a test of its own.
#[test]
#[ignore = "helper process started by kill_9_mid_run_then_resume_loses_and_duplicates_nothing"]
fn writer_process() {
    let path = std::env::var("MERGEATTACK_TEST_WRITER_STORE").expect("run by the kill -9 test");
    let delay: u64 = std::env::var("MERGEATTACK_TEST_WRITER_DELAY_MS").unwrap().parse().unwrap();
    write_all(Path::new(&path), Duration::from_millis(delay));
}

fn count(path: &Path) -> usize {
    match Store::open_read_only(path) {
        Ok(s) => s.settings().map(|v| v.len()).unwrap_or(0),
        Err(_) => 0,
    }
}

#[test]
fn kill_9_mid_run_then_resume_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("uninterrupted.sqlite");
    write_all(&reference, Duration::ZERO);
    let want = Store::open_read_only(&reference).unwrap().settings().unwrap();
    assert_eq!(want.len(), 192);

    let path = dir.path().join("killed.sqlite");
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&exe)
            .args(["--exact", "writer_process", "--ignored", "--test-threads=1", "--nocapture"])
            .env("MERGEATTACK_TEST_WRITER_STORE", &path)
            .env("MERGEATTACK_TEST_WRITER_DELAY_MS", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    for target in [25usize, 90, 150] {
        let mut child = spawn();
        let t0 = Instant::now();
        while count(&path) < target {
            assert!(t0.elapsed() < Duration::from_secs(120), "the writer did not reach {target} settings");
            assert!(child.try_wait().unwrap().is_none(), "the writer exited before it was killed");
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let n = count(&path);
        assert!((target..192).contains(&n), "{n} settings after the kill");
    }
    let mut child = spawn();
    assert!(child.wait().unwrap().success(), "the resumed writer failed");

    let store = Store::open_read_only(&path).unwrap();
    assert!(store.integrity_ok().unwrap());
    let got = store.settings().unwrap();
    assert_eq!(got.len(), want.len(), "no setting lost or duplicated");
    assert_eq!(got, want, "the resumed store equals an uninterrupted run");
    let runs = store.runs().unwrap();
    assert_eq!(runs.len(), kills + 1);
    assert!(runs[..kills].iter().all(|r| r.finished_unix.is_none()), "killed runs never finished");
    assert!(runs[kills].finished_unix.is_some());
}

fn record(dataset: &str, method: &str, v: f64) -> SettingRecord {
    let m = Metrics {
        rtasr_wb_all: Estimate::with_ci(v, v - 0.1, v + 0.1),
        rtasr_ref_cc: Estimate::na(),
        ..Default::default()
    };
    SettingRecord {
        key: mergeattack_harness::study::SettingKey {
            dataset: dataset.into(),
            method: method.into(),
            attack: "pgd".into(),
            surrogate: "ensemble:[finetuned,pretrained]".into(),
            eps: "8/255".into(),
        },
        eps_value: 8.0 / 255.0,
        n_images: 7,
        needs_task_id: true,
        metrics: m,
        grad_align_merged_skipped: Some(2),
        grad_align_reference_skipped: None,
        seconds: Phases { merge: 1.5, craft: 2.25, evaluate: 0.125 },
    }
}

#[test]
fn store_round_trip_and_reading_several_stores() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sqlite");
    let b = dir.path().join("b.sqlite");
    let recs = [record("x", "ties", 0.25), record("y", "ties", 0.5), record("x", "emr", 1.0 / 3.0)];
    {
        let mut s = Store::open(&a).unwrap();
        s.insert("h1", &recs[0]).unwrap();
        s.insert("h1", &recs[2]).unwrap();
        assert!(s.is_done("h1", &recs[0].key).unwrap());
        assert!(!s.is_done("h2", &recs[0].key).unwrap());
        assert!(!s.is_done("h1", &recs[1].key).unwrap());
        assert_eq!(s.done_keys("h1").unwrap().len(), 2);
    }
    {
        let mut s = Store::open(&b).unwrap();
        s.insert("h1", &recs[1]).unwrap();
        // The same setting in both stores with the same results (timings may differ): kept once.
        let mut again = recs[0].clone();
        again.seconds.craft = 99.0;
        s.insert("h1", &again).unwrap();
    }
    let one = Store::open_read_only(&a).unwrap().settings().unwrap();
    assert_eq!(
        one,
        vec![
            StoredSetting { config_hash: "h1".into(), record: recs[2].clone() },
            StoredSetting { config_hash: "h1".into(), record: recs[0].clone() },
        ]
    );
    let both = read_stores(&[a.clone(), b.clone()]).unwrap();
    let got: Vec<_> = both.iter().map(|s| (s.record.key.dataset.as_str(), s.record.key.method.as_str())).collect();
    assert_eq!(got, [("x", "emr"), ("x", "ties"), ("y", "ties")]);
    assert_eq!(both[1].record, recs[0]);

    // Different results for one setting: an error naming both files.
    let c = dir.path().join("c.sqlite");
    Store::open(&c).unwrap().insert("h1", &record("x", "ties", 0.75)).unwrap();
    let e = read_stores(&[a.clone(), c.clone()]).unwrap_err().to_string();
    assert!(e.contains("different results") && e.contains("a.sqlite") && e.contains("c.sqlite"), "{e}");
}
