//! distill patch: causal attention, RMSNorm and the rotary embedding as single operations,
//! forward and backward, for f32.
//!
//! Burn's autodiff has no attention node: it records attention as its parts (a product, a
//! scale, a mask, softmax's max, subtraction, exp, sum and division, a product) and runs a
//! backward op for each, most of them passes over a `[b, h, n, t]` tensor with a fresh output
//! each time. Here each (batch, head) pair is two `gemm` products and one row pass forward,
//! and four products and one row pass backward, the pairs spread over rayon's threads.
//! Only the softmax probabilities are kept for the backward pass. RMSNorm and the rotary
//! embedding are here for the same reason: one pass each way instead of a handful of
//! element-wise ops, each with its own output and backward op.

use alloc::vec::Vec;
use core::mem::MaybeUninit;

use burn_backend::DType;
use burn_std::{Bytes, Shape};

use crate::layout::Layout;
use crate::ops::fast_exp::{exp_shifted_sum_inplace, exp_shifted_sum_serial, sigmoid_inplace};
use crate::tensor::FlexTensor;

/// `[b, h, n, d]` (or `[.., t, d]`) dims of an attention operand.
fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    assert_eq!(
        s.num_dims(),
        4,
        "fused attention: operands are [batch, heads, seq, dim]"
    );
    [s[0], s[1], s[2], s[3]]
}

/// The operand's f32 values, contiguous.
fn values(t: &FlexTensor) -> FlexTensor {
    assert_eq!(t.dtype(), DType::F32, "fused attention: f32 only");
    t.to_contiguous()
}

fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// `dst (m×n) = beta·(lhs·rhs)`, or with `acc` `dst += beta·(lhs·rhs)`, with explicit strides
/// (in elements), on this thread. Without `acc` every element of `dst` is written, none read.
///
/// # Safety
/// The pointers and strides must describe valid `m×k`, `k×n` and `m×n` matrices.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (isize, isize),
    beta: f32,
    acc: bool,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            acc,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            if acc { 1.0f32 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Runs `f(pair)` for every (batch, head) pair, on every core when there are several pairs.
fn for_each_pair(pairs: usize, f: impl Fn(usize) + Send + Sync) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        if pairs > 1 {
            (0..pairs).into_par_iter().for_each(f);
            return;
        }
    }
    (0..pairs).for_each(f);
}

/// Raw pointer that may cross threads; each pair writes only its own disjoint block.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    fn of(v: &mut [MaybeUninit<f32>]) -> Self {
        Self(v.as_mut_ptr().cast())
    }
    /// The element at `offset`, for a strided block of this pair's own elements.
    ///
    /// # Safety
    /// `offset` must be inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
    /// # Safety
    /// `offset..offset + len` must be inside the buffer and written by this pair only.
    unsafe fn block<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        // The blocks are plain f32 storage that `gemm` or the row pass fills before any read.
        unsafe { core::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

/// An attention operand read in place: its f32 buffer, where the `[b, heads, rows, d]` view
/// starts and the strides of those four dims (any order in memory, so that the projections'
/// `[b, s, heads, d]` layout needs no copy).
struct Operand {
    t: FlexTensor,
    offset: usize,
    strides: [isize; 4],
}

impl Operand {
    fn of(t: &FlexTensor) -> Self {
        assert_eq!(t.dtype(), DType::F32, "fused attention: f32 only");
        let layout = t.layout();
        let s = layout.strides();
        if s.iter().all(|&x| x >= 0) {
            return Self {
                t: t.clone(),
                offset: layout.start_offset(),
                strides: [s[0], s[1], s[2], s[3]],
            };
        }
        let t = t.to_contiguous();
        let s = t.layout().strides();
        let strides = [s[0], s[1], s[2], s[3]];
        Self {
            t,
            offset: 0,
            strides,
        }
    }

    /// The `rows×d` matrix of batch `b`, head `head`.
    fn at(&self, b: usize, head: usize) -> *const f32 {
        let [sb, sh, _, _] = self.strides;
        let base = self.t.storage::<f32>().as_ptr();
        // SAFETY: the view's elements lie inside the buffer (the layout describes them).
        unsafe { base.add(self.offset + b * sb as usize + head * sh as usize) }
    }

    /// (row stride, column stride).
    fn rows(&self) -> (isize, isize) {
        (self.strides[2], self.strides[3])
    }

    /// Strides of the transpose (`d×rows`).
    fn cols(&self) -> (isize, isize) {
        (self.strides[3], self.strides[2])
    }
}

/// A buffer written as `[b, rows, heads, d]` and returned as its `[b, heads, rows, d]` view,
/// the layout the attention's callers merge heads from (`swap_dims(1, 2)` and a reshape, then
/// free) and the projections' gradients arrive in.
///
/// # Safety
/// Every element of `v` must have been written.
unsafe fn heads_view(
    v: Vec<MaybeUninit<f32>>,
    [b, heads, rows, d]: [usize; 4],
) -> FlexTensor {
    let mut v = core::mem::ManuallyDrop::new(v);
    // SAFETY: the caller wrote every element; same allocation, read as the initialised type.
    let v = unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) };
    let strides = alloc::vec![(rows * heads * d) as isize, d as isize, (heads * d) as isize, 1];
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::new(Shape::from(alloc::vec![b, heads, rows, d]), strides, 0),
        DType::F32,
    )
}

