//! Image folders, class names and label CSVs: everything between "a person points the app at a folder" and a
//! list of image paths with optional labels.
//!
//! Two layouts are accepted:
//! - **class sub-folders**: `root/<class>/**/<image>`; every image under a sub-folder is labelled with that
//!   sub-folder's name. Images directly in the root are unlabelled.
//! - **flat or nested folder + class-names file** (one name per line), optionally with a CSV `path,label` for
//!   the labelled subset. Images not listed in the CSV are unlabelled.
//!
//! Both can mix: when class names are given and the root has sub-folders named like classes, those sub-folders
//! label their images, and a CSV (if any) labels the rest.
//!
//! Nothing here decodes images (the `clip` module does, and turns decode errors into problems upstream): a
//! folder of 10,000 photos opens in the time of a directory walk. Bad entries never abort the walk; they are
//! collected as [`Problem`]s so the person sees every one of them at once instead of fixing them one by one.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// File extensions treated as images (compared case-insensitively). The `image` crate decodes all of them.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp"];

/// Fatal problems: the dataset cannot be opened at all. Per-file trouble is a [`Problem`] instead.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the folder does not exist; check the path", path.display())]
    RootNotFound { path: PathBuf },
    #[error("{}: not a folder; point at the folder that holds the images", path.display())]
    NotAFolder { path: PathBuf },
    #[error(
        "{}: no images found (looked for {} files, hidden files skipped); put the images in this folder \
         or in one sub-folder per class",
        path.display(),
        IMAGE_EXTENSIONS.join(", ")
    )]
    NoImages { path: PathBuf },
    #[error("{origin}: no class names found; write one class name per line")]
    NoClasses { origin: String },
    #[error(
        "{}: no class names: the folder has no class sub-folders with images; either put the images in one \
         sub-folder per class or give a class-names file (one name per line)",
        path.display()
    )]
    NoClassFolders { path: PathBuf },
    #[error(
        "{origin}: line {second_line}: class '{name}' repeats line {first_line} (names are compared ignoring \
         case); remove one of them"
    )]
    DuplicateClass {
        origin: String,
        name: String,
        first_line: usize,
        second_line: usize,
    },
    #[error("{}: not valid UTF-8 text; save the class-names file as UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
}

/// One image file found under the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// Absolute path (the root is canonicalised; symlinks below it are kept as walked, not resolved).
    pub path: PathBuf,
    /// Path relative to the root with `/` separators on every platform, so it is stable in saved projects
    /// and CSVs; each component in the stored form of [`crate::stored_path`], so it names the file exactly
    /// even when the name is not UTF-8 (show it with [`crate::stored_path::display`]).
    pub rel: String,
    /// Index into [`Dataset::classes`], or `None` for an unlabelled image.
    pub label: Option<usize>,
}

/// A non-fatal problem with one file or line, shown to the person and otherwise skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub message: String,
}

impl Problem {
    fn new(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    /// Control characters in the path (a file name may hold a line break or a tab) are shown escaped, so one
    /// problem stays on one line and the name can be told apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path = String::new();
        for c in self.path.display().to_string().chars() {
            if c.is_control() {
                path.extend(c.escape_default());
            } else {
                path.push(c);
            }
        }
        write!(f, "{path}: {}", self.message)
    }
}

/// An opened folder: the classes, every image (sorted by `rel`, so runs are deterministic) and every problem
/// met on the way.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Canonicalised root folder.
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub images: Vec<ImageEntry>,
    pub problems: Vec<Problem>,
}

impl Dataset {
    /// Labelled images with their label, in `rel` order.
    pub fn labelled(&self) -> impl Iterator<Item = (usize, &ImageEntry)> {
        self.images.iter().filter_map(|e| e.label.map(|l| (l, e)))
    }

    /// Unlabelled images, in `rel` order (the transductive / query pool).
    pub fn unlabelled(&self) -> impl Iterator<Item = &ImageEntry> {
        self.images.iter().filter(|e| e.label.is_none())
    }

