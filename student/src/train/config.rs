//! Trainer parameters. Defaults follow open-r1's SFT recipe for R1-distilled students (lr 4e-5,
//! cosine to 10% of peak, 3% warmup, 5 epochs, 32k tokens, global-norm clipping 0.2, loss on the
//! completion only) with PyTorch's AdamW (betas 0.9/0.999, eps 1e-8) and no weight decay.

use serde::{Deserialize, Serialize};

use super::error::{TrainError, TrainResult};

/// Learning-rate shape after warmup (warmup is always linear from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Peak learning rate until the end.
    Constant,
    /// Linear decay from the peak to `min_lr_ratio × peak` at the last step.
    Linear,
    /// Half-cosine decay from the peak to `min_lr_ratio × peak` at the last step
    /// (transformers' `cosine_with_min_lr`).
    Cosine,
}

/// How big one micro-batch (one forward/backward) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MicroBatch {
    /// A fixed number of sequences.
    Sequences(usize),
    /// As many length-grouped sequences as fit in this many padded tokens (rows × longest row);
    /// a sequence longer than the budget gets a micro-batch of its own.
    Tokens(usize),
}

/// What happens to an example longer than `max_seq_len` (prompt + target tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Leave it out. The default: a cut reasoning trace would teach the model never to answer
    /// and never to emit EOS.
    Drop,
    /// Keep the prompt and the first `max_seq_len − prompt` target tokens; dropped when the
    /// prompt alone leaves no target token.
    TruncateTarget,
}

/// Arithmetic precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything f32 (CPU default; exact reference arithmetic).
    F32,
    /// bf16 matmuls and activations; f32 master weights, gradients, optimizer state, RMSNorm
    /// statistics and loss. The frozen base of a LoRA run is stored in bf16.
    Bf16,
}

/// Linear layers LoRA can adapt (the HF module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `self_attn.q_proj`
    QProj,
    /// `self_attn.k_proj`
    KProj,
    /// `self_attn.v_proj`
    VProj,
    /// `self_attn.o_proj`
    OProj,
    /// `mlp.gate_proj`
    GateProj,
    /// `mlp.up_proj`
    UpProj,
    /// `mlp.down_proj`
    DownProj,
}

impl LoraTarget {
    /// Every linear layer of a decoder block (PEFT's `all-linear` minus the head).
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// The HF module name (`q_proj`, ...), as PEFT's `target_modules` lists it.
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    /// The parent module in HF naming (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }
}

/// Low-rank adapters: `y = x·W + (alpha/rank)·(dropout(x)·A)·B`, base frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of `A [in, r]` and `B [r, out]`.
    pub rank: usize,
    /// Scale numerator: the update is multiplied by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter's input (0 = off). Masks are drawn from the backend RNG reseeded
    /// per (seed, step, micro-batch, layer, module), so a resumed run redraws them exactly as long
    /// as nothing else reseeds or draws from that RNG meanwhile (Flex's is process-wide).
    pub dropout: f64,
    /// Which linear layers get adapters.
    pub target_modules: Vec<LoraTarget>,
    /// `Some(4)`: QLoRA. Every decoder linear weight of the frozen base (all seven, whatever
    /// `target_modules` adapts, as bitsandbytes quantizes every linear layer) is stored as NF4
    /// (4-bit NormalFloat, an f32 scale per block of 64; see [`crate::quant`]) and dequantized
    /// tile by tile inside each product; embeddings, norms, biases and the LM head keep the
    /// storage dtype.
    /// `None`: the base stays in the storage dtype. Left out of the serialised form when
    /// `None`, so existing runs keep their fingerprints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_bits: Option<u8>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: LoraTarget::ALL.to_vec(),
            base_bits: None,
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// True for QLoRA (a 4-bit base).
    pub fn quantized_base(&self) -> bool {
        self.base_bits.is_some()
    }
}

