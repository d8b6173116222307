//! The WGSL image encoder (`gpu::clip_vision`): each kernel against a plain CPU reference on awkward shapes,
//! then the whole tower against candle's encoder on the test checkpoint and on a ViT-B/32-sized random
//! checkpoint, on real photos (`../shared/data/photos`). Runs on whatever adapter wgpu finds (lavapipe in CI);
//! `HEGRAPH_SKIP_GPU_TESTS=1` skips the GPU parts where no adapter exists at all.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hegraph::clip::preprocess::prepare_batch;
use hegraph::clip::{
    write_test_checkpoint, ClipDevice, ClipModel, ImageEncoder, ImageTensor, TestCheckpointConfig,
};
use hegraph::extract::{EmbedOptions, Embedder};
use hegraph::gpu::clip_vision::{ClipVisionGpu, ClipVisionKernels, SHADER};
use hegraph::gpu::{GpuContext, GpuOptions, GpuTensor, MatmulKernel};
use hegraph::linalg::{dot, Mat};
use hegraph::progress::{CancelToken, NoProgress};
use hegraph::rng::Rng;

static GPU: OnceLock<Option<GpuContext>> = OnceLock::new();

fn gpu() -> Option<&'static GpuContext> {
    GPU.get_or_init(|| match GpuContext::new_headless(&GpuOptions::default()) {
        Ok(ctx) => {
            eprintln!("GPU: {}", ctx.describe());
            Some(ctx)
        }
        Err(e) if std::env::var("HEGRAPH_SKIP_GPU_TESTS").as_deref() == Ok("1") => {
            eprintln!("GPU tests skipped (HEGRAPH_SKIP_GPU_TESTS=1): {e}");
            None
        }
        Err(e) => panic!(
            "no wgpu adapter ({e}); install mesa-vulkan-drivers or set HEGRAPH_SKIP_GPU_TESTS=1"
        ),
    })
    .as_ref()
}

fn kernels(ctx: &GpuContext, kind: MatmulKernel) -> ClipVisionKernels {
    let mut k = ClipVisionKernels::new(ctx).expect("compiling clip_vision.wgsl");
    k.set_matmul_kernel(kind);
    k
}

fn random(rng: &mut Rng, rows: usize, cols: usize) -> Mat {
    Mat::from_vec(rows, cols, rng.normal_vec(rows * cols))
}

fn up(ctx: &GpuContext, m: &Mat) -> GpuTensor {
    GpuTensor::upload(ctx, m).expect("upload")
}

/// Runs `record` into one encoder, submits, and downloads `out`.
fn run(
    ctx: &GpuContext,
    out: &GpuTensor,
    record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<(), hegraph::gpu::GpuError>,
) -> Mat {
    let mut enc = ctx.encoder("clip_gpu test");
    ctx.scoped("clip_gpu test", || record(&mut enc))
        .expect("scope")
        .expect("recording");
    ctx.submit(enc).expect("submit");
    out.download(ctx).expect("download")
}

fn assert_close(got: &Mat, want: &Mat, tol: f32, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.data.iter().zip(&want.data).enumerate() {
        let scale = 1.0f32.max(w.abs());
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: element {i} (row {}, col {}) is {g}, want {w}",
            i / want.cols.max(1),
            i % want.cols.max(1)
        );
    }
}

// ------------------------------------------------------------------------------------------------------------
// The shader

#[test]
fn clip_vision_shader_validates_with_naga_and_has_every_entry_point() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders/clip_vision.wgsl");
    let src = std::fs::read_to_string(&path).expect("reading the shader");
    assert_eq!(
        src, SHADER.1,
        "the compiled-in source is not shaders/clip_vision.wgsl"
    );
    let module = naga::front::wgsl::parse_str(&src)
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.emit_to_string(&src)));
    let mut names: Vec<&str> = module
        .entry_points
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "attention",
            "embed",
            "im2col",
            "layer_norm",
            "linear_reg",
            "linear_tiled"
        ]
    );
}

