//! The `clip` module on a small random-weight checkpoint that the module writes itself (no real CLIP can
//! reach the build machines), on synthetic images whose preprocessed pixels can be computed by hand, and on
//! the real photos in `../shared/data/photos/`. The zero-shot test needs a real checkpoint through
//! `HEGRAPH_MODEL_DIR` and says why it is skipped otherwise.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hegraph::clip::bench::bench_clip_with;
use hegraph::clip::model::{CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use hegraph::clip::preprocess::{
    augmented_views, center_crop, load_rgb, load_rgb_from_memory, prepare_batch,
    random_resized_crop, ImageTensor, CLIP_MEAN, CLIP_STD,
};
use hegraph::clip::{
    bench_clip, resolve_model_dir, write_test_checkpoint, ClipError, ClipModel,
    TestCheckpointConfig,
};
use hegraph::linalg::Mat;
use hegraph::rng::Rng;
use image::{ImageBuffer, ImageEncoder, Luma, Rgb, RgbImage, Rgba, RgbaImage};

/// Environment variables are process-wide and tests run on threads: everything that reads or writes them
/// holds this lock.
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn photos_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos")
}

fn photo(name: &str) -> PathBuf {
    photos_dir().join(name)
}

fn tiny_model() -> (tempfile::TempDir, ClipModel) {
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 7).unwrap();
    let model = ClipModel::load(dir.path()).unwrap();
    (dir, model)
}

fn normalised(c: usize, v: u8) -> f32 {
    (f32::from(v) / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
}

/// Back from a normalised value to the 8-bit level it came from.
fn level(t: &ImageTensor, c: usize, y: usize, x: usize) -> f32 {
    (t.at(c, y, x) * CLIP_STD[c] + CLIP_MEAN[c]) * 255.0
}

fn assert_pixel(t: &ImageTensor, y: usize, x: usize, rgb: [u8; 3]) {
    for (c, &v) in rgb.iter().enumerate() {
        let got = t.at(c, y, x);
        let want = normalised(c, v);
        assert!(
            (got - want).abs() < 1e-5,
            "pixel ({y},{x}) channel {c}: {got} != {want} (level {v})"
        );
    }
}

fn row_norm(m: &Mat, i: usize) -> f32 {
    m.row(i).iter().map(|v| v * v).sum::<f32>().sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn err_text(e: ClipError) -> String {
    e.to_string()
}

// ---------------------------------------------------------------- preprocessing

#[test]
fn uniform_image_gives_the_normalised_colour_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uniform.png");
    RgbImage::from_pixel(50, 30, Rgb([200, 100, 50]))
        .save(&path)
        .unwrap();
    let img = load_rgb(&path).unwrap();
    for size in [16, 224] {
        let t = center_crop(&img, size);
        assert_eq!(t.size, size);
        assert_eq!(t.data.len(), 3 * size * size);
        for c in 0..3 {
            let want = normalised(c, [200, 100, 50][c]);
            let plane = &t.data[c * size * size..(c + 1) * size * size];
            assert!(plane.iter().all(|v| (v - want).abs() < 1e-5), "channel {c}");
        }
    }
    let mut rng = Rng::new(3);
    let v = random_resized_crop(&img, 24, &mut rng);
    assert_eq!(v.size, 24);
    assert!(v.data[..24 * 24]
        .iter()
        .all(|x| (x - normalised(0, 200)).abs() < 1e-5));
}

#[test]
fn centre_crop_of_two_colours_is_predicted() {
    let red = Rgb([255, 0, 0]);
    let blue = Rgb([0, 0, 255]);
    // 64×32, no resize for size 32: crop columns 16..48 of a red|blue split at 32.
    let img = RgbImage::from_fn(64, 32, |x, _| if x < 32 { red } else { blue });
    let t = center_crop(&img, 32);
    for y in [0, 15, 31] {
        for x in 0..32 {
            assert_pixel(&t, y, x, if x < 16 { red.0 } else { blue.0 });
        }
    }
    // 32×65: the offset is round(33 / 2) = 16 with Python's half-to-even rounding (not 17), so the 33 red
    // rows 0..33 leave 17 red rows at the top of the crop.
    let img = RgbImage::from_fn(32, 65, |_, y| if y < 33 { red } else { blue });
    let t = center_crop(&img, 32);
    for y in 0..32 {
        assert_pixel(&t, y, 7, if y < 17 { red.0 } else { blue.0 });
    }
    // 128×64 → resized to 64×32, cropped at column 16: far from the edge the colours are exact.
    let img = RgbImage::from_fn(128, 64, |x, _| if x < 64 { red } else { blue });
    let t = center_crop(&img, 32);
    for y in [0, 16, 31] {
        for x in (0..12).chain(20..32) {
            assert_pixel(&t, y, x, if x < 16 { red.0 } else { blue.0 });
        }
    }
}

/// Reference values from Pillow 13's `Image.resize(..., BICUBIC)` and torchvision's crop arithmetic on
/// the same files (OpenAI's transform): per-channel sums of the 224×224 crop and a few pixels.
#[test]
fn real_photos_match_pillow_bicubic_reference() {
    type Sample = ((usize, usize), [u8; 3]);
    let cases: [(&str, [i64; 3], [Sample; 4]); 3] = [
        (
            "chelsea.png",
            [7_439_334, 5_465_889, 4_004_020],
            [
                ((0, 0), [121, 63, 49]),
                ((100, 100), [46, 21, 10]),
                ((111, 57), [145, 101, 58]),
                ((223, 223), [173, 150, 141]),
            ],
        ),
        (
            "astronaut.png",
            [7_103_077, 5_307_066, 4_841_084],
            [
                ((0, 0), [143, 138, 146]),
                ((111, 57), [155, 29, 22]),
                ((150, 30), [233, 122, 81]),
                ((200, 5), [101, 9, 27]),
            ],
        ),
        (
            "coffee.png",
            [7_689_940, 3_904_216, 2_337_792],
            [
                ((10, 200), [198, 110, 55]),
                ((100, 100), [235, 148, 54]),
                ((150, 30), [129, 22, 5]),
                ((60, 170), [247, 238, 226]),
            ],
        ),
    ];
    for (name, sums, samples) in cases {
        let t = center_crop(&load_rgb(&photo(name)).unwrap(), 224);
        for (c, &want_sum) in sums.iter().enumerate() {
            let sum: f64 = (0..224)
                .flat_map(|y| (0..224).map(move |x| (y, x)))
                .map(|(y, x)| f64::from(level(&t, c, y, x)))
                .sum();
            let mean_diff = (sum - want_sum as f64).abs() / (224.0 * 224.0);
            println!("{name} channel {c}: mean level differs from Pillow by {mean_diff:.4}");
            assert!(
                mean_diff < 0.05,
                "{name} channel {c}: mean level differs by {mean_diff}"
            );
        }
        for ((y, x), rgb) in samples {
            for (c, want) in rgb.into_iter().enumerate() {
                let got = level(&t, c, y, x);
                assert!(
                    (got - f32::from(want)).abs() <= 1.01,
                    "{name} ({y},{x}) channel {c}: {got} vs Pillow {want}"
                );
            }
        }
    }
}

#[test]
fn transparent_pixels_become_white() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alpha.png");
    let img = RgbaImage::from_fn(8, 8, |x, _| {
        if x < 4 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([255, 0, 0, 128])
        }
    });
    img.save(&path).unwrap();
    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(rgb.get_pixel(3, 7).0, [255, 255, 255]);
    let half = rgb.get_pixel(6, 2).0;
    assert_eq!(half[0], 255);
    assert!(
        (i32::from(half[1]) - 127).abs() <= 1 && half[1] == half[2],
        "{half:?}"
    );
}

