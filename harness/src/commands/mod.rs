//! One module per subcommand.
pub mod attack;
pub mod data;
pub mod export;
pub mod merge;
pub mod report;
pub mod setup;
pub mod study;
pub mod zoo;
