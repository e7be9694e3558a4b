//! One module per subcommand.
pub mod attack;
pub mod merge;
pub mod data;
pub mod setup;
pub mod report;
pub mod export;
pub mod zoo;
