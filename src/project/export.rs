//! Exports of a project's labels (and, optionally, the model's predictions for unlabelled images): an
//! ImageNet-style tree of class folders, a CSV `path,label,confidence,source` and a JSON document. Shared by the GUI
//! and the CLI, so it knows nothing of either.
//!
//! Choices:
//! - A label always wins over a prediction. Every row says where it came from (`source`: `human` for the
//!   person's own labels, `accepted` for predictions accepted in bulk, `imported` for sub-folder or CSV labels,
//!   `predicted` for the model's guess); only predictions carry a confidence (a label is not a probability:
//!   the CSV leaves the field empty, the JSON writes `null`).
//! - In the tree, an image's file name is its relative path with `/` replaced by `__`, so images with the same
//!   name in different sub-folders cannot collide, and the origin stays visible.
//! - CSV and JSON are written atomically like the project file; the tree is written file by file (it is a copy,
//!   the originals are untouched).

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{atomic_write, LabelOrigin, Project};
use crate::linalg::{argmax, Mat};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot link {} to {}: {source}; export copies instead (symbolic links may need extra \
             permissions on this system)", link.display(), target.display())]
    Link {
        link: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists and is not empty; choose an empty or new folder so nothing is mixed or \
             overwritten", path.display())]
    NotEmpty { path: PathBuf },
    #[error("cannot write the CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("cannot write the JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the predictions have {got} rows for {want} images (or {got_c} classes for {want_c}); train again")]
    Shape {
        got: usize,
        want: usize,
        got_c: usize,
        want_c: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSource {
    Human,
    Accepted,
    Imported,
    Predicted,
}

impl LabelSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelSource::Human => "human",
            LabelSource::Accepted => "accepted",
            LabelSource::Imported => "imported",
            LabelSource::Predicted => "predicted",
        }
    }
}

impl From<LabelOrigin> for LabelSource {
    fn from(o: LabelOrigin) -> Self {
        match o {
            LabelOrigin::Human => LabelSource::Human,
            LabelOrigin::Accepted => LabelSource::Accepted,
            LabelOrigin::Imported => LabelSource::Imported,
        }
    }
}

/// One exported image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExportRow {
    /// Path relative to the project folder, with `/`, in the stored form of [`crate::stored_path`] (exact
    /// even for names that are not UTF-8).
    pub path: String,
    pub label: String,
    /// The model's probability of `label` for a prediction; `None` for a label.
    pub confidence: Option<f32>,
    pub source: LabelSource,
}

/// What to export.
#[derive(Clone, Debug)]
pub struct RowOptions {
    /// Also export the predicted class of unlabelled images.
    pub include_predicted: bool,
    /// Predictions below this probability are left out.
    pub min_confidence: f32,
}

impl Default for RowOptions {
    fn default() -> Self {
        Self {
            include_predicted: false,
            min_confidence: 0.0,
        }
    }
}

/// The rows to export, in `images` order. `probs` (when given) has one row per entry of `images` and one
/// column per class of the project.
pub fn export_rows(
    project: &Project,
    images: &[String],
    probs: Option<&Mat>,
    opts: &RowOptions,
) -> Result<Vec<ExportRow>, ExportError> {
    if let Some(p) = probs {
        if p.rows != images.len() || p.cols != project.classes.len() {
            return Err(ExportError::Shape {
                got: p.rows,
                want: images.len(),
                got_c: p.cols,
                want_c: project.classes.len(),
            });
        }
    }
    let mut rows = Vec::new();
    for (i, rel) in images.iter().enumerate() {
        if let Some(c) = project.label_index(rel) {
            rows.push(ExportRow {
                path: rel.clone(),
                label: project.classes[c].clone(),
                confidence: None,
                source: project.origin(rel).into(),
            });
        } else if let (true, Some(p)) = (opts.include_predicted, probs) {
            let row = p.row(i);
            if row.is_empty() {
                continue;
            }
            let c = argmax(row);
            if row[c] >= opts.min_confidence {
                rows.push(ExportRow {
                    path: rel.clone(),
                    label: project.classes[c].clone(),
                    confidence: Some(row[c]),
                    source: LabelSource::Predicted,
                });
            }
        }
    }
    Ok(rows)
}

