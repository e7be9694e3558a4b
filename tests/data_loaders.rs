//! Loaders on the small committed fixtures (tests/fixtures/data, made by make_fixtures.py with
//! Pillow, pyarrow and numpy): pixels and labels must equal what those libraries wrote, and bad
//! inputs must give one clear sentence naming the culprit.

use std::path::PathBuf;

use mergeattack_harness::data::{self, DataSpec, Dataset, OpenOptions, Preprocess};
use mergeattack_suite::run_cli;
use serde_json::Value;

fn fx(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data").join(name)
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fx("expected.json")).unwrap()).unwrap()
}

fn open(spec: &str) -> Result<Dataset, data::DataError> {
    data::spec::open_str(spec, &OpenOptions::default())
}

/// Compare a data set's batch with expected HWC pixels (grey expected arrays are replicated).
/// PNG items must match exactly; the JPEG item (`jpeg_item`) only closely, since JPEG decoders
/// (chroma upsampling, IDCT) legitimately differ from libjpeg: mean |diff| <= 2 levels, max <= 16.
fn check_pixels(d: &Dataset, want: &Value, jpeg_item: Option<usize>) {
    let b = d.batch(0..d.len()).unwrap();
    let (n, _, h, w) = b.images.dim();
    assert_eq!(n, want.as_array().unwrap().len());
    for (i, item) in want.as_array().unwrap().iter().enumerate() {
        let px: Vec<i32> = item.as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
        let c = px.len() / (h * w);
        let (mut sum, mut max) = (0i64, 0i32);
        for y in 0..h {
            for x in 0..w {
                for k in 0..3 {
                    let e = px[(y * w + x) * c + if c == 1 { 0 } else { k }];
                    let g = (b.images[[i, k, y, x]] * 255.0).round() as i32;
                    sum += i64::from((g - e).abs());
                    max = max.max((g - e).abs());
                }
            }
        }
        let mean = sum as f64 / (3 * h * w) as f64;
        if Some(i) == jpeg_item {
            assert!(mean <= 2.0 && max <= 16, "{}: JPEG item {i}: mean diff {mean}, max {max}", d.name);
        } else {
            assert_eq!(max, 0, "{}: item {i} differs (mean {mean})", d.name);
        }
    }
}

#[test]
fn parquet_hf_layout_with_class_names_and_a_corrupt_row_skipped() {
    let e = expected();
    let d = open(&format!("parquet:{}", fx("tiny.parquet").display())).unwrap();
    assert_eq!(d.len(), 4, "the corrupt fifth row is skipped");
    assert_eq!(d.class_names(), &["cat", "dog"]);
    let labels: Vec<u32> =
        e["parquet"]["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(d.labels(), &labels[..]);
    check_pixels(&d, &e["parquet"]["pixels"], Some(2));
    let strict = OpenOptions { strict: true, ..Default::default() };
    let err = data::spec::open_str(&format!("parquet:{}", fx("tiny.parquet").display()), &strict).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("1 unreadable image file(s), first row 4"), "{msg}");
}

#[test]
fn parquet_without_the_columns_names_the_columns_it_has() {
    let msg = open(&format!("parquet:{}", fx("nocolumns.parquet").display())).unwrap_err().to_string();
    assert!(msg.contains("nocolumns.parquet"), "{msg}");
    assert!(msg.contains("the file has columns: picture (BYTE_ARRAY), category (BYTE_ARRAY)"), "{msg}");
}

#[test]
fn labels_out_of_range_are_a_clear_error() {
    let msg = open(&format!("parquet:{}", fx("badlabel.parquet").display())).unwrap_err().to_string();
    assert!(msg.ends_with("badlabel.parquet: label 5 of item 1 is out of range for 2 classes"), "{msg}");
    let three = OpenOptions { classes: Some(3), ..Default::default() };
    let spec = format!("npy:{},{}", fx("tiny_images.npy").display(), fx("tiny_labels.npy").display());
    let msg = data::spec::open_str(&spec, &three).unwrap_err().to_string();
    assert!(msg.ends_with("tiny_images.npy: label 3 of item 1 is out of range for 3 classes"), "{msg}");
}

