//! What every kernel family shares: binding byte ranges at aligned offsets, the cut of an op into row blocks
//! that fit one binding, the bind-group cache, and the one path by which a dispatch is recorded
//! ([`Kernels::dispatch`]; row-blocked ops reach it through [`Kernels::launch`]).

use std::num::NonZeroU64;
use std::sync::atomic::Ordering;

use bytemuck::{Pod, Zeroable};

use super::Kernels;
use crate::gpu::{Element, GpuError, GpuTensor};

/// The uniform of `shaders/prelude.wgsl` (field meaning per entry point is in the shaders).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(super) struct Params {
    pub n: u32,
    pub rows: u32,
    pub cols: u32,
    pub flag: u32,
    pub off: [u32; 7], // off_a, off_b, off_c, off_i, off_o, off_o2, off_o3 (slots 1..=7)
    pub r0: u32,
    pub r1: u32,
    pub total: u32,
    pub _pad: [u32; 2],
    pub s: [f32; 7],
    pub nan: f32,
}

impl Params {
    pub fn new() -> Self {
        Self {
            nan: f32::NAN,
            ..Default::default()
        }
    }
}

// Binding slots of the shared layout.
pub(super) const A: usize = 1;
pub(super) const B: usize = 2;
pub(super) const C: usize = 3;
pub(super) const IDX: usize = 4;
pub(super) const O: usize = 5;
pub(super) const O2: usize = 6;
pub(super) const O3: usize = 7;
pub(super) const SLOTS: usize = 8;

/// Invocations per workgroup of the flat (one invocation per element) entry points.
const WG: u64 = 64;

/// A bound byte range of a buffer.
#[derive(Clone, Copy)]
pub(super) struct Range<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

/// How an operand of a row-blocked op is bound.
#[derive(Clone, Copy)]
pub(super) enum Part {
    /// `per_row` elements for each row of the block.
    Rows(usize),
    /// The first `len` elements, whole, for every block.
    Whole(usize),
}

pub(super) struct Operand<'a> {
    slot: usize,
    buffer: &'a wgpu::Buffer,
    part: Part,
}

pub(super) fn op<'a, T: Element>(slot: usize, t: &'a GpuTensor<T>, part: Part) -> Operand<'a> {
    Operand {
        slot,
        buffer: t.buffer(),
        part,
    }
}

/// What a bind group binds: the uniform's bytes and each slot's buffer range (`None`: the slot's dummy).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct BindKey {
    params: Vec<u8>,
    slots: [Option<(wgpu::Buffer, u64, u64)>; SLOTS],
}

/// Above this many cached bind groups the cache starts again (a training step needs about 60, plus three per
/// step for AdamW, whose learning rate changes every step).
const BIND_CACHE_LIMIT: usize = 8192;

/// How many workgroups one block of rows needs.
#[derive(Clone, Copy)]
pub(super) enum Groups {
    /// One invocation per element of the block (`rows × cols`), [`WG`] to a workgroup.
    PerElement,
    /// One workgroup per row: the row-wise reductions.
    PerRow,
    /// One invocation per column, however many rows the block has: the column sums.
    PerColumn,
    /// A single workgroup per block: the full sum.
    One,
}

/// A row-blocked op as [`Kernels::launch`] runs it: `rows` rows walked in blocks that fit one binding, each
/// block's [`Params`] holding `n = block rows × cols`, `rows = block rows`, `cols`, `flag`, `total`, the
/// scalars in `s`, and each operand's element offset.
pub(super) struct Launch<'a> {
    op: &'static str,
    pipe: &'a wgpu::ComputePipeline,
    rows: usize,
    cols: usize,
    operands: &'a [Operand<'a>],
    scalars: [f32; 7],
    groups: Groups,
    flag: u32,
    total: usize,
    accumulate: bool,
    source: Option<(Range<'a>, u32, usize, usize)>,
}

impl<'a> Launch<'a> {
    pub fn new(
        op: &'static str,
        pipe: &'a wgpu::ComputePipeline,
        rows: usize,
        cols: usize,
        operands: &'a [Operand<'a>],
    ) -> Self {
        Self {
            op,
            pipe,
            rows,
            cols,
            operands,
            scalars: [0.0; 7],
            groups: Groups::PerElement,
            flag: 0,
            total: 0,
            accumulate: false,
            source: None,
        }
    }

    /// `s0, s1, …` of every block (at most seven).
    pub fn scalars(mut self, scalars: &[f32]) -> Self {
        for (s, &v) in self.scalars.iter_mut().zip(scalars) {
            *s = v;
        }
        self
    }

    pub fn groups(mut self, groups: Groups) -> Self {
        self.groups = groups;
        self
    }

    pub fn flag(mut self, flag: bool) -> Self {
        self.flag = u32::from(flag);
        self
    }

    pub fn total(mut self, total: usize) -> Self {
        self.total = total;
        self
    }

    /// The op reduces over its blocks into one output, so `s1` (its `beta`) applies to the first block only
    /// and later blocks add with 1.
    pub fn accumulate(mut self) -> Self {
        self.accumulate = true;
        self
    }

    /// Binds rows `[s0, s1)` of a matrix at slot `A` for every block (`r0`, `r1` in the params): the gather,
    /// which walks its source in blocks of its own.
    pub fn source(mut self, range: Range<'a>, offset: u32, s0: usize, s1: usize) -> Self {
        self.source = Some((range, offset, s0, s1));
        self
    }
}

