//! Data specs, the `--data SPEC` argument of every command:
//!
//! | spec | meaning |
//! |---|---|
//! | `mini:TASK[:SPLIT]` | a mini-suite task (`mergeattack data list`), split `train`, `val` or `test` (default) |
//! | `idx:IMAGES[,LABELS]` | IDX files, gz or not; LABELS defaults to the `labels-idx1` twin of IMAGES |
//! | `folder:PATH` | an ImageFolder (one sub-folder of PNG/JPEG files per class) |
//! | `parquet:PATH` | an HF dataset parquet file (image bytes column + integer label column) |
//! | `npy:IMAGES.npy,LABELS.npy` | u8 or f32 images and integer labels |

use std::path::PathBuf;

use super::mini::{self, Split};
use super::{DataError, Dataset, folder, idx, npy, parquet};

/// A parsed data spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    Mini { task: String, split: Split },
    Idx { images: PathBuf, labels: Option<PathBuf> },
    Folder(PathBuf),
    Parquet(PathBuf),
    Npy { images: PathBuf, labels: PathBuf },
}

/// Options for opening a spec.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Cache root holding the mini-suite sources (default: the tool's cache root).
    pub cache_dir: Option<PathBuf>,
    /// Refuse unreadable image files instead of skipping them.
    pub strict: bool,
    /// Number of classes; labels at or above it are an error (default: from the data).
    pub classes: Option<usize>,
}

fn spec_err(spec: &str, detail: impl Into<String>) -> DataError {
    DataError::Spec { spec: spec.to_string(), detail: detail.into() }
}

impl std::str::FromStr for DataSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        let Some((kind, rest)) = s.split_once(':') else {
            return Err(spec_err(s, "expected KIND:ARGS with KIND one of mini, idx, folder, parquet, npy"));
        };
        if rest.is_empty() {
            return Err(spec_err(s, format!("`{kind}:` needs an argument")));
        }
        match kind {
            "mini" => {
                let (task, split) = match rest.split_once(':') {
                    Some((t, sp)) => (t, sp.parse::<Split>().map_err(|e| spec_err(s, e))?),
                    None => (rest, Split::Test),
                };
                if !mini::TASKS.iter().any(|t| t.name == task) {
                    let known: Vec<&str> = mini::TASKS.iter().map(|t| t.name).collect();
                    return Err(spec_err(s, format!("unknown mini-suite task `{task}` (known: {})", known.join(", "))));
                }
                Ok(DataSpec::Mini { task: task.to_string(), split })
            }
            "idx" => {
                let (images, labels) = match rest.split_once(',') {
                    Some((i, l)) => (PathBuf::from(i), Some(PathBuf::from(l))),
                    None => (PathBuf::from(rest), None),
                };
                Ok(DataSpec::Idx { images, labels })
            }
            "folder" => Ok(DataSpec::Folder(PathBuf::from(rest))),
            "parquet" => Ok(DataSpec::Parquet(PathBuf::from(rest))),
            "npy" => match rest.split_once(',') {
                Some((i, l)) if !i.is_empty() && !l.is_empty() => {
                    Ok(DataSpec::Npy { images: PathBuf::from(i), labels: PathBuf::from(l) })
                }
                _ => Err(spec_err(s, "expected npy:IMAGES.npy,LABELS.npy")),
            },
            other => Err(spec_err(s, format!("unknown kind `{other}` (mini, idx, folder, parquet, npy)"))),
        }
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::Mini { task, split } => write!(f, "mini:{task}:{split}"),
            DataSpec::Idx { images, labels: None } => write!(f, "idx:{}", images.display()),
            DataSpec::Idx { images, labels: Some(l) } => write!(f, "idx:{},{}", images.display(), l.display()),
            DataSpec::Folder(p) => write!(f, "folder:{}", p.display()),
            DataSpec::Parquet(p) => write!(f, "parquet:{}", p.display()),
            DataSpec::Npy { images, labels } => write!(f, "npy:{},{}", images.display(), labels.display()),
        }
    }
}

fn check_classes(d: Dataset, classes: Option<usize>) -> Result<Dataset, DataError> {
    // Datasets built with their own class list already checked their labels; a given class count
    // that is smaller than the data's must be checked again.
    if let Some(n) = classes
        && let Some((index, &label)) = d.labels().iter().enumerate().find(|(_, l)| **l as usize >= n)
    {
        return Err(DataError::LabelOutOfRange { path: d.name.clone(), index, label: i64::from(label), classes: n });
    }
    Ok(d)
}

/// Open the data set a spec names.
pub fn open(spec: &DataSpec, opts: &OpenOptions) -> Result<Dataset, DataError> {
    let d = match spec {
        DataSpec::Mini { task, split } => {
            let root = crate::setup::cache_root(opts.cache_dir.as_deref());
            mini::load(&root, task)?.take(*split)
        }
        DataSpec::Idx { images, labels } => {
            let labels = match labels {
                Some(l) => l.clone(),
                None => idx::labels_path_for(images).ok_or_else(|| {
                    spec_err(
                        &spec.to_string(),
                        "cannot derive the labels file from the images file name; give idx:IMAGES,LABELS",
                    )
                })?,
            };
            idx::open(images, &labels, opts.classes)?
        }
        DataSpec::Folder(p) => folder::open(p, opts.strict)?,
        DataSpec::Parquet(p) => parquet::open(p, opts.classes, opts.strict)?,
        DataSpec::Npy { images, labels } => npy::open(images, labels, opts.classes)?,
    };
    check_classes(d, opts.classes)
}

/// Parse and open in one step.
pub fn open_str(spec: &str, opts: &OpenOptions) -> Result<Dataset, DataError> {
    open(&spec.parse()?, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            "mini:digits".parse::<DataSpec>().unwrap(),
            DataSpec::Mini { task: "digits".into(), split: Split::Test }
        );
        assert_eq!(
            "mini:fashion-coarse:train".parse::<DataSpec>().unwrap(),
            DataSpec::Mini { task: "fashion-coarse".into(), split: Split::Train }
        );
        assert_eq!(
            "idx:a.gz,b.gz".parse::<DataSpec>().unwrap(),
            DataSpec::Idx { images: "a.gz".into(), labels: Some("b.gz".into()) }
        );
        assert_eq!("folder:/x".parse::<DataSpec>().unwrap(), DataSpec::Folder("/x".into()));
        assert_eq!("parquet:t.parquet".parse::<DataSpec>().unwrap(), DataSpec::Parquet("t.parquet".into()));
        assert_eq!(
            "npy:i.npy,l.npy".parse::<DataSpec>().unwrap(),
            DataSpec::Npy { images: "i.npy".into(), labels: "l.npy".into() }
        );
        for s in ["mini:digits:val", "idx:a,b", "npy:i,l"] {
            let d: DataSpec = s.parse().unwrap();
            assert_eq!(d.to_string().parse::<DataSpec>().unwrap(), d);
        }
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let e = |s: &str| s.parse::<DataSpec>().unwrap_err().to_string();
        assert!(e("mini:cifar").contains("unknown mini-suite task `cifar`"), "{}", e("mini:cifar"));
        assert!(e("mini:digits:dev").contains("unknown split `dev`"));
        assert!(e("npy:only.npy").contains("expected npy:IMAGES.npy,LABELS.npy"));
        assert!(e("hdf5:x").contains("unknown kind `hdf5`"));
        assert!(e("digits").contains("expected KIND:ARGS"));
    }
}