// ------------------------------------------------------------------------------------------------------------
// Kernels against CPU references

fn quick_gelu(v: f32) -> f32 {
    v * (1.0 / (1.0 + (-1.702 * v).exp()))
}

/// `act(x · wᵀ + b) + r` in f64.
fn linear_ref(x: &Mat, w: &Mat, b: Option<&Mat>, r: Option<&Mat>, gelu: bool) -> Mat {
    let (m, k, n) = (x.rows, x.cols, w.rows);
    let mut out = Mat::zeros(m, n);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for kk in 0..k {
                acc += f64::from(x.get(i, kk)) * f64::from(w.get(j, kk));
            }
            let mut v = acc as f32;
            if let Some(b) = b {
                v += b.data[j];
            }
            if gelu {
                v = quick_gelu(v);
            }
            if let Some(r) = r {
                v += r.get(i, j);
            }
            out.set(i, j, v);
        }
    }
    out
}

#[test]
fn linear_matches_the_cpu_on_awkward_shapes_with_both_kernels() {
    let Some(ctx) = gpu() else { return };
    let shapes = [
        (1, 1, 1),
        (7, 7, 7),
        (1, 300, 5),
        (65, 33, 70),
        (130, 17, 100),
        (50, 64, 129),
    ];
    for kind in [MatmulKernel::Register, MatmulKernel::Tiled] {
        let k = kernels(ctx, kind);
        for (si, &(m, kk, n)) in shapes.iter().enumerate() {
            for variant in 0..4u64 {
                let mut rng = Rng::derive(11, &[si as u64, variant]);
                let x = random(&mut rng, m, kk);
                let w = random(&mut rng, n, kk);
                let b = random(&mut rng, 1, n);
                let r = random(&mut rng, m, n);
                let (use_b, use_r, gelu) = match variant {
                    0 => (false, false, false),
                    1 => (true, false, true),
                    2 => (true, true, false),
                    _ => (false, true, true),
                };
                let (gx, gw, gb, gr) = (up(ctx, &x), up(ctx, &w), up(ctx, &b), up(ctx, &r));
                // NaN in the output buffer must not leak: it is never read.
                let out = up(ctx, &Mat::from_vec(m, n, vec![f32::NAN; m * n]));
                let got = run(ctx, &out, |enc| {
                    k.linear(
                        enc,
                        &out,
                        &gx,
                        &gw,
                        use_b.then_some(&gb),
                        use_r.then_some(&gr),
                        gelu,
                    )
                });
                let want = linear_ref(&x, &w, use_b.then_some(&b), use_r.then_some(&r), gelu);
                assert_close(
                    &got,
                    &want,
                    1e-4 * (kk as f32).sqrt(),
                    &format!("{kind:?} linear {m}x{kk}x{n} variant {variant}"),
                );
            }
        }
    }
}

#[test]
fn linear_refuses_mismatched_shapes_and_aliasing() {
    let Some(ctx) = gpu() else { return };
    let k = kernels(ctx, MatmulKernel::Auto);
    let x = up(ctx, &Mat::zeros(3, 4));
    let w = up(ctx, &Mat::zeros(5, 3));
    let out = up(ctx, &Mat::zeros(3, 5));
    let mut enc = ctx.encoder("t");
    let e = k
        .linear(&mut enc, &out, &x, &w, None, None, false)
        .unwrap_err();
    assert!(e.to_string().contains("clip linear"), "{e}");
    let sq = up(ctx, &Mat::zeros(4, 4));
    let e = k
        .linear(&mut enc, &x, &x, &sq, None, Some(&x), false)
        .unwrap_err();
    assert!(e.to_string().contains("also bound"), "{e}");
}

