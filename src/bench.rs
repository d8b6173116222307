//! `hegraph bench clip|train|kernels`: benchmarks that print a ratio against a baseline measured in the same
//! run (batch 1 for CLIP, the CPU backend for training, the CPU matmul for kernels), so figures from different
//! machines can be compared by their ratios. `BENCHMARKS.md` keeps the latest figures with their commands.

use std::path::PathBuf;
use std::time::Instant;

use crate::adapter::bench::{bench_train, BenchResult};
use crate::adapter::{AdapterError, BackendChoice, CandleFactory};
use crate::clip::{self, ClipError, ClipModel};
use crate::gpu::{self, BackendRequest, ComputeBackend, GpuError};
use crate::linalg::Mat;
use crate::rng::Rng;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Clip(#[from] ClipError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Extract(#[from] crate::extract::ExtractError),
    #[error("no benchmark images found in {0}")]
    NoImages(PathBuf),
}

fn demo_images() -> Result<Vec<PathBuf>, BenchError> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/images"));
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|_| BenchError::NoImages(dir.clone()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| crate::data::is_image_path(p))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(BenchError::NoImages(dir));
    }
    Ok(v)
}

/// What `hegraph bench clip` times and where its results go.
#[derive(Clone, Debug)]
pub struct ClipBenchOptions {
    /// Time this checkpoint (a random-weight one with ViT-B/32's sizes is written there when it holds
    /// none) instead of the local CLIP weights or the default bench checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// Least seconds per measurement (default [`clip::bench::DEFAULT_MIN_SECONDS`]).
    pub seconds: Option<f64>,
    /// Also time candle-transformers' CLIP (the previous path) and print the smallest cosine to it.
    pub reference: bool,
    /// Write the results as JSON here (`benches/clip_peer.py` reads it).
    pub json: Option<PathBuf>,
    /// Also time the GPU image encoder next to the CPU (`auto`: a hardware adapter only).
    pub device: clip::ClipDevice,
    /// The large batch of the GPU-against-CPU comparison.
    pub gpu_batch: usize,
}

/// A random-weight checkpoint with ViT-B/32's exact sizes in `dir`, written when missing.
fn bench_checkpoint(dir: &std::path::Path) -> Result<PathBuf, BenchError> {
    if !dir.join("model.safetensors").exists() {
        println!(
            "writing a random-weight checkpoint with ViT-B/32's sizes: {}",
            dir.display()
        );
        clip::test_checkpoint::write_test_checkpoint(
            dir,
            &clip::test_checkpoint::TestCheckpointConfig::vit_b_32(),
            0,
        )?;
    }
    Ok(dir.to_path_buf())
}

