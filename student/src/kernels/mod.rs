//! The matrix products under training, behind one interface.
//!
//! The trainer's linear layers, LM head, loss chunks and attention call [`linear`] and
//! [`causal_attention`]. On the CPU they are Burn's own ops, unchanged. On CUDA, where Burn
//! 0.21's CubeCL products ran at 0.05–0.12× cuBLAS on the 1.5B model's shapes
//! (`bench/RESULTS-gpu-train.md`), they go through cuBLASLt (`cublaslt`, with `--features
//! cuda`) on CubeCL's own stream, with the backward registered as one autodiff node per product
//! ([`Kernels`] for `Autodiff<B>`). `DISTILL_GEMM=cubecl` keeps the (autotuned) CubeCL products
//! instead, `cubecl-untuned` CubeCL's single untuned kernel (the benchmarks' baseline);
//! `DISTILL_TF32=1` lets f32 products use TF32.

#[cfg(feature = "cuda")]
pub mod cublaslt;
mod layout;

use std::sync::OnceLock;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::softmax;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor, IntTensor};
use burn::tensor::{TensorMetadata, TensorPrimitive};
pub use burn_flex::ops::fused::AdamwStep;

/// Which implementation CUDA's matrix products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// cuBLASLt (bf16/f16 in, f32 accumulation; f32 exact unless TF32 is allowed).
    Cublaslt,
    /// Burn's CubeCL kernels (autotuned).
    Cubecl,
    /// CubeCL's one untuned matmul kernel (what builds without `autotune` ran), through the
    /// same routed model code: the baseline of the benchmarks.
    CubeclUntuned,
}

/// The process-wide product settings, read once from the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmSettings {
    /// The implementation of CUDA's products.
    pub path: GemmPath,
    /// Let f32 products use TF32 tensor cores (cuBLASLt only).
    pub tf32: bool,
}

static SETTINGS: OnceLock<Result<GemmSettings, String>> = OnceLock::new();

/// The settings from `DISTILL_GEMM` (`cublaslt`, the default, `cubecl` or `cubecl-untuned`) and
/// `DISTILL_TF32` (`1` allows TF32), or the error naming a value `DISTILL_GEMM` does not take.
pub fn read_gemm_settings() -> Result<GemmSettings, String> {
    SETTINGS
        .get_or_init(|| {
            let path = match std::env::var("DISTILL_GEMM").as_deref() {
                Err(_) | Ok("") | Ok("cublaslt") => GemmPath::Cublaslt,
                Ok("cubecl") => GemmPath::Cubecl,
                Ok("cubecl-untuned") => GemmPath::CubeclUntuned,
                Ok(other) => {
                    return Err(format!(
                        "DISTILL_GEMM={other:?}: expected \"cublaslt\", \"cubecl\" or \"cubecl-untuned\""
                    ));
                }
            };
            let tf32 = matches!(std::env::var("DISTILL_TF32").as_deref(), Ok("1") | Ok("true"));
            Ok(GemmSettings { path, tf32 })
        })
        .clone()
}

/// [`read_gemm_settings`] where an error can no longer be returned: [`prepare_cuda`] reports a
/// bad value before a run starts, so this panics only in code that skipped it.
pub fn gemm_settings() -> GemmSettings {
    read_gemm_settings().unwrap_or_else(|e| panic!("{e}"))
}

/// Where CubeCL keeps its autotuning results between runs: `DISTILL_AUTOTUNE_CACHE`, else
/// `$XDG_CACHE_HOME/distill/cubecl` or `~/.cache/distill/cubecl`. CubeCL's own default is the
/// `target/` folder of the nearest Cargo project above the working directory, which a user's
/// data folder usually is not, and which a `cargo clean` wipes.
#[cfg(feature = "cuda")]
pub fn autotune_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("DISTILL_AUTOTUNE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("distill").join("cubecl")
}

/// Prepares the CUDA backend before its first use: CubeCL's configuration (a `cubecl.toml`
/// and `CUBECL_*` variables still apply) with the autotuning cache in [`autotune_cache_dir`]
/// unless the configuration names one, the product settings (a bad `DISTILL_GEMM` is an error
/// here), and, when the products go through cuBLASLt, a check that the library loads. Call it
/// before the first CUDA tensor; later calls only re-check.
#[cfg(feature = "cuda")]
pub fn prepare_cuda() -> Result<(), String> {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        // The configuration can be set only before CubeCL first reads it.
        if CubeClRuntimeConfig::storage().lock().is_some() {
            return;
        }
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(autotune_cache_dir());
        }
        CubeClRuntimeConfig::set(config);
    });
    if read_gemm_settings()?.path == GemmPath::Cublaslt {
        cublaslt::preflight()?;
    }
    Ok(())
}

/// Matrix products a backend may implement itself. The defaults are Burn's ops, so a backend
/// that does nothing here (the CPU) runs exactly the model code it always ran.
pub trait Kernels: Backend {
    /// Runs `f`, a stretch of host code that launches many kernels (a training step), on the
    /// thread the backend launches them best from. The default: this thread.
    fn on_kernel_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Whether [`linear`] and [`causal_attention`] route their products through [`Kernels::gemm`].
    fn routes_products(_device: &Self::Device) -> bool {
        false
    }

    /// `lhs·rhs` for `[.., m, k]·[.., k, n]` with equal leading (batch) dimensions.
    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// Whether [`causal_attention`] of these queries runs as one operation
    /// ([`Kernels::fused_causal_attention`]) rather than as Burn's parts.
    fn fuses_attention(_q: &FloatTensor<Self>) -> bool {
        false
    }

    /// Causal attention as one operation (one autodiff node, see [`Kernels::fuses_attention`]).
    fn fused_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let scale = attention_scale::<Self>(&q);
        Self::attention_forward(q, k, v, scale).0
    }

    /// Causal attention's output and its softmax probabilities (kept for the backward pass):
    /// `q [b, h, n, d]` over `k`, `v [b, h, t, d]`, `t ≥ n`, bottom-right aligned. The default
    /// composes Burn's ops.
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention_forward_composed::<Self>(q, k, v, scale)
    }

    /// Gradients `(dq, dk, dv)` of [`Kernels::attention_forward`] for the output's gradient.
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        attention_backward_composed::<Self>(q, k, v, probs, grad, scale)
    }

    /// Whether [`rms_norm`], [`rope`] and [`swiglu`] of this tensor run as single operations.
    fn fuses_elementwise(_x: &FloatTensor<Self>) -> bool {
        false
    }

    /// RMSNorm as one operation (one autodiff node, see [`Kernels::fuses_elementwise`]).
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, gamma, eps).0
    }

    /// RMSNorm over the last dim, `y = x·r·γ`, and `r = 1/√(mean(x²) + eps)` per row `[rows]`
    /// (kept for the backward pass). The default composes Burn's ops.
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        rms_norm_forward_composed::<Self>(x, gamma, eps)
    }

    /// Gradients `(dx, dγ)` of [`Kernels::rms_norm_forward`] for the output's gradient.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        r: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        rms_norm_backward_composed::<Self>(x, gamma, r, grad)
    }

    /// The rotary embedding as one operation (one autodiff node).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::rope_map(x, cos, sin, false)
    }

    /// `x·cos + rot(x)·sin` for `x [b, s, heads, hd]` and tables `[s, hd]`, `rot(x) = [−x₂, x₁]`
    /// over the halves of `hd`; with `transpose`, the map's transpose `g·cos + rotᵀ(g·sin)`
    /// (its gradient). The default composes Burn's ops.
    fn rope_map(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        rope_composed::<Self>(x, cos, sin, transpose)
    }

    /// SwiGLU's product as one operation (one autodiff node).
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::swiglu_forward(gate, up)
    }

    /// `silu(gate)·up`. The default composes Burn's ops.
    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = gate.shape();
        let flat = |t| float::<Self, 1>(Self::float_reshape(t, [shape.num_elements()].into()));
        let y = burn::tensor::activation::silu(flat(gate)) * flat(up);
        Self::float_reshape(y.into_primitive().tensor(), shape)
    }

    /// Gradients `(d gate, d up)` of [`Kernels::swiglu_forward`] for the output's gradient.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        swiglu_backward_composed::<Self>(gate, up, grad)
    }

    /// Cross-entropy as one operation (one autodiff node, see [`Kernels::fuses_elementwise`]).
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::cross_entropy_forward(logits, targets).0
    }

    /// Per-row NLL `[n]` of f32 logits `[n, v]` against one class index per row, and each
    /// row's log-sum-exp `[n]` (kept for the backward pass). The default composes Burn's ops.
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        cross_entropy_forward_composed::<Self>(logits, targets)
    }

    /// Gradient `[n, v]` of [`Kernels::cross_entropy_forward`]'s NLL for its gradient `[n]`.
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        cross_entropy_backward_composed::<Self>(logits, lse, targets, grad)
    }

    /// One AdamW step of `param` (f32) for `grad`, with the moments `(m, v)` of earlier steps
    /// (none on the first); returns the new `(param, m, v)`. The default is Burn's `AdamW`
    /// op for op, so it gives Burn's bits.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: AdamwStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        adamw_step_composed::<Self>(param, grad, moments, step)
    }

    /// `Σ x²` over every element of `x` as a one-element f32 tensor (the gradient norm's
    /// pass). The default is Burn's `square().sum()` in f32.
    fn sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        sum_of_squares_composed::<Self>(x)
    }
}

