//! CLIP's image and text towers on the CPU, on plain `f32` buffers, with the weights loaded through candle.
//!
//! candle-transformers' CLIP spends most of its time outside the matrix products: every `Linear` on a
//! `(batch, tokens, width)` tensor becomes one small GEMM per image against a broadcast weight, the heads are
//! split and merged with transposes that copy, and layer norm, the bias additions, the residuals and
//! quick-GELU each allocate and sweep a tensor of their own. Here each layer is five GEMMs over all the
//! tokens of the batch at once (fused q/k/v, output projection, two MLP products; the patch embedding is one
//! more over the unfolded patches), attention read straight out of the fused q/k/v rows (per image and head
//! as two small GEMMs on strided views), and passes over rows (layer norm, bias with quick-GELU) compiled for
//! AVX-512 and AVX2 besides the baseline; the residual additions are done by the GEMMs accumulating into the
//! hidden state. Every weight is packed once at load for the AVX-512 kernel of [`PackedMatrix`] where the CPU
//! has one (else kept `in × out` for the `gemm` crate, see `Weight`). `BENCHMARKS.md` ("CLIP encoding") has
//! the figures behind each of these choices. The arithmetic is that of Hugging Face's `CLIPModel` (the tensors
//! are those of its checkpoints); `tests/clip.rs` checks the features against candle-transformers' CLIP.
//!
//! Text is packed: each prompt takes exactly its own tokens (no padding), which the causal mask makes
//! equivalent to the padded batch. Only the pooled rows (the class token of an image, the end-of-text token
//! of a prompt) are carried through the last layer's attention output, MLP and final norm: nothing else
//! reaches the features.

use std::ops::Range;

use candle_core::Result as CandleResult;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::{
    text_model::ClipTextConfig, vision_model::ClipVisionConfig,
};
use rayon::prelude::*;

use multiversion::multiversion;

use crate::linalg::packed::PackedMatrix;
use crate::linalg::{fast_exp, gemm, gemm_small, gemm_wide, Strided, Tr};

/// transformers' `layer_norm_eps` for CLIP (the only value the config parser accepts).
const LN_EPS: f32 = 1e-5;
/// Rows per rayon task in the row passes: enough work per task to amortise scheduling.
const ROWS_PER_TASK: usize = 8;
/// Up to this many rows (tokens) a projection runs as [`gemm_wide`] (its columns split between the threads),
/// beyond it as [`gemm`]: a batch of up to five images, or a last layer's pooled rows.
const SHORT_ROWS: usize = 256;

fn load(vb: &VarBuilder, shape: &[usize], name: &str) -> CandleResult<Vec<f32>> {
    vb.get(shape, name)?.flatten_all()?.to_vec1::<f32>()
}

