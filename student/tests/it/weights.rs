//! Save/load round trips in Hugging Face layout.

use distill_student::{DType, SaveOptions, save_pretrained};
use safetensors::SafeTensors;

use crate::common::*;

/// name -> (dtype, shape, bytes) of every tensor in a folder's safetensors files.
fn stored(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors")
            && !p.ends_with("reference.safetensors")
        {
            let bytes = std::fs::read(&p).unwrap();
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(
                meta.metadata()
                    .as_ref()
                    .and_then(|m| m.get("format"))
                    .map(String::as_str),
                Some("pt")
            );
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, v) in st.tensors() {
                out.insert(
                    name,
                    (
                        format!("{:?}", v.dtype()),
                        v.shape().to_vec(),
                        v.data().to_vec(),
                    ),
                );
            }
        }
    }
    out
}

#[test]
fn load_save_load_is_identical() {
    for name in MODELS {
        let src = fixture(name);
        let a = load(&src);
        let out = tempfile::tempdir().unwrap();
        let saved = save_pretrained(&a, out.path(), &SaveOptions::default()).unwrap();
        assert_eq!(saved.shards, 1);
        // Same names, shapes ([out, in]), dtypes and bytes as transformers wrote.
        let (want, got) = (stored(&src), stored(out.path()));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "{name}"
        );
        assert!(want == got, "{name}: tensor bytes differ after save");
        let b = load(out.path());
        assert!(params(&a) == params(&b), "{name}");
        // The config reparses to the same architecture and says float32.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["dtype"], "float32");
        assert!(out.path().join("generation_config.json").is_file());
    }
}

#[test]
fn saved_folder_passes_parity_and_tied_has_no_lm_head() {
    let name = "qwen2-tied";
    let out = tempfile::tempdir().unwrap();
    save_pretrained(&load(&fixture(name)), out.path(), &SaveOptions::default()).unwrap();
    assert!(!stored(out.path()).contains_key("lm_head.weight"));
    let r = reference(name);
    let got = to_vec(load(out.path()).forward(ids_tensor(&r.input_ids)));
    let want: Vec<f32> = r.logits.iter().flatten().flatten().copied().collect();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn sharded_save_writes_index_and_reloads() {
    let name = "qwen2-untied";
    let a = load(&fixture(name));
    let out = tempfile::tempdir().unwrap();
    let opts = SaveOptions {
        max_shard_bytes: 200_000,
        tokenizer_dir: Some(repo_fixture("tokenizers/minimind")),
        ..Default::default()
    };
    let saved = save_pretrained(&a, out.path(), &opts).unwrap();
    assert!(saved.shards >= 3, "{} shards", saved.shards);
    let first = out
        .path()
        .join(format!("model-00001-of-{:05}.safetensors", saved.shards));
    assert!(first.is_file());
    assert!(!out.path().join("model.safetensors").exists());
    assert!(out.path().join("tokenizer.json").is_file());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total: u64 = stored(out.path())
        .values()
        .map(|(_, _, b)| b.len() as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    assert_eq!(
        index["weight_map"]["lm_head.weight"].as_str().unwrap(),
        format!("model-{0:05}-of-{0:05}.safetensors", saved.shards)
    );
    // No shard exceeds the limit unless a single tensor does.
    assert_eq!(stored(out.path()), stored(&fixture(name)));
    let b = load(out.path());
    assert!(params(&a) == params(&b));
    let r = reference(name);
    let got = to_vec(b.forward(ids_tensor(&r.input_ids)));
    let want: Vec<f32> = r.logits.iter().flatten().flatten().copied().collect();
    assert!(max_abs_diff(&got, &want) < 1e-4);

    // Saving unsharded into the same folder removes the old shards and index.
    save_pretrained(&a, out.path(), &SaveOptions::default()).unwrap();
    assert!(!out.path().join("model.safetensors.index.json").exists());
    assert!(!first.exists());
    assert!(params(&load(out.path())) == params(&a));
}

#[test]
fn bf16_save_round_trips_exactly() {
    let name = "llama3-scaled";
    let a = distill_student::load_model::<B>(fixture(name), &device(), DType::BF16).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_pretrained(&a, out.path(), &SaveOptions::default()).unwrap();
    let st = stored(out.path());
    assert!(st.values().all(|(d, _, _)| d == "BF16"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let b = distill_student::load_model::<B>(out.path(), &device(), DType::BF16).unwrap();
    assert!(params(&a) == params(&b));
}
