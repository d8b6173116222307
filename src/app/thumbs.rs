//! Thumbnails off the UI thread: a small pool of decoder threads fed with "what is on screen now", and a
//! texture cache with an LRU bound.
//!
//! Why this shape: scrolling through 10,000 photos must never wait for a decoder. Each frame the grid says which
//! images it shows ([`ThumbCache::want`]); the wish list *replaces* the queue, so images scrolled past are never
//! decoded, and the first wished image is decoded first (the preview, then the rows from the top). Decoded
//! images come back over a channel and are uploaded a few per frame; the cache keeps at most `capacity`
//! textures and drops the least recently drawn ones.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

use egui::{ColorImage, TextureHandle, TextureOptions};

/// Which picture of which image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThumbKey {
    pub image: usize,
    /// The large preview rather than the grid thumbnail.
    pub large: bool,
}

/// Longest side of a grid thumbnail and of the preview, in pixels. 256 keeps thumbnails sharp up to 2×
/// scaling of the largest grid size.
pub const THUMB_SIDE: u32 = 256;
pub const PREVIEW_SIDE: u32 = 1024;
/// Previews kept as textures (the current one and a few to go back to).
pub const MAX_PREVIEWS: usize = 6;

struct Request {
    key: ThumbKey,
    path: PathBuf,
}

#[derive(Default)]
struct Queue {
    /// Back = next to decode.
    stack: Vec<Request>,
    in_flight: HashSet<ThumbKey>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

type Decoded = (ThumbKey, Result<ColorImage, String>);

/// What the grid draws for one image.
pub enum Thumb<'a> {
    Ready(&'a TextureHandle),
    Loading,
    Failed(&'a str),
}

enum Entry {
    Texture(TextureHandle),
    Failed(String),
}

pub struct ThumbCache {
    shared: Arc<Shared>,
    results: Receiver<Decoded>,
    entries: HashMap<ThumbKey, (Entry, u64)>,
    capacity: usize,
    frame: u64,
    last_wish: Vec<ThumbKey>,
    paths: Vec<PathBuf>,
}

impl ThumbCache {
    /// `paths[i]` is image `i`. `threads` decoders (at least one), `capacity` textures at most.
    pub fn new(ctx: &egui::Context, paths: Vec<PathBuf>, threads: usize, capacity: usize) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let (tx, rx) = channel();
        for n in 0..threads.max(1) {
            let shared = Arc::clone(&shared);
            let tx: Sender<Decoded> = tx.clone();
            let ctx = ctx.clone();
            // A thread that cannot start leaves the others; with none, thumbnails stay "loading" and the
            // rest of the app works.
            let _ = std::thread::Builder::new()
                .name(format!("hegraph-thumb-{n}"))
                .spawn(move || worker(&shared, &tx, &ctx));
        }
        Self {
            shared,
            results: rx,
            entries: HashMap::new(),
            capacity: capacity.max(16),
            frame: 0,
            last_wish: Vec::new(),
            paths,
        }
    }

    /// Call once per frame before drawing: takes decoded images in (at most `max_uploads` new textures, so a
    /// burst of results does not stall a frame) and trims the cache.
    pub fn begin_frame(&mut self, ctx: &egui::Context, max_uploads: usize) {
        self.frame += 1;
        let mut uploaded = 0;
        while uploaded < max_uploads {
            let Ok((key, result)) = self.results.try_recv() else {
                break;
            };
            let entry = match result {
                Ok(img) => {
                    uploaded += 1;
                    let name = format!("thumb-{}-{}", key.image, key.large);
                    Entry::Texture(ctx.load_texture(name, img, TextureOptions::LINEAR))
                }
                Err(e) => Entry::Failed(e),
            };
            self.entries.insert(key, (entry, self.frame));
        }
        if uploaded == max_uploads {
            ctx.request_repaint();
        }
        if self.entries.len() > self.capacity {
            let mut ages: Vec<(u64, ThumbKey)> =
                self.entries.iter().map(|(k, (_, f))| (*f, *k)).collect();
            ages.sort_unstable_by_key(|a| a.0);
            let excess = self.entries.len() - self.capacity;
            for (f, k) in ages.into_iter().take(excess) {
                // Never drop what was drawn in the previous frame: that would thrash when the cache is
                // smaller than the screen.
                if f + 1 < self.frame {
                    self.entries.remove(&k);
                }
            }
        }
        // Previews are 16× the size of a thumbnail: only the few most recent stay.
        let mut large: Vec<(u64, ThumbKey)> = self
            .entries
            .iter()
            .filter(|(k, _)| k.large)
            .map(|(k, (_, f))| (*f, *k))
            .collect();
        if large.len() > MAX_PREVIEWS {
            large.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
            for (_, k) in large.into_iter().skip(MAX_PREVIEWS) {
                self.entries.remove(&k);
            }
        }
    }

    /// The picture for `key`, marking it as used this frame.
    pub fn get(&mut self, key: ThumbKey) -> Thumb<'_> {
        match self.entries.get_mut(&key) {
            Some((entry, used)) => {
                *used = self.frame;
                match entry {
                    Entry::Texture(t) => Thumb::Ready(t),
                    Entry::Failed(e) => Thumb::Failed(e),
                }
            }
            None => Thumb::Loading,
        }
    }

