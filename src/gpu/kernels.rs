//! The compute kernels: pipelines built once per [`Kernels`], each op recording into a caller's encoder.
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
//! f32, 4 read-only u32, 5–7 read-write f32); unused slots get small dummy buffers.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytemuck::{Pod, Zeroable};

use super::{GpuContext, GpuError, GpuTensor};

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

/// The uniform shared by elementwise.wgsl and rows.wgsl (field meaning per entry point is in the shaders).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    flag: u32,
    off: [u32; 7], // off_a, off_b, off_c, off_i, off_o, off_o2, off_o3 (slots 1..=7)
    r0: u32,
    r1: u32,
    total: u32,
    _pad: [u32; 2],
    s: [f32; 7],
    nan: f32,
}

impl Params {
    fn new() -> Self {
        Self {
            nan: f32::NAN,
            ..Default::default()
        }
    }
}

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

// Binding slots of the shared layout.
const A: usize = 1;
const B: usize = 2;
const C: usize = 3;
const IDX: usize = 4;
const O: usize = 5;
const O2: usize = 6;
const O3: usize = 7;
const SLOTS: usize = 8;

const WG: u64 = 64;

/// A bound byte range of a buffer.
#[derive(Clone, Copy)]
struct Range<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: u64,
}

/// How an operand of a row-blocked op is bound.
#[derive(Clone, Copy)]
enum Part {
    /// `per_row` elements for each row of the block.
    Rows(usize),
    /// The first `len` elements, whole, for every block.
    Whole(usize),
}

struct Operand<'a> {
    slot: usize,
    buffer: &'a wgpu::Buffer,
    part: Part,
}

fn op<'a, T: super::Element>(slot: usize, t: &'a GpuTensor<T>, part: Part) -> Operand<'a> {
    Operand {
        slot,
        buffer: t.buffer(),
        part,
    }
}

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

