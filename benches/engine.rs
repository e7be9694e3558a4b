//! The ONNX engine on a ViT-B/32-sized CLIP vision tower with random weights: images/s for a
//! forward pass and for forward + input gradient (cross-entropy), batch 32, 2 intra-op threads;
//! session-creation time; peak resident memory. `scripts/bench-engine.sh` runs it and compares with
//! PyTorch eager (scripts/clip_reference/bench_torch.py).
//!
//! `cargo bench --bench engine` (MERGEATTACK_BENCH_THREADS / MERGEATTACK_BENCH_BATCH override).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mergeattack_core::classifier::Classifier;
use mergeattack_core::tensor::ParamSet;
use mergeattack_onnx::clip::ClipVisionConfig;
use mergeattack_onnx::clip::vision::vision_weight_shapes;
use mergeattack_onnx::runtime::{Model, RuntimeOptions};
use ndarray::{Array2, Array4, ArrayD, IxDyn};
use rand::RngExt;

/// The allocator of the `mergeattack` binary (big blocks on transparent huge pages), so that the
/// engine runs as it does in the tool.
#[global_allocator]
static ALLOC: mergeattack_harness::hugepages::HugePages = mergeattack_harness::hugepages::HugePages;

const CLASSES: usize = 10;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Random ViT-B/32 weights (uniform, std 0.02; LayerNorm scales 1) and a head.
fn random_model(cfg: &ClipVisionConfig) -> (ParamSet<'static>, Array2<f32>) {
    let mut rng = mergeattack_core::rng::stream(7, &[b"bench-engine"]);
    let a = 0.02f32 * 3f32.sqrt();
    let mut p = ParamSet::new();
    for (name, shape) in vision_weight_shapes(cfg) {
        let n: usize = shape.iter().product();
        let ln_scale = name.contains("norm") && name.ends_with(".weight");
        let v: Vec<f32> = (0..n).map(|_| if ln_scale { 1.0 } else { (rng.random::<f32>() * 2.0 - 1.0) * a }).collect();
        p.insert_owned(name, ArrayD::from_shape_vec(IxDyn(&shape), v).expect("shape"));
    }
    let head = Array2::from_shape_fn((CLASSES, cfg.projection_dim), |_| rng.random::<f32>() - 0.5);
    (p, head)
}

fn images(n: usize, cfg: &ClipVisionConfig) -> Array4<f32> {
    let mut rng = mergeattack_core::rng::stream(7, &[b"bench-images"]);
    Array4::from_shape_fn((n, 3, cfg.image_size, cfg.image_size), |_| rng.random::<f32>())
}