/// A weight stored `out × …` (PyTorch's `out × in`; a convolution's `out × channels × p × p` is read as
/// `out × (channels·p·p)`), returned transposed: `in × out`, row-major.
///
/// Why at load: `gemm` packs its right-hand operand on every call, and packing `Wᵀ` read through strides
/// (column-major) is slow when the left operand is short: at batch 1 (50 tokens) the `50×3072·3072×768`
/// product ran at 37 GFLOP/s with the stored layout and 165 GFLOP/s with this one on one core of the
/// development machine (the 1,600-token products of batch 32 gain 5–40 %). One copy per weight, once.
fn load_transposed(vb: &VarBuilder, shape: &[usize], name: &str) -> CandleResult<Vec<f32>> {
    let w = vb.get(shape, name)?;
    let out = shape.first().copied().unwrap_or(1);
    w.reshape((out, w.elem_count() / out.max(1)))?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// A `k × n` weight (`in × out`, see [`load_transposed`]) in the layout this CPU multiplies fastest: packed
/// into panels for the AVX-512 kernel ([`PackedMatrix`]), else row-major for the `gemm` crate. One copy.
enum Weight {
    Packed(PackedMatrix),
    RowMajor { data: Vec<f32>, k: usize, n: usize },
}

impl Weight {
    fn new(data: Vec<f32>, k: usize, n: usize) -> Self {
        match PackedMatrix::pack(&data, k, n) {
            Some(p) => Self::Packed(p),
            None => Self::RowMajor { data, k, n },
        }
    }

    fn load(vb: &VarBuilder, shape: &[usize], name: &str) -> CandleResult<Self> {
        let n = shape.first().copied().unwrap_or(1);
        let k = shape.iter().skip(1).product::<usize>();
        Ok(Self::new(load_transposed(vb, shape, name)?, k, n))
    }

    /// `y = x·W` (or `y += x·W` with `accumulate`) for `rows` rows of `x`.
    fn multiply(&self, x: &[f32], rows: usize, y: &mut [f32], accumulate: bool) {
        match self {
            Self::Packed(p) => p.multiply(y, rows, x, accumulate),
            Self::RowMajor { data, k, n } => {
                let shape = (rows, *n, *k);
                if rows <= SHORT_ROWS {
                    gemm_wide(y, shape, x, data, accumulate);
                } else {
                    let beta = if accumulate { 1.0 } else { 0.0 };
                    gemm(y, shape, x, Tr::N, data, Tr::N, 1.0, beta);
                }
            }
        }
    }
}

/// A linear layer: its weight (see [`Weight`]) and bias.
struct Linear {
    w: Weight,
    b: Vec<f32>,
    out: usize,
}

impl Linear {
    fn load(vb: &VarBuilder, inp: usize, out: usize) -> CandleResult<Self> {
        Ok(Self {
            w: Weight::load(vb, &[out, inp], "weight")?,
            b: load(vb, &[out], "bias")?,
            out,
        })
    }

    /// `y = x Wᵀ` (`rows × out`) without the bias: callers fuse it into the pass that follows.
    fn product(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.w.multiply(x, rows, y, false);
    }

    /// `acc += x Wᵀ + b`: the residual connection done by the GEMM itself.
    fn accumulate(&self, x: &[f32], rows: usize, acc: &mut [f32]) {
        add_rows(&mut acc[..rows * self.out], &self.b);
        self.w.multiply(x, rows, acc, true);
    }
}

struct Norm {
    g: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn load(vb: &VarBuilder, d: usize) -> CandleResult<Self> {
        Ok(Self {
            g: load(vb, &[d], "weight")?,
            b: load(vb, &[d], "bias")?,
        })
    }

    /// Layer norm of each row of `x` into `out` (same shape).
    fn apply(&self, x: &[f32], out: &mut [f32]) {
        let d = self.g.len();
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(o, x)| layer_norm_row(x, &self.g, &self.b, o));
    }
}

/// Sum of `x` in 16 independent lanes, so the loop vectorises (one AVX-512 or two AVX2 registers) without
/// reassociating floating-point additions.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `a · b` in 16 lanes, as [`sum`].
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Lanes of the vectorised reductions.
const LANES: usize = 16;

// The row passes below are compiled for AVX-512 and AVX2 besides the baseline and picked at run time
// (`multiversion`): a release build targets plain x86-64, whose 4-wide SSE2 vectors left attention, layer
// norm and quick-GELU at a quarter of the machine's width (together 28 % of a batch of 32 images, with the
// products already on AVX-512 through `gemm`).

/// Layer norm of one row (`g`, `b`: gain and bias) into `o`.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn layer_norm_row(x: &[f32], g: &[f32], b: &[f32], o: &mut [f32]) {
    let inv_d = 1.0 / x.len() as f32;
    let mean = sum(x) * inv_d;
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let t = c[l] - mean;
            acc[l] += t * t;
        }
    }
    let mut var: f32 = acc.iter().sum();
    for &v in rest {
        var += (v - mean) * (v - mean);
    }
    let inv = 1.0 / (var * inv_d + LN_EPS).sqrt();
    for (((o, &x), &g), &b) in o.iter_mut().zip(x).zip(g).zip(b) {
        *o = (x - mean) * inv * g + b;
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn add_row(r: &mut [f32], row: &[f32]) {
    r.iter_mut().zip(row).for_each(|(a, b)| *a += b);
}

/// Adds `row` to every row of `x`.
fn add_rows(x: &mut [f32], row: &[f32]) {
    x.par_chunks_mut(row.len())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|r| add_row(r, row));
}

