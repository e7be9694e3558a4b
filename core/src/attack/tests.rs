//! Tests of the attack suite against the closed-form classifier and the f64 references.

extern crate std;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use ndarray::Array4;

use super::reference::{LogReg, Ref, assert_close64, batch};
use super::*;
use crate::rng::stream;

const SHAPE: (usize, usize, usize) = (3, 12, 12);
const DI_SHAPE: (usize, usize, usize) = (3, 20, 20);
const K: usize = 5;

fn setup(shape: (usize, usize, usize)) -> (LogReg, Array4<f32>, Vec<usize>, Vec<usize>) {
    let model = LogReg::new(11, shape, K, 0.05);
    let (x, labels) = batch(12, 3, shape, K);
    let target: Vec<usize> = labels.iter().map(|y| (y + 2) % K).collect();
    (model, x, labels, target)
}

fn cfg(name: &str, preset: Preset) -> AttackConfig {
    let mut c = AttackConfig::preset(name, preset).unwrap();
    c.quantize = Quantize::None;
    c
}

fn run(
    c: &AttackConfig,
    model: &mut LogReg,
    x: &Array4<f32>,
    labels: &[usize],
    target: Option<&[usize]>,
    seed: u64,
) -> Array4<f32> {
    let mut rng = stream(seed, &[b"attack", c.attack().name().as_bytes()]);
    c.run(model, x.view(), labels, target, &mut rng).unwrap()
}

