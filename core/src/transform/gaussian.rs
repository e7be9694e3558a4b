//! TI's Gaussian kernel and its depthwise convolution with zero 'same' padding.
//!
//! The kernel is the outer product of the N(0, 1) density sampled at `linspace(-nsig, nsig, len)`,
//! normalised to sum 1 (torchattacks `TIFGSM.gkern`, TransferAttack `TIM.generate_kernel`). An
//! outer product is separable, so the convolution runs as a row pass and a column pass with the
//! normalised 1-D factor (`K = k k^T`, `k = pdf / sum(pdf)`): 2 len instead of len^2 products per
//! pixel.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use ndarray::{Array4, ArrayView4};

use super::TransformError;

/// A separable, normalised Gaussian kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianKernel {
    /// The normalised 1-D factor k (sums to 1); the 2-D kernel is k k^T.
    pub factor: Vec<f32>,
}

impl GaussianKernel {
    /// The kernel of odd length `len` over `[-nsig, nsig]`.
    pub fn new(len: usize, nsig: f64) -> Result<Self, TransformError> {
        if len == 0 || len.is_multiple_of(2) {
            return Err(TransformError(format!("the TI kernel length must be odd, got {len}")));
        }
        if !(nsig > 0.0 && nsig.is_finite()) {
            return Err(TransformError(format!("the TI kernel's nsig must be positive, got {nsig}")));
        }
        let pts: Vec<f64> = if len == 1 {
            vec![-nsig]
        } else {
            let step = 2.0 * nsig / (len - 1) as f64;
            (0..len).map(|i| if i == len - 1 { nsig } else { -nsig + i as f64 * step }).collect()
        };
        let pdf: Vec<f64> =
            pts.iter().map(|x| libm::exp(-0.5 * x * x) / libm::sqrt(2.0 * core::f64::consts::PI)).collect();
        let sum: f64 = pdf.iter().sum();
        Ok(GaussianKernel { factor: pdf.iter().map(|p| (p / sum) as f32).collect() })
    }

    pub fn len(&self) -> usize {
        self.factor.len()
    }

    pub fn is_empty(&self) -> bool {
        self.factor.is_empty()
    }

    /// The 2-D kernel, row-major `len` x `len`, in f64.
    pub fn kernel2d(&self) -> Vec<f64> {
        let k = &self.factor;
        k.iter().flat_map(|a| k.iter().map(move |b| f64::from(*a) * f64::from(*b))).collect()
    }

    /// `K * g`: every channel of every image convolved with the kernel, zero 'same' padding.
    pub fn apply(&self, g: ArrayView4<'_, f32>) -> Array4<f32> {
        self.conv(g, false)
    }

    /// The adjoint: correlation with the flipped kernel (equal to [`apply`](Self::apply) since the
    /// kernel is symmetric, computed separately so that the identity is tested, not assumed).
    pub fn adjoint(&self, g: ArrayView4<'_, f32>) -> Array4<f32> {
        self.conv(g, true)
    }

