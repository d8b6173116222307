//! A features file opened as a project without images (`hegraph gui FEATURES.safetensors`): every row of the
//! file is a tile showing its split and class, so predictions, the graph view, training and similarity search
//! run on real CLIP features on any machine, without the images or CLIP's weights.
//!
//! Choices:
//! - Read-only: no project file is written (the features file is someone's data set, and its folder may be
//!   shared). Labels given here live in memory for the session; the status line says so.
//! - The training split's labels (the largest `shots{K}` draw, and `train`) are the project's labels
//!   (imported); `val`, `test` and `unlabelled` rows start unlabelled, their file labels shown on the tile as
//!   the truth, so a person can see where the model is wrong.
//! - Text: the file's `text.features` are the class prompts (zero-shot predictions from the first frame); a
//!   file without them has no text side: training methods that need one say so.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::jobs;
use super::state::ImageItem;
use super::{AppError, HeGraphApp, Level};
use crate::adapter::TrainParams;
use crate::features::{FeatureSet, ImageRow};
use crate::project::{LabelOrigin, Project};

/// Where the open features project came from, and what each tile shows.
pub struct FeaturesSource {
    pub path: PathBuf,
    pub rows: Vec<ImageRow>,
    pub has_text: bool,
}

impl FeaturesSource {
    /// The tile's text: the split and row, and the file's label.
    pub fn card(&self, i: usize, classes: &[String]) -> String {
        let Some(r) = self.rows.get(i) else {
            return String::new();
        };
        let class = r
            .label
            .and_then(|l| classes.get(l))
            .map_or("no label in the file", String::as_str);
        format!("{} #{}\n{class}", r.split, r.index)
    }

    pub fn file_name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// Whether `path` is a features file (by its name: a project file is `.json`).
pub fn is_features_file(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "safetensors")
}

/// Whether a split's labels are the training labels of the project.
fn is_training_split(split: &str) -> bool {
    split == "train" || split.starts_with("shots")
}

impl HeGraphApp {
    /// Opens a features file as a read-only project (see the module docs).
    pub fn open_features_file(&mut self, path: &Path) -> Result<(), AppError> {
        let fs = FeatureSet::load(path)?;
        let (features, rows) = fs.image_rows();
        if rows.is_empty() {
            return Err(AppError::NoRows {
                path: path.to_path_buf(),
            });
        }
        let folder = path.parent().map_or_else(PathBuf::new, Path::to_path_buf);
        let mut project = Project::new(folder, fs.classes.clone());
        let images: Vec<ImageItem> = rows
            .iter()
            .map(|r| ImageItem {
                rel: format!("{}/{:06}", r.split, r.index),
                path: PathBuf::new(),
            })
            .collect();
        for (im, r) in images.iter().zip(&rows) {
            if let Some(l) = r.label.filter(|_| is_training_split(&r.split)) {
                if let Some(name) = fs.classes.get(l) {
                    project.set_label(&im.rel, Some((name.clone(), LabelOrigin::Imported)));
                }
            }
        }
        // Nothing to embed: the session starts without the embedding `install` would begin.
        let auto = std::mem::replace(&mut self.opts.auto_embed, false);
        self.install(project, None, images);
        self.opts.auto_embed = auto;
        // A model kept from an earlier project did not make these features.
        self.engine.embedder = None;
        self.engine.model = None;
        self.engine.model_request = None;
        let n = features.rows;
        let centre = Arc::new(features);
        self.engine.ok = vec![true; n];
        self.engine.text = fs.text.clone().map(Arc::new);
        self.engine.text_neg = fs.text_neg.clone().map(Arc::new);
        self.engine.embedded_for = (fs.classes.clone(), Vec::new());
        let zero_shot = self
            .engine
            .text
            .as_ref()
            .map(|t| jobs::zero_shot_probs(&centre, t, TrainParams::default().logit_scale));
        self.engine.centre = Some(centre);
        self.engine.serial += 1;
        if let Some(s) = self.session.as_mut() {
            s.set_predictions(zero_shot);
        }
        let has_text = fs.text.is_some();
        self.features_file = Some(FeaturesSource {
            path: path.to_path_buf(),
            rows,
            has_text,
        });
        let text_note = if has_text {
            "zero-shot predictions from the file's text features"
        } else {
            "the file has no text features: no zero-shot predictions, and methods that need text cannot train"
        };
        self.notify(
            Level::Info,
            format!(
                "opened {} read-only: {n} images without pictures; labels you give stay in memory; {text_note}",
                path.display()
            ),
        );
        Ok(())
    }

    /// The open features file, when the project is one.
    pub fn features_source(&self) -> Option<&FeaturesSource> {
        self.features_file.as_ref()
    }
}
