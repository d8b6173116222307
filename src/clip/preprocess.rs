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
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};
use rayon::prelude::*;

use super::ClipError;
use crate::rng::Rng;

// Written digit for digit as OpenAI publishes them, so they can be checked against the source.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
/// Part of every feature-cache key: bump it whenever a change here changes a single output value.
/// v2: JPEGs far larger than the input are decoded at reduced DCT scale ([`load_for_model`]).
/// v3: that reduced-scale decode is libjpeg-turbo's instead of `jpeg-decoder`'s, and the bicubic resize is
/// `fast_image_resize`'s instead of the image crate's (pixels differ by a level here and there).
pub const PREPROCESS_VERSION: &str = "openai-v3";

/// Largest accepted width or height. Bigger files are almost always mistakes or decompression bombs, and
/// decoding them would take gigabytes for a 224-pixel result.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest accepted image in pixels (at the size it is decoded at, see [`load_for_model`]): 16384², 256 Mpx.
pub const MAX_PIXELS: u64 = 1 << 28;
/// Upper bound on the decoded pixel buffer of one image.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;
/// Default process-wide budget of decoded pixel bytes in flight (see [`decode_budget_bytes`]).
pub const DEFAULT_DECODE_BUDGET_BYTES: u64 = 1 << 30;
/// Environment variable that overrides [`DEFAULT_DECODE_BUDGET_BYTES`], in MiB.
pub const DECODE_BUDGET_ENV: &str = "HEGRAPH_DECODE_BUDGET_MIB";
/// A JPEG is decoded at 1/2, 1/4 or 1/8 scale (in the DCT, before any pixel buffer exists) only while its
/// short side stays at least this many times the model's input size, so the bicubic resize that follows still
/// shrinks by 2× or more and hides the difference between the two downscalers.
pub const JPEG_SCALE_MARGIN: u32 = 2;
/// Aspect ratios beyond this are first cut centrally to it, so that resizing the short side to the model's
/// size cannot produce a gigantic intermediate image (a 1×100000 strip would need ~7 GB). The removed pixels
/// lie far outside the final centre crop, so ordinary photos are untouched.
const MAX_ASPECT: u32 = 64;
/// Rows converted at a time when compositing alpha, so that the float copy stays small for huge images.
const ALPHA_STRIP_ROWS: u32 = 64;

const RESAMPLE: FilterType = FilterType::CatmullRom;

/// Bytes of decoded pixels currently reserved by all threads, and the wake-up for those waiting.
static IN_FLIGHT: Mutex<u64> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

/// The process-wide budget of decoded pixel bytes in flight: without it, every decode thread may hold a
/// gigabyte-sized image at once and peak memory grows with the core count. An image larger than the budget
/// is decoded alone. Set through [`DECODE_BUDGET_ENV`] (read once).
pub fn decode_budget_bytes() -> u64 {
    static BUDGET: OnceLock<u64> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var(DECODE_BUDGET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&mib| mib > 0)
            .map_or(DEFAULT_DECODE_BUDGET_BYTES, |mib| {
                mib.saturating_mul(1 << 20)
            })
    })
}

/// A share of the decode budget, returned when dropped. Code holding one must not wait on rayon work (a
/// `join` may steal another decode that waits for this very share), so everything done under it is
/// sequential.
#[derive(Debug)]
pub struct DecodePermit {
    bytes: u64,
}

impl DecodePermit {
    /// Waits until `bytes` fit in the budget next to what others hold (alone when it is larger).
    fn reserve(bytes: u64) -> DecodePermit {
        let budget = decode_budget_bytes();
        let want = bytes.min(budget);
        let mut used = IN_FLIGHT.lock().unwrap_or_else(PoisonError::into_inner);
        while *used > 0 && *used + want > budget {
            used = FREED.wait(used).unwrap_or_else(PoisonError::into_inner);
        }
        *used += want;
        DecodePermit { bytes: want }
    }
}

impl Drop for DecodePermit {
    fn drop(&mut self) {
        let mut used = IN_FLIGHT.lock().unwrap_or_else(PoisonError::into_inner);
        *used = used.saturating_sub(self.bytes);
        drop(used);
        FREED.notify_all();
    }
}

