//! HeGraphAdapter training on wgpu, and the choice between it and the CPU backend.
//!
//! The step reproduces the CPU reference of [`crate::adapter::hegraph`] (same frozen inputs, same initial
//! weights, same AdamW rule) with a hand-written backward pass, so that one training step is one command
//! buffer: the graph forward (`N'`, `P'`, `B`, `X'`), the batch's text and cache logits, both cross-entropies,
//! the backward pass to `W_P`, `W_N`, `W_V`, and the three AdamW updates. Nothing is read back except the
//! loss, and only when the driver asks for it.
//!
//! The cache logits `ℓ_c = s · exp(β_c (z norm(X')ᵀ − 1)) · L` never form the one-hot label matrix `L`
//! (`M×C`): the backend keeps the cache sorted by class (the sums over cache entries do not depend on their
//! order), so `· L` is a sum over each class's contiguous segment and `Lᵀ ·` a gather
//! ([`Kernels::segment_sums`], [`Kernels::segment_expand`], [`Kernels::segment_row_sums`]). As dense
//! matmuls these four products were three quarters of the arithmetic of a step at 1000 classes × 16 shots.
//!
//! A step that produces a non-finite loss cannot be undone on the device; the driver's last snapshot
//! (taken every `snapshot_every` steps) is then the state that survives.

use std::collections::HashMap;
use std::sync::Arc;

use super::kernels::{AdamW, Kernels, Trans, XentOut};
use super::{GpuContext, GpuError, GpuOptions, GpuTensor};
use crate::adapter::hegraph::{
    CandleFactory, FrozenInputs, HeGraphHyper, HeGraphState, ParamState,
};
use crate::adapter::{AdapterError, BackendChoice, BackendFactory, HeGraphBackend, TrainParams};
use crate::graph::HeteroGraph;
use crate::linalg::Mat;

/// What the person asked for (`--backend`, `HEGRAPH_BACKEND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendRequest {
    /// wgpu on a real GPU; the CPU backend when the only adapter is a software one (lavapipe, WARP), which is
    /// slower than the CPU path for these sizes.
    #[default]
    Auto,
    Cpu,
    /// The CPU with candle's autodiff instead of the hand-written step: slower, for cross-checking.
    Candle,
    Wgpu,
}

impl std::str::FromStr for BackendRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "candle" => Ok(Self::Candle),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            other => Err(format!(
                "unknown backend `{other}` (auto, cpu, candle or wgpu)"
            )),
        }
    }
}

/// The backend a run trains on.
pub enum ComputeBackend {
    Cpu {
        /// Why the GPU was not used, when it was not asked for explicitly.
        reason: Option<String>,
    },
    Candle(CandleFactory),
    Wgpu(GpuHeGraphFactory),
}

impl ComputeBackend {
    pub fn describe(&self) -> String {
        match self {
            ComputeBackend::Cpu { reason: None } => "CPU".to_string(),
            ComputeBackend::Cpu { reason: Some(r) } => format!("CPU ({r})"),
            ComputeBackend::Candle(_) => "CPU (candle autodiff)".to_string(),
            ComputeBackend::Wgpu(f) => format!("wgpu: {}", f.kernels.context().describe()),
        }
    }

    pub fn choice(&self) -> BackendChoice<'_> {
        match self {
            ComputeBackend::Cpu { .. } => BackendChoice::Cpu,
            ComputeBackend::Candle(f) => BackendChoice::Custom(f),
            ComputeBackend::Wgpu(f) => BackendChoice::Custom(f),
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, ComputeBackend::Wgpu(_))
    }
}

/// Picks the training backend (module docs of [`BackendRequest`]).
pub fn select_backend(req: BackendRequest) -> Result<ComputeBackend, GpuError> {
    match req {
        BackendRequest::Cpu => Ok(ComputeBackend::Cpu { reason: None }),
        BackendRequest::Candle => Ok(ComputeBackend::Candle(CandleFactory)),
        BackendRequest::Wgpu => {
            let ctx = GpuContext::new_headless(&GpuOptions::default())?;
            Ok(ComputeBackend::Wgpu(GpuHeGraphFactory::new(Arc::new(ctx))?))
        }
        BackendRequest::Auto => {
            let opts = GpuOptions::default();
            let no_gpu = |e: GpuError| ComputeBackend::Cpu {
                reason: Some(format!("no GPU: {e}")),
            };
            // The adapter's type decides; a device is opened only when it will be used.
            match GpuContext::probe_headless(&opts) {
                Ok(info) if info.device_type == wgpu::DeviceType::Cpu => Ok(ComputeBackend::Cpu {
                    reason: Some(format!(
                        "the only GPU adapter, {}, is a software one",
                        info.name
                    )),
                }),
                Ok(_) => match GpuContext::new_headless(&opts) {
                    Ok(ctx) => Ok(ComputeBackend::Wgpu(GpuHeGraphFactory::new(Arc::new(ctx))?)),
                    Err(e) => Ok(no_gpu(e)),
                },
                Err(e) => Ok(no_gpu(e)),
            }
        }
    }
}