/// CLIP image encoding at batch 1 and 32 and text encoding per 1,000 prompts. Uses real weights when they
/// are found locally; otherwise a random-weight checkpoint with ViT-B/32's exact sizes, which times the same
/// arithmetic (and says so). With a device other than `cpu`, the GPU image encoder is timed too, next to
/// the CPU in the same run (`auto` skips it when the only adapter is a software one).
pub fn bench_clip_cli(opts: &ClipBenchOptions) -> Result<(), BenchError> {
    let dir = match &opts.checkpoint {
        Some(d) => bench_checkpoint(d)?,
        None => match clip::hub::resolve_model_dir(None, false) {
            Ok(d) => d,
            Err(e) => {
                let base = dirs::cache_dir().unwrap_or_else(std::env::temp_dir);
                println!("no local CLIP weights ({e});");
                println!("timing a random-weight checkpoint with ViT-B/32's sizes instead");
                bench_checkpoint(&base.join("hegraph/models/hegraph-bench-vit-b-32"))?
            }
        },
    };
    let model = ClipModel::load(&dir)?;
    println!("model: {}", model.info().banner());
    let photos = demo_images()?;
    let seconds = opts.seconds.unwrap_or(clip::bench::DEFAULT_MIN_SECONDS);
    let inputs = clip::bench::BenchInputs::new(&photos, model.info().image_size)?;
    let r = clip::bench::bench_clip_on(&model, &inputs, seconds)?;
    println!("{r}");
    let reference = if opts.reference {
        let reference = clip::reference::ReferenceClip::load(&dir)?;
        let c = clip::bench::compare_with_reference(&model, &reference, &inputs, seconds)?;
        println!("{c}");
        println!(
            "speed-up over it: batch 1 {:.2}x, batch 32 {:.2}x, prompts {:.2}x",
            r.images_per_s_batch1 / c.images_per_s_batch1,
            r.images_per_s_batch32 / c.images_per_s_batch32,
            c.ms_per_1000_prompts / r.ms_per_1000_prompts
        );
        Some(c)
    } else {
        None
    };
    if opts.device != clip::ClipDevice::Cpu {
        let selected = clip::ImageEncoder::select(&model, opts.device)?;
        if let Some(n) = &selected.note {
            println!("{n}");
        }
        if let clip::ImageEncoder::Gpu(g) = &selected.encoder {
            let d = clip::device_bench::bench_image_devices(
                &model,
                g,
                &photos,
                opts.gpu_batch,
                seconds,
            )?;
            println!("{d}");
        }
    }
    if let Some(path) = &opts.json {
        let v = serde_json::json!({
            "images_per_s_batch1": r.images_per_s_batch1,
            "images_per_s_batch32": r.images_per_s_batch32,
            "ms_per_1000_prompts": r.ms_per_1000_prompts,
            "threads": r.threads,
            "reference": reference,
        });
        std::fs::write(path, v.to_string()).map_err(|source| ClipError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// What `hegraph bench extract` times.
#[derive(Clone, Debug)]
pub struct ExtractBenchOptions {
    /// Photos to upscale (default `../shared/data/photos` beside the source tree).
    pub photos: Option<PathBuf>,
    /// Large JPEGs to make and embed.
    pub count: usize,
    pub width: u32,
    pub height: u32,
    /// Rounds of (encoder only, end to end); each one's best is kept.
    pub rounds: usize,
    /// The checkpoint, as for `bench clip` (default: the random ViT-B/32-sized bench checkpoint).
    pub checkpoint: Option<PathBuf>,
}

impl Default for ExtractBenchOptions {
    fn default() -> Self {
        Self {
            photos: None,
            count: 96,
            width: 4000,
            height: 3000,
            rounds: 2,
            checkpoint: None,
        }
    }
}

/// Upscales `sources` (cycled) to `count` JPEGs of `w×h` in `dir`. One pixel per file carries its index,
/// so no two files share a content hash (the feature cache would embed duplicates once).
fn make_large_jpegs(
    sources: &[PathBuf],
    dir: &std::path::Path,
    count: usize,
    (w, h): (u32, u32),
) -> Result<Vec<PathBuf>, BenchError> {
    use image::ImageEncoder;
    use rayon::prelude::*;
    let originals: Vec<image::RgbImage> = sources
        .iter()
        .filter_map(|p| clip::preprocess::load_rgb(p).ok())
        .map(|img| image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle))
        .collect();
    if originals.is_empty() {
        return Err(BenchError::NoImages(
            sources.first().cloned().unwrap_or_default(),
        ));
    }
    (0..count)
        .into_par_iter()
        .map(|i| {
            let mut img = originals[i % originals.len()].clone();
            let tag = i.to_le_bytes();
            img.put_pixel(0, 0, image::Rgb([tag[0], tag[1], 255]));
            let path = dir.join(format!("large_{i:04}.jpg"));
            let io = |e: std::io::Error| ClipError::Io {
                path: path.clone(),
                source: e,
            };
            let file = std::fs::File::create(&path).map_err(io)?;
            image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 90)
                .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
                .map_err(|e| ClipError::Write {
                    path: path.clone(),
                    msg: e.to_string(),
                })?;
            Ok(path)
        })
        .collect()
}

/// End-to-end `extract` throughput (hash, decode with DCT scaling, centre crop, encode, cache) on large
/// JPEGs made from real photos, against the encoder alone on the same images' tensors, in alternating
/// rounds; prints each round and the ratio of the best rounds.
pub fn bench_extract_cli(opts: &ExtractBenchOptions) -> Result<(), BenchError> {
    use crate::extract::{EmbedOptions, Embedder};
    use crate::progress::{CancelToken, NoProgress};
    let photos_dir = opts.photos.clone().unwrap_or_else(|| {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/photos"
        ))
    });
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&photos_dir)
        .map_err(|_| BenchError::NoImages(photos_dir.clone()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| crate::data::is_image_path(p))
        .collect();
    sources.sort();
    let dir = match &opts.checkpoint {
        Some(d) => bench_checkpoint(d)?,
        None => {
            let base = dirs::cache_dir().unwrap_or_else(std::env::temp_dir);
            bench_checkpoint(&base.join("hegraph/models/hegraph-bench-vit-b-32"))?
        }
    };
    let model = std::sync::Arc::new(ClipModel::load(&dir)?);
    println!("model: {}", model.info().banner());
    let tmp = tempfile::tempdir().map_err(|source| ClipError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let images_dir = tmp.path().join("images");
    std::fs::create_dir_all(&images_dir).map_err(|source| ClipError::Io {
        path: images_dir.clone(),
        source,
    })?;
    let t = Instant::now();
    let paths = make_large_jpegs(&sources, &images_dir, opts.count, (opts.width, opts.height))?;
    let bytes: u64 = paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "made {} JPEGs of {}x{} from {} photos in {} ({:.1} MB on average) in {:.1} s",
        paths.len(),
        opts.width,
        opts.height,
        sources.len(),
        photos_dir.display(),
        bytes as f64 / paths.len().max(1) as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let size = model.info().image_size;
    let batch = EmbedOptions::default().batch_size;
    let tensors: Vec<clip::ImageTensor> =
        clip::preprocess::prepare_batch(&paths[..batch.min(paths.len())], size)
            .into_iter()
            .collect::<Result<_, _>>()?;
    let (mut best_encoder, mut best_e2e, mut best_decode) = (0.0f64, 0.0f64, 0.0f64);
    for round in 1..=opts.rounds.max(1) {
        // Decoding and preprocessing only (what end to end adds to the encoder), batch by batch as extract.
        let t = Instant::now();
        for chunk in paths.chunks(batch) {
            for r in clip::preprocess::prepare_batch(chunk, size) {
                r?;
            }
        }
        let decode = paths.len() as f64 / t.elapsed().as_secs_f64();
        // Encoder only: the same batches, tensors already made.
        let t = Instant::now();
        let mut left = paths.len();
        while left > 0 {
            let n = left.min(tensors.len());
            model.encode_images(&tensors[..n])?;
            left -= n;
        }
        let encoder = paths.len() as f64 / t.elapsed().as_secs_f64();
        // End to end, into an empty cache each round.
        let cache = tmp.path().join(format!("cache{round}"));
        let embedder = Embedder::new(
            model.clone(),
            EmbedOptions {
                cache_dir: Some(cache),
                ..EmbedOptions::default()
            },
        )?;
        let t = Instant::now();
        let (_, stats) = embedder.embed_images(&paths, &[0], &NoProgress, &CancelToken::new())?;
        let e2e = paths.len() as f64 / t.elapsed().as_secs_f64();
        if let Some(p) = stats.problems.first() {
            return Err(ClipError::Input(format!("{}: {}", p.path.display(), p.message)).into());
        }
        println!(
            "round {round}: encoder only {encoder:.2} img/s, decode and preprocess only {decode:.2} \
             img/s, end to end {e2e:.2} img/s ({:.2}x)",
            e2e / encoder
        );
        best_decode = best_decode.max(decode);
        best_encoder = best_encoder.max(encoder);
        best_e2e = best_e2e.max(e2e);
    }
    println!(
        "best rounds: encoder only {best_encoder:.2} img/s, decode and preprocess only {best_decode:.2} \
         img/s, end to end {best_e2e:.2} img/s: {:.2}x (threads: {})",
        best_e2e / best_encoder,
        rayon::current_num_threads()
    );
    bench_thumbnails(&paths[..paths.len().min(16)], opts.rounds.max(1))
}

/// The GUI's 256-pixel thumbnails of the same large JPEGs, one thread: the reduced-scale decode against what
/// it replaced (the whole file decoded by the image crate, then resized), best of `rounds`.
fn bench_thumbnails(paths: &[PathBuf], rounds: usize) -> Result<(), BenchError> {
    use crate::app::thumbs::{decode_thumbnail, THUMB_SIDE};
    let (mut reduced, mut full) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..rounds {
        let t = Instant::now();
        for p in paths {
            decode_thumbnail(p, THUMB_SIDE)
                .map_err(|msg| ClipError::Input(format!("{}: {msg}", p.display())))?;
        }
        reduced = reduced.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for p in paths {
            let img = image::open(p).map_err(|e| ClipError::Image {
                file: p.display().to_string(),
                msg: e.to_string(),
            })?;
            std::hint::black_box(
                img.resize(
                    THUMB_SIDE,
                    THUMB_SIDE,
                    image::imageops::FilterType::Triangle,
                )
                .to_rgba8(),
            );
        }
        full = full.min(t.elapsed().as_secs_f64());
    }
    let per = |s: f64| s * 1e3 / paths.len().max(1) as f64;
    println!(
        "{THUMB_SIDE}-px thumbnails, one thread: reduced-scale decode {:.1} ms per image, full decode then \
         resize {:.1} ms: {:.2}x",
        per(reduced),
        per(full),
        full / reduced
    );
    Ok(())
}

fn gpu_backend() -> Option<ComputeBackend> {
    let forced = std::env::var("HEGRAPH_BACKEND").is_ok_and(|v| v.eq_ignore_ascii_case("wgpu"));
    let req = if forced {
        BackendRequest::Wgpu
    } else {
        BackendRequest::Auto
    };
    match gpu::select_backend(req) {
        Ok(b) if b.is_gpu() => Some(b),
        Ok(b) => {
            println!(
                "wgpu backend not timed: {} (HEGRAPH_BACKEND=wgpu forces it)",
                b.describe()
            );
            None
        }
        Err(e) => {
            println!("wgpu backend not timed: {e}");
            None
        }
    }
}

/// ms per step, total time and the loss (first step → last step read) for each class count (`hegraph bench
/// train` uses C ∈ {10, 100, 1000}), K = 16, D = 512, on the CPU and (where there is a GPU) wgpu backends, and
/// the interactive retrain (50 classes × 16 shots). The task is built from the real CLIP features of
/// [`crate::adapter::bench::REAL_FEATURES`] (or the file `HEGRAPH_BENCH_FEATURES` names) when it can be read,
/// else from synthetic features with their statistics; which one is printed.
pub fn bench_train_cli(classes: &[usize], epochs: Option<usize>) -> Result<(), BenchError> {
    use crate::adapter::bench::{bench_retrain_adopted, bench_task, BenchTask, REAL_FEATURES};
    use crate::features::FeatureSet;

    let gpu = gpu_backend();
    let (shots, dim, views) = (16, 512, 10);
    let file = std::env::var_os("HEGRAPH_BENCH_FEATURES")
        .map_or_else(|| PathBuf::from(REAL_FEATURES), PathBuf::from);
    let real = if file.exists() {
        match FeatureSet::load(&file) {
            Ok(fs) => Some(fs),
            Err(e) => {
                println!("real features not used: {e}");
                None
            }
        }
    } else {
        println!(
            "real features not used: {} is not there (HEGRAPH_BENCH_FEATURES names another file)",
            file.display()
        );
        None
    };
    let task = |c: usize| -> Result<BenchTask, BenchError> {
        let real = real.as_ref().map(|fs| (file.as_path(), fs));
        Ok(bench_task(c, shots, dim, views, 7, real)?)
    };
    let run = |t: &BenchTask, choice: BackendChoice| -> Result<BenchResult, BenchError> {
        // The interactive retrain is timed in full, not projected, and so is every GPU run: a GPU that sat
        // idle while the CPU row ran starts at low clocks, so its first 40 steps are not its rate.
        let full =
            t.task.classes.len() == RETRAIN_CLASSES || matches!(choice, BackendChoice::Custom(_));
        Ok(bench_train(&t.task, epochs, choice, full)?)
    };
    let epochs_text = epochs.map_or("default epochs".to_string(), |e| format!("{e} epochs"));
    println!(
        "HeGraphAdapter training, K = {shots}, D = {dim}, {views} views per image, {epochs_text}"
    );
    let retrain_task = task(RETRAIN_CLASSES)?;
    println!("features: {}", retrain_task.source);
    // One untimed training per backend first: a GPU idles at low clocks and takes a moment to come up, and
    // the first run on either backend pays for thread pools and pipeline caches.
    let warm = task(10)?;
    run(&warm, BackendChoice::Cpu)?;
    if let Some(g) = &gpu {
        run(&warm, g.choice())?;
    }
    let mut retrain: Option<(BenchResult, Option<BenchResult>)> = None;
    for &c in classes {
        let t = task(c)?;
        let cpu = run(&t, BackendChoice::Cpu)?;
        println!("  {cpu}");
        let mut gpu_result = None;
        if let Some(g) = &gpu {
            let w = run(&t, g.choice())?;
            println!("  {w}");
            println!(
                "  → wgpu/CPU speed-up: {:.2}× per step, {:.2}× in total",
                cpu.ms_per_step / w.ms_per_step.max(1e-9),
                cpu.total_ms / w.total_ms.max(1e-9)
            );
            gpu_result = Some(w);
        }
        if c == RETRAIN_CLASSES {
            retrain = Some((cpu, gpu_result));
        }
    }
    let (cpu, wgpu) = match retrain {
        Some(r) => r,
        None => {
            let cpu = run(&retrain_task, BackendChoice::Cpu)?;
            let w = gpu
                .as_ref()
                .map(|g| run(&retrain_task, g.choice()))
                .transpose()?;
            (cpu, w)
        }
    };
    // The same retrain with candle's autodiff, the baseline the hand-written CPU step is measured against.
    let candle = run(&retrain_task, BackendChoice::Custom(&CandleFactory))?;
    println!("  {candle}");
    println!(
        "retrain, {RETRAIN_CLASSES} classes × {shots} shots, CPU: {:.0} ms ({:.2}× faster than candle autodiff, {:.0} ms)",
        cpu.total_ms,
        candle.total_ms / cpu.total_ms.max(1e-9),
        candle.total_ms
    );
    if let Some(w) = wgpu {
        println!(
            "retrain, {RETRAIN_CLASSES} classes × {shots} shots, wgpu: {:.0} ms ({:.2}× the CPU's speed)",
            w.total_ms,
            cpu.total_ms / w.total_ms.max(1e-9)
        );
    }
    let adopted = bench_retrain_adopted(&retrain_task.task)?;
    println!(
        "retrain, {RETRAIN_CLASSES} classes × {shots} shots, the adopted reading (graph untrained, (α, β) by \
         leave-one-out, cache keys trained): {adopted:.0} ms"
    );
    Ok(())
}

/// The transductive refinement on synthetic CLIP-like features: `images` unlabelled images, `classes`
/// classes, 16 labelled images per class, D = 512, timed in full (three runs, the fastest kept); the same
/// algorithm in numpy (`benches/transduce_numpy.py`, same sizes, same thread count) in the same run when
/// python3 with numpy is installed, and the ratio.
pub fn bench_transduce_cli(images: usize, classes: usize) -> Result<(), BenchError> {
    use crate::adapter::{transduce, TransductionParams};
    let d = 512;
    let task =
        crate::adapter::bench::synthetic_task(classes, 16 + images.div_ceil(classes), d, 0, 11);
    let by = task.train.indices_by_class(classes);
    let support_idx: Vec<usize> = by.iter().flat_map(|v| v[..16].to_vec()).collect();
    let mut pool_idx: Vec<usize> = by.iter().flat_map(|v| v[16..].to_vec()).collect();
    pool_idx.truncate(images);
    let support = task.train.subset(&support_idx);
    let pool = task.train.features.select_rows(&pool_idx);
    // Zero-shot-like predictions from the (noisy) text, as a weak prior.
    let logits = pool
        .normalized_rows()
        .matmul_t(&task.text.normalized_rows());
    let mut prior = Mat::zeros(logits.rows, logits.cols);
    for r in 0..logits.rows {
        let row: Vec<f32> = logits.row(r).iter().map(|x| 100.0 * x).collect();
        prior
            .row_mut(r)
            .copy_from_slice(&crate::linalg::softmax(&row));
    }
    let params = TransductionParams::default();
    let threads = rayon::current_num_threads();
    println!(
        "transductive refinement: {} unlabelled images, {classes} classes, {} labelled, D = {d}, {} rounds, {threads} threads",
        pool.rows,
        support.len(),
        params.iterations
    );
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        transduce(&pool, &prior, &support.features, &support.labels, &params)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!("  hegraph (Rust, gemm): {:.3} s", best);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/transduce_numpy.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            &pool.rows.to_string(),
            &classes.to_string(),
            &support.len().to_string(),
            &d.to_string(),
            &params.iterations.to_string(),
        ])
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            match text.trim().parse::<f64>() {
                Ok(peer) => println!(
                    "  numpy (same algorithm): {peer:.3} s → hegraph is {:.2}× numpy",
                    peer / best.max(1e-9)
                ),
                Err(_) => println!("  numpy peer printed {text:?}"),
            }
        }
        Ok(o) => println!(
            "  numpy peer not run: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("failed")
        ),
        Err(e) => println!("  numpy peer not run: {e}"),
    }
    Ok(())
}

