//! The project file: one JSON document that remembers what a person did with a folder (classes, labels,
//! prompt templates, settings, the trained adapter), shared by the GUI and the CLI.
//!
//! Why the rules below: labelling is slow human work, so losing it is the worst thing this program can do.
//! - Saves are atomic: the new text goes to `<file>.tmp`, is flushed to disk (`fsync`), then renamed over the
//!   old file (and the folder is flushed too where the platform allows). A crash or kill at any moment leaves
//!   either the old or the new file, never half of one; a leftover `.tmp` is ignored and overwritten later.
//! - The GUI saves after every labelling action, so nothing is lost between saves.
//! - A file this version cannot read (corrupt, or written by a newer version) is never overwritten: [`Project::
//!   save`] refuses, and the person decides ([`set_aside`] moves a broken file away under a `.bak` name).
//! - An older file is upgraded in memory on load; the first save keeps the original as `<file>.v<N>.bak`.
//!
//! Labels are stored by class *name*, keyed by the image path relative to the folder (with `/`), so renaming,
//! reordering or adding classes cannot silently relabel images, and the file stays readable by hand.
//!
//! Format history: version 1 stored labels as class indices (`"labels": {"a.png": 0}`), which silently changed
//! meaning when the class list was edited; version 2 (current) stores names and adds templates, settings and the
//! adapter path. Version 1 files are upgraded on load.

pub mod export;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapter::{Method, TrainParams};

/// The version this build writes.
pub const PROJECT_VERSION: u32 = 2;

/// Where a folder's project lives by default: next to its features (`.hegraph/`), so a folder carries its own
/// state and opening the folder again finds it.
pub fn default_project_path(folder: &Path) -> PathBuf {
    folder
        .join(crate::data::PROJECT_DIR_NAME)
        .join("project.json")
}

/// Where a folder's project goes when the folder cannot hold it (read-only media, a file named `.hegraph` in
/// the way): under hegraph's per-user folder, one sub-folder per image folder. The name starts with the
/// folder's own name so a person can find it, and ends with a hash of the whole path so two folders of the
/// same name never share a project.
pub fn fallback_project_path(user_dir: &Path, folder: &Path) -> PathBuf {
    let name: String = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let hash = blake3::hash(folder.as_os_str().as_encoded_bytes()).to_hex();
    user_dir
        .join("projects")
        .join(format!("{name}-{}", &hash[..16]))
        .join("project.json")
}

/// The prompt template used when the person gives none (the SPEC's default for a user folder).
pub const DEFAULT_TEMPLATE: &str = "a photo of a {}.";

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("cannot read the project file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the project file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot save the project as {}: {} is a file, not a folder", path.display(), blocker.display())]
    NotAFolder { path: PathBuf, blocker: PathBuf },
    #[error("{} is not a readable hegraph project ({detail}); it was left untouched. Fix it by hand, or move it \
             aside (the GUI offers to rename it to a .bak file) and open the image folder again", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{} was written by a newer hegraph (project version {found}; this build reads up to {supported}); \
             it was left untouched: upgrade hegraph to open it", path.display())]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("refusing to overwrite {}: {reason}", path.display())]
    RefuseOverwrite { path: PathBuf, reason: String },
    #[error("cannot serialise the project: {0}")]
    Serialise(#[from] serde_json::Error),
    #[error("class '{0}' already exists (names are compared ignoring case)")]
    DuplicateClass(String),
    #[error("a class name cannot be empty")]
    EmptyClass,
    #[error("there is no class '{0}'")]
    UnknownClass(String),
}