/// Builds [`GpuHeGraph`] backends on one device (the GUI passes eframe's).
pub struct GpuHeGraphFactory {
    kernels: Arc<Kernels>,
}

impl GpuHeGraphFactory {
    pub fn new(ctx: Arc<GpuContext>) -> Result<Self, GpuError> {
        Ok(Self {
            kernels: Arc::new(Kernels::new(&ctx)?),
        })
    }

    pub fn kernels(&self) -> &Arc<Kernels> {
        &self.kernels
    }
}

impl BackendFactory for GpuHeGraphFactory {
    fn name(&self) -> String {
        format!("wgpu ({})", self.kernels.context().describe())
    }

    fn create(
        &self,
        graph: &HeteroGraph,
        queries: &Mat,
        params: &TrainParams,
        state: HeGraphState,
    ) -> Result<Box<dyn HeGraphBackend>, AdapterError> {
        let frozen = FrozenInputs::new(graph)?;
        Ok(Box::new(
            GpuHeGraph::new(self.kernels.clone(), &frozen, queries, params, state)
                .map_err(gpu_err)?,
        ))
    }
}

fn gpu_err(e: GpuError) -> AdapterError {
    match e {
        GpuError::Lost(msg) => AdapterError::DeviceLost(msg),
        other => AdapterError::Backend {
            backend: "wgpu".into(),
            msg: other.to_string(),
        },
    }
}

struct Param {
    w: GpuTensor,
    m: GpuTensor,
    v: GpuTensor,
    g: GpuTensor,
}

impl Param {
    fn new(ctx: &GpuContext, s: &ParamState) -> Result<Self, GpuError> {
        Ok(Self {
            w: GpuTensor::upload(ctx, &s.w)?,
            m: GpuTensor::upload(ctx, &s.m)?,
            v: GpuTensor::upload(ctx, &s.v)?,
            g: GpuTensor::zeros(ctx, s.w.rows, s.w.cols)?,
        })
    }

    fn download(&self, ctx: &GpuContext) -> Result<ParamState, GpuError> {
        Ok(ParamState {
            w: self.w.download(ctx)?,
            m: self.m.download(ctx)?,
            v: self.v.download(ctx)?,
        })
    }
}

/// The negative-node part of the graph, present only with negative text features.
struct Negative {
    n: GpuTensor,
    h_np: GpuTensor,
    h_nv: GpuTensor,
    pn_self: GpuTensor,
    a_pn: GpuTensor,
    param: Param,
    // activations and gradients, C×D
    t1: GpuTensor,
    t2: GpuTensor,
    n_prime: GpuTensor,
    h_pn: GpuTensor,
    u3: GpuTensor,
    d_hpn: GpuTensor,
    d_nprime: GpuTensor,
}

/// Per-batch-size buffers (a training run has at most two sizes: full batches and the last one).
struct BatchBufs {
    idx: GpuTensor<u32>,
    labels: GpuTensor<u32>,
    z: GpuTensor,
    lt: GpuTensor,
    s: GpuTensor,
    e: GpuTensor,
    lc: GpuTensor,
    d_lt: GpuTensor,
    d_lc: GpuTensor,
    d_e: GpuTensor,
    d_s: GpuTensor,
    row_loss: GpuTensor,
}

