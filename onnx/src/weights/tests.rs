use super::*;
use ndarray::ArrayD;

fn arr(shape: &[usize], f: impl Fn(usize) -> f32) -> ArrayD<f32> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(f).collect()).unwrap()
}

/// A safetensors file assembled by hand (independent of [`Writer`]).
fn handmade(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

#[test]
fn f32_round_trip_is_bitwise_and_zero_copy_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let mut p = ParamSet::new();
    p.insert_owned("w", arr(&[3, 4], |i| (i as f32 * 0.37).sin() * 1e-3));
    p.insert_owned("s", arr(&[], |_| 4.6052));
    save(&path, &p, &[("method", "test")]).unwrap();
    let c = Checkpoint::open(&path).unwrap();
    assert_eq!(c.metadata().get("method").map(String::as_str), Some("test"));
    let q = c.params().unwrap();
    for (name, t) in p.iter() {
        let got = q.get(name).unwrap();
        assert!(got.is_view(), "aligned F32 `{name}` should be borrowed");
        assert_eq!(got.shape(), t.shape());
        let a: Vec<u32> = t.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }
    // The safetensors crate itself reads what we wrote.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("w").unwrap().shape(), &[3, 4]);
    assert_eq!(c.sha256(), hex(&Sha256::digest(&bytes)));
}

#[test]
fn f16_and_bf16_round_trips_remember_the_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let values = arr(&[2, 5], |i| (i as f32 - 4.5) * 0.123);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        let mut w = Writer::new();
        w.float("x", values.view(), dtype);
        w.write(&path).unwrap();
        let c = Checkpoint::open(&path).unwrap();
        assert_eq!(c.dtype("x"), Some(dtype));
        let t = c.tensor("x").unwrap().unwrap();
        assert!(!t.is_view());
        for (got, want) in t.iter().zip(values.iter()) {
            // Independent rounding reference: the `half` conversions.
            let r = match dtype {
                Dtype::F16 => half::f16::from_f32(*want).to_f32(),
                _ => half::bf16::from_f32(*want).to_f32(),
            };
            assert_eq!(got.to_bits(), r.to_bits());
            let tol = if dtype == Dtype::F16 { 1e-3 } else { 8e-3 };
            assert!((got - want).abs() <= tol * want.abs().max(1.0));
        }
        // Writing the converted values back in their input dtype is lossless.
        let path2 = dir.path().join(format!("{dtype:?}-2.safetensors"));
        let mut w = Writer::new();
        w.float("x", t.view(), OutDtype::Input.resolve(c.dtype("x").unwrap()));
        w.write(&path2).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&path2).unwrap());
    }
}

#[test]
fn unaligned_f32_falls_back_to_an_owned_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.safetensors");
    let vals = [1.5f32, -2.25, 3.0];
    let mut data = vec![7u8]; // one U8 byte first: the F32 data starts at an odd offset
    for v in vals {
        data.extend(v.to_le_bytes());
    }
    let header = r#"{"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[3],"data_offsets":[1,13]}}"#;
    std::fs::write(&path, handmade(header, &data)).unwrap();
    let c = Checkpoint::open(&path).unwrap();
    let t = c.tensor("f").unwrap().unwrap();
    assert!(!t.is_view());
    assert_eq!(t.iter().copied().collect::<Vec<_>>(), vals);
    assert_eq!(c.non_float_names().collect::<Vec<_>>(), ["b"]);
    assert_eq!(c.params().unwrap().names().collect::<Vec<_>>(), ["f"]);
}

