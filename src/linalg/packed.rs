//! Products against a weight matrix packed once, at load, into 64-column panels, multiplied by an AVX-512
//! kernel that streams the panels.
//!
//! Why not the `gemm` crate here: it packs its right-hand operand on every call. With a short left operand
//! (CLIP at batch 1: 50 tokens against 350 MB of weights per image) that packing is a pass over memory that
//! nothing overlaps with arithmetic; the products ran at 244–284 GFLOP/s on the development machine (2
//! threads, AVX-512, 36 GB/s), against 450 with weights in cache. Packed once, each panel is one sequential
//! stream (`k` rows of 64 floats), and the kernel prefetches the next block of it while it multiplies the
//! current one from L1: 335–366 GFLOP/s on the same products, and on a par with `gemm` (440–460) at 1,600
//! rows (BENCHMARKS.md, "CLIP encoding").
//!
//! On a CPU without AVX-512 (or with `HEGRAPH_PORTABLE_GEMM=1`) [`PackedMatrix::pack`] declines, and the
//! caller keeps its row-major matrix and [`super::gemm`]. An AVX2 kernel on the same panels was measured
//! against `gemm`'s AVX2 kernels: 25 % faster at 50 rows, 5–10 % slower at 1,600 (the batches `extract`
//! runs), so it is not here.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::{degenerate, ColumnsOut};

/// Columns per panel: four AVX-512 registers.
pub const PANEL: usize = 64;
/// Rows of a panel multiplied from L1 at a time (`KC × 64` floats = 32 KiB).
const KC: usize = 128;
/// Output rows per kernel call: 6 × 4 accumulator registers, 4 for the panel row, 1 broadcast (of 32).
const MR: usize = 6;
/// Output rows per task: the left operand's `MC × k` block stays in L2 across the panels.
const MC: usize = 96;
/// Disables the packed layout (the portable path is then used everywhere), for comparisons and tests.
pub const PORTABLE_ENV: &str = "HEGRAPH_PORTABLE_GEMM";

/// Whether this process multiplies through packed panels: the CPU has AVX-512F and
/// [`PORTABLE_ENV`] is not set. Decided once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let disabled = std::env::var_os(PORTABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        !disabled && cpu_has_avx512()
    })
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512() -> bool {
    false
}

