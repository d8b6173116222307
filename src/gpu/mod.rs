//! The wgpu runtime: a device that reports its failures instead of panicking, f32/u32 matrices living in storage
//! buffers, and the WGSL kernels the adapter's GPU training is written with.
//!
//! Design choices:
//! - Every kernel records into a caller-provided [`wgpu::CommandEncoder`] ([`Kernels`]), so a whole training
//!   step is one command buffer with no readback; only [`GpuTensor::download`] waits for the device.
//! - Failures never panic: wgpu validation and out-of-memory errors raised while an op is recorded are caught
//!   with error scopes ([`GpuContext::scoped`]), anything else lands in an uncaptured-error handler
//!   ([`GpuContext::take_uncaptured_error`]), and a lost device flips [`GpuContext::is_lost`], after which every op
//!   returns [`GpuError::Lost`] so the caller can fall back to the CPU backend.
//! - Matrices larger than the storage binding limit are processed in row blocks bound at aligned offsets; the
//!   limit used for that blocking can be lowered artificially ([`GpuContext::set_binding_limit_override`]) so the
//!   blocked path is exercised on any adapter.

pub mod adapter;
pub mod clip_vision;
pub mod kernels;
pub mod reference;

pub use adapter::{select_backend, BackendRequest, ComputeBackend, GpuHeGraphFactory};
pub use kernels::{bench_matmul, AdamW, Kernels, MatmulKernel, MatmulTiming, Trans, XentOut};

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::linalg::Mat;

/// What can go wrong on the GPU path. Every variant means "use the CPU backend instead" to a caller that has
/// one; the messages say what to do for the person reading them.
#[derive(Debug, Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found; install mesa-vulkan-drivers for a software one (or a GPU driver), \
         or select another backend with HEGRAPH_WGPU_BACKEND=vulkan|gl|metal|dx12 ({0})"
    )]
    NoAdapter(String),
    #[error("the GPU adapter '{adapter}' refused to create a device: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error("the GPU device was lost ({0}); results on it are gone, fall back to the CPU backend")]
    Lost(String),
    #[error("wgpu rejected {what}: {message}")]
    Validation { what: String, message: String },
    #[error("the GPU ran out of memory during {what}: {message}; use smaller batches or the CPU backend")]
    OutOfMemory { what: String, message: String },
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error(
        "{op}: an output must not be the same tensor as another operand of the same op ({detail})"
    )]
    Aliasing { op: &'static str, detail: String },
    #[error(
        "{what} needs {bytes} bytes but this GPU allows at most {limit} bytes per {kind}; \
         use smaller matrices or the CPU backend"
    )]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
        kind: &'static str,
    },
    #[error("reading a result back from the GPU failed: {0}")]
    Readback(String),
}

/// How to pick the adapter for [`GpuContext::new_headless`].
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Which backends to try. `None` honours `HEGRAPH_WGPU_BACKEND`, then wgpu's own `WGPU_BACKEND`, then all.
    pub backends: Option<wgpu::Backends>,
    pub power_preference: wgpu::PowerPreference,
    /// Ask for the software ("fallback") adapter only.
    pub force_fallback_adapter: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            backends: None,
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
        }
    }
}

impl GpuOptions {
    /// Backends from `HEGRAPH_WGPU_BACKEND` (our name, so a user can steer this program alone) or wgpu's
    /// `WGPU_BACKEND`, e.g. `vulkan`, `gl`, `metal`, `dx12`, comma-separated.
    pub fn backends_from_env() -> Option<wgpu::Backends> {
        std::env::var("HEGRAPH_WGPU_BACKEND")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| wgpu::Backends::from_comma_list(&s))
            .or_else(wgpu::Backends::from_env)
    }
}

/// Failures reported by wgpu outside an error scope, and the device-lost state. Shared by every clone of a
/// context, because the callbacks outlive any one of them.
#[derive(Debug, Default)]
struct Health {
    lost: AtomicBool,
    lost_message: Mutex<Option<String>>,
    uncaptured: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a half-written String behind, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A wgpu device and queue plus what the kernels need to know about them. Cloning shares the device.
#[derive(Clone, Debug)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    health: Arc<Health>,
    binding_limit_override: Option<u64>,
}