#[test]
fn non_float_tensors_are_carried_through_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u8> = (0i64..5).flat_map(|i| i.to_le_bytes()).collect();
    let x = arr(&[5], |i| i as f32);
    let path = dir.path().join("i.safetensors");
    let mut w = Writer::new();
    w.raw("position_ids", Dtype::I64, &[1, 5], &ids).float("x", x.view(), Dtype::F32);
    w.write(&path).unwrap();
    let c = Checkpoint::open(&path).unwrap();
    let (dtype, shape, bytes) = c.raw("position_ids").unwrap();
    assert_eq!((dtype, shape, bytes), (Dtype::I64, &[1usize, 5][..], &ids[..]));
    assert!(c.tensor("position_ids").is_err());
    // The I64 tensor comes first (8-byte elements), so the F32 data stays aligned.
    assert!(c.tensor("x").unwrap().unwrap().is_view());
}

#[test]
fn bad_files_are_named_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let e = Checkpoint::open(&missing).unwrap_err().to_string();
    assert!(e.contains("nope.safetensors") && e.starts_with("cannot read"), "{e}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is certainly not a safetensors file at all").unwrap();
    let e = Checkpoint::open(&garbage).unwrap_err().to_string();
    assert!(e.contains("garbage.safetensors") && e.contains("not a valid safetensors"), "{e}");

    let good = dir.path().join("good.safetensors");
    let mut p = ParamSet::new();
    p.insert_owned("w", arr(&[16], |i| i as f32));
    save(&good, &p, &[]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    let e = Checkpoint::open(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("truncated"), "{e}");

    let header_cut = dir.path().join("hcut.safetensors");
    std::fs::write(&header_cut, &bytes[..20]).unwrap();
    let e = Checkpoint::open(&header_cut).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    let bad_offsets = dir.path().join("off.safetensors");
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    std::fs::write(&bad_offsets, handmade(header, &[0u8; 12])).unwrap();
    let e = Checkpoint::open(&bad_offsets).unwrap_err().to_string();
    assert!(e.contains("off.safetensors") && e.contains("offsets"), "{e}");
}

#[test]
fn checks_name_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = ParamSet::new();
    base.insert_owned("a", arr(&[2, 3], |i| i as f32));
    base.insert_owned("b", arr(&[3], |i| i as f32));
    let mut other = ParamSet::new();
    other.insert_owned("a", arr(&[3, 2], |i| i as f32));
    let mut nan = arr(&[3], |i| i as f32);
    nan[[1]] = f32::NAN;
    other.insert_owned("b", nan);
    let (bp, op) = (dir.path().join("base.safetensors"), dir.path().join("ft.safetensors"));
    save(&bp, &base, &[]).unwrap();
    save(&op, &other, &[]).unwrap();
    let (b, o) = (Checkpoint::open(&bp).unwrap(), Checkpoint::open(&op).unwrap());
    let e = o.check_against_base(&b, ["a"]).unwrap_err().to_string();
    assert!(e.contains("`a`") && e.contains("[3, 2]") && e.contains("[2, 3]") && e.contains("ft.safetensors"), "{e}");
    let p = o.params().unwrap();
    let e = check_finite(&p, &o.shown(), ["b"]).unwrap_err().to_string();
    assert!(e.contains("`b`") && e.contains("ft.safetensors") && e.contains("index 1"), "{e}");
    let e = b.check_against_base(&b, ["a", "b"]);
    assert!(e.is_ok());
}

#[test]
fn conventions_and_selection() {
    let hf = ["logit_scale", "vision_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight"];
    assert_eq!(Convention::detect(hf), Some(Convention::HfClip));
    let bare = ["embeddings.class_embedding", "encoder.layers.0.mlp.fc1.weight", "post_layernorm.weight"];
    assert_eq!(Convention::detect(bare), Some(Convention::HfVision));
    let oc = ["visual.proj", "visual.conv1.weight", "token_embedding.weight"];
    assert_eq!(Convention::detect(oc), Some(Convention::OpenClip));
    assert_eq!(Convention::detect(["w", "b"]), None);
    let c = Convention::HfClip;
    assert!(c.is_vision_encoder(hf[1]) && !c.is_vision_encoder(hf[0]) && !c.is_vision_encoder(hf[2]));
    assert!(Convention::HfVision.is_vision_encoder("pre_layrnorm.bias"));
    assert!(!Convention::HfVision.is_vision_encoder("visual_projection.weight"));
    assert!(Convention::OpenClip.is_vision_encoder("visual.conv1.weight"));
    assert!(!Convention::OpenClip.is_vision_encoder("visual.proj"));
}

