//! The WGSL kernels against the CPU reference (`hegraph::gpu::reference`), and the backward kernels against
//! central finite differences of the f64 reference forwards.
//!
//! Error measure: `rel_err(got, want) = max|got − want| / max(1, max|want|)` — relative for large outputs,
//! absolute for outputs below 1 (where a relative error would only measure cancellation). Full sums use
//! `max(1, Σ|x|)` instead of `max|want|`, the scale their rounding error actually has. Parity must be ≤ 1e-5.
//!
//! Inputs are fresh random numbers on every run; each test prints its seed, and `HEGRAPH_TEST_SEED=<n>` replays
//! it. Outputs are filled with NaN before each op, so a kernel that skips an element (or reads an output it
//! should not) fails. Without a GPU adapter the GPU tests fail with the adapter error, unless
//! `HEGRAPH_SKIP_GPU_TESTS=1`, in which case they say they are skipped.

use std::path::Path;
use std::sync::OnceLock;

use hegraph::gpu::kernels::{PRELUDE, SHADERS};
use hegraph::gpu::reference as cpu;
use hegraph::gpu::{
    AdamW, GpuContext, GpuError, GpuOptions, GpuTensor, Kernels, MatmulKernel, Trans, XentOut,
};
use hegraph::linalg::Mat;
use hegraph::rng::Rng;

const TOL: f64 = 1e-5;

// ------------------------------------------------------------------------------------------------------------
// Harness

struct Gpu {
    ctx: GpuContext,
    /// `MatmulKernel::Register`.
    reg: Kernels,
    /// `MatmulKernel::Tiled`.
    tiled: Kernels,
}

static GPU: OnceLock<Option<Gpu>> = OnceLock::new();

fn gpu() -> Option<&'static Gpu> {
    GPU.get_or_init(|| match GpuContext::new_headless(&GpuOptions::default()) {
        Ok(ctx) => {
            eprintln!(
                "GPU: {} (binding limit {} bytes, offset alignment {})",
                ctx.describe(),
                ctx.binding_limit(),
                ctx.limits.min_storage_buffer_offset_alignment
            );
            let mut reg = Kernels::new(&ctx).expect("compiling the kernels");
            reg.set_matmul_kernel(MatmulKernel::Register);
            let mut tiled = Kernels::new(&ctx).expect("compiling the kernels");
            tiled.set_matmul_kernel(MatmulKernel::Tiled);
            Some(Gpu { ctx, reg, tiled })
        }
        Err(e) if std::env::var("HEGRAPH_SKIP_GPU_TESTS").as_deref() == Ok("1") => {
            eprintln!("GPU tests skipped (HEGRAPH_SKIP_GPU_TESTS=1): {e}");
            None
        }
        Err(e) => panic!(
            "{e}\n(set HEGRAPH_SKIP_GPU_TESTS=1 to skip the GPU tests on a machine without one)"
        ),
    })
    .as_ref()
}

fn rng_for(test: &str) -> Rng {
    Rng::for_test(test)
}

fn randn(rng: &mut Rng, rows: usize, cols: usize) -> Mat {
    Mat::from_vec(rows, cols, rng.normal_vec(rows * cols))
}

fn randu(rng: &mut Rng, rows: usize, cols: usize, lo: f32, hi: f32) -> Mat {
    Mat::from_vec(rows, cols, rng.uniform_vec(rows * cols, lo, hi))
}

fn up(g: &Gpu, m: &Mat) -> GpuTensor {
    GpuTensor::upload(&g.ctx, m).expect("upload")
}

fn up_u32(g: &Gpu, rows: usize, cols: usize, v: &[u32]) -> GpuTensor<u32> {
    GpuTensor::from_slice(&g.ctx, rows, cols, v).expect("upload u32")
}

/// A tensor full of NaN.
fn poisoned(g: &Gpu, rows: usize, cols: usize) -> GpuTensor {
    up(g, &Mat::from_vec(rows, cols, vec![f32::NAN; rows * cols]))
}

fn poison(g: &Gpu, t: &GpuTensor) {
    t.write_slice(&g.ctx, &vec![f32::NAN; t.len()])
        .expect("poison");
}

fn down(g: &Gpu, t: &GpuTensor) -> Mat {
    t.download(&g.ctx).expect("download")
}

/// Records with `f` into one encoder and submits it.
fn run(g: &Gpu, f: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<(), GpuError>) {
    let mut enc = g.ctx.encoder("test");
    f(&mut enc).expect("recording the op");
    g.ctx.submit(enc).expect("submit");
}

/// `max|got − want| / max(1, scale)`; NaN where `want` is not NaN counts as infinitely wrong, and NaN where
/// `want` is NaN counts as right.
fn rel_err_scaled(got: &[f32], want: &[f32], scale: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let mut worst = 0.0f64;
    for (&a, &b) in got.iter().zip(want) {
        let d = match (a.is_nan(), b.is_nan()) {
            (true, true) => 0.0,
            (false, false) => (f64::from(a) - f64::from(b)).abs(),
            _ => f64::INFINITY,
        };
        worst = worst.max(d);
    }
    worst / scale.max(1.0)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    rel_err_scaled(got, want, scale)
}

#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
}

const SHAPES: [(usize, usize); 5] = [(1, 1), (7, 7), (17, 16), (3, 65), (134, 250)];

// ------------------------------------------------------------------------------------------------------------
// Shaders

/// Parses and validates `src` with every naga check on; `what` names it in the failure (line numbers count from
/// the top of `src`, so from the prelude's first line for a shader built on it).
#[track_caller]
fn validate_wgsl(what: &str, src: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
}

