//! `mergeattack attack` end to end through the binary, on a small mini zoo (two tasks, few steps)
//! built once per test process into the target's temp folder (a rerun finds it cached): PGD on 16
//! digits crafted on the digits fine-tune and evaluated on two more checkpoints; the table, the
//! white-box success, the saved images (within eps, in [0, 1], 8-bit), byte-identical reruns, and
//! one clear sentence with exit code 2 and no output file for each bad input.
//! Needs the mini-suite cache (`scripts/test.sh` runs `mergeattack setup` first).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mergeattack_harness::data::{OpenOptions, spec::open_str};
use mergeattack_suite::run_cli;
use ndarray::Array4;

const ZOO_CONFIG: &str = "tasks = [\"digits\", \"fashion-coarse\"]\n\
pretrain_steps = 40\n\
finetune_steps = 40\n\
eval_limit = 64\n\
val_limit = 64\n\
ta_lambdas = [0.5]\n";

/// The test zoo (pretrained/, finetuned/{digits,fashion-coarse}/, heads.safetensors).
fn zoo() -> &'static Path {
    static ZOO: OnceLock<PathBuf> = OnceLock::new();
    ZOO.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("attack_cli");
        std::fs::create_dir_all(&root).unwrap();
        let cfg = root.join("zoo.toml");
        std::fs::write(&cfg, ZOO_CONFIG).unwrap();
        let out = root.join("zoo");
        let (code, _, stderr) =
            run_cli(["zoo", "build", "--reduced", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "zoo build: {stderr}");
        out
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A table row: model, role, images, acc, asr_all, asr_cc (None for n/a).
#[derive(Debug)]
struct Row {
    model: String,
    role: String,
    images: usize,
    acc: f64,
    asr_all: f64,
    asr_cc: Option<f64>,
}

fn table(stdout: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("| model"));
    let header: Vec<&str> = lines.next().expect("table header").split('|').map(str::trim).collect();
    assert_eq!(&header[1..7], &["model", "role", "images", "acc", "asr_all", "asr_cc"], "{stdout}");
    assert!(lines.next().unwrap().starts_with("|---"), "{stdout}");
    for l in lines.take_while(|l| l.starts_with('|')) {
        let c: Vec<&str> = l.split('|').map(str::trim).collect();
        rows.push(Row {
            model: c[1].into(),
            role: c[2].into(),
            images: c[3].parse().unwrap(),
            acc: c[4].parse().unwrap(),
            asr_all: c[5].parse().unwrap(),
            asr_cc: (c[6] != "n/a").then(|| c[6].parse().unwrap()),
        });
    }
    rows
}

