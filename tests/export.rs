//! `mergeattack export` end to end: the tiny reference model is exported through the real binary,
//! run with a fresh ONNX Runtime session, and gives the logits of the tool's own session (and of
//! transformers); bad input gives exit code 2, one sentence, and no file.

use std::path::{Path, PathBuf};

use mergeattack_onnx::export::run_exported;
use mergeattack_onnx::runtime::{Model, RuntimeOptions};
use mergeattack_suite::run_cli;
use ndarray::{Array4, ArrayD, IxDyn};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_tiny")
}

fn reference_f32(name: &str) -> ArrayD<f32> {
    let bytes = std::fs::read(fixture().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    ArrayD::from_shape_vec(IxDyn(t.shape()), v).unwrap()
}

#[test]
fn exported_model_gives_the_tools_logits() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny.onnx");
    let (code, stdout, stderr) = run_cli([
        "export".as_ref(),
        "--model".as_ref(),
        dir.join("model.safetensors").as_os_str(),
        "--head".as_ref(),
        dir.join("heads.safetensors").as_os_str(),
        "--task".as_ref(),
        "random".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("5 classes"), "{stdout}");
    let x: Array4<f32> = reference_f32("pixels").into_dimensionality().unwrap();
    let (logits, features) = run_exported(&out, x.view(), 2).unwrap();
    let mut m = Model::load(
        &dir.join("model.safetensors"),
        None,
        None,
        &dir.join("heads.safetensors"),
        Some("random"),
        RuntimeOptions::default(),
    )
    .unwrap();
    let (want_l, want_f) = m.forward(x.view()).unwrap();
    assert_eq!(logits, want_l, "same graph, same weights: bitwise-equal logits");
    assert_eq!(features, want_f);
    // And transformers' float64 logits to 1e-4 relative.
    let r = reference_f32("logits");
    let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = logits.iter().zip(r.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-4 * scale, "max error {err} vs scale {scale}");
}

#[test]
fn bad_export_inputs_are_one_sentence_and_leave_nothing() {
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.onnx");
    let model = dir.join("model.safetensors");
    let heads = dir.join("heads.safetensors");
    let missing = tmp.path().join("nope.safetensors");
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            vec![
                "--model".as_ref(),
                model.as_os_str(),
                "--head".as_ref(),
                heads.as_os_str(),
                "--task".as_ref(),
                "cars".as_ref(),
            ],
            "no head for task `cars`",
        ),
        (vec!["--model".as_ref(), missing.as_os_str(), "--head".as_ref(), heads.as_os_str()], "nope.safetensors"),
        (vec!["--model".as_ref(), heads.as_os_str(), "--head".as_ref(), heads.as_os_str()], "tensor `"),
    ];
    for (args, expect) in cases {
        let mut all: Vec<&std::ffi::OsStr> = vec!["export".as_ref()];
        all.extend(args);
        all.extend(["-o".as_ref(), out.as_os_str()]);
        let (code, _, stderr) = run_cli(&all);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1, "{stderr}");
        assert!(stderr.contains(expect), "{stderr} lacks {expect:?}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing written");
    }
}

#[test]
fn exported_surgery_model_keeps_its_feature_correction() {
    use mergeattack_core::tensor::ParamSet;
    use mergeattack_onnx::runtime::load_hf_params;
    let dir = fixture();
    let tmp = tempfile::tempdir().unwrap();
    // The fixture's weights plus a rank-2 surgery module, as a `+surgery` merge writes them.
    let (params, _) = load_hf_params(&dir.join("model.safetensors")).unwrap();
    let proj = params.get("visual_projection.weight").unwrap().shape()[0];
    let mut with: ParamSet<'static> = params.into_owned();
    let fill = |n: usize, k: f32| (0..n).map(|i| ((i as f32 * 0.37 + k).sin()) * 0.3).collect::<Vec<f32>>();
    with.insert_owned("surgery.down", ArrayD::from_shape_vec(IxDyn(&[2, proj]), fill(2 * proj, 0.1)).unwrap());
    with.insert_owned("surgery.up", ArrayD::from_shape_vec(IxDyn(&[proj, 2]), fill(2 * proj, 1.3)).unwrap());
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let weights = tmp.path().join("model.safetensors");
    mergeattack_onnx::weights::save(&weights, &with, &[("format", "pt")]).unwrap();
    let out = tmp.path().join("surgery.onnx");
    let heads = dir.join("heads.safetensors");
    let (code, stdout, stderr) = run_cli([
        "export".as_ref(),
        "--model".as_ref(),
        weights.as_os_str(),
        "--head".as_ref(),
        heads.as_os_str(),
        "--task".as_ref(),
        "random".as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let x: Array4<f32> = reference_f32("pixels").into_dimensionality().unwrap();
    let (logits, features) = run_exported(&out, x.view(), 2).unwrap();
    let load = |w: &Path| Model::load(w, None, None, &heads, Some("random"), RuntimeOptions::default()).unwrap();
    let mut corrected = load(&weights);
    assert_eq!(corrected.surgery_rank(), Some(2));
    let (want_l, want_f) = corrected.forward(x.view()).unwrap();
    let err = logits.iter().zip(want_l.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-5, "exported logits differ from the tool's surgery model by {err}");
    let ferr = features.iter().zip(want_f.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(ferr <= 1e-5, "exported features differ by {ferr}");
    let (plain_l, _) = load(&dir.join("model.safetensors")).forward(x.view()).unwrap();
    let moved = logits.iter().zip(plain_l.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-3, "the surgery block must change the logits (max change {moved})");
}
