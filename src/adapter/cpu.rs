//! The CPU training backend: one hand-written forward and backward pass per step on buffers allocated once.
//!
//! It computes the same numbers as the candle reference of [`super::hegraph`] (the module docs there give
//! the formulas; tests compare the loss and all three gradients with candle's autodiff to 1e-4) and follows
//! the same sequence as the wgpu step ([`crate::gpu::adapter`]), with what only a CPU gains from:
//!
//! - the products with a shared weight are stacked: `[H_PP; H_PV; H_PN] W_P` is one `3C×D·D×D` product and
//!   `∂W_P = [H_PP; H_PV; H_PN]ᵀ [α_pp G₁; α_vp G₂; α_np G₃]` one more (likewise for `W_N`), so the thirteen
//!   `C×D×D` products of a step run as seven larger ones (through [`crate::linalg::gemm()`]);
//! - the cache is kept sorted by class, so the cache logits are sums over each class's contiguous segment,
//!   never a product with the one-hot `M×C` label matrix;
//! - `z Xᵀ` of every training query is one product when the backend is built (it does not depend on the
//!   weights), unless it would exceed [`MEMO_LIMIT`]; then each step takes it for its batch;
//! - `exp` and `tanh` are [`fast_exp`] and [`fast_tanh`] (2e-7 and 3e-7 relative), which vectorise.
//!
//! Why not candle: its per-operation allocation, layout checks and thread hand-offs cost more than the
//! arithmetic at these sizes. Measured with `hegraph bench train --classes 50` (release, this project's
//! 2-core machine): about 9 ms per step here against about 21 ms for [`super::hegraph::CandleBackend`],
//! which remains selectable (`--backend candle`) as the autodiff cross-check of whole trainings.

use rayon::prelude::*;

use super::hegraph::{check_batch, commit_step, starting_state, FrozenInputs, HeGraphHyper};
use super::{Activation, AdapterError, HeGraphBackend, HeGraphState, LossAndGrads, TrainParams};
use crate::graph::HeteroGraph;
use crate::linalg::{fast_exp, fast_tanh, gemm, Mat, Tr};

/// Above this many floats the `z Xᵀ` rows of all training queries are not memoised (128 MiB).
const MEMO_LIMIT: usize = 32 << 20;

/// Frozen parts of the negative branch.
struct NegFrozen {
    n: Mat,
    /// `[H_NP; H_NV]`, 2C×D.
    h_n: Vec<f32>,
    pn_self: Mat,
    a_pn: Mat,
}