    /// Number of labelled images per class (index = class index).
    pub fn counts_per_class(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (label, _) in self.labelled() {
            if let Some(c) = counts.get_mut(label) {
                *c += 1;
            }
        }
        counts
    }
}

/// Options of [`open_folder`]. `Default` = layout with class sub-folders, no CSV, no limit.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions<'a> {
    /// A class-names file (one name per line). Ignored when `classes` is given.
    pub classes_file: Option<&'a Path>,
    /// Class names given directly (e.g. typed in the GUI). Takes precedence over `classes_file`.
    pub classes: Option<Vec<String>>,
    /// CSV `path,label` for the labelled subset; needs class names (given, from a file or from sub-folders).
    pub labels_csv: Option<&'a Path>,
    /// Keep at most this many images. The kept ones are spread evenly over the `rel`-sorted list (not the
    /// first N), so a class-sub-folder layout keeps every class; the choice is deterministic.
    pub max_images: Option<usize>,
}

/// Parsed class names with the non-fatal remarks about the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassNames {
    pub names: Vec<String>,
    /// Each names the source and line, e.g. `classes.txt: line 3: leading/trailing spaces removed`.
    pub warnings: Vec<String>,
}

/// True when the extension is one of [`IMAGE_EXTENSIONS`] (case-insensitive). Content is not inspected:
/// decoding is the `clip` module's job.
/// The folder hegraph keeps a folder's project and features in (`FOLDER/.hegraph/`).
pub const PROJECT_DIR_NAME: &str = ".hegraph";

pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|ext| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(ext)))
}

/// Parses a class-names text: one name per line; `#` lines are comments; blank lines are skipped (with a
/// warning only between names, where they may be a mistake); surrounding spaces are trimmed (with a warning,
/// since `" cat"` is rarely meant); a leading UTF-8 BOM and Windows line ends are accepted silently.
/// `source` names the text in messages (usually the file path).
pub fn parse_class_names(text: &str, source: &str) -> Result<ClassNames, DataError> {
    let (names, warnings) = parse_names(text, source)?;
    let warnings = warnings
        .into_iter()
        .map(|(line, msg)| format!("{source}: line {line}: {msg}"))
        .collect();
    Ok(ClassNames { names, warnings })
}

/// A warning about one line (or list item) of class names: `(line, message)`.
type LineWarning = (usize, String);

/// [`parse_class_names`] with warnings kept as `(line, message)` so callers can attach them to a path.
fn parse_names(text: &str, source: &str) -> Result<(Vec<String>, Vec<LineWarning>), DataError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut items = Vec::new();
    let mut warnings = Vec::new();
    // Blank lines seen since the last name (reported only once another name follows).
    let mut pending_blank: Vec<usize> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            if !items.is_empty() {
                pending_blank.push(line_no);
            }
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        for blank in pending_blank.drain(..) {
            warnings.push((blank, "blank line between class names, skipped".to_string()));
        }
        items.push((line_no, raw));
    }
    let (names, trim_warnings) = check_names(items, source)?;
    warnings.extend(trim_warnings);
    warnings.sort_by_key(|(line, _)| *line);
    Ok((names, warnings))
}

/// Trims names (warning when that changed something), rejects empty ones and duplicates ignoring case
/// (`Cat` and `cat` would be two classes nobody can tell apart in a plot or a CSV).
fn check_names<'a>(
    items: impl IntoIterator<Item = (usize, &'a str)>,
    source: &str,
) -> Result<(Vec<String>, Vec<LineWarning>), DataError> {
    let mut names: Vec<String> = Vec::new();
    let mut warnings = Vec::new();
    // Lowercased name -> line where it was first seen.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, raw) in items {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            warnings.push((line, "empty class name, skipped".to_string()));
            continue;
        }
        if trimmed.len() != raw.len() {
            warnings.push((
                line,
                format!("leading/trailing spaces removed from '{trimmed}'"),
            ));
        }
        let key = trimmed.to_lowercase();
        if let Some(&first_line) = seen.get(&key) {
            return Err(DataError::DuplicateClass {
                origin: source.to_string(),
                name: trimmed.to_string(),
                first_line,
                second_line: line,
            });
        }
        seen.insert(key, line);
        names.push(trimmed.to_string());
    }
    if names.is_empty() {
        return Err(DataError::NoClasses {
            origin: source.to_string(),
        });
    }
    Ok((names, warnings))
}

