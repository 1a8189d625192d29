//! The patched burn-flex CPU paths (vendor/README.md) against element-by-element references:
//! strided N-d copies, broadcast products over trailing blocks, the vectorised exp, and
//! attention skipping the key tail a boolean mask hides.

use burn::prelude::*;
use distill_student::CpuBackend;

type B = CpuBackend;

fn ramp(shape: [usize; 4]) -> (Tensor<B, 4>, Vec<f32>) {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 37) % 101) as f32 * 0.25 - 12.0)
        .collect();
    (
        Tensor::from_data(TensorData::new(v.clone(), shape), &Default::default()),
        v,
    )
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn head_split_and_gqa_expand_copy_every_element_to_its_place() {
    let [b, s, h, d] = [2, 5, 3, 4];
    let (x, v) = ramp([b, s, h, d]);
    // [b, s, h, d] viewed as [b, h, s, d], then made contiguous by the reshape.
    let got = values(x.clone().swap_dims(1, 2).reshape([b * h * s * d]));
    let mut want = Vec::new();
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                for di in 0..d {
                    want.push(v[((bi * s + si) * h + hi) * d + di]);
                }
            }
        }
    }
    assert_eq!(got, want);
    // Transposing the last two dims of a 4-d view: a tiled, not row-contiguous, copy.
    let got = values(x.clone().swap_dims(2, 3).reshape([b * s * d * h]));
    let mut want = Vec::new();
    for bi in 0..b {
        for si in 0..s {
            for di in 0..d {
                for hi in 0..h {
                    want.push(v[((bi * s + si) * h + hi) * d + di]);
                }
            }
        }
    }
    assert_eq!(got, want);
    // GQA: each of 3 KV heads repeated twice, `repeat_interleave` order.
    let kv = x.swap_dims(1, 2); // [b, h, s, d]
    let got = values(
        kv.unsqueeze_dim::<5>(2)
            .expand([b, h, 2, s, d])
            .reshape([b * h * 2 * s * d]),
    );
    let mut want = Vec::new();
    for bi in 0..b {
        for hi in 0..h {
            for _ in 0..2 {
                for si in 0..s {
                    for di in 0..d {
                        want.push(v[((bi * s + si) * h + hi) * d + di]);
                    }
                }
            }
        }
    }
    assert_eq!(got, want);
}

#[test]
fn products_with_a_table_broadcast_over_leading_dims_match_elementwise() {
    let [b, h, s, d] = [2, 3, 5, 4];
    let (x, v) = ramp([b, s, h, d]);
    let x = x.swap_dims(1, 2); // permuted left operand, as RoPE sees it
    let table: Vec<f32> = (0..s * d).map(|i| 0.5 + i as f32 * 0.01).collect();
    let t = Tensor::<B, 4>::from_data(
        TensorData::new(table.clone(), [1, 1, s, d]),
        &Default::default(),
    );
    for (op, f) in [
        ("mul", (|a, b| a * b) as fn(f32, f32) -> f32),
        ("add", |a, b| a + b),
        ("sub", |a, b| a - b),
        ("div", |a, b| a / b),
    ] {
        let y = match op {
            "mul" => x.clone() * t.clone(),
            "add" => x.clone() + t.clone(),
            "sub" => x.clone() - t.clone(),
            _ => x.clone() / t.clone(),
        };
        let got = values(y.reshape([b * h * s * d]));
        let mut i = 0;
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    for di in 0..d {
                        let want = f(v[((bi * s + si) * h + hi) * d + di], table[si * d + di]);
                        assert_eq!(got[i], want, "{op} at {bi},{hi},{si},{di}");
                        i += 1;
                    }
                }
            }
        }
    }
    // A table shared over the middle dim only is not a trailing block: still correct.
    let t2 = Tensor::<B, 4>::from_data(
        TensorData::new(table[..b * d].to_vec(), [b, 1, 1, d]),
        &Default::default(),
    );
    let got = values((x * t2).reshape([b * h * s * d]));
    let mut i = 0;
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                for di in 0..d {
                    assert_eq!(
                        got[i],
                        v[((bi * s + si) * h + hi) * d + di] * table[bi * d + di]
                    );
                    i += 1;
                }
            }
        }
    }
}

/// Right operands whose rows are contiguous but whose outer dims are broadcast or permuted
/// (decoding's per-sequence RoPE rows `[n, 1, 1, d]` against `[n, heads, 1, d]`; a transposed
/// operand; a narrowed one) take Flex's strided-rows walk and give the element-wise result.
#[test]
fn products_with_strided_right_rows_match_elementwise() {
    let [n, h, d] = [3, 5, 16];
    let (x, xv) = ramp([n, h, 1, d]);
    let (table, tv) = ramp([n, 1, 1, d]);
    let got = values((x.clone() * table.clone()).reshape([n * h * d]));
    let want: Vec<f32> = (0..n * h * d)
        .map(|i| xv[i] * tv[(i / (h * d)) * d + i % d])
        .collect();
    assert_eq!(got, want, "per-row table over heads");
    // Permuted and offset right operands, same shape as the left.
    let (y, yv) = ramp([h, n + 1, 1, d]);
    let y = y.narrow(1, 1, n).swap_dims(0, 1); // [n, h, 1, d], rows contiguous
    for (op, f) in [
        ("add", (|a, b| a + b) as fn(f32, f32) -> f32),
        ("sub", |a, b| a - b),
        ("mul", |a, b| a * b),
        ("div", |a, b| a / b),
    ] {
        let out = match op {
            "add" => x.clone() + y.clone(),
            "sub" => x.clone() - y.clone(),
            "mul" => x.clone() * y.clone(),
            _ => x.clone() / y.clone(),
        };
        let got = values(out.reshape([n * h * d]));
        for ni in 0..n {
            for hi in 0..h {
                for di in 0..d {
                    let i = (ni * h + hi) * d + di;
                    let r = yv[(hi * (n + 1) + ni + 1) * d + di];
                    assert_eq!(got[i], f(xv[i], r), "{op} at {ni},{hi},{di}");
                }
            }
        }
    }
}