impl GpuContext {
    fn request_adapter(opts: &GpuOptions) -> Result<wgpu::Adapter, GpuError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(b) = opts.backends.or_else(GpuOptions::backends_from_env) {
            desc.backends = b;
        }
        let instance = wgpu::Instance::new(desc);
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: opts.power_preference,
            force_fallback_adapter: opts.force_fallback_adapter,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| GpuError::NoAdapter(e.to_string()))
    }

    /// The adapter [`GpuContext::new_headless`] would open, without opening a device: enough to decide
    /// between the backends (a software adapter means the CPU) without paying for a device that goes unused.
    pub fn probe_headless(opts: &GpuOptions) -> Result<wgpu::AdapterInfo, GpuError> {
        Ok(Self::request_adapter(opts)?.get_info())
    }

    /// Opens the best adapter with no window. The device gets the adapter's own limits, not wgpu's
    /// conservative defaults, so that large feature matrices fit in one buffer where the hardware allows.
    pub fn new_headless(opts: &GpuOptions) -> Result<GpuContext, GpuError> {
        let adapter = Self::request_adapter(opts)?;
        let info = adapter.get_info();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("hegraph compute"),
            // Timestamps only serve `hegraph bench step`; asked for where the adapter has them.
            required_features: adapter.features() & wgpu::Features::TIMESTAMP_QUERY,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;
        Ok(Self::from_device(device, queue, info))
    }

    /// Wraps a device created elsewhere (eframe's), so the GUI and the training share one GPU.
    ///
    /// This installs the device-lost callback and the uncaptured-error handler, replacing any set before: the
    /// alternative (wgpu's default handler) panics on the first validation error.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
    ) -> GpuContext {
        let health = Arc::new(Health::default());
        let h = Arc::clone(&health);
        device.set_device_lost_callback(move |reason, message| {
            *lock(&h.lost_message) = Some(format!("{reason:?}: {message}"));
            h.lost.store(true, Ordering::SeqCst);
        });
        let h = Arc::clone(&health);
        device.on_uncaptured_error(Arc::new(move |err: wgpu::Error| {
            *lock(&h.uncaptured) = Some(err.to_string());
        }));
        let limits = device.limits();
        GpuContext {
            device,
            queue,
            info,
            limits,
            health,
            binding_limit_override: None,
        }
    }

    /// A CPU rasteriser (llvmpipe/lavapipe, WARP): correct but slow, so callers prefer the CPU backend for speed.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    pub fn backend(&self) -> wgpu::Backend {
        self.info.backend
    }

    /// One line for logs and the GUI, e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    pub fn is_lost(&self) -> bool {
        self.health.lost.load(Ordering::SeqCst)
    }

    /// Why the device was lost, once it is.
    pub fn lost_reason(&self) -> Option<String> {
        lock(&self.health.lost_message).clone()
    }

    /// The last error wgpu reported outside any error scope (e.g. from code that shares the device), cleared by
    /// this call.
    pub fn take_uncaptured_error(&self) -> Option<String> {
        lock(&self.health.uncaptured).take()
    }

    pub(crate) fn check_lost(&self) -> Result<(), GpuError> {
        if self.is_lost() {
            return Err(GpuError::Lost(
                self.lost_reason()
                    .unwrap_or_else(|| "no reason given".to_owned()),
            ));
        }
        Ok(())
    }

    /// Lowers the storage-binding size used to split matrices into row blocks (never raises it above the
    /// device's limit). Exists so tests and users with odd drivers can force the blocked path.
    pub fn set_binding_limit_override(&mut self, bytes: Option<u64>) {
        self.binding_limit_override = bytes;
    }

    /// The largest storage binding, in bytes, the kernels will create.
    pub fn binding_limit(&self) -> u64 {
        let device = self.limits.max_storage_buffer_binding_size;
        match self.binding_limit_override {
            Some(b) => b.min(device),
            None => device,
        }
    }

    /// Runs `f` (which creates resources or records commands) inside validation and out-of-memory error scopes
    /// and turns what they catch into a [`GpuError`]. `what` names the operation for the message.
    pub fn scoped<R>(&self, what: &str, f: impl FnOnce() -> R) -> Result<R, GpuError> {
        self.check_lost()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let verr = pollster::block_on(validation.pop());
        let merr = pollster::block_on(oom.pop());
        self.check_lost()?;
        if let Some(e) = verr {
            return Err(GpuError::Validation {
                what: what.to_owned(),
                message: e.to_string(),
            });
        }
        if let Some(e) = merr {
            return Err(GpuError::OutOfMemory {
                what: what.to_owned(),
                message: e.to_string(),
            });
        }
        Ok(out)
    }

    /// A buffer filled at creation. wgpu's `create_buffer_init` panics when the device is gone (a driver
    /// reset, an unplugged GPU); this returns [`GpuError::Lost`] instead, so training can move to the CPU.
    pub fn buffer_init(
        &self,
        label: &str,
        contents: &[u8],
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer, GpuError> {
        let align = wgpu::COPY_BUFFER_ALIGNMENT;
        let size = (contents.len() as u64).div_ceil(align).max(1) * align;
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: true,
        });
        {
            let mut view = buffer
                .get_mapped_range_mut(..)
                .map_err(|e| GpuError::Lost(self.lost_reason().unwrap_or_else(|| e.to_string())))?;
            view.slice(..contents.len()).copy_from_slice(contents);
        }
        buffer.unmap();
        Ok(buffer)
    }

    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    /// Finishes and submits `encoder`; errors recorded into it (they surface at `finish`) become a [`GpuError`].
    pub fn submit(&self, encoder: wgpu::CommandEncoder) -> Result<wgpu::SubmissionIndex, GpuError> {
        self.scoped("submitting GPU commands", || {
            self.queue.submit(Some(encoder.finish()))
        })
    }

    /// Blocks until everything submitted so far has run.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.check_lost()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| match self.check_lost() {
                Err(lost) => lost,
                Ok(()) => GpuError::Readback(format!("waiting for the GPU failed: {e}")),
            })?;
        self.check_lost()
    }

    fn check_buffer_size(&self, what: &str, bytes: u64) -> Result<(), GpuError> {
        if bytes > self.limits.max_buffer_size {
            return Err(GpuError::TooLarge {
                what: what.to_owned(),
                bytes,
                limit: self.limits.max_buffer_size,
                kind: "buffer",
            });
        }
        Ok(())
    }
}

