//! The CLIP graphs reproduce `transformers.CLIPModel` (float64 reference outputs committed in
//! tests/fixtures/clip_tiny/, made by scripts/clip_reference/make_fixture.py) to 1e-4 relative.
//!
//! `CLIP_REFERENCE_DIR=/path cargo test --test clip_reference -- --ignored` checks another
//! reference directory made by the same script (e.g. `--full`, ViT-B/32 sizes) and prints the
//! maximum errors.

use std::path::{Path, PathBuf};

use mergeattack_core::classifier::Classifier;
use mergeattack_onnx::clip::text::TextModel;
use mergeattack_onnx::clip::tokenizer::ClipTokenizer;
use mergeattack_onnx::runtime::{Model, RuntimeOptions};
use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_tiny")
}

/// The reference tensors (f32 as f32, i64 converted to f32 for ids/labels is avoided: kept apart).
struct Reference {
    f32s: std::collections::BTreeMap<String, ArrayD<f32>>,
    i64s: std::collections::BTreeMap<String, ArrayD<i64>>,
    meta: serde_json::Value,
}

fn reference(dir: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let (mut f32s, mut i64s) = (Default::default(), Default::default());
    for (name, view) in st.tensors() {
        let shape = IxDyn(view.shape());
        match view.dtype() {
            Dtype::F32 => {
                let v = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                f32s_insert(&mut f32s, name, ArrayD::from_shape_vec(shape, v).unwrap());
            }
            Dtype::I64 => {
                let v = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                i64s_insert(&mut i64s, name, ArrayD::from_shape_vec(shape, v).unwrap());
            }
            d => panic!("unexpected dtype {d:?} for {name}"),
        }
    }
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    Reference { f32s, i64s, meta }
}

fn f32s_insert(m: &mut std::collections::BTreeMap<String, ArrayD<f32>>, k: String, v: ArrayD<f32>) {
    m.insert(k, v);
}
fn i64s_insert(m: &mut std::collections::BTreeMap<String, ArrayD<i64>>, k: String, v: ArrayD<i64>) {
    m.insert(k, v);
}

/// Max |got - want| relative to max |want|; asserts it is <= tol and returns it.
fn check(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f64) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs())).max(1e-12);
    let err = got.iter().zip(want).fold(0f64, |m, (&a, &b)| m.max((f64::from(a) - f64::from(b)).abs()));
    let rel = err / scale;
    println!("{what}: max abs error {err:.3e}, relative {rel:.3e} (scale {scale:.3e})");
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.1e}");
    rel
}

fn text_checks(dir: &Path, tol: f64) {
    let r = reference(dir);
    let opts = RuntimeOptions::default();
    let mut text = TextModel::load(&dir.join("model.safetensors"), None, &opts).expect("text model");
    let ids = r.i64s["text_ids"].view().into_dimensionality().unwrap();
    let emb = text.embed(ids).unwrap().into_dyn();
    check("text_embeds", &emb, &r.f32s["text_embeds"], tol);

    let ctx = r.meta["context_length"].as_u64().unwrap() as usize;
    let tok = ClipTokenizer::from_file(&dir.join("tokenizer.json"), ctx).unwrap();
    let strs = |k: &str| -> Vec<String> {
        r.meta[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    // Our tokenizer gives the ids the reference embedded.
    let ours = tok.encode_batch(&strs("prompts")).unwrap().into_dyn();
    assert_eq!(ours, r.i64s["text_ids"]);
    let head = text.zeroshot_head(&tok, &strs("classes"), &strs("templates")).unwrap().into_dyn();
    check("zeroshot_head", &head, &r.f32s["zeroshot_head"], tol);
}

fn vision_checks(dir: &Path, tol: f64, batch_size: usize) {
    let r = reference(dir);
    let opts = RuntimeOptions { batch_size, ..Default::default() };
    let heads = dir.join("heads.safetensors");
    let mut m = Model::load(&dir.join("model.safetensors"), None, None, &heads, Some("random"), opts).unwrap();
    let x = r.f32s["pixels"].view().into_dimensionality().unwrap();
    let labels: Vec<usize> = r.i64s["labels"].iter().map(|&l| l as usize).collect();
    let (logits, feats) = m.forward(x).unwrap();
    check("logits", &logits.into_dyn(), &r.f32s["logits"], tol);
    check("features", &feats.into_dyn(), &r.f32s["features"], tol);
    let lg = m.loss_grad(x, &labels).unwrap();
    check("loss_grad.logits", &lg.logits.into_dyn(), &r.f32s["logits"], tol);
    check("loss", &lg.loss.into_dyn(), &r.f32s["loss"], tol);
    check("dx", &lg.grad.into_dyn(), &r.f32s["dx"], tol);
    let dl = r.f32s["dlogits"].view().into_dimensionality().unwrap();
    let (_, vjp) = m.logits_vjp(x, dl).unwrap();
    check("vjp_dx", &vjp.into_dyn(), &r.f32s["vjp_dx"], tol);
    let strs = |k: &str| -> Vec<String> {
        r.meta[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    let gnames = strs("grads");
    let sel: Vec<&str> = gnames.iter().map(String::as_str).collect();
    let (total, grads) = m.weight_grads(x, &labels, Some(&sel)).unwrap();
    let want_total: f64 = r.f32s["loss"].iter().map(|&v| f64::from(v)).sum();
    assert!((total - want_total).abs() <= tol * want_total.abs().max(1.0), "summed loss {total} vs {want_total}");
    assert_eq!(grads.len(), sel.len());
    for (name, g) in &grads {
        check(name, g, &r.f32s[name.as_str()], tol);
    }
    let grams = m.grams(x).unwrap();
    for name in strs("grams") {
        let key = format!("gram.{name}");
        let got = &grams.iter().find(|(n, _)| *n == key).unwrap_or_else(|| panic!("no {key}")).1;
        check(&key, got, &r.f32s[&key], tol);
    }
}

#[test]
fn tiny_vision_tower_matches_transformers() {
    // Batch size 3 for 4 images: the split into runs is exercised too.
    vision_checks(&fixture(), 1e-4, 3);
}

#[test]
fn tiny_text_tower_and_zeroshot_heads_match_transformers() {
    text_checks(&fixture(), 1e-4);
}

/// A reference made with `make_fixture.py --full -o DIR` (not committed: ~600 MB).
#[test]
#[ignore = "needs CLIP_REFERENCE_DIR from scripts/clip_reference/make_fixture.py --full"]
fn full_size_reference_from_env() {
    let dir = PathBuf::from(std::env::var("CLIP_REFERENCE_DIR").expect("set CLIP_REFERENCE_DIR"));
    vision_checks(&dir, 1e-4, 32);
    text_checks(&dir, 1e-4);
}
