//! The compute kernels: pipelines built once per [`Kernels`], each op recording into a caller's encoder.
//!
//! One module per shader family, mirroring `shaders/`: `matmul` (matmul.wgsl), `elementwise`
//! (elementwise.wgsl) and `rows` (rows.wgsl); `dispatch` holds what they share (binding ranges, row blocks,
//! the bind-group cache and the one dispatch path) and `profile` the GPU timestamps.
//!
//! Conventions shared by every op:
//! - Outputs come first in the argument list, then inputs, then scalars.
//! - `beta` accumulates: `out = (new value) + beta · out`. With `beta == 0` the output is never read, so it may
//!   hold anything (NaN included) beforehand.
//! - An output may not be the same tensor as another operand ([`GpuError::Aliasing`]); the ops that are in place
//!   by nature ([`Kernels::affine`], [`Kernels::fill`], [`Kernels::add_row_broadcast`], [`Kernels::axpby`]'s `y`)
//!   say so.
//! - Shapes are checked on the host ([`GpuError::Shape`]); wgpu errors become [`GpuError`] through error scopes.
//! - A matrix above the storage binding limit ([`GpuContext::binding_limit`]) is split into row blocks bound at
//!   offsets aligned to `min_storage_buffer_offset_alignment`; reductions over blocks accumulate. Only a single
//!   row above the limit is refused.
//!
//! All non-matmul shaders share one `Params` uniform and one bind-group layout (slot 0 uniform, 1–3 read-only
//! f32, 4 read-only u32, 5–7 read-write f32), declared once in `shaders/prelude.wgsl`; unused slots get small
//! dummy buffers.

mod dispatch;
mod elementwise;
mod matmul;
mod profile;
mod rows;

use std::sync::atomic::{AtomicU64, Ordering};

use super::{GpuContext, GpuError};
use dispatch::{BindKey, A, IDX, O3};
use profile::Profiler;

pub use elementwise::AdamW;
pub use matmul::{bench_matmul, MatmulKernel, MatmulTiming, Trans};
pub use rows::XentOut;

/// What `elementwise.wgsl` and `rows.wgsl` open with (the shared uniform and bindings); prepended to them here
/// so that the layout is written once and both always agree with it.
pub const PRELUDE: &str = include_str!("../../../shaders/prelude.wgsl");

/// The shader sources, by file name, as compiled into the binary (the prelude already prepended where a shader
/// uses it).
pub const SHADERS: [(&str, &str); 3] = [
    ("matmul.wgsl", include_str!("../../../shaders/matmul.wgsl")),
    (
        "elementwise.wgsl",
        concat!(
            include_str!("../../../shaders/prelude.wgsl"),
            include_str!("../../../shaders/elementwise.wgsl")
        ),
    ),
    (
        "rows.wgsl",
        concat!(
            include_str!("../../../shaders/prelude.wgsl"),
            include_str!("../../../shaders/rows.wgsl")
        ),
    ),
];

struct Pipes {
    matmul_reg: wgpu::ComputePipeline,
    matmul_tiled: wgpu::ComputePipeline,
    fill: wgpu::ComputePipeline,
    axpby: wgpu::ComputePipeline,
    mul: wgpu::ComputePipeline,
    affine: wgpu::ComputePipeline,
    tanh_fwd: wgpu::ComputePipeline,
    tanh_bwd: wgpu::ComputePipeline,
    exp_fwd: wgpu::ComputePipeline,
    exp_bwd: wgpu::ComputePipeline,
    row_scale: wgpu::ComputePipeline,
    add_row: wgpu::ComputePipeline,
    adamw: wgpu::ComputePipeline,
    l2norm_fwd: wgpu::ComputePipeline,
    l2norm_bwd: wgpu::ComputePipeline,
    xent: wgpu::ComputePipeline,
    row_sum: wgpu::ComputePipeline,
    col_sum: wgpu::ComputePipeline,
    sum_all: wgpu::ComputePipeline,
    gather: wgpu::ComputePipeline,
    seg_sum: wgpu::ComputePipeline,
    seg_expand: wgpu::ComputePipeline,
    seg_rows: wgpu::ComputePipeline,
}

