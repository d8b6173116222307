//! HeGraphAdapter on the CPU: the reference forward pass and gradients (candle autodiff), the CPU training
//! backend, and the training driver that any backend (the GPU one included) plugs into.
//!
//! # The computation (what a GPU backend must reproduce)
//!
//! Frozen inputs ([`FrozenInputs`], computed once from the graph in f32): with `Â_t`, `s_t` the normalised
//! edges of type `t` ([`crate::graph::normalize_edges`]) and `diag(s) x` scaling row `i` of `x` by `s_i`,
//! ```text
//! H_PP = diag(s_PP) P + Â_PP P     H_PV = diag(s_PV) P + Â_PV V     H_VV = Â_VV V
//! H_NP = diag(s_NP) N + Â_NP P     H_NV = diag(s_NV) N + Â_NV V     PN_self = diag(s_PN) P
//! ```
//! Forward, `act` = tanh (or identity), weights `W_P, W_N, W_V` (D×D, `x W` = rows times matrix):
//! ```text
//! N' = N + β_pn act(H_NP W_N) + β_vn act(H_NV W_N)
//! P' = P + α_pp act(H_PP W_P) + α_vp act(H_PV W_P) + α_np act((PN_self + Â_PN N') W_P)
//! B  = act(H_VV W_V)
//! X' = X + γ B[label(m)]                       (row m of the cache gets its class's B row)
//! ℓ_t = s · z norm(P')ᵀ
//! S  = (z Xᵀ + γ (z Bᵀ)[:, label(m)]) / ‖X'_m‖  (= z norm(X')ᵀ, computed this way so the frozen z Xᵀ
//!                                                is a constant of the step and the only large product)
//! ℓ_c[b, c] = s · Σ_{m: label(m) = c} exp(β_c (S[b, m] − 1))
//! loss = mean_b CE(ℓ_t) + λ · mean_b CE(ℓ_c)
//! ```
//! Without negative nodes the N' line and the `α_np` term are absent.
//!
//! Initial weights: `W_P`, `W_N`, `W_V` filled row-major with `Rng::derive(seed, [0x1417, k]).uniform(−a, a)`,
//! `a = 1/√D`, `k` = 0, 1, 2 (see [`init_weights`]); `W_N` is drawn even when unused so the others do not
//! depend on whether negatives exist.
//!
//! # Reference and backend
//!
//! [`forward_graph`] and [`loss_and_grads`] are the reference: plain candle operations and candle's autodiff
//! through `Var` weights, nothing hand-derived. [`CandleBackend`] trains with candle's autodiff and computes
//! the same numbers faster than the reference (tested against it): the products `H W` of the frozen inputs
//! with the weights are taken out of the autodiff graph (they enter it as leaves and each weight's gradient
//! is `Hᵀ ∂loss/∂(H W)`), and the cache sums are one candle custom op with a hand-written backward. It
//! takes about 21 ms per step on this project's 2-core machine (release build, 50 classes × 16 shots × 10
//! views, batch 256), most of it candle's per-operation overhead rather than arithmetic; the default CPU
//! backend is therefore the hand-written step of [`super::CpuBackend`], and this one stays selectable
//! (`--backend candle`, [`CandleFactory`]) as the autodiff cross-check of a whole training run.
//!
//! AdamW ([`adamw_into`]) follows PyTorch's single-tensor code, evaluated in f32 in this order (`t` = the
//! step number after the update; `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t`, `lr/bc1` and `1/√bc2` computed in f64
//! and rounded to f32): `m ← (g − m)·(1−β1) + m`, `v ← v·β2 + g·g·(1−β2)`, `denom = √v · (1/√bc2) + ε`,
//! `w ← w·(1 − lr·wd) − (m / denom)·(lr/bc1)`.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var};
use rayon::prelude::*;

use super::schedule::{cosine_lr, stack_queries, steps_per_epoch, StepBatches};
use super::{
    Activation, AdapterError, AdapterTensors, BackendChoice, HeGraphBackend, Method, TrainEvent,
    TrainInput, TrainParams, TrainedAdapter,
};
use super::{Fusion, WeightInit};
use crate::graph::{EdgeType, HeteroGraph, LabelledViewsRef, NormEdges};
use crate::linalg::Mat;
use crate::progress::CancelToken;
use crate::rng::Rng;

/// Stream id of the weight initialisation in [`Rng::derive`].
pub const STREAM_INIT: u64 = 0x1417;

/// The scalars of one forward pass (`α_np` differs between training and prediction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeGraphHyper {
    pub beta_pn: f32,
    pub beta_vn: f32,
    pub alpha_pp: f32,
    pub alpha_vp: f32,
    pub alpha_np: f32,
    pub gamma: f32,
    pub logit_scale: f32,
    pub beta_c: f32,
    pub lambda: f32,
    pub activation: Activation,
}

impl HeGraphHyper {
    fn with_alpha_np(p: &TrainParams, alpha_np: f32) -> Self {
        Self {
            beta_pn: p.beta_pn,
            beta_vn: p.beta_vn,
            alpha_pp: p.alpha_pp,
            alpha_vp: p.alpha_vp,
            alpha_np,
            gamma: p.gamma,
            logit_scale: p.logit_scale,
            beta_c: p.beta_c,
            lambda: p.lambda,
            activation: p.activation,
        }
    }

    pub fn train(p: &TrainParams) -> Self {
        Self::with_alpha_np(p, p.alpha_np_train)
    }

    pub fn test(p: &TrainParams) -> Self {
        Self::with_alpha_np(p, p.alpha_np_test)
    }
}

/// The frozen operands of the forward pass (module docs), as plain matrices a GPU backend can upload.
#[derive(Clone, Debug, PartialEq)]
pub struct FrozenInputs {
    pub num_classes: usize,
    pub dim: usize,
    pub p: Mat,
    pub n: Option<Mat>,
    pub h_pp: Mat,
    pub h_pv: Mat,
    pub h_vv: Mat,
    pub pn_self: Option<Mat>,
    pub a_pn: Option<Mat>,
    pub h_np: Option<Mat>,
    pub h_nv: Option<Mat>,
    pub keys: Mat,
    pub key_labels: Vec<u32>,
}

/// `diag(s) x + Â y` (or `Â y` without the self term).
fn message_input(ne: &NormEdges, x: Option<&Mat>, y: &Mat) -> Mat {
    let mut h = ne.a_hat.matmul(y);
    if let Some(x) = x {
        for i in 0..h.rows {
            let s = ne.self_coef[i];
            for (o, xi) in h.row_mut(i).iter_mut().zip(x.row(i)) {
                *o += s * xi;
            }
        }
    }
    h
}

fn diag_scale(s: &[f32], x: &Mat) -> Mat {
    let mut o = x.clone();
    for (i, &si) in s.iter().enumerate() {
        o.row_mut(i).iter_mut().for_each(|v| *v *= si);
    }
    o
}

