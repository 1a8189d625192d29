//! Fixture loading shared by the integration tests.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use distill_student::{CausalLm, CpuBackend, DType, load_model};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;

pub type B = CpuBackend;

pub const MODELS: [&str; 4] = [
    "qwen2-tied",
    "qwen2-untied",
    "llama3-scaled",
    "llama-bias-tied",
];

/// The crate folder; `DISTILL_STUDENT_DIR` overrides it when the test binary runs elsewhere.
fn crate_dir() -> PathBuf {
    std::env::var_os("DISTILL_STUDENT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixture(name: &str) -> PathBuf {
    crate_dir().join("tests/fixtures/parity").join(name)
}

pub fn repo_fixture(rel: &str) -> PathBuf {
    crate_dir().join("../tests/fixtures").join(rel)
}

pub fn device() -> burn::tensor::Device<B> {
    Default::default()
}

pub fn load(dir: &Path) -> CausalLm<B> {
    load_model::<B>(dir, &device(), DType::F32).unwrap_or_else(|e| panic!("{e}"))
}

/// What transformers produced for a fixture model.
pub struct Reference {
    pub input_ids: Vec<Vec<u32>>,
    /// `[n][len][vocab]`
    pub logits: Vec<Vec<Vec<f32>>>,
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    /// Smallest top-1/top-2 logit gap along the greedy continuation.
    pub min_margin: f32,
}

pub fn reference(name: &str) -> Reference {
    let dir = fixture(name);
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!(ids.dtype(), Dtype::I64);
    let [n, len] = [ids.shape()[0], ids.shape()[1]];
    let flat: Vec<u32> = ids
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let logits = st.tensor("logits").unwrap();
    let vocab = logits.shape()[2];
    let lf: Vec<f32> = logits
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids_of = |k: &str| -> Vec<u32> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    Reference {
        input_ids: flat.chunks(len).map(<[u32]>::to_vec).collect(),
        logits: (0..n)
            .map(|i| {
                (0..len)
                    .map(|t| lf[(i * len + t) * vocab..(i * len + t + 1) * vocab].to_vec())
                    .collect()
            })
            .collect(),
        prompt: ids_of("prompt"),
        greedy: ids_of("greedy_continuation"),
        min_margin: json["min_top2_margin"].as_f64().unwrap() as f32,
    }
}

pub fn ids_tensor(rows: &[Vec<u32>]) -> Tensor<B, 2, Int> {
    let len = rows[0].len();
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), len]), &device())
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Every parameter's values, in visiting order.
pub fn params(model: &CausalLm<B>) -> Vec<(Vec<usize>, Vec<f32>)> {
    struct Collect(Vec<(Vec<usize>, Vec<f32>)>);
    impl ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let t = p.val();
            self.0.push((t.dims().to_vec(), to_vec(t)));
        }
    }
    let mut c = Collect(vec![]);
    model.visit(&mut c);
    c.0
}

/// A temp dir holding a copy of `src`'s files.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

/// The tied Qwen2 parity model (minimind vocabulary) with the minimind tokenizer and chat
/// template beside it, in a temporary copy.
pub fn chat_model_dir() -> tempfile::TempDir {
    let dir = copy_dir(&fixture("qwen2-tied"));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            repo_fixture("tokenizers/minimind").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    dir
}