/// A little-endian TIFF block with one IFD entry: Orientation (0x0112, SHORT, 1 value).
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut b = vec![b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0];
    b.extend_from_slice(&0x0112u16.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&value.to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    b
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    // 4 wide, 2 tall, red top-left corner: EXIF 6 means "rotate 90° clockwise to display", after which the
    // image is 2 wide, 4 tall and the red pixel is top-right.
    let img = RgbImage::from_fn(4, 2, |x, y| {
        if (x, y) == (0, 0) {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 0])
        }
    });
    let path = dir.path().join("rotated.png");
    let mut bytes = Vec::new();
    let mut enc = image::codecs::png::PngEncoder::new(&mut bytes);
    enc.set_exif_metadata(exif_orientation(6)).unwrap();
    enc.write_image(img.as_raw(), 4, 2, image::ExtendedColorType::Rgb8)
        .unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.dimensions(), (2, 4));
    assert_eq!(rgb.get_pixel(1, 0).0, [255, 0, 0]);
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(load_rgb_from_memory(&bytes).unwrap(), rgb);

    // The same through JPEG, where EXIF orientation is common (phones): only the shape is exact.
    let big = RgbImage::from_pixel(40, 16, Rgb([90, 160, 30]));
    let mut jpeg = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
    enc.set_exif_metadata(exif_orientation(8)).unwrap();
    enc.write_image(big.as_raw(), 40, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    let jpath = dir.path().join("rotated.jpg");
    std::fs::write(&jpath, &jpeg).unwrap();
    assert_eq!(load_rgb(&jpath).unwrap().dimensions(), (16, 40));
}

#[test]
fn grayscale_and_sixteen_bit_inputs_become_rgb8() {
    let dir = tempfile::tempdir().unwrap();
    let gray = dir.path().join("gray.png");
    ImageBuffer::from_pixel(6, 5, Luma([77u8]))
        .save(&gray)
        .unwrap();
    let rgb = load_rgb(&gray).unwrap();
    assert_eq!(rgb.dimensions(), (6, 5));
    assert!(rgb.pixels().all(|p| p.0 == [77, 77, 77]));

    let deep = dir.path().join("deep.png");
    ImageBuffer::from_pixel(6, 5, Rgb([65535u16, 0, 257 * 100]))
        .save(&deep)
        .unwrap();
    let rgb = load_rgb(&deep).unwrap();
    assert!(
        rgb.pixels().all(|p| p.0 == [255, 0, 100]),
        "{:?}",
        rgb.get_pixel(0, 0)
    );

    let deep_gray = dir.path().join("deep_gray.png");
    ImageBuffer::from_pixel(3, 3, Luma([257u16 * 9]))
        .save(&deep_gray)
        .unwrap();
    assert!(load_rgb(&deep_gray)
        .unwrap()
        .pixels()
        .all(|p| p.0 == [9, 9, 9]));

    // A real grayscale photo goes all the way through.
    let t = center_crop(&load_rgb(&photo("camera.png")).unwrap(), 32);
    let plane = 32 * 32;
    for i in 0..plane {
        let (r, g) = (level(&t, 0, i / 32, i % 32), level(&t, 1, i / 32, i % 32));
        assert!((r - g).abs() < 1e-3, "gray pixels have equal channels");
    }
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let e = err_text(load_rgb(&empty).unwrap_err());
    assert!(e.contains("empty.png") && e.contains("empty"), "{e}");

    let mut png = Vec::new();
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8, y as u8, (x ^ y) as u8]))
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let e = err_text(load_rgb(&truncated).unwrap_err());
    assert!(e.contains("truncated.png"), "{e}");

    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, b"this is not a picture at all").unwrap();
    let e = err_text(load_rgb(&text).unwrap_err());
    assert!(e.contains("notes.jpg"), "{e}");

    let missing = dir.path().join("missing.png");
    assert!(err_text(load_rgb(&missing).unwrap_err()).contains("missing.png"));

    // Wider than the 16384-pixel limit (a tiny file: one row).
    let wide = dir.path().join("wide.png");
    RgbImage::new(20_000, 1).save(&wide).unwrap();
    let e = err_text(load_rgb(&wide).unwrap_err());
    assert!(e.contains("wide.png") && e.contains("too large"), "{e}");

    assert!(load_rgb_from_memory(&[]).is_err());
    assert!(load_rgb_from_memory(&png[..100]).is_err());

    // One bad file does not sink a batch.
    let results = prepare_batch(&[photo("chelsea.png"), truncated, photo("coins.png")], 32);
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
}

