//! The attack loop's own cost (everything except the model): MI-FGSM, DI, TI and VMI on a batch of
//! 32 images of 3x224x224 with a classifier that returns a stored gradient.
//!
//! Each attack runs with 1 and with 3 steps; the per-step cost of the loop is (t3 - t1) / 2 (the
//! one-time validation, copies and quantisation cancel). `classifier_call` is the stored-gradient
//! classifier alone (one clone of the gradient), to subtract per model call: MI, DI, TI make one
//! call per step, VMI 1 + N (N = 5 under torchattacks).
//!
//! Run: `cargo bench --bench attack_loop`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mergeattack_core::attack::{AttackConfig, Preset};
use mergeattack_core::classifier::{Classifier, LossGrad, ModelError};
use mergeattack_core::rng::stream;
use ndarray::{Array1, Array2, Array4, ArrayView2, ArrayView4};
use rand::RngExt;

const N: usize = 32;
const SHAPE: (usize, usize, usize) = (3, 224, 224);
const CLASSES: usize = 10;

/// Returns the same logits, losses and gradient whatever the input.
struct Stored {
    logits: Array2<f32>,
    loss: Array1<f32>,
    grad: Array4<f32>,
}

impl Classifier for Stored {
    fn num_classes(&self) -> usize {
        CLASSES
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        SHAPE
    }
    fn logits(&mut self, _x: ArrayView4<'_, f32>) -> Result<Array2<f32>, ModelError> {
        Ok(self.logits.clone())
    }
    fn loss_grad(&mut self, _x: ArrayView4<'_, f32>, _labels: &[usize]) -> Result<LossGrad, ModelError> {
        Ok(LossGrad { logits: self.logits.clone(), loss: self.loss.clone(), grad: self.grad.clone() })
    }
    fn logits_vjp(
        &mut self,
        _x: ArrayView4<'_, f32>,
        _dlogits: ArrayView2<'_, f32>,
    ) -> Result<(Array2<f32>, Array4<f32>), ModelError> {
        Ok((self.logits.clone(), self.grad.clone()))
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = stream(1, &[b"bench", b"attack_loop"]);
    let dim = (N, SHAPE.0, SHAPE.1, SHAPE.2);
    let x = Array4::from_shape_fn(dim, |_| rng.random::<f32>());
    let mut model = Stored {
        logits: Array2::from_shape_fn((N, CLASSES), |_| rng.random::<f32>()),
        loss: Array1::from_elem(N, 1.0),
        grad: Array4::from_shape_fn(dim, |_| rng.random::<f32>() - 0.5),
    };
    let labels: Vec<usize> = (0..N).map(|i| i % CLASSES).collect();

    let mut g = c.benchmark_group("attack_loop");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    g.bench_function("classifier_call", |b| b.iter(|| black_box(model.loss_grad(x.view(), &labels).unwrap())));
    for name in ["mi-fgsm", "di-fgsm", "ti-fgsm", "vmi-fgsm"] {
        for steps in [1usize, 3] {
            let mut cfg = AttackConfig::preset(name, Preset::TorchAttacks).unwrap();
            cfg.steps = steps;
            g.bench_function(format!("{name}/steps={steps}"), |b| {
                b.iter(|| {
                    let mut r = stream(2, &[b"bench", name.as_bytes()]);
                    black_box(cfg.run(&mut model, x.view(), &labels, None, &mut r).unwrap())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
