//! HF datasets stored as parquet: an image column (a struct with a `bytes` field, as HF `Image`
//! features are stored, or raw binary) and an integer label column. Class names come from the
//! HF metadata (`huggingface` key, `ClassLabel` names) when present.
//!
//! Only the two columns are read (projection); the encoded image bytes are kept and decoded one
//! batch at a time.

use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use super::{DataError, Dataset, Encoded, Images, io_err, probe};

const IMAGE_NAMES: &[&str] = &["image", "img", "images", "pixel_values"];
const LABEL_NAMES: &[&str] = &["label", "labels", "target", "class", "fine_label"];

fn describe(t: &Type) -> String {
    if t.is_group() {
        let inner: Vec<String> = t.get_fields().iter().map(|f| f.name().to_string()).collect();
        format!("{} (struct of {})", t.name(), inner.join(", "))
    } else {
        format!("{} ({:?})", t.name(), t.get_physical_type())
    }
}

fn is_image_col(t: &Type) -> bool {
    if t.is_group() {
        t.get_fields().iter().any(|f| f.name() == "bytes" && f.is_primitive())
    } else {
        t.get_physical_type() == parquet::basic::Type::BYTE_ARRAY
            && IMAGE_NAMES.contains(&t.name().to_lowercase().as_str())
    }
}

fn is_label_col(t: &Type) -> bool {
    t.is_primitive()
        && matches!(t.get_physical_type(), parquet::basic::Type::INT32 | parquet::basic::Type::INT64)
        && LABEL_NAMES.contains(&t.name().to_lowercase().as_str())
}

/// Class names from the HF `huggingface` metadata, for the label column `label`.
fn hf_class_names(reader: &SerializedFileReader<std::fs::File>, label: &str) -> Option<Vec<String>> {
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    let v = kv.iter().find(|k| k.key == "huggingface")?.value.as_ref()?;
    let json: serde_json::Value = serde_json::from_str(v).ok()?;
    let names = json.get("info")?.get("features")?.get(label)?.get("names")?.as_array()?;
    names.iter().map(|n| n.as_str().map(str::to_string)).collect()
}

/// Open a parquet file. `classes` overrides the class count; `strict` turns unreadable images
/// into an error instead of skipping them with a warning.
pub fn open(path: &Path, classes: Option<usize>, strict: bool) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let bad = |detail: String| DataError::Format { path: name.clone(), detail };
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable parquet file ({e})")))?;
    let root = reader.metadata().file_metadata().schema_descr().root_schema().clone();
    let fields = root.get_fields();
    let img_col = fields.iter().find(|f| is_image_col(f));
    let lab_col = fields.iter().find(|f| is_label_col(f));
    let (Some(img_col), Some(lab_col)) = (img_col, lab_col) else {
        let have: Vec<String> = fields.iter().map(|f| describe(f)).collect();
        return Err(bad(format!(
            "expected an image column (a struct with `bytes`, or binary, named one of {}) and an integer label \
             column (one of {}); the file has columns: {}",
            IMAGE_NAMES.join("/"),
            LABEL_NAMES.join("/"),
            have.join(", ")
        )));
    };
    let (img_name, lab_name) = (img_col.name().to_string(), lab_col.name().to_string());
    let projection = Type::group_type_builder("schema")
        .with_fields(vec![Arc::clone(img_col), Arc::clone(lab_col)])
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| bad(format!("cannot read rows ({e})")))?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut unreadable = 0usize;
    let mut first_bad = None;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("cannot read row {i} ({e})")))?;
        let mut bytes = None;
        let mut label = None;
        for (col, field) in row.get_column_iter() {
            if *col == img_name {
                bytes = match field {
                    Field::Bytes(b) => Some(b.data().to_vec()),
                    Field::Group(g) => g.get_column_iter().find_map(|(n, f)| match (n.as_str(), f) {
                        ("bytes", Field::Bytes(b)) => Some(b.data().to_vec()),
                        _ => None,
                    }),
                    _ => None,
                };
            } else if *col == lab_name {
                label = match field {
                    Field::Int(v) => Some(i64::from(*v)),
                    Field::Long(v) => Some(*v),
                    _ => None,
                };
            }
        }
        let label = label.ok_or_else(|| bad(format!("row {i} has no value in the label column `{lab_name}`")))?;
        match bytes.as_deref().map(probe) {
            Some(Ok(_)) => {
                images.push(Encoded::Bytes(bytes.expect("checked").into()));
                labels.push(label);
            }
            other => {
                let why = match other {
                    Some(Err(e)) => e,
                    _ => "no image bytes".to_string(),
                };
                unreadable += 1;
                first_bad.get_or_insert(format!("row {i} ({why})"));
            }
        }
    }
    if let Some(first) = first_bad {
        if strict {
            return Err(DataError::Unreadable { path: name, count: unreadable, first });
        }
        tracing::warn!("{name}: skipped {unreadable} unreadable image(s), first {first}");
    }
    let class_names = match (classes, hf_class_names(&reader, &lab_name)) {
        (Some(n), _) => Dataset::numbered_classes(n),
        (None, Some(names)) => names,
        (None, None) => Dataset::numbered_classes(labels.iter().max().map_or(0, |&m| m.max(0) as usize + 1)),
    };
    Dataset::new(name, Images::Encoded(images), labels, class_names)
}