impl FrozenInputs {
    pub fn new(graph: &HeteroGraph) -> Result<Self, AdapterError> {
        let norm = |t: EdgeType| {
            graph.normalized(t).ok_or_else(|| {
                AdapterError::Input(format!("the graph lacks its {} edges", t.label()))
            })
        };
        let p = &graph.p;
        let v = &graph.v;
        let pp = norm(EdgeType::PP)?;
        let pv = norm(EdgeType::PV)?;
        let vv = norm(EdgeType::VV)?;
        let (n, pn_self, a_pn, h_np, h_nv) = match &graph.n {
            Some(n) => {
                let pn = norm(EdgeType::PN)?;
                let np = norm(EdgeType::NP)?;
                let nv = norm(EdgeType::NV)?;
                (
                    Some(n.clone()),
                    Some(diag_scale(&pn.self_coef, p)),
                    Some(pn.a_hat),
                    Some(message_input(&np, Some(n), p)),
                    Some(message_input(&nv, Some(n), v)),
                )
            }
            None => (None, None, None, None, None),
        };
        Ok(Self {
            num_classes: graph.num_classes(),
            dim: graph.dim(),
            p: p.clone(),
            n,
            h_pp: message_input(&pp, Some(p), p),
            h_pv: message_input(&pv, Some(p), v),
            h_vv: message_input(&vv, None, v),
            pn_self,
            a_pn,
            h_np,
            h_nv,
            keys: graph.cache_keys.clone(),
            key_labels: graph.cache_labels.iter().map(|&l| l as u32).collect(),
        })
    }
}

/// The cache sorted by class ([`FrozenInputs::cache_by_class`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CacheByClass {
    pub keys: Mat,
    /// The class of each sorted key.
    pub labels: Vec<u32>,
    /// Class `c` owns sorted keys `offsets[c]..offsets[c + 1]` (C + 1 values).
    pub offsets: Vec<u32>,
}

impl FrozenInputs {
    /// The cache keys sorted by class (stably): sums over the cache do not depend on its order, and sorted,
    /// each class's entries are one contiguous segment. Both training backends keep the cache this way so
    /// that the cache logits are segment sums rather than products with the one-hot `M×C` label matrix.
    pub fn cache_by_class(&self) -> Result<CacheByClass, AdapterError> {
        let c = self.num_classes;
        if let Some(&l) = self.key_labels.iter().find(|&&l| l as usize >= c) {
            return Err(AdapterError::Input(format!(
                "a cache key has label {l} of {c} classes"
            )));
        }
        let mut order: Vec<usize> = (0..self.keys.rows).collect();
        order.sort_by_key(|&k| self.key_labels[k]);
        let labels: Vec<u32> = order.iter().map(|&k| self.key_labels[k]).collect();
        let mut offsets = vec![0u32; c + 1];
        for &l in &labels {
            offsets[l as usize + 1] += 1;
        }
        for i in 0..c {
            offsets[i + 1] += offsets[i];
        }
        Ok(CacheByClass {
            keys: self.keys.select_rows(&order),
            labels,
            offsets,
        })
    }
}

/// The three trainable matrices (`w_n` only with negative nodes).
#[derive(Clone, Debug, PartialEq)]
pub struct HeGraphWeights {
    pub w_p: Mat,
    pub w_n: Option<Mat>,
    pub w_v: Mat,
}

/// One trainable matrix with its AdamW moments.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    pub w: Mat,
    pub m: Mat,
    pub v: Mat,
}

impl ParamState {
    fn fresh(w: Mat) -> Self {
        Self {
            m: Mat::zeros(w.rows, w.cols),
            v: Mat::zeros(w.rows, w.cols),
            w,
        }
    }
}

/// Everything needed to continue training on another backend: weights, AdamW moments, completed steps.
#[derive(Clone, Debug, PartialEq)]
pub struct HeGraphState {
    pub p: ParamState,
    pub n: Option<ParamState>,
    pub v: ParamState,
    pub step: u64,
}

impl HeGraphState {
    /// The SPEC's initial state (uniform weights, module docs).
    pub fn init(dim: usize, with_negative: bool, seed: u64) -> Self {
        Self::init_as(WeightInit::Uniform, dim, with_negative, seed)
    }

    /// The initial state for `init` (all-zero weights, or the SPEC's uniform ones).
    pub fn init_as(init: WeightInit, dim: usize, with_negative: bool, seed: u64) -> Self {
        let mut w = init_weights(dim, with_negative, seed);
        if init == WeightInit::Zero {
            for m in [Some(&mut w.w_p), w.w_n.as_mut(), Some(&mut w.w_v)]
                .into_iter()
                .flatten()
            {
                m.data.fill(0.0);
            }
        }
        Self {
            p: ParamState::fresh(w.w_p),
            n: w.w_n.map(ParamState::fresh),
            v: ParamState::fresh(w.w_v),
            step: 0,
        }
    }

    pub fn weights(&self) -> HeGraphWeights {
        HeGraphWeights {
            w_p: self.p.w.clone(),
            w_n: self.n.as_ref().map(|n| n.w.clone()),
            w_v: self.v.w.clone(),
        }
    }

    fn is_finite(&self) -> bool {
        [Some(&self.p), self.n.as_ref(), Some(&self.v)]
            .into_iter()
            .flatten()
            .all(|p| p.w.is_finite() && p.m.is_finite() && p.v.is_finite())
    }
}

/// The initial weights (module docs).
pub fn init_weights(dim: usize, with_negative: bool, seed: u64) -> HeGraphWeights {
    let a = 1.0 / (dim.max(1) as f32).sqrt();
    let draw = |k: u64| {
        let mut rng = Rng::derive(seed, &[STREAM_INIT, k]);
        Mat::from_vec(dim, dim, rng.uniform_vec(dim * dim, -a, a))
    };
    let w_p = draw(0);
    let w_n = draw(1);
    let w_v = draw(2);
    HeGraphWeights {
        w_p,
        w_n: with_negative.then_some(w_n),
        w_v,
    }
}

/// AdamW hyperparameters of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The step number after this update (1 for the first).
    pub t: u64,
}

/// One AdamW update of `p` with gradient `g` (module docs). Returns false and leaves `p` untouched when the
/// update would produce a NaN or infinity.
pub fn adamw_update(p: &mut ParamState, g: &[f32], h: &AdamStep) -> bool {
    let mut next = ParamState::fresh(Mat::zeros(p.w.rows, p.w.cols));
    if !adamw_into(p, g, h, &mut next) {
        return false;
    }
    *p = next;
    true
}

/// Writes the AdamW update of `p` into `out` (same shape) and reports whether every new value is finite.
/// Writing elsewhere and swapping afterwards is what lets a diverging step leave the last good weights in
/// place at no extra cost. A plain loop (vectorised by the compiler in release builds, split over threads)
/// rather than a chain of tensor operations: one pass over memory instead of a dozen.
pub fn adamw_into(p: &ParamState, g: &[f32], h: &AdamStep, out: &mut ParamState) -> bool {
    let t = h.t.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (h.beta1 as f64).powi(t);
    let bc2 = 1.0 - (h.beta2 as f64).powi(t);
    let step_size = (h.lr as f64 / bc1) as f32;
    let inv_bc2_sqrt = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - h.lr * h.weight_decay;
    let (b1, b2, eps) = (h.beta1, h.beta2, h.eps);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    const CHUNK: usize = 1 << 14;
    out.w
        .data
        .par_chunks_mut(CHUNK)
        .zip(out.m.data.par_chunks_mut(CHUNK))
        .zip(out.v.data.par_chunks_mut(CHUNK))
        .zip(p.w.data.par_chunks(CHUNK))
        .zip(p.m.data.par_chunks(CHUNK))
        .zip(p.v.data.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .map(|((((((w2, m2), v2), w0), m0), v0), g)| {
            let mut ok = true;
            let dst = w2.iter_mut().zip(m2.iter_mut()).zip(v2.iter_mut());
            let src = w0.iter().zip(m0).zip(v0).zip(g);
            for (((w2, m2), v2), (((&w, &m), &v), &gi)) in dst.zip(src) {
                let m = (gi - m) * c1 + m;
                let v = v * b2 + gi * gi * c2;
                let denom = v.sqrt() * inv_bc2_sqrt + eps;
                let w = w * decay - (m / denom) * step_size;
                ok &= w.is_finite() && m.is_finite() && v.is_finite();
                *w2 = w;
                *m2 = m;
                *v2 = v;
            }
            ok
        })
        .reduce(|| true, |a, b| a && b)
}

// ---------------------------------------------------------------------------------------------------------
// candle forward

fn to_tensor(m: &Mat, dt: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(&m.data, (m.rows, m.cols), dev)?.to_dtype(dt)
}

fn opt_tensor(m: Option<&Mat>, dt: DType, dev: &Device) -> candle_core::Result<Option<Tensor>> {
    m.map(|m| to_tensor(m, dt, dev)).transpose()
}

fn to_mat(t: &Tensor) -> candle_core::Result<Mat> {
    let (r, c) = t.dims2()?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Mat::from_vec(r, c, data))
}