#[test]
fn open_clip_conversion_splits_qkv_and_transposes_proj() {
    let d = 4;
    let mut p = ParamSet::new();
    p.insert_owned("visual.conv1.weight", arr(&[d, 3, 2, 2], |i| i as f32));
    p.insert_owned("visual.class_embedding", arr(&[d], |i| i as f32));
    p.insert_owned("visual.positional_embedding", arr(&[5, d], |i| i as f32));
    p.insert_owned("visual.transformer.resblocks.0.attn.in_proj_weight", arr(&[3 * d, d], |i| i as f32));
    p.insert_owned("visual.transformer.resblocks.0.attn.in_proj_bias", arr(&[3 * d], |i| 100.0 + i as f32));
    p.insert_owned("visual.transformer.resblocks.0.mlp.c_fc.weight", arr(&[8, d], |i| i as f32));
    p.insert_owned("visual.proj", arr(&[d, 2], |i| i as f32));
    p.insert_owned("logit_scale", arr(&[], |_| 4.6));
    p.insert_owned("token_embedding.weight", arr(&[3, 2], |i| i as f32));
    let h = open_clip_to_hf(&p).unwrap();
    let names: Vec<&str> = h.names().collect();
    assert_eq!(
        names,
        [
            "logit_scale",
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight",
            "vision_model.encoder.layers.0.self_attn.k_proj.bias",
            "vision_model.encoder.layers.0.self_attn.k_proj.weight",
            "vision_model.encoder.layers.0.self_attn.q_proj.bias",
            "vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "vision_model.encoder.layers.0.self_attn.v_proj.bias",
            "vision_model.encoder.layers.0.self_attn.v_proj.weight",
            "visual_projection.weight",
        ]
    );
    let w = |n: &str| h.get(n).unwrap().iter().copied().collect::<Vec<f32>>();
    // Row r of in_proj_weight holds r*d .. r*d+d; k is rows d..2d.
    assert_eq!(
        w("vision_model.encoder.layers.0.self_attn.k_proj.weight"),
        (16..32).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(w("vision_model.encoder.layers.0.self_attn.v_proj.bias"), [108.0, 109.0, 110.0, 111.0]);
    // proj [d, 2] = [[0,1],[2,3],[4,5],[6,7]] -> visual_projection [2, d].
    assert_eq!(h.get("visual_projection.weight").unwrap().shape(), &[2, d]);
    assert_eq!(w("visual_projection.weight"), [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]);
    // Renamed tensors keep their values.
    assert_eq!(w("vision_model.embeddings.class_embedding"), [0.0, 1.0, 2.0, 3.0]);

    let mut bad = ParamSet::new();
    bad.insert_owned("visual.transformer.resblocks.0.attn.in_proj_weight", arr(&[4, 4], |i| i as f32));
    let e = open_clip_to_hf(&bad).unwrap_err().to_string();
    assert!(e.contains("in_proj_weight") && e.contains("[4, 4]"), "{e}");
    let mut unknown = ParamSet::new();
    unknown.insert_owned("visual.attn_pool.query", arr(&[2], |i| i as f32));
    assert!(open_clip_to_hf(&unknown).unwrap_err().to_string().contains("visual.attn_pool.query"));
}

#[test]
fn out_dtype_parsing() {
    assert_eq!("bf16".parse::<OutDtype>(), Ok(OutDtype::BF16));
    assert_eq!("input".parse::<OutDtype>(), Ok(OutDtype::Input));
    assert!("int8".parse::<OutDtype>().is_err());
    assert_eq!(OutDtype::Input.resolve(Dtype::F16), Dtype::F16);
    assert_eq!(OutDtype::F32.resolve(Dtype::BF16), Dtype::F32);
}
