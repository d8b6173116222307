//! The host side of `shaders/matmul.wgsl`: `c = alpha · op(a) · op(b) + beta · c` in blocks that fit the
//! binding and workgroup limits, and its bench.

use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use super::dispatch::{Range, A, B, O, SLOTS};
use super::Kernels;
use crate::gpu::{GpuError, GpuTensor};

/// Whether an operand of [`Kernels::matmul`] enters as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// Which matmul shader runs. Both are register-tiled (4×4 outputs per invocation) and both are tested on every
/// shape; they differ in the use of workgroup memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulKernel {
    /// [`MatmulKernel::Register`] on a software adapter, [`MatmulKernel::Tiled`] on a real GPU.
    #[default]
    Auto,
    /// 32×32 output block per 8×8 workgroup, operands read straight from the buffers, no barriers. Fastest on
    /// llvmpipe, where a workgroup barrier costs far more than the reuse it buys.
    Register,
    /// 64×64 output block per 16×16 workgroup with 16-deep panels of both operands staged in workgroup memory:
    /// the layout discrete GPUs want.
    Tiled,
}

/// The uniform of `shaders/matmul.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct MmParams {
    m: u32,
    n: u32,
    k: u32,
    _pad0: u32,
    a_off: u32,
    a_rs: u32,
    a_cs: u32,
    _pad1: u32,
    b_off: u32,
    b_rs: u32,
    b_cs: u32,
    _pad2: u32,
    c_off: u32,
    c_rs: u32,
    alpha: f32,
    beta: f32,
}

impl Kernels {
    pub fn set_matmul_kernel(&mut self, kernel: MatmulKernel) {
        self.matmul_kernel = kernel;
    }

    /// The matmul shader that will run, with `Auto` resolved.
    pub fn matmul_kernel(&self) -> MatmulKernel {
        match self.matmul_kernel {
            MatmulKernel::Auto if self.ctx.is_software() => MatmulKernel::Register,
            MatmulKernel::Auto => MatmulKernel::Tiled,
            k => k,
        }
    }

