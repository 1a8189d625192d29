//! Low-rank adapters: modules, PEFT-style initialisation, merging, and PEFT's on-disk layout
//! (`adapter_model.safetensors` + `adapter_config.json`), so an adapter folder loads in PEFT.

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::DType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde_json::{Value, json};

use super::config::{LoraConfig, LoraTarget};
use super::data::mix;
use super::error::{TrainError, TrainResult};
use crate::model::{CausalLm, DecoderLayer};

/// PEFT's adapter weights file.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// PEFT's adapter config file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// One adapter: the update `x·A·B` (scaled by the owner's `alpha / rank`).
#[derive(Module, Debug)]
pub struct LoraPair<B: Backend> {
    /// `[in, rank]`: PEFT's `lora_A.weight` transposed. Kaiming-uniform initialised.
    pub a: Param<Tensor<B, 2>>,
    /// `[rank, out]`: PEFT's `lora_B.weight` transposed. Zero-initialised, so training starts
    /// from the base model exactly.
    pub b: Param<Tensor<B, 2>>,
}

impl<B: Backend> LoraPair<B> {
    /// `scale·A·B`, `[in, out]` in f32: what merging adds to the base weight.
    fn delta(&self, scale: f64) -> Tensor<B, 2> {
        self.a
            .val()
            .cast(DType::F32)
            .matmul(self.b.val().cast(DType::F32))
            .mul_scalar(scale)
    }
}

/// The adapters of one decoder layer (absent where the target list leaves a module out).
#[derive(Module, Debug)]
pub struct LoraLayer<B: Backend> {
    /// On `self_attn.q_proj`.
    pub q_proj: Option<LoraPair<B>>,
    /// On `self_attn.k_proj`.
    pub k_proj: Option<LoraPair<B>>,
    /// On `self_attn.v_proj`.
    pub v_proj: Option<LoraPair<B>>,
    /// On `self_attn.o_proj`.
    pub o_proj: Option<LoraPair<B>>,
    /// On `mlp.gate_proj`.
    pub gate_proj: Option<LoraPair<B>>,
    /// On `mlp.up_proj`.
    pub up_proj: Option<LoraPair<B>>,
    /// On `mlp.down_proj`.
    pub down_proj: Option<LoraPair<B>>,
}

impl<B: Backend> LoraLayer<B> {
    /// The adapter on `target`, if any.
    pub fn get(&self, target: LoraTarget) -> Option<&LoraPair<B>> {
        match target {
            LoraTarget::QProj => self.q_proj.as_ref(),
            LoraTarget::KProj => self.k_proj.as_ref(),
            LoraTarget::VProj => self.v_proj.as_ref(),
            LoraTarget::OProj => self.o_proj.as_ref(),
            LoraTarget::GateProj => self.gate_proj.as_ref(),
            LoraTarget::UpProj => self.up_proj.as_ref(),
            LoraTarget::DownProj => self.down_proj.as_ref(),
        }
    }

    fn slot(&mut self, target: LoraTarget) -> &mut Option<LoraPair<B>> {
        match target {
            LoraTarget::QProj => &mut self.q_proj,
            LoraTarget::KProj => &mut self.k_proj,
            LoraTarget::VProj => &mut self.v_proj,
            LoraTarget::OProj => &mut self.o_proj,
            LoraTarget::GateProj => &mut self.gate_proj,
            LoraTarget::UpProj => &mut self.up_proj,
            LoraTarget::DownProj => &mut self.down_proj,
        }
    }

    fn empty() -> Self {
        Self {
            q_proj: None,
            k_proj: None,
            v_proj: None,
            o_proj: None,
            gate_proj: None,
            up_proj: None,
            down_proj: None,
        }
    }
}

/// All adapters of a model plus their settings.
#[derive(Module, Debug)]
pub struct LoraAdapters<B: Backend> {
    /// One entry per decoder layer.
    pub layers: Vec<LoraLayer<B>>,
    /// Rank, alpha, dropout and targets.
    #[module(skip)]
    pub config: LoraConfig,
}