/// Reads a labels CSV (`path,label` per row; header optional; extra columns ignored).
///
/// Paths are relative to `root` or absolute; the map's keys are absolute, lexically normalised paths
/// (`root.join(rel)` without `.`/`..`). A path is taken literally first; when no such file exists, it is read
/// as a stored name (see [`crate::stored_path`]: `\xNN` escapes), so a CSV this program wrote (an export, the
/// predictions) names non-UTF-8 files exactly. A label is a class name (exact, then case-insensitive) or a
/// 0-based class index; a name wins over an index when a class is itself named like a number.
///
/// Choices: the first row is a header only when its content says so: a path word (`path`, `file`, `image`,
/// `filename`, …) then a label word (`label`, `class`, `category`, …), case-insensitive. Any other first row is
/// data, and dropped like any other row if it is bad (a typo such as `aa.png,kat` is reported, not taken for a
/// header). Every dropped row is a problem naming its line and why. A quoted field that runs over several lines
/// is kept only when it names an existing file (a file name may hold a line break); otherwise it is an
/// unterminated quote, reported with the line where it opened and the lines it swallowed. A path listed twice
/// with the same label is accepted; with conflicting labels it becomes unlabelled (we cannot know which is
/// right) and both lines are reported. Only an unreadable file is an error.
pub fn read_labels_csv(
    path: &Path,
    root: &Path,
    classes: &[String],
) -> Result<(HashMap<PathBuf, usize>, Vec<Problem>), DataError> {
    let (rows, problems) = read_labels_csv_rows(path, root, classes)?;
    Ok((
        rows.into_iter().map(|(p, row)| (p, row.label)).collect(),
        problems,
    ))
}

/// One accepted CSV row: its label and line, the line kept so later problems can point at it.
struct CsvRow {
    label: usize,
    line: u64,
}

/// First fields of a header row (compared lowercased).
const HEADER_PATH_WORDS: &[&str] = &[
    "path",
    "file",
    "filename",
    "file_name",
    "filepath",
    "file_path",
    "image",
    "image_path",
    "image_name",
    "img",
    "name",
];

/// Second fields of a header row (compared lowercased).
const HEADER_LABEL_WORDS: &[&str] = &[
    "label",
    "labels",
    "class",
    "class_name",
    "classname",
    "category",
    "label_name",
    "target",
];

/// True when a row's content is a header: a path word then a label word.
fn is_header_row(path_field: &str, label_field: &str) -> bool {
    HEADER_PATH_WORDS.contains(&path_field.to_lowercase().as_str())
        && HEADER_LABEL_WORDS.contains(&label_field.to_lowercase().as_str())
}

/// The file a CSV path field names: literally, or (when no such file exists) as a stored name.
fn csv_file_path(root: &Path, field: &str) -> PathBuf {
    let literal = normalize(&root.join(field));
    if literal.exists() || !field.contains("\\x") {
        return literal;
    }
    let decoded = normalize(&root.join(crate::stored_path::path_from_stored(field)));
    if decoded.exists() {
        decoded
    } else {
        literal
    }
}

/// A CSV path field that is not UTF-8, taken as the raw bytes of a file name where names are bytes.
#[cfg(unix)]
fn raw_file_name(bytes: &[u8]) -> Option<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    Some(std::ffi::OsStr::from_bytes(bytes).to_os_string())
}

/// A CSV path field that is not UTF-8 names no file here (names are UTF-16).
#[cfg(not(unix))]
fn raw_file_name(_bytes: &[u8]) -> Option<std::ffi::OsString> {
    None
}

