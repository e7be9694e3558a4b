//! One module per subcommand.
pub mod merge;