pub struct GpuHeGraph {
    k: Arc<Kernels>,
    hyper: HeGraphHyper,
    adam: AdamW,
    step: u64,
    c: usize,
    d: usize,
    m: usize,
    // frozen inputs
    p: GpuTensor,
    h_pp: GpuTensor,
    h_pv: GpuTensor,
    h_vv: GpuTensor,
    /// The cache keys sorted by class.
    keys: GpuTensor,
    /// The class of each sorted key (M).
    key_labels: GpuTensor<u32>,
    /// Class segment offsets of the sorted keys (C + 1), on the device and here.
    offsets: GpuTensor<u32>,
    host_offsets: Vec<u32>,
    queries: GpuTensor,
    neg: Option<Negative>,
    w_p: Param,
    w_v: Param,
    // C×D work buffers
    pre: GpuTensor,
    u1: GpuTensor,
    u2: GpuTensor,
    p_prime: GpuTensor,
    p_norm: GpuTensor,
    p_norms: GpuTensor,
    b: GpuTensor,
    d_pn: GpuTensor,
    d_pprime: GpuTensor,
    d_b: GpuTensor,
    gpre: GpuTensor,
    // M×D work buffers
    x_prime: GpuTensor,
    x_norm: GpuTensor,
    x_norms: GpuTensor,
    d_xn: GpuTensor,
    d_xprime: GpuTensor,
    loss: GpuTensor,
    batches: HashMap<usize, BatchBufs>,
}

impl GpuHeGraph {
    pub fn new(
        k: Arc<Kernels>,
        f: &FrozenInputs,
        queries: &Mat,
        params: &TrainParams,
        state: HeGraphState,
    ) -> Result<Self, GpuError> {
        let ctx = k.context();
        let (c, d, m) = (f.num_classes, f.dim, f.keys.rows);
        let sorted = f.cache_by_class().map_err(|e| GpuError::Shape {
            op: "hegraph",
            detail: e.to_string(),
        })?;
        let zeros = |r: usize, cc: usize| GpuTensor::zeros(ctx, r, cc);
        let neg = match (
            &f.n,
            &f.h_np,
            &f.h_nv,
            &f.pn_self,
            &f.a_pn,
            state.n.as_ref(),
        ) {
            (Some(n), Some(h_np), Some(h_nv), Some(pn_self), Some(a_pn), Some(sn)) => {
                Some(Negative {
                    n: GpuTensor::upload(ctx, n)?,
                    h_np: GpuTensor::upload(ctx, h_np)?,
                    h_nv: GpuTensor::upload(ctx, h_nv)?,
                    pn_self: GpuTensor::upload(ctx, pn_self)?,
                    a_pn: GpuTensor::upload(ctx, a_pn)?,
                    param: Param::new(ctx, sn)?,
                    t1: zeros(c, d)?,
                    t2: zeros(c, d)?,
                    n_prime: zeros(c, d)?,
                    h_pn: zeros(c, d)?,
                    u3: zeros(c, d)?,
                    d_hpn: zeros(c, d)?,
                    d_nprime: zeros(c, d)?,
                })
            }
            _ => None,
        };
        Ok(Self {
            hyper: HeGraphHyper::train(params),
            adam: AdamW {
                lr: params.lr,
                beta1: params.adam_betas.0,
                beta2: params.adam_betas.1,
                eps: params.adam_eps,
                weight_decay: params.weight_decay,
            },
            step: state.step,
            c,
            d,
            m,
            p: GpuTensor::upload(ctx, &f.p)?,
            h_pp: GpuTensor::upload(ctx, &f.h_pp)?,
            h_pv: GpuTensor::upload(ctx, &f.h_pv)?,
            h_vv: GpuTensor::upload(ctx, &f.h_vv)?,
            keys: GpuTensor::upload(ctx, &sorted.keys)?,
            key_labels: GpuTensor::from_slice(ctx, m, 1, &sorted.labels)?,
            offsets: GpuTensor::from_slice(ctx, c + 1, 1, &sorted.offsets)?,
            host_offsets: sorted.offsets,
            queries: GpuTensor::upload(ctx, queries)?,
            neg,
            w_p: Param::new(ctx, &state.p)?,
            w_v: Param::new(ctx, &state.v)?,
            pre: zeros(c, d)?,
            u1: zeros(c, d)?,
            u2: zeros(c, d)?,
            p_prime: zeros(c, d)?,
            p_norm: zeros(c, d)?,
            p_norms: zeros(c, 1)?,
            b: zeros(c, d)?,
            d_pn: zeros(c, d)?,
            d_pprime: zeros(c, d)?,
            d_b: zeros(c, d)?,
            gpre: zeros(c, d)?,
            x_prime: zeros(m, d)?,
            x_norm: zeros(m, d)?,
            x_norms: zeros(m, 1)?,
            d_xn: zeros(m, d)?,
            d_xprime: zeros(m, d)?,
            loss: zeros(1, 1)?,
            batches: HashMap::new(),
            k,
        })
    }