#[test]
fn every_shader_parses_and_validates_with_naga() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    // The prelude on its own is declarations only, which naga accepts as a module too.
    let prelude_file =
        std::fs::read_to_string(dir.join("prelude.wgsl")).expect("reading shaders/prelude.wgsl");
    assert_eq!(
        prelude_file, PRELUDE,
        "prelude.wgsl is not the prelude compiled into Kernels"
    );
    validate_wgsl("prelude.wgsl", PRELUDE);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("reading shaders/") {
        let path = entry.expect("shaders/ entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // The prelude is prepended to the others; clip_vision.wgsl belongs to the image encoder
        // (tests/clip_gpu.rs checks it against its module).
        if name == "prelude.wgsl" || name == hegraph::gpu::clip_vision::SHADER.0 {
            continue;
        }
        let src = std::fs::read_to_string(&path).expect("reading a shader");
        let compiled = SHADERS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| {
                panic!("{name} is not compiled into Kernels (add it to kernels::SHADERS)")
            });
        // What is validated is what the pipelines are built from: the file, or the prelude followed by it.
        let on_prelude = format!("{PRELUDE}{src}");
        assert!(
            compiled == src || compiled == on_prelude,
            "{name}: the compiled source is neither the file nor the prelude followed by the file"
        );
        validate_wgsl(&format!("{} as compiled", path.display()), compiled);
        seen += 1;
    }
    assert_eq!(
        seen,
        SHADERS.len(),
        "kernels::SHADERS lists a file that is not in shaders/"
    );
    for shared in ["elementwise.wgsl", "rows.wgsl"] {
        let compiled = SHADERS.iter().find(|(n, _)| *n == shared);
        assert!(
            compiled.is_some_and(|(_, s)| s.starts_with(PRELUDE)),
            "{shared} is built on prelude.wgsl"
        );
    }
}

// ------------------------------------------------------------------------------------------------------------
// Matmul

fn check_matmul(
    g: &Gpu,
    k: &Kernels,
    rng: &mut Rng,
    (m, kd, n): (usize, usize, usize),
    ta: Trans,
    tb: Trans,
) {
    let a = match ta {
        Trans::N => randn(rng, m, kd),
        Trans::T => randn(rng, kd, m),
    };
    let b = match tb {
        Trans::N => randn(rng, kd, n),
        Trans::T => randn(rng, n, kd),
    };
    let (ga, gb) = (up(g, &a), up(g, &b));
    let label = format!("{:?} matmul {m}x{kd}x{n} {ta:?}{tb:?}", k.matmul_kernel());

    // beta = 0 over a NaN output.
    let gc = poisoned(g, m, n);
    run(g, |e| k.matmul(e, &gc, &ga, ta, &gb, tb, 0.75, 0.0));
    let mut want = Mat::zeros(m, n);
    cpu::matmul(&mut want, &a, ta, &b, tb, 0.75, 0.0);
    assert_close(&label, &down(g, &gc).data, &want.data);

    // beta != 0 accumulates into the existing output.
    let c0 = randn(rng, m, n);
    gc.write(&g.ctx, &c0).expect("write");
    run(g, |e| k.matmul(e, &gc, &ga, ta, &gb, tb, -1.5, 0.5));
    let mut want = c0.clone();
    cpu::matmul(&mut want, &a, ta, &b, tb, -1.5, 0.5);
    assert_close(
        &format!("{label} (beta 0.5)"),
        &down(g, &gc).data,
        &want.data,
    );
}

const TRANS: [(Trans, Trans); 4] = [
    (Trans::N, Trans::N),
    (Trans::N, Trans::T),
    (Trans::T, Trans::N),
    (Trans::T, Trans::T),
];

#[test]
fn matmul_matches_reference_for_all_transposes_and_both_kernels() {
    let Some(g) = gpu() else { return };
    let mut rng = rng_for("matmul");
    for k in [&g.reg, &g.tiled] {
        for (ta, tb) in TRANS {
            for shape in [
                (1, 1, 1),
                (7, 7, 7),
                (17, 16, 16),
                (33, 5, 65),
                (65, 31, 1),
                (134, 242, 250),
            ] {
                check_matmul(g, k, &mut rng, shape, ta, tb);
            }
        }
    }
}

#[test]
fn matmul_with_empty_inner_dimension_scales_the_output() {
    let Some(g) = gpu() else { return };
    let mut rng = rng_for("matmul_k0");
    for (ta, tb) in TRANS {
        check_matmul(g, &g.reg, &mut rng, (5, 0, 3), ta, tb);
        check_matmul(g, &g.tiled, &mut rng, (5, 0, 3), ta, tb);
    }
    // Empty outputs are a no-op rather than an error.
    let (a, b, c) = (poisoned(g, 0, 4), poisoned(g, 4, 3), poisoned(g, 0, 3));
    run(g, |e| {
        g.reg.matmul(e, &c, &a, Trans::N, &b, Trans::N, 1.0, 0.0)
    });
    assert_eq!(down(g, &c).shape(), (0, 3));
}

// ------------------------------------------------------------------------------------------------------------
// Element-wise

