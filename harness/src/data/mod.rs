//! Datasets: loaders (IDX, ImageFolder, HF parquet, .npy, the mini suite), preprocessing, and a
//! [`Dataset`] that yields NCHW f32 batches in [0,1] with labels and class names.
//!
//! Pixels are kept in their stored form (raw u8, f32, or the encoded PNG/JPEG bytes) and decoded
//! and preprocessed one batch at a time, so a large set never sits decoded at full size in memory.
//! Every command takes a data spec (`--data SPEC`, see [`spec`]).

pub mod folder;
pub mod idx;
pub mod mini;
pub mod npy;
pub mod parquet;
pub mod preprocess;
pub mod sheet;
pub mod spec;

use std::ops::Range;
use std::path::PathBuf;

use ndarray::Array4;

pub use preprocess::Preprocess;
pub use spec::{DataSpec, OpenOptions, open};

/// Why a data set could not be read. Each message names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Format { path: String, detail: String },
    #[error("{path}: label {label} of item {index} is out of range for {classes} classes")]
    LabelOutOfRange { path: String, index: usize, label: i64, classes: usize },
    #[error("{path}: {images} images but {labels} labels")]
    CountMismatch { path: String, images: usize, labels: usize },
    #[error("{path}: cannot decode image {what}: {detail}")]
    Decode { path: String, what: String, detail: String },
    #[error("{path}: {count} unreadable image file(s), first {first} (without --strict they are skipped)")]
    Unreadable { path: String, count: usize, first: String },
    #[error("{path}: images of different sizes ({a} and {b}); give a resize (e.g. the model's CLIP preprocessing)")]
    MixedSizes { path: String, a: String, b: String },
    #[error(
        "the mini suite's source files are missing or corrupt in {cache} ({detail}); run `mergeattack setup` \
         (or `--cache-dir` to point at another cache)"
    )]
    MiniSourceMissing { cache: String, detail: String },
    #[error("bad data spec `{spec}`: {detail}")]
    Spec { spec: String, detail: String },
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.display().to_string(), source }
}

/// One encoded image (PNG or JPEG), decoded when its batch is built.
#[derive(Debug, Clone)]
pub enum Encoded {
    Bytes(std::sync::Arc<[u8]>),
    File(PathBuf),
}

/// Stored pixels of a data set.
#[derive(Debug, Clone)]
pub enum Images {
    /// u8 images of one size, interleaved `n x h x w x c`, c = 1 or 3.
    U8 { height: usize, width: usize, channels: usize, data: Vec<u8> },
    /// f32 images of one size in [0,1], planar `n x c x h x w`, c = 1 or 3.
    F32 { height: usize, width: usize, channels: usize, data: Vec<f32> },
    /// Encoded images (PNG/JPEG), possibly of different sizes.
    Encoded(Vec<Encoded>),
}