#[test]
fn image_folder_skips_the_corrupt_file_or_refuses_it_when_strict() {
    let e = expected();
    let d = open(&format!("folder:{}", fx("folder").display())).unwrap();
    assert_eq!(d.class_names(), &["cat", "dog"]);
    assert_eq!(d.labels(), &[0, 0, 1]);
    check_pixels(&d, &e["folder"]["pixels"], Some(1));
    let strict = OpenOptions { strict: true, ..Default::default() };
    let msg = data::spec::open_str(&format!("folder:{}", fx("folder").display()), &strict).unwrap_err().to_string();
    assert!(msg.contains("1 unreadable image file(s), first"), "{msg}");
    assert!(msg.contains("broken.png"), "{msg}");
}

#[test]
fn idx_gz_and_npy_give_the_stored_pixels() {
    let e = expected();
    let d = open(&format!("idx:{}", fx("tiny-images-idx3-ubyte.gz").display())).unwrap();
    assert_eq!(d.labels(), &[2, 0, 1]);
    assert_eq!(d.num_classes(), 3);
    check_pixels(&d, &e["idx"]["pixels"], None);
    let d = open(&format!("npy:{},{}", fx("tiny_images.npy").display(), fx("tiny_labels.npy").display())).unwrap();
    assert_eq!(d.labels(), &[0, 3, 1]);
    check_pixels(&d, &e["npy"]["pixels"], None);
    let b = d.with_preprocess(Preprocess::Clip(3)).batch(0..2).unwrap();
    assert_eq!(b.images.shape(), &[2, 3, 3, 3]);
}

#[test]
fn corrupt_and_truncated_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("bad-images-idx3-ubyte.gz");
    let good = std::fs::read(fx("tiny-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(&gz, &good[..good.len() / 2]).unwrap();
    let spec = format!("idx:{},{}", gz.display(), fx("tiny-labels-idx1-ubyte.gz").display());
    let msg = open(&spec).unwrap_err().to_string();
    assert!(msg.contains("bad-images-idx3-ubyte.gz: corrupt gzip data"), "{msg}");
    let raw = dir.path().join("short.idx");
    std::fs::write(&raw, [0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]).unwrap();
    let spec = format!("idx:{},{}", raw.display(), fx("tiny-labels-idx1-ubyte.gz").display());
    let msg = open(&spec).unwrap_err().to_string();
    assert!(msg.contains("short.idx: IDX header [2, 2, 2] needs 8 data bytes, the file has 3"), "{msg}");
    let npy = dir.path().join("x.npy");
    std::fs::write(&npy, b"PK\x03\x04 not numpy").unwrap();
    let msg = open(&format!("npy:{},{}", npy.display(), npy.display())).unwrap_err().to_string();
    assert!(msg.contains("x.npy: not a .npy file"), "{msg}");
}

#[test]
fn spec_round_trip_and_cli_errors_are_one_sentence() {
    let s: DataSpec = "mini:emoji:val".parse().unwrap();
    assert_eq!(s.to_string(), "mini:emoji:val");
    let (code, _, err) = run_cli(["data", "show", &format!("parquet:{}", fx("nocolumns.parquet").display())]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    let (code, _, err) = run_cli(["data", "show", "mini:cifar10"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown mini-suite task `cifar10`"), "{err}");
}

#[test]
fn data_show_writes_a_contact_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sheet.png");
    let (code, stdout, err) =
        run_cli(["data", "show", &format!("folder:{}", fx("folder").display()), "--png", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("3 images, 2 classes"), "{stdout}");
    let img = std::fs::read(&out).unwrap();
    assert!(img.starts_with(b"\x89PNG"));
    // 2x2 grid of 6x4 tiles with 2-px gaps: 18 x 14.
    assert_eq!(u32::from_be_bytes(img[16..20].try_into().unwrap()), 18);
    assert_eq!(u32::from_be_bytes(img[20..24].try_into().unwrap()), 14);
}