/// Whether the CPU's fused kernels are on: `DISTILL_FUSED=0` turns them off, so that a run
/// can be compared with Burn's own ops (which it then reproduces bit for bit).
pub fn cpu_fusion_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DISTILL_FUSED").map_or(true, |v| v.trim() != "0"))
}

/// Burn 0.21's autodiff records attention as its parts, each with its own backward op and
/// output tensors; burn-flex's fused kernels (`vendor/burn-flex/src/ops/fused.rs`) run each
/// (batch, head) pair as a few `gemm` products and one row pass, forward and backward.
impl Kernels for crate::CpuBackend {
    /// On one of rayon's threads. burn-flex's kernels split their work with rayon; started from
    /// a thread outside the pool, each one hands its work to the pool and sleeps until it is
    /// done (a wake-up and a context switch per op, thousands per step). From inside the pool a
    /// split costs a deque push. A 1-thread training step took ~10% less time (bench `train`,
    /// alternating runs); with one thread the pool's thread then runs everything itself.
    ///
    /// The pool is the calling thread's own, not rayon's global one. A step is one long job
    /// that takes burn-autodiff's process-wide graph lock; in a shared pool, a worker waiting
    /// inside one trainer's parallel op could take another trainer's whole step and run it on
    /// top of its stack, where it waited for the lock the frame below held: two train stages
    /// of one run, in one process, hung that way. Each trainer's thread now has a pool of
    /// its own (the same thread count, so the arithmetic is unchanged).
    fn on_kernel_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        if rayon::current_thread_index().is_some() {
            return f();
        }
        thread_local! {
            static POOL: std::cell::OnceCell<Option<rayon::ThreadPool>> =
                const { std::cell::OnceCell::new() };
        }
        POOL.with(|pool| {
            let pool = pool.get_or_init(|| {
                rayon::ThreadPoolBuilder::new()
                    .thread_name(|i| format!("kernels-{i}"))
                    .build()
                    .ok()
            });
            match pool {
                Some(pool) => pool.install(f),
                // No threads to be had: the caller's own thread still runs the step.
                None => f(),
            }
        })
    }

    fn fuses_attention(q: &FloatTensor<Self>) -> bool {
        q.dtype() == burn::tensor::DType::F32 && cpu_fusion_enabled()
    }

    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        burn_flex::ops::fused::causal_attention_forward(&q, &k, &v, scale)
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        burn_flex::ops::fused::causal_attention_backward(&q, &k, &v, &probs, &grad, scale)
    }

    fn fuses_elementwise(x: &FloatTensor<Self>) -> bool {
        x.dtype() == burn::tensor::DType::F32 && cpu_fusion_enabled()
    }

    fn rms_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        burn_flex::ops::fused::rms_norm_forward(&x, &gamma, eps)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        r: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        burn_flex::ops::fused::rms_norm_backward(&x, &gamma, &r, &grad)
    }

    fn rope_map(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transpose: bool,
    ) -> FloatTensor<Self> {
        burn_flex::ops::fused::rope(&x, &cos, &sin, transpose)
    }

    fn swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        burn_flex::ops::fused::swiglu_forward(&gate, &up)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        burn_flex::ops::fused::swiglu_backward(&gate, &up, &grad)
    }

    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !Self::fuses_elementwise(&logits) {
            return cross_entropy_forward_composed::<Self>(logits, targets);
        }
        burn_flex::ops::fused::cross_entropy_forward(&logits, &targets)
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if !Self::fuses_elementwise(&logits) {
            return cross_entropy_backward_composed::<Self>(logits, lse, targets, grad);
        }
        burn_flex::ops::fused::cross_entropy_backward(&logits, &lse, &targets, &grad)
    }

    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        step: AdamwStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let all_f32 = [&param, &grad]
            .into_iter()
            .chain(moments.as_ref().map(|(m, v)| [m, v]).into_iter().flatten())
            .all(|t| t.dtype() == burn::tensor::DType::F32);
        if !(all_f32 && cpu_fusion_enabled()) {
            return adamw_step_composed::<Self>(param, grad, moments, step);
        }
        burn_flex::ops::fused::adamw_step(param, &grad, moments, step)
    }

    /// One parallel read with f64 partial sums in fixed blocks (the same bits on any thread
    /// count), instead of a squared copy summed on one thread.
    fn sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if !(x.dtype() == burn::tensor::DType::F32 && cpu_fusion_enabled()) {
            return sum_of_squares_composed::<Self>(x);
        }
        burn_flex::ops::fused::sum_of_squares(&x)
    }
}

/// Burn's `Σ x²` in f32, as a one-element tensor: [`Kernels::sum_of_squares`]'s default.
pub fn sum_of_squares_composed<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let n = x.shape().num_elements();
    let x = float::<B, 1>(B::float_reshape(x, burn::tensor::Shape::new([n])));
    let x = if x.dtype() == burn::tensor::DType::F32 {
        x
    } else {
        x.cast(burn::tensor::DType::F32)
    };
    x.square().sum().into_primitive().tensor()
}

/// `1/√d` of queries `[.., d]`.
fn attention_scale<B: Backend>(q: &FloatTensor<B>) -> f32 {
    let shape = q.shape();
    1.0 / (shape[shape.num_dims() - 1] as f32).sqrt()
}

/// The `[n, t]` mask of keys in the future of each query (bottom-right aligned), as `[b, h, n, t]`.
fn future_mask<B: Backend>(
    [b, h, n, t]: [usize; 4],
    device: &B::Device,
) -> Tensor<B, 4, burn::tensor::Bool> {
    let rows = Tensor::<B, 1, Int>::arange(0..n as i64, device)
        .reshape([n, 1])
        .add_scalar((t - n) as i64);
    let cols = Tensor::<B, 1, Int>::arange(0..t as i64, device).reshape([1, t]);
    rows.lower(cols).reshape([1, 1, n, t]).expand([b, h, n, t])
}

