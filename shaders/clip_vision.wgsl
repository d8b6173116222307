// CLIP's vision transformer (ViT) forward pass, the same arithmetic as candle-transformers' clip::vision_model:
// patch embedding as one GEMM over unfolded patches, class token and position embedding, layer norms, fused
// linear layers (bias, quick-GELU and the residual add in the GEMM's epilogue) and multi-head self-attention.
//
// Every matrix is row-major f32. One bind-group layout serves every entry point: slot 0 the uniform, 1-4
// read-only inputs, 5 the output; the host binds a small dummy where an entry point ignores a slot.

struct P {
    // Rows and columns of the output (for linear: M x N with inner dimension k).
    m: u32,
    n: u32,
    k: u32,
    flags: u32,
    // Tokens per image (attention, embed), attention heads and their width.
    seq: u32,
    heads: u32,
    head_dim: u32,
    // Patch side, patches per image side, image side in pixels (im2col).
    psize: u32,
    grid: u32,
    image: u32,
    // Layer norm: input row r is read at row r * in_stride (1 = every row; seq = the class tokens).
    in_stride: u32,
    // Workgroups along x of a 2-D dispatch of 1-D work (the y dimension carries the overflow).
    groups_x: u32,
    scale: f32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> res: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const FLAG_BIAS: u32 = 1u;
const FLAG_GELU: u32 = 2u;
const FLAG_RESIDUAL: u32 = 4u;

// out = act(acc + bias) (+ res), in candle's order: linear (matmul then bias), activation, residual add.
fn epilogue(i: u32, j: u32, acc: f32) {
    if (i < p.m && j < p.n) {
        var v = acc;
        if ((p.flags & FLAG_BIAS) != 0u) {
            v = v + bias[j];
        }
        if ((p.flags & FLAG_GELU) != 0u) {
            // quick_gelu(x) = x * sigmoid(1.702 x)
            v = v * (1.0 / (1.0 + exp(-1.702 * v)));
        }
        let at = i * p.n + j;
        if ((p.flags & FLAG_RESIDUAL) != 0u) {
            v = v + res[at];
        }
        out[at] = v;
    }
}

// Linear layer out[M, N] = a[M, K] * w[N, K]^T (+ epilogue), w stored as PyTorch stores it ([out, in]).
// Shared-memory tiling: a 16x16 workgroup computes a 64x64 block, staging 16-deep panels of a and w, each
// invocation a 4x4 block (rows and columns strided by 16). Both panels are loaded along k, the unit stride of
// both operands.
const TS: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> tile_a: array<f32, 1024>; // [kk * 64 + i]
var<workgroup> tile_b: array<f32, 1024>; // [kk * 64 + j]

@compute @workgroup_size(16, 16, 1)
fn linear_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tm = wid.y * TS;
    let tn = wid.x * TS;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let ntiles = (p.k + TK - 1u) / TK;
    for (var t = 0u; t < ntiles; t = t + 1u) {
        let k0 = t * TK;
        for (var q = 0u; q < 4u; q = q + 1u) {
            let e = li + 256u * q;
            let kk = e % TK;
            let r = e / TK;
            let gk = k0 + kk;
            let gi = tm + r;
            var v = 0.0;
            if (gi < p.m && gk < p.k) {
                v = a[gi * p.k + gk];
            }
            tile_a[kk * TS + r] = v;
            let gj = tn + r;
            var u = 0.0;
            if (gj < p.n && gk < p.k) {
                u = w[gj * p.k + gk];
            }
            tile_b[kk * TS + r] = u;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let base = kk * TS;
            let av = vec4<f32>(
                tile_a[base + lid.y],
                tile_a[base + lid.y + 16u],
                tile_a[base + lid.y + 32u],
                tile_a[base + lid.y + 48u],
            );
            let bv = vec4<f32>(
                tile_b[base + lid.x],
                tile_b[base + lid.x + 16u],
                tile_b[base + lid.x + 32u],
                tile_b[base + lid.x + 48u],
            );
            acc0 = acc0 + av.x * bv;
            acc1 = acc1 + av.y * bv;
            acc2 = acc2 + av.z * bv;
            acc3 = acc3 + av.w * bv;
        }
        workgroupBarrier();
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = tm + lid.y + r * 16u;
        let v = accs[r];
        epilogue(i, tn + lid.x, v.x);
        epilogue(i, tn + lid.x + 16u, v.y);
        epilogue(i, tn + lid.x + 32u, v.z);
        epilogue(i, tn + lid.x + 48u, v.w);
    }
}

