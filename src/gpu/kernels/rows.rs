//! The host side of `shaders/rows.wgsl`: row-wise normalisation and softmax cross-entropy, the reductions,
//! the row gather and the class-segment sums.

use super::dispatch::Params;
use super::dispatch::{op, Groups, Launch, Part, Range, A, B, C, IDX, O, O2, SLOTS};
use super::Kernels;
use crate::gpu::{GpuError, GpuTensor};

/// Where [`Kernels::softmax_xent`] writes.
#[derive(Clone, Copy, Debug)]
pub struct XentOut<'a> {
    /// `B × 1`, always written: `logsumexp(row) − row[label]`.
    pub row_loss: &'a GpuTensor,
    /// `B × C`: `grad_scale · (softmax(row) − onehot(label))`; skipped when `None`.
    pub grad: Option<&'a GpuTensor>,
    pub grad_scale: f32,
    /// `1 × 1`: `loss = loss_weight · mean(row_loss) + loss_beta · loss`, so several weighted losses can add into
    /// one scalar; skipped when `None`.
    pub mean_loss: Option<&'a GpuTensor>,
    pub loss_weight: f32,
    pub loss_beta: f32,
}

impl Kernels {
    /// Row-wise L2 normalisation with PyTorch's `F.normalize` semantics: `y = x / max(‖x‖, eps)`, and the
    /// norms `‖x‖` (`rows × 1`) saved for the backward pass. `eps = 1e-12` matches PyTorch.
    pub fn l2_normalize_rows(
        &self,
        enc: &mut wgpu::CommandEncoder,
        y: &GpuTensor,
        norms: &GpuTensor,
        x: &GpuTensor,
        eps: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "l2_normalize_rows";
        Self::same_shape(OP, x.shape(), &[("y", y.shape())])?;
        Self::same_shape(OP, (x.rows(), 1), &[("norms", (norms.len(), 1))])?;
        Self::check_alias(OP, &[y.buffer(), norms.buffer()], &[x.buffer()])?;
        let cols = x.cols();
        let ops = [
            op(A, x, Part::Rows(cols)),
            op(O, y, Part::Rows(cols)),
            op(O2, norms, Part::Rows(1)),
        ];
        let pipe = &self.pipes.l2norm_fwd;
        let l = Launch::new(OP, pipe, x.rows(), cols, &ops).scalars(&[eps]);
        self.launch(enc, l.groups(Groups::PerRow))
    }