/// A decoded image that still counts against the decode budget until it is dropped.
#[derive(Debug)]
pub struct Decoded {
    image: RgbImage,
    /// The scale the file was decoded at: 1 = full size, 2/4/8 = JPEG DCT scaling.
    pub scale_down: u32,
    permit: DecodePermit,
}

impl Decoded {
    /// Releases the budget; the caller now owns the memory.
    pub fn into_image(self) -> RgbImage {
        self.image
    }

    /// The image and its share of the budget, for a caller that converts the image and holds the share
    /// until it is done.
    pub fn into_parts(self) -> (RgbImage, DecodePermit) {
        (self.image, self.permit)
    }
}

impl std::ops::Deref for Decoded {
    type Target = RgbImage;
    fn deref(&self) -> &RgbImage {
        &self.image
    }
}

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

/// Decodes an image file into 8-bit RGB at full size (EXIF orientation applied, alpha composited on white).
pub fn load_rgb(path: &Path) -> Result<RgbImage, ClipError> {
    open_file(path, None).map(Decoded::into_image)
}

/// Decodes an image file for a model whose input is `size × size`: like [`load_rgb`], except that a JPEG far
/// larger than needed is decoded at 1/2, 1/4 or 1/8 scale (short side kept ≥ [`JPEG_SCALE_MARGIN`]` × size`),
/// and the result holds its share of the decode budget until dropped.
pub fn load_for_model(path: &Path, size: usize) -> Result<Decoded, ClipError> {
    let min_side = u32::try_from(size)
        .unwrap_or(u32::MAX)
        .saturating_mul(JPEG_SCALE_MARGIN);
    load_at_least(path, min_side)
}

/// Like [`load_rgb`], except that a JPEG whose short side is at least twice `min_side` is decoded at 1/2,
/// 1/4 or 1/8 scale, keeping its short side at least `min_side`: for pictures shown or used smaller than the
/// file (the model's input, the GUI's thumbnails).
pub fn load_at_least(path: &Path, min_side: u32) -> Result<Decoded, ClipError> {
    open_file(path, Some(min_side))
}

fn open_file(path: &Path, min_side: Option<u32>) -> Result<Decoded, ClipError> {
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
    if reader.format() == Some(ImageFormat::Jpeg) {
        // The JPEG decoder reads the whole file into memory anyway; the structure check needs it too.
        drop(reader);
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read the file ({e})")))?;
        return decode_jpeg(&bytes, &label, min_side);
    }
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
    let decoded = if reader.format() == Some(ImageFormat::Jpeg) {
        decode_jpeg(bytes, label, None)
    } else {
        decode(reader, label)
    };
    decoded.map(Decoded::into_image)
}

/// Message of a truncated or damaged file, shared by every format so the person reads one wording.
fn damaged(detail: impl std::fmt::Display) -> String {
    format!("the file is damaged, truncated or not an image of its format: {detail}")
}