/// Everything that decides a training run. Serialisable, so the caller can store it and a
/// checkpoint can carry it; `TrainConfig::default()` is open-r1's recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Shape of the learning rate after warmup.
    pub schedule: LrSchedule,
    /// Warmup as a fraction of the total optimizer steps (rounded up, as transformers does).
    pub warmup_ratio: f64,
    /// Warmup in optimizer steps; overrides `warmup_ratio` when set.
    pub warmup_steps: Option<usize>,
    /// Final learning rate as a fraction of the peak (linear and cosine schedules).
    pub min_lr_ratio: f64,
    /// Passes over the data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Stop after this many optimizer steps, cycling through epochs as needed.
    pub max_steps: Option<usize>,
    /// Size of one forward/backward.
    pub micro_batch: MicroBatch,
    /// Micro-batches per optimizer step. The last step of an epoch may have fewer: steps never
    /// straddle epochs, so each epoch's order stays a function of (seed, epoch).
    pub grad_accum: usize,
    /// Longest example (prompt + target tokens) trained on.
    pub max_seq_len: usize,
    /// What happens to longer examples.
    pub overlong: Overlong,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε (added to √v̂, as PyTorch does).
    pub adam_eps: f64,
    /// Decoupled weight decay on matrices; biases and norm weights are never decayed
    /// (transformers' default parameter groups).
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this (`None` = no clipping).
    pub max_grad_norm: Option<f64>,
    /// Seed of the per-epoch data order, LoRA initialisation and LoRA dropout.
    pub seed: u64,
    /// Train low-rank adapters on a frozen base instead of every weight.
    pub lora: Option<LoraConfig>,
    /// Arithmetic precision.
    pub precision: Precision,
    /// Per-layer activation recomputation: keep only each layer's input and recompute the layer
    /// during backward (one extra forward, far less activation memory).
    pub recompute: bool,
    /// Target rows sent through the LM head at once; bounds the logits held in memory to
    /// `loss_chunk_tokens × vocab` f32 values.
    pub loss_chunk_tokens: usize,
    /// With `recompute`, sequences longer than this run attention in query chunks of this many
    /// rows, each with its own backward, so a layer holds `[b, heads, chunk, n]` attention
    /// probabilities instead of `[b, heads, n, n]` (Burn 0.21 has no fused attention under
    /// autodiff). Costs one more attention forward per layer.
    pub attention_chunk_tokens: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 4e-5,
            schedule: LrSchedule::Cosine,
            warmup_ratio: 0.03,
            warmup_steps: None,
            min_lr_ratio: 0.1,
            epochs: 5,
            max_steps: None,
            micro_batch: MicroBatch::Sequences(1),
            grad_accum: 1,
            max_seq_len: 32768,
            overlong: Overlong::Drop,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(0.2),
            seed: 42,
            lora: None,
            precision: Precision::F32,
            recompute: false,
            loss_chunk_tokens: 2048,
            attention_chunk_tokens: 2048,
        }
    }
}

impl TrainConfig {
    /// Checks that `devices` data-parallel devices can share each step's `grad_accum`
    /// micro-batches evenly.
    pub fn check_devices(&self, devices: usize) -> TrainResult<()> {
        if devices > 0 && !self.grad_accum.is_multiple_of(devices) {
            return Err(TrainError::config(
                "grad_accum",
                format!(
                    "{} micro-batches per step cannot be shared evenly by {devices} devices (make it a multiple of {devices})",
                    self.grad_accum
                ),
            ));
        }
        Ok(())
    }

    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> TrainResult<()> {
        let bad = |field: &str, message: String| Err(TrainError::config(field, message));
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(
                "learning_rate",
                format!("{} is not >= 0", self.learning_rate),
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("{} is not in [0, 1]", self.warmup_ratio),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                format!("{} is not in [0, 1]", self.min_lr_ratio),
            );
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "must be positive (or set max_steps)".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be positive".into());
        }
        match self.micro_batch {
            MicroBatch::Sequences(0) | MicroBatch::Tokens(0) => {
                return bad("micro_batch", "must be positive".into());
            }
            _ => {}
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be positive".into());
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len", format!("{} is below 2", self.max_seq_len));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) {
            return bad(
                "adam_beta1",
                format!("{} is not in [0, 1)", self.adam_beta1),
            );
        }
        if !(0.0..1.0).contains(&self.adam_beta2) {
            return bad(
                "adam_beta2",
                format!("{} is not in [0, 1)", self.adam_beta2),
            );
        }
        if !(self.adam_eps > 0.0 && self.adam_eps.is_finite()) {
            return bad("adam_eps", format!("{} is not > 0", self.adam_eps));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", format!("{} is not >= 0", self.weight_decay));
        }
        if let Some(c) = self.max_grad_norm
            && !(c > 0.0 && c.is_finite())
        {
            return bad("max_grad_norm", format!("{c} is not > 0"));
        }
        if self.loss_chunk_tokens == 0 {
            return bad("loss_chunk_tokens", "must be positive".into());
        }
        if self.attention_chunk_tokens == 0 {
            return bad("attention_chunk_tokens", "must be positive".into());
        }
        if let Some(l) = &self.lora {
            if l.rank == 0 {
                return bad("lora.rank", "must be positive".into());
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return bad("lora.alpha", format!("{} is not > 0", l.alpha));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad("lora.dropout", format!("{} is not in [0, 1)", l.dropout));
            }
            if l.target_modules.is_empty() {
                return bad("lora.target_modules", "is empty".into());
            }
            if let Some(bits) = l.base_bits
                && bits != 4
            {
                return bad(
                    "lora.base_bits",
                    format!(
                        "{bits} is not supported (4 = NF4, as QLoRA; leave it out for an unquantized base)"
                    ),
                );
            }
        }
        Ok(())
    }
}