fn status_mb(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `MERGEATTACK_BENCH_MEMORY=1`: only the peak resident memory of one model doing a forward pass
/// and a forward + input gradient (nothing else in the process), then exit; with `=fed` every
/// weight is fed per run (MERGEATTACK_FED_WEIGHTS=1: no pre-packed sessions) after an
/// `Model::update_weights`.
fn memory_only(cfg: &ClipVisionConfig, opts: &RuntimeOptions, batch: usize, fed: bool) {
    let (params, head) = random_model(cfg);
    let x = images(batch, cfg);
    let labels: Vec<usize> = (0..batch).map(|i| i % CLASSES).collect();
    let mut phases = vec![format!("random_weights={:.0}MB", status_mb("VmRSS:").unwrap_or(f64::NAN))];
    if fed {
        // SAFETY: single-threaded here.
        unsafe { std::env::set_var("MERGEATTACK_FED_WEIGHTS", "1") };
    }
    let mut model = Model::from_params(cfg.clone(), &params, head.view(), opts.clone(), "random ViT-B/32").unwrap();
    if fed {
        let one: ParamSet = params.iter().take(1).map(|(n, t)| (n.to_string(), t.clone())).collect();
        model.update_weights(&one).unwrap();
    }
    drop(params); // as in the CLI: the model holds the only copy of the weights
    phases.push(format!("weights_bound={:.0}MB", status_mb("VmRSS:").unwrap_or(f64::NAN)));
    let t = Instant::now();
    let logits = model.logits(x.view()).unwrap();
    let fwd = t.elapsed();
    phases.push(format!("forward={:.0}MB", status_mb("VmRSS:").unwrap_or(f64::NAN)));
    let t = Instant::now();
    let g = model.loss_grad(x.view(), &labels).unwrap();
    let grad = t.elapsed();
    phases.push(format!("forward_input_grad={:.0}MB", status_mb("VmRSS:").unwrap_or(f64::NAN)));
    // Best of MERGEATTACK_BENCH_REPS (default 1) further runs of each.
    let reps = env_usize("MERGEATTACK_BENCH_REPS", 1).max(1);
    let (mut grad2, mut grad2_cpu, mut fwd2, mut fwd2_cpu) =
        (Duration::MAX, f64::INFINITY, Duration::MAX, f64::INFINITY);
    let mut g2 = None;
    for _ in 0..reps {
        let (t, c0) = (Instant::now(), cpu_s());
        g2 = Some(model.loss_grad(x.view(), &labels).unwrap());
        grad2 = grad2.min(t.elapsed());
        grad2_cpu = grad2_cpu.min(cpu_s() - c0);
        let (t, c0) = (Instant::now(), cpu_s());
        model.logits(x.view()).unwrap();
        fwd2 = fwd2.min(t.elapsed());
        fwd2_cpu = fwd2_cpu.min(cpu_s() - c0);
    }
    let g2 = g2.expect("at least one repetition");
    assert_eq!(g.grad, g2.grad, "repeatable");
    println!(
        "engine-memory-only updated_first={fed} threads={} batch={batch} peak_rss_mb={:.0} first_forward_s={:.2} \
         first_grad_s={:.2} second_grad_s={:.2} second_grad_cpu_s={:.2} second_forward_s={:.2} \
         second_forward_cpu_s={:.2} logit0={:e} {}",
        opts.threads,
        status_mb("VmHWM:").unwrap_or(f64::NAN),
        fwd.as_secs_f64(),
        grad.as_secs_f64(),
        grad2.as_secs_f64(),
        grad2_cpu,
        fwd2.as_secs_f64(),
        fwd2_cpu,
        logits[[0, 0]],
        phases.join(" ")
    );
}

/// CPU seconds (user + system) this process has used: less sensitive than wall time to other jobs
/// on a shared machine.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(f64::NAN)).collect();
    // Fields 14 and 15 (utime, stime) of proc(5), counted after the command name; 100 ticks/s.
    f.get(11).zip(f.get(12)).map_or(f64::NAN, |(u, s)| (u + s) / 100.0)
}