/// Walks the JPEG marker structure up to the end-of-image marker. The decoder pads a JPEG cut short with
/// grey blocks and says nothing, so this is where a truncated file is caught. Bytes after EOI (camera
/// trailers, motion-photo videos) are allowed; junk between segments is skipped as decoders do.
///
/// Returns whether the frame is progressive: such a file is decoded through a whole-image buffer of DCT
/// coefficients, which the decode budget must count.
fn check_jpeg_structure(bytes: &[u8]) -> Result<bool, String> {
    const EOI: u8 = 0xD9;
    const SOS: u8 = 0xDA;
    // Start-of-frame markers of the progressive processes (Huffman and arithmetic, with and without
    // hierarchy).
    const PROGRESSIVE_SOF: [u8; 4] = [0xC2, 0xC6, 0xCA, 0xCE];
    let mut progressive = false;
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return Err("no JPEG start-of-image marker".into());
    }
    let n = bytes.len();
    let cut = |what: &str| {
        Err(format!("the JPEG data ends inside {what}, before its end-of-image marker (the file is cut short)"))
    };
    let mut i = 2;
    loop {
        // Next marker: skip anything that is not 0xFF, then fill bytes.
        match bytes[i..].iter().position(|&b| b == 0xFF) {
            Some(k) => i += k,
            None => return cut("the headers"),
        }
        while i < n && bytes[i] == 0xFF {
            i += 1;
        }
        if i >= n {
            return cut("the headers");
        }
        let marker = bytes[i];
        i += 1;
        progressive |= PROGRESSIVE_SOF.contains(&marker);
        match marker {
            EOI => return Ok(progressive),
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        if i + 2 > n {
            return cut("a segment header");
        }
        let len = usize::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        if len < 2 || i + len > n {
            return cut("a segment");
        }
        i += len;
        if marker == SOS {
            // Entropy-coded data: 0xFF is followed by 0x00 (stuffing) or a restart marker inside it.
            loop {
                match bytes[i..].iter().position(|&b| b == 0xFF) {
                    Some(k) => i += k,
                    None => return cut("the compressed image data"),
                }
                match bytes.get(i + 1) {
                    None => return cut("the compressed image data"),
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Bytes reserved for decoding a `w × h` image whose decoder output is `decoded_bytes`: the buffer itself,
/// plus the RGB copy when it is converted or rotated.
fn reservation(w: u32, h: u32, decoded_bytes: u64, copies_rgb: bool) -> u64 {
    let rgb = u64::from(w) * u64::from(h) * 3;
    decoded_bytes + if copies_rgb { rgb } else { 0 }
}

fn decode_jpeg(bytes: &[u8], label: &str, min_side: Option<u32>) -> Result<Decoded, ClipError> {
    let err = |msg: String| ClipError::Image {
        file: label.to_string(),
        msg,
    };
    let progressive = check_jpeg_structure(bytes).map_err(|e| err(damaged(e)))?;
    if let Some(min_side) = min_side {
        if let Some(d) = decode_jpeg_scaled(bytes, label, min_side, progressive)? {
            return Ok(d);
        }
    }
    decode(
        ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg),
        label,
    )
}

/// The DCT scale (eighths: 1, 2 or 4) that keeps the short side at least `min_side`, or `None` when only
/// full size (8/8) does.
fn jpeg_scale(w: u32, h: u32, min_side: u32) -> Option<u32> {
    let short = u64::from(w.min(h));
    [1u32, 2, 4]
        .into_iter()
        .find(|&s| (short * u64::from(s)).div_ceil(8) >= u64::from(min_side))
}

/// Decodes a JPEG at reduced scale in libjpeg-turbo's scaled IDCT (through the `mozjpeg` crate) when that is
/// possible and useful; `None` sends the file to the ordinary full-size path: small images, CMYK and 12-bit
/// JPEGs, and anything libjpeg refuses, so that the image crate's decoder has the last word on what is
/// damaged.
///
/// libjpeg-turbo rather than a Rust decoder because large photos are where `extract` spends its time: on
/// 12-megapixel JPEGs at 1/4 scale it decodes 1.7× faster than `jpeg-decoder` (2.4× with the `jpeg-simd`
/// feature), and runs on the calling thread where `jpeg-decoder` starts threads for every image
/// (BENCHMARKS.md, "End-to-end extract").
fn decode_jpeg_scaled(
    bytes: &[u8],
    label: &str,
    min_side: u32,
    progressive: bool,
) -> Result<Option<Decoded>, ClipError> {
    // libjpeg reports a fatal error by unwinding out of its error handler (the `mozjpeg` crate's design);
    // any such error sends the file down the full-size path.
    let header = std::panic::catch_unwind(|| {
        let dec = mozjpeg::Decompress::with_markers(mozjpeg::NO_MARKERS)
            .from_mem(bytes)
            .ok()?;
        let (w, h) = dec.size();
        Some((dec, u32::try_from(w).ok()?, u32::try_from(h).ok()?))
    });
    let Ok(Some((mut dec, w, h))) = header else {
        return Ok(None);
    };
    check_size(w, h, 0, label)?;
    let gray = match dec.color_space() {
        mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_RGB => false,
        mozjpeg::ColorSpace::JCS_GRAYSCALE => true,
        _ => return Ok(None),
    };
    let Some(s) = jpeg_scale(w, h, min_side) else {
        return Ok(None);
    };
    // A progressive file holds every DCT coefficient (2 bytes each, at most 3 full-size components) until
    // its last scan; beyond the per-image limit the full-size path decides.
    let coefficients = if progressive {
        u64::from(w) * u64::from(h) * if gray { 2 } else { 6 }
    } else {
        0
    };
    if coefficients > MAX_DECODE_BYTES {
        return Ok(None);
    }
    let orientation = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Jpeg)
        .into_decoder()
        .ok()
        .and_then(|mut d| d.orientation().ok())
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let rotates = orientation != image::metadata::Orientation::NoTransforms;
    // `s` is 1, 2 or 4 (eighths), so the narrowing cannot fail.
    dec.scale(u8::try_from(s).unwrap_or(8));
    let (sw, sh) = (
        (u64::from(w) * u64::from(s)).div_ceil(8),
        (u64::from(h) * u64::from(s)).div_ceil(8),
    );
    let channels: u64 = if gray { 1 } else { 3 };
    let decoded = sw * sh * channels;
    let (sw, sh) = (
        u32::try_from(sw).unwrap_or(u32::MAX),
        u32::try_from(sh).unwrap_or(u32::MAX),
    );
    let permit = DecodePermit::reserve(
        reservation(sw, sh, decoded, gray || rotates).saturating_add(coefficients),
    );
    let pixels = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut started = if gray { dec.grayscale() } else { dec.rgb() }.ok()?;
        // libjpeg rounds scaled sizes up, as above; anything else is not the image budgeted for.
        if (started.width(), started.height()) != (sw as usize, sh as usize) {
            return None;
        }
        let pixels = started.read_scanlines::<u8>().ok()?;
        started.finish().ok()?;
        Some(pixels)
    }));
    let Ok(Some(pixels)) = pixels else {
        return Ok(None);
    };
    let img = if gray {
        image::GrayImage::from_raw(sw, sh, pixels).map(DynamicImage::ImageLuma8)
    } else {
        RgbImage::from_raw(sw, sh, pixels).map(DynamicImage::ImageRgb8)
    };
    let Some(img) = img else {
        return Ok(None);
    };
    let mut rgb = DynamicImage::ImageRgb8(img.into_rgb8());
    rgb.apply_orientation(orientation);
    Ok(Some(Decoded {
        image: rgb.into_rgb8(),
        scale_down: 8 / s,
        permit,
    }))
}

