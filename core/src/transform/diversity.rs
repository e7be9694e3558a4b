//! DI (diverse inputs): a random resize and zero pad, applied to the whole batch with one draw.
//!
//! - [`DiVariant::Shrink`] (torchattacks `DIFGSM.input_diversity`): draw `rnd ~ U{floor(rW), ...,
//!   W-1}`, then the top and left offsets in `[0, W - rnd)`, then the coin `u < p`; when the coin
//!   says so, resize to `rnd` x `rnd` and zero-pad back to `W` x `W` at the offsets.
//! - [`DiVariant::Expand`] (TransferAttack `DIM.transform`): draw the coin first and stop unless
//!   `u <= p`; then `rnd ~ U{W, ..., floor(rW)-1}` and the offsets in `[0, floor(rW) - rnd)`;
//!   resize to `rnd`, zero-pad to `floor(rW)`, and resize back to `W` (the model has a fixed input
//!   size).
//!
//! Zero padding is the value 0 in [0, 1] pixel space. Images must be square.

use alloc::format;
use alloc::vec;
use ndarray::{Array4, ArrayView4};
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use super::TransformError;
use super::resize::{Axis, resize_adjoint_from, resize_into};

/// Which reference's DI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiVariant {
    /// torchattacks: resize down to `[floor(rW), W)` and pad back to `W` (rate < 1).
    Shrink,
    /// TransferAttack: resize up to `[W, floor(rW))`, pad to `floor(rW)`, resize back (rate > 1).
    Expand,
}

impl DiVariant {
    pub fn name(self) -> &'static str {
        match self {
            DiVariant::Shrink => "shrink",
            DiVariant::Expand => "expand",
        }
    }
}

/// DI's setting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Diversity {
    pub variant: DiVariant,
    /// Resize rate r (0.9 for shrink, 1.1 for expand).
    pub rate: f64,
    /// Probability p of transforming.
    pub prob: f64,
}

/// One draw of DI for a batch at one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiDraw {
    /// Whether the transform is applied (the coin); when false the model sees `x` itself.
    pub applied: bool,
    /// The random size rnd.
    pub size: usize,
    /// Side of the padded canvas (W for shrink, floor(rW) for expand).
    pub canvas: usize,
    pub top: usize,
    pub left: usize,
}

impl Diversity {
    /// Range `[lo, hi)` of rnd and the canvas side for images of side `w`, or why DI cannot apply.
    pub fn bounds(&self, w: usize) -> Result<(usize, usize, usize), TransformError> {
        let scaled = libm::floor(w as f64 * self.rate);
        match self.variant {
            DiVariant::Shrink => {
                if !(self.rate > 0.0 && self.rate < 1.0) {
                    return Err(TransformError(format!(
                        "DI's shrink variant needs a resize rate in (0, 1), got {}",
                        self.rate
                    )));
                }
                let lo = scaled as usize;
                if lo < 1 || lo >= w {
                    return Err(TransformError(format!(
                        "DI with resize rate {} cannot shrink {w}x{w} images (no size in [{lo}, {w}))",
                        self.rate
                    )));
                }
                Ok((lo, w, w))
            }
            DiVariant::Expand => {
                if !(self.rate > 1.0 && self.rate.is_finite()) {
                    return Err(TransformError(format!(
                        "DI's expand variant needs a resize rate above 1, got {}",
                        self.rate
                    )));
                }
                let hi = scaled as usize;
                if hi <= w {
                    return Err(TransformError(format!(
                        "DI with resize rate {} cannot expand {w}x{w} images (no size in [{w}, {hi}))",
                        self.rate
                    )));
                }
                Ok((w, hi, hi))
            }
        }
    }

    /// Draw the batch's size, offsets and coin in the variant's order.
    pub fn draw(&self, w: usize, rng: &mut ChaCha20Rng) -> Result<DiDraw, TransformError> {
        let (lo, hi, canvas) = self.bounds(w)?;
        let sizes = |rng: &mut ChaCha20Rng| {
            let size = rng.random_range(lo as u32..hi as u32) as usize;
            let top = rng.random_range(0..(canvas - size) as u32) as usize;
            let left = rng.random_range(0..(canvas - size) as u32) as usize;
            (size, top, left)
        };
        Ok(match self.variant {
            DiVariant::Shrink => {
                let (size, top, left) = sizes(rng);
                let applied = f64::from(rng.random::<f32>()) < self.prob;
                DiDraw { applied, size, canvas, top, left }
            }
            DiVariant::Expand => {
                let applied = f64::from(rng.random::<f32>()) <= self.prob;
                if applied {
                    let (size, top, left) = sizes(rng);
                    DiDraw { applied, size, canvas, top, left }
                } else {
                    DiDraw { applied, size: w, canvas, top: 0, left: 0 }
                }
            }
        })
    }
}