/// `MERGEATTACK_BENCH_AB="cfgA;cfgB;.."`, each configuration a comma-separated list of `KEY=VALUE`
/// environment settings in force while its model's sessions are made (e.g. `;MERGEATTACK_FED_WEIGHTS=1`:
/// as is against weights fed per run): one model per configuration, forward + input gradient
/// passes (forward only with MERGEATTACK_BENCH_AB_FWD set) alternated between them
/// MERGEATTACK_BENCH_REPS times (default 5), then min and median wall and CPU seconds of each, and
/// the largest difference of its outputs from the first configuration's. On a shared machine the
/// comparison within one run is what counts.
fn ab_compare(cfg: &ClipVisionConfig, opts: &RuntimeOptions, batch: usize, ab: &str) {
    let (params, head) = random_model(cfg);
    let x = images(batch, cfg);
    let labels: Vec<usize> = (0..batch).map(|i| i % CLASSES).collect();
    let reps = env_usize("MERGEATTACK_BENCH_REPS", 5);
    let grad = std::env::var("MERGEATTACK_BENCH_AB_FWD").is_err();
    let cfgs: Vec<&str> = ab.split(';').collect();
    let mut models: Vec<Model> = Vec::new();
    let mut reference = None;
    for c in &cfgs {
        let vars: Vec<(&str, &str)> = c.split(',').filter_map(|kv| kv.split_once('=')).collect();
        // SAFETY: the process is single-threaded here (no session runs).
        vars.iter().for_each(|(k, v)| unsafe { std::env::set_var(k, v) });
        let mut m = Model::from_params(cfg.clone(), &params, head.view(), opts.clone(), "random ViT-B/32").unwrap();
        // Sessions are made on first use: make both now, under this configuration.
        m.logits(x.view()).unwrap();
        let out = if grad {
            m.loss_grad(x.view(), &labels).unwrap().grad.into_dyn()
        } else {
            m.logits(x.view()).unwrap().into_dyn()
        };
        let r = reference.get_or_insert_with(|| out.clone());
        let diff = r.iter().zip(out.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = r.iter().map(|a| a.abs()).fold(0f32, f32::max);
        println!("ab cfg={c:?} max_abs_diff_vs_first={diff:e} (max {scale:e})");
        // SAFETY: as above.
        vars.iter().for_each(|(k, _)| unsafe { std::env::remove_var(k) });
        models.push(m);
    }
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cfgs.len()];
    for _ in 0..reps {
        for (i, m) in models.iter_mut().enumerate() {
            let (t, c0) = (Instant::now(), cpu_s());
            if grad {
                black_box(m.loss_grad(x.view(), &labels).unwrap());
            } else {
                black_box(m.logits(x.view()).unwrap());
            }
            times[i].push((t.elapsed().as_secs_f64(), cpu_s() - c0));
        }
    }
    for (c, t) in cfgs.iter().zip(&mut times) {
        let mut w: Vec<f64> = t.iter().map(|v| v.0).collect();
        let mut u: Vec<f64> = t.iter().map(|v| v.1).collect();
        w.sort_by(f64::total_cmp);
        u.sort_by(f64::total_cmp);
        println!(
            "ab cfg={c:?} wall min {:.3} med {:.3}  cpu min {:.2} med {:.2}",
            w[0],
            w[w.len() / 2],
            u[0],
            u[u.len() / 2]
        );
    }
    println!(
        "ab peak_rss_mb={:.0} load={}",
        status_mb("VmHWM:").unwrap_or(f64::NAN),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
}

fn engine(c: &mut Criterion) {
    let cfg = ClipVisionConfig::vit_b32();
    let threads = env_usize("MERGEATTACK_BENCH_THREADS", 2);
    let batch = env_usize("MERGEATTACK_BENCH_BATCH", 32);
    let opts = RuntimeOptions { threads, batch_size: batch, ..Default::default() };
    if let Ok(ab) = std::env::var("MERGEATTACK_BENCH_AB") {
        ab_compare(&cfg, &opts, batch, &ab);
        std::process::exit(0);
    }
    if let Ok(mode) = std::env::var("MERGEATTACK_BENCH_MEMORY") {
        memory_only(&cfg, &opts, batch, mode == "fed");
        std::process::exit(0);
    }
    let (params, head) = random_model(&cfg);
    let x = images(batch, &cfg);
    let labels: Vec<usize> = (0..batch).map(|i| i % CLASSES).collect();
    let mut phases = Vec::new();
    let mut phase = |name: &str| {
        phases.push(format!("{name}={:.0}MB", status_mb("VmRSS:").unwrap_or(f64::NAN)));
    };
    phase("random_weights");

    // Session creation (graph bytes cached after the first model; weights bound per model).
    let mut creation = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut m = Model::from_params(cfg.clone(), &params, head.view(), opts.clone(), "random ViT-B/32").unwrap();
        m.warm_up().unwrap();
        creation.push(t.elapsed());
    }
    creation.sort();
    phase("after_3_session_creations");
    let mut model = Model::from_params(cfg.clone(), &params, head.view(), opts.clone(), "random ViT-B/32").unwrap();
    phase("weights_bound");
    model.logits(x.view()).unwrap();
    phase("forward_session_and_run");
    let t = Instant::now();
    model.loss_grad(x.view(), &labels).unwrap();
    let grad_session = t.elapsed();
    phase("grad_session_and_run");

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(batch as u64));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(3));
    g.measurement_time(Duration::from_secs(15));
    g.bench_function("forward", |b| b.iter(|| black_box(model.logits(x.view()).unwrap())));
    g.bench_function("forward_input_grad", |b| b.iter(|| black_box(model.loss_grad(x.view(), &labels).unwrap())));
    g.finish();
    println!(
        "engine-summary threads={threads} batch={batch} session_creation_s={:.3} first_grad_call_s={:.3} peak_rss_mb={:.0}",
        creation[1].as_secs_f64(),
        grad_session.as_secs_f64(),
        status_mb("VmHWM:").unwrap_or(f64::NAN)
    );
    println!("engine-memory {}", phases.join(" "));
}

criterion_group!(benches, engine);
criterion_main!(benches);