    fn batch_bufs(&mut self, b: usize) -> Result<(), GpuError> {
        if self.batches.contains_key(&b) {
            return Ok(());
        }
        let ctx = self.k.context();
        let (c, d, m) = (self.c, self.d, self.m);
        let z = |r: usize, cc: usize| GpuTensor::zeros(ctx, r, cc);
        let bufs = BatchBufs {
            idx: GpuTensor::<u32>::zeros(ctx, b, 1)?,
            labels: GpuTensor::<u32>::zeros(ctx, b, 1)?,
            z: z(b, d)?,
            lt: z(b, c)?,
            s: z(b, m)?,
            e: z(b, m)?,
            lc: z(b, c)?,
            d_lt: z(b, c)?,
            d_lc: z(b, c)?,
            d_e: z(b, m)?,
            d_s: z(b, m)?,
            row_loss: z(b, 1)?,
        };
        self.batches.insert(b, bufs);
        Ok(())
    }

    /// `out = act(h · w)` through the shared `pre` buffer.
    fn act_matmul(
        k: &Kernels,
        enc: &mut wgpu::CommandEncoder,
        pre: &GpuTensor,
        out: &GpuTensor,
        h: &GpuTensor,
        w: &GpuTensor,
        tanh: bool,
    ) -> Result<(), GpuError> {
        if tanh {
            k.matmul(enc, pre, h, Trans::N, w, Trans::N, 1.0, 0.0)?;
            k.tanh(enc, out, pre)
        } else {
            k.matmul(enc, out, h, Trans::N, w, Trans::N, 1.0, 0.0)
        }
    }

    /// `dx = g ⊙ act'(y)` (tanh) or `dx = g` (identity).
    fn act_backward(
        k: &Kernels,
        enc: &mut wgpu::CommandEncoder,
        dx: &GpuTensor,
        g: &GpuTensor,
        y: &GpuTensor,
        tanh: bool,
    ) -> Result<(), GpuError> {
        if tanh {
            k.tanh_backward(enc, dx, g, y, 0.0)
        } else {
            k.copy(enc, dx, g)
        }
    }

