//! Image decoding and OpenAI's CLIP preprocessing.
//!
//! The test transform is OpenAI's (`Resize(n, BICUBIC)`, `CenterCrop(n)`, RGB, `/255`, CLIP mean/std, CHW),
//! reimplemented here because candle's example does something else (Triangle filter, `[-1, 1]` scaling) and
//! features computed with another transform do not match the published ones. PIL's bicubic is Keys' cubic
//! with `a = -0.5`, which is the image crate's `CatmullRom`; both widen the kernel when downsampling.
//!
//! Decoding is deliberately forgiving about what a photo folder contains (EXIF rotation, alpha, grayscale,
//! 16-bit, CMYK JPEG) and strict about what it must refuse (empty, truncated, non-image and huge files), with
//! errors that name the file.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits, RgbImage};
use rayon::prelude::*;

use super::ClipError;
use crate::rng::Rng;

// Written digit for digit as OpenAI publishes them, so they can be checked against the source.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
/// Part of every feature-cache key: bump it whenever a change here changes a single output value.
pub const PREPROCESS_VERSION: &str = "openai-v1";

/// Largest accepted width or height. Bigger files are almost always mistakes or decompression bombs, and
/// decoding them would take gigabytes for a 224-pixel result.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Upper bound on the decoded pixel buffer.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;
/// Aspect ratios beyond this are first cut centrally to it, so that resizing the short side to the model's
/// size cannot produce a gigantic intermediate image (a 1×100000 strip would need ~7 GB). The removed pixels
/// lie far outside the final centre crop, so ordinary photos are untouched.
const MAX_ASPECT: u32 = 64;

const RESAMPLE: FilterType = FilterType::CatmullRom;

/// One preprocessed image: `3 × size × size` values, channel-major (CHW), CLIP-normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTensor {
    pub size: usize,
    pub data: Vec<f32>,
}

impl ImageTensor {
    /// Normalises an already square, already resized image.
    fn from_square(img: &RgbImage) -> ImageTensor {
        let size = img.width() as usize;
        let plane = size * size;
        let mut data = vec![0.0f32; 3 * plane];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = (f32::from(px.0[c]) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
        ImageTensor { size, data }
    }

    /// The value at channel `c`, row `y`, column `x`.
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.size + y) * self.size + x]
    }
}

/// Decodes an image file into 8-bit RGB (EXIF orientation applied, alpha composited on white).
pub fn load_rgb(path: &Path) -> Result<RgbImage, ClipError> {
    let label = path.display().to_string();
    let err = |msg: String| ClipError::Image {
        file: label.clone(),
        msg,
    };
    let file = File::open(path).map_err(|e| err(format!("cannot open the file ({e})")))?;
    let len = file
        .metadata()
        .map_err(|e| err(format!("cannot read the file ({e})")))?
        .len();
    if len == 0 {
        return Err(err("the file is empty (0 bytes)".into()));
    }
    let mut reader = ImageReader::new(BufReader::new(file));
    // The extension is only a fallback: photo folders are full of mislabelled files.
    if let Ok(format) = image::ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    let reader = reader
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read the file ({e})")))?;
    decode(reader, &label)
}