/// The limits and the budget of this module for a decoder outside CLIP's preprocessing (the GUI's thumbnails
/// and full-size viewer keep the alpha channel, so they decode themselves): refuses an image above the size
/// limits from its header, and returns the share of the decode budget to hold while its pixels exist.
pub fn admit_decode(
    w: u32,
    h: u32,
    decoded_bytes: u64,
    label: &str,
) -> Result<DecodePermit, ClipError> {
    check_size(w, h, decoded_bytes, label)?;
    Ok(DecodePermit::reserve(decoded_bytes))
}

/// Refuses an image above [`MAX_IMAGE_SIDE`], [`MAX_PIXELS`] or (when `bytes` is known) [`MAX_DECODE_BYTES`],
/// before anything is allocated.
fn check_size(w: u32, h: u32, bytes: u64, label: &str) -> Result<(), ClipError> {
    let pixels = u64::from(w) * u64::from(h);
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || pixels > MAX_PIXELS || bytes > MAX_DECODE_BYTES {
        return Err(ClipError::Image {
            file: label.to_string(),
            msg: format!(
                "the image is too large to decode safely ({w}×{h} pixels, {} Mpx, {} MiB decoded; the limits \
                 are {MAX_IMAGE_SIDE} pixels a side, {} Mpx and {} MiB)",
                pixels / 1_000_000,
                bytes.max(pixels * 3) >> 20,
                MAX_PIXELS / 1_000_000,
                MAX_DECODE_BYTES >> 20
            ),
        });
    }
    Ok(())
}