#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn bias_quick_gelu_row(r: &mut [f32], b: &[f32]) {
    for (v, &b) in r.iter_mut().zip(b) {
        let t = *v + b;
        *v = t / (1.0 + fast_exp(-1.702 * t));
    }
}

/// `x ← quickgelu(x + b)` per row, `quickgelu(t) = t·σ(1.702 t)` (OpenAI's activation).
fn bias_quick_gelu(x: &mut [f32], b: &[f32]) {
    x.par_chunks_mut(b.len())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|r| bias_quick_gelu_row(r, b));
}

/// One pre-norm transformer layer with its q/k/v projections fused into one `3d × d` weight, the queries'
/// `1/√d_head` folded into it at load.
struct Layer {
    ln1: Norm,
    qkv: Linear,
    out: Linear,
    ln2: Norm,
    fc1: Linear,
    fc2: Linear,
}

impl Layer {
    fn load(vb: &VarBuilder, d: usize, hidden: usize, heads: usize) -> CandleResult<Self> {
        let att = vb.pp("self_attn");
        // Each `d × d`, `in × out`, with its bias.
        let part = |name: &str| -> CandleResult<(Vec<f32>, Vec<f32>)> {
            let p = att.pp(name);
            Ok((
                load_transposed(&p, &[d, d], "weight")?,
                load(&p, &[d], "bias")?,
            ))
        };
        let (q, k, v) = (part("q_proj")?, part("k_proj")?, part("v_proj")?);
        let scale = ((d / heads) as f32).powf(-0.5);
        // `d × 3d`: row `i` is input `i`'s weights to every query, then every key, then every value.
        let mut wt = Vec::with_capacity(3 * d * d);
        for ((q, k), v) in q.0.chunks(d).zip(k.0.chunks(d)).zip(v.0.chunks(d)) {
            wt.extend(q.iter().map(|x| x * scale));
            wt.extend_from_slice(k);
            wt.extend_from_slice(v);
        }
        let mut b = Vec::with_capacity(3 * d);
        b.extend(q.1.iter().map(|x| x * scale));
        b.extend_from_slice(&k.1);
        b.extend_from_slice(&v.1);
        Ok(Self {
            ln1: Norm::load(&vb.pp("layer_norm1"), d)?,
            qkv: Linear {
                w: Weight::new(wt, d, 3 * d),
                b,
                out: 3 * d,
            },
            out: Linear::load(&att.pp("out_proj"), d, d)?,
            ln2: Norm::load(&vb.pp("layer_norm2"), d)?,
            fc1: Linear::load(&vb.pp("mlp").pp("fc1"), d, hidden)?,
            fc2: Linear::load(&vb.pp("mlp").pp("fc2"), hidden, d)?,
        })
    }
}

/// Buffers reused by every layer of one forward pass.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    mlp: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// A stack of layers over packed rows: `keys[r]` is the range of rows that row `r` attends to (its own
/// image, or its prompt up to itself).
struct Encoder {
    layers: Vec<Layer>,
    d: usize,
    heads: usize,
}

impl Encoder {
    fn load(
        vb: &VarBuilder,
        d: usize,
        hidden: usize,
        n: usize,
        heads: usize,
    ) -> CandleResult<Self> {
        let vb = vb.pp("layers");
        let layers = (0..n)
            .map(|i| Layer::load(&vb.pp(i.to_string()), d, hidden, heads))
            .collect::<CandleResult<_>>()?;
        Ok(Self { layers, d, heads })
    }