/// Like [`load_rgb`], for bytes already in memory (drag-and-drop, archives).
pub fn load_rgb_from_memory(bytes: &[u8]) -> Result<RgbImage, ClipError> {
    let label = "image in memory";
    if bytes.is_empty() {
        return Err(ClipError::Image {
            file: label.into(),
            msg: "no bytes (0-byte image)".into(),
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ClipError::Image {
            file: label.into(),
            msg: e.to_string(),
        })?;
    decode(reader, label)
}

fn decode<R: BufRead + Seek>(
    mut reader: ImageReader<R>,
    label: &str,
) -> Result<RgbImage, ClipError> {
    let err = |msg: String| ClipError::Image {
        file: label.to_string(),
        msg,
    };
    if reader.format().is_none() {
        return Err(err(
            "not a recognised image format (expected PNG, JPEG, WebP, GIF, BMP, TIFF, ...)".into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| err(describe(&e)))?;
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        let (w, h) = decoder.dimensions();
        return Err(err(format!(
            "the image is too large to decode safely ({w}×{h} pixels needs {} MiB, the limit is {} MiB)",
            decoder.total_bytes() >> 20,
            MAX_DECODE_BYTES >> 20
        )));
    }
    // A damaged EXIF block should not cost the picture: fall back to no rotation.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| err(describe(&e)))?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(err("the image has no pixels (0 width or height)".into()));
    }
    Ok(to_rgb8_on_white(img))
}

fn describe(e: &ImageError) -> String {
    match e {
        ImageError::Limits(_) => format!(
            "the image is too large to decode safely (limit {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels, \
             {} MiB): {e}",
            MAX_DECODE_BYTES >> 20
        ),
        ImageError::Unsupported(_) => format!("unsupported image format or feature: {e}"),
        ImageError::Decoding(_) => {
            format!("the file is damaged, truncated or not an image of its format: {e}")
        }
        ImageError::IoError(_) => format!("the file is truncated or unreadable: {e}"),
        _ => e.to_string(),
    }
}

/// Transparent pixels become white, as PIL's `convert("RGB")` on a white-background paste would show them;
/// leaving the colour under alpha 0 would expose arbitrary (often black) data to the model.
fn to_rgb8_on_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba32f();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (dst, src) in out.pixels_mut().zip(rgba.pixels()) {
        let a = src.0[3].clamp(0.0, 1.0);
        for c in 0..3 {
            let v = src.0[c].clamp(0.0, 1.0) * a + (1.0 - a);
            dst.0[c] = (v * 255.0).round() as u8;
        }
    }
    out
}

/// Python's `round`, which torchvision's `CenterCrop` uses: halves go to the even neighbour.
fn round_half_even(x: f64) -> u32 {
    x.round_ties_even().max(0.0) as u32
}

/// Cuts extreme strips to [`MAX_ASPECT`] around their centre (see there).
fn limit_aspect(img: &RgbImage) -> Option<RgbImage> {
    let (w, h) = img.dimensions();
    if w > h.saturating_mul(MAX_ASPECT) {
        let nw = h * MAX_ASPECT;
        Some(imageops::crop_imm(img, (w - nw) / 2, 0, nw, h).to_image())
    } else if h > w.saturating_mul(MAX_ASPECT) {
        let nh = w * MAX_ASPECT;
        Some(imageops::crop_imm(img, 0, (h - nh) / 2, w, nh).to_image())
    } else {
        None
    }
}

/// OpenAI's test transform: shorter side to `size` (bicubic), centre crop `size × size`, normalise.
///
/// Sizes follow torchvision exactly: the long side becomes `floor(size * long / short)` and the crop
/// offset is `round((resized - size) / 2)` with Python's rounding. An image already `size` on its short
/// side is not resampled.
pub fn center_crop(img: &RgbImage, size: usize) -> ImageTensor {
    let s = size as u32;
    if img.width() == 0 || img.height() == 0 || s == 0 {
        return ImageTensor::from_square(&RgbImage::new(s, s));
    }
    let limited = limit_aspect(img);
    let img = limited.as_ref().unwrap_or(img);
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (s, (u64::from(s) * u64::from(h) / u64::from(w)) as u32)
    } else {
        ((u64::from(s) * u64::from(w) / u64::from(h)) as u32, s)
    };
    let resized;
    let img = if (nw, nh) == (w, h) {
        img
    } else {
        resized = imageops::resize(img, nw, nh, RESAMPLE);
        &resized
    };
    let top = round_half_even(f64::from(nh - s) / 2.0);
    let left = round_half_even(f64::from(nw - s) / 2.0);
    let crop = imageops::crop_imm(img, left, top, s, s).to_image();
    ImageTensor::from_square(&crop)
}

