//! `.npy` arrays (NumPy format versions 1-3, C order): images as u8 or f32 (values in [0,1]),
//! shaped `[n, h, w]`, `[n, h, w, c]` or `[n, c, h, w]` with c 1 or 3; labels as any integer type.

use std::path::Path;

use super::{DataError, Dataset, Images, io_err};

/// Element type of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }
}

/// A parsed array: dtype, shape and the raw little-endian data.
#[derive(Debug, Clone)]
pub struct Npy {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'"))?;
    let rest = header[pos + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parse `.npy` bytes. `name` is used in messages.
pub fn parse(bytes: &[u8], name: &str) -> Result<Npy, DataError> {
    let bad = |detail: String| DataError::Format { path: name.to_string(), detail };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (missing the \\x93NUMPY magic)".into()));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().expect("4")) as usize, 12),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| bad("truncated .npy header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("the .npy header is not text".into()))?;
    let descr = header_value(header, "descr")
        .and_then(|r| r.strip_prefix('\'').and_then(|r| r.split('\'').next()))
        .ok_or_else(|| bad(format!("no 'descr' in the .npy header {header:?}")))?;
    let dtype = match descr {
        "|u1" | "<u1" | "u1" => Dtype::U8,
        "|i1" | "<i1" | "i1" => Dtype::I8,
        "<u2" => Dtype::U16,
        "<i2" => Dtype::I16,
        "<u4" => Dtype::U32,
        "<i4" => Dtype::I32,
        "<u8" => Dtype::U64,
        "<i8" => Dtype::I64,
        "<f4" => Dtype::F32,
        "<f8" => Dtype::F64,
        other => return Err(bad(format!("unsupported dtype '{other}' (use u8, f32 or a little-endian integer type)"))),
    };
    let fortran =
        header_value(header, "fortran_order").ok_or_else(|| bad("no 'fortran_order' in the header".into()))?;
    if fortran.starts_with("True") {
        return Err(bad("Fortran-ordered arrays are not supported (save with C order)".into()));
    }
    let shape_s = header_value(header, "shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad("no 'shape' in the header".into()))?;
    let shape = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad(format!("bad shape ({shape_s})")))?;
    let n: usize = shape.iter().product::<usize>() * dtype.size();
    let body = &bytes[start + hlen..];
    if body.len() != n {
        return Err(bad(format!("shape {shape:?} of {descr} needs {n} data bytes, the file has {}", body.len())));
    }
    Ok(Npy { dtype, shape, data: body.to_vec() })
}

pub fn read(path: &Path) -> Result<Npy, DataError> {
    parse(&std::fs::read(path).map_err(io_err(path))?, &path.display().to_string())
}

impl Npy {
    /// Integer values (labels); floats are refused.
    pub fn to_i64(&self, name: &str) -> Result<Vec<i64>, DataError> {
        let d = &self.data;
        let v: Vec<i64> = match self.dtype {
            Dtype::U8 => d.iter().map(|&b| i64::from(b)).collect(),
            Dtype::I8 => d.iter().map(|&b| i64::from(b as i8)).collect(),
            Dtype::U16 => d.chunks_exact(2).map(|c| i64::from(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::I16 => d.chunks_exact(2).map(|c| i64::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::U32 => d.chunks_exact(4).map(|c| i64::from(u32::from_le_bytes(c.try_into().expect("4")))).collect(),
            Dtype::I32 => d.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4")))).collect(),
            Dtype::U64 => d.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8")) as i64).collect(),
            Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect(),
            Dtype::F32 | Dtype::F64 => {
                return Err(DataError::Format {
                    path: name.to_string(),
                    detail: "labels must be integers, found floating point".into(),
                });
            }
        };
        Ok(v)
    }
}

/// Images from an array: u8 or f32 in [0,1]; `[n,h,w]`, `[n,h,w,c]` or `[n,c,h,w]`, c 1 or 3.
pub fn images_from(a: Npy, name: &str) -> Result<Images, DataError> {
    let bad = |detail: String| DataError::Format { path: name.to_string(), detail };
    // (h, w, c, channels-last)
    let (h, w, c, last) = match a.shape[..] {
        [_, h, w] => (h, w, 1, true),
        [_, h, w, c] if c == 1 || c == 3 => (h, w, c, true),
        [_, c, h, w] if c == 1 || c == 3 => (h, w, c, false),
        _ => return Err(bad(format!("images must be [n,h,w], [n,h,w,1|3] or [n,1|3,h,w], found {:?}", a.shape))),
    };
    let n = a.shape[0];
    match a.dtype {
        Dtype::U8 => {
            let data = if last || c == 1 {
                a.data
            } else {
                let mut d = vec![0u8; a.data.len()];
                for i in 0..n {
                    for k in 0..c {
                        for p in 0..h * w {
                            d[(i * h * w + p) * c + k] = a.data[(i * c + k) * h * w + p];
                        }
                    }
                }
                d
            };
            Ok(Images::U8 { height: h, width: w, channels: c, data })
        }
        Dtype::F32 => {
            let v: Vec<f32> = a.data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))).collect();
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !(0.0..=1.0).contains(*x)) {
                return Err(bad(format!("f32 pixel values must lie in [0,1]; element {i} is {x}")));
            }
            let data = if !last || c == 1 {
                v
            } else {
                let mut d = vec![0f32; v.len()];
                for i in 0..n {
                    for p in 0..h * w {
                        for k in 0..c {
                            d[(i * c + k) * h * w + p] = v[(i * h * w + p) * c + k];
                        }
                    }
                }
                d
            };
            Ok(Images::F32 { height: h, width: w, channels: c, data })
        }
        other => Err(bad(format!("image arrays must be u8 or f32, found {other:?}"))),
    }
}