    fn record_step(
        &self,
        enc: &mut wgpu::CommandEncoder,
        bb: &BatchBufs,
        b: usize,
        lr: f32,
    ) -> Result<(), GpuError> {
        let k = &*self.k;
        let h = &self.hyper;
        let tanh = matches!(h.activation, crate::adapter::Activation::Tanh);
        let eps = 1e-12;
        // ---- graph forward
        if let Some(ng) = &self.neg {
            let wn = &ng.param.w;
            Self::act_matmul(k, enc, &self.pre, &ng.t1, &ng.h_np, wn, tanh)?;
            Self::act_matmul(k, enc, &self.pre, &ng.t2, &ng.h_nv, wn, tanh)?;
            k.copy(enc, &ng.n_prime, &ng.n)?;
            k.axpby(enc, h.beta_pn, &ng.t1, 1.0, &ng.n_prime)?;
            k.axpby(enc, h.beta_vn, &ng.t2, 1.0, &ng.n_prime)?;
            k.copy(enc, &ng.h_pn, &ng.pn_self)?;
            k.matmul(
                enc,
                &ng.h_pn,
                &ng.a_pn,
                Trans::N,
                &ng.n_prime,
                Trans::N,
                1.0,
                1.0,
            )?;
            Self::act_matmul(k, enc, &self.pre, &ng.u3, &ng.h_pn, &self.w_p.w, tanh)?;
        }
        Self::act_matmul(k, enc, &self.pre, &self.u1, &self.h_pp, &self.w_p.w, tanh)?;
        Self::act_matmul(k, enc, &self.pre, &self.u2, &self.h_pv, &self.w_p.w, tanh)?;
        k.copy(enc, &self.p_prime, &self.p)?;
        k.axpby(enc, h.alpha_pp, &self.u1, 1.0, &self.p_prime)?;
        k.axpby(enc, h.alpha_vp, &self.u2, 1.0, &self.p_prime)?;
        if let Some(ng) = &self.neg {
            k.axpby(enc, h.alpha_np, &ng.u3, 1.0, &self.p_prime)?;
        }
        Self::act_matmul(k, enc, &self.pre, &self.b, &self.h_vv, &self.w_v.w, tanh)?;
        // X' = X + γ B[label]; d_xn is free until the backward pass and holds the gathered rows.
        k.gather_rows(enc, &self.d_xn, &self.b, &self.key_labels)?;
        k.copy(enc, &self.x_prime, &self.keys)?;
        k.axpby(enc, h.gamma, &self.d_xn, 1.0, &self.x_prime)?;
        k.l2_normalize_rows(enc, &self.p_norm, &self.p_norms, &self.p_prime, eps)?;
        k.l2_normalize_rows(enc, &self.x_norm, &self.x_norms, &self.x_prime, eps)?;
        // ---- batch forward
        k.gather_rows(enc, &bb.z, &self.queries, &bb.idx)?;
        let s = h.logit_scale;
        k.matmul(enc, &bb.lt, &bb.z, Trans::N, &self.p_norm, Trans::T, s, 0.0)?;
        k.matmul(
            enc,
            &bb.s,
            &bb.z,
            Trans::N,
            &self.x_norm,
            Trans::T,
            1.0,
            0.0,
        )?;
        k.exp_affine(enc, &bb.e, &bb.s, h.beta_c, 1.0)?;
        k.segment_sums(enc, &bb.lc, &bb.e, &self.offsets, s, 0.0)?;
        let inv_b = 1.0 / b as f32;
        k.softmax_xent(
            enc,
            &bb.lt,
            &bb.labels,
            XentOut {
                row_loss: &bb.row_loss,
                grad: Some(&bb.d_lt),
                grad_scale: inv_b,
                mean_loss: Some(&self.loss),
                loss_weight: 1.0,
                loss_beta: 0.0,
            },
        )?;
        k.softmax_xent(
            enc,
            &bb.lc,
            &bb.labels,
            XentOut {
                row_loss: &bb.row_loss,
                grad: Some(&bb.d_lc),
                grad_scale: h.lambda * inv_b,
                mean_loss: Some(&self.loss),
                loss_weight: h.lambda,
                loss_beta: 1.0,
            },
        )?;
        // ---- backward: cache branch
        k.segment_expand(enc, &bb.d_e, &bb.d_lc, &self.key_labels, s, 0.0)?;
        k.exp_affine_backward(enc, &bb.d_s, &bb.d_e, &bb.e, h.beta_c, 0.0)?;
        k.matmul(
            enc,
            &self.d_xn,
            &bb.d_s,
            Trans::T,
            &bb.z,
            Trans::N,
            1.0,
            0.0,
        )?;
        k.l2_normalize_rows_backward(
            enc,
            &self.d_xprime,
            &self.d_xn,
            &self.x_norm,
            &self.x_norms,
            eps,
            0.0,
        )?;
        k.segment_row_sums(
            enc,
            &self.d_b,
            &self.d_xprime,
            &self.offsets,
            &self.host_offsets,
            h.gamma,
            0.0,
        )?;
        Self::act_backward(k, enc, &self.gpre, &self.d_b, &self.b, tanh)?;
        k.matmul(
            enc,
            &self.w_v.g,
            &self.h_vv,
            Trans::T,
            &self.gpre,
            Trans::N,
            1.0,
            0.0,
        )?;
        // ---- backward: text branch
        k.matmul(enc, &self.d_pn, &bb.d_lt, Trans::T, &bb.z, Trans::N, s, 0.0)?;
        k.l2_normalize_rows_backward(
            enc,
            &self.d_pprime,
            &self.d_pn,
            &self.p_norm,
            &self.p_norms,
            eps,
            0.0,
        )?;
        Self::act_backward(k, enc, &self.gpre, &self.d_pprime, &self.u1, tanh)?;
        k.matmul(
            enc,
            &self.w_p.g,
            &self.h_pp,
            Trans::T,
            &self.gpre,
            Trans::N,
            h.alpha_pp,
            0.0,
        )?;
        Self::act_backward(k, enc, &self.gpre, &self.d_pprime, &self.u2, tanh)?;
        k.matmul(
            enc,
            &self.w_p.g,
            &self.h_pv,
            Trans::T,
            &self.gpre,
            Trans::N,
            h.alpha_vp,
            1.0,
        )?;
        if let Some(ng) = &self.neg {
            Self::act_backward(k, enc, &self.gpre, &self.d_pprime, &ng.u3, tanh)?;
            k.matmul(
                enc,
                &self.w_p.g,
                &ng.h_pn,
                Trans::T,
                &self.gpre,
                Trans::N,
                h.alpha_np,
                1.0,
            )?;
            // Through N' (W_P before its update).
            k.matmul(
                enc,
                &ng.d_hpn,
                &self.gpre,
                Trans::N,
                &self.w_p.w,
                Trans::T,
                h.alpha_np,
                0.0,
            )?;
            k.matmul(
                enc,
                &ng.d_nprime,
                &ng.a_pn,
                Trans::T,
                &ng.d_hpn,
                Trans::N,
                1.0,
                0.0,
            )?;
            Self::act_backward(k, enc, &self.gpre, &ng.d_nprime, &ng.t1, tanh)?;
            k.matmul(
                enc,
                &ng.param.g,
                &ng.h_np,
                Trans::T,
                &self.gpre,
                Trans::N,
                h.beta_pn,
                0.0,
            )?;
            Self::act_backward(k, enc, &self.gpre, &ng.d_nprime, &ng.t2, tanh)?;
            k.matmul(
                enc,
                &ng.param.g,
                &ng.h_nv,
                Trans::T,
                &self.gpre,
                Trans::N,
                h.beta_vn,
                1.0,
            )?;
        }
        // ---- AdamW
        let hp = AdamW { lr, ..self.adam };
        let t = (self.step + 1).min(u32::MAX as u64) as u32;
        let mut params: Vec<&Param> = vec![&self.w_p, &self.w_v];
        if let Some(ng) = &self.neg {
            params.push(&ng.param);
        }
        for p in params {
            k.adamw_step(enc, &p.w, &p.m, &p.v, &p.g, &hp, t)?;
        }
        Ok(())
    }
}