/// Compiled pipelines plus the context they run on. Cheap to share by reference; build one per device.
pub struct Kernels {
    ctx: GpuContext,
    layout: wgpu::BindGroupLayout,
    pipes: Pipes,
    dummy_ro: wgpu::Buffer,
    dummy_rw: [wgpu::Buffer; 3],
    matmul_kernel: MatmulKernel,
    dispatches: AtomicU64,
    profiler: std::sync::Mutex<Option<Profiler>>,
    /// Bind groups (with their uniform buffers) by what they bind: a training step records the same
    /// dispatches on the same buffers every time, and building a uniform buffer and a bind group per dispatch
    /// was most of the host's time per step. Holding a key keeps its buffers alive, so owners of large buffers
    /// call [`Kernels::release_cached_bindings`] when they are done with them.
    bind_cache: std::sync::Mutex<std::collections::HashMap<BindKey, wgpu::BindGroup>>,
}

impl Kernels {
    /// Compiles every shader and pipeline. The context is cloned (it shares the device), including its binding
    /// limit override at this moment.
    pub fn new(ctx: &GpuContext) -> Result<Kernels, GpuError> {
        let ctx = ctx.clone();
        let device = &ctx.device;
        let built = ctx.scoped("compiling the WGSL kernels", || {
            let buffer_entry =
                |binding: usize, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
                    binding: binding as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                };
            let mut entries = vec![buffer_entry(0, wgpu::BufferBindingType::Uniform)];
            for slot in A..=O3 {
                let read_only = slot <= IDX;
                entries.push(buffer_entry(
                    slot,
                    wgpu::BufferBindingType::Storage { read_only },
                ));
            }
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("hegraph kernels"),
                entries: &entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("hegraph kernels"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let modules: Vec<wgpu::ShaderModule> = SHADERS
                .iter()
                .map(|(name, src)| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(name),
                        source: wgpu::ShaderSource::Wgsl((*src).into()),
                    })
                })
                .collect();
            let pipe = |module: usize, entry: &str| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module: &modules[module],
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
            };
            let pipes = Pipes {
                matmul_reg: pipe(0, "matmul_reg"),
                matmul_tiled: pipe(0, "matmul_tiled"),
                fill: pipe(1, "fill"),
                axpby: pipe(1, "axpby"),
                mul: pipe(1, "mul"),
                affine: pipe(1, "affine"),
                tanh_fwd: pipe(1, "tanh_fwd"),
                tanh_bwd: pipe(1, "tanh_bwd"),
                exp_fwd: pipe(1, "exp_fwd"),
                exp_bwd: pipe(1, "exp_bwd"),
                row_scale: pipe(1, "row_scale"),
                add_row: pipe(1, "add_row"),
                adamw: pipe(1, "adamw"),
                l2norm_fwd: pipe(2, "l2norm_fwd"),
                l2norm_bwd: pipe(2, "l2norm_bwd"),
                xent: pipe(2, "xent"),
                row_sum: pipe(2, "row_sum"),
                col_sum: pipe(2, "col_sum"),
                sum_all: pipe(2, "sum_all"),
                gather: pipe(2, "gather"),
                seg_sum: pipe(2, "seg_sum"),
                seg_expand: pipe(2, "seg_expand"),
                seg_rows: pipe(2, "seg_rows"),
            };
            let dummy = |label: &str| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: 16,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            };
            let dummy_ro = dummy("hegraph unused input");
            let dummy_rw = [
                dummy("hegraph unused output 1"),
                dummy("hegraph unused output 2"),
                dummy("hegraph unused output 3"),
            ];
            (layout, pipes, dummy_ro, dummy_rw)
        })?;
        let (layout, pipes, dummy_ro, dummy_rw) = built;
        Ok(Kernels {
            ctx,
            layout,
            pipes,
            dummy_ro,
            dummy_rw,
            matmul_kernel: MatmulKernel::Auto,
            dispatches: AtomicU64::new(0),
            profiler: std::sync::Mutex::new(None),
            bind_cache: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Compute dispatches recorded so far: how many blocks an op was split into, and the per-dispatch overhead
    /// a training step pays.
    pub fn dispatches(&self) -> u64 {
        self.dispatches.load(Ordering::Relaxed)
    }
}