/// Heads per key/value head, checking the operands' shapes.
fn group_size([b, h, n, d]: [usize; 4], [kb, kv, t, kd]: [usize; 4]) -> usize {
    assert!(t >= n, "fused attention: more queries than keys");
    assert_eq!((kb, kd), (b, d), "fused attention: key/value shape");
    assert!(
        kv > 0 && h % kv == 0,
        "fused attention: {h} query heads over {kv} key/value heads"
    );
    h / kv
}

/// Query rows per block of causal attention's products (gemm's f32 AVX-512 tile height). A
/// block's products stop at the last key its last row sees, so a `256×256` square costs 62.5%
/// of the full products (the masked corner is never computed).
const ATTENTION_ROWS: usize = 64;

/// Keys query row `i` of `n` sees among `t` (bottom-right aligned).
fn visible(i: usize, n: usize, t: usize) -> usize {
    (i + t - n + 1).min(t)
}

/// `(first row, rows, keys seen by the block)` of each block of [`ATTENTION_ROWS`] query rows;
/// the last block sees all `t` keys.
fn row_blocks(n: usize, t: usize) -> impl DoubleEndedIterator<Item = (usize, usize, usize)> {
    (0..n.div_ceil(ATTENTION_ROWS)).map(move |blk| {
        let r0 = blk * ATTENTION_ROWS;
        let rows = ATTENTION_ROWS.min(n - r0);
        (r0, rows, visible(r0 + rows - 1, n, t))
    })
}

/// Causal attention of `q [b, h, n, d]` over `k`, `v [b, kv, t, d]` with `t ≥ n` (query `i`
/// sees keys `..= i + t - n`, Burn's bottom-right alignment), scores scaled by `scale`.
/// Grouped-query attention when `kv < h`: query head `j` reads key/value head `j / (h / kv)`,
/// with no copy of the shared heads. Operands may be strided views.
/// Returns the output `[b, h, n, d]` (a view of a `[b, n, h, d]` buffer) and the softmax
/// probabilities `[b, h, n, t]` (zero above the diagonal) that [`causal_attention_backward`]
/// needs.
pub fn causal_attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    scale: f32,
) -> (FlexTensor, FlexTensor) {
    let [b, h, n, d] = dims4(q);
    let t = dims4(k)[2];
    let rep = group_size([b, h, n, d], dims4(k));
    assert_eq!(dims4(v), dims4(k), "fused attention: value shape");
    if t == 0 {
        // No keys (and so no queries): nothing to attend to, nothing to write.
        // SAFETY: an empty buffer has no element to write.
        return unsafe {
            (
                heads_view(uninit(0), [b, h, n, d]),
                written_tensor(uninit(0), alloc::vec![b, h, n, t]),
            )
        };
    }
    let (q, k, v) = (Operand::of(q), Operand::of(k), Operand::of(v));
    let mut out = uninit(b * n * h * d);
    let mut probs = uninit(b * h * n * t);
    let (o, p) = (Out::of(&mut out), Out::of(&mut probs));
    let ti = t as isize;
    let (q_rs, o_rs) = (q.rows().0, (h * d) as isize);
    for_each_pair(b * h, |pair| {
        let (bi, hh) = (pair / h, pair % h);
        let g = hh / rep;
        // SAFETY: each pair owns its `n×t` block of `probs` and its head's rows of `out`; the
        // operands' strides describe their views, and every row block stays inside them.
        unsafe {
            let pp = p.block(pair * n * t, n * t);
            for (r0, rows, vis) in row_blocks(n, t) {
                let pb = pp.as_mut_ptr().add(r0 * t);
                // Scores `scale·q·kᵀ` of the keys the block sees: kᵀ is k read with its
                // strides swapped.
                product(
                    rows,
                    vis,
                    d,
                    pb,
                    ti,
                    q.at(bi, hh).offset(r0 as isize * q_rs),
                    q.rows(),
                    k.at(bi, g),
                    k.cols(),
                    scale,
                    false,
                );
                for (i, row) in pp[r0 * t..(r0 + rows) * t].chunks_exact_mut(t).enumerate() {
                    let (seen, hidden) = row.split_at_mut(visible(r0 + i, n, t));
                    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = exp_shifted_sum_inplace(seen, max);
                    let inv = 1.0 / sum;
                    seen.iter_mut().for_each(|x| *x *= inv);
                    hidden.fill(0.0);
                }
                product(
                    rows,
                    d,
                    vis,
                    o.at(bi * n * h * d + r0 * h * d + hh * d),
                    o_rs,
                    pp.as_ptr().add(r0 * t),
                    (ti, 1),
                    v.at(bi, g),
                    v.rows(),
                    1.0,
                    false,
                );
            }
        }
    });
    // SAFETY: every pair wrote its whole block of `probs` and its head's rows of `out`.
    unsafe {
        (
            heads_view(out, [b, h, n, d]),
            written_tensor(probs, alloc::vec![b, h, n, t]),
        )
    }
}

