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
//!
//! `MERGEATTACK_BENCH_KERNELS=1 cargo bench --bench merge` (also run by `scripts/bench-merge.sh`):
//! the in-core kernels without file I/O on in-memory ViT-B/32-shaped sets (8 fine-tuned models;
//! `MERGEATTACK_BENCH_LAYERS` encoder layers, default 3 = 22 M entries per model, 12 = 88 M), each
//! method timed best of `MERGEATTACK_BENCH_REPS` (default 3), beside a memory-copy baseline of the
//! same bytes measured in the same run (into a pre-faulted buffer; a copy into a fresh allocation is
//! printed beside it), the repetitions interleaved (every method once, then the copy, in turn),
//! with the TIES / task-arithmetic ratio and the load average. Each method and the copy run on 1
//! thread and on `MERGEATTACK_BENCH_THREADS` (default 2) threads (the methods' jobs on the
//! harness's thread executor, `MergeMethod::merge_on`; the copy split into equal parts
//! on scoped threads), and the ratios are printed at equal thread counts. The process has
//! the allocator of the `mergeattack` binary (`mergeattack_harness::hugepages`: blocks of 2 MiB or
//! more on transparent huge pages; task-arithmetic is also timed with it turned off) and glibc's
//! default settings, like `mergeattack merge` (`MERGEATTACK_BENCH_MALLOPT=1`: the settings the
//! tool applies once it builds an ONNX Runtime session, so that repeated merges reuse the freed
//! output pages; the bench says which it ran with).

use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::Criterion;
use mergeattack_core::merge::{Params, lookup, registry};
use mergeattack_harness::commands::merge::merge_files;
use mergeattack_harness::exec::Threads;
use mergeattack_harness::mergeconfig::MergeSpec;
use mergeattack_harness::synth::{self, SynthConfig};
use mergeattack_onnx::weights::OutDtype;

/// The allocator of the `mergeattack` binary, so that the kernels run as they do in the tool.
#[global_allocator]
static ALLOC: mergeattack_harness::hugepages::HugePages = mergeattack_harness::hugepages::HugePages;

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
    println!("{:<16} {:>9} {:>9} {:>9} {:>9} {:>7}", "method", "seconds", "GB read", "GB writ", "GB/s", "load");
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
            "{m:<16} {s:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            r.bytes_read as f64 / 1e9,
            r.bytes_written as f64 / 1e9,
            total as f64 / 1e9 / s,
            load()
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

/// The allocator settings `onnx/src/runtime.rs` applies when it builds a session (same values):
/// blocks up to 32 MiB from the heap, up to 1 GiB of freed heap kept for reuse.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only changes allocator tuning parameters; both values are in range.
        let ok = unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 };
        assert!(ok, "mallopt refused the allocator settings");
    }
}