impl Kernels {
    fn align(&self) -> u64 {
        u64::from(self.ctx.limits.min_storage_buffer_offset_alignment.max(4))
    }

    /// Elements one binding may hold once the alignment slack of an arbitrary start is paid for.
    pub(super) fn max_elems(&self) -> usize {
        let usable = self.ctx.binding_limit().saturating_sub(self.align()) / 4;
        usable.clamp(1, u64::from(u32::MAX) / 2) as usize
    }

    /// Binds elements `[e0, e1)` of `buffer`: the byte offset is rounded down to the alignment and the
    /// remainder returned as an element offset for the shader. An empty range binds the first 4 bytes.
    pub(super) fn range<'a>(
        &self,
        buffer: &'a wgpu::Buffer,
        e0: usize,
        e1: usize,
    ) -> (Range<'a>, u32) {
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

    /// A 2-D grid of `groups` workgroups (x wraps at the per-dimension limit).
    pub(super) fn grid(&self, op: &'static str, groups: u64) -> Result<(u32, u32), GpuError> {
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

    /// Workgroups of [`WG`] invocations for `n` elements.
    pub(super) fn flat_groups(n: usize) -> u64 {
        (n as u64).div_ceil(WG)
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

    /// Records one compute pass: the (cached) bind group over `params` and `binds`, the pipeline, `groups`
    /// workgroups, and the pass's timestamps while profiling.
    pub(super) fn dispatch<P: Pod>(
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
        let timestamp_writes = profiler.as_mut().and_then(|p| p.next_pass(label));
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
    pub(super) fn record(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        self.ctx.scoped(what, f)?
    }

    /// Rows per block such that every row-blocked operand fits one binding.
    pub(super) fn rows_per_block(
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

    pub(super) fn check_alias(
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

    pub(super) fn same_shape(
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

    /// Records a row-blocked op inside the context's error scopes.
    pub(super) fn launch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        l: Launch<'_>,
    ) -> Result<(), GpuError> {
        self.record(l.op, || self.launch_in_scope(enc, l))
    }

    /// [`Kernels::launch`] for a caller already inside an error scope: one dispatch per row block.
    pub(super) fn launch_in_scope(
        &self,
        enc: &mut wgpu::CommandEncoder,
        l: Launch<'_>,
    ) -> Result<(), GpuError> {
        if l.rows == 0 {
            return Ok(());
        }
        let step = self.rows_per_block(l.op, l.operands)?;
        let mut r0 = 0;
        while r0 < l.rows {
            let r1 = l.rows.min(r0.saturating_add(step));
            let block = r1 - r0;
            let mut p = Params::new();
            p.n = (block * l.cols) as u32;
            p.rows = block as u32;
            p.cols = l.cols as u32;
            p.flag = l.flag;
            p.total = l.total as u32;
            p.s = l.scalars;
            if l.accumulate && r0 > 0 {
                p.s[1] = 1.0;
            }
            let mut binds: [Option<Range<'_>>; SLOTS] = [None; SLOTS];
            if let Some((range, off, s0, s1)) = l.source {
                binds[A] = Some(range);
                p.off[A - 1] = off;
                (p.r0, p.r1) = (s0 as u32, s1 as u32);
            }
            for o in l.operands {
                let (e0, e1) = match o.part {
                    Part::Rows(c) => (r0 * c, r1 * c),
                    Part::Whole(len) => (0, len),
                };
                let (range, off) = self.range(o.buffer, e0, e1);
                binds[o.slot] = Some(range);
                p.off[o.slot - 1] = off;
            }
            let groups = match l.groups {
                Groups::PerElement => Self::flat_groups(block * l.cols),
                Groups::PerRow => block as u64,
                Groups::PerColumn => Self::flat_groups(l.cols),
                Groups::One => 1,
            };
            if groups > 0 {
                let grid = self.grid(l.op, groups)?;
                self.dispatch(enc, l.pipe, l.op, &p, &binds, grid)?;
            }
            r0 = r1;
        }
        Ok(())
    }
}
