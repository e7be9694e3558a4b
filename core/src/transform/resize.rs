//! Bilinear resize with PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` rule and no
//! antialiasing, and its adjoint. Separable: the rows are resized first (along W), then the columns.
//!
//! For output index `i` of an axis resized from `in` to `out` pixels: `src = (i + 0.5) * in/out -
//! 0.5`, clamped at 0; `i0 = floor(src)`, `i1 = min(i0 + 1, in - 1)`, weights `1 - (src - i0)` and
//! `src - i0`.

use alloc::vec;
use alloc::vec::Vec;
use ndarray::{Array4, ArrayView4};

/// Interpolation taps of one axis.
#[derive(Clone, Debug)]
pub struct Axis {
    pub input: usize,
    pub output: usize,
    i0: Vec<usize>,
    i1: Vec<usize>,
    w0: Vec<f32>,
    w1: Vec<f32>,
}

impl Axis {
    /// Taps for resizing `input` pixels to `output` pixels (both at least 1).
    pub fn new(input: usize, output: usize) -> Self {
        assert!(input > 0 && output > 0, "resize axis of zero length");
        let scale = input as f32 / output as f32;
        let mut axis = Axis {
            input,
            output,
            i0: Vec::with_capacity(output),
            i1: Vec::with_capacity(output),
            w0: Vec::with_capacity(output),
            w1: Vec::with_capacity(output),
        };
        for i in 0..output {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            axis.i0.push(i0);
            axis.i1.push(i1);
            axis.w0.push(1.0 - l1);
            axis.w1.push(l1);
        }
        axis
    }
}

/// Resize one plane `src` (`ah.input` x `aw.input`, row-major) and write it into the window of
/// `dst` (row stride `stride`) whose top-left corner is (`top`, `left`). `tmp` holds at least
/// `ah.input * aw.output` values.
#[allow(clippy::too_many_arguments)]
pub fn resize_into(
    src: &[f32],
    ah: &Axis,
    aw: &Axis,
    tmp: &mut [f32],
    dst: &mut [f32],
    stride: usize,
    top: usize,
    left: usize,
) {
    let (w_in, w_out) = (aw.input, aw.output);
    for r in 0..ah.input {
        let row = &src[r * w_in..(r + 1) * w_in];
        let out = &mut tmp[r * w_out..(r + 1) * w_out];
        for j in 0..w_out {
            out[j] = aw.w0[j] * row[aw.i0[j]] + aw.w1[j] * row[aw.i1[j]];
        }
    }
    for i in 0..ah.output {
        let (a, b) = (ah.i0[i] * w_out, ah.i1[i] * w_out);
        let (wa, wb) = (ah.w0[i], ah.w1[i]);
        let out = &mut dst[(top + i) * stride + left..(top + i) * stride + left + w_out];
        for j in 0..w_out {
            out[j] = wa * tmp[a + j] + wb * tmp[b + j];
        }
    }
}

/// Adjoint of [`resize_into`]: read the window of `g` (row stride `stride`, corner (`top`, `left`),
/// `ah.output` x `aw.output`) and write `R_h^T window R_w` into `out` (`ah.input` x `aw.input`).
/// `tmp` holds at least `ah.input * aw.output` values.
#[allow(clippy::too_many_arguments)]
pub fn resize_adjoint_from(
    g: &[f32],
    stride: usize,
    top: usize,
    left: usize,
    ah: &Axis,
    aw: &Axis,
    tmp: &mut [f32],
    out: &mut [f32],
) {
    let (w_in, w_out) = (aw.input, aw.output);
    let tmp = &mut tmp[..ah.input * w_out];
    tmp.fill(0.0);
    for i in 0..ah.output {
        let row = &g[(top + i) * stride + left..(top + i) * stride + left + w_out];
        let (a, b) = (ah.i0[i] * w_out, ah.i1[i] * w_out);
        let (wa, wb) = (ah.w0[i], ah.w1[i]);
        for j in 0..w_out {
            tmp[a + j] += wa * row[j];
        }
        for j in 0..w_out {
            tmp[b + j] += wb * row[j];
        }
    }
    let out = &mut out[..ah.input * w_in];
    out.fill(0.0);
    for r in 0..ah.input {
        let t = &tmp[r * w_out..(r + 1) * w_out];
        let o = &mut out[r * w_in..(r + 1) * w_in];
        for j in 0..w_out {
            o[aw.i0[j]] += aw.w0[j] * t[j];
            o[aw.i1[j]] += aw.w1[j] * t[j];
        }
    }
}

/// Resize every plane of `x` (N, C, H, W) to `h` x `w`.
pub fn resize(x: ArrayView4<'_, f32>, h: usize, w: usize) -> Array4<f32> {
    let (n, c, hi, wi) = x.dim();
    let (ah, aw) = (Axis::new(hi, h), Axis::new(wi, w));
    let x = x.as_standard_layout();
    let src = x.as_slice().expect("standard layout");
    let mut out = vec![0.0f32; n * c * h * w];
    let mut tmp = vec![0.0f32; hi * w];
    for (p, dst) in out.chunks_mut(h * w).enumerate() {
        resize_into(&src[p * hi * wi..(p + 1) * hi * wi], &ah, &aw, &mut tmp, dst, w, 0, 0);
    }
    Array4::from_shape_vec((n, c, h, w), out).expect("shape")
}

