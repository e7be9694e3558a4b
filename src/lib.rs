//! Helpers shared by the end-to-end tests (`tests/`) and benchmarks (`benches/`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of the `mergeattack` binary built with the same profile as the running test, building it
/// once per test process if needed.
pub fn mergeattack_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>").to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "mergeattack-harness", "--bin", "mergeattack"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the mergeattack binary");
        assert!(status.success(), "building the mergeattack binary failed");
        profile_dir.join(format!("mergeattack{}", std::env::consts::EXE_SUFFIX))
    })
    .clone()
}

/// Run `mergeattack` with `args`; returns (exit code, stdout, stderr).
pub fn run_cli<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(mergeattack_bin()).args(args).output().expect("spawn mergeattack");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