impl Drop for GpuHeGraph {
    /// The kernels' cached bind groups hold this training's buffers; let them go with it.
    fn drop(&mut self) {
        self.k.release_cached_bindings();
    }
}

impl GpuHeGraph {
    /// One training step with every dispatch timed on the GPU: `(label, ms)` in recording order, or `None`
    /// when the device has no timestamp queries. For `hegraph bench step`.
    pub fn profile_step(
        &mut self,
        rows: &[u32],
        labels: &[u32],
        lr: f32,
    ) -> Result<Option<Vec<(String, f64)>>, AdapterError> {
        if !self.k.start_profiling(512) {
            return Ok(None);
        }
        let stepped = self.step(rows, labels, lr, true);
        let timings = self.k.finish_profiling().map_err(gpu_err)?;
        stepped?;
        Ok(Some(timings))
    }
}

impl HeGraphBackend for GpuHeGraph {
    fn name(&self) -> String {
        format!("wgpu ({})", self.k.context().describe())
    }

    fn step(
        &mut self,
        rows: &[u32],
        labels: &[u32],
        lr: f32,
        want_loss: bool,
    ) -> Result<Option<f32>, AdapterError> {
        let b = rows.len();
        if b == 0 || labels.len() != b {
            return Err(AdapterError::Input(format!(
                "a batch of {b} rows with {} labels",
                labels.len()
            )));
        }
        let k = self.k.clone();
        let ctx = k.context();
        if ctx.is_lost() {
            return Err(AdapterError::DeviceLost(
                ctx.lost_reason().unwrap_or_else(|| "device lost".into()),
            ));
        }
        self.batch_bufs(b).map_err(gpu_err)?;
        let bb = self
            .batches
            .get(&b)
            .ok_or_else(|| AdapterError::Input("batch buffers missing".into()))?;
        bb.idx.write_slice(ctx, rows).map_err(gpu_err)?;
        bb.labels.write_slice(ctx, labels).map_err(gpu_err)?;
        let mut enc = ctx.encoder("hegraph step");
        ctx.scoped("hegraph step", || self.record_step(&mut enc, bb, b, lr))
            .and_then(|r| r)
            .map_err(gpu_err)?;
        ctx.submit(enc).map_err(gpu_err)?;
        self.step += 1;
        if let Some(err) = ctx.take_uncaptured_error() {
            return Err(gpu_err(GpuError::Lost(err)));
        }
        if !want_loss {
            return Ok(None);
        }
        let loss = self.loss.download_vec(ctx).map_err(gpu_err)?;
        let l = loss.first().copied().unwrap_or(f32::NAN);
        if !l.is_finite() {
            return Err(AdapterError::NonFinite {
                step: self.step as usize,
                what: "the loss".into(),
                last_good: None,
            });
        }
        Ok(Some(l))
    }

    fn state(&mut self) -> Result<HeGraphState, AdapterError> {
        let ctx = self.k.context();
        Ok(HeGraphState {
            p: self.w_p.download(ctx).map_err(gpu_err)?,
            n: self
                .neg
                .as_ref()
                .map(|n| n.param.download(ctx))
                .transpose()
                .map_err(gpu_err)?,
            v: self.w_v.download(ctx).map_err(gpu_err)?,
            step: self.step,
        })
    }
}
