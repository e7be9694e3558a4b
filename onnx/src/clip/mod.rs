//! CLIP ViT: configuration, graph builders, weights.
pub mod config;

pub use config::{ClipTextConfig, ClipVisionConfig, ConfigError};
