//! `mergeattack study` end to end on the smoke study (the reduced mini zoo, built once into the
//! cache): the report's structure and sane values, bitwise-equal metrics with 1 and 2 threads,
//! a run killed with SIGKILL and resumed giving the same metrics as an uninterrupted one (no
//! setting lost, none duplicated), shards read together, one setting recomputed by hand from the
//! saved images with `mergeattack merge` and `mergeattack attack`, and bad input named in one
//! sentence.
//! Needs the mini-suite cache (`scripts/test.sh` runs `mergeattack setup` first).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mergeattack_harness::study::{RunInfo, Store, StudyConfig};
use mergeattack_suite::{mergeattack_bin, run_cli};

/// Runs the smoke study once (building the reduced zoo if the cache lacks it) before any test
/// that needs the zoo, so that parallel tests never build it twice; returns that run's output.
fn first_run() -> &'static (PathBuf, tempfile::TempDir) {
    static RUN: OnceLock<(PathBuf, tempfile::TempDir)> = OnceLock::new();
    RUN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("a");
        let (code, stdout, stderr) = smoke(&out, &["--threads", "1"]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("8 settings in this shard, 0 already stored, 8 finished now, 0 skipped"), "{stdout}");
        (out, tmp)
    })
}

fn smoke(out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args: Vec<String> = vec!["study".into(), "--smoke".into(), "--quiet".into(), "--out".into()];
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    run_cli(args)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn stored(store: &Path) -> usize {
    match Store::open_read_only(store) {
        Ok(s) => s.settings().map(|v| v.len()).unwrap_or(0),
        Err(_) => 0,
    }
}

#[test]
fn smoke_report_has_the_expected_structure_and_sane_values() {
    let (out, _) = first_run();
    let report = out.join("report");
    for f in mergeattack_harness::report::FILES {
        assert!(report.join(f).is_file(), "{f} missing");
    }
    let md = read(&report.join("report.md"));
    for section in ["## Headline", "## Findings", "## Tables", "## Phase timings", "### Study runner phases"] {
        assert!(md.contains(section), "report.md lacks `{section}`:\n{md}");
    }
    assert!(md.contains("Settings: **8** (2 datasets x 2 methods x 2 attacks x 1 surrogates x 1 eps)"), "{md}");
    assert!(md.contains("| load | merge | craft | evaluate | metrics | total |"), "{md}");

    let json: serde_json::Value = serde_json::from_str(&read(&report.join("settings.json"))).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 8);
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64();
    for r in rows {
        let what = format!("{} {} {}", r["dataset"], r["method"], r["attack"]);
        assert_eq!(r["n_images"], 16, "{what}");
        for k in ["acc_surrogate", "acc_merged", "acc_reference", "asr_wb_all", "tasr_all", "tasr_ref_all"] {
            let v = f(r, k).unwrap_or_else(|| panic!("{what}: {k} missing"));
            assert!((0.0..=1.0).contains(&v), "{what}: {k} = {v}");
            let (lo, hi) = (f(r, &format!("{k}_lo")).unwrap(), f(r, &format!("{k}_hi")).unwrap());
            assert!(lo <= v && v <= hi, "{what}: {k} {v} outside [{lo}, {hi}]");
        }
        // The fine-tuned surrogate beats chance (0.1) on its own task, and a white-box PGD at 8/255
        // fools it on most images.
        assert!(f(r, "acc_surrogate").unwrap() > 0.15, "{what}");
        if r["attack"] == "pgd" {
            assert!(f(r, "asr_wb_all").unwrap() > 0.5, "{what}");
        }
        // rtasr_wb_all = tasr_all / asr_wb_all exactly (both over the same 16 images).
        let (t, a) = (f(r, "tasr_all").unwrap(), f(r, "asr_wb_all").unwrap());
        let rt = f(r, "rtasr_wb_all").unwrap();
        assert!(a > 0.0 && (rt - t / a).abs() < 1e-12, "{what}: {rt} vs {t} / {a}");
        let ga = f(r, "grad_align_merged").unwrap();
        assert!((-1.0..=1.0).contains(&ga), "{what}: grad_align_merged {ga}");
        assert!(f(r, "rep_bias").unwrap() > 0.0, "{what}: a merged model differs from the fine-tuned one");
        assert_eq!(r["needs_task_id"], false);
    }
    // Clean accuracies do not depend on the attack.
    for d in ["digits", "fashion"] {
        let accs: Vec<f64> =
            rows.iter().filter(|r| r["dataset"] == d).map(|r| f(r, "acc_surrogate").unwrap()).collect();
        assert!(accs.windows(2).all(|w| w[0] == w[1]), "{d}: {accs:?}");
    }
    // The adversarial images are saved (u8, 8-bit quantised) beside the clean ones, within eps
    // (plus the truncation's last level).
    let adv = out.join("adversarial/digits");
    let npy = |name: &str| {
        let b = std::fs::read(adv.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let header_len = u16::from_le_bytes([b[8], b[9]]) as usize;
        let header = String::from_utf8_lossy(&b[10..10 + header_len]).into_owned();
        assert!(header.contains("'descr': '|u1'") && header.contains("(16, 3, 32, 32)"), "{name}: {header}");
        b[10 + header_len..].to_vec()
    };
    let clean = npy("clean.npy");
    for a in ["fgsm", "pgd"] {
        let x = npy(&format!("{a}__finetuned__8_255.npy"));
        let linf = clean.iter().zip(&x).map(|(&c, &v)| (i32::from(c) - i32::from(v)).abs()).max().unwrap();
        // eps 8/255, then truncation to 8 bits: a pixel pushed down by 8/255 can land one level
        // lower (float rounding of k/255 - 8/255 before the floor).
        assert!((1..=9).contains(&linf), "{a}: L-inf distance {linf}/255");
    }
    assert!(adv.join("labels.npy").is_file());

    let timings = read(&report.join("timings.csv"));
    assert!(timings.starts_with(
        "config_hash,dataset,method,attack,surrogate,eps,seconds_merge,seconds_craft,seconds_evaluate,seconds_load,seconds_metrics\n"
    ));
    assert_eq!(timings.lines().count(), 9);
    assert!(!read(&report.join("metrics.csv")).contains("seconds_"));
}

#[test]
fn threads_kill_resume_and_shards_give_the_same_metrics() {
    let (a, _) = first_run();
    let want = read(&a.join("report/metrics.csv"));
    let tmp = tempfile::tempdir().unwrap();

    // Two threads, killed with SIGKILL once some settings are stored, then resumed.
    let b = tmp.path().join("b");
    let store = b.join("results.sqlite");
    let mut child = Command::new(mergeattack_bin())
        .args(["study", "--smoke", "--quiet", "--threads", "2", "--out"])
        .arg(&b)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while stored(&store) == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the study ended before it could be killed");
        assert!(start.elapsed() < Duration::from_secs(300), "no setting stored in 5 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = stored(&store);
    assert!((1..8).contains(&before), "killed with {before} settings stored: not mid-study");

    let (code, stdout, stderr) = smoke(&b, &["--threads", "2"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("{before} already stored, {} finished now", 8 - before)),
        "{stdout} (killed with {before} stored)"
    );
    let s = Store::open_read_only(&store).unwrap();
    assert!(s.integrity_ok().unwrap());
    assert_eq!(s.settings().unwrap().len(), 8, "none lost, none duplicated");
    assert_eq!(s.runs().unwrap().len(), 2);
    drop(s);
    assert!(read(&b.join("report/metrics.csv")) == want, "killed + resumed with 2 threads differs from 1 thread");

    // A rerun of a finished study does nothing and keeps the results.
    let (code, stdout, stderr) = smoke(&b, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("8 already stored, 0 finished now"), "{stdout}");
    assert!(read(&b.join("report/metrics.csv")) == want);

    // Two shards into two stores, reported together.
    let c = tmp.path().join("c");
    let stores: Vec<PathBuf> = (0..2).map(|i| c.join(format!("results-{i}.sqlite"))).collect();
    for (i, st) in stores.iter().enumerate() {
        let shard = format!("{i}/2");
        let (code, stdout, stderr) = smoke(&c, &["--shard", &shard, "--store", st.to_str().unwrap(), "--no-report"]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("4 settings in this shard"), "{stdout}");
    }
    let r = c.join("report");
    let (code, _, stderr) = run_cli([Path::new("report"), &stores[0], &stores[1], Path::new("-o"), &r]);
    assert_eq!(code, 0, "{stderr}");
    assert!(read(&r.join("metrics.csv")) == want, "two shards differ from one run");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn study_err(args: &[&str]) -> String {
    let (code, stdout, stderr) = run_cli(std::iter::once("study").chain(args.iter().copied()));
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1, "{stderr}");
    stderr.trim_end().to_string()
}

#[test]
fn bad_config_and_models_are_one_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let smoke = mergeattack_harness::study::config::SMOKE_TOML;
    let out = d.join("o");
    let o = out.to_str().unwrap();

    let cfg = write(d, "m.toml", &smoke.replace("{ name = \"task-arithmetic\" }", "{ name = \"task-arithmatic\" }"));
    let e = study_err(&["--config", cfg.to_str().unwrap(), "--out", o]);
    assert!(e.contains("m.toml line") && e.contains("methods[1].name") && e.contains("task-arithmatic"), "{e}");

    let cfg = write(d, "a.toml", &smoke.replace("{ name = \"pgd\" }", "{ name = \"pgd\", overrides = { stepz = 3 } }"));
    let e = study_err(&["--config", cfg.to_str().unwrap(), "--out", o]);
    assert!(e.contains("attack `pgd`") && e.contains("stepz"), "{e}");

    let missing = d.join("nowhere/pre.safetensors");
    let cfg = write(
        d,
        "f.toml",
        &smoke.replace(
            "zoo = \"mini\"\nzoo_config = \"reduced\"",
            &format!("pretrained = \"{}\"\nfinetuned = {{ digits = \"{0}\", fashion = \"{0}\" }}", missing.display()),
        ),
    );
    let e = study_err(&["--config", cfg.to_str().unwrap(), "--out", o]);
    assert!(e.contains("key `models.heads` is required unless models.zoo is set"), "{e}");
    let cfg = write(
        d,
        "f.toml",
        &smoke.replace(
            "zoo = \"mini\"\nzoo_config = \"reduced\"",
            &format!(
                "pretrained = \"{}\"\nheads = \"{0}\"\nfinetuned = {{ digits = \"{0}\", fashion = \"{0}\" }}",
                missing.display()
            ),
        ),
    );
    let e = study_err(&["--config", cfg.to_str().unwrap(), "--out", o]);
    assert_eq!(e, format!("error: model file {} does not exist", missing.display()));

    let e = study_err(&["--smoke", "--shard", "2/2", "--out", o]);
    assert!(e.contains("bad --shard `2/2`"), "{e}");
    assert!(!out.join("results.sqlite").exists(), "nothing written for bad input");
}

#[test]
fn a_store_of_another_study_a_mismatched_pool_and_a_head_of_other_classes_are_refused() {
    let (a, _) = first_run();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // A store holding another study.
    let other = d.join("other.sqlite");
    let mut s = Store::open(&other).unwrap();
    s.begin_run(&RunInfo { config_hash: "f".repeat(64), code_version: "x".into(), seed: 0, argv: vec![] }).unwrap();
    drop(s);
    let e = study_err(&["--smoke", "--store", other.to_str().unwrap(), "--out", d.join("o").to_str().unwrap()]);
    assert!(e.contains(&format!("results store {} holds another study", other.display())), "{e}");

    // The zoo the smoke study used, named file by file.
    let store = Store::open_read_only(&a.join("results.sqlite")).unwrap();
    assert_eq!(store.runs().unwrap()[0].info.config_hash.len(), 64);
    drop(store);
    let zoo = zoo_dir();
    let smoke = mergeattack_harness::study::config::SMOKE_TOML;
    let explicit = |digits_model: &Path, digits_data: &str| {
        smoke.replace("mini:digits", digits_data).replace(
            "zoo = \"mini\"\nzoo_config = \"reduced\"",
            &format!(
                "pretrained = \"{}\"\nheads = \"{}\"\nfinetuned = {{ digits = \"{}\", fashion = \"{}\" }}",
                zoo.join("pretrained").display(),
                zoo.join("heads.safetensors").display(),
                digits_model.display(),
                zoo.join("finetuned/fashion").display()
            ),
        )
    };
    // A "fine-tuned model" without the pool's tensors.
    let cfg = write(d, "p.toml", &explicit(&zoo.join("heads.safetensors"), "mini:digits"));
    let e = study_err(&["--config", cfg.to_str().unwrap(), "--out", d.join("p").to_str().unwrap()]);
    assert!(e.contains("heads.safetensors") && e.contains("vision_model."), "{e}");
    // A dataset with 4 classes for the 10-class digits head.
    let cfg = write(d, "h.toml", &explicit(&zoo.join("finetuned/digits"), "mini:fashion-coarse"));
    let e = study_err(&["--config", cfg.to_str().unwrap(), "--out", d.join("h").to_str().unwrap()]);
    assert!(e.contains("dataset `digits` (mini:fashion-coarse) has 4 classes") && e.contains("10 rows"), "{e}");
}

/// The reduced zoo the smoke study builds for its two tasks.
fn zoo_dir() -> PathBuf {
    let cfg = mergeattack_harness::study::runner::zoo_config(&StudyConfig::smoke()).unwrap();
    assert_eq!(cfg.tasks, ["digits", "fashion"]);
    let root = mergeattack_onnx::library::cache_root();
    let dir = root.join("zoo").join(mergeattack_harness::zoo::cache_key("mini", &cfg));
    assert!(dir.join("summary.json").is_file(), "{} is not a built zoo", dir.display());
    dir
}

/// One row of `mergeattack attack`'s table: (acc, asr_all) of the model whose path ends with `tail`.
fn table_row(stdout: &str, tail: &str) -> (f64, f64) {
    let row = stdout
        .lines()
        .find(|l| l.starts_with('|') && l.split('|').nth(1).is_some_and(|c| c.trim().ends_with(tail)))
        .unwrap_or_else(|| panic!("no row for {tail} in:\n{stdout}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    (cells[4].parse().unwrap(), cells[5].parse().unwrap())
}

#[test]
fn one_setting_is_recomputed_by_hand_from_the_saved_images() {
    let (out, _) = first_run();
    let zoo = zoo_dir();
    // The setting's row of metrics.csv, by column name.
    let csv = read(&out.join("report/metrics.csv"));
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let row: Vec<&str> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|r| r[1] == "digits" && r[2] == "task-arithmetic" && r[3] == "pgd")
        .expect("the (digits, task-arithmetic, pgd) setting");
    let col = |name: &str| -> f64 { row[header.iter().position(|h| *h == name).unwrap()].parse().unwrap() };
    // The merged target, rebuilt with `mergeattack merge` (task order of the study).
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("ta/model.safetensors");
    std::fs::create_dir_all(merged.parent().unwrap()).unwrap();
    std::fs::copy(zoo.join("pretrained/config.json"), tmp.path().join("ta/config.json")).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    let (code, _, stderr) = run_cli([
        "merge".into(),
        "--method".into(),
        "task-arithmetic".into(),
        "--base".into(),
        s(zoo.join("pretrained/model.safetensors")),
        "--models".into(),
        s(zoo.join("finetuned/digits/model.safetensors")),
        s(zoo.join("finetuned/fashion/model.safetensors")),
        "-o".into(),
        s(merged.clone()),
    ]);
    assert_eq!(code, 0, "{stderr}");
    // `attack` with eps 0 only evaluates: on the saved clean and adversarial images.
    let adv = out.join("adversarial/digits");
    let evaluate = |images: &str| -> String {
        let (code, stdout, stderr) = run_cli([
            "attack".into(),
            "--model".into(),
            s(zoo.join("finetuned/digits/model.safetensors")),
            "--head".into(),
            format!("{}:digits", zoo.join("heads.safetensors").display()),
            "--attack".into(),
            "fgsm".into(),
            "--eps".into(),
            "0".into(),
            "--data".into(),
            format!("npy:{},{}", adv.join(images).display(), adv.join("labels.npy").display()),
            "--eval".into(),
            s(merged.clone()),
        ]);
        assert_eq!(code, 0, "{stderr}");
        stdout
    };
    let clean = evaluate("clean.npy");
    let attacked = evaluate("pgd__finetuned__8_255.npy");
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-4, "{what}: by hand {a}, study {b}");
    close(table_row(&clean, "finetuned/digits/model.safetensors").0, col("acc_surrogate"), "acc_surrogate");
    close(table_row(&clean, "ta/model.safetensors").0, col("acc_merged"), "acc_merged");
    close(table_row(&attacked, "finetuned/digits/model.safetensors").1, col("asr_wb_all"), "asr_wb_all");
    close(table_row(&attacked, "ta/model.safetensors").1, col("tasr_all"), "tasr_all");
}