#[test]
fn augmented_views_are_deterministic_per_image_key() {
    let img = load_rgb(&photo("coffee.png")).unwrap();
    let a = augmented_views(&img, 32, 4, 11, 1234);
    let b = augmented_views(&img, 32, 4, 11, 1234);
    assert_eq!(a.len(), 4);
    assert!(a
        .iter()
        .all(|v| v.size == 32 && v.data.len() == 3 * 32 * 32));
    assert_eq!(a, b);
    let other_key = augmented_views(&img, 32, 4, 11, 1235);
    let other_seed = augmented_views(&img, 32, 4, 12, 1234);
    for i in 0..4 {
        assert_ne!(a[i], other_key[i], "view {i}");
        assert_ne!(a[i], other_seed[i], "view {i}");
    }
    assert_ne!(a[0], a[1]);
    // Asking for more views does not change the first ones.
    assert_eq!(augmented_views(&img, 32, 6, 11, 1234)[..4], a[..]);
}

/// Issue 11 (7): a JPEG cut at half its length used to decode without a word (the decoder pads it with grey
/// blocks); it is reported as damaged, naming the file, as a truncated PNG is. Bytes after the end-of-image
/// marker (camera trailers, motion photos) are not damage.
#[test]
fn a_jpeg_cut_in_half_is_reported_as_damaged() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["rocket.jpg", "china.jpg", "flower.jpg"] {
        let bytes = std::fs::read(photo(name)).unwrap();
        let cut = dir.path().join(format!("half-{name}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = err_text(load_rgb(&cut).unwrap_err());
        assert!(
            e.contains(&format!("half-{name}")) && e.contains("damaged, truncated"),
            "{e}"
        );
        assert!(e.contains("end-of-image"), "{e}");
        assert!(load_rgb_from_memory(&bytes[..bytes.len() / 2]).is_err());
        // Only the last two bytes (the EOI marker) missing.
        let eoi = dir.path().join(format!("no-eoi-{name}"));
        std::fs::write(&eoi, &bytes[..bytes.len() - 2]).unwrap();
        assert!(load_rgb(&eoi).is_err(), "{name} without EOI");
        let results = prepare_batch(&[photo(name), cut.clone()], 32);
        assert!(results[0].is_ok() && results[1].is_err());

        let mut trailer = bytes.clone();
        trailer.extend_from_slice(b"\0\0ftypmp42 a video appended after the image");
        let tpath = dir.path().join(format!("trailer-{name}"));
        std::fs::write(&tpath, &trailer).unwrap();
        assert_eq!(load_rgb(&tpath).unwrap(), load_rgb(&photo(name)).unwrap());
    }
}

/// The JPEG `bytes` with the frame header's height and width replaced (the SOF0 segment).
fn patch_jpeg_size(bytes: &mut [u8], w: u16, h: u16) {
    let sof = bytes
        .windows(2)
        .position(|m| m == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
}

/// Issue 11 (10): dimensions are checked from the header, before any pixel buffer exists, and the refusal
/// names the file and its size.
#[test]
fn oversized_images_are_refused_from_the_header_naming_file_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let wide = dir.path().join("wide.png");
    RgbImage::new(20_000, 1).save(&wide).unwrap();
    let e = err_text(load_rgb(&wide).unwrap_err());
    assert!(
        e.contains("wide.png") && e.contains("20000×1") && e.contains("too large"),
        "{e}"
    );

    // A 64×48 JPEG whose header claims 30000×20000: refused without decoding (the data could not fill it).
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .write_image(
            RgbImage::from_pixel(64, 48, Rgb([1, 2, 3])).as_raw(),
            64,
            48,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    patch_jpeg_size(&mut jpeg, 30_000, 20_000);
    let bomb = dir.path().join("bomb.jpg");
    std::fs::write(&bomb, &jpeg).unwrap();
    for e in [
        err_text(load_rgb(&bomb).unwrap_err()),
        err_text(
            hegraph::clip::preprocess::load_for_model(&bomb, 224)
                .map(|_| ())
                .unwrap_err(),
        ),
    ] {
        assert!(
            e.contains("bomb.jpg") && e.contains("30000×20000") && e.contains("too large"),
            "{e}"
        );
    }
}

/// Largest and mean absolute difference between two CLIP input tensors (normalised units: one 8-bit level
/// is about 0.015).
fn tensor_diff(a: &ImageTensor, b: &ImageTensor) -> (f32, f32) {
    assert_eq!(a.data.len(), b.data.len());
    let max = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let mean = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .sum::<f32>()
        / a.data.len() as f32;
    (max, mean)
}

/// [`tensor_diff`] between the CLIP inputs (`size` px) of a reduced-scale decode of `path` and of the full-size
/// decode of the same file.
fn diff_to_full_decode(reduced: &RgbImage, path: &Path, size: usize) -> (f32, f32) {
    tensor_diff(
        &center_crop(reduced, size),
        &center_crop(&load_rgb(path).unwrap(), size),
    )
}

/// Issue 11 (10): a JPEG far larger than the model's input is decoded at 1/2, 1/4 or 1/8 scale in the DCT;
/// the CLIP input tensor stays close to the full-size decode. Images that are not downscaled give exactly
/// today's tensor.
#[test]
fn large_jpegs_are_decoded_at_reduced_scale_and_the_tensor_stays_close() {
    use hegraph::clip::preprocess::load_for_model;
    let dir = tempfile::tempdir().unwrap();
    // Not downscaled: the real photos (short side 427 < 2 × 224) and PNGs give today's tensor exactly.
    for name in ["rocket.jpg", "china.jpg", "chelsea.png", "coffee.png"] {
        let d = load_for_model(&photo(name), 224).unwrap();
        assert_eq!(d.scale_down, 1, "{name}");
        assert_eq!(
            center_crop(&d, 224),
            center_crop(&load_rgb(&photo(name)).unwrap(), 224),
            "{name}"
        );
    }
    // The real photos for the 32-pixel test model: 427 / 4 ≥ 64, so they are decoded at 1/4.
    for name in ["rocket.jpg", "china.jpg", "flower.jpg"] {
        let d = load_for_model(&photo(name), 32).unwrap();
        assert_eq!(d.scale_down, 4, "{name}");
        assert_eq!(d.dimensions(), (160, 107), "{name}");
        let (max, mean) = diff_to_full_decode(&d, &photo(name), 32);
        println!("{name} at 32 px, decoded at 1/4: tensor differs by max {max:.4}, mean {mean:.4}");
        assert!(max < 0.4 && mean < 0.03, "{name}: max {max}, mean {mean}");
    }
    // Real photos enlarged 4× (2560×1708) and saved as JPEG: for 224 px they decode at 1/2 (854 ≥ 448).
    for name in ["rocket.jpg", "flower.jpg"] {
        let src = load_rgb(&photo(name)).unwrap();
        let big =
            image::imageops::resize(&src, 2560, 1708, image::imageops::FilterType::CatmullRom);
        let path = dir.path().join(format!("big-{name}"));
        let mut f = std::fs::File::create(&path).unwrap();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 92)
            .write_image(big.as_raw(), 2560, 1708, image::ExtendedColorType::Rgb8)
            .unwrap();
        drop(f);
        let d = load_for_model(&path, 224).unwrap();
        assert_eq!((d.scale_down, d.dimensions()), (2, (1280, 854)), "{name}");
        let (max, mean) = diff_to_full_decode(&d, &path, 224);
        println!(
            "big {name} at 224 px, decoded at 1/2: tensor differs by max {max:.4}, mean {mean:.4}"
        );
        assert!(
            max < 0.25 && mean < 0.03,
            "big {name}: max {max}, mean {mean}"
        );
    }
}

/// The reduced-scale decode (libjpeg-turbo) handles what photo folders hold beyond plain baseline RGB: EXIF
/// rotation, grayscale and progressive files, each close to the full-size decode of the same file.
#[test]
fn reduced_scale_decode_handles_rotation_grayscale_and_progressive_jpegs() {
    use hegraph::clip::preprocess::load_for_model;
    let dir = tempfile::tempdir().unwrap();
    // A real photo enlarged to 1400×900: short side 900 / 2 = 450 ≥ 2 × 224, so decoded at 1/2.
    let src = image::imageops::resize(
        &load_rgb(&photo("rocket.jpg")).unwrap(),
        1400,
        900,
        image::imageops::FilterType::CatmullRom,
    );
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let baseline = |exif: Option<u16>, gray: bool| {
        let mut out = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92);
        if let Some(o) = exif {
            enc.set_exif_metadata(exif_orientation(o)).unwrap();
        }
        if gray {
            let g = image::DynamicImage::ImageRgb8(src.clone()).into_luma8();
            enc.write_image(g.as_raw(), 1400, 900, image::ExtendedColorType::L8)
        } else {
            enc.write_image(src.as_raw(), 1400, 900, image::ExtendedColorType::Rgb8)
        }
        .unwrap();
        out
    };
    // Progressive, written by libjpeg itself.
    let progressive = {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_size(1400, 900);
        c.set_quality(92.0);
        c.set_progressive_mode();
        let mut c = c.start_compress(Vec::new()).unwrap();
        c.write_scanlines(src.as_raw()).unwrap();
        c.finish().unwrap()
    };
    assert!(
        progressive.windows(2).any(|w| w == [0xFF, 0xC2]),
        "not progressive"
    );
    for (path, dims) in [
        (write("rotated.jpg", &baseline(Some(6), false)), (450, 700)),
        (write("gray.jpg", &baseline(None, true)), (700, 450)),
        (write("progressive.jpg", &progressive), (700, 450)),
    ] {
        let d = load_for_model(&path, 224).unwrap();
        assert_eq!((d.scale_down, d.dimensions()), (2, dims), "{path:?}");
        let full = load_rgb(&path).unwrap();
        assert_eq!(full.dimensions(), (dims.0 * 2, dims.1 * 2), "{path:?}");
        let (max, mean) = diff_to_full_decode(&d, &path, 224);
        assert!(
            max < 0.25 && mean < 0.03,
            "{path:?}: max {max}, mean {mean}"
        );
    }
}