    fn conv(&self, g: ArrayView4<'_, f32>, flip: bool) -> Array4<f32> {
        let (n, c, h, w) = g.dim();
        let mut k = self.factor.clone();
        if flip {
            k.reverse();
        }
        let p = k.len() / 2;
        let g = g.as_standard_layout();
        let src = g.as_slice().expect("standard layout");
        let mut out = vec![0.0f32; n * c * h * w];
        let mut tmp = vec![0.0f32; h * w];
        for (plane, dst) in out.chunks_mut(h * w).enumerate() {
            let s = &src[plane * h * w..(plane + 1) * h * w];
            // Rows: tmp[i][j] = sum_b k[b] s[i][j + b - p], tap by tap (same summation order as a
            // per-pixel loop over b, but contiguous and vectorisable).
            for i in 0..h {
                let row = &s[i * w..(i + 1) * w];
                let t = &mut tmp[i * w..(i + 1) * w];
                t.fill(0.0);
                for (b, &kb) in k.iter().enumerate() {
                    let j0 = p.saturating_sub(b);
                    let j1 = (w + p).saturating_sub(b).min(w);
                    if j0 >= j1 {
                        continue;
                    }
                    let src = &row[j0 + b - p..j1 + b - p];
                    for (tj, sj) in t[j0..j1].iter_mut().zip(src) {
                        *tj += kb * sj;
                    }
                }
            }
            // Columns: dst[i][j] = sum_a k[a] tmp[i + a - p][j], row by row.
            dst.fill(0.0);
            for i in 0..h {
                let a0 = p.saturating_sub(i);
                let a1 = (h + p - i).min(k.len());
                let d = &mut dst[i * w..(i + 1) * w];
                for (a, &ka) in k.iter().enumerate().take(a1).skip(a0) {
                    let r = i + a - p;
                    for (dj, tj) in d.iter_mut().zip(&tmp[r * w..(r + 1) * w]) {
                        *dj += ka * tj;
                    }
                }
            }
        }
        Array4::from_shape_vec((n, c, h, w), out).expect("shape")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::rng::stream;

    #[test]
    fn kernel_sums_to_one_and_is_symmetric() {
        let k = GaussianKernel::new(15, 3.0).unwrap();
        let k2 = k.kernel2d();
        let sum: f64 = k2.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6, "sum {sum}");
        for a in 0..15 {
            for b in 0..15 {
                assert_eq!(k2[a * 15 + b], k2[b * 15 + a]);
                assert_eq!(k2[a * 15 + b], k2[(14 - a) * 15 + (14 - b)]);
            }
        }
        // Closed form of the centre weight: 1 / (sum_i exp(-x_i^2 / 2))^2 with x_i = -3 + 3i/7.
        let s: f64 = (0..15).map(|i| libm::exp(-0.5 * libm::pow(-3.0 + 3.0 * f64::from(i) / 7.0, 2.0))).sum();
        assert!((k2[7 * 15 + 7] - 1.0 / (s * s)).abs() < 1e-7);
    }

    #[test]
    fn matches_scipy_reference_values() {
        // numpy.linspace(-3, 3, 15); scipy.stats.norm.pdf; outer product / sum (scipy 1.17.1).
        let k2 = GaussianKernel::new(15, 3.0).unwrap().kernel2d();
        for (a, b, want) in [
            (7, 7, 0.029302825115264705),
            (0, 0, 3.616255906661051e-06),
            (3, 9, 0.00466902017864328),
            (14, 6, 0.000296961487038061),
        ] {
            let got = k2[a * 15 + b];
            assert!((got - want).abs() <= 1e-6 * want, "K[{a}][{b}] = {got}, scipy {want}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(GaussianKernel::new(14, 3.0).is_err());
        assert!(GaussianKernel::new(0, 3.0).is_err());
        assert!(GaussianKernel::new(15, 0.0).is_err());
    }

    #[test]
    fn matches_direct_2d_convolution() {
        let mut rng = stream(7, &[b"ti"]);
        let k = GaussianKernel::new(7, 3.0).unwrap();
        let k2 = k.kernel2d();
        let g = random((2, 3, 9, 11), &mut rng);
        let y = k.apply(g.view());
        for ((n, c, i, j), v) in y.indexed_iter() {
            let mut want = 0.0f64;
            for a in 0..7 {
                for b in 0..7 {
                    let (r, q) = (i as isize + a as isize - 3, j as isize + b as isize - 3);
                    if (0..9).contains(&r) && (0..11).contains(&q) {
                        want += k2[a * 7 + b] * f64::from(g[[n, c, r as usize, q as usize]]);
                    }
                }
            }
            assert!((f64::from(*v) - want).abs() < 1e-6, "({n},{c},{i},{j}): {v} vs {want}");
        }
    }

    #[test]
    fn adjoint_identity() {
        let mut rng = stream(8, &[b"ti"]);
        for (len, h, w) in [(15, 12, 12), (5, 7, 20), (15, 224 / 16, 9)] {
            let k = GaussianKernel::new(len, 3.0).unwrap();
            let x = random((2, 3, h, w), &mut rng);
            let y = random((2, 3, h, w), &mut rng);
            assert_adjoint(dot(&k.apply(x.view()), &y), dot(&x, &k.adjoint(y.view())));
        }
    }
}
