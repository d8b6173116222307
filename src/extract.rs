//! The embedding pipeline: image folder → CLIP features (centre crop and augmented views) and class prompts →
//! text features, all through the on-disk [`FeatureCache`], so a folder is never embedded twice.
//!
//! Each image is decoded once per pass, and every view it still needs (centre crop, and the `A` augmented
//! views when it is labelled) is cut from that one decode. Work is committed to the cache batch by batch, so a
//! cancelled or crashed run keeps what it had embedded.
//!
//! Cache namespace (choice): `model id | preprocessing version | augmentation seed`. The seed is part of the
//! namespace rather than the key because augmented views depend on it; the centre crop does not, so changing
//! the seed re-embeds centre crops too. That is rare, and keeps one cache key shape for everything.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rayon::prelude::*;

use crate::cache::{self, CacheKey, ContentHash, FeatureCache};
use crate::clip::preprocess::{self, ImageTensor};
use crate::clip::{ClipDevice, ClipError, ClipModel, ImageEncoder};
use crate::data::{Dataset, Problem};
use crate::features::{FeatureSet, LabelledSplit, UnlabelledSplit};
use crate::linalg::Mat;
use crate::progress::{CancelToken, Progress};
use crate::prompts;

/// The views still needed of one decoded image, tagged with their view index.
type ViewTensors = Vec<(u32, ImageTensor)>;

/// One batch's decodes: each image's index and its views, or why it could not be read.
type Decoded = Vec<(usize, Result<ViewTensors, ClipError>)>;

/// Augmented views per labelled image (the SPEC's `A`).
pub const DEFAULT_VIEWS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Clip(#[from] ClipError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    #[error(transparent)]
    Features(#[from] crate::features::FeaturesError),
    #[error("cancelled")]
    Cancelled,
    #[error("no image of {0} could be read; see the messages above for each file")]
    NothingReadable(String),
    #[error("the feature cache lock was poisoned by a crash in another thread")]
    Poisoned,
}

#[derive(Clone, Debug)]
pub struct EmbedOptions {
    /// Augmented views per labelled image.
    pub views: usize,
    /// Seed of the augmentations.
    pub seed: u64,
    /// Images decoded and encoded together; bounds memory (each view is 3·S·S floats).
    pub batch_size: usize,
    /// Where the cache lives; `None` = the user cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Which device encodes the images (text stays on the CPU).
    pub clip_device: ClipDevice,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            views: DEFAULT_VIEWS,
            seed: 0,
            batch_size: 32,
            cache_dir: None,
            clip_device: ClipDevice::Auto,
        }
    }
}

/// What one embedding pass did, for the summary line and the GUI's status.
#[derive(Clone, Debug, Default)]
pub struct EmbedStats {
    pub images: usize,
    pub features_from_cache: usize,
    pub features_computed: usize,
    pub seconds: f64,
    pub problems: Vec<Problem>,
}