/// The interactive retrain the issue sets a goal for: 50 classes × 16 shots.
const RETRAIN_CLASSES: usize = 50;

/// The WGSL matmul against the CPU matmul on the shapes the adapter uses, and a square 2048³ that shows what
/// the device can do when the work is large enough to fill it.
pub fn bench_kernels_cli() -> Result<(), BenchError> {
    let ctx = gpu::GpuContext::new_headless(&gpu::GpuOptions::default())?;
    println!("adapter: {}", ctx.describe());
    let kernels = gpu::Kernels::new(&ctx)?;
    let mut rng = Rng::new(1);
    for &(m, k, n) in &[
        (256, 512, 512),
        (1000, 512, 512),
        (256, 512, 16000),
        (2048, 2048, 2048),
    ] {
        let a = Mat::from_vec(m, k, rng.normal_vec(m * k));
        let b = Mat::from_vec(k, n, rng.normal_vec(k * n));
        let _ = a.matmul(&b);
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(a.matmul(&b));
        }
        let cpu_s = start.elapsed().as_secs_f64() / reps as f64;
        let g = gpu::bench_matmul(&kernels, m, k, n, reps)?;
        println!(
            "matmul {m}×{k}·{k}×{n}: CPU {:.2} ms ({:.1} GFLOP/s), wgpu {:?} {:.2} ms ({:.1} GFLOP/s) → {:.2}× the CPU",
            cpu_s * 1e3,
            2.0 * (m * k * n) as f64 / cpu_s / 1e9,
            g.kernel,
            g.seconds * 1e3,
            g.gflops,
            cpu_s / g.seconds.max(1e-12)
        );
    }
    Ok(())
}

