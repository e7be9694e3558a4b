//! The study: its configuration, the setting keys and records, and the results store. The runner
//! (crafting, merging, evaluating) builds on these.
pub mod config;
pub mod runner;
pub mod setting;
pub mod store;

pub use config::{Setting, Shard, StudyConfig};
pub use setting::{Estimate, Metrics, Phases, SettingKey, SettingRecord};
pub use store::{RunInfo, SkippedSetting, Store, StoreError, StoredSetting, read_phases, read_skipped, read_stores};
