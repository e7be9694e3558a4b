//! Seeded ChaCha streams.
//!
//! Every random draw in the tool comes from a stream derived from a seed and a list of labels
//! (setting, purpose, task index, tensor name...). The derivation is a fixed FNV-1a hash of the
//! labels, so the same seed and labels give the same stream on every platform and thread count.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

/// FNV-1a 64-bit over a sequence of labels, each followed by a 0xff separator.
pub fn label_hash(labels: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for label in labels {
        for &b in label.iter().chain(core::iter::once(&0xffu8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The ChaCha20 stream for `seed` and `labels`: the seed picks the key, the labels the stream id.
pub fn stream(seed: u64, labels: &[&[u8]]) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(label_hash(labels));
    rng
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    #[test]
    fn same_labels_same_stream_other_labels_other_stream() {
        let a: u64 = stream(7, &[b"dare", b"w"]).random();
        let b: u64 = stream(7, &[b"dare", b"w"]).random();
        let c: u64 = stream(7, &[b"dare", b"v"]).random();
        let d: u64 = stream(8, &[b"dare", b"w"]).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn label_boundaries_matter() {
        assert_ne!(label_hash(&[b"ab", b"c"]), label_hash(&[b"a", b"bc"]));
    }
}
