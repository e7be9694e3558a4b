//! One module per subcommand.
pub mod merge;
pub mod data;
pub mod setup;
