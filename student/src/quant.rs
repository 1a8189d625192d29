//! 4-bit NormalFloat (NF4) storage for a frozen base, as QLoRA (Dettmers et al., 2023) stores it,
//! and products that dequantize it one tile at a time.
//!
//! A linear weight (Burn's `[in, out]`) is cut into blocks of [`BLOCK`] consecutive inputs of one
//! output column — bitsandbytes' blocks of 64 consecutive elements of PyTorch's row-major
//! `[out, in]` weight — and each block keeps its absolute maximum as an f32 scale and every
//! element as the index of the nearest of the 16 NF4 levels of `w / absmax`. That is 4.5 bits per
//! weight. Double quantization of the scales (QLoRA's optional 8-bit scales, 4.127 bits) is not
//! implemented: on Llama-3.3-70B it would save 2.9 GiB of 37 GiB.
//!
//! Why not Burn 0.21's own blockwise 4-bit types: `Q4S` is linear (15 evenly spaced levels,
//! `k·absmax/7`). On normally distributed weights NF4's quantile levels lose less: RMS error
//! 1.84e-3 against 2.15e-3 on N(0, 0.02²) in blocks of 64
//! (`tests::nf4_beats_linear_int4_on_normal_weights`), which is why QLoRA chose NF4; and a
//! quantized Burn tensor as the constant operand of an autodiff product would be saved,
//! dequantized, for its backward.
//!
//! The products ([`QuantOps`]) never hold the layer's whole dequantized weight: `x·W` and its
//! backward `g·Wᵀ` walk the output columns in tiles of at most [`DEQUANT_TILE_ELEMENTS`] weights,
//! dequantize one tile, multiply, and drop it. Under autodiff the product is one graph node whose
//! backward re-dequantizes tile by tile, so nothing but the packed codes is saved for backward.
//! The default methods are written with Burn tensor ops and run on every backend.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, ElementConversion, TensorPrimitive};

/// Weights per quantization block (QLoRA's and bitsandbytes' default).
pub const BLOCK: usize = 64;

/// Most weights dequantized at once by a product (one tile of output columns).
pub const DEQUANT_TILE_ELEMENTS: usize = 1 << 24;

/// Scratch bytes per dequantized weight besides the compute-dtype copy, on the tensor-op path
/// GPUs take: the unpacked i32 code, the index the gather reads (up to 8 bytes) and the f32
/// level. (The CPU backend decodes in one pass and needs only the f32 value.)
pub const DEQUANT_SCRATCH_BYTES_PER_ELEMENT: u64 = 16;

/// The 16 NF4 levels (bitsandbytes' table: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Codes per packed i32 word.
const CODES_PER_WORD: usize = 8;

/// Index of the NF4 level nearest to `x` (`x` in [-1, 1]; ties go to the lower level).
pub fn nf4_code(x: f32) -> u8 {
    // The levels are sorted: the answer is the first level whose midpoint with its successor
    // lies at or above x.
    let mut code = 0;
    while code < 15 && x > 0.5 * (NF4[code] + NF4[code + 1]) {
        code += 1;
    }
    code as u8
}

/// Largest error quantizing `x` (in [-1, 1]) can make, relative to the block's absmax: half the
/// gap between the two levels around `x`. The per-element bound a test checks.
pub fn nf4_error_bound(x: f32) -> f32 {
    let x = x.clamp(-1.0, 1.0);
    let upper = NF4.iter().position(|&l| l >= x).unwrap_or(15).max(1);
    0.5 * (NF4[upper] - NF4[upper - 1])
}

/// One linear weight in NF4, in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Matrix {
    /// Input features (rows of Burn's `[in, out]`).
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// `[padded_in, out]` codes, one per byte here (packed on upload); rows past `d_in` are 0s.
    pub codes: Vec<u8>,
    /// `[padded_in / BLOCK, out]` block absmax values.
    pub scales: Vec<f32>,
}

impl Nf4Matrix {
    /// `d_in` rounded up to whole blocks.
    pub fn padded_in(&self) -> usize {
        self.d_in.div_ceil(BLOCK) * BLOCK
    }