    /// Runs every layer over `x` (`keys.len() × d`) and returns the hidden states of the rows in `pooled`
    /// (`pooled.len() × d`), the only rows the last layer finishes.
    fn forward(&self, mut x: Vec<f32>, keys: &[Range<usize>], pooled: &[usize]) -> Vec<f32> {
        let d = self.d;
        let mut s = Scratch::default();
        let last = self.layers.len().saturating_sub(1);
        let mut rows = keys.len();
        if self.layers.is_empty() {
            return gather(&x, d, pooled);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let normed = sized(&mut s.normed, rows * d);
            l.ln1.apply(&x, normed);
            let qkv = sized(&mut s.qkv, rows * 3 * d);
            l.qkv.product(normed, rows, qkv);
            add_rows(qkv, &l.qkv.b);
            let queries = if i == last { Some(pooled) } else { None };
            let nq = queries.map_or(rows, <[usize]>::len);
            let att = sized(&mut s.att, nq * d);
            attention(qkv, d, self.heads, keys, queries, att);
            if let Some(p) = queries {
                x = gather(&x, d, p);
                rows = p.len();
            }
            l.out.accumulate(att, rows, &mut x);
            let normed = sized(&mut s.normed, rows * d);
            l.ln2.apply(&x, normed);
            let mlp = sized(&mut s.mlp, rows * l.fc1.out);
            l.fc1.product(normed, rows, mlp);
            bias_quick_gelu(mlp, &l.fc1.b);
            l.fc2.accumulate(mlp, rows, &mut x);
        }
        x
    }
}

fn gather(x: &[f32], d: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

/// Multi-head attention read straight from the fused `rows × 3d` q/k/v buffer, with no head split or merge
/// of the inputs. `queries` limits the output to some rows (the last layer's pooled rows), in their order:
/// those few rows are done one by one ([`attend_row`]); every row of a layer is done block by block
/// ([`attention_blocks`]).
fn attention(
    qkv: &[f32],
    d: usize,
    heads: usize,
    keys: &[Range<usize>],
    queries: Option<&[usize]>,
    out: &mut [f32],
) {
    let Some(queries) = queries else {
        attention_blocks(qkv, d, heads, keys, out);
        return;
    };
    out.par_chunks_mut(d)
        .zip(queries)
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (o, &r)| {
            attend_row(qkv, d, heads, r, keys[r].clone(), scores, o);
        });
}

/// Blocks with fewer keys than this (prompts: a dozen tokens) are done row by row ([`attend_row`]): a product
/// call per head costs more than the few dot products it replaces (on 1,000 prompts attention took 1.4× as
/// long as products as row by row).
const BLOCK_KEYS: usize = 32;

/// Attention of every row of a layer, block by block: a block is a run of rows whose keys start at the same
/// row (an image's tokens, or a prompt's, each of which sees a prefix of its prompt). A large block is done
/// as small matrix products per head: its scores are one `rows × keys` product `Q Kᵀ`, masked row by row to
/// each row's keys, and its output one product `P V`, written to a scratch buffer head by head and then
/// assembled into the block's rows. Why: a dot product per (query, key, head) left attention at 12 % of a
/// batch of 32 images even vectorised; as products it is 7 %.
fn attention_blocks(qkv: &[f32], d: usize, heads: usize, keys: &[Range<usize>], out: &mut [f32]) {
    let dh = d / heads;
    let stride = 3 * d;
    // (query rows, key rows, the query rows' output) of each block.
    let mut blocks = Vec::new();
    let mut rest = &mut out[..];
    let mut r = 0;
    while r < keys.len() {
        let start = keys[r].start;
        let mut end = r + 1;
        let mut key_end = keys[r].end;
        while end < keys.len() && keys[end].start == start {
            key_end = key_end.max(keys[end].end);
            end += 1;
        }
        let (o, tail) = rest.split_at_mut((end - r) * d);
        blocks.push((r..end, start..key_end, o));
        rest = tail;
        r = end;
    }
    blocks
        .into_par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (rows, ks, o)| {
            if ks.len() < BLOCK_KEYS {
                for (orow, r) in o.chunks_mut(d).zip(rows) {
                    attend_row(qkv, d, heads, r, keys[r].clone(), scores, orow);
                }
                return;
            }
            let (nq, nk) = (rows.len(), ks.len());
            // `heads × nq × dh`: head `h`'s output rows, contiguous.
            let mut by_head = vec![0.0f32; nq * d];
            by_head.par_chunks_mut(nq * dh).enumerate().for_each_init(
                Vec::new,
                |scores: &mut Vec<f32>, (h, oh)| {
                    scores.resize(nq * nk, 0.0);
                    let q = Strided {
                        data: &qkv[rows.start * stride + h * dh..],
                        rs: stride,
                        cs: 1,
                    };
                    let k_t = Strided {
                        data: &qkv[ks.start * stride + d + h * dh..],
                        rs: 1,
                        cs: stride,
                    };
                    gemm_small(scores, nk, (nq, nk, dh), q, k_t);
                    for (i, row) in scores.chunks_mut(nk).enumerate() {
                        softmax_prefix(row, keys[rows.start + i].end - ks.start);
                    }
                    let p = Strided {
                        data: scores,
                        rs: nk,
                        cs: 1,
                    };
                    let v = Strided {
                        data: &qkv[ks.start * stride + 2 * d + h * dh..],
                        rs: stride,
                        cs: 1,
                    };
                    gemm_small(oh, dh, (nq, dh, nk), p, v);
                },
            );
            for (i, orow) in o.chunks_mut(d).enumerate() {
                for h in 0..heads {
                    orow[h * dh..][..dh].copy_from_slice(&by_head[(h * nq + i) * dh..][..dh]);
                }
            }
        });
}