fn read_labels_csv_rows(
    path: &Path,
    root: &Path,
    classes: &[String],
) -> Result<(HashMap<PathBuf, CsvRow>, Vec<Problem>), DataError> {
    let file = fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(std::io::BufReader::new(file));

    let mut rows: HashMap<PathBuf, CsvRow> = HashMap::new();
    // Paths whose rows disagree: they stay unlabelled whatever later rows say.
    let mut conflicted: HashSet<PathBuf> = HashSet::new();
    let mut problems = Vec::new();
    let mut first = true;
    // Bytes, not text: a path field may be a raw file name that is not UTF-8 (e.g. `ls > labels.csv`).
    let mut record = csv::ByteRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                if e.is_io_error() {
                    let source = match e.into_kind() {
                        csv::ErrorKind::Io(io) => io,
                        other => std::io::Error::other(format!("{other:?}")),
                    };
                    return Err(DataError::Io {
                        path: path.to_path_buf(),
                        source,
                    });
                }
                problems.push(Problem::new(path, format!("line {line}: {e}; row skipped")));
                first = false;
                continue;
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        // Line breaks inside quoted fields: the row runs from `line` to `last_line`.
        let breaks = record
            .iter()
            .map(|f| f.iter().filter(|&&b| b == b'\n').count() as u64)
            .sum::<u64>();
        let last_line = line + breaks;
        let is_first = std::mem::replace(&mut first, false);
        if record.iter().all(<[u8]>::is_empty) {
            problems.push(Problem::new(
                path,
                format!("line {line}: empty row; skipped"),
            ));
            continue;
        }
        let raw_path = record.get(0).unwrap_or(b"");
        let raw_path = raw_path.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw_path);
        let Ok(label_field) = std::str::from_utf8(record.get(1).unwrap_or(b"")) else {
            problems.push(Problem::new(
                path,
                format!("line {line}: the label is not valid UTF-8 (save the CSV as UTF-8); row skipped"),
            ));
            continue;
        };
        let (path_field, file_path) = match std::str::from_utf8(raw_path) {
            Ok(text) => (text.to_string(), csv_file_path(root, text)),
            Err(_) => match raw_file_name(raw_path) {
                Some(name) => (
                    name.to_string_lossy().into_owned(),
                    normalize(&root.join(name)),
                ),
                None => {
                    problems.push(Problem::new(
                        path,
                        format!(
                            "line {line}: the path is not valid UTF-8 (save the CSV as UTF-8); row skipped"
                        ),
                    ));
                    continue;
                }
            },
        };
        if is_first && is_header_row(&path_field, label_field) {
            continue;
        }
        if path_field.is_empty() {
            problems.push(Problem::new(
                path,
                format!("line {line}: empty path; row skipped"),
            ));
            continue;
        }
        let label = resolve_label(label_field, classes);
        if breaks > 0 && !(file_path.is_file() && label.is_ok()) {
            problems.push(Problem::new(
                path,
                format!(
                    "line {line}: a quote opened on this line is not closed before line {last_line} (or \
                     never), so lines {line} to {last_line} were read as one row; those rows are skipped: \
                     close the quote"
                ),
            ));
            continue;
        }
        let label = match label {
            Ok(l) => l,
            Err(msg) => {
                problems.push(Problem::new(
                    path,
                    format!("line {line}: {msg}; row skipped"),
                ));
                continue;
            }
        };
        if !file_path.exists() {
            problems.push(Problem::new(
                path,
                format!(
                    "line {line}: file not found: {}; row skipped",
                    file_path.display()
                ),
            ));
            continue;
        }
        if conflicted.contains(&file_path) {
            problems.push(Problem::new(
                path,
                format!("line {line}: '{path_field}' is listed again with another label; left unlabelled"),
            ));
            continue;
        }
        match rows.get(&file_path) {
            Some(prev) if prev.label == label => {}
            Some(prev) => {
                problems.push(Problem::new(
                    path,
                    format!(
                        "line {line}: '{path_field}' is labelled '{}' here but '{}' on line {}; left \
                         unlabelled",
                        class_name(classes, label),
                        class_name(classes, prev.label),
                        prev.line
                    ),
                ));
                rows.remove(&file_path);
                conflicted.insert(file_path);
            }
            None => {
                rows.insert(file_path, CsvRow { label, line });
            }
        }
    }
    Ok((rows, problems))
}

