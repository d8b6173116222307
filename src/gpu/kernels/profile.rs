//! GPU timestamps around each dispatch, for `hegraph bench step`.

use super::Kernels;
use crate::gpu::{GpuError, GpuTensor};

/// The query set and the labels of the passes timed so far, while [`Kernels::start_profiling`] is in effect.
pub(super) struct Profiler {
    set: wgpu::QuerySet,
    capacity: u32,
    labels: Vec<String>,
}

impl Profiler {
    /// The timestamp writes of the next pass, labelled `label`; `None` once the query set is full.
    pub fn next_pass(&mut self, label: &str) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        let i = self.labels.len() as u32;
        (i < self.capacity).then(|| {
            self.labels.push(label.to_string());
            wgpu::ComputePassTimestampWrites {
                query_set: &self.set,
                beginning_of_pass_write_index: Some(2 * i),
                end_of_pass_write_index: Some(2 * i + 1),
            }
        })
    }
}

impl Kernels {
    pub(super) fn profiler(&self) -> std::sync::MutexGuard<'_, Option<Profiler>> {
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

    pub(super) fn is_profiling(&self) -> bool {
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
}