/// `AnonHugePages` of this process (Linux), to show whether the kernel backed big blocks with
/// huge pages (`/sys/kernel/mm/transparent_hugepage/enabled` must be `always` or `madvise`).
fn anon_huge_pages() -> String {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("AnonHugePages:")).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// The 1-minute load average (Linux), to print next to each figure.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// In-memory kernels: task-arithmetic, ties (and the other methods named in
/// `MERGEATTACK_BENCH_METHODS`, comma-separated) on a ViT-B/32-shaped set held in memory.
fn kernels() {
    use mergeattack_core::merge::MergeInput;
    use mergeattack_core::tensor::ParamSet;
    use ndarray::{ArrayD, IxDyn};
    use rand::RngExt;

    let layers = env_usize("MERGEATTACK_BENCH_LAYERS", 3);
    let reps = env_usize("MERGEATTACK_BENCH_REPS", 3).max(1);
    let tasks = env_usize("MERGEATTACK_BENCH_TASKS", 8);
    let methods = std::env::var("MERGEATTACK_BENCH_METHODS").unwrap_or_else(|_| "task-arithmetic,ties".into());
    let cfg = SynthConfig { layers, ..SynthConfig::vit_b32() };
    let shapes: Vec<(String, Vec<usize>)> =
        cfg.shapes().into_iter().filter(|(n, _)| n.starts_with("vision_model.")).collect();
    let numel: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let t0 = Instant::now();
    // Base uniform in [-0.5, 0.5]; task vectors: sum of two uniforms (triangular, a bell-like
    // magnitude profile) times 0.01, from per-(role, tensor) ChaCha streams.
    let make = |role: &str, base: Option<&ParamSet<'static>>| {
        let mut p = ParamSet::new();
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product();
            let mut r = mergeattack_core::rng::stream(11, &[b"bench", role.as_bytes(), name.as_bytes()]);
            let v: Vec<f32> = match base {
                None => (0..n).map(|_| r.random::<f32>() - 0.5).collect(),
                Some(b) => {
                    let b = b.get(name).unwrap().as_slice().unwrap();
                    b.iter().map(|&x| x + 0.01 * (r.random::<f32>() + r.random::<f32>() - 1.0)).collect()
                }
            };
            p.insert_owned(name.clone(), ArrayD::from_shape_vec(IxDyn(shape), v).unwrap());
        }
        p
    };
    let base = make("base", None);
    let models: Vec<ParamSet<'static>> = (0..tasks).map(|t| make(&format!("task{t}"), Some(&base))).collect();
    let names: Vec<String> = shapes.iter().map(|(n, _)| n.clone()).collect();
    println!(
        "in-core kernels: {tasks} fine-tuned + base, {numel} f32 entries each ({layers} layers), generated in {:.1} s, best of {reps}",
        t0.elapsed().as_secs_f64()
    );
    if std::env::var("MERGEATTACK_BENCH_MALLOPT").is_ok_and(|v| v == "1") {
        keep_freed_memory();
        println!(
            "allocator: the tool's (blocks >= 2 MiB on transparent huge pages) over glibc with the mallopt \
             settings of onnx/src/runtime.rs (mmap threshold 32 MiB, trim threshold 1 GiB), as in a \
             `mergeattack` process once an ONNX Runtime session is built: from the second repetition on, a \
             merge's output reuses freed pages (no page faults)"
        );
    } else {
        println!(
            "allocator: the tool's (blocks >= 2 MiB on transparent huge pages) over glibc defaults, as in \
             `mergeattack merge` (the mallopt settings of onnx/src/runtime.rs apply only once an ONNX Runtime \
             session is built; MERGEATTACK_BENCH_MALLOPT=1 sets them here): each merge faults its output \
             pages in"
        );
    }
    let input = MergeInput { base: &base, models: &models, model_weights: None, names: &names, seed: 0 };
    let bytes = ((tasks + 2) * numel * 4) as f64; // read base + models, write the output
    let many = env_usize("MERGEATTACK_BENCH_THREADS", 2).max(1);
    let counts: Vec<usize> = if many > 1 { vec![1, many] } else { vec![1] };
    println!("{:<16} {:>7} {:>9} {:>9} {:>9} {:>7}", "method", "threads", "seconds", "GB/s", "vs TA", "load");
    // One merge with method `m`, its jobs on `exec`: seconds.
    let once = |m: &dyn mergeattack_core::merge::MergeMethod, exec: &Threads| {
        let t = Instant::now();
        let out = m.merge_on(&input, &Params::new(), exec).unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(&out);
        drop(out);
        s
    };
    // Best of `reps` for method `m` with its jobs on `threads` threads.
    let time = |m: &str, threads: usize| {
        let method = lookup(m).ok()?;
        let exec = Threads::new(threads);
        Some((0..reps).map(|_| once(method, &exec)).fold(f64::INFINITY, f64::min))
    };
    // For context: task-arithmetic with its output on 4 KiB pages (the allocator's rule off).
    mergeattack_harness::hugepages::set_enabled(false);
    if let Some(best) = time("task-arithmetic", 1) {
        println!(
            "{:<16} {:>7} {best:>9.3} {:>9.2} {:>9} {:>7}",
            "TA (4 KiB pages)",
            1,
            bytes / 1e9 / best,
            "-",
            load()
        );
    }
    mergeattack_harness::hugepages::set_enabled(true);
    // (method, threads, seconds)
    let mut results: Vec<(String, usize, f64)> = Vec::new();
    let ta = |results: &[(String, usize, f64)], threads: usize| {
        results.iter().find(|(m, t, _)| m == "task-arithmetic" && *t == threads).map(|r| r.2)
    };
    // Per thread count, the repetitions interleaved: each method once, then the copy, `reps`
    // times (so that a slower or faster spell of the machine falls on all of them alike); the
    // best of each. Baseline copy: bytes/2 (read once, written once) into a buffer whose pages
    // were faulted in first; on several threads each copies an equal part.
    let listed: Vec<&str> = methods.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    let known: Vec<&dyn mergeattack_core::merge::MergeMethod> = listed
        .iter()
        .filter_map(|m| {
            let found = lookup(m).ok();
            if found.is_none() {
                println!("{m:<16} (not in the registry)");
            }
            found
        })
        .collect();
    let n = (bytes / 2.0) as usize;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.fill(2);
    let copy = |dst: &mut [u8], threads: usize| {
        let part = n.div_ceil(threads);
        let t = Instant::now();
        std::thread::scope(|s| {
            let mut pieces = dst.chunks_mut(part).zip(src.chunks(part));
            let first = pieces.next();
            for (d, s_) in pieces {
                s.spawn(move || d.copy_from_slice(s_));
            }
            if let Some((d, s_)) = first {
                d.copy_from_slice(s_);
            }
        });
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(&*dst);
        s
    };
    let mut memcpy = Vec::new();
    for &threads in &counts {
        let exec = Threads::new(threads);
        let mut best = vec![f64::INFINITY; known.len()];
        let mut copy_best = f64::INFINITY;
        for _ in 0..reps {
            for (b, m) in best.iter_mut().zip(&known) {
                *b = b.min(once(*m, &exec));
            }
            copy_best = copy_best.min(copy(&mut dst, threads));
        }
        for (m, &b) in known.iter().zip(&best) {
            results.push((m.name().to_string(), threads, b));
            let ratio = ta(&results, threads).map(|t| format!("{:.2}x", b / t)).unwrap_or_else(|| "-".into());
            println!("{:<16} {threads:>7} {b:>9.3} {:>9.2} {ratio:>9} {:>7}", m.name(), bytes / 1e9 / b, load());
        }
        let gbs = bytes / 1e9 / copy_best;
        memcpy.push((threads, gbs));
        println!("{:<16} {threads:>7} {copy_best:>9.3} {gbs:>9.2} {:>9} {:>7}", "memcpy", "-", load());
    }
    // For context: the same copy into a fresh allocation, whose pages fault in as it is written
    // (what every merge pays for its output; not the baseline of the target).
    drop(dst);
    let mut fresh_best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        let fresh = src.clone();
        fresh_best = fresh_best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&fresh);
    }
    println!(
        "{:<16} {:>7} {fresh_best:>9.3} {:>9.2} {:>9} {:>7}",
        "memcpy (fresh)",
        1,
        bytes / 1e9 / fresh_best,
        "-",
        load()
    );
    for &(threads, gbs) in &memcpy {
        let Some(t) = ta(&results, threads) else { continue };
        let mut line = format!(
            "{threads} thread(s): task-arithmetic at {:.0}% of the memcpy baseline's GB/s",
            100.0 * (bytes / 1e9 / t) / gbs
        );
        for (m, _, s) in results.iter().filter(|(m, th, _)| *th == threads && m != "task-arithmetic") {
            line += &format!("; {m} / task-arithmetic {:.2}x", s / t);
        }
        println!("{line}");
    }
    for (m, _, one) in results.iter().filter(|r| r.1 == 1) {
        if let Some((_, _, par)) = results.iter().find(|(m2, th, _)| m2 == m && *th == many && many > 1) {
            println!("{m}: {many} threads {:.2}x faster than 1", one / par);
        }
    }
    println!("transparent huge pages in use at the end: {}", anon_huge_pages());
}