#[test]
fn elementwise_ops_match_reference() {
    let Some(g) = gpu() else { return };
    let k = &g.reg;
    let mut rng = rng_for("elementwise");
    for (r, c) in SHAPES {
        let x = randn(&mut rng, r, c);
        let y = randn(&mut rng, r, c);
        let (gx, gy) = (up(g, &x), up(g, &y));
        let out = poisoned(g, r, c);
        let tag = |op: &str| format!("{op} {r}x{c}");

        // fill
        run(g, |e| k.fill(e, &out, 2.5));
        assert_close(&tag("fill"), &down(g, &out).data, &vec![2.5; r * c]);

        // axpby, beta = 0 over NaN and beta != 0
        poison(g, &out);
        run(g, |e| k.axpby(e, 1.25, &gx, 0.0, &out));
        let mut want = vec![0.0; r * c];
        cpu::axpby(1.25, &x.data, 0.0, &mut want);
        assert_close(&tag("axpby b=0"), &down(g, &out).data, &want);
        out.write(&g.ctx, &y).expect("write");
        run(g, |e| k.axpby(e, -0.5, &gx, 2.0, &out));
        let mut want = y.data.clone();
        cpu::axpby(-0.5, &x.data, 2.0, &mut want);
        assert_close(&tag("axpby"), &down(g, &out).data, &want);

        // mul (also with x as both operands)
        poison(g, &out);
        run(g, |e| k.mul(e, &out, &gx, &gy, 0.5, 0.0));
        let mut want = vec![f32::NAN; r * c];
        cpu::mul(&mut want, &x.data, &y.data, 0.5, 0.0);
        assert_close(&tag("mul"), &down(g, &out).data, &want);
        run(g, |e| k.mul(e, &out, &gx, &gx, 1.0, -1.0));
        cpu::mul(&mut want, &x.data, &x.data, 1.0, -1.0);
        assert_close(&tag("mul accumulate"), &down(g, &out).data, &want);

        // affine in place
        out.write(&g.ctx, &y).expect("write");
        run(g, |e| k.affine(e, &out, -3.0, 0.25));
        let mut want = y.data.clone();
        cpu::affine(&mut want, -3.0, 0.25);
        assert_close(&tag("affine"), &down(g, &out).data, &want);

        // tanh and its backward
        let xs = Mat::from_vec(r, c, x.data.iter().map(|v| v * 3.0).collect());
        let gxs = up(g, &xs);
        poison(g, &out);
        run(g, |e| k.tanh(e, &out, &gxs));
        let ty = cpu::tanh(&xs.data);
        assert_close(&tag("tanh"), &down(g, &out).data, &ty);
        let gty = up(g, &Mat::from_vec(r, c, ty.clone()));
        let dx = poisoned(g, r, c);
        run(g, |e| k.tanh_backward(e, &dx, &gy, &gty, 0.0));
        let mut want = vec![f32::NAN; r * c];
        cpu::tanh_backward(&mut want, &y.data, &ty, 0.0);
        assert_close(&tag("tanh_backward"), &down(g, &dx).data, &want);
        run(g, |e| k.tanh_backward(e, &dx, &gy, &gty, 0.5));
        cpu::tanh_backward(&mut want, &y.data, &ty, 0.5);
        assert_close(&tag("tanh_backward accumulate"), &down(g, &dx).data, &want);

        // exp_affine and its backward (cosine-like inputs, as in Tip-Adapter's affinities)
        let cos = randu(&mut rng, r, c, -1.0, 1.0);
        let gcos = up(g, &cos);
        poison(g, &out);
        run(g, |e| k.exp_affine(e, &out, &gcos, 5.5, 1.0));
        let ey = cpu::exp_affine(&cos.data, 5.5, 1.0);
        assert_close(&tag("exp_affine"), &down(g, &out).data, &ey);
        let gey = up(g, &Mat::from_vec(r, c, ey.clone()));
        poison(g, &dx);
        run(g, |e| k.exp_affine_backward(e, &dx, &gy, &gey, 5.5, 0.0));
        let mut want = vec![f32::NAN; r * c];
        cpu::exp_affine_backward(&mut want, &y.data, &ey, 5.5, 0.0);
        assert_close(&tag("exp_affine_backward"), &down(g, &dx).data, &want);
        run(g, |e| k.exp_affine_backward(e, &dx, &gy, &gey, 5.5, 1.0));
        cpu::exp_affine_backward(&mut want, &y.data, &ey, 5.5, 1.0);
        assert_close(
            &tag("exp_affine_backward accumulate"),
            &down(g, &dx).data,
            &want,
        );

        // row scaling
        let s = randn(&mut rng, r, 1);
        let gs = up(g, &s);
        poison(g, &out);
        run(g, |e| k.row_scale(e, &out, &gs, &gx, 2.0, 0.0));
        let mut want = Mat::from_vec(r, c, vec![f32::NAN; r * c]);
        cpu::row_scale(&mut want, &s.data, &x, 2.0, 0.0);
        assert_close(&tag("row_scale"), &down(g, &out).data, &want.data);
        run(g, |e| k.row_scale(e, &out, &gs, &gy, 1.0, -0.5));
        cpu::row_scale(&mut want, &s.data, &y, 1.0, -0.5);
        assert_close(
            &tag("row_scale accumulate"),
            &down(g, &out).data,
            &want.data,
        );

        // broadcast row add
        let bias = randn(&mut rng, 1, c);
        let gb = up(g, &bias);
        out.write(&g.ctx, &y).expect("write");
        run(g, |e| k.add_row_broadcast(e, &out, &gb, -2.0));
        let mut want = y.clone();
        cpu::add_row_broadcast(&mut want, &bias.data, -2.0);
        assert_close(&tag("add_row_broadcast"), &down(g, &out).data, &want.data);

        // copy
        poison(g, &out);
        run(g, |e| k.copy(e, &out, &gx));
        assert_close(&tag("copy"), &down(g, &out).data, &x.data);
    }
}

#[test]
fn tanh_saturates_instead_of_overflowing() {
    let Some(g) = gpu() else { return };
    let x = Mat::from_vec(1, 6, vec![-1e4, -100.0, -1e-6, 0.0, 50.0, 3e38]);
    let (gx, out) = (up(g, &x), poisoned(g, 1, 6));
    run(g, |e| g.reg.tanh(e, &out, &gx));
    assert_close("tanh at extremes", &down(g, &out).data, &cpu::tanh(&x.data));
}

