//! CLIP ViT: configuration, graph builders, weights.
pub mod config;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use config::{ClipTextConfig, ClipVisionConfig, ConfigError};
