//! ImageFolder: one sub-folder per class (sorted by name, as torchvision's `ImageFolder`), holding
//! PNG or JPEG files. Files are listed and their headers checked when the set is opened; pixels are
//! decoded one batch at a time. Unreadable files are skipped with a warning and a count, or refused
//! with `strict`.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Encoded, Images, io_err, probe};

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    v.sort();
    Ok(v)
}

fn header_ok(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_end(&mut head)).map_err(|e| e.to_string())?;
    probe(&head).map(|_| ())
}

/// Open an ImageFolder at `root`.
pub fn open(root: &Path, strict: bool) -> Result<Dataset, DataError> {
    let name = root.display().to_string();
    let classes: Vec<PathBuf> = sorted_entries(root)?.into_iter().filter(|p| p.is_dir()).collect();
    if classes.is_empty() {
        return Err(DataError::Format {
            path: name,
            detail: "no class sub-folders (expected ROOT/<class>/<image>)".into(),
        });
    }
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut unreadable = 0usize;
    let mut first_bad: Option<String> = None;
    for (ci, dir) in classes.iter().enumerate() {
        for p in sorted_entries(dir)? {
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_lowercase).unwrap_or_default();
            if !p.is_file() || !EXTENSIONS.contains(&ext.as_str()) {
                continue;
            }
            match header_ok(&p) {
                Ok(()) => {
                    files.push(Encoded::File(p));
                    labels.push(ci as i64);
                }
                Err(e) => {
                    unreadable += 1;
                    tracing::debug!("{}: unreadable ({e})", p.display());
                    first_bad.get_or_insert(format!("{} ({e})", p.display()));
                }
            }
        }
    }
    if let Some(first) = first_bad {
        if strict {
            return Err(DataError::Unreadable { path: name, count: unreadable, first });
        }
        tracing::warn!("{name}: skipped {unreadable} unreadable image file(s), first {first}");
    }
    let class_names =
        classes.iter().map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    Dataset::new(name, Images::Encoded(files), labels, class_names)
}