#[test]
fn adamw_matches_pytorch_semantics_over_several_steps() {
    let Some(g) = gpu() else { return };
    let mut rng = rng_for("adamw");
    let hp = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-4,
        weight_decay: 0.1,
    };
    for (r, c) in [(1, 1), (17, 16), (134, 250)] {
        let mut p = randn(&mut rng, r, c).data;
        let mut m = vec![0.0; r * c];
        let mut v = vec![0.0; r * c];
        let gp = up(g, &Mat::from_vec(r, c, p.clone()));
        let gm = up(g, &Mat::zeros(r, c));
        let gv = up(g, &Mat::zeros(r, c));
        let gg = poisoned(g, r, c);
        for step in 1..=5 {
            let grad = randn(&mut rng, r, c);
            gg.write(&g.ctx, &grad).expect("write");
            run(g, |e| g.reg.adamw_step(e, &gp, &gm, &gv, &gg, &hp, step));
            cpu::adamw_step(&mut p, &mut m, &mut v, &grad.data, &hp, step);
        }
        assert_close(&format!("adamw param {r}x{c}"), &down(g, &gp).data, &p);
        assert_close(&format!("adamw m {r}x{c}"), &down(g, &gm).data, &m);
        assert_close(&format!("adamw v {r}x{c}"), &down(g, &gv).data, &v);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Row-wise and reductions

#[test]
fn l2_normalisation_matches_reference() {
    let Some(g) = gpu() else { return };
    let k = &g.reg;
    let mut rng = rng_for("l2norm");
    let eps = 1e-12;
    for (r, c) in SHAPES.into_iter().chain([(5, 300)]) {
        let mut x = randn(&mut rng, r, c);
        if r > 2 {
            x.row_mut(1).fill(0.0); // a zero row stays zero (norm clamped to eps)
        }
        let gx = up(g, &x);
        let (y, norms) = (poisoned(g, r, c), poisoned(g, r, 1));
        run(g, |e| k.l2_normalize_rows(e, &y, &norms, &gx, eps));
        let (want_y, want_n) = cpu::l2_normalize_rows(&x, eps);
        assert_close(
            &format!("l2norm y {r}x{c}"),
            &down(g, &y).data,
            &want_y.data,
        );
        assert_close(
            &format!("l2norm norms {r}x{c}"),
            &down(g, &norms).data,
            &want_n,
        );

        let dy = randn(&mut rng, r, c);
        let gdy = up(g, &dy);
        let dx = poisoned(g, r, c);
        // The backward of rows whose norm was clamped is dy / eps: keep those rows out of the comparison's scale
        // by checking nonzero-norm inputs only when such a row exists.
        let gy = up(g, &want_y);
        let gn = up(g, &Mat::from_vec(r, 1, want_n.clone()));
        run(g, |e| {
            k.l2_normalize_rows_backward(e, &dx, &gdy, &gy, &gn, eps, 0.0)
        });
        let mut want = Mat::from_vec(r, c, vec![f32::NAN; r * c]);
        cpu::l2_normalize_rows_backward(&mut want, &dy, &want_y, &want_n, eps, 0.0);
        let got = down(g, &dx);
        for i in 0..r {
            let e = rel_err(got.row(i), want.row(i));
            assert!(
                e <= TOL,
                "l2norm backward {r}x{c} row {i}: relative error {e:e}"
            );
        }
        let prev = got;
        run(g, |e| {
            k.l2_normalize_rows_backward(e, &dx, &gdy, &gy, &gn, eps, 0.5)
        });
        let mut want2 = prev.clone();
        cpu::l2_normalize_rows_backward(&mut want2, &dy, &want_y, &want_n, eps, 0.5);
        let got = down(g, &dx);
        for i in 0..r {
            let e = rel_err(got.row(i), want2.row(i));
            assert!(
                e <= TOL,
                "l2norm backward accumulate {r}x{c} row {i}: relative error {e:e}"
            );
        }
    }
}

#[test]
fn softmax_cross_entropy_matches_reference() {
    let Some(g) = gpu() else { return };
    let k = &g.reg;
    let mut rng = rng_for("xent");
    for (r, c) in SHAPES.into_iter().chain([(4, 1000)]) {
        // Logit scale 100 as in CLIP, so the row max really matters for stability.
        let logits = Mat::from_vec(
            r,
            c,
            rng.uniform_vec(r * c, -1.0, 1.0)
                .iter()
                .map(|v| v * 100.0)
                .collect(),
        );
        let labels: Vec<u32> = (0..r).map(|_| rng.below(c) as u32).collect();
        let (gl, glab) = (up(g, &logits), up_u32(g, r, 1, &labels));
        let (row_loss, grad, mean) = (poisoned(g, r, 1), poisoned(g, r, c), poisoned(g, 1, 1));
        let scale = 0.7 / r as f32;
        run(g, |e| {
            k.softmax_xent(
                e,
                &gl,
                &glab,
                XentOut {
                    row_loss: &row_loss,
                    grad: Some(&grad),
                    grad_scale: scale,
                    mean_loss: Some(&mean),
                    loss_weight: 0.7,
                    loss_beta: 0.0,
                },
            )
        });
        let (want_loss, want_grad) = cpu::softmax_xent(&logits, &labels, scale);
        assert_close(
            &format!("xent loss {r}x{c}"),
            &down(g, &row_loss).data,
            &want_loss,
        );
        assert_close(
            &format!("xent grad {r}x{c}"),
            &down(g, &grad).data,
            &want_grad.data,
        );
        let want_mean = cpu::sum_all(&want_loss, 0.7 / r as f32, 0.0, 0.0);
        assert_close(
            &format!("xent mean {r}x{c}"),
            &down(g, &mean).data,
            &[want_mean],
        );

        // A second weighted loss accumulates into the same scalar; grad may be skipped.
        run(g, |e| {
            k.softmax_xent(
                e,
                &gl,
                &glab,
                XentOut {
                    row_loss: &row_loss,
                    grad: None,
                    grad_scale: 0.0,
                    mean_loss: Some(&mean),
                    loss_weight: 0.1,
                    loss_beta: 1.0,
                },
            )
        });
        let want_total = cpu::sum_all(&want_loss, 0.1 / r as f32, 1.0, want_mean);
        assert_close(
            &format!("xent accumulated mean {r}x{c}"),
            &down(g, &mean).data,
            &[want_total],
        );
        assert_close(
            &format!("xent grad untouched {r}x{c}"),
            &down(g, &grad).data,
            &want_grad.data,
        );
    }
}

#[test]
fn cross_entropy_with_a_label_out_of_range_is_nan_for_that_row_only() {
    let Some(g) = gpu() else { return };
    let logits = Mat::from_vec(2, 3, vec![1.0, 2.0, 3.0, 0.5, 0.0, -0.5]);
    let (gl, glab) = (up(g, &logits), up_u32(g, 2, 1, &[3, 1]));
    let (row_loss, grad) = (poisoned(g, 2, 1), poisoned(g, 2, 3));
    run(g, |e| {
        g.reg.softmax_xent(
            e,
            &gl,
            &glab,
            XentOut {
                row_loss: &row_loss,
                grad: Some(&grad),
                grad_scale: 1.0,
                mean_loss: None,
                loss_weight: 0.0,
                loss_beta: 0.0,
            },
        )
    });
    let loss = down(g, &row_loss).data;
    assert!(loss[0].is_nan() && loss[1].is_finite(), "{loss:?}");
    let (want_loss, want_grad) = cpu::softmax_xent(&logits, &[3, 1], 1.0);
    assert_close("xent with a bad label", &loss, &want_loss);
    assert_close(
        "xent grad with a bad label",
        &down(g, &grad).data,
        &want_grad.data,
    );
}

#[test]
fn reductions_match_reference() {
    let Some(g) = gpu() else { return };
    let k = &g.reg;
    let mut rng = rng_for("reductions");
    for (r, c) in SHAPES.into_iter().chain([(300, 3)]) {
        let x = randn(&mut rng, r, c);
        let gx = up(g, &x);
        let tag = |op: &str| format!("{op} {r}x{c}");

        let total = poisoned(g, 1, 1);
        run(g, |e| k.sum_all(e, &total, &gx, 0.5, 0.0));
        let want = cpu::sum_all(&x.data, 0.5, 0.0, 0.0);
        let abs_sum: f64 = x.data.iter().map(|v| f64::from(v.abs())).sum();
        let e = rel_err_scaled(&down(g, &total).data, &[want], abs_sum);
        assert!(e <= TOL, "{}: relative error {e:e}", tag("sum_all"));
        run(g, |e| k.sum_all(e, &total, &gx, 1.0, -1.0));
        let want2 = cpu::sum_all(&x.data, 1.0, -1.0, want);
        let e = rel_err_scaled(&down(g, &total).data, &[want2], abs_sum);
        assert!(
            e <= TOL,
            "{}: relative error {e:e}",
            tag("sum_all accumulate")
        );

        let cols = poisoned(g, 1, c);
        run(g, |e| k.col_sums(e, &cols, &gx, 2.0, 0.0));
        let mut want = vec![f32::NAN; c];
        cpu::col_sums(&mut want, &x, 2.0, 0.0);
        assert_close(&tag("col_sums"), &down(g, &cols).data, &want);
        run(g, |e| k.col_sums(e, &cols, &gx, 1.0, 0.5));
        cpu::col_sums(&mut want, &x, 1.0, 0.5);
        assert_close(&tag("col_sums accumulate"), &down(g, &cols).data, &want);

        let rows = poisoned(g, r, 1);
        run(g, |e| k.row_sums(e, &rows, &gx, -1.0, 0.0));
        let mut want = vec![f32::NAN; r];
        cpu::row_sums(&mut want, &x, -1.0, 0.0);
        assert_close(&tag("row_sums"), &down(g, &rows).data, &want);
        run(g, |e| k.row_sums(e, &rows, &gx, 1.0, 2.0));
        cpu::row_sums(&mut want, &x, 1.0, 2.0);
        assert_close(&tag("row_sums accumulate"), &down(g, &rows).data, &want);
    }
}

#[test]
fn gather_rows_matches_reference() {
    let Some(g) = gpu() else { return };
    let mut rng = rng_for("gather");
    for (r, c) in SHAPES {
        let src = randn(&mut rng, r, c);
        let n_out = 1 + rng.below(2 * r + 3);
        let mut idx: Vec<u32> = (0..n_out).map(|_| rng.below(r) as u32).collect();
        if n_out > 2 {
            idx[n_out / 2] = r as u32; // out of range: a NaN row
        }
        let (gsrc, gidx, out) = (
            up(g, &src),
            up_u32(g, n_out, 1, &idx),
            poisoned(g, n_out, c),
        );
        run(g, |e| g.reg.gather_rows(e, &out, &gsrc, &gidx));
        assert_close(
            &format!("gather {n_out} of {r}x{c}"),
            &down(g, &out).data,
            &cpu::gather_rows(&src, &idx).data,
        );
    }
}

/// Class segment offsets for `c` classes of 0..=`most` entries each (empty classes included).
fn random_offsets(rng: &mut Rng, c: usize, most: usize) -> Vec<u32> {
    let mut off = vec![0u32];
    for _ in 0..c {
        let last = off.last().copied().unwrap_or(0);
        off.push(last + rng.below(most + 1) as u32);
    }
    off
}

/// The label of every entry under `offsets`.
fn segment_labels(offsets: &[u32]) -> Vec<u32> {
    let mut l = Vec::new();
    for (c, w) in offsets.windows(2).enumerate() {
        l.extend(std::iter::repeat_n(c as u32, (w[1] - w[0]) as usize));
    }
    l
}

/// The three class-segment kernels (the cache's one-hot products) against one-hot matmuls.
fn check_segments(
    g: &Gpu,
    k: &Kernels,
    rng: &mut Rng,
    (r, c, d): (usize, usize, usize),
    most: usize,
) {
    let off = random_offsets(rng, c, most);
    let m = *off.last().unwrap_or(&0) as usize;
    let tag = |op: &str| format!("{op} r={r} C={c} M={m} D={d}");
    let labels = segment_labels(&off);
    let g_off = up_u32(g, c + 1, 1, &off);
    for (alpha, beta) in [(1.0f32, 0.0f32), (-0.7, 1.5)] {
        // segment_sums: R×M → R×C
        let x = randn(rng, r, m.max(1));
        let x = Mat::from_vec(r, m, x.data[..r * m].to_vec());
        let old = randn(rng, r, c);
        let out = if beta == 0.0 {
            poisoned(g, r, c)
        } else {
            up(g, &old)
        };
        run(g, |e| {
            k.segment_sums(e, &out, &up(g, &x), &g_off, alpha, beta)
        });
        let mut want = old.clone();
        cpu::segment_sums(&mut want, &x, &off, alpha, beta);
        assert_close(&tag("segment_sums"), &down(g, &out).data, &want.data);

        // segment_expand: R×C → R×M
        if m > 0 {
            let y = randn(rng, r, c);
            let old = randn(rng, r, m);
            let mut lab = labels.clone();
            if m > 2 {
                lab[m / 2] = c as u32; // out of range: a NaN column
            }
            let out = if beta == 0.0 {
                poisoned(g, r, m)
            } else {
                up(g, &old)
            };
            let g_lab = up_u32(g, m, 1, &lab);
            run(g, |e| {
                k.segment_expand(e, &out, &up(g, &y), &g_lab, alpha, beta)
            });
            let mut want = old.clone();
            cpu::segment_expand(&mut want, &y, &lab, alpha, beta);
            assert_close(&tag("segment_expand"), &down(g, &out).data, &want.data);
        }

        // segment_row_sums: M×D → C×D
        let xr = randn(rng, m.max(1), d);
        let xr = Mat::from_vec(m, d, xr.data[..m * d].to_vec());
        let old = randn(rng, c, d);
        let out = if beta == 0.0 {
            poisoned(g, c, d)
        } else {
            up(g, &old)
        };
        let g_xr = if m > 0 { up(g, &xr) } else { poisoned(g, 0, d) };
        run(g, |e| {
            k.segment_row_sums(e, &out, &g_xr, &g_off, &off, alpha, beta)
        });
        let mut want = old.clone();
        cpu::segment_row_sums(&mut want, &xr, &off, alpha, beta);
        assert_close(&tag("segment_row_sums"), &down(g, &out).data, &want.data);
    }
}

#[test]
fn segment_kernels_match_one_hot_products() {
    let Some(g) = gpu() else { return };
    let mut rng = rng_for("segments");
    for (shape, most) in [
        ((1, 1, 1), 1),
        ((7, 7, 7), 3),
        ((17, 16, 16), 4),
        ((134, 61, 250), 5),
        ((3, 5, 9), 0),
    ] {
        check_segments(g, &g.reg, &mut rng, shape, most);
    }
    // Offsets that do not end at M are refused.
    let (out, x) = (poisoned(g, 2, 3), poisoned(g, 5, 3));
    let off = [0u32, 2, 4];
    let mut enc = g.ctx.encoder("bad offsets");
    let err = g
        .reg
        .segment_row_sums(&mut enc, &out, &x, &up_u32(g, 3, 1, &off), &off, 1.0, 0.0);
    assert!(matches!(err, Err(GpuError::Shape { .. })), "{err:?}");
}

/// Bind groups are cached by what they bind: the same op on the same buffers with other scalars, or on other
/// buffers, must not reuse a stale one, and releasing the cache changes nothing but memory.
#[test]
fn cached_bindings_follow_scalars_and_buffers() {
    let Some(g) = gpu() else { return };
    let k = Kernels::new(&g.ctx).expect("kernels");
    let mut rng = rng_for("bind cache");
    let (x, y0) = (randn(&mut rng, 7, 9), randn(&mut rng, 7, 9));
    let gx = up(g, &x);
    for (a, b) in [(0.5f32, 1.0f32), (-2.0, 0.25), (0.5, 1.0)] {
        let gy = up(g, &y0);
        run(g, |e| k.axpby(e, a, &gx, b, &gy));
        let mut want = y0.data.clone();
        cpu::axpby(a, &x.data, b, &mut want);
        assert_close(&format!("axpby {a} {b}"), &down(g, &gy).data, &want);
        k.release_cached_bindings();
    }
    let gy = up(g, &y0);
    for _ in 0..2 {
        run(g, |e| k.axpby(e, 1.0, &gx, 1.0, &gy));
    }
    let mut want = y0.data.clone();
    cpu::axpby(1.0, &x.data, 1.0, &mut want);
    cpu::axpby(1.0, &x.data, 1.0, &mut want);
    assert_close("axpby twice on the same buffers", &down(g, &gy).data, &want);
}

#[test]
fn profiling_times_each_dispatch_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let k = Kernels::new(&g.ctx).expect("kernels");
    let has = g
        .ctx
        .device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY);
    if !k.start_profiling(8) {
        assert!(
            !has,
            "the device has timestamp queries but profiling did not start"
        );
        eprintln!("no timestamp queries on this device: nothing to time");
        return;
    }
    let mut rng = rng_for("profile");
    let (a, b) = (randn(&mut rng, 7, 5), randn(&mut rng, 5, 3));
    let out = poisoned(g, 7, 3);
    let th = poisoned(g, 7, 3);
    run(g, |e| {
        k.matmul(
            e,
            &out,
            &up(g, &a),
            Trans::N,
            &up(g, &b),
            Trans::N,
            1.0,
            0.0,
        )?;
        k.tanh(e, &th, &out)
    });
    let t = k.finish_profiling().expect("timestamps");
    let labels: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(labels, ["matmul 7×5·5×3 NN", "tanh"]);
    assert!(t.iter().all(|x| x.1.is_finite() && x.1 >= 0.0), "{t:?}");
    // Profiling ends with finish: later work is not timed.
    run(g, |e| k.tanh(e, &out, &th));
    assert!(k.finish_profiling().expect("nothing").is_empty());
}

