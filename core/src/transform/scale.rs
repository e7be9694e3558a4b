//! SI's scaled copies and VMI's uniform neighbours.
//!
//! - [`scale_copy`]: `S_i x = x / 2^i`; linear and self-adjoint, so the gradient with respect to
//!   `x` of `L(S_i x)` is `2^-i` times the model's gradient at `S_i x` ([`scale_copy`] again).
//! - [`neighbour`]: `x + r`, `r ~ U[-radius, radius]` per element, drawn in row-major (N, C, H, W)
//!   order from the attack's stream; the linear part is the identity, and so is its adjoint.

use ndarray::{Array4, ArrayView4};
use rand::RngExt;
use rand_chacha::ChaCha20Rng;

/// `x / 2^i` (exact: a power-of-two scale).
pub fn scale_copy(x: ArrayView4<'_, f32>, i: u32) -> Array4<f32> {
    let f = libm::ldexpf(1.0, -(i as i32));
    x.mapv(|v| v * f)
}

/// `x + r` with `r ~ U[-radius, radius]` per element (torch `uniform_(-radius, radius)`: `-radius +
/// 2 radius u`, `u ~ U[0, 1)`). Not clipped to [0, 1].
pub fn neighbour(x: ArrayView4<'_, f32>, radius: f32, rng: &mut ChaCha20Rng) -> Array4<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let width = 2.0 * radius;
    for v in out.iter_mut() {
        let u: f32 = rng.random();
        *v += u * width - radius;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::rng::stream;

    #[test]
    fn scale_is_self_adjoint_and_exact() {
        let mut rng = stream(9, &[b"si"]);
        let x = random((2, 3, 5, 5), &mut rng);
        let y = random((2, 3, 5, 5), &mut rng);
        for i in 0..5 {
            assert_adjoint(dot(&scale_copy(x.view(), i), &y), dot(&x, &scale_copy(y.view(), i)));
            let s = scale_copy(x.view(), i);
            for (a, b) in s.iter().zip(x.iter()) {
                assert_eq!(*a, *b / (1u32 << i) as f32);
            }
        }
    }

    #[test]
    fn neighbours_are_within_radius_and_replayable() {
        let x = Array4::<f32>::from_elem((2, 3, 4, 4), 0.5);
        let mut a = stream(10, &[b"vmi"]);
        let mut b = stream(10, &[b"vmi"]);
        let n1 = neighbour(x.view(), 0.1, &mut a);
        let n2 = neighbour(x.view(), 0.1, &mut b);
        assert_eq!(n1, n2);
        assert!(n1.iter().all(|v| (*v - 0.5).abs() <= 0.1 + 1e-7));
        // Draw order: element k uses the k-th uniform of the stream.
        let mut c = stream(10, &[b"vmi"]);
        for v in n1.iter() {
            let u: f32 = c.random();
            assert_eq!(*v, 0.5 + (u * 0.2 - 0.1));
        }
        let spread = n1.iter().map(|v| (*v - 0.5).abs()).fold(0.0f32, f32::max);
        assert!(spread > 0.05);
    }
}