/// The SVD path of tsv-m / iso-c / iso-cts on ViT-B/32 block shapes: one thin SVD of a 3072 x 768
/// and of a 768 x 768 matrix (random entries), full and top-96 (`MERGEATTACK_BENCH_SVD=1`), best of
/// `MERGEATTACK_BENCH_REPS`.
fn svd_shapes() {
    use mergeattack_core::linalg::{svd, svd_top};
    use rand::RngExt;
    let reps = env_usize("MERGEATTACK_BENCH_REPS", 3).max(1);
    for (m, n) in [(3072usize, 768usize), (768, 768)] {
        let mut r = mergeattack_core::rng::stream(5, &[b"bench-svd"]);
        let a = ndarray::Array2::from_shape_fn((m, n), |_| r.random::<f64>() - 0.5);
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            let d = svd(a.view()).expect("svd");
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&d.s);
        }
        println!("svd {m} x {n}: {best:.3} s (load {})", load());
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            let d = svd_top(a.view(), 96).expect("svd_top");
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&d.s);
        }
        println!("svd_top {m} x {n}, k = 96 (tsv-m, 8 tasks): {best:.3} s (load {})", load());
    }
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
    if std::env::var("MERGEATTACK_BENCH_SVD").is_ok_and(|v| v == "1") {
        svd_shapes();
        return;
    }
    if std::env::var("MERGEATTACK_BENCH_KERNELS").is_ok_and(|v| v == "1") {
        kernels();
        return;
    }
    if std::env::var("MERGEATTACK_BENCH_FULL").is_ok_and(|v| v == "1") {
        full();
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    tiny(&mut c);
    c.final_summary();
}
