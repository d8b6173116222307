//! The features file: every CLIP feature the adapters need, in one safetensors file, so that training and
//! evaluation never run CLIP.
//!
//! # Layout
//!
//! A safetensors file. `D` is the feature dimension (512 for ViT-B/32 and ViT-B/16), `C` the number of classes.
//! Features may be stored as F16, BF16, F32 or F64 (we write F32); labels as any integer type (we write I64).
//! Every tensor is optional except that a file must hold at least one feature tensor.
//!
//! | tensor | shape | meaning |
//! |---|---|---|
//! | `shots{K}.features`, `shots{K}.labels` | (C·K, D), (C·K,) | a precomputed K-shot draw (the shared benchmark files): one row per labelled image |
//! | `train.features`, `train.labels` | (N, D), (N,) | the full labelled pool, centre-crop features |
//! | `train.views` | (A, N, D) | view `a` of every labelled image (augmented crops; view-major) |
//! | `val.features`, `val.labels` | (N_val, D), (N_val,) | validation split |
//! | `test.features`, `test.labels` | (N_test, D), (N_test,) | test split |
//! | `unlabelled.features` | (U, D) | images without a label (to classify) |
//! | `text.features` | (C, D) | positive text node per class (template-ensembled, normalised) |
//! | `text_neg.features` | (C, D) | negative text node per class ("a photo of no {}.") |
//!
//! Any labelled split may also carry `{split}.views` (A, N, D); the shared files have none: their `shots{K}`
//! rows are already the mean of 10 augmented views.
//!
//! Metadata (all strings, all optional):
//! - `format` = `hegraph-features`, `version` = `2`: written by this program (`extract`).
//! - `classes`: class names in label order, a JSON array of strings (`["cat", "dog"]`). Absent → "class 0",
//!   "class 1", … .
//! - `model`: the CLIP model the features came from; `test_checkpoint`: `true` when that model is the tiny
//!   random test checkpoint (features good for plumbing only, not accuracy).
//! - `templates`: the prompt templates used for the text nodes, a JSON array of strings.
//! - `paths.{split}` (e.g. `paths.train`, `paths.unlabelled`): the image paths of that split's rows, relative
//!   to the project folder, a JSON array of strings in the stored form of [`crate::stored_path`] (exact bytes:
//!   `\xNN` for bytes that are not UTF-8 and for the backslash), one per row.
//!
//! Version 1 (and files without a version, such as the shared benchmark files) kept `classes`, `templates`
//! and `paths.{split}` one per line, which cannot hold a name with a line break; they are still read that way
//! (their paths literally). There, a `classes` value that is a single number is a class count (the shared
//! files store e.g. "100").
//!
//! Loading validates shapes (every tensor of a split has the same row count, every feature tensor the same
//! `D`, text tensors `C` rows), labels (`< C`) and values (no NaN/∞ row), and names the offending tensor, so
//! a broken file is reported when it is opened rather than as a NaN loss later.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType as CDType, Device, Tensor};
use safetensors::{Dtype, SafeTensors, View};

use crate::linalg::Mat;

/// The most classes a features file may imply (ImageNet-21k has 21,843).
pub const MAX_CLASSES: usize = 100_000;

/// The `format` metadata value this program writes.
pub const FORMAT: &str = "hegraph-features";
/// The `version` metadata value this program writes and the newest it reads. Version 2 stores lists as JSON
/// arrays (see the module docs); version 1 stored them one per line.
pub const VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("cannot read the features file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the features file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable safetensors file ({msg}); re-run feature extraction to rebuild it")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("cannot save features to {path}: {msg}")]
    Save { path: PathBuf, msg: String },
}

/// A labelled split: features (one row per image), labels, optionally `A` augmented views of every image and
/// the images' paths.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LabelledSplit {
    pub features: Mat,
    pub labels: Vec<usize>,
    /// `views[a]` is N×D: view `a` of every image (same row order as `features`).
    pub views: Option<Vec<Mat>>,
    /// One path per row, relative to the project folder, in the stored form of [`crate::stored_path`] (so
    /// names that differ only in non-UTF-8 bytes stay distinct); show them with [`crate::stored_path::display`].
    pub paths: Option<Vec<String>>,
}