/// Work buffers of one step, resized to each batch (a shorter last batch keeps the allocation, so after the
/// first full batch nothing is allocated).
#[derive(Default)]
struct Work {
    // graph, C×D unless noted
    pre_p: Vec<f32>,
    /// act(pre_p): `[u1; u2; u3]`, kC×D.
    u_p: Vec<f32>,
    pre_n: Vec<f32>,
    /// act(pre_n): `[t1; t2]`, 2C×D.
    u_n: Vec<f32>,
    n_prime: Vec<f32>,
    p_prime: Vec<f32>,
    p_norm: Vec<f32>,
    p_len: Vec<f32>,
    b: Vec<f32>,
    bg: Vec<f32>,
    /// `‖X_m + γB_label(m)‖`, M.
    x_len: Vec<f32>,
    inv_len: Vec<f32>,
    // batch
    z: Vec<f32>,
    sx: Vec<f32>,
    zb: Vec<f32>,
    lt: Vec<f32>,
    sim: Vec<f32>,
    /// `exp(β_c (S − 1))`, B×M, overwritten in place by `dS`.
    ds: Vec<f32>,
    /// The cache sums, B×C, overwritten in place by their gradient `G`.
    lc: Vec<f32>,
    dzb: Vec<f32>,
    d_lt: Vec<f32>,
    row_loss: Vec<f32>,
    // backward
    dn: Vec<f32>,
    dbg: Vec<f32>,
    g_v: Vec<f32>,
    d_pn: Vec<f32>,
    d_pp: Vec<f32>,
    g_p: Vec<f32>,
    d_hpn: Vec<f32>,
    d_nprime: Vec<f32>,
    g_n: Vec<f32>,
    grad_p: Vec<f32>,
    grad_n: Vec<f32>,
    grad_v: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// The hand-written CPU backend (module docs).
pub struct CpuBackend {
    hyper: HeGraphHyper,
    params: TrainParams,
    c: usize,
    d: usize,
    p: Mat,
    /// `[H_PP; H_PV; H_PN]` (3C×D, the last block rewritten every step from `N'`) or `[H_PP; H_PV]`.
    h_p: Vec<f32>,
    h_vv: Mat,
    neg: Option<NegFrozen>,
    /// The cache keys sorted by class.
    keys: Mat,
    /// The class of each sorted key.
    key_labels: Vec<u32>,
    /// Class `c` owns sorted keys `class_start[c]..class_start[c + 1]`.
    class_start: Vec<usize>,
    queries: Mat,
    /// `z Xᵀ` of every query row (rows × M, sorted keys), when it fits in [`MEMO_LIMIT`].
    memo: Option<Vec<f32>>,
    state: HeGraphState,
    /// Where an update is written before it is accepted (same shapes as `state`).
    scratch: HeGraphState,
    w: Work,
}

impl CpuBackend {
    /// `queries`: the normalised stacked training views (view-major). `state`: where to start (e.g. a snapshot
    /// of another backend); `None` draws the initial weights from the seed.
    pub fn new(
        graph: &HeteroGraph,
        queries: &Mat,
        params: &TrainParams,
        state: Option<HeGraphState>,
    ) -> Result<Self, AdapterError> {
        let d = graph.dim();
        let state = starting_state(graph, queries, params, state)?;
        let f = FrozenInputs::new(graph)?;
        let c = f.num_classes;
        let sorted = f.cache_by_class()?;
        let neg = match (f.n, f.h_np, f.h_nv, f.pn_self, f.a_pn) {
            (Some(n), Some(h_np), Some(h_nv), Some(pn_self), Some(a_pn)) => Some(NegFrozen {
                n,
                h_n: [h_np.data, h_nv.data].concat(),
                pn_self,
                a_pn,
            }),
            _ => None,
        };
        let mut h_p = [f.h_pp.data, f.h_pv.data].concat();
        if neg.is_some() {
            h_p.resize(3 * c * d, 0.0);
        }
        let (keys, key_labels) = (sorted.keys, sorted.labels);
        let class_start: Vec<usize> = sorted.offsets.iter().map(|&o| o as usize).collect();
        let m = keys.rows;
        // `z Xᵀ` of every training query in one product: it does not depend on the weights, and one large
        // product runs at about twice the rate of the per-batch ones it replaces.
        let memo = (queries.rows.saturating_mul(m) <= MEMO_LIMIT).then(|| {
            let mut memo = vec![0.0f32; queries.rows * m];
            gemm(
                &mut memo,
                (queries.rows, m, d),
                &queries.data,
                Tr::N,
                &keys.data,
                Tr::T,
                1.0,
                0.0,
            );
            memo
        });
        Ok(Self {
            hyper: HeGraphHyper::train(params),
            params: params.clone(),
            c,
            d,
            p: f.p,
            h_p,
            h_vv: f.h_vv,
            neg,
            keys,
            key_labels,
            class_start,
            queries: queries.clone(),
            memo,
            scratch: state.clone(),
            state,
            w: Work::default(),
        })
    }

    /// Drops the `z Xᵀ` memo, as happens on its own above 128 MiB of memo: each step then takes the product
    /// for its batch (for tests of that path on small problems).
    pub fn without_memo(mut self) -> Self {
        self.memo = None;
        self
    }

    fn check_batch(&self, rows: &[u32], labels: &[u32]) -> Result<(), AdapterError> {
        check_batch(rows, labels, self.queries.rows, self.c)
    }

