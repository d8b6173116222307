// C = alpha * op(A) * op(B) + beta * C, row-major f32, any shapes.
//
// Both transposes are expressed through element strides: op(A)[i, k] = a[a_off + i * a_rs + k * a_cs] and
// op(B)[k, j] = b[b_off + k * b_rs + j * b_cs], so one pipeline serves all four combinations. The host binds row
// blocks of each operand (offsets aligned to min_storage_buffer_offset_alignment) and folds the remainder of the
// offset and any column offset into *_off, which is how matrices above the storage binding limit are handled.
//
// When beta == 0, C is never read: an output buffer full of NaN must not leak into the result.

struct MmParams {
    m: u32,
    n: u32,
    k: u32,
    _pad0: u32,
    a_off: u32,
    a_rs: u32,
    a_cs: u32,
    _pad1: u32,
    b_off: u32,
    b_rs: u32,
    b_cs: u32,
    _pad2: u32,
    c_off: u32,
    c_rs: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> p: MmParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(5) var<storage, read_write> c: array<f32>;

fn store(i: u32, j: u32, v: f32) {
    if (i < p.m && j < p.n) {
        let at = p.c_off + i * p.c_rs + j;
        var r = p.alpha * v;
        if (p.beta != 0.0) {
            r = r + p.beta * c[at];
        }
        c[at] = r;
    }
}

// Register tiling only: an 8x8 workgroup computes a 32x32 block of C, each invocation a 4x4 block whose rows and
// columns are strided by 8 so that neighbouring invocations read neighbouring columns of B. No workgroup memory
// and no barriers, which is what a CPU rasteriser such as llvmpipe runs fastest.
@compute @workgroup_size(8, 8, 1)
fn matmul_reg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row0 = wid.y * 32u + lid.y;
    let col0 = wid.x * 32u + lid.x;
    // Out-of-range rows/columns read a clamped (valid) address and are simply not stored.
    let last_m = max(p.m, 1u) - 1u;
    let last_n = max(p.n, 1u) - 1u;
    let a0 = p.a_off + min(row0, last_m) * p.a_rs;
    let a1 = p.a_off + min(row0 + 8u, last_m) * p.a_rs;
    let a2 = p.a_off + min(row0 + 16u, last_m) * p.a_rs;
    let a3 = p.a_off + min(row0 + 24u, last_m) * p.a_rs;
    let b0 = p.b_off + min(col0, last_n) * p.b_cs;
    let b1 = p.b_off + min(col0 + 8u, last_n) * p.b_cs;
    let b2 = p.b_off + min(col0 + 16u, last_n) * p.b_cs;
    let b3 = p.b_off + min(col0 + 24u, last_n) * p.b_cs;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk = kk + 1u) {
        let ak = kk * p.a_cs;
        let bk = kk * p.b_rs;
        let bv = vec4<f32>(b[b0 + bk], b[b1 + bk], b[b2 + bk], b[b3 + bk]);
        acc0 = acc0 + a[a0 + ak] * bv;
        acc1 = acc1 + a[a1 + ak] * bv;
        acc2 = acc2 + a[a2 + ak] * bv;
        acc3 = acc3 + a[a3 + ak] * bv;
    }
    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = row0 + r * 8u;
        let v = accs[r];
        store(i, col0, v.x);
        store(i, col0 + 8u, v.y);
        store(i, col0 + 16u, v.z);
        store(i, col0 + 24u, v.w);
    }
}

// Shared-memory tiling plus register tiling: a 16x16 workgroup computes a 64x64 block of C, staging 64x16 panels
// of op(A) and 16x64 panels of op(B) in workgroup memory, each invocation accumulating a 4x4 block (rows and
// columns strided by 16). This is the layout a discrete GPU wants; on llvmpipe its barriers cost more than the
// reuse saves.
const TS: u32 = 64u;
const TK: u32 = 16u;
var<workgroup> tile_a: array<f32, 1024>; // [kk * 64 + i]
var<workgroup> tile_b: array<f32, 1024>; // [kk * 64 + j]

@compute @workgroup_size(16, 16, 1)
fn matmul_tiled(
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
            // Let consecutive invocations walk the unit-stride direction of the stored matrix.
            var i = e % TS;
            var kk = e / TS;
            if (p.a_cs == 1u) {
                kk = e % TK;
                i = e / TK;
            }
            let gi = tm + i;
            let gk = k0 + kk;
            var v = 0.0;
            if (gi < p.m && gk < p.k) {
                v = a[p.a_off + gi * p.a_rs + gk * p.a_cs];
            }
            tile_a[kk * TS + i] = v;

            var j = e % TS;
            var kb = e / TS;
            if (p.b_cs != 1u) {
                kb = e % TK;
                j = e / TK;
            }
            let gj = tn + j;
            let gkb = k0 + kb;
            var w = 0.0;
            if (gj < p.n && gkb < p.k) {
                w = b[p.b_off + gkb * p.b_rs + gj * p.b_cs];
            }
            tile_b[kb * TS + j] = w;
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
        store(i, tn + lid.x, v.x);
        store(i, tn + lid.x + 16u, v.y);
        store(i, tn + lid.x + 32u, v.z);
        store(i, tn + lid.x + 48u, v.w);
    }
}