/// Softmax of the first `len` entries of `row` in place; the rest (keys the row may not see) become 0.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn softmax_prefix(row: &mut [f32], len: usize) {
    let (seen, hidden) = row.split_at_mut(len);
    hidden.fill(0.0);
    softmax(seen);
}

/// Softmax of `seen` in place. Inlined, like [`sum`] and [`dot`], into each compiled version of its callers
/// rather than dispatched per call (attention calls it per row and head).
#[inline(always)]
fn softmax(seen: &mut [f32]) {
    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for s in seen.iter_mut() {
        *s = fast_exp(*s - max);
        total += *s;
    }
    let inv = 1.0 / total;
    seen.iter_mut().for_each(|s| *s *= inv);
}

/// Every head's attention output for query row `r` over the key rows `ks` into `o` (`d` wide).
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
fn attend_row(
    qkv: &[f32],
    d: usize,
    heads: usize,
    r: usize,
    ks: Range<usize>,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let dh = d / heads;
    let stride = 3 * d;
    scores.resize(ks.len(), 0.0);
    for h in 0..heads {
        let q = &qkv[r * stride + h * dh..][..dh];
        for (s, j) in scores.iter_mut().zip(ks.clone()) {
            *s = dot(q, &qkv[j * stride + d + h * dh..][..dh]);
        }
        softmax(scores);
        let o = &mut o[h * dh..][..dh];
        o.fill(0.0);
        for (&p, j) in scores.iter().zip(ks.clone()) {
            let v = &qkv[j * stride + 2 * d + h * dh..][..dh];
            for (a, &b) in o.iter_mut().zip(v) {
                *a += p * b;
            }
        }
    }
}

/// The vision tower and its projection: `pixels` (`n × 3 × S × S`, preprocessed) to `n × projection_dim`
/// unnormalised features, as `CLIPModel.get_image_features`.
pub struct VisionTower {
    /// `(3·p·p) × d`: the patch convolution as a matrix over unfolded patches (channel, row, column order).
    patch: Weight,
    class: Vec<f32>,
    pos: Vec<f32>,
    pre: Norm,
    encoder: Encoder,
    post: Norm,
    /// `d × projection_dim`.
    proj: Weight,
    image_size: usize,
    patch_size: usize,
    proj_dim: usize,
}

impl VisionTower {
    /// `vb` is the checkpoint's root (`vision_model.*`, `visual_projection.weight`).
    pub fn load(vb: &VarBuilder, c: &ClipVisionConfig, proj_dim: usize) -> CandleResult<Self> {
        let d = c.embed_dim;
        let p = c.patch_size;
        let grid = c.image_size / p;
        let v = vb.pp("vision_model");
        let e = v.pp("embeddings");
        Ok(Self {
            patch: Weight::load(
                &e.pp("patch_embedding"),
                &[d, c.num_channels, p, p],
                "weight",
            )?,
            class: load(&e, &[d], "class_embedding")?,
            pos: load(&e.pp("position_embedding"), &[grid * grid + 1, d], "weight")?,
            pre: Norm::load(&v.pp("pre_layrnorm"), d)?,
            encoder: Encoder::load(
                &v.pp("encoder"),
                d,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads,
            )?,
            post: Norm::load(&v.pp("post_layernorm"), d)?,
            proj: Weight::load(&vb.pp("visual_projection"), &[proj_dim, d], "weight")?,
            image_size: c.image_size,
            patch_size: p,
            proj_dim,
        })
    }

