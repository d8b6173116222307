//! A plain row-major `f32` matrix, the currency between the feature cache, the graph, the GPU runtime and the
//! GUI.
//!
//! This type exists so that the parts that only move, draw or upload matrices do not need a candle device, and
//! so that the WGSL kernels have a dependency-free reference. The CPU training backend works on plain slices
//! with [`gemm()`] and the vectorisable [`fast_exp`] / [`fast_tanh`] defined here; candle tensors serve the
//! autodiff reference.

use rayon::prelude::*;

pub mod packed;

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Panics only on a programming error (length mismatch); callers build `data` from `rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Mat::from_vec: {rows}x{cols} != {}",
            data.len()
        );
        Self { rows, cols, data }
    }

    /// Stacks equal-length rows; `cols` is needed for the empty case.
    pub fn from_rows(rows: &[Vec<f32>], cols: usize) -> Self {
        let mut data = Vec::with_capacity(rows.len() * cols);
        for r in rows {
            assert_eq!(r.len(), cols, "Mat::from_rows: ragged rows");
            data.extend_from_slice(r);
        }
        Self {
            rows: rows.len(),
            cols,
            data,
        }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The first row holding a NaN or an infinity: what every loader reports before using a matrix.
    /// Walks the data, not the row count: a file may declare 2^40 rows of zero columns, which hold nothing.
    pub fn first_non_finite_row(&self) -> Option<usize> {
        if self.cols == 0 {
            return None;
        }
        self.data
            .chunks_exact(self.cols)
            .position(|r| !r.iter().all(|x| x.is_finite()))
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.cols + j]
    }

    pub fn set(&mut self, i: usize, j: usize, v: f32) {
        self.data[i * self.cols + j] = v;
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        t
    }

    /// `self · other`, parallel over output rows; the inner loop is an axpy over contiguous rows of `other`,
    /// which the compiler vectorises.
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul: inner dimensions differ");
        let n = other.cols;
        let mut out = Mat::zeros(self.rows, n);
        if n == 0 {
            return out;
        }
        out.data
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, orow)| {
                let arow = &self.data[i * self.cols..(i + 1) * self.cols];
                for (k, &a) in arow.iter().enumerate() {
                    if a == 0.0 {
                        continue;
                    }
                    let brow = &other.data[k * n..(k + 1) * n];
                    for (o, &b) in orow.iter_mut().zip(brow) {
                        *o += a * b;
                    }
                }
            });
        out
    }

    /// `self · otherᵀ`: dot products of rows, the shape of every similarity in this project.
    pub fn matmul_t(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.cols, "matmul_t: feature dimensions differ");
        let n = other.rows;
        let mut out = Mat::zeros(self.rows, n);
        if n == 0 {
            return out;
        }
        out.data
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, orow)| {
                let a = self.row(i);
                for (j, o) in orow.iter_mut().enumerate() {
                    *o = dot(a, other.row(j));
                }
            });
        out
    }

    /// Row-wise L2 normalisation; an all-zero row stays zero rather than becoming NaN.
    pub fn l2_normalize_rows(&mut self) {
        let cols = self.cols;
        if cols == 0 {
            return;
        }
        self.data.par_chunks_mut(cols).for_each(normalize);
    }

    pub fn normalized_rows(&self) -> Mat {
        let mut m = self.clone();
        m.l2_normalize_rows();
        m
    }

    pub fn select_rows(&self, idx: &[usize]) -> Mat {
        let mut data = Vec::with_capacity(idx.len() * self.cols);
        for &i in idx {
            data.extend_from_slice(self.row(i));
        }
        Mat::from_vec(idx.len(), self.cols, data)
    }

    pub fn max_abs_diff(&self, other: &Mat) -> f32 {
        assert_eq!(self.shape(), other.shape());
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }
}

/// The products with nothing to multiply, done here for [`gemm`] and [`gemm_wide`]: an empty output is left
/// alone, and with `k = 0` the product is zero, so `out` becomes `beta·out` (0 when `beta == 0`, without
/// reading it). Returns whether the product was one of these.
fn degenerate(out: &mut [f32], (m, n, k): (usize, usize, usize), beta: f32) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k != 0 {
        return false;
    }
    let o = &mut out[..m * n];
    if beta == 0.0 {
        o.fill(0.0);
    } else if beta != 1.0 {
        o.iter_mut().for_each(|x| *x *= beta);
    }
    true
}

/// Whether a [`gemm()`] operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tr {
    N,
    T,
}

/// `out = beta·out + alpha·op(a)·op(b)` for row-major `out` (`m×n`), `op(a)` `m×k`, `op(b)` `k×n`, where
/// `a` is stored `m×k` (`Tr::N`) or `k×m` (`Tr::T`) and likewise `b`. The transposes are strides, never
/// copies. Runs the `gemm` crate's kernels (the ones candle's CPU backend uses) on rayon's pool; the
/// hand-written CPU training step is a sequence of these on buffers it owns, with none of a tensor
/// library's per-operation allocation. With `beta == 0` the old contents of `out` are not read (NaN in them
/// does not leak through).
///
/// Panics when a slice is shorter than its shape says (a programming error: the caller sized the buffers).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    ta: Tr,
    b: &[f32],
    tb: Tr,
    alpha: f32,
    beta: f32,
) {
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "gemm: buffers shorter than {m}x{k} · {k}x{n}"
    );
    if degenerate(out, (m, n, k), beta) {
        return;
    }
    let (lhs_rs, lhs_cs) = match ta {
        Tr::N => (k as isize, 1),
        Tr::T => (1, m as isize),
    };
    let (rhs_rs, rhs_cs) = match tb {
        Tr::N => (n as isize, 1),
        Tr::T => (1, k as isize),
    };
    // SAFETY: the assertion above bounds every index `gemm` forms from these shapes and strides (row-major
    // `m×n` output, `m×k` and `k×n` operands read through the strides of their stored layouts), and `out`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            lhs_cs,
            lhs_rs,
            b.as_ptr(),
            rhs_cs,
            rhs_rs,
            beta,
            alpha,
            false,
            false,
            false,
            ::gemm::Parallelism::Rayon(0),
        );
    }
}

/// A matrix read in place from a larger buffer: element `(i, j)` is `data[i·rs + j·cs]`, so one head's columns
/// of a fused q/k/v buffer, or its transpose, are operands without a copy.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// Whether every element of a `rows × cols` view lies inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `out = a·b` on the calling thread, `out` `m×n` with rows `ldo` apart, `a` (`m×k`) and `b` (`k×n`) read
/// through their strides. For many small products (attention's per-head `Q Kᵀ` and `P V`) that the caller
/// runs in parallel itself: the `gemm` crate's AVX-512/AVX2 kernels instead of a dot product per pair.
///
/// Panics when a view does not fit its buffer (a programming error).
pub fn gemm_small(
    out: &mut [f32],
    ldo: usize,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
) {
    assert!(
        a.fits(m, k)
            && b.fits(k, n)
            && (m == 0 || n == 0 || (n <= ldo && (m - 1) * ldo + n <= out.len())),
        "gemm_small: views outside their buffers for {m}x{k} · {k}x{n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.chunks_mut(ldo).take(m).for_each(|r| r[..n].fill(0.0));
        return;
    }
    // SAFETY: the assertion bounds every index formed from the shapes and strides (the last element of each
    // view is inside its slice, rows of `out` do not overlap as `n ≤ ldo`), and `out` is borrowed mutably,
    // so it aliases neither operand.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ldo as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

/// A raw output pointer handed to the tasks of [`gemm_wide`] and [`packed::PackedMatrix::multiply`], each of
/// which writes its own block of the output.
#[derive(Clone, Copy)]
struct ColumnsOut(*mut f32);
// SAFETY: the tasks of `gemm_wide` and of `PackedMatrix::multiply` write disjoint blocks through it (see there).
unsafe impl Send for ColumnsOut {}
unsafe impl Sync for ColumnsOut {}

impl ColumnsOut {
    /// Through a method, so that closures capture the whole wrapper (which is `Sync`), not its raw field.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `out = a·b` (or `out += a·b` with `accumulate`) for a short row-major `a` (`m×k`) and a wide row-major
/// `b` (`k×n`), the output's columns cut into two blocks per thread, each one single-threaded product.
///
/// Why not [`gemm`]'s own threading: with a few dozen rows (CLIP at batch 1: 50 tokens) the `gemm` crate
/// splits the work unevenly; measured on the development machine (2 threads, AVX-512), the MLP's
/// `50×768·768×3072` and `50×3072·3072×768` ran at 263 and 273 GFLOP/s with it and 348 and 359 cut this
/// way, while 1,600-row products gain nothing (so [`gemm`] stays the general entry).
///
/// Panics when a slice is shorter than its shape says.
pub fn gemm_wide(
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    accumulate: bool,
) {
    use rayon::prelude::*;
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "gemm_wide: buffers shorter than {m}x{k} · {k}x{n}"
    );
    if degenerate(out, (m, n, k), if accumulate { 1.0 } else { 0.0 }) {
        return;
    }
    // Blocks a multiple of 16 columns wide (one AVX-512 register of the kernels).
    let parts = 2 * rayon::current_num_threads().max(1);
    let width = n.div_ceil(parts).div_ceil(16) * 16;
    let dst = ColumnsOut(out.as_mut_ptr());
    (0..n.div_ceil(width)).into_par_iter().for_each(|p| {
        let j0 = p * width;
        let w = width.min(n - j0);
        // SAFETY: the assertion above bounds `out` (`m×n`, row-major), `a` and `b`; this task reads and writes
        // only columns `j0..j0 + w` of `out` (`j0 + w ≤ n`, rows `n` apart), which no other task touches, and
        // `out` is borrowed mutably for the whole call, so it aliases neither operand.
        unsafe {
            ::gemm::gemm(
                m,
                w,
                k,
                dst.at(j0),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr().add(j0),
                1,
                n as isize,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
    });
}

/// `eˣ` for `x ≤ 88` (larger arguments give `e⁸⁸`; below −87.3 the result is `e^−87.3`, not 0), within 2e-7
/// relative of the true value; NaN stays NaN. Written as plain arithmetic (range reduction `x = n ln2 + r`, a
/// degree-7 polynomial for `eʳ`, `2ⁿ` from the exponent bits) so that loops over slices vectorise: libm's
/// `expf` is a call per element, and the CPU training step takes a few hundred thousand exponentials.
#[inline]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer (SSE2 has no vector round).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // `n` as an integer, read from the low mantissa bits of `shifted` (exactly `n` for |n| < 2²²) instead of
    // `n as i32`, whose saturating conversion does not vectorise (a scalar convert and compare per lane:
    // quick-GELU was 6 % of CLIP's image encoding with it). A NaN `x` gives a NaN `p`, so the result stays NaN.
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    p * scale
}

/// `tanh x` within 3e-7 relative (for |x| ≥ 1e-30); NaN stays NaN. Odd Taylor polynomial below 0.25, where
/// `(1 − e)/(1 + e)` would cancel, and `e = exp(−2|x|)` through [`fast_exp`] above; vectorises like it.
#[inline]
pub fn fast_tanh(x: f32) -> f32 {
    let ax = x.abs();
    let t = if ax < 0.25 {
        let x2 = ax * ax;
        ax * (1.0
            + x2 * (-1.0 / 3.0
                + x2 * (2.0 / 15.0
                    + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0 + x2 * (-1382.0 / 155_925.0))))))
    } else {
        let e = fast_exp(-2.0 * ax);
        (1.0 - e) / (1.0 + e)
    };
    t.copysign(x)
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators let the loop vectorise without `-ffast-math`-style reassociation.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// In-place L2 normalisation of one vector; zero vectors are left as they are.
pub fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 && n.is_finite() {
        let inv = 1.0 / n;
        v.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Mean of rows, then normalised: how CLIP prompt ensembles and augmented views are pooled.
pub fn mean_normalized(rows: &[&[f32]], dim: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; dim];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r.iter()) {
            *a += b;
        }
    }
    normalize(&mut m);
    m
}

/// Numerically stable softmax of one row.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Solves `A X = B` for a symmetric positive definite `A` (n×n, row-major) and `B` (n×k), by Cholesky
/// factorisation in f64 (`A = L Lᵀ`, then two triangular solves). Returns None when `A` is not positive
/// definite (a pivot ≤ 0 or not finite). `O(n³/3 + n²k)`: the 512×512 covariance of a CLIP model's features
/// takes a few milliseconds.
pub fn cholesky_solve(a: &Mat, b: &Mat) -> Option<Mat> {
    let n = a.rows;
    if a.cols != n || b.rows != n {
        return None;
    }
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            // Four accumulators let the dot product vectorise (a single sum must run in order).
            let mut acc = [0.0f64; 4];
            let (ci, cj) = (ri.chunks_exact(4), rj.chunks_exact(4));
            let (ti, tj) = (ci.remainder(), cj.remainder());
            for (x, y) in ci.zip(cj) {
                for q in 0..4 {
                    acc[q] += x[q] * y[q];
                }
            }
            let tail: f64 = ti.iter().zip(tj).map(|(x, y)| x * y).sum();
            let s = a.get(i, j) as f64 - (acc.iter().sum::<f64>() + tail);
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let k = b.cols;
    // Both triangular solves run over whole rows of X (all right-hand sides at once), contiguous in memory.
    let mut x: Vec<f64> = b.data.iter().map(|&v| v as f64).collect();
    for i in 0..n {
        let (done, rest) = x.split_at_mut(i * k);
        let xi = &mut rest[..k];
        for j in 0..i {
            let lij = l[i * n + j];
            for (o, &v) in xi.iter_mut().zip(&done[j * k..(j + 1) * k]) {
                *o -= lij * v;
            }
        }
        let inv = 1.0 / l[i * n + i];
        xi.iter_mut().for_each(|o| *o *= inv);
    }
    for i in (0..n).rev() {
        let (head, tail) = x.split_at_mut((i + 1) * k);
        let xi = &mut head[i * k..];
        for j in i + 1..n {
            let lji = l[j * n + i];
            for (o, &v) in xi.iter_mut().zip(&tail[(j - i - 1) * k..(j - i) * k]) {
                *o -= lji * v;
            }
        }
        let inv = 1.0 / l[i * n + i];
        xi.iter_mut().for_each(|o| *o *= inv);
    }
    Some(Mat::from_vec(
        n,
        k,
        x.into_iter().map(|v| v as f32).collect(),
    ))
}

/// Unit rows scattered around `centres` (row `labels[r]` plus `noise` times a standard normal draw per
/// coordinate, then normalised): the synthetic clusters the adapter's unit tests classify.
#[cfg(test)]
pub(crate) fn unit_rows_around(
    rng: &mut crate::rng::Rng,
    centres: &Mat,
    labels: &[usize],
    noise: f32,
) -> Mat {
    let d = centres.cols;
    let mut m = Mat::zeros(labels.len(), d);
    for (r, &l) in labels.iter().enumerate() {
        let row = m.row_mut(r);
        for (o, (&c, e)) in row
            .iter_mut()
            .zip(centres.row(l).iter().zip(rng.normal_vec(d)))
        {
            *o = c + noise * e;
        }
        normalize(row);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The product in `f64`, as the reference of every product here (and of [`packed`]'s).
    pub(super) fn naive(a: &Mat, b: &Mat) -> Mat {
        let mut o = Mat::zeros(a.rows, b.cols);
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0.0f64;
                for k in 0..a.cols {
                    s += a.get(i, k) as f64 * b.get(k, j) as f64;
                }
                o.set(i, j, s as f32);
            }
        }
        o
    }

    #[test]
    fn matmul_and_matmul_t_match_naive_on_awkward_shapes() {
        let mut rng = Rng::new(11);
        for &(m, k, n) in &[(1, 1, 1), (7, 7, 7), (17, 16, 16), (3, 0, 5), (33, 65, 9)] {
            let a = Mat::from_vec(m, k, rng.normal_vec(m * k));
            let b = Mat::from_vec(k, n, rng.normal_vec(k * n));
            let want = naive(&a, &b);
            assert!(a.matmul(&b).max_abs_diff(&want) < 1e-4);
            assert!(a.matmul_t(&b.transpose()).max_abs_diff(&want) < 1e-4);
        }
    }

    #[test]
    fn gemm_small_reads_strided_views_and_writes_only_its_rows() {
        let mut rng = Rng::new(13);
        for &(m, k, n) in &[(1, 1, 1), (7, 7, 7), (50, 64, 50), (13, 3, 29), (4, 0, 3)] {
            let a = Mat::from_vec(m, k, rng.normal_vec(m * k));
            let b = Mat::from_vec(k, n, rng.normal_vec(k * n));
            let want = naive(&a, &b);
            // `a` inside a wider buffer (rows 3k + 1 apart, an offset of 2); `b` as the transpose of a
            // stored `n × k` matrix whose rows are k + 5 apart.
            let (lda, ldbt) = (3 * k + 1, k + 5);
            let mut abuf = vec![f32::NAN; 2 + m * lda];
            for i in 0..m {
                abuf[2 + i * lda..][..k].copy_from_slice(a.row(i));
            }
            let mut bbuf = vec![f32::NAN; n * ldbt];
            for j in 0..n {
                for kk in 0..k {
                    bbuf[j * ldbt + kk] = b.get(kk, j);
                }
            }
            let ldo = n + 3;
            let mut out = vec![-7.0f32; m * ldo];
            gemm_small(
                &mut out,
                ldo,
                (m, n, k),
                Strided {
                    data: &abuf[2..],
                    rs: lda,
                    cs: 1,
                },
                Strided {
                    data: &bbuf,
                    rs: 1,
                    cs: ldbt,
                },
            );
            for i in 0..m {
                for j in 0..ldo {
                    let got = out[i * ldo + j];
                    if j < n {
                        assert!(
                            (got - want.get(i, j)).abs() < 1e-4,
                            "{m}x{k}x{n} at ({i},{j})"
                        );
                    } else {
                        assert_eq!(got, -7.0, "wrote outside its columns");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_wide_matches_naive_when_setting_and_accumulating() {
        let mut rng = Rng::new(14);
        for &(m, k, n) in &[(1, 1, 1), (7, 7, 7), (50, 37, 100), (3, 0, 5), (2, 17, 513)] {
            let a = Mat::from_vec(m, k, rng.normal_vec(m * k));
            let b = Mat::from_vec(k, n, rng.normal_vec(k * n));
            let c0 = Mat::from_vec(m, n, rng.normal_vec(m * n));
            let prod = naive(&a, &b);
            let mut set = vec![f32::NAN; m * n];
            gemm_wide(&mut set, (m, n, k), &a.data, &b.data, false);
            assert!(
                Mat::from_vec(m, n, set).max_abs_diff(&prod) < 1e-4,
                "{m}x{k}x{n}"
            );
            let mut acc = c0.data.clone();
            gemm_wide(&mut acc, (m, n, k), &a.data, &b.data, true);
            let mut want = c0.clone();
            want.data
                .iter_mut()
                .zip(&prod.data)
                .for_each(|(w, p)| *w += p);
            assert!(
                Mat::from_vec(m, n, acc).max_abs_diff(&want) < 1e-4,
                "{m}x{k}x{n} +="
            );
        }
    }

    #[test]
    fn gemm_matches_naive_with_every_transpose_and_scale() {
        let mut rng = Rng::new(12);
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 7, 7),
            (17, 16, 16),
            (3, 0, 5),
            (134, 242, 250),
        ] {
            let a = Mat::from_vec(m, k, rng.normal_vec(m * k));
            let b = Mat::from_vec(k, n, rng.normal_vec(k * n));
            let c0 = Mat::from_vec(m, n, rng.normal_vec(m * n));
            let prod = naive(&a, &b);
            for (ta, tb) in [
                (Tr::N, Tr::N),
                (Tr::T, Tr::N),
                (Tr::N, Tr::T),
                (Tr::T, Tr::T),
            ] {
                let aa = if ta == Tr::T {
                    a.transpose()
                } else {
                    a.clone()
                };
                let bb = if tb == Tr::T {
                    b.transpose()
                } else {
                    b.clone()
                };
                for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 2.0)] {
                    let mut out = c0.clone();
                    if beta == 0.0 {
                        out.data.fill(f32::NAN);
                    }
                    gemm(
                        &mut out.data,
                        (m, n, k),
                        &aa.data,
                        ta,
                        &bb.data,
                        tb,
                        alpha,
                        beta,
                    );
                    let mut want = c0.clone();
                    for (w, p) in want.data.iter_mut().zip(&prod.data) {
                        *w = if beta == 0.0 {
                            alpha * p
                        } else {
                            beta * *w + alpha * p
                        };
                    }
                    let scale = want.data.iter().fold(1.0f32, |s, x| s.max(x.abs()));
                    let err = out.max_abs_diff(&want);
                    assert!(err <= 1e-5 * scale, "{m}x{k}x{n} {ta:?}{tb:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn fast_exp_and_tanh_match_libm() {
        let mut worst_exp = 0.0f64;
        let mut worst_tanh = 0.0f64;
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.0 + 175.0 * i as f32 / n as f32;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((fast_exp(x) as f64 - want) / want).abs());
        }
        for i in 0..=n {
            let x = -12.0 + 24.0 * i as f32 / n as f32;
            let want = (x as f64).tanh();
            if want != 0.0 {
                worst_tanh = worst_tanh.max(((fast_tanh(x) as f64 - want) / want).abs());
            }
        }
        for x in [1e-30f32, 1e-8, 1e-4, 0.2499, 0.25, 0.2501, 8.99, 9.0, 50.0] {
            for x in [x, -x] {
                let want = (x as f64).tanh();
                worst_tanh = worst_tanh.max(((fast_tanh(x) as f64 - want) / want).abs());
            }
        }
        assert!(worst_exp < 2e-7, "exp: {worst_exp:e}");
        assert!(worst_tanh < 3e-7, "tanh: {worst_tanh:e}");
        assert!(fast_exp(f32::NAN).is_nan() && fast_tanh(f32::NAN).is_nan());
        assert_eq!(fast_tanh(f32::INFINITY), 1.0);
        assert_eq!(fast_tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(fast_tanh(0.0), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn normalize_keeps_zero_rows_and_unit_norms() {
        let mut m = Mat::from_vec(2, 3, vec![3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        m.l2_normalize_rows();
        assert_eq!(m.row(0), &[0.6, 0.8, 0.0]);
        assert_eq!(m.row(1), &[0.0, 0.0, 0.0]);
        let p = softmax(&[1000.0, 1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn cholesky_solve_inverts_spd_matrices_and_refuses_others() {
        let mut rng = Rng::new(17);
        for n in [1usize, 7, 33] {
            let g = Mat::from_vec(n, n, rng.normal_vec(n * n));
            // A = G Gᵀ + n I is symmetric positive definite.
            let mut a = g.matmul_t(&g);
            for i in 0..n {
                a.set(i, i, a.get(i, i) + n as f32);
            }
            let b = Mat::from_vec(n, 3, rng.normal_vec(n * 3));
            let x = cholesky_solve(&a, &b).expect("SPD");
            let back = a.matmul(&x);
            assert!(
                back.max_abs_diff(&b) < 1e-3,
                "n = {n}: {}",
                back.max_abs_diff(&b)
            );
        }
        let not_pd = Mat::from_vec(2, 2, vec![1.0, 2.0, 2.0, 1.0]);
        assert!(cholesky_solve(&not_pd, &Mat::zeros(2, 1)).is_none());
        assert!(cholesky_solve(&Mat::zeros(2, 3), &Mat::zeros(2, 1)).is_none());
    }
}