/// Gradients `(dq, dk, dv)` of [`causal_attention_forward`] for the output's gradient `grad`,
/// from the operands and the probabilities it returned. Each gradient is a view like the
/// forward's output (`dk`, `dv` of `[b, t, kv, d]` buffers); a key/value head's gradient sums
/// its query heads' in head order, so the bits do not depend on the thread count.
pub fn causal_attention_backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    probs: &FlexTensor,
    grad: &FlexTensor,
    scale: f32,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [b, h, n, d] = dims4(q);
    let [_, kv, t, _] = dims4(k);
    let rep = group_size([b, h, n, d], dims4(k));
    assert_eq!(dims4(v), dims4(k), "fused attention: value shape");
    assert_eq!(
        dims4(probs),
        [b, h, n, t],
        "fused attention: probabilities shape"
    );
    assert_eq!(dims4(grad), [b, h, n, d], "fused attention: gradient shape");
    if t == 0 {
        // SAFETY: an empty buffer has no element to write.
        let empty = |heads, rows| unsafe { heads_view(uninit(0), [b, heads, rows, d]) };
        return (empty(h, n), empty(kv, t), empty(kv, t));
    }
    let (q, k, v, g) = (
        Operand::of(q),
        Operand::of(k),
        Operand::of(v),
        Operand::of(grad),
    );
    let probs = values(probs);
    let ps = probs.storage::<f32>();
    let mut dq = uninit(b * n * h * d);
    let mut dk = uninit(b * t * kv * d);
    let mut dv = uninit(b * t * kv * d);
    let (oq, ok, ov) = (Out::of(&mut dq), Out::of(&mut dk), Out::of(&mut dv));
    let ti = t as isize;
    let (q_rs, kv_rs) = ((h * d) as isize, (kv * d) as isize);
    for_each_pair(b * kv, |group| {
        let (bi, gi) = (group / kv, group % kv);
        // `dP`, then `dS` in place, for one head at a time.
        let mut ds = uninit(n * t);
        // SAFETY: each group owns its key/value head's rows of `dk` and `dv` and its query
        // heads' rows of `dq`; the operands' strides describe their views.
        unsafe {
            let dsp = Out::of(&mut ds).block(0, n * t);
            let dkp = ok.at(bi * t * kv * d + gi * d);
            let dvp = ov.at(bi * t * kv * d + gi * d);
            for r in 0..rep {
                let hh = gi * rep + r;
                let pp = ps.as_ptr().add((bi * h + hh) * n * t);
                let (gh, qh) = (g.at(bi, hh), q.at(bi, hh));
                // Row blocks from the last, whose rows see every key: for the group's first
                // head it writes all of dK and dV, and every later product adds to them.
                for (r0, rows, vis) in row_blocks(n, t).rev() {
                    let acc = r > 0 || vis < t;
                    let (pb, db) = (pp.add(r0 * t), dsp.as_mut_ptr().add(r0 * t));
                    let (gb, qb) = (
                        gh.offset(r0 as isize * g.rows().0),
                        qh.offset(r0 as isize * q.rows().0),
                    );
                    // dV (+)= Pᵀ·dO
                    product(vis, d, rows, dvp, kv_rs, pb, (1, ti), gb, g.rows(), 1.0, acc);
                    // dP = dO·Vᵀ
                    product(rows, vis, d, db, ti, gb, g.rows(), v.at(bi, gi), v.cols(), 1.0, false);
                    // dS = scale·P∘(dP − Σⱼ P·dP), row by row (P is zero where masked).
                    for i in 0..rows {
                        let dsr = core::slice::from_raw_parts_mut(db.add(i * t), vis);
                        let pr = core::slice::from_raw_parts(pb.add(i * t), vis);
                        let dot: f32 = dsr.iter().zip(pr).map(|(g, p)| g * p).sum();
                        dsr.iter_mut()
                            .zip(pr)
                            .for_each(|(g, p)| *g = scale * p * (*g - dot));
                    }
                    // dQ = dS·K
                    product(
                        rows,
                        d,
                        vis,
                        oq.at(bi * n * h * d + r0 * h * d + hh * d),
                        q_rs,
                        db,
                        (ti, 1),
                        k.at(bi, gi),
                        k.rows(),
                        1.0,
                        false,
                    );
                    // dK (+)= dSᵀ·Q
                    product(vis, d, rows, dkp, kv_rs, db, (1, ti), qb, q.rows(), 1.0, acc);
                }
            }
        }
    });
    // SAFETY: every group wrote its heads' rows of the three gradients.
    unsafe {
        (
            heads_view(dq, [b, h, n, d]),
            heads_view(dk, [b, kv, t, d]),
            heads_view(dv, [b, kv, t, d]),
        )
    }
}