#[test]
fn exp_and_sigmoid_stay_within_a_few_ulps_of_f64() {
    let xs: Vec<f32> = (0..20_000).map(|i| -110.0 + i as f32 * 0.01).collect();
    let n = xs.len();
    let t = Tensor::<B, 1>::from_data(TensorData::new(xs.clone(), [n]), &Default::default());
    // Contiguous-unique (in place), shared (copy, then the slice kernel) and strided inputs.
    let shared = t.clone();
    let exp_shared = values(shared.clone().exp());
    let exp_unique = values(t.clone().exp());
    let strided = values(
        t.clone()
            .reshape([n / 2, 2])
            .swap_dims(0, 1)
            .exp()
            .swap_dims(0, 1)
            .reshape([n]),
    );
    let sig = values(burn::tensor::activation::sigmoid(t));
    for (i, &x) in xs.iter().enumerate() {
        let want = (x as f64).exp();
        for got in [exp_shared[i], exp_unique[i], strided[i]] {
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "exp({x}) overflows f32");
            } else if want < f32::MIN_POSITIVE as f64 {
                assert!(
                    (got as f64 - want).abs() < 1e-44,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                let rel = (got as f64 - want).abs() / want;
                assert!(rel < 4e-7, "exp({x}) = {got}, want {want} (rel {rel:e})");
            }
        }
        let s = 1.0 / (1.0 + (-(x as f64)).exp());
        assert!(
            (sig[i] as f64 - s).abs() <= 4e-7 * s.max(1e-30),
            "sigmoid({x})"
        );
    }
    assert_eq!(
        values(Tensor::<B, 1>::from_floats([f32::NEG_INFINITY, 100.0], &Default::default()).exp()),
        vec![0.0, f32::INFINITY]
    );
}

/// Decoding many sequences at once gives attention each slot's whole KV cache with a boolean
/// mask hiding its unwritten tail. Flex skips that tail: NaN there stays out of the output,
/// and each sequence's result is bit for bit the attention over its visible keys alone.
#[test]
fn attention_skips_the_key_tail_a_boolean_mask_hides() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (batch, heads, seq_q, seq_kv, dim) = (2, 2, 3, 9, 4);
    // Row `i` of sequence `b` sees keys `j < visible[b] + i`.
    let visible = [3usize, 6];
    let dev = Default::default();
    let (q, _) = ramp([batch, heads, seq_q, dim]);
    let (_, mut k) = ramp([batch, heads, seq_kv, dim]);
    let mut v: Vec<f32> = k.iter().map(|x| 0.5 - x * 0.125).collect();
    let mut mask = vec![false; batch * seq_q * seq_kv];
    for b in 0..batch {
        let kept = visible[b] + seq_q - 1;
        for bh in b * heads..(b + 1) * heads {
            for x in [&mut k, &mut v] {
                x[(bh * seq_kv + kept) * dim..(bh + 1) * seq_kv * dim].fill(f32::NAN);
            }
        }
        for i in 0..seq_q {
            mask[(b * seq_q + i) * seq_kv + visible[b] + i..(b * seq_q + i + 1) * seq_kv]
                .fill(true);
        }
    }
    let kv = |x: &[f32], rows: usize, n: usize| {
        Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [n, heads, rows, dim]), &dev)
    };
    let hide = |m: Vec<bool>, n: usize, cols: usize| {
        Some(Tensor::<B, 4, Bool>::from_data(
            TensorData::new(m, [n, 1, seq_q, cols]),
            &dev,
        ))
    };
    let opts = AttentionModuleOptions::default();
    let all = values(attention(
        q.clone(),
        kv(&k, seq_kv, batch),
        kv(&v, seq_kv, batch),
        hide(mask.clone(), batch, seq_kv),
        None,
        opts,
    ));
    assert!(
        all.iter().all(|x| x.is_finite()),
        "the hidden tail was read"
    );
    let per_seq = heads * seq_q * dim;
    for b in 0..batch {
        let kept = visible[b] + seq_q - 1;
        let take = |x: &[f32]| -> Vec<f32> {
            (b * heads..(b + 1) * heads)
                .flat_map(|bh| x[bh * seq_kv * dim..(bh * seq_kv + kept) * dim].to_vec())
                .collect()
        };
        let m = (0..seq_q)
            .flat_map(|i| mask[(b * seq_q + i) * seq_kv..][..kept].to_vec())
            .collect();
        let one = values(attention(
            q.clone().narrow(0, b, 1),
            kv(&take(&k), kept, 1),
            kv(&take(&v), kept, 1),
            hide(m, 1, kept),
            None,
            opts,
        ));
        assert_eq!(
            &all[b * per_seq..(b + 1) * per_seq],
            &one[..],
            "sequence {b}"
        );
    }
}
