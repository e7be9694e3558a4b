//! Test support: a closed-form classifier (multinomial logistic regression on flattened pixels,
//! exact gradient) and straightforward f64 reference implementations of every update rule,
//! written independently of the attack code (dense transform matrices, direct 2-D convolution,
//! plain loops). The references draw from a clone of the attack's stream with the draw order
//! METHODS.md specifies, so a wrong draw order fails the comparison.

use alloc::vec;
use alloc::vec::Vec;
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use crate::classifier::{Classifier, LossGrad, ModelError};
use crate::rng::stream;

/// z = W x + b on the flattened image, computed in f64.
#[derive(Clone)]
pub struct LogReg {
    pub w: Vec<f64>,
    pub b: Vec<f64>,
    pub k: usize,
    pub shape: (usize, usize, usize),
    pub calls: usize,
}

impl LogReg {
    pub fn new(seed: u64, shape: (usize, usize, usize), k: usize, scale: f64) -> Self {
        let mut rng = stream(seed, &[b"logreg"]);
        let d = shape.0 * shape.1 * shape.2;
        let w = (0..k * d).map(|_| scale * (2.0 * rng.random::<f64>() - 1.0)).collect();
        let b = (0..k).map(|_| rng.random::<f64>() - 0.5).collect();
        LogReg { w, b, k, shape, calls: 0 }
    }

    pub fn d(&self) -> usize {
        self.shape.0 * self.shape.1 * self.shape.2
    }

    pub fn logits64(&self, x: &[f64]) -> Vec<f64> {
        let d = self.d();
        let n = x.len() / d;
        let mut z = vec![0.0; n * self.k];
        for i in 0..n {
            for j in 0..self.k {
                let mut s = self.b[j];
                for p in 0..d {
                    s += self.w[j * d + p] * x[i * d + p];
                }
                z[i * self.k + j] = s;
            }
        }
        z
    }

    /// d/dx of sum_i sum_j dl_ij z_ij.
    pub fn vjp64(&self, dl: &[f64]) -> Vec<f64> {
        let d = self.d();
        let n = dl.len() / self.k;
        let mut g = vec![0.0; n * d];
        for i in 0..n {
            for j in 0..self.k {
                let c = dl[i * self.k + j];
                for p in 0..d {
                    g[i * d + p] += c * self.w[j * d + p];
                }
            }
        }
        g
    }

    /// Per-sample CE and d(sum CE)/dz.
    pub fn ce64(&self, z: &[f64], labels: &[usize]) -> (Vec<f64>, Vec<f64>) {
        let n = labels.len();
        let (mut loss, mut dz) = (vec![0.0; n], vec![0.0; n * self.k]);
        for i in 0..n {
            let zi = &z[i * self.k..(i + 1) * self.k];
            let mx = zi.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = zi.iter().map(|v| libm::exp(v - mx)).sum();
            loss[i] = libm::log(s) + mx - zi[labels[i]];
            for j in 0..self.k {
                dz[i * self.k + j] = libm::exp(zi[j] - mx) / s - if j == labels[i] { 1.0 } else { 0.0 };
            }
        }
        (loss, dz)
    }

    /// Gradient of the batch-mean CE (negated when targeted).
    pub fn goal_grad64(&self, x: &[f64], labels: &[usize], targeted: bool) -> Vec<f64> {
        let (_, dz) = self.ce64(&self.logits64(x), labels);
        let n = labels.len() as f64;
        let s = if targeted { -1.0 / n } else { 1.0 / n };
        self.vjp64(&dz).into_iter().map(|v| v * s).collect()
    }
}

fn flat64(x: ArrayView4<'_, f32>) -> Vec<f64> {
    x.iter().map(|v| f64::from(*v)).collect()
}