impl Images {
    pub fn len(&self) -> usize {
        match self {
            Images::U8 { height, width, channels, data } => data.len() / (height * width * channels).max(1),
            Images::F32 { height, width, channels, data } => data.len() / (height * width * channels).max(1),
            Images::Encoded(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch: images `N x 3 x S x S` in [0,1], labels, and the items' indices in the data set.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Array4<f32>,
    pub labels: Vec<usize>,
    pub indices: Range<usize>,
}

/// A labelled image data set.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it came from (a spec, a file), used in messages.
    pub name: String,
    class_names: Vec<String>,
    labels: Vec<u32>,
    images: Images,
    preprocess: Preprocess,
}

/// Decode an encoded image to interleaved u8 (`h x w x c`, c = 1, 2, 3 or 4 channels).
pub fn decode(bytes: &[u8]) -> Result<(usize, usize, usize, Vec<u8>), String> {
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(match img {
        image::DynamicImage::ImageLuma8(b) => (w, h, 1, b.into_raw()),
        image::DynamicImage::ImageLumaA8(b) => (w, h, 2, b.into_raw()),
        image::DynamicImage::ImageRgb8(b) => (w, h, 3, b.into_raw()),
        image::DynamicImage::ImageRgba8(b) => (w, h, 4, b.into_raw()),
        other => {
            // 16-bit and other layouts: Pillow-like conversion to 8-bit RGB.
            (w, h, 3, other.to_rgb8().into_raw())
        }
    })
}

/// Read only the header of an encoded image: its size, or why it is not a readable image.
pub fn probe(bytes: &[u8]) -> Result<(u32, u32), String> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

impl Dataset {
    /// A data set from stored pixels and labels. Checks that counts agree and that every label is
    /// below the number of classes.
    pub fn new(
        name: impl Into<String>,
        images: Images,
        labels: Vec<i64>,
        class_names: Vec<String>,
    ) -> Result<Self, DataError> {
        let name = name.into();
        if images.len() != labels.len() {
            return Err(DataError::CountMismatch { path: name, images: images.len(), labels: labels.len() });
        }
        let classes = class_names.len();
        if let Some((index, &label)) = labels.iter().enumerate().find(|(_, l)| **l < 0 || **l as usize >= classes) {
            return Err(DataError::LabelOutOfRange { path: name, index, label, classes });
        }
        let labels = labels.into_iter().map(|l| l as u32).collect();
        Ok(Self { name, class_names, labels, images, preprocess: Preprocess::Native })
    }

    /// Class names `0..n` as strings (for sets that carry no names).
    pub fn numbered_classes(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    /// The same data with another preprocessing.
    pub fn with_preprocess(mut self, p: Preprocess) -> Self {
        self.preprocess = p;
        self
    }

    pub fn preprocess(&self) -> Preprocess {
        self.preprocess
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    pub fn images(&self) -> &Images {
        &self.images
    }

    /// Items per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0usize; self.num_classes()];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }

    /// The subset at `indices` (in that order), pixels copied.
    pub fn subset(&self, name: impl Into<String>, indices: &[usize]) -> Dataset {
        let images = match &self.images {
            Images::U8 { height, width, channels, data } => {
                let sz = height * width * channels;
                let mut d = Vec::with_capacity(indices.len() * sz);
                for &i in indices {
                    d.extend_from_slice(&data[i * sz..(i + 1) * sz]);
                }
                Images::U8 { height: *height, width: *width, channels: *channels, data: d }
            }
            Images::F32 { height, width, channels, data } => {
                let sz = height * width * channels;
                let mut d = Vec::with_capacity(indices.len() * sz);
                for &i in indices {
                    d.extend_from_slice(&data[i * sz..(i + 1) * sz]);
                }
                Images::F32 { height: *height, width: *width, channels: *channels, data: d }
            }
            Images::Encoded(v) => Images::Encoded(indices.iter().map(|&i| v[i].clone()).collect()),
        };
        Dataset {
            name: name.into(),
            class_names: self.class_names.clone(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            images,
            preprocess: self.preprocess,
        }
    }

    /// Output side length of the batches, when known without decoding (None: native size of
    /// encoded images, known after decoding).
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match self.preprocess {
            Preprocess::Resize(s) | Preprocess::Clip(s) => Some((s, s)),
            Preprocess::Native => match &self.images {
                Images::U8 { height, width, .. } | Images::F32 { height, width, .. } => Some((*width, *height)),
                Images::Encoded(_) => None,
            },
        }
    }

    fn decode_item(&self, i: usize) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
        let Images::Encoded(v) = &self.images else { unreachable!("decode_item on raw pixels") };
        let (bytes, what) = match &v[i] {
            Encoded::Bytes(b) => (std::borrow::Cow::Borrowed(&b[..]), format!("#{i}")),
            Encoded::File(p) => {
                (std::borrow::Cow::Owned(std::fs::read(p).map_err(io_err(p))?), p.display().to_string())
            }
        };
        decode(&bytes).map_err(|detail| DataError::Decode { path: self.name.clone(), what, detail })
    }

    /// Decode and preprocess the items in `range` into one batch.
    pub fn batch(&self, range: Range<usize>) -> Result<Batch, DataError> {
        assert!(range.end <= self.len(), "batch range {range:?} beyond {} items", self.len());
        let n = range.len();
        let labels = self.labels[range.clone()].iter().map(|&l| l as usize).collect();
        let images = match &self.images {
            Images::U8 { height, width, channels, data } => {
                let (w, h) = self.output_size().expect("raw size");
                let mut out = Array4::<f32>::zeros((n, 3, h, w));
                let sz = height * width * channels;
                let flat = out.as_slice_mut().expect("standard layout");
                for (j, i) in range.clone().enumerate() {
                    preprocess::u8_to_chw(
                        self.preprocess,
                        &data[i * sz..(i + 1) * sz],
                        *width,
                        *height,
                        *channels,
                        &mut flat[j * 3 * h * w..(j + 1) * 3 * h * w],
                    );
                }
                out
            }
            Images::F32 { height, width, channels, data } => {
                let (w, h) = self.output_size().expect("raw size");
                let mut out = Array4::<f32>::zeros((n, 3, h, w));
                let sz = height * width * channels;
                let flat = out.as_slice_mut().expect("standard layout");
                for (j, i) in range.clone().enumerate() {
                    preprocess::f32_to_chw(
                        self.preprocess,
                        &data[i * sz..(i + 1) * sz],
                        *width,
                        *height,
                        *channels,
                        &mut flat[j * 3 * h * w..(j + 1) * 3 * h * w],
                    );
                }
                out
            }
            Images::Encoded(_) => {
                let mut decoded = Vec::with_capacity(n);
                for i in range.clone() {
                    decoded.push(self.decode_item(i)?);
                }
                let sizes: Vec<(usize, usize)> = decoded
                    .iter()
                    .map(|(w, h, _, _)| preprocess::plan(self.preprocess, *w, *h).1)
                    .map(|(_, _, cw, ch)| (cw, ch))
                    .collect();
                let (w, h) = sizes.first().copied().unwrap_or((1, 1));
                if let Some(other) = sizes.iter().find(|s| **s != (w, h)) {
                    return Err(DataError::MixedSizes {
                        path: self.name.clone(),
                        a: format!("{w}x{h}"),
                        b: format!("{}x{}", other.0, other.1),
                    });
                }
                let mut out = Array4::<f32>::zeros((n, 3, h, w));
                let flat = out.as_slice_mut().expect("standard layout");
                for (j, (iw, ih, c, px)) in decoded.iter().enumerate() {
                    preprocess::u8_to_chw(
                        self.preprocess,
                        px,
                        *iw,
                        *ih,
                        *c,
                        &mut flat[j * 3 * h * w..(j + 1) * 3 * h * w],
                    );
                }
                out
            }
        };
        Ok(Batch { images, labels, indices: range })
    }

    /// Batches of `batch_size` items in order (the last one may be smaller).
    pub fn batches(&self, batch_size: usize) -> impl Iterator<Item = Result<Batch, DataError>> + '_ {
        let bs = batch_size.max(1);
        (0..self.len()).step_by(bs).map(move |s| self.batch(s..(s + bs).min(self.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let data: Vec<u8> = (0..5 * 2 * 2).map(|i| (i * 10) as u8).collect();
        Dataset::new(
            "tiny",
            Images::U8 { height: 2, width: 2, channels: 1, data },
            vec![0, 1, 2, 1, 0],
            Dataset::numbered_classes(3),
        )
        .unwrap()
    }

    #[test]
    fn batches_cover_everything_in_order() {
        let d = tiny();
        let b: Vec<Batch> = d.batches(2).collect::<Result<_, _>>().unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].images.shape(), &[1, 3, 2, 2]);
        assert_eq!(b[1].labels, vec![2, 1]);
        assert_eq!(b[1].images[[0, 2, 1, 1]], 110.0 / 255.0); // item 2, pixel 3: (2 * 4 + 3) * 10
        assert_eq!(d.class_counts(), vec![2, 2, 1]);
    }

    #[test]
    fn labels_out_of_range_are_refused() {
        let e = Dataset::new(
            "x.npy",
            Images::U8 { height: 1, width: 1, channels: 1, data: vec![0, 0] },
            vec![0, 3],
            Dataset::numbered_classes(3),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "x.npy: label 3 of item 1 is out of range for 3 classes");
    }

    #[test]
    fn subset_keeps_pixels_and_labels() {
        let d = tiny().subset("s", &[3, 0]);
        assert_eq!(d.labels(), &[1, 0]);
        let b = d.batch(0..2).unwrap();
        assert_eq!(b.images[[0, 0, 0, 0]], 120.0 / 255.0);
        assert_eq!(b.images[[1, 0, 0, 1]], 10.0 / 255.0);
    }
}