/// The base linear layer an adapter target names.
pub(crate) fn target_linear_mut<B: Backend>(
    layer: &mut DecoderLayer<B>,
    target: LoraTarget,
) -> &mut Linear<B> {
    match target {
        LoraTarget::QProj => &mut layer.self_attn.q_proj,
        LoraTarget::KProj => &mut layer.self_attn.k_proj,
        LoraTarget::VProj => &mut layer.self_attn.v_proj,
        LoraTarget::OProj => &mut layer.self_attn.o_proj,
        LoraTarget::GateProj => &mut layer.mlp.gate_proj,
        LoraTarget::UpProj => &mut layer.mlp.up_proj,
        LoraTarget::DownProj => &mut layer.mlp.down_proj,
    }
}

/// `[in, out]` of the base weight `target` names, from the config (a QLoRA base holds no
/// dense weights to read it from).
pub(crate) fn target_dims(c: &crate::config::ModelConfig, target: LoraTarget) -> [usize; 2] {
    c.linear_dims()[target_index(target) as usize]
}

/// Stable index of a target (its position in [`LoraTarget::ALL`]), for seeds.
pub(crate) fn target_index(target: LoraTarget) -> u64 {
    LoraTarget::ALL
        .iter()
        .position(|&t| t == target)
        .expect("every target is in ALL") as u64
}

fn f32_param<B: Backend>(
    values: Vec<f32>,
    shape: [usize; 2],
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(
        TensorData::new(values, shape),
        (device, DType::F32),
    ))
}