    /// The loss of a batch and its gradients at the current weights (what [`HeGraphBackend::step`] uses;
    /// public so that other backends can be compared with it step by step).
    pub fn batch_loss_and_grads(
        &mut self,
        rows: &[u32],
        labels: &[u32],
    ) -> Result<LossAndGrads, AdapterError> {
        self.check_batch(rows, labels)?;
        let loss = self.forward_backward(rows, labels);
        if !loss.is_finite() {
            return Err(AdapterError::NonFinite {
                step: self.state.step as usize,
                what: "the loss".into(),
                last_good: None,
            });
        }
        let d = self.d;
        Ok(LossAndGrads {
            loss: loss as f64,
            w_p: Mat::from_vec(d, d, self.w.grad_p.clone()),
            w_n: self
                .neg
                .as_ref()
                .map(|_| Mat::from_vec(d, d, self.w.grad_n.clone())),
            w_v: Mat::from_vec(d, d, self.w.grad_v.clone()),
        })
    }

    /// Fills `w.sx` with `z Xᵀ` of the batch rows, unless the memo holds them.
    fn key_affinity(&mut self, rows: &[u32]) {
        if self.memo.is_some() {
            return;
        }
        let (m, d, bsz) = (self.keys.rows, self.d, rows.len());
        resize(&mut self.w.sx, bsz * m);
        gemm(
            &mut self.w.sx,
            (bsz, m, d),
            &self.w.z,
            Tr::N,
            &self.keys.data,
            Tr::T,
            1.0,
            0.0,
        );
    }