    /// `pixels.len()` must be `n·3·S·S` (the caller checks each image's size).
    pub fn forward(&self, pixels: &[f32], n: usize) -> Vec<f32> {
        let d = self.encoder.d;
        let (s, p) = (self.image_size, self.patch_size);
        let grid = s / p;
        let patches = grid * grid;
        let tokens = patches + 1;
        let k = 3 * p * p;

        // Unfold: one row per patch, in the convolution weight's (channel, row, column) order.
        let mut unfolded = vec![0.0f32; n * patches * k];
        unfolded
            .par_chunks_mut(k)
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, dst)| {
                let (img, cell) = (row / patches, row % patches);
                let (py, px) = (cell / grid, cell % grid);
                let base = img * 3 * s * s;
                for c in 0..3 {
                    for ky in 0..p {
                        let src = base + c * s * s + (py * p + ky) * s + px * p;
                        dst[(c * p + ky) * p..][..p].copy_from_slice(&pixels[src..src + p]);
                    }
                }
            });
        let mut embedded = vec![0.0f32; n * patches * d];
        self.patch
            .multiply(&unfolded, n * patches, &mut embedded, false);
        drop(unfolded);

        // Class token first, then the patches, each plus its position; then the pre-norm.
        let mut x = vec![0.0f32; n * tokens * d];
        x.par_chunks_mut(d)
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(row, dst)| {
                let (img, t) = (row / tokens, row % tokens);
                let pos = &self.pos[t * d..][..d];
                let src = if t == 0 {
                    &self.class[..]
                } else {
                    &embedded[(img * patches + t - 1) * d..][..d]
                };
                for ((o, &a), &b) in dst.iter_mut().zip(src).zip(pos) {
                    *o = a + b;
                }
            });
        drop(embedded);
        let mut h = vec![0.0f32; x.len()];
        self.pre.apply(&x, &mut h);
        drop(x);

        let keys: Vec<Range<usize>> = (0..n * tokens)
            .map(|r| {
                let start = r / tokens * tokens;
                start..start + tokens
            })
            .collect();
        let pooled: Vec<usize> = (0..n).map(|i| i * tokens).collect();
        let cls = self.encoder.forward(h, &keys, &pooled);
        project(&self.post, &self.proj, &cls, n, d, self.proj_dim)
    }
}

/// Final norm of the pooled rows and the bias-free projection (`proj` is `d × out_dim`).
fn project(
    norm: &Norm,
    proj: &Weight,
    pooled: &[f32],
    n: usize,
    d: usize,
    out_dim: usize,
) -> Vec<f32> {
    let mut normed = vec![0.0f32; n * d];
    norm.apply(pooled, &mut normed);
    let mut out = vec![0.0f32; n * out_dim];
    proj.multiply(&normed, n, &mut out, false);
    out
}

/// The text tower and its projection: token ids to unnormalised features, as
/// `CLIPModel.get_text_features` with the pooled row at the first position of the largest id.
pub struct TextTower {
    tokens: Vec<f32>,
    pos: Vec<f32>,
    encoder: Encoder,
    final_norm: Norm,
    /// `d × projection_dim`.
    proj: Weight,
    vocab: usize,
    max_len: usize,
    proj_dim: usize,
}

