//! The host side of `shaders/elementwise.wgsl`: maps over flat ranges, the row-broadcast ops and the AdamW
//! step, plus the buffer copy.

use super::dispatch::{op, Launch, Operand, Part, A, B, O, O2, O3};
use super::Kernels;
use crate::gpu::{GpuError, GpuTensor};

/// AdamW hyper-parameters (PyTorch's `torch.optim.AdamW` semantics and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl Kernels {
    /// `out = f(inputs…)` element by element, every input the shape of `out` and bound in order at slots
    /// `A`, `B` (at most two), `out` at `O`; `scalars` are the shader's `s0, s1, …`.
    fn map(
        &self,
        enc: &mut wgpu::CommandEncoder,
        name: &'static str,
        pipe: &wgpu::ComputePipeline,
        out: &GpuTensor,
        inputs: &[(&str, &GpuTensor)],
        scalars: &[f32],
    ) -> Result<(), GpuError> {
        let shapes: Vec<(&str, (usize, usize))> =
            inputs.iter().map(|(n, t)| (*n, t.shape())).collect();
        Self::same_shape(name, out.shape(), &shapes)?;
        let others: Vec<&wgpu::Buffer> = inputs.iter().map(|(_, t)| t.buffer()).collect();
        Self::check_alias(name, &[out.buffer()], &others)?;
        let mut ops: Vec<Operand<'_>> = inputs
            .iter()
            .zip([A, B])
            .map(|((_, t), slot)| op(slot, *t, Part::Rows(1)))
            .collect();
        ops.push(op(O, out, Part::Rows(1)));
        self.launch(
            enc,
            Launch::new(name, pipe, out.len(), 1, &ops).scalars(scalars),
        )
    }

    /// `out = value` everywhere (in place).
    pub fn fill(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        value: f32,
    ) -> Result<(), GpuError> {
        self.map(enc, "fill", &self.pipes.fill, out, &[], &[value])
    }

    /// `y = a · x + b · y` (`y` in place; `x` must be another tensor — use [`Kernels::affine`] for `y = s·y`).
    pub fn axpby(
        &self,
        enc: &mut wgpu::CommandEncoder,
        a: f32,
        x: &GpuTensor,
        b: f32,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.map(enc, "axpby", &self.pipes.axpby, y, &[("x", x)], &[a, b])
    }

    /// `out = alpha · x ⊙ y + beta · out` (element-wise product; `x` and `y` may be the same tensor).
    #[allow(clippy::too_many_arguments)]
    pub fn mul(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        y: &GpuTensor,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        let inputs = [("x", x), ("y", y)];
        self.map(enc, "mul", &self.pipes.mul, out, &inputs, &[alpha, beta])
    }

    /// `y = scale · y + shift` in place (scaling, adding a scalar, or both).
    pub fn affine(
        &self,
        enc: &mut wgpu::CommandEncoder,
        y: &GpuTensor,
        scale: f32,
        shift: f32,
    ) -> Result<(), GpuError> {
        self.map(enc, "affine", &self.pipes.affine, y, &[], &[scale, shift])
    }

    /// `out = tanh(x)`, computed through `exp(−2|x|)` so that large inputs saturate to ±1 instead of NaN.
    pub fn tanh(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<(), GpuError> {
        self.map(enc, "tanh", &self.pipes.tanh_fwd, out, &[("x", x)], &[])
    }

    /// `dx = g ⊙ (1 − y²) + beta · dx`, given the forward output `y = tanh(x)` (so `x` need not be kept).
    pub fn tanh_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dx: &GpuTensor,
        g: &GpuTensor,
        y: &GpuTensor,
        beta: f32,
    ) -> Result<(), GpuError> {
        let inputs = [("g", g), ("y", y)];
        let pipe = &self.pipes.tanh_bwd;
        self.map(enc, "tanh_backward", pipe, dx, &inputs, &[0.0, beta])
    }

    /// `out = exp(sharpness · (x − shift))`: Tip-Adapter's affinity `exp(−β(1 − cos))` is
    /// `exp_affine(cos, β, 1)`.
    pub fn exp_affine(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        sharpness: f32,
        shift: f32,
    ) -> Result<(), GpuError> {
        let scalars = [sharpness, 0.0, shift];
        let pipe = &self.pipes.exp_fwd;
        self.map(enc, "exp_affine", pipe, out, &[("x", x)], &scalars)
    }

    /// `dx = sharpness · g ⊙ y + beta · dx`, given the forward output `y` of [`Kernels::exp_affine`].
    #[allow(clippy::too_many_arguments)]
    pub fn exp_affine_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dx: &GpuTensor,
        g: &GpuTensor,
        y: &GpuTensor,
        sharpness: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        let inputs = [("g", g), ("y", y)];
        let pipe = &self.pipes.exp_bwd;
        self.map(
            enc,
            "exp_affine_backward",
            pipe,
            dx,
            &inputs,
            &[sharpness, beta],
        )
    }

    /// `out = alpha · diag(s) · x + beta · out`: scales row `i` of `x` by `s[i]` (`s` is `rows × 1` or
    /// `1 × rows`). This is the degree normalisation `D^{-1/2}` of the graph layers.
    #[allow(clippy::too_many_arguments)]
    pub fn row_scale(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        s: &GpuTensor,
        x: &GpuTensor,
        alpha: f32,
        beta: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "row_scale";
        Self::same_shape(OP, out.shape(), &[("x", x.shape())])?;
        if s.len() != x.rows() {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("s has {} values for {} rows", s.len(), x.rows()),
            });
        }
        Self::check_alias(OP, &[out.buffer()], &[x.buffer(), s.buffer()])?;
        let cols = x.cols();
        if cols == 0 {
            return self.ctx.check_lost();
        }
        let ops = [
            op(A, x, Part::Rows(cols)),
            op(B, s, Part::Rows(1)),
            op(O, out, Part::Rows(cols)),
        ];
        let pipe = &self.pipes.row_scale;
        let l = Launch::new(OP, pipe, x.rows(), cols, &ops).scalars(&[alpha, beta]);
        self.launch(enc, l)
    }

    /// `x[i, :] += alpha · b` for every row (a bias), in place; `b` is `1 × cols` (or `cols × 1`).
    pub fn add_row_broadcast(
        &self,
        enc: &mut wgpu::CommandEncoder,
        x: &GpuTensor,
        b: &GpuTensor,
        alpha: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "add_row_broadcast";
        if b.len() != x.cols() {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("b has {} values for {} columns", b.len(), x.cols()),
            });
        }
        Self::check_alias(OP, &[x.buffer()], &[b.buffer()])?;
        let cols = x.cols();
        if cols == 0 {
            return self.ctx.check_lost();
        }
        let ops = [op(A, b, Part::Whole(cols)), op(O, x, Part::Rows(cols))];
        let pipe = &self.pipes.add_row;
        let l = Launch::new(OP, pipe, x.rows(), cols, &ops).scalars(&[alpha]);
        self.launch(enc, l)
    }

    /// One AdamW step on `param` with gradient `grad` and moments `m`, `v` (all the same shape, updated in
    /// place). `step` counts from 1, as in PyTorch; bias corrections are computed here in f64.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        enc: &mut wgpu::CommandEncoder,
        param: &GpuTensor,
        m: &GpuTensor,
        v: &GpuTensor,
        grad: &GpuTensor,
        hp: &AdamW,
        step: u32,
    ) -> Result<(), GpuError> {
        const OP: &str = "adamw_step";
        Self::same_shape(
            OP,
            param.shape(),
            &[("m", m.shape()), ("v", v.shape()), ("grad", grad.shape())],
        )?;
        Self::check_alias(
            OP,
            &[param.buffer(), m.buffer(), v.buffer()],
            &[grad.buffer()],
        )?;
        if step == 0 {
            return Err(GpuError::Shape {
                op: OP,
                detail: "step counts from 1 (bias correction divides by 1 − β^step)".to_owned(),
            });
        }
        let t = f64::from(step);
        let bc1 = 1.0 - f64::from(hp.beta1).powf(t);
        let bc2_sqrt = (1.0 - f64::from(hp.beta2).powf(t)).sqrt();
        let ops = [
            op(A, grad, Part::Rows(1)),
            op(O, param, Part::Rows(1)),
            op(O2, m, Part::Rows(1)),
            op(O3, v, Part::Rows(1)),
        ];
        let scalars = [
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.eps,
            hp.weight_decay,
            bc1 as f32,
            bc2_sqrt as f32,
        ];
        let pipe = &self.pipes.adamw;
        let l = Launch::new(OP, pipe, param.len(), 1, &ops).scalars(&scalars);
        self.launch(enc, l)
    }

    /// `dst = src` (same number of elements) with a buffer copy.
    pub fn copy(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dst: &GpuTensor,
        src: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "copy";
        if dst.len() != src.len() {
            return Err(GpuError::Shape {
                op: OP,
                detail: format!("copying {} values into {}", src.len(), dst.len()),
            });
        }
        Self::check_alias(OP, &[dst.buffer()], &[src.buffer()])?;
        if src.is_empty() {
            return self.ctx.check_lost();
        }
        self.record(OP, || {
            enc.copy_buffer_to_buffer(src.buffer(), 0, dst.buffer(), 0, src.len() as u64 * 4);
            Ok(())
        })
    }
}