    /// Quantizes `w`, Burn's `[d_in, d_out]` row-major weight.
    pub fn quantize(w: &[f32], d_in: usize, d_out: usize) -> Self {
        assert_eq!(w.len(), d_in * d_out, "weight is [d_in, d_out]");
        let blocks = d_in.div_ceil(BLOCK);
        let mut codes = vec![nf4_code(0.0); blocks * BLOCK * d_out];
        let mut scales = vec![0.0f32; blocks * d_out];
        for blk in 0..blocks {
            let rows = blk * BLOCK..((blk + 1) * BLOCK).min(d_in);
            for col in 0..d_out {
                let absmax = rows
                    .clone()
                    .map(|r| w[r * d_out + col].abs())
                    .fold(0.0f32, f32::max);
                scales[blk * d_out + col] = absmax;
                if absmax > 0.0 {
                    for r in rows.clone() {
                        codes[r * d_out + col] = nf4_code(w[r * d_out + col] / absmax);
                    }
                }
            }
        }
        Self {
            d_in,
            d_out,
            codes,
            scales,
        }
    }

    /// The `[d_in, d_out]` weight the codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.d_in * self.d_out);
        for r in 0..self.d_in {
            let blk = r / BLOCK;
            for col in 0..self.d_out {
                let code = self.codes[r * self.d_out + col] as usize;
                w.push(NF4[code] * self.scales[blk * self.d_out + col]);
            }
        }
        w
    }

    /// Uploads the packed codes and scales to `device`.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> Nf4Weight<B> {
        let (rows, cols) = (self.padded_in(), self.d_out);
        let words = rows / CODES_PER_WORD;
        let mut packed = vec![0i32; words * cols];
        for (r, row) in self.codes.chunks_exact(cols).enumerate() {
            let (word, shift) = (r / CODES_PER_WORD, 4 * (r % CODES_PER_WORD));
            for (col, &c) in row.iter().enumerate() {
                packed[word * cols + col] |= ((c as u32) << shift) as i32;
            }
        }
        Nf4Weight {
            codes: Tensor::from_data(TensorData::new(packed, [words, cols]), (device, DType::I32)),
            scales: Tensor::from_data(
                TensorData::new(self.scales.clone(), [rows / BLOCK, cols]),
                (device, DType::F32),
            ),
            d_in: self.d_in,
            tile_columns: tile_columns(self.d_in, cols),
        }
    }
}

/// A frozen NF4 weight on a device. Its tensors are module constants, not parameters: no
/// optimizer, cast or gradient visits them, and they move with the module between devices.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// `[padded_in / 8, out]` i32 words, row `8k + j`'s code in bits `4j .. 4j + 4` of word `k`.
    pub codes: Tensor<B, 2, Int>,
    /// `[padded_in / 64, out]` f32 block scales.
    pub scales: Tensor<B, 2>,
    /// Input features (the padded rows past it are dropped after dequantizing).
    pub d_in: usize,
    /// Output columns a product dequantizes at once (from [`DEQUANT_TILE_ELEMENTS`]).
    pub tile_columns: usize,
}

impl<B: Backend> Nf4Weight<B> {
    /// Quantizes Burn's `[in, out]` weight `w` on its own device, with the arithmetic of
    /// [`Nf4Matrix::quantize`] (same codes and scales, checked by a test): no host round trip,
    /// and the dense weight can be dropped right after.
    pub fn quantize(w: Tensor<B, 2>) -> Self {
        let [d_in, d_out] = w.dims();
        let device = w.device();
        let rows = d_in.div_ceil(BLOCK) * BLOCK;
        let w = w.cast(DType::F32);
        let w = if rows == d_in {
            w
        } else {
            Tensor::cat(
                vec![
                    w,
                    Tensor::zeros([rows - d_in, d_out], (&device, DType::F32)),
                ],
                0,
            )
        };
        let blocks = w.reshape([rows / BLOCK, BLOCK, d_out]);
        let absmax = blocks.clone().abs().max_dim(1);
        // An all-zero block divides by 1 instead: its values are 0, code `nf4_code(0.0)`.
        let denom = absmax
            .clone()
            .mask_fill(absmax.clone().equal_elem(0.0), 1.0);
        let x = blocks / denom;
        // The code is the number of level midpoints below x (`nf4_code`'s loop).
        let mut codes =
            Tensor::<B, 3, Int>::zeros([rows / BLOCK, BLOCK, d_out], (&device, DType::I32));
        for k in 0..15 {
            let mid = 0.5 * (NF4[k] + NF4[k + 1]);
            codes = codes + x.clone().greater_elem(mid).int().cast(DType::I32);
        }
        let codes = codes.reshape([rows / CODES_PER_WORD, CODES_PER_WORD, d_out]);
        let mut packed = codes.clone().narrow(1, 0, 1);
        for j in 1..CODES_PER_WORD {
            let nibble = codes
                .clone()
                .narrow(1, j, 1)
                .bitwise_left_shift_scalar((4 * j as i32).elem());
            packed = packed.bitwise_or(nibble);
        }
        Nf4Weight {
            codes: packed.reshape([rows / CODES_PER_WORD, d_out]),
            scales: absmax.reshape([rows / BLOCK, d_out]),
            d_in,
            tile_columns: tile_columns(d_in, d_out),
        }
    }

