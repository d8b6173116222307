// Element-wise kernels over flat f32 ranges, plus the optimiser step. Built after prelude.wgsl (Params, the
// bindings, `kept`); the grid is 2-D (x wraps at the device's per-dimension workgroup limit).

fn flat(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 64u + lid.x;
}

// tanh through exp(-2|x|): never overflows (the builtin may be lowered to (e^2x - 1) / (e^2x + 1), which is NaN
// for large x on some drivers). Absolute error stays at f32 rounding level.
fn tanh_safe(x: f32) -> f32 {
    let t = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - t) / (1.0 + t);
}

// o = s0
@compute @workgroup_size(64)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    o[p.off_o + i] = p.s0;
}

// o = s0 * a + s1 * o
@compute @workgroup_size(64)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    o[at] = p.s0 * a[p.off_a + i] + kept(at, p.s1);
}

// o = s0 * a * b + s1 * o
@compute @workgroup_size(64)
fn mul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    o[at] = p.s0 * a[p.off_a + i] * b[p.off_b + i] + kept(at, p.s1);
}

// o = s0 * o + s1 (in place: scale and add-scalar)
@compute @workgroup_size(64)
fn affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    o[at] = kept(at, p.s0) + p.s1;
}

// o = tanh(a)
@compute @workgroup_size(64)
fn tanh_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    o[p.off_o + i] = tanh_safe(a[p.off_a + i]);
}

// o = a * (1 - b^2) + s1 * o, with a = upstream gradient, b = tanh output
@compute @workgroup_size(64)
fn tanh_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    let y = b[p.off_b + i];
    o[at] = a[p.off_a + i] * (1.0 - y * y) + kept(at, p.s1);
}

// o = exp(s0 * (a - s2))
@compute @workgroup_size(64)
fn exp_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    o[p.off_o + i] = exp(p.s0 * (a[p.off_a + i] - p.s2));
}

// o = s0 * a * b + s1 * o, with a = upstream gradient, b = exp output (d/dx exp(s0 (x - s2)) = s0 * y)
@compute @workgroup_size(64)
fn exp_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    o[at] = p.s0 * a[p.off_a + i] * b[p.off_b + i] + kept(at, p.s1);
}

// o[r, j] = s0 * b[r] * a[r, j] + s1 * o[r, j]   (diag(b) * A); the range starts on a row boundary
@compute @workgroup_size(64)
fn row_scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    o[at] = p.s0 * b[p.off_b + i / p.cols] * a[p.off_a + i] + kept(at, p.s1);
}

// o[r, j] += s0 * a[j]   (broadcast a row vector over the rows); the range starts on a row boundary
@compute @workgroup_size(64)
fn add_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let at = p.off_o + i;
    o[at] = o[at] + p.s0 * a[p.off_a + i % p.cols];
}

// AdamW (PyTorch semantics). a = gradient, o = parameter, o2 = first moment, o3 = second moment.
// s0 = lr, s1 = beta1, s2 = beta2, s3 = eps, s4 = weight decay, s5 = 1 - beta1^t, s6 = sqrt(1 - beta2^t).
@compute @workgroup_size(64)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let g = a[p.off_a + i];
    let ip = p.off_o + i;
    let im = p.off_o2 + i;
    let iv = p.off_o3 + i;
    var w = o[ip];
    w = w - p.s0 * p.s4 * w;
    let m = p.s1 * o2[im] + (1.0 - p.s1) * g;
    let v = p.s2 * o3[iv] + (1.0 - p.s2) * g * g;
    o2[im] = m;
    o3[iv] = v;
    let denom = sqrt(v) / p.s6 + p.s3;
    o[ip] = w - (p.s0 / p.s5) * m / denom;
}