/// A `k × n` matrix stored as `⌈n/64⌉` panels of `k × 64` floats, row-major within a panel; the last panel
/// is padded with zero columns.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    panels: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedMatrix {
    /// Packs the row-major `b` (`k × n`), or returns `None` where the packed kernel does not run (see
    /// [`available`]).
    ///
    /// Panics when `b` is shorter than `k·n`.
    pub fn pack(b: &[f32], k: usize, n: usize) -> Option<Self> {
        available().then(|| Self::pack_always(b, k, n))
    }

    fn pack_always(b: &[f32], k: usize, n: usize) -> Self {
        assert!(
            b.len() >= k * n,
            "PackedMatrix: {k}x{n} needs {} values",
            k * n
        );
        let count = n.div_ceil(PANEL);
        let mut panels = vec![0.0f32; count * k * PANEL];
        if panels.is_empty() {
            return Self { panels, k, n };
        }
        for (p, panel) in panels.chunks_exact_mut(k * PANEL).enumerate() {
            let j0 = p * PANEL;
            let w = PANEL.min(n - j0);
            for (kk, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                row[..w].copy_from_slice(&b[kk * n + j0..][..w]);
            }
        }
        Self { panels, k, n }
    }

    /// `out = a·B` (or `out += a·B` with `accumulate`) for a row-major `a` (`m × k`) and `out` (`m × n`),
    /// on rayon's pool: one task per block of 96 rows (`MC`) and panel.
    ///
    /// Panics when a slice is shorter than its shape says.
    pub fn multiply(&self, out: &mut [f32], m: usize, a: &[f32], accumulate: bool) {
        let (k, n) = (self.k, self.n);
        assert!(
            out.len() >= m * n && a.len() >= m * k,
            "PackedMatrix::multiply: buffers shorter than {m}x{k} · {k}x{n}"
        );
        if degenerate(out, (m, n, k), if accumulate { 1.0 } else { 0.0 }) {
            return;
        }
        let count = n.div_ceil(PANEL);
        let groups = m.div_ceil(MC);
        let dst = ColumnsOut(out.as_mut_ptr());
        // Consecutive tasks are consecutive panels of one row block, so each thread's prefetches run on
        // into the panel it multiplies next.
        (0..groups * count).into_par_iter().for_each(|t| {
            let (g, p) = (t / count, t % count);
            let (r0, j0) = (g * MC, p * PANEL);
            let rows = MC.min(m - r0);
            let cols = PANEL.min(n - j0);
            // SAFETY: the assertions above bound `a` (rows `r0..r0 + rows` of `k` floats) and `out` (rows of
            // `n` floats; this task touches rows `r0..r0 + rows`, columns `j0..j0 + cols`, which no other task
            // touches); the panel holds `k × 64` floats; `out` is borrowed mutably for the whole call, so it
            // aliases neither operand; a `PackedMatrix` exists only where AVX-512F does (`pack` checks
            // `available()`, the tests `cpu_has_avx512()`).
            unsafe {
                kernel::block(
                    dst.at(r0 * n + j0),
                    n,
                    a.as_ptr().add(r0 * k),
                    k,
                    self.panels.as_ptr().add(p * k * PANEL),
                    (rows, cols, k),
                    accumulate,
                );
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{KC, MR, PANEL};

    /// `c (+)= a · panel` for `rows × cols` outputs (`cols ≤ 64`), `a` and `c` rows `lda` and `ldc` apart.
    ///
    /// # Safety
    /// AVX-512F must be present; `a` must hold `rows` rows of `k` floats, `panel` `k × 64` floats, `c`
    /// `rows` rows of `cols` floats, and nothing else may access those outputs meanwhile.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        panel: *const f32,
        (rows, cols, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        let masks: [__mmask16; 4] = std::array::from_fn(|q| {
            let left = cols.saturating_sub(q * 16).min(16);
            // `left ≤ 16`, so the shift cannot overflow a u32 and the result fits 16 bits.
            ((1u32 << left) - 1) as u16
        });
        let mut kc = 0;
        while kc < k {
            let kw = KC.min(k - kc);
            let add = accumulate || kc > 0;
            let mut r = 0;
            while r < rows {
                let mr = MR.min(rows - r);
                // The first row block brings the next `KC` panel rows towards L1 for the blocks that follow.
                let prefetch = r == 0;
                let args = (
                    c.add(r * ldc),
                    ldc,
                    a.add(r * lda + kc),
                    lda,
                    panel.add(kc * PANEL),
                    kw,
                );
                match mr {
                    6 => micro::<6>(args, &masks, add, prefetch),
                    5 => micro::<5>(args, &masks, add, prefetch),
                    4 => micro::<4>(args, &masks, add, prefetch),
                    3 => micro::<3>(args, &masks, add, prefetch),
                    2 => micro::<2>(args, &masks, add, prefetch),
                    _ => micro::<1>(args, &masks, add, prefetch),
                }
                r += mr;
            }
            kc += kw;
        }
    }

    /// `R` output rows × 64 columns in 4·R registers over `k` panel rows.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn micro<const R: usize>(
        (c, ldc, a, lda, b, k): (*mut f32, usize, *const f32, usize, *const f32, usize),
        masks: &[__mmask16; 4],
        add: bool,
        prefetch: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if add {
            for (r, row) in acc.iter_mut().enumerate() {
                for (q, v) in row.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(masks[q], c.add(r * ldc).wrapping_add(q * 16));
                }
            }
        }
        for kk in 0..k {
            let br = b.add(kk * PANEL);
            if prefetch {
                // The same row one block ahead: the next block of this panel, or the next panel. Past the
                // last panel it is a hint about memory that is never read (a prefetch does not fault).
                let ahead = br.wrapping_add(KC * PANEL).cast::<i8>();
                for line in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
                }
            }
            let bv: [__m512; 4] = std::array::from_fn(|q| _mm512_loadu_ps(br.add(q * 16)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                for (q, v) in row.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(av, bv[q], *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, v) in row.iter().enumerate() {
                // Masked: columns past `cols` are neither read nor written (nor is their address formed with
                // `add`, which must stay inside the buffer).
                _mm512_mask_storeu_ps(c.add(r * ldc).wrapping_add(q * 16), masks[q], *v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    /// Never called: [`super::available`] is false off x86-64, so no matrix is packed.
    pub unsafe fn block(
        _c: *mut f32,
        _ldc: usize,
        _a: *const f32,
        _lda: usize,
        _panel: *const f32,
        _shape: (usize, usize, usize),
        _accumulate: bool,
    ) {
        unreachable!("packed matrices exist only where AVX-512 does")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::tests::naive;
    use crate::linalg::Mat;
    use crate::rng::Rng;

    #[test]
    fn packing_keeps_every_value_and_pads_with_zeros() {
        let (k, n) = (3, 70);
        let b: Vec<f32> = (0..k * n).map(|i| i as f32 + 1.0).collect();
        let p = PackedMatrix::pack_always(&b, k, n);
        assert_eq!(p.panels.len(), 2 * k * PANEL);
        for kk in 0..k {
            for j in 0..2 * PANEL {
                let got = p.panels[(j / PANEL) * k * PANEL + kk * PANEL + j % PANEL];
                let want = if j < n { b[kk * n + j] } else { 0.0 };
                assert_eq!(got, want, "({kk}, {j})");
            }
        }
    }

    /// Awkward shapes (1×1×1, 7×7×7, rows not a multiple of the 6-row kernel or the 96-row task, columns
    /// not a multiple of the panel, depths not a multiple of the 128-row block), fresh random inputs (see
    /// [`Rng::for_test`]), set and accumulate; outputs outside the product must stay untouched.
    #[test]
    fn packed_product_matches_naive_on_awkward_shapes() {
        if !cpu_has_avx512() {
            println!("skipped: this CPU has no AVX-512, so nothing is ever packed here");
            return;
        }
        let mut rng = Rng::for_test("packed_product_matches_naive_on_awkward_shapes");
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 7, 7),
            (50, 768, 130),
            (97, 129, 64),
            (13, 300, 65),
            (200, 17, 191),
            (5, 0, 9),
        ] {
            let a = Mat::from_vec(m, k, rng.normal_vec(m * k));
            let b = Mat::from_vec(k, n, rng.normal_vec(k * n));
            let p = PackedMatrix::pack_always(&b.data, k, n);
            let want = naive(&a, &b);
            let tol = 1e-5 * (k.max(1) as f32).sqrt() * 4.0;
            // One spare value after the product: it must survive.
            let mut set = vec![f32::NAN; m * n + 1];
            set[m * n] = 42.0;
            p.multiply(&mut set, m, &a.data, false);
            assert_eq!(set[m * n], 42.0, "{m}x{k}x{n}: wrote past the output");
            set.truncate(m * n);
            let d = Mat::from_vec(m, n, set).max_abs_diff(&want);
            assert!(d < tol, "{m}x{k}x{n}: {d}");
            let c0 = rng.normal_vec(m * n);
            let mut acc = c0.clone();
            p.multiply(&mut acc, m, &a.data, true);
            let mut want_acc = want.clone();
            want_acc.data.iter_mut().zip(&c0).for_each(|(w, c)| *w += c);
            let d = Mat::from_vec(m, n, acc).max_abs_diff(&want_acc);
            assert!(d < tol, "{m}x{k}x{n} +=: {d}");
        }
    }
}
