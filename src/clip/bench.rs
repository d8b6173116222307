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
use super::reference::ReferenceClip;
use super::{ClipError, ClipModel};

pub const DEFAULT_MIN_SECONDS: f64 = 2.0;
const MIN_REPEATS: usize = 3;
const MAX_REPEATS: usize = 1000;
const BIG_BATCH: usize = 32;
const PROMPTS: usize = 1000;

/// Results of [`bench_clip`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
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

/// The inputs every encoder is timed on: `photos` cycled to a batch of 32 (files that fail to decode are
/// skipped; at least one must decode) and 1,000 prompts.
pub struct BenchInputs {
    pub batch: Vec<ImageTensor>,
    pub prompts: Vec<String>,
}

impl BenchInputs {
    pub fn new(photos: &[PathBuf], image_size: usize) -> Result<Self, ClipError> {
        let mut first_error = None;
        let mut tensors: Vec<ImageTensor> = Vec::new();
        for r in prepare_batch(photos, image_size) {
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
        Ok(Self { batch, prompts })
    }
}

/// [`bench_clip`] with each measurement running for at least `min_seconds` (0 for a quick smoke run).
pub fn bench_clip_with(
    model: &ClipModel,
    photos: &[PathBuf],
    min_seconds: f64,
) -> Result<ClipBench, ClipError> {
    let inputs = BenchInputs::new(photos, model.info().image_size)?;
    bench_clip_on(model, &inputs, min_seconds)
}

/// [`bench_clip_with`] on inputs already prepared.
pub fn bench_clip_on(
    model: &ClipModel,
    inputs: &BenchInputs,
    min_seconds: f64,
) -> Result<ClipBench, ClipError> {
    let batch = &inputs.batch;
    let one = &batch[..1];
    let per_batch = time(min_seconds, || model.encode_images(batch).map(drop))?;
    let per_single = time(min_seconds, || model.encode_images(one).map(drop))?;
    let per_prompts = time(min_seconds, || {
        model.encode_texts(&inputs.prompts).map(drop)
    })?;
    Ok(ClipBench {
        banner: model.info().banner(),
        threads: rayon::current_num_threads(),
        image_size: model.info().image_size,
        images_per_s_batch1: 1.0 / per_single,
        images_per_s_batch32: batch.len() as f64 / per_batch,
        ms_per_1000_prompts: per_prompts * 1000.0 * (1000.0 / inputs.prompts.len() as f64),
    })
}

/// hegraph's encoders against candle-transformers' CLIP run as before (the reference) on the same inputs:
/// the smallest cosine between their features, and the reference's rates.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReferenceComparison {
    pub min_cosine_images: f32,
    pub min_cosine_prompts: f32,
    pub images_per_s_batch1: f64,
    pub images_per_s_batch32: f64,
    pub ms_per_1000_prompts: f64,
}

impl fmt::Display for ReferenceComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "candle-transformers CLIP (the previous path), same inputs:"
        )?;
        writeln!(f, "images/s, batch 1:   {:10.1}", self.images_per_s_batch1)?;
        writeln!(
            f,
            "images/s, batch {BIG_BATCH}:  {:10.1}",
            self.images_per_s_batch32
        )?;
        writeln!(f, "ms per 1,000 prompts: {:9.1}", self.ms_per_1000_prompts)?;
        write!(
            f,
            "smallest cosine to it: images {:.7}, prompts {:.7}",
            self.min_cosine_images, self.min_cosine_prompts
        )
    }
}

fn min_row_cosine(a: &crate::linalg::Mat, b: &crate::linalg::Mat) -> f32 {
    (0..a.rows.min(b.rows))
        .map(|r| crate::linalg::dot(a.row(r), b.row(r)))
        .fold(f32::INFINITY, f32::min)
}

/// Times the reference on `inputs` (prompts in chunks of 256 padded to the chunk's longest, as hegraph
/// ran them before) and compares its features with `model`'s.
pub fn compare_with_reference(
    model: &ClipModel,
    reference: &ReferenceClip,
    inputs: &BenchInputs,
    min_seconds: f64,
) -> Result<ReferenceComparison, ClipError> {
    let batch = &inputs.batch;
    let ids: Vec<Vec<u32>> = inputs
        .prompts
        .iter()
        .map(|p| model.tokenize(p))
        .collect::<Result<_, _>>()?;
    let encode_prompts = || -> Result<crate::linalg::Mat, ClipError> {
        let mut data = Vec::new();
        let mut cols = 0;
        for chunk in ids.chunks(256) {
            let m = reference.encode_token_ids(chunk)?;
            cols = m.cols;
            data.extend(m.data);
        }
        Ok(crate::linalg::Mat::from_vec(ids.len(), cols, data))
    };
    let min_cosine_images = min_row_cosine(
        &model.encode_images(batch)?,
        &reference.encode_images(batch)?,
    );
    let min_cosine_prompts =
        min_row_cosine(&model.encode_texts(&inputs.prompts)?, &encode_prompts()?);
    let per_batch = time(min_seconds, || reference.encode_images(batch).map(drop))?;
    let per_single = time(min_seconds, || {
        reference.encode_images(&batch[..1]).map(drop)
    })?;
    let per_prompts = time(min_seconds, || encode_prompts().map(drop))?;
    Ok(ReferenceComparison {
        min_cosine_images,
        min_cosine_prompts,
        images_per_s_batch1: 1.0 / per_single,
        images_per_s_batch32: batch.len() as f64 / per_batch,
        ms_per_1000_prompts: per_prompts * 1000.0 * (1000.0 / inputs.prompts.len() as f64),
    })
}
