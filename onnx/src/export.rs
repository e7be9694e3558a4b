//! Export a CLIP vision classifier as a self-contained forward-only ONNX model for deployment:
//! input `pixels` [N, 3, H, W] in [0, 1] (CLIP normalisation inside), outputs `logits`
//! [N, classes] and `features` [N, projection_dim]. Weights are embedded, or — for models whose
//! weights exceed [`EXTERNAL_DATA_THRESHOLD`] (protobuf's 2 GB limit) — written to one external-data
//! file `<model file name>.data` beside the model, referenced with ONNX's `location`/`offset`/
//! `length` entries. Files are written to temporaries in the destination directory, synced, then
//! renamed: an error leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::ArrayView2;
use prost::Message;

use crate::clip::vision::{self, VisionOutputs};
use crate::graph::ElemType;
use crate::proto::{self, StringStringEntryProto};
use crate::runtime::{RuntimeError, VisionWeights};

/// Weights above this many bytes go to an external-data file (about 1.5 GB).
pub const EXTERNAL_DATA_THRESHOLD: usize = 1_500_000_000;

/// Where the weights of an exported model go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalData {
    /// External when the weights exceed [`EXTERNAL_DATA_THRESHOLD`].
    Auto,
    Always,
    Never,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub model: PathBuf,
    /// The external-data file, when one was written.
    pub data: Option<PathBuf>,
    pub classes: usize,
    pub parameters: usize,
    pub bytes: u64,
}