    /// One forward and backward pass: returns the loss and leaves the three gradients in `w.grad_*`.
    fn forward_backward(&mut self, rows: &[u32], labels: &[u32]) -> f32 {
        let (c, d, m, bsz) = (self.c, self.d, self.keys.rows, rows.len());
        let h = self.hyper;
        let tanh = matches!(h.activation, Activation::Tanh);
        let kp = if self.neg.is_some() { 3 } else { 2 };
        let cd = c * d;
        let dd = d * d;
        {
            let w = &mut self.w;
            for (v, n) in [
                (&mut w.pre_p, kp * cd),
                (&mut w.u_p, kp * cd),
                (&mut w.p_prime, cd),
                (&mut w.p_norm, cd),
                (&mut w.p_len, c),
                (&mut w.b, cd),
                (&mut w.bg, cd),
                (&mut w.x_len, m),
                (&mut w.inv_len, m),
                (&mut w.z, bsz * d),
                (&mut w.zb, bsz * c),
                (&mut w.lt, bsz * c),
                (&mut w.sim, bsz * m),
                (&mut w.ds, bsz * m),
                (&mut w.lc, bsz * c),
                (&mut w.dzb, bsz * c),
                (&mut w.d_lt, bsz * c),
                (&mut w.row_loss, bsz),
                (&mut w.dn, m),
                (&mut w.dbg, cd),
                (&mut w.g_v, cd),
                (&mut w.d_pn, cd),
                (&mut w.d_pp, cd),
                (&mut w.g_p, kp * cd),
                (&mut w.grad_p, dd),
                (&mut w.grad_v, dd),
            ] {
                resize(v, n);
            }
            if self.neg.is_some() {
                for (v, n) in [
                    (&mut w.pre_n, 2 * cd),
                    (&mut w.u_n, 2 * cd),
                    (&mut w.n_prime, cd),
                    (&mut w.d_hpn, cd),
                    (&mut w.d_nprime, cd),
                    (&mut w.g_n, 2 * cd),
                    (&mut w.grad_n, dd),
                ] {
                    resize(v, n);
                }
            }
        }

        // ---- graph forward
        if let (Some(ng), Some(wn)) = (&self.neg, &self.state.n) {
            let w = &mut self.w;
            gemm(
                &mut w.pre_n,
                (2 * c, d, d),
                &ng.h_n,
                Tr::N,
                &wn.w.data,
                Tr::N,
                1.0,
                0.0,
            );
            act(&w.pre_n, &mut w.u_n, tanh);
            let (t1, t2) = w.u_n.split_at(cd);
            for (((o, &n0), &a), &b) in w.n_prime.iter_mut().zip(&ng.n.data).zip(t1).zip(t2) {
                *o = n0 + h.beta_pn * a + h.beta_vn * b;
            }
            let h_pn = &mut self.h_p[2 * cd..3 * cd];
            h_pn.copy_from_slice(&ng.pn_self.data);
            gemm(
                h_pn,
                (c, d, c),
                &ng.a_pn.data,
                Tr::N,
                &w.n_prime,
                Tr::N,
                1.0,
                1.0,
            );
        }
        let w = &mut self.w;
        gemm(
            &mut w.pre_p,
            (kp * c, d, d),
            &self.h_p,
            Tr::N,
            &self.state.p.w.data,
            Tr::N,
            1.0,
            0.0,
        );
        act(&w.pre_p, &mut w.u_p, tanh);
        let coef_p = [h.alpha_pp, h.alpha_vp, h.alpha_np];
        w.p_prime.copy_from_slice(&self.p.data);
        for (k, &a) in coef_p.iter().enumerate().take(kp) {
            for (o, &u) in w.p_prime.iter_mut().zip(&w.u_p[k * cd..(k + 1) * cd]) {
                *o += a * u;
            }
        }
        gemm(
            &mut w.b,
            (c, d, d),
            &self.h_vv.data,
            Tr::N,
            &self.state.v.w.data,
            Tr::N,
            1.0,
            0.0,
        );
        if tanh {
            w.b.par_chunks_mut(4096)
                .for_each(|ch| ch.iter_mut().for_each(|x| *x = fast_tanh(*x)));
        }
        for (o, &b) in w.bg.iter_mut().zip(&w.b) {
            *o = h.gamma * b;
        }
        let (keys, labels_m) = (&self.keys, &self.key_labels);
        let bg = &w.bg;
        w.x_len.par_iter_mut().enumerate().for_each(|(k, o)| {
            let l = labels_m[k] as usize;
            *o = sum_sq(keys.row(k), &bg[l * d..(l + 1) * d]).sqrt();
        });
        for (o, &len) in w.inv_len.iter_mut().zip(&w.x_len) {
            *o = 1.0 / len;
        }
        for ((row, out), len) in w
            .p_prime
            .chunks(d)
            .zip(w.p_norm.chunks_mut(d))
            .zip(w.p_len.iter_mut())
        {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            *len = n;
            for (o, x) in out.iter_mut().zip(row) {
                *o = x / n;
            }
        }

        // ---- batch forward
        for (out, &r) in w.z.chunks_mut(d).zip(rows) {
            out.copy_from_slice(self.queries.row(r as usize));
        }
        self.key_affinity(rows);
        let w = &mut self.w;
        let s = h.logit_scale;
        gemm(
            &mut w.lt,
            (bsz, c, d),
            &w.z,
            Tr::N,
            &w.p_norm,
            Tr::T,
            s,
            0.0,
        );
        gemm(&mut w.zb, (bsz, c, d), &w.z, Tr::N, &w.bg, Tr::T, 1.0, 0.0);
        let inv_b = 1.0 / bsz as f32;
        let (beta, lambda) = (h.beta_c, h.lambda);
        let inv_len = &w.inv_len;
        let cs = &self.class_start;
        let (memo, sx_batch) = (self.memo.as_deref(), &w.sx);
        (
            w.sim.par_chunks_mut(m),
            w.ds.par_chunks_mut(m),
            w.zb.par_chunks(c),
            w.lt.par_chunks(c),
            w.d_lt.par_chunks_mut(c),
            w.lc.par_chunks_mut(c),
            w.dzb.par_chunks_mut(c),
            w.row_loss.par_iter_mut(),
            labels.par_iter(),
            rows.par_iter(),
        )
            .into_par_iter()
            .enumerate()
            .for_each(|(b, (sim, ds, zb, lt, d_lt, lc, dzb, loss, &y, &r))| {
                let y = y as usize;
                let sx = match memo {
                    Some(mm) => &mm[r as usize * m..(r as usize + 1) * m],
                    None => &sx_batch[b * m..(b + 1) * m],
                };
                // Cache sums Σ_{m ∈ c} exp(β (S − 1)) over each class's segment, the exponentials kept in `ds`
                // for the backward.
                for (cls, sum) in lc.iter_mut().enumerate() {
                    let (k0, k1) = (cs[cls], cs[cls + 1]);
                    let zbc = zb[cls];
                    let mut acc = 0.0f32;
                    for (((sv, ev), &x), &il) in sim[k0..k1]
                        .iter_mut()
                        .zip(&mut ds[k0..k1])
                        .zip(&sx[k0..k1])
                        .zip(&inv_len[k0..k1])
                    {
                        let v = (x + zbc) * il;
                        *sv = v;
                        let e = fast_exp(beta * (v - 1.0));
                        *ev = e;
                        acc += e;
                    }
                    *sum = acc;
                }
                // Text cross-entropy and ∂loss/∂ℓ_t (1/B folded in).
                let ce_t = softmax_xent(lt, y, d_lt, inv_b);
                // Cache cross-entropy of ℓ_c = s · sums; `lc` becomes G = ∂loss/∂sums = s λ/B (softmax − onehot).
                lc.iter_mut().for_each(|x| *x *= s);
                let ce_c = softmax_xent_in_place(lc, y, s * lambda * inv_b);
                *loss = ce_t + lambda * ce_c;
                // dS[b, m] = β e G[b, label(m)]; ∂(zb)[b, c] = Σ_{m ∈ c} dS / n_m.
                for (cls, dz) in dzb.iter_mut().enumerate() {
                    let (k0, k1) = (cs[cls], cs[cls + 1]);
                    let g = beta * lc[cls];
                    let mut acc = 0.0f32;
                    for (ev, &il) in ds[k0..k1].iter_mut().zip(&inv_len[k0..k1]) {
                        let v = g * *ev;
                        *ev = v;
                        acc += v * il;
                    }
                    *dz = acc;
                }
            });
        let loss = (w.row_loss.iter().map(|&x| x as f64).sum::<f64>() / bsz as f64) as f32;
        if !loss.is_finite() {
            return loss;
        }

        // ---- backward: cache branch
        // dn[m] = −Σ_b dS[b, m] S[b, m] / n_m, accumulated row by row (contiguous, vectorised).
        w.dn.fill(0.0);
        for (ds, sim) in w.ds.chunks(m).zip(w.sim.chunks(m)) {
            for ((o, &a), &b) in w.dn.iter_mut().zip(ds).zip(sim) {
                *o -= a * b;
            }
        }
        for (o, &il) in w.dn.iter_mut().zip(&w.inv_len) {
            *o *= il;
        }
        gemm(
            &mut w.dbg,
            (c, d, bsz),
            &w.dzb,
            Tr::T,
            &w.z,
            Tr::N,
            1.0,
            0.0,
        );
        let (dn, bg, keys, inv_len) = (&w.dn, &w.bg, &self.keys, &w.inv_len);
        let cs = &self.class_start;
        w.dbg.par_chunks_mut(d).enumerate().for_each(|(cls, row)| {
            let g = &bg[cls * d..(cls + 1) * d];
            for k in cs[cls]..cs[cls + 1] {
                let coef = dn[k] * inv_len[k];
                for ((o, xv), gv) in row.iter_mut().zip(keys.row(k)).zip(g) {
                    *o += coef * (xv + gv);
                }
            }
        });
        // ∂B = γ ∂(γB); through the activation into W_V.
        for ((o, &g), &b) in w.g_v.iter_mut().zip(&w.dbg).zip(&w.b) {
            *o = h.gamma * g * act_grad(b, tanh);
        }
        gemm(
            &mut w.grad_v,
            (d, d, c),
            &self.h_vv.data,
            Tr::T,
            &w.g_v,
            Tr::N,
            1.0,
            0.0,
        );

        // ---- backward: text branch
        gemm(
            &mut w.d_pn,
            (c, d, bsz),
            &w.d_lt,
            Tr::T,
            &w.z,
            Tr::N,
            s,
            0.0,
        );
        for (((dp, g), pn), &len) in w
            .d_pp
            .chunks_mut(d)
            .zip(w.d_pn.chunks(d))
            .zip(w.p_norm.chunks(d))
            .zip(&w.p_len)
        {
            let proj: f32 = g.iter().zip(pn).map(|(a, b)| a * b).sum();
            for ((o, &gv), &pv) in dp.iter_mut().zip(g).zip(pn) {
                *o = (gv - pv * proj) / len;
            }
        }
        for (k, &a) in coef_p.iter().enumerate().take(kp) {
            let u = &w.u_p[k * cd..(k + 1) * cd];
            for ((o, &g), &uv) in w.g_p[k * cd..(k + 1) * cd].iter_mut().zip(&w.d_pp).zip(u) {
                *o = a * g * act_grad(uv, tanh);
            }
        }
        gemm(
            &mut w.grad_p,
            (d, d, kp * c),
            &self.h_p,
            Tr::T,
            &w.g_p,
            Tr::N,
            1.0,
            0.0,
        );
        if let Some(ng) = &self.neg {
            // Through N' (W_P before its update): ∂H_PN = α_np G₃ W_Pᵀ, ∂N' = Â_PNᵀ ∂H_PN.
            gemm(
                &mut w.d_hpn,
                (c, d, d),
                &w.g_p[2 * cd..3 * cd],
                Tr::N,
                &self.state.p.w.data,
                Tr::T,
                1.0,
                0.0,
            );
            gemm(
                &mut w.d_nprime,
                (c, d, c),
                &ng.a_pn.data,
                Tr::T,
                &w.d_hpn,
                Tr::N,
                1.0,
                0.0,
            );
            let (t1, t2) = w.u_n.split_at(cd);
            let (g1, g2) = w.g_n.split_at_mut(cd);
            for ((((o1, o2), &g), &a), &b) in g1
                .iter_mut()
                .zip(g2.iter_mut())
                .zip(&w.d_nprime)
                .zip(t1)
                .zip(t2)
            {
                *o1 = h.beta_pn * g * act_grad(a, tanh);
                *o2 = h.beta_vn * g * act_grad(b, tanh);
            }
            gemm(
                &mut w.grad_n,
                (d, d, 2 * c),
                &ng.h_n,
                Tr::T,
                &w.g_n,
                Tr::N,
                1.0,
                0.0,
            );
        }
        loss
    }
}

/// `out = act(x)`.
fn act(x: &[f32], out: &mut [f32], tanh: bool) {
    if tanh {
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = fast_tanh(x);
                }
            });
    } else {
        out.copy_from_slice(x);
    }
}

