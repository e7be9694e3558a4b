//! Measurement, not a check: accuracy per task and time of every merge method (data-free and
//! data-dependent, with `+surgery`) on a built mini zoo, next to pretrained+head and the fine-tuned
//! models. Ignored by default (minutes of CPU); run on purpose with the zoo's directory:
//!
//!     DATAMERGE_ZOO=~/.cache/mergeattack/zoo/<key> cargo test --release -p mergeattack-suite \
//!         --test datamerge_zoo -- --ignored --nocapture
//!
//! Optional: `DATAMERGE_METHODS=fisher,regmean` (default: all), `DATAMERGE_IMAGES` (test images per
//! task, default 1000; the same unlabelled images feed AdaMerging and Surgery, as in the
//! originals), `DATAMERGE_OUT` (a file for the markdown table).

use std::path::{Path, PathBuf};
use std::time::Instant;

use mergeattack_core::merge::{MergeOutput, Params};
use mergeattack_core::rng;
use mergeattack_core::tensor::ParamSet;
use mergeattack_harness::data::mini::Split;
use mergeattack_harness::data::{DataSpec, OpenOptions, open};
use mergeattack_harness::merging::{self, Pool, Request, TaskImages};
use mergeattack_onnx::runtime::{Model, RuntimeOptions, load_head, load_hf_params, vision_config_for};
use ndarray::Array4;
use rand::RngExt;

const METHODS: &[&str] = &[
    "weight-average",
    "task-arithmetic",
    "ties",
    "dare",
    "breadcrumbs",
    "consensus",
    "tall-masks",
    "emr",
    "model-stock",
    "tsv-m",
    "iso-c",
    "iso-cts",
    "fisher",
    "regmean",
    "adamerging",
    "task-arithmetic+surgery",
    "adamerging+surgery",
];

fn images(task: &str, split: Split, limit: usize, classes: usize) -> (Array4<f32>, Vec<usize>) {
    let spec = DataSpec::Mini { task: task.into(), split };
    let ds = open(&spec, &OpenOptions { classes: Some(classes), ..Default::default() }).unwrap();
    let mut idx: Vec<usize> = (0..ds.len()).collect();
    let mut r = rng::stream(0, &[b"datamerge-zoo", split.to_string().as_bytes(), task.as_bytes()]);
    for i in (1..idx.len()).rev() {
        let j = r.random_range(0..=i);
        idx.swap(i, j);
    }
    idx.truncate(limit.min(ds.len()));
    idx.sort_unstable();
    let b = ds.subset(task.to_string(), &idx).batch(0..idx.len()).unwrap();
    (b.images, b.labels)
}

fn accuracy(m: &mut Model, x: &Array4<f32>, y: &[usize]) -> f64 {
    let (logits, _) = m.forward(x.view()).unwrap();
    let correct = logits
        .outer_iter()
        .zip(y)
        .filter(|(row, y)| {
            let best =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
            best.0 == **y
        })
        .count();
    correct as f64 / y.len() as f64
}

fn model(pool: &Pool<'_>, overlay: &ParamSet<'_>, t: usize) -> Model {
    let mut p = ParamSet::new();
    for (n, v) in pool.base.iter() {
        p.insert_view(n, v.view());
    }
    for (n, v) in overlay.iter() {
        p.insert_view(n, v.view());
    }
    Model::from_params(pool.config.clone(), &p, pool.heads[t].view(), RuntimeOptions::default(), "zoo model").unwrap()
}