// ------------------------------------------------------------------------------------------------------------
// Finite differences (tiny shapes, f64 reference forwards)

/// Central differences of `f` at `x`.
fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + h;
            let fp = f(&xp);
            xp[i] = x0 - h;
            let fm = f(&xp);
            xp[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn backward_kernels_match_finite_differences() {
    let Some(g) = gpu() else { return };
    let k = &g.reg;
    let mut rng = rng_for("finite_differences");
    let (r, c) = (3, 5);
    // Upstream gradient w: the objective is Σ w ⊙ f(x), whose gradient the backward kernels compute.
    let w = randn(&mut rng, r, c);
    let wd = to_f64(&w.data);
    let gw = up(g, &w);

    // tanh
    let x = randu(&mut rng, r, c, -2.0, 2.0);
    let xd = to_f64(&x.data);
    let (gx, y, dx) = (up(g, &x), poisoned(g, r, c), poisoned(g, r, c));
    run(g, |e| {
        k.tanh(e, &y, &gx)?;
        k.tanh_backward(e, &dx, &gw, &y, 0.0)
    });
    let fd = numeric_grad(&xd, |v| dot(&wd, &cpu::tanh_f64(v)));
    assert_close(
        "tanh backward vs finite differences",
        &down(g, &dx).data,
        &to_f32(&fd),
    );
    let mut refd = vec![0.0; r * c];
    cpu::tanh_backward(&mut refd, &w.data, &cpu::tanh(&x.data), 0.0);
    assert_close(
        "reference tanh backward vs finite differences",
        &refd,
        &to_f32(&fd),
    );

    // exp(s (x - 1))
    let cos = randu(&mut rng, r, c, -1.0, 1.0);
    let cd = to_f64(&cos.data);
    let gcos = up(g, &cos);
    run(g, |e| {
        k.exp_affine(e, &y, &gcos, 3.0, 1.0)?;
        k.exp_affine_backward(e, &dx, &gw, &y, 3.0, 0.0)
    });
    let fd = numeric_grad(&cd, |v| dot(&wd, &cpu::exp_affine_f64(v, 3.0, 1.0)));
    assert_close(
        "exp_affine backward vs finite differences",
        &down(g, &dx).data,
        &to_f32(&fd),
    );

    // row L2 normalisation
    let xn = randn(&mut rng, r, c);
    let xnd = to_f64(&xn.data);
    let (gxn, norms) = (up(g, &xn), poisoned(g, r, 1));
    run(g, |e| {
        k.l2_normalize_rows(e, &y, &norms, &gxn, 1e-12)?;
        k.l2_normalize_rows_backward(e, &dx, &gw, &y, &norms, 1e-12, 0.0)
    });
    let fd = numeric_grad(&xnd, |v| {
        dot(&wd, &cpu::l2_normalize_rows_f64(v, r, c, 1e-12).0)
    });
    assert_close(
        "l2 normalisation backward vs finite differences",
        &down(g, &dx).data,
        &to_f32(&fd),
    );

    // softmax cross-entropy: the kernel's gradient is that of grad_scale · Σ_i loss_i.
    let logits = randn(&mut rng, r, c);
    let ld = to_f64(&logits.data);
    let labels: Vec<u32> = (0..r).map(|_| rng.below(c) as u32).collect();
    let (gl, glab, row_loss) = (up(g, &logits), up_u32(g, r, 1, &labels), poisoned(g, r, 1));
    let scale = 0.25;
    run(g, |e| {
        k.softmax_xent(
            e,
            &gl,
            &glab,
            XentOut {
                row_loss: &row_loss,
                grad: Some(&dx),
                grad_scale: scale,
                mean_loss: None,
                loss_weight: 0.0,
                loss_beta: 0.0,
            },
        )
    });
    let fd = numeric_grad(&ld, |v| {
        f64::from(scale) * cpu::softmax_xent_f64(v, r, c, &labels).iter().sum::<f64>()
    });
    assert_close(
        "cross-entropy gradient vs finite differences",
        &down(g, &dx).data,
        &to_f32(&fd),
    );
}

// ------------------------------------------------------------------------------------------------------------
// Blocking above the binding limit

#[test]
fn ops_split_matrices_above_an_artificially_small_binding_limit() {
    let Some(g) = gpu() else { return };
    let mut rng = rng_for("blocked");
    let mut ctx = g.ctx.clone();
    let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment);
    // Room for 50 floats after the alignment slack: every operand below spans several blocks.
    ctx.set_binding_limit_override(Some(align + 50 * 4));
    let mut k = Kernels::new(&ctx).expect("kernels");
    for kind in [MatmulKernel::Register, MatmulKernel::Tiled] {
        k.set_matmul_kernel(kind);
        for (ta, tb) in TRANS {
            let before = k.dispatches();
            check_matmul(g, &k, &mut rng, (37, 20, 23), ta, tb);
            check_matmul(g, &k, &mut rng, (9, 45, 2), ta, tb);
            assert!(
                k.dispatches() - before > 8,
                "matmul was not split into blocks"
            );
        }
    }

    let (r, c) = (29, 13);
    let x = randn(&mut rng, r, c);
    let y = randn(&mut rng, r, c);
    let (gx, gy) = (up(g, &x), up(g, &y));
    let out = poisoned(g, r, c);
    let before = k.dispatches();
    run(g, |e| k.mul(e, &out, &gx, &gy, 1.5, 0.0));
    assert!(k.dispatches() - before > 1, "mul was not split into blocks");
    let mut want = vec![0.0; r * c];
    cpu::mul(&mut want, &x.data, &y.data, 1.5, 0.0);
    assert_close("blocked mul", &down(g, &out).data, &want);

    let s = randn(&mut rng, r, 1);
    let gs = up(g, &s);
    poison(g, &out);
    run(g, |e| k.row_scale(e, &out, &gs, &gx, 1.0, 0.0));
    let mut want = Mat::zeros(r, c);
    cpu::row_scale(&mut want, &s.data, &x, 1.0, 0.0);
    assert_close("blocked row_scale", &down(g, &out).data, &want.data);

    let bias = randn(&mut rng, 1, c);
    let gb = up(g, &bias);
    out.write(&g.ctx, &y).expect("write");
    run(g, |e| k.add_row_broadcast(e, &out, &gb, 1.0));
    let mut want = y.clone();
    cpu::add_row_broadcast(&mut want, &bias.data, 1.0);
    assert_close("blocked add_row_broadcast", &down(g, &out).data, &want.data);

    let (yn, norms) = (poisoned(g, r, c), poisoned(g, r, 1));
    run(g, |e| k.l2_normalize_rows(e, &yn, &norms, &gx, 1e-12));
    let (want_y, want_n) = cpu::l2_normalize_rows(&x, 1e-12);
    assert_close("blocked l2norm", &down(g, &yn).data, &want_y.data);
    poison(g, &out);
    run(g, |e| {
        k.l2_normalize_rows_backward(e, &out, &gy, &yn, &norms, 1e-12, 0.0)
    });
    let mut want = Mat::zeros(r, c);
    cpu::l2_normalize_rows_backward(&mut want, &y, &want_y, &want_n, 1e-12, 0.0);
    assert_close("blocked l2norm backward", &down(g, &out).data, &want.data);

    let labels: Vec<u32> = (0..r).map(|_| rng.below(c) as u32).collect();
    let glab = up_u32(g, r, 1, &labels);
    let (row_loss, mean) = (poisoned(g, r, 1), poisoned(g, 1, 1));
    poison(g, &out);
    run(g, |e| {
        k.softmax_xent(
            e,
            &gx,
            &glab,
            XentOut {
                row_loss: &row_loss,
                grad: Some(&out),
                grad_scale: 0.5,
                mean_loss: Some(&mean),
                loss_weight: 1.0,
                loss_beta: 0.0,
            },
        )
    });
    let (want_loss, want_grad) = cpu::softmax_xent(&x, &labels, 0.5);
    assert_close("blocked xent loss", &down(g, &row_loss).data, &want_loss);
    assert_close("blocked xent grad", &down(g, &out).data, &want_grad.data);
    let want_mean = cpu::sum_all(&want_loss, 1.0 / r as f32, 0.0, 0.0);
    assert_close("blocked xent mean", &down(g, &mean).data, &[want_mean]);

    let total = poisoned(g, 1, 1);
    run(g, |e| k.sum_all(e, &total, &gx, 1.0, 0.0));
    let abs_sum: f64 = x.data.iter().map(|v| f64::from(v.abs())).sum();
    let e = rel_err_scaled(
        &down(g, &total).data,
        &[cpu::sum_all(&x.data, 1.0, 0.0, 0.0)],
        abs_sum,
    );
    assert!(e <= TOL, "blocked sum_all: relative error {e:e}");

    let cols = poisoned(g, 1, c);
    run(g, |e| k.col_sums(e, &cols, &gx, 1.0, 0.0));
    let mut want = vec![0.0; c];
    cpu::col_sums(&mut want, &x, 1.0, 0.0);
    assert_close("blocked col_sums", &down(g, &cols).data, &want);

    let rows = poisoned(g, r, 1);
    run(g, |e| k.row_sums(e, &rows, &gx, 1.0, 0.0));
    let mut want = vec![0.0; r];
    cpu::row_sums(&mut want, &x, 1.0, 0.0);
    assert_close("blocked row_sums", &down(g, &rows).data, &want);

    let idx: Vec<u32> = (0..17).map(|_| rng.below(r) as u32).collect();
    let (gidx, gathered) = (up_u32(g, 17, 1, &idx), poisoned(g, 17, c));
    run(g, |e| k.gather_rows(e, &gathered, &gx, &gidx));
    assert_close(
        "blocked gather",
        &down(g, &gathered).data,
        &cpu::gather_rows(&x, &idx).data,
    );

    // The segment kernels walk rows (and, for the row sums, whole classes) in blocks.
    let before = k.dispatches();
    check_segments(g, &k, &mut rng, (23, 9, 7), 4);
    assert!(
        k.dispatches() - before > 12,
        "segment ops were not split into blocks"
    );

    let hp = AdamW::default();
    let (gp, gm, gv) = (
        up(g, &x),
        up(g, &Mat::zeros(r, c)),
        up(g, &Mat::zeros(r, c)),
    );
    run(g, |e| k.adamw_step(e, &gp, &gm, &gv, &gy, &hp, 1));
    let (mut p, mut m, mut v) = (x.data.clone(), vec![0.0; r * c], vec![0.0; r * c]);
    cpu::adamw_step(&mut p, &mut m, &mut v, &y.data, &hp, 1);
    assert_close("blocked adamw", &down(g, &gp).data, &p);

    // A single row that cannot fit is refused with a clear error instead of being bound anyway.
    let wide = poisoned(g, 2, 100);
    let wide_out = poisoned(g, 2, 100);
    let mut enc = ctx.encoder("too wide");
    let err = k.l2_normalize_rows(&mut enc, &wide_out, &poisoned(g, 2, 1), &wide, 1e-12);
    assert!(matches!(err, Err(GpuError::TooLarge { .. })), "{err:?}");
}

