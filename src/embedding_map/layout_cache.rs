//! Finished t-SNE layouts on disk, so reopening a folder shows its map at once instead of after half a minute.
//!
//! A layout is a pure function of the image features and the settings, so it is keyed by a blake3 hash of
//! both (and of [`super::tsne::RECIPE`], which changes whenever the way a layout is made does): any change of
//! an image, of the model or of a setting is a new key, and nothing has to be invalidated. The class text
//! nodes are not stored: they are placed anew from the layout in milliseconds, so renaming a class does not
//! cost a new layout.
//!
//! Files live in `<feature cache dir>/maps/`, next to the features they were made from, one per layout:
//! `tsne-<key>.bin` = magic and version, the full key, `N`, `N×2` little-endian f32, then a blake3 checksum
//! of all that. They are written as project files are (`project::atomic_write`: a temporary file in the same
//! folder, fsynced and renamed), so a reader never sees half a file. A file that is short, fails its
//! checksum, holds another key or another `N`, or a non-finite coordinate is reported and recomputed, never
//! trusted; the recomputed layout replaces it.
//! At most [`MAX_FILES`] layouts are kept, the least recently written go first.

use std::fs;
use std::path::{Path, PathBuf};

use super::TsneParams;
use crate::linalg::Mat;

const MAGIC: &[u8; 16] = b"hegraph-tsne-map";
const VERSION: u32 = 1;
const PREFIX: &str = "tsne-";
const SUFFIX: &str = ".bin";
/// 10,000 images are 80 kB a layout, so this is a few MB at most.
pub const MAX_FILES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LayoutCacheError {
    #[error("map layout cache: {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map layout cache: {} is damaged or not this map's ({why}); ignored", path.display())]
    Damaged { path: PathBuf, why: &'static str },
}

/// The layouts under one folder.
#[derive(Clone, Debug)]
pub struct LayoutCache {
    dir: PathBuf,
}

/// A layout's key: blake3 of the recipe, the settings and the feature rows.
pub type LayoutKey = [u8; 32];

impl LayoutCache {
    /// The layouts kept under `feature_cache_dir` (in its `maps` folder, made when the first is stored).
    pub fn new(feature_cache_dir: &Path) -> Self {
        Self {
            dir: feature_cache_dir.join("maps"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key(features: &Mat, params: &TsneParams) -> LayoutKey {
        let mut h = blake3::Hasher::new();
        h.update(super::tsne::RECIPE.as_bytes());
        h.update(&(features.rows as u64).to_le_bytes());
        h.update(&(features.cols as u64).to_le_bytes());
        h.update(&params.perplexity_for(features.rows).to_le_bytes());
        h.update(&params.theta.to_le_bytes());
        h.update(&(params.iterations as u64).to_le_bytes());
        h.update(&(params.pca_dims as u64).to_le_bytes());
        h.update(&params.seed.to_le_bytes());
        let mut bytes = Vec::with_capacity(4 * 4096);
        for chunk in features.data.chunks(4096) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            h.update(&bytes);
        }
        *h.finalize().as_bytes()
    }

    /// Where the layout of `key` is stored.
    pub fn path(&self, key: &LayoutKey) -> PathBuf {
        let hex = blake3::Hash::from_bytes(*key).to_hex();
        self.dir.join(format!("{PREFIX}{}{SUFFIX}", &hex[..32]))
    }

    /// The stored layout of `key` for `n` images; `Ok(None)` when there is none.
    pub fn load(
        &self,
        key: &LayoutKey,
        n: usize,
    ) -> Result<Option<Vec<[f32; 2]>>, LayoutCacheError> {
        let path = self.path(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LayoutCacheError::Io { path, source }),
        };
        let damaged = |why| LayoutCacheError::Damaged {
            path: path.clone(),
            why,
        };
        let header = MAGIC.len() + 4 + 32 + 8;
        if bytes.len() < header + 32 {
            return Err(damaged("too short"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(damaged("bad checksum"));
        }
        if &body[..MAGIC.len()] != MAGIC {
            return Err(damaged("not a layout file"));
        }
        let mut at = MAGIC.len();
        let mut take = |len: usize| {
            let s = &body[at..at + len];
            at += len;
            s
        };
        let version = u32::from_le_bytes(take(4).try_into().map_err(|_| damaged("too short"))?);
        if version != VERSION {
            return Err(damaged("another format version"));
        }
        if take(32) != key {
            return Err(damaged("made from other features or settings"));
        }
        let rows = u64::from_le_bytes(take(8).try_into().map_err(|_| damaged("too short"))?);
        if rows != n as u64 {
            return Err(damaged("another number of images"));
        }
        let coords = &body[header..];
        if coords.len() != n * 8 {
            return Err(damaged("wrong length"));
        }
        let points: Vec<[f32; 2]> = coords
            .chunks_exact(8)
            .map(|c| {
                let f = |i: usize| f32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
                [f(0), f(4)]
            })
            .collect();
        if !points.iter().flatten().all(|v| v.is_finite()) {
            return Err(damaged("a coordinate is not finite"));
        }
        Ok(Some(points))
    }

    /// Stores the layout of `key` atomically (replacing a damaged file of that key), then drops the oldest
    /// layouts beyond [`MAX_FILES`].
    pub fn store(&self, key: &LayoutKey, points: &[[f32; 2]]) -> Result<(), LayoutCacheError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LayoutCacheError::Io { path, source }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let mut body = Vec::with_capacity(MAGIC.len() + 44 + points.len() * 8 + 32);
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&VERSION.to_le_bytes());
        body.extend_from_slice(key);
        body.extend_from_slice(&(points.len() as u64).to_le_bytes());
        for p in points {
            body.extend_from_slice(&p[0].to_le_bytes());
            body.extend_from_slice(&p[1].to_le_bytes());
        }
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        let path = self.path(key);
        crate::project::atomic_write(&path, &body).map_err(io(&path))?;
        self.prune();
        Ok(())
    }

    /// Removes the least recently written layouts beyond [`MAX_FILES`]. Best effort: a file another process
    /// removed first, or one that cannot be removed, is no problem.
    fn prune(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(PREFIX) && name.ends_with(SUFFIX)
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= MAX_FILES {
            return;
        }
        files.sort();
        for (_, p) in &files[..files.len() - MAX_FILES] {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> Mat {
        Mat::from_rows(&[vec![1.0, 0.0], vec![0.0, 1.0], vec![0.6, 0.8]], 2)
    }

    #[test]
    fn a_stored_layout_loads_back_and_a_damaged_or_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayoutCache::new(dir.path());
        let params = TsneParams::default();
        let key = LayoutCache::key(&features(), &params);
        assert!(cache.load(&key, 3).unwrap().is_none());
        let pts = vec![[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]];
        cache.store(&key, &pts).unwrap();
        assert_eq!(cache.load(&key, 3).unwrap(), Some(pts.clone()));
        assert!(matches!(
            cache.load(&key, 4),
            Err(LayoutCacheError::Damaged { .. })
        ));
        // Another setting is another key (and file).
        let other = TsneParams {
            iterations: 10,
            ..params.clone()
        };
        let key2 = LayoutCache::key(&features(), &other);
        assert_ne!(key, key2);
        assert!(cache.load(&key2, 3).unwrap().is_none());
        // A file of another key under this key's name (e.g. copied over it) is refused.
        fs::copy(cache.path(&key), cache.path(&key2)).unwrap();
        assert!(matches!(
            cache.load(&key2, 3),
            Err(LayoutCacheError::Damaged { .. })
        ));
        // Every flipped byte and every truncation is caught.
        let good = fs::read(cache.path(&key)).unwrap();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(cache.path(&key), &bad).unwrap();
            assert!(cache.load(&key, 3).is_err(), "byte {i}");
        }
        for len in [0, 10, good.len() - 1] {
            fs::write(cache.path(&key), &good[..len]).unwrap();
            assert!(cache.load(&key, 3).is_err(), "length {len}");
        }
        // Storing again repairs it; no temporary file is left behind.
        cache.store(&key, &pts).unwrap();
        assert_eq!(cache.load(&key, 3).unwrap(), Some(pts));
        let names: Vec<String> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with(PREFIX)), "{names:?}");
    }

    #[test]
    fn only_the_newest_layouts_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayoutCache::new(dir.path());
        for i in 0..MAX_FILES + 3 {
            let params = TsneParams {
                seed: i as u64,
                ..Default::default()
            };
            let key = LayoutCache::key(&features(), &params);
            cache.store(&key, &[[0.0; 2]; 3]).unwrap();
        }
        assert_eq!(fs::read_dir(cache.dir()).unwrap().count(), MAX_FILES);
    }
}