/// Settings a person may change in the GUI; every field has a default so older files and hand-written files
/// load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The CLIP model: a checkpoint folder, or `None` for the default look-up of [`crate::clip::hub`].
    pub model_dir: Option<PathBuf>,
    /// Whether the model may be downloaded when it is not found locally.
    pub allow_download: bool,
    pub method: Method,
    pub train: TrainParams,
    /// Refine the predictions of the unlabelled images with their own features after each training
    /// ([`crate::adapter::transduce`]).
    pub transductive: bool,
    /// Retrain automatically after this many new labels; 0 = only on request.
    pub auto_train_every: u32,
    /// Move to the next image after a label is given.
    pub auto_advance: bool,
    /// Share of the labelled images (per class, at least one image left for training) held out to measure
    /// accuracy after training, in percent; 0 = train on everything and report no accuracy.
    pub held_out_percent: u32,
    /// Thumbnail edge in the grid, in points.
    pub thumb_size: f32,
    /// The grid's sort order and the view last shown (the GUI's names), so a project reopens as it was left.
    pub sort: String,
    pub view: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model_dir: None,
            allow_download: false,
            method: Method::HeGraph,
            train: TrainParams::default(),
            transductive: true,
            auto_train_every: 0,
            auto_advance: true,
            held_out_percent: 20,
            thumb_size: 112.0,
            sort: String::new(),
            view: String::new(),
        }
    }
}

/// The outcome of the last training, kept so the status line can show it after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// Seconds since the Unix epoch.
    pub finished_unix: u64,
    pub method: String,
    pub labelled: usize,
    /// Accuracy on the held-out labelled images, when any were held out.
    pub held_out_accuracy: Option<f32>,
    pub held_out: usize,
    pub seconds: f64,
}

/// Where a label came from. A person can then tell their own labels from those they accepted in bulk or
/// imported, and an export carries the difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelOrigin {
    /// Given by the person, image by image.
    #[default]
    Human,
    /// A prediction the person accepted without looking at each image (a bulk label that agrees with the
    /// model's top class, or "accept predictions ≥ X").
    Accepted,
    /// Read from the folder: class sub-folders, a labels CSV.
    Imported,
}

impl LabelOrigin {
    /// Words for the GUI.
    pub fn describe(self) -> &'static str {
        match self {
            LabelOrigin::Human => "your label",
            LabelOrigin::Accepted => "accepted prediction",
            LabelOrigin::Imported => "imported",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub version: u32,
    /// The image folder. Stored relative to the project file when it lies below the project's folder (so a
    /// folder can be moved with its `.hegraph/`), else absolute; [`Project::load`] makes it absolute again.
    pub folder: PathBuf,
    pub classes: Vec<String>,
    /// Prompt templates with `{}` for the class name.
    #[serde(default = "default_templates")]
    pub templates: Vec<String>,
    /// Image path relative to `folder` (with `/`) → class name.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where a label came from, for labels a person did not give one by one (absent = [`LabelOrigin::Human`],
    /// so files from before this field read as they were meant). Entries without a label mean nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_origins: BTreeMap<String, LabelOrigin>,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub adapter_path: Option<PathBuf>,
    #[serde(default)]
    pub last_training: Option<TrainingRecord>,
    /// Cross-validated accuracy after each training ([`crate::review`]), oldest first: how the model improves
    /// as labels accumulate, kept so the training view can plot it across sessions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accuracy_history: Vec<AccuracyPoint>,
}

/// The k-fold cross-validated accuracy on the labelled images after one training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccuracyPoint {
    /// Seconds since the Unix epoch.
    pub finished_unix: u64,
    /// Labelled images at the time (all of them take part in the cross-validation).
    pub labels: usize,
    pub accuracy: f32,
    pub folds: usize,
}

fn default_templates() -> Vec<String> {
    vec![DEFAULT_TEMPLATE.to_string()]
}

/// A project as loaded, with what was done to it on the way.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub project: Project,
    /// The file's version when it was older than [`PROJECT_VERSION`] and was upgraded in memory.
    pub migrated_from: Option<u32>,
    /// Remarks for the person (e.g. labels dropped by the upgrade because their class index was out of range).
    pub warnings: Vec<String>,
}

/// The version-1 layout, kept only to upgrade it.
#[derive(Deserialize)]
struct ProjectV1 {
    folder: PathBuf,
    classes: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: Option<u32>,
}

