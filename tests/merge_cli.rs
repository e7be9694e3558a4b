//! `mergeattack merge` / `methods` / `demo` through the real binary: a successful merge in flag
//! form and in YAML form (identical tensors, checked against an independent f64 computation), and
//! one test per bad input, each asserting exit code 2, a one-line message naming the culprit and
//! that no output (nor a temporary file) is left behind.

use std::path::{Path, PathBuf};

use mergeattack_harness::synth::{self, SynthConfig};
use mergeattack_onnx::weights::{self, Checkpoint, Dtype, Writer};
use mergeattack_suite::run_cli;
use ndarray::{ArrayD, IxDyn};

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    models: Vec<PathBuf>,
}

impl Fixture {
    fn new(tasks: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (base, models) = synth::write_set(dir.path(), &SynthConfig::tiny(), tasks, 11, 0.05).unwrap();
        Fixture { dir, base, models }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(p: &Path) -> String {
        p.display().to_string()
    }
    /// `merge --method M --base B --models ... -o OUT` plus `extra`.
    fn merge_args(&self, method: &str, models: &[PathBuf], out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a = vec!["merge".into(), "--method".into(), method.into(), "--base".into(), Self::s(&self.base)];
        if !models.is_empty() {
            a.push("--models".into());
            a.extend(models.iter().map(|m| Self::s(m)));
        }
        a.extend(["-o".into(), Self::s(out)]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }
    /// No output and no temporary file in the fixture directory.
    fn assert_nothing_written(&self, out: &Path) {
        assert!(!out.exists(), "{} was left behind", out.display());
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(".mergeattack-tmp-"), "temporary file {name} left behind");
            assert!(!name.contains(".task"), "per-task output {name} left behind");
        }
    }
    /// Write a copy of model 0 with tensor `name` replaced as `file`; returns its path.
    fn variant(&self, file: &str, name: &str, with: Replace) -> PathBuf {
        let src = Checkpoint::open(&self.models[0]).unwrap();
        let mut params = src.params().unwrap();
        params.remove(name);
        let mut w = Writer::new();
        w.params(&params, Dtype::F32);
        for n in src.non_float_names() {
            let (d, s, b) = src.raw(n).unwrap();
            w.raw(n, d, s, b);
        }
        match &with {
            Replace::Float(a) => w.float(name, a.view(), Dtype::F32),
            Replace::Raw(d, shape, bytes) => w.raw(name, *d, shape, bytes),
        };
        let p = self.path(file);
        w.write(&p).unwrap();
        p
    }
}

enum Replace {
    Float(ArrayD<f32>),
    Raw(Dtype, Vec<usize>, Vec<u8>),
}

fn registered(method: &str) -> bool {
    let ok = mergeattack_core::merge::lookup(method).is_ok();
    if !ok {
        eprintln!("note: `{method}` is not in the registry yet; this check is skipped");
    }
    ok
}

/// Assert a failure: exit 2, one line `error: ...` containing every `culprits` string.
fn assert_fails(args: &[String], culprits: &[&str]) -> String {
    let (code, stdout, stderr) = run_cli(args);
    assert_eq!(code, 2, "expected exit code 2; stdout: {stdout}; stderr: {stderr}");
    let msg = stderr.trim_end();
    assert_eq!(msg.lines().count(), 1, "expected one line, got: {msg}");
    assert!(msg.starts_with("error: "), "{msg}");
    for c in culprits {
        assert!(msg.contains(c), "message does not name `{c}`: {msg}");
    }
    assert!(!msg.contains("panicked"), "{msg}");
    msg.to_string()
}

fn tensors(path: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let c = Checkpoint::open(path).unwrap();
    c.entries()
        .map(|(n, _)| {
            let (d, s, b) = c.raw(n).unwrap();
            (n.to_string(), d, s.to_vec(), b.to_vec())
        })
        .collect()
}

fn values(c: &Checkpoint, name: &str) -> Vec<f32> {
    c.tensor(name).unwrap().unwrap().iter().copied().collect()
}