impl Classifier for LogReg {
    fn num_classes(&self) -> usize {
        self.k
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        self.shape
    }
    fn logits(&mut self, x: ArrayView4<'_, f32>) -> Result<Array2<f32>, ModelError> {
        self.calls += 1;
        let z = self.logits64(&flat64(x));
        Ok(Array2::from_shape_fn((x.dim().0, self.k), |(i, j)| z[i * self.k + j] as f32))
    }
    fn loss_grad(&mut self, x: ArrayView4<'_, f32>, labels: &[usize]) -> Result<LossGrad, ModelError> {
        self.calls += 1;
        let xf = flat64(x);
        let z = self.logits64(&xf);
        let (loss, dz) = self.ce64(&z, labels);
        let g = self.vjp64(&dz);
        Ok(LossGrad {
            logits: Array2::from_shape_fn((x.dim().0, self.k), |(i, j)| z[i * self.k + j] as f32),
            loss: loss.iter().map(|v| *v as f32).collect(),
            grad: Array4::from_shape_vec(x.dim(), g.iter().map(|v| *v as f32).collect()).unwrap(),
        })
    }
    fn logits_vjp(
        &mut self,
        x: ArrayView4<'_, f32>,
        dlogits: ArrayView2<'_, f32>,
    ) -> Result<(Array2<f32>, Array4<f32>), ModelError> {
        self.calls += 1;
        let z = self.logits64(&flat64(x));
        let dl: Vec<f64> = dlogits.iter().map(|v| f64::from(*v)).collect();
        let g = self.vjp64(&dl);
        Ok((
            Array2::from_shape_fn((x.dim().0, self.k), |(i, j)| z[i * self.k + j] as f32),
            Array4::from_shape_vec(x.dim(), g.iter().map(|v| *v as f32).collect()).unwrap(),
        ))
    }
}

/// A batch in [0.05, 0.95] (C&W's atanh stays well conditioned) and its labels.
pub fn batch(seed: u64, n: usize, shape: (usize, usize, usize), k: usize) -> (Array4<f32>, Vec<usize>) {
    let mut rng = stream(seed, &[b"batch"]);
    let x = Array4::from_shape_fn((n, shape.0, shape.1, shape.2), |_| 0.05 + 0.9 * rng.random::<f32>());
    let labels = (0..n).map(|i| (i * 3 + 1) % k).collect();
    (x, labels)
}

pub fn assert_close64(got: &Array4<f32>, want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(*g) - w).abs() <= tol, "{what}: element {i}: got {g}, reference {w}");
    }
}

// ---- reference update rules (f64, flat N x D) ----

pub struct Ref<'a> {
    pub model: &'a LogReg,
    pub x: Vec<f64>,
    pub labels: &'a [usize],
    pub targeted: bool,
    pub n: usize,
}

