//! IDX files (MNIST, Fashion-MNIST): big-endian magic `0 0 type ndim`, then `ndim` u32 sizes, then
//! the data. Only u8 data (type 0x08) is used by image sets. Gzipped files are read transparently.

use std::io::Read;
use std::path::Path;

use super::{DataError, Dataset, Images, io_err};

/// Read a whole file, gunzipping it when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| DataError::Format {
            path: path.display().to_string(),
            detail: format!("corrupt gzip data ({e})"),
        })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// A parsed IDX array of u8: its dimensions and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxU8 {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parse IDX bytes (already decompressed). `name` is used in messages.
pub fn parse(bytes: &[u8], name: &str) -> Result<IdxU8, DataError> {
    let bad = |detail: String| DataError::Format { path: name.to_string(), detail };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (the magic number must start with two zero bytes)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!("IDX data type 0x{:02x} is not supported (only unsigned bytes, 0x08)", bytes[2])));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 || bytes.len() < 4 + 4 * ndim {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let n: usize =
        dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad("IDX sizes overflow".into()))?;
    let body = &bytes[4 + 4 * ndim..];
    if body.len() != n {
        return Err(bad(format!("IDX header {dims:?} needs {n} data bytes, the file has {}", body.len())));
    }
    Ok(IdxU8 { dims, data: body.to_vec() })
}

/// Read an IDX file (gz or not).
pub fn read(path: &Path) -> Result<IdxU8, DataError> {
    parse(&read_maybe_gz(path)?, &path.display().to_string())
}

/// The labels file that goes with an images file: `...images-idx3...` -> `...labels-idx1...`.
pub fn labels_path_for(images: &Path) -> Option<std::path::PathBuf> {
    let name = images.file_name()?.to_str()?;
    let l = name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1");
    (l != name).then(|| images.with_file_name(l))
}

/// Images `[n, h, w]` or `[n, h, w, c]` (c 1 or 3) as u8 pixels.
pub fn images_from(idx: IdxU8, name: &str) -> Result<Images, DataError> {
    let bad = |detail: String| DataError::Format { path: name.to_string(), detail };
    let (h, w, c) = match idx.dims[..] {
        [_, h, w] => (h, w, 1),
        [_, h, w, c] if c == 1 || c == 3 => (h, w, c),
        _ => return Err(bad(format!("IDX images must be [n, h, w] or [n, h, w, 1|3], found {:?}", idx.dims))),
    };
    Ok(Images::U8 { height: h, width: w, channels: c, data: idx.data })
}

/// An IDX image set with its labels file; the class count is `classes` or max label + 1.
pub fn open(images: &Path, labels: &Path, classes: Option<usize>) -> Result<Dataset, DataError> {
    let name = images.display().to_string();
    let imgs = images_from(read(images)?, &name)?;
    let lab = read(labels)?;
    if lab.dims.len() != 1 {
        return Err(DataError::Format {
            path: labels.display().to_string(),
            detail: format!("IDX labels must be one-dimensional, found {:?}", lab.dims),
        });
    }
    let labels: Vec<i64> = lab.data.iter().map(|&l| i64::from(l)).collect();
    let n = classes.unwrap_or_else(|| labels.iter().max().map_or(0, |&m| m as usize + 1));
    Dataset::new(name, imgs, labels, Dataset::numbered_classes(n))
}