// ------------------------------------------------------------------------------------------------------------
// Errors

#[test]
fn misuse_becomes_an_error_not_a_panic() {
    let Some(g) = gpu() else { return };
    let k = &g.reg;
    let (a, b, c) = (poisoned(g, 2, 3), poisoned(g, 4, 5), poisoned(g, 2, 5));
    let mut enc = g.ctx.encoder("misuse");
    let r = k.matmul(&mut enc, &c, &a, Trans::N, &b, Trans::N, 1.0, 0.0);
    assert!(matches!(r, Err(GpuError::Shape { .. })), "{r:?}");
    let r = k.tanh(&mut enc, &a, &a);
    assert!(matches!(r, Err(GpuError::Aliasing { .. })), "{r:?}");
    let r = k.matmul(&mut enc, &c, &c, Trans::T, &c, Trans::N, 1.0, 0.0);
    assert!(
        matches!(
            r,
            Err(GpuError::Shape { .. }) | Err(GpuError::Aliasing { .. })
        ),
        "{r:?}"
    );
    let r = GpuTensor::<f32>::from_slice(&g.ctx, 2, 2, &[1.0; 3]);
    assert!(matches!(r, Err(GpuError::Shape { .. })), "{r:?}");
    g.ctx
        .submit(enc)
        .expect("an encoder with nothing recorded still submits");

    // A wgpu validation error (a storage buffer cannot be mapped for reading) is caught by the error scope.
    let r = g.ctx.scoped("creating an invalid buffer", || {
        g.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    });
    assert!(matches!(r, Err(GpuError::Validation { .. })), "{r:?}");
    assert!(!g.ctx.is_lost());
}

#[test]
fn a_lost_device_is_reported_and_refuses_work() {
    let Some(_) = gpu() else { return };
    // A device of its own: destroying the shared one would break the other tests.
    let ctx = GpuContext::new_headless(&GpuOptions::default()).expect("second device");
    let k = Kernels::new(&ctx).expect("kernels");
    let x = GpuTensor::upload(&ctx, &Mat::from_vec(1, 2, vec![1.0, 2.0])).expect("upload");
    ctx.device.destroy();
    let _ = ctx.device.poll(wgpu::PollType::Poll);
    assert!(ctx.is_lost(), "destroying the device did not mark it lost");
    assert!(ctx.lost_reason().is_some());
    let y = GpuTensor::<f32>::zeros(&ctx, 1, 2);
    assert!(matches!(y, Err(GpuError::Lost(_))), "{y:?}");
    let mut enc = ctx.encoder("after loss");
    let r = k.affine(&mut enc, &x, 2.0, 0.0);
    assert!(matches!(r, Err(GpuError::Lost(_))), "{r:?}");
    assert!(matches!(x.download(&ctx), Err(GpuError::Lost(_))));
}