/// `Σ (a + b)²` with eight accumulators, so that it vectorises.
fn sum_sq(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| (x + y) * (x + y))
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            let v = x[l] + y[l];
            acc[l] += v * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The derivative of the activation at output `y`.
fn act_grad(y: f32, tanh: bool) -> f32 {
    if tanh {
        1.0 - y * y
    } else {
        1.0
    }
}

/// Cross-entropy of logits `row` at class `y`; writes `gscale · (softmax − onehot)` to `grad`.
fn softmax_xent(row: &[f32], y: usize, grad: &mut [f32], gscale: f32) -> f32 {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for (g, &x) in grad.iter_mut().zip(row) {
        let e = (x - mx).exp();
        *g = e;
        sum += e;
    }
    for g in grad.iter_mut() {
        *g *= gscale / sum;
    }
    grad[y] -= gscale;
    sum.ln() + mx - row[y]
}

/// As [`softmax_xent`] with the gradient written over the logits.
fn softmax_xent_in_place(row: &mut [f32], y: usize, gscale: f32) -> f32 {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let ly = row[y];
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        let e = (*x - mx).exp();
        *x = e;
        sum += e;
    }
    for x in row.iter_mut() {
        *x *= gscale / sum;
    }
    row[y] -= gscale;
    sum.ln() + mx - ly
}

impl HeGraphBackend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn step(
        &mut self,
        rows: &[u32],
        labels: &[u32],
        lr: f32,
        want_loss: bool,
    ) -> Result<Option<f32>, AdapterError> {
        self.check_batch(rows, labels)?;
        let loss = self.forward_backward(rows, labels);
        let w = &self.w;
        let grads = (
            w.grad_p.as_slice(),
            self.neg.as_ref().map(|_| w.grad_n.as_slice()),
            w.grad_v.as_slice(),
        );
        commit_step(
            &mut self.state,
            &mut self.scratch,
            loss,
            grads,
            &self.params,
            lr,
        )?;
        Ok(want_loss.then_some(loss))
    }

    fn state(&mut self) -> Result<HeGraphState, AdapterError> {
        Ok(self.state.clone())
    }
}