/// The crop box `(x, y, w, h)` of torchvision's `RandomResizedCrop.get_params` with scale (0.5, 1) and ratio
/// (3/4, 4/3): 10 attempts, then the centre fallback. Scale 0.5 rather than torchvision's 0.08 is the
/// few-shot adapters' choice (Tip-Adapter, HeGraphAdapter): small crops of a handful of shots lose the
/// object.
fn random_crop_box(width: u32, height: u32, rng: &mut Rng) -> (u32, u32, u32, u32) {
    const SCALE: (f64, f64) = (0.5, 1.0);
    const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (RATIO.0.ln(), RATIO.1.ln());
    for _ in 0..10 {
        let target_area = area * (SCALE.0 + (SCALE.1 - SCALE.0) * rng.next_f64());
        let aspect = (log_lo + (log_hi - log_lo) * rng.next_f64()).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && h > 0.0 && w <= f64::from(width) && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let y = rng.below((height - h + 1) as usize) as u32;
            let x = rng.below((width - w + 1) as usize) as u32;
            return (x, y, w, h);
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < RATIO.0 {
        (width, (f64::from(width) / RATIO.0).round_ties_even() as u32)
    } else if in_ratio > RATIO.1 {
        (
            (f64::from(height) * RATIO.1).round_ties_even() as u32,
            height,
        )
    } else {
        (width, height)
    };
    let (w, h) = (w.clamp(1, width), h.clamp(1, height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// A training view: torchvision's `RandomResizedCrop(size, scale=(0.5, 1), interpolation=BICUBIC)` followed
/// by `RandomHorizontalFlip(p=0.5)`, then CLIP normalisation.
pub fn random_resized_crop(img: &RgbImage, size: usize, rng: &mut Rng) -> ImageTensor {
    let s = size as u32;
    if img.width() == 0 || img.height() == 0 || s == 0 {
        return ImageTensor::from_square(&RgbImage::new(s, s));
    }
    let (x, y, w, h) = random_crop_box(img.width(), img.height(), rng);
    let crop = imageops::crop_imm(img, x, y, w, h).to_image();
    let mut out = if (w, h) == (s, s) {
        crop
    } else {
        imageops::resize(&crop, s, s, RESAMPLE)
    };
    if rng.bool(0.5) {
        imageops::flip_horizontal_in_place(&mut out);
    }
    ImageTensor::from_square(&out)
}

/// View `v` of an image draws from the stream `(seed, key, v)` alone, so the views of one image do not change
/// when other images are added, removed or processed in another order or on another thread; `key` is the
/// caller's stable identity of the image (e.g. a hash of its content).
pub fn augmented_views(
    img: &RgbImage,
    size: usize,
    views: usize,
    seed: u64,
    key: u64,
) -> Vec<ImageTensor> {
    (0..views)
        .into_par_iter()
        .map(|v| {
            let mut rng = Rng::derive(seed, &[key, v as u64]);
            random_resized_crop(img, size, &mut rng)
        })
        .collect()
}

/// Decodes and centre-crops many files in parallel (decoding and resizing dominate the time of a small
/// model); one result per path, in order, so one bad file does not sink a batch.
pub fn prepare_batch(paths: &[PathBuf], size: usize) -> Vec<Result<ImageTensor, ClipError>> {
    paths
        .par_iter()
        .map(|p| load_rgb(p).map(|img| center_crop(&img, size)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding_for_crop_offsets() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
    }

    #[test]
    fn crop_boxes_stay_inside_and_respect_scale() {
        let mut rng = Rng::new(1);
        for _ in 0..2000 {
            let (w, h) = (1 + rng.below(400) as u32, 1 + rng.below(400) as u32);
            let (x, y, cw, ch) = random_crop_box(w, h, &mut rng);
            assert!(
                cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h,
                "{w}x{h}: {x},{y} {cw}x{ch}"
            );
        }
        // Large square image: the attempts nearly always succeed, so area fractions lie in [0.5, 1].
        for _ in 0..500 {
            let (_, _, cw, ch) = random_crop_box(1000, 1000, &mut rng);
            let frac = f64::from(cw * ch) / 1e6;
            assert!((0.49..=1.0).contains(&frac), "area fraction {frac}");
            let r = f64::from(cw) / f64::from(ch);
            assert!((0.74..=1.34).contains(&r), "ratio {r}");
        }
    }

    #[test]
    fn extreme_strips_are_cut_before_resizing() {
        let img = RgbImage::from_pixel(10_000, 2, image::Rgb([10, 20, 30]));
        let t = center_crop(&img, 16);
        assert_eq!(t.data.len(), 3 * 16 * 16);
        let expect = (10.0 / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((t.at(0, 5, 5) - expect).abs() < 1e-5);
    }
}