impl<B: Backend> LoraAdapters<B> {
    /// Fresh adapters for `base`: `A ~ U(-1/√in, 1/√in)` (PEFT's Kaiming-uniform with a = √5),
    /// `B = 0`, in f32. Each adapter's values depend only on (seed, layer, target), not on which
    /// other targets are chosen.
    pub fn init(base: &CausalLm<B>, config: &LoraConfig, seed: u64, device: &B::Device) -> Self {
        let r = config.rank;
        let layers = base
            .model
            .layers
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let mut out = LoraLayer::empty();
                for &t in &config.target_modules {
                    let [d_in, d_out] = target_dims(&base.config, t);
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(mix(mix(seed, i as u64), target_index(t)));
                    let bound = 1.0 / (d_in as f32).sqrt();
                    let a: Vec<f32> = (0..d_in * r)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect();
                    *out.slot(t) = Some(LoraPair {
                        a: f32_param(a, [d_in, r], device),
                        b: f32_param(vec![0.0; r * d_out], [r, d_out], device),
                    });
                }
                out
            })
            .collect();
        Self {
            layers,
            config: config.clone(),
        }
    }

    /// `base` with every adapter folded in: `W + (alpha/rank)·A·B`, computed in f32 and stored in
    /// the base's dtype, in the plain HF module tree.
    pub fn merge_into(&self, mut base: CausalLm<B>) -> CausalLm<B> {
        let scale = self.config.scale();
        for (layer, adapters) in base.model.layers.iter_mut().zip(&self.layers) {
            for &t in &self.config.target_modules {
                let Some(pair) = adapters.get(t) else {
                    continue;
                };
                let lin = target_linear_mut(layer, t);
                let w = lin.weight.val();
                let dtype = w.dtype();
                let merged = (w.cast(DType::F32) + pair.delta(scale))
                    .cast(dtype)
                    .detach();
                lin.weight = Param::initialized(lin.weight.id, merged);
            }
        }
        base
    }

    /// `(alpha/rank)·(A·B)ᵀ` in HF `[out, in]` layout, f32, for the base weight with HF name
    /// `name` (`model.layers.3.mlp.up_proj.weight`), or `None` when no adapter sits on it.
    pub fn delta_hf(&self, name: &str) -> Option<Vec<f32>> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, module) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let t = *self
            .config
            .target_modules
            .iter()
            .find(|t| module == format!("{}.{}.weight", t.parent(), t.name()))?;
        let pair = self.layers.get(layer)?.get(t)?;
        let delta = pair.delta(self.config.scale()).transpose();
        Some(delta.into_data().to_vec::<f32>().expect("f32 delta"))
    }

    /// Writes PEFT's `adapter_model.safetensors` (f32, `lora_A [rank, in]`, `lora_B [out, rank]`)
    /// and `adapter_config.json` into `dir`.
    pub fn save_peft(&self, dir: &Path, base_model: Option<&Path>) -> TrainResult<()> {
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for &t in &self.config.target_modules {
                let Some(pair) = layer.get(t) else { continue };
                let prefix = format!(
                    "base_model.model.model.layers.{i}.{}.{}",
                    t.parent(),
                    t.name()
                );
                for (suffix, tensor) in [("lora_A", pair.a.val()), ("lora_B", pair.b.val())] {
                    // Burn stores [in, out]; PEFT's nn.Linear weights are [out, in].
                    let t2 = tensor.cast(DType::F32).transpose();
                    let shape = t2.dims().to_vec();
                    let values = t2.into_data().to_vec::<f32>().expect("f32 adapter");
                    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    owned.push((format!("{prefix}.{suffix}.weight"), shape, bytes));
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(name, shape, bytes)| {
                let view = TensorView::new(StDtype::F32, shape.clone(), bytes)
                    .expect("shape matches byte count");
                (name.clone(), view)
            })
            .collect();
        let path = dir.join(ADAPTER_FILE);
        let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| TrainError::io(&path, std::io::Error::other(e.to_string())))?;
        let c = &self.config;
        let targets: Vec<&str> = c.target_modules.iter().map(|t| t.name()).collect();
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": false,
            "modules_to_save": Value::Null,
            "base_model_name_or_path": base_model.map(|p| p.display().to_string()),
        });
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))
    }

    /// Reads adapters written by [`Self::save_peft`] for `base` with settings `config`; every
    /// expected tensor must be present with the right shape.
    pub fn load_peft(
        dir: &Path,
        base: &CausalLm<B>,
        config: &LoraConfig,
        device: &B::Device,
    ) -> TrainResult<Self> {
        let path = dir.join(ADAPTER_FILE);
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| TrainError::checkpoint(&path, e.to_string()))?;
        let r = config.rank;
        let mut layers = Vec::with_capacity(base.model.layers.len());
        for i in 0..base.model.layers.len() {
            let mut out = LoraLayer::empty();
            for &t in &config.target_modules {
                let [d_in, d_out] = target_dims(&base.config, t);
                let prefix = format!(
                    "base_model.model.model.layers.{i}.{}.{}",
                    t.parent(),
                    t.name()
                );
                let read = |suffix: &str, hf_shape: [usize; 2]| -> TrainResult<Vec<f32>> {
                    let name = format!("{prefix}.{suffix}.weight");
                    let view = st.tensor(&name).map_err(|_| {
                        TrainError::checkpoint(&path, format!("missing tensor `{name}`"))
                    })?;
                    if view.shape() != hf_shape || view.dtype() != StDtype::F32 {
                        return Err(TrainError::checkpoint(
                            &path,
                            format!(
                                "tensor `{name}` is {:?} {:?}, expected F32 {hf_shape:?}",
                                view.dtype(),
                                view.shape()
                            ),
                        ));
                    }
                    let v: Vec<f32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    // [out, in] on disk -> Burn's [in, out].
                    let (rows, cols) = (hf_shape[0], hf_shape[1]);
                    let mut tr = vec![0.0; v.len()];
                    for row in 0..rows {
                        for col in 0..cols {
                            tr[col * rows + row] = v[row * cols + col];
                        }
                    }
                    Ok(tr)
                };
                let a = read("lora_A", [r, d_in])?;
                let b = read("lora_B", [d_out, r])?;
                *out.slot(t) = Some(LoraPair {
                    a: f32_param(a, [d_in, r], device),
                    b: f32_param(b, [r, d_out], device),
                });
            }
            layers.push(out);
        }
        Ok(Self {
            layers,
            config: config.clone(),
        })
    }
}
