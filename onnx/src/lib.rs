//! ONNX for mergeattack: protobuf messages, a graph builder with reverse-mode differentiation,
//! the CLIP ViT builders, weight import/export and the ONNX Runtime session wrapper.
pub mod clip;
pub mod export;
pub mod graph;
pub mod library;
pub mod proto;
pub mod runtime;
pub mod weights;
