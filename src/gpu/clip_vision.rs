//! CLIP's image encoder on any GPU wgpu reaches (Vulkan, Metal, DX12, GL), for machines where candle can only
//! use the CPU.
//!
//! The arithmetic is candle-transformers' `clip::vision_model` step by step (same operation order: queries
//! scaled before the dot products, bias before quick-GELU, residual added last, layer norm with ε = 1e-5), so
//! features agree with [`crate::clip::ClipModel::encode_images`] to float rounding. The weights come from the
//! same `model.safetensors` through candle's `VarBuilder` (any float dtype, converted to f32) and stay on the
//! GPU; a batch of images is uploaded once, every activation stays on the GPU between layers, and only the
//! projected features are read back.
//!
//! The kernels ([`ClipVisionKernels`]) are public so they can be tested one by one against a CPU reference.

use std::path::Path;

use bytemuck::{Pod, Zeroable};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{GpuContext, GpuError, GpuTensor, MatmulKernel};
use crate::clip::model::{parse_config, CONFIG_FILE, WEIGHTS_FILE};
use crate::clip::{ClipError, ImageTensor};
use crate::linalg::Mat;

/// The shader source, as compiled into the binary (tests validate it with naga).
pub const SHADER: (&str, &str) = (
    "clip_vision.wgsl",
    include_str!("../../shaders/clip_vision.wgsl"),
);

/// Limits of the attention kernel's workgroup arrays (`MAX_SEQ`, `MAX_HEAD_DIM` in the shader).
pub const MAX_SEQ: usize = 1024;
pub const MAX_HEAD_DIM: usize = 256;
/// candle's CLIP layer-norm epsilon (the loader refuses checkpoints with another one).
pub const LAYER_NORM_EPS: f32 = 1e-5;
/// Images per forward pass, unless the largest activation would not fit one storage binding.
const GPU_CHUNK: usize = 64;
/// Invocations per workgroup of the 1-D kernels (im2col, embed).
const FLAT_WG: u64 = 256;

const FLAG_BIAS: u32 = 1;
const FLAG_GELU: u32 = 2;
const FLAG_RESIDUAL: u32 = 4;

/// The uniform `P` of clip_vision.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    seq: u32,
    heads: u32,
    head_dim: u32,
    patch: u32,
    grid: u32,
    image: u32,
    in_stride: u32,
    groups_x: u32,
    scale: f32,
    eps: f32,
    _pad: [u32; 2],
}

struct Pipes {
    linear_tiled: wgpu::ComputePipeline,
    linear_reg: wgpu::ComputePipeline,
    im2col: wgpu::ComputePipeline,
    embed: wgpu::ComputePipeline,
    layer_norm: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
}

/// The compiled kernels of clip_vision.wgsl on one device. Every op records into the caller's encoder, so a
/// whole forward pass is one submission.
pub struct ClipVisionKernels {
    ctx: GpuContext,
    layout: wgpu::BindGroupLayout,
    pipes: Pipes,
    /// Bound to the read-only slots an op does not use.
    dummy: wgpu::Buffer,
    matmul: MatmulKernel,
}

/// Converts a size to the shader's u32, refusing what does not fit.
fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::Shape {
        op,
        detail: format!("{what} = {v} does not fit the shader's 32-bit indices"),
    })
}

fn shape_err(op: &'static str, detail: String) -> GpuError {
    GpuError::Shape { op, detail }
}

