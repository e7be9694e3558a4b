//! `mergeattack merge` with the data-dependent methods: `--data` per task, `--heads`, per-task
//! output files with the surgery tensors, and the bad inputs (exit code 2, one sentence).

use std::path::{Path, PathBuf};

use mergeattack_core::rng;
use mergeattack_core::tensor::ParamSet;
use mergeattack_harness::data::npy;
use mergeattack_harness::synth::{self, SynthConfig};
use mergeattack_onnx::runtime::{Model, RuntimeOptions};
use mergeattack_onnx::weights::{Checkpoint, save};
use mergeattack_suite::run_cli;
use ndarray::Array2;
use rand::RngExt;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    models: Vec<PathBuf>,
    heads: PathBuf,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Images `[n, 32, 32, 3]` u8 and labels in 0..classes as .npy files; returns the `npy:` spec.
fn npy_data(dir: &Path, name: &str, n: usize, classes: usize) -> String {
    let mut r = rng::stream(7, &[b"cli-data", name.as_bytes()]);
    let px: Vec<u8> = (0..n * 32 * 32 * 3).map(|_| r.random::<u8>()).collect();
    let labels: Vec<u8> = (0..n).flat_map(|i| ((i % classes) as i64).to_le_bytes()).collect();
    let (ip, lp) = (dir.join(format!("{name}-images.npy")), dir.join(format!("{name}-labels.npy")));
    std::fs::write(&ip, npy::to_bytes("|u1", &[n, 32, 32, 3], &px)).unwrap();
    std::fs::write(&lp, npy::to_bytes("<i8", &[n], &labels)).unwrap();
    format!("npy:{},{}", s(&ip), s(&lp))
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let cfg = SynthConfig::tiny();
        let (base, models) = synth::write_set(&root, &cfg, 2, 3, 0.3).unwrap();
        let config = serde_json::json!({
            "model_type": "clip_vision_model",
            "hidden_size": cfg.width, "num_hidden_layers": cfg.layers, "num_attention_heads": 4,
            "intermediate_size": cfg.intermediate, "patch_size": cfg.patch, "image_size": cfg.image,
            "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": cfg.projection,
        });
        std::fs::write(root.join("config.json"), config.to_string()).unwrap();
        let mut heads = ParamSet::new();
        for (t, (name, c)) in [("alpha", 3usize), ("beta", 4)].iter().enumerate() {
            let mut r = rng::stream(4, &[b"cli-head", &[t as u8]]);
            heads.insert_owned(
                *name,
                Array2::from_shape_simple_fn((*c, cfg.projection), || r.random_range(-1.0f32..1.0)).into_dyn(),
            );
        }
        let hp = root.join("heads.safetensors");
        save(&hp, &heads, &[]).unwrap();
        Fixture { _dir: dir, root, base, models, heads: hp }
    }

    fn args(&self, method: &str, data: &[String], extra: &[&str], out: &Path) -> Vec<String> {
        let mut a: Vec<String> =
            vec!["merge".into(), "--method".into(), method.into(), "--base".into(), s(&self.base), "--models".into()];
        a.extend(self.models.iter().map(|m| s(m)));
        if !data.is_empty() {
            a.push("--data".into());
            a.extend(data.iter().cloned());
        }
        a.extend(["--heads".into(), s(&self.heads), "--tasks".into(), "alpha".into(), "beta".into()]);
        a.extend(extra.iter().map(|x| x.to_string()));
        a.extend(["-o".into(), s(out)]);
        a
    }
}

#[test]
fn regmean_with_surgery_writes_one_file_per_task_with_its_module() {
    let f = Fixture::new();
    let data = vec![npy_data(&f.root, "a", 12, 3), npy_data(&f.root, "b", 12, 4)];
    let out = f.root.join("out").join("merged.safetensors");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let args = f.args("regmean+surgery", &data, &["--set", "surgery_steps=3", "--set", "examples=8"], &out);
    let (code, stdout, stderr) = run_cli(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("regmean+surgery"), "{stdout}");
    assert!(!out.exists(), "a +surgery merge writes per-task files only");
    for (t, task) in ["alpha", "beta"].iter().enumerate() {
        let p = f.root.join("out").join(format!("merged.task{t}.safetensors"));
        let c = Checkpoint::open(&p).unwrap();
        assert_eq!(c.tensor("surgery.down").unwrap().unwrap().shape(), [16, 32]);
        assert_eq!(c.tensor("surgery.up").unwrap().unwrap().shape(), [32, 16]);
        let meta = c.metadata();
        assert_eq!(meta.get("mergeattack.method").map(String::as_str), Some("regmean+surgery"));
        // The file loads as a model with its surgery block.
        let m =
            Model::load(&p, Some(&f.root.join("config.json")), None, &f.heads, Some(task), RuntimeOptions::default())
                .unwrap();
        assert_eq!(m.surgery_rank(), Some(16));
    }
}

#[test]
fn bad_data_arguments_are_named() {
    let f = Fixture::new();
    let out = f.root.join("m.safetensors");
    let a = npy_data(&f.root, "a", 6, 3);
    let b = npy_data(&f.root, "b", 6, 4);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (f.args("fisher", &[], &[], &out), "needs images"),
        (f.args("adamerging", std::slice::from_ref(&a), &[], &out), "--data has 1 spec(s) but 2"),
        // Task alpha's head has 3 classes; these images have 4.
        (f.args("regmean", &[b.clone(), a.clone()], &[], &out), "has 4 classes but the head of task `alpha` has 3"),
        (f.args("regmean", &[a.clone(), b.clone()], &["--set", "alpha=7"], &out), "`alpha`"),
        (f.args("ties+surgery", &[a.clone(), b.clone()], &["--set", "rank=4"], &out), "`rank`"),
    ];
    for (args, want) in cases {
        let (code, _, stderr) = run_cli(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{want:?} not in: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
        assert!(!out.exists() && !f.root.join("m.task0.safetensors").exists(), "nothing written");
    }
    // Without --tasks and with non-mini specs the heads cannot be matched.
    let mut args = f.args("fisher", &[a.clone(), b.clone()], &[], &out);
    let i = args.iter().position(|x| x == "--tasks").unwrap();
    args.drain(i..i + 3);
    let (code, _, stderr) = run_cli(&args);
    assert_eq!(code, 2);
    assert!(stderr.contains("--tasks"), "{stderr}");
}
