//! Bad checkpoints give errors that name the file and tensor.

use std::collections::HashMap;
use std::path::Path;

use distill_student::{DType, StudentError, load_model};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

use crate::common::*;

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_all(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_all(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = [("format".into(), "pt".into())].into();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

/// A copy of the qwen2-untied fixture whose weights `edit` rewrites.
fn broken(edit: impl FnOnce(&mut Tensors)) -> (tempfile::TempDir, StudentError) {
    let dir = copy_dir(&fixture("qwen2-untied"));
    let file = dir.path().join("model.safetensors");
    let mut t = read_all(&file);
    edit(&mut t);
    write_all(&file, &t);
    let err = load_model::<B>(dir.path(), &device(), DType::F32).unwrap_err();
    (dir, err)
}

#[test]
fn missing_tensor_is_named() {
    let (_d, e) = broken(|t| t.retain(|x| x.0 != "model.layers.1.mlp.up_proj.weight"));
    let msg = e.to_string();
    assert!(matches!(e, StudentError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("[128, 64]"),
        "{msg}"
    );
}

#[test]
fn extra_tensor_is_named() {
    let (_d, e) = broken(|t| {
        let mut extra = t
            .iter()
            .find(|x| x.0 == "model.norm.weight")
            .unwrap()
            .clone();
        extra.0 = "model.layers.7.input_layernorm.weight".into();
        t.push(extra);
    });
    let msg = e.to_string();
    assert!(matches!(e, StudentError::UnexpectedTensor { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.7.input_layernorm.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_names_both_shapes() {
    let (_d, e) = broken(|t| {
        let q = t
            .iter_mut()
            .find(|x| x.0 == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        q.2 = vec![8, 128]; // same element count, wrong shape
    });
    let msg = e.to_string();
    assert!(matches!(e, StudentError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight")
            && msg.contains("[8, 128]")
            && msg.contains("[16, 64]"),
        "{msg}"
    );
}

#[test]
fn missing_and_corrupt_files_are_named() {
    let dir = copy_dir(&fixture("qwen2-untied"));
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model::<B>(dir.path(), &device(), DType::F32).unwrap_err();
    assert!(matches!(e, StudentError::CorruptWeights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    std::fs::write(&file, b"not a safetensors file").unwrap();
    let e = load_model::<B>(dir.path(), &device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    std::fs::remove_file(&file).unwrap();
    let e = load_model::<B>(dir.path(), &device(), DType::F32).unwrap_err();
    assert!(
        matches!(e, StudentError::Io { .. }) && e.to_string().contains("model.safetensors"),
        "{e}"
    );

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_model::<B>(dir.path(), &device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&fixture("qwen2-untied"));
    let opts = distill_student::SaveOptions {
        max_shard_bytes: 200_000,
        ..Default::default()
    };
    let saved = distill_student::save_pretrained(&model, dir.path(), &opts).unwrap();
    let second = dir
        .path()
        .join(format!("model-00002-of-{:05}.safetensors", saved.shards));
    std::fs::remove_file(&second).unwrap();
    let e = load_model::<B>(dir.path(), &device(), DType::F32).unwrap_err();
    assert!(e.to_string().contains("model-00002-of-"), "{e}");
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = copy_dir(&fixture("qwen2-untied"));
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(-3);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = load_model::<B>(dir.path(), &device(), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("`num_hidden_layers`"),
        "{e}"
    );
}