/// `path,label,confidence,source` with a header line.
pub fn write_csv(rows: &[ExportRow], out: &Path) -> Result<(), ExportError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["path", "label", "confidence", "source"])?;
    for r in rows {
        w.write_record([
            r.path.as_str(),
            r.label.as_str(),
            &r.confidence.map(|c| format!("{c:.4}")).unwrap_or_default(),
            r.source.as_str(),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| ExportError::Write {
        path: out.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    atomic_write(out, &bytes).map_err(|source| ExportError::Write {
        path: out.to_path_buf(),
        source,
    })
}

#[derive(Serialize)]
struct JsonExport<'a> {
    /// Stored form: serde refuses a `Path` that is not UTF-8, and a lossy one would name another folder.
    folder: String,
    classes: &'a [String],
    images: &'a [ExportRow],
}

/// `{ "folder", "classes", "images": [{path, label, confidence, source}] }`.
pub fn write_json(project: &Project, rows: &[ExportRow], out: &Path) -> Result<(), ExportError> {
    let doc = JsonExport {
        folder: crate::stored_path::path_to_stored(&project.folder),
        classes: &project.classes,
        images: rows,
    };
    let mut bytes = serde_json::to_vec_pretty(&doc)?;
    bytes.push(b'\n');
    atomic_write(out, &bytes).map_err(|source| ExportError::Write {
        path: out.to_path_buf(),
        source,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeMode {
    Copy,
    Symlink,
}

/// What [`export_tree`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeSummary {
    pub files: usize,
    pub classes: usize,
}

/// A class name made safe as a folder name on every platform (path separators and reserved characters become
/// `_`; an empty or dot-only name becomes `_`).
pub fn folder_name(class: &str) -> String {
    let s: String = class
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let s = s.trim().to_string();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "_".to_string()
    } else {
        s
    }
}

/// `out/<class>/<rel with / → __>` for every row, copying or linking the image from `folder`. `out` must be
/// new or empty.
pub fn export_tree(
    folder: &Path,
    rows: &[ExportRow],
    out: &Path,
    mode: TreeMode,
) -> Result<TreeSummary, ExportError> {
    if let Ok(mut entries) = fs::read_dir(out) {
        if entries.next().is_some() {
            return Err(ExportError::NotEmpty {
                path: out.to_path_buf(),
            });
        }
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Write { path, source }
    };
    fs::create_dir_all(out).map_err(write_err(out))?;
    let mut classes = std::collections::BTreeSet::new();
    for r in rows {
        let dir = out.join(folder_name(&r.label));
        if classes.insert(dir.clone()) {
            fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        }
        // The real bytes of the name, so the copy is named like the original even when that is not UTF-8.
        let target = dir.join(crate::stored_path::path_from_stored(
            &r.path.replace('/', "__"),
        ));
        let source = folder.join(crate::stored_path::path_from_stored(&r.path));
        match mode {
            TreeMode::Copy => {
                fs::copy(&source, &target).map_err(write_err(&target))?;
            }
            TreeMode::Symlink => {
                let abs = source.canonicalize().unwrap_or(source);
                link(&abs, &target).map_err(|e| ExportError::Link {
                    link: target.clone(),
                    target: abs.clone(),
                    source: e,
                })?;
            }
        }
    }
    Ok(TreeSummary {
        files: rows.len(),
        classes: classes.len(),
    })
}

#[cfg(unix)]
fn link(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn link(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(target, link)
}

#[cfg(not(any(unix, windows)))]
fn link(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "symbolic links are not supported on this platform",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Project, Vec<String>, Mat) {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("imgs");
        fs::create_dir_all(folder.join("sub")).unwrap();
        for rel in ["a.png", "sub/a.png", "c.png"] {
            fs::write(folder.join(rel), rel.as_bytes()).unwrap();
        }
        let mut p = Project::new(folder, vec!["cat/dog".into(), "bird".into()]);
        p.labels.insert("a.png".into(), "bird".into());
        let images = vec![
            "a.png".to_string(),
            "sub/a.png".to_string(),
            "c.png".to_string(),
        ];
        let probs = Mat::from_vec(3, 2, vec![0.1, 0.9, 0.7, 0.3, 0.45, 0.55]);
        (dir, p, images, probs)
    }

    #[test]
    fn rows_prefer_human_labels_and_filter_predictions() {
        let (_d, p, images, probs) = setup();
        let only_human = export_rows(&p, &images, Some(&probs), &RowOptions::default()).unwrap();
        assert_eq!(only_human.len(), 1);
        assert_eq!(only_human[0].source, LabelSource::Human);
        let opts = RowOptions {
            include_predicted: true,
            min_confidence: 0.6,
        };
        let rows = export_rows(&p, &images, Some(&probs), &opts).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].path, "sub/a.png");
        assert_eq!(rows[1].label, "cat/dog");
        assert!((rows[1].confidence.unwrap() - 0.7).abs() < 1e-6);
        assert_eq!(rows[0].confidence, None, "a label is not a probability");
        let bad = Mat::zeros(2, 2);
        assert!(matches!(
            export_rows(&p, &images, Some(&bad), &opts),
            Err(ExportError::Shape { .. })
        ));
    }

    /// Names that are not UTF-8, or hold a line break, are written in the stored form to the CSV and JSON
    /// (so a reader finds the exact file) and copied under their real bytes into the tree.
    #[cfg(unix)]
    #[test]
    fn odd_file_names_are_exported_exactly() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("imgs");
        fs::create_dir_all(folder.join("sub")).unwrap();
        let names: [&[u8]; 3] = [b"x\xe9.png", b"x\xe8.png", b"sub/new\nline.png"];
        let rels: Vec<String> = names
            .iter()
            .map(|n| {
                fs::write(folder.join(OsStr::from_bytes(n)), n).unwrap();
                crate::stored_path::os_to_stored(OsStr::from_bytes(n))
            })
            .collect();
        let mut p = Project::new(folder, vec!["cat".into()]);
        for r in &rels {
            p.labels.insert(r.clone(), "cat".into());
        }
        let rows = export_rows(&p, &rels, None, &RowOptions::default()).unwrap();
        let csv_path = dir.path().join("labels.csv");
        write_csv(&rows, &csv_path).unwrap();
        let mut r = csv::Reader::from_path(&csv_path).unwrap();
        let got: Vec<String> = r.records().map(|rec| rec.unwrap()[0].to_string()).collect();
        assert_eq!(got, rels);
        let json_path = dir.path().join("labels.json");
        write_json(&p, &rows, &json_path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&json_path).unwrap()).unwrap();
        assert_eq!(v["images"][1]["path"], "x\\xE8.png");

        let out = dir.path().join("tree");
        export_tree(&p.folder, &rows, &out, TreeMode::Copy).unwrap();
        for (n, want) in [
            (&b"x\xe9.png"[..], &b"x\xe9.png"[..]),
            (b"x\xe8.png", b"x\xe8.png"),
            (b"sub__new\nline.png", b"sub/new\nline.png"),
        ] {
            assert_eq!(
                fs::read(out.join("cat").join(OsStr::from_bytes(n))).unwrap(),
                want
            );
        }
    }

    #[test]
    fn csv_json_and_tree_are_written() {
        let (d, mut p, images, probs) = setup();
        p.set_label("c.png", Some(("bird".into(), LabelOrigin::Accepted)));
        let opts = RowOptions {
            include_predicted: true,
            min_confidence: 0.0,
        };
        let rows = export_rows(&p, &images, Some(&probs), &opts).unwrap();
        let csv_path = d.path().join("labels.csv");
        write_csv(&rows, &csv_path).unwrap();
        let text = fs::read_to_string(&csv_path).unwrap();
        assert_eq!(
            text,
            "path,label,confidence,source\na.png,bird,,human\nsub/a.png,cat/dog,0.7000,predicted\nc.png,bird,,accepted\n"
        );
        let json_path = d.path().join("labels.json");
        write_json(&p, &rows, &json_path).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&json_path).unwrap()).unwrap();
        assert_eq!(v["images"][0]["source"], "human");
        assert_eq!(v["images"][0]["confidence"], serde_json::Value::Null);
        assert_eq!(v["images"][1]["source"], "predicted");
        assert_eq!(v["images"][2]["source"], "accepted");

        for mode in [TreeMode::Copy, TreeMode::Symlink] {
            let out = d.path().join(format!("tree-{mode:?}"));
            let s = export_tree(&p.folder, &rows, &out, mode).unwrap();
            assert_eq!(
                s,
                TreeSummary {
                    files: 3,
                    classes: 2
                }
            );
            assert_eq!(fs::read(out.join("bird").join("a.png")).unwrap(), b"a.png");
            assert_eq!(
                fs::read(out.join("cat_dog").join("sub__a.png")).unwrap(),
                b"sub/a.png"
            );
            assert!(matches!(
                export_tree(&p.folder, &rows, &out, mode),
                Err(ExportError::NotEmpty { .. })
            ));
        }
    }
}