    /// The same weight with products walking `n` output columns at a time (tests, tuning).
    pub fn with_tile_columns(mut self, n: usize) -> Self {
        self.tile_columns = n.max(1);
        self
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.codes.dims()[1]
    }

    /// The primitive form the backend ops take.
    pub fn primitive(&self) -> Nf4Primitive<B> {
        Nf4Primitive {
            codes: self.codes.clone().into_primitive(),
            scales: self.scales.clone().into_primitive().tensor(),
            d_in: self.d_in,
            tile_columns: self.tile_columns,
        }
    }

    /// The whole `[d_in, out]` weight in `dtype` (merging and checks; products use tiles).
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        dequantize_tile(&self.primitive(), 0, self.d_out(), dtype)
    }

    /// `x·W` for `x [rows, d_in]`, differentiable in `x` on an autodiff backend.
    pub fn matmul(&self, x: Tensor<B, 2>) -> Tensor<B, 2>
    where
        B: QuantOps,
    {
        let y = B::nf4_matmul(x.into_primitive().tensor(), self.primitive());
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }

    /// The packed codes and scales, read back (for checks that the base never changes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = self.codes.to_data().as_bytes().to_vec();
        bytes.extend_from_slice(self.scales.to_data().as_bytes());
        bytes
    }
}

/// [`Nf4Weight`] as backend primitives.
#[derive(Debug, Clone)]
pub struct Nf4Primitive<B: Backend> {
    /// Packed codes, see [`Nf4Weight::codes`].
    pub codes: IntTensor<B>,
    /// Block scales, see [`Nf4Weight::scales`].
    pub scales: FloatTensor<B>,
    /// Input features.
    pub d_in: usize,
    /// Output columns dequantized at once.
    pub tile_columns: usize,
}

impl<B: Backend> Nf4Primitive<B> {
    /// The packed words of output columns `[c0, c0 + n)`: `[padded_in / 8, n]`.
    fn codes_tile(&self, c0: usize, n: usize) -> Tensor<B, 2, Int> {
        Tensor::<B, 2, Int>::from_primitive(self.codes.clone()).narrow(1, c0, n)
    }

    /// The block scales of output columns `[c0, c0 + n)`: `[padded_in / 64, n]`.
    fn scales_tile(&self, c0: usize, n: usize) -> Tensor<B, 2> {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(self.scales.clone())).narrow(1, c0, n)
    }
}

/// `tile` (f32) in `dtype`.
fn in_dtype<B: Backend>(tile: Tensor<B, 2>, dtype: DType) -> Tensor<B, 2> {
    if dtype == DType::F32 {
        tile
    } else {
        tile.cast(dtype)
    }
}

