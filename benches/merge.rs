//! Merge benchmark.
//!
//! `cargo bench --bench merge` (criterion): every registry method on the demo's tiny CLIP
//! (4 fine-tuned models), cheap enough for any machine.
//!
//! `MERGEATTACK_BENCH_FULL=1 cargo bench --bench merge` (what `scripts/bench-merge.sh` runs): 9
//! checkpoints shaped like CLIP ViT-B/32's vision tower (HF names, 88 M f32 parameters each:
//! pretrained + 8 fine-tuned, deterministic, generated once into `target/bench-merge/`), merged once
//! each with `task-arithmetic`, `ties`, `emr`, `dare`, `tsv-m` (those in the registry), printing
//! seconds and effective GB/s = (bytes read + bytes written) / time, beside a plain memory-copy
//! baseline of the same bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::Criterion;
use mergeattack_core::merge::{Params, lookup, registry};
use mergeattack_harness::commands::merge::merge_files;
use mergeattack_harness::mergeconfig::MergeSpec;
use mergeattack_harness::synth::{self, SynthConfig};
use mergeattack_onnx::weights::OutDtype;

const FULL_METHODS: [&str; 5] = ["task-arithmetic", "ties", "emr", "dare", "tsv-m"];

fn spec(method: &str, base: &Path, models: &[PathBuf]) -> MergeSpec {
    MergeSpec {
        method: method.into(),
        base: base.to_path_buf(),
        models: models.to_vec(),
        weights: None,
        params: Params::new(),
        dtype: OutDtype::F32,
    }
}

/// The cached ViT-B/32-shaped set; generated when `target/bench-merge/complete` is missing.
fn full_set() -> (PathBuf, Vec<PathBuf>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-merge");
    let marker = dir.join("complete");
    let base = dir.join("pretrained.safetensors");
    let models: Vec<PathBuf> = (0..8).map(|t| dir.join(format!("finetuned-{t}.safetensors"))).collect();
    if !marker.exists() {
        let t = Instant::now();
        eprintln!("generating 9 ViT-B/32-shaped checkpoints in {} ...", dir.display());
        synth::write_set(&dir, &SynthConfig::vit_b32(), 8, 7, 0.05).expect("generate checkpoints");
        std::fs::write(&marker, "9 checkpoints, SynthConfig::vit_b32, seed 7, scale 0.05\n").unwrap();
        eprintln!("generated in {:.1} s", t.elapsed().as_secs_f64());
    }
    (base, models)
}

fn full() {
    let (base, models) = full_set();
    let params = SynthConfig::vit_b32().numel();
    println!("ViT-B/32-shaped checkpoints: {params} f32 parameters each, pretrained + {} fine-tuned", models.len());
    println!("{:<16} {:>9} {:>9} {:>9} {:>9}", "method", "seconds", "GB read", "GB writ", "GB/s");
    let mut bytes = 0u64;
    for m in FULL_METHODS {
        if lookup(m).is_err() {
            println!("{m:<16} (not in the registry)");
            continue;
        }
        let out = base.with_file_name(format!("bench-out-{m}.safetensors"));
        let t = Instant::now();
        let r = merge_files(&spec(m, &base, &models), &out).unwrap_or_else(|e| panic!("{m}: {e}"));
        let s = t.elapsed().as_secs_f64();
        let total = r.bytes_read + r.bytes_written;
        bytes = bytes.max(total);
        println!(
            "{m:<16} {s:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            r.bytes_read as f64 / 1e9,
            r.bytes_written as f64 / 1e9,
            total as f64 / 1e9 / s
        );
        for o in &r.outputs {
            let _ = std::fs::remove_file(o);
        }
    }
    // Baseline: copy half the bytes (each byte copied is read once and written once).
    let n = (bytes / 2) as usize;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.fill(2); // fault the pages in before timing
    let t = Instant::now();
    dst.copy_from_slice(&src);
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    println!(
        "{:<16} {s:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        "memcpy",
        n as f64 / 1e9,
        n as f64 / 1e9,
        2.0 * n as f64 / 1e9 / s
    );
}

fn tiny(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (base, models) = synth::write_set(dir.path(), &SynthConfig::tiny(), 4, 0, 0.05).unwrap();
    let mut g = c.benchmark_group("merge-tiny");
    g.sample_size(10);
    for m in registry() {
        let out = dir.path().join(format!("{}.safetensors", m.name()));
        let n = if merge_files(&spec(m.name(), &base, &models), &out).is_ok() { 4 } else { 2 };
        g.bench_function(m.name(), |b| b.iter(|| merge_files(&spec(m.name(), &base, &models[..n]), &out).unwrap()));
    }
    g.finish();
}

fn main() {
    if std::env::var("MERGEATTACK_BENCH_FULL").is_ok_and(|v| v == "1") {
        full();
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    tiny(&mut c);
    c.final_summary();
}
