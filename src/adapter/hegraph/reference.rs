//! The reference forward pass and gradients: plain candle operations, every product inside candle's autodiff
//! (`Var` weights), nothing hand-derived. The tensor forms of the model's inputs and the forward pieces are
//! shared with the faster candle backend (`super::candle`), which builds the same graph with some products
//! taken out of the autodiff.

use candle_core::{DType, Device, Tensor, Var};

use super::{check_weights, FrozenInputs, HeGraphHyper, HeGraphWeights};
use crate::adapter::{Activation, AdapterError};
use crate::graph::HeteroGraph;
use crate::linalg::Mat;

pub(super) fn to_tensor(m: &Mat, dt: DType, dev: &Device) -> candle_core::Result<Tensor> {
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
pub(super) struct Frozen {
    pub(super) c: usize,
    pub(super) p: Tensor,
    pub(super) n: Option<Tensor>,
    pub(super) h_p: Tensor,
    pub(super) h_vv: Tensor,
    pub(super) pn_self: Option<Tensor>,
    pub(super) a_pn: Option<Tensor>,
    pub(super) h_n: Option<Tensor>,
    pub(super) keys: Tensor,
    pub(super) key_labels: Tensor,
}

impl Frozen {
    pub(super) fn new(f: &FrozenInputs, dt: DType, dev: &Device) -> candle_core::Result<Self> {
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
pub(super) struct Linear<'a> {
    pub(super) n: Option<Tensor>,
    pub(super) p: Tensor,
    pub(super) v: Tensor,
    pub(super) pn: &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
}

/// `(P', N', B, H_PN)` from the linear parts (module docs of [`super`]); `H_PN = PN_self + Â_PN N'` when there are
/// negative nodes.
pub(super) fn graph_fwd(
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

/// How the cache sums `Σ_{m: label(m) = c} exp(β_c (S[b, m] − 1))` (B×C) are formed from `γB` (module docs of [`super`]).
pub(super) type CacheFn<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

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

/// The training loss of a batch (module docs of [`super`]).
pub(super) fn loss_fwd(
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
