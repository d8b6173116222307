//! Encoder throughput, for `hegraph bench clip`.
//!
//! Only the encoders are timed: images are decoded and preprocessed once and the tensors reused, so the
//! numbers say what the model costs on this machine, not what the disk or the JPEG decoder costs. Each
//! measurement repeats until it has run for about [`DEFAULT_MIN_SECONDS`] seconds (at least three times)
//! after one untimed warm-up pass, which pays for first-touch allocations and thread-pool start.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::preprocess::{prepare_batch, ImageTensor};
use super::{ClipError, ClipModel};

pub const DEFAULT_MIN_SECONDS: f64 = 2.0;
const MIN_REPEATS: usize = 3;
const MAX_REPEATS: usize = 1000;
const BIG_BATCH: usize = 32;
const PROMPTS: usize = 1000;

/// Results of [`bench_clip`].
#[derive(Clone, Debug, PartialEq)]
pub struct ClipBench {
    pub banner: String,
    pub threads: usize,
    pub image_size: usize,
    pub images_per_s_batch1: f64,
    pub images_per_s_batch32: f64,
    pub ms_per_1000_prompts: f64,
}

impl fmt::Display for ClipBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.banner)?;
        writeln!(
            f,
            "CPU threads: {}, input {} px (encoder only, preprocessed tensors reused)",
            self.threads, self.image_size
        )?;
        writeln!(f, "images/s, batch 1:   {:10.1}", self.images_per_s_batch1)?;
        writeln!(
            f,
            "images/s, batch {BIG_BATCH}:  {:10.1}",
            self.images_per_s_batch32
        )?;
        write!(f, "ms per 1,000 prompts: {:9.1}", self.ms_per_1000_prompts)
    }
}

/// Runs `f` once untimed, then repeatedly; returns the mean seconds per call.
fn time<F: FnMut() -> Result<(), ClipError>>(min_seconds: f64, mut f: F) -> Result<f64, ClipError> {
    f()?;
    let start = Instant::now();
    let min = Duration::from_secs_f64(min_seconds.max(0.0));
    let mut n = 0;
    while n < MIN_REPEATS || (start.elapsed() < min && n < MAX_REPEATS) {
        f()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

/// Measures images/s at batch 1 and batch 32 and milliseconds per 1,000 prompts. `photos` are cycled to fill
/// a batch; files that fail to decode are skipped, and at least one must decode.
pub fn bench_clip(model: &ClipModel, photos: &[PathBuf]) -> Result<ClipBench, ClipError> {
    bench_clip_with(model, photos, DEFAULT_MIN_SECONDS)
}

/// [`bench_clip`] with each measurement running for at least `min_seconds` (0 for a quick smoke run).
pub fn bench_clip_with(
    model: &ClipModel,
    photos: &[PathBuf],
    min_seconds: f64,
) -> Result<ClipBench, ClipError> {
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
    let batch: Vec<ImageTensor> = tensors.iter().cycle().take(BIG_BATCH).cloned().collect();
    let one = &batch[..1];

    let per_single = time(min_seconds, || model.encode_images(one).map(drop))?;
    let per_batch = time(min_seconds, || model.encode_images(&batch).map(drop))?;

    let subjects = [
        "cat",
        "dog",
        "rocket",
        "cup of coffee",
        "astronaut",
        "horse",
        "camera",
        "flower",
    ];
    let prompts: Vec<String> = (0..PROMPTS)
        .map(|i| format!("a photo of a {}, number {i}.", subjects[i % subjects.len()]))
        .collect();
    let per_prompts = time(min_seconds, || model.encode_texts(&prompts).map(drop))?;

    Ok(ClipBench {
        banner: model.info().banner(),
        threads: rayon::current_num_threads(),
        image_size: size,
        images_per_s_batch1: 1.0 / per_single,
        images_per_s_batch32: BIG_BATCH as f64 / per_batch,
        ms_per_1000_prompts: per_prompts * 1000.0 * (1000.0 / PROMPTS as f64),
    })
}