/// Damaged JPEGs on the reduced-scale path (libjpeg, whose fatal errors unwind out of C): bytes of a real photo
/// overwritten at random, in the headers and in the compressed data, for the 32-pixel test model (so the
/// 427-pixel photo is decoded at 1/4). Each file decodes (libjpeg, like the image crate, pads what it cannot
/// read) or is refused with a message naming it; nothing panics. Fresh corruptions on every run; the seed is
/// printed, `HEGRAPH_TEST_SEED` replays it.
#[test]
fn damaged_jpegs_on_the_reduced_scale_path_decode_or_name_the_file() {
    use hegraph::clip::preprocess::load_for_model;
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read(photo("rocket.jpg")).unwrap();
    assert_eq!(
        load_for_model(&photo("rocket.jpg"), 32).unwrap().scale_down,
        4
    );
    // Where the compressed data starts: the headers end at the first start-of-scan marker.
    let sos = original.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let mut rng = Rng::for_test("damaged_jpegs_on_the_reduced_scale_path_decode_or_name_the_file");
    let (mut decoded, mut refused) = (0, 0);
    for case in 0..600 {
        let mut bytes = original.clone();
        // Half the cases hit the headers (tables, frame), half anywhere.
        let span = if case % 2 == 0 { sos + 2 } else { bytes.len() };
        for _ in 0..1 + rng.below(6) {
            let at = rng.below(span);
            bytes[at] = rng.below(256) as u8;
        }
        let path = dir.path().join(format!("damaged-{case}.jpg"));
        std::fs::write(&path, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| load_for_model(&path, 32).map(|d| d.dimensions()));
        match result {
            Ok(Ok((w, h))) => {
                assert!(w > 0 && h > 0, "case {case}: empty image");
                decoded += 1;
            }
            Ok(Err(e)) => {
                let e = err_text(e);
                assert!(
                    e.contains(&format!("damaged-{case}.jpg")),
                    "case {case}: {e}"
                );
                refused += 1;
            }
            Err(_) => panic!("case {case}: decoding panicked"),
        }
    }
    println!("damaged JPEGs: {decoded} decoded, {refused} refused with the file named");
    assert!(
        decoded > 0 && refused > 0,
        "{decoded} decoded, {refused} refused"
    );
}

