//! Command-line interface: `extract`, `train`, `predict`, `eval`, `bench`, `demo`, `search`, `gui`.
//!
//! Errors are reported once, here at the edge (`anyhow`), with the library's messages as context.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use hegraph::adapter::{self, Method, TrainEvent, TrainInput, TrainParams, TrainedAdapter};
use hegraph::clip::{self, ClipModel};
use hegraph::data::{self, Dataset, OpenOptions};
use hegraph::extract::{self, EmbedOptions, Embedder};
use hegraph::features::{FeatureSet, LabelledSplit};
use hegraph::linalg::argmax;
use hegraph::progress::{CancelToken, Progress};
use hegraph::project;
use hegraph::prompts;

mod search;

#[derive(Parser, Debug)]
#[command(name = "hegraph", version, about = "Few-shot image classification with CLIP and the Heterogeneous Graph Adapter", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Embed a folder of images (and its class prompts) with CLIP into a features file.
    Extract(ExtractArgs),
    /// Train an adapter on the labelled images of a folder or a features file.
    Train(TrainArgs),
    /// Predict classes (with per-class confidence) for images, with a trained adapter.
    Predict(PredictArgs),
    /// The few-shot protocol (shots × seeds × methods) on a features file or a labelled folder.
    Eval(EvalArgs),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    Bench(BenchArgs),
    /// The whole job on the bundled demo folder: embed, train on the labelled images, predict the rest.
    Demo(DemoArgs),
    /// Rank the images of a folder (or the rows of a features file) by CLIP similarity to a phrase.
    Search(SearchArgs),
    /// The desktop application (also what `hegraph` with no arguments starts).
    Gui {
        /// A project file or an image folder to open.
        path: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face-format CLIP directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Never download weights; fail if none are found locally.
    #[arg(long)]
    pub offline: bool,
    /// Use a small random-weight checkpoint with CLIP's layout (plumbing tests only: predictions are noise).
    #[arg(long)]
    pub test_checkpoint: bool,
    /// Feature cache directory (default: the user cache directory).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Where images are encoded: auto = a hardware GPU through wgpu when present, else candle on the CPU;
    /// gpu forces wgpu (software adapters too). Text is always encoded on the CPU.
    #[arg(long, value_enum, env = "HEGRAPH_CLIP_DEVICE", default_value = "auto")]
    pub clip_device: ClipDeviceArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipDeviceArg {
    Auto,
    Cpu,
    Gpu,
}

impl From<ClipDeviceArg> for clip::ClipDevice {
    fn from(a: ClipDeviceArg) -> Self {
        match a {
            ClipDeviceArg::Auto => clip::ClipDevice::Auto,
            ClipDeviceArg::Cpu => clip::ClipDevice::Cpu,
            ClipDeviceArg::Gpu => clip::ClipDevice::Gpu,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct FolderArgs {
    /// Class names file, one per line (otherwise: one sub-folder per class).
    #[arg(long, value_name = "FILE")]
    pub classes: Option<PathBuf>,
    /// CSV `path,label` of the labelled images.
    #[arg(long, value_name = "CSV")]
    pub labels: Option<PathBuf>,
    /// Prompt template(s), `{}` stands for the class name; repeat for an ensemble.
    #[arg(long = "template", value_name = "TEMPLATE")]
    pub templates: Vec<String>,
    /// Use the 7-template ImageNet ensemble.
    #[arg(long)]
    pub imagenet_templates: bool,
    /// Augmented views per labelled image.
    #[arg(long, default_value_t = extract::DEFAULT_VIEWS)]
    pub views: usize,
}

#[derive(Args, Debug)]
pub struct ExtractArgs {
    pub folder: PathBuf,
    #[command(flatten)]
    pub folder_args: FolderArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write the features file (default: FOLDER/.hegraph/features.safetensors).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolArg {
    Coop,
    Interactive,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendArg {
    Auto,
    Cpu,
    /// The CPU with candle's autodiff (slower; a cross-check of the hand-written CPU step).
    Candle,
    Wgpu,
}

#[derive(Args, Debug, Clone)]
pub struct MethodArgs {
    /// hegraph, tip-adapter-f, tip-adapter or zero-shot.
    #[arg(long, default_value = "hegraph")]
    pub method: Method,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub reading: ReadingArgs,
    /// Compute backend: auto picks wgpu on a real GPU and the CPU otherwise (env HEGRAPH_BACKEND too).
    #[arg(long, value_enum, env = "HEGRAPH_BACKEND", default_value = "auto")]
    pub backend: BackendArg,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// An image folder (embedded through the cache first) or a features file (.safetensors).
    pub input: PathBuf,
    #[command(flatten)]
    pub folder_args: FolderArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub method: MethodArgs,
    /// For a features file with precomputed K-shot sets: which K to train on.
    #[arg(long)]
    pub shots: Option<usize>,
    /// Where to save the adapter.
    #[arg(long, short, default_value = "adapter.hegraph")]
    pub out: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    Csv,
    Json,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// A folder of images (class sub-folders or flat) or a features file (`.safetensors`).
    pub path: PathBuf,
    /// What to look for, e.g. "a dog on a beach at night".
    pub phrase: String,
    /// Print only the best N.
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// A trained adapter file.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Images or folders of images.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: OutFormat,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// Which reading of the method and which settings (shared by train and eval).
#[derive(Args, Debug, Clone, Default)]
pub struct ReadingArgs {
    /// Use the SPEC's reading of HeGraphAdapter (probability fusion, uniform initial weights, the graph
    /// trained 20 epochs) instead of the adopted one.
    #[arg(long)]
    pub spec: bool,
    /// Epochs of the graph layers' training (HeGraphAdapter; 0 in the adopted reading).
    #[arg(long)]
    pub graph_epochs: Option<usize>,
    /// Any setting as KEY=VALUE (the field names of `TrainParams`, e.g. `fusion=Probability`,
    /// `self_exclude=false`, `transduction.temperature=20`); repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
}

impl ReadingArgs {
    /// The settings these flags ask for, before `--epochs`/`--lr`.
    pub fn params(&self) -> Result<TrainParams> {
        let base = if self.spec {
            TrainParams::spec()
        } else {
            TrainParams::default()
        };
        let mut p = base
            .with_overrides(&self.params)
            .map_err(|e| anyhow::anyhow!("--param: {e}"))?;
        if let Some(e) = self.graph_epochs {
            p.epochs = e;
        }
        Ok(p)
    }
}

/// `--epochs` and `--lr` apply to the training the method does: the cache keys (Tip-Adapter-F, and
/// HeGraphAdapter's logit fusion), the graph layers (HeGraphAdapter's SPEC reading); a method that trains
/// nothing refuses them.
fn apply_epochs_lr(
    p: &mut TrainParams,
    method: Option<Method>,
    epochs: Option<usize>,
    lr: Option<f32>,
) -> Result<()> {
    if let Some(m @ (Method::ZeroShot | Method::TipAdapter)) = method {
        if epochs.is_some() || lr.is_some() {
            bail!(
                "{} trains nothing: --epochs and --lr do not apply to it",
                m.title()
            );
        }
    }
    if let Some(lr) = lr {
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr must be a positive number, not {lr}");
        }
    }
    let keys = match method {
        Some(Method::HeGraph) => p.fusion == hegraph::adapter::Fusion::Logit,
        // Tip-Adapter-F, and eval (every method).
        _ => true,
    };
    let graph = match method {
        Some(Method::HeGraph) => p.fusion == hegraph::adapter::Fusion::Probability,
        None => p.fusion == hegraph::adapter::Fusion::Probability,
        _ => false,
    };
    if let Some(e) = epochs {
        if keys {
            p.tip_epochs = e;
        }
        if graph {
            p.epochs = e;
        }
    }
    if let Some(lr) = lr {
        if keys {
            p.tip_lr = lr;
        }
        if graph {
            p.lr = lr;
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A features file (.safetensors) or a labelled image folder.
    pub input: PathBuf,
    #[command(flatten)]
    pub folder_args: FolderArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Shots to evaluate (those the data allows).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub shots: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Methods, comma-separated (default: all four).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<Method>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, value_enum, env = "HEGRAPH_BACKEND", default_value = "auto")]
    pub backend: BackendArg,
    /// coop: the field's protocol (validation split for hyperparameters); interactive: no validation split,
    /// hyperparameters from the labelled images alone, validation and test images unlabelled.
    #[arg(long, value_enum, default_value = "coop")]
    pub protocol: ProtocolArg,
    /// Add "+ transductive" rows: each method's predictions refined over the unlabelled images.
    #[arg(long)]
    pub transductive: bool,
    #[command(flatten)]
    pub reading: ReadingArgs,
    /// Also write the table as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum BenchWhat {
    /// CLIP image encoding at batch 1 and 32, and text encoding per 1,000 prompts.
    Clip(BenchClipArgs),
    /// Adapter training: ms per step and total time, C ∈ {10, 100, 1000}, K = 16, D = 512, both backends.
    Train(BenchTrainArgs),
    /// End-to-end `extract` images/s on large JPEGs made from real photos, against the encoder alone.
    Extract(BenchExtractArgs),
    /// WGSL matmul against the CPU matmul.
    Kernels,
    /// One wgpu training step with every kernel timed on the GPU (timestamp queries): where the time goes.
    Step(BenchStepArgs),
    /// The transductive refinement of unlabelled predictions (and the same algorithm in numpy, if present).
    Transduce(BenchTransduceArgs),
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct BenchExtractArgs {
    /// Photos to upscale (default: ../shared/data/photos beside the source tree).
    #[arg(long)]
    pub photos: Option<PathBuf>,
    /// JPEGs to make (in a temporary folder) and embed.
    #[arg(long, default_value_t = 96)]
    pub count: usize,
    #[arg(long, default_value_t = 4000)]
    pub width: u32,
    #[arg(long, default_value_t = 3000)]
    pub height: u32,
    /// Rounds of (encoder only, end to end); the best of each is compared.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The checkpoint to time (as for `bench clip`).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct BenchClipArgs {
    /// Time this checkpoint; a random-weight one with ViT-B/32's sizes is written there if it holds none.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Least seconds per measurement.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Also time candle-transformers' CLIP on the same inputs and print the smallest cosine to it.
    #[arg(long)]
    pub reference: bool,
    /// Write the results as JSON to this file (read by benches/clip_peer.py).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also time the GPU image encoder next to the CPU (gpu: any adapter; auto: a hardware one only).
    #[arg(long, value_enum, default_value = "cpu")]
    pub clip_device: ClipDeviceArg,
    /// The large batch of the GPU-against-CPU comparison (smaller on a software adapter, where a batch of
    /// 32 ViT-B/32 images takes minutes).
    #[arg(long, default_value_t = 32)]
    pub gpu_batch: usize,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct BenchTransduceArgs {
    /// Unlabelled images.
    #[arg(long, default_value_t = 10_000)]
    pub images: usize,
    #[arg(long, default_value_t = 100)]
    pub classes: usize,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct BenchStepArgs {
    /// Classes of the synthetic task (K = 16, D = 512, 10 views, batch 256).
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,
}

#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct BenchTrainArgs {
    /// Class counts to time, comma-separated (default: 10,100,1000).
    #[arg(long, value_delimiter = ',')]
    pub classes: Option<Vec<usize>>,
    /// Epochs (default: the training default).
    #[arg(long)]
    pub epochs: Option<usize>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The demo folder (default: the bundled `assets/demo`).
    #[arg(long)]
    pub folder: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub method: MethodArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        None => run_gui(None),
        Some(Command::Gui { path }) => run_gui(path),
        Some(Command::Extract(a)) => cmd_extract(a),
        Some(Command::Train(a)) => cmd_train(a),
        Some(Command::Predict(a)) => cmd_predict(a),
        Some(Command::Eval(a)) => cmd_eval(a),
        Some(Command::Bench(a)) => cmd_bench(a),
        Some(Command::Demo(a)) => cmd_demo(a),
        Some(Command::Search(a)) => search::cmd_search(a),
    }
}

fn run_gui(path: Option<PathBuf>) -> Result<()> {
    hegraph::app::run_gui(path).context("the desktop application failed")
}

/// A terminal progress bar behind the engine's [`Progress`] trait.
pub(crate) struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub(crate) fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:<40} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar }
    }
}

impl Progress for Bar {
    fn set_stage(&self, stage: &str) {
        self.bar.set_message(stage.to_string());
    }
    fn update(&self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
    }
    fn message(&self, msg: &str) {
        self.bar.println(msg);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Finds CLIP weights in the documented order, or writes/uses the test checkpoint when asked to.
pub(crate) fn load_model(m: &ModelArgs) -> Result<Arc<ClipModel>> {
    let model = if m.test_checkpoint {
        let dir = test_checkpoint_dir();
        let (model, note) = clip::test_checkpoint::load_or_write_app_test_checkpoint(&dir)
            .with_context(|| format!("the test checkpoint in {}", dir.display()))?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        model
    } else {
        let dir = clip::hub::resolve_model_dir(m.model.as_deref(), !m.offline)?;
        ClipModel::load(&dir).with_context(|| format!("loading CLIP from {}", dir.display()))?
    };
    eprintln!("model: {}", model.info().banner());
    Ok(Arc::new(model))
}

/// The test checkpoint lives in the user cache; it is written once, from a fixed seed.
fn test_checkpoint_dir() -> PathBuf {
    let base = dirs::cache_dir().unwrap_or_else(std::env::temp_dir);
    clip::test_checkpoint::app_test_checkpoint_dir(&base.join("hegraph"))
}

fn templates_of(f: &FolderArgs) -> Vec<String> {
    if f.imagenet_templates {
        prompts::IMAGENET_TEMPLATES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else if f.templates.is_empty() {
        vec![prompts::DEFAULT_TEMPLATE.to_string()]
    } else {
        f.templates.clone()
    }
}

/// A folder's images and labels. A folder the GUI has a project for (`FOLDER/.hegraph/project.json`) is read
/// with that project's classes, labels and templates unless `--classes`/`--labels` say otherwise: those are
/// the labels the person gave, which sub-folders and CSVs may no longer reflect.
fn open_dataset(folder: &Path, f: &FolderArgs) -> Result<(Dataset, Option<Vec<String>>)> {
    let project_file = project::default_project_path(folder);
    let project = if f.classes.is_none() && f.labels.is_none() && project_file.is_file() {
        Some(
            project::Project::load(&project_file)
                .with_context(|| {
                    format!("reading the folder's project {}", project_file.display())
                })?
                .project,
        )
    } else {
        None
    };
    let mut ds = data::open_folder(
        folder,
        &OpenOptions {
            classes_file: f.classes.as_deref(),
            classes: project.as_ref().map(|p| p.classes.clone()),
            labels_csv: f.labels.as_deref(),
            max_images: None,
        },
    )
    .with_context(|| format!("opening {}", folder.display()))?;
    warn_folder_problems(&ds);
    let templates = project.map(|p| {
        for img in &mut ds.images {
            img.label = p.label_index(&img.rel);
        }
        let labelled = ds.images.iter().filter(|i| i.label.is_some()).count();
        eprintln!(
            "using the project {}: {} classes, {labelled} labelled images (--classes/--labels override it)",
            project_file.display(),
            p.classes.len()
        );
        p.templates
    });
    Ok((ds, templates))
}

/// What the folder walker found wrong (empty files, FIFOs, broken links, loops, ...), printed the same way
/// by every command that opens a folder.
fn warn_folder_problems(ds: &Dataset) {
    for p in &ds.problems {
        eprintln!("warning: {p}");
    }
}

/// The files that could not be decoded, in the one wording every command uses.
fn skipped_report(problems: &[data::Problem]) -> String {
    let mut out = format!("{} file(s) skipped:\n", problems.len());
    for p in problems {
        out.push_str(&format!("  {p}\n"));
    }
    out
}

fn embedder(model: Arc<ClipModel>, m: &ModelArgs, f: &FolderArgs) -> Result<Embedder> {
    let e = Embedder::new(
        model,
        EmbedOptions {
            views: f.views,
            cache_dir: m.cache_dir.clone(),
            clip_device: m.clip_device.into(),
            ..Default::default()
        },
    )?;
    for w in e.cache_warnings() {
        eprintln!("warning: {w}");
    }
    if let Some(n) = e.device_note() {
        eprintln!("{n}");
    }
    Ok(e)
}

/// Embeds a folder (through the cache) and prints the summary `extract` promises.
fn extract_folder(folder: &Path, f: &FolderArgs, m: &ModelArgs) -> Result<FeatureSet> {
    let (ds, project_templates) = open_dataset(folder, f)?;
    let templates = match project_templates {
        Some(t) if f.templates.is_empty() && !f.imagenet_templates && !t.is_empty() => t,
        _ => templates_of(f),
    };
    let model = load_model(m)?;
    let banner = model.info().banner();
    let e = embedder(model, m, f)?;
    let cancel = CancelToken::new();
    let (fs, report) = {
        let bar = Bar::new();
        extract::extract_dataset(&ds, &e, &templates, &bar, &cancel)?
    };
    let s = &report.stats;
    println!(
        "{} images ({} labelled, {} unlabelled, {} classes) in {:.1} s: {} features computed, {} read from the cache",
        s.images,
        report.labelled,
        report.unlabelled,
        ds.classes.len(),
        s.seconds,
        s.features_computed,
        s.features_from_cache
    );
    if !s.problems.is_empty() {
        print!("{}", skipped_report(&s.problems));
    }
    println!("model: {banner}");
    Ok(fs)
}

fn cmd_extract(a: ExtractArgs) -> Result<()> {
    let fs = extract_folder(&a.folder, &a.folder_args, &a.model)?;
    let out = a
        .out
        .unwrap_or_else(|| extract::default_features_path(&a.folder));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs.save(&out)?;
    println!("features written to {}", out.display());
    Ok(())
}

/// A features file, or a folder embedded on the fly.
fn features_from(input: &Path, f: &FolderArgs, m: &ModelArgs) -> Result<FeatureSet> {
    if input.is_file() {
        let fs = FeatureSet::load(input).with_context(|| format!("reading {}", input.display()))?;
        if fs.test_checkpoint {
            eprintln!("note: these features come from a TEST CHECKPOINT (random weights): predictions are not meaningful");
        }
        Ok(fs)
    } else {
        extract_folder(input, f, m)
    }
}

fn train_params(m: &MethodArgs) -> Result<TrainParams> {
    let mut p = m.reading.params()?;
    p.seed = m.seed;
    apply_epochs_lr(&mut p, Some(m.method), m.epochs, m.lr)?;
    Ok(p)
}

fn train_on(fs: &FeatureSet, split: &LabelledSplit, m: &MethodArgs) -> Result<TrainedAdapter> {
    let params = train_params(m)?;
    let input = TrainInput {
        classes: &fs.classes,
        text: fs.text.as_ref(),
        text_neg: fs.text_neg.as_ref(),
        train: split,
        val: fs.val.as_ref(),
    };
    let backend = hegraph::gpu::select_backend(m.backend.into())?;
    eprintln!("backend: {}", backend.describe());
    let cancel = CancelToken::new();
    let bar = Bar::new();
    bar.set_stage(&format!("training {}", m.method));
    let start = Instant::now();
    let mut last_loss = None;
    let trained = adapter::train(
        m.method,
        &params,
        &input,
        backend.choice(),
        &cancel,
        &mut |ev| match ev {
            TrainEvent::Step {
                step, total, loss, ..
            } => {
                bar.update(*step, *total);
                if let Some(l) = loss {
                    last_loss = Some(*l);
                }
            }
            TrainEvent::Message(msg) => bar.message(msg),
        },
    )?;
    drop(bar);
    let loss = last_loss
        .map(|l| format!(", final loss {l:.4}"))
        .unwrap_or_default();
    println!(
        "trained {} in {:.2} s{loss}",
        m.method,
        start.elapsed().as_secs_f64()
    );
    if let Some(sel) = &trained.selection {
        println!("{}: {sel}", m.method);
    }
    for n in &trained.notes {
        println!("note: {n}");
    }
    Ok(trained)
}

impl From<BackendArg> for hegraph::gpu::BackendRequest {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => Self::Auto,
            BackendArg::Cpu => Self::Cpu,
            BackendArg::Candle => Self::Candle,
            BackendArg::Wgpu => Self::Wgpu,
        }
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let fs = features_from(&a.input, &a.folder_args, &a.model)?;
    let split = match a.shots {
        Some(k) => fs
            .shots
            .get(&k)
            .with_context(|| format!("{} has no {k}-shot set", a.input.display()))?,
        None => match (&fs.train, fs.shots.keys().next_back()) {
            (Some(t), _) => t,
            (None, Some(k)) => &fs.shots[k],
            (None, None) => bail!("{} has no labelled images to train on", a.input.display()),
        },
    };
    let trained = train_on(&fs, split, &a.method)?;
    trained.save(&a.out)?;
    println!("adapter written to {}", a.out.display());
    Ok(())
}

fn cmd_predict(a: PredictArgs) -> Result<()> {
    let trained = TrainedAdapter::load(&a.adapter)
        .with_context(|| format!("loading the adapter {}", a.adapter.display()))?;
    let mut paths = Vec::new();
    for p in &a.inputs {
        if p.is_dir() {
            let ds = data::open_folder(
                p,
                &OpenOptions {
                    classes_file: None,
                    classes: Some(trained.classes.clone()),
                    labels_csv: None,
                    max_images: None,
                },
            )
            .with_context(|| format!("opening {}", p.display()))?;
            warn_folder_problems(&ds);
            paths.extend(ds.images.into_iter().map(|e| e.path));
        } else {
            paths.push(p.clone());
        }
    }
    let model = load_model(&a.model)?;
    let test_ckpt = model.info().is_test_checkpoint;
    let e = Embedder::new(
        model,
        EmbedOptions {
            cache_dir: a.model.cache_dir.clone(),
            clip_device: a.model.clip_device.into(),
            ..Default::default()
        },
    )?;
    if let Some(n) = e.device_note() {
        eprintln!("{n}");
    }
    let cancel = CancelToken::new();
    let (feats, stats) = {
        let bar = Bar::new();
        e.embed_images(&paths, &[0], &bar, &cancel)?
    };
    // stdout may carry the predictions, so the same report goes to stderr here.
    if !stats.problems.is_empty() {
        eprint!("{}", skipped_report(&stats.problems));
    }
    let ok_idx: Vec<usize> = (0..paths.len()).filter(|&i| feats.ok[i]).collect();
    let z = feats.per_view[0].select_rows(&ok_idx);
    let probs = trained.predict(&z)?;
    let rows: Vec<PredictionRow> = ok_idx
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            let p = probs.row(r);
            let top = argmax(p);
            PredictionRow {
                path: hegraph::stored_path::path_to_stored(&paths[i]),
                label: trained.classes[top].clone(),
                confidence: p[top],
                probabilities: p.to_vec(),
            }
        })
        .collect();
    let text = match a.format {
        OutFormat::Csv => predictions_csv(&trained.classes, &rows),
        OutFormat::Json => serde_json::to_string_pretty(&PredictionsJson {
            test_checkpoint: test_ckpt,
            classes: trained.classes.clone(),
            predictions: rows,
        })?,
    };
    match a.out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    if test_ckpt {
        eprintln!("note: TEST CHECKPOINT (random weights): predictions are not meaningful");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct PredictionRow {
    /// The stored form (`hegraph::stored_path`), so a program reading the output finds the exact file.
    path: String,
    label: String,
    confidence: f32,
    probabilities: Vec<f32>,
}

#[derive(serde::Serialize)]
struct PredictionsJson {
    test_checkpoint: bool,
    classes: Vec<String>,
    predictions: Vec<PredictionRow>,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.trim() != s {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn predictions_csv(classes: &[String], rows: &[PredictionRow]) -> String {
    let mut out = String::from("path,label,confidence");
    for c in classes {
        out.push(',');
        out.push_str(&csv_field(&format!("p:{c}")));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{},{},{:.6}",
            csv_field(&r.path),
            csv_field(&r.label),
            r.confidence
        ));
        for p in &r.probabilities {
            out.push_str(&format!(",{p:.6}"));
        }
        out.push('\n');
    }
    out
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let fs = features_from(&a.input, &a.folder_args, &a.model)?;
    let backend = hegraph::gpu::select_backend(a.backend.into())?;
    eprintln!("backend: {}", backend.describe());
    let mut params = a.reading.params()?;
    apply_epochs_lr(&mut params, None, a.epochs, None)?;
    let mut opts = hegraph::eval::EvalOptions {
        shots: a.shots.clone(),
        seeds: a.seeds.clone(),
        backend: backend.choice(),
        protocol: match a.protocol {
            ProtocolArg::Coop => hegraph::eval::Protocol::CoOp,
            ProtocolArg::Interactive => hegraph::eval::Protocol::Interactive,
        },
        transductive: a.transductive,
        params,
        ..Default::default()
    };
    if !a.methods.is_empty() {
        opts.methods = a.methods.clone();
    }
    let bar = Bar::new();
    let report = hegraph::eval::evaluate(&fs, &opts, &mut |msg: &str| bar.set_stage(msg))?;
    drop(bar);
    println!("{}", report.to_markdown());
    if let Some(path) = a.csv {
        std::fs::write(&path, report.to_csv())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Clip(c) => hegraph::bench::bench_clip_cli(&hegraph::bench::ClipBenchOptions {
            checkpoint: c.checkpoint,
            seconds: c.seconds,
            reference: c.reference,
            json: c.json,
            device: c.clip_device.into(),
            gpu_batch: c.gpu_batch,
        }),
        BenchWhat::Train(t) => hegraph::bench::bench_train_cli(
            t.classes
                .as_deref()
                .unwrap_or(&hegraph::adapter::bench::BENCH_CLASSES),
            t.epochs,
        ),
        BenchWhat::Extract(e) => {
            hegraph::bench::bench_extract_cli(&hegraph::bench::ExtractBenchOptions {
                photos: e.photos,
                count: e.count,
                width: e.width,
                height: e.height,
                rounds: e.rounds,
                checkpoint: e.checkpoint,
            })
        }
        BenchWhat::Kernels => hegraph::bench::bench_kernels_cli(),
        BenchWhat::Step(s) => hegraph::bench::bench_step_cli(s.classes),
        BenchWhat::Transduce(t) => hegraph::bench::bench_transduce_cli(t.images, t.classes),
    }
    .map_err(Into::into)
}

fn demo_folder() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo"))
}

fn cmd_demo(a: DemoArgs) -> Result<()> {
    let folder = a.folder.clone().unwrap_or_else(demo_folder);
    let mut model_args = a.model.clone();
    if !model_args.test_checkpoint {
        if let Err(e) =
            clip::hub::resolve_model_dir(model_args.model.as_deref(), !model_args.offline)
        {
            eprintln!("{e}");
            eprintln!(
                "no CLIP weights could be found or downloaded: the demo goes on with the TEST CHECKPOINT \
                 (random weights) to show the pipeline; its predictions are not meaningful"
            );
            model_args.test_checkpoint = true;
        }
    }
    // The images sit in `images/`, the class names and labels beside it, so the folder scan sees only images.
    let images = folder.join("images");
    let folder_args = FolderArgs {
        classes: Some(folder.join("classes.txt")),
        labels: Some(folder.join("labels.csv")),
        templates: Vec::new(),
        imagenet_templates: false,
        views: extract::DEFAULT_VIEWS,
    };
    let fs = extract_folder(&images, &folder_args, &model_args)?;
    let train = fs
        .train
        .as_ref()
        .context("the demo folder has no labelled images")?;
    let trained = train_on(&fs, train, &a.method)?;
    let unl = fs
        .unlabelled
        .as_ref()
        .context("the demo folder has no unlabelled images")?;
    let probs = trained.predict(&unl.features)?;
    let truth = read_truth(&folder.join("truth.csv"));
    println!(
        "\n{:<36} {:<12} {:>10}  truth",
        "image", "predicted", "confidence"
    );
    let mut right = 0;
    let mut known = 0;
    for (i, path) in unl.paths.iter().enumerate() {
        let p = probs.row(i);
        let top = argmax(p);
        let t = truth
            .iter()
            .find(|(q, _)| q == path)
            .map(|(_, l)| l.as_str());
        if let Some(t) = t {
            known += 1;
            if t == fs.classes[top] {
                right += 1;
            }
        }
        println!(
            "{:<36} {:<12} {:>9.1}%  {}",
            hegraph::stored_path::display(path),
            fs.classes[top],
            100.0 * p[top],
            t.unwrap_or("?")
        );
    }
    if known > 0 {
        println!(
            "\naccuracy on the {known} unlabelled demo images: {:.1}% ({right}/{known})",
            100.0 * right as f64 / known as f64
        );
    }
    if fs.test_checkpoint {
        println!("TEST CHECKPOINT (random weights): these predictions are not meaningful; run with real CLIP weights (--model DIR or network access) for real ones");
    }
    Ok(())
}

fn read_truth(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .skip(1)
                .filter_map(|l| {
                    let (p, c) = l.split_once(',')?;
                    Some((p.trim().to_string(), c.trim().to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}
