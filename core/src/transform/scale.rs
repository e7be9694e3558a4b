//! SI's scaled copies and VMI's uniform neighbours.
//!
//! - [`scale_copy`]: `S_i x = x / 2^i`; linear and self-adjoint, so the gradient with respect to
//!   `x` of `L(S_i x)` is `2^-i` times the model's gradient at `S_i x` ([`scale_copy`] again).
//! - [`neighbour`]: `x + r`, `r ~ U[-radius, radius]` per element, drawn in row-major (N, C, H, W)
//!   order from the attack's stream; the linear part is the identity, and so is its adjoint.

use ndarray::{Array4, ArrayView4};
use rand::Rng;
#[cfg(test)]
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
    let x = x.as_standard_layout();
    let mut out = Array4::<f32>::zeros(x.raw_dim());
    neighbour_into(x.as_slice().expect("standard layout"), radius, rng, out.as_slice_mut().expect("standard layout"));
    out
}

/// Words drawn per `fill_bytes` call of [`neighbour_into`].
const CHUNK: usize = 1024;

/// [`neighbour`] into a caller's buffer: `out[k] = x[k] + (u_k * 2 radius - radius)`, `u_k` the k-th
/// `f32` the stream yields (`rand`'s `StandardUniform`: the top 24 bits of a `u32` times 2^-24).
/// The words are drawn in bulk with `fill_bytes`, which consumes the ChaCha stream word by word
/// exactly as `next_u32` does, so the values and the stream position after the call are those of
/// one `rng.random::<f32>()` per element.
pub fn neighbour_into(x: &[f32], radius: f32, rng: &mut ChaCha20Rng, out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "neighbour_into: input and output lengths differ");
    let width = 2.0 * radius;
    let scale = 1.0 / (1u32 << 24) as f32;
    let mut bytes = [0u8; CHUNK * 4];
    for (xs, os) in x.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        let b = &mut bytes[..xs.len() * 4];
        rng.fill_bytes(b);
        for ((o, &xv), w) in os.iter_mut().zip(xs).zip(b.chunks_exact(4)) {
            let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            let u = scale * (word >> 8) as f32;
            *o = xv + (u * width - radius);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::rng::stream;
    use alloc::vec;
    use alloc::vec::Vec;

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

    #[test]
    fn bulk_draws_equal_one_random_f32_per_element_at_any_stream_position() {
        // Lengths across chunk and ChaCha block borders, started at odd word offsets, followed by
        // u64 draws: values and stream position must match the per-element reference.
        for (len, skip) in [(1usize, 0usize), (17, 3), (1023, 1), (1024, 15), (2 * 1024 + 5, 7), (5000, 63)] {
            let x: Vec<f32> = (0..len).map(|i| (i % 7) as f32 / 7.0).collect();
            let mut a = stream(11, &[b"vmi", b"bulk"]);
            let mut b = stream(11, &[b"vmi", b"bulk"]);
            for _ in 0..skip {
                let _: u32 = a.random();
                let _: u32 = b.random();
            }
            let mut got = vec![0.0f32; len];
            neighbour_into(&x, 0.03, &mut a, &mut got);
            let want: Vec<f32> = x
                .iter()
                .map(|&v| {
                    let u: f32 = b.random();
                    v + (u * 0.06 - 0.03)
                })
                .collect();
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "len {len}, skip {skip}");
            let (p, q): (u64, u64) = (a.random(), b.random());
            assert_eq!(p, q, "stream position after len {len}, skip {skip}");
        }
    }
}