/// [`Kernels::attention_forward`] from Burn's ops (products through [`Kernels::gemm`]).
pub fn attention_forward_composed<B: Kernels>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
    let [b, h, n, _] = q.dims();
    let t = k.dims()[2];
    let (k, v) = (repeat_kv(k, h), repeat_kv(v, h));
    let future = future_mask::<B>([b, h, n, t], &q.device());
    let scores = float::<B, 4>(B::gemm(
        q.into_primitive().tensor(),
        k.swap_dims(2, 3).into_primitive().tensor(),
    ))
    .mul_scalar(scale);
    let p = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3);
    let out = B::gemm(
        p.clone().into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    (out, p.into_primitive().tensor())
}

/// [`Kernels::attention_backward`] from Burn's ops: `dV = Pᵀ·dO`, `dS = scale·P∘(dO·Vᵀ − rowsum)`,
/// `dQ = dS·K`, `dK = dSᵀ·Q`.
pub fn attention_backward_composed<B: Kernels>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let mm = |a: Tensor<B, 4>, b: Tensor<B, 4>| {
        float::<B, 4>(B::gemm(
            a.into_primitive().tensor(),
            b.into_primitive().tensor(),
        ))
    };
    let (q, k, v) = (float::<B, 4>(q), float::<B, 4>(k), float::<B, 4>(v));
    let [b, h, _, d] = q.dims();
    let [_, kv, t, _] = k.dims();
    let (k, v) = (repeat_kv(k, h), repeat_kv(v, h));
    // A key/value head's gradient is the sum over the query heads that read it.
    let fold = |t_: Tensor<B, 4>| {
        if kv == h {
            t_
        } else {
            t_.reshape([b, kv, h / kv, t, d])
                .sum_dim(2)
                .reshape([b, kv, t, d])
        }
    };
    let (p, g) = (float::<B, 4>(probs), float::<B, 4>(grad));
    let dv = fold(mm(p.clone().swap_dims(2, 3), g.clone()));
    let dp = mm(g, v.swap_dims(2, 3));
    let dot = (dp.clone() * p.clone()).sum_dim(3);
    let ds = (p * (dp - dot)).mul_scalar(scale);
    let dq = mm(ds.clone(), k);
    let dk = fold(mm(ds.swap_dims(2, 3), q));
    (
        dq.into_primitive().tensor(),
        dk.into_primitive().tensor(),
        dv.into_primitive().tensor(),
    )
}

#[cfg(feature = "cuda")]
impl Kernels for crate::CudaBackend {
    fn routes_products(_device: &Self::Device) -> bool {
        gemm_settings().path != GemmPath::Cubecl
    }

    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        match gemm_settings().path {
            GemmPath::Cublaslt => cublaslt::matmul(lhs, rhs, gemm_settings().tf32),
            GemmPath::Cubecl => Self::float_matmul(lhs, rhs),
            GemmPath::CubeclUntuned => {
                let dtype = lhs.dtype;
                burn_cubecl::kernel::matmul::matmul(
                    lhs,
                    rhs,
                    None,
                    burn_cubecl::kernel::matmul::MatmulStrategy::Cube,
                    dtype,
                )
                .expect("CubeCL matmul")
            }
        }
    }
}

impl<B: Kernels, C: CheckpointStrategy> Kernels for Autodiff<B, C> {
    fn on_kernel_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        B::on_kernel_thread(f)
    }

    fn routes_products(device: &Self::Device) -> bool {
        B::routes_products(device)
    }

    fn gemm(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        gemm_node::<B, C>(lhs, rhs)
    }

    fn fuses_attention(q: &FloatTensor<Self>) -> bool {
        B::fuses_attention(&q.primitive)
    }

    fn fused_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        attention_node::<B, C>(q, k, v)
    }

    fn fuses_elementwise(x: &FloatTensor<Self>) -> bool {
        B::fuses_elementwise(&x.primitive)
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        match FusedRmsNorm
            .prepare::<C>([x.node.clone(), gamma.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = (prep.checkpoint(&x), prep.checkpoint(&gamma));
                let (y, r) = B::rms_norm_forward(x.primitive, gamma.primitive, eps);
                prep.finish((ids.0, ids.1, r), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_rms_norm(x.primitive, gamma.primitive, eps))
            }
        }
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match FusedSwiglu
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let ids = (prep.checkpoint(&gate), prep.checkpoint(&up));
                prep.finish(ids, B::swiglu_forward(gate.primitive, up.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_swiglu(gate.primitive, up.primitive)),
        }
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match FusedCrossEntropy
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let id = prep.checkpoint(&logits);
                let (nll, lse) = B::cross_entropy_forward(logits.primitive, targets.clone());
                prep.finish((id, lse, targets), nll)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_cross_entropy(logits.primitive, targets))
            }
        }
    }

    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // The tables are constants: only `x` has a gradient.
        let (cos, sin) = (cos.primitive, sin.primitive);
        match FusedRope
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::rope_map(x.primitive, cos.clone(), sin.clone(), false);
                prep.finish((cos, sin), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope_map(x.primitive, cos, sin, false)),
        }
    }
}

/// The autodiff node of [`Kernels::fused_swiglu`]: keeps both inputs.
#[derive(Debug)]
struct FusedSwiglu;

impl<B: Kernels> Backward<B, 2> for FusedSwiglu {
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let gate = ckpt.retrieve_node_output::<FloatTensor<B>>(ops.state.0);
        let up = ckpt.retrieve_node_output::<FloatTensor<B>>(ops.state.1);
        let (dg, du) = B::swiglu_backward(gate, up, grad);
        if let Some(node) = node_gate {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = node_up {
            grads.register::<B>(node.id, du);
        }
    }
}

/// The autodiff node of [`Kernels::fused_rms_norm`]: keeps `x`, `γ` and the per-row `r`.
#[derive(Debug)]
struct FusedRmsNorm;

impl<B: Kernels> Backward<B, 2> for FusedRmsNorm {
    type State = (NodeId, NodeId, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_x, node_gamma] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, r) = ops.state;
        let x = ckpt.retrieve_node_output::<FloatTensor<B>>(x);
        let gamma = ckpt.retrieve_node_output::<FloatTensor<B>>(gamma);
        let (dx, dgamma) = B::rms_norm_backward(x, gamma, r, grad);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, dgamma);
        }
    }
}

/// The autodiff node of [`Kernels::fused_rope`]: the gradient is the map's transpose.
#[derive(Debug)]
struct FusedRope;

impl<B: Kernels> Backward<B, 1> for FusedRope {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rope_map(grad, cos, sin, true));
        }
    }
}

/// The autodiff node of [`Kernels::fused_cross_entropy`]: keeps the logits, each row's
/// log-sum-exp and the targets.
#[derive(Debug)]
struct FusedCrossEntropy;

impl<B: Kernels> Backward<B, 1> for FusedCrossEntropy {
    type State = (NodeId, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits, lse, targets) = ops.state;
        let logits = ckpt.retrieve_node_output::<FloatTensor<B>>(logits);
        if let Some(node) = node_logits {
            let g = B::cross_entropy_backward(logits, lse, targets, grad);
            grads.register::<B>(node.id, g);
        }
    }
}

/// Per-row negative log-likelihood `[n]` of f32 logits `[n, v]` for `targets [n]`: one
/// operation where the backend fuses it (no `[n, v]` log-probabilities), else Burn's
/// `log_softmax` and `gather`.
pub fn cross_entropy<B: Kernels>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    let logits = logits.into_primitive().tensor();
    if B::fuses_elementwise(&logits) {
        return float(B::fused_cross_entropy(logits, targets.into_primitive()));
    }
    burn::tensor::activation::log_softmax(float::<B, 2>(logits), 1)
        .gather(1, targets.unsqueeze_dim(1))
        .reshape([n])
        .neg()
}