fn decode<R: BufRead + Seek>(
    mut reader: ImageReader<R>,
    label: &str,
) -> Result<Decoded, ClipError> {
    let err = |msg: String| ClipError::Image {
        file: label.to_string(),
        msg,
    };
    if reader.format().is_none() {
        return Err(err(
            "not a recognised image format (expected PNG, JPEG, WebP, GIF, BMP, TIFF, ...)".into(),
        ));
    }
    // Width and height are checked by `check_size` once the header is read, so the message can name the
    // file's size; the allocation limit guards the decoders' own buffers.
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| err(describe(&e)))?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, decoder.total_bytes(), label)?;
    // A damaged EXIF block should not cost the picture: fall back to no rotation.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let converts = decoder.color_type() != image::ColorType::Rgb8
        || orientation != image::metadata::Orientation::NoTransforms;
    let permit = DecodePermit::reserve(reservation(w, h, decoder.total_bytes(), converts));
    let img = DynamicImage::from_decoder(decoder).map_err(|e| err(describe(&e)))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("the image has no pixels (0 width or height)".into()));
    }
    // Rotating after the conversion to 8-bit RGB gives the same pixels and copies 3 bytes a pixel, not more.
    let mut rgb = DynamicImage::ImageRgb8(to_rgb8_on_white(img));
    rgb.apply_orientation(orientation);
    Ok(Decoded {
        image: rgb.into_rgb8(),
        scale_down: 1,
        permit,
    })
}

fn describe(e: &ImageError) -> String {
    match e {
        ImageError::Limits(_) => format!(
            "the image is too large to decode safely (limit {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} pixels, \
             {} MiB): {e}",
            MAX_DECODE_BYTES >> 20
        ),
        ImageError::Unsupported(_) => format!("unsupported image format or feature: {e}"),
        ImageError::Decoding(_) => damaged(e),
        ImageError::IoError(_) => format!("the file is truncated or unreadable: {e}"),
        _ => e.to_string(),
    }
}

/// Transparent pixels become white, as PIL's `convert("RGB")` on a white-background paste would show them;
/// leaving the colour under alpha 0 would expose arbitrary (often black) data to the model. Strips of
/// [`ALPHA_STRIP_ROWS`] rows go through float at a time, so a huge RGBA image never has a 16-byte-a-pixel copy.
fn to_rgb8_on_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let (w, h) = (img.width(), img.height());
    let mut out = RgbImage::new(w, h);
    let mut y0 = 0;
    while y0 < h {
        let rows = ALPHA_STRIP_ROWS.min(h - y0);
        let strip = img.crop_imm(0, y0, w, rows).to_rgba32f();
        for (x, y, src) in strip.enumerate_pixels() {
            let a = src.0[3].clamp(0.0, 1.0);
            let dst = out.get_pixel_mut(x, y0 + y);
            for c in 0..3 {
                let v = src.0[c].clamp(0.0, 1.0) * a + (1.0 - a);
                dst.0[c] = (v * 255.0).round() as u8;
            }
        }
        y0 += rows;
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
        resized = resize_bicubic(img, (0, 0, w, h), (nw, nh));
        &resized
    };
    let top = round_half_even(f64::from(nh - s) / 2.0);
    let left = round_half_even(f64::from(nw - s) / 2.0);
    let crop = imageops::crop_imm(img, left, top, s, s).to_image();
    ImageTensor::from_square(&crop)
}

/// PIL's bicubic (Keys' cubic with `a = −0.5`, its support widened by the factor when shrinking) of the box
/// `(x, y, w, h)` of `img`, to `nw × nh` pixels. Through `fast_image_resize` (SIMD, fixed-point like PIL):
/// the image crate's resize took a quarter of the decode-and-preprocess time of a large photo.
fn resize_bicubic(
    img: &RgbImage,
    (x, y, w, h): (u32, u32, u32, u32),
    (nw, nh): (u32, u32),
) -> RgbImage {
    use fast_image_resize as fr;
    let options = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom))
        .crop(f64::from(x), f64::from(y), f64::from(w), f64::from(h));
    let mut dst = fr::images::Image::new(nw, nh, fr::PixelType::U8x3);
    let done =
        fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
            .map_err(|_| ())
            .and_then(|src| {
                fr::Resizer::new()
                    .resize(&src, &mut dst, &options)
                    .map_err(|_| ())
            });
    match done
        .ok()
        .and_then(|()| RgbImage::from_raw(nw, nh, dst.into_vec()))
    {
        Some(out) => out,
        // Not reached for an `RgbImage` (its buffer always fits its size and pixel type); the image crate's
        // resize with the same filter stands in rather than a panic.
        None => imageops::resize(&*imageops::crop_imm(img, x, y, w, h), nw, nh, RESAMPLE),
    }
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
    // Resampled straight from the box: a copy of the crop would be up to the size of the whole image.
    let mut out = if (w, h) == (s, s) {
        imageops::crop_imm(img, x, y, w, h).to_image()
    } else {
        resize_bicubic(img, (x, y, w, h), (s, s))
    };
    if rng.bool(0.5) {
        imageops::flip_horizontal_in_place(&mut out);
    }
    ImageTensor::from_square(&out)
}

