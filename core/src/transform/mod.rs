//! Input transforms of the transfer attacks, each with its adjoint.
//!
//! The model sees `T(x)`; the attack needs the gradient with respect to `x`, which is the adjoint
//! `T^T` applied to the model's input gradient at `T(x)`. Every transform here is linear (or affine
//! with an identity linear part) and ships its adjoint, tested with `<T x, y> = <x, T^T y>`.
//!
//! - [`resize`]: bilinear resize (PyTorch `interpolate`, `align_corners=False`, no antialias).
//! - [`diversity`]: DI's random resize and pad, in the torchattacks (shrink) and TransferAttack
//!   (expand) variants.
//! - [`gaussian`]: TI's Gaussian kernel and its depthwise 'same' convolution.
//! - [`scale`]: SI's scaling copies `x / 2^i` and VMI's uniform neighbours.

pub mod diversity;
pub mod gaussian;
pub mod resize;
pub mod scale;

use alloc::string::String;
use core::fmt;

/// A transform cannot be applied to the given image size or with the given setting.
#[derive(Clone, Debug, PartialEq)]
pub struct TransformError(pub String);

impl fmt::Display for TransformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use ndarray::Array4;
    use rand::RngExt;
    use rand_chacha::ChaCha20Rng;

    /// A random array with entries in [-1, 1).
    pub fn random(shape: (usize, usize, usize, usize), rng: &mut ChaCha20Rng) -> Array4<f32> {
        Array4::from_shape_fn(shape, |_| rng.random::<f32>() * 2.0 - 1.0)
    }

    /// <a, b> accumulated in f64.
    pub fn dot(a: &Array4<f32>, b: &Array4<f32>) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.iter().zip(b.iter()).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
    }

    /// Assert `<T x, y> = <x, T^T y>` to a relative 1e-5.
    pub fn assert_adjoint(lhs: f64, rhs: f64) {
        let scale = lhs.abs().max(rhs.abs()).max(1.0);
        assert!((lhs - rhs).abs() <= 1e-5 * scale, "<Tx,y> = {lhs} but <x,T^T y> = {rhs}");
    }
}