impl LabelledSplit {
    pub fn new(features: Mat, labels: Vec<usize>) -> Self {
        Self {
            features,
            labels,
            views: None,
            paths: None,
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows `idx` (features, labels, views and paths alike), in that order.
    pub fn subset(&self, idx: &[usize]) -> LabelledSplit {
        LabelledSplit {
            features: self.features.select_rows(idx),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            views: self
                .views
                .as_ref()
                .map(|vs| vs.iter().map(|v| v.select_rows(idx)).collect()),
            paths: self
                .paths
                .as_ref()
                .map(|p| idx.iter().map(|&i| p[i].clone()).collect()),
        }
    }

    /// Row indices of every class, in row order.
    pub fn indices_by_class(&self, num_classes: usize) -> Vec<Vec<usize>> {
        let mut by = vec![Vec::new(); num_classes];
        for (i, &l) in self.labels.iter().enumerate() {
            if l < num_classes {
                by[l].push(i);
            }
        }
        by
    }
}

/// Images without labels, to be classified.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct UnlabelledSplit {
    pub features: Mat,
    /// One path per row (stored form, as [`LabelledSplit::paths`]), or empty when the file recorded none.
    pub paths: Vec<String>,
}

/// A split's name, features, labels (if any) and paths (if recorded), borrowed for [`FeatureSet::image_rows`].
type SplitRows<'a> = (String, &'a Mat, Option<&'a [usize]>, Option<&'a [String]>);

/// One image of a features file: where its row is, its label there, and its path when the file recorded one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRow {
    /// The split's tensor-name prefix (`shots16`, `train`, `val`, `test`, `unlabelled`).
    pub split: String,
    pub index: usize,
    pub label: Option<usize>,
    /// Stored form (see [`crate::stored_path`]).
    pub path: Option<String>,
}

/// Everything in a features file.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct FeatureSet {
    pub classes: Vec<String>,
    pub dim: usize,
    pub model: Option<String>,
    pub test_checkpoint: bool,
    pub templates: Vec<String>,
    pub text: Option<Mat>,
    pub text_neg: Option<Mat>,
    pub shots: BTreeMap<usize, LabelledSplit>,
    pub train: Option<LabelledSplit>,
    pub val: Option<LabelledSplit>,
    pub test: Option<LabelledSplit>,
    pub unlabelled: Option<UnlabelledSplit>,
}

impl FeatureSet {
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The default class names for `c` unnamed classes.
    /// `class 0`, `class 1`, … for files without names (at most [`MAX_CLASSES`] are ever made).
    pub fn default_class_names(c: usize) -> Vec<String> {
        (0..c).map(|i| format!("class {i}")).collect()
    }

    pub fn load(path: &Path) -> Result<Self, FeaturesError> {
        let bytes = std::fs::read(path).map_err(|source| FeaturesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let format_err = |msg: String| FeaturesError::Format {
            path: path.to_path_buf(),
            msg,
        };
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| format_err(e.to_string()))?;
        let meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(e.to_string()))?;
        let r = Reader { path, st: &st };

        let ours = meta.get("format").map(String::as_str) == Some(FORMAT);
        let version = meta.get("version").map(|v| v.trim().parse::<u32>());
        if let Some(v) = meta.get("version") {
            let newer = v.trim().parse::<u32>().map(|v| v > VERSION).unwrap_or(true);
            if ours && newer {
                return Err(FeaturesError::Invalid {
                    path: path.to_path_buf(),
                    msg: format!(
                        "features format version {v} is newer than this program understands ({VERSION}); \
                         update hegraph or re-extract the features"
                    ),
                });
            }
        }

        let lists = Lists {
            path,
            meta: &meta,
            json: ours && matches!(version, Some(Ok(v)) if v >= 2),
        };

        let mut fs = FeatureSet {
            model: meta.get("model").cloned().filter(|s| !s.is_empty()),
            test_checkpoint: meta
                .get("test_checkpoint")
                .map(|s| s.trim().eq_ignore_ascii_case("true"))
                .unwrap_or(false),
            templates: lists.strings("templates")?.unwrap_or_default(),
            ..Default::default()
        };