impl EmbedStats {
    pub fn images_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.images as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Features of a list of images for a list of views; `ok[i]` is false when image `i` could not be read (its
/// rows are zero and a [`Problem`] names it).
#[derive(Clone, Debug)]
pub struct ImageFeatures {
    /// `views.len()` matrices, each `N×D`, in the order of the requested views.
    pub per_view: Vec<Mat>,
    pub ok: Vec<bool>,
}

pub struct Embedder {
    model: Arc<ClipModel>,
    images: ImageEncoder,
    /// Why the image encoder runs where it runs, when `auto` decided.
    device_note: Option<String>,
    cache: Mutex<FeatureCache>,
    opts: EmbedOptions,
    cache_warnings: Vec<String>,
}

impl Embedder {
    pub fn new(model: Arc<ClipModel>, opts: EmbedOptions) -> Result<Self, ExtractError> {
        let dir = match &opts.cache_dir {
            Some(d) => d.clone(),
            None => FeatureCache::default_dir().unwrap_or_else(|| PathBuf::from(".hegraph-cache")),
        };
        let namespace = format!(
            "{}|{}|aug{}",
            model.info().id,
            preprocess::PREPROCESS_VERSION,
            opts.seed
        );
        let (cache, cache_warnings) = FeatureCache::open(&dir, &namespace, model.info().embed_dim)?;
        let selected = ImageEncoder::select(&model, opts.clip_device)?;
        Ok(Self {
            model,
            images: selected.encoder,
            device_note: selected.note,
            cache: Mutex::new(cache),
            opts,
            cache_warnings,
        })
    }

    /// Problems found in the cache when it was opened (corrupt shards that will be rebuilt).
    pub fn cache_warnings(&self) -> &[String] {
        &self.cache_warnings
    }

    /// Where images are encoded and, when that was decided here, why (for a log line or the status bar).
    pub fn device_note(&self) -> Option<&str> {
        self.device_note.as_deref()
    }

    pub fn image_encoder(&self) -> &ImageEncoder {
        &self.images
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    pub fn options(&self) -> &EmbedOptions {
        &self.opts
    }

    fn cache(&self) -> Result<MutexGuard<'_, FeatureCache>, ExtractError> {
        self.cache.lock().map_err(|_| ExtractError::Poisoned)
    }

    /// Embeds `paths` for each view in `views` (0 = centre crop, `1..=A` = augmented views), reading what it
    /// can from the cache.
    pub fn embed_images(
        &self,
        paths: &[PathBuf],
        views: &[u32],
        progress: &dyn Progress,
        cancel: &CancelToken,
    ) -> Result<(ImageFeatures, EmbedStats), ExtractError> {
        let start = Instant::now();
        let dim = self.model.info().embed_dim;
        let n = paths.len();
        let mut stats = EmbedStats {
            images: n,
            ..Default::default()
        };
        progress.set_stage_counting(&format!("reading {n} images"), "images");
        let hashes: Vec<Result<ContentHash, String>> = paths
            .par_iter()
            .map(|p| cache::hash_file(p).map_err(|e| e.to_string()))
            .collect();

        let mut per_view: Vec<Mat> = views.iter().map(|_| Mat::zeros(n, dim)).collect();
        let mut ok = vec![true; n];
        // Images that still need at least one view computed.
        let mut todo: Vec<usize> = Vec::new();
        {
            let cache = self.cache()?;
            for (i, h) in hashes.iter().enumerate() {
                let h = match h {
                    Ok(h) => h,
                    Err(e) => {
                        ok[i] = false;
                        stats.problems.push(Problem {
                            path: paths[i].clone(),
                            message: e.clone(),
                        });
                        continue;
                    }
                };
                let mut missing = false;
                for (vi, &v) in views.iter().enumerate() {
                    match cache.get(&CacheKey {
                        content: *h,
                        view: v,
                    }) {
                        Some(f) => {
                            per_view[vi].row_mut(i).copy_from_slice(f);
                            stats.features_from_cache += 1;
                        }
                        None => missing = true,
                    }
                }
                if missing {
                    todo.push(i);
                }
            }
        }

        let stage = match views {
            [0] => format!("embedding {n} images"),
            [_] => format!("embedding a view of {n} images"),
            _ => format!("embedding {} views of {n} images", views.len()),
        };
        progress.set_stage_counting(&stage, "images");
        let total = n;
        let mut done = n - todo.len();
        progress.update(done, total);
        let batch = self.opts.batch_size.max(1);
        // Decoding overlaps encoding: a producer decodes batch k+1 (its images in parallel on rayon's pool,
        // which the encoder shares, so the cores stay busy without oversubscription) while batch k encodes.
        // The rendezvous channel holds nothing: at most one decoded batch waits while one encodes.
        std::thread::scope(|scope| -> Result<(), ExtractError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Decoded, ExtractError>>(0);
            let todo = &todo;
            let hashes = &hashes;
            scope.spawn(move || {
                for chunk in todo.chunks(batch) {
                    if cancel.is_cancelled() {
                        break;
                    }
                    let r = self.decode_chunk(chunk, paths, hashes, views);
                    // A closed channel means the encoder stopped (cancelled or failed): stop decoding.
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
            for chunk in todo.chunks(batch) {
                if cancel.is_cancelled() {
                    return Err(ExtractError::Cancelled);
                }
                let prepared = match rx.recv() {
                    Ok(r) => r?,
                    Err(_) => return Err(ExtractError::Cancelled),
                };
                let mut owners: Vec<(usize, u32)> = Vec::new();
                let mut tensors: Vec<ImageTensor> = Vec::new();
                for (i, r) in prepared {
                    match r {
                        Ok(list) => {
                            for (v, t) in list {
                                owners.push((i, v));
                                tensors.push(t);
                            }
                        }
                        Err(e) => {
                            ok[i] = false;
                            stats.problems.push(Problem {
                                path: paths[i].clone(),
                                message: e.to_string(),
                            });
                            progress.message(&format!("skipped {}: {e}", paths[i].display()));
                        }
                    }
                }
                let mut entries = Vec::with_capacity(tensors.len());
                for (tchunk, ochunk) in tensors.chunks(batch).zip(owners.chunks(batch)) {
                    if cancel.is_cancelled() {
                        return Err(ExtractError::Cancelled);
                    }
                    let feats = self.images.encode_images(&self.model, tchunk)?;
                    for (r, &(i, v)) in ochunk.iter().enumerate() {
                        let vi = views.iter().position(|&x| x == v).unwrap_or(0);
                        per_view[vi].row_mut(i).copy_from_slice(feats.row(r));
                        if let Ok(h) = &hashes[i] {
                            entries.push((
                                CacheKey {
                                    content: *h,
                                    view: v,
                                },
                                feats.row(r).to_vec(),
                            ));
                        }
                    }
                }
                stats.features_computed += entries.len();
                self.cache()?.insert_batch(entries)?;
                done += chunk.len();
                progress.update(done, total);
            }
            Ok(())
        })?;
        stats.seconds = start.elapsed().as_secs_f64();
        Ok((ImageFeatures { per_view, ok }, stats))
    }

    /// Decodes the images of `chunk` (indices into `paths`) once each and cuts every view each still lacks
    /// in the cache.
    fn decode_chunk(
        &self,
        chunk: &[usize],
        paths: &[PathBuf],
        hashes: &[Result<ContentHash, String>],
        views: &[u32],
    ) -> Result<Decoded, ExtractError> {
        let size = self.model.info().image_size;
        let cache = self.cache()?;
        let needed: Vec<(usize, ContentHash, Vec<u32>)> = chunk
            .iter()
            .filter_map(|&i| {
                let h = *hashes[i].as_ref().ok()?;
                let need: Vec<u32> = views
                    .iter()
                    .copied()
                    .filter(|&v| {
                        !cache.contains(&CacheKey {
                            content: h,
                            view: v,
                        })
                    })
                    .collect();
                Some((i, h, need))
            })
            .collect();
        drop(cache);
        Ok(needed
            .into_par_iter()
            .map(|(i, h, need)| {
                // `img` holds its share of the decode budget until every view is cut.
                let r = preprocess::load_for_model(&paths[i], size).map(|img| {
                    let key = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
                    let max_view = need.iter().copied().max().unwrap_or(0) as usize;
                    let aug = if max_view > 0 {
                        preprocess::augmented_views(&img, size, max_view, self.opts.seed, key)
                    } else {
                        Vec::new()
                    };
                    let mut aug = aug.into_iter().map(Some).collect::<Vec<_>>();
                    need.iter()
                        .filter_map(|&v| {
                            if v == 0 {
                                Some((0, preprocess::center_crop(&img, size)))
                            } else {
                                aug.get_mut(v as usize - 1)
                                    .and_then(Option::take)
                                    .map(|t| (v, t))
                            }
                        })
                        .collect::<Vec<_>>()
                });
                (i, r)
            })
            .collect())
    }

    /// Positive and negative text features per class (`C×D` each): every template filled with the class
    /// name, encoded, normalised, averaged and normalised again (Tip-Adapter's `clip_classifier`).
    pub fn embed_prompts(
        &self,
        classes: &[String],
        templates: &[String],
    ) -> Result<(Mat, Mat), ExtractError> {
        let negative: Vec<String> = templates
            .iter()
            .map(|t| prompts::negative_template(t))
            .collect();
        Ok((
            self.embed_class_prompts(classes, templates)?,
            self.embed_class_prompts(classes, &negative)?,
        ))
    }

    /// The text feature of a free phrase (CLIP text search), through the same cache as the class prompts: a
    /// phrase typed again, in this run or the next, costs no encoding.
    pub fn embed_phrase(&self, phrase: &str) -> Result<Vec<f32>, ExtractError> {
        let mut rows = self.texts_cached(&[phrase.to_string()])?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// One normalised text feature per text, from the cache where it has them; the rest encoded in one batch
    /// and stored.
    fn texts_cached(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ExtractError> {
        let keys: Vec<CacheKey> = texts
            .iter()
            .map(|t| CacheKey {
                content: cache::hash_bytes(format!("text:{t}").as_bytes()),
                view: 0,
            })
            .collect();
        let mut rows: Vec<Option<Vec<f32>>> = {
            let cache = self.cache()?;
            keys.iter()
                .map(|k| cache.get(k).map(<[f32]>::to_vec))
                .collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| rows[i].is_none()).collect();
        if !missing.is_empty() {
            let batch: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let feats = self.model.encode_texts(&batch)?;
            let mut entries = Vec::with_capacity(missing.len());
            for (r, &i) in missing.iter().enumerate() {
                rows[i] = Some(feats.row(r).to_vec());
                entries.push((keys[i], feats.row(r).to_vec()));
            }
            self.cache()?.insert_batch(entries)?;
        }
        Ok(rows.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn embed_class_prompts(
        &self,
        classes: &[String],
        templates: &[String],
    ) -> Result<Mat, ExtractError> {
        let dim = self.model.info().embed_dim;
        let texts: Vec<String> = classes
            .iter()
            .flat_map(|c| templates.iter().map(move |t| prompts::fill(t, c)))
            .collect();
        let rows = self.texts_cached(&texts)?;
        let t = templates.len().max(1);
        let mut out = Mat::zeros(classes.len(), dim);
        for c in 0..classes.len() {
            let refs: Vec<&[f32]> = (0..templates.len())
                .filter_map(|j| rows.get(c * t + j).map(Vec::as_slice))
                .collect();
            out.row_mut(c)
                .copy_from_slice(&crate::linalg::mean_normalized(&refs, dim));
        }
        Ok(out)
    }
}

/// Summary of [`extract_dataset`].
#[derive(Clone, Debug, Default)]
pub struct ExtractReport {
    pub stats: EmbedStats,
    pub labelled: usize,
    pub unlabelled: usize,
}

/// Embeds a whole dataset into a [`FeatureSet`]: centre crops of every image, the augmented views of the
/// labelled ones, and the class prompts. Images that cannot be read are left out and named in the report.
pub fn extract_dataset(
    ds: &Dataset,
    embedder: &Embedder,
    templates: &[String],
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<(FeatureSet, ExtractReport), ExtractError> {
    let a = embedder.options().views as u32;
    let (lab, unl): (Vec<usize>, Vec<usize>) =
        (0..ds.images.len()).partition(|&i| ds.images[i].label.is_some());
    let mut stats = EmbedStats::default();
    // Each image is hashed and decoded once: labelled images get their centre crop and all `A` views in one
    // pass, unlabelled images only the centre crop. Returns the rows that could be read and their features.
    // `embed_images` names each stage itself ("embedding 11 views of 8 images").
    let mut embed =
        |idx: &[usize], views: &[u32]| -> Result<(Vec<usize>, Vec<Mat>), ExtractError> {
            if idx.is_empty() {
                return Ok((Vec::new(), Vec::new()));
            }
            let paths: Vec<PathBuf> = idx.iter().map(|&i| ds.images[i].path.clone()).collect();
            let (f, s) = embedder.embed_images(&paths, views, progress, cancel)?;
            stats.images += s.images;
            stats.features_from_cache += s.features_from_cache;
            stats.features_computed += s.features_computed;
            stats.seconds += s.seconds;
            stats.problems.extend(s.problems);
            let keep: Vec<usize> = (0..idx.len()).filter(|&j| f.ok[j]).collect();
            let mats = f.per_view.iter().map(|m| m.select_rows(&keep)).collect();
            Ok((keep.iter().map(|&j| idx[j]).collect(), mats))
        };
    let lab_views: Vec<u32> = (0..=a).collect();
    let (labelled_idx, mut lab_mats) = embed(&lab, &lab_views)?;
    let (unl_idx, mut unl_mats) = embed(&unl, &[0])?;
    if labelled_idx.is_empty() && unl_idx.is_empty() {
        return Err(ExtractError::NothingReadable(ds.root.display().to_string()));
    }
    progress.set_stage("embedding class prompts");
    let (text, text_neg) = embedder.embed_prompts(&ds.classes, templates)?;
    let info = embedder.model().info();
    let train = (!labelled_idx.is_empty()).then(|| {
        let features = lab_mats.remove(0);
        LabelledSplit {
            features,
            labels: labelled_idx
                .iter()
                .map(|&i| ds.images[i].label.unwrap_or(0))
                .collect(),
            views: (a > 0).then_some(lab_mats),
            paths: Some(
                labelled_idx
                    .iter()
                    .map(|&i| ds.images[i].rel.clone())
                    .collect(),
            ),
        }
    });
    let unlabelled = (!unl_idx.is_empty()).then(|| UnlabelledSplit {
        features: unl_mats.remove(0),
        paths: unl_idx.iter().map(|&i| ds.images[i].rel.clone()).collect(),
    });
    let fs = FeatureSet {
        classes: ds.classes.clone(),
        dim: info.embed_dim,
        model: Some(info.id.clone()),
        test_checkpoint: info.is_test_checkpoint,
        templates: templates.to_vec(),
        text: Some(text),
        text_neg: Some(text_neg),
        shots: Default::default(),
        train,
        val: None,
        test: None,
        unlabelled,
    };
    let report = ExtractReport {
        labelled: labelled_idx.len(),
        unlabelled: unl_idx.len(),
        stats,
    };
    Ok((fs, report))
}

/// The default features file of `extract`: in the folder's project directory (`FOLDER/.hegraph/`), next to
/// the project file the GUI keeps there, so a folder's features travel with it and `train FOLDER` style
/// commands and the GUI find the same files.
pub fn default_features_path(root: &Path) -> PathBuf {
    root.join(crate::data::PROJECT_DIR_NAME)
        .join("features.safetensors")
}