/// The shader sources, by file name, as compiled into the binary.
pub const SHADERS: [(&str, &str); 3] = [
    ("matmul.wgsl", include_str!("../../shaders/matmul.wgsl")),
    (
        "elementwise.wgsl",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("rows.wgsl", include_str!("../../shaders/rows.wgsl")),
];

/// What a bind group binds: the uniform's bytes and each slot's buffer range (`None`: the slot's dummy).
#[derive(Clone, PartialEq, Eq, Hash)]
struct BindKey {
    params: Vec<u8>,
    slots: [Option<(wgpu::Buffer, u64, u64)>; SLOTS],
}

/// Above this many cached bind groups the cache starts again (a training step needs about 60, plus three per
/// step for AdamW, whose learning rate changes every step).
const BIND_CACHE_LIMIT: usize = 8192;

/// GPU timestamps around each dispatch, while [`Kernels::start_profiling`] is in effect.
struct Profiler {
    set: wgpu::QuerySet,
    capacity: u32,
    labels: Vec<String>,
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
            let storage = |binding: u32, read_only: bool| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            };
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }];
            for slot in A..=IDX {
                entries.push(storage(slot as u32, true));
            }
            for slot in O..=O3 {
                entries.push(storage(slot as u32, false));
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

    fn profiler(&self) -> std::sync::MutexGuard<'_, Option<Profiler>> {
        match self.profiler.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Times each of the next `max_dispatches` dispatches on the GPU itself (timestamp queries around each
    /// compute pass), for `hegraph bench step`. Returns false, and times nothing, when the device was opened
    /// without [`wgpu::Features::TIMESTAMP_QUERY`].
    pub fn start_profiling(&self, max_dispatches: u32) -> bool {
        if !self
            .ctx
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            || max_dispatches == 0
        {
            return false;
        }
        let set = self.ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("hegraph profile"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * max_dispatches,
        });
        *self.profiler() = Some(Profiler {
            set,
            capacity: max_dispatches,
            labels: Vec::new(),
        });
        true
    }

    fn is_profiling(&self) -> bool {
        self.profiler().is_some()
    }

    /// Stops profiling and returns each timed dispatch's label and GPU milliseconds, in recording order.
    /// Waits for the GPU.
    pub fn finish_profiling(&self) -> Result<Vec<(String, f64)>, GpuError> {
        let Some(p) = self.profiler().take() else {
            return Ok(Vec::new());
        };
        let n = p.labels.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = 16 * n as u64;
        let resolved = self.ctx.scoped("reading GPU timestamps", || {
            let resolve = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hegraph timestamps"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let out = GpuTensor::<u32>::zeros(&self.ctx, 2 * n, 2)?;
            let mut enc = self.ctx.encoder("hegraph timestamps");
            enc.resolve_query_set(&p.set, 0..2 * n as u32, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, out.buffer(), 0, bytes);
            self.ctx.queue.submit(Some(enc.finish()));
            Ok::<_, GpuError>(out)
        })??;
        let words = resolved.download_vec(&self.ctx)?;
        let tick_ns = f64::from(self.ctx.queue.get_timestamp_period());
        let stamp = |i: usize| u64::from(words[2 * i]) | (u64::from(words[2 * i + 1]) << 32);
        Ok(p.labels
            .into_iter()
            .enumerate()
            .map(|(i, label)| {
                let ticks = stamp(2 * i + 1).saturating_sub(stamp(2 * i));
                (label, ticks as f64 * tick_ns * 1e-6)
            })
            .collect())
    }

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

    // ---------------------------------------------------------------------------------------------------------
    // Plumbing

    fn align(&self) -> u64 {
        u64::from(self.ctx.limits.min_storage_buffer_offset_alignment.max(4))
    }

    /// Elements one binding may hold once the alignment slack of an arbitrary start is paid for.
    fn max_elems(&self) -> usize {
        let usable = self.ctx.binding_limit().saturating_sub(self.align()) / 4;
        usable.clamp(1, u64::from(u32::MAX) / 2) as usize
    }

    /// Binds elements `[e0, e1)` of `buffer`: the byte offset is rounded down to the alignment and the
    /// remainder returned as an element offset for the shader. An empty range binds the first 4 bytes.
    fn range<'a>(&self, buffer: &'a wgpu::Buffer, e0: usize, e1: usize) -> (Range<'a>, u32) {
        let align = self.align();
        let start = e0 as u64 * 4;
        let offset = start / align * align;
        let end = (e1 as u64 * 4).max(offset + 4).min(buffer.size());
        let offset = offset.min(end.saturating_sub(4));
        (
            Range {
                buffer,
                offset,
                size: end - offset,
            },
            ((start - offset) / 4) as u32,
        )
    }

    fn grid(&self, op: &'static str, groups: u64) -> Result<(u32, u32), GpuError> {
        let max = u64::from(self.ctx.limits.max_compute_workgroups_per_dimension.max(1));
        let gx = groups.min(max);
        let gy = groups.div_ceil(gx.max(1));
        if gy > max {
            return Err(GpuError::TooLarge {
                what: format!("{op} with {groups} workgroups"),
                bytes: groups,
                limit: max * max,
                kind: "dispatch (workgroups, not bytes)",
            });
        }
        Ok((gx as u32, gy as u32))
    }

    fn bind_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<BindKey, wgpu::BindGroup>> {
        match self.bind_cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Forgets the cached bind groups, and with them the references they hold to buffers (a training's
    /// feature matrices, for instance), so that dropped tensors free their memory.
    pub fn release_cached_bindings(&self) {
        self.bind_cache().clear();
    }

    /// A uniform buffer holding `params` and a bind group over it and `binds` (dummies where `None`).
    fn create_bind_group<P: Pod>(
        &self,
        label: &str,
        params: &P,
        binds: &[Option<Range<'_>>; SLOTS],
    ) -> Result<wgpu::BindGroup, GpuError> {
        let uniform = self.ctx.buffer_init(
            label,
            bytemuck::bytes_of(params),
            wgpu::BufferUsages::UNIFORM,
        )?;
        let mut entries = Vec::with_capacity(SLOTS);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        });
        for (slot, bind) in binds.iter().enumerate().skip(1) {
            let resource = match bind {
                Some(r) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: r.buffer,
                    offset: r.offset,
                    size: NonZeroU64::new(r.size),
                }),
                None if slot < O => self.dummy_ro.as_entire_binding(),
                None => self.dummy_rw[slot - O].as_entire_binding(),
            };
            entries.push(wgpu::BindGroupEntry {
                binding: slot as u32,
                resource,
            });
        }
        Ok(self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout: &self.layout,
                entries: &entries,
            }))
    }

    fn dispatch<P: Pod>(
        &self,
        enc: &mut wgpu::CommandEncoder,
        pipe: &wgpu::ComputePipeline,
        label: &str,
        params: &P,
        binds: &[Option<Range<'_>>; SLOTS],
        groups: (u32, u32),
    ) -> Result<(), GpuError> {
        let key = BindKey {
            params: bytemuck::bytes_of(params).to_vec(),
            slots: std::array::from_fn(|slot| {
                binds[slot].map(|r| (r.buffer.clone(), r.offset, r.size))
            }),
        };
        let cached = self.bind_cache().get(&key).cloned();
        let bind_group = match cached {
            Some(g) => g,
            None => {
                let g = self.create_bind_group(label, params, binds)?;
                let mut cache = self.bind_cache();
                if cache.len() >= BIND_CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(key, g.clone());
                g
            }
        };
        let mut profiler = self.profiler();
        let timestamp_writes = profiler.as_mut().and_then(|p| {
            let i = p.labels.len() as u32;
            (i < p.capacity).then(|| {
                p.labels.push(label.to_string());
                wgpu::ComputePassTimestampWrites {
                    query_set: &p.set,
                    beginning_of_pass_write_index: Some(2 * i),
                    end_of_pass_write_index: Some(2 * i + 1),
                }
            })
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes,
        });
        pass.set_pipeline(pipe);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records `f` inside the context's error scopes after checking the device is alive.
    fn record(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        self.ctx.scoped(what, f)?
    }

    /// Rows per block such that every row-blocked operand fits one binding.
    fn rows_per_block(
        &self,
        op: &'static str,
        operands: &[Operand<'_>],
    ) -> Result<usize, GpuError> {
        let max = self.max_elems();
        let mut rows = usize::MAX;
        for o in operands {
            let (per_row, what) = match o.part {
                Part::Rows(c) => (c, "one row"),
                Part::Whole(len) => (len, "a whole operand"),
            };
            if per_row > max {
                return Err(GpuError::TooLarge {
                    what: format!("{op}: {what} of {per_row} values"),
                    bytes: per_row as u64 * 4,
                    limit: self.ctx.binding_limit(),
                    kind: "storage binding",
                });
            }
            if let Part::Rows(c) = o.part {
                if let Some(fit) = max.checked_div(c) {
                    rows = rows.min(fit);
                }
            }
        }
        Ok(rows.max(1))
    }

    /// Runs one dispatch per row block of `rows` rows. `per_block(r0, r1)` gives the block's params (offsets
    /// are filled in here) and workgroup count.
    fn by_rows(
        &self,
        enc: &mut wgpu::CommandEncoder,
        op: &'static str,
        pipe: &wgpu::ComputePipeline,
        rows: usize,
        operands: &[Operand<'_>],
        per_block: impl Fn(usize, usize) -> (Params, u64),
    ) -> Result<(), GpuError> {
        self.by_rows_with(enc, op, pipe, rows, operands, None, per_block)
    }

    fn check_alias(
        op: &'static str,
        outputs: &[&wgpu::Buffer],
        others: &[&wgpu::Buffer],
    ) -> Result<(), GpuError> {
        for (i, o) in outputs.iter().enumerate() {
            let clash = outputs[i + 1..].iter().chain(others.iter()).any(|b| b == o);
            if clash {
                return Err(GpuError::Aliasing {
                    op,
                    detail: format!("output #{} is also bound as another operand", i + 1),
                });
            }
        }
        Ok(())
    }

    fn same_shape(
        op: &'static str,
        want: (usize, usize),
        named: &[(&str, (usize, usize))],
    ) -> Result<(), GpuError> {
        for (name, shape) in named {
            if *shape != want {
                return Err(GpuError::Shape {
                    op,
                    detail: format!(
                        "{name} is {}x{} but {}x{} was expected",
                        shape.0, shape.1, want.0, want.1
                    ),
                });
            }
        }
        Ok(())
    }

    fn flat_groups(n: usize) -> u64 {
        (n as u64).div_ceil(WG)
    }

    // ---------------------------------------------------------------------------------------------------------
    // Matmul

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

    // ---------------------------------------------------------------------------------------------------------
    // Element-wise

    fn flat(
        &self,
        enc: &mut wgpu::CommandEncoder,
        op: &'static str,
        pipe: &wgpu::ComputePipeline,
        n: usize,
        operands: &[Operand<'_>],
        scalars: &[f32],
    ) -> Result<(), GpuError> {
        self.record(op, || {
            self.by_rows(enc, op, pipe, n, operands, |r0, r1| {
                let mut p = Params::new();
                p.n = (r1 - r0) as u32;
                p.rows = p.n;
                p.cols = 1;
                p.s[..scalars.len()].copy_from_slice(scalars);
                (p, Self::flat_groups(r1 - r0))
            })
        })
    }

    /// `out = value` everywhere (in place).
    pub fn fill(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        value: f32,
    ) -> Result<(), GpuError> {
        let ops = [op(O, out, Part::Rows(1))];
        self.flat(enc, "fill", &self.pipes.fill, out.len(), &ops, &[value])
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
        const OP: &str = "axpby";
        Self::same_shape(OP, y.shape(), &[("x", x.shape())])?;
        Self::check_alias(OP, &[y.buffer()], &[x.buffer()])?;
        let ops = [op(A, x, Part::Rows(1)), op(O, y, Part::Rows(1))];
        self.flat(enc, OP, &self.pipes.axpby, y.len(), &ops, &[a, b])
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
        const OP: &str = "mul";
        Self::same_shape(OP, out.shape(), &[("x", x.shape()), ("y", y.shape())])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer(), y.buffer()])?;
        let ops = [
            op(A, x, Part::Rows(1)),
            op(B, y, Part::Rows(1)),
            op(O, out, Part::Rows(1)),
        ];
        self.flat(enc, OP, &self.pipes.mul, out.len(), &ops, &[alpha, beta])
    }

    /// `y = scale · y + shift` in place (scaling, adding a scalar, or both).
    pub fn affine(
        &self,
        enc: &mut wgpu::CommandEncoder,
        y: &GpuTensor,
        scale: f32,
        shift: f32,
    ) -> Result<(), GpuError> {
        let ops = [op(O, y, Part::Rows(1))];
        self.flat(
            enc,
            "affine",
            &self.pipes.affine,
            y.len(),
            &ops,
            &[scale, shift],
        )
    }

    /// `out = tanh(x)`, computed through `exp(−2|x|)` so that large inputs saturate to ±1 instead of NaN.
    pub fn tanh(
        &self,
        enc: &mut wgpu::CommandEncoder,
        out: &GpuTensor,
        x: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "tanh";
        Self::same_shape(OP, out.shape(), &[("x", x.shape())])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer()])?;
        let ops = [op(A, x, Part::Rows(1)), op(O, out, Part::Rows(1))];
        self.flat(enc, OP, &self.pipes.tanh_fwd, out.len(), &ops, &[])
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
        const OP: &str = "tanh_backward";
        Self::same_shape(OP, dx.shape(), &[("g", g.shape()), ("y", y.shape())])?;
        Self::check_alias(OP, &[dx.buffer()], &[g.buffer(), y.buffer()])?;
        let ops = [
            op(A, g, Part::Rows(1)),
            op(B, y, Part::Rows(1)),
            op(O, dx, Part::Rows(1)),
        ];
        self.flat(enc, OP, &self.pipes.tanh_bwd, dx.len(), &ops, &[0.0, beta])
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
        const OP: &str = "exp_affine";
        Self::same_shape(OP, out.shape(), &[("x", x.shape())])?;
        Self::check_alias(OP, &[out.buffer()], &[x.buffer()])?;
        let ops = [op(A, x, Part::Rows(1)), op(O, out, Part::Rows(1))];
        self.flat(
            enc,
            OP,
            &self.pipes.exp_fwd,
            out.len(),
            &ops,
            &[sharpness, 0.0, shift],
        )
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
        const OP: &str = "exp_affine_backward";
        Self::same_shape(OP, dx.shape(), &[("g", g.shape()), ("y", y.shape())])?;
        Self::check_alias(OP, &[dx.buffer()], &[g.buffer(), y.buffer()])?;
        let ops = [
            op(A, g, Part::Rows(1)),
            op(B, y, Part::Rows(1)),
            op(O, dx, Part::Rows(1)),
        ];
        self.flat(
            enc,
            OP,
            &self.pipes.exp_bwd,
            dx.len(),
            &ops,
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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.row_scale, x.rows(), &ops, |r0, r1| {
                let mut p = Params::new();
                p.n = ((r1 - r0) * cols) as u32;
                p.rows = (r1 - r0) as u32;
                p.cols = cols as u32;
                p.s[0] = alpha;
                p.s[1] = beta;
                (p, Self::flat_groups((r1 - r0) * cols))
            })
        })
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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.add_row, x.rows(), &ops, |r0, r1| {
                let mut p = Params::new();
                p.n = ((r1 - r0) * cols) as u32;
                p.rows = (r1 - r0) as u32;
                p.cols = cols as u32;
                p.s[0] = alpha;
                (p, Self::flat_groups((r1 - r0) * cols))
            })
        })
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
        self.flat(enc, OP, &self.pipes.adamw, param.len(), &ops, &scalars)
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

    // ---------------------------------------------------------------------------------------------------------
    // Row-wise

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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.l2norm_fwd, x.rows(), &ops, |r0, r1| {
                let mut p = Params::new();
                p.rows = (r1 - r0) as u32;
                p.cols = cols as u32;
                p.s[0] = eps;
                (p, (r1 - r0) as u64)
            })
        })
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
        self.record(OP, || {
            self.by_rows(
                enc,
                OP,
                &self.pipes.l2norm_bwd,
                dx.rows(),
                &ops,
                |r0, r1| {
                    let mut p = Params::new();
                    p.rows = (r1 - r0) as u32;
                    p.cols = cols as u32;
                    p.s[0] = eps;
                    p.s[1] = beta;
                    (p, (r1 - r0) as u64)
                },
            )
        })
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
            self.by_rows(enc, OP, &self.pipes.xent, rows, &ops, |r0, r1| {
                let mut p = Params::new();
                p.rows = (r1 - r0) as u32;
                p.cols = cols as u32;
                p.flag = u32::from(out.grad.is_some());
                p.s[0] = out.grad_scale;
                (p, (r1 - r0) as u64)
            })?;
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
        self.by_rows(enc, OP, &self.pipes.sum_all, x.len(), &ops, |r0, r1| {
            let mut p = Params::new();
            p.n = (r1 - r0) as u32;
            p.s[0] = alpha;
            p.s[1] = if r0 == 0 { beta } else { 1.0 };
            (p, 1)
        })
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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.col_sum, x.rows(), &ops, |r0, r1| {
                let mut p = Params::new();
                p.rows = (r1 - r0) as u32;
                p.cols = cols as u32;
                p.s[0] = alpha;
                p.s[1] = if r0 == 0 { beta } else { 1.0 };
                (p, Self::flat_groups(cols))
            })
        })
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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.row_sum, rows, &ops, |r0, r1| {
                let mut p = Params::new();
                p.rows = (r1 - r0) as u32;
                p.cols = cols as u32;
                p.s[0] = alpha;
                p.s[1] = beta;
                (p, (r1 - r0) as u64)
            })
        })
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
                self.by_rows_with(
                    enc,
                    OP,
                    &self.pipes.gather,
                    out.rows(),
                    &ops,
                    Some((A, src_range, src_off)),
                    |r0, r1| {
                        let mut p = Params::new();
                        p.n = ((r1 - r0) * cols) as u32;
                        p.rows = (r1 - r0) as u32;
                        p.cols = cols as u32;
                        p.r0 = s0 as u32;
                        p.r1 = s1 as u32;
                        p.total = total as u32;
                        (p, Self::flat_groups((r1 - r0) * cols))
                    },
                )?;
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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.seg_sum, rows, &ops, |r0, r1| {
                let mut p = Params::new();
                p.n = ((r1 - r0) * c) as u32;
                p.cols = c as u32;
                p.total = m as u32;
                p.s[0] = alpha;
                p.s[1] = beta;
                (p, Self::flat_groups((r1 - r0) * c))
            })
        })
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
        self.record(OP, || {
            self.by_rows(enc, OP, &self.pipes.seg_expand, rows, &ops, |r0, r1| {
                let mut p = Params::new();
                p.n = ((r1 - r0) * m) as u32;
                p.cols = m as u32;
                p.total = c as u32;
                p.s[0] = alpha;
                p.s[1] = beta;
                (p, Self::flat_groups((r1 - r0) * m))
            })
        })
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

    /// [`Kernels::by_rows`] with an optional extra operand bound at a fixed range for every block.
    #[allow(clippy::too_many_arguments)]
    fn by_rows_with(
        &self,
        enc: &mut wgpu::CommandEncoder,
        op: &'static str,
        pipe: &wgpu::ComputePipeline,
        rows: usize,
        operands: &[Operand<'_>],
        fixed: Option<(usize, Range<'_>, u32)>,
        per_block: impl Fn(usize, usize) -> (Params, u64),
    ) -> Result<(), GpuError> {
        if rows == 0 {
            return Ok(());
        }
        let step = self.rows_per_block(op, operands)?;
        let mut r0 = 0;
        while r0 < rows {
            let r1 = rows.min(r0.saturating_add(step));
            let (mut params, groups) = per_block(r0, r1);
            let mut binds: [Option<Range<'_>>; SLOTS] = [None; SLOTS];
            if let Some((slot, range, off)) = fixed {
                binds[slot] = Some(range);
                params.off[slot - 1] = off;
            }
            for o in operands {
                let (e0, e1) = match o.part {
                    Part::Rows(c) => (r0 * c, r1 * c),
                    Part::Whole(len) => (0, len),
                };
                let (range, off) = self.range(o.buffer, e0, e1);
                binds[o.slot] = Some(range);
                params.off[o.slot - 1] = off;
            }
            if groups > 0 {
                let grid = self.grid(op, groups)?;
                self.dispatch(enc, pipe, op, &params, &binds, grid)?;
            }
            r0 = r1;
        }
        Ok(())
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