fn layer_norm_ref(x: &Mat, g: &Mat, b: &Mat, stride: usize) -> Mat {
    let n = x.cols;
    let rows: Vec<usize> = (0..x.rows).step_by(stride).collect();
    let mut out = Mat::zeros(rows.len(), n);
    for (o, &r) in rows.iter().enumerate() {
        let row = x.row(r);
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let inv = 1.0 / (var + 1e-5).sqrt();
        for (j, &x) in row.iter().enumerate() {
            let v = (f64::from(x) - mean) * inv * f64::from(g.data[j]) + f64::from(b.data[j]);
            out.set(o, j, v as f32);
        }
    }
    out
}

#[test]
fn layer_norm_matches_the_cpu_including_strided_rows() {
    let Some(ctx) = gpu() else { return };
    let k = kernels(ctx, MatmulKernel::Auto);
    for (si, &(rows, cols, stride)) in [
        (1, 1, 1),
        (7, 7, 1),
        (7, 7, 3),
        (5, 300, 1),
        (50, 768, 50),
        (12, 257, 5),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::derive(12, &[si as u64]);
        let mut x = random(&mut rng, rows, cols);
        // An offset far from zero checks the two-pass variance.
        for v in &mut x.data {
            *v = 3.0 * *v + 40.0;
        }
        let g = random(&mut rng, 1, cols);
        let b = random(&mut rng, 1, cols);
        let out_rows = rows.div_ceil(stride);
        let out = up(ctx, &Mat::zeros(out_rows, cols));
        let (gx, gg, gb) = (up(ctx, &x), up(ctx, &g), up(ctx, &b));
        let got = run(ctx, &out, |enc| {
            k.layer_norm(enc, &out, &gx, &gg, &gb, stride, 1e-5)
        });
        let want = layer_norm_ref(&x, &g, &b, stride);
        assert_close(
            &got,
            &want,
            1e-4,
            &format!("layer norm {rows}x{cols} stride {stride}"),
        );
    }
}