/// Class name (exact, then case-insensitive) or 0-based index; `Err` is a message for the person.
fn resolve_label(field: &str, classes: &[String]) -> Result<usize, String> {
    if field.is_empty() {
        return Err("no label (expected path,label)".to_string());
    }
    if let Some(i) = classes.iter().position(|c| c == field) {
        return Ok(i);
    }
    let lower = field.to_lowercase();
    if let Some(i) = classes.iter().position(|c| c.to_lowercase() == lower) {
        return Ok(i);
    }
    if let Ok(i) = field.parse::<usize>() {
        if i < classes.len() {
            return Ok(i);
        }
        return Err(format!(
            "class index {i} is out of range (there are {} classes, indices 0..={})",
            classes.len(),
            classes.len().saturating_sub(1)
        ));
    }
    Err(format!(
        "unknown class '{field}' (classes: {})",
        preview(classes)
    ))
}

fn class_name(classes: &[String], i: usize) -> &str {
    classes.get(i).map_or("?", String::as_str)
}

fn preview(classes: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = classes
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if classes.len() > SHOWN {
        s.push_str(&format!(", … {} more", classes.len() - SHOWN));
    }
    s
}

/// Removes `.` and resolves `..` lexically, so CSV paths compare equal to walked ones without touching the
/// file system (symlinks are matched later through canonical paths).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push(comp);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Every image under `root` (sorted by `rel`), without classes or labels: what a search over a folder needs,
/// where [`open_folder`] would ask for class names a flat folder does not have. Errors as [`open_folder`] does
/// for a missing root or a folder without images.
pub fn list_images(root: &Path) -> Result<Dataset, DataError> {
    let root = match fs::canonicalize(root) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::RootNotFound {
                path: root.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(DataError::Io {
                path: root.to_path_buf(),
                source,
            })
        }
    };
    if !root.is_dir() {
        return Err(DataError::NotAFolder { path: root });
    }
    let mut problems = Vec::new();
    let mut images = Vec::new();
    let mut visited = HashSet::new();
    visited.insert(root.clone());
    walk(&root, "", &mut visited, &mut images, &mut problems);
    if images.is_empty() {
        return Err(DataError::NoImages { path: root });
    }
    images.sort_by(|a: &ImageEntry, b: &ImageEntry| a.rel.cmp(&b.rel));
    Ok(Dataset {
        root,
        classes: Vec::new(),
        images,
        problems,
    })
}