/// Build the forward graph of `weights` with `head` and write it to `out`.
pub fn export(
    weights: &VisionWeights,
    head: ArrayView2<'_, f32>,
    out: &Path,
    external: ExternalData,
) -> Result<ExportSummary, RuntimeError> {
    let tensors = weights.graph_params(head)?;
    // A `+surgery` merge's feature correction is part of the model: export it with the block.
    let outputs =
        VisionOutputs { logits: true, features: true, surgery: weights.surgery_rank()?, ..Default::default() };
    let graph = vision::build_vision(&weights.config, head.nrows(), &outputs, ElemType::F32)?;
    let mut model = graph.to_model();
    let g = model.graph.as_mut().expect("a graph");
    g.doc_string = format!(
        "CLIP ViT classifier exported by mergeattack from {}: pixels [N,3,{s},{s}] in [0,1] -> logits [N,{}], features",
        weights.source,
        head.nrows(),
        s = weights.config.image_size,
    );
    let total: usize = tensors.iter().map(|(_, _, d)| d.len() * 4).sum();
    let parameters = tensors.iter().map(|(_, _, d)| d.len()).sum();
    let use_external = match external {
        ExternalData::Auto => total > EXTERNAL_DATA_THRESHOLD,
        ExternalData::Always => true,
        ExternalData::Never => false,
    };
    let file_name = out
        .file_name()
        .ok_or_else(|| RuntimeError::Input(format!("output path {} has no file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let data_name = format!("{file_name}.data");
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let write_err = |p: &Path| {
        let shown = p.display().to_string();
        move |e: std::io::Error| RuntimeError::Input(format!("cannot write {shown}: {e}"))
    };
    let mut data_tmp =
        if use_external { Some(tempfile::NamedTempFile::new_in(&dir).map_err(write_err(&dir))?) } else { None };
    let mut offset = 0usize;
    for init in g.initializer.iter_mut() {
        if init.data_location != proto::data_location::EXTERNAL {
            continue;
        }
        let (_, _, data) = tensors
            .iter()
            .find(|(n, _, _)| *n == init.name)
            .ok_or_else(|| RuntimeError::Input(format!("no data for weight `{}`", init.name)))?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        match data_tmp.as_mut() {
            Some(f) => {
                // Align each tensor to 64 bytes, as onnx's own external-data writer allows.
                let pad = offset.next_multiple_of(64) - offset;
                f.write_all(&vec![0u8; pad]).map_err(write_err(out))?;
                offset += pad;
                f.write_all(&bytes).map_err(write_err(out))?;
                init.external_data = vec![
                    StringStringEntryProto { key: "location".into(), value: data_name.clone() },
                    StringStringEntryProto { key: "offset".into(), value: offset.to_string() },
                    StringStringEntryProto { key: "length".into(), value: bytes.len().to_string() },
                ];
                offset += bytes.len();
            }
            None => {
                init.raw_data = bytes;
                init.external_data.clear();
                init.data_location = proto::data_location::DEFAULT;
            }
        }
    }
    let encoded = model.encode_to_vec();
    let mut model_tmp = tempfile::NamedTempFile::new_in(&dir).map_err(write_err(&dir))?;
    model_tmp.write_all(&encoded).map_err(write_err(out))?;
    model_tmp.as_file().sync_all().map_err(write_err(out))?;
    let data_path = dir.join(&data_name);
    let mut bytes = encoded.len() as u64;
    if let Some(f) = data_tmp {
        f.as_file().sync_all().map_err(write_err(&data_path))?;
        bytes += offset as u64;
        f.persist(&data_path).map_err(|e| write_err(&data_path)(e.error))?;
    }
    model_tmp.persist(out).map_err(|e| write_err(out)(e.error))?;
    Ok(ExportSummary {
        model: out.to_path_buf(),
        data: use_external.then_some(data_path),
        classes: head.nrows(),
        parameters,
        bytes,
    })
}

/// Run an exported (or any) model file with a fresh ONNX Runtime session on `pixels`; returns the
/// `logits` and `features` outputs. For tests and for checking a deployment artefact.
pub fn run_exported(
    path: &Path,
    pixels: ndarray::ArrayView4<'_, f32>,
    threads: usize,
) -> Result<(ndarray::Array2<f32>, ndarray::Array2<f32>), RuntimeError> {
    let env = crate::library::environment()?;
    let mut s = ort::session::Session::builder(env)
        .map_err(RuntimeError::ort("configure a session"))?
        .with_intra_threads(threads)
        .map_err(|e| RuntimeError::ort("set the thread count")(e.into()))?
        .commit_from_file(path)
        .map_err(RuntimeError::ort(format!("load {}", path.display())))?;
    let x = pixels.as_standard_layout();
    let xv = ort::value::TensorRef::from_array_view(x.view()).map_err(RuntimeError::ort("wrap the images"))?;
    let res = s.run(ort::inputs!["pixels" => xv]).map_err(RuntimeError::ort("run the exported model"))?;
    let get = |name: &str| -> Result<ndarray::Array2<f32>, RuntimeError> {
        let a = res[name].try_extract_array::<f32>().map_err(RuntimeError::ort(format!("read `{name}`")))?;
        a.to_owned()
            .into_dimensionality()
            .map_err(|e| RuntimeError::Ort { context: format!("read `{name}`"), detail: e.to_string() })
    };
    Ok((get("logits")?, get("features")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Model, RuntimeOptions, load_head};

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip_tiny")
    }

    /// Embedded and external-data exports give the logits of the tool's own session.
    #[test]
    fn exports_run_like_the_tool() {
        let dir = fixture();
        let w = VisionWeights::load(&dir.join("model.safetensors"), None, None).unwrap();
        let (_, head) = load_head(&dir.join("heads.safetensors"), None).unwrap();
        let x = ndarray::Array4::from_shape_fn((3, 3, 32, 32), |(n, c, h, w)| {
            ((n * 7 + c * 5 + h * 3 + w) % 17) as f32 / 16.0
        });
        let mut m =
            Model::from_params(w.config.clone(), &w.params, head.view(), RuntimeOptions::default(), "t").unwrap();
        let (want_l, want_f) = m.forward(x.view()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for (mode, external) in [(ExternalData::Never, false), (ExternalData::Always, true)] {
            let out = tmp.path().join(format!("m{external}.onnx"));
            let s = export(&w, head.view(), &out, mode).unwrap();
            assert_eq!(s.data.is_some(), external);
            assert_eq!(s.classes, 5);
            let (l, f) = run_exported(&out, x.view(), 2).unwrap();
            assert_eq!(l, want_l, "logits (external data: {external})");
            assert_eq!(f, want_f, "features (external data: {external})");
        }
        // Nothing but the outputs is left in the directory.
        let mut names: Vec<String> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["mfalse.onnx", "mtrue.onnx", "mtrue.onnx.data"]);
    }

    #[test]
    fn a_head_of_the_wrong_width_is_refused_and_nothing_is_written() {
        let dir = fixture();
        let w = VisionWeights::load(&dir.join("model.safetensors"), None, None).unwrap();
        let head = ndarray::Array2::<f32>::ones((4, 7));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.onnx");
        let e = export(&w, head.view(), &out, ExternalData::Auto).unwrap_err().to_string();
        assert!(e.contains("[4, 7]") && e.contains("projection_dim"), "{e}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