#[test]
#[ignore = "measurement on a built zoo (minutes); see the module documentation"]
fn accuracy_and_time_of_every_method_on_the_mini_zoo() {
    let zoo = PathBuf::from(std::env::var("DATAMERGE_ZOO").expect("set DATAMERGE_ZOO to a built zoo directory"));
    let limit: usize = std::env::var("DATAMERGE_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let methods: Vec<String> = match std::env::var("DATAMERGE_METHODS") {
        Ok(v) => v.split(',').map(String::from).collect(),
        Err(_) => METHODS.iter().map(|s| s.to_string()).collect(),
    };
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(zoo.join("summary.json")).unwrap()).unwrap();
    let tasks: Vec<String> =
        summary["config"]["tasks"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let base_dir = zoo.join("pretrained");
    let config = vision_config_for(&base_dir, None).unwrap();
    let (base, _) = load_hf_params(&base_dir).unwrap();
    let models: Vec<ParamSet<'static>> =
        tasks.iter().map(|t| load_hf_params(&zoo.join("finetuned").join(t)).unwrap().0).collect();
    let heads = tasks.iter().map(|t| load_head(&zoo.join("heads.safetensors"), Some(t)).unwrap().1).collect();
    let names: Vec<String> = base.names().filter(|n| n.starts_with("vision_model.")).map(String::from).collect();
    let pool = Pool { config, tasks: tasks.clone(), base, models, names, heads };
    let test: Vec<(Array4<f32>, Vec<usize>)> =
        tasks.iter().enumerate().map(|(t, n)| images(n, Split::Test, limit, pool.heads[t].nrows())).collect();
    let train: Vec<Array4<f32>> =
        tasks.iter().enumerate().map(|(t, n)| images(n, Split::Train, 1000, pool.heads[t].nrows()).0).collect();
    let data: Vec<TaskImages> =
        (0..tasks.len()).map(|t| TaskImages { train: Some(train[t].clone()), test: Some(test[t].0.clone()) }).collect();

    let mut rows: Vec<(String, Vec<f64>, Option<f64>)> = Vec::new();
    let empty = ParamSet::new();
    rows.push((
        "pretrained+head".into(),
        (0..tasks.len()).map(|t| accuracy(&mut model(&pool, &empty, t), &test[t].0, &test[t].1)).collect(),
        None,
    ));
    rows.push((
        "fine-tuned".into(),
        (0..tasks.len()).map(|t| accuracy(&mut model(&pool, &pool.models[t], t), &test[t].0, &test[t].1)).collect(),
        None,
    ));
    for m in &methods {
        let params = Params::new();
        let req = Request { method: m, params: &params, seed: 0, data: &data, options: RuntimeOptions::default() };
        let t0 = Instant::now();
        let merged = match merging::merge(&pool, &req) {
            Ok(x) => x,
            Err(e) => {
                println!("{m}: {e}");
                continue;
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        if let MergeOutput::PerTask(_) = merged.weights {
            println!("{m}: per-task weights (task identity used at evaluation)");
        }
        let acc: Vec<f64> = (0..tasks.len())
            .map(|t| accuracy(&mut merged.model(&pool, t, RuntimeOptions::default()).unwrap(), &test[t].0, &test[t].1))
            .collect();
        println!("{m}: mean {:.3} in {secs:.1} s", acc.iter().sum::<f64>() / acc.len() as f64);
        rows.push((merged.method.clone(), acc, Some(secs)));
    }

    let mut md = format!(
        "Zoo `{}` ({} tasks), {} test images per task (seeded subset), 2 threads.\n\n| method |",
        zoo.file_name().unwrap().to_string_lossy(),
        tasks.len(),
        limit
    );
    for t in &tasks {
        md.push_str(&format!(" {t} |"));
    }
    md.push_str(" mean | merge time (s) |\n|---|");
    md.push_str(&"---|".repeat(tasks.len() + 2));
    md.push('\n');
    for (name, acc, secs) in &rows {
        md.push_str(&format!("| {name} |"));
        for a in acc {
            md.push_str(&format!(" {a:.3} |"));
        }
        let mean = acc.iter().sum::<f64>() / acc.len() as f64;
        md.push_str(&format!(" {mean:.3} | {} |\n", secs.map_or("-".to_string(), |s| format!("{s:.1}"))));
    }
    println!("\n{md}");
    if let Ok(out) = std::env::var("DATAMERGE_OUT") {
        std::fs::write(Path::new(&out), md).unwrap();
    }
    assert_eq!(rows.len(), methods.len() + 2, "every method merged");
}
