//! Single-precision matrix products of the engine, on strided views of `f32` buffers, through
//! the `gemm` crate (run-time dispatched AVX-512 / AVX2 / NEON micro-kernels; candle's own CPU
//! backend uses the same crate). Products write into (or accumulate onto) their destination, so
//! the engine never allocates an output per call.

use gemm::Parallelism;

/// A read-only strided matrix view: element `(i, j)` is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct View {
    ptr: *const f32,
    pub rows: usize,
    pub cols: usize,
    rs: isize,
    cs: isize,
}

// SAFETY: a `View` is only read, and the engine keeps what it points into alive and unmodified
// for as long as the view is used (the model is borrowed for the whole step).
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// Row-major `[rows, cols]` with leading dimension `ld` starting at `data[off]`.
    ///
    /// Panics if the view reaches past the end of `data`.
    pub fn rm(data: &[f32], off: usize, rows: usize, cols: usize, ld: usize) -> View {
        if rows > 0 && cols > 0 {
            assert!(off + (rows - 1) * ld + cols <= data.len(), "gemm view out of bounds");
        }
        View { ptr: data[off..].as_ptr(), rows, cols, rs: ld as isize, cs: 1 }
    }

    /// Contiguous row-major `[rows, cols]`.
    pub fn of(data: &[f32], rows: usize, cols: usize) -> View {
        View::rm(data, 0, rows, cols, cols)
    }

    /// The transpose (no copy).
    pub fn t(self) -> View {
        View { ptr: self.ptr, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    /// Rows `r0 .. r0 + n` of the view.
    pub fn rows(self, r0: usize, n: usize) -> View {
        assert!(r0 + n <= self.rows);
        // SAFETY: stays inside the viewed region (checked above).
        View { ptr: unsafe { self.ptr.offset(r0 as isize * self.rs) }, rows: n, ..self }
    }

    /// Columns `c0 .. c0 + n` of the view.
    pub fn cols(self, c0: usize, n: usize) -> View {
        assert!(c0 + n <= self.cols);
        // SAFETY: stays inside the viewed region (checked above).
        View { ptr: unsafe { self.ptr.offset(c0 as isize * self.cs) }, cols: n, ..self }
    }
}

/// A writable row-major destination `[rows, cols]` with leading dimension `ld`.
pub struct Dst {
    ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    ld: usize,
}

// SAFETY: a `Dst` is created from a unique borrow (or disjoint parts of one) and written by one
// product at a time.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// Row-major `[rows, cols]` with leading dimension `ld` starting at `data[off]`.
    pub fn rm(data: &mut [f32], off: usize, rows: usize, cols: usize, ld: usize) -> Dst {
        if rows > 0 && cols > 0 {
            assert!(off + (rows - 1) * ld + cols <= data.len(), "gemm destination out of bounds");
        }
        Dst { ptr: data[off..].as_mut_ptr(), rows, cols, ld }
    }

    /// Contiguous row-major `[rows, cols]`.
    pub fn of(data: &mut [f32], rows: usize, cols: usize) -> Dst {
        Dst::rm(data, 0, rows, cols, cols)
    }

    /// A raw destination; the caller guarantees that the region is valid and not aliased.
    ///
    /// # Safety
    /// `ptr .. ptr + (rows-1)·ld + cols` must be valid for writes for the product's duration.
    pub unsafe fn raw(ptr: *mut f32, rows: usize, cols: usize, ld: usize) -> Dst {
        Dst { ptr, rows, cols, ld }
    }

    /// Rows `r0 .. r0 + n`.
    pub fn rows(&mut self, r0: usize, n: usize) -> Dst {
        assert!(r0 + n <= self.rows);
        // SAFETY: inside the destination region.
        Dst { ptr: unsafe { self.ptr.add(r0 * self.ld) }, rows: n, cols: self.cols, ld: self.ld }
    }

    /// Columns `c0 .. c0 + n`.
    pub fn cols(&mut self, c0: usize, n: usize) -> Dst {
        assert!(c0 + n <= self.cols);
        // SAFETY: inside the destination region.
        Dst { ptr: unsafe { self.ptr.add(c0) }, rows: self.rows, cols: n, ld: self.ld }
    }
}

/// Products smaller than this many multiply-adds run on one thread (threading costs more).
const PAR_MIN_WORK: usize = 1 << 20;

/// Products whose right operand has at least this many elements are threaded whatever the
/// row count: a matrix-vector product is bound by reading the weight, which both cores speed up.
const PAR_MIN_WEIGHT: usize = 1 << 16;

/// `dst = (acc ? dst : 0) + alpha · a · b`, with `a` `[m, k]`, `b` `[k, n]`, `dst` `[m, n]`.
/// `threads > 1` lets a large product use the current rayon pool.
///
/// Panics if the shapes do not agree.
pub fn gemm(dst: &mut Dst, a: View, b: View, alpha: f32, acc: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.rows == m && dst.cols == n, "gemm shape mismatch: [{m}x{k}]·[{}x{n}] -> [{}x{}]", b.rows, dst.rows, dst.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                // SAFETY: row i of the destination region.
                unsafe { std::slice::from_raw_parts_mut(dst.ptr.add(i * dst.ld), n) }.fill(0.0);
            }
        }
        return;
    }
    // Few rows (decoding) are memory-bound: split them too once the weight is large enough.
    // A skinny product (a LoRA rank-r side, m, n or k below 64) is faster on one thread: the
    // `gemm` crate's split costs more than it gains there (benches/README.md: rank-8 shapes
    // run at 24-58 GFLOP/s on two threads against 43-156 on one).
    // Likewise a narrow output (k/v projections, n = 192: 214 GFLOP/s on one thread, 141 on two).
    let skinny = m.min(n).min(k) < 64 || (n < 256 && m >= 64);
    let big = !skinny && (m * n * k >= PAR_MIN_WORK || n * k >= PAR_MIN_WEIGHT) || (m < 64 && n * k >= PAR_MIN_WEIGHT && n.min(k) >= 64);
    let par = if threads > 1 && big { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the views and the destination were bounds-checked when built; the destination does
    // not alias the operands (the engine's buffers are distinct allocations or disjoint regions).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.ld as isize,
            acc,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0f32,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn strided_products_match_naive() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 17) as f32 - 8.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![1f32; m * n];
        gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::of(&b, k, n), 1.0, false, 2);
        assert_eq!(c, want);
        // accumulate with alpha, transposed operand
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [n, k]
        gemm(&mut Dst::of(&mut c, m, n), View::of(&a, m, k), View::of(&bt, n, k).t(), 0.5, true, 1);
        for (x, w) in c.iter().zip(&want) {
            assert_eq!(*x, 1.5 * w);
        }
        // a column block of a wider destination
        let mut wide = vec![0f32; m * (n + 5)];
        gemm(&mut Dst::rm(&mut wide, 0, m, n + 5, n + 5).cols(5, n), View::of(&a, m, k), View::of(&b, k, n), 1.0, false, 1);
        assert_eq!(wide[5..5 + n], want[..n]);
    }
}
