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

/// Why ONNX Runtime could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LibraryError {
    #[error(
        "the ONNX Runtime library was not found at {path} (run `mergeattack setup` to fetch the pinned \
         onnxruntime {ORT_VERSION}, or set ORT_DYLIB_PATH to a libonnxruntime.so of version >= 1.31)"
    )]
    Missing { path: String },
    #[error("the ONNX Runtime library at {path} could not be loaded: {detail}")]
    Load { path: String, detail: String },
}

/// The library to load: `$ORT_DYLIB_PATH` when set, else the cached pinned copy.
pub fn library_path() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => cached_library_path(),
    }
}

/// Load ONNX Runtime once per process and keep its environment alive. Safe to call many times;
/// every call after the first returns the first call's result.
pub fn init() -> Result<(), LibraryError> {
    environment().map(|_| ())
}

/// The process's ONNX Runtime environment (loading the library on first use), for
/// `ort::session::Session::builder(env)`.
pub fn environment() -> Result<&'static ort::environment::Environment, LibraryError> {
    use std::sync::OnceLock;
    static ENV: OnceLock<Result<ort::environment::Environment, LibraryError>> = OnceLock::new();
    let res = ENV.get_or_init(|| {
        let path = library_path();
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(LibraryError::Missing { path: shown });
        }
        let builder =
            ort::init_from(&path).map_err(|e| LibraryError::Load { path: shown.clone(), detail: e.to_string() })?;
        builder.with_name("mergeattack").build().map_err(|e| LibraryError::Load { path: shown, detail: e.to_string() })
    });
    res.as_ref().map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loads_the_pinned_library() {
        super::init().expect("run `mergeattack setup` first");
        super::init().expect("second init returns the first result");
    }
}