/// View `v` of an image draws from the stream `(seed, key, v)` alone, so the views of one image do not change
/// when other images are added, removed or processed in another order or on another thread; `key` is the
/// caller's stable identity of the image (e.g. a hash of its content). Sequential on purpose: it runs while a
/// [`DecodePermit`] is held (see there); the parallelism is across images.
pub fn augmented_views(
    img: &RgbImage,
    size: usize,
    views: usize,
    seed: u64,
    key: u64,
) -> Vec<ImageTensor> {
    (0..views)
        .map(|v| {
            let mut rng = Rng::derive(seed, &[key, v as u64]);
            random_resized_crop(img, size, &mut rng)
        })
        .collect()
}

/// Decodes and centre-crops many files in parallel (decoding and resizing dominate the time of a small
/// model), within the decode budget; one result per path, in order, so one bad file does not sink a batch.
pub fn prepare_batch(paths: &[PathBuf], size: usize) -> Vec<Result<ImageTensor, ClipError>> {
    paths
        .par_iter()
        .map(|p| load_for_model(p, size).map(|img| center_crop(&img, size)))
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

    /// Two scans (as in a progressive JPEG) with byte stuffing, restart markers and fill bytes: complete
    /// only with its EOI, whatever follows it; every shorter cut is reported.
    #[test]
    fn jpeg_structure_needs_the_end_of_image_marker() {
        let sos = [0xFF, 0xDA, 0x00, 0x04, 0x01, 0x02];
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xFF, 0xD9];
        jpeg.extend_from_slice(&sos);
        jpeg.extend_from_slice(&[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56]);
        jpeg.extend_from_slice(&[0xFF, 0xFF, 0xC4, 0x00, 0x03, 0x00]);
        jpeg.extend_from_slice(&sos);
        jpeg.extend_from_slice(&[0x78, 0xFF, 0xD7, 0x9A, 0xFF, 0xD9]);
        assert_eq!(check_jpeg_structure(&jpeg), Ok(false));
        let mut trailer = jpeg.clone();
        trailer.extend_from_slice(b"\xff\x00 appended video");
        assert_eq!(check_jpeg_structure(&trailer), Ok(false));
        for len in 0..jpeg.len() {
            assert!(check_jpeg_structure(&jpeg[..len]).is_err(), "cut at {len}");
        }
        // A progressive start-of-frame (SOF2) before the scans is reported; a baseline one (SOF0) is not.
        for (sof, progressive) in [(0xC0, false), (0xC2, true)] {
            let mut framed = jpeg[..8].to_vec();
            framed.extend_from_slice(&[0xFF, sof, 0x00, 0x03, 0x08]);
            framed.extend_from_slice(&jpeg[8..]);
            assert_eq!(check_jpeg_structure(&framed), Ok(progressive), "{sof:#x}");
        }
    }

    #[test]
    fn jpeg_scale_keeps_the_short_side() {
        assert_eq!(jpeg_scale(640, 427, 448), None);
        assert_eq!(jpeg_scale(640, 427, 64), Some(2));
        assert_eq!(jpeg_scale(2560, 1708, 448), Some(4));
        assert_eq!(jpeg_scale(16_384, 16_384, 448), Some(1));
        assert_eq!(jpeg_scale(4000, 3584, 448), Some(1));
        assert_eq!(jpeg_scale(4000, 3577, 448), Some(1));
        assert_eq!(jpeg_scale(4000, 3576, 448), Some(2));
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