impl TextTower {
    /// `vb` is the checkpoint's root (`text_model.*`, `text_projection.weight`).
    pub fn load(vb: &VarBuilder, c: &ClipTextConfig) -> CandleResult<Self> {
        let d = c.embed_dim;
        let t = vb.pp("text_model");
        let e = t.pp("embeddings");
        Ok(Self {
            tokens: load(&e.pp("token_embedding"), &[c.vocab_size, d], "weight")?,
            pos: load(
                &e.pp("position_embedding"),
                &[c.max_position_embeddings, d],
                "weight",
            )?,
            encoder: Encoder::load(
                &t.pp("encoder"),
                d,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads,
            )?,
            final_norm: Norm::load(&t.pp("final_layer_norm"), d)?,
            proj: Weight::load(&vb.pp("text_projection"), &[c.projection_dim, d], "weight")?,
            vocab: c.vocab_size,
            max_len: c.max_position_embeddings,
            proj_dim: c.projection_dim,
        })
    }

    /// One row of features per prompt. Each prompt must be non-empty, at most the context length, with ids
    /// inside the vocabulary; the message says which is not.
    pub fn forward(&self, prompts: &[Vec<u32>]) -> Result<Vec<f32>, String> {
        let d = self.encoder.d;
        let mut keys: Vec<Range<usize>> = Vec::new();
        let mut pooled = Vec::with_capacity(prompts.len());
        let mut x = Vec::new();
        for (i, ids) in prompts.iter().enumerate() {
            if ids.is_empty() || ids.len() > self.max_len {
                return Err(format!(
                    "prompt {i} has {} tokens; the text tower takes 1 to {}",
                    ids.len(),
                    self.max_len
                ));
            }
            let start = keys.len();
            let mut best = 0;
            for (p, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if id >= self.vocab {
                    return Err(format!(
                        "prompt {i} has token id {id}, outside the vocabulary of {}",
                        self.vocab
                    ));
                }
                if ids[p] > ids[best] {
                    best = p;
                }
                let tok = &self.tokens[id * d..][..d];
                let pos = &self.pos[p * d..][..d];
                x.extend(tok.iter().zip(pos).map(|(a, b)| a + b));
                keys.push(start..start + p + 1);
            }
            pooled.push(start + best);
        }
        let eot = self.encoder.forward(x, &keys, &pooled);
        Ok(project(
            &self.final_norm,
            &self.proj,
            &eot,
            prompts.len(),
            d,
            self.proj_dim,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Blocks of whole images (33 and 50 rows: over [`BLOCK_KEYS`], so done as products, one of them not a
    /// multiple of any tile), a prompt of 40 tokens (causal: each row sees a prefix) and one of 5 (row by
    /// row), against every row done by [`attend_row`].
    #[test]
    fn block_attention_matches_row_attention_on_awkward_blocks() {
        let (d, heads) = (15, 3);
        let mut keys = Vec::new();
        for len in [33, 50] {
            let start = keys.len();
            keys.extend((0..len).map(|_| start..start + len));
        }
        for len in [40, 5] {
            let start = keys.len();
            keys.extend((0..len).map(|i| start..start + i + 1));
        }
        let rows = keys.len();
        let mut rng = Rng::new(21);
        let qkv: Vec<f32> = rng.normal_vec(rows * 3 * d);
        let mut blocks = vec![f32::NAN; rows * d];
        attention(&qkv, d, heads, &keys, None, &mut blocks);
        let mut scores = Vec::new();
        for (r, ks) in keys.iter().enumerate() {
            let mut want = vec![0.0; d];
            attend_row(&qkv, d, heads, r, ks.clone(), &mut scores, &mut want);
            for (c, w) in want.iter().enumerate() {
                let got = blocks[r * d + c];
                assert!((got - w).abs() < 1e-5, "row {r} column {c}: {got} vs {w}");
            }
        }
        // The pooled rows only, in the order asked.
        let pooled = [90, 0, 40];
        let mut some = vec![f32::NAN; pooled.len() * d];
        attention(&qkv, d, heads, &keys, Some(&pooled), &mut some);
        for (i, &r) in pooled.iter().enumerate() {
            for c in 0..d {
                let (got, want) = (some[i * d + c], blocks[r * d + c]);
                assert!((got - want).abs() < 1e-5, "pooled row {r}: {got} vs {want}");
            }
        }
    }
}