/// Element types a [`GpuTensor`] can hold: f32 for values, u32 for labels and row indices.
pub trait Element: bytemuck::Pod + Send + Sync + std::fmt::Debug + 'static {
    const NAME: &'static str;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
}

impl Element for u32 {
    const NAME: &'static str = "u32";
}

/// A row-major `rows × cols` matrix in a storage buffer. Not `Clone`: two handles on one buffer would make the
/// aliasing checks of the kernels meaningless. An empty matrix still owns a 4-byte buffer, because wgpu
/// bindings cannot be empty.
#[derive(Debug)]
pub struct GpuTensor<T: Element = f32> {
    buffer: wgpu::Buffer,
    rows: usize,
    cols: usize,
    _elem: PhantomData<T>,
}

/// How many times a download polls for its map callback before giving up (see `download_vec`).
const MAP_ATTEMPTS: usize = 100_000;

const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl<T: Element> GpuTensor<T> {
    fn byte_len(rows: usize, cols: usize) -> u64 {
        (rows as u64) * (cols as u64) * 4
    }

    /// A zero-filled matrix (wgpu zero-initialises new buffers).
    pub fn zeros(ctx: &GpuContext, rows: usize, cols: usize) -> Result<Self, GpuError> {
        let bytes = Self::byte_len(rows, cols);
        let what = format!("a {rows}x{cols} {} matrix", T::NAME);
        ctx.check_buffer_size(&what, bytes)?;
        let buffer = ctx.scoped(&what, || {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hegraph tensor"),
                size: bytes.max(4),
                usage: STORAGE_USAGE,
                mapped_at_creation: false,
            })
        })?;
        Ok(Self {
            buffer,
            rows,
            cols,
            _elem: PhantomData,
        })
    }

    pub fn from_slice(
        ctx: &GpuContext,
        rows: usize,
        cols: usize,
        data: &[T],
    ) -> Result<Self, GpuError> {
        if data.len() != rows * cols {
            return Err(GpuError::Shape {
                op: "GpuTensor::from_slice",
                detail: format!("{} values given for a {rows}x{cols} matrix", data.len()),
            });
        }
        if data.is_empty() {
            return Self::zeros(ctx, rows, cols);
        }
        let what = format!("a {rows}x{cols} {} matrix", T::NAME);
        ctx.check_buffer_size(&what, Self::byte_len(rows, cols))?;
        let buffer = ctx
            .scoped(&what, || {
                ctx.buffer_init("hegraph tensor", bytemuck::cast_slice(data), STORAGE_USAGE)
            })
            .and_then(|b| b)?;
        Ok(Self {
            buffer,
            rows,
            cols,
            _elem: PhantomData,
        })
    }

    /// Replaces the contents through `queue.write_buffer`. Like every queue write it is staged and lands at the
    /// start of the next submission, before that submission's commands.
    pub fn write_slice(&self, ctx: &GpuContext, data: &[T]) -> Result<(), GpuError> {
        if data.len() != self.len() {
            return Err(GpuError::Shape {
                op: "GpuTensor::write",
                detail: format!(
                    "{} values given for a {}x{} matrix",
                    data.len(),
                    self.rows,
                    self.cols
                ),
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        ctx.scoped("writing a matrix to the GPU", || {
            ctx.queue
                .write_buffer(&self.buffer, 0, bytemuck::cast_slice(data))
        })
    }

    /// Copies the matrix back (staging buffer, `map_async`, wait). Submits and waits for all earlier work.
    pub fn download_vec(&self, ctx: &GpuContext) -> Result<Vec<T>, GpuError> {
        let bytes = Self::byte_len(self.rows, self.cols);
        if bytes == 0 {
            ctx.check_lost()?;
            return Ok(Vec::new());
        }
        let staging = ctx.scoped("creating a readback buffer", || {
            let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hegraph readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = ctx.encoder("hegraph readback");
            enc.copy_buffer_to_buffer(&self.buffer, 0, &staging, 0, bytes);
            ctx.queue.submit(Some(enc.finish()));
            staging
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            // The receiver only disappears if this function already returned with an error.
            let _ = tx.send(r);
        });
        // Another thread polling the same device may be the one that runs our callback, possibly just after our
        // own wait returned: keep polling (cheap once the work is done) until the answer arrives.
        let mut answer = None;
        for _ in 0..MAP_ATTEMPTS {
            ctx.wait()?;
            match rx.try_recv() {
                Ok(r) => {
                    answer = Some(r);
                    break;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::yield_now(),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            }
        }
        match answer {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(GpuError::Readback(e.to_string())),
            None => {
                return Err(GpuError::Readback(
                    "wgpu never reported the readback buffer as mapped".to_owned(),
                ));
            }
        }
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            bytemuck::pod_collect_to_vec::<u8, T>(&view)
        };
        staging.unmap();
        Ok(out)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying buffer (for copies or bindings the kernels do not cover).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl GpuTensor<f32> {
    pub fn upload(ctx: &GpuContext, m: &Mat) -> Result<Self, GpuError> {
        Self::from_slice(ctx, m.rows, m.cols, &m.data)
    }

    pub fn write(&self, ctx: &GpuContext, m: &Mat) -> Result<(), GpuError> {
        if m.shape() != self.shape() {
            return Err(GpuError::Shape {
                op: "GpuTensor::write",
                detail: format!(
                    "a {}x{} matrix written into a {}x{} tensor",
                    m.rows, m.cols, self.rows, self.cols
                ),
            });
        }
        self.write_slice(ctx, &m.data)
    }

    pub fn download(&self, ctx: &GpuContext) -> Result<Mat, GpuError> {
        Ok(Mat::from_vec(self.rows, self.cols, self.download_vec(ctx)?))
    }
}
