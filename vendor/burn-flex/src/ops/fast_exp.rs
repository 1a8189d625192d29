//! distill patch: an `exp` for f32 that compilers vectorise, with AVX2 and AVX-512 versions
//! chosen at run time.
//!
//! `f32::exp` is a call into libm per element, which LLVM cannot vectorise: softmax, SiLU's
//! sigmoid and the loss's log-softmax spent more time there than in any kernel but the matrix
//! products. This is Cephes' `expf` (Cody–Waite reduction by ln 2, a degree-5 polynomial,
//! peak relative error ~2e-7), written branch-free with plain `*` and `+` (Rust never fuses
//! them into FMA), so every vector width gives the same bits as the scalar loop.

/// Largest input with a finite result.
const HI: f32 = 88.722_83;
/// Below this the result rounds to zero (`exp(-103.97) ≈ 2^-150`).
const LO: f32 = -103.972_08;

/// `e^x` for one f32: NaN for NaN, `+inf` above [`HI`], `0` below [`LO`], denormals kept.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, which its low mantissa bits then hold.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x > HI {
        HI
    } else if x < LO {
        LO
    } else {
        x
    };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // 2^n as two factors so that n in [-150, 128] never leaves the normal exponent range.
    let half = n_int >> 1;
    let scale1 = f32::from_bits(((half + 127) << 23) as u32);
    let scale2 = f32::from_bits(((n_int - half + 127) << 23) as u32);
    let out = y * scale1 * scale2;
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        out
    }
}

/// The logistic function through [`exp_f32`]: `1 / (1 + e^-x)`, exact at both tails.
#[inline(always)]
pub(crate) fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Applies `f` to every element, in the widest vector unit the CPU has, on every core for
/// large slices.
#[inline(always)]
fn map_inplace(xs: &mut [f32], f: impl Fn(f32) -> f32 + Copy + Send + Sync) {
    #[cfg(feature = "rayon")]
    if xs.len() >= super::PARALLEL_ELEMENTWISE {
        use rayon::prelude::*;
        xs.par_chunks_mut(16 * 1024)
            .for_each(|chunk| map_inplace_serial(chunk, f));
        return;
    }
    map_inplace_serial(xs, f);
}

#[inline(always)]
fn map_inplace_serial(xs: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(xs: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
            for x in xs {
                *x = f(*x);
            }
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(xs: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
            for x in xs {
                *x = f(*x);
            }
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(xs, f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(xs, f) };
        }
    }
    for x in xs {
        *x = f(*x);
    }
}

/// `xs[i] = e^xs[i]`.
pub(crate) fn exp_inplace(xs: &mut [f32]) {
    map_inplace(xs, exp_f32);
}

/// `xs[i] = e^(xs[i] - shift)`, returning the sum of the results (in index order): softmax's
/// numerator and denominator in one pass.
pub(crate) fn exp_shifted_sum_inplace(xs: &mut [f32], shift: f32) -> f32 {
    map_inplace(xs, move |x| exp_f32(x - shift));
    xs.iter().sum()
}

/// [`exp_shifted_sum_inplace`] on this thread only, for callers that already run on every core.
pub(crate) fn exp_shifted_sum_serial(xs: &mut [f32], shift: f32) -> f32 {
    map_inplace_serial(xs, move |x| exp_f32(x - shift));
    xs.iter().sum()
}

/// `xs[i] = sigmoid(xs[i])`.
pub(crate) fn sigmoid_inplace(xs: &mut [f32]) {
    map_inplace(xs, sigmoid_f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm_within_a_few_ulps() {
        let mut worst = 0;
        let mut x = -103.0f32;
        while x < 88.7 {
            let (got, want) = (exp_f32(x), (x as f64).exp() as f32);
            if want.is_normal() {
                worst = worst.max(ulps(got, want));
            } else {
                assert!((got - want).abs() <= f32::MIN_POSITIVE * 1e-6, "{x}: {got} vs {want}");
            }
            x += 0.0137;
        }
        assert!(worst <= 3, "worst error {worst} ulps");
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(88.7).is_finite());
    }

    #[test]
    fn vector_and_scalar_paths_agree_bit_for_bit() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.173).collect();
        let mut v = xs.clone();
        exp_inplace(&mut v);
        for (x, y) in xs.iter().zip(&v) {
            assert_eq!(exp_f32(*x).to_bits(), y.to_bits());
        }
        let mut s = xs.clone();
        sigmoid_inplace(&mut s);
        for (x, y) in xs.iter().zip(&s) {
            assert_eq!(sigmoid_f32(*x).to_bits(), y.to_bits());
            assert!((y - 1.0 / (1.0 + (-(*x as f64)).exp()) as f32).abs() < 1e-6);
        }
    }
}