    /// Backward of [`Kernels::l2_normalize_rows`]: `dx = (dy − y·⟨dy, y⟩) / ‖x‖ + beta · dx` per row (and
    /// `dy / eps` for a row whose norm was clamped to `eps`).
    #[allow(clippy::too_many_arguments)]
    pub fn l2_normalize_rows_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dx: &GpuTensor,
        dy: &GpuTensor,
        y: &GpuTensor,
        norms: &GpuTensor,
        eps: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "l2_normalize_rows_backward";
        Self::same_shape(OP, dx.shape(), &[("dy", dy.shape()), ("y", y.shape())])?;
        Self::same_shape(OP, (dx.rows(), 1), &[("norms", (norms.len(), 1))])?;
        Self::check_alias(
            OP,
            &[dx.buffer()],
            &[dy.buffer(), y.buffer(), norms.buffer()],
        )?;
        let cols = dx.cols();
        let ops = [
            op(A, dy, Part::Rows(cols)),
            op(B, y, Part::Rows(cols)),
            op(C, norms, Part::Rows(1)),
            op(O, dx, Part::Rows(cols)),
        ];
        let pipe = &self.pipes.l2norm_bwd;
        let l = Launch::new(OP, pipe, dx.rows(), cols, &ops).scalars(&[eps, beta]);
        self.launch(enc, l.groups(Groups::PerRow))
    }

    /// Softmax cross-entropy of each row of `logits` (`B × C`) against `labels` (`B` values), with the row max
    /// subtracted for stability. See [`XentOut`] for what is written. A label `>= C` yields NaN for its row (and
    /// hence the mean) so that a bad label cannot go unnoticed.
    pub fn softmax_xent(
        &self,
        enc: &mut wgpu::CommandEncoder,
        logits: &GpuTensor,
        labels: &GpuTensor<u32>,
        out: XentOut<'_>,
    ) -> Result<(), GpuError> {
        const OP: &str = "softmax_xent";
        let (rows, cols) = logits.shape();
        Self::same_shape(
            OP,
            (rows, 1),
            &[
                ("labels", (labels.len(), 1)),
                ("row_loss", (out.row_loss.len(), 1)),
            ],
        )?;
        if let Some(g) = out.grad {
            Self::same_shape(OP, (rows, cols), &[("grad", g.shape())])?;
        }
        if let Some(l) = out.mean_loss {
            Self::same_shape(OP, (1, 1), &[("mean_loss", l.shape())])?;
        }
        let mut outputs = vec![out.row_loss.buffer()];
        outputs.extend(out.grad.map(|g| g.buffer()));
        outputs.extend(out.mean_loss.map(|l| l.buffer()));
        Self::check_alias(OP, &outputs, &[logits.buffer(), labels.buffer()])?;
        if rows > 0 && cols == 0 {
            return Err(GpuError::Shape {
                op: OP,
                detail: "logits have no classes".to_owned(),
            });
        }
        let mut ops = vec![
            op(A, logits, Part::Rows(cols)),
            op(IDX, labels, Part::Rows(1)),
            op(O2, out.row_loss, Part::Rows(1)),
        ];
        if let Some(g) = out.grad {
            ops.push(op(O, g, Part::Rows(cols)));
        }
        self.record(OP, || {
            let l = Launch::new(OP, &self.pipes.xent, rows, cols, &ops)
                .scalars(&[out.grad_scale])
                .flag(out.grad.is_some())
                .groups(Groups::PerRow);
            self.launch_in_scope(enc, l)?;
            if let Some(l) = out.mean_loss {
                let weight = if rows == 0 {
                    0.0
                } else {
                    out.loss_weight / rows as f32
                };
                self.sum_all_inner(enc, l, out.row_loss, weight, out.loss_beta)?;
            }
            Ok(())
        })
    }

    // ---------------------------------------------------------------------------------------------------------
    // Reductions

    /// `out[0] = alpha · Σ x + beta · out[0]` (`out` is `1 × 1`). One workgroup per binding-sized block, so this
    /// is meant for losses and other modest sizes, not for reducing a whole dataset.
    pub fn sum_all(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "sum_all";
        Self::same_shape(OP, (1, 1), &[("out", out.shape())])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer()])?;
        self.record(OP, || self.sum_all_inner(enc, out, x, alpha, beta))
    }

    fn sum_all_inner(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "sum_all";
        if x.is_empty() {
            // Σ of nothing is 0: out = beta · out.
            return self.affine(enc, out, beta, 0.0);
        }
        let ops = [op(A, x, Part::Rows(1)), op(O, out, Part::Whole(1))];
        let l = Launch::new(OP, &self.pipes.sum_all, x.len(), 1, &ops)
            .scalars(&[alpha, beta])
            .accumulate()
            .groups(Groups::One);
        self.launch_in_scope(enc, l)
    }

    /// `out[j] = alpha · Σ_i x[i, j] + beta · out[j]` (`out` has `cols` values): the gradient of a bias
    /// broadcast over rows.
    pub fn col_sums(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "col_sums";
        let cols = x.cols();
        Self::same_shape(OP, (1, cols), &[("out", (1, out.len()))])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer()])?;
        if cols == 0 {
            return self.ctx.check_lost();
        }
        if x.rows() == 0 {
            return self.affine(enc, out, beta, 0.0);
        }
        let ops = [op(A, x, Part::Rows(cols)), op(O, out, Part::Whole(cols))];
        let l = Launch::new(OP, &self.pipes.col_sum, x.rows(), cols, &ops)
            .scalars(&[alpha, beta])
            .accumulate()
            .groups(Groups::PerColumn);
        self.launch(enc, l)
    }

    /// `out[i] = alpha · Σ_j x[i, j] + beta · out[i]` (`out` has `rows` values): e.g. node degrees.
    pub fn row_sums(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "row_sums";
        let (rows, cols) = x.shape();
        Self::same_shape(OP, (rows, 1), &[("out", (out.len(), 1))])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer()])?;
        let ops = [op(A, x, Part::Rows(cols)), op(O, out, Part::Rows(1))];
        let pipe = &self.pipes.row_sum;
        let l = Launch::new(OP, pipe, rows, cols, &ops).scalars(&[alpha, beta]);
        self.launch(enc, l.groups(Groups::PerRow))
    }

    // ---------------------------------------------------------------------------------------------------------
    // Gather

    /// `out[r, :] = src[idx[r], :]`: selects a batch (or one augmented view per image) from a feature matrix that
    /// stays on the GPU. `idx` has `out.rows()` values; an index `>= src.rows()` writes a NaN row. A `src`
    /// above the binding limit is walked in row blocks, each dispatch copying the rows that fall in it.
    pub fn gather_rows(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        src: &GpuTensor,
        idx: &GpuTensor<u32>,
    ) -> Result<(), GpuError> {
        const OP: &str = "gather_rows";
        let cols = src.cols();
        Self::same_shape(OP, (out.rows(), cols), &[("out", out.shape())])?;
        Self::same_shape(OP, (out.rows(), 1), &[("idx", (idx.len(), 1))])?;
        Self::check_alias(OP, &[out.buffer()], &[src.buffer(), idx.buffer()])?;
        if cols == 0 || out.rows() == 0 {
            return self.ctx.check_lost();
        }
        let src_step = self.rows_per_block(OP, &[op(A, src, Part::Rows(cols))])?;
        let total = src.rows();
        self.record(OP, || {
            let mut s0 = 0;
            loop {
                let s1 = total.min(s0 + src_step);
                let ops = [op(IDX, idx, Part::Rows(1)), op(O, out, Part::Rows(cols))];
                let (src_range, src_off) = self.range(src.buffer(), s0 * cols, s1 * cols);
                let l = Launch::new(OP, &self.pipes.gather, out.rows(), cols, &ops)
                    .source(src_range, src_off, s0, s1)
                    .total(total);
                self.launch_in_scope(enc, l)?;
                s0 = s1;
                if s0 >= total {
                    break;
                }
            }
            Ok(())
        })
    }

    // ---------------------------------------------------------------------------------------------------------
    // Class segments
    //
    // A cache sorted by class is described by `offsets` (C + 1 values, class c owning entries
    // `[offsets[c], offsets[c + 1])`). These ops are the products with the one-hot `M×C` label matrix written
    // as the sums and gathers they are: `O(B·M)` and `O(M·D)` work instead of `O(B·M·C)` and `O(M·C·D)`.

    fn check_offsets(
        op: &'static str,
        offsets: &GpuTensor<u32>,
        classes: usize,
    ) -> Result<(), GpuError> {
        Self::same_shape(op, (classes + 1, 1), &[("offsets", (offsets.len(), 1))])
    }

    /// `out[r, c] = alpha · Σ_{m ∈ segment c} x[r, m] + beta · out[r, c]` (`out` R×C, `x` R×M): the cache
    /// logits' class sums. `offsets` must be non-decreasing and end at M (the caller builds them).
    #[allow(clippy::too_many_arguments)]
    pub fn segment_sums(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        offsets: &GpuTensor<u32>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "segment_sums";
        let (rows, m) = x.shape();
        let c = out.cols();
        Self::same_shape(OP, (rows, c), &[("out", out.shape())])?;
        Self::check_offsets(OP, offsets, c)?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer(), offsets.buffer()])?;
        if rows == 0 || c == 0 {
            return self.ctx.check_lost();
        }
        let ops = [
            op(A, x, Part::Rows(m)),
            op(IDX, offsets, Part::Whole(c + 1)),
            op(O, out, Part::Rows(c)),
        ];
        let pipe = &self.pipes.seg_sum;
        let l = Launch::new(OP, pipe, rows, c, &ops).scalars(&[alpha, beta]);
        self.launch(enc, l.total(m))
    }

    /// `out[r, m] = alpha · x[r, labels[m]] + beta · out[r, m]` (`out` R×M, `x` R×C, `labels` M values): the
    /// transpose of [`Kernels::segment_sums`]. A label `>= C` writes NaN.
    #[allow(clippy::too_many_arguments)]
    pub fn segment_expand(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        labels: &GpuTensor<u32>,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "segment_expand";
        let (rows, c) = x.shape();
        let m = out.cols();
        Self::same_shape(OP, (rows, m), &[("out", out.shape())])?;
        Self::same_shape(OP, (m, 1), &[("labels", (labels.len(), 1))])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer(), labels.buffer()])?;
        if rows == 0 || m == 0 {
            return self.ctx.check_lost();
        }
        let ops = [
            op(A, x, Part::Rows(c.max(1))),
            op(IDX, labels, Part::Whole(m)),
            op(O, out, Part::Rows(m)),
        ];
        let pipe = &self.pipes.seg_expand;
        let l = Launch::new(OP, pipe, rows, m, &ops).scalars(&[alpha, beta]);
        self.launch(enc, l.total(c))
    }

    /// `out[c, :] = alpha · Σ_{m ∈ segment c} x[m, :] + beta · out[c, :]` (`out` C×D, `x` M×D): the gradient
    /// of giving every cache entry its class's row. `host_offsets` are the values of `offsets` (the host
    /// needs them to cut the classes into blocks whose entries fit one binding); a single class whose
    /// entries exceed the binding limit is refused.
    #[allow(clippy::too_many_arguments)]
    pub fn segment_row_sums(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        offsets: &GpuTensor<u32>,
        host_offsets: &[u32],
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "segment_row_sums";
        let (c, d) = out.shape();
        let m = x.rows();
        Self::same_shape(OP, (m, d), &[("x", x.shape())])?;
        Self::check_offsets(OP, offsets, c)?;
        Self::same_shape(OP, (c + 1, 1), &[("host offsets", (host_offsets.len(), 1))])?;
        let monotone = host_offsets.windows(2).all(|w| w[0] <= w[1]);
        if !monotone || host_offsets.first() != Some(&0) || host_offsets.last() != Some(&(m as u32))
        {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("offsets must rise from 0 to {m}"),
            });
        }
        Self::check_alias(OP, &[out.buffer()], &[x.buffer(), offsets.buffer()])?;
        if c == 0 || d == 0 {
            return self.ctx.check_lost();
        }
        let max = self.max_elems();
        let off = |i: usize| host_offsets[i] as usize;
        self.record(OP, || {
            let mut c0 = 0;
            while c0 < c {
                // The longest run of classes whose outputs, entries and offsets each fit one binding.
                let mut c1 = c0 + 1;
                if (off(c1) - off(c0)) * d > max || d > max {
                    return Err(GpuError::TooLarge {
                        what: format!(
                            "{OP}: class {c0} with {} entries of {d} values",
                            off(c1) - off(c0)
                        ),
                        bytes: ((off(c1) - off(c0)) * d * 4) as u64,
                        limit: self.ctx.binding_limit(),
                        kind: "storage binding",
                    });
                }
                while c1 < c
                    && (off(c1 + 1) - off(c0)) * d <= max
                    && (c1 + 1 - c0) * d <= max
                    && c1 + 2 - c0 <= max
                {
                    c1 += 1;
                }
                let mut binds: [Option<Range<'_>>; SLOTS] = [None; SLOTS];
                let mut p = Params::new();
                for (slot, buffer, e0, e1) in [
                    (A, x.buffer(), off(c0) * d, off(c1) * d),
                    (IDX, offsets.buffer(), c0, c1 + 1),
                    (O, out.buffer(), c0 * d, c1 * d),
                ] {
                    let (range, o) = self.range(buffer, e0, e1);
                    binds[slot] = Some(range);
                    p.off[slot - 1] = o;
                }
                p.n = ((c1 - c0) * d) as u32;
                p.cols = d as u32;
                p.r0 = off(c0) as u32;
                p.s[0] = alpha;
                p.s[1] = beta;
                let grid = self.grid(OP, Self::flat_groups((c1 - c0) * d))?;
                self.dispatch(enc, &self.pipes.seg_rows, OP, &p, &binds, grid)?;
                c0 = c1;
            }
            Ok(())
        })
    }
}