    /// The best picture of `image` there is: the large preview when it is decoded, else the grid's thumbnail
    /// (or why it failed, or that it is loading).
    pub fn preview(&mut self, image: usize) -> Thumb<'_> {
        let large = ThumbKey { image, large: true };
        let ready = matches!(self.entries.get(&large), Some((Entry::Texture(_), _)));
        self.get(if ready {
            large
        } else {
            ThumbKey {
                image,
                large: false,
            }
        })
    }

    pub fn contains(&self, key: ThumbKey) -> bool {
        self.entries.contains_key(&key)
    }

    /// Replaces the decode queue with `keys` (first = most urgent), leaving out what is cached or being
    /// decoded.
    pub fn want(&mut self, keys: &[ThumbKey]) {
        let missing: Vec<ThumbKey> = keys
            .iter()
            .copied()
            .filter(|k| !self.entries.contains_key(k) && k.image < self.paths.len())
            .collect();
        if missing == self.last_wish {
            return;
        }
        self.last_wish = missing.clone();
        let Ok(mut q) = self.shared.queue.lock() else {
            return;
        };
        let in_flight = q.in_flight.clone();
        q.stack = missing
            .into_iter()
            .rev()
            .filter(|k| !in_flight.contains(k))
            .map(|key| Request {
                key,
                path: self.paths[key.image].clone(),
            })
            .collect();
        drop(q);
        self.shared.wake.notify_all();
    }

    /// Number of textures held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True while requested pictures are still being decoded.
    pub fn busy(&self) -> bool {
        self.shared
            .queue
            .lock()
            .map(|q| !q.stack.is_empty() || !q.in_flight.is_empty())
            .unwrap_or(false)
    }
}

impl Drop for ThumbCache {
    fn drop(&mut self) {
        if let Ok(mut q) = self.shared.queue.lock() {
            q.shutdown = true;
            q.stack.clear();
        }
        self.shared.wake.notify_all();
    }
}

