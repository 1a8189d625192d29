//! Memory planner: will a fine-tuning run fit on the GPUs, and if not, which single change would?
//!
//! Every figure is bytes per GPU, counted from what this crate's trainer keeps alive on Burn 0.21
//! (`train::Trainer`; formulas below), not from a generic rule of thumb. Notation: `P` parameters
//! (`P_l` per decoder layer, `L` layers), `d` hidden, `I` MLP width, `h`/`kv` query/KV heads of
//! width `hd`, `V` vocabulary, `b` sequences of `N` tokens per micro-batch, `T = b·N`, `e` bytes per
//! compute element (2 for bf16, 4 for f32), `r` LoRA rank, `C = min(T, loss_chunk_tokens)`,
//! `P_lin` the decoder layers' linear weights (q, k, v, o, gate, up, down; biases excluded).
//!
//! - **weights**: full fine-tuning keeps f32 masters, `4P`; LoRA keeps the frozen base in the
//!   compute dtype, `e·P`, plus f32 adapters `4·P_lora`. QLoRA (`lora.base_bits = 4`) stores
//!   every decoder linear weight as NF4 (`crate::quant`), a 4-bit code plus an f32 scale per
//!   block of 64 weights, `P_lin/2 + 4·P_lin/64` (4.5 bits, 0.5625 bytes a weight; `model
//!   info`'s 4-bit figure; a matrix whose input width is not a multiple of 64 is padded to one);
//!   the rest (embeddings, norms, biases, LM head) in the compute dtype, `e·(P − P_lin)`; plus
//!   f32 adapters `4·P_lora`.
//! - **compute copies** (bf16 with f32 masters): every weight is cast to bf16 where it is used and
//!   the copy lives until backward: `2·L·P_l` without recomputation, `2·2·P_l` with it (one layer
//!   in the re-run plus one in the no-grad pass); plus `2·V·d` for the head. LoRA and QLoRA cast
//!   only the adapters, `2·P_lora`. 0 in f32.
//! - **dequantization scratch** (QLoRA): products dequantize the NF4 base one tile of at most
//!   `E_t = DEQUANT_TILE_ELEMENTS` (2²⁴) weights at a time, forward and backward, and keep no
//!   dequantized copy for backward, so the base costs one tile in flight besides its codes:
//!   `E_t·(16 + e)` bytes (`DEQUANT_SCRATCH_BYTES_PER_ELEMENT` = 16 of unpacked code, gather
//!   index and f32 level, plus the compute-dtype value; 288 MiB in bf16).
//! - **gradients**: f32 for trainable parameters, `4·P_train`, plus one stage's gradients while
//!   they are added in (`4·max(V·d, P_l)`, full fine-tuning). (Q)LoRA: the adapters', `4·P_lora`.
//! - **optimizer**: AdamW's two f32 moments, `8·P_train` (`8·P_lora` for (Q)LoRA).
//! - **activations**: tensors autodiff keeps for backward. Per layer
//!   `A = 16·T·d + e·T·(2d + 6·h·hd + 2·kv·hd + 5I) + 2·e·b·h·N² + 4N²` (two RMSNorms keep an f32
//!   input and an f32 normalised copy; the q/k/v input, RoPE inputs of q and k, the KV-expanded
//!   attention inputs, the o_proj input, the MLP input and its four `[T, I]` intermediates; and —
//!   because Burn 0.21 has no fused attention under autodiff — the softmax numerator and the
//!   probabilities `[b, h, N, N]`, plus the causal mask). LoRA and QLoRA add `e·T·r` per adapted
//!   module (the NF4 product saves only its input, counted above, and re-dequantizes in
//!   backward). Without recomputation all `L` layers are held: `L·A`; with per-layer
//!   recomputation only the layer inputs `L·e·T·d` plus one layer's `A`. Recomputation also runs
//!   attention in query chunks of `Q = attention_chunk_tokens` rows when `N > Q`: every `N²`
//!   above becomes `Q·N`, and the layer holds q, k, v, context and their gradients,
//!   `7·e·T·h·hd`, besides. On top: embeddings and final norm `(e + 8)·T·d`, the scored rows
//!   `e·T·d`, one loss chunk `(e + 16)·C·V` (f32 logits, exp and their gradients), and
//!   backward's working set `2·e·b·h·N² + 2·e·T·I` (gradients of the attention probabilities
//!   and scores, of the MLP intermediates; `Q·N` for `N²` when chunked).
//! - **overhead**: CUDA context, allocator slack and the cuBLASLt workspace (32 MiB), `1 GiB + 5%`
//!   of the GPU.
//!
//! Several GPUs are planned as [`PlanSettings::sharding`] says. `Full` (the default, and the
//! published table's multi-GPU rows) is ZeRO-3/FSDP sharding (weights, gradients and optimizer
//! state divided by the GPU count, plus two gathered layers in flight: `2·e·P_l`, or for QLoRA
//! two layers as stored, NF4 linear weights and the rest in `e`), which is what open-r1 runs
//! with DeepSpeed and this crate's trainer does not do yet. `Optimizer` is the trainer's
//! `sharding = "optimizer"`: only the AdamW state is divided (each replica computes its
//! micro-batches' whole gradients before the reduce). `None` replicates: every GPU needs the
//! one-GPU figure. The dequantization scratch is per GPU and never divided.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::quant::{BLOCK, DEQUANT_SCRATCH_BYTES_PER_ELEMENT, DEQUANT_TILE_ELEMENTS};