/// An image set from an images `.npy` and a labels `.npy`; class count `classes` or max label + 1.
pub fn open(images: &Path, labels: &Path, classes: Option<usize>) -> Result<Dataset, DataError> {
    let name = images.display().to_string();
    let imgs = images_from(read(images)?, &name)?;
    let lab = read(labels)?;
    let lname = labels.display().to_string();
    if lab.shape.len() != 1 {
        return Err(DataError::Format { path: lname, detail: format!("labels must be [n], found {:?}", lab.shape) });
    }
    let labels = lab.to_i64(&lname)?;
    let n = classes.unwrap_or_else(|| labels.iter().max().map_or(0, |&m| m.max(0) as usize + 1));
    Dataset::new(name, imgs, labels, Dataset::numbered_classes(n))
}

/// Serialise a u8 or f32 array as `.npy` version 1 (used by commands that write arrays, and tests).
pub fn to_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_s = match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_u8_and_labels() {
        let b = to_bytes("|u1", &[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let a = parse(&b, "t").unwrap();
        assert_eq!(a.shape, vec![2, 2, 3]);
        assert_eq!(a.dtype, Dtype::U8);
        let l = to_bytes("<i8", &[2], &[1, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255]);
        assert_eq!(parse(&l, "l").unwrap().to_i64("l").unwrap(), vec![1, -1]);
    }

    #[test]
    fn channels_first_f32_and_out_of_range_values() {
        let v: Vec<f32> = vec![0.0, 0.5, 1.0, 0.25, 0.75, 0.125];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = parse(&to_bytes("<f4", &[1, 3, 1, 2], &bytes), "t").unwrap();
        match images_from(a, "t").unwrap() {
            Images::F32 { height: 1, width: 2, channels: 3, data } => assert_eq!(data, v),
            other => panic!("{other:?}"),
        }
        let bad: Vec<u8> = [0.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = images_from(parse(&to_bytes("<f4", &[1, 1, 2], &bad), "b.npy").unwrap(), "b.npy").unwrap_err();
        assert_eq!(e.to_string(), "b.npy: f32 pixel values must lie in [0,1]; element 1 is 2");
    }
}
