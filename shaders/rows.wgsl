// Row-wise kernels (one 64-invocation workgroup per row, reductions in workgroup memory), column and full
// reductions, and the row gather. Built after prelude.wgsl (Params, the bindings, `kept`). For the per-row
// kernels `rows` is the number of rows in this dispatch and `cols` the row length; every bound range starts on a
// row boundary. Accumulated outputs (`beta`, s1) are never read when beta == 0.

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// Workgroup sum; every invocation gets the total. Must be called from uniform control flow.
fn wg_sum(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn wg_max(v: f32, li: u32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (li < s) {
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// y = x / max(|x|, eps) per row (PyTorch F.normalize), norms[r] = |x|.
// a = x, o = y, o2 = norms, s0 = eps.
@compute @workgroup_size(64)
fn l2norm_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var ss = 0.0;
    for (var j = li; j < p.cols; j = j + WG) {
        let x = a[p.off_a + base + j];
        ss = ss + x * x;
    }
    let nrm = sqrt(wg_sum(ss, li));
    let inv = 1.0 / max(nrm, p.s0);
    for (var j = li; j < p.cols; j = j + WG) {
        o[p.off_o + base + j] = a[p.off_a + base + j] * inv;
    }
    if (li == 0u) {
        o2[p.off_o2 + r] = nrm;
    }
}

// Backward of l2norm_fwd: dx = (dy - y <dy, y>) / |x| when |x| > eps, else dy / eps (the clamp is then active and
// y = x / eps is linear). a = dy, b = y, c = norms, o = dx, s0 = eps, s1 = beta.
@compute @workgroup_size(64)
fn l2norm_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var d = 0.0;
    for (var j = li; j < p.cols; j = j + WG) {
        d = d + a[p.off_a + base + j] * b[p.off_b + base + j];
    }
    let dot = wg_sum(d, li);
    let nrm = c[p.off_c + r];
    for (var j = li; j < p.cols; j = j + WG) {
        let dy = a[p.off_a + base + j];
        var g = dy / p.s0;
        if (nrm > p.s0) {
            g = (dy - b[p.off_b + base + j] * dot) / nrm;
        }
        let at = p.off_o + base + j;
        o[at] = g + kept(at, p.s1);
    }
}

// Softmax cross-entropy per row, stable (row max subtracted).
// a = logits, idx = labels, o2 = per-row loss, o = gradient s0 * (softmax - onehot) when flag bit 0 is set.
// A label >= cols gives a NaN loss and gradient row, so a bad label is visible rather than silently ignored.
@compute @workgroup_size(64)
fn xent(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var mx = -3.4028235e38;
    for (var j = li; j < p.cols; j = j + WG) {
        mx = max(mx, a[p.off_a + base + j]);
    }
    let m = wg_max(mx, li);
    var se = 0.0;
    for (var j = li; j < p.cols; j = j + WG) {
        se = se + exp(a[p.off_a + base + j] - m);
    }
    let s = wg_sum(se, li);
    let label = idx[p.off_i + r];
    let ok = label < p.cols;
    if (li == 0u) {
        var loss = p.nan;
        if (ok) {
            loss = m + log(s) - a[p.off_a + base + label];
        }
        o2[p.off_o2 + r] = loss;
    }
    if ((p.flag & 1u) != 0u) {
        let inv = 1.0 / s;
        for (var j = li; j < p.cols; j = j + WG) {
            var g = exp(a[p.off_a + base + j] - m) * inv;
            if (j == label) {
                g = g - 1.0;
            }
            if (!ok) {
                g = p.nan;
            }
            o[p.off_o + base + j] = p.s0 * g;
        }
    }
}

// o[r] = s0 * sum_j a[r, j] + s1 * o[r]
@compute @workgroup_size(64)
fn row_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_of(wid, nwg);
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols;
    var acc = 0.0;
    for (var j = li; j < p.cols; j = j + WG) {
        acc = acc + a[p.off_a + base + j];
    }
    let s = wg_sum(acc, li);
    if (li == 0u) {
        let at = p.off_o + r;
        o[at] = p.s0 * s + kept(at, p.s1);
    }
}