const GIB: f64 = (1u64 << 30) as f64;

/// Memory of one H200 as `nvidia-smi` reports it (143,771 MiB; sold as 141 GB).
pub const H200_GIB: f64 = 140.4;

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every weight.
    Full,
    /// Adapters of this rank on all seven linear layers of every block, base frozen.
    Lora {
        /// Adapter rank.
        rank: usize,
    },
    /// QLoRA: LoRA of this rank on a frozen base whose decoder linear weights are NF4 (4 bits
    /// and an f32 scale per 64 weights), dequantized tile by tile inside each product.
    Qlora {
        /// Adapter rank.
        rank: usize,
    },
}

impl Method {
    /// Adapter rank, `None` for full fine-tuning.
    pub fn rank(self) -> Option<usize> {
        match self {
            Method::Full => None,
            Method::Lora { rank } | Method::Qlora { rank } => Some(rank),
        }
    }
}

/// How the GPUs of a multi-GPU run divide the training state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanSharding {
    /// Every GPU holds the whole state (the trainer's `sharding = "none"`).
    None,
    /// The AdamW state divided (the trainer's `sharding = "optimizer"`): each GPU still holds
    /// the weights and, until the reduce, its micro-batches' whole gradients.
    Optimizer,
    /// Weights, gradients and optimizer state divided, two layers gathered in flight
    /// (ZeRO-3/FSDP, what open-r1 runs with DeepSpeed; not in this crate's trainer yet).
    #[default]
    Full,
}

/// The run to plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSettings {
    /// Full fine-tuning, LoRA or QLoRA.
    pub method: Method,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch (per GPU).
    pub micro_batch: usize,
    /// GPUs of the run.
    pub gpus: usize,
    /// How they divide the state.
    #[serde(default)]
    pub sharding: PlanSharding,
    /// Memory of one GPU, GiB.
    pub gpu_mem_gib: f64,
    /// Per-layer activation recomputation.
    pub recompute: bool,
    /// bf16 compute (else f32).
    pub bf16: bool,
    /// Rows per loss chunk (the trainer's `loss_chunk_tokens`).
    pub loss_chunk_tokens: usize,
    /// Query rows per attention chunk under recomputation (the trainer's `attention_chunk_tokens`).
    pub attention_chunk_tokens: usize,
}

impl Default for PlanSettings {
    fn default() -> Self {
        Self {
            method: Method::Full,
            seq_len: 32768,
            micro_batch: 1,
            gpus: 1,
            sharding: PlanSharding::Full,
            gpu_mem_gib: H200_GIB,
            recompute: true,
            bf16: true,
            loss_chunk_tokens: 2048,
            attention_chunk_tokens: 2048,
        }
    }
}

/// Per-GPU memory estimate of a run. All sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The settings planned.
    pub settings: PlanSettings,
    /// Parameters of the model.
    pub params: u64,
    /// Parameters updated by the optimizer.
    pub trainable_params: u64,
    /// Stored parameters (masters or frozen base, plus adapters), this GPU's share.
    pub weights: u64,
    /// bf16 copies of f32 weights made for compute.
    pub compute_copies: u64,
    /// QLoRA: the one tile of the NF4 base dequantized at a time, with its working memory.
    pub dequant_scratch: u64,
    /// Gradients, this GPU's share.
    pub gradients: u64,
    /// AdamW moments, this GPU's share.
    pub optimizer: u64,
    /// Saved activations and backward working set.
    pub activations: u64,
    /// Of `activations`: one layer's saved tensors.
    pub activations_per_layer: u64,
    /// Of `activations_per_layer`: the attention `[b, h, N, N]` tensors.
    pub attention_scores_per_layer: u64,
    /// CUDA context, allocator slack and the cuBLASLt workspace.
    pub overhead: u64,
    /// Sum of the above.
    pub total: u64,
    /// Memory of one GPU.
    pub gpu_bytes: u64,
    /// `total <= gpu_bytes`.
    pub fits: bool,
    /// When it does not fit: single changes that would, each with its computed total.
    pub suggestions: Vec<String>,
}

impl Plan {
    /// `total` in GiB.
    pub fn total_gib(&self) -> f64 {
        self.total as f64 / GIB
    }
}