/// Rows per block of the row-wise kernels: a fixed size, so that sums across blocks (RMSNorm's
/// `dγ`) add the same partial sums in the same order on any number of threads.
const ROWS_PER_BLOCK: usize = 32;

/// Runs `f(first_row, rows)` over blocks of [`ROWS_PER_BLOCK`] rows, in parallel with `rayon`,
/// returning the results in block order.
fn for_each_block<R: Send>(rows: usize, f: impl Fn(usize, usize) -> R + Send + Sync) -> Vec<R> {
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    let run = |i: usize| {
        let first = i * ROWS_PER_BLOCK;
        f(first, ROWS_PER_BLOCK.min(rows - first))
    };
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().map(run).collect()
    }
    #[cfg(not(feature = "rayon"))]
    {
        (0..blocks).map(run).collect()
    }
}

fn shape_of(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

/// The buffer as a contiguous f32 tensor of `shape`.
///
/// # Safety
/// Every element of `v` must have been written.
unsafe fn written_tensor(v: Vec<MaybeUninit<f32>>, shape: Vec<usize>) -> FlexTensor {
    let mut v = core::mem::ManuallyDrop::new(v);
    // SAFETY: the caller wrote every element; same allocation, read as the initialised type.
    let v = unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) };
    FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous(Shape::from(shape)),
        DType::F32,
    )
}

/// RMSNorm over the last dim: `y = x·r·γ` with `r = 1/√(mean(x²) + eps)` per row.
/// Returns `y` (the shape of `x`) and `r` (`[rows]`) for [`rms_norm_backward`].
pub fn rms_norm_forward(x: &FlexTensor, gamma: &FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
    let shape = shape_of(x);
    let d = *shape.last().expect("rms_norm: a tensor with dims");
    assert!(d > 0, "rms_norm: an empty last dim");
    assert_eq!(shape_of(gamma), [d], "rms_norm: gamma is [d]");
    let (x, gamma) = (values(x), values(gamma));
    let (xs, gs) = (x.storage::<f32>(), gamma.storage::<f32>());
    let rows = xs.len() / d.max(1);
    let mut y = uninit(rows * d);
    let mut r = uninit(rows);
    let (yo, ro) = (Out::of(&mut y), Out::of(&mut r));
    for_each_block(rows, |first, n| {
        // SAFETY: each block writes its own rows of `y` and `r`.
        let (yb, rb) = unsafe { (yo.block(first * d, n * d), ro.block(first, n)) };
        for (i, (yr, rr)) in yb.chunks_exact_mut(d).zip(rb.iter_mut()).enumerate() {
            let xr = &xs[(first + i) * d..(first + i + 1) * d];
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            *rr = inv;
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(gs) {
                *o = v * inv * g;
            }
        }
    });
    // SAFETY: the blocks cover every row of `y` and `r`.
    unsafe {
        (
            written_tensor(y, shape),
            written_tensor(r, alloc::vec![rows]),
        )
    }
}

