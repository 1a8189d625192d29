//! How a Burn tensor's strides map onto a cuBLASLt matrix layout. Pure arithmetic, kept apart
//! from the CUDA code so that CPU tests check it (the stride cases are where a product would
//! silently go wrong).
//!
//! Burn is row-major and cuBLAS column-major: a row-major `x` read column-major is `xᵀ`, and a
//! transposed view (unit stride on the row axis) is `x` itself, which cuBLAS then transposes.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// A matrix operand as cuBLASLt sees it (column-major, before `op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Layout {
    /// cuBLAS transposes it (`op = T`): a transposed view.
    pub trans: bool,
    /// Rows, columns and leading dimension of the stored matrix.
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
    /// Strided batch: count and element stride.
    pub batch: i32,
    pub stride: i64,
}

/// A Burn matrix `x [.., r, c]` (its shape and strides, in elements) as the column-major operand
/// `xᵀ` (`c × r`): `None` when its strides fit neither a row-major matrix nor a transposed view,
/// or its leading dimensions have no single stride (the caller then makes it contiguous).
pub(crate) fn matrix_layout(shape: &[usize], strides: &[usize], batch: usize) -> Option<Layout> {
    let rank = shape.len();
    let (r, c) = (shape[rank - 2], shape[rank - 1]);
    let (sr, sc) = (strides[rank - 2], strides[rank - 1]);
    let (trans, rows, cols, ld) = if (sc == 1 || c == 1) && (sr >= c || r == 1) {
        // Row-major `x` is column-major `xᵀ` with leading dimension `sr`.
        (false, c, r, if r == 1 { c.max(1) } else { sr })
    } else if (sr == 1 || r == 1) && (sc >= r || c == 1) {
        // A transposed view is column-major `x`: cuBLAS transposes it.
        (true, r, c, if c == 1 { r.max(1) } else { sc })
    } else {
        return None;
    };
    // Leading dimensions collapse to one stride when each (of size > 1) steps over the ones
    // inside it exactly.
    let mut stride = None::<usize>;
    let mut span = 1usize;
    for i in (0..rank - 2).rev() {
        if shape[i] == 1 {
            continue;
        }
        match stride {
            None => stride = Some(strides[i]),
            Some(s) if strides[i] != s * span => return None,
            Some(_) => {}
        }
        span *= shape[i];
    }
    let stride = stride.unwrap_or(0);
    if batch > 1 && stride == 0 {
        return None;
    }
    Some(Layout {
        trans,
        rows: rows as u64,
        cols: cols as u64,
        ld: ld as i64,
        batch: batch as i32,
        stride: stride as i64,
    })
}

/// The pointer's alignment in bytes (up to the 256 cuBLASLt assumes unless told otherwise).
pub(crate) fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contiguous(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; shape.len()];
        for i in (0..shape.len() - 1).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        strides
    }

    #[test]
    fn a_row_major_matrix_is_its_own_transpose_read_column_major() {
        let l = matrix_layout(&[4, 6], &[6, 1], 1).unwrap();
        assert_eq!((l.trans, l.rows, l.cols, l.ld), (false, 6, 4, 6));
        // A narrowed column range keeps the parent's row stride as leading dimension.
        let l = matrix_layout(&[4, 3], &[6, 1], 1).unwrap();
        assert_eq!((l.trans, l.rows, l.cols, l.ld), (false, 3, 4, 6));
    }

    #[test]
    fn a_transposed_view_is_transposed_by_cublas() {
        // `[6, 4]` swapped to `[4, 6]`: strides [1, 4].
        let l = matrix_layout(&[4, 6], &[1, 4], 1).unwrap();
        assert_eq!((l.trans, l.rows, l.cols, l.ld), (true, 4, 6, 4));
    }

    #[test]
    fn vectors_take_either_form() {
        let l = matrix_layout(&[1, 5], &[5, 1], 1).unwrap();
        assert_eq!((l.trans, l.rows, l.cols, l.ld), (false, 5, 1, 5));
        let l = matrix_layout(&[5, 1], &[1, 1], 1).unwrap();
        assert_eq!((l.rows, l.cols), (1, 5));
        assert!(l.ld >= l.rows as i64);
    }

    #[test]
    fn contiguous_leading_dimensions_become_one_strided_batch() {
        let shape = [2, 3, 4, 5];
        let l = matrix_layout(&shape, &contiguous(&shape), 6).unwrap();
        assert_eq!((l.batch, l.stride), (6, 20));
        // Keys transposed for `q·kᵀ`: `[2, 3, 5, 4]` viewed from `[2, 3, 4, 5]`.
        let l = matrix_layout(&[2, 3, 5, 4], &[60, 20, 1, 5], 6).unwrap();
        assert_eq!((l.trans, l.batch, l.stride, l.ld), (true, 6, 20, 5));
        // Size-1 leading dimensions do not matter.
        let l = matrix_layout(&[1, 3, 4, 5], &[999, 20, 5, 1], 3).unwrap();
        assert_eq!(l.stride, 20);
    }

    #[test]
    fn strides_without_a_matrix_or_batch_form_are_refused() {
        // Heads swapped in front of the sequence (`[b, s, h, d]` -> `[b, h, s, d]`): the batch
        // dimensions (b, h) have no single stride.
        assert!(matrix_layout(&[2, 3, 4, 5], &[60, 5, 15, 1], 6).is_none());
        // A broadcast (expanded) batch has stride 0.
        assert!(matrix_layout(&[3, 4, 5], &[0, 5, 1], 3).is_none());
        // Neither rows nor columns have unit stride.
        assert!(matrix_layout(&[4, 6], &[12, 2], 1).is_none());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0), 256);
    }
}