/// Adjoint of [`resize`]: `g` is (N, C, h, w), the result (N, C, `h_in`, `w_in`).
pub fn resize_adjoint(g: ArrayView4<'_, f32>, h_in: usize, w_in: usize) -> Array4<f32> {
    let (n, c, h, w) = g.dim();
    let (ah, aw) = (Axis::new(h_in, h), Axis::new(w_in, w));
    let g = g.as_standard_layout();
    let src = g.as_slice().expect("standard layout");
    let mut out = vec![0.0f32; n * c * h_in * w_in];
    let mut tmp = vec![0.0f32; h_in * w];
    for (p, dst) in out.chunks_mut(h_in * w_in).enumerate() {
        resize_adjoint_from(&src[p * h * w..(p + 1) * h * w], w, 0, 0, &ah, &aw, &mut tmp, dst);
    }
    Array4::from_shape_vec((n, c, h_in, w_in), out).expect("shape")
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::rng::stream;

    /// Independent f64 bilinear sample of plane `p` at output pixel (i, j).
    fn reference(x: &Array4<f32>, n: usize, c: usize, h: usize, w: usize, i: usize, j: usize) -> f64 {
        let (_, _, hi, wi) = x.dim();
        let tap = |inp: usize, out: usize, k: usize| {
            let s = ((k as f64 + 0.5) * inp as f64 / out as f64 - 0.5).max(0.0);
            let a = libm::floor(s) as usize;
            let b = (a + 1).min(inp - 1);
            (a, b, 1.0 - (s - a as f64), s - a as f64)
        };
        let (r0, r1, hr0, hr1) = tap(hi, h, i);
        let (c0, c1, wc0, wc1) = tap(wi, w, j);
        let v = |r: usize, q: usize| f64::from(x[[n, c, r, q]]);
        hr0 * (wc0 * v(r0, c0) + wc1 * v(r0, c1)) + hr1 * (wc0 * v(r1, c0) + wc1 * v(r1, c1))
    }

    #[test]
    fn matches_the_formula_down_and_up() {
        let mut rng = stream(1, &[b"resize"]);
        let x = random((2, 3, 9, 7), &mut rng);
        for (h, w) in [(5, 6), (9, 7), (12, 15), (1, 1)] {
            let y = resize(x.view(), h, w);
            for ((n, c, i, j), v) in y.indexed_iter() {
                let want = reference(&x, n, c, h, w, i, j);
                assert!((f64::from(*v) - want).abs() < 1e-6, "({n},{c},{i},{j}) {h}x{w}: {v} vs {want}");
            }
        }
    }

    #[test]
    fn matches_scipy_zoom_fixture() {
        // scipy.ndimage.zoom(x, (h/5, w/7), order=1, grid_mode=True, mode="nearest") (scipy 1.17.1) is
        // PyTorch's bilinear with align_corners=False; x[r][c] = ((7r + c)^1.5) mod 11.
        let x = Array4::from_shape_fn((1, 1, 5, 7), |(_, _, r, c)| (libm::pow((7 * r + c) as f64, 1.5) % 11.0) as f32);
        let small = [
            1.8951477867153854,
            3.942210883064322,
            6.516466262685952,
            3.2549964559209528,
            6.400033456688707,
            8.386599454437528,
            9.583190276566274,
            3.0838544102220435,
            4.932387448178508,
            7.055854788504144,
            5.04365008006835,
            2.547964474481852,
        ];
        let y = resize(x.view(), 3, 4);
        for (g, w) in y.iter().zip(small) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
        }
        let last_row = [
            5.162073419617087,
            3.167210744472783,
            5.790662893411388,
            9.713195695145574,
            7.60069524773067,
            5.59297137575051,
            3.6589089570888347,
            1.7978330320833804,
            0.2523644247402217,
        ];
        let y = resize(x.view(), 8, 9);
        for (g, w) in y.iter().skip(63).zip(last_row) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn identity_size_is_identity() {
        let mut rng = stream(2, &[b"resize"]);
        let x = random((1, 2, 6, 6), &mut rng);
        assert_eq!(resize(x.view(), 6, 6), x);
    }

    #[test]
    fn adjoint_identity() {
        let mut rng = stream(3, &[b"resize"]);
        for (hi, wi, h, w) in [(12, 12, 10, 11), (12, 12, 13, 16), (5, 8, 8, 3)] {
            let x = random((2, 3, hi, wi), &mut rng);
            let y = random((2, 3, h, w), &mut rng);
            let lhs = dot(&resize(x.view(), h, w), &y);
            let rhs = dot(&x, &resize_adjoint(y.view(), hi, wi));
            assert_adjoint(lhs, rhs);
        }
    }
}