impl Project {
    pub fn new(folder: PathBuf, classes: Vec<String>) -> Self {
        Self {
            version: PROJECT_VERSION,
            folder,
            classes,
            templates: default_templates(),
            labels: BTreeMap::new(),
            label_origins: BTreeMap::new(),
            settings: Settings::default(),
            adapter_path: None,
            last_training: None,
            accuracy_history: Vec::new(),
        }
    }

    /// Reads and, if needed, upgrades a project file. Never writes anything.
    pub fn load(path: &Path) -> Result<Loaded, ProjectError> {
        let bytes = fs::read(path).map_err(|source| ProjectError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut loaded = Self::from_bytes(&bytes, path)?;
        if let Some(base) = path.parent() {
            if loaded.project.folder.is_relative() {
                loaded.project.folder = base.join(&loaded.project.folder);
            }
        }
        Ok(loaded)
    }

    fn from_bytes(bytes: &[u8], path: &Path) -> Result<Loaded, ProjectError> {
        let corrupt = |detail: String| ProjectError::Corrupt {
            path: path.to_path_buf(),
            detail,
        };
        let version = serde_json::from_slice::<VersionOnly>(bytes)
            .map_err(|e| corrupt(e.to_string()))?
            .version
            .ok_or_else(|| corrupt("it has no \"version\" field".into()))?;
        match version {
            PROJECT_VERSION => {
                let mut value: serde_json::Value =
                    serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
                // Training settings from before the adopted reading are the SPEC's defaults, 10 points
                // worse without a validation split: they give way to the new defaults.
                let reset = value
                    .get("settings")
                    .and_then(|s| s.get("train"))
                    .is_some_and(TrainParams::predates_fusion_setting);
                if reset {
                    if let Some(s) = value.get_mut("settings").and_then(|s| s.as_object_mut()) {
                        s.remove("train");
                    }
                }
                let mut project: Project =
                    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
                let mut warnings = project.consistency_warnings();
                warnings.extend(project.reset_unsavable_numbers());
                if reset {
                    warnings.push(
                        "the training settings were reset to the new defaults (logit fusion, zero-initialised \
                         graph, hyperparameters by leave-one-out); the paper's reading is one click away in the \
                         training view"
                            .into(),
                    );
                }
                Ok(Loaded {
                    project,
                    migrated_from: None,
                    warnings,
                })
            }
            1 => {
                let old: ProjectV1 =
                    serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
                let mut project = Project::new(old.folder, old.classes);
                let mut warnings = Vec::new();
                for (rel, idx) in old.labels {
                    match project.classes.get(idx) {
                        Some(name) => {
                            project.labels.insert(rel, name.clone());
                        }
                        None => warnings.push(format!(
                            "{rel}: label {idx} is not a class index (there are {} classes); left unlabelled",
                            project.classes.len()
                        )),
                    }
                }
                Ok(Loaded {
                    project,
                    migrated_from: Some(1),
                    warnings,
                })
            }
            v if v > PROJECT_VERSION => Err(ProjectError::TooNew {
                path: path.to_path_buf(),
                found: v,
                supported: PROJECT_VERSION,
            }),
            v => Err(corrupt(format!("unknown project version {v}"))),
        }
    }

    /// A number too large for its `f32` field (a hand edit: `1e308`) loads as infinity and would be saved as
    /// `null`, which no later load accepts, so the next save after a label would lock the person out of their
    /// labels. Such settings go back to their defaults (as do training settings that cannot train), with a
    /// warning; the labels are untouched.
    fn reset_unsavable_numbers(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        let s = &mut self.settings;
        if let Err(why) = s.train.check() {
            s.train = TrainParams::default();
            warnings.push(format!(
                "the training settings were reset to the defaults: {why}"
            ));
        }
        if !(s.thumb_size.is_finite() && s.thumb_size > 0.0) {
            warnings.push(format!(
                "the thumbnail size {} was reset to the default",
                s.thumb_size
            ));
            s.thumb_size = Settings::default().thumb_size;
        }
        if let Some(r) = &mut self.last_training {
            if r.held_out_accuracy.is_some_and(|a| !a.is_finite()) {
                r.held_out_accuracy = None;
            }
        }
        warnings
    }

    /// Remarks about labels that name no class (e.g. after a hand edit); they are kept, not dropped, so a
    /// class added back later finds its images again.
    fn consistency_warnings(&self) -> Vec<String> {
        let unknown = self
            .labels
            .values()
            .filter(|c| !self.classes.contains(c))
            .count();
        if unknown == 0 {
            Vec::new()
        } else {
            vec![format!(
                "{unknown} label(s) name a class that is not in the class list; they are kept but ignored"
            )]
        }
    }

    /// Saves atomically (see the module docs), refusing to replace a file this build cannot read, and keeping
    /// an older-version file as `<file>.v<N>.bak` the first time it is replaced.
    pub fn save(&self, path: &Path) -> Result<(), ProjectError> {
        if let Some(blocker) = file_in_the_way(path) {
            return Err(ProjectError::NotAFolder {
                path: path.to_path_buf(),
                blocker,
            });
        }
        if let Some(existing) = existing_version(path)? {
            if existing < PROJECT_VERSION {
                let bak = version_backup_path(path, existing);
                if !bak.exists() {
                    fs::copy(path, &bak)
                        .map_err(|source| ProjectError::Write { path: bak, source })?;
                }
            }
        }
        let mut stored = self.clone();
        stored.version = PROJECT_VERSION;
        if let Some(base) = path.parent() {
            if let Ok(rel) = stored.folder.strip_prefix(base) {
                stored.folder = rel.to_path_buf();
            } else if let Some(grand) = base.parent() {
                // The default layout `<folder>/.hegraph/project.json`: store the folder as `..`.
                if stored.folder == grand {
                    stored.folder = PathBuf::from("..");
                }
            }
        }
        let mut text = serde_json::to_vec_pretty(&stored)?;
        text.push(b'\n');
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|source| ProjectError::Write {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
        }
        atomic_write(path, &text).map_err(|source| ProjectError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Where the label of `rel` came from (meaningful only while it has one).
    pub fn origin(&self, rel: &str) -> LabelOrigin {
        self.label_origins.get(rel).copied().unwrap_or_default()
    }

    /// Sets (or, with `None`, removes) the label of `rel` with its origin.
    pub fn set_label(&mut self, rel: &str, label: Option<(String, LabelOrigin)>) {
        match label {
            Some((class, origin)) => {
                self.labels.insert(rel.to_string(), class);
                if origin == LabelOrigin::Human {
                    self.label_origins.remove(rel);
                } else {
                    self.label_origins.insert(rel.to_string(), origin);
                }
            }
            None => {
                self.labels.remove(rel);
                self.label_origins.remove(rel);
            }
        }
    }

    /// The label of an image as a class index, `None` when unlabelled or when the name is not a class.
    pub fn label_index(&self, rel: &str) -> Option<usize> {
        let name = self.labels.get(rel)?;
        self.classes.iter().position(|c| c == name)
    }

    /// Number of labelled images per class (labels naming no class are not counted).
    pub fn counts_per_class(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for name in self.labels.values() {
            if let Some(i) = self.classes.iter().position(|c| c == name) {
                counts[i] += 1;
            }
        }
        counts
    }

    pub fn add_class(&mut self, name: &str) -> Result<(), ProjectError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(ProjectError::EmptyClass);
        }
        if self.classes.iter().any(|c| c.eq_ignore_ascii_case(name)) {
            return Err(ProjectError::DuplicateClass(name.to_string()));
        }
        self.classes.push(name.to_string());
        Ok(())
    }

    /// Renames a class and every label that uses it.
    pub fn rename_class(&mut self, old: &str, new: &str) -> Result<(), ProjectError> {
        let new = new.trim();
        if new.is_empty() {
            return Err(ProjectError::EmptyClass);
        }
        let idx = self
            .classes
            .iter()
            .position(|c| c == old)
            .ok_or_else(|| ProjectError::UnknownClass(old.to_string()))?;
        if self
            .classes
            .iter()
            .enumerate()
            .any(|(i, c)| i != idx && c.eq_ignore_ascii_case(new))
        {
            return Err(ProjectError::DuplicateClass(new.to_string()));
        }
        self.classes[idx] = new.to_string();
        for label in self.labels.values_mut() {
            if label == old {
                *label = new.to_string();
            }
        }
        Ok(())
    }

    /// Removes a class and its labels; returns how many images became unlabelled.
    pub fn remove_class(&mut self, name: &str) -> Result<usize, ProjectError> {
        let idx = self
            .classes
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| ProjectError::UnknownClass(name.to_string()))?;
        self.classes.remove(idx);
        let before = self.labels.len();
        self.labels.retain(|_, c| c != name);
        let labels = &self.labels;
        self.label_origins.retain(|rel, _| labels.contains_key(rel));
        Ok(before - self.labels.len())
    }
}