/// A picture with alpha that is taller than one conversion strip composites on white as before, row for row.
#[test]
fn alpha_is_composited_the_same_across_conversion_strips() {
    let dir = tempfile::tempdir().unwrap();
    let img = RgbaImage::from_fn(37, 300, |x, y| {
        Rgba([
            (x * 7) as u8,
            (y % 256) as u8,
            (x * y % 256) as u8,
            ((x + y) * 3 % 256) as u8,
        ])
    });
    let path = dir.path().join("strips.png");
    img.save(&path).unwrap();
    let rgb = load_rgb(&path).unwrap();
    for (x, y, p) in img.enumerate_pixels() {
        let a = f32::from(p.0[3]) / 255.0;
        for c in 0..3 {
            let v = (f32::from(p.0[c]) / 255.0) * a + (1.0 - a);
            assert_eq!(
                rgb.get_pixel(x, y).0[c],
                (v * 255.0).round() as u8,
                "({x},{y}) {c}"
            );
        }
    }
}

// ---------------------------------------------------------------- the model

#[test]
fn test_checkpoint_loads_and_says_what_it_is() {
    let (dir, model) = tiny_model();
    let info = model.info();
    assert!(info.is_test_checkpoint);
    assert_eq!(info.name, "hegraph-test-checkpoint");
    assert_eq!((info.embed_dim, info.image_size), (64, 32));
    assert_eq!(info.dir, dir.path());
    assert!(
        info.banner()
            .contains("TEST CHECKPOINT (random weights): predictions are not meaningful"),
        "{}",
        info.banner()
    );
    let (name, hash) = info.id.split_once('@').unwrap();
    assert_eq!(name, "hegraph-test-checkpoint");
    assert!(
        hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{}",
        info.id
    );

    // The id follows the checkpoint: same seed, same id; another seed's header is the same but its config
    // records the seed, so the id differs.
    let again = tempfile::tempdir().unwrap();
    write_test_checkpoint(again.path(), &TestCheckpointConfig::tiny(), 7).unwrap();
    assert_eq!(ClipModel::load(again.path()).unwrap().info().id, info.id);
    write_test_checkpoint(again.path(), &TestCheckpointConfig::tiny(), 8).unwrap();
    assert_ne!(ClipModel::load(again.path()).unwrap().info().id, info.id);

    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClipModel>();
}

#[test]
fn checkpoint_has_hugging_face_tensor_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 1).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.path().join(WEIGHTS_FILE), &candle_core::Device::Cpu)
            .unwrap();
    let shape = |n: &str| tensors[n].dims().to_vec();
    assert_eq!(
        shape("text_model.embeddings.token_embedding.weight"),
        [49408, 64]
    );
    assert_eq!(
        shape("text_model.embeddings.position_embedding.weight"),
        [77, 64]
    );
    assert_eq!(
        shape("text_model.encoder.layers.1.mlp.fc1.weight"),
        [256, 64]
    );
    assert_eq!(shape("text_model.final_layer_norm.weight"), [64]);
    assert_eq!(
        shape("vision_model.embeddings.patch_embedding.weight"),
        [64, 3, 8, 8]
    );
    assert_eq!(
        shape("vision_model.embeddings.position_embedding.weight"),
        [17, 64]
    );
    assert_eq!(shape("vision_model.embeddings.class_embedding"), [64]);
    assert_eq!(shape("vision_model.pre_layrnorm.bias"), [64]);
    assert_eq!(shape("vision_model.post_layernorm.weight"), [64]);
    assert_eq!(
        shape("vision_model.encoder.layers.0.self_attn.q_proj.weight"),
        [64, 64]
    );
    assert_eq!(shape("visual_projection.weight"), [64, 64]);
    assert_eq!(shape("text_projection.weight"), [64, 64]);
    assert_eq!(shape("logit_scale"), Vec::<usize>::new());
    // Embeddings (3 text, 4 vision, position_ids included), 3 layer norms, 16 tensors in each of the 4
    // layers, 2 projections and logit_scale.
    assert_eq!(tensors.len(), 7 + 3 * 2 + 16 * 4 + 3);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["hegraph_test_checkpoint"], true);
    assert_eq!(config["vision_config"]["image_size"], 32);
    assert_eq!(
        std::fs::read(dir.path().join(TOKENIZER_FILE)).unwrap(),
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/clip-tokenizer/tokenizer.json")
        )
        .unwrap()
    );
}

