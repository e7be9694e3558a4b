//! The mergeattack harness: everything a user touches (CLI, files, data, zoo, study, store, report).
pub mod cli;
pub mod commands;
pub mod data;
pub mod exec;
pub mod hugepages;
pub mod mergeconfig;
pub mod merging;
pub mod report;
pub mod setup;
pub mod study;
pub mod synth;
pub mod zoo;