    /// `c = alpha · op(a) · op(b) + beta · c`, `op` chosen per operand by [`Trans`]; any shapes, including empty
    /// inner dimensions (then `c = beta · c`).
    ///
    /// Operands above the binding limit are split: rows of `c` (and of `a` when not transposed), columns of `c`
    /// (when `b` is transposed) and the inner dimension (accumulating with `beta = 1` after the first block).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        enc: &mut wgpu::CommandEncoder,
        c: &GpuTensor,
        a: &GpuTensor,
        ta: Trans,
        b: &GpuTensor,
        tb: Trans,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "matmul";
        let (m, k) = match ta {
            Trans::N => (a.rows(), a.cols()),
            Trans::T => (a.cols(), a.rows()),
        };
        let (kb, n) = match tb {
            Trans::N => (b.rows(), b.cols()),
            Trans::T => (b.cols(), b.rows()),
        };
        if k != kb || c.shape() != (m, n) {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!(
                    "op(a) is {m}x{k}, op(b) is {kb}x{n}, c is {}x{}: need op(a) m×k, op(b) k×n, c m×n",
                    c.rows(),
                    c.cols()
                ),
            });
        }
        Self::check_alias(OP, &[c.buffer()], &[a.buffer(), b.buffer()])?;
        if m == 0 || n == 0 {
            return self.ctx.check_lost();
        }
        // Profiles tell the products apart by shape.
        let label: std::borrow::Cow<'_, str> = if self.is_profiling() {
            format!("matmul {m}×{k}·{k}×{n} {ta:?}{tb:?}").into()
        } else {
            OP.into()
        };
        let (pipe, tile) = match self.matmul_kernel() {
            MatmulKernel::Tiled => (&self.pipes.matmul_tiled, 64usize),
            _ => (&self.pipes.matmul_reg, 32usize),
        };
        let max = self.max_elems();
        let too_large = |what: &str, per_row: usize| GpuError::TooLarge {
            what: format!("{OP}: one row of {what} ({per_row} values)"),
            bytes: per_row as u64 * 4,
            limit: self.ctx.binding_limit(),
            kind: "storage binding",
        };
        let fit = |per_row: usize, what: &str| -> Result<usize, GpuError> {
            if per_row == 0 {
                Ok(usize::MAX)
            } else if per_row > max {
                Err(too_large(what, per_row))
            } else {
                Ok(max / per_row)
            }
        };
        let wg_max = self.ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
        let mut mc = m.min(wg_max * tile).min(fit(n, "c")?);
        let mut nc = n.min(wg_max * tile);
        let mut kc = k.max(1);
        match ta {
            Trans::N => mc = mc.min(fit(k, "a")?),
            Trans::T => kc = kc.min(fit(m, "a")?),
        }
        match tb {
            Trans::N => kc = kc.min(fit(n, "b")?),
            Trans::T => nc = nc.min(fit(k, "b")?),
        }
        self.record(OP, || {
            for m0 in (0..m).step_by(mc) {
                let m1 = m.min(m0 + mc);
                for n0 in (0..n).step_by(nc) {
                    let n1 = n.min(n0 + nc);
                    let mut k0 = 0;
                    loop {
                        let k1 = k.min(k0 + kc);
                        let mut binds: [Option<Range<'_>>; SLOTS] = [None; SLOTS];
                        let mut p = MmParams {
                            m: (m1 - m0) as u32,
                            n: (n1 - n0) as u32,
                            k: (k1 - k0) as u32,
                            alpha,
                            beta: if k0 == 0 { beta } else { 1.0 },
                            ..Default::default()
                        };
                        // op(a)[i, kk] = a_bound[a_off + i·a_rs + kk·a_cs]
                        match ta {
                            Trans::N => {
                                let (r, off) = self.range(a.buffer(), m0 * k, m1 * k);
                                binds[A] = Some(r);
                                (p.a_off, p.a_rs, p.a_cs) = (off + k0 as u32, k as u32, 1);
                            }
                            Trans::T => {
                                let (r, off) = self.range(a.buffer(), k0 * m, k1 * m);
                                binds[A] = Some(r);
                                (p.a_off, p.a_rs, p.a_cs) = (off + m0 as u32, 1, m as u32);
                            }
                        }
                        // op(b)[kk, j] = b_bound[b_off + kk·b_rs + j·b_cs]
                        match tb {
                            Trans::N => {
                                let (r, off) = self.range(b.buffer(), k0 * n, k1 * n);
                                binds[B] = Some(r);
                                (p.b_off, p.b_rs, p.b_cs) = (off + n0 as u32, n as u32, 1);
                            }
                            Trans::T => {
                                let (r, off) = self.range(b.buffer(), n0 * k, n1 * k);
                                binds[B] = Some(r);
                                (p.b_off, p.b_rs, p.b_cs) = (off + k0 as u32, 1, k as u32);
                            }
                        }
                        let (r, off) = self.range(c.buffer(), m0 * n, m1 * n);
                        binds[O] = Some(r);
                        (p.c_off, p.c_rs) = (off + n0 as u32, n as u32);
                        let groups_x = (n1 - n0).div_ceil(tile) as u32;
                        let groups_y = (m1 - m0).div_ceil(tile) as u32;
                        self.dispatch(enc, pipe, &label, &p, &binds, (groups_x, groups_y))?;
                        k0 = k1;
                        if k0 >= k {
                            break;
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

/// Timing of [`bench_matmul`].
#[derive(Clone, Copy, Debug)]
pub struct MatmulTiming {
    pub kernel: MatmulKernel,
    /// Mean seconds per matmul over the timed repetitions (after one warm-up).
    pub seconds: f64,
    pub gflops: f64,
}

/// Times `C(m×n) = A(m×k)·B(k×n)` with the kernels' current matmul shader: one warm-up, then `reps` matmuls in
/// one submission. For the `bench` command and for choosing a kernel on a new GPU, not for tests.
pub fn bench_matmul(
    kernels: &Kernels,
    m: usize,
    k: usize,
    n: usize,
    reps: usize,
) -> Result<MatmulTiming, GpuError> {
    let ctx = kernels.context();
    let a = GpuTensor::<f32>::zeros(ctx, m, k)?;
    let b = GpuTensor::<f32>::zeros(ctx, k, n)?;
    let c = GpuTensor::<f32>::zeros(ctx, m, n)?;
    let mut enc = ctx.encoder("bench warm-up");
    kernels.matmul(&mut enc, &c, &a, Trans::N, &b, Trans::N, 1.0, 0.0)?;
    ctx.submit(enc)?;
    ctx.wait()?;
    let reps = reps.max(1);
    let start = Instant::now();
    let mut enc = ctx.encoder("bench");
    for _ in 0..reps {
        kernels.matmul(&mut enc, &c, &a, Trans::N, &b, Trans::N, 1.0, 0.0)?;
    }
    ctx.submit(enc)?;
    ctx.wait()?;
    let seconds = start.elapsed().as_secs_f64() / reps as f64;
    Ok(MatmulTiming {
        kernel: kernels.matmul_kernel(),
        seconds,
        gflops: 2.0 * (m * k * n) as f64 / seconds.max(1e-12) / 1e9,
    })
}