/// Multi-head attention over `qkv` (`B·seq × 3·hidden`), in f64.
fn attention_ref(qkv: &Mat, seq: usize, heads: usize) -> Mat {
    let hidden = qkv.cols / 3;
    let hd = hidden / heads;
    let images = qkv.rows / seq;
    let scale = (hd as f64).powf(-0.5);
    let mut out = Mat::zeros(qkv.rows, hidden);
    for b in 0..images {
        for h in 0..heads {
            for i in 0..seq {
                let q = qkv.row(b * seq + i);
                let scores: Vec<f64> = (0..seq)
                    .map(|j| {
                        let kr = qkv.row(b * seq + j);
                        (0..hd)
                            .map(|d| {
                                f64::from(q[h * hd + d])
                                    * scale
                                    * f64::from(kr[hidden + h * hd + d])
                            })
                            .sum()
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let v: f64 = (0..seq)
                        .map(|j| {
                            e[j] / sum * f64::from(qkv.get(b * seq + j, 2 * hidden + h * hd + d))
                        })
                        .sum();
                    out.set(b * seq + i, h * hd + d, v as f32);
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_the_cpu_on_awkward_shapes() {
    let Some(ctx) = gpu() else { return };
    let k = kernels(ctx, MatmulKernel::Auto);
    // (images, tokens, heads, head width)
    for (si, &(images, seq, heads, hd)) in [
        (1, 1, 1, 1),
        (1, 7, 7, 7),
        (2, 7, 1, 70),
        (3, 50, 12, 8),
        (1, 65, 2, 64),
        (2, 130, 3, 5),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::derive(13, &[si as u64]);
        let hidden = heads * hd;
        let mut qkv = random(&mut rng, images * seq, 3 * hidden);
        for v in &mut qkv.data {
            *v *= 2.0;
        }
        let out = up(ctx, &Mat::zeros(images * seq, hidden));
        let g = up(ctx, &qkv);
        let got = run(ctx, &out, |enc| k.attention(enc, &out, &g, seq, heads));
        let want = attention_ref(&qkv, seq, heads);
        assert_close(
            &got,
            &want,
            1e-4,
            &format!("attention {images} images x {seq} tokens x {heads} heads of {hd}"),
        );
    }
}

#[test]
fn patch_unfolding_and_token_embedding_match_the_cpu() {
    let Some(ctx) = gpu() else { return };
    let k = kernels(ctx, MatmulKernel::Auto);
    for (si, &(images, size, patch, hidden)) in
        [(1, 1, 1, 1), (2, 7, 7, 7), (3, 12, 4, 5), (2, 21, 7, 33)]
            .iter()
            .enumerate()
    {
        let mut rng = Rng::derive(14, &[si as u64]);
        let pixels = random(&mut rng, images, 3 * size * size);
        let grid = size / patch;
        let cols = 3 * patch * patch;
        let patches = up(ctx, &Mat::zeros(images * grid * grid, cols));
        let gp = up(ctx, &pixels);
        let got = run(ctx, &patches, |enc| {
            k.im2col(enc, &patches, &gp, size, patch)
        });
        let mut want = Mat::zeros(images * grid * grid, cols);
        for b in 0..images {
            for ty in 0..grid {
                for tx in 0..grid {
                    for c in 0..3 {
                        for ky in 0..patch {
                            for kx in 0..patch {
                                let v = pixels.data[b * 3 * size * size
                                    + c * size * size
                                    + (ty * patch + ky) * size
                                    + tx * patch
                                    + kx];
                                want.set(
                                    (b * grid + ty) * grid + tx,
                                    (c * patch + ky) * patch + kx,
                                    v,
                                );
                            }
                        }
                    }
                }
            }
        }
        assert_close(&got, &want, 0.0, &format!("im2col {images}x{size}/{patch}"));

        let seq = grid * grid + 1;
        let pe = random(&mut rng, images * (seq - 1), hidden);
        let class = random(&mut rng, 1, hidden);
        let pos = random(&mut rng, seq, hidden);
        let out = up(ctx, &Mat::zeros(images * seq, hidden));
        let (gpe, gc, gpos) = (up(ctx, &pe), up(ctx, &class), up(ctx, &pos));
        let got = run(ctx, &out, |enc| k.embed(enc, &out, &gpe, &gc, &gpos));
        let mut want = Mat::zeros(images * seq, hidden);
        for b in 0..images {
            for s in 0..seq {
                for d in 0..hidden {
                    let v = if s == 0 {
                        class.data[d]
                    } else {
                        pe.get(b * (seq - 1) + s - 1, d)
                    };
                    want.set(b * seq + s, d, v + pos.get(s, d));
                }
            }
        }
        assert_close(&got, &want, 1e-6, &format!("embed {images}x{seq}x{hidden}"));
    }
}

// ------------------------------------------------------------------------------------------------------------
// The whole tower against candle

fn photos() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("../shared/data/photos")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| hegraph::data::is_image_path(p))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "too few photos in {}", dir.display());
    v
}

fn tensors(paths: &[PathBuf], size: usize) -> Vec<ImageTensor> {
    prepare_batch(paths, size)
        .into_iter()
        .map(|r| r.expect("decoding a photo"))
        .collect()
}

fn min_cosine(a: &Mat, b: &Mat) -> f32 {
    assert_eq!(a.shape(), b.shape());
    (0..a.rows)
        .map(|i| dot(a.row(i), b.row(i)))
        .fold(f32::INFINITY, f32::min)
}

/// GPU and candle features of a batch and of a batch of one, per-image cosine ≥ 0.9999.
fn check_parity(ctx: &GpuContext, dir: &Path, batch: &[ImageTensor], kinds: &[MatmulKernel]) {
    let model = ClipModel::load(dir).expect("loading the checkpoint on the CPU");
    let want = model.encode_images(batch).expect("candle");
    let want_one = model.encode_images(&batch[..1]).expect("candle, one image");
    for &kind in kinds {
        let mut gpu = ClipVisionGpu::load(ctx, dir).expect("loading the checkpoint on the GPU");
        gpu.set_matmul_kernel(kind);
        let got = gpu.encode_images(batch).expect("GPU batch");
        let c = min_cosine(&got, &want);
        eprintln!(
            "{kind:?}, {} images of {} px: min cosine {c}",
            batch.len(),
            gpu.dims().image_size
        );
        assert!(c >= 0.9999, "{kind:?}: min cosine {c} over the batch");
        let got_one = gpu.encode_images(&batch[..1]).expect("GPU, one image");
        let c1 = min_cosine(&got_one, &want_one);
        assert!(c1 >= 0.9999, "{kind:?}: cosine {c1} for a batch of one");
        // The image does not depend on the rest of its batch.
        assert!(min_cosine(&got_one, &got.select_rows(&[0])) >= 0.99999);
    }
}

#[test]
fn gpu_encoder_matches_candle_on_the_test_checkpoint() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 7).unwrap();
    let batch = tensors(&photos(), TestCheckpointConfig::tiny().image_size);
    check_parity(
        ctx,
        dir.path(),
        &batch,
        &[MatmulKernel::Register, MatmulKernel::Tiled],
    );
    // Half-precision weights go through the same conversion as candle's.
    let dir16 = tempfile::tempdir().unwrap();
    let mut cfg = TestCheckpointConfig::tiny();
    cfg.half_precision = true;
    write_test_checkpoint(dir16.path(), &cfg, 7).unwrap();
    check_parity(ctx, dir16.path(), &batch[..2], &[MatmulKernel::Auto]);
}

#[test]
fn gpu_encoder_matches_candle_on_a_vit_b_32_sized_checkpoint() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = TestCheckpointConfig::vit_b_32();
    write_test_checkpoint(dir.path(), &cfg, 3).unwrap();
    let batch = tensors(&photos()[..2], cfg.image_size);
    check_parity(ctx, dir.path(), &batch, &[MatmulKernel::Auto]);
}