// o[j] = s0 * sum_r a[r, j] + s1 * o[j]; one invocation per column walking the rows of this block, so
// neighbouring invocations read neighbouring addresses.
@compute @workgroup_size(64)
fn col_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let j = row_of(wid, nwg) * WG + li;
    if (j >= p.cols) {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r = r + 1u) {
        acc = acc + a[p.off_a + r * p.cols + j];
    }
    let at = p.off_o + j;
    o[at] = p.s0 * acc + kept(at, p.s1);
}

// o[0] = s0 * sum_i a[i] + s1 * o[0] over n elements, by a single workgroup of 256 invocations. One workgroup is
// enough for the sizes reduced here (losses over a batch); larger inputs would want a two-pass tree.
var<workgroup> red256: array<f32, 256>;

@compute @workgroup_size(256)
fn sum_all(@builtin(local_invocation_index) li: u32) {
    var acc = 0.0;
    for (var i = li; i < p.n; i = i + 256u) {
        acc = acc + a[p.off_a + i];
    }
    red256[li] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (li < s) {
            red256[li] = red256[li] + red256[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let at = p.off_o;
        o[at] = p.s0 * red256[0] + kept(at, p.s1);
    }
}

// o[r, :] = src[idx[r], :] for the output rows of this dispatch, where `a` holds source rows [r0, r1) of a
// matrix with `total` rows (the host walks the source in blocks when it exceeds the binding limit). An index
// >= total writes NaN.
@compute @workgroup_size(64)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = row_of(wid, nwg) * WG + li;
    if (e >= p.n) {
        return;
    }
    let orow = e / p.cols;
    let col = e % p.cols;
    let s = idx[p.off_i + orow];
    if (s >= p.total) {
        o[p.off_o + e] = p.nan;
    } else if (s >= p.r0 && s < p.r1) {
        o[p.off_o + e] = a[p.off_a + (s - p.r0) * p.cols + col];
    }
}

// Class segments of a cache sorted by class: `idx` holds the C + 1 offsets, class c owning entries
// [idx[c], idx[c + 1]). These replace products with the one-hot label matrix (M×C), whose cost grows with C·M.

// o[r, c] = s0 * sum_{m in segment c} a[r, m] + s1 * o[r, c] for the rows of this dispatch; `cols` = C (the
// output row length), `total` = M (the input row length). The cache logits' class sums.
@compute @workgroup_size(64)
fn seg_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = row_of(wid, nwg) * WG + li;
    if (e >= p.n) {
        return;
    }
    let r = e / p.cols;
    let cc = e % p.cols;
    let m0 = idx[p.off_i + cc];
    let m1 = idx[p.off_i + cc + 1u];
    var acc = 0.0;
    for (var m = m0; m < m1; m = m + 1u) {
        acc = acc + a[p.off_a + r * p.total + m];
    }
    let at = p.off_o + e;
    o[at] = p.s0 * acc + kept(at, p.s1);
}

// o[r, m] = s0 * a[r, idx[m]] + s1 * o[r, m]; `cols` = M, `total` = C (the input row length); `idx` holds the
// class of each entry, and a class >= C writes NaN. The transpose of seg_sum: spreads a per-class gradient back
// to the entries of the class.
@compute @workgroup_size(64)
fn seg_expand(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = row_of(wid, nwg) * WG + li;
    if (e >= p.n) {
        return;
    }
    let r = e / p.cols;
    let m = e % p.cols;
    let l = idx[p.off_i + m];
    let at = p.off_o + e;
    if (l >= p.total) {
        o[at] = p.nan;
    } else {
        o[at] = p.s0 * a[p.off_a + r * p.total + l] + kept(at, p.s1);
    }
}

// o[c, j] = s0 * sum_{m in segment c} a[m - r0, j] + s1 * o[c, j] for the classes of this dispatch (`idx` bound
// from the first of them, `a` from its first entry r0); `cols` = D. The gradient of gathering a class row into
// every entry of the class.
@compute @workgroup_size(64)
fn seg_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = row_of(wid, nwg) * WG + li;
    if (e >= p.n) {
        return;
    }
    let cc = e / p.cols;
    let j = e % p.cols;
    let m0 = idx[p.off_i + cc];
    let m1 = idx[p.off_i + cc + 1u];
    var acc = 0.0;
    for (var m = m0; m < m1; m = m + 1u) {
        acc = acc + a[p.off_a + (m - p.r0) * p.cols + j];
    }
    let at = p.off_o + e;
    o[at] = p.s0 * acc + kept(at, p.s1);
}
