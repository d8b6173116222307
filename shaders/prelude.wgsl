// The prelude of elementwise.wgsl and rows.wgsl, prepended to each when the pipelines are built
// (src/gpu/kernels/mod.rs, `SHADERS`): the one Params uniform (mirrored by `Params` in src/gpu/kernels/dispatch.rs)
// and the one bind-group layout all their entry points share. `n` is the element count of a dispatch, `off_*` the
// element offset of each binding's first element (the host binds ranges at aligned byte offsets), `s0..s6` per-op
// scalars; the meaning of the rest is given per entry point. Outputs that are accumulated into (`beta`) are never
// read when beta == 0, so a NaN-filled output cannot leak into a result. An entry point leaves the bindings it does
// not use alone; the host binds small dummies there.

struct Params {
    n: u32,
    rows: u32,
    cols: u32,
    flag: u32,
    off_a: u32,
    off_b: u32,
    off_c: u32,
    off_i: u32,
    off_o: u32,
    off_o2: u32,
    off_o3: u32,
    r0: u32,
    r1: u32,
    total: u32,
    _pad0: u32,
    _pad1: u32,
    s0: f32,
    s1: f32,
    s2: f32,
    s3: f32,
    s4: f32,
    s5: f32,
    s6: f32,
    nan: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read> idx: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;
@group(0) @binding(6) var<storage, read_write> o2: array<f32>;
@group(0) @binding(7) var<storage, read_write> o3: array<f32>;

// beta * o[at], without reading o when beta == 0.
fn kept(at: u32, beta: f32) -> f32 {
    if (beta == 0.0) {
        return 0.0;
    }
    return beta * o[at];
}
