//! The `mergeattack` binary: parse the command line, run the command, turn any error into one
//! clear sentence on stderr and exit code 2.

use std::process::ExitCode;

/// Big blocks on transparent huge pages (see `hugepages`).
#[global_allocator]
static ALLOC: mergeattack_harness::hugepages::HugePages = mergeattack_harness::hugepages::HugePages;

fn main() -> ExitCode {
    mergeattack_harness::cli::main()
}
