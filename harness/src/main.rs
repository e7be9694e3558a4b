//! The `mergeattack` binary: parse the command line, run the command, turn any error into one
//! clear sentence on stderr and exit code 2.

use std::process::ExitCode;

fn main() -> ExitCode {
    mergeattack_harness::cli::main()
}