#[test]
fn incomplete_or_broken_dirs_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 2).unwrap();
    let weights = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();

    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    let e = err_text(ClipModel::load(dir.path()).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("missing"),
        "{e}"
    );

    std::fs::write(dir.path().join(WEIGHTS_FILE), &weights[..weights.len() / 3]).unwrap();
    let e = err_text(ClipModel::load(dir.path()).unwrap_err());
    assert!(e.contains("model.safetensors"), "{e}");

    std::fs::write(dir.path().join(WEIGHTS_FILE), &weights).unwrap();
    std::fs::write(
        dir.path().join(CONFIG_FILE),
        b"{\"vision_config\": {\"hidden_act\": \"gelu\"}}",
    )
    .unwrap();
    let e = err_text(ClipModel::load(dir.path()).unwrap_err());
    assert!(e.contains("config.json") && e.contains("gelu"), "{e}");

    // A config whose sizes disagree with the weights: candle's shape check, reported against the file.
    let mut cfg = TestCheckpointConfig::tiny();
    cfg.text_layers = 1;
    write_test_checkpoint(dir.path(), &cfg, 2).unwrap();
    std::fs::write(dir.path().join(WEIGHTS_FILE), &weights).unwrap();
    assert!(
        ClipModel::load(dir.path()).is_ok(),
        "extra layers in the file are ignored, as in HF"
    );
    let mut cfg = TestCheckpointConfig::tiny();
    cfg.projection_dim = 32;
    write_test_checkpoint(dir.path(), &cfg, 2).unwrap();
    std::fs::write(dir.path().join(WEIGHTS_FILE), &weights).unwrap();
    let e = err_text(ClipModel::load(dir.path()).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("projection"),
        "{e}"
    );

    std::fs::remove_file(dir.path().join(TOKENIZER_FILE)).unwrap();
    let e = err_text(ClipModel::load(dir.path()).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn tokenisation_matches_clip_ids_and_truncates() {
    let (_dir, model) = tiny_model();
    assert_eq!(
        model.tokenize("a photo of a cat").unwrap(),
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
    assert_eq!(model.tokenize("").unwrap(), [49406, 49407]);
    let long = "a very long description of a photograph ".repeat(30);
    let ids = model.tokenize(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&t| t < 49406));
}

#[test]
fn encodings_have_the_right_shapes_and_unit_norms() {
    let (_dir, model) = tiny_model();
    let names = ["chelsea.png", "rocket.jpg", "coins.png", "horse.png"];
    let paths: Vec<PathBuf> = names.iter().map(|n| photo(n)).collect();
    let tensors: Vec<ImageTensor> = prepare_batch(&paths, model.info().image_size)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let img = model.encode_images(&tensors).unwrap();
    assert_eq!(img.shape(), (4, 64));
    for i in 0..4 {
        assert!((row_norm(&img, i) - 1.0).abs() < 1e-4);
    }
    assert!(
        cosine(img.row(0), img.row(1)) < 0.9999,
        "different photos, different embeddings"
    );

    let texts: Vec<String> = [
        "a photo of a cat",
        "a rocket",
        "an astronaut floating in space above the earth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let txt = model.encode_texts(&texts).unwrap();
    assert_eq!(txt.shape(), (3, 64));
    for i in 0..3 {
        assert!((row_norm(&txt, i) - 1.0).abs() < 1e-4);
    }
    assert!(cosine(txt.row(0), txt.row(1)) < 0.9999);

    assert_eq!(model.encode_images(&[]).unwrap().shape(), (0, 64));
    assert_eq!(model.encode_texts(&[]).unwrap().shape(), (0, 64));

    // A tensor preprocessed at another size is refused, not silently misread.
    let wrong = center_crop(&load_rgb(&paths[0]).unwrap(), 224);
    let e = err_text(model.encode_images(&[wrong]).unwrap_err());
    assert!(e.contains("224") && e.contains("32"), "{e}");
}

#[test]
fn batching_and_padding_do_not_change_embeddings() {
    let (_dir, model) = tiny_model();
    let s = model.info().image_size;
    let a = center_crop(&load_rgb(&photo("chelsea.png")).unwrap(), s);
    let b = center_crop(&load_rgb(&photo("moon.png")).unwrap(), s);
    let both = model.encode_images(&[a.clone(), b.clone()]).unwrap();
    let only_a = model.encode_images(&[a]).unwrap();
    let only_b = model.encode_images(&[b]).unwrap();
    assert!(both.select_rows(&[0]).max_abs_diff(&only_a) < 1e-5);
    assert!(both.select_rows(&[1]).max_abs_diff(&only_b) < 1e-5);

    // The short prompt is padded to the long one's length in the batch: the pooled end token must not see
    // the padding.
    let short = "a cat".to_string();
    let long =
        "a photograph of a small tabby cat sitting on a wooden floor next to a door".to_string();
    let batch = model.encode_texts(&[short.clone(), long.clone()]).unwrap();
    let alone = model.encode_texts(&[short]).unwrap();
    assert!(batch.select_rows(&[0]).max_abs_diff(&alone) < 1e-5);
    assert!(
        batch
            .select_rows(&[1])
            .max_abs_diff(&model.encode_texts(&[long]).unwrap())
            < 1e-5
    );
}

/// The fused CPU towers (`clip::cpu`) against candle-transformers' CLIP run as before
/// (`clip::reference`), on a tiny checkpoint whose query and key weights are scaled up so that attention is
/// sharp (at the test checkpoint's initial scales it is nearly uniform, which would hide a wrong mask or
/// softmax). Images in one batch and alone; prompts of different lengths packed, against the reference's
/// padded batch, including one truncated to the full context.
#[test]
fn fused_towers_match_candle_transformers_clip() {
    let dir = tempfile::tempdir().unwrap();
    write_test_checkpoint(dir.path(), &TestCheckpointConfig::tiny(), 11).unwrap();
    let weights = dir.path().join(WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.contains("q_proj.weight") || name.contains("k_proj.weight") {
            *t = (&*t * 6.0).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let model = ClipModel::load(dir.path()).unwrap();
    let reference = hegraph::clip::reference::ReferenceClip::load(dir.path()).unwrap();

    let s = model.info().image_size;
    let names = [
        "chelsea.png",
        "rocket.jpg",
        "coins.png",
        "horse.png",
        "moon.png",
    ];
    let images: Vec<ImageTensor> = names
        .iter()
        .map(|n| center_crop(&load_rgb(&photo(n)).unwrap(), s))
        .collect();
    let want = reference.encode_images(&images).unwrap();
    let got = model.encode_images(&images).unwrap();
    let alone = model.encode_images(&images[2..3]).unwrap();
    for r in 0..images.len() {
        let c = cosine(got.row(r), want.row(r));
        assert!(c >= 0.99999, "image {r}: cosine {c} against the reference");
    }
    assert!(cosine(alone.row(0), want.row(2)) >= 0.99999);
    assert!(
        cosine(want.row(0), want.row(1)) < 0.999,
        "the check must see the images differ"
    );

    let texts: Vec<String> = [
        "a cat",
        "a photo of a rocket on its launch pad at night",
        "",
        &"a very long description of a photograph ".repeat(30),
        "two dogs",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    assert_eq!(ids[3].len(), 77);
    let want = reference.encode_token_ids(&ids).unwrap();
    let got = model.encode_texts(&texts).unwrap();
    for r in 0..texts.len() {
        let c = cosine(got.row(r), want.row(r));
        assert!(c >= 0.99999, "prompt {r}: cosine {c} against the reference");
    }
    assert!(
        cosine(want.row(0), want.row(4)) < 0.999,
        "the check must see the prompts differ"
    );
}

#[test]
fn file_and_memory_decoding_give_the_same_embedding() {
    let (_dir, model) = tiny_model();
    let s = model.info().image_size;
    for name in ["chelsea.png", "rocket.jpg"] {
        let from_file = load_rgb(&photo(name)).unwrap();
        let from_mem = load_rgb_from_memory(&std::fs::read(photo(name)).unwrap()).unwrap();
        assert_eq!(from_file, from_mem);
        let e1 = model.encode_images(&[center_crop(&from_file, s)]).unwrap();
        let e2 = model.encode_images(&[center_crop(&from_mem, s)]).unwrap();
        assert_eq!(e1, e2, "{name}");
    }
}

#[test]
fn half_precision_weights_load_as_f32() {
    let (_dir, model) = tiny_model();
    let dir16 = tempfile::tempdir().unwrap();
    let mut cfg = TestCheckpointConfig::tiny();
    cfg.half_precision = true;
    write_test_checkpoint(dir16.path(), &cfg, 7).unwrap();
    let header = std::fs::read(dir16.path().join(WEIGHTS_FILE)).unwrap();
    assert!(String::from_utf8_lossy(&header[..4096]).contains("F16"));
    let model16 = ClipModel::load(dir16.path()).unwrap();
    let texts = vec!["a photo of a cat".to_string(), "a rocket".to_string()];
    let t32 = model.encode_texts(&texts).unwrap();
    let t16 = model16.encode_texts(&texts).unwrap();
    let img = center_crop(&load_rgb(&photo("astronaut.png")).unwrap(), 32);
    let i32_ = model.encode_images(std::slice::from_ref(&img)).unwrap();
    let i16_ = model16.encode_images(&[img]).unwrap();
    for (a, b) in [(&t32, &t16), (&i32_, &i16_)] {
        for r in 0..a.rows {
            let c = cosine(a.row(r), b.row(r));
            assert!(c > 0.99, "F16 weights drift too far: cosine {c}");
        }
    }
}

#[test]
fn the_model_can_be_shared_across_threads() {
    let (_dir, model) = tiny_model();
    let model = std::sync::Arc::new(model);
    let texts = vec!["a photo of a horse".to_string()];
    let reference = model.encode_texts(&texts).unwrap();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let m = model.clone();
            let t = texts.clone();
            std::thread::spawn(move || m.encode_texts(&t).unwrap())
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().max_abs_diff(&reference) < 1e-6);
    }
}

#[test]
fn bench_reports_positive_rates() {
    let (_dir, model) = tiny_model();
    let photos = [photo("chelsea.png"), photo("coins.png")];
    let b = bench_clip_with(&model, &photos, 0.0).unwrap();
    assert!(
        b.images_per_s_batch1 > 0.0 && b.images_per_s_batch32 > 0.0 && b.ms_per_1000_prompts > 0.0
    );
    let text = b.to_string();
    assert!(
        text.contains("TEST CHECKPOINT") && text.contains("batch 32"),
        "{text}"
    );
    assert!(bench_clip(&model, &[]).is_err());
    let e = err_text(bench_clip(&model, &[photos_dir().join("README.md")]).unwrap_err());
    assert!(e.contains("README.md"), "{e}");
}

// ---------------------------------------------------------------- finding a model

/// Restores an environment variable when dropped, so a failing assertion does not leak state into the
/// other tests.
struct EnvGuard(&'static str, Option<std::ffi::OsString>);

impl EnvGuard {
    fn set(key: &'static str, value: Option<&Path>) -> Self {
        let old = std::env::var_os(key);
        match value {
            Some(v) => std::env::set_var(key, v),
            None => std::env::remove_var(key),
        }
        EnvGuard(key, old)
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        match &self.1 {
            Some(v) => std::env::set_var(self.0, v),
            None => std::env::remove_var(self.0),
        }
    }
}

#[test]
fn resolve_model_dir_follows_the_look_up_order() {
    let _lock = env_lock();
    let good = tempfile::tempdir().unwrap();
    write_test_checkpoint(good.path(), &TestCheckpointConfig::tiny(), 3).unwrap();
    let incomplete = tempfile::tempdir().unwrap();
    std::fs::write(incomplete.path().join(CONFIG_FILE), b"{}").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let _xdg = EnvGuard::set("XDG_CACHE_HOME", Some(cache.path()));

    // Explicit wins over the environment.
    let _env = EnvGuard::set("HEGRAPH_MODEL_DIR", Some(incomplete.path()));
    assert_eq!(
        resolve_model_dir(Some(good.path()), false).unwrap(),
        good.path()
    );
    let e = err_text(resolve_model_dir(Some(incomplete.path()), false).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("tokenizer.json"),
        "{e}"
    );

    // The environment variable, complete or not.
    let e = err_text(resolve_model_dir(None, false).unwrap_err());
    assert!(
        e.contains("HEGRAPH_MODEL_DIR") && e.contains("model.safetensors"),
        "{e}"
    );
    let _env = EnvGuard::set("HEGRAPH_MODEL_DIR", Some(good.path()));
    assert_eq!(resolve_model_dir(None, false).unwrap(), good.path());

    // Nothing anywhere and no downloads: an error that says how to provide the model by hand.
    let _env = EnvGuard::set("HEGRAPH_MODEL_DIR", None);
    let user_dir = hegraph::clip::user_model_dir().unwrap();
    if user_dir.starts_with(cache.path()) {
        let e = err_text(resolve_model_dir(None, false).unwrap_err());
        assert!(
            e.contains("huggingface.co/openai/clip-vit-base-patch32")
                && e.contains("HEGRAPH_MODEL_DIR")
                && e.contains("disabled"),
            "{e}"
        );
        // A complete user cache dir is found without any download.
        write_test_checkpoint(&user_dir, &TestCheckpointConfig::tiny(), 3).unwrap();
        assert_eq!(resolve_model_dir(None, false).unwrap(), user_dir);
        assert!(user_dir.ends_with("hegraph/models/openai--clip-vit-base-patch32"));
    } else {
        println!(
            "user cache dir {} ignores XDG_CACHE_HOME on this platform: skipping the user-cache part",
            user_dir.display()
        );
    }
}

// ---------------------------------------------------------------- real checkpoint only

#[test]
fn zero_shot_on_real_photos_with_a_real_checkpoint() {
    let dir = {
        let _lock = env_lock();
        std::env::var_os("HEGRAPH_MODEL_DIR")
    };
    let Some(dir) = dir else {
        println!("skipped: zero-shot needs a real CLIP checkpoint; set HEGRAPH_MODEL_DIR to one");
        return;
    };
    let model = ClipModel::load(Path::new(&dir)).unwrap();
    if model.info().is_test_checkpoint {
        println!("skipped: HEGRAPH_MODEL_DIR holds a test checkpoint (random weights), not CLIP");
        return;
    }
    println!("{}", model.info().banner());
    let cases = [
        ("chelsea.png", "a photo of a cat"),
        ("rocket.jpg", "a rocket"),
        ("coffee.png", "a cup of coffee"),
        ("astronaut.png", "an astronaut"),
    ];
    let prompts: Vec<String> = cases.iter().map(|(_, p)| p.to_string()).collect();
    let paths: Vec<PathBuf> = cases.iter().map(|(f, _)| photo(f)).collect();
    let images: Vec<ImageTensor> = prepare_batch(&paths, model.info().image_size)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let sims = model
        .encode_images(&images)
        .unwrap()
        .matmul_t(&model.encode_texts(&prompts).unwrap());
    for (i, (file, prompt)) in cases.iter().enumerate() {
        let row = sims.row(i);
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(
            best, i,
            "{file}: {:?} won over {prompt:?} ({row:?})",
            prompts[best]
        );
    }
}

/// Cancels the job at its first progress report after the stage starts counting.
struct CancelOnUpdate(
    hegraph::progress::CancelToken,
    std::sync::atomic::AtomicUsize,
);

impl hegraph::progress::Progress for CancelOnUpdate {
    fn update(&self, _done: usize, _total: usize) {
        // The first update reports what the cache already held; cancel after the first batch is encoded.
        if self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 1 {
            self.0.cancel();
        }
    }
}

/// The embedding pipeline decodes the next batch while one encodes: batches of one image must give the
/// rows one big batch gives, each image in its place, and a cancel between batches must end the run (the
/// decoding thread stops too) with what was encoded kept in the cache.
#[test]
fn pipelined_embedding_matches_one_batch_and_stops_on_cancel() {
    use hegraph::extract::{EmbedOptions, Embedder, ExtractError};
    use hegraph::progress::{CancelToken, NoProgress};
    let (_dir, model) = tiny_model();
    let model = std::sync::Arc::new(model);
    let names = [
        "chelsea.png",
        "rocket.jpg",
        "coins.png",
        "horse.png",
        "moon.png",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|n| photo(n)).collect();
    let embed =
        |batch_size: usize, progress: &dyn hegraph::progress::Progress, cancel: &CancelToken| {
            let cache = tempfile::tempdir().unwrap();
            let e = Embedder::new(
                model.clone(),
                EmbedOptions {
                    batch_size,
                    cache_dir: Some(cache.path().to_path_buf()),
                    ..EmbedOptions::default()
                },
            )
            .unwrap();
            (e.embed_images(&paths, &[0, 1], progress, cancel), cache)
        };
    let (whole, _c1) = embed(32, &NoProgress, &CancelToken::new());
    let (piecewise, _c2) = embed(1, &NoProgress, &CancelToken::new());
    let (whole, _) = whole.unwrap();
    let (piecewise, stats) = piecewise.unwrap();
    assert_eq!(stats.features_computed, 2 * names.len());
    for v in 0..2 {
        assert!(
            whole.per_view[v].max_abs_diff(&piecewise.per_view[v]) < 1e-5,
            "view {v}"
        );
    }
    assert!(cosine(whole.per_view[0].row(0), whole.per_view[0].row(1)) < 0.9999);

    let cancel = CancelToken::new();
    let progress = CancelOnUpdate(cancel.clone(), Default::default());
    let (r, cache) = embed(1, &progress, &cancel);
    assert!(matches!(r, Err(ExtractError::Cancelled)), "{:?}", r.err());
    // What was encoded before the cancel is in the cache: a second run computes only the rest.
    let e = Embedder::new(
        model.clone(),
        EmbedOptions {
            batch_size: 1,
            cache_dir: Some(cache.path().to_path_buf()),
            ..EmbedOptions::default()
        },
    )
    .unwrap();
    let (again, stats) = e
        .embed_images(&paths, &[0, 1], &NoProgress, &CancelToken::new())
        .unwrap();
    assert!(stats.features_from_cache >= 2, "{stats:?}");
    assert!(stats.features_computed < 2 * names.len(), "{stats:?}");
    assert!(again.per_view[0].max_abs_diff(&whole.per_view[0]) < 1e-5);
}