/// Output columns `[c0, c0 + n)` of the weight, dequantized to `dtype`: `[d_in, n]`.
fn dequantize_tile<B: Backend>(
    w: &Nf4Primitive<B>,
    c0: usize,
    n: usize,
    dtype: DType,
) -> Tensor<B, 2> {
    let codes = w.codes_tile(c0, n);
    let device = codes.device();
    let words = codes.dims()[0];
    let rows = words * CODES_PER_WORD;
    let shifts: Vec<i32> = (0..CODES_PER_WORD as i32).map(|j| 4 * j).collect();
    let shifts = Tensor::<B, 1, Int>::from_data(
        TensorData::new(shifts, [CODES_PER_WORD]),
        (&device, DType::I32),
    )
    .reshape([1, CODES_PER_WORD, 1]);
    // Arithmetic shift, then the low nibble: right for the sign-carrying top code too.
    let idx = codes
        .unsqueeze_dim::<3>(1)
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(15i32.elem())
        .reshape([rows * n]);
    let levels =
        Tensor::<B, 1>::from_data(TensorData::new(NF4.to_vec(), [16]), (&device, DType::F32));
    let values = levels.select(0, idx).reshape([rows / BLOCK, BLOCK, n]);
    let scales = w.scales_tile(c0, n).unsqueeze_dim::<3>(1);
    let tile = (values * scales).reshape([rows, n]);
    let tile = if rows == w.d_in {
        tile
    } else {
        tile.narrow(0, 0, w.d_in)
    };
    in_dtype(tile, dtype)
}

/// `a·b` through the backend's [`crate::kernels::Kernels`] product (cuBLASLt on CUDA; Burn's
/// matmul, exactly as before, on the CPU).
fn product<B: crate::kernels::Kernels>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::gemm(
        a.into_primitive().tensor(),
        b.into_primitive().tensor(),
    )))
}

/// Output columns per tile for a weight of `d_in` inputs.
fn tile_columns(d_in: usize, d_out: usize) -> usize {
    (DEQUANT_TILE_ELEMENTS / d_in.div_ceil(BLOCK).max(1) / BLOCK).clamp(1, d_out.max(1))
}

/// Products with NF4 weights. The defaults, written with tensor ops, serve every backend; the
/// autodiff backend overrides [`QuantOps::nf4_matmul`] to make it one node whose backward
/// dequantizes again instead of saving the dequantized weight.
pub trait QuantOps: crate::kernels::Kernels {
    /// Output columns `[c0, c0 + n)` of `w` dequantized to `dtype`, `[d_in, n]`: the step both
    /// products repeat per tile. The default is Burn tensor ops (unpack, gather the level, scale).
    fn nf4_dequantize(
        w: &Nf4Primitive<Self>,
        c0: usize,
        n: usize,
        dtype: DType,
    ) -> Tensor<Self, 2> {
        dequantize_tile(w, c0, n, dtype)
    }

    /// `x·W`: `x [rows, d_in]` (any float dtype; the weight is dequantized to it) → `[rows, out]`.
    fn nf4_matmul(x: FloatTensor<Self>, w: Nf4Primitive<Self>) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let dtype = x.dtype();
        let d_out = Tensor::<Self, 2, Int>::from_primitive(w.codes.clone()).dims()[1];
        let n = w.tile_columns;
        let parts: Vec<_> = (0..d_out)
            .step_by(n)
            .map(|c0| {
                product(
                    x.clone(),
                    Self::nf4_dequantize(&w, c0, n.min(d_out - c0), dtype),
                )
            })
            .collect();
        let y = if parts.len() == 1 {
            parts.into_iter().next().expect("one part")
        } else {
            Tensor::cat(parts, 1)
        };
        y.into_primitive().tensor()
    }

    /// `g·Wᵀ`: `g [rows, out]` → `[rows, d_in]` (the input gradient of [`QuantOps::nf4_matmul`]).
    fn nf4_matmul_t(g: FloatTensor<Self>, w: Nf4Primitive<Self>) -> FloatTensor<Self> {
        let g = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(g));
        let dtype = g.dtype();
        let d_out = g.dims()[1];
        let n = w.tile_columns;
        let mut sum: Option<Tensor<Self, 2>> = None;
        for c0 in (0..d_out).step_by(n) {
            let m = n.min(d_out - c0);
            let part = product(
                g.clone().narrow(1, c0, m),
                Self::nf4_dequantize(&w, c0, m, dtype).transpose(),
            );
            sum = Some(match sum {
                Some(s) => s + part,
                None => part,
            });
        }
        sum.expect("a weight has at least one output column")
            .into_primitive()
            .tensor()
    }
}

