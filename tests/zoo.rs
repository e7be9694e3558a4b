//! `mergeattack zoo build --reduced` end to end (needs the mini-suite cache: `scripts/test.sh`
//! runs `mergeattack setup` first): the layout of a CLIP pool, bitwise determinism across two
//! builds, the cache hit on a rerun, fine-tuning beating pretrained+head, reuse of a matching
//! pretrained encoder (and refusal of another), and a bad config named.

use std::path::Path;

use mergeattack_suite::run_cli;

fn build(out: &Path) -> (i32, String, String) {
    run_cli(["zoo", "build", "--reduced", "--out", out.to_str().unwrap()])
}

fn files(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in walk(dir) {
        v.push(e.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
    }
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn reduced_zoo_is_deterministic_cached_and_fine_tuning_helps() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (code, stdout, stderr) = build(&a);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Regime:") && stdout.contains("Forgetting matrix"), "{stdout}");

    // Layout of a real CLIP pool.
    let tasks = ["digits", "fashion-coarse", "textures"];
    let got = files(&a);
    let mut want = vec!["heads.safetensors", "summary.json", "summary.md", "times.json"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    want.extend(["pretrained/config.json".into(), "pretrained/model.safetensors".into()]);
    for role in ["finetuned", "reference"] {
        for t in tasks {
            want.push(format!("{role}/{t}/config.json"));
            want.push(format!("{role}/{t}/model.safetensors"));
        }
    }
    want.sort();
    assert_eq!(got, want);
    // The pieces load as what they claim to be: heads per task, weights with the config.
    let heads = mergeattack_onnx::weights::Checkpoint::open(a.join("heads.safetensors")).unwrap();
    let hp = heads.params().unwrap();
    assert_eq!(hp.names().collect::<Vec<_>>(), vec!["digits", "fashion-coarse", "textures"]);
    assert_eq!(hp.get("digits").unwrap().shape(), &[10, 64]);
    assert_eq!(hp.get("fashion-coarse").unwrap().shape(), &[4, 64]);
    let cfg = mergeattack_onnx::clip::ClipVisionConfig::from_file(&a.join("pretrained/config.json")).unwrap();
    assert_eq!(
        (cfg.image_size, cfg.patch_size, cfg.projection_dim, cfg.hidden_act.as_str()),
        (32, 8, 64, "quick_gelu")
    );
    let v = mergeattack_onnx::runtime::VisionWeights::load(&a.join("finetuned/digits"), None, None).unwrap();
    assert_eq!(v.config, cfg);

    // Fine-tuning beats pretrained+head on every task of the reduced zoo.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    for row in summary["rows"].as_array().unwrap() {
        let (pt, ft) = (row["pretrained_head"].as_f64().unwrap(), row["finetuned"].as_f64().unwrap());
        assert!(ft > pt, "{}: fine-tuned {ft} vs pretrained+head {pt}", row["task"]);
    }
    assert_eq!(summary["forgetting"].as_array().unwrap().len(), 3);

    // A rerun into the same directory finds it and returns at once.
    let t = std::time::Instant::now();
    let (code, stdout, stderr) = build(&a);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("already built"), "{stdout}");
    assert!(t.elapsed().as_secs() < 20);

    // A second build elsewhere: the same bytes, file by file (timings live in times.json).
    let (code, _, stderr) = build(&b);
    assert_eq!(code, 0, "{stderr}");
    for f in files(&a).iter().filter(|f| f.as_str() != "times.json" && f.as_str() != "summary.md") {
        let (x, y) = (std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
        assert!(x == y, "{f} differs between two builds");
    }

    reuses_a_matching_pretrained_encoder_and_refuses_another(tmp.path(), &a);
}

/// Reusing the pretrained encoder of the finished zoo `a` (shares its build with the test above).
fn reuses_a_matching_pretrained_encoder_and_refuses_another(tmp: &Path, a: &Path) {
    // Other fine-tuning settings, same pretraining: the encoder is reused byte for byte.
    let ft = tmp.join("ft.toml");
    std::fs::write(&ft, "finetune_steps = 5\nfinetune_warmup = 1\nfinetune_eval_every = 2\n").unwrap();
    let c = tmp.join("c");
    let args = |cfg: &Path, out: &Path| {
        let v: Vec<String> = ["zoo", "build", "--reduced", "--config", cfg.to_str().unwrap(), "--out"]
            .into_iter()
            .map(String::from)
            .chain([out.to_str().unwrap().to_string(), "--pretrained-from".into(), a.to_str().unwrap().into()])
            .collect();
        v
    };
    let (code, _, stderr) = run_cli(args(&ft, &c));
    assert_eq!(code, 0, "{stderr}");
    let p = "pretrained/model.safetensors";
    assert!(std::fs::read(a.join(p)).unwrap() == std::fs::read(c.join(p)).unwrap(), "reused encoder differs");
    let times = std::fs::read_to_string(c.join("times.json")).unwrap();
    assert!(times.contains("pretraining (reused)"), "{times}");
    let sa = std::fs::read_to_string(a.join("summary.json")).unwrap();
    let sc = std::fs::read_to_string(c.join("summary.json")).unwrap();
    let first_last =
        |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["pretrain_loss_first_last"].clone();
    assert_eq!(first_last(&sa), first_last(&sc));
    // Early stopping checked steps 2, 4 and 5 and kept one of them, for every model.
    let kept = serde_json::from_str::<serde_json::Value>(&sc).unwrap()["finetune_kept_steps"].clone();
    let kept = kept.as_array().unwrap();
    assert_eq!(kept.len(), 3);
    for k in kept {
        for i in [1, 2] {
            assert!([2, 4, 5].contains(&k[i].as_u64().unwrap()), "{k}");
        }
    }
    // Fewer fine-tuned tasks over the same pretraining pool: the encoder is reused, only the
    // listed tasks are fine-tuned and reported.
    let sub = tmp.join("sub.toml");
    std::fs::write(
        &sub,
        "tasks = [\"textures\", \"digits\"]\npretrain_tasks = [\"digits\", \"fashion-coarse\", \"textures\"]\nfinetune_steps = 3\nfinetune_warmup = 1\n",
    )
    .unwrap();
    let e = tmp.join("e");
    let (code, stdout, stderr) = run_cli(args(&sub, &e));
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read(a.join(p)).unwrap() == std::fs::read(e.join(p)).unwrap(), "reused encoder differs");
    assert!(stdout.contains("pooled from digits, fashion-coarse, textures"), "{stdout}");
    let se: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(e.join("summary.json")).unwrap()).unwrap();
    let names: Vec<&str> = se["rows"].as_array().unwrap().iter().map(|r| r["task"].as_str().unwrap()).collect();
    assert_eq!(names, ["textures", "digits"]);
    assert!(!e.join("finetuned/fashion-coarse").exists());
    let heads = mergeattack_onnx::weights::Checkpoint::open(e.join("heads.safetensors")).unwrap();
    assert_eq!(heads.params().unwrap().names().collect::<Vec<_>>(), vec!["digits", "textures"]);

    // Other pretraining settings: refused, the file named, nothing written.
    let pt = tmp.join("pt.toml");
    std::fs::write(&pt, "pretrain_steps = 3\n").unwrap();
    let d = tmp.join("d");
    let (code, _, stderr) = run_cli(args(&pt, &d));
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("model.safetensors") && stderr.contains("other settings"),
        "{stderr}"
    );
    assert!(!d.exists());
}

#[test]
fn bad_zoo_config_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("zoo.toml");
    std::fs::write(&cfg, "finetune = \"some\"\n").unwrap();
    let out = tmp.path().join("z");
    let (code, _, stderr) =
        run_cli(["zoo", "build", "--reduced", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.starts_with("error: ") && stderr.contains("some"), "{stderr}");
    assert!(!out.exists());
    let (code, _, stderr) = run_cli(["zoo", "build", "--tasks", "cifar", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("cifar"), "{stderr}");
    assert!(!out.exists());
}
