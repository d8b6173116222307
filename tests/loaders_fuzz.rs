//! Issue 11: fuzzing of every loader a user's file reaches (features files, adapter files, project files,
//! labels CSVs, class-name files).
//!
//! `cargo fuzz` needs nightly and the `cargo-fuzz` tool, which CI does not have, so these are property tests:
//! proptest with a fixed seed (the same cases on every run) and a bounded number of cases
//! (`HEGRAPH_FUZZ_CASES`, default [`DEFAULT_CASES`] per loader). Seeds are real files written by the program's
//! own writers (features and adapter files, a project file, an exported labels CSV) plus the demo folder's
//! hand-made `labels.csv` and `classes.txt` and a slice of a real shared features file. Mutations: truncation,
//! flipped and inserted bytes, duplicated spans, the header of one file spliced onto another, and structural
//! edits that keep a safetensors file well-formed so the loader's own checks are reached (shapes, dtypes,
//! renamed, dropped and duplicated tensors, metadata, the header length, the adapter's JSON header), or edit a
//! project's JSON (values of every type, dropped and duplicated keys).
//!
//! For each input: no panic, an `Err` whose message names the file (or a load whose result is valid), and
//! the folder holds exactly the files it held before. A failing input is saved under
//! `target/tmp/loaders_fuzz/failures/`, named in the failure message, and replays with
//! `HEGRAPH_FUZZ_REPLAY=<kind>:<file> cargo test --release --test loaders_fuzz replay -- --ignored`.
//!
//! Each fuzz test prints how many mutated files loaded and how many were refused (`-- --nocapture`), so a
//! mutation strategy that stops reaching the loaders' own checks shows. Ignored tests hold what the fuzzing
//! found in code it may not fix (src/features.rs, the predictor), each with its reason.
//!
//! Memory: the test binary refuses any single allocation over [`ALLOC_CAP`], so a loader that believes a
//! header declaring a huge tensor aborts the run (with a message saying where the input is) rather than
//! exhausting the machine. Inputs that might do so are run in a child process (this binary again) by the
//! `huge_*` tests, so one such bug fails one test and names the case.

mod common;
use common::copy_dir;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hegraph::adapter::{self, BackendChoice, Method, TrainParams, TrainedAdapter};
use hegraph::data::{self, OpenOptions};
use hegraph::features::{FeatureSet, LabelledSplit, UnlabelledSplit};
use hegraph::linalg::Mat;
use hegraph::progress::CancelToken;
use hegraph::project::{export, Project, TrainingRecord};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

// ------------------------------------------------------------------------------------------------------------
// Bounded memory

/// No file here justifies a single allocation this large; a loader asking for one trusted a declared size.
const ALLOC_CAP: usize = 1 << 30;

struct CappedAlloc;

/// Written from the allocator, which must not allocate: a fixed message.
const ALLOC_MSG: &[u8] = b"\nloaders_fuzz: refused an allocation over 1 GiB (a loader trusted a declared size); the input \
being loaded is the newest target/tmp/loaders_fuzz/current-*.bin\n";