/// On the CPU the tile is decoded in one pass straight from the packed words: the tensor-op
/// default materialises the unpacked codes, the gather's indices and the levels, each as large as
/// the tile, and made QLoRA steps 1.4-1.5x a LoRA step's time.
impl QuantOps for crate::CpuBackend {
    fn nf4_dequantize(
        w: &Nf4Primitive<Self>,
        c0: usize,
        n: usize,
        dtype: DType,
    ) -> Tensor<Self, 2> {
        let codes = w.codes_tile(c0, n);
        let device = codes.device();
        let words: Vec<i32> = codes
            .into_data()
            .convert::<i32>()
            .into_vec()
            .expect("i32 codes");
        let scales = w
            .scales_tile(c0, n)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 scales");
        let mut out = vec![0f32; w.d_in * n];
        for (r, row) in out.chunks_exact_mut(n).enumerate() {
            let (word, shift) = (r / CODES_PER_WORD, 4 * (r % CODES_PER_WORD));
            let codes = &words[word * n..(word + 1) * n];
            let scales = &scales[(r / BLOCK) * n..(r / BLOCK + 1) * n];
            for ((v, &c), &s) in row.iter_mut().zip(codes).zip(scales) {
                *v = NF4[((c >> shift) & 15) as usize] * s;
            }
        }
        let tile =
            Tensor::<Self, 2>::from_data(TensorData::new(out, [w.d_in, n]), (&device, DType::F32));
        in_dtype(tile, dtype)
    }
}

#[cfg(feature = "cuda")]
impl QuantOps for crate::CudaBackend {}

impl<B: QuantOps, C: CheckpointStrategy> QuantOps for Autodiff<B, C> {
    fn nf4_matmul(x: FloatTensor<Self>, w: Nf4Primitive<Self>) -> FloatTensor<Self> {
        nf4_node::<B, C>(x, w, false)
    }

    fn nf4_matmul_t(g: FloatTensor<Self>, w: Nf4Primitive<Self>) -> FloatTensor<Self> {
        nf4_node::<B, C>(g, w, true)
    }
}

/// The autodiff node of an NF4 product (`x·W`, or `x·Wᵀ` when `transposed`): its state is the
/// packed weight, and its backward is the other product, dequantizing again.
#[derive(Debug)]
struct Nf4Product;

impl<B: QuantOps> Backward<B, 1> for Nf4Product {
    type State = (Nf4Primitive<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (w, transposed) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |g| {
            if transposed {
                B::nf4_matmul(g, w)
            } else {
                B::nf4_matmul_t(g, w)
            }
        });
    }
}