/// RMSNorm of `x [.., d]` with weight `γ [d]`, in f32: one operation where the backend
/// fuses it ([`Kernels::fuses_elementwise`]), else Burn's ops.
pub fn rms_norm<B: Kernels, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let x = x.into_primitive().tensor();
    if B::fuses_elementwise(&x) {
        return float(B::fused_rms_norm(
            x,
            gamma.into_primitive().tensor(),
            eps as f32,
        ));
    }
    let x = float::<B, D>(x);
    let rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt();
    (x / rms) * gamma.unsqueeze()
}

/// SwiGLU's product `silu(gate)·up`: one operation where the backend fuses it.
pub fn swiglu<B: Kernels, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let gate = gate.into_primitive().tensor();
    if B::fuses_elementwise(&gate) && up.dtype() == gate.dtype() {
        return float(B::fused_swiglu(gate, up.into_primitive().tensor()));
    }
    burn::tensor::activation::silu(float::<B, D>(gate)) * up
}

/// The rotary embedding of `x [b, s, heads, hd]` with tables `cos`, `sin [s, hd]`.
pub fn rope<B: Kernels>(x: Tensor<B, 4>, cos: Tensor<B, 2>, sin: Tensor<B, 2>) -> Tensor<B, 4> {
    let x = x.into_primitive().tensor();
    let (cos, sin) = (cos.into_primitive().tensor(), sin.into_primitive().tensor());
    if B::fuses_elementwise(&x) {
        float(B::fused_rope(x, cos, sin))
    } else {
        float(rope_composed::<B>(x, cos, sin, false))
    }
}

/// The autodiff node of [`Kernels::fused_causal_attention`]: keeps the operands and the softmax
/// probabilities, and gets all three gradients from one [`Kernels::attention_backward`].
#[derive(Debug)]
struct FusedAttention;

impl<B: Kernels> Backward<B, 3> for FusedAttention {
    /// Operands, the probabilities, the scale.
    type State = (NodeId, NodeId, NodeId, FloatTensor<B>, f32);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, probs, scale) = ops.state;
        let q = ckpt.retrieve_node_output::<FloatTensor<B>>(q);
        let k = ckpt.retrieve_node_output::<FloatTensor<B>>(k);
        let v = ckpt.retrieve_node_output::<FloatTensor<B>>(v);
        let (dq, dk, dv) = B::attention_backward(q, k, v, probs, grad, scale);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

fn attention_node<B: Kernels, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let scale = attention_scale::<B>(&q.primitive);
    match FusedAttention
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let ids = (
                prep.checkpoint(&q),
                prep.checkpoint(&k),
                prep.checkpoint(&v),
            );
            let (out, probs) = B::attention_forward(q.primitive, k.primitive, v.primitive, scale);
            prep.finish((ids.0, ids.1, ids.2, probs, scale), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::fused_causal_attention(
            q.primitive,
            k.primitive,
            v.primitive,
        )),
    }
}

/// `x` as `[rows, d]` (its last dim kept), and its shape.
fn rows_of<B: Backend>(x: FloatTensor<B>) -> (Tensor<B, 2>, burn::tensor::Shape) {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / d.max(1);
    (
        float(B::float_reshape(x, burn::tensor::Shape::new([rows, d]))),
        shape,
    )
}

/// [`Kernels::rms_norm_forward`] from Burn's ops.
pub fn rms_norm_forward_composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    eps: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, shape) = rows_of::<B>(x);
    let r = x
        .clone()
        .square()
        .mean_dim(1)
        .add_scalar(eps)
        .sqrt()
        .recip();
    let y = x * r.clone() * float::<B, 1>(gamma).unsqueeze::<2>();
    let y = B::float_reshape(y.into_primitive().tensor(), shape);
    (y, r.reshape([-1]).into_primitive().tensor())
}

/// [`Kernels::rms_norm_backward`] from Burn's ops: `dx = r·g·γ − r³·x·mean(g·γ·x)`,
/// `dγ = Σ_rows g·x·r`.
pub fn rms_norm_backward_composed<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    r: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, shape) = rows_of::<B>(x);
    let (g, _) = rows_of::<B>(grad);
    let gamma = float::<B, 1>(gamma).unsqueeze::<2>();
    let r = float::<B, 1>(r).unsqueeze_dim::<2>(1);
    let mean = (g.clone() * gamma.clone() * x.clone()).mean_dim(1);
    let c = r.clone().powi_scalar(3) * mean;
    let dx = r.clone() * g.clone() * gamma - c * x.clone();
    let dgamma = (g * x * r).sum_dim(0).reshape([-1]);
    (
        B::float_reshape(dx.into_primitive().tensor(), shape),
        dgamma.into_primitive().tensor(),
    )
}

/// [`Kernels::swiglu_backward`] from Burn's ops: `du = dy·g·σ(g)`,
/// `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward_composed<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = gate.shape();
    let flat =
        |t: FloatTensor<B>| float::<B, 1>(B::float_reshape(t, [shape.num_elements()].into()));
    let (g, u, dy) = (flat(gate), flat(up), flat(grad));
    let s = burn::tensor::activation::sigmoid(g.clone());
    let du = dy.clone() * g.clone() * s.clone();
    let dg = dy * u * s.clone() * (g * (s.neg().add_scalar(1.0))).add_scalar(1.0);
    (
        B::float_reshape(dg.into_primitive().tensor(), shape.clone()),
        B::float_reshape(du.into_primitive().tensor(), shape),
    )
}

/// [`Kernels::cross_entropy_forward`] from Burn's ops.
pub fn cross_entropy_forward_composed<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, 2>(logits);
    let t = Tensor::<B, 1, Int>::from_primitive(targets).unsqueeze_dim::<2>(1);
    let max = x.clone().max_dim(1);
    let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let nll = (lse.clone() - x.gather(1, t)).reshape([-1]);
    (
        nll.into_primitive().tensor(),
        lse.reshape([-1]).into_primitive().tensor(),
    )
}

/// [`Kernels::cross_entropy_backward`] from Burn's ops: `(softmax(x) − onehot(t))·g`.
pub fn cross_entropy_backward_composed<B: Backend>(
    logits: FloatTensor<B>,
    lse: FloatTensor<B>,
    targets: IntTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = float::<B, 2>(logits);
    let g = float::<B, 1>(grad).unsqueeze_dim::<2>(1);
    let t = Tensor::<B, 1, Int>::from_primitive(targets).unsqueeze_dim::<2>(1);
    let probs = (x.clone() - float::<B, 1>(lse).unsqueeze_dim::<2>(1)).exp();
    let picked = x
        .zeros_like()
        .scatter(1, t, g.clone(), IndexingUpdateOp::Add);
    (probs * g - picked).into_primitive().tensor()
}