/// A .npy file's shape and payload bytes (after the header).
fn npy(path: &Path) -> (String, Vec<usize>, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap().to_string();
    let shape_s = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape = shape_s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect();
    (header, shape, b[10 + hl..].to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The 16 clean digits the command attacks with --limit 16 (evenly spaced over the test split).
fn clean_digits(n: usize) -> (Array4<f32>, Vec<usize>) {
    let d = open_str("mini:digits", &OpenOptions::default()).unwrap();
    let idx: Vec<usize> = (0..n).map(|i| i * d.len() / n).collect();
    let b = d.subset("x", &idx).batch(0..n).unwrap();
    (b.images, b.labels)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn pgd_on_digits_transfers_and_saves_quantised_images_deterministically() {
    let z = zoo();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("adv");
    let surrogate = z.join("finetuned/digits");
    let base = |threads: &str, out: &str| {
        run_cli([
            "attack",
            "--model",
            s(&surrogate),
            "--attack",
            "pgd",
            "--data",
            "mini:digits",
            "--limit",
            "16",
            "--batch-size",
            "8",
            "--seed",
            "3",
            "--threads",
            threads,
            "--eval",
            s(&z.join("finetuned/fashion-coarse")),
            s(&z.join("pretrained")),
            "-o",
            out,
        ])
    };
    let (code, stdout, stderr) = base("2", &format!("{}/", out_dir.display()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("attack pgd [torchattacks] eps=8/255 alpha=2/255 steps=10"), "{stdout}");
    assert!(stdout.contains("head `digits`"), "the zoo's heads file and the mini task's head: {stdout}");
    let rows = table(&stdout);
    assert_eq!(rows.len(), 3, "{stdout}");
    assert_eq!(
        (rows[0].role.as_str(), rows[1].role.as_str(), rows[2].role.as_str()),
        ("surrogate", "target", "target")
    );
    assert!(rows[0].model.ends_with("finetuned/digits") && rows[2].model.ends_with("pretrained"));
    for r in &rows {
        assert_eq!(r.images, 16);
        assert!((0.0..=1.0).contains(&r.acc) && (0.0..=1.0).contains(&r.asr_all), "{r:?}");
        // Every fooled clean-correct image is a fooled image: asr_all >= asr_cc * acc.
        assert!(r.asr_all >= r.asr_cc.unwrap_or(0.0) * r.acc - 1e-9, "{r:?}");
    }
    let sur = &rows[0];
    assert!(sur.acc > 0.0, "the fine-tune classifies some digits: {stdout}");
    assert!(sur.asr_all > 1.0 - sur.acc, "white-box PGD beats the clean error: {stdout}");
    assert!(sur.asr_cc.unwrap() >= 0.75, "white-box PGD fools most clean-correct digits: {stdout}");

    // The saved images: NCHW f32, 8-bit values, in [0, 1], within eps of the clean ones.
    let mut want_files = vec!["adv.npy".to_string(), "labels.npy".to_string()];
    let (clean, labels) = clean_digits(16);
    for (i, y) in labels.iter().enumerate() {
        want_files.push(format!("{:05}_label{y}.png", i * 2000 / 16));
    }
    want_files.sort();
    assert_eq!(files_in(&out_dir), want_files);
    let (header, shape, bytes) = npy(&out_dir.join("adv.npy"));
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert_eq!(shape, vec![16, 3, 32, 32]);
    let adv = f32s(&bytes);
    let eps = 8.0f32 / 255.0;
    let mut max_d = 0.0f32;
    for (a, c) in adv.iter().zip(clean.iter()) {
        assert!((0.0..=1.0).contains(a), "pixel {a} outside [0, 1]");
        assert_eq!((a * 255.0).round() / 255.0, *a, "pixel {a} is not 8-bit");
        max_d = max_d.max((a - c).abs());
    }
    // Floor quantisation of x - eps computed in f32 can land one level lower (e.g. 7.9999995 -> 7).
    assert!(max_d <= eps + 1.0 / 255.0 + 1e-6, "max |x_adv - x| = {max_d} > eps + one 8-bit level");
    assert!(max_d >= 4.0 / 255.0, "the images were perturbed (max |delta| = {max_d})");
    let (lh, lshape, lbytes) = npy(&out_dir.join("labels.npy"));
    assert!(lh.contains("'descr': '<i8'") && lshape == vec![16]);
    let got: Vec<usize> = lbytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize).collect();
    assert_eq!(got, labels);

    // Same seed: the same bytes, whatever the thread count; -o FILE.npy writes the labels beside it.
    let file = tmp.path().join("again.npy");
    let (code, stdout2, stderr) = base("1", s(&file));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(out_dir.join("adv.npy")).unwrap());
    assert_eq!(
        std::fs::read(tmp.path().join("again.labels.npy")).unwrap(),
        std::fs::read(out_dir.join("labels.npy")).unwrap()
    );
    let strip = |t: &str| t.lines().filter(|l| l.starts_with('|')).collect::<Vec<_>>().join("\n");
    assert_eq!(strip(&stdout), strip(&stdout2));
    let mut all = files_in(tmp.path());
    all.sort();
    assert_eq!(all, vec!["adv", "again.labels.npy", "again.npy"], "no temporary files left");

    // Rewriting an earlier output directory replaces it.
    let (code, _, stderr) = base("2", &format!("{}/", out_dir.display()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(files_in(&out_dir), want_files);
    assert_eq!(files_in(tmp.path()), vec!["adv", "again.labels.npy", "again.npy"]);
}

#[test]
fn targeted_attack_reports_hits() {
    let z = zoo();
    let (code, stdout, stderr) = run_cli([
        "attack",
        "--model",
        s(&z.join("finetuned/digits")),
        "--attack",
        "bim",
        "--eps",
        "16/255",
        "--steps",
        "10",
        "--target-class",
        "3",
        "--data",
        "mini:digits",
        "--limit",
        "8",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("targeted toward class 3") && stdout.contains("eps=16/255"), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("| surrogate")).unwrap();
    let hit: f64 = line.split('|').map(str::trim).nth(7).unwrap().parse().unwrap();
    assert!(hit >= 0.5, "targeted BIM reaches class 3 on most images: {stdout}");
}

/// Runs `attack` with `args` expecting exit 2 and a message containing every `needles`; the
/// output must not exist afterwards and the folder must hold only `keep`.
fn refused(args: &[&str], needles: &[&str], out: &Path, keep: &[&str]) {
    let mut full = vec!["attack"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", s(out)]);
    let (code, stdout, stderr) = run_cli(&full);
    assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.trim_end().lines().count() == 1, "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: `{n}` not in {stderr}");
    }
    assert!(!out.exists(), "{} was written", out.display());
    let dir = out.parent().unwrap();
    let mut want: Vec<String> = keep.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(files_in(dir), want, "{args:?} left files behind");
}

#[test]
fn bad_inputs_are_one_sentence_exit_2_and_write_nothing() {
    let z = zoo();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = z.join("finetuned/digits");
    let m = s(&model);
    let out = d.join("adv.npy");
    // Inputs that live in the output folder.
    std::fs::create_dir(d.join("corrupt")).unwrap();
    std::fs::copy(z.join("pretrained/config.json"), d.join("corrupt/config.json")).unwrap();
    std::fs::write(d.join("corrupt/model.safetensors"), b"not a checkpoint").unwrap();
    // 16x16 u8 images as .npy, and as an image folder (size known only once decoded).
    let px: Vec<u8> = (0..2 * 16 * 16).map(|i| (i % 251) as u8).collect();
    let header = |descr: &str, shape: &str| {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b
    };
    let mut imgs = header("|u1", "(2, 16, 16)");
    imgs.extend_from_slice(&px);
    std::fs::write(d.join("small.npy"), imgs).unwrap();
    let mut labs = header("<i8", "(2,)");
    labs.extend_from_slice(&[1u8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    std::fs::write(d.join("labels.npy"), labs).unwrap();
    let small = Array4::from_shape_fn((1, 3, 16, 16), |(_, c, y, x)| ((c * 7 + y * 3 + x) % 17) as f32 / 16.0);
    for class in 0..10 {
        let dir = d.join("folder").join(class.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        mergeattack_harness::data::sheet::write_png(&dir.join("a.png"), &small, 1).unwrap();
    }
    let keep = ["corrupt", "folder", "labels.npy", "small.npy"];
    let npy_spec = format!("npy:{},{}", s(&d.join("small.npy")), s(&d.join("labels.npy")));
    let folder_spec = format!("folder:{}", s(&d.join("folder")));
    let heads = z.join("heads.safetensors");
    let coarse_head = format!("{}:fashion-coarse", s(&heads));
    let digits_head = format!("{}:digits", s(&heads));
    let data = ["--data", "mini:digits", "--limit", "4"];

    refused(
        &["--model", m, "--attack", "pgdd", "--data", "mini:digits"],
        &["unknown attack `pgdd`", "pgd-l2"],
        &out,
        &keep,
    );
    refused(
        &["--model", m, "--attack", "pgd", "--eps", "300/255", "--data", "mini:digits"],
        &["`eps`", "in [0, 1]"],
        &out,
        &keep,
    );
    refused(
        &["--model", m, "--attack", "cw-l2", "--eps", "8/255", "--data", "mini:digits"],
        &["`cw-l2` has no parameter `eps`"],
        &out,
        &keep,
    );
    refused(
        &["--model", m, "--attack", "pgd", "--set", "mu=1", "--data", "mini:digits"],
        &["no parameter `mu`"],
        &out,
        &keep,
    );
    // Head and data class counts differ.
    refused(
        &["--model", m, "--head", &coarse_head, "--attack", "pgd", "--data", "mini:digits"],
        &["mini:digits:test has 10 classes", "head `fashion-coarse`", "has 4"],
        &out,
        &keep,
    );
    refused(
        &["--model", m, "--head", &format!("{}:cifar", s(&heads)), "--attack", "pgd", "--data", "mini:digits"],
        &["no head for task `cifar`"],
        &out,
        &keep,
    );
    // Images of another size with no resize allowed: known from the .npy header, or only once a
    // batch is decoded (the attack has started: the staged output must vanish).
    refused(
        &["--model", m, "--head", &digits_head, "--attack", "pgd", "--data", &npy_spec, "--preprocess", "none"],
        &["16x16 images", "takes 32x32", "--preprocess none"],
        &out,
        &keep,
    );
    refused(
        &["--model", m, "--head", &digits_head, "--attack", "pgd", "--data", &folder_spec, "--preprocess", "none"],
        &["takes 32x32"],
        &out,
        &keep,
    );
    let out_dir = d.join("advdir");
    refused(
        &["--model", m, "--head", &digits_head, "--attack", "pgd", "--data", &folder_spec, "--preprocess", "none"],
        &["takes 32x32"],
        &out_dir,
        &keep,
    );
    // A heads file of several heads and data that names no task.
    refused(
        &["--model", m, "--attack", "pgd", "--data", &npy_spec],
        &["holds 2 heads (digits, fashion-coarse)", "--head FILE:TASK"],
        &out,
        &keep,
    );
    // Missing and corrupt files.
    let missing = d.join("nope.safetensors");
    let mut a = vec!["--model", s(&missing), "--attack", "pgd"];
    a.extend_from_slice(&data);
    refused(&a, &["model", "nope.safetensors", "does not exist"], &out, &keep);
    let corrupt = d.join("corrupt/model.safetensors");
    let heads_s = s(&heads).to_string();
    let mut a = vec!["--model", s(&corrupt), "--head", &heads_s, "--attack", "pgd"];
    a.extend_from_slice(&data);
    refused(&a, &["corrupt/model.safetensors", "not a valid safetensors file"], &out, &keep);
    let mut a = vec!["--model", m, "--attack", "pgd", "--eval", s(&corrupt)];
    a.extend_from_slice(&data);
    refused(&a, &["corrupt/model.safetensors"], &out, &keep);
    let mut a = vec!["--model", m, "--attack", "pgd", "--head", s(&missing)];
    a.extend_from_slice(&data);
    refused(&a, &["heads file", "nope.safetensors", "does not exist"], &out, &keep);
    let mut a = vec!["--model", m, "--attack", "pgd", "--target-class", "10"];
    a.extend_from_slice(&data);
    refused(&a, &["--target-class 10", "10 classes"], &out, &keep);
    let mut a = vec!["--model", m, "--attack", "pgd"];
    a.extend_from_slice(&data);
    refused(&a, &["expected a .npy file or a directory"], &d.join("adv.txt"), &keep);
}