#[test]
fn image_encoder_selection_follows_the_adapter_type() {
    let Some(ctx) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 5).unwrap();
    let model = ClipModel::load(dir.path()).unwrap();
    let cpu = ImageEncoder::select(&model, ClipDevice::Cpu).unwrap();
    assert!(!cpu.encoder.is_gpu());
    let forced = ImageEncoder::select(&model, ClipDevice::Gpu).unwrap();
    assert!(
        forced.encoder.is_gpu(),
        "--clip-device gpu must use the GPU"
    );
    let auto = ImageEncoder::select(&model, ClipDevice::Auto).unwrap();
    assert_eq!(auto.encoder.is_gpu(), !ctx.is_software(), "{:?}", auto.note);
    let note = auto.note.expect("auto says what it chose");
    if ctx.is_software() {
        assert!(note.contains("software"), "{note}");
    }
}

#[test]
fn embedding_a_folder_on_the_gpu_gives_the_cpu_features() {
    let Some(_) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 9).unwrap();
    let model = std::sync::Arc::new(ClipModel::load(dir.path()).unwrap());
    let paths = photos();
    let mut per_device = Vec::new();
    for device in [ClipDevice::Cpu, ClipDevice::Gpu] {
        let cache = tempfile::tempdir().unwrap();
        let e = Embedder::new(
            model.clone(),
            EmbedOptions {
                cache_dir: Some(cache.path().to_path_buf()),
                clip_device: device,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(e.image_encoder().is_gpu(), device == ClipDevice::Gpu);
        let (feats, stats) = e
            .embed_images(&paths, &[0, 1], &NoProgress, &CancelToken::new())
            .unwrap();
        assert!(stats.problems.is_empty(), "{:?}", stats.problems);
        per_device.push(feats);
    }
    for v in 0..2 {
        let c = min_cosine(&per_device[0].per_view[v], &per_device[1].per_view[v]);
        assert!(c >= 0.9999, "view {v}: min cosine {c}");
    }
}