/// [`Kernels::adamw_step`] from Burn's ops, in the order Burn's `AdamW` applies them.
pub fn adamw_step_composed<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
    s: AdamwStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let shape = param.shape();
    let flat =
        |t: FloatTensor<B>| float::<B, 1>(B::float_reshape(t, [shape.num_elements()].into()));
    let back = |t: Tensor<B, 1>| B::float_reshape(t.into_primitive().tensor(), shape.clone());
    let mut g = flat(grad);
    if let Some(f) = s.grad_scale {
        g = g.mul_scalar(f);
    }
    let (m, v) = match moments {
        Some((m, v)) => (
            flat(m)
                .mul_scalar(s.beta_1)
                .add(g.clone().mul_scalar(s.one_minus_beta_1)),
            flat(v)
                .mul_scalar(s.beta_2)
                .add(g.square().mul_scalar(s.one_minus_beta_2)),
        ),
        None => (
            g.clone().mul_scalar(s.one_minus_beta_1),
            g.square().mul_scalar(s.one_minus_beta_2),
        ),
    };
    let delta = m
        .clone()
        .div_scalar(s.bias_1)
        .div(v.clone().div_scalar(s.bias_2).sqrt().add_scalar(s.epsilon));
    let mut p = flat(param);
    if let Some(k) = s.keep {
        p = p.mul_scalar(k);
    }
    let p = p - delta.mul_scalar(s.lr);
    (back(p), back(m), back(v))
}

/// [`Kernels::rope_map`] from Burn's ops.
pub fn rope_composed<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    transpose: bool,
) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let [_, s, _, hd] = x.dims();
    let table = |t: FloatTensor<B>| float::<B, 2>(t).reshape([1, s, 1, hd]);
    let (cos, sin) = (table(cos), table(sin));
    let half = hd / 2;
    let halves = |t: Tensor<B, 4>| (t.clone().narrow(3, 0, half), t.narrow(3, half, half));
    let y = if transpose {
        let (y1, y2) = halves(x.clone() * sin);
        x * cos + Tensor::cat(vec![y2, y1.neg()], 3)
    } else {
        let (x1, x2) = halves(x.clone());
        x * cos + Tensor::cat(vec![x2.neg(), x1], 3) * sin
    };
    y.into_primitive().tensor()
}

/// The autodiff node of [`Kernels::gemm`]: `dL = g·Rᵀ`, `dR = Lᵀ·g`, both through the inner
/// backend's `gemm` (a transposed view, no copy). Burn's own matmul node calls the inner
/// `float_matmul`, which is why the products need a node of their own.
#[derive(Debug)]
struct GemmProduct;

impl<B: Kernels> Backward<B, 2> for GemmProduct {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (lhs, rhs) = ops.state;
        let lhs = lhs.map(|id| ckpt.retrieve_node_output::<FloatTensor<B>>(id));
        let rhs = rhs.map(|id| ckpt.retrieve_node_output::<FloatTensor<B>>(id));
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |g| {
                B::gemm(
                    g,
                    B::float_transpose(rhs.expect("rhs kept for lhs's gradient")),
                )
            },
            |g| {
                B::gemm(
                    B::float_transpose(lhs.expect("lhs kept for rhs's gradient")),
                    g,
                )
            },
        );
    }
}