// The same linear layer with register tiling only (an 8x8 workgroup computes a 32x32 block, no barriers): what a
// CPU rasteriser such as llvmpipe runs fastest.
@compute @workgroup_size(8, 8, 1)
fn linear_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wid.y * 32u + lid.y;
    let col0 = wid.x * 32u + lid.x;
    // Out-of-range rows/columns read a clamped (valid) address and are not stored.
    let last_m = max(p.m, 1u) - 1u;
    let last_n = max(p.n, 1u) - 1u;
    let a0 = min(row0, last_m) * p.k;
    let a1 = min(row0 + 8u, last_m) * p.k;
    let a2 = min(row0 + 16u, last_m) * p.k;
    let a3 = min(row0 + 24u, last_m) * p.k;
    let b0 = min(col0, last_n) * p.k;
    let b1 = min(col0 + 8u, last_n) * p.k;
    let b2 = min(col0 + 16u, last_n) * p.k;
    let b3 = min(col0 + 24u, last_n) * p.k;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk = kk + 1u) {
        let bv = vec4<f32>(w[b0 + kk], w[b1 + kk], w[b2 + kk], w[b3 + kk]);
        acc0 = acc0 + a[a0 + kk] * bv;
        acc1 = acc1 + a[a1 + kk] * bv;
        acc2 = acc2 + a[a2 + kk] * bv;
        acc3 = acc3 + a[a3 + kk] * bv;
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = row0 + r * 8u;
        let v = accs[r];
        epilogue(i, col0, v.x);
        epilogue(i, col0 + 8u, v.y);
        epilogue(i, col0 + 16u, v.z);
        epilogue(i, col0 + 24u, v.w);
    }
}

fn flat_index(wid: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * p.groups_x + wid.x) * 256u + lid.x;
}

// Unfolds images a[B, 3, image, image] into patch rows out[B * grid^2, 3 * patch^2], columns in the order of
// the convolution weight [hidden, 3, patch, patch] flattened (channel, row, column), so the stride-patch
// convolution becomes one linear layer.
@compute @workgroup_size(256, 1, 1)
fn im2col(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat_index(wid, lid);
    if (idx >= p.m * p.n) {
        return;
    }
    let row = idx / p.n;
    let col = idx % p.n;
    let per_image = p.grid * p.grid;
    let b = row / per_image;
    let t = row % per_image;
    let ty = t / p.grid;
    let tx = t % p.grid;
    let pp = p.psize * p.psize;
    let c = col / pp;
    let r = col % pp;
    let y = ty * p.psize + r / p.psize;
    let x = tx * p.psize + r % p.psize;
    out[idx] = a[((b * 3u + c) * p.image + y) * p.image + x];
}

// Token embeddings out[B * seq, hidden]: the class embedding (w) at token 0 and the patch embeddings a[B *
// (seq - 1), hidden] after it, each plus its position embedding (bias, [seq, hidden]).
@compute @workgroup_size(256, 1, 1)
fn embed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat_index(wid, lid);
    if (idx >= p.m * p.n) {
        return;
    }
    let row = idx / p.n;
    let d = idx % p.n;
    let b = row / p.seq;
    let s = row % p.seq;
    var v: f32;
    if (s == 0u) {
        v = w[d];
    } else {
        v = a[(b * (p.seq - 1u) + s - 1u) * p.n + d];
    }
    out[idx] = v + bias[s * p.n + d];
}