/// The nearest ancestor of `path` that exists but is not a folder (e.g. a file named `.hegraph` where the
/// project folder should be): saving below it can only fail, with an OS message that does not say why.
fn file_in_the_way(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| a.exists())
        .filter(|a| !a.is_dir())
        .map(Path::to_path_buf)
}

/// `Some(version)` of an existing, readable project file at `path`, `None` when there is no file; an error when
/// there is a file this build must not overwrite.
fn existing_version(path: &Path) -> Result<Option<u32>, ProjectError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ProjectError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let refuse = |reason: String| ProjectError::RefuseOverwrite {
        path: path.to_path_buf(),
        reason,
    };
    match serde_json::from_slice::<VersionOnly>(&bytes) {
        Ok(VersionOnly { version: Some(v) }) if v <= PROJECT_VERSION => Ok(Some(v)),
        Ok(VersionOnly { version: Some(v) }) => Err(refuse(format!(
            "it was written by a newer hegraph (project version {v}); upgrade hegraph or save elsewhere"
        ))),
        Ok(VersionOnly { version: None }) => Err(refuse(
            "it is not a hegraph project (no \"version\" field); move it aside or save elsewhere".into(),
        )),
        Err(e) => Err(refuse(format!(
            "it is not readable ({e}); move it aside (it may hold labels) or save elsewhere"
        ))),
    }
}