fn worker(shared: &Shared, tx: &Sender<Decoded>, ctx: &egui::Context) {
    loop {
        let req = {
            let Ok(mut q) = shared.queue.lock() else {
                return;
            };
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(r) = q.stack.pop() {
                    q.in_flight.insert(r.key);
                    break r;
                }
                q = match shared.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        let side = if req.key.large {
            PREVIEW_SIDE
        } else {
            THUMB_SIDE
        };
        let result = decode_thumbnail(&req.path, side);
        if let Ok(mut q) = shared.queue.lock() {
            q.in_flight.remove(&req.key);
        }
        if tx.send((req.key, result)).is_err() {
            return;
        }
        ctx.request_repaint();
    }
}

/// Decodes an image (honouring its EXIF orientation) and scales it to at most `side` pixels on its longest
/// edge, keeping transparency.
pub fn decode_thumbnail(path: &Path, side: u32) -> Result<ColorImage, String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    // Both branches hold their share of the decode budget until the thumbnail is made.
    let (img, _permit) = if reader.format() == Some(image::ImageFormat::Jpeg) {
        // No transparency to keep, and photos are mostly JPEGs many times the thumbnail's size: decoded at
        // reduced DCT scale (EXIF orientation applied), a 12-megapixel photo's thumbnail costs a few times
        // less.
        drop(reader);
        let (rgb, permit) = crate::clip::preprocess::load_at_least(path, side)
            .map_err(|e| e.to_string())?
            .into_parts();
        (image::DynamicImage::ImageRgb8(rgb), permit)
    } else {
        let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
        // The same size limits and decode budget as embedding: a hostile 16384² file must not cost every
        // thumbnail thread gigabytes.
        let (w, h) = image::ImageDecoder::dimensions(&decoder);
        let bytes = image::ImageDecoder::total_bytes(&decoder);
        let permit =
            crate::clip::preprocess::admit_decode(w, h, bytes, &path.display().to_string())
                .map_err(|e| e.to_string())?;
        let orientation = image::ImageDecoder::orientation(&mut decoder).ok();
        let mut img = image::DynamicImage::from_decoder(decoder).map_err(|e| e.to_string())?;
        if let Some(o) = orientation {
            img.apply_orientation(o);
        }
        (img, permit)
    };
    let img = if img.width() > side || img.height() > side {
        img.resize(side, side, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let rgba = img.to_rgba8();
    let size = [rgba.width() as usize, rgba.height() as usize];
    Ok(ColorImage::from_rgba_unmultiplied(size, rgba.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_real_photos_within_bounds_and_reports_bad_files() {
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos");
        let Ok(entries) = std::fs::read_dir(&photos) else {
            println!("skipped: {} is not there", photos.display());
            return;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let p = e.path();
            if !crate::data::is_image_path(&p) {
                continue;
            }
            let img = decode_thumbnail(&p, 64).unwrap();
            assert!(
                img.size[0] <= 64 && img.size[1] <= 64 && img.size[0].max(img.size[1]) == 64,
                "{p:?}"
            );
            n += 1;
        }
        assert!(n > 5);
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not a png").unwrap();
        assert!(decode_thumbnail(&bad, 64).is_err());
    }

    /// A JPEG many times the thumbnail takes the reduced-scale decode: the longest edge is exactly the
    /// thumbnail's side, EXIF rotation is applied, and the picture matches a full-size decode resized the
    /// same way to within a level on average (0.17 measured).
    #[test]
    fn large_jpegs_make_the_same_thumbnail_from_a_reduced_decode() {
        use image::ImageEncoder;
        let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos/rocket.jpg");
        let Ok(src) = image::open(&photo) else {
            println!("skipped: {} is not there", photo.display());
            return;
        };
        let big = image::imageops::resize(
            &src.to_rgb8(),
            2400,
            1600,
            image::imageops::FilterType::CatmullRom,
        );
        let dir = tempfile::tempdir().unwrap();
        for (name, exif) in [("big.jpg", None), ("big-rotated.jpg", Some(6u16))] {
            let mut bytes = Vec::new();
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 92);
            if let Some(o) = exif {
                // A little-endian TIFF block with one IFD entry: Orientation (SHORT, 1 value).
                let mut t = vec![
                    b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0,
                ];
                t.extend_from_slice(&o.to_le_bytes());
                t.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                enc.set_exif_metadata(t).unwrap();
            }
            enc.write_image(big.as_raw(), 2400, 1600, image::ExtendedColorType::Rgb8)
                .unwrap();
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let thumb = decode_thumbnail(&path, THUMB_SIDE).unwrap();
            // Reference: the whole file decoded at full size, rotated, resized the same way.
            let mut full = image::open(&path).unwrap();
            if exif.is_some() {
                full = full.rotate90();
            }
            let want = full
                .resize(
                    THUMB_SIDE,
                    THUMB_SIDE,
                    image::imageops::FilterType::Triangle,
                )
                .to_rgba8();
            assert_eq!(
                thumb.size,
                [want.width() as usize, want.height() as usize],
                "{name}"
            );
            assert_eq!(thumb.size[0].max(thumb.size[1]), THUMB_SIDE as usize);
            let diff: f64 = thumb
                .pixels
                .iter()
                .zip(want.pixels())
                .map(|(a, b)| {
                    (0..3)
                        .map(|c| (f64::from(a.to_array()[c]) - f64::from(b.0[c])).abs())
                        .sum::<f64>()
                })
                .sum::<f64>()
                / (thumb.pixels.len() * 3) as f64;
            println!(
                "{name}: thumbnail differs from the full decode's by {diff:.2} levels on average"
            );
            assert!(diff < 1.0, "{name}: mean difference {diff:.2} levels");
        }
    }

    #[test]
    fn cache_loads_wished_images_and_stays_within_capacity() {
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&photos)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| crate::data::is_image_path(p))
                    .collect()
            })
            .unwrap_or_default();
        if paths.is_empty() {
            println!("skipped: no photos in {}", photos.display());
            return;
        }
        paths.sort();
        // Repeat the photos to get more images than the cache holds.
        let paths: Vec<PathBuf> = paths.iter().cycle().take(40).cloned().collect();
        let ctx = egui::Context::default();
        let mut cache = ThumbCache::new(&ctx, paths, 2, 16);
        let keys: Vec<ThumbKey> = (0..40)
            .map(|image| ThumbKey {
                image,
                large: false,
            })
            .collect();
        // Ask for windows of 8 images in turn, as a scrolling grid would; each window gets fully loaded.
        for window in keys.chunks(8) {
            loop {
                cache.begin_frame(&ctx, 100);
                cache.want(window);
                let ready = window
                    .iter()
                    .filter(|k| matches!(cache.get(**k), Thumb::Ready(_)))
                    .count();
                if ready == window.len() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        cache.begin_frame(&ctx, 100);
        cache.begin_frame(&ctx, 100);
        assert!(cache.len() <= 16 + 8, "{} textures", cache.len());
        // Previews: many asked for in turn, few kept.
        for image in 0..12 {
            let key = ThumbKey { image, large: true };
            while !matches!(cache.get(key), Thumb::Ready(_)) {
                cache.begin_frame(&ctx, 100);
                cache.want(&[key]);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        cache.begin_frame(&ctx, 100);
        let previews = (0..12)
            .filter(|&image| cache.contains(ThumbKey { image, large: true }))
            .count();
        assert!(previews <= MAX_PREVIEWS, "{previews} previews kept");
        assert!(
            cache.contains(ThumbKey {
                image: 11,
                large: true
            }),
            "the newest preview is kept"
        );
        assert!(!cache.busy());
    }
}