/// [`FrozenInputs`] as tensors of one dtype.
/// `[H_PP; H_PV]` and `[H_NP; H_NV]` are stacked so that each frozen input block is one product (fewer,
/// larger matrix products are much faster on the CPU).
struct Frozen {
    c: usize,
    p: Tensor,
    n: Option<Tensor>,
    h_p: Tensor,
    h_vv: Tensor,
    pn_self: Option<Tensor>,
    a_pn: Option<Tensor>,
    h_n: Option<Tensor>,
    keys: Tensor,
    key_labels: Tensor,
}

impl Frozen {
    fn new(f: &FrozenInputs, dt: DType, dev: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            c: f.num_classes,
            p: to_tensor(&f.p, dt, dev)?,
            n: opt_tensor(f.n.as_ref(), dt, dev)?,
            h_p: Tensor::cat(
                &[to_tensor(&f.h_pp, dt, dev)?, to_tensor(&f.h_pv, dt, dev)?],
                0,
            )?,
            h_vv: to_tensor(&f.h_vv, dt, dev)?,
            pn_self: opt_tensor(f.pn_self.as_ref(), dt, dev)?,
            a_pn: opt_tensor(f.a_pn.as_ref(), dt, dev)?,
            h_n: match (&f.h_np, &f.h_nv) {
                (Some(a), Some(b)) => Some(Tensor::cat(
                    &[to_tensor(a, dt, dev)?, to_tensor(b, dt, dev)?],
                    0,
                )?),
                _ => None,
            },
            keys: to_tensor(&f.keys, dt, dev)?,
            key_labels: Tensor::from_slice(&f.key_labels, f.key_labels.len(), dev)?,
        })
    }
}

/// `x · w` for weights `w` held fixed inside the autodiff graph: the backward gives only `grad · wᵀ` (the
/// gradient reaching `x`); the weights' own gradient is formed outside the graph (see [`CpuBackend`]).
struct LinearConstW {
    w: Tensor,
    /// Where the backward leaves `xᵀ · grad` (this product's share of the weights' gradient), when asked.
    wgrad: Option<std::sync::Arc<std::sync::Mutex<Option<Tensor>>>>,
}

impl CustomOp1 for LinearConstW {
    fn name(&self) -> &'static str {
        "linear-const-w"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l.shape().dims2()?;
        let (k2, n) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("linear-const-w: {m}×{k} times {k2}×{n}")
        }
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(ws) => Ok((s.matmul(ws, (1, m, n, k), l, wl)?, Shape::from((m, n)))),
            _ => candle_core::bail!("linear-const-w runs on the CPU only"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some(cell) = &self.wgrad {
            let g = arg.detach().t()?.matmul(grad_res)?;
            if let Ok(mut slot) = cell.lock() {
                *slot = Some(g);
            }
        }
        Ok(Some(grad_res.matmul(&self.w.t()?)?))
    }
}

struct WeightTensors {
    p: Tensor,
    n: Option<Tensor>,
    v: Tensor,
}

fn act(h: &HeGraphHyper, x: Tensor) -> candle_core::Result<Tensor> {
    match h.activation {
        Activation::Tanh => x.tanh(),
        Activation::Identity => Ok(x),
    }
}

/// The products of the frozen inputs with the weights: `[H_NP; H_NV] W_N`, `[H_PP; H_PV] W_P`, `H_VV W_V`,
/// and how to apply `W_P` to the one input that is not frozen, `PN_self + Â_PN N'`.
struct Linear<'a> {
    n: Option<Tensor>,
    p: Tensor,
    v: Tensor,
    pn: &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
}

/// `(P', N', B, H_PN)` from the linear parts (module docs); `H_PN = PN_self + Â_PN N'` when there are
/// negative nodes.
fn graph_fwd(
    f: &Frozen,
    lin: &Linear,
    h: &HeGraphHyper,
) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor, Option<Tensor>)> {
    let c = f.c;
    let n_prime = match (&f.n, &lin.n) {
        (Some(n), Some(yn)) => {
            let t = act(h, yn.clone())?;
            let a = t.narrow(0, 0, c)?.affine(h.beta_pn as f64, 0.0)?;
            let b = t.narrow(0, c, c)?.affine(h.beta_vn as f64, 0.0)?;
            Some(((n + a)? + b)?)
        }
        _ => None,
    };
    let t = act(h, lin.p.clone())?;
    let m_pp = t.narrow(0, 0, c)?.affine(h.alpha_pp as f64, 0.0)?;
    let m_pv = t.narrow(0, c, c)?.affine(h.alpha_vp as f64, 0.0)?;
    let mut p_prime = ((&f.p + m_pp)? + m_pv)?;
    let mut h_pn_out = None;
    if let (Some(np), Some(pn_self), Some(a_pn)) = (&n_prime, &f.pn_self, &f.a_pn) {
        let h_pn = (pn_self + a_pn.matmul(np)?)?;
        let m_pn = act(h, (lin.pn)(&h_pn)?)?.affine(h.alpha_np as f64, 0.0)?;
        p_prime = (p_prime + m_pn)?;
        h_pn_out = Some(h_pn);
    }
    let b = act(h, lin.v.clone())?;
    Ok((p_prime, n_prime, b, h_pn_out))
}

/// The reference: every product inside candle's autodiff, gradients of the weights included.
fn graph_fwd_reference(
    f: &Frozen,
    w: &WeightTensors,
    h: &HeGraphHyper,
) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
    let wp = w.p.clone();
    let pn = move |x: &Tensor| x.matmul(&wp);
    let lin = Linear {
        n: match (&f.h_n, &w.n) {
            (Some(h_n), Some(wn)) => Some(h_n.matmul(wn)?),
            _ => None,
        },
        p: f.h_p.matmul(&w.p)?,
        v: f.h_vv.matmul(&w.v)?,
        pn: &pn,
    };
    let (p_prime, n_prime, b, _) = graph_fwd(f, &lin, h)?;
    Ok((p_prime, n_prime, b))
}

/// How the cache sums `Σ_{m: label(m) = c} exp(β_c (S[b, m] − 1))` (B×C) are formed from `γB` (module docs).
type CacheFn<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

