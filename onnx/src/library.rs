//! Where the ONNX Runtime shared library and the tool's cache live.
//!
//! The library is the pinned `onnxruntime==1.32.0` wheel's `libonnxruntime.so.1.32.0`, fetched by
//! `mergeattack setup` (pip download, SHA-256 verified) into `<cache>/onnxruntime-1.32.0/`.

use std::path::PathBuf;

/// ONNX Runtime version the tool is built and tested against.
pub const ORT_VERSION: &str = "1.32.0";
/// The wheel that carries it (pip download --no-deps --only-binary=:all: --python-version 3.11
/// --platform manylinux_2_28_x86_64 onnxruntime==1.32.0).
pub const ORT_WHEEL: &str = "onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl";
pub const ORT_WHEEL_SHA256: &str = "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d";
/// Path of the library inside the wheel.
pub const ORT_WHEEL_MEMBER: &str = "onnxruntime/capi/libonnxruntime.so.1.32.0";
/// File name and SHA-256 of the extracted library.
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so.1.32.0";
pub const ORT_LIBRARY_SHA256: &str = "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f";

/// The tool's cache root: `$MERGEATTACK_CACHE`, else `$XDG_CACHE_HOME/mergeattack`, else
/// `$HOME/.cache/mergeattack`, else `./.mergeattack-cache`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("MERGEATTACK_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("mergeattack");
    }
    if let Some(p) = std::env::var_os("HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join(".cache").join("mergeattack");
    }
    PathBuf::from(".mergeattack-cache")
}

/// Where `mergeattack setup` puts the library.
pub fn cached_library_path() -> PathBuf {
    cache_root().join(format!("onnxruntime-{ORT_VERSION}")).join(ORT_LIBRARY_FILE)
}
