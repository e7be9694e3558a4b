//! The mini suite on the real sources. These tests rely on the cache being set up:
//! `scripts/test.sh` runs `mergeattack setup` before `cargo test` (unit tests never use the
//! network). Split sizes, class counts, determinism, disjointness, and a corrupt cache file.

use std::collections::HashSet;

use mergeattack_harness::data::mini::{self, Split};
use mergeattack_harness::setup;

fn root() -> std::path::PathBuf {
    setup::cache_root(None)
}

#[test]
fn every_task_has_the_documented_splits() {
    // (task, classes, train + val, test)
    let want = [
        ("digits", 10, 8000, 2000),
        ("fashion", 10, 10_000, 2000),
        ("fashion-coarse", 4, 10_000, 2000),
        ("animals", 10, 8000, 2000),
        ("optdigits", 10, 1437, 360),
        ("textures", 3, 1800, 600),
    ];
    for (name, classes, train_val, test) in want {
        let t = mini::load(&root(), name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.test.num_classes(), classes, "{name}");
        assert_eq!(t.train.len() + t.val.len(), train_val, "{name}");
        assert_eq!(t.val.len(), mini::val_size(train_val), "{name}");
        assert_eq!(t.test.len(), test, "{name}");
        for split in [Split::Train, Split::Val, Split::Test] {
            let d = t.get(split);
            assert_eq!(d.output_size(), Some((32, 32)), "{name}");
            assert!(d.class_counts().iter().all(|&c| c > 0), "{name} {split}: a class is empty");
        }
        // Disjoint index sets.
        let a: HashSet<usize> = t.train_idx.iter().copied().collect();
        assert!(t.val_idx.iter().chain(&t.test_idx).all(|i| !a.contains(i)), "{name}");
        assert!(t.val_idx.iter().all(|i| !t.test_idx.contains(i)), "{name}");
        assert_eq!(t.train_idx.len() + t.val_idx.len() + t.test_idx.len(), train_val + test, "{name}");
    }
}

#[test]
fn splits_are_deterministic_and_pixels_in_range() {
    for name in ["digits", "textures", "emoji"] {
        let a = mini::load(&root(), name).unwrap();
        let b = mini::load(&root(), name).unwrap();
        assert_eq!(a.test_idx, b.test_idx);
        assert_eq!(a.val_idx, b.val_idx);
        assert_eq!(a.train.labels(), b.train.labels());
        let (x, y) = (a.val.batch(0..20).unwrap(), b.val.batch(0..20).unwrap());
        assert_eq!(x.images, y.images);
        assert!(x.images.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}

#[test]
fn emoji_split_by_base_and_tested_on_base_emoji_only() {
    let t = mini::load(&root(), "emoji").unwrap();
    assert_eq!(t.test.num_classes(), 8);
    // Validation and test hold one image per base emoji; train holds its bases and their variants.
    assert_eq!(t.test.len(), t.test_idx.len());
    assert_eq!(t.val.len(), t.val_idx.len());
    assert!(t.train.len() > t.train_idx.len());
    let n_base = t.train_idx.len() + t.val_idx.len() + t.test_idx.len();
    assert_eq!(n_base, 1636, "1911 base emoji minus Flags (270) and Component (5)");
    assert_eq!(t.test.len(), 327);
}

#[test]
fn corrupt_cache_file_asks_to_run_setup() {
    let a = setup::artifact("optdigits").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join(a.dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = setup::member_path(&root(), a, "digits.csv.gz");
    let mut bytes = std::fs::read(src).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(dir.join("digits.csv.gz"), bytes).unwrap();
    let msg = mini::load(cache.path(), "optdigits").unwrap_err().to_string();
    assert!(msg.contains("missing or corrupt"), "{msg}");
    assert!(msg.contains("digits.csv.gz"), "{msg}");
    assert!(msg.contains("run `mergeattack setup`"), "{msg}");
}

/// The colour-domain variants: the base task's splits and labels, each grey pixel mapped to
/// `background + (foreground - background) * g / 255` (checked in f64 against the stored bytes).
#[test]
fn colour_variants_are_their_base_tasks_recoloured() {
    assert_eq!((mini::colour_value(0, 20, 250), mini::colour_value(255, 20, 250)), (20, 250));
    for &(name, base, bg, fg) in &mini::COLOUR_VARIANTS {
        assert!(mini::TASKS.iter().any(|t| t.name == name), "{name} is not listed");
        let (v, b) = (mini::load(&root(), name).unwrap(), mini::load(&root(), base).unwrap());
        assert_eq!(v.name, name);
        assert_eq!((&v.train_idx, &v.val_idx, &v.test_idx), (&b.train_idx, &b.val_idx, &b.test_idx), "{name}");
        for split in [Split::Train, Split::Val, Split::Test] {
            let (dv, db) = (v.get(split), b.get(split));
            assert_eq!(dv.labels(), db.labels(), "{name} {split}");
            assert_eq!(dv.class_names(), db.class_names(), "{name} {split}");
            let (
                mergeattack_harness::data::Images::U8 { channels: 3, data: cv, .. },
                mergeattack_harness::data::Images::U8 { channels: 1, data: gv, .. },
            ) = (dv.images(), db.images())
            else {
                panic!("{name}: expected 3-channel colour and 1-channel grey u8 images");
            };
            assert_eq!(cv.len(), 3 * gv.len(), "{name} {split}");
            for (px, &g) in cv.chunks_exact(3).zip(gv.iter()) {
                for c in 0..3 {
                    let want = f64::from(bg[c]) + (f64::from(fg[c]) - f64::from(bg[c])) * f64::from(g) / 255.0;
                    assert!((f64::from(px[c]) - want).abs() <= 0.5 + 1e-9, "{name}: grey {g} -> {} vs {want}", px[c]);
                }
            }
        }
        // The colours differ between variants (distinct domains).
        let batch = v.test.batch(0..1).unwrap();
        assert_eq!(batch.images.shape(), &[1, 3, 32, 32]);
    }
    let pairs: std::collections::HashSet<_> = mini::COLOUR_VARIANTS.iter().map(|v| (v.2, v.3)).collect();
    assert_eq!(pairs.len(), mini::COLOUR_VARIANTS.len());
}