#[test]
fn flag_and_yaml_forms_give_identical_tensors_and_the_right_values() {
    let f = Fixture::new(3);
    let flag_out = f.path("flag.safetensors");
    let (code, stdout, stderr) =
        run_cli(f.merge_args("weight-average", &f.models, &flag_out, &["--weights", "1", "2", "1/2"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("weight-average") && stdout.contains("merged"), "{stdout}");

    std::fs::create_dir(f.path("cfg")).unwrap();
    let yaml = f.path("cfg/merge.yaml");
    std::fs::write(
        &yaml,
        "merge_method: linear\nbase_model: ../pretrained.safetensors\nmodels:\n  - model: ../finetuned-0.safetensors\n    parameters: {weight: 1}\n  - model: ../finetuned-1.safetensors\n    parameters: {weight: 2.0}\n  - model: ../finetuned-2.safetensors\n    parameters: {weight: 0.5}\n",
    )
    .unwrap();
    let yaml_out = f.path("yaml.safetensors");
    let (code, _, stderr) = run_cli(["merge", "--config", &Fixture::s(&yaml), "-o", &Fixture::s(&yaml_out)]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(tensors(&flag_out), tensors(&yaml_out));

    // Independent f64 reference: sum_t w_t theta_t / sum_t w_t on merged tensors, the base elsewhere.
    let out = Checkpoint::open(&flag_out).unwrap();
    let base = Checkpoint::open(&f.base).unwrap();
    let fts: Vec<Checkpoint> = f.models.iter().map(|m| Checkpoint::open(m).unwrap()).collect();
    let w = [1.0f64, 2.0, 0.5];
    for (name, _) in base.entries() {
        if name.ends_with("position_ids") {
            assert_eq!(out.raw(name).unwrap(), base.raw(name).unwrap());
            continue;
        }
        let got = values(&out, name);
        if !name.starts_with("vision_model.") {
            assert_eq!(got, values(&base, name), "`{name}` must be copied from the base");
            continue;
        }
        let cols: Vec<Vec<f32>> = fts.iter().map(|c| values(c, name)).collect();
        for (i, g) in got.iter().enumerate() {
            let want = (0..3).map(|t| w[t] * f64::from(cols[t][i])).sum::<f64>() / 3.5;
            assert!((f64::from(*g) - want).abs() <= 1e-6, "`{name}`[{i}]: {g} vs {want}");
        }
    }
    let meta = out.metadata();
    assert_eq!(meta.get("mergeattack.method").map(String::as_str), Some("weight-average"));
    assert!(meta.get("mergeattack.inputs").unwrap().contains(&base.sha256()));
    // --dtype bf16 stores every float tensor as BF16 and keeps position_ids as I64.
    let bf = f.path("bf16.safetensors");
    let (code, _, stderr) =
        run_cli(f.merge_args("weight-average", &f.models, &bf, &["--dtype", "bf16", "--set", "tensors=all"]));
    assert_eq!(code, 0, "{stderr}");
    let c = Checkpoint::open(&bf).unwrap();
    assert_eq!(c.dtype("logit_scale"), Some(Dtype::BF16));
    assert_eq!(c.dtype("vision_model.embeddings.position_ids"), Some(Dtype::I64));
}

/// Tensor-parallel merging changes nothing: the same output bytes on 1 and 3 threads, for
/// tensorwise methods (merged per tensor on threads) and a global one (one call whatever --threads).
#[test]
fn thread_count_does_not_change_the_output() {
    let f = Fixture::new(3);
    for (method, extra) in [("tsv-m", &[][..]), ("consensus", &[][..]), ("ties", &["--set", "scope=tensor"][..])] {
        let files: Vec<Vec<u8>> = ["1", "3"]
            .iter()
            .map(|th| {
                let out = f.path(&format!("{method}-{th}.safetensors"));
                let mut args = f.merge_args(method, &f.models, &out, extra);
                args.extend(["--threads".to_string(), th.to_string()]);
                let (code, _, stderr) = run_cli(args);
                assert_eq!(code, 0, "{method} --threads {th}: {stderr}");
                std::fs::read(&out).unwrap()
            })
            .collect();
        assert!(files[0] == files[1], "{method}: --threads 1 and 3 wrote different files");
    }
}

#[test]
fn per_task_methods_write_one_file_per_task() {
    let f = Fixture::new(3);
    for method in ["emr", "tall-masks"] {
        if !registered(method) {
            continue;
        }
        let out = f.path(&format!("{method}.safetensors"));
        let (code, stdout, stderr) = run_cli(f.merge_args(method, &f.models, &out, &[]));
        assert_eq!(code, 0, "{stderr}");
        assert!(!out.exists());
        for t in 0..3 {
            let p = f.path(&format!("{method}.task{t}.safetensors"));
            assert!(stdout.contains(&Fixture::s(&p)), "{stdout}");
            let c = Checkpoint::open(&p).unwrap();
            assert_eq!(c.metadata().get("mergeattack.task").map(String::as_str), Some(&*t.to_string()));
        }
    }
}

#[test]
fn methods_lists_the_registry_and_demo_merges_with_every_method() {
    let (code, stdout, _) = run_cli(["methods"]);
    assert_eq!(code, 0);
    for m in mergeattack_core::merge::registry() {
        assert!(stdout.contains(m.name()), "{} missing from:\n{stdout}", m.name());
        for p in m.params() {
            assert!(stdout.contains(&format!("{}={}", p.name, p.default)), "{stdout}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let (code, stdout, stderr) = run_cli(["demo", "--out", &Fixture::s(&out)]);
    assert_eq!(code, 0, "{stderr}");
    for m in mergeattack_core::merge::registry() {
        assert!(stdout.lines().any(|l| l.starts_with(m.name())), "{} missing from:\n{stdout}", m.name());
    }
    assert!(out.join("pretrained.safetensors").exists());
}

#[test]
fn missing_file() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let missing = f.path("no-such-model.safetensors");
    assert_fails(
        &f.merge_args("weight-average", &[f.models[0].clone(), missing], &out, &[]),
        &["no-such-model.safetensors"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn unreadable_or_corrupt_file() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let bad = f.path("corrupt.safetensors");
    std::fs::write(&bad, b"PK\x03\x04 this is a zip file, not safetensors").unwrap();
    assert_fails(&f.merge_args("weight-average", &[f.models[0].clone(), bad], &out, &[]), &["corrupt.safetensors"]);
    let dir_as_file = f.path("adir.safetensors");
    std::fs::create_dir(&dir_as_file).unwrap();
    assert_fails(&f.merge_args("weight-average", &[dir_as_file], &out, &[]), &["adir.safetensors"]);
    f.assert_nothing_written(&out);
}

#[test]
fn truncated_safetensors() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let bytes = std::fs::read(&f.models[1]).unwrap();
    let cut = f.path("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&f.merge_args("ties", &[f.models[0].clone(), cut], &out, &[]), &["cut.safetensors", "truncated"]);
    f.assert_nothing_written(&out);
}

#[test]
fn tensor_missing_in_one_model() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let name = "vision_model.encoder.layers.1.mlp.fc2.bias";
    let p = f.path("lacking.safetensors");
    let src = Checkpoint::open(&f.models[0]).unwrap();
    let mut params = src.params().unwrap();
    assert!(params.remove(name).is_some());
    weights::save(&p, &params, &[]).unwrap();
    assert_fails(
        &f.merge_args("task-arithmetic", &[f.models[1].clone(), p], &out, &[]),
        &[name, "lacking.safetensors"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn shape_mismatch() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    let reshaped = ArrayD::<f32>::zeros(IxDyn(&[64, 256]));
    let p = f.variant("reshaped.safetensors", name, Replace::Float(reshaped));
    assert_fails(
        &f.merge_args("ties", &[f.models[1].clone(), p], &out, &[]),
        &[name, "[64, 256]", "[256, 64]", "reshaped.safetensors"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn non_float_tensor_where_a_float_is_merged() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let name = "vision_model.post_layernorm.bias";
    let ints = vec![0u8; 64 * 4];
    let p = f.variant("ints.safetensors", name, Replace::Raw(Dtype::I32, vec![64], ints));
    assert_fails(
        &f.merge_args("weight-average", &[f.models[1].clone(), p], &out, &[]),
        &[name, "I32", "ints.safetensors"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn nan_in_an_input() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let name = "vision_model.embeddings.class_embedding";
    let src = Checkpoint::open(&f.models[0]).unwrap();
    let mut t = src.tensor(name).unwrap().unwrap().into_owned();
    t[[5]] = f32::NAN;
    let p = f.variant("nan.safetensors", name, Replace::Float(t));
    assert_fails(
        &f.merge_args("task-arithmetic", &[f.models[1].clone(), p], &out, &[]),
        &[name, "nan.safetensors", "index 5"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn unknown_method() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let msg = assert_fails(&f.merge_args("frobnicate", &f.models, &out, &[]), &["frobnicate"]);
    assert!(msg.contains("weight-average"), "should list the known methods: {msg}");
    f.assert_nothing_written(&out);
}

#[test]
fn unknown_parameter() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    assert_fails(&f.merge_args("task_arithmetic", &f.models, &out, &["--set", "lamda=0.3"]), &["lamda"]);
    assert_fails(&f.merge_args("ties", &f.models, &out, &["--set", "tensors=text"]), &["tensors", "text"]);
    f.assert_nothing_written(&out);
}

#[test]
fn out_of_range_values() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    for k in ["1.5", "0", "-0.1"] {
        assert_fails(&f.merge_args("ties", &f.models, &out, &["--set", &format!("k={k}")]), &["`k`"]);
    }
    if registered("dare") {
        for p in ["1", "1.0", "-0.2"] {
            assert_fails(&f.merge_args("dare", &f.models, &out, &["--set", &format!("p={p}")]), &["`p`"]);
        }
    }
    f.assert_nothing_written(&out);
}

#[test]
fn slerp_with_three_models() {
    if !registered("slerp") {
        return;
    }
    let f = Fixture::new(3);
    let out = f.path("out.safetensors");
    assert_fails(&f.merge_args("slerp", &f.models, &out, &[]), &["slerp", "3"]);
    f.assert_nothing_written(&out);
}

#[test]
fn zero_fine_tuned_models() {
    let f = Fixture::new(1);
    let out = f.path("out.safetensors");
    assert_fails(&f.merge_args("task-arithmetic", &[], &out, &[]), &["no fine-tuned models"]);
    let yaml = f.path("empty.yaml");
    std::fs::write(&yaml, "merge_method: ties\nbase_model: pretrained.safetensors\nmodels: []\n").unwrap();
    assert_fails(
        &["merge".into(), "--config".into(), Fixture::s(&yaml), "-o".into(), Fixture::s(&out)],
        &["no fine-tuned models"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn bad_yaml_key() {
    let f = Fixture::new(2);
    let out = f.path("out.safetensors");
    let yaml = f.path("bad.yaml");
    std::fs::write(
        &yaml,
        "merge_method: ties\nbase_model: pretrained.safetensors\nmodels:\n  - model: finetuned-0.safetensors\n  - model: finetuned-1.safetensors\nparameter:\n  k: 0.2\n",
    )
    .unwrap();
    assert_fails(
        &["merge".into(), "--config".into(), Fixture::s(&yaml), "-o".into(), Fixture::s(&out)],
        &["`parameter`", "bad.yaml"],
    );
    f.assert_nothing_written(&out);
}

#[test]
fn output_that_is_an_input_is_refused() {
    let f = Fixture::new(2);
    let before = std::fs::read(&f.models[0]).unwrap();
    assert_fails(&f.merge_args("weight-average", &f.models, &f.models[0], &[]), &["finetuned-0.safetensors"]);
    assert_eq!(std::fs::read(&f.models[0]).unwrap(), before);
}