/// Opens a folder as a dataset (see the module docs for the layouts).
///
/// Errors only when nothing sensible can be shown: the root is missing, no images at all, bad class names,
/// no class names anywhere. Everything else (bad files, CSV rows) lands in [`Dataset::problems`].
pub fn open_folder(root: &Path, opts: &OpenOptions) -> Result<Dataset, DataError> {
    let Dataset {
        root,
        mut images,
        mut problems,
        ..
    } = list_images(root)?;

    // Top-level sub-folders that hold images, in sorted order.
    let mut folders: Vec<String> = Vec::new();
    for img in &images {
        if let Some((top, _)) = img.rel.split_once('/') {
            if folders.last().map(String::as_str) != Some(top) {
                folders.push(top.to_string());
            }
        }
    }
    folders.sort();
    folders.dedup();

    let classes = if let Some(list) = &opts.classes {
        let items = list.iter().enumerate().map(|(i, n)| (i + 1, n.as_str()));
        let (names, warnings) = check_names(items, "the given class list")?;
        for (item, msg) in warnings {
            problems.push(Problem::new(
                &root,
                format!("class list item {item}: {msg}"),
            ));
        }
        names
    } else if let Some(file) = opts.classes_file {
        let bytes = fs::read(file).map_err(|source| DataError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| DataError::NotUtf8 {
            path: file.to_path_buf(),
        })?;
        let (names, warnings) = parse_names(&text, &file.display().to_string())?;
        for (line, msg) in warnings {
            problems.push(Problem::new(file, format!("line {line}: {msg}")));
        }
        names
    } else if folders.is_empty() {
        return Err(DataError::NoClassFolders { path: root });
    } else {
        // Folder names are used verbatim: they are distinct on disk, and trimming would break the match. A
        // name with a line break or tab is kept (every file that holds class names stores them as a JSON
        // array, and refusing would make a folder the person may not control unusable), but it is pointed
        // out, since it is rarely meant and looks like another name on screen.
        for f in &folders {
            let name = folder_class_name(f);
            if name.chars().any(char::is_control) {
                problems.push(Problem::new(
                    root.join(crate::stored_path::path_from_stored(f)),
                    format!(
                        "class name '{}' (from this folder's name) holds a line break, tab or other control \
                         character; kept as it is, rename the folder if that is a mistake",
                        name.escape_debug()
                    ),
                ));
            }
        }
        folders.iter().map(|f| folder_class_name(f)).collect()
    };

    // Labels from sub-folders named like classes.
    let mut folder_class: HashMap<&str, Option<usize>> = HashMap::new();
    for f in &folders {
        let name = folder_class_name(f);
        let idx = classes.iter().position(|c| *c == name).or_else(|| {
            classes
                .iter()
                .position(|c| c.to_lowercase() == name.to_lowercase())
        });
        folder_class.insert(f.as_str(), idx);
    }
    if folder_class.values().any(Option::is_some) {
        for (f, idx) in &folder_class {
            if idx.is_none() {
                problems.push(Problem::new(
                    root.join(crate::stored_path::path_from_stored(f)),
                    "sub-folder matches no class name; its images are unlabelled",
                ));
            }
        }
    }
    for img in &mut images {
        if let Some((top, _)) = img.rel.split_once('/') {
            img.label = folder_class.get(top).copied().flatten();
        }
    }

    if let Some(csv_path) = opts.labels_csv {
        let (rows, csv_problems) = read_labels_csv_rows(csv_path, &root, &classes)?;
        problems.extend(csv_problems);
        apply_csv_labels(&root, csv_path, rows, &classes, &mut images, &mut problems);
    }

    if let Some(max) = opts.max_images {
        if images.len() > max {
            let n = images.len();
            problems.push(Problem::new(
                &root,
                format!("{n} images found; kept {max} spread evenly over the folder (max_images)"),
            ));
            images = (0..max)
                .filter_map(|i| images.get(i * n / max).cloned())
                .collect();
        }
    }

    // Deterministic problem order regardless of hash-map iteration.
    problems.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.message.cmp(&b.message)));
    Ok(Dataset {
        root,
        classes,
        images,
        problems,
    })
}

/// The class a top-level folder (a stored `rel` component) stands for: its real name when that is UTF-8
/// (so `a\b` is the class `a\b`, matching a class-names file), else the stored form, which keeps two
/// folders that differ only in non-UTF-8 bytes two distinct classes.
fn folder_class_name(stored: &str) -> String {
    crate::stored_path::path_from_stored(stored)
        .to_str()
        .map_or_else(|| stored.to_string(), str::to_string)
}