// SAFETY: every call is forwarded to the system allocator unchanged, or answered with null (allowed: "out of
// memory").
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_CAP {
            let _ = std::io::stderr().write_all(ALLOC_MSG);
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_CAP {
            let _ = std::io::stderr().write_all(ALLOC_MSG);
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            let _ = std::io::stderr().write_all(ALLOC_MSG);
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new_size)
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

// ------------------------------------------------------------------------------------------------------------
// Seeds

const DEFAULT_CASES: u32 = 192;

fn cases() -> u32 {
    std::env::var("HEGRAPH_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn work_root() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("loaders_fuzz");
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Features,
    Adapter,
    Project,
    LabelsCsv,
    ClassNames,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Features,
        Kind::Adapter,
        Kind::Project,
        Kind::LabelsCsv,
        Kind::ClassNames,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Features => "features",
            Kind::Adapter => "adapter",
            Kind::Project => "project",
            Kind::LabelsCsv => "labels-csv",
            Kind::ClassNames => "class-names",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Kind::Features => "features.safetensors",
            Kind::Adapter => "adapter.hegraph",
            Kind::Project => "project.json",
            Kind::LabelsCsv => "labels.csv",
            Kind::ClassNames => "classes.txt",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

struct Seeds {
    _dir: tempfile::TempDir,
    by_kind: Vec<(Kind, Vec<Vec<u8>>)>,
    /// Queries of the adapters' dimension, for checking that a loaded adapter predicts.
    query: Mat,
    /// An image folder (the demo's images) for the CSV and class-names loaders.
    root: PathBuf,
    /// How many images `root` holds.
    images: usize,
    classes: Vec<String>,
}

impl Seeds {
    fn of(&self, kind: Kind) -> &[Vec<u8>] {
        self.by_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    fn all(&self) -> Vec<&[u8]> {
        self.by_kind
            .iter()
            .flat_map(|(_, v)| v.iter().map(Vec::as_slice))
            .collect()
    }
}

fn train(
    method: Method,
    params: &TrainParams,
    task: &adapter::bench::SyntheticTask,
) -> TrainedAdapter {
    adapter::train(
        method,
        params,
        &task.input(),
        BackendChoice::Cpu,
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap()
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(build_seeds)
}

fn build_seeds() -> Seeds {
    let dir = tempfile::tempdir_in(work_root()).unwrap();
    let d = dir.path();
    let read = |p: &Path| std::fs::read(p).unwrap();

    // Features: a synthetic set with every kind of tensor and metadata, written by FeatureSet::save.
    let task = adapter::bench::synthetic_task(3, 2, 8, 2, 11);
    let mut train_split = task.train.clone();
    train_split.paths = Some((0..6).map(|i| format!("c{}/img{i}.png", i / 2)).collect());
    let unl = adapter::bench::synthetic_task(3, 1, 8, 0, 12)
        .train
        .features;
    let fs = FeatureSet {
        classes: task.classes.clone(),
        dim: 8,
        model: Some("test".into()),
        test_checkpoint: true,
        templates: vec!["a photo of a {}.".into(), "a {}.".into()],
        text: Some(task.text.clone()),
        text_neg: Some(task.text_neg.clone()),
        shots: [(
            2,
            LabelledSplit::new(task.train.features.clone(), task.train.labels.clone()),
        )]
        .into_iter()
        .collect(),
        train: Some(train_split),
        unlabelled: Some(UnlabelledSplit {
            features: unl,
            paths: vec!["u/a.png".into(), "u/b.png".into(), "u/c.png".into()],
        }),
        ..Default::default()
    };
    let p = d.join("synthetic.safetensors");
    fs.save(&p).unwrap();
    let mut features = vec![read(&p)];

    // A slice of a real shared features file (real CLIP features, 4 classes): in its own dtypes (F16, I64 and
    // the bare class names of the metadata) through the safetensors crate, and re-written by FeatureSet::save.
    let shared = manifest().join("../shared/data/features/oxford_pets25.safetensors");
    if let Ok(bytes) = std::fs::read(&shared) {
        let real = FeatureSet::load(&shared).unwrap();
        let keep: Vec<usize> = (0..4).collect();
        let pick = |s: &LabelledSplit, n: usize| {
            let idx: Vec<usize> = (0..s.len()).filter(|&i| s.labels[i] < 4).take(n).collect();
            s.subset(&idx)
        };
        let small = FeatureSet {
            classes: real.classes[..4].to_vec(),
            dim: real.dim,
            text: real.text.as_ref().map(|t| t.select_rows(&keep)),
            shots: [(1, pick(&real.shots[&1], 4))].into_iter().collect(),
            test: real.test.as_ref().map(|t| pick(t, 6)),
            ..Default::default()
        };
        let p = d.join("real.safetensors");
        small.save(&p).unwrap();
        features.push(read(&p));

        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().clone().unwrap_or_default();
        let views: Vec<(String, safetensors::tensor::TensorView)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| n.starts_with("shots1.") || n == "text.features")
            .collect();
        features.push(safetensors::serialize(views, Some(md)).unwrap());
    }

    // Adapters written by training: HeGraphAdapter in both readings, Tip-Adapter-F, zero-shot.
    let atask = adapter::bench::synthetic_task(3, 2, 8, 2, 5);
    let quick = TrainParams {
        epochs: 2,
        tip_epochs: 2,
        ..TrainParams::default()
    };
    let spec = TrainParams {
        epochs: 2,
        tip_epochs: 2,
        ..TrainParams::spec()
    };
    let mut adapters = Vec::new();
    for (i, (m, p)) in [
        (Method::HeGraph, &quick),
        (Method::HeGraph, &spec),
        (Method::TipAdapterF, &quick),
        (Method::ZeroShot, &quick),
    ]
    .into_iter()
    .enumerate()
    {
        let a = train(m, p, &atask);
        let path = d.join(format!("a{i}.hegraph"));
        a.save(&path).unwrap();
        adapters.push(read(&path));
    }

    // The image folder and its class names.
    let root = d.join("images");
    copy_dir(&manifest().join("assets/demo/images"), &root);
    let classes_txt = read(&manifest().join("assets/demo/classes.txt"));
    let classes = data::parse_class_names(&String::from_utf8(classes_txt.clone()).unwrap(), "demo")
        .unwrap()
        .names;

    // Projects written by Project::save (a fresh one and one with labels, settings, an adapter and a training
    // record), and a version-1 file (this build only reads them; the text is the format's documented form).
    let mut project = Project::new(root.clone(), classes.clone());
    let ds = data::open_folder(
        &root,
        &OpenOptions {
            classes: Some(classes.clone()),
            labels_csv: Some(&manifest().join("assets/demo/labels.csv")),
            ..Default::default()
        },
    )
    .unwrap();
    for img in &ds.images {
        if let Some(l) = img.label {
            project.labels.insert(img.rel.clone(), classes[l].clone());
        }
    }
    let p = d.join("fresh.json");
    Project::new(root.clone(), classes.clone())
        .save(&p)
        .unwrap();
    let mut projects = vec![read(&p)];
    project.templates.push("a {} in the wild.".into());
    project.settings.held_out_percent = 30;
    project.settings.train.epochs = 7;
    project.adapter_path = Some(PathBuf::from("adapter.hegraph"));
    project.last_training = Some(TrainingRecord {
        finished_unix: 1_700_000_000,
        method: "hegraph".into(),
        labelled: 16,
        held_out_accuracy: Some(0.75),
        held_out: 4,
        seconds: 1.5,
    });
    let p = d.join("project.json");
    project.save(&p).unwrap();
    projects.push(read(&p));
    projects.push(
        br#"{"version": 1, "folder": "images", "classes": ["bird", "fruit"], "labels": {"bee.png": 1, "crow.png": 0}}"#
            .to_vec(),
    );

    // Labels CSVs: the demo's and one written by the export.
    let mut csvs = vec![read(&manifest().join("assets/demo/labels.csv"))];
    let rels: Vec<String> = ds.images.iter().map(|e| e.rel.clone()).collect();
    let rows = export::export_rows(&project, &rels, None, &export::RowOptions::default()).unwrap();
    let p = d.join("export.csv");
    export::write_csv(&rows, &p).unwrap();
    csvs.push(read(&p));

    // Class names: the demo's, and one with the comments, BOM, blank lines and CRLF the parser accepts.
    let mut names = vec![classes_txt];
    let mut fancy = "\u{feff}# class names\r\n".to_string();
    for (i, c) in classes.iter().enumerate() {
        fancy.push_str(c);
        fancy.push_str(if i == 3 { "\r\n\r\n" } else { "\r\n" });
    }
    names.push(fancy.into_bytes());

    Seeds {
        _dir: dir,
        by_kind: vec![
            (Kind::Features, features),
            (Kind::Adapter, adapters),
            (Kind::Project, projects),
            (Kind::LabelsCsv, csvs),
            (Kind::ClassNames, names),
        ],
        query: atask.train.features.clone(),
        images: ds.images.len(),
        root,
        classes,
    }
}

// ------------------------------------------------------------------------------------------------------------
// Loaders and what a good outcome is

thread_local! {
    /// Inputs this thread's loader accepted (the rest were refused), for the fuzz tests' summary.
    static LOADED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn loaded() {
    LOADED.with(|c| c.set(c.get() + 1));
}

fn names_the_file(msg: &str, path: &Path) -> Result<(), String> {
    if msg.contains(&path.display().to_string()) {
        Ok(())
    } else {
        Err(format!("the error does not name the file: {msg}"))
    }
}

fn check_features(path: &Path) -> Result<(), String> {
    match FeatureSet::load(path) {
        Err(e) => names_the_file(&e.to_string(), path),
        Ok(fs) => {
            loaded();
            fs.validate()
                .map_err(|e| format!("loaded, but invalid: {e}"))?;
            if fs.dim == 0 {
                return Err("loaded features of dimension 0".into());
            }
            Ok(())
        }
    }
}

fn check_adapter(path: &Path, s: &Seeds) -> Result<(), String> {
    match TrainedAdapter::load(path) {
        Err(e) => names_the_file(&e.to_string(), path),
        Ok(a) => {
            loaded();
            match a.predict(&s.query) {
                Ok(p) => {
                    if p.rows != s.query.rows || p.cols != a.classes.len() || !p.is_finite() {
                        return Err(format!(
                            "loaded, but predicts a {}×{} matrix (finite: {}) for {} queries and {} classes",
                            p.rows,
                            p.cols,
                            p.is_finite(),
                            s.query.rows,
                            a.classes.len()
                        ));
                    }
                    Ok(())
                }
                // A consistent adapter of another dimension is a legal file; the message says so.
                Err(e) if e.to_string().contains("dimension") => Ok(()),
                Err(e) => Err(format!("loaded, but cannot predict: {e}")),
            }
        }
    }
}

fn check_project(path: &Path) -> Result<(), String> {
    match Project::load(path) {
        Err(e) => names_the_file(&e.to_string(), path),
        Ok(l) => {
            loaded();
            // What loads must save and load back the same.
            let dir = tempfile::tempdir_in(work_root()).map_err(|e| e.to_string())?;
            let again = dir.path().join("again.json");
            l.project
                .save(&again)
                .map_err(|e| format!("loaded, but does not save: {e}"))?;
            let back = Project::load(&again)
                .map_err(|e| format!("loaded and saved, but does not load back: {e}"))?;
            if back.project != l.project {
                return Err(format!(
                    "does not round-trip: {:?} != {:?}",
                    back.project, l.project
                ));
            }
            Ok(())
        }
    }
}

fn check_labels_csv(path: &Path, s: &Seeds) -> Result<(), String> {
    match data::read_labels_csv(path, &s.root, &s.classes) {
        Err(e) => names_the_file(&e.to_string(), path)?,
        Ok((labels, problems)) => {
            if let Some((p, l)) = labels.iter().find(|(_, l)| **l >= s.classes.len()) {
                return Err(format!(
                    "{} got label {l} of {}",
                    p.display(),
                    s.classes.len()
                ));
            }
            if let Some(p) = problems.iter().find(|p| p.path != path) {
                return Err(format!("a problem names another file: {p}"));
            }
        }
    }
    // The way a person reaches it: opening a folder with the CSV.
    let opts = OpenOptions {
        classes: Some(s.classes.clone()),
        labels_csv: Some(path),
        ..Default::default()
    };
    match data::open_folder(&s.root, &opts) {
        Err(e) => names_the_file(&e.to_string(), path),
        Ok(ds) => {
            loaded();
            if ds.images.len() != s.images || ds.labelled().any(|(l, _)| l >= s.classes.len()) {
                return Err(format!(
                    "opened {} images ({} expected) or a label out of range",
                    ds.images.len(),
                    s.images
                ));
            }
            Ok(())
        }
    }
}

fn good_names(names: &[String]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    if names.is_empty() {
        return Err("no class names, and no error".into());
    }
    for n in names {
        if n.is_empty() || n.trim() != n || !seen.insert(n.to_lowercase()) {
            return Err(format!("bad or repeated name {n:?} in {names:?}"));
        }
    }
    Ok(())
}

fn check_class_names(path: &Path, s: &Seeds) -> Result<(), String> {
    let opts = OpenOptions {
        classes_file: Some(path),
        ..Default::default()
    };
    match data::open_folder(&s.root, &opts) {
        Err(e) => names_the_file(&e.to_string(), path)?,
        Ok(ds) => {
            loaded();
            good_names(&ds.classes)?
        }
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let source = path.display().to_string();
    match data::parse_class_names(&String::from_utf8_lossy(&bytes), &source) {
        Err(e) => names_the_file(&e.to_string(), path),
        Ok(c) => {
            if let Some(w) = c.warnings.iter().find(|w| !w.contains(&source)) {
                return Err(format!("a warning does not name the file: {w}"));
            }
            good_names(&c.names)
        }
    }
}

fn check(kind: Kind, path: &Path, s: &Seeds) -> Result<(), String> {
    match kind {
        Kind::Features => check_features(path),
        Kind::Adapter => check_adapter(path, s),
        Kind::Project => check_project(path),
        Kind::LabelsCsv => check_labels_csv(path, s),
        Kind::ClassNames => check_class_names(path, s),
    }
}

/// Every file below `dir` with its size and content hash.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, blake3::Hash)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let bytes = if p.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.insert(p, (bytes.len() as u64, blake3::hash(&bytes)));
        }
    }
    out
}

fn save_failure(kind: Kind, bytes: &[u8]) -> PathBuf {
    let dir = work_root().join("failures");
    std::fs::create_dir_all(&dir).unwrap();
    let hash = blake3::hash(bytes).to_hex();
    let p = dir.join(format!("{}-{}.bin", kind.name(), &hash[..16]));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// Loads `bytes` as a file of `kind` in a fresh folder; `Err` says what went wrong and where the input is.
fn run_one(kind: Kind, bytes: &[u8]) -> Result<(), String> {
    let s = seeds();
    // Kept until the next case, so an abort leaves the input behind.
    std::fs::write(
        work_root().join(format!("current-{}.bin", kind.name())),
        bytes,
    )
    .unwrap();
    let dir = tempfile::tempdir_in(work_root()).unwrap();
    let path = dir.path().join(kind.file_name());
    std::fs::write(&path, bytes).unwrap();
    let before = (snapshot(dir.path()), snapshot(&s.root));
    let outcome = catch_unwind(AssertUnwindSafe(|| check(kind, &path, s)));
    let after = (snapshot(dir.path()), snapshot(&s.root));
    let why = match outcome {
        Err(p) => Some(format!("the loader panicked: {}", panic_text(&*p))),
        Ok(Err(why)) => Some(why),
        Ok(Ok(())) if before != after => Some(format!(
            "the folders changed: before {:?}, after {:?}",
            before.0.keys().collect::<Vec<_>>(),
            after.0.keys().collect::<Vec<_>>()
        )),
        Ok(Ok(())) => None,
    };
    match why {
        None => Ok(()),
        Some(why) => {
            let saved = save_failure(kind, bytes);
            Err(format!(
                "{} loader: {why}\ninput saved to {} (replay: HEGRAPH_FUZZ_REPLAY={}:{} cargo test --release --test \
                 loaders_fuzz replay -- --ignored)",
                kind.name(),
                saved.display(),
                kind.name(),
                saved.display()
            ))
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Mutations

/// Byte strings worth inserting: encodings, separators, numbers at type limits, path tricks.
const TOKENS: &[&[u8]] = &[
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\xc3",
    b"\0",
    b"\n",
    b"\r\n",
    b"\r",
    b",",
    b"\"",
    b"#",
    b"..",
    b"../",
    b"/",
    b"-1",
    b"0",
    b"4294967296",
    b"18446744073709551616",
    b"1e400",
    b"NaN",
    b"null",
    b"[]",
    b"{}",
    b"\\u0000",
    b"\\ud800",
    b"path,label\n",
    b"bee.png,bird\n",
    b"bee.png,fruit\n",
    b"/etc/passwd,0\n",
    b"crow.png,99\n",
    b"BIRD\n",
    b"  bird  \n",
];

/// JSON values to put in place of any node.
fn json_values() -> Vec<Value> {
    use serde_json::json;
    vec![
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1.5),
        json!(1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!(".."),
        json!("/"),
        json!("x".repeat(10_000)),
        json!([]),
        json!({}),
        json!([1, 2, 3]),
        json!({"a": 1}),
        json!(["bird", "bird"]),
        json!("NaN"),
        json!(2),
        json!(99),
    ]
}

const TENSOR_NAMES: &[&str] = &[
    "train.features",
    "train.labels",
    "train.views",
    "val.labels",
    "shots1.features",
    "shots0.features",
    "shots18446744073709551616.features",
    "test.features",
    "unlabelled.features",
    "text.features",
    "text_neg.features",
    "text",
    "keys",
    "fused_keys",
    "visual",
    "w_p",
    "w_v",
    "",
];

const DTYPES: &[&str] = &[
    "F16", "BF16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F8_E4M3", "XX",
];

const META_KEYS: &[&str] = &[
    "format",
    "version",
    "classes",
    "model",
    "test_checkpoint",
    "templates",
    "paths.train",
    "paths.unlabelled",
    "paths.shots2",
    "header",
];

const META_VALUES: &[&str] = &[
    "",
    "hegraph-features",
    "hegraph-adapter",
    "1",
    "2",
    "0",
    "99",
    "-1",
    "99999",
    "18446744073709551616",
    "true",
    "1\n2",
    "a\nA",
    "class 0\nclass 0",
    "\0",
    "x\ny\nz",
    "NaN",
    "{}",
    "[]",
    "null",
];

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, Index),
    Remove(Index, u8),
    Duplicate(Index, Index),
    /// The header of another seed (any kind) in front of this file's body.
    Splice(Index),
    HeaderLen(u64),
    HeaderLenDelta(i8),
    /// Structural safetensors edits (the file stays well-formed unless sizes cannot match).
    Shape(Index, Vec<u64>),
    Dtype(Index, Index),
    Rename(Index, Index),
    DropTensor(Index),
    DupTensor(Index),
    Meta(Index, Index),
    DropMeta(Index),
    /// A node of the adapter's JSON header, or of a project file.
    JsonSet(Index, Index),
    JsonDrop(Index),
    JsonDupKey(Index),
}

/// Dimensions a shape may take. `huge` adds sizes that only a trusting loader would allocate.
fn dim(huge: bool) -> BoxedStrategy<u64> {
    if huge {
        prop_oneof![
            Just(0u64),
            1u64..4,
            Just(1u64 << 20),
            Just(1u64 << 40),
            Just(u64::MAX / 2),
            Just(u64::MAX),
        ]
        .boxed()
    } else {
        // Large products cannot match the data and are refused by the format; a zero makes the tensor empty,
        // so the other dimensions stay small.
        prop_oneof![0u64..4, 4u64..64, Just(1u64 << 40), Just(u64::MAX)].boxed()
    }
}

fn mutation(huge: bool) -> impl Strategy<Value = Mutation> {
    let i = any::<Index>;
    let shape = proptest::collection::vec(dim(huge), 0..4).prop_map(move |mut s| {
        if !huge && s.contains(&0) {
            s.iter_mut().for_each(|d| *d = (*d).min(64));
        }
        s
    });
    let bytes = prop_oneof![
        3 => i().prop_map(Mutation::Truncate),
        4 => (i(), 1u8..=255).prop_map(|(a, b)| Mutation::Flip(a, b)),
        2 => (i(), i()).prop_map(|(a, b)| Mutation::Insert(a, b)),
        1 => (i(), any::<u8>()).prop_map(|(a, b)| Mutation::Remove(a, b)),
        1 => (i(), i()).prop_map(|(a, b)| Mutation::Duplicate(a, b)),
        1 => i().prop_map(Mutation::Splice),
        1 => prop_oneof![
            Just(0u64),
            Just(7u64),
            Just(100_000_001u64),
            Just(u64::MAX),
            0u64..4096
        ]
        .prop_map(Mutation::HeaderLen),
        1 => any::<i8>().prop_map(Mutation::HeaderLenDelta),
    ];
    let tensors = prop_oneof![
        3 => (i(), shape).prop_map(|(a, b)| Mutation::Shape(a, b)),
        2 => (i(), i()).prop_map(|(a, b)| Mutation::Dtype(a, b)),
        2 => (i(), i()).prop_map(|(a, b)| Mutation::Rename(a, b)),
        1 => i().prop_map(Mutation::DropTensor),
        1 => i().prop_map(Mutation::DupTensor),
        2 => (i(), i()).prop_map(|(a, b)| Mutation::Meta(a, b)),
        1 => i().prop_map(Mutation::DropMeta),
    ];
    let json = prop_oneof![
        4 => (i(), i()).prop_map(|(a, b)| Mutation::JsonSet(a, b)),
        1 => i().prop_map(Mutation::JsonDrop),
        1 => i().prop_map(Mutation::JsonDupKey),
    ];
    prop_oneof![14 => bytes, 12 => tensors, 6 => json]
}

/// A parsed safetensors file: its JSON header and its data buffer.
struct St {
    header: serde_json::Map<String, Value>,
    data: Vec<u8>,
}

fn parse_st(buf: &[u8]) -> Option<St> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let header: Value = serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    Some(St {
        header: header.as_object()?.clone(),
        data: buf[8 + n..].to_vec(),
    })
}

fn emit_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn dtype_bytes(d: &str) -> Option<u64> {
    Some(match d {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" => 1,
        _ => return None,
    })
}

impl St {
    fn tensor_names(&self) -> Vec<String> {
        self.header
            .iter()
            .filter(|(k, v)| *k != "__metadata__" && v.is_object())
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn pick(&self, i: &Index) -> Option<String> {
        let names = self.tensor_names();
        (!names.is_empty()).then(|| names[i.index(names.len())].clone())
    }

    fn meta(&mut self) -> &mut serde_json::Map<String, Value> {
        let m = self
            .header
            .entry("__metadata__")
            .or_insert_with(|| Value::Object(Default::default()));
        if !m.is_object() {
            *m = Value::Object(Default::default());
        }
        m.as_object_mut().unwrap()
    }

    /// Lays the data out again after tensors changed size: each tensor gets bytes for its shape (its old bytes,
    /// cut or repeated) when that fits in 1 MiB, else keeps its old bytes (the format then refuses the file).
    fn relayout(&mut self) {
        let mut order: Vec<(u64, String)> = self
            .tensor_names()
            .into_iter()
            .map(|n| {
                let s = self.header[&n]["data_offsets"][0].as_u64().unwrap_or(0);
                (s, n)
            })
            .collect();
        order.sort();
        let mut data = Vec::new();
        for (_, n) in order {
            let t = &self.header[&n];
            let (s, e) = (
                t["data_offsets"][0].as_u64().unwrap_or(0) as usize,
                t["data_offsets"][1].as_u64().unwrap_or(0) as usize,
            );
            let old = self
                .data
                .get(s.min(self.data.len())..e.min(self.data.len()))
                .unwrap_or(&[]);
            let want = t["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| d.as_u64().unwrap_or(0))
                        .try_fold(1u64, u64::checked_mul)
                })
                .unwrap_or(Some(0))
                .and_then(|n| n.checked_mul(dtype_bytes(t["dtype"].as_str().unwrap_or(""))?));
            let bytes: Vec<u8> = match want {
                Some(w) if w <= 1 << 20 => (0..w as usize)
                    .map(|k| {
                        if old.is_empty() {
                            0
                        } else {
                            old[k % old.len()]
                        }
                    })
                    .collect(),
                _ => old.to_vec(),
            };
            let start = data.len();
            data.extend_from_slice(&bytes);
            self.header[&n]["data_offsets"] = serde_json::json!([start, data.len()]);
        }
        self.data = data;
    }

    fn emit(&self) -> Vec<u8> {
        let text = serde_json::to_string(&self.header).unwrap_or_default();
        emit_header(&text, &self.data)
    }
}

/// Every node of a JSON document as a JSON pointer (the root excluded).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        Value::Array(a) => {
            for (k, c) in a.iter().enumerate() {
                let p = format!("{at}/{k}");
                out.push(p.clone());
                pointers(c, p, out);
            }
        }
        _ => {}
    }
}

fn json_edit(v: &mut Value, m: &Mutation) -> Option<String> {
    let mut ps = Vec::new();
    pointers(v, String::new(), &mut ps);
    match m {
        Mutation::JsonSet(a, b) if !ps.is_empty() => {
            let vals = json_values();
            *v.pointer_mut(&ps[a.index(ps.len())])? = vals[b.index(vals.len())].clone();
            serde_json::to_string_pretty(v).ok()
        }
        Mutation::JsonDrop(a) if !ps.is_empty() => {
            let p = &ps[a.index(ps.len())];
            let (parent, key) = p.rsplit_once('/')?;
            let key = key.replace("~1", "/").replace("~0", "~");
            match v.pointer_mut(parent)? {
                Value::Object(o) => {
                    o.remove(&key);
                }
                Value::Array(arr) => {
                    let k: usize = key.parse().ok()?;
                    arr.remove(k);
                }
                _ => {}
            }
            serde_json::to_string_pretty(v).ok()
        }
        Mutation::JsonDupKey(a) => {
            // A top-level key written twice, the first time with another value.
            let o = v.as_object()?;
            let keys: Vec<&String> = o.keys().collect();
            if keys.is_empty() {
                return None;
            }
            let k = keys[a.index(keys.len())];
            let vals = json_values();
            let text = serde_json::to_string_pretty(v).ok()?;
            let first = serde_json::to_string(&vals[a.index(vals.len())]).ok()?;
            Some(text.replacen('{', &format!("{{\"{k}\": {first},"), 1))
        }
        _ => None,
    }
}

/// The end of a file's header: a safetensors file's JSON header, else its first line.
fn header_end(b: &[u8]) -> usize {
    parse_st(b)
        .map(|_| 8 + u64::from_le_bytes(b[..8].try_into().unwrap_or_default()) as usize)
        .or_else(|| b.iter().position(|&c| c == b'\n').map(|p| p + 1))
        .unwrap_or(b.len())
}

fn apply(m: &Mutation, buf: &mut Vec<u8>, donors: &[&[u8]]) {
    let len = buf.len();
    match m {
        Mutation::Truncate(i) => buf.truncate(i.index(len + 1)),
        Mutation::Flip(i, mask) => {
            if len > 0 {
                buf[i.index(len)] ^= mask;
            }
        }
        Mutation::Insert(i, t) => {
            let at = i.index(len + 1);
            let tok = TOKENS[t.index(TOKENS.len())];
            buf.splice(at..at, tok.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let at = i.index(len + 1);
            buf.drain(at..(at + *n as usize).min(len));
        }
        Mutation::Duplicate(i, j) => {
            let at = i.index(len + 1);
            let n = j.index(len - at + 1).min(4096);
            let span = buf[at..at + n].to_vec();
            buf.splice(at + n..at + n, span);
        }
        Mutation::Splice(d) => {
            let donor = donors[d.index(donors.len())];
            let mut out = donor[..header_end(donor)].to_vec();
            out.extend_from_slice(&buf[header_end(buf).min(len)..]);
            *buf = out;
        }
        Mutation::HeaderLen(v) => {
            if len >= 8 {
                buf[..8].copy_from_slice(&v.to_le_bytes());
            }
        }
        Mutation::HeaderLenDelta(d) => {
            if len >= 8 {
                let n = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                buf[..8].copy_from_slice(&n.wrapping_add(*d as i64 as u64).to_le_bytes());
            }
        }
        Mutation::JsonSet(..) | Mutation::JsonDrop(_) | Mutation::JsonDupKey(_) => {
            if let Ok(mut v) = serde_json::from_slice::<Value>(buf) {
                if let Some(t) = json_edit(&mut v, m) {
                    *buf = t.into_bytes();
                }
            } else if let Some(mut st) = parse_st(buf) {
                // The adapter's JSON header, inside the metadata.
                let header = st
                    .meta()
                    .get("header")
                    .and_then(|h| h.as_str())
                    .map(str::to_string);
                if let Some(mut v) = header.and_then(|h| serde_json::from_str::<Value>(&h).ok()) {
                    if let Some(t) = json_edit(&mut v, m) {
                        st.meta().insert("header".into(), Value::String(t));
                        *buf = st.emit();
                    }
                }
            }
        }
        _ => {
            let Some(mut st) = parse_st(buf) else { return };
            match m {
                Mutation::Shape(t, shape) => {
                    let Some(n) = st.pick(t) else { return };
                    st.header[&n]["shape"] = serde_json::json!(shape);
                    st.relayout();
                }
                Mutation::Dtype(t, d) => {
                    let Some(n) = st.pick(t) else { return };
                    st.header[&n]["dtype"] = Value::String(DTYPES[d.index(DTYPES.len())].into());
                    st.relayout();
                }
                Mutation::Rename(t, to) => {
                    let Some(n) = st.pick(t) else { return };
                    if let Some(v) = st.header.remove(&n) {
                        st.header
                            .insert(TENSOR_NAMES[to.index(TENSOR_NAMES.len())].into(), v);
                    }
                }
                Mutation::DropTensor(t) => {
                    let Some(n) = st.pick(t) else { return };
                    st.header.remove(&n);
                    st.relayout();
                }
                Mutation::DupTensor(t) => {
                    // The same name twice in the JSON text (serde maps keep one): written by hand.
                    let Some(n) = st.pick(t) else { return };
                    let text = serde_json::to_string(&st.header).unwrap_or_default();
                    let entry = serde_json::to_string(&st.header[&n]).unwrap_or_default();
                    let key = serde_json::to_string(&n).unwrap_or_default();
                    let text = text.replacen('{', &format!("{{{key}:{entry},"), 1);
                    *buf = emit_header(&text, &st.data);
                    return;
                }
                Mutation::Meta(k, v) => {
                    let key = META_KEYS[k.index(META_KEYS.len())];
                    let value = META_VALUES[v.index(META_VALUES.len())];
                    st.meta().insert(key.into(), Value::String(value.into()));
                }
                Mutation::DropMeta(k) => {
                    let key = META_KEYS[k.index(META_KEYS.len())];
                    st.meta().remove(key);
                }
                _ => return,
            }
            *buf = st.emit();
        }
    }
}

fn mutated(kind: Kind, seed: &Index, muts: &[Mutation]) -> Vec<u8> {
    let s = seeds();
    let own = s.of(kind);
    let mut buf = own[seed.index(own.len())].clone();
    let donors = s.all();
    for m in muts {
        apply(m, &mut buf, &donors);
    }
    buf
}

fn runner(cases: u32, salt: u8) -> TestRunner {
    let mut seed = [0x5eu8; 32];
    seed[0] = salt;
    TestRunner::new_with_rng(
        Config {
            cases,
            max_shrink_iters: 128,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    )
}

fn fuzz(kind: Kind, salt: u8) {
    let strategy = (
        any::<Index>(),
        proptest::collection::vec(mutation(false), 1..=4),
    );
    let result = runner(cases(), salt).run(&strategy, |(seed, muts)| {
        let bytes = mutated(kind, &seed, &muts);
        run_one(kind, &bytes).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let n = LOADED.with(|c| c.get());
    println!(
        "{}: {} mutated files, {n} loaded (and were valid), {} refused naming the file",
        kind.name(),
        cases(),
        cases() as usize - n
    );
}

// ------------------------------------------------------------------------------------------------------------
// The tests

#[test]
fn the_seeds_load_as_they_are() {
    let s = seeds();
    for kind in Kind::ALL {
        assert!(!s.of(kind).is_empty(), "{kind:?}");
        for bytes in s.of(kind) {
            run_one(kind, bytes).unwrap();
        }
    }
    // And each loader, given every other kind's seeds, refuses them naming the file (or reads a legal file).
    for kind in Kind::ALL {
        for (other, files) in &s.by_kind {
            for bytes in files {
                if let Err(e) = run_one(kind, bytes) {
                    panic!("{kind:?} given a {other:?} seed: {e}");
                }
            }
        }
    }
}

#[test]
fn fuzz_features_files() {
    fuzz(Kind::Features, 1);
}

#[test]
fn fuzz_adapter_files() {
    fuzz(Kind::Adapter, 2);
}

#[test]
fn fuzz_project_files() {
    fuzz(Kind::Project, 3);
}

#[test]
fn fuzz_labels_csvs() {
    fuzz(Kind::LabelsCsv, 4);
}

#[test]
fn fuzz_class_name_files() {
    fuzz(Kind::ClassNames, 5);
}

/// Runs one saved input: `HEGRAPH_FUZZ_REPLAY=<kind>:<file>`.
#[test]
#[ignore = "replays one input named by HEGRAPH_FUZZ_REPLAY"]
fn replay() {
    let spec = std::env::var("HEGRAPH_FUZZ_REPLAY").expect("set HEGRAPH_FUZZ_REPLAY=<kind>:<file>");
    let (kind, file) = spec.split_once(':').expect("<kind>:<file>");
    let kind =
        Kind::parse(kind).expect("kind: features, adapter, project, labels-csv or class-names");
    let bytes = std::fs::read(file).unwrap();
    run_one(kind, &bytes).unwrap();
}

// --- huge declared sizes, each in a child process ---------------------------------------------------------

const CHILD_ENV: &str = "HEGRAPH_FUZZ_HUGE_CHILD";

/// The child: loads the inputs listed in the file named by [`CHILD_ENV`] (`<kind>:<file>` per line).
#[test]
fn huge_child() {
    let Ok(list) = std::env::var(CHILD_ENV) else {
        return; // A normal test run: only the `huge_*` tests start this as a child.
    };
    for line in std::fs::read_to_string(list).unwrap().lines() {
        let mut parts = line.splitn(3, ':');
        let (k, kind, file) = (
            parts.next().unwrap(),
            Kind::parse(parts.next().unwrap()).unwrap(),
            parts.next().unwrap(),
        );
        let bytes = std::fs::read(file).unwrap();
        match run_one(kind, &bytes) {
            Ok(()) => println!("case {k} ok"),
            Err(e) => println!("case {k} FAIL {}", e.replace('\n', " / ")),
        }
    }
}

/// Inputs of `kind` whose headers declare huge sizes for empty tensors (a zero dimension keeps the file
/// well-formed), huge class counts and such: each loaded in a child so an abort names its case.
fn huge_cases(kind: Kind, salt: u8) -> Vec<(String, Vec<u8>)> {
    let s = seeds();
    let mut out = Vec::new();
    // Every tensor of every seed, given each of these shapes.
    let shapes: &[&[u64]] = &[
        &[1 << 40, 0],
        &[0, 1 << 40],
        &[1 << 62, 0],
        &[u64::MAX, 0],
        &[1 << 40, 0, 8],
        &[1 << 20, 0, 8],
        &[8, 1 << 40, 0],
        &[1 << 40, 1 << 40, 0],
        &[0],
    ];
    for (si, seed) in s.of(kind).iter().enumerate() {
        let Some(st) = parse_st(seed) else { continue };
        for name in st.tensor_names() {
            for shape in shapes {
                let mut st = parse_st(seed).unwrap();
                st.header[&name]["shape"] = serde_json::json!(shape);
                st.relayout();
                out.push((format!("seed {si}, `{name}` shape {shape:?}"), st.emit()));
            }
        }
        for count in ["4294967296", "1099511627776", "18446744073709551615"] {
            let mut st = parse_st(seed).unwrap();
            st.meta()
                .insert("classes".into(), Value::String(count.into()));
            out.push((format!("seed {si}, classes = {count}"), st.emit()));
        }
    }
    // And random structural edits with huge sizes allowed.
    let strategy = (
        any::<Index>(),
        proptest::collection::vec(mutation(true), 1..=3),
    );
    let mut r = runner(1, salt);
    for k in 0..48 {
        let (seed, muts) = strategy
            .new_tree(&mut r)
            .map(|t| t.current())
            .unwrap_or_else(|e| panic!("{e}"));
        out.push((format!("random {k}: {muts:?}"), mutated(kind, &seed, &muts)));
    }
    out
}

/// Runs `cases` in child processes; returns the failures (a failed check, or a child that died, with the case).
fn run_in_children(kind: Kind, cases: &[(String, Vec<u8>)]) -> Vec<String> {
    let dir = tempfile::tempdir_in(work_root()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut failures = Vec::new();
    let mut next = 0;
    // One child for all cases; after a crash the next child starts after the case that crashed it.
    while next < cases.len() {
        let list = dir.path().join("list.txt");
        let mut text = String::new();
        for (k, (_, bytes)) in cases.iter().enumerate().skip(next) {
            let f = dir.path().join(format!("case{k}.bin"));
            std::fs::write(&f, bytes).unwrap();
            text.push_str(&format!("{k}:{}:{}\n", kind.name(), f.display()));
        }
        std::fs::write(&list, text).unwrap();
        let out = std::process::Command::new(&exe)
            .args(["--exact", "huge_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &list)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        for line in stdout.lines() {
            // libtest may print "test huge_child ... " on the first case's line.
            let Some((_, rest)) = line.split_once("case ") else {
                continue;
            };
            let (k, verdict) = rest.split_once(' ').unwrap();
            let k: usize = k.parse().unwrap();
            assert_eq!(k, next, "the child skipped a case");
            if let Some(why) = verdict.strip_prefix("FAIL ") {
                failures.push(format!("{}: {why}", cases[k].0));
            }
            next += 1;
        }
        if next < cases.len() {
            assert!(!out.status.success(), "the child stopped early: {stdout}");
            let (name, bytes) = &cases[next];
            let saved = save_failure(kind, bytes);
            failures.push(format!(
                "{name}: the loader crashed the process ({}); input saved to {}; stderr: {}",
                out.status,
                saved.display(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .find(|l| l.contains("allocation") || l.contains("panicked"))
                    .unwrap_or("(nothing)")
            ));
            next += 1;
        }
    }
    failures
}

fn huge(kind: Kind, salt: u8) {
    let cases = huge_cases(kind, salt);
    let failures = run_in_children(kind, &cases);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn huge_declared_sizes_in_adapter_files() {
    huge(Kind::Adapter, 12);
}

#[test]
fn huge_declared_sizes_in_features_files() {
    huge(Kind::Features, 11);
}

// --- the bugs this fuzzing found, as plain regression tests ----------------------------------------------

/// A seed adapter (0: HeGraphAdapter, 2: Tip-Adapter-F) with one tensor given another shape, the file kept
/// well-formed.
fn reshaped_adapter(seed: usize, tensor: &str, shape: &[u64]) -> Vec<u8> {
    let mut st = parse_st(&seeds().of(Kind::Adapter)[seed]).unwrap();
    st.header[tensor]["shape"] = serde_json::json!(shape);
    st.relayout();
    st.emit()
}

#[test]
fn adapter_tensors_of_inconsistent_shapes_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for (seed, tensor, shape, want) in [
        // Used to walk 2^40 rows in the non-finite check.
        (0, "text", &[1u64 << 40, 0][..], "no columns"),
        (0, "keys", &[1u64 << 40, 0][..], "columns"),
        // Used to load, then panic in `predict` (a text classifier of 2 rows for 3 classes).
        (2, "text", &[2, 8][..], "rows"),
        (0, "w_p", &[4, 8][..], "rows"),
    ] {
        let path = dir.path().join(format!("{tensor}-{}.hegraph", shape[0]));
        std::fs::write(&path, reshaped_adapter(seed, tensor, shape)).unwrap();
        let err = TrainedAdapter::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains(want) && err.contains(tensor),
            "{tensor} {shape:?}: {err}"
        );
    }
    // A missing tensor found while deriving the classifier names the file too.
    let mut st = parse_st(&seeds().of(Kind::Adapter)[0]).unwrap();
    st.header.remove("fused_keys");
    st.relayout();
    let path = dir.path().join("no-fused-keys.hegraph");
    std::fs::write(&path, st.emit()).unwrap();
    let err = TrainedAdapter::load(&path).unwrap_err().to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("fused_keys"),
        "{err}"
    );
}

#[test]
fn project_numbers_too_big_for_f32_are_reset_rather_than_saved_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("project.json");
    let mut v: Value = serde_json::from_slice(&seeds().of(Kind::Project)[1]).unwrap();
    v["settings"]["train"]["alpha_vp"] = serde_json::json!(1e308);
    v["settings"]["thumb_size"] = serde_json::json!(1e300);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let loaded = Project::load(&path).unwrap();
    assert!(
        loaded.warnings.iter().any(|w| w.contains("alpha_vp"))
            && loaded.warnings.iter().any(|w| w.contains("thumbnail")),
        "{:?}",
        loaded.warnings
    );
    assert_eq!(loaded.project.settings.train, TrainParams::default());
    assert_eq!(loaded.project.labels.len(), 16, "the labels are kept");
    // The first save after a label used to write `null`, and the project no longer opened.
    loaded.project.save(&path).unwrap();
    assert_eq!(Project::load(&path).unwrap().project, loaded.project);
}

/// Found with `HEGRAPH_FUZZ_CASES=4000` (the file is that input: a HeGraphAdapter seed with its text nodes
/// zeroed, `fused_keys` re-typed to F16 and flipped bytes giving cache-key entries up to 3.7e34): every number
/// is finite and every shape right, so it loads, but it predicts NaN. The overflow is in the predictor
/// (normalisation, the cache's `exp`: src/adapter, src/linalg.rs), not in parsing, so it is left to their owner.
#[test]
fn adapter_with_huge_finite_numbers_is_refused_or_predicts_finite_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.hegraph");
    std::fs::copy(
        manifest().join("tests/fixtures/adapter_predicts_nan.hegraph"),
        &path,
    )
    .unwrap();
    check_adapter(&path, seeds()).unwrap();
}