/// `<file>.v<N>.bak`: the copy of a version-`N` file kept when it is first replaced by an upgraded one.
pub fn version_backup_path(path: &Path, version: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".v{version}.bak"));
    path.with_file_name(name)
}

/// The temporary file of an atomic save of `path`: `<file>.tmp` in the same folder (a rename is only atomic
/// within one file system).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Moves an unreadable project file out of the way as `<file>.broken-<unix seconds>.bak` so a new project can
/// be started without destroying what the old file held. Returns the new name.
pub fn set_aside(path: &Path) -> Result<PathBuf, ProjectError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".broken-{secs}.bak"));
    let target = path.with_file_name(name);
    fs::rename(path, &target).map_err(|source| ProjectError::Write {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content: temp file in the same
/// folder, `fsync`, rename over, then `fsync` of the folder (Unix; elsewhere the rename is the best we have).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = fs::File::open(dir) {
            // A failed folder sync only weakens durability, not atomicity: not worth failing the save.
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Project {
        let mut p = Project::new(dir.join("images"), vec!["cat".into(), "dog".into()]);
        p.labels.insert("a.png".into(), "cat".into());
        p.labels.insert("sub/b.png".into(), "dog".into());
        p
    }

    #[test]
    fn save_then_load_round_trips_and_stores_the_folder_relative() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let p = sample(dir.path());
        p.save(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"folder\": \"images\""), "{text}");
        let back = Project::load(&path).unwrap();
        assert_eq!(back.project, p);
        assert!(back.migrated_from.is_none());
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn default_layout_stores_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("photos");
        let path = default_project_path(&folder);
        let p = Project::new(folder.clone(), vec!["a".into()]);
        p.save(&path).unwrap();
        assert!(fs::read_to_string(&path)
            .unwrap()
            .contains("\"folder\": \"..\""));
        let back = Project::load(&path).unwrap().project;
        assert_eq!(
            back.folder.canonicalize().unwrap(),
            folder.canonicalize().unwrap()
        );
    }

    #[test]
    fn version_1_is_upgraded_and_backed_up_on_first_save() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let v1 = r#"{"version": 1, "folder": "/data/x", "classes": ["cat", "dog"],
                     "labels": {"a.png": 1, "b.png": 0, "c.png": 7}}"#;
        fs::write(&path, v1).unwrap();
        let loaded = Project::load(&path).unwrap();
        assert_eq!(loaded.migrated_from, Some(1));
        assert_eq!(
            loaded.project.labels.get("a.png").map(String::as_str),
            Some("dog")
        );
        assert_eq!(
            loaded.project.labels.get("b.png").map(String::as_str),
            Some("cat")
        );
        assert!(!loaded.project.labels.contains_key("c.png"));
        assert_eq!(loaded.warnings.len(), 1);
        assert!(loaded.warnings[0].contains("c.png"));
        loaded.project.save(&path).unwrap();
        let bak = version_backup_path(&path, 1);
        assert_eq!(fs::read_to_string(&bak).unwrap(), v1);
        assert_eq!(Project::load(&path).unwrap().migrated_from, None);
    }

    #[test]
    fn corrupt_and_newer_files_are_reported_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let p = sample(dir.path());
        for (content, want) in [
            ("{\"version\": 2, \"folder\": ", "not a readable"),
            ("{\"folder\": \"x\"}", "no \"version\""),
            (
                "{\"version\": 99, \"folder\": \"x\", \"classes\": []}",
                "newer hegraph",
            ),
        ] {
            fs::write(&path, content).unwrap();
            let err = Project::load(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            let err = p.save(&path).unwrap_err();
            assert!(matches!(err, ProjectError::RefuseOverwrite { .. }), "{err}");
            assert_eq!(fs::read_to_string(&path).unwrap(), content);
        }
        let moved = set_aside(&path).unwrap();
        assert!(!path.exists() && moved.exists());
        p.save(&path).unwrap();
        assert_eq!(Project::load(&path).unwrap().project, p);
    }

    #[test]
    fn a_file_where_the_project_folder_goes_is_named_and_the_fallback_is_per_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("photos");
        fs::create_dir_all(&folder).unwrap();
        fs::write(folder.join(".hegraph"), "not a folder").unwrap();
        let p = Project::new(folder.clone(), vec!["a".into()]);
        let err = p.save(&default_project_path(&folder)).unwrap_err();
        match &err {
            ProjectError::NotAFolder { blocker, .. } => {
                assert_eq!(blocker, &folder.join(".hegraph"))
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("is a file, not a folder"), "{err}");
        assert_eq!(
            fs::read_to_string(folder.join(".hegraph")).unwrap(),
            "not a folder"
        );

        let user = dir.path().join("user");
        let fallback = fallback_project_path(&user, &folder);
        assert!(fallback.starts_with(user.join("projects")));
        assert!(fallback.to_string_lossy().contains("photos-"));
        assert_ne!(
            fallback,
            fallback_project_path(&user, &dir.path().join("x").join("photos"))
        );
        p.save(&fallback).unwrap();
        let back = Project::load(&fallback).unwrap().project;
        assert_eq!(
            back.folder, folder,
            "a project outside its folder stores the folder's full path"
        );
    }

    #[test]
    fn class_edits_carry_labels() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sample(dir.path());
        assert!(matches!(
            p.add_class("CAT"),
            Err(ProjectError::DuplicateClass(_))
        ));
        p.add_class("bird").unwrap();
        p.rename_class("cat", "kitten").unwrap();
        assert_eq!(p.labels["a.png"], "kitten");
        assert_eq!(p.label_index("a.png"), Some(0));
        assert_eq!(p.counts_per_class(), vec![1, 1, 0]);
        assert_eq!(p.remove_class("dog").unwrap(), 1);
        assert_eq!(p.classes, vec!["kitten", "bird"]);
        assert_eq!(p.label_index("sub/b.png"), None);
    }
}