var<workgroup> red: array<f32, 256>;

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var h = 128u; h > 0u; h = h >> 1u) {
        if (lid < h) {
            red[lid] = red[lid] + red[lid + h];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

// Layer norm over each row of n values (eps inside the square root, biased variance), gamma in w and beta in
// bias; one 256-wide workgroup per output row. Two passes (mean, then squared deviations) for accuracy.
@compute @workgroup_size(256, 1, 1)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.y * p.groups_x + wid.x;
    if (row >= p.m) {
        return;
    }
    let base = row * p.in_stride * p.n;
    var s = 0.0;
    for (var j = lid.x; j < p.n; j = j + 256u) {
        s = s + a[base + j];
    }
    let mean = reduce_sum(lid.x, s) / f32(p.n);
    var q = 0.0;
    for (var j = lid.x; j < p.n; j = j + 256u) {
        let d = a[base + j] - mean;
        q = q + d * d;
    }
    let variance = reduce_sum(lid.x, q) / f32(p.n);
    let inv = 1.0 / sqrt(variance + p.eps);
    let ob = row * p.n;
    for (var j = lid.x; j < p.n; j = j + 256u) {
        out[ob + j] = (a[base + j] - mean) * inv * w[j] + bias[j];
    }
}

// Self-attention without a mask. a is the fused projection [B * seq, 3 * hidden] (queries, keys, values side
// by side, head h at columns h * head_dim of each), out is [B * seq, hidden]. One 64-wide workgroup per (query
// token, head, image): scores against every key, softmax, weighted sum of the values. Queries are scaled
// before the dot products, as candle does.
const AT: u32 = 64u;
const MAX_SEQ: u32 = 1024u;
const MAX_HEAD_DIM: u32 = 256u;
var<workgroup> q_row: array<f32, MAX_HEAD_DIM>;
var<workgroup> scores: array<f32, MAX_SEQ>;
var<workgroup> red_at: array<f32, AT>;

@compute @workgroup_size(64, 1, 1)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = wid.x;
    let h = wid.y;
    let b = wid.z;
    let hidden = p.n;
    let stride = 3u * hidden;
    let hd = p.head_dim;
    let first = b * p.seq;
    let col = h * hd;
    let qb = (first + i) * stride + col;
    for (var d = lid.x; d < hd; d = d + AT) {
        q_row[d] = a[qb + d] * p.scale;
    }
    workgroupBarrier();

    var mx = -3.0e38;
    for (var j = lid.x; j < p.seq; j = j + AT) {
        let kb = (first + j) * stride + hidden + col;
        var s = 0.0;
        for (var d = 0u; d < hd; d = d + 1u) {
            s = s + q_row[d] * a[kb + d];
        }
        scores[j] = s;
        mx = max(mx, s);
    }
    red_at[lid.x] = mx;
    workgroupBarrier();
    for (var o = AT / 2u; o > 0u; o = o >> 1u) {
        if (lid.x < o) {
            red_at[lid.x] = max(red_at[lid.x], red_at[lid.x + o]);
        }
        workgroupBarrier();
    }
    let top = red_at[0];
    workgroupBarrier();

    var sum = 0.0;
    for (var j = lid.x; j < p.seq; j = j + AT) {
        let e = exp(scores[j] - top);
        scores[j] = e;
        sum = sum + e;
    }
    red_at[lid.x] = sum;
    workgroupBarrier();
    for (var o = AT / 2u; o > 0u; o = o >> 1u) {
        if (lid.x < o) {
            red_at[lid.x] = red_at[lid.x] + red_at[lid.x + o];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red_at[0];

    let ob = (first + i) * hidden + col;
    for (var d = lid.x; d < hd; d = d + AT) {
        let vb = first * stride + 2u * hidden + col + d;
        var acc = 0.0;
        for (var j = 0u; j < p.seq; j = j + 1u) {
            acc = acc + scores[j] * inv * a[vb + j * stride];
        }
        out[ob + d] = acc;
    }
}
