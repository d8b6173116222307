//! Image-encoder throughput on the GPU next to candle on the CPU, measured in the same run
//! (`hegraph bench clip --clip-device gpu`), with the agreement of their features.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::preprocess::{prepare_batch, ImageTensor};
use super::{ClipError, ClipModel};
use crate::gpu::clip_vision::ClipVisionGpu;
use crate::linalg::dot;

#[derive(Clone, Debug, PartialEq)]
pub struct DeviceBench {
    pub adapter: String,
    pub batch: usize,
    pub cpu_batch1: f64,
    pub cpu_batch_n: f64,
    pub gpu_batch1: f64,
    pub gpu_batch_n: f64,
    /// The smallest cosine between a GPU feature and the CPU's for the same image (the big batch).
    pub min_cosine: f32,
}

impl fmt::Display for DeviceBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "image encoder, GPU ({}) against candle on the CPU ({} threads), same run:",
            self.adapter,
            rayon::current_num_threads()
        )?;
        let big = format!("batch {}:", self.batch);
        for (label, cpu, gpu) in [
            ("batch 1:", self.cpu_batch1, self.gpu_batch1),
            (big.as_str(), self.cpu_batch_n, self.gpu_batch_n),
        ] {
            writeln!(
                f,
                "  {label:9} GPU {gpu:9.3} img/s, CPU {cpu:9.3} img/s, GPU/CPU {:7.3}x",
                gpu / cpu.max(f64::MIN_POSITIVE)
            )?;
        }
        write!(
            f,
            "  features: min cosine GPU vs CPU over the batch {:.6}",
            self.min_cosine
        )
    }
}

/// Runs `f` once untimed, then until `min_seconds` have passed (at least once); mean seconds per call. One
/// timed call is enough where a call takes minutes (a ViT-B/32 batch on a software adapter).
fn time<F: FnMut() -> Result<(), ClipError>>(min_seconds: f64, mut f: F) -> Result<f64, ClipError> {
    f()?;
    let start = Instant::now();
    let min = Duration::from_secs_f64(min_seconds.max(0.0));
    let mut n = 0u32;
    while n == 0 || start.elapsed() < min {
        f()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(n))
}

/// Times both encoders at batch 1 and `batch` on `photos` (cycled to fill a batch), each measurement running
/// for at least `min_seconds` after a warm-up pass.
pub fn bench_image_devices(
    model: &ClipModel,
    gpu: &ClipVisionGpu,
    photos: &[PathBuf],
    batch: usize,
    min_seconds: f64,
) -> Result<DeviceBench, ClipError> {
    let big = batch.max(1);
    let size = model.info().image_size;
    let mut first_error = None;
    let mut tensors: Vec<ImageTensor> = Vec::new();
    for r in prepare_batch(photos, size) {
        match r {
            Ok(t) => tensors.push(t),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if tensors.is_empty() {
        return Err(first_error.unwrap_or_else(|| {
            ClipError::Input("the CLIP benchmark needs at least one photo".into())
        }));
    }
    let batch: Vec<ImageTensor> = tensors.iter().cycle().take(big).cloned().collect();
    let one = &batch[..1];
    let cpu1 = time(min_seconds, || model.encode_images(one).map(drop))?;
    let gpu1 = time(min_seconds, || gpu.encode_images(one).map(drop))?;
    let cpu_n = time(min_seconds, || model.encode_images(&batch).map(drop))?;
    let gpu_n = time(min_seconds, || gpu.encode_images(&batch).map(drop))?;
    let a = model.encode_images(&batch)?;
    let b = gpu.encode_images(&batch)?;
    let min_cosine = (0..batch.len())
        .map(|i| dot(a.row(i), b.row(i)))
        .fold(f32::INFINITY, f32::min);
    Ok(DeviceBench {
        adapter: gpu.context().describe(),
        batch: big,
        cpu_batch1: 1.0 / cpu1,
        cpu_batch_n: big as f64 / cpu_n,
        gpu_batch1: 1.0 / gpu1,
        gpu_batch_n: big as f64 / gpu_n,
        min_cosine,
    })
}