/// [`GemmProduct`] for `Autodiff<B, C>`; products whose batch dimensions differ (broadcasting)
/// take Burn's matmul node, which knows how to reduce their gradients.
pub(crate) fn gemm_node<B: Kernels, C: CheckpointStrategy>(
    lhs: FloatTensor<Autodiff<B, C>>,
    rhs: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let (ls, rs) = (lhs.primitive.shape(), rhs.primitive.shape());
    let rank = ls.num_dims();
    if rank != rs.num_dims() || ls[..rank - 2] != rs[..rank - 2] {
        return <Autodiff<B, C> as FloatTensorOps<_>>::float_matmul(lhs, rhs);
    }
    let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
    match GemmProduct
        .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            // Each operand is kept only when the other one needs a gradient.
            let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
            let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
            prep.finish(
                (lhs_state, rhs_state),
                B::gemm(lhs.primitive, rhs.primitive),
            )
        }
        OpsKind::UnTracked(prep) => prep.finish(B::gemm(lhs.primitive, rhs.primitive)),
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x·w + b` for `x [rows, d_in]`, `w [d_in, d_out]` (Burn's `Linear` layout).
pub fn linear<B: Kernels>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    if !B::routes_products(&x.device()) {
        return burn::tensor::module::linear(x, w, b);
    }
    routed_linear(x, w, b)
}

/// [`linear`] through [`Kernels::gemm`].
fn routed_linear<B: Kernels>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
) -> Tensor<B, 2> {
    let y = float(B::gemm(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
    ));
    match b {
        Some(b) => y + b.unsqueeze(),
        None => y,
    }
}

/// Key/value heads `[b, kv, t, d]` repeated for `heads` query heads (grouped-query attention):
/// query head `j` reads key/value head `j / (heads / kv)`.
pub fn repeat_kv<B: Backend>(t: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [b, kv, s, d] = t.dims();
    if kv == heads {
        return t;
    }
    assert!(
        kv > 0 && heads.is_multiple_of(kv),
        "{heads} query heads over {kv} key/value heads"
    );
    t.unsqueeze_dim::<5>(2)
        .expand([b, kv, heads / kv, s, d])
        .reshape([b, heads, s, d])
}

/// Causal attention of `q [b, h, n, d]` over `k`, `v [b, kv, t, d]` (t ≥ n: query `i` sees keys
/// `..= i + t - n`, Burn's bottom-right alignment; `kv` divides `h`, grouped-query attention
/// when smaller), scale `1/√d`. Where products are routed,
/// it is Burn's unfused fallback (scores, mask, softmax, values) with both products through
/// [`Kernels::gemm`]; otherwise Burn's `attention`.
pub fn causal_attention<B: Kernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let device = q.device();
    let q = q.into_primitive().tensor();
    if B::fuses_attention(&q) {
        return float(B::fused_causal_attention(
            q,
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
        ));
    }
    let q = float::<B, 4>(q);
    let heads = q.dims()[1];
    let (k, v) = (repeat_kv(k, heads), repeat_kv(v, heads));
    if !B::routes_products(&device) {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        return burn::tensor::module::attention(q, k, v, None, None, options);
    }
    routed_attention(q, k, v)
}

/// [`causal_attention`] with both products through [`Kernels::gemm`].
fn routed_attention<B: Kernels>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let q = q.into_primitive().tensor();
    let scale = attention_scale::<B>(&q);
    float(
        attention_forward_composed::<B>(
            q,
            k.into_primitive().tensor(),
            v.into_primitive().tensor(),
            scale,
        )
        .0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type Ad = Autodiff<crate::CpuBackend>;

    /// Gradients of `Σ y·w`: pushes the fixed upstream gradient `w` back through `y`'s graph.
    fn weighted_backward<const D: usize>(
        y: &Tensor<Ad, D>,
        w: &Tensor<crate::CpuBackend, D>,
    ) -> <Ad as burn::tensor::backend::AutodiffBackend>::Gradients {
        (y.clone() * Tensor::from_inner(w.clone())).sum().backward()
    }

    fn max_diff<const D: usize>(
        a: Tensor<crate::CpuBackend, D>,
        b: Tensor<crate::CpuBackend, D>,
    ) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The product node's value and both gradients equal Burn's matmul node's, for plain and
    /// transposed-view operands and a batched (4D) product.
    #[test]
    fn the_product_node_matches_burns_matmul_and_its_gradients() {
        let device = Default::default();
        for (ls, rs, transpose_rhs) in [
            (vec![5, 7], vec![7, 3], false),
            (vec![5, 7], vec![3, 7], true),
            (vec![2, 3, 4, 6], vec![2, 3, 6, 5], false),
        ] {
            let lhs = Tensor::<crate::CpuBackend, 1>::random(
                [ls.iter().product::<usize>()],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let rhs = Tensor::<crate::CpuBackend, 1>::random(
                [rs.iter().product::<usize>()],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |custom: bool| {
                let l = Tensor::<Ad, 1>::from_inner(lhs.clone())
                    .reshape(pad4(&ls))
                    .require_grad();
                let r = Tensor::<Ad, 1>::from_inner(rhs.clone())
                    .reshape(pad4(&rs))
                    .require_grad();
                let (l4, r4): (Tensor<Ad, 4>, Tensor<Ad, 4>) = (l.clone(), r.clone());
                let r4 = if transpose_rhs {
                    r4.swap_dims(2, 3)
                } else {
                    r4
                };
                let y = if custom {
                    float::<Ad, 4>(gemm_node::<
                        crate::CpuBackend,
                        burn::backend::autodiff::checkpoint::strategy::NoCheckpointing,
                    >(
                        l4.into_primitive().tensor(), r4.into_primitive().tensor()
                    ))
                } else {
                    l4.matmul(r4)
                };
                // A weighted sum, so each output element has its own upstream gradient.
                let w = Tensor::<Ad, 4>::from_inner(
                    Tensor::arange(0..y.shape().num_elements() as i64, &device)
                        .float()
                        .reshape(y.dims())
                        .div_scalar(7.0)
                        .sin(),
                );
                let grads = (y.clone() * w).sum().backward();
                (
                    y.inner(),
                    l.grad(&grads).expect("lhs grad"),
                    r.grad(&grads).expect("rhs grad"),
                )
            };
            let (y0, gl0, gr0) = run(false);
            let (y1, gl1, gr1) = run(true);
            assert_eq!(max_diff(y0, y1), 0.0, "{ls:?}·{rs:?} value");
            assert!(max_diff(gl0, gl1) < 1e-5, "{ls:?}·{rs:?} lhs gradient");
            assert!(max_diff(gr0, gr1) < 1e-5, "{ls:?}·{rs:?} rhs gradient");
        }
    }

    /// The routed linear layer and attention (what CUDA runs) equal Burn's `linear` and
    /// `attention` on the CPU, values and gradients, attention with more keys than queries too.
    #[test]
    fn routed_linear_and_attention_match_burns_ops() {
        let device = Default::default();
        let normal = |shape: [usize; 4]| {
            Tensor::<crate::CpuBackend, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let x = normal([1, 1, 6, 5]).reshape([6, 5]);
        let w = normal([1, 1, 5, 4]).reshape([5, 4]);
        let bias = normal([1, 1, 1, 4]).reshape([4]);
        let run = |routed: bool| {
            let (x, w, b) = (
                Tensor::<Ad, 2>::from_inner(x.clone()).require_grad(),
                Tensor::<Ad, 2>::from_inner(w.clone()).require_grad(),
                Tensor::<Ad, 1>::from_inner(bias.clone()).require_grad(),
            );
            let y = if routed {
                routed_linear(x.clone(), w.clone(), Some(b.clone()))
            } else {
                burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()))
            };
            let grads = (y.clone() * y.clone()).sum().backward();
            let g = |t: &Tensor<Ad, 2>| t.grad(&grads).expect("grad");
            (y.inner(), g(&x), g(&w), b.grad(&grads).expect("bias grad"))
        };
        let (a, b) = (run(false), run(true));
        assert!(max_diff(a.0, b.0) < 1e-6);
        assert!(max_diff(a.1, b.1) < 1e-5);
        assert!(max_diff(a.2, b.2) < 1e-5);
        assert!(max_diff(a.3, b.3) < 1e-5);

        for (n, t) in [(7, 7), (3, 7)] {
            let (q, k, v) = (
                normal([2, 3, n, 4]),
                normal([2, 3, t, 4]),
                normal([2, 3, t, 4]),
            );
            let run = |routed: bool| {
                let q = Tensor::<Ad, 4>::from_inner(q.clone()).require_grad();
                let k = Tensor::<Ad, 4>::from_inner(k.clone()).require_grad();
                let v = Tensor::<Ad, 4>::from_inner(v.clone()).require_grad();
                let y = if routed {
                    routed_attention(q.clone(), k.clone(), v.clone())
                } else {
                    burns_attention(q.clone(), k.clone(), v.clone())
                };
                let grads = (y.clone() * y.clone()).sum().backward();
                let g = |t: &Tensor<Ad, 4>| t.grad(&grads).expect("grad");
                (y.inner(), g(&q), g(&k), g(&v))
            };
            let (a, b) = (run(false), run(true));
            assert!(max_diff(a.0, b.0) < 1e-5, "n {n} t {t}: values");
            assert!(max_diff(a.1, b.1) < 1e-4, "n {n} t {t}: dq");
            assert!(max_diff(a.2, b.2) < 1e-4, "n {n} t {t}: dk");
            assert!(max_diff(a.3, b.3) < 1e-4, "n {n} t {t}: dv");
        }
    }

    #[test]
    fn fused_cpu_attention_matches_burns_parts_and_the_composed_reference() {
        type Cpu = crate::CpuBackend;
        let device = Default::default();
        let normal = |shape: [usize; 4]| {
            Tensor::<Cpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        // Queries, keys and values as the model makes them: `[b, s, heads, d]` views with the
        // heads swapped in; grouped-query cases share each key/value head between query heads.
        // Past 64 queries the products run in row blocks that skip the masked keys (a partial
        // last block, and more keys than queries, included).
        for (n, t, h, kv) in [
            (7, 7, 3, 3),
            (3, 7, 6, 2),
            (1, 5, 4, 1),
            (33, 40, 6, 2),
            (150, 150, 4, 2),
            (70, 129, 2, 1),
        ] {
            let q = normal([2, n, h, 8]).swap_dims(1, 2);
            let k = normal([2, t, kv, 8]).swap_dims(1, 2);
            let v = normal([2, kv, t, 8]);
            let weights = normal([2, h, n, 8]);
            assert!(<Ad as Kernels>::fuses_attention(
                &Tensor::<Ad, 4>::from_inner(q.clone())
                    .into_primitive()
                    .tensor()
            ));
            let run = |fused: bool| {
                let q = Tensor::<Ad, 4>::from_inner(q.clone()).require_grad();
                let k = Tensor::<Ad, 4>::from_inner(k.clone()).require_grad();
                let v = Tensor::<Ad, 4>::from_inner(v.clone()).require_grad();
                let y = if fused {
                    causal_attention(q.clone(), k.clone(), v.clone())
                } else {
                    burns_attention(q.clone(), k.clone(), v.clone())
                };
                let grads = weighted_backward(&y, &weights);
                let g = |t: &Tensor<Ad, 4>| t.grad(&grads).expect("grad");
                (y.inner(), g(&q), g(&k), g(&v))
            };
            let (a, b) = (run(false), run(true));
            assert!(max_diff(a.0, b.0) < 1e-5, "n {n} t {t} kv {kv}: values");
            assert!(max_diff(a.1, b.1.clone()) < 1e-5, "n {n} t {t} kv {kv}: dq");
            assert!(max_diff(a.2, b.2) < 1e-5, "n {n} t {t} kv {kv}: dk");
            assert!(max_diff(a.3, b.3) < 1e-5, "n {n} t {t} kv {kv}: dv");

            // The composed default (what other backends run) agrees with the kernels too.
            let prim = |t: &Tensor<Cpu, 4>| t.clone().into_primitive().tensor();
            let scale = 1.0 / 8f32.sqrt();
            let (out_f, p_f) =
                <Cpu as Kernels>::attention_forward(prim(&q), prim(&k), prim(&v), scale);
            let (out_c, p_c) =
                attention_forward_composed::<Cpu>(prim(&q), prim(&k), prim(&v), scale);
            assert!(max_diff(float::<Cpu, 4>(out_f), float(out_c)) < 1e-5);
            assert!(max_diff(float::<Cpu, 4>(p_f.clone()), float(p_c)) < 1e-6);
            let fused = <Cpu as Kernels>::attention_backward(
                prim(&q),
                prim(&k),
                prim(&v),
                p_f.clone(),
                prim(&weights),
                scale,
            );
            let composed = attention_backward_composed::<Cpu>(
                prim(&q),
                prim(&k),
                prim(&v),
                p_f,
                prim(&weights),
                scale,
            );
            assert!(max_diff(float::<Cpu, 4>(fused.0.clone()), float(composed.0)) < 1e-5);
            assert!(max_diff(float::<Cpu, 4>(fused.1), float(composed.1)) < 1e-5);
            assert!(max_diff(float::<Cpu, 4>(fused.2), float(composed.2)) < 1e-5);
            assert!(
                max_diff(b.1, float(fused.0)) < 1e-5,
                "n {n} t {t}: node's dq"
            );
        }
    }

    /// RMSNorm and RoPE as single nodes match the same maths in Burn's ops (values and the
    /// gradients of `x` and `γ`), from a strided view of `x`.
    #[test]
    fn fused_cpu_rms_norm_and_rope_match_burns_ops() {
        type Cpu = crate::CpuBackend;
        let device = Default::default();
        let normal = |shape: [usize; 4]| {
            Tensor::<Cpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        // `[b, s, heads, hd]` from a `[b, heads, s, hd]` tensor: not contiguous.
        let x = normal([2, 3, 5, 8]).swap_dims(1, 2);
        let weights = normal([2, 5, 3, 8]);
        let gamma = normal([1, 1, 1, 8]).reshape([8]);
        let (cos, sin) = (
            normal([1, 1, 5, 8]).reshape([5, 8]),
            normal([1, 1, 5, 8]).reshape([5, 8]),
        );
        let run = |fused: bool| {
            let xa = Tensor::<Ad, 4>::from_inner(x.clone()).require_grad();
            let ga = Tensor::<Ad, 1>::from_inner(gamma.clone()).require_grad();
            let (c, s) = (
                Tensor::<Ad, 2>::from_inner(cos.clone()),
                Tensor::<Ad, 2>::from_inner(sin.clone()),
            );
            let y = if fused {
                assert!(<Ad as Kernels>::fuses_elementwise(
                    &xa.clone().into_primitive().tensor()
                ));
                rope(rms_norm(xa.clone(), ga.clone(), 1e-5), c, s)
            } else {
                let rms = xa.clone().square().mean_dim(3).add_scalar(1e-5).sqrt();
                let n = (xa.clone() / rms) * ga.clone().unsqueeze::<4>();
                float(rope_composed::<Ad>(
                    n.into_primitive().tensor(),
                    c.into_primitive().tensor(),
                    s.into_primitive().tensor(),
                    false,
                ))
            };
            let grads = weighted_backward(&y, &weights);
            (
                y.inner(),
                xa.grad(&grads).expect("dx"),
                ga.grad(&grads).expect("dgamma"),
            )
        };
        let (a, b) = (run(false), run(true));
        assert!(max_diff(a.0, b.0) < 1e-5, "values");
        assert!(max_diff(a.1, b.1) < 1e-5, "dx");
        assert!(max_diff(a.2, b.2) < 1e-5, "dgamma");

        // The composed defaults agree with the kernels, the transposed map included.
        let p4 = |t: &Tensor<Cpu, 4>| t.clone().into_primitive().tensor();
        let p2 = |t: &Tensor<Cpu, 2>| t.clone().into_primitive().tensor();
        let p1 = |t: &Tensor<Cpu, 1>| t.clone().into_primitive().tensor();
        let (yf, rf) = <Cpu as Kernels>::rms_norm_forward(p4(&x), p1(&gamma), 1e-5);
        let (yc, rc) = rms_norm_forward_composed::<Cpu>(p4(&x), p1(&gamma), 1e-5);
        assert!(max_diff(float::<Cpu, 4>(yf), float(yc)) < 1e-5);
        assert!(max_diff(float::<Cpu, 1>(rf.clone()), float(rc)) < 1e-5);
        let (dxf, dgf) =
            <Cpu as Kernels>::rms_norm_backward(p4(&x), p1(&gamma), rf.clone(), p4(&weights));
        let (dxc, dgc) = rms_norm_backward_composed::<Cpu>(p4(&x), p1(&gamma), rf, p4(&weights));
        assert!(max_diff(float::<Cpu, 4>(dxf), float(dxc)) < 1e-5);
        assert!(max_diff(float::<Cpu, 1>(dgf), float(dgc)) < 1e-5);
        for transpose in [false, true] {
            let f = <Cpu as Kernels>::rope_map(p4(&x), p2(&cos), p2(&sin), transpose);
            let c = rope_composed::<Cpu>(p4(&x), p2(&cos), p2(&sin), transpose);
            assert!(
                max_diff(float::<Cpu, 4>(f), float(c)) < 1e-6,
                "rope {transpose}"
            );
        }
    }

    /// SwiGLU's product as one node matches `silu(g)·u` in Burn's ops, and the composed
    /// defaults match the kernels.
    #[test]
    fn fused_cpu_swiglu_matches_burns_ops() {
        type Cpu = crate::CpuBackend;
        let device = Default::default();
        let normal = |shape: [usize; 3]| {
            Tensor::<Cpu, 3>::random(shape, Distribution::Normal(0.0, 2.0), &device)
        };
        // More elements than one block of the kernel, and a transposed view.
        let (g, u) = (normal([3, 40, 300]), normal([3, 300, 40]).swap_dims(1, 2));
        let weights = normal([3, 40, 300]);
        let run = |fused: bool| {
            let ga = Tensor::<Ad, 3>::from_inner(g.clone()).require_grad();
            let ua = Tensor::<Ad, 3>::from_inner(u.clone()).require_grad();
            let y = if fused {
                swiglu(ga.clone(), ua.clone())
            } else {
                burn::tensor::activation::silu(ga.clone()) * ua.clone()
            };
            let grads = weighted_backward(&y, &weights);
            (
                y.inner(),
                ga.grad(&grads).expect("dg"),
                ua.grad(&grads).expect("du"),
            )
        };
        let (a, b) = (run(false), run(true));
        assert!(max_diff(a.0, b.0) < 1e-5, "values");
        assert!(max_diff(a.1, b.1) < 1e-5, "d gate");
        assert!(max_diff(a.2, b.2) < 1e-5, "d up");
        let p = |t: &Tensor<Cpu, 3>| t.clone().into_primitive().tensor();
        let (f, c) = (
            <Cpu as Kernels>::swiglu_backward(p(&g), p(&u), p(&weights)),
            swiglu_backward_composed::<Cpu>(p(&g), p(&u), p(&weights)),
        );
        assert!(max_diff(float::<Cpu, 3>(f.0), float(c.0)) < 1e-5);
        assert!(max_diff(float::<Cpu, 3>(f.1), float(c.1)) < 1e-5);
    }

    /// The CPU's one-pass `Σ x²` equals an f64 sum on the host, on a strided view spanning
    /// several blocks with a partial last one, and the composed default agrees.
    #[test]
    fn fused_cpu_sum_of_squares_matches_a_host_sum() {
        type Cpu = crate::CpuBackend;
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::random([301, 170], Distribution::Normal(0.0, 3.0), &device)
            .swap_dims(0, 1);
        let host: f64 = x
            .clone()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        let read = |t: FloatTensor<Cpu>| f64::from(float::<Cpu, 1>(t).into_scalar());
        let p = x.into_primitive().tensor();
        let fused = read(<Cpu as Kernels>::sum_of_squares(p.clone()));
        let composed = read(sum_of_squares_composed::<Cpu>(p));
        assert!((fused - host).abs() <= 1e-7 * host, "{fused} vs {host}");
        assert!(
            (composed - host).abs() <= 1e-5 * host,
            "{composed} vs {host}"
        );
    }

    /// The fused cross-entropy's NLL and logit gradient equal Burn's `log_softmax` + `gather`,
    /// and the composed reference agrees with both.
    #[test]
    fn fused_cpu_cross_entropy_matches_log_softmax_and_gather() {
        type Cpu = crate::CpuBackend;
        let device = Default::default();
        // Rows across two blocks of the kernel; large logits test the max shift.
        let (n, v) = (37, 101);
        let logits = Tensor::<Cpu, 2>::random([n, v], Distribution::Normal(0.0, 8.0), &device);
        let ids: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 5) % v as i64).collect();
        let targets = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let weights = Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let x = Tensor::<Ad, 2>::from_inner(logits.clone()).require_grad();
            let t = Tensor::<Ad, 1, Int>::from_inner(targets.clone());
            let nll = if fused {
                cross_entropy(x.clone(), t)
            } else {
                burn::tensor::activation::log_softmax(x.clone(), 1)
                    .gather(1, t.unsqueeze_dim(1))
                    .reshape([n])
                    .neg()
            };
            let grads = weighted_backward(&nll, &weights);
            (nll.inner(), x.grad(&grads).expect("d logits"))
        };
        let (a, b) = (run(false), run(true));
        assert!(max_diff(a.0.clone(), b.0) < 1e-4, "nll");
        assert!(max_diff(a.1.clone(), b.1) < 1e-5, "d logits");
        let p = |t: &Tensor<Cpu, 2>| t.clone().into_primitive().tensor();
        let (nll, lse) =
            cross_entropy_forward_composed::<Cpu>(p(&logits), targets.clone().into_primitive());
        let g = cross_entropy_backward_composed::<Cpu>(
            p(&logits),
            lse,
            targets.into_primitive(),
            weights.into_primitive().tensor(),
        );
        assert!(max_diff(float::<Cpu, 1>(nll), a.0) < 1e-4, "composed nll");
        assert!(
            max_diff(float::<Cpu, 2>(g), a.1) < 1e-5,
            "composed d logits"
        );
    }

    /// Three AdamW steps (decayed, clipped, over several kernel blocks) give Burn's `AdamW`'s
    /// parameters and moments bit for bit, fused and composed.
    /// The CPU trainer's step runs where burn-flex's parallel loops fork without a hand-off.
    #[test]
    fn cpu_kernel_thread_is_a_rayon_thread() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "the test starts outside the pool"
        );
        let inside = <Ad as Kernels>::on_kernel_thread(rayon::current_thread_index);
        assert!(inside.is_some(), "the closure ran outside rayon's pool");
    }

    /// Two trainers' steps at once, each holding a lock the other needs while it forks:
    /// with one shared pool, the first step's worker could run the second step on top of its
    /// own frame while waiting for a forked half, and hang (as two train stages did).
    #[test]
    fn concurrent_steps_on_kernel_threads_do_not_nest_in_one_pool() {
        use std::sync::mpsc;
        use std::time::Duration;
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        if rayon::current_num_threads() < 2 {
            eprintln!("skipped: needs two rayon threads (one forks, the other takes the half)");
            return;
        }
        let (done, finished) = mpsc::channel();
        let (started, in_join) = mpsc::channel();
        let first = done.clone();
        std::thread::spawn(move || {
            <Ad as Kernels>::on_kernel_thread(move || {
                let _held = LOCK.lock().unwrap();
                // The second half is taken by another worker; once it runs, this one
                // returns from the first half and waits for it, looking for other work.
                let taken = std::sync::atomic::AtomicBool::new(false);
                rayon::join(
                    || {
                        while !taken.load(std::sync::atomic::Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                        started.send(()).unwrap();
                    },
                    || {
                        taken.store(true, std::sync::atomic::Ordering::Release);
                        std::thread::sleep(Duration::from_millis(500));
                    },
                );
            });
            first.send("first").unwrap();
        });
        in_join.recv().unwrap();
        std::thread::spawn(move || {
            <Ad as Kernels>::on_kernel_thread(|| drop(LOCK.lock().unwrap()));
            done.send("second").unwrap();
        });
        for _ in 0..2 {
            finished
                .recv_timeout(Duration::from_secs(20))
                .expect("a step waited forever for the other's lock");
        }
    }

    #[test]
    fn fused_adamw_reproduces_burns_adamw_bit_for_bit() {
        use burn::optim::{AdamWConfig, AdamWState, SimpleOptimizer};
        type Cpu = crate::CpuBackend;
        let device = Default::default();
        let shape = [70, 300];
        let (b1, b2, eps, wd, lr) = (0.9f32, 0.95f32, 1e-8f32, 0.1f32, 3e-4f64);
        let burn = AdamWConfig::new()
            .with_beta_1(b1)
            .with_beta_2(b2)
            .with_epsilon(eps)
            .with_weight_decay(wd)
            .build();
        let bits = |t: &Tensor<Cpu, 2>| -> Vec<u32> {
            t.to_data()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let p0 = Tensor::<Cpu, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (mut reference, mut state): (_, Option<AdamWState<Cpu, 2>>) = (p0.clone(), None);
        let mut fused = (p0.clone().into_primitive().tensor(), None);
        let mut composed = (p0.into_primitive().tensor(), None);
        for time in 1..=3 {
            let grad = Tensor::<Cpu, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let factor = (time != 2).then_some(0.37f64);
            let scaled = factor.map_or(grad.clone(), |f| grad.clone().mul_scalar(f));
            (reference, state) = burn.step(lr, reference, scaled, state);
            let decay = lr * f64::from(wd);
            let step = AdamwStep {
                grad_scale: factor.map(|f| f as f32),
                beta_1: b1,
                one_minus_beta_1: 1.0 - b1,
                beta_2: b2,
                one_minus_beta_2: 1.0 - b2,
                bias_1: 1.0 - b1.powi(time),
                bias_2: 1.0 - b2.powi(time),
                epsilon: eps,
                keep: Some((1.0 - decay) as f32),
                lr: lr as f32,
            };
            let g = || grad.clone().into_primitive().tensor();
            let (p, m, v) = <Cpu as Kernels>::adamw_step(fused.0, g(), fused.1, step);
            fused = (p, Some((m, v)));
            let (p, m, v) = adamw_step_composed::<Cpu>(composed.0, g(), composed.1, step);
            composed = (p, Some((m, v)));
            let s = state.as_ref().expect("state").momentum.clone();
            for (name, (p, mv)) in [("fused", &fused), ("composed", &composed)] {
                let (m, v) = mv.as_ref().expect("moments");
                assert_eq!(
                    bits(&float(p.clone())),
                    bits(&reference),
                    "{name} params, step {time}"
                );
                assert_eq!(
                    bits(&float(m.clone())),
                    bits(&s.moment_1),
                    "{name} m, step {time}"
                );
                assert_eq!(
                    bits(&float(v.clone())),
                    bits(&s.moment_2),
                    "{name} v, step {time}"
                );
            }
        }
    }

    /// Burn's own causal attention: the reference.
    fn burns_attention(q: Tensor<Ad, 4>, k: Tensor<Ad, 4>, v: Tensor<Ad, 4>) -> Tensor<Ad, 4> {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let h = q.dims()[1];
        burn::tensor::module::attention(q, repeat_kv(k, h), repeat_kv(v, h), None, None, options)
    }

    fn pad4(s: &[usize]) -> [usize; 4] {
        let mut out = [1; 4];
        out[4 - s.len()..].copy_from_slice(s);
        out
    }
}