        let names: Vec<String> = st.names().iter().map(|s| s.to_string()).collect();
        for name in &names {
            if let Some(k) = name
                .strip_prefix("shots")
                .and_then(|s| s.strip_suffix(".features"))
                .and_then(|k| k.parse::<usize>().ok())
            {
                let split = r.labelled(&format!("shots{k}"), &lists)?;
                if let Some(s) = split {
                    fs.shots.insert(k, s);
                }
            }
        }
        fs.train = r.labelled("train", &lists)?;
        fs.val = r.labelled("val", &lists)?;
        fs.test = r.labelled("test", &lists)?;
        if let Some(features) = r.mat("unlabelled.features")? {
            let paths = lists.paths("paths.unlabelled")?.unwrap_or_default();
            fs.unlabelled = Some(UnlabelledSplit { features, paths });
        }
        fs.text = r.mat("text.features")?;
        fs.text_neg = r.mat("text_neg.features")?;

        // Classes: names from the metadata, a bare count (version 1 only), or inferred.
        let named = lists.strings("classes")?.unwrap_or_default();
        let max_label = fs
            .labelled_splits()
            .flat_map(|(_, s)| s.labels.iter().copied())
            .max();
        // A count read from the file is checked before names are made for it: a damaged header must not
        // make the loader allocate billions of strings.
        let counted = |c: usize, from: &str| {
            if c > MAX_CLASSES {
                Err(FeaturesError::Invalid {
                    path: path.to_path_buf(),
                    msg: format!("{from} implies {c} classes; at most {MAX_CLASSES} are supported"),
                })
            } else {
                Ok(Self::default_class_names(c))
            }
        };
        fs.classes = match named.as_slice() {
            [one]
                if !lists.json
                    && one.trim().parse::<usize>().is_ok()
                    && !is_plausible_single_class(&fs) =>
            {
                let c = one.trim().parse::<usize>().unwrap_or(0);
                counted(c, "the `classes` metadata")?
            }
            [] => match (&fs.text, max_label) {
                (Some(t), _) => counted(t.rows, "`text.features`")?,
                (None, Some(m)) => counted(m.saturating_add(1), "the largest label")?,
                (None, None) => Vec::new(),
            },
            _ => named,
        };