impl DiDraw {
    /// T(x): the transformed batch (same shape as `x`).
    pub fn apply(&self, x: ArrayView4<'_, f32>) -> Array4<f32> {
        if !self.applied {
            return x.to_owned();
        }
        let (n, c, h, w) = x.dim();
        let x = x.as_standard_layout();
        let src = x.as_slice().expect("standard layout");
        let (s, k) = (self.size, self.canvas);
        let a_in = Axis::new(w, s);
        let mut out = vec![0.0f32; n * c * h * w];
        if k == w {
            let mut tmp = vec![0.0f32; w * s];
            for (p, dst) in out.chunks_mut(h * w).enumerate() {
                resize_into(&src[p * h * w..(p + 1) * h * w], &a_in, &a_in, &mut tmp, dst, w, self.top, self.left);
            }
        } else {
            let a_out = Axis::new(k, w);
            let mut tmp = vec![0.0f32; k.max(w) * s.max(w)];
            let mut canvas = vec![0.0f32; k * k];
            for (p, dst) in out.chunks_mut(h * w).enumerate() {
                canvas.fill(0.0);
                resize_into(
                    &src[p * h * w..(p + 1) * h * w],
                    &a_in,
                    &a_in,
                    &mut tmp,
                    &mut canvas,
                    k,
                    self.top,
                    self.left,
                );
                resize_into(&canvas, &a_out, &a_out, &mut tmp, dst, w, 0, 0);
            }
        }
        Array4::from_shape_vec((n, c, h, w), out).expect("shape")
    }

    /// T^T(g): the gradient with respect to `x` given the gradient `g` at T(x).
    pub fn adjoint(&self, g: ArrayView4<'_, f32>) -> Array4<f32> {
        if !self.applied {
            return g.to_owned();
        }
        let (n, c, h, w) = g.dim();
        let g = g.as_standard_layout();
        let src = g.as_slice().expect("standard layout");
        let (s, k) = (self.size, self.canvas);
        let a_in = Axis::new(w, s);
        let mut out = vec![0.0f32; n * c * h * w];
        let mut tmp = vec![0.0f32; k.max(w) * s.max(w)];
        if k == w {
            for (p, dst) in out.chunks_mut(h * w).enumerate() {
                resize_adjoint_from(
                    &src[p * h * w..(p + 1) * h * w],
                    w,
                    self.top,
                    self.left,
                    &a_in,
                    &a_in,
                    &mut tmp,
                    dst,
                );
            }
        } else {
            let a_out = Axis::new(k, w);
            let mut canvas = vec![0.0f32; k * k];
            for (p, dst) in out.chunks_mut(h * w).enumerate() {
                resize_adjoint_from(&src[p * h * w..(p + 1) * h * w], w, 0, 0, &a_out, &a_out, &mut tmp, &mut canvas);
                resize_adjoint_from(&canvas, k, self.top, self.left, &a_in, &a_in, &mut tmp, dst);
            }
        }
        Array4::from_shape_vec((n, c, h, w), out).expect("shape")
    }
}

#[cfg(test)]
mod tests {
    use super::super::resize::resize;
    use super::super::testutil::*;
    use super::*;
    use crate::rng::stream;

    const SHRINK: Diversity = Diversity { variant: DiVariant::Shrink, rate: 0.9, prob: 0.5 };
    const EXPAND: Diversity = Diversity { variant: DiVariant::Expand, rate: 1.1, prob: 0.5 };

    #[test]
    fn bounds_follow_the_references() {
        assert_eq!(SHRINK.bounds(224).unwrap(), (201, 224, 224));
        assert_eq!(EXPAND.bounds(224).unwrap(), (224, 246, 246));
        assert_eq!(SHRINK.bounds(10).unwrap(), (9, 10, 10));
        assert!(EXPAND.bounds(9).is_err());
        assert!(SHRINK.bounds(1).is_err());
        assert!(Diversity { rate: 1.1, ..SHRINK }.bounds(224).is_err());
        assert!(Diversity { rate: 0.9, ..EXPAND }.bounds(224).is_err());
    }

    #[test]
    fn draws_stay_in_range_and_coin_is_fair() {
        let mut rng = stream(4, &[b"di"]);
        let mut applied = 0;
        for _ in 0..400 {
            let d = SHRINK.draw(32, &mut rng).unwrap();
            assert!((28..32).contains(&d.size) && d.top < 32 - d.size && d.left < 32 - d.size);
            applied += usize::from(d.applied);
            let e = EXPAND.draw(32, &mut rng).unwrap();
            if e.applied {
                assert!((32..35).contains(&e.size) && e.top < 35 - e.size && e.left < 35 - e.size);
            }
        }
        assert!((150..250).contains(&applied), "coin applied {applied} of 400");
    }

    #[test]
    fn shrink_is_resize_then_pad() {
        let mut rng = stream(5, &[b"di"]);
        let x = random((2, 3, 12, 12), &mut rng);
        let d = DiDraw { applied: true, size: 10, canvas: 12, top: 1, left: 0 };
        let y = d.apply(x.view());
        let r = resize(x.view(), 10, 10);
        for ((n, c, i, j), v) in y.indexed_iter() {
            if (1..11).contains(&i) && j < 10 {
                assert_eq!(*v, r[[n, c, i - 1, j]]);
            } else {
                assert_eq!(*v, 0.0, "padding at ({i},{j})");
            }
        }
    }

    #[test]
    fn adjoint_identity_both_variants() {
        let mut rng = stream(6, &[b"di"]);
        for d in [
            DiDraw { applied: true, size: 10, canvas: 12, top: 1, left: 0 },
            DiDraw { applied: true, size: 11, canvas: 12, top: 0, left: 0 },
            DiDraw { applied: true, size: 12, canvas: 13, top: 0, left: 1 },
            DiDraw { applied: true, size: 14, canvas: 17, top: 2, left: 1 },
            DiDraw { applied: false, size: 12, canvas: 12, top: 0, left: 0 },
        ] {
            let x = random((2, 3, 12, 12), &mut rng);
            let y = random((2, 3, 12, 12), &mut rng);
            assert_adjoint(dot(&d.apply(x.view()), &y), dot(&x, &d.adjoint(y.view())));
        }
    }
}