fn nf4_node<B: QuantOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: Nf4Primitive<Autodiff<B, C>>,
    transposed: bool,
) -> FloatTensor<Autodiff<B, C>> {
    let w = Nf4Primitive::<B> {
        codes: w.codes,
        scales: w.scales.primitive,
        d_in: w.d_in,
        tile_columns: w.tile_columns,
    };
    let product = |x, w| {
        if transposed {
            B::nf4_matmul_t(x, w)
        } else {
            B::nf4_matmul(x, w)
        }
    };
    match Nf4Product
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = product(x.primitive, w.clone());
            prep.finish((w, transposed), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(product(x.primitive, w)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(rng: &mut ChaCha8Rng, std: f32) -> f32 {
        // Box-Muller: rand's normal distribution lives in another crate.
        let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
        std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    fn check_bound(w: &[f32], d_in: usize, d_out: usize) {
        let q = Nf4Matrix::quantize(w, d_in, d_out);
        let back = q.dequantize();
        for r in 0..d_in {
            for c in 0..d_out {
                let absmax = q.scales[(r / BLOCK) * d_out + c];
                let x = w[r * d_out + c];
                let bound = absmax * nf4_error_bound(x / absmax.max(f32::MIN_POSITIVE));
                let err = (x - back[r * d_out + c]).abs();
                assert!(
                    err <= bound * (1.0 + 1e-5) + 1e-12,
                    "row {r} col {c}: |{x} - {}| = {err} > {bound}",
                    back[r * d_out + c]
                );
            }
        }
        // The block's largest magnitude is exact (it is ±1 · absmax).
        for blk in 0..d_in.div_ceil(BLOCK) {
            for c in 0..d_out {
                let rows = blk * BLOCK..((blk + 1) * BLOCK).min(d_in);
                let (i, _) = rows
                    .clone()
                    .map(|r| (r, w[r * d_out + c].abs()))
                    .fold((rows.start, -1.0), |a, b| if b.1 > a.1 { b } else { a });
                assert_eq!(back[i * d_out + c], w[i * d_out + c]);
            }
        }
    }

    #[test]
    fn codes_pick_the_nearest_level() {
        for (i, &l) in NF4.iter().enumerate() {
            assert_eq!(nf4_code(l) as usize, i);
        }
        for k in 0..=2000 {
            let x = -1.0 + k as f32 / 1000.0;
            let best = (0..16)
                .min_by(|&a, &b| (NF4[a] - x).abs().total_cmp(&(NF4[b] - x).abs()))
                .unwrap();
            let got = nf4_code(x) as usize;
            assert!(
                (NF4[got] - x).abs() <= (NF4[best] - x).abs() + 1e-7,
                "x = {x}"
            );
        }
    }

    #[test]
    fn random_weights_stay_within_the_block_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // 200 inputs: a partial last block.
        let (d_in, d_out) = (200, 48);
        let w: Vec<f32> = (0..d_in * d_out).map(|_| normal(&mut rng, 0.02)).collect();
        check_bound(&w, d_in, d_out);
    }

    #[test]
    fn outlier_heavy_weights_stay_within_the_block_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (d_in, d_out) = (256, 32);
        let mut w: Vec<f32> = (0..d_in * d_out).map(|_| normal(&mut rng, 0.02)).collect();
        // LLM-style outliers: a few entries 100x the typical size, and one all-outlier column.
        for i in (0..w.len()).step_by(97) {
            w[i] *= 100.0;
        }
        for r in 0..d_in {
            w[r * d_out + 5] = 3.0 * if r % 2 == 0 { 1.0 } else { -1.0 };
        }
        // An all-zero block (scale 0) must come back as zeros.
        for r in 64..128 {
            w[r * d_out + 9] = 0.0;
        }
        check_bound(&w, d_in, d_out);
        let back = Nf4Matrix::quantize(&w, d_in, d_out).dequantize();
        assert!((64..128).all(|r| back[r * d_out + 9] == 0.0));
    }

    /// Burn's blockwise Q4 is symmetric linear int4: levels `k·absmax/7`, k in -7..=7 (as
    /// `QuantScheme` with `QuantValue::Q4S`, block size 64). NF4 must lose less on the normally
    /// distributed weights real checkpoints have: the reason this crate does not use Q4.
    #[test]
    fn nf4_beats_linear_int4_on_normal_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (d_in, d_out) = (4096, 64);
        let w: Vec<f32> = (0..d_in * d_out).map(|_| normal(&mut rng, 0.02)).collect();
        let nf4 = Nf4Matrix::quantize(&w, d_in, d_out).dequantize();
        let mut int4 = Vec::with_capacity(w.len());
        for r in 0..d_in {
            for c in 0..d_out {
                let blk = r / BLOCK * BLOCK;
                let absmax = (blk..blk + BLOCK)
                    .map(|i| w[i * d_out + c].abs())
                    .fold(0.0f32, f32::max);
                let step = absmax / 7.0;
                int4.push((w[r * d_out + c] / step).round().clamp(-7.0, 7.0) * step);
            }
        }
        let rms = |b: &[f32]| {
            (w.iter()
                .zip(b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                / w.len() as f64)
                .sqrt()
        };
        let (e_nf4, e_int4) = (rms(&nf4), rms(&int4));
        eprintln!(
            "RMS error, weights N(0, 0.02²), blocks of 64: NF4 {e_nf4:.3e}, int4 {e_int4:.3e}"
        );
        assert!(e_nf4 < 0.9 * e_int4, "NF4 {e_nf4} vs int4 {e_int4}");
    }
}
