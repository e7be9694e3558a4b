//! Golden outputs of every registry merge method at its defaults.
//!
//! A deterministic example (a base and 3 fine-tuned checkpoints, 8 HF-named tensors, 341 entries
//! each, plus a `logit_scale` that must be copied) is written to safetensors, merged through
//! `merge_files` (the code behind `mergeattack merge`), and every tensor of every output file is
//! compared with `tests/golden/merge/<method>.json` (f32 bit patterns; equal bits or within 1e-6).
//!
//! A method without a committed golden fails this test on purpose. To create or regenerate the
//! goldens (only when a change of output is intended), run:
//!
//!     UPDATE_GOLDEN=1 cargo test -p mergeattack-suite --test merge_golden
//!
//! and review the diff of `tests/golden/merge/` before committing it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergeattack_core::merge::{MergeError, Params, registry};
use mergeattack_core::rng;
use mergeattack_core::tensor::ParamSet;
use mergeattack_harness::commands::merge::{MergeCmdError, merge_files};
use mergeattack_harness::mergeconfig::MergeSpec;
use mergeattack_onnx::weights::{Checkpoint, OutDtype, save};
use ndarray::{ArrayD, IxDyn};
use rand::RngExt;
use serde_json::{Value, json};

const SHAPES: &[(&str, &[usize])] = &[
    ("logit_scale", &[]),
    ("vision_model.embeddings.class_embedding", &[6]),
    ("vision_model.embeddings.patch_embedding.weight", &[6, 3, 2, 2]),
    ("vision_model.embeddings.position_embedding.weight", &[5, 6]),
    ("vision_model.encoder.layers.0.layer_norm1.weight", &[6]),
    ("vision_model.encoder.layers.0.mlp.fc1.bias", &[8]),
    ("vision_model.encoder.layers.0.mlp.fc1.weight", &[8, 6]),
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", &[6, 6]),
    ("visual_projection.weight", &[4, 6]),
];

fn draw(role: &str, name: &str, n: usize, scale: f32) -> Vec<f32> {
    let mut r = rng::stream(2024, &[b"golden", role.as_bytes(), name.as_bytes()]);
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// Write the base and 3 fine-tuned checkpoints into `dir`.
fn inputs(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let mut base = ParamSet::new();
    for (name, shape) in SHAPES {
        let n = shape.iter().product();
        let v = if *name == "logit_scale" { vec![100f32.ln()] } else { draw("base", name, n, 0.5) };
        base.insert_owned(*name, ArrayD::from_shape_vec(IxDyn(shape), v).unwrap());
    }
    let bp = dir.join("base.safetensors");
    save(&bp, &base, &[]).unwrap();
    let mut models = Vec::new();
    for t in 0..3 {
        let mut m = ParamSet::new();
        for (name, t0) in base.iter() {
            let mut a = t0.to_owned();
            if name.starts_with("vision_model.") {
                let tau = draw(&format!("task{t}"), name, a.len(), 0.05);
                a.iter_mut().zip(tau).for_each(|(x, d)| *x += d);
            }
            m.insert_owned(name, a);
        }
        let p = dir.join(format!("ft{t}.safetensors"));
        save(&p, &m, &[]).unwrap();
        models.push(p);
    }
    (bp, models)
}

fn golden_path(method: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/merge").join(format!("{method}.json"))
}

/// Every tensor of a file as {name: {shape, bits}}.
fn snapshot(path: &Path) -> Value {
    let c = Checkpoint::open(path).unwrap();
    let mut m = BTreeMap::new();
    for name in c.float_names() {
        let t = c.tensor(name).unwrap().unwrap();
        let bits: Vec<u32> = t.iter().map(|v| v.to_bits()).collect();
        m.insert(name.to_string(), json!({"shape": t.shape(), "bits": bits}));
    }
    json!(m)
}

fn compare(method: &str, got: &Value, want: &Value) -> Result<(), String> {
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    let gk: Vec<&String> = g.keys().collect();
    let wk: Vec<&String> = w.keys().collect();
    if gk != wk {
        return Err(format!("{method}: tensor names differ: {gk:?} vs golden {wk:?}"));
    }
    for (name, gv) in g {
        let wv = &w[name];
        if gv["shape"] != wv["shape"] {
            return Err(format!("{method}: `{name}` shape {} vs golden {}", gv["shape"], wv["shape"]));
        }
        let gb = gv["bits"].as_array().unwrap();
        let wb = wv["bits"].as_array().unwrap();
        for (i, (a, b)) in gb.iter().zip(wb).enumerate() {
            let a = f32::from_bits(a.as_u64().unwrap() as u32);
            let b = f32::from_bits(b.as_u64().unwrap() as u32);
            if a.to_bits() != b.to_bits() && (a - b).abs() > 1e-6 {
                return Err(format!("{method}: `{name}`[{i}] = {a} but the golden value is {b}"));
            }
        }
    }
    Ok(())
}

#[test]
fn every_registry_method_matches_its_golden_output() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir().unwrap();
    let (base, models) = inputs(dir.path());
    let mut failures = Vec::new();
    for m in registry() {
        let out = dir.path().join(format!("{}.safetensors", m.name()));
        let mut spec = MergeSpec {
            method: m.name().into(),
            base: base.clone(),
            models: models.clone(),
            weights: None,
            params: Params::new(),
            dtype: OutDtype::F32,
        };
        let report = match merge_files(&spec, &out) {
            Err(MergeCmdError::Merge(MergeError::ModelCount { .. })) => {
                spec.models.truncate(2); // two-model methods (slerp) merge the first two
                merge_files(&spec, &out)
            }
            r => r,
        }
        .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        // The copied tensor is the base's, bit for bit.
        for o in &report.outputs {
            let (c, b) = (Checkpoint::open(o).unwrap(), Checkpoint::open(&base).unwrap());
            assert_eq!(c.raw("logit_scale").unwrap(), b.raw("logit_scale").unwrap());
        }
        let got = json!({
            "method": m.name(),
            "models": spec.models.len(),
            "outputs": report.outputs.iter().map(|p| snapshot(p)).collect::<Vec<_>>(),
        });
        let path = golden_path(m.name());
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, serde_json::to_string(&got).unwrap() + "\n").unwrap();
            eprintln!("wrote {}", path.display());
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            failures.push(format!(
                "{}: no golden output at {}; create it on purpose with `UPDATE_GOLDEN=1 cargo test -p mergeattack-suite --test merge_golden` and review it",
                m.name(),
                path.display()
            ));
            continue;
        };
        let want: Value = serde_json::from_str(&text).unwrap();
        if want["models"] != got["models"] || want["outputs"].as_array().unwrap().len() != report.outputs.len() {
            failures.push(format!("{}: model or output count differs from the golden", m.name()));
            continue;
        }
        for (g, w) in got["outputs"].as_array().unwrap().iter().zip(want["outputs"].as_array().unwrap()) {
            if let Err(e) = compare(m.name(), g, w) {
                failures.push(e);
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
