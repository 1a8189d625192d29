//! The patched burn-flex CPU paths (vendor/README.md) against element-by-element references:
//! strided N-d copies, broadcast products over trailing blocks, and the vectorised exp.

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