fn sgn(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl<'a> Ref<'a> {
    pub fn new(model: &'a LogReg, x: &Array4<f32>, labels: &'a [usize], targeted: bool) -> Self {
        Ref { model, x: flat64(x.view()), labels, targeted, n: x.dim().0 }
    }

    fn d(&self) -> usize {
        self.model.d()
    }

    pub fn grad(&self, at: &[f64]) -> Vec<f64> {
        self.model.goal_grad64(at, self.labels, self.targeted)
    }

    /// Pi(xa + alpha sign(dir)).
    fn step(&self, xa: &mut [f64], dir: &[f64], alpha: f64, eps: f64) {
        for p in 0..xa.len() {
            let a = xa[p] + alpha * sgn(dir[p]);
            let a = a.max(self.x[p] - eps).min(self.x[p] + eps);
            xa[p] = a.clamp(0.0, 1.0);
        }
    }

    /// n(g) per sample, zero guard.
    fn n_l1(&self, g: &[f64]) -> Vec<f64> {
        let d = self.d();
        let mut out = g.to_vec();
        for i in 0..self.n {
            let s = &mut out[i * d..(i + 1) * d];
            let mean = s.iter().map(|v| v.abs()).sum::<f64>() / d as f64;
            if mean > 0.0 {
                s.iter_mut().for_each(|v| *v /= mean);
            }
        }
        out
    }

    pub fn fgsm(&self, eps: f64) -> Vec<f64> {
        let g = self.grad(&self.x);
        self.x.iter().zip(&g).map(|(x, g)| (x + eps * sgn(*g)).clamp(0.0, 1.0)).collect()
    }

    pub fn bim(&self, eps: f64, alpha: f64, steps: usize, start: Option<&mut ChaCha20Rng>) -> Vec<f64> {
        let mut xa = self.x.clone();
        if let Some(rng) = start {
            for v in xa.iter_mut() {
                let u = f64::from(rng.random::<f32>());
                *v = (*v + (-eps + 2.0 * eps * u)).clamp(0.0, 1.0);
            }
        }
        for _ in 0..steps {
            let g = self.grad(&xa);
            self.step(&mut xa, &g, alpha, eps);
        }
        xa
    }

    fn l2(&self, v: &[f64], i: usize) -> f64 {
        let d = self.d();
        libm::sqrt(v[i * d..(i + 1) * d].iter().map(|a| a * a).sum())
    }

    pub fn pgd_l2(&self, eps: f64, alpha: f64, steps: usize, rng: &mut ChaCha20Rng) -> Vec<f64> {
        let d = self.d();
        let mut delta: Vec<f64> = (0..self.x.len())
            .map(|_| {
                let (u1, u2): (f64, f64) = (rng.random(), rng.random());
                // Stored as f32 by the attack.
                f64::from((libm::sqrt(-2.0 * libm::log(1.0 - u1)) * libm::cos(2.0 * core::f64::consts::PI * u2)) as f32)
            })
            .collect();
        for i in 0..self.n {
            let nrm = self.l2(&delta, i);
            let r = f64::from(rng.random::<f32>());
            delta[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= r * eps / nrm);
        }
        let mut xa: Vec<f64> = self.x.iter().zip(&delta).map(|(x, d)| (x + d).clamp(0.0, 1.0)).collect();
        for _ in 0..steps {
            let g = self.grad(&xa);
            for i in 0..self.n {
                let gn = self.l2(&g, i) + 1e-10;
                for p in i * d..(i + 1) * d {
                    xa[p] += alpha * g[p] / gn;
                }
            }
            let mut dl: Vec<f64> = xa.iter().zip(&self.x).map(|(a, x)| a - x).collect();
            for i in 0..self.n {
                let dn = self.l2(&dl, i);
                let f = if dn > eps { eps / dn } else { 1.0 };
                dl[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= f);
            }
            xa = self.x.iter().zip(&dl).map(|(x, d)| (x + d).clamp(0.0, 1.0)).collect();
        }
        xa
    }

    /// MI / NI / DI / TI in one straightforward loop.
    #[allow(clippy::too_many_arguments)]
    pub fn momentum(
        &self,
        eps: f64,
        alpha: f64,
        steps: usize,
        mu: f64,
        nesterov: bool,
        di: Option<(bool, f64, f64)>,
        ti: Option<(usize, f64)>,
        rng: &mut ChaCha20Rng,
    ) -> Vec<f64> {
        let (c, h, w) = self.model.shape;
        let mut xa = self.x.clone();
        let mut m = vec![0.0; xa.len()];
        for _ in 0..steps {
            let at: Vec<f64> =
                if nesterov { xa.iter().zip(&m).map(|(a, m)| a + alpha * mu * m).collect() } else { xa.clone() };
            let mut g = match di.and_then(|(expand, rate, prob)| di_matrix(w, expand, rate, prob, rng)) {
                Some(t) => {
                    let tx = per_plane(&at, &t, w * w, false);
                    per_plane(&self.grad(&tx), &t, w * w, true)
                }
                None => self.grad(&at),
            };
            if let Some((len, nsig)) = ti {
                g = conv2d(&g, self.n * c, h, w, len, nsig);
            }
            let ng = self.n_l1(&g);
            for p in 0..m.len() {
                m[p] = mu * m[p] + ng[p];
            }
            self.step(&mut xa, &m, alpha, eps);
        }
        xa
    }

    #[allow(clippy::too_many_arguments)]
    pub fn vmi(
        &self,
        eps: f64,
        alpha: f64,
        steps: usize,
        mu: f64,
        n_nb: usize,
        beta: f64,
        nesterov: bool,
        around_look_ahead: bool,
        rng: &mut ChaCha20Rng,
    ) -> Vec<f64> {
        let mut xa = self.x.clone();
        let mut m = vec![0.0; xa.len()];
        let mut v = vec![0.0; xa.len()];
        let radius = beta * eps;
        for _ in 0..steps {
            let at: Vec<f64> =
                if nesterov { xa.iter().zip(&m).map(|(a, m)| a + alpha * mu * m).collect() } else { xa.clone() };
            let g = self.grad(&at);
            let gv: Vec<f64> = g.iter().zip(&v).map(|(a, b)| a + b).collect();
            let ng = self.n_l1(&gv);
            for p in 0..m.len() {
                m[p] = mu * m[p] + ng[p];
            }
            let centre: Vec<f64> = if nesterov && around_look_ahead {
                xa.iter().zip(&m).map(|(a, m)| a + alpha * mu * m).collect()
            } else {
                xa.clone()
            };
            let mut acc = vec![0.0; xa.len()];
            for _ in 0..n_nb {
                let nb: Vec<f64> =
                    centre.iter().map(|c| c + (f64::from(rng.random::<f32>()) * 2.0 * radius - radius)).collect();
                for (a, gi) in acc.iter_mut().zip(self.grad(&nb)) {
                    *a += gi;
                }
            }
            for p in 0..v.len() {
                v[p] = acc[p] / n_nb as f64 - g[p];
            }
            self.step(&mut xa, &m, alpha, eps);
        }
        xa
    }

    pub fn si_ni(&self, eps: f64, alpha: f64, steps: usize, mu: f64, scales: usize) -> Vec<f64> {
        let mut xa = self.x.clone();
        let mut m = vec![0.0; xa.len()];
        for _ in 0..steps {
            let nes: Vec<f64> = xa.iter().zip(&m).map(|(a, m)| a + alpha * mu * m).collect();
            let mut acc = vec![0.0; xa.len()];
            for i in 0..scales {
                let f = 1.0 / libm::pow(2.0, i as f64);
                let scaled: Vec<f64> = nes.iter().map(|v| v * f).collect();
                for (a, g) in acc.iter_mut().zip(self.grad(&scaled)) {
                    *a += f * g / scales as f64;
                }
            }
            let ng = self.n_l1(&acc);
            for p in 0..m.len() {
                m[p] = mu * m[p] + ng[p];
            }
            self.step(&mut xa, &m, alpha, eps);
        }
        xa
    }

    pub fn cw(&self, steps: usize, c: f64, kappa: f64, lr: f64) -> Vec<f64> {
        let (d, k) = (self.d(), self.model.k);
        let lim = 1.0 - 1e-6;
        let mut w: Vec<f64> = self.x.iter().map(|v| libm::atanh((2.0 * v - 1.0).clamp(-lim, lim))).collect();
        let mut best = self.x.clone();
        let mut best_l2 = vec![1e10; self.n];
        let mut prev = 1e10;
        let (mut m1, mut m2) = (vec![0.0; w.len()], vec![0.0; w.len()]);
        for step in 0..steps {
            let xp: Vec<f64> = w.iter().map(|v| 0.5 * (libm::tanh(*v) + 1.0)).collect();
            let z = self.model.logits64(&xp);
            let mut dl = vec![0.0; self.n * k];
            let mut cost = 0.0;
            let mut l2 = vec![0.0; self.n];
            let mut ok = vec![false; self.n];
            for i in 0..self.n {
                l2[i] = (0..d).map(|p| (xp[i * d + p] - self.x[i * d + p]).powi(2)).sum::<f64>();
                let zi = &z[i * k..(i + 1) * k];
                let y = self.labels[i];
                let other = (0..k).filter(|j| *j != y).fold(None, |b: Option<usize>, j| match b {
                    Some(b) if zi[b] >= zi[j] => Some(b),
                    _ => Some(j),
                });
                let o = other.unwrap();
                let (up, down) = if self.targeted { (o, y) } else { (y, o) };
                let margin = zi[up] - zi[down];
                cost += l2[i] + c * margin.max(-kappa);
                if margin >= -kappa {
                    dl[i * k + up] += c;
                    dl[i * k + down] -= c;
                }
                let pred = (0..k).fold(0, |b, j| if zi[j] > zi[b] { j } else { b });
                ok[i] = if self.targeted { pred == y } else { pred != y };
            }
            let gm = self.model.vjp64(&dl);
            let t = (step + 1) as i32;
            for p in 0..w.len() {
                let th = libm::tanh(w[p]);
                let g = (2.0 * (xp[p] - self.x[p]) + gm[p]) * (1.0 - th * th) * 0.5;
                m1[p] = 0.9 * m1[p] + 0.1 * g;
                m2[p] = 0.999 * m2[p] + 0.001 * g * g;
                let mh = m1[p] / (1.0 - libm::pow(0.9, f64::from(t)));
                let vh = m2[p] / (1.0 - libm::pow(0.999, f64::from(t)));
                w[p] -= lr * mh / (libm::sqrt(vh) + 1e-8);
            }
            for i in 0..self.n {
                if ok[i] && best_l2[i] > l2[i] {
                    best_l2[i] = l2[i];
                    best[i * d..(i + 1) * d].copy_from_slice(&xp[i * d..(i + 1) * d]);
                }
            }
            if step % (steps / 10).max(1) == 0 {
                if cost > prev {
                    return best;
                }
                prev = cost;
            }
        }
        best
    }
}

/// 1-D bilinear matrix (out x in), PyTorch align_corners=False rule, in f64.
fn bilinear(inp: usize, out: usize) -> Vec<Vec<f64>> {
    let mut r = vec![vec![0.0; inp]; out];
    for (i, row) in r.iter_mut().enumerate() {
        let s = ((i as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
        let a = libm::floor(s) as usize;
        let b = (a + 1).min(inp - 1);
        row[a] += 1.0 - (s - a as f64);
        row[b] += s - a as f64;
    }
    r
}

/// Dense matrix of a plane resize in -> out, placed at (top, left) of a canvas x canvas plane.
fn resize2d(inp: usize, out: usize, canvas: usize, top: usize, left: usize) -> Vec<Vec<f64>> {
    let r = bilinear(inp, out);
    let mut m = vec![vec![0.0; inp * inp]; canvas * canvas];
    for i in 0..out {
        for j in 0..out {
            for a in 0..inp {
                for b in 0..inp {
                    m[(top + i) * canvas + left + j][a * inp + b] = r[i][a] * r[j][b];
                }
            }
        }
    }
    m
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    let mut c = vec![vec![0.0; m]; n];
    for i in 0..n {
        for p in 0..k {
            if a[i][p] != 0.0 {
                for j in 0..m {
                    c[i][j] += a[i][p] * b[p][j];
                }
            }
        }
    }
    c
}

/// Draw DI as METHODS.md orders it and return the dense plane matrix T (None: not applied).
fn di_matrix(w: usize, expand: bool, rate: f64, prob: f64, rng: &mut ChaCha20Rng) -> Option<Vec<Vec<f64>>> {
    let scaled = libm::floor(w as f64 * rate) as u32;
    if expand {
        let coin = f64::from(rng.random::<f32>());
        if coin > prob {
            return None;
        }
        let rnd = rng.random_range(w as u32..scaled) as usize;
        let top = rng.random_range(0..scaled - rnd as u32) as usize;
        let left = rng.random_range(0..scaled - rnd as u32) as usize;
        let first = resize2d(w, rnd, scaled as usize, top, left);
        let back = resize2d(scaled as usize, w, w, 0, 0);
        Some(matmul(&back, &first))
    } else {
        let rnd = rng.random_range(scaled..w as u32) as usize;
        let top = rng.random_range(0..(w - rnd) as u32) as usize;
        let left = rng.random_range(0..(w - rnd) as u32) as usize;
        let coin = f64::from(rng.random::<f32>());
        (coin < prob).then(|| resize2d(w, rnd, w, top, left))
    }
}

/// T v (or T^T v) for every plane of v.
fn per_plane(v: &[f64], t: &[Vec<f64>], plane: usize, transpose: bool) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for p in 0..v.len() / plane {
        let src = &v[p * plane..(p + 1) * plane];
        let dst = &mut out[p * plane..(p + 1) * plane];
        for i in 0..plane {
            for j in 0..plane {
                if transpose {
                    dst[j] += t[i][j] * src[i];
                } else {
                    dst[i] += t[i][j] * src[j];
                }
            }
        }
    }
    out
}

/// Direct 2-D 'same' convolution of every plane with the normalised Gaussian kernel.
fn conv2d(g: &[f64], planes: usize, h: usize, w: usize, len: usize, nsig: f64) -> Vec<f64> {
    let xs: Vec<f64> = (0..len).map(|i| -nsig + 2.0 * nsig * i as f64 / (len - 1) as f64).collect();
    let mut k = vec![0.0; len * len];
    for a in 0..len {
        for b in 0..len {
            k[a * len + b] = libm::exp(-0.5 * (xs[a] * xs[a] + xs[b] * xs[b]));
        }
    }
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let p = (len / 2) as isize;
    let mut out = vec![0.0; g.len()];
    for q in 0..planes {
        for i in 0..h as isize {
            for j in 0..w as isize {
                let mut acc = 0.0;
                for a in 0..len as isize {
                    for b in 0..len as isize {
                        let (r, c) = (i + a - p, j + b - p);
                        if r >= 0 && r < h as isize && c >= 0 && c < w as isize {
                            acc += k[(a * len as isize + b) as usize] * g[q * h * w + (r as usize) * w + c as usize];
                        }
                    }
                }
                out[q * h * w + i as usize * w + j as usize] = acc;
            }
        }
    }
    out
}