/// Applies CSV labels to walked images. A CSV row is matched by its normalised path first, then through
/// canonical paths (so a CSV naming a file through a different symlink still finds it).
fn apply_csv_labels(
    root: &Path,
    csv_path: &Path,
    rows: HashMap<PathBuf, CsvRow>,
    classes: &[String],
    images: &mut [ImageEntry],
    problems: &mut Vec<Problem>,
) {
    let by_path: HashMap<PathBuf, usize> = images
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    let mut by_canonical: Option<HashMap<PathBuf, usize>> = None;
    let mut rows: Vec<(PathBuf, CsvRow)> = rows.into_iter().collect();
    rows.sort_by_key(|(_, r)| r.line);
    for (path, row) in rows {
        let idx = by_path.get(&path).copied().or_else(|| {
            let canon = fs::canonicalize(&path).ok()?;
            let map = by_canonical.get_or_insert_with(|| {
                images
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| fs::canonicalize(&e.path).ok().map(|c| (c, i)))
                    .collect()
            });
            map.get(&canon).copied()
        });
        let Some(idx) = idx else {
            let why = if path.starts_with(root) {
                "not among the images found (not an image file, empty, hidden or skipped)"
            } else {
                "outside the folder"
            };
            problems.push(Problem::new(
                csv_path,
                format!(
                    "line {}: {} is {why}; row ignored",
                    row.line,
                    path.display()
                ),
            ));
            continue;
        };
        let img = &mut images[idx];
        if let Some(prev) = img.label {
            if prev != row.label {
                problems.push(Problem::new(
                    csv_path,
                    format!(
                        "line {}: '{}' is in sub-folder '{}' but labelled '{}' here; the CSV label is used",
                        row.line,
                        img.rel,
                        class_name(classes, prev),
                        class_name(classes, row.label)
                    ),
                ));
            }
        }
        img.label = Some(row.label);
    }
}

/// Depth-first walk in sorted order. Follows symlinks; `visited` holds canonical directories so a loop (or
/// two links to one folder, which would double-count its images) is reported once and not entered.
fn walk(
    dir: &Path,
    rel: &str,
    visited: &mut HashSet<PathBuf>,
    images: &mut Vec<ImageEntry>,
    problems: &mut Vec<Problem>,
) {
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            problems.push(Problem::new(
                dir,
                format!("cannot read folder ({e}); skipped"),
            ));
            return;
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => names.push(e.file_name()),
            Err(e) => problems.push(Problem::new(
                dir,
                format!("cannot list an entry ({e}); skipped"),
            )),
        }
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let name_str = crate::stored_path::os_to_stored(&name);
        if name_str.starts_with('.') {
            // hegraph's own project folder is not a person's hidden file: nothing to report.
            if name != PROJECT_DIR_NAME {
                problems.push(Problem::new(&path, "hidden, skipped"));
            }
            continue;
        }
        let child_rel = if rel.is_empty() {
            name_str
        } else {
            format!("{rel}/{name_str}")
        };
        // `metadata` follows symlinks; a failure on a symlink means it is broken.
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                let is_link = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
                let msg = if is_link {
                    format!("broken symbolic link ({e}); skipped")
                } else {
                    format!("cannot read ({e}); skipped")
                };
                problems.push(Problem::new(&path, msg));
                continue;
            }
        };
        if meta.is_dir() {
            let canon = match fs::canonicalize(&path) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(Problem::new(
                        &path,
                        format!("cannot resolve folder ({e}); skipped"),
                    ));
                    continue;
                }
            };
            if !visited.insert(canon.clone()) {
                problems.push(Problem::new(
                    &path,
                    format!(
                        "symbolic link loop or second link to an already visited folder ({}); skipped",
                        canon.display()
                    ),
                ));
                continue;
            }
            walk(&path, &child_rel, visited, images, problems);
        } else if meta.is_file() {
            if !is_image_path(&path) {
                problems.push(Problem::new(&path, "not an image file, skipped"));
            } else if meta.len() == 0 {
                problems.push(Problem::new(&path, "empty file (0 bytes), skipped"));
            } else {
                images.push(ImageEntry {
                    path,
                    rel: child_rel,
                    label: None,
                });
            }
        } else {
            problems.push(Problem::new(&path, "not a regular file or folder, skipped"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_dots() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c.png")),
            PathBuf::from("/a/c.png")
        );
    }

    #[test]
    fn label_by_name_case_and_index() {
        let classes = vec!["cat".to_string(), "Dog".to_string(), "7".to_string()];
        assert_eq!(resolve_label("dog", &classes), Ok(1));
        assert_eq!(resolve_label("0", &classes), Ok(0));
        // A class named like a number wins over the index reading.
        assert_eq!(resolve_label("7", &classes), Ok(2));
        assert!(resolve_label("3", &classes).is_err());
        assert!(resolve_label("", &classes).is_err());
    }
}
