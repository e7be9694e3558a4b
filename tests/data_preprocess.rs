//! Preprocessing against an independent computation: Pillow 13's bicubic resize and an HF
//! CLIPImageProcessor-style pipeline (shorter side, centre crop), values committed in
//! tests/fixtures/data/pil_bicubic.json (regenerate with tests/fixtures/data/make_fixtures.py).

use mergeattack_harness::data::preprocess::{Preprocess, resize_u8, u8_to_chw};
use serde_json::Value;

fn fixture() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data/pil_bicubic.json");
    serde_json::from_slice(&std::fs::read(p).expect("fixture")).expect("json")
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("u8") as u8).collect()
}

fn src(f: &Value, name: &str) -> (usize, usize, usize, Vec<u8>) {
    let s = &f["src"][name];
    let g = |k: &str| s[k].as_u64().expect("dim") as usize;
    (g("w"), g("h"), g("c"), bytes(&s["pixels"]))
}

#[test]
fn bicubic_resize_matches_pillow_exactly() {
    let f = fixture();
    let cases = f["cases"].as_array().expect("cases");
    assert!(cases.len() >= 7);
    for case in cases {
        let (w, h, c, px) = src(&f, case["src"].as_str().expect("src"));
        let (ow, oh) = (case["w"].as_u64().unwrap() as usize, case["h"].as_u64().unwrap() as usize);
        let got = resize_u8(&px, w, h, c, ow, oh);
        let want = bytes(&case["pixels"]);
        assert_eq!(got, want, "{} {w}x{h} -> {ow}x{oh}", case["src"]);
    }
}

#[test]
fn clip_preprocessing_matches_pillow_pipeline() {
    let f = fixture();
    for case in f["clip"].as_array().expect("clip") {
        let (w, h, c, px) = src(&f, case["src"].as_str().expect("src"));
        let s = case["size"].as_u64().unwrap() as usize;
        let mut out = vec![0f32; 3 * s * s];
        u8_to_chw(Preprocess::Clip(s), &px, w, h, c, &mut out);
        let want = bytes(&case["pixels"]); // HWC
        for y in 0..s {
            for x in 0..s {
                for k in 0..3 {
                    let exp = f32::from(want[(y * s + x) * 3 + k]) / 255.0;
                    assert_eq!(out[(k * s + y) * s + x], exp, "{} size {s} at ({x},{y},{k})", case["src"]);
                }
            }
        }
    }
}