/// One wgpu training step with each dispatch timed on the GPU (timestamp queries), grouped by kernel and
/// shape, for a synthetic task of `classes` × 16 shots × 10 views, D = 512, batch 256: where a step's time
/// goes. The wall time of a whole step (submission to loss readback) is printed beside the GPU total, so the
/// host-side cost of recording shows too.
pub fn bench_step_cli(classes: usize) -> Result<(), BenchError> {
    use crate::adapter::bench::synthetic_task;
    use crate::adapter::HeGraphBackend;
    use crate::adapter::{epoch_batches, stack_queries, FrozenInputs, HeGraphState, TrainParams};
    use crate::graph::{HeteroGraph, LabelledViewsRef};

    let ctx = std::sync::Arc::new(gpu::GpuContext::new_headless(&gpu::GpuOptions::default())?);
    println!("adapter: {}", ctx.describe());
    let (shots, dim, views) = (16, 512, 10);
    let task = synthetic_task(classes, shots, dim, views, 7);
    // The graph layers' step is what is timed: the SPEC's reading trains them.
    let params = TrainParams::spec();
    let labelled = LabelledViewsRef::from_split(&task.train);
    let graph = HeteroGraph::build(
        &task.classes,
        &task.text,
        Some(&task.text_neg),
        &labelled,
        &params.graph_options(),
    )
    .map_err(AdapterError::from)?;
    let (queries, a) = stack_queries(&task.train);
    let frozen = FrozenInputs::new(&graph)?;
    let batches = epoch_batches(params.seed, 0, &task.train.labels, a, params.batch_size);
    let Some(batch) = batches.first() else {
        return Err(AdapterError::Input("the synthetic task has no batch".into()).into());
    };
    println!(
        "one step: {classes} classes × {shots} shots × {views} views, D = {dim}, batch {}",
        batch.rows.len()
    );
    // Each matmul shader on a real GPU (the choice `Auto` makes there is the first).
    let kinds: &[gpu::MatmulKernel] = if ctx.is_software() {
        &[gpu::MatmulKernel::Auto]
    } else {
        &[
            gpu::MatmulKernel::Auto,
            gpu::MatmulKernel::Tiled,
            gpu::MatmulKernel::Register,
        ]
    };
    for &kind in kinds {
        let mut kernels = gpu::Kernels::new(&ctx)?;
        kernels.set_matmul_kernel(kind);
        println!("matmul shader: {kind:?}");
        let state = HeGraphState::init(dim, true, params.seed);
        let mut be = gpu::adapter::GpuHeGraph::new(
            std::sync::Arc::new(kernels),
            &frozen,
            &queries,
            &params,
            state,
        )?;
        // A GPU idles at low clocks: half a second of steps brings it up before anything is timed.
        let warm = Instant::now();
        while warm.elapsed().as_secs_f64() < 0.5 {
            be.step(&batch.rows, &batch.labels, params.lr, true)?;
        }
        let reps = 10;
        let start = Instant::now();
        for _ in 0..reps {
            be.step(&batch.rows, &batch.labels, params.lr, true)?;
        }
        let wall_ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        // As training runs: a different batch each step and no readback until the last.
        let n = batches.len().min(40);
        let start = Instant::now();
        for (i, bt) in batches.iter().take(n).enumerate() {
            be.step(&bt.rows, &bt.labels, params.lr, i + 1 == n)?;
        }
        let piped_ms = start.elapsed().as_secs_f64() * 1e3 / n as f64;
        let start = Instant::now();
        be.state()?;
        let state_ms = start.elapsed().as_secs_f64() * 1e3;
        println!(
            "pipelined: {piped_ms:.2} ms per step over {n} batches with one readback; a state snapshot {state_ms:.1} ms"
        );
        let Some(timings) = be.profile_step(&batch.rows, &batch.labels, params.lr)? else {
            println!(
                "wall {wall_ms:.2} ms per step (with a loss readback); this device has no timestamp queries"
            );
            continue;
        };
        print_profile(wall_ms, &timings);
    }
    Ok(())
}

/// Prints per-dispatch GPU timings grouped by label, largest first.
fn print_profile(wall_ms: f64, timings: &[(String, f64)]) {
    let gpu_ms: f64 = timings.iter().map(|t| t.1).sum();
    let mut by_label: Vec<(String, usize, f64)> = Vec::new();
    for (label, ms) in timings {
        match by_label.iter_mut().find(|e| &e.0 == label) {
            Some(e) => {
                e.1 += 1;
                e.2 += ms;
            }
            None => by_label.push((label.clone(), 1, *ms)),
        }
    }
    by_label.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!(
        "wall {wall_ms:.2} ms per step (with a loss readback); {} dispatches, {gpu_ms:.2} ms of GPU time inside them",
        timings.len()
    );
    for (label, count, ms) in &by_label {
        println!(
            "  {ms:8.3} ms {:5.1}%  {count:3}×  {label}",
            100.0 * ms / gpu_ms.max(1e-12)
        );
    }
}
