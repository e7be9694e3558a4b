//! mergeattack core: the pure arithmetic of the tool.
//!
//! `#![no_std]` + `alloc`: no I/O, no ONNX, no clocks, no threads. Merges see only named f32
//! tensors ([`tensor::ParamSet`]); attacks see only the [`classifier::Classifier`] trait. Every
//! random draw comes from a ChaCha stream derived by [`rng::stream`].
#![no_std]

extern crate alloc;

pub mod attack;
pub mod classifier;
pub mod cpu;
pub mod linalg;
pub mod merge;
pub mod metrics;
pub mod optim;
pub mod rng;
pub mod stats;
pub mod tensor;
pub mod transform;