impl ClipVisionKernels {
    pub fn new(ctx: &GpuContext) -> Result<Self, GpuError> {
        let ctx = ctx.clone();
        let device = &ctx.device;
        let (layout, pipes, dummy) = ctx.scoped("compiling the CLIP vision kernels", || {
            let buffer = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            };
            let mut entries = vec![buffer(0, wgpu::BufferBindingType::Uniform)];
            for slot in 1..=4 {
                entries.push(buffer(
                    slot,
                    wgpu::BufferBindingType::Storage { read_only: true },
                ));
            }
            entries.push(buffer(
                5,
                wgpu::BufferBindingType::Storage { read_only: false },
            ));
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("clip vision"),
                entries: &entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("clip vision"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(SHADER.0),
                source: wgpu::ShaderSource::Wgsl(SHADER.1.into()),
            });
            let pipe = |entry: &str| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
            };
            let pipes = Pipes {
                linear_tiled: pipe("linear_tiled"),
                linear_reg: pipe("linear_reg"),
                im2col: pipe("im2col"),
                embed: pipe("embed"),
                layer_norm: pipe("layer_norm"),
                attention: pipe("attention"),
            };
            let dummy = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("clip vision unused input"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            });
            (layout, pipes, dummy)
        })?;
        Ok(Self {
            ctx,
            layout,
            pipes,
            dummy,
            matmul: MatmulKernel::Auto,
        })
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Which linear-layer shader runs ([`MatmulKernel::Auto`]: register tiling on a software adapter, shared
    /// memory tiling on a real GPU).
    pub fn set_matmul_kernel(&mut self, kernel: MatmulKernel) {
        self.matmul = kernel;
    }

    fn tiled(&self) -> bool {
        match self.matmul {
            MatmulKernel::Auto => !self.ctx.is_software(),
            MatmulKernel::Register => false,
            MatmulKernel::Tiled => true,
        }
    }

    fn check_binding(&self, what: &str, t: &GpuTensor) -> Result<(), GpuError> {
        let bytes = t.len() as u64 * 4;
        let limit = self.ctx.binding_limit();
        if bytes > limit {
            return Err(GpuError::TooLarge {
                what: what.to_owned(),
                bytes,
                limit,
                kind: "storage binding",
            });
        }
        Ok(())
    }

    /// Records one dispatch; `inputs` fill slots 1–4 (dummies where `None`), `out` slot 5.
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipe: &wgpu::ComputePipeline,
        label: &'static str,
        params: &Params,
        inputs: [Option<&GpuTensor>; 4],
        out: &GpuTensor,
        groups: (u32, u32, u32),
    ) -> Result<(), GpuError> {
        for t in inputs.iter().flatten() {
            if t.buffer() == out.buffer() {
                return Err(GpuError::Aliasing {
                    op: label,
                    detail: "the output is also bound as an input".into(),
                });
            }
            self.check_binding(label, t)?;
        }
        self.check_binding(label, out)?;
        let uniform = self.ctx.buffer_init(
            label,
            bytemuck::bytes_of(params),
            wgpu::BufferUsages::UNIFORM,
        )?;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, t) in inputs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: t.map_or(&self.dummy, |t| t.buffer()).as_entire_binding(),
            });
        }
        entries.push(wgpu::BindGroupEntry {
            binding: 5,
            resource: out.buffer().as_entire_binding(),
        });
        let group = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout: &self.layout,
                entries: &entries,
            });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipe);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        Ok(())
    }

    /// Workgroups for `n` units of 1-D work: x up to the device's per-dimension limit, the rest along y.
    fn flat_groups(&self, op: &'static str, n: u64) -> Result<(u32, u32), GpuError> {
        let max = u64::from(self.ctx.limits.max_compute_workgroups_per_dimension.max(1));
        let x = n.clamp(1, max);
        let y = n.div_ceil(x).max(1);
        if y > max {
            return Err(shape_err(
                op,
                format!("{n} workgroups exceed this GPU's dispatch limits"),
            ));
        }
        Ok((x as u32, y as u32))
    }

    /// `out = act(x · wᵀ + bias) + residual`: a PyTorch linear layer (`w` is `[out, in]`), optionally followed
    /// by quick-GELU and a residual add. `out` must not be an input.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        w: &GpuTensor,
        bias: Option<&GpuTensor>,
        residual: Option<&GpuTensor>,
        gelu: bool,
    ) -> Result<(), GpuError> {
        const OP: &str = "clip linear";
        let (m, k) = x.shape();
        let n = w.rows();
        if w.cols() != k || out.shape() != (m, n) {
            return Err(shape_err(
                OP,
                format!(
                    "x {m}x{k}, w {}x{}, out {}x{}: want w Nx{k} and out {m}xN",
                    w.rows(),
                    w.cols(),
                    out.rows(),
                    out.cols()
                ),
            ));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(shape_err(
                    OP,
                    format!("bias has {} values for {n} outputs", b.len()),
                ));
            }
        }
        if let Some(r) = residual {
            if r.shape() != (m, n) {
                return Err(shape_err(
                    OP,
                    format!("residual is {}x{}, want {m}x{n}", r.rows(), r.cols()),
                ));
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let mut flags = 0;
        if bias.is_some() {
            flags |= FLAG_BIAS;
        }
        if gelu {
            flags |= FLAG_GELU;
        }
        if residual.is_some() {
            flags |= FLAG_RESIDUAL;
        }
        let params = Params {
            m: u32_of(OP, "rows", m)?,
            n: u32_of(OP, "columns", n)?,
            k: u32_of(OP, "inner dimension", k)?,
            flags,
            ..Default::default()
        };
        let (pipe, block) = if self.tiled() {
            (&self.pipes.linear_tiled, 64)
        } else {
            (&self.pipes.linear_reg, 32)
        };
        let groups = (
            u32_of(OP, "column blocks", n.div_ceil(block))?,
            u32_of(OP, "row blocks", m.div_ceil(block))?,
            1,
        );
        self.dispatch(
            enc,
            pipe,
            OP,
            &params,
            [Some(x), Some(w), bias, residual],
            out,
            groups,
        )
    }

    /// Unfolds `images` (`B × 3·S·S`, CHW) into patch rows `B·(S/p)² × 3·p·p` in the order of a flattened
    /// `[hidden, 3, p, p]` convolution weight.
    pub fn im2col(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        images: &GpuTensor,
        image_size: usize,
        patch: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "clip im2col";
        if patch == 0
            || !image_size.is_multiple_of(patch)
            || images.cols() != 3 * image_size * image_size
        {
            return Err(shape_err(
                OP,
                format!(
                    "{}-value rows are not {image_size}x{image_size} RGB images cut into {patch}-pixel patches",
                    images.cols()
                ),
            ));
        }
        let grid = image_size / patch;
        let rows = images.rows() * grid * grid;
        let cols = 3 * patch * patch;
        if out.shape() != (rows, cols) {
            return Err(shape_err(
                OP,
                format!("out is {}x{}, want {rows}x{cols}", out.rows(), out.cols()),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let (gx, gy) = self.flat_groups(OP, (rows as u64 * cols as u64).div_ceil(FLAT_WG))?;
        let params = Params {
            m: u32_of(OP, "rows", rows)?,
            n: u32_of(OP, "columns", cols)?,
            patch: patch as u32,
            grid: grid as u32,
            image: u32_of(OP, "image size", image_size)?,
            groups_x: gx,
            ..Default::default()
        };
        self.dispatch(
            enc,
            &self.pipes.im2col,
            OP,
            &params,
            [Some(images), None, None, None],
            out,
            (gx, gy, 1),
        )
    }

    /// Token embeddings `B·seq × hidden`: `class` (`1 × hidden`) then the `seq − 1` patch embeddings of each
    /// image (`patches`, `B·(seq − 1) × hidden`), each plus its row of `positions` (`seq × hidden`).
    pub fn embed(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        patches: &GpuTensor,
        class: &GpuTensor,
        positions: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "clip embed";
        let (seq, hidden) = positions.shape();
        if seq < 1
            || class.len() != hidden
            || patches.cols() != hidden
            || !patches.rows().is_multiple_of(seq - 1)
        {
            return Err(shape_err(
                OP,
                format!(
                    "patches {}x{}, class {} values, positions {seq}x{hidden} do not fit together",
                    patches.rows(),
                    patches.cols(),
                    class.len()
                ),
            ));
        }
        let images = patches.rows().checked_div(seq - 1).unwrap_or(0);
        let rows = images * seq;
        if out.shape() != (rows, hidden) {
            return Err(shape_err(
                OP,
                format!("out is {}x{}, want {rows}x{hidden}", out.rows(), out.cols()),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let (gx, gy) = self.flat_groups(OP, (rows as u64 * hidden as u64).div_ceil(FLAT_WG))?;
        let params = Params {
            m: u32_of(OP, "rows", rows)?,
            n: u32_of(OP, "hidden size", hidden)?,
            seq: u32_of(OP, "tokens", seq)?,
            groups_x: gx,
            ..Default::default()
        };
        self.dispatch(
            enc,
            &self.pipes.embed,
            OP,
            &params,
            [Some(patches), Some(class), Some(positions), None],
            out,
            (gx, gy, 1),
        )
    }

    /// Layer norm of rows `0, stride, 2·stride, …` of `x` into consecutive rows of `out` (stride 1: every
    /// row; stride = tokens per image: the class tokens only).
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        stride: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "clip layer norm";
        let n = x.cols();
        let rows = if stride == 0 {
            0
        } else {
            x.rows().div_ceil(stride)
        };
        if stride == 0 || gamma.len() != n || beta.len() != n || out.shape() != (rows, n) {
            return Err(shape_err(
                OP,
                format!(
                    "x {}x{n} with stride {stride}, gamma {}, beta {}, out {}x{}: want out {rows}x{n}",
                    x.rows(),
                    gamma.len(),
                    beta.len(),
                    out.rows(),
                    out.cols()
                ),
            ));
        }
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (gx, gy) = self.flat_groups(OP, rows as u64)?;
        let params = Params {
            m: u32_of(OP, "rows", rows)?,
            n: u32_of(OP, "columns", n)?,
            in_stride: u32_of(OP, "stride", stride)?,
            groups_x: gx,
            eps,
            ..Default::default()
        };
        self.dispatch(
            enc,
            &self.pipes.layer_norm,
            OP,
            &params,
            [Some(x), Some(gamma), Some(beta), None],
            out,
            (gx, gy, 1),
        )
    }

    /// Unmasked multi-head self-attention: `qkv` is `B·seq × 3·hidden` (queries, keys, values side by side),
    /// `out` is `B·seq × hidden`; queries are multiplied by `head_dim^-½` first.
    pub fn attention(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        qkv: &GpuTensor,
        seq: usize,
        heads: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "clip attention";
        let hidden = out.cols();
        if seq == 0
            || heads == 0
            || !hidden.is_multiple_of(heads)
            || qkv.cols() != 3 * hidden
            || qkv.rows() != out.rows()
            || !out.rows().is_multiple_of(seq)
        {
            return Err(shape_err(
                OP,
                format!(
                    "qkv {}x{}, out {}x{hidden}, {seq} tokens, {heads} heads do not fit together",
                    qkv.rows(),
                    qkv.cols(),
                    out.rows()
                ),
            ));
        }
        let head_dim = hidden / heads;
        if seq > MAX_SEQ || head_dim > MAX_HEAD_DIM {
            return Err(shape_err(
                OP,
                format!(
                    "{seq} tokens of {head_dim}-wide heads; the kernel holds at most {MAX_SEQ} tokens and \
                     {MAX_HEAD_DIM}-wide heads"
                ),
            ));
        }
        let images = out.rows() / seq;
        if images == 0 {
            return Ok(());
        }
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as usize;
        if images > max || heads > max || seq > max {
            return Err(shape_err(
                OP,
                format!("{images} images exceed this GPU's dispatch limits"),
            ));
        }
        let params = Params {
            n: u32_of(OP, "hidden size", hidden)?,
            seq: seq as u32,
            heads: heads as u32,
            head_dim: head_dim as u32,
            scale: (head_dim as f64).powf(-0.5) as f32,
            ..Default::default()
        };
        self.dispatch(
            enc,
            &self.pipes.attention,
            OP,
            &params,
            [Some(qkv), None, None, None],
            out,
            (seq as u32, heads as u32, images as u32),
        )
    }
}

/// The sizes of a vision tower, from `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VisionDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
}

impl VisionDims {
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: the class token and one per patch.
    pub fn seq(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

struct Layer {
    ln1_w: GpuTensor,
    ln1_b: GpuTensor,
    /// q, k and v projections stacked: `3·hidden × hidden`.
    qkv_w: GpuTensor,
    qkv_b: GpuTensor,
    out_w: GpuTensor,
    out_b: GpuTensor,
    ln2_w: GpuTensor,
    ln2_b: GpuTensor,
    fc1_w: GpuTensor,
    fc1_b: GpuTensor,
    fc2_w: GpuTensor,
    fc2_b: GpuTensor,
}

/// The vision tower of one checkpoint, resident on one GPU.
pub struct ClipVisionGpu {
    kernels: ClipVisionKernels,
    dims: VisionDims,
    patch_w: GpuTensor,
    class: GpuTensor,
    positions: GpuTensor,
    pre_w: GpuTensor,
    pre_b: GpuTensor,
    layers: Vec<Layer>,
    post_w: GpuTensor,
    post_b: GpuTensor,
    projection: GpuTensor,
}

impl std::fmt::Debug for ClipVisionGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipVisionGpu")
            .field("adapter", &self.kernels.ctx.describe())
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

/// Reads tensors out of a checkpoint by name, as f32 rows.
struct Loader<'a> {
    vb: VarBuilder<'a>,
    ctx: &'a GpuContext,
    path: &'a Path,
}

impl Loader<'_> {
    fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ClipError> {
        let err = |e: candle_core::Error| ClipError::Weights {
            path: self.path.to_path_buf(),
            msg: format!("{name}: {e} (config.json does not describe these weights)"),
        };
        let t: Tensor = self.vb.get(shape, name).map_err(err)?;
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(err)
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<GpuTensor, ClipError> {
        Ok(GpuTensor::from_slice(self.ctx, rows, cols, data)?)
    }

    /// A `rows × cols` matrix (a vector when `rows == 1` and the stored tensor is 1-D).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<GpuTensor, ClipError> {
        let data = self.host(name, &[rows, cols])?;
        self.upload(rows, cols, &data)
    }

    fn vector(&self, name: &str, len: usize) -> Result<GpuTensor, ClipError> {
        let data = self.host(name, &[len])?;
        self.upload(1, len, &data)
    }
}

impl ClipVisionGpu {
    /// Loads the vision tower of the Hugging Face CLIP directory `dir` onto `ctx`'s GPU. The config is
    /// checked as [`crate::clip::ClipModel::load`] checks it.
    pub fn load(ctx: &GpuContext, dir: &Path) -> Result<Self, ClipError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| ClipError::Io {
            path: config_path.clone(),
            source,
        })?;
        let parsed = parse_config(&text).map_err(|msg| ClipError::Config {
            path: config_path.clone(),
            msg,
        })?;
        let v = &parsed.clip.vision_config;
        let dims = VisionDims {
            hidden: v.embed_dim,
            intermediate: v.intermediate_size,
            layers: v.num_hidden_layers,
            heads: v.num_attention_heads,
            image_size: v.image_size,
            patch_size: v.patch_size,
            projection_dim: parsed.projection_dim,
        };
        if dims.seq() > MAX_SEQ || dims.hidden / dims.heads > MAX_HEAD_DIM {
            return Err(ClipError::Config {
                path: config_path,
                msg: format!(
                    "the GPU image encoder handles at most {MAX_SEQ} tokens and {MAX_HEAD_DIM}-wide heads; \
                     this checkpoint has {} tokens and {}-wide heads (use --clip-device cpu)",
                    dims.seq(),
                    dims.hidden / dims.heads
                ),
            });
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        // SAFETY: as in `ClipModel::load`: the mapping lives only while the tensors are copied out of it (the
        // VarBuilder is dropped before this function returns), and a model directory's weights are not
        // truncated by another process meanwhile.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&weights_path),
                DType::F32,
                &Device::Cpu,
            )
        }
        .map_err(|e| ClipError::Weights {
            path: weights_path.clone(),
            msg: format!("{e} (the file looks damaged or incomplete)"),
        })?;
        let kernels = ClipVisionKernels::new(ctx)?;
        let l = Loader {
            vb,
            ctx,
            path: &weights_path,
        };
        let (h, i, p) = (dims.hidden, dims.intermediate, dims.patch_size);
        let patch_w = l.upload(
            h,
            3 * p * p,
            &l.host(
                "vision_model.embeddings.patch_embedding.weight",
                &[h, 3, p, p],
            )?,
        )?;
        let class = l.vector("vision_model.embeddings.class_embedding", h)?;
        let positions = l.matrix(
            "vision_model.embeddings.position_embedding.weight",
            dims.seq(),
            h,
        )?;
        let pre_w = l.vector("vision_model.pre_layrnorm.weight", h)?;
        let pre_b = l.vector("vision_model.pre_layrnorm.bias", h)?;
        let mut layers = Vec::with_capacity(dims.layers);
        for n in 0..dims.layers {
            let pre = format!("vision_model.encoder.layers.{n}");
            let attn = |part: &str| format!("{pre}.self_attn.{part}");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for proj in ["q_proj", "k_proj", "v_proj"] {
                qkv_w.extend(l.host(&attn(&format!("{proj}.weight")), &[h, h])?);
                qkv_b.extend(l.host(&attn(&format!("{proj}.bias")), &[h])?);
            }
            layers.push(Layer {
                ln1_w: l.vector(&format!("{pre}.layer_norm1.weight"), h)?,
                ln1_b: l.vector(&format!("{pre}.layer_norm1.bias"), h)?,
                qkv_w: l.upload(3 * h, h, &qkv_w)?,
                qkv_b: l.upload(1, 3 * h, &qkv_b)?,
                out_w: l.matrix(&attn("out_proj.weight"), h, h)?,
                out_b: l.vector(&attn("out_proj.bias"), h)?,
                ln2_w: l.vector(&format!("{pre}.layer_norm2.weight"), h)?,
                ln2_b: l.vector(&format!("{pre}.layer_norm2.bias"), h)?,
                fc1_w: l.matrix(&format!("{pre}.mlp.fc1.weight"), i, h)?,
                fc1_b: l.vector(&format!("{pre}.mlp.fc1.bias"), i)?,
                fc2_w: l.matrix(&format!("{pre}.mlp.fc2.weight"), h, i)?,
                fc2_b: l.vector(&format!("{pre}.mlp.fc2.bias"), h)?,
            });
        }
        let post_w = l.vector("vision_model.post_layernorm.weight", h)?;
        let post_b = l.vector("vision_model.post_layernorm.bias", h)?;
        let projection = l.matrix("visual_projection.weight", dims.projection_dim, h)?;
        Ok(Self {
            kernels,
            dims,
            patch_w,
            class,
            positions,
            pre_w,
            pre_b,
            layers,
            post_w,
            post_b,
            projection,
        })
    }

    pub fn dims(&self) -> VisionDims {
        self.dims
    }

    pub fn context(&self) -> &GpuContext {
        &self.kernels.ctx
    }

    /// See [`ClipVisionKernels::set_matmul_kernel`].
    pub fn set_matmul_kernel(&mut self, kernel: MatmulKernel) {
        self.kernels.set_matmul_kernel(kernel);
    }

    /// Images per forward pass: [`GPU_CHUNK`], fewer when the MLP's activation would exceed a binding.
    fn chunk(&self) -> usize {
        let per_image =
            (self.dims.seq() * self.dims.intermediate.max(3 * self.dims.hidden)) as u64 * 4;
        let fit = self.kernels.ctx.binding_limit() / per_image.max(1);
        (fit as usize).clamp(1, GPU_CHUNK)
    }

    /// One L2-normalised row per image, as [`crate::clip::ClipModel::encode_images`] gives.
    pub fn encode_images(&self, images: &[ImageTensor]) -> Result<Mat, ClipError> {
        let s = self.dims.image_size;
        for (i, t) in images.iter().enumerate() {
            if t.size != s || t.data.len() != 3 * s * s {
                return Err(ClipError::Input(format!(
                    "image {i} is a {}-pixel tensor with {} values, but this model takes {s}×{s} RGB \
                     (preprocess with the model's image_size)",
                    t.size,
                    t.data.len()
                )));
            }
        }
        let mut data = Vec::with_capacity(images.len() * self.dims.projection_dim);
        for chunk in images.chunks(self.chunk()) {
            data.extend(self.forward(chunk)?);
        }
        let mut m = Mat::from_vec(images.len(), self.dims.projection_dim, data);
        m.l2_normalize_rows();
        Ok(m)
    }

    /// The unnormalised projected features of one chunk, `images.len() × projection_dim` values.
    fn forward(&self, images: &[ImageTensor]) -> Result<Vec<f32>, ClipError> {
        let ctx = &self.kernels.ctx;
        let d = self.dims;
        let b = images.len();
        let (h, seq, pix) = (d.hidden, d.seq(), 3 * d.image_size * d.image_size);
        let tokens = b * seq;
        let mut pixels = Vec::with_capacity(b * pix);
        for t in images {
            pixels.extend_from_slice(&t.data);
        }
        let input = GpuTensor::from_slice(ctx, b, pix, &pixels)?;
        let patches = GpuTensor::zeros(ctx, b * (seq - 1), 3 * d.patch_size * d.patch_size)?;
        let patch_emb = GpuTensor::zeros(ctx, b * (seq - 1), h)?;
        let embedded = GpuTensor::zeros(ctx, tokens, h)?;
        // The residual stream alternates between x and x2 (an output is never also an input).
        let x = GpuTensor::zeros(ctx, tokens, h)?;
        let x2 = GpuTensor::zeros(ctx, tokens, h)?;
        let normed = GpuTensor::zeros(ctx, tokens, h)?;
        let qkv = GpuTensor::zeros(ctx, tokens, 3 * h)?;
        let attended = GpuTensor::zeros(ctx, tokens, h)?;
        let hidden = GpuTensor::zeros(ctx, tokens, d.intermediate)?;
        let pooled = GpuTensor::zeros(ctx, b, h)?;
        let features = GpuTensor::zeros(ctx, b, d.projection_dim)?;
        let k = &self.kernels;
        let eps = LAYER_NORM_EPS;
        let mut enc = ctx.encoder("clip vision forward");
        ctx.scoped("encoding images on the GPU", || -> Result<(), GpuError> {
            k.im2col(&mut enc, &patches, &input, d.image_size, d.patch_size)?;
            k.linear(
                &mut enc,
                &patch_emb,
                &patches,
                &self.patch_w,
                None,
                None,
                false,
            )?;
            k.embed(
                &mut enc,
                &embedded,
                &patch_emb,
                &self.class,
                &self.positions,
            )?;
            k.layer_norm(&mut enc, &x, &embedded, &self.pre_w, &self.pre_b, 1, eps)?;
            for l in &self.layers {
                k.layer_norm(&mut enc, &normed, &x, &l.ln1_w, &l.ln1_b, 1, eps)?;
                k.linear(
                    &mut enc,
                    &qkv,
                    &normed,
                    &l.qkv_w,
                    Some(&l.qkv_b),
                    None,
                    false,
                )?;
                k.attention(&mut enc, &attended, &qkv, seq, d.heads)?;
                k.linear(
                    &mut enc,
                    &x2,
                    &attended,
                    &l.out_w,
                    Some(&l.out_b),
                    Some(&x),
                    false,
                )?;
                k.layer_norm(&mut enc, &normed, &x2, &l.ln2_w, &l.ln2_b, 1, eps)?;
                k.linear(
                    &mut enc,
                    &hidden,
                    &normed,
                    &l.fc1_w,
                    Some(&l.fc1_b),
                    None,
                    true,
                )?;
                k.linear(
                    &mut enc,
                    &x,
                    &hidden,
                    &l.fc2_w,
                    Some(&l.fc2_b),
                    Some(&x2),
                    false,
                )?;
            }
            k.layer_norm(&mut enc, &pooled, &x, &self.post_w, &self.post_b, seq, eps)?;
            k.linear(
                &mut enc,
                &features,
                &pooled,
                &self.projection,
                None,
                None,
                false,
            )
        })??;
        ctx.submit(enc)?;
        Ok(features.download_vec(ctx)?)
    }
}