fn linf(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

// ---- every update rule against its f64 reference (several steps, same random draws) ----

#[test]
fn fgsm_bim_pgd_match_reference() {
    let (mut m, x, labels, target) = setup(SHAPE);
    for tgt in [None, Some(target.as_slice())] {
        let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
        let eps = 8.0 / 255.0;
        let want = r.fgsm(eps);
        let got = run(&cfg("fgsm", Preset::TorchAttacks), &mut m.clone(), &x, &labels, tgt, 1);
        assert_close64(&got, &want, 1e-6, "fgsm");
        let want = r.bim(eps, 2.0 / 255.0, 10, None);
        let got = run(&cfg("bim", Preset::TorchAttacks), &mut m.clone(), &x, &labels, tgt, 1);
        assert_close64(&got, &want, 1e-6, "bim");
        let c = cfg("pgd", Preset::TorchAttacks);
        let mut rng = stream(2, &[b"attack", b"pgd"]);
        let want = r.bim(eps, 2.0 / 255.0, 10, Some(&mut rng));
        let got = run(&c, &mut m, &x, &labels, tgt, 2);
        assert_close64(&got, &want, 1e-6, "pgd");
    }
}

#[test]
fn pgd_l2_matches_reference() {
    let (m, x, labels, target) = setup(SHAPE);
    for tgt in [None, Some(target.as_slice())] {
        let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
        let mut rng = stream(3, &[b"attack", b"pgd-l2"]);
        let want = r.pgd_l2(1.0, 0.2, 10, &mut rng);
        let got = run(&cfg("pgd-l2", Preset::TorchAttacks), &mut m.clone(), &x, &labels, tgt, 3);
        assert_close64(&got, &want, 1e-6, "pgd-l2");
    }
}

#[test]
fn mi_ni_match_reference_both_presets() {
    let (m, x, labels, target) = setup(SHAPE);
    for preset in Preset::ALL {
        for tgt in [None, Some(target.as_slice())] {
            let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
            for (name, nes) in [("mi-fgsm", false), ("ni-fgsm", true)] {
                let c = cfg(name, preset);
                let mut rng = stream(4, &[b"unused"]);
                let want = r.momentum(c.eps, c.alpha, 10, 1.0, nes, None, None, &mut rng);
                let got = run(&c, &mut m.clone(), &x, &labels, tgt, 4);
                assert_close64(&got, &want, 1e-6, name);
            }
        }
    }
}

#[test]
fn di_matches_reference_shrink_and_expand() {
    let (m, x, labels, target) = setup(DI_SHAPE);
    for (preset, expand, rate, mu) in
        [(Preset::TorchAttacks, false, 0.9, 0.0), (Preset::TransferAttack, true, 1.1, 1.0)]
    {
        for tgt in [None, Some(target.as_slice())] {
            let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
            let c = cfg("di-fgsm", preset);
            assert_eq!((c.mu, c.di_prob), (mu, 0.5));
            let mut rng = stream(5, &[b"attack", b"di-fgsm"]);
            let want = r.momentum(c.eps, c.alpha, 10, mu, false, Some((expand, rate, 0.5)), None, &mut rng);
            let got = run(&c, &mut m.clone(), &x, &labels, tgt, 5);
            assert_close64(&got, &want, 1e-6, preset.name());
        }
    }
}

#[test]
fn ti_matches_reference_with_and_without_di() {
    let (m, x, labels, _) = setup(DI_SHAPE);
    let r = Ref::new(&m, &x, &labels, false);
    let c = cfg("ti-fgsm", Preset::TorchAttacks);
    let mut rng = stream(6, &[b"attack", b"ti-fgsm"]);
    let want = r.momentum(c.eps, c.alpha, 10, 0.0, false, Some((false, 0.9, 0.5)), Some((15, 3.0)), &mut rng);
    assert_close64(&run(&c, &mut m.clone(), &x, &labels, None, 6), &want, 1e-6, "ti torchattacks");
    let c = cfg("ti-fgsm", Preset::TransferAttack);
    let want = r.momentum(c.eps, c.alpha, 10, 1.0, false, None, Some((15, 3.0)), &mut rng);
    assert_close64(&run(&c, &mut m.clone(), &x, &labels, None, 6), &want, 1e-6, "ti transferattack");
}

#[test]
fn vmi_vni_match_reference() {
    let (m, x, labels, target) = setup(SHAPE);
    for preset in Preset::ALL {
        for tgt in [None, Some(target.as_slice())] {
            let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
            for (name, nes) in [("vmi-fgsm", false), ("vni-fgsm", true)] {
                let mut c = cfg(name, preset);
                c.steps = 4;
                let la = preset == Preset::TransferAttack;
                let mut rng = stream(7, &[b"attack", name.as_bytes()]);
                let want = r.vmi(c.eps, c.alpha, 4, 1.0, c.neighbours, 1.5, nes, la, &mut rng);
                let got = run(&c, &mut m.clone(), &x, &labels, tgt, 7);
                assert_close64(&got, &want, 1e-6, name);
            }
        }
    }
}

#[test]
fn si_ni_matches_reference() {
    let (m, x, labels, target) = setup(SHAPE);
    for tgt in [None, Some(target.as_slice())] {
        let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
        let c = cfg("si-ni-fgsm", Preset::TorchAttacks);
        let want = r.si_ni(c.eps, c.alpha, 10, 1.0, 5);
        assert_close64(&run(&c, &mut m.clone(), &x, &labels, tgt, 8), &want, 1e-6, "si-ni");
    }
}

#[test]
fn cw_matches_reference_and_fools() {
    let (m, x, labels, target) = setup(SHAPE);
    for tgt in [None, Some(target.as_slice())] {
        let r = Ref::new(&m, &x, tgt.unwrap_or(&labels), tgt.is_some());
        let c = cfg("cw-l2", Preset::TorchAttacks);
        let want = r.cw(50, 1.0, 0.0, 0.01);
        let got = run(&c, &mut m.clone(), &x, &labels, tgt, 9);
        assert_close64(&got, &want, 2e-6, "cw");
        // At least one image changed, and every changed image is fooled.
        let z = m.clone().logits(got.view()).unwrap();
        let mut changed = 0;
        for i in 0..3 {
            if got.index_axis(ndarray::Axis(0), i) != x.index_axis(ndarray::Axis(0), i) {
                changed += 1;
                let row = z.row(i);
                let pred = (0..K).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                match tgt {
                    None => assert_ne!(pred, labels[i]),
                    Some(t) => assert_eq!(pred, t[i]),
                }
            }
        }
        assert!(changed > 0, "C&W fooled nothing");
    }
}

// ---- invariants ----

#[test]
fn budgets_and_pixel_range_hold_for_every_attack_and_preset() {
    let (m, x, labels, target) = setup(DI_SHAPE);
    for a in registry() {
        for preset in Preset::ALL {
            for tgt in [None, Some(target.as_slice())] {
                for q in [Quantize::None, Quantize::Floor] {
                    let mut c = cfg(a.name(), preset);
                    c.quantize = q;
                    if c.neighbours > 5 {
                        c.neighbours = 5;
                    }
                    let adv = run(&c, &mut m.clone(), &x, &labels, tgt, 10);
                    assert!(adv.iter().all(|v| (0.0..=1.0).contains(v)), "{} out of [0,1]", a.name());
                    // Quantisation moves a pixel by less than 1/255 on top of the budget.
                    let slack = if q == Quantize::None { 0.0 } else { 1.0 / 255.0 };
                    match a.norm() {
                        Norm::Linf => {
                            let d = linf(&adv, &x);
                            assert!(d <= c.eps as f32 + 1e-7 + slack, "{} [{}]: linf {d}", a.name(), preset.name());
                            assert!(d > 0.0, "{} did nothing", a.name());
                        }
                        Norm::L2 if q == Quantize::None => {
                            for i in 0..x.dim().0 {
                                let s: f64 = adv
                                    .index_axis(ndarray::Axis(0), i)
                                    .iter()
                                    .zip(x.index_axis(ndarray::Axis(0), i))
                                    .map(|(p, q)| f64::from(p - q).powi(2))
                                    .sum();
                                assert!(libm::sqrt(s) <= c.eps * (1.0 + 1e-6), "pgd-l2 norm {}", libm::sqrt(s));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

#[test]
fn fgsm_is_one_bim_step_with_alpha_eps() {
    let (m, x, labels, _) = setup(SHAPE);
    let f = run(&cfg("fgsm", Preset::TorchAttacks), &mut m.clone(), &x, &labels, None, 1);
    let mut b = cfg("bim", Preset::TorchAttacks);
    b.steps = 1;
    b.alpha = b.eps;
    assert_eq!(f, run(&b, &mut m.clone(), &x, &labels, None, 1));
}

#[test]
fn zero_eps_leaves_images_unchanged() {
    let (m, x, labels, _) = setup(DI_SHAPE);
    // Pixels on the 8-bit grid, so that quantisation is the identity too.
    let x = x.mapv(|v| libm::floorf(v * 255.0) / 255.0);
    for a in registry().iter().filter(|a| a.norm() != Norm::Unbounded) {
        for preset in Preset::ALL {
            let mut c = AttackConfig::preset(a.name(), preset).unwrap();
            c.eps = 0.0;
            assert_eq!(run(&c, &mut m.clone(), &x, &labels, None, 2), x, "{}", a.name());
        }
    }
}

#[test]
fn same_seed_same_bits_other_seed_other_draws() {
    let (m, x, labels, _) = setup(DI_SHAPE);
    for name in ["pgd", "pgd-l2", "di-fgsm", "vmi-fgsm"] {
        let c = cfg(name, Preset::TorchAttacks);
        let a = run(&c, &mut m.clone(), &x, &labels, None, 3);
        let b = run(&c, &mut m.clone(), &x, &labels, None, 3);
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}");
        let d = run(&c, &mut m.clone(), &x, &labels, None, 4);
        assert_ne!(a, d, "{name} ignores its seed");
    }
}

#[test]
fn attacks_raise_the_loss() {
    let (m, x, labels, target) = setup(SHAPE);
    let ce = |adv: &Array4<f32>, l: &[usize]| -> f32 { m.clone().loss_grad(adv.view(), l).unwrap().loss.sum() };
    for name in ["fgsm", "bim", "pgd", "mi-fgsm", "ni-fgsm", "vmi-fgsm", "si-ni-fgsm"] {
        let c = cfg(name, Preset::TorchAttacks);
        let adv = run(&c, &mut m.clone(), &x, &labels, None, 5);
        assert!(ce(&adv, &labels) > ce(&x, &labels), "{name} untargeted");
        let adv = run(&c, &mut m.clone(), &x, &labels, Some(&target), 5);
        assert!(ce(&adv, &target) < ce(&x, &target), "{name} targeted");
    }
}

// ---- quantisation ----

#[test]
fn quantisation_floor_round_none() {
    let mut a = Array4::from_shape_vec((1, 1, 1, 5), alloc::vec![0.0, 1.0, 0.5, 3.7 / 255.0, 3.2 / 255.0]).unwrap();
    let orig = a.clone();
    let mut b = a.clone();
    Quantize::Floor.apply(&mut a);
    assert_eq!(a.as_slice().unwrap(), &[0.0, 1.0, 127.0 / 255.0, 3.0 / 255.0, 3.0 / 255.0]);
    Quantize::Round.apply(&mut b);
    assert_eq!(b.as_slice().unwrap(), &[0.0, 1.0, 128.0 / 255.0, 4.0 / 255.0, 3.0 / 255.0]);
    let mut c = orig.clone();
    Quantize::None.apply(&mut c);
    assert_eq!(c, orig);
    // Every 8-bit value survives floor quantisation.
    let mut grid = Array4::from_shape_fn((1, 1, 1, 256), |(_, _, _, k)| k as f32 / 255.0);
    let g0 = grid.clone();
    Quantize::Floor.apply(&mut grid);
    assert_eq!(grid, g0);
}

// ---- validation ----

fn err(c: &AttackConfig, m: &mut LogReg, x: &Array4<f32>, labels: &[usize], target: Option<&[usize]>) -> String {
    let mut rng = stream(0, &[b"x"]);
    format!("{}", c.run(m, x.view(), labels, target, &mut rng).unwrap_err())
}

#[test]
fn bad_inputs_are_named() {
    let (mut m, x, labels, _) = setup(SHAPE);
    let c = cfg("mi-fgsm", Preset::TorchAttacks);
    let mut bad = c.clone();
    bad.eps = -0.1;
    assert!(err(&bad, &mut m, &x, &labels, None).contains("`eps` = -0.1"));
    bad.eps = 2.0;
    assert!(err(&bad, &mut m, &x, &labels, None).contains("in [0, 1]"));
    let mut l2 = cfg("pgd-l2", Preset::TorchAttacks);
    l2.eps = 2.0;
    let mut rng = stream(0, &[b"x"]);
    assert!(l2.run(&mut m, x.view(), &labels, None, &mut rng).is_ok(), "L2 eps may exceed 1");
    let mut bad = c.clone();
    bad.steps = 0;
    assert!(err(&bad, &mut m, &x, &labels, None).contains("`steps`"));
    assert!(err(&c, &mut m, &x, &[0, 1, 9], None).contains("labels[2] = 9"));
    assert!(err(&c, &mut m, &x, &labels, Some(&[0, 7, 1])).contains("target labels[1] = 7"));
    assert!(err(&c, &mut m, &x, &[0, 1], None).contains("2 labels were given for a batch of 3"));
    let mut nan = x.clone();
    nan[[1, 2, 3, 4]] = f32::NAN;
    assert!(err(&c, &mut m, &nan, &labels, None).contains("image 1 has pixel (c=2, y=3, x=4) = NaN"));
    let mut big = x.clone();
    big[[0, 0, 0, 1]] = 1.5;
    assert!(err(&c, &mut m, &big, &labels, None).contains("outside [0, 1]"));
    let empty = Array4::<f32>::zeros((0, 3, 12, 12));
    assert!(err(&c, &mut m, &empty, &[], None).contains("empty"));
    let other = Array4::<f32>::zeros((3, 3, 10, 12));
    assert!(
        err(&c, &mut m, &other, &labels, None).contains("images are 3x10x12 (CxHxW) but the model expects 3x12x12")
    );
    let mut di = cfg("di-fgsm", Preset::TransferAttack);
    di.resize_rate = 0.9;
    assert!(err(&di, &mut m, &x, &labels, None).contains("resize-rate"));
}

#[test]
fn names_presets_and_overrides() {
    assert_eq!(lookup("MI_FGSM").unwrap().name(), "mi-fgsm");
    assert_eq!(lookup("i-fgsm").unwrap().name(), "bim");
    assert!(format!("{}", lookup("nope").err().unwrap()).contains("unknown attack `nope`"));
    assert_eq!(Preset::parse("TransferAttack").unwrap(), Preset::TransferAttack);
    assert!(Preset::parse("foolbox").is_err());
    let mut c = AttackConfig::preset("vni-fgsm", Preset::TransferAttack).unwrap();
    assert_eq!(
        c.describe(),
        "eps=16/255 alpha=1.6/255 steps=10 mu=1 neighbours=20 beta=1.5 around=look-ahead quantize=floor"
    );
    c.set("eps", "4/255").unwrap();
    c.set("N", "7").unwrap();
    c.set("decay", "0.5").unwrap();
    c.set("quantize", "round").unwrap();
    assert_eq!((c.eps, c.neighbours, c.mu, c.quantize), (4.0 / 255.0, 7, 0.5, Quantize::Round));
    let e = c.set("kappa", "1").unwrap_err();
    assert!(format!("{e}").contains("attack `vni-fgsm` has no parameter `kappa`"), "{e}");
    assert!(format!("{}", c.set("eps", "x").unwrap_err()).contains("`eps` = `x` is not a number"));
    let d = AttackConfig::preset("di-fgsm", Preset::TorchAttacks).unwrap();
    assert_eq!(
        d.describe(),
        "eps=8/255 alpha=2/255 steps=10 mu=0 di-prob=0.5 di-variant=shrink resize-rate=0.9 quantize=floor"
    );
    assert_eq!(AttackConfig::preset("fgsm", Preset::TorchAttacks).unwrap().describe(), "eps=8/255 quantize=floor");
    for a in STUDY_DEFAULT {
        lookup(a).unwrap();
    }
}

// ---- ensemble ----

#[test]
fn ensemble_of_one_is_the_model_and_modes_differ() {
    let (m, x, labels, _) = setup(SHAPE);
    let mut a = m.clone();
    let single = a.loss_grad(x.view(), &labels).unwrap();
    let mut b = m.clone();
    let mut e = Ensemble::new(alloc::vec![&mut b as &mut dyn Classifier], EnsembleMode::Logits).unwrap();
    let one = e.loss_grad(x.view(), &labels).unwrap();
    for (p, q) in one.grad.iter().zip(&single.grad) {
        assert!((p - q).abs() <= 1e-5 * q.abs() + 1e-7, "{p} vs {q}");
    }
    // Two different models: logit averaging is the CE of the mean logits (a closed form with the
    // f64 reference), loss averaging is the mean of the gradients.
    let m2 = LogReg::new(99, SHAPE, K, 0.05);
    let (mut p, mut q) = (m.clone(), m2.clone());
    let mut e = Ensemble::new(alloc::vec![&mut p as &mut dyn Classifier, &mut q], EnsembleMode::Logits).unwrap();
    let lg = e.loss_grad(x.view(), &labels).unwrap();
    let avg = LogReg {
        w: m.w.iter().zip(&m2.w).map(|(a, b)| 0.5 * (a + b)).collect(),
        b: m.b.iter().zip(&m2.b).map(|(a, b)| 0.5 * (a + b)).collect(),
        ..m.clone()
    };
    let want = avg.clone().loss_grad(x.view(), &labels).unwrap();
    for (p, q) in lg.grad.iter().zip(&want.grad) {
        assert!((p - q).abs() <= 1e-6);
    }
    let (mut p, mut q) = (m.clone(), m2.clone());
    let mut e = Ensemble::new(alloc::vec![&mut p as &mut dyn Classifier, &mut q], EnsembleMode::Losses).unwrap();
    let ll = e.loss_grad(x.view(), &labels).unwrap();
    let g1 = m.clone().loss_grad(x.view(), &labels).unwrap().grad;
    let g2 = m2.clone().loss_grad(x.view(), &labels).unwrap().grad;
    for ((p, a), b) in ll.grad.iter().zip(&g1).zip(&g2) {
        assert!((p - 0.5 * (a + b)).abs() <= 1e-6);
    }
    // Attacks run on an ensemble.
    let (mut p, mut q) = (m.clone(), m2.clone());
    let mut e = Ensemble::new(alloc::vec![&mut p as &mut dyn Classifier, &mut q], EnsembleMode::Logits).unwrap();
    let mut rng = stream(1, &[b"e"]);
    let adv = cfg("mi-fgsm", Preset::TorchAttacks).run(&mut e, x.view(), &labels, None, &mut rng).unwrap();
    let mut avg2 = avg.clone();
    let mut rng = stream(1, &[b"e"]);
    let want = cfg("mi-fgsm", Preset::TorchAttacks).run(&mut avg2, x.view(), &labels, None, &mut rng).unwrap();
    assert!(linf(&adv, &want) <= 1e-6);
    // Mismatched models are refused.
    let mut r = LogReg::new(1, SHAPE, K + 1, 0.05);
    let mut s = m.clone();
    assert!(Ensemble::new(alloc::vec![&mut s as &mut dyn Classifier, &mut r], EnsembleMode::Logits).is_err());
}

// ---- golden outputs ----

/// FNV-1a 64 over the 8-bit codes of the quantised output.
fn code_hash(a: &Array4<f32>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in a.iter() {
        h ^= libm::rintf(v * 255.0) as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const GOLDEN: &str = include_str!("golden.txt");

#[test]
fn golden_outputs() {
    let (m, x, labels, _) = setup(DI_SHAPE);
    let mut lines = Vec::new();
    for a in registry() {
        for preset in Preset::ALL {
            let mut c = AttackConfig::preset(a.name(), preset).unwrap();
            c.steps = c.steps.min(5);
            c.neighbours = c.neighbours.min(4);
            let adv = run(&c, &mut m.clone(), &x, &labels, None, 2026);
            let first: Vec<String> = adv.iter().take(3).map(|v| format!("{}", libm::rintf(v * 255.0) as u32)).collect();
            lines.push(format!("{} {} {:016x} {}", a.name(), preset.name(), code_hash(&adv), first.join(",")));
        }
    }
    let got = lines.join("\n") + "\n";
    if std::env::var_os("MERGEATTACK_BLESS").is_some() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/src/attack/golden.txt"), &got).unwrap();
        return;
    }
    assert_eq!(got, GOLDEN, "golden outputs changed; rerun with MERGEATTACK_BLESS=1 if on purpose");
}
