//! HeGraphAdapter: the model every backend computes (frozen inputs, weights and their AdamW state, defined
//! here), its candle reference, the candle training backend, what the CPU backends' steps share, and the
//! training driver that any backend (the GPU one included) plugs into.
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
//! # Modules
//!
//! - `reference`: [`forward_graph`] and [`loss_and_grads`], plain candle operations and candle's autodiff
//!   through `Var` weights, nothing hand-derived: what every backend is tested against.
//! - `candle`: [`CandleBackend`], the same numbers by candle's autodiff, faster than the reference (its
//!   module docs say how); selectable as `--backend candle` ([`CandleFactory`]), the autodiff cross-check of a
//!   whole training run.
//! - `backend`: the seam the CPU backends share ([`super::CpuBackend`] and [`CandleBackend`]): the checked
//!   starting state, the batch checks, and the all-or-nothing AdamW commit of a step.
//! - `driver`: the training run over any [`HeGraphBackend`]: schedule, events, cancellation, recovery from a
//!   non-finite step, and the classifier that follows the graph layers.
//!
//! AdamW ([`adamw_into`]) follows PyTorch's single-tensor code, evaluated in f32 in this order (`t` = the
//! step number after the update; `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t`, `lr/bc1` and `1/√bc2` computed in f64
//! and rounded to f32): `m ← (g − m)·(1−β1) + m`, `v ← v·β2 + g·g·(1−β2)`, `denom = √v · (1/√bc2) + ε`,
//! `w ← w·(1 − lr·wd) − (m / denom)·(lr/bc1)`.

mod backend;
mod candle;
mod driver;
mod reference;

use rayon::prelude::*;

use super::{Activation, AdapterError, TrainParams, WeightInit};
use crate::graph::{EdgeType, HeteroGraph, NormEdges};
use crate::linalg::Mat;
use crate::rng::Rng;

pub(crate) use backend::{check_batch, commit_step, starting_state};
pub use candle::{CandleBackend, CandleFactory};
pub use driver::fusion_weight_grid;
pub(crate) use driver::train_hegraph;
pub use reference::{
    forward_graph, loss_and_grads, loss_and_grads_f64, GraphOutputs, LossAndGrads,
};

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