        fs.dim = fs.first_dim().ok_or_else(|| FeaturesError::Invalid {
            path: path.to_path_buf(),
            msg: "the file holds no feature tensor (expected e.g. `train.features`, `shots16.features` or \
                  `test.features`)"
                .into(),
        })?;
        fs.validate_at(path)?;
        Ok(fs)
    }

    /// Writes the file atomically (a temporary file in the same folder, then a rename), so a crash never
    /// leaves a half-written features file behind.
    pub fn save(&self, path: &Path) -> Result<(), FeaturesError> {
        self.validate_at(path)?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("version".to_string(), VERSION.to_string());
        meta.insert("classes".to_string(), json_list(&self.classes));
        if let Some(m) = &self.model {
            meta.insert("model".to_string(), m.clone());
        }
        meta.insert(
            "test_checkpoint".to_string(),
            self.test_checkpoint.to_string(),
        );
        if !self.templates.is_empty() {
            meta.insert("templates".to_string(), json_list(&self.templates));
        }

        let mut tensors: Vec<(String, OwnedTensor)> = Vec::new();
        for (name, split) in self.labelled_splits() {
            tensors.push((
                format!("{name}.features"),
                OwnedTensor::f32_mat(&split.features),
            ));
            tensors.push((format!("{name}.labels"), OwnedTensor::labels(&split.labels)));
            if let Some(views) = &split.views {
                tensors.push((
                    format!("{name}.views"),
                    OwnedTensor::f32_stack(views, self.dim),
                ));
            }
            if let Some(paths) = &split.paths {
                meta.insert(format!("paths.{name}"), json_list(paths));
            }
        }
        if let Some(u) = &self.unlabelled {
            tensors.push((
                "unlabelled.features".into(),
                OwnedTensor::f32_mat(&u.features),
            ));
            if !u.paths.is_empty() {
                meta.insert("paths.unlabelled".to_string(), json_list(&u.paths));
            }
        }
        if let Some(t) = &self.text {
            tensors.push(("text.features".into(), OwnedTensor::f32_mat(t)));
        }
        if let Some(t) = &self.text_neg {
            tensors.push(("text_neg.features".into(), OwnedTensor::f32_mat(t)));
        }
        let bytes =
            safetensors::serialize(tensors, Some(meta)).map_err(|e| FeaturesError::Save {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        write_atomic(path, &bytes).map_err(|source| FeaturesError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Every labelled split with its tensor-name prefix (`shots{K}`, `train`, `val`, `test`).
    pub fn labelled_splits(&self) -> impl Iterator<Item = (String, &LabelledSplit)> {
        self.shots
            .iter()
            .map(|(k, s)| (format!("shots{k}"), s))
            .chain(self.train.iter().map(|s| ("train".to_string(), s)))
            .chain(self.val.iter().map(|s| ("val".to_string(), s)))
            .chain(self.test.iter().map(|s| ("test".to_string(), s)))
    }

    /// Every image of the file once, as one matrix with a row description: the largest `shots{K}` draw (the
    /// smaller draws repeat its images, or are other draws of the same pool), then `train`, `val`, `test` and
    /// `unlabelled`. What searching or browsing a features file without its images goes through.
    pub fn image_rows(&self) -> (Mat, Vec<ImageRow>) {
        let mut parts: Vec<SplitRows<'_>> = Vec::new();
        if let Some((k, s)) = self.shots.iter().next_back() {
            parts.push((
                format!("shots{k}"),
                &s.features,
                Some(s.labels.as_slice()),
                s.paths.as_deref(),
            ));
        }
        for (name, split) in [
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ] {
            if let Some(s) = split {
                parts.push((
                    name.to_string(),
                    &s.features,
                    Some(s.labels.as_slice()),
                    s.paths.as_deref(),
                ));
            }
        }
        if let Some(u) = &self.unlabelled {
            let paths = (!u.paths.is_empty()).then_some(u.paths.as_slice());
            parts.push(("unlabelled".to_string(), &u.features, None, paths));
        }
        let total: usize = parts.iter().map(|p| p.1.rows).sum();
        let mut data = Vec::with_capacity(total * self.dim);
        let mut rows = Vec::with_capacity(total);
        for (split, m, labels, paths) in parts {
            data.extend_from_slice(&m.data);
            for i in 0..m.rows {
                rows.push(ImageRow {
                    split: split.clone(),
                    index: i,
                    label: labels.and_then(|l| l.get(i).copied()),
                    path: paths.and_then(|p| p.get(i).cloned()),
                });
            }
        }
        (Mat::from_vec(rows.len(), self.dim, data), rows)
    }

    fn first_dim(&self) -> Option<usize> {
        self.labelled_splits()
            .map(|(_, s)| s.features.cols)
            .chain(self.unlabelled.iter().map(|u| u.features.cols))
            .chain(self.text.iter().map(|t| t.cols))
            .next()
    }

    /// Checks the invariants `load` guarantees (used by `save` too, so we never write a file we would refuse
    /// to read).
    pub fn validate(&self) -> Result<(), FeaturesError> {
        self.validate_at(Path::new("<in memory>"))
    }

    fn validate_at(&self, path: &Path) -> Result<(), FeaturesError> {
        let c = self.classes.len();
        let d = self.dim;
        let bad = |tensor: &str, msg: String| FeaturesError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            msg,
        };
        let check_mat = |name: &str, m: &Mat| -> Result<(), FeaturesError> {
            if m.cols != d {
                return Err(bad(
                    name,
                    format!("has dimension {} but the other features have {d}; all features must come from the same CLIP model", m.cols),
                ));
            }
            if let Some(r) = m.first_non_finite_row() {
                return Err(bad(
                    name,
                    format!("row {r} contains NaN or infinity; re-extract the features"),
                ));
            }
            Ok(())
        };
        for (name, s) in self.labelled_splits() {
            let fname = format!("{name}.features");
            check_mat(&fname, &s.features)?;
            if s.labels.len() != s.features.rows {
                return Err(bad(
                    &format!("{name}.labels"),
                    format!(
                        "has {} labels for {} feature rows",
                        s.labels.len(),
                        s.features.rows
                    ),
                ));
            }
            if let Some((i, &l)) = s.labels.iter().enumerate().find(|(_, &l)| l >= c) {
                return Err(bad(
                    &format!("{name}.labels"),
                    format!("label {l} at row {i} is out of range for {c} classes; the class list does not match the labels"),
                ));
            }
            if let Some(views) = &s.views {
                if views.is_empty() {
                    return Err(bad(&format!("{name}.views"), "has zero views".into()));
                }
                for (a, v) in views.iter().enumerate() {
                    if v.rows != s.features.rows {
                        return Err(bad(
                            &format!("{name}.views"),
                            format!(
                                "view {a} has {} rows for {} images",
                                v.rows, s.features.rows
                            ),
                        ));
                    }
                    check_mat(&format!("{name}.views[{a}]"), v)?;
                }
            }
            if let Some(p) = &s.paths {
                paths_fit(path, &name, p, s.features.rows)?;
            }
        }
        if let Some(u) = &self.unlabelled {
            check_mat("unlabelled.features", &u.features)?;
            if !u.paths.is_empty() {
                paths_fit(path, "unlabelled", &u.paths, u.features.rows)?;
            }
        }
        for (name, t) in [
            ("text.features", &self.text),
            ("text_neg.features", &self.text_neg),
        ] {
            if let Some(t) = t {
                check_mat(name, t)?;
                if t.rows != c {
                    return Err(bad(
                        name,
                        format!("has {} rows but there are {c} classes (one text feature per class expected)", t.rows),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A count of 1 in the `classes` key is ambiguous (one class named "1"?); treat it as a name only when the
/// data agrees there is a single class.
fn is_plausible_single_class(fs: &FeatureSet) -> bool {
    let max_label = fs
        .labelled_splits()
        .flat_map(|(_, s)| s.labels.iter().copied())
        .max();
    max_label == Some(0) || fs.text.as_ref().map(|t| t.rows) == Some(1)
}

/// Checks that a split lists one path per row. When it does not, names the split and the first path that does
/// not fit: a path with no image extension (a name cut in two at a line break by a version-1 file, or a
/// hand edit) if there is one, else the first path beyond the rows or the last one listed.
fn paths_fit(file: &Path, split: &str, paths: &[String], rows: usize) -> Result<(), FeaturesError> {
    if paths.len() == rows {
        return Ok(());
    }
    let odd = paths
        .iter()
        .enumerate()
        .find(|(_, p)| !crate::data::is_image_path(Path::new(&crate::stored_path::display(p))));
    let which = match (odd, paths.get(rows), paths.last()) {
        (Some((i, p)), _, _) => format!(
            "path {} ('{}') is not an image file name",
            i + 1,
            crate::stored_path::display(p).escape_debug()
        ),
        (None, Some(p), _) => format!(
            "path {} ('{}') has no row",
            rows + 1,
            crate::stored_path::display(p).escape_debug()
        ),
        (None, None, Some(p)) => format!(
            "rows {} to {rows} have no path; the last path listed is '{}'",
            paths.len() + 1,
            crate::stored_path::display(p).escape_debug()
        ),
        (None, None, None) => "no path is listed".to_string(),
    };
    Err(FeaturesError::Invalid {
        path: file.to_path_buf(),
        msg: format!(
            "metadata paths.{split} lists {} paths for {rows} rows: {which}; re-extract the features \
             (files written before version 2 split a file name holding a line break in two)",
            paths.len()
        ),
    })
}

/// A list as version 2 writes it: a JSON array of strings.
fn json_list(items: &[String]) -> String {
    // Serialising strings to JSON cannot fail; the fallback only keeps the function total.
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_string())
}

/// Reads the list-valued metadata of one file in the form its version wrote.
struct Lists<'a> {
    path: &'a Path,
    meta: &'a HashMap<String, String>,
    /// Version 2 or later of our own format: JSON arrays; otherwise one item per line.
    json: bool,
}

impl Lists<'_> {
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, FeaturesError> {
        let Some(v) = self.meta.get(key) else {
            return Ok(None);
        };
        if !self.json {
            return Ok(Some(lines(Some(v))));
        }
        serde_json::from_str::<Vec<String>>(v)
            .map(Some)
            .map_err(|e| FeaturesError::Invalid {
                path: self.path.to_path_buf(),
                msg: format!(
                    "metadata {key} is not a JSON array of strings ({e}); re-extract the features"
                ),
            })
    }

    /// Paths in the stored form: version 2 stores exactly that; version 1 kept names literally.
    fn paths(&self, key: &str) -> Result<Option<Vec<String>>, FeaturesError> {
        let list = self.strings(key)?;
        Ok(if self.json {
            list
        } else {
            list.map(|l| {
                l.iter()
                    .map(|p| crate::stored_path::str_to_stored(p))
                    .collect()
            })
        })
    }
}

fn lines(s: Option<&String>) -> Vec<String> {
    s.map(|s| {
        s.lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| !l.trim().is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Replaces `path` by `bytes` without ever exposing a partial file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A tensor's shape and values, converted to f32.
type Shaped = (Vec<usize>, Vec<f32>);

struct Reader<'a, 'b> {
    path: &'a Path,
    st: &'a SafeTensors<'b>,
}

impl Reader<'_, '_> {
    fn err(&self, tensor: &str, msg: String) -> FeaturesError {
        FeaturesError::Tensor {
            path: self.path.to_path_buf(),
            tensor: tensor.to_string(),
            msg,
        }
    }

    fn floats(&self, name: &str) -> Result<Option<Shaped>, FeaturesError> {
        let Ok(view) = self.st.tensor(name) else {
            return Ok(None);
        };
        let shape = view.shape().to_vec();
        let n: usize = shape.iter().product();
        let data = view.data();
        let vals: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            Dtype::F16 | Dtype::BF16 => {
                let dt = if view.dtype() == Dtype::F16 {
                    CDType::F16
                } else {
                    CDType::BF16
                };
                Tensor::from_raw_buffer(data, dt, &[n], &Device::Cpu)
                    .and_then(|t| t.to_dtype(CDType::F32))
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| self.err(name, format!("cannot convert to f32: {e}")))?
            }
            other => {
                return Err(self.err(
                    name,
                    format!("has dtype {other:?}; features must be F16, BF16, F32 or F64"),
                ))
            }
        };
        if vals.len() != n {
            return Err(self.err(
                name,
                format!("holds {} values for shape {shape:?}", vals.len()),
            ));
        }
        Ok(Some((shape, vals)))
    }

    fn mat(&self, name: &str) -> Result<Option<Mat>, FeaturesError> {
        let Some((shape, vals)) = self.floats(name)? else {
            return Ok(None);
        };
        match shape.as_slice() {
            [r, c] => Ok(Some(Mat::from_vec(*r, *c, vals))),
            _ => Err(self.err(name, format!("has shape {shape:?}; expected (rows, dim)"))),
        }
    }

    fn views(&self, name: &str) -> Result<Option<Vec<Mat>>, FeaturesError> {
        let Some((shape, vals)) = self.floats(name)? else {
            return Ok(None);
        };
        match shape.as_slice() {
            // An empty dimension holds no values, so the data cannot bound the count of the others.
            [a, n, d] if *a == 0 || *n == 0 || *d == 0 => Err(self.err(
                name,
                format!("has shape {shape:?}; no dimension of the views may be 0"),
            )),
            [a, n, d] => {
                let per = n * d;
                Ok(Some(
                    (0..*a)
                        .map(|i| Mat::from_vec(*n, *d, vals[i * per..(i + 1) * per].to_vec()))
                        .collect(),
                ))
            }
            _ => Err(self.err(
                name,
                format!("has shape {shape:?}; expected (views, images, dim)"),
            )),
        }
    }

    fn labels(&self, name: &str) -> Result<Option<Vec<usize>>, FeaturesError> {
        let Ok(view) = self.st.tensor(name) else {
            return Ok(None);
        };
        if view.shape().len() != 1 {
            return Err(self.err(
                name,
                format!("has shape {:?}; expected (rows,)", view.shape()),
            ));
        }
        let d = view.data();
        let signed: Vec<i128> = match view.dtype() {
            Dtype::U8 => d.iter().map(|&b| b as i128).collect(),
            Dtype::I8 => d.iter().map(|&b| b as i8 as i128).collect(),
            Dtype::U16 => d
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as i128)
                .collect(),
            Dtype::I16 => d
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as i128)
                .collect(),
            Dtype::U32 => d
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i128)
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i128)
                .collect(),
            Dtype::U64 => d
                .chunks_exact(8)
                .map(|b| {
                    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as i128
                })
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| {
                    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as i128
                })
                .collect(),
            other => {
                return Err(self.err(
                    name,
                    format!("has dtype {other:?}; labels must be integers"),
                ));
            }
        };
        if let Some((i, l)) = signed
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l > u32::MAX as i128)
        {
            return Err(self.err(
                name,
                format!("label {l} at row {i} is not a valid class index"),
            ));
        }
        Ok(Some(signed.into_iter().map(|l| l as usize).collect()))
    }

    fn labelled(&self, split: &str, lists: &Lists) -> Result<Option<LabelledSplit>, FeaturesError> {
        let fname = format!("{split}.features");
        let lname = format!("{split}.labels");
        let features = self.mat(&fname)?;
        let labels = self.labels(&lname)?;
        match (features, labels) {
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err(self.err(&lname, format!("is missing but `{fname}` is present")))
            }
            (None, Some(_)) => {
                Err(self.err(&fname, format!("is missing but `{lname}` is present")))
            }
            (Some(features), Some(labels)) => {
                let views = self.views(&format!("{split}.views"))?;
                let paths = lists.paths(&format!("paths.{split}"))?;
                Ok(Some(LabelledSplit {
                    features,
                    labels,
                    views,
                    paths,
                }))
            }
        }
    }
}