/// The reference cache sums: plain candle operations.
fn cache_sums_reference(
    f: &Frozen,
    bg: &Tensor,
    z: &Tensor,
    s_batch: &Tensor,
    beta_c: f32,
) -> candle_core::Result<Tensor> {
    let xp = (&f.keys + bg.index_select(&f.key_labels, 0)?)?;
    let inv_norm = xp.sqr()?.sum_keepdim(1)?.sqrt()?.recip()?.t()?;
    let zb = z.matmul(&bg.t()?)?;
    let raw = (s_batch + zb.index_select(&f.key_labels, 1)?)?;
    let sim = raw.broadcast_mul(&inv_norm)?;
    let e = sim.affine(beta_c as f64, -(beta_c as f64))?.exp()?;
    let bsz = z.dim(0)?;
    Tensor::zeros((bsz, f.c), e.dtype(), e.device())?.index_add(&f.key_labels, &e, 1)
}

/// The training loss of a batch (module docs).
fn loss_fwd(
    p_prime: &Tensor,
    b: &Tensor,
    z: &Tensor,
    y: &Tensor,
    h: &HeGraphHyper,
    cache: CacheFn,
) -> candle_core::Result<Tensor> {
    let s = h.logit_scale as f64;
    let pn = p_prime.broadcast_div(&p_prime.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let lt = z.matmul(&pn.t()?)?.affine(s, 0.0)?;
    // γ is applied to the C×D matrix B once, not to the M×D and B×M matrices derived from it.
    let bg = b.affine(h.gamma as f64, 0.0)?;
    let lc = cache(&bg)?.affine(s, 0.0)?;
    let ce_t = candle_nn::loss::cross_entropy(&lt, y)?;
    let ce_c = candle_nn::loss::cross_entropy(&lc, y)?;
    ce_t + ce_c.affine(h.lambda as f64, 0.0)?
}

/// The cache sums as one operation on `γB` with a hand-written backward: the reference builds a dozen B×M
/// and M×D intermediate tensors (and gradients for the constant ones), which cost more than the rest of
/// the step together. Equal to [`cache_sums_reference`] (tested).
#[derive(Clone)]
struct CacheSums {
    /// Queries, B×D.
    z: Tensor,
    /// `z Xᵀ`, B×M.
    s_batch: std::sync::Arc<Vec<f32>>,
    keys: std::sync::Arc<Mat>,
    labels: std::sync::Arc<Vec<u32>>,
    bsz: usize,
    c: usize,
    beta: f32,
    /// The forward's intermediate values, handed to the backward.
    saved: std::sync::Arc<std::sync::Mutex<Option<CacheParts>>>,
}

/// Intermediate values of [`CacheSums`] (recomputed by the backward if missing).
struct CacheParts {
    /// `‖X_m + γB_label(m)‖`.
    norms: Vec<f32>,
    /// `S[b, m]`, B×M.
    sim: Vec<f32>,
    /// `exp(β (S − 1))`, B×M.
    e: Vec<f32>,
}

impl CacheSums {
    fn parts(&self, bg: &[f32]) -> candle_core::Result<CacheParts> {
        let (m, d, c, bsz) = (self.keys.rows, self.keys.cols, self.c, self.bsz);
        let labels = &self.labels;
        let norms: Vec<f32> = (0..m)
            .into_par_iter()
            .map(|k| {
                let l = labels[k] as usize;
                let x = self.keys.row(k);
                let g = &bg[l * d..(l + 1) * d];
                x.iter()
                    .zip(g)
                    .map(|(a, b)| (a + b) * (a + b))
                    .sum::<f32>()
                    .sqrt()
            })
            .collect();
        // z (γB)ᵀ as a matrix product (B×D by D×C).
        let bg_t = Tensor::from_slice(bg, (c, d), self.z.device())?;
        let zb = self.z.matmul(&bg_t.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let mut sim = vec![0.0f32; bsz * m];
        let mut e = vec![0.0f32; bsz * m];
        sim.par_chunks_mut(m)
            .zip(e.par_chunks_mut(m))
            .enumerate()
            .for_each(|(b, (srow, erow))| {
                let s_in = &self.s_batch[b * m..(b + 1) * m];
                let zrow = &zb[b * c..(b + 1) * c];
                for k in 0..m {
                    let v = (s_in[k] + zrow[labels[k] as usize]) / norms[k];
                    srow[k] = v;
                    erow[k] = (self.beta * (v - 1.0)).exp();
                }
            });
        Ok(CacheParts { norms, sim, e })
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

impl CustomOp1 for CacheSums {
    fn name(&self) -> &'static str {
        "cache-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let bg = f32_slice(s, l, "cache-sums")?;
        let (m, c) = (self.keys.rows, self.c);
        let p = self.parts(bg)?;
        let mut out = vec![0.0f32; self.bsz * c];
        out.par_chunks_mut(c).enumerate().for_each(|(b, row)| {
            for (k, &ev) in p.e[b * m..(b + 1) * m].iter().enumerate() {
                row[self.labels[k] as usize] += ev;
            }
        });
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(p);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.bsz, c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let bg = arg.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let (m, d, c, bsz) = (self.keys.rows, self.keys.cols, self.c, self.bsz);
        let labels = &self.labels;
        let saved = self.saved.lock().ok().and_then(|mut s| s.take());
        let p = match saved {
            Some(p) => p,
            None => self.parts(&bg)?,
        };
        // dS[b, m] = β e[b, m] G[b, label(m)]; S = raw / n, raw = s_batch + zb[:, label].
        let mut ds = vec![0.0f32; bsz * m];
        let mut dzb = vec![0.0f32; bsz * c];
        ds.par_chunks_mut(m)
            .zip(dzb.par_chunks_mut(c))
            .enumerate()
            .for_each(|(b, (dsrow, dzrow))| {
                for k in 0..m {
                    let l = labels[k] as usize;
                    let v = self.beta * p.e[b * m + k] * g[b * c + l];
                    dsrow[k] = v;
                    dzrow[l] += v / p.norms[k];
                }
            });
        // dn[m] = −Σ_b dS[b, m] S[b, m] / n_m, summed over b in order (deterministic).
        let dn: Vec<f32> = (0..m)
            .into_par_iter()
            .map(|k| {
                let acc: f32 = (0..bsz).map(|b| ds[b * m + k] * p.sim[b * m + k]).sum();
                -acc / p.norms[k]
            })
            .collect();
        // dγB[c] = Σ_{m ∈ c} dn[m] (X_m + γB_c) / n_m + Σ_b dzb[b, c] z_b.
        let dzb_t = Tensor::from_vec(dzb, (bsz, c), self.z.device())?;
        let mut dbg = dzb_t
            .t()?
            .matmul(&self.z)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for k in 0..m {
            let l = labels[k] as usize;
            let coef = dn[k] / p.norms[k];
            let x = self.keys.row(k);
            let row = &mut dbg[l * d..(l + 1) * d];
            for ((o, xv), gv) in row.iter_mut().zip(x).zip(&bg[l * d..(l + 1) * d]) {
                *o += coef * (xv + gv);
            }
        }
        Ok(Some(Tensor::from_vec(dbg, (c, d), arg.device())?))
    }
}

pub(crate) fn check_weights(
    graph_has_n: bool,
    d: usize,
    w: &HeGraphWeights,
) -> Result<(), AdapterError> {
    let ok = |m: &Mat| m.rows == d && m.cols == d;
    if !ok(&w.w_p) || !ok(&w.w_v) || w.w_n.as_ref().is_some_and(|m| !ok(m)) {
        return Err(AdapterError::Input(format!(
            "the adapter weights must be {d}×{d}"
        )));
    }
    if graph_has_n && w.w_n.is_none() {
        return Err(AdapterError::Input(
            "the graph has negative nodes but no W_N weights were given".into(),
        ));
    }
    Ok(())
}

fn weight_tensors(
    w: &HeGraphWeights,
    has_n: bool,
    dt: DType,
    dev: &Device,
) -> candle_core::Result<WeightTensors> {
    Ok(WeightTensors {
        p: to_tensor(&w.w_p, dt, dev)?,
        n: if has_n {
            opt_tensor(w.w_n.as_ref(), dt, dev)?
        } else {
            None
        },
        v: to_tensor(&w.w_v, dt, dev)?,
    })
}

/// The graph's outputs for the given weights: `P'`, `N'` (with negatives), `X' = X + γ L B` and `B`.
#[derive(Clone, Debug, PartialEq)]
pub struct GraphOutputs {
    pub p_prime: Mat,
    pub n_prime: Option<Mat>,
    pub x_prime: Mat,
    pub b: Mat,
}

/// The reference forward pass of the graph (f32, CPU).
pub fn forward_graph(
    graph: &HeteroGraph,
    hyper: &HeGraphHyper,
    weights: &HeGraphWeights,
) -> Result<GraphOutputs, AdapterError> {
    check_weights(graph.has_negative(), graph.dim(), weights)?;
    let dev = Device::Cpu;
    let fi = FrozenInputs::new(graph)?;
    let f = Frozen::new(&fi, DType::F32, &dev)?;
    let w = weight_tensors(weights, graph.has_negative(), DType::F32, &dev)?;
    let (p_prime, n_prime, b) = graph_fwd_reference(&f, &w, hyper)?;
    let x_prime = (&f.keys
        + b.index_select(&f.key_labels, 0)?
            .affine(hyper.gamma as f64, 0.0)?)?;
    Ok(GraphOutputs {
        p_prime: to_mat(&p_prime)?,
        n_prime: n_prime.as_ref().map(to_mat).transpose()?,
        x_prime: to_mat(&x_prime)?,
        b: to_mat(&b)?,
    })
}

/// A batch loss and its gradients with respect to the three weight matrices.
#[derive(Clone, Debug, PartialEq)]
pub struct LossAndGrads {
    pub loss: f64,
    pub w_p: Mat,
    pub w_n: Option<Mat>,
    pub w_v: Mat,
}

/// The reference loss and gradients (f32) of queries `z` (unit rows) with `labels`, for the given weights.
pub fn loss_and_grads(
    graph: &HeteroGraph,
    hyper: &HeGraphHyper,
    weights: &HeGraphWeights,
    z: &Mat,
    labels: &[usize],
) -> Result<LossAndGrads, AdapterError> {
    loss_and_grads_in(DType::F32, graph, hyper, weights, z, labels)
}

/// As [`loss_and_grads`], computed in f64 (for finite-difference checks).
pub fn loss_and_grads_f64(
    graph: &HeteroGraph,
    hyper: &HeGraphHyper,
    weights: &HeGraphWeights,
    z: &Mat,
    labels: &[usize],
) -> Result<LossAndGrads, AdapterError> {
    loss_and_grads_in(DType::F64, graph, hyper, weights, z, labels)
}

fn loss_and_grads_in(
    dt: DType,
    graph: &HeteroGraph,
    hyper: &HeGraphHyper,
    weights: &HeGraphWeights,
    z: &Mat,
    labels: &[usize],
) -> Result<LossAndGrads, AdapterError> {
    check_weights(graph.has_negative(), graph.dim(), weights)?;
    if z.rows != labels.len() || z.cols != graph.dim() {
        return Err(AdapterError::Input(format!(
            "queries are {}×{} for {} labels and dimension {}",
            z.rows,
            z.cols,
            labels.len(),
            graph.dim()
        )));
    }
    let dev = Device::Cpu;
    let fi = FrozenInputs::new(graph)?;
    let f = Frozen::new(&fi, dt, &dev)?;
    let has_n = graph.has_negative();
    let wt = weight_tensors(weights, has_n, dt, &dev)?;
    let wp = Var::from_tensor(&wt.p)?;
    let wn = wt.n.as_ref().map(Var::from_tensor).transpose()?;
    let wv = Var::from_tensor(&wt.v)?;
    let w = WeightTensors {
        p: wp.as_tensor().clone(),
        n: wn.as_ref().map(|v| v.as_tensor().clone()),
        v: wv.as_tensor().clone(),
    };
    let zt = to_tensor(z, dt, &dev)?;
    let s_batch = zt.matmul(&f.keys.t()?)?;
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let y = Tensor::from_slice(&y, y.len(), &dev)?;
    let (p_prime, _, b) = graph_fwd_reference(&f, &w, hyper)?;
    let cache = |bg: &Tensor| cache_sums_reference(&f, bg, &zt, &s_batch, hyper.beta_c);
    let loss = loss_fwd(&p_prime, &b, &zt, &y, hyper, &cache)?;
    let grads = loss.backward()?;
    let grad = |v: &Var, name: &str| -> Result<Mat, AdapterError> {
        match grads.get(v.as_tensor()) {
            Some(g) => Ok(to_mat(g)?),
            None => Err(AdapterError::Backend {
                backend: "cpu".into(),
                msg: format!("no gradient reached {name}"),
            }),
        }
    };
    Ok(LossAndGrads {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        w_p: grad(&wp, "W_P")?,
        w_n: wn.as_ref().map(|v| grad(v, "W_N")).transpose()?,
        w_v: grad(&wv, "W_V")?,
    })
}

// ---------------------------------------------------------------------------------------------------------
// What the CPU backends share

/// The state a CPU backend starts from (`None`: drawn from the seed), checked against the graph and queries.
pub(crate) fn starting_state(
    graph: &HeteroGraph,
    queries: &Mat,
    params: &TrainParams,
    state: Option<HeGraphState>,
) -> Result<HeGraphState, AdapterError> {
    let d = graph.dim();
    if queries.cols != d {
        return Err(AdapterError::Input(format!(
            "queries have dimension {} but the graph has {d}",
            queries.cols
        )));
    }
    let state = state.unwrap_or_else(|| HeGraphState::init(d, graph.has_negative(), params.seed));
    check_weights(graph.has_negative(), d, &state.weights())?;
    if graph.has_negative() != state.n.is_some() {
        return Err(AdapterError::Input(
            "the training state and the graph disagree on negative nodes".into(),
        ));
    }
    Ok(state)
}

/// A batch's rows index `n_rows` stacked queries and its labels `classes` classes.
pub(crate) fn check_batch(
    rows: &[u32],
    labels: &[u32],
    n_rows: usize,
    classes: usize,
) -> Result<(), AdapterError> {
    if rows.len() != labels.len() || rows.is_empty() {
        return Err(AdapterError::Input(format!(
            "a step needs as many labels as rows (got {} rows, {} labels)",
            rows.len(),
            labels.len()
        )));
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= n_rows) {
        return Err(AdapterError::Input(format!(
            "query row {r} is out of range ({n_rows} rows)"
        )));
    }
    if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(AdapterError::Input(format!(
            "label {l} is out of range ({classes} classes)"
        )));
    }
    Ok(())
}

/// Ends a CPU step: refuses a non-finite batch `loss`, else one AdamW update of all three weights from
/// gradients `(W_P, W_N, W_V)`, all or nothing: the new values go to `scratch` and are swapped in only when
/// every one is finite, so a diverging step leaves the last good weights in place (and says so).
pub(crate) fn commit_step(
    state: &mut HeGraphState,
    scratch: &mut HeGraphState,
    loss: f32,
    (gp, gn, gv): (&[f32], Option<&[f32]>, &[f32]),
    params: &TrainParams,
    lr: f32,
) -> Result<(), AdapterError> {
    if !loss.is_finite() {
        return Err(AdapterError::NonFinite {
            step: state.step as usize,
            what: "the training loss".into(),
            last_good: None,
        });
    }
    let h = AdamStep {
        lr,
        beta1: params.adam_betas.0,
        beta2: params.adam_betas.1,
        eps: params.adam_eps,
        weight_decay: params.weight_decay,
        t: state.step + 1,
    };
    let mut ok = adamw_into(&state.p, gp, &h, &mut scratch.p);
    ok &= adamw_into(&state.v, gv, &h, &mut scratch.v);
    if let (Some(n), Some(g), Some(out)) = (state.n.as_ref(), gn, scratch.n.as_mut()) {
        ok &= adamw_into(n, g, &h, out);
    }
    if !ok {
        return Err(AdapterError::NonFinite {
            step: state.step as usize,
            what: "the weights".into(),
            last_good: None,
        });
    }
    std::mem::swap(&mut state.p, &mut scratch.p);
    std::mem::swap(&mut state.v, &mut scratch.v);
    std::mem::swap(&mut state.n, &mut scratch.n);
    state.step += 1;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// CPU backend

/// A batch loss and the flattened gradients of `W_P`, `W_N` (with negatives) and `W_V`.
type FlatGrads = (f32, Vec<f32>, Option<Vec<f32>>, Vec<f32>);

/// Above this many floats the `z Xᵀ` rows of all training queries are not memoised (128 MiB).
const MEMO_LIMIT: usize = 32 << 20;

/// The candle CPU backend: the reference numerics with candle's autodiff (module docs).
pub struct CandleBackend {
    dev: Device,
    frozen: Frozen,
    queries: Tensor,
    hyper: HeGraphHyper,
    params: TrainParams,
    state: HeGraphState,
    /// Where an update is written before it is accepted (same shapes as `state`).
    scratch: HeGraphState,
    /// `z Xᵀ` of every query row seen so far (rows × M), when it fits in [`MEMO_LIMIT`]: each row costs a
    /// D×M product once instead of once per epoch.
    memo: Option<(Vec<f32>, Vec<bool>)>,
    keys: std::sync::Arc<Mat>,
    key_labels: std::sync::Arc<Vec<u32>>,
}

impl CandleBackend {
    /// `queries`: the normalised stacked training views (view-major). `state`: where to start (e.g. a snapshot
    /// of another backend); `None` draws the initial weights from the seed.
    pub fn new(
        graph: &HeteroGraph,
        queries: &Mat,
        params: &TrainParams,
        state: Option<HeGraphState>,
    ) -> Result<Self, AdapterError> {
        let state = starting_state(graph, queries, params, state)?;
        let dev = Device::Cpu;
        let fi = FrozenInputs::new(graph)?;
        let m = fi.keys.rows;
        let memo = (queries.rows.saturating_mul(m) <= MEMO_LIMIT)
            .then(|| (vec![0.0f32; queries.rows * m], vec![false; queries.rows]));
        Ok(Self {
            frozen: Frozen::new(&fi, DType::F32, &dev)?,
            queries: to_tensor(queries, DType::F32, &dev)?,
            hyper: HeGraphHyper::train(params),
            params: params.clone(),
            scratch: state.clone(),
            state,
            memo,
            keys: std::sync::Arc::new(fi.keys.clone()),
            key_labels: std::sync::Arc::new(fi.key_labels.clone()),
            dev,
        })
    }

    /// `z Xᵀ` for the batch rows, from the memo where possible.
    fn key_affinity(&mut self, rows: &[u32], z: &Tensor) -> Result<Vec<f32>, AdapterError> {
        let m = self.frozen.keys.dim(0)?;
        let Some((memo, have)) = self.memo.as_mut() else {
            return Ok(z
                .matmul(&self.frozen.keys.t()?)?
                .flatten_all()?
                .to_vec1::<f32>()?);
        };
        let missing: Vec<usize> = {
            let mut v: Vec<usize> = rows
                .iter()
                .map(|&r| r as usize)
                .filter(|&r| !have[r])
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        if !missing.is_empty() {
            let ids: Vec<u32> = missing.iter().map(|&r| r as u32).collect();
            let ids = Tensor::from_slice(&ids, ids.len(), &self.dev)?;
            let s = self
                .queries
                .index_select(&ids, 0)?
                .matmul(&self.frozen.keys.t()?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (k, &r) in missing.iter().enumerate() {
                memo[r * m..(r + 1) * m].copy_from_slice(&s[k * m..(k + 1) * m]);
                have[r] = true;
            }
        }
        let mut out = Vec::with_capacity(rows.len() * m);
        for &r in rows {
            let r = r as usize;
            out.extend_from_slice(&memo[r * m..(r + 1) * m]);
        }
        Ok(out)
    }
}

impl CandleBackend {
    /// The loss of a batch and its gradients at the current weights (what [`HeGraphBackend::step`] uses;
    /// public so that other backends can be compared with it step by step).
    pub fn batch_loss_and_grads(
        &mut self,
        rows: &[u32],
        labels: &[u32],
    ) -> Result<LossAndGrads, AdapterError> {
        self.check_batch(rows, labels)?;
        let d = self.state.p.w.rows;
        let (loss, gp, gn, gv) = self.forward_backward(rows, labels)?;
        if !loss.is_finite() {
            return Err(AdapterError::NonFinite {
                step: self.state.step as usize,
                what: "the loss".into(),
                last_good: None,
            });
        }
        Ok(LossAndGrads {
            loss: loss as f64,
            w_p: Mat::from_vec(d, d, gp),
            w_n: gn.map(|g| Mat::from_vec(d, d, g)),
            w_v: Mat::from_vec(d, d, gv),
        })
    }

    fn check_batch(&self, rows: &[u32], labels: &[u32]) -> Result<(), AdapterError> {
        check_batch(rows, labels, self.queries.dim(0)?, self.frozen.c)
    }

    /// Loss and flattened gradients `(W_P, W_N, W_V)`. The products of the frozen inputs with the weights
    /// are computed outside candle's autodiff graph and enter it as leaves, so the graph holds no D×D
    /// tensor; each weight's gradient is then `Hᵀ · ∂loss/∂(H W)`, one product per frozen block.
    fn forward_backward(
        &mut self,
        rows: &[u32],
        labels: &[u32],
    ) -> Result<FlatGrads, AdapterError> {
        let idx = Tensor::from_slice(rows, rows.len(), &self.dev)?;
        let z = self.queries.index_select(&idx, 0)?;
        let y = Tensor::from_slice(labels, labels.len(), &self.dev)?;
        let s_batch = self.key_affinity(rows, &z)?;

        let d = self.state.p.w.rows;
        let f = &self.frozen;
        let wp = Tensor::from_slice(&self.state.p.w.data, (d, d), &self.dev)?;
        let wn = self
            .state
            .n
            .as_ref()
            .map(|n| Tensor::from_slice(&n.w.data, (d, d), &self.dev))
            .transpose()?;
        let wv = Tensor::from_slice(&self.state.v.w.data, (d, d), &self.dev)?;
        let yp = Var::from_tensor(&f.h_p.matmul(&wp)?)?;
        let yn = match (&f.h_n, &wn) {
            (Some(h), Some(w)) => Some(Var::from_tensor(&h.matmul(w)?)?),
            _ => None,
        };
        let yv = Var::from_tensor(&f.h_vv.matmul(&wv)?)?;
        let pn_grad = std::sync::Arc::new(std::sync::Mutex::new(None));
        let pn = |x: &Tensor| {
            x.apply_op1(LinearConstW {
                w: wp.clone(),
                wgrad: Some(pn_grad.clone()),
            })
        };
        let lin = Linear {
            n: yn.as_ref().map(|v| v.as_tensor().clone()),
            p: yp.as_tensor().clone(),
            v: yv.as_tensor().clone(),
            pn: &pn,
        };
        let (p_prime, _, b, _) = graph_fwd(f, &lin, &self.hyper)?;
        let op = CacheSums {
            z: z.clone(),
            saved: Default::default(),
            s_batch: std::sync::Arc::new(s_batch),
            keys: self.keys.clone(),
            labels: self.key_labels.clone(),
            bsz: rows.len(),
            c: f.c,
            beta: self.hyper.beta_c,
        };
        let cache = move |bg: &Tensor| bg.apply_op1(op.clone());
        let loss = loss_fwd(&p_prime, &b, &z, &y, &self.hyper, &cache)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            return Ok((loss_value, Vec::new(), None, Vec::new()));
        }
        let grads = loss.backward()?;
        let wgrad = |h: &Tensor, v: &Var| -> candle_core::Result<Tensor> {
            match grads.get(v.as_tensor()) {
                Some(g) => h.t()?.matmul(g),
                None => Tensor::zeros((d, d), DType::F32, &self.dev),
            }
        };
        let mut gp = wgrad(&f.h_p, &yp)?;
        let extra = pn_grad.lock().ok().and_then(|mut s| s.take());
        if let Some(extra) = extra {
            gp = (gp + extra)?;
        }
        let gn = match (&f.h_n, &yn) {
            (Some(h), Some(v)) => Some(wgrad(h, v)?.flatten_all()?.to_vec1::<f32>()?),
            _ => None,
        };
        let gv = wgrad(&f.h_vv, &yv)?;
        Ok((
            loss_value,
            gp.flatten_all()?.to_vec1::<f32>()?,
            gn,
            gv.flatten_all()?.to_vec1::<f32>()?,
        ))
    }
}

/// Builds [`CandleBackend`]s, so that a run can be asked to train with candle's autodiff.
#[derive(Clone, Copy, Debug, Default)]
pub struct CandleFactory;

impl super::BackendFactory for CandleFactory {
    fn name(&self) -> String {
        "cpu (candle)".into()
    }

    fn create(
        &self,
        graph: &HeteroGraph,
        queries: &Mat,
        params: &TrainParams,
        state: HeGraphState,
    ) -> Result<Box<dyn HeGraphBackend>, AdapterError> {
        Ok(Box::new(CandleBackend::new(
            graph,
            queries,
            params,
            Some(state),
        )?))
    }
}

impl HeGraphBackend for CandleBackend {
    fn name(&self) -> String {
        "cpu (candle)".into()
    }

    fn step(
        &mut self,
        rows: &[u32],
        labels: &[u32],
        lr: f32,
        want_loss: bool,
    ) -> Result<Option<f32>, AdapterError> {
        self.check_batch(rows, labels)?;
        let (loss_value, gp, gn, gv) = self.forward_backward(rows, labels)?;
        let grads = (gp.as_slice(), gn.as_deref(), gv.as_slice());
        commit_step(
            &mut self.state,
            &mut self.scratch,
            loss_value,
            grads,
            &self.params,
            lr,
        )?;
        Ok(want_loss.then_some(loss_value))
    }

    fn state(&mut self) -> Result<HeGraphState, AdapterError> {
        Ok(self.state.clone())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Driver

fn adapter_from_state(
    graph: &HeteroGraph,
    params: &TrainParams,
    state: &HeGraphState,
    notes: &[String],
    losses: &[(usize, f32)],
    backend: &str,
) -> TrainedAdapter {
    let tensors = AdapterTensors {
        text: Some(graph.p.clone()),
        text_neg: graph.n.clone(),
        keys: Some(graph.cache_keys.clone()),
        fused_keys: None,
        key_labels: graph.cache_labels.clone(),
        visual: Some(graph.v.clone()),
        has_visual: graph.has_visual.clone(),
        w_p: Some(state.p.w.clone()),
        w_n: state.n.as_ref().map(|n| n.w.clone()),
        w_v: Some(state.v.w.clone()),
    };
    let mut a = TrainedAdapter::new(Method::HeGraph, &graph.classes, params, tensors);
    a.notes = notes.to_vec();
    a.losses = losses.to_vec();
    a.backend = Some(backend.to_string());
    a
}

pub(crate) fn train_hegraph(
    params: &TrainParams,
    input: &TrainInput,
    backend: BackendChoice,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedAdapter, AdapterError> {
    let text = input.text.ok_or(AdapterError::NeedsText {
        method: Method::HeGraph,
    })?;
    let train = input.train;
    if train.is_empty() {
        return Err(AdapterError::Input(
            "HeGraphAdapter needs at least one labelled image".into(),
        ));
    }
    let mut notes = Vec::new();
    let text_neg = if params.use_negative {
        input.text_neg
    } else {
        None
    };
    if input.text_neg.is_none() {
        notes.push(
            "no negative-text features: the graph was built without negative nodes (N, R_NP, R_NV and R_PN dropped)"
                .to_string(),
        );
    } else if !params.use_negative {
        notes.push("negative nodes disabled in the settings".to_string());
    }
    let labelled = LabelledViewsRef::from_split(train);
    let graph = HeteroGraph::build(
        input.classes,
        text,
        text_neg,
        &labelled,
        &params.graph_options(),
    )?;
    let without: Vec<&str> = graph
        .classes
        .iter()
        .zip(&graph.has_visual)
        .filter(|(_, &h)| !h)
        .map(|(c, _)| c.as_str())
        .collect();
    if !without.is_empty() {
        notes.push(format!(
            "{} class(es) without labelled images use their text node as visual node: {}",
            without.len(),
            without.join(", ")
        ));
    }
    if train.views.is_none() {
        notes.push(
            "the training images have no augmented views: every step uses each image's own feature as its query"
                .to_string(),
        );
    }

    let (queries, a) = stack_queries(train);
    let m = train.len();
    let spe = steps_per_epoch(m, params.batch_size);
    let total = params.epochs * spe;
    let init = HeGraphState::init_as(
        params.weight_init,
        graph.dim(),
        graph.has_negative(),
        params.seed,
    );
    if total == 0 {
        // The graph layers stay as they start (the adopted reading: zero, the identity graph).
        let mut adapter = adapter_from_state(&graph, params, &init, &notes, &[], "cpu");
        finish_classifier(&mut adapter, &graph, &init, params, input, cancel, on_event)?;
        return Ok(adapter);
    }

    let cpu = |state: HeGraphState| -> Result<Box<dyn HeGraphBackend>, AdapterError> {
        Ok(Box::new(super::CpuBackend::new(
            &graph,
            &queries,
            params,
            Some(state),
        )?))
    };
    let (mut be, mut custom): (Box<dyn HeGraphBackend>, bool) = match backend {
        BackendChoice::Cpu => (cpu(init.clone())?, false),
        BackendChoice::Custom(f) => match f.create(&graph, &queries, params, init.clone()) {
            Ok(b) => (b, true),
            Err(e) => {
                let msg = format!(
                    "{} backend unavailable ({e}); training on the CPU",
                    f.name()
                );
                on_event(&TrainEvent::Message(msg.clone()));
                notes.push(msg);
                (cpu(init.clone())?, false)
            }
        },
    };
    let mut snapshot: Option<HeGraphState> = custom.then(|| init.clone());
    let mut losses: Vec<(usize, f32)> = Vec::new();
    let mut batches = StepBatches::new(params.seed, &train.labels, a, params.batch_size);
    let mut step = 0usize;
    let mut backend_name = be.name();

    while step < total {
        if cancel.is_cancelled() {
            return Err(AdapterError::Cancelled);
        }
        let (epoch, batch) = batches.get(step);
        let lr = cosine_lr(params.lr, step, total);
        let want =
            (params.loss_every > 0 && step.is_multiple_of(params.loss_every)) || step + 1 == total;

        let result = be
            .step(&batch.rows, &batch.labels, lr, want)
            .and_then(|loss| {
                if custom
                    && params.snapshot_every > 0
                    && (step + 1).is_multiple_of(params.snapshot_every)
                {
                    snapshot = Some(be.state()?);
                }
                Ok(loss)
            });
        match result {
            Ok(loss) => {
                if let Some(l) = loss {
                    if !l.is_finite() {
                        let good = be.state().ok().or(snapshot.take());
                        return Err(non_finite(
                            step,
                            "the training loss",
                            good,
                            &graph,
                            params,
                            &notes,
                            &losses,
                            &backend_name,
                        ));
                    }
                    losses.push((step, l));
                }
                step += 1;
                on_event(&TrainEvent::Step {
                    step,
                    total,
                    epoch,
                    loss,
                });
            }
            Err(AdapterError::DeviceLost(msg)) if custom => {
                let Some(st) = snapshot.take() else {
                    return Err(AdapterError::DeviceLost(msg));
                };
                let resume = st.step as usize;
                let text = format!(
                    "{backend_name}: device lost ({msg}); continuing on the CPU from step {resume} of {total}"
                );
                on_event(&TrainEvent::Message(text.clone()));
                notes.push(text);
                be = cpu(st)?;
                backend_name = format!("{} after {backend_name} was lost", be.name());
                custom = false;
                step = resume;
                losses.retain(|(s, _)| *s < resume);
            }
            Err(AdapterError::NonFinite { what, .. }) => {
                let good = be.state().ok().or(snapshot.take());
                return Err(non_finite(
                    step,
                    &what,
                    good,
                    &graph,
                    params,
                    &notes,
                    &losses,
                    &backend_name,
                ));
            }
            Err(e) => return Err(e),
        }
    }

    let state = be.state()?;
    drop(be);
    let mut adapter = adapter_from_state(&graph, params, &state, &notes, &losses, &backend_name);
    finish_classifier(
        &mut adapter,
        &graph,
        &state,
        params,
        input,
        cancel,
        on_event,
    )?;
    Ok(adapter)
}

/// What follows the graph layers: in the logit reading, `(α, β)` chosen and the cache keys trained on the
/// graph's outputs (module docs of [`super`]); in the SPEC's, the fusion weight searched on validation.
fn finish_classifier(
    adapter: &mut TrainedAdapter,
    graph: &HeteroGraph,
    state: &HeGraphState,
    params: &TrainParams,
    input: &TrainInput,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<(), AdapterError> {
    let val = input.val.filter(|v| !v.is_empty());
    if params.fusion == Fusion::Probability {
        if let Some(val) = val {
            if params.search_fusion_weight {
                let (w, acc) = search_fusion_weight(adapter, val, params.fusion_weight)?;
                adapter.fusion_weight = Some(w);
                adapter.val_accuracy = Some(acc);
            } else {
                adapter.val_accuracy = Some(adapter.accuracy(val)?);
            }
        }
        return Ok(());
    }
    let out = forward_graph(graph, &HeGraphHyper::test(params), &state.weights())?;
    let text = out.p_prime.normalized_rows();
    let keys0 = out.x_prime.normalized_rows();
    let key_labels = graph.cache_labels.clone();
    let key_image = super::tip::key_images(params.cache_keys, keys0.rows, input.train.len());
    let cache = |k| super::tip::CacheRef {
        keys: k,
        labels: &key_labels,
        image: &key_image,
    };
    let (initial, initial_sel) = {
        let c0 = cache(&keys0);
        super::tip::choose(params, input, Some(&text), &c0)
    };
    let (keys, key_losses) = super::keys::train_keys(
        params,
        super::keys::KeyTraining {
            text: Some(&text),
            keys: &keys0,
            key_labels: &key_labels,
            key_image: &key_image,
            train: input.train,
            num_classes: input.classes.len(),
            alpha: initial.alpha,
            beta: initial.beta,
            exclude_self: params.self_exclude,
            what: "HeGraphAdapter's cache keys",
        },
        cancel,
        on_event,
    )?;
    let (found, sel) = match val {
        Some(_) => super::tip::choose(params, input, Some(&text), &cache(&keys)),
        None => (initial, initial_sel),
    };
    let offset = state.step as usize;
    adapter
        .losses
        .extend(key_losses.into_iter().map(|(s, l)| (s + offset, l)));
    adapter.tensors.fused_keys = Some(keys);
    adapter.alpha = Some(found.alpha);
    adapter.beta = Some(found.beta);
    adapter.selection = Some(sel);
    if let Some(val) = val {
        adapter.val_accuracy = Some(adapter.accuracy(val)?);
    }
    Ok(())
}

/// The fusion weights tried on validation: 0 (text branch alone) and 24 values log-spaced from 0.01 to 10.
pub fn fusion_weight_grid() -> Vec<f32> {
    std::iter::once(0.0)
        .chain((0..25).map(|i| 10f32.powf(-2.0 + i as f32 / 8.0)))
        .collect()
}

/// The `w` with the best validation accuracy; among ties (frequent with a few validation images per class)
/// the one whose fused probabilities give the lowest validation cross-entropy. Returns `(w, accuracy)`.
fn search_fusion_weight(
    adapter: &TrainedAdapter,
    val: &crate::features::LabelledSplit,
    default: f32,
) -> Result<(f32, f32), AdapterError> {
    let z = val.features.normalized_rows();
    let (pt, pc) = adapter.hegraph_branches(&z)?;
    let c = pt.cols;
    let mut grid = fusion_weight_grid();
    grid.push(default.max(0.0));
    let mut best: Option<(f32, usize, f64)> = None;
    for w in grid {
        let mut hits = 0usize;
        let mut nll = 0.0f64;
        for (r, &y) in val.labels.iter().enumerate() {
            let f: Vec<f32> = (0..c)
                .map(|k| (pt.get(r, k) + w * pc.get(r, k)) / (1.0 + w))
                .collect();
            if crate::linalg::argmax(&f) == y {
                hits += 1;
            }
            nll -= (f[y].max(1e-30) as f64).ln();
        }
        let better = match best {
            None => true,
            Some((_, bh, bn)) => hits > bh || (hits == bh && nll < bn),
        };
        if better {
            best = Some((w, hits, nll));
        }
    }
    let (w, hits, _) = best.unwrap_or((default, 0, 0.0));
    Ok((w, hits as f32 / z.rows.max(1) as f32))
}

#[allow(clippy::too_many_arguments)]
fn non_finite(
    step: usize,
    what: &str,
    good: Option<HeGraphState>,
    graph: &HeteroGraph,
    params: &TrainParams,
    notes: &[String],
    losses: &[(usize, f32)],
    backend: &str,
) -> AdapterError {
    AdapterError::NonFinite {
        step,
        what: what.to_string(),
        last_good: good.filter(|s| s.is_finite()).map(|s| {
            Box::new(adapter_from_state(
                graph, params, &s, notes, losses, backend,
            ))
        }),
    }
}