/// Gradients `(dx, dγ)` of [`rms_norm_forward`] for the output's gradient `grad`:
/// `dx = r·g·γ − r³·x·mean(g·γ·x)`, `dγ = Σ_rows g·x·r`.
pub fn rms_norm_backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    r: &FlexTensor,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = shape_of(x);
    let d = *shape.last().expect("rms_norm: a tensor with dims");
    let (x, gamma, r, grad) = (values(x), values(gamma), values(r), values(grad));
    let (xs, gs, rs, dys) = (
        x.storage::<f32>(),
        gamma.storage::<f32>(),
        r.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let rows = xs.len() / d.max(1);
    assert_eq!(rs.len(), rows, "rms_norm: one r per row");
    assert_eq!(dys.len(), rows * d, "rms_norm: gradient shape");
    let mut dx = uninit(rows * d);
    let dxo = Out::of(&mut dx);
    let partials = for_each_block(rows, |first, n| {
        // SAFETY: each block writes its own rows of `dx`.
        let dxb = unsafe { dxo.block(first * d, n * d) };
        let mut dgamma = alloc::vec![0.0f32; d];
        for (i, dxr) in dxb.chunks_exact_mut(d).enumerate() {
            let row = first + i;
            let (xr, gr) = (&xs[row * d..(row + 1) * d], &dys[row * d..(row + 1) * d]);
            let inv = rs[row];
            let mean = xr
                .iter()
                .zip(gr)
                .zip(gs)
                .map(|((x, g), w)| g * w * x)
                .sum::<f32>()
                / d as f32;
            let c = inv * inv * inv * mean;
            for ((((o, &xv), &gv), &w), dg) in dxr
                .iter_mut()
                .zip(xr)
                .zip(gr)
                .zip(gs)
                .zip(dgamma.iter_mut())
            {
                *o = inv * gv * w - c * xv;
                *dg += gv * xv * inv;
            }
        }
        dgamma
    });
    let mut dgamma = alloc::vec![0.0f32; d];
    for p in partials {
        dgamma.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    let dgamma = FlexTensor::new(
        Bytes::from_elems(dgamma),
        Layout::contiguous(Shape::from(alloc::vec![d])),
        DType::F32,
    );
    // SAFETY: the blocks cover every row of `dx`.
    (unsafe { written_tensor(dx, shape) }, dgamma)
}

/// Rotary embedding of `x [b, s, heads, hd]` (any layout) with tables `cos`, `sin [s, hd]`:
/// `x·cos + rot(x)·sin`, `rot(x) = [−x₂, x₁]` over the halves of `hd`. With `transpose`, the
/// map's transpose instead, `g·cos + rotᵀ(g·sin)` (`rotᵀ(y) = [y₂, −y₁]`): the gradient.
pub fn rope(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, transpose: bool) -> FlexTensor {
    let shape = shape_of(x);
    assert_eq!(shape.len(), 4, "rope: x is [batch, seq, heads, head_dim]");
    let (s, heads, hd) = (shape[1], shape[2], shape[3]);
    assert_eq!(shape_of(cos), [s, hd], "rope: cos is [seq, head_dim]");
    assert_eq!(shape_of(sin), [s, hd], "rope: sin is [seq, head_dim]");
    // Every element of the output is written only when the halves cover `hd`.
    assert!(hd % 2 == 0, "rope: head_dim must be even");
    let half = hd / 2;
    let (x, cos, sin) = (values(x), values(cos), values(sin));
    let (xs, cs, ss) = (
        x.storage::<f32>(),
        cos.storage::<f32>(),
        sin.storage::<f32>(),
    );
    let rows = xs.len() / hd.max(1);
    let mut out = uninit(rows * hd);
    let oo = Out::of(&mut out);
    for_each_block(rows, |first, n| {
        // SAFETY: each block writes its own rows.
        let ob = unsafe { oo.block(first * hd, n * hd) };
        for (i, or) in ob.chunks_exact_mut(hd).enumerate() {
            let row = first + i;
            let pos = (row / heads) % s;
            let xr = &xs[row * hd..(row + 1) * hd];
            let (c, sn) = (&cs[pos * hd..(pos + 1) * hd], &ss[pos * hd..(pos + 1) * hd]);
            let (o1, o2) = or.split_at_mut(half);
            let (x1, x2) = xr.split_at(half);
            let (c1, c2) = c.split_at(half);
            let (s1, s2) = sn.split_at(half);
            if transpose {
                for j in 0..half {
                    o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                    o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
                }
            } else {
                for j in 0..half {
                    o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                    o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
                }
            }
        }
    });
    // SAFETY: the blocks cover every row, and each row's two halves cover `hd` (even).
    unsafe { written_tensor(out, shape) }
}

/// Elements per block of the element-wise kernels.
const ELEMS_PER_BLOCK: usize = 16 * 1024;

/// Runs `f(start, end)` over blocks of [`ELEMS_PER_BLOCK`] elements of `0..len`, in parallel
/// with `rayon` (each block its own task: a 400K-element weight is 25 of them).
fn for_each_range(len: usize, f: impl Fn(usize, usize) + Send + Sync) {
    let blocks = len.div_ceil(ELEMS_PER_BLOCK);
    let run = |i: usize| {
        let start = i * ELEMS_PER_BLOCK;
        f(start, (start + ELEMS_PER_BLOCK).min(len))
    };
    #[cfg(feature = "rayon")]
    if blocks > 1 {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(run);
        return;
    }
    (0..blocks).for_each(run);
}

/// Runs `f` compiled for the widest vector unit the CPU has (AVX-512, else AVX2), so that a
/// plain loop inside it vectorises at that width; the default x86-64 target stops at SSE2.
#[inline(always)]
fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// SwiGLU's product `silu(g)·u = g·σ(g)·u`, element-wise over equal shapes.
pub fn swiglu_forward(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let shape = shape_of(gate);
    assert_eq!(shape_of(up), shape, "swiglu: gate and up shapes");
    let (g, u) = (values(gate), values(up));
    let (gs, us) = (g.storage::<f32>(), u.storage::<f32>());
    let mut out = uninit(gs.len());
    let oo = Out::of(&mut out);
    for_each_range(gs.len(), |start, end| {
        // SAFETY: each block writes its own range.
        let o = unsafe { oo.block(start, end - start) };
        o.copy_from_slice(&gs[start..end]);
        sigmoid_inplace(o);
        widest(|| {
            for ((o, &g), &u) in o.iter_mut().zip(&gs[start..end]).zip(&us[start..end]) {
                *o = g * *o * u;
            }
        });
    });
    // SAFETY: the blocks cover every element.
    unsafe { written_tensor(out, shape) }
}

/// Gradients `(dg, du)` of [`swiglu_forward`]: `du = dy·g·σ(g)`,
/// `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward(
    gate: &FlexTensor,
    up: &FlexTensor,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = shape_of(gate);
    let (g, u, dy) = (values(gate), values(up), values(grad));
    let (gs, us, dys) = (g.storage::<f32>(), u.storage::<f32>(), dy.storage::<f32>());
    assert_eq!(us.len(), gs.len(), "swiglu: up shape");
    assert_eq!(dys.len(), gs.len(), "swiglu: gradient shape");
    let mut dg = uninit(gs.len());
    let mut du = uninit(gs.len());
    let (go, uo) = (Out::of(&mut dg), Out::of(&mut du));
    for_each_range(gs.len(), |start, end| {
        // SAFETY: each block writes its own range of both outputs.
        let (dgb, dub) = unsafe { (go.block(start, end - start), uo.block(start, end - start)) };
        dgb.copy_from_slice(&gs[start..end]);
        sigmoid_inplace(dgb);
        let (g, u, dy) = (&gs[start..end], &us[start..end], &dys[start..end]);
        widest(|| {
            for i in 0..dgb.len() {
                let s = dgb[i];
                dub[i] = dy[i] * g[i] * s;
                dgb[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    });
    // SAFETY: the blocks cover every element of both.
    unsafe { (written_tensor(dg, shape.clone()), written_tensor(du, shape)) }
}

/// Class indices of an int tensor (i64 or i32), contiguous.
fn class_indices(t: &FlexTensor) -> Vec<usize> {
    let t = t.to_contiguous();
    let to = |v: i64| usize::try_from(v).expect("cross-entropy: a negative class index");
    match t.dtype() {
        DType::I64 => t.storage::<i64>().iter().map(|&v| to(v)).collect(),
        DType::I32 => t.storage::<i32>().iter().map(|&v| to(i64::from(v))).collect(),
        other => panic!("cross-entropy: class indices of dtype {other:?}"),
    }
}

/// Rows and classes of `[n, v]` logits with one target per row.
fn logit_dims(logits: &FlexTensor, targets: &[usize]) -> (usize, usize) {
    let shape = shape_of(logits);
    assert_eq!(shape.len(), 2, "cross-entropy: logits are [rows, classes]");
    let (n, v) = (shape[0], shape[1]);
    assert_eq!(targets.len(), n, "cross-entropy: one target per row");
    assert!(
        targets.iter().all(|&t| t < v),
        "cross-entropy: a class index outside 0..{v}"
    );
    (n, v)
}

/// Cross-entropy of f32 logits `[n, v]` against one class index per row: returns the NLL
/// `lse − logit[target]` (`[n]`) and the row's log-sum-exp `lse` (`[n]`) for
/// [`cross_entropy_backward`]. One read of the logits; no `[n, v]` output.
pub fn cross_entropy_forward(logits: &FlexTensor, targets: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let targets = class_indices(targets);
    let (n, v) = logit_dims(logits, &targets);
    let x = values(logits);
    let xs = x.storage::<f32>();
    let mut nll = uninit(n);
    let mut lse = uninit(n);
    let (no, lo) = (Out::of(&mut nll), Out::of(&mut lse));
    for_each_block(n, |first, rows| {
        // SAFETY: each block writes its own rows of both outputs.
        let (nb, lb) = unsafe { (no.block(first, rows), lo.block(first, rows)) };
        let mut scratch = alloc::vec![0.0f32; v];
        for i in 0..rows {
            let row = &xs[(first + i) * v..(first + i + 1) * v];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scratch.copy_from_slice(row);
            let l = max + exp_shifted_sum_serial(&mut scratch, max).ln();
            lb[i] = l;
            nb[i] = l - row[targets[first + i]];
        }
    });
    // SAFETY: the blocks cover every row.
    unsafe {
        (
            written_tensor(nll, alloc::vec![n]),
            written_tensor(lse, alloc::vec![n]),
        )
    }
}

/// Gradient of [`cross_entropy_forward`]'s NLL for its gradient `grad [n]`:
/// `(softmax(x) − onehot(target))·grad` per row, `[n, v]`.
pub fn cross_entropy_backward(
    logits: &FlexTensor,
    lse: &FlexTensor,
    targets: &FlexTensor,
    grad: &FlexTensor,
) -> FlexTensor {
    let targets = class_indices(targets);
    let (n, v) = logit_dims(logits, &targets);
    let (x, lse, g) = (values(logits), values(lse), values(grad));
    let (xs, ls, gs) = (x.storage::<f32>(), lse.storage::<f32>(), g.storage::<f32>());
    assert_eq!(ls.len(), n, "cross-entropy: one lse per row");
    assert_eq!(gs.len(), n, "cross-entropy: one gradient per row");
    let mut dx = uninit(n * v);
    let dxo = Out::of(&mut dx);
    for_each_block(n, |first, rows| {
        // SAFETY: each block writes its own rows.
        let out = unsafe { dxo.block(first * v, rows * v) };
        for (i, o) in out.chunks_exact_mut(v).enumerate() {
            let row = first + i;
            o.copy_from_slice(&xs[row * v..(row + 1) * v]);
            exp_shifted_sum_serial(o, ls[row]);
            let g = gs[row];
            o.iter_mut().for_each(|p| *p *= g);
            o[targets[row]] -= g;
        }
    });
    // SAFETY: the blocks cover every row.
    unsafe { written_tensor(dx, alloc::vec![n, v]) }
}

/// The f32 constants of one AdamW step, rounded as Burn's `AdamW` rounds them.
#[derive(Clone, Copy, Debug)]
pub struct AdamwStep {
    /// Factor applied to the gradient first (global-norm clipping), if any.
    pub grad_scale: Option<f32>,
    /// β₁ and `1 − β₁`.
    pub beta_1: f32,
    pub one_minus_beta_1: f32,
    /// β₂ and `1 − β₂`.
    pub beta_2: f32,
    pub one_minus_beta_2: f32,
    /// Bias corrections `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    pub bias_1: f32,
    pub bias_2: f32,
    pub epsilon: f32,
    /// `1 − lr·weight_decay`, or `None` without decay.
    pub keep: Option<f32>,
    pub lr: f32,
}

/// [`adamw_step`] over one block. `FRESH`: the first step, where Burn sets `m = g·(1 − β₁)`
/// and `v = g²·(1 − β₂)` rather than decaying moments. A factor or decay that is absent
/// multiplies by one, which leaves every value's bits as they are.
#[inline(always)]
fn adamw_block<const FRESH: bool>(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    s: &AdamwStep,
) {
    let scale = s.grad_scale.unwrap_or(1.0);
    let keep = s.keep.unwrap_or(1.0);
    let n = g.len();
    let (p, m, v) = (&mut p[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let g = g[i] * scale;
        let (mi, vi) = if FRESH {
            (g * s.one_minus_beta_1, g * g * s.one_minus_beta_2)
        } else {
            (
                m[i] * s.beta_1 + g * s.one_minus_beta_1,
                v[i] * s.beta_2 + g * g * s.one_minus_beta_2,
            )
        };
        m[i] = mi;
        v[i] = vi;
        let delta = (mi / s.bias_1) / ((vi / s.bias_2).sqrt() + s.epsilon);
        p[i] = p[i] * keep - delta * s.lr;
    }
}

/// A contiguous tensor that owns its buffer, for writing in place (a copy when shared).
fn owned(mut t: FlexTensor) -> FlexTensor {
    if !(t.is_unique() && t.layout().contiguous_offsets() == Some((0, t.layout().num_elements())))
    {
        t = t.to_contiguous();
    }
    t
}

/// One AdamW step over f32 `param` and `grad`, with the moments `(m, v)` of the previous steps
/// (none on the first): the same f32 operations in the same order as Burn's `AdamW`, so the
/// same bits, in one pass that updates the buffers in place where they are not shared.
/// Returns the new `(param, m, v)`.
pub fn adamw_step(
    param: FlexTensor,
    grad: &FlexTensor,
    moments: Option<(FlexTensor, FlexTensor)>,
    s: AdamwStep,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = shape_of(&param);
    assert_eq!(shape_of(grad), shape, "adamw: gradient shape");
    assert_eq!(param.dtype(), DType::F32, "adamw: f32 parameters");
    let g = values(grad);
    let gs = g.storage::<f32>();
    let len = gs.len();
    let fresh = moments.is_none();
    let (mut m, mut v) = match moments {
        Some((m, v)) => {
            assert_eq!(shape_of(&m), shape, "adamw: first moment shape");
            assert_eq!(shape_of(&v), shape, "adamw: second moment shape");
            (owned(values(&m)), owned(values(&v)))
        }
        None => {
            let zeros = || {
                FlexTensor::new(
                    Bytes::from_elems(alloc::vec![0.0f32; len]),
                    Layout::contiguous(Shape::from(shape.clone())),
                    DType::F32,
                )
            };
            (zeros(), zeros())
        }
    };
    let mut p = owned(param);
    let (po, mo, vo) = (
        Out(p.storage_mut::<f32>().as_mut_ptr()),
        Out(m.storage_mut::<f32>().as_mut_ptr()),
        Out(v.storage_mut::<f32>().as_mut_ptr()),
    );
    for_each_range(len, |start, end| {
        // SAFETY: each block updates its own range of the three buffers, all `len` long.
        let (pb, mb, vb) = unsafe {
            (
                po.block(start, end - start),
                mo.block(start, end - start),
                vo.block(start, end - start),
            )
        };
        let gb = &gs[start..end];
        widest(|| {
            if fresh {
                adamw_block::<true>(pb, mb, vb, gb, &s);
            } else {
                adamw_block::<false>(pb, mb, vb, gb, &s);
            }
        });
    });
    (p, m, v)
}

/// `Σ x²` over every element of `x` (f32, any layout), as a `[1]` f32 tensor: the gradient
/// norm's pass. One read of `x`, no squared copy; f64 partial sums over fixed blocks of
/// [`ELEMS_PER_BLOCK`] elements, in parallel, added in block order, so the result does not
/// depend on the thread count (Burn's `square().sum()` writes the squares out and then sums
/// them on one thread below 4M elements).
pub fn sum_of_squares(x: &FlexTensor) -> FlexTensor {
    assert_eq!(x.dtype(), DType::F32, "sum_of_squares: f32 only");
    let x = values(x);
    let xs = x.storage::<f32>();
    let block = |i: usize| -> f64 {
        let b = &xs[i * ELEMS_PER_BLOCK..((i + 1) * ELEMS_PER_BLOCK).min(xs.len())];
        widest(|| {
            // Eight independent lanes, so the loop vectorises without reordering a sum.
            let mut acc = [0.0f64; 8];
            let mut chunks = b.chunks_exact(8);
            for c in &mut chunks {
                for j in 0..8 {
                    let v = f64::from(c[j]);
                    acc[j] += v * v;
                }
            }
            let tail: f64 = chunks
                .remainder()
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum();
            acc.iter().sum::<f64>() + tail
        })
    };
    let blocks = xs.len().div_ceil(ELEMS_PER_BLOCK);
    #[cfg(feature = "rayon")]
    let parts: Vec<f64> = {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().map(block).collect()
    };
    #[cfg(not(feature = "rayon"))]
    let parts: Vec<f64> = (0..blocks).map(block).collect();
    let total = parts.iter().sum::<f64>() as f32;
    FlexTensor::new(
        Bytes::from_elems(alloc::vec![total]),
        Layout::contiguous(Shape::from(alloc::vec![1])),
        DType::F32,
    )
}