fn layer_params(c: &ModelConfig) -> u64 {
    let (d, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let attn = 2 * d * q
        + 2 * d * kv
        + if c.qkv_bias { q + 2 * kv } else { 0 }
        + if c.o_bias { d } else { 0 };
    attn + 3 * d * i + if c.mlp_bias { 2 * i + d } else { 0 } + 2 * d
}

/// LoRA parameters of rank `r` on all seven linear layers of every block.
pub fn lora_params(c: &ModelConfig, rank: usize) -> u64 {
    let (d, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    // (in + out) · r per module.
    let per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d);
    per_layer * rank as u64 * c.num_hidden_layers as u64
}

/// Bytes of one decoder layer's seven linear weights as NF4 ([`crate::quant::Nf4Matrix`]): per
/// output column, the inputs rounded up to whole blocks of [`BLOCK`], half a byte a code and an
/// f32 scale a block. `P_l,lin/2 + 4·P_l,lin/64` (4.5 bits a weight, `model info`'s 4-bit
/// figure) when every input width (`d`, `h·hd`, `I`) is a multiple of 64, as in every published
/// config.
fn nf4_layer_bytes(c: &ModelConfig) -> u64 {
    c.linear_dims()
        .iter()
        .map(|&[d_in, d_out]| {
            let padded = d_in.div_ceil(BLOCK) * BLOCK;
            (padded * d_out / 2 + 4 * (padded / BLOCK) * d_out) as u64
        })
        .sum()
}

/// Plans `settings` for the model described by `config`.
pub fn plan(config: &ModelConfig, settings: &PlanSettings) -> Plan {
    let mut p = estimate(config, settings);
    if !p.fits {
        p.suggestions = suggestions(config, settings);
    }
    p
}

/// Plans for the model folder (or bare `config.json`) at `path`.
pub fn plan_for(path: impl AsRef<Path>, settings: &PlanSettings) -> Result<Plan> {
    Ok(plan(&ModelConfig::from_file(path)?, settings))
}

fn estimate(c: &ModelConfig, s: &PlanSettings) -> Plan {
    let e: u64 = if s.bf16 { 2 } else { 4 };
    let g = s.gpus.max(1) as u64;
    let params = c.num_parameters();
    let pl = layer_params(c);
    let layers = c.num_hidden_layers as u64;
    let (d, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let (h, kv, hd) = (
        c.num_attention_heads as u64,
        c.num_key_value_heads as u64,
        c.head_dim as u64,
    );
    let (b, n) = (s.micro_batch as u64, s.seq_len as u64);
    let t = b * n;
    let chunk = t.min(s.loss_chunk_tokens as u64);

    let (lora, rank) = match s.method.rank() {
        None => (0, 0),
        Some(rank) => (lora_params(c, rank), rank as u64),
    };
    let qlora = matches!(s.method, Method::Qlora { .. });
    let linear = c.num_linear_weight_parameters();
    let trainable = if lora > 0 { lora } else { params };
    let weights = match s.method {
        Method::Full => 4 * params,
        Method::Lora { .. } => e * params + 4 * lora,
        Method::Qlora { .. } => layers * nf4_layer_bytes(c) + e * (params - linear) + 4 * lora,
    };
    let compute_copies = match (s.bf16, lora > 0) {
        (false, _) => 0,
        (true, true) => 2 * lora,
        (true, false) => {
            let trunk = if s.recompute {
                2 * 2 * pl
            } else {
                2 * layers * pl
            };
            trunk + 2 * v * d
        }
    };
    let dequant_scratch = if qlora {
        DEQUANT_TILE_ELEMENTS as u64 * (DEQUANT_SCRATCH_BYTES_PER_ELEMENT + e)
    } else {
        0
    };
    let gradients = 4 * trainable + if lora > 0 { 0 } else { 4 * (v * d).max(pl) };
    let optimizer = 8 * trainable;

    // Query rows whose scores against all N keys exist at once.
    let rows = if s.recompute {
        n.min(s.attention_chunk_tokens as u64)
    } else {
        n
    };
    let chunked = rows < n;
    let scores = 2 * e * b * h * rows * n + 4 * rows * n;
    let lora_act = if lora > 0 { 7 * e * t * rank } else { 0 };
    let chunk_io = if chunked { 7 * e * t * h * hd } else { 0 };
    let per_layer = 16 * t * d
        + e * t * (2 * d + 6 * h * hd + 2 * kv * hd + 5 * i)
        + scores
        + lora_act
        + chunk_io;
    let trunk = if s.recompute {
        layers * e * t * d + per_layer
    } else {
        layers * per_layer
    };
    let activations = trunk
        + (e + 8) * t * d
        + e * t * d
        + (e + 16) * chunk * v
        + 2 * e * b * h * rows * n
        + 2 * e * t * i;

    // ZeRO-3: state sharded, two layers gathered in flight. The trainer's optimizer sharding
    // divides the AdamW state only.
    let shard = |x: u64| if g > 1 { x.div_ceil(g) } else { x };
    let gathered = match (g > 1, qlora) {
        (false, _) => 0,
        (true, false) => 2 * e * pl,
        (true, true) => 2 * (nf4_layer_bytes(c) + e * (pl - linear / layers.max(1))),
    };
    let gpu_bytes = (s.gpu_mem_gib * GIB) as u64;
    let overhead = (GIB + 0.05 * gpu_bytes as f64) as u64;
    let (weights, gradients, optimizer) = match s.sharding {
        PlanSharding::None => (weights, gradients, optimizer),
        PlanSharding::Optimizer => (weights, gradients, shard(optimizer)),
        PlanSharding::Full => (
            shard(weights) + gathered,
            shard(gradients),
            shard(optimizer),
        ),
    };
    let total =
        weights + compute_copies + dequant_scratch + gradients + optimizer + activations + overhead;
    Plan {
        settings: s.clone(),
        params,
        trainable_params: trainable,
        weights,
        compute_copies,
        dequant_scratch,
        gradients,
        optimizer,
        activations,
        activations_per_layer: per_layer,
        attention_scores_per_layer: scores,
        overhead,
        total,
        gpu_bytes,
        fits: total <= gpu_bytes,
        suggestions: vec![],
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

fn suggestions(c: &ModelConfig, s: &PlanSettings) -> Vec<String> {
    let mut out = Vec::new();
    let fits = |t: &PlanSettings| {
        let p = estimate(c, t);
        p.fits.then_some(p.total)
    };
    if !s.recompute {
        let t = PlanSettings {
            recompute: true,
            ..s.clone()
        };
        if let Some(total) = fits(&t) {
            out.push(format!("recompute = true: {} per GPU", gib(total)));
        }
    }
    // A cheaper method, first as configured, then with recomputation.
    let mut cheaper = |method: Method, label: String| {
        for recompute in [s.recompute, true] {
            let t = PlanSettings {
                method,
                recompute,
                ..s.clone()
            };
            if let Some(total) = fits(&t) {
                let extra = if recompute && !s.recompute {
                    " with recompute = true"
                } else {
                    ""
                };
                out.push(format!("{label}{extra}: {} per GPU", gib(total)));
                break;
            }
        }
    };
    if s.method == Method::Full {
        cheaper(
            Method::Lora { rank: 16 },
            "LoRA rank 16 on all linear layers".into(),
        );
    }
    // A 4-bit base, for full fine-tuning (rank 16) or LoRA (its rank) that does not fit.
    if let Some(rank) = match s.method {
        Method::Full => Some(16),
        Method::Lora { rank } => Some(rank),
        Method::Qlora { .. } => None,
    } {
        cheaper(
            Method::Qlora { rank },
            format!("QLoRA (4-bit base, rank {rank}; lora.base_bits = 4)"),
        );
    }
    // Smaller attention chunks under recomputation: the largest halving (down to 128 rows) that
    // fits.
    if s.recompute {
        let mut rows = s.attention_chunk_tokens.min(s.seq_len) / 2;
        while rows >= 128 {
            let t = PlanSettings {
                attention_chunk_tokens: rows,
                ..s.clone()
            };
            if let Some(total) = fits(&t) {
                out.push(format!(
                    "attention_chunk_tokens = {rows}: {} per GPU",
                    gib(total)
                ));
                break;
            }
            rows /= 2;
        }
    }
    if s.micro_batch > 1 {
        let t = PlanSettings {
            micro_batch: 1,
            ..s.clone()
        };
        if let Some(total) = fits(&t) {
            out.push(format!(
                "micro_batch = 1 (and grad_accum × {}): {} per GPU",
                s.micro_batch,
                gib(total)
            ));
        }
    }
    // The fewest GPUs (from the next power of two up) on which `sharding` fits.
    let fewest_gpus = |sharding| {
        [2, 4, 8, 16, 32, 64]
            .into_iter()
            .filter(|&g| g > s.gpus)
            .find_map(|gpus| {
                let t = PlanSettings {
                    gpus,
                    sharding,
                    ..s.clone()
                };
                fits(&t).map(|total| (gpus, total))
            })
    };
    if s.sharding != PlanSharding::Full
        && let Some((gpus, total)) = fewest_gpus(PlanSharding::Optimizer)
    {
        out.push(format!(
            "sharding = \"optimizer\" over {gpus} GPUs: {} per GPU",
            gib(total)
        ));
    }
    if let Some((gpus, total)) = fewest_gpus(PlanSharding::Full) {
        out.push(format!(
            "shard over {gpus} GPUs (ZeRO-3; not in this crate's trainer yet): {} per GPU",
            gib(total)
        ));
    }
    // Longest sequence (a multiple of 512) that fits, by bisection.
    let at = |n: usize| {
        fits(&PlanSettings {
            seq_len: n,
            ..s.clone()
        })
    };
    if s.seq_len > 512 && at(512).is_some() {
        let (mut lo, mut hi) = (1, s.seq_len.div_ceil(512));
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if at(mid * 512).is_some() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let total = at(lo * 512).expect("checked");
        out.push(format!("seq_len = {}: {} per GPU", lo * 512, gib(total)));
    }
    if out.is_empty() {
        out.push("no single change fits (recompute, LoRA, QLoRA, smaller attention chunks, up to 64 GPUs, shorter sequences); combine them".into());
    }
    out
}

/// One published student's `config.json` values.
struct Published {
    name: &'static str,
    base: &'static str,
    arch: &'static str,
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
}

const fn student(
    name: &'static str,
    base: &'static str,
    arch: &'static str,
    [vocab, hidden, intermediate, layers, heads, kv_heads]: [usize; 6],
) -> Published {
    Published {
        name,
        base,
        arch,
        vocab,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
    }
}

/// From the published `config.json` of each DeepSeek-R1-Distill checkpoint (all untied, SwiGLU,
/// head width 128): [vocab, hidden, intermediate, layers, heads, KV heads].
const PUBLISHED: [Published; 6] = [
    student(
        "DeepSeek-R1-Distill-Qwen-1.5B",
        "Qwen2.5-Math-1.5B",
        "Qwen2ForCausalLM",
        [151_936, 1536, 8960, 28, 12, 2],
    ),
    student(
        "DeepSeek-R1-Distill-Qwen-7B",
        "Qwen2.5-Math-7B",
        "Qwen2ForCausalLM",
        [152_064, 3584, 18_944, 28, 28, 4],
    ),
    student(
        "DeepSeek-R1-Distill-Llama-8B",
        "Llama-3.1-8B",
        "LlamaForCausalLM",
        [128_256, 4096, 14_336, 32, 32, 8],
    ),
    student(
        "DeepSeek-R1-Distill-Qwen-14B",
        "Qwen2.5-14B",
        "Qwen2ForCausalLM",
        [152_064, 5120, 13_824, 48, 40, 8],
    ),
    student(
        "DeepSeek-R1-Distill-Qwen-32B",
        "Qwen2.5-32B",
        "Qwen2ForCausalLM",
        [152_064, 5120, 27_648, 64, 40, 8],
    ),
    student(
        "DeepSeek-R1-Distill-Llama-70B",
        "Llama-3.3-70B-Instruct",
        "LlamaForCausalLM",
        [128_256, 8192, 28_672, 80, 64, 8],
    ),
];

/// The students DeepSeek distilled from R1, with their public `config.json` values:
/// (name, base model, config).
pub fn r1_distill_students() -> Vec<(&'static str, &'static str, ModelConfig)> {
    PUBLISHED
        .iter()
        .map(|p| {
            let v = json!({
                "architectures": [p.arch],
                "vocab_size": p.vocab,
                "hidden_size": p.hidden,
                "intermediate_size": p.intermediate,
                "num_hidden_layers": p.layers,
                "num_attention_heads": p.heads,
                "num_key_value_heads": p.kv_heads,
                "tie_word_embeddings": false,
            });
            let config =
                ModelConfig::from_value(v, Path::new(p.name)).expect("published configs are valid");
            (p.name, p.base, config)
        })
        .collect()
}

/// Markdown table of the R1-distill students on 1 and 8 GPUs of `gpu_mem_gib` at 32k and 4k
/// tokens (micro-batch 1, bf16): full fine-tuning with and without recomputation, LoRA and QLoRA
/// rank 16 with recomputation. Cells are GiB per GPU, ✗ where it does not fit.
pub fn r1_distill_table(gpu_mem_gib: f64) -> String {
    let mut out = String::from(
        "| student | params | seq | GPUs | full | full + recompute | LoRA r16 + recompute | QLoRA r16 + recompute |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, _, c) in r1_distill_students() {
        for seq in [32768, 4096] {
            for gpus in [1, 8] {
                let cell = |method, recompute| {
                    let p = plan(
                        &c,
                        &PlanSettings {
                            method,
                            seq_len: seq,
                            gpus,
                            gpu_mem_gib,
                            recompute,
                            ..PlanSettings::default()
                        },
                    );
                    let mark = if p.fits { "" } else { " ✗" };
                    format!("{:.0}{mark}", p.total_gib())
                };
                out.push_str(&format!(
                    "| {} | {:.1}B | {}k | {} | {} | {} | {} | {} |\n",
                    name.trim_start_matches("DeepSeek-R1-Distill-"),
                    c.num_parameters() as f64 / 1e9,
                    seq / 1024,
                    gpus,
                    cell(Method::Full, false),
                    cell(Method::Full, true),
                    cell(Method::Lora { rank: 16 }, true),
                    cell(Method::Qlora { rank: 16 }, true),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        // d 64, I 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 100, untied, q/k/v biases.
        ModelConfig::from_value(
            json!({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "tie_word_embeddings": false}),
            Path::new("tiny"),
        )
        .unwrap()
    }

    #[test]
    fn hand_computed_tiny_plan() {
        let c = tiny();
        // Per layer: q 64·64+64, k/v 2·(64·32+32), o 64·64, MLP 3·64·128, norms 2·64.
        let pl = (4096 + 64) + 2 * (2048 + 32) + 4096 + 24_576 + 128;
        assert_eq!(layer_params(&c), pl);
        let params = 2 * 100 * 64 + 2 * pl + 64;
        assert_eq!(c.num_parameters(), params);
        let s = PlanSettings {
            seq_len: 8,
            micro_batch: 2,
            gpus: 1,
            sharding: PlanSharding::Full,
            gpu_mem_gib: 1.0,
            recompute: false,
            bf16: false,
            loss_chunk_tokens: 4,
            attention_chunk_tokens: 8,
            method: Method::Full,
        };
        let p = plan(&c, &s);
        // Four GPUs: replicated, the trainer's optimizer sharding (AdamW state only), ZeRO-3.
        let on4 = |sharding| {
            plan(
                &c,
                &PlanSettings {
                    gpus: 4,
                    sharding,
                    ..s.clone()
                },
            )
        };
        let (none, opt, full) = (
            on4(PlanSharding::None),
            on4(PlanSharding::Optimizer),
            on4(PlanSharding::Full),
        );
        assert_eq!(
            (none.weights, none.gradients, none.optimizer),
            (p.weights, p.gradients, p.optimizer)
        );
        assert_eq!((opt.weights, opt.gradients), (p.weights, p.gradients));
        assert_eq!(opt.optimizer, (8 * params).div_ceil(4));
        assert_eq!(full.optimizer, opt.optimizer);
        // ZeRO-3 divides weights and gradients too, and gathers two f32 layers in flight.
        assert_eq!(full.weights, (4 * params).div_ceil(4) + 2 * 4 * pl);
        assert_eq!(full.gradients, p.gradients.div_ceil(4));
        assert_eq!(p.weights, 4 * params);
        assert_eq!(p.compute_copies, 0);
        // The largest stage's gradients (a layer here, larger than the 100 × 64 head) are transient.
        assert_eq!(p.gradients, 4 * params + 4 * pl);
        assert_eq!(p.optimizer, 8 * params);
        // T = 16, chunks of 8 rows = the whole sequence (no chunking). Per layer:
        // 16·16·64 + 4·16·(128 + 384 + 64 + 640) + 2·4·2·4·8² + 4·8².
        let per_layer = 16 * 16 * 64 + 4 * 16 * 1216 + 2 * 4 * 2 * 4 * 64 + 4 * 64;
        assert_eq!(p.activations_per_layer, per_layer);
        assert_eq!(p.attention_scores_per_layer, 4096 + 256);
        let rest =
            12 * 16 * 64 + 4 * 16 * 64 + 20 * 4 * 100 + 2 * 4 * 2 * 4 * 64 + 2 * 4 * 16 * 128;
        assert_eq!(p.activations, 2 * per_layer + rest);
        let r = plan(
            &c,
            &PlanSettings {
                recompute: true,
                ..s.clone()
            },
        );
        assert_eq!(r.activations, 2 * 4 * 16 * 64 + per_layer + rest);
        // Chunks of 4 query rows: scores 2·4·2·4·(4·8) + 4·(4·8), plus q/k/v/context and their
        // gradients 7·4·16·64; backward's N² term halves too.
        let q = plan(
            &c,
            &PlanSettings {
                recompute: true,
                attention_chunk_tokens: 4,
                ..s.clone()
            },
        );
        let chunked = per_layer - (4096 + 256) + (2048 + 128) + 7 * 4 * 16 * 64;
        assert_eq!(q.activations_per_layer, chunked);
        let rest_q = rest - 2 * 4 * 2 * 4 * 64 + 2 * 4 * 2 * 4 * 32;
        assert_eq!(q.activations, 2 * 4 * 16 * 64 + chunked + rest_q);
        // LoRA rank 2: (in + out)·r over q, k, v, o, gate, up, down.
        let lp = ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)) * 2 * 2;
        assert_eq!(lora_params(&c, 2), lp);
        let l = plan(
            &c,
            &PlanSettings {
                method: Method::Lora { rank: 2 },
                ..s
            },
        );
        assert_eq!(
            (l.weights, l.gradients, l.optimizer),
            (4 * params + 4 * lp, 4 * lp, 8 * lp)
        );
        assert_eq!(
            l.total,
            l.weights + l.gradients + l.optimizer + l.activations + l.overhead
        );
    }

    #[test]
    fn qlora_hand_computed_tiny_plan() {
        let c = tiny();
        // The seven linear weights of each layer: q 64·64, k/v 2·64·32, o 64·64, MLP 3·64·128.
        let linear = 2 * (4096 + 4096 + 4096 + 24_576);
        assert_eq!(c.num_linear_weight_parameters(), linear);
        // NF4: half a byte a weight and an f32 scale per 64 weights, 0.5625 bytes a weight.
        let nf4 = linear / 2 + linear / 64 * 4;
        assert_eq!(nf4, 41_472);
        assert_eq!(nf4 * 16, linear * 9);
        // Embeddings, head, final norm; per layer the q/k/v biases and two norms.
        let rest = 2 * 100 * 64 + 64 + 2 * (128 + 2 * 64);
        assert_eq!(c.num_parameters() - linear, rest);
        let lp = lora_params(&c, 2);
        let s = PlanSettings {
            method: Method::Qlora { rank: 2 },
            seq_len: 8,
            micro_batch: 2,
            gpus: 1,
            sharding: PlanSharding::Full,
            gpu_mem_gib: 1.0,
            recompute: false,
            bf16: false,
            loss_chunk_tokens: 4,
            attention_chunk_tokens: 8,
        };
        let q = plan(&c, &s);
        let l = plan(
            &c,
            &PlanSettings {
                method: Method::Lora { rank: 2 },
                ..s.clone()
            },
        );
        // f32: the rest in 4 bytes; no compute copies; one tile of 2²⁴ weights dequantized at a
        // time, 16 scratch bytes and the 4-byte value each.
        assert_eq!(q.weights, nf4 + 4 * rest + 4 * lp);
        assert_eq!(q.compute_copies, 0);
        assert_eq!(q.dequant_scratch, (1 << 24) * (16 + 4));
        assert_eq!(
            (q.trainable_params, q.gradients, q.optimizer),
            (lp, 4 * lp, 8 * lp)
        );
        assert_eq!(q.activations, l.activations);
        assert_eq!(
            q.total,
            q.weights + q.dequant_scratch + q.gradients + q.optimizer + q.activations + q.overhead
        );
        assert_eq!(l.dequant_scratch, 0);
        // bf16: the rest in 2 bytes, bf16 copies of the adapters.
        let b = plan(
            &c,
            &PlanSettings {
                bf16: true,
                ..s.clone()
            },
        );
        assert_eq!(b.weights, nf4 + 2 * rest + 4 * lp);
        assert_eq!(b.compute_copies, 2 * lp);
        assert_eq!(b.dequant_scratch, (1 << 24) * (16 + 2));
        // Two GPUs: the stored state halves, plus two layers in flight as stored (NF4 linear
        // weights, bf16 biases and norms); the scratch is per GPU.
        let g = plan(
            &c,
            &PlanSettings {
                bf16: true,
                gpus: 2,
                ..s.clone()
            },
        );
        assert_eq!(
            g.weights,
            (nf4 + 2 * rest + 4 * lp).div_ceil(2) + 2 * (nf4 / 2 + 2 * (128 + 2 * 64))
        );
        assert_eq!((g.gradients, g.optimizer), (2 * lp, 4 * lp));
        assert_eq!(g.dequant_scratch, b.dequant_scratch);
        // An input width that is not a multiple of 64 is padded to whole blocks, as
        // `quant::Nf4Matrix` stores it: down_proj reads I = 96, stored as 128 rows.
        let odd = ModelConfig::from_value(
            json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
                   "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "tie_word_embeddings": true}),
            Path::new("odd"),
        )
        .unwrap();
        let aligned = (64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 96) * 9 / 16;
        assert_eq!(nf4_layer_bytes(&odd), aligned + 128 * 64 / 2 + 2 * 64 * 4);
    }

    /// R1-Distill-Llama-70B (Llama-3.3-70B's shape) with QLoRA rank 16, bf16, recomputation:
    /// one H200, where full fine-tuning and LoRA on a bf16 base (131 GiB of weights) do not fit
    /// and name QLoRA.
    #[test]
    fn llama_70b_qlora_fits_one_h200() {
        let (name, _, c) = r1_distill_students().pop().unwrap();
        assert_eq!(name, "DeepSeek-R1-Distill-Llama-70B");
        let qlora = Method::Qlora { rank: 16 };
        let at = |method, seq_len, attention_chunk_tokens| {
            plan(
                &c,
                &PlanSettings {
                    method,
                    seq_len,
                    attention_chunk_tokens,
                    ..PlanSettings::default()
                },
            )
        };
        // 80 layers × 855,638,016 linear weights in NF4, the other 2,102,665,216 parameters in
        // bf16 (`model info`'s 4-bit figure, 39.8 GiB), plus the f32 adapters.
        let linear = 80 * 855_638_016u64;
        let rest = 70_553_706_496 - linear;
        let lp = lora_params(&c, 16);
        let q = at(qlora, 4096, 2048);
        assert_eq!(q.weights, linear / 2 + linear / 64 * 4 + 2 * rest + 4 * lp);
        assert_eq!(q.dequant_scratch, (1 << 24) * 18);
        assert!((39.0..41.0).contains(&(q.weights as f64 / GIB)));
        // At 32k tokens the layer's attention probabilities are the largest term: with 2048-row
        // query chunks it does not fit, and the planner names the chunk size that does.
        let wide = at(qlora, 32768, 2048);
        assert!(!wide.fits, "{:.1} GiB", wide.total_gib());
        assert!(
            wide.suggestions
                .iter()
                .any(|s| s.starts_with("attention_chunk_tokens = 1024: ")),
            "{:?}",
            wide.suggestions
        );
        for (seq, chunk, range) in [(4096, 2048, 60.0..75.0), (32768, 1024, 130.0..H200_GIB)] {
            let q = at(qlora, seq, chunk);
            assert!(
                q.fits && q.suggestions.is_empty() && range.contains(&q.total_gib()),
                "{seq}: {:.1} GiB",
                q.total_gib()
            );
            for method in [Method::Full, Method::Lora { rank: 16 }] {
                let p = at(method, seq, chunk);
                assert!(!p.fits, "{method:?} at {seq}: {:.1} GiB", p.total_gib());
                let named = format!(
                    "QLoRA (4-bit base, rank 16; lora.base_bits = 4): {}",
                    gib(q.total)
                );
                assert!(
                    p.suggestions.iter().any(|s| s.starts_with(&named)),
                    "{method:?} at {seq}: {:?}",
                    p.suggestions
                );
            }
        }
    }

    #[test]
    fn published_students_have_published_sizes() {
        let sizes: Vec<u64> = r1_distill_students()
            .iter()
            .map(|(_, _, c)| c.num_parameters())
            .collect();
        assert_eq!(
            sizes,
            [
                1_777_088_000,
                7_615_616_512,
                8_030_261_248,
                14_770_033_664,
                32_763_876_352,
                70_553_706_496
            ]
        );
    }

    #[test]
    fn distill_1_5b_on_h200() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/deepseek-r1-distill-qwen-1.5b");
        let s = PlanSettings::default();
        let p = plan_for(&dir, &s).unwrap();
        assert_eq!(p.params, 1_777_088_000);
        assert_eq!(p.weights, 4 * 1_777_088_000);
        assert_eq!(p.optimizer, 8 * 1_777_088_000);
        // Without recomputation, 12 heads × 32768² × bf16 × (numerator + probabilities) + the
        // mask: 52 GiB per layer, in all 28 layers.
        let no_rc = PlanSettings {
            recompute: false,
            ..s.clone()
        };
        let plain = plan_for(&dir, &no_rc).unwrap();
        assert_eq!(
            plain.attention_scores_per_layer,
            2 * 2 * 12 * (1 << 30) + 4 * (1 << 30)
        );
        assert!(!plain.fits && plain.activations > 28 * plain.attention_scores_per_layer);
        // Every suggestion is a computed plan that fits: recomputation is one.
        assert!(
            plain.suggestions[0].starts_with("recompute = true: "),
            "{:?}",
            plain.suggestions
        );
        // With recomputation and 2048-row query chunks: 1/16 of that, one layer at a time.
        assert_eq!(
            p.attention_scores_per_layer,
            plain.attention_scores_per_layer / 16
        );
        assert!(
            p.fits && p.suggestions.is_empty(),
            "{:.1} GiB",
            p.total_gib()
        );

        // Eight sequences per micro-batch do not fit; the longest sequence that does is found
        // by bisection, and 512 more tokens would not fit.
        let big = PlanSettings {
            micro_batch: 8,
            ..s.clone()
        };
        let p = plan_for(&dir, &big).unwrap();
        assert!(!p.fits, "{:.1} GiB", p.total_gib());
        let n: usize = p
            .suggestions
            .iter()
            .find_map(|s| {
                s.strip_prefix("seq_len = ")?
                    .split(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{:?}", p.suggestions));
        let at = |seq_len| {
            plan_for(
                &dir,
                &PlanSettings {
                    seq_len,
                    ..big.clone()
                },
            )
            .unwrap()
            .fits
        };
        assert!(at(n) && !at(n + 512), "{n}");
        assert!(
            p.suggestions
                .iter()
                .any(|s| s.starts_with("micro_batch = 1"))
        );
    }
}