/// A tensor we own, in the form safetensors serialises.
struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedTensor {
    fn f32_mat(m: &Mat) -> Self {
        Self {
            dtype: Dtype::F32,
            shape: vec![m.rows, m.cols],
            bytes: m.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn f32_stack(views: &[Mat], dim: usize) -> Self {
        let n = views.first().map(|v| v.rows).unwrap_or(0);
        Self {
            dtype: Dtype::F32,
            shape: vec![views.len(), n, dim],
            bytes: views
                .iter()
                .flat_map(|v| v.data.iter().flat_map(|x| x.to_le_bytes()))
                .collect(),
        }
    }

    fn labels(l: &[usize]) -> Self {
        Self {
            dtype: Dtype::I64,
            shape: vec![l.len()],
            bytes: l.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
        }
    }
}

impl View for OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Serialises named f32 matrices into a safetensors byte buffer with metadata; shared with the
/// adapter file so both use one writer.
pub(crate) fn serialize_tensors(
    mats: &[(String, &Mat)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let tensors: Vec<(String, OwnedTensor)> = mats
        .iter()
        .map(|(n, m)| (n.clone(), OwnedTensor::f32_mat(m)))
        .collect();
    safetensors::serialize(tensors, Some(meta)).map_err(|e| e.to_string())
}

/// Reads back what [`serialize_tensors`] wrote: metadata and f32 matrices by name.
pub(crate) struct TensorFile {
    pub meta: HashMap<String, String>,
    pub mats: HashMap<String, Mat>,
}

pub(crate) fn deserialize_tensors(path: &Path, bytes: &[u8]) -> Result<TensorFile, FeaturesError> {
    let format_err = |msg: String| FeaturesError::Format {
        path: path.to_path_buf(),
        msg,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_err(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| format_err(e.to_string()))?;
    let r = Reader { path, st: &st };
    let mut mats = HashMap::new();
    for name in st.names() {
        let is_float = st
            .tensor(name)
            .map(|v| {
                matches!(
                    v.dtype(),
                    Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
                )
            })
            .unwrap_or(false);
        if is_float {
            if let Some(m) = r.mat(name)? {
                mats.insert(name.to_string(), m);
            }
        }
    }
    Ok(TensorFile { meta, mats })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> FeatureSet {
        let mut f = Mat::from_vec(3, 2, vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8]);
        f.l2_normalize_rows();
        let mut train = LabelledSplit::new(f.clone(), vec![0, 1, 1]);
        train.views = Some(vec![f.clone(), f.clone()]);
        train.paths = Some(vec!["a/1.png".into(), "b/2.png".into(), "b/3.png".into()]);
        FeatureSet {
            classes: vec!["a".into(), "b".into()],
            dim: 2,
            model: Some("test".into()),
            test_checkpoint: true,
            templates: vec!["a photo of a {}.".into()],
            text: Some(Mat::from_vec(2, 2, vec![1.0, 0.0, 0.0, 1.0])),
            text_neg: Some(Mat::from_vec(2, 2, vec![0.0, 1.0, 1.0, 0.0])),
            train: Some(train),
            unlabelled: Some(UnlabelledSplit {
                features: f,
                paths: vec!["x.png".into(), "y.png".into(), "z.png".into()],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.safetensors");
        let fs = tiny();
        fs.save(&p).unwrap();
        let back = FeatureSet::load(&p).unwrap();
        assert_eq!(back, fs);
    }

    #[test]
    fn label_out_of_range_and_nan_are_named() {
        let mut fs = tiny();
        if let Some(t) = fs.train.as_mut() {
            t.labels[2] = 5;
        }
        let e = fs.validate().unwrap_err().to_string();
        assert!(e.contains("train.labels") && e.contains("label 5"), "{e}");

        let mut fs = tiny();
        if let Some(t) = fs.train.as_mut() {
            t.features.data[3] = f32::NAN;
        }
        let e = fs.validate().unwrap_err().to_string();
        assert!(e.contains("train.features") && e.contains("row 1"), "{e}");
    }
}
