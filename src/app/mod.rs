//! The desktop application: open a folder, label images with the keyboard, train in the background, look at the
//! heterogeneous graph, export. eframe with the wgpu renderer; the compute engine is handed the same wgpu
//! device ([`compute_gpu`]).
//!
//! Structure: [`HeGraphApp`] owns a [`state::Session`] (labels, undo, filter; no egui), the background
//! [`jobs`] (embedding, training), the [`thumbs`] cache and the [`graph_view`]. [`HeGraphApp::show`] draws
//! everything into a `Ui`, so the same code runs in the window and in headless tests (egui_kittest).
//!
//! Choices:
//! - A folder's project lives in `<folder>/.hegraph/project.json` (next to its features), and is saved after
//!   every labelling action; see [`crate::project`] for why saves are atomic.
//! - Predictions exist from the moment the folder is embedded: zero-shot CLIP until the first training, then
//!   the trained adapter's. So sorting by margin and "label next" help from the first label on.
//! - Held-out accuracy: a stable hash-based share of the labelled images (setting, default 20 %) is left out
//!   of training and measured after it; 0 % trains on everything and shows no accuracy.
//! - The graph view shows the trained HeGraphAdapter's graph; before any such training it shows the graph the
//!   current labels would give (centre crops as the visual side), built on the UI thread (it is `C×C`).

pub mod frame_stats;
pub mod graph_view;
pub mod insights;
pub mod jobs;
pub mod prefs;
pub mod search;
pub mod state;
pub mod style;
pub mod thumbs;

mod bulk_accept;
mod chrome;
mod dialogs;
mod features_file;
mod graph_page;
mod image_viewer;
mod label_view;
mod map_view;
mod path_prompt;
mod shortcuts;
mod train_view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use egui::{Key, Modifiers, RichText};

use crate::adapter::{TrainParams, TrainedAdapter};
use crate::clip::ModelInfo;
use crate::data::{self, DataError};
use crate::extract::Embedder;
use crate::gpu::GpuContext;
use crate::linalg::Mat;
use crate::project::{default_project_path, LabelOrigin, Project, ProjectError, TrainingRecord};

use graph_view::GraphView;
use jobs::{EmbedOutput, EmbedRequest, Job, ModelSource, Polled, TrainOutput, TrainRequest};
use prefs::ModelChoice;
use shortcuts::Action;
use state::{GridFilter, ImageItem, Session, Show, SortKey};
use thumbs::ThumbCache;

pub use map_view::MapLayout;
pub use train_view::Chart;

/// Where a folder's images and class-name/label files are.
struct Sidecars {
    images: PathBuf,
    classes: Option<PathBuf>,
    labels: Option<PathBuf>,
}

/// Class names (`classes.txt`) and labels (`labels.csv`) beside the images. Two layouts: the files inside the
/// opened folder, or the demo's layout `<dir>/{classes.txt, labels.csv, images/}`, opened either as `<dir>`
/// or as `<dir>/images` (then the images folder is the root and the files come from `<dir>`).
fn sidecars(folder: &Path) -> Sidecars {
    let file = |dir: &Path, name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    if file(folder, "classes.txt").is_some() && folder.join("images").is_dir() {
        return Sidecars {
            images: folder.join("images"),
            classes: file(folder, "classes.txt"),
            labels: file(folder, "labels.csv"),
        };
    }
    if let Some(c) = file(folder, "classes.txt") {
        return Sidecars {
            images: folder.to_path_buf(),
            classes: Some(c),
            labels: file(folder, "labels.csv"),
        };
    }
    let parent = folder
        .parent()
        .filter(|_| folder.file_name().is_some_and(|n| n == "images"));
    match parent.and_then(|p| file(p, "classes.txt").map(|c| (p, c))) {
        Some((p, c)) => Sidecars {
            images: folder.to_path_buf(),
            classes: Some(c),
            labels: file(p, "labels.csv"),
        },
        None => Sidecars {
            images: folder.to_path_buf(),
            classes: None,
            labels: None,
        },
    }
}

/// The line shown whenever the model is a test checkpoint.
pub const TEST_CHECKPOINT_BANNER: &str =
    "TEST CHECKPOINT (random weights): predictions are not meaningful";

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Project(#[from] ProjectError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{}: no such folder or project file; give an image folder or a project .json file", path.display())]
    NotFound { path: PathBuf },
    #[error(transparent)]
    Features(#[from] crate::features::FeaturesError),
    #[error("{}: the features file holds no image rows", path.display())]
    NoRows { path: PathBuf },
    #[error("nothing is open; open an image folder first")]
    NothingOpen,
    #[error("cannot open the window: {0}")]
    Window(String),
}

/// Settings of one run of the application that are not part of a project.
#[derive(Clone, Debug)]
pub struct AppOptions {
    /// Where the feature cache lives (`None` = the user cache directory).
    pub cache_dir: Option<PathBuf>,
    /// A CLIP model directory that overrides the project's setting (tests, command line).
    pub model_dir: Option<PathBuf>,
    /// Start embedding as soon as a folder is open.
    pub auto_embed: bool,
    pub thumb_threads: usize,
    pub thumb_capacity: usize,
    /// Where HeGraphAdapter trains (`HEGRAPH_BACKEND=auto|cpu|candle|wgpu`, default auto: the window's GPU unless it
    /// is a software adapter).
    pub backend: crate::gpu::BackendRequest,
    /// hegraph's per-user folder (`None` = the platform's data directory, e.g. `~/.local/share/hegraph`): the
    /// projects of folders that cannot hold their own.
    pub user_dir: Option<PathBuf>,
}

impl Default for AppOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            cache_dir: None,
            model_dir: None,
            auto_embed: true,
            thumb_threads: (cores / 2).clamp(1, 4),
            thumb_capacity: 400,
            backend: std::env::var("HEGRAPH_BACKEND")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
            user_dir: None,
        }
    }
}

impl AppOptions {
    /// [`Self::user_dir`], resolved; `None` on a system without a data directory.
    pub fn user_dir(&self) -> Option<PathBuf> {
        self.user_dir
            .clone()
            .or_else(|| dirs::data_dir().map(|d| d.join("hegraph")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Label,
    Graph,
    Train,
    Map,
}

impl View {
    pub const ALL: [View; 4] = [View::Label, View::Graph, View::Train, View::Map];

    pub fn title(self) -> &'static str {
        match self {
            View::Label => "Label",
            View::Graph => "Graph",
            View::Train => "Train",
            View::Map => "Map",
        }
    }

    /// The name stored in the project file.
    pub fn id(self) -> &'static str {
        match self {
            View::Label => "label",
            View::Graph => "graph",
            View::Train => "train",
            View::Map => "map",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.id() == id)
    }

    fn shortcut(self) -> &'static str {
        match self {
            View::Label => "Ctrl+1",
            View::Graph => "Ctrl+2",
            View::Train => "Ctrl+3",
            View::Map => "Ctrl+4",
        }
    }
}

/// One finished training, for the history table.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub method: String,
    pub trained_on: usize,
    pub held_out: usize,
    pub accuracy: Option<f32>,
    pub seconds: f64,
    pub backend: String,
    pub finished: SystemTime,
    pub losses: Vec<(usize, f32)>,
    /// How the classifier's `(α, β)` were chosen ("α = …, β = … by leave-one-out …").
    pub selection: Option<String>,
    /// Unlabelled images whose predictions the transductive step refined.
    pub refined: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Info,
    Warn,
    Error,
}

struct Notice {
    text: String,
    level: Level,
    at: Instant,
}

/// What the engine holds for the open folder.
#[derive(Default)]
struct Engine {
    embedder: Option<Arc<Embedder>>,
    model: Option<ModelInfo>,
    /// Centre-crop features of every image of the session (rows aligned with it).
    centre: Option<Arc<Mat>>,
    ok: Vec<bool>,
    text: Option<Arc<Mat>>,
    text_neg: Option<Arc<Mat>>,
    /// Bumped when features or text change (derived views rebuild).
    serial: u64,
    adapter: Option<Arc<TrainedAdapter>>,
    embed_job: Option<Job<EmbedOutput>>,
    train_job: Option<Job<TrainOutput>>,
    history: Vec<RunSummary>,
    model_error: Option<String>,
    /// The model folder asked for when the embedder was made (`None` inside = the default look-up).
    model_request: Option<Option<PathBuf>>,
    /// The training backend, made by the first training (see [`jobs::compute_backend`]).
    backend: Arc<std::sync::OnceLock<crate::gpu::ComputeBackend>>,
    /// The classes and templates the running (or last) embedding job embedded prompts for; when the person
    /// edits them meanwhile, the prompts are embedded again once the job ends.
    embedded_for: (Vec<String>, Vec<String>),
}

/// Grid layout facts the keyboard needs (columns for up/down) and the scroll request.
#[derive(Default)]
struct GridUi {
    cols: usize,
    /// Ctrl+F asked for the search field.
    focus_search: bool,
    scroll_to_cursor: bool,
    rows_shown: std::ops::Range<usize>,
}

pub struct HeGraphApp {
    opts: AppOptions,
    ctx: Option<egui::Context>,
    session: Option<Session>,
    thumbs: Option<ThumbCache>,
    pub view: View,
    engine: Engine,
    graph: GraphView,
    graph_key: Option<(u64, u64, bool)>,
    graph_note: String,
    gpu: Option<GpuContext>,
    notices: Vec<Notice>,
    dialogs: dialogs::Dialogs,
    grid: GridUi,
    /// The full-size viewer over the grid, while it is open.
    viewer: Option<image_viewer::ImageViewer>,
    train_after_embed: bool,
    styled: bool,
    /// The person's choices for every project (model, recent projects).
    prefs: prefs::Prefs,
    frames: frame_stats::FrameStats,
    /// CLIP text search, "more like this" and near-duplicates ([`search`]).
    search: search::SearchState,
    /// The features file the open project is, when it is one ([`features_file`]): read-only, no images.
    features_file: Option<features_file::FeaturesSource>,
    /// The map, the cross-validation and the bulk-accept dialog ([`insights`]).
    insight: insights::Insights,
}

impl HeGraphApp {
    pub fn new(opts: AppOptions) -> Self {
        let (prefs, prefs_problem) = opts
            .user_dir()
            .map(|d| prefs::Prefs::load(&d))
            .unwrap_or_default();
        let mut notices = Vec::new();
        if let Some(e) = prefs_problem {
            notices.push(Notice {
                text: e.to_string(),
                level: Level::Warn,
                at: Instant::now(),
            });
        }
        Self {
            prefs,
            frames: frame_stats::FrameStats::from_env(),
            opts,
            ctx: None,
            session: None,
            thumbs: None,
            view: View::Label,
            engine: Engine::default(),
            graph: GraphView::default(),
            graph_key: None,
            graph_note: String::new(),
            gpu: None,
            notices,
            dialogs: dialogs::Dialogs::default(),
            grid: GridUi::default(),
            viewer: None,
            train_after_embed: false,
            styled: false,
            search: search::SearchState::default(),
            features_file: None,
            insight: insights::Insights::default(),
        }
    }

    // --- public API (the window and the tests drive the app through these) ------------------------------

    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        self.session.as_mut()
    }

    pub fn model(&self) -> Option<&ModelInfo> {
        self.engine.model.as_ref()
    }

    pub fn adapter(&self) -> Option<&TrainedAdapter> {
        self.engine.adapter.as_deref()
    }

    pub fn history(&self) -> &[RunSummary] {
        &self.engine.history
    }

    /// True while embedding or training runs (or is about to).
    pub fn is_busy(&self) -> bool {
        self.engine.embed_job.is_some()
            || self.engine.train_job.is_some()
            || self.train_after_embed
            || self.search.busy()
            || self.insight.busy()
    }

    /// Closes the dialog on top, as Esc does.
    pub fn dismiss_dialog(&mut self) {
        self.dialogs.close_top();
    }

    /// Whether a modal dialog (a question, the class picker, an editor) has the keyboard.
    pub fn modal_open(&self) -> bool {
        self.dialogs.modal_open() || self.insight.bulk.is_some()
    }

    pub fn has_features(&self) -> bool {
        self.engine.centre.is_some() && self.engine.text.is_some()
    }

    /// The last error shown to the person, if any (tests read it to explain failures).
    pub fn last_error(&self) -> Option<&str> {
        self.notices
            .iter()
            .rev()
            .find(|n| n.level == Level::Error)
            .map(|n| n.text.as_str())
    }

    /// The wgpu device the engine may use (eframe's); the status line names it.
    pub fn set_gpu(&mut self, gpu: Option<GpuContext>) {
        self.gpu = gpu;
        self.engine.backend = Arc::default();
    }

    pub fn gpu(&self) -> Option<&GpuContext> {
        self.gpu.as_ref()
    }

    /// Clears the transient messages (tests take screenshots without them).
    pub fn dismiss_notices(&mut self) {
        self.notices.clear();
    }

    /// True while thumbnails that the grid asked for are still being decoded.
    pub fn thumbnails_loading(&self) -> bool {
        self.thumbs.as_ref().is_some_and(ThumbCache::busy)
    }

    /// Number of thumbnail textures held (bounded by the cache's capacity).
    pub fn thumbnail_count(&self) -> usize {
        self.thumbs.as_ref().map_or(0, ThumbCache::len)
    }

    /// The graph view's state (tests check what is drawn).
    pub fn graph_view(&self) -> &GraphView {
        &self.graph
    }

    /// Opens an image folder (its project if it has one) or a project file.
    pub fn open_path(&mut self, path: &Path) -> Result<(), AppError> {
        if features_file::is_features_file(path) {
            return self.open_features_file(path);
        }
        if path.is_file() {
            return self.open_project_file(path);
        }
        if !path.is_dir() {
            return Err(AppError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let folder = sidecars(path).images;
        let pp = default_project_path(&folder);
        if pp.exists() {
            return self.open_project_file(&pp);
        }
        if let Some(fallback) = self.fallback_project_path(&folder) {
            if fallback.exists() {
                return self.open_project_file(&fallback);
            }
        }
        self.new_project_from_folder(&folder)
    }

    /// Starts a project for a folder: classes from sub-folders, or `classes.txt` (plus `labels.csv` when
    /// present) in the folder; without either, asks for class names.
    fn new_project_from_folder(&mut self, folder: &Path) -> Result<(), AppError> {
        let side = sidecars(folder);
        let opts = data::OpenOptions {
            classes_file: side.classes.as_deref(),
            labels_csv: side.labels.as_deref(),
            ..Default::default()
        };
        match data::open_folder(folder, &opts) {
            Ok(ds) => {
                let mut project = Project::new(ds.root.clone(), ds.classes.clone());
                for img in &ds.images {
                    if let Some(l) = img.label {
                        project.set_label(
                            &img.rel,
                            Some((ds.classes[l].clone(), LabelOrigin::Imported)),
                        );
                    }
                }
                self.report_problems(&ds.problems);
                let images = ds
                    .images
                    .iter()
                    .map(|e| ImageItem {
                        rel: e.rel.clone(),
                        path: e.path.clone(),
                    })
                    .collect();
                let path = default_project_path(&ds.root);
                self.install(project, Some(path), images);
                // Asked now, before the first label: a label is only accepted once it is saved.
                match self.session.as_ref().map(Session::save) {
                    Some(Err(e)) => self.cannot_save(e),
                    _ => self.remember_project(),
                }
                Ok(())
            }
            Err(DataError::NoClassFolders { .. }) => {
                let count = data::open_folder(
                    folder,
                    &data::OpenOptions {
                        classes: Some(vec!["unnamed".into()]),
                        ..Default::default()
                    },
                )
                .map(|d| d.images.len())
                .unwrap_or(0);
                self.dialogs.new_project = Some(dialogs::NewProject::new(folder, count));
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a project for `folder` with the given classes (and templates, when not empty) and opens it.
    pub fn create_project(
        &mut self,
        folder: &Path,
        classes: Vec<String>,
        templates: Vec<String>,
    ) -> Result<(), AppError> {
        let ds = data::open_folder(
            folder,
            &data::OpenOptions {
                classes: Some(classes),
                ..Default::default()
            },
        )?;
        let mut project = Project::new(ds.root.clone(), ds.classes.clone());
        if !templates.is_empty() {
            project.templates = templates;
        }
        for img in &ds.images {
            if let Some(l) = img.label {
                project.set_label(
                    &img.rel,
                    Some((ds.classes[l].clone(), LabelOrigin::Imported)),
                );
            }
        }
        self.report_problems(&ds.problems);
        let images = ds
            .images
            .iter()
            .map(|e| ImageItem {
                rel: e.rel.clone(),
                path: e.path.clone(),
            })
            .collect();
        let path = default_project_path(&ds.root);
        self.install(project, Some(path), images);
        if let Some(s) = &self.session {
            s.save()?;
        }
        self.remember_project();
        Ok(())
    }

    fn open_project_file(&mut self, path: &Path) -> Result<(), AppError> {
        let loaded = match Project::load(path) {
            Ok(l) => l,
            Err(e @ (ProjectError::Corrupt { .. } | ProjectError::TooNew { .. })) => {
                let corrupt = matches!(e, ProjectError::Corrupt { .. });
                self.dialogs.error = Some(dialogs::ErrorDialog {
                    title: "This project cannot be opened".into(),
                    message: e.to_string(),
                    set_aside: corrupt.then(|| path.to_path_buf()),
                });
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(v) = loaded.migrated_from {
            self.notify(
                Level::Info,
                format!("upgraded a version-{v} project; the original is kept as a .bak file when saved"),
            );
        }
        for w in &loaded.warnings {
            self.notify(Level::Warn, w.clone());
        }
        let project = loaded.project;
        let classes = if project.classes.is_empty() {
            None
        } else {
            Some(project.classes.clone())
        };
        let ds = data::open_folder(
            &project.folder,
            &data::OpenOptions {
                classes,
                ..Default::default()
            },
        )?;
        self.report_problems(&ds.problems);
        let images: Vec<ImageItem> = ds
            .images
            .iter()
            .map(|e| ImageItem {
                rel: e.rel.clone(),
                path: e.path.clone(),
            })
            .collect();
        let present: std::collections::HashSet<&str> =
            images.iter().map(|i| i.rel.as_str()).collect();
        let missing = project
            .labels
            .keys()
            .filter(|k| !present.contains(k.as_str()))
            .count();
        if missing > 0 {
            self.notify(
                Level::Warn,
                format!("{missing} labelled image(s) are no longer in the folder; their labels are kept"),
            );
        }
        let adapter_path = project.adapter_path.clone();
        let mut project = project;
        project.folder = ds.root.clone();
        self.install(project, Some(path.to_path_buf()), images);
        if let Some(p) = adapter_path {
            let p = if p.is_relative() {
                path.parent().map_or(p.clone(), |d| d.join(&p))
            } else {
                p
            };
            match TrainedAdapter::load(&p) {
                Ok(a)
                    if self
                        .session
                        .as_ref()
                        .is_some_and(|s| s.classes() == a.classes.as_slice()) =>
                {
                    self.engine.adapter = Some(Arc::new(a));
                }
                Ok(_) => self.notify(
                    Level::Info,
                    "the saved adapter was trained for other classes; train again".to_string(),
                ),
                Err(e) => self.notify(
                    Level::Warn,
                    format!("the saved adapter could not be loaded: {e}"),
                ),
            }
        }
        Ok(())
    }

    /// Where the CLIP weights come from for `project`: the command line, then the project's own model folder,
    /// then the person's choice for every project. `None` when nothing was chosen and the default look-up
    /// finds no model on disk: the person is asked (download, a folder, or the test checkpoint).
    pub fn model_source(&self, project: &Project) -> Option<ModelSource> {
        if let Some(d) = self
            .opts
            .model_dir
            .clone()
            .or_else(|| project.settings.model_dir.clone())
        {
            return Some(ModelSource::folder(d));
        }
        let default_look_up = ModelSource::look_up;
        match &self.prefs.model {
            ModelChoice::Download => Some(default_look_up(true)),
            ModelChoice::Folder { path } => Some(ModelSource::folder(path.clone())),
            ModelChoice::TestCheckpoint => Some(ModelSource {
                dir: Some(self.test_checkpoint_dir()?),
                allow_download: false,
                test_checkpoint: true,
            }),
            ModelChoice::Unset if project.settings.allow_download => Some(default_look_up(true)),
            ModelChoice::Unset => crate::clip::resolve_model_dir(None, false)
                .ok()
                .map(|_| default_look_up(false)),
        }
    }

    /// The GUI's test checkpoint, in hegraph's user folder.
    fn test_checkpoint_dir(&self) -> Option<PathBuf> {
        Some(crate::clip::test_checkpoint::app_test_checkpoint_dir(
            &self.opts.user_dir()?,
        ))
    }

    /// The person's choices for every project.
    pub fn prefs(&self) -> &prefs::Prefs {
        &self.prefs
    }

    /// Records the model choice for every project and loads that model.
    pub(super) fn choose_model(&mut self, choice: ModelChoice) {
        self.prefs.model = choice;
        self.save_prefs();
        self.engine.embedder = None;
        self.engine.model = None;
        self.engine.model_request = None;
        self.start_embedding();
    }

    /// Records where images are embedded, for every project, and embeds again through the new encoder (the
    /// feature cache still answers for images already embedded).
    pub(super) fn choose_clip_device(&mut self, device: crate::clip::ClipDevice) {
        if self.prefs.clip_device == device {
            return;
        }
        self.prefs.clip_device = device;
        self.save_prefs();
        self.engine.embedder = None;
        self.engine.model = None;
        self.engine.model_request = None;
        self.start_embedding();
    }

    /// Puts the open project first among the recent ones (once its file exists: a project that could not be
    /// saved is remembered when it finds a place).
    pub(super) fn remember_project(&mut self) {
        let Some(path) = self.session.as_ref().and_then(|s| s.project_path.clone()) else {
            return;
        };
        if path.is_file() && self.prefs.recent.first() != Some(&path) {
            self.prefs.remember(&path);
            self.save_prefs();
        }
    }

    fn save_prefs(&mut self) {
        let Some(dir) = self.opts.user_dir() else {
            return;
        };
        if let Err(e) = self.prefs.save(&dir) {
            self.notify(Level::Warn, e.to_string());
        }
    }

    /// Where this folder's project goes when the folder cannot hold it (see
    /// [`crate::project::fallback_project_path`]).
    pub fn fallback_project_path(&self, folder: &Path) -> Option<PathBuf> {
        let user = self.opts.user_dir()?;
        Some(crate::project::fallback_project_path(&user, folder))
    }

    /// The project cannot be saved where it is: the labelling action was not taken; ask where to save instead.
    fn cannot_save(&mut self, error: ProjectError) {
        let fallback = self
            .session
            .as_ref()
            .and_then(|s| self.fallback_project_path(&s.project.folder))
            .filter(|f| self.session.as_ref().and_then(|s| s.project_path.as_ref()) != Some(f));
        self.dialogs.cannot_save = Some(dialogs::CannotSave {
            error: error.to_string(),
            fallback,
        });
    }

    /// Makes a project the open one and starts what follows (thumbnails, embedding).
    fn install(&mut self, project: Project, path: Option<PathBuf>, images: Vec<ImageItem>) {
        if let Some(job) = &self.engine.embed_job {
            job.cancel();
        }
        if let Some(job) = &self.engine.train_job {
            job.cancel();
        }
        // The loaded model is kept when the new project asks for the same one (loading CLIP takes seconds).
        let wanted = self.model_source(&project).and_then(|m| m.dir);
        let same_model = self.engine.model_request.as_ref() == Some(&wanted);
        let keep_embedder = self.engine.embedder.take().filter(|_| same_model);
        let keep_model = self.engine.model.take().filter(|_| same_model);
        let keep_request = self.engine.model_request.take().filter(|_| same_model);
        let keep_backend = Arc::clone(&self.engine.backend);
        self.engine = Engine {
            embedder: keep_embedder,
            model: keep_model,
            model_request: keep_request,
            backend: keep_backend,
            ..Engine::default()
        };
        self.train_after_embed = false;
        self.graph = GraphView::default();
        self.graph_key = None;
        self.insight = insights::Insights::default();
        self.thumbs = None;
        self.grid = GridUi::default();
        self.search.reset_for_new_project();
        self.features_file = None;
        let mut session = Session::new(project, path, images);
        // The project reopens with the sort and the view it was left with.
        let st = &session.project.settings;
        let sort = SortKey::from_id(&st.sort);
        self.view = View::from_id(&st.view).unwrap_or(View::Label);
        if sort != SortKey::default() {
            let f = GridFilter {
                sort,
                ..Default::default()
            };
            session.set_filter(f);
        }
        self.session = Some(session);
        self.remember_project();
        if self.opts.auto_embed {
            self.start_embedding();
        }
    }

    fn report_problems(&mut self, problems: &[data::Problem]) {
        // Other files next to the images (notes, CSVs) are normal in a photo folder: not worth a warning.
        let problems: Vec<&data::Problem> = problems
            .iter()
            .filter(|p| !p.message.contains("not an image file"))
            .collect();
        match problems.len() {
            0 => {}
            1..=3 => {
                for p in problems {
                    self.notify(Level::Warn, p.to_string());
                }
            }
            n => self.notify(
                Level::Warn,
                format!("{n} files were skipped, e.g. {}", problems[0]),
            ),
        }
    }

    /// Embeds the images (when their features are missing) and the class prompts in the background.
    pub fn start_embedding(&mut self) {
        let Some(s) = &self.session else { return };
        if self.features_file.is_some() {
            // A features file is embedded already, by someone else's CLIP.
            return;
        }
        if self.engine.embed_job.is_some() {
            return;
        }
        let images_needed = self.engine.centre.is_none();
        let model = match self.model_source(&s.project) {
            Some(m) => m,
            None if self.engine.embedder.is_none() => {
                // A first run without weights: ask once, for every project.
                self.dialogs.model_choice = Some(dialogs::ModelChooser::default());
                return;
            }
            None => ModelSource::look_up(false),
        };
        let req = EmbedRequest {
            model,
            cache_dir: self.opts.cache_dir.clone(),
            clip_device: self.prefs.clip_device,
            embedder: self.engine.embedder.clone(),
            paths: images_needed.then(|| s.images.iter().map(|i| i.path.clone()).collect()),
            classes: s.project.classes.clone(),
            templates: s.project.templates.clone(),
        };
        self.engine.embedded_for = (req.classes.clone(), req.templates.clone());
        if self.engine.embedder.is_none() {
            self.engine.model_request = Some(req.model.dir.clone());
        }
        self.engine.model_error = None;
        self.engine.embed_job = Some(Job::spawn("embed", self.ctx.clone(), move |p, c, _| {
            jobs::run_embed(req, p, c)
        }));
    }

    /// Trains the chosen method on the current labels in the background (after embedding, if that still
    /// runs). Returns why it cannot when it cannot.
    pub fn start_training(&mut self) -> Result<(), String> {
        let Some(s) = &self.session else {
            return Err("open a folder first".into());
        };
        if self.engine.train_job.is_some() {
            return Err("training is already running".into());
        }
        if s.labelled_count() == 0 {
            return Err("label at least one image first (keys 1–9)".into());
        }
        if self.engine.embed_job.is_some() {
            self.train_after_embed = true;
            return Ok(());
        }
        // A features file has no images to embed (no embedder: no augmented views) and may lack negative
        // prompts (the graph then has no negative nodes).
        let from_file = self.features_file.is_some();
        let ready = match (
            self.engine.embedder.clone(),
            self.engine.centre.clone(),
            self.engine.text.clone(),
            self.engine.text_neg.clone(),
        ) {
            (Some(e), Some(c), Some(t), Some(n)) => Some((Some(e), c, t, Some(n))),
            (None, Some(c), Some(t), n) if from_file => Some((None, c, t, n)),
            _ => None,
        };
        if from_file && ready.is_none() {
            return Err(
                "this features file has no text features (text.features): the methods here need one text \
                 node per class"
                    .into(),
            );
        }
        let Some((embedder, centre, text, text_neg)) = ready else {
            if let Some(why) = self.engine.model_error.clone() {
                return Err(format!("cannot train: {why}"));
            }
            // The embedding was cancelled (or never started): resume it; the cache has what was done.
            self.start_embedding();
            self.train_after_embed = true;
            self.notify(
                Level::Info,
                "resuming the embedding (what was done is cached); training follows".into(),
            );
            return Ok(());
        };
        let settings = &s.project.settings;
        let (train_idx, held_idx) = s.split_labelled(settings.held_out_percent);
        let ok = |i: &usize| self.engine.ok.get(*i).copied().unwrap_or(true);
        let train: Vec<(usize, PathBuf, usize)> = train_idx
            .iter()
            .filter(|i| ok(i))
            .filter_map(|&i| s.label(i).map(|l| (i, s.images[i].path.clone(), l)))
            .collect();
        let held_out: Vec<(usize, usize)> = held_idx
            .iter()
            .filter(|i| ok(i))
            .filter_map(|&i| s.label(i).map(|l| (i, l)))
            .collect();
        let save_to = s
            .project_path
            .as_ref()
            .and_then(|p| p.parent())
            .map(|d| d.join("adapter.safetensors"));
        let req = TrainRequest {
            embedder,
            method: settings.method,
            params: settings.train.clone(),
            classes: s.project.classes.clone(),
            text,
            text_neg,
            centre,
            train,
            held_out,
            transductive: settings.transductive,
            save_to,
            backend: Arc::clone(&self.engine.backend),
            backend_request: self.opts.backend,
            gpu: self.gpu.clone(),
        };
        if let Some(s) = self.session.as_mut() {
            s.mark_trained();
        }
        self.engine.train_job = Some(Job::spawn("train", self.ctx.clone(), move |p, c, l| {
            jobs::run_train(req, p, c, l)
        }));
        self.notify(Level::Info, "training started (Cancel stops it)".into());
        Ok(())
    }

    pub fn cancel_jobs(&mut self) {
        if let Some(j) = &self.engine.embed_job {
            j.cancel();
        }
        if let Some(j) = &self.engine.train_job {
            j.cancel();
        }
        self.train_after_embed = false;
    }

    /// Takes in what the background jobs finished. Called every frame by [`Self::show`]; tests may call it
    /// directly.
    pub fn poll_jobs(&mut self) {
        if let Some(job) = self.engine.embed_job.as_mut() {
            let polled = job.poll();
            let messages: Vec<String> = job.messages.drain(..).collect();
            let cancelled = job.is_cancelled();
            for m in messages {
                self.notify(Level::Warn, m);
            }
            if let Polled::Finished(result) = polled {
                self.engine.embed_job = None;
                match result {
                    Ok(out) => self.embedding_done(out),
                    Err(e) if cancelled => {
                        self.notify(Level::Info, format!("embedding stopped ({e})"))
                    }
                    Err(e) => {
                        self.engine.model_error = Some(e.clone());
                        self.train_after_embed = false;
                        self.notify(Level::Error, e);
                    }
                }
            }
        }
        if let Some(job) = self.engine.train_job.as_mut() {
            let polled = job.poll();
            let messages: Vec<String> = job.messages.drain(..).collect();
            let cancelled = job.is_cancelled();
            let losses = if matches!(polled, Polled::Finished(_)) {
                job.losses.clone()
            } else {
                Vec::new()
            };
            for m in messages {
                self.notify(Level::Info, m);
            }
            if let Polled::Finished(result) = polled {
                self.engine.train_job = None;
                match result {
                    Ok(out) => self.training_done(out, losses),
                    Err(e) if cancelled => {
                        self.notify(Level::Info, format!("training stopped ({e})"))
                    }
                    Err(e) => self.notify(Level::Error, format!("training failed: {e}")),
                }
            }
        }
        if self.train_after_embed && self.engine.embed_job.is_none() {
            self.train_after_embed = false;
            if let Err(e) = self.start_training() {
                self.notify(Level::Warn, e);
            }
        }
        self.poll_search();
    }

    fn embedding_done(&mut self, out: EmbedOutput) {
        let EmbedOutput {
            embedder,
            info,
            centre,
            ok,
            text,
            text_neg,
            zero_shot,
            stats,
        } = out;
        if let Some(c) = centre {
            let n = c.rows;
            self.engine.centre = Some(c);
            self.engine.ok = ok;
            let computed = stats.features_computed;
            let text = if computed == 0 {
                format!("all {n} images were in the cache")
            } else {
                let rate = if stats.seconds > 0.0 {
                    computed as f64 / stats.seconds
                } else {
                    0.0
                };
                format!(
                    "embedded {computed} images in {} ({rate:.1} images/s); {} from the cache",
                    style::short_duration(stats.seconds),
                    stats.features_from_cache
                )
            };
            self.notify(Level::Info, text);
            let bad = self.engine.ok.iter().filter(|o| !**o).count();
            if bad > 0 {
                self.notify(
                    Level::Warn,
                    format!("{bad} image(s) could not be read and are left out"),
                );
            }
        }
        let current = self
            .session
            .as_ref()
            .map(|s| (s.project.classes.clone(), s.project.templates.clone()));
        if current.as_ref() != Some(&self.engine.embedded_for) {
            // The classes or templates changed while this job ran: its prompts are stale.
            self.engine.embedder = Some(embedder);
            self.engine.model = Some(info);
            self.engine.serial += 1;
            self.start_embedding();
            return;
        }
        self.engine.text = Some(text);
        self.engine.text_neg = Some(text_neg);
        self.engine.embedder = Some(embedder);
        self.engine.model = Some(info);
        self.engine.serial += 1;
        // Predictions: the saved adapter's when it fits, else zero-shot CLIP.
        let from_adapter = match (&self.engine.adapter, &self.engine.centre, &self.session) {
            (Some(a), Some(c), Some(s)) => {
                let (rows, _) = s.split_labelled(s.project.settings.held_out_percent);
                let labels: Vec<usize> = rows.iter().filter_map(|&i| s.label(i)).collect();
                jobs::predict_all(a, c, &rows, &labels, s.project.settings.transductive)
                    .ok()
                    .map(|(p, _)| p)
            }
            (Some(a), Some(c), None) => a.predict(c).ok(),
            _ => None,
        };
        let probs =
            from_adapter.or_else(|| {
                let c = self.engine.centre.as_ref()?;
                let t = self.engine.text.as_ref()?;
                Some(zero_shot.unwrap_or_else(|| {
                    jobs::zero_shot_probs(c, t, TrainParams::default().logit_scale)
                }))
            });
        if let Some(s) = self.session.as_mut() {
            s.set_predictions(probs);
        }
    }

    fn training_done(&mut self, out: TrainOutput, losses: Vec<(usize, f32)>) {
        if self
            .session
            .as_ref()
            .is_none_or(|s| s.classes() != out.adapter.classes.as_slice())
        {
            self.notify(
                Level::Warn,
                "the classes changed while training ran; its result was dropped: train again (T)"
                    .into(),
            );
            return;
        }
        let title = out.adapter.title();
        let summary = RunSummary {
            method: title.clone(),
            trained_on: out.trained_on,
            held_out: out.held_out,
            accuracy: out.held_out_accuracy,
            seconds: out.seconds,
            backend: out.backend.clone(),
            finished: SystemTime::now(),
            losses: if losses.is_empty() {
                out.adapter.losses.clone()
            } else {
                losses
            },
            selection: out.adapter.selection.as_ref().map(|s| s.to_string()),
            refined: out.refined,
        };
        for n in &out.adapter.notes {
            self.notify(Level::Info, n.clone());
        }
        let mut msg = format!(
            "{title} trained on {} images in {}",
            out.trained_on,
            style::short_duration(out.seconds)
        );
        if let Some(a) = out.held_out_accuracy {
            msg.push_str(&format!(
                "; held-out accuracy {:.1} % ({} images)",
                a * 100.0,
                out.held_out
            ));
        }
        if let Some(sel) = &summary.selection {
            msg.push_str(&format!("; {sel}"));
        }
        if out.refined > 0 {
            msg.push_str(&format!(
                "; {} predictions refined with the unlabelled images",
                out.refined
            ));
        }
        self.notify(Level::Info, msg);
        self.insight.record_after_training();
        self.engine.history.push(summary);
        self.engine.adapter = Some(out.adapter);
        self.engine.serial += 1;
        if let Some(s) = self.session.as_mut() {
            s.set_predictions(Some(out.probs));
            let finished_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            s.project.last_training = Some(TrainingRecord {
                finished_unix,
                method: title,
                labelled: out.trained_on + out.held_out,
                held_out_accuracy: out.held_out_accuracy,
                held_out: out.held_out,
                seconds: out.seconds,
            });
            if let Some(p) = out.saved_to {
                s.project.adapter_path = Some(p);
            }
            if let Err(e) = s.save() {
                let text = e.to_string();
                self.notify(Level::Error, text);
            }
        }
    }

    fn notify(&mut self, level: Level, text: String) {
        self.notices.push(Notice {
            text,
            level,
            at: Instant::now(),
        });
        if self.notices.len() > 200 {
            self.notices.drain(..100);
        }
    }

    /// Labels the cursor/selection with `class` (`None` clears) and does what follows a label: save, advance,
    /// maybe retrain. Several images of which some carry another label are only relabelled once the person
    /// confirms it; one labelled image (which the person moved to) is relabelled at once, and the toast says
    /// what it was.
    pub fn label_with(&mut self, class: Option<usize>) {
        let Some(s) = self.session.as_ref() else {
            return;
        };
        let targets = s.targets();
        let overwrites = s.overwrites(&targets, class);
        if targets.len() > 1 && overwrites > 0 {
            self.dialogs.relabel = Some(dialogs::ConfirmRelabel {
                targets,
                class,
                overwrites,
            });
            return;
        }
        let replaced = match (targets.as_slice(), overwrites) {
            ([i], 1) => {
                let name = |c: Option<usize>| {
                    c.and_then(|c| s.classes().get(c).cloned())
                        .unwrap_or_else(|| "no label".into())
                };
                Some(format!(
                    "{}: {} → {} (Ctrl+Z undoes)",
                    s.images[*i].rel,
                    name(s.label(*i)),
                    name(class)
                ))
            }
            _ => None,
        };
        self.apply_labels(&targets, class);
        if let Some(text) = replaced {
            self.notify(Level::Info, text);
        }
    }

    /// Labels `targets` (already confirmed) and does what follows a label.
    pub(super) fn apply_labels(&mut self, targets: &[usize], class: Option<usize>) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let advance = s.project.settings.auto_advance;
        let out = s.label_images(targets, class, advance);
        let auto = s.project.settings.auto_train_every as usize;
        let due = auto > 0 && s.labels_changed_since_training() >= auto;
        if let Err(e) = out.saved {
            self.cannot_save(e);
        }
        if out.changed > 0 {
            self.grid.scroll_to_cursor = true;
        }
        if due && self.engine.train_job.is_none() {
            if let Err(e) = self.start_training() {
                self.notify(Level::Warn, e);
            }
        }
    }

    pub fn undo(&mut self) {
        if let Some(out) = self.session.as_mut().and_then(Session::undo) {
            if let Err(e) = out.saved {
                self.cannot_save(e);
            }
            self.grid.scroll_to_cursor = true;
        }
    }

    pub fn redo(&mut self) {
        if let Some(out) = self.session.as_mut().and_then(Session::redo) {
            if let Err(e) = out.saved {
                self.cannot_save(e);
            }
            self.grid.scroll_to_cursor = true;
        }
    }

    pub fn label_next(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.go_to_next_to_label().is_none() {
            self.notify(Level::Info, "every image is labelled".into());
        }
        self.grid.scroll_to_cursor = true;
    }

    /// The class list or templates changed: labels are re-derived and the prompts embedded again.
    fn classes_changed(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.classes_changed();
            if let Err(e) = s.save() {
                let text = e.to_string();
                self.notify(Level::Error, text);
            }
        }
        let fits = self.engine.adapter.as_ref().is_some_and(|a| {
            self.session
                .as_ref()
                .is_some_and(|s| s.classes() == a.classes.as_slice())
        });
        if !fits {
            self.engine.adapter = None;
        }
        self.engine.text = None;
        self.engine.text_neg = None;
        self.engine.serial += 1;
        self.graph_key = None;
        self.start_embedding();
    }

    // --- drawing ---------------------------------------------------------------------------------------

    /// Draws the whole application into `ui` (the window's root or a test harness).
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let ctx = ui.ctx().clone();
        if !self.styled {
            // Fonts installed now take effect next frame: draw nothing until then.
            style::apply(&ctx);
            self.styled = true;
            ctx.request_repaint();
            return;
        }
        if self.ctx.is_none() {
            self.ctx = Some(ctx.clone());
        }
        let started = Instant::now();
        self.frames.frame_started(started);
        self.poll_jobs();
        self.poll_insights();
        if self.thumbs.is_none() {
            if let Some(s) = &self.session {
                let paths = s.images.iter().map(|i| i.path.clone()).collect();
                self.thumbs = Some(ThumbCache::new(
                    &ctx,
                    paths,
                    self.opts.thumb_threads,
                    self.opts.thumb_capacity,
                ));
            }
        }
        if let Some(t) = self.thumbs.as_mut() {
            t.begin_frame(&ctx, 24);
        }
        self.handle_dropped_files(&ctx);
        self.handle_keys(&ctx);

        self.top_bar(ui);
        self.status_bar(ui);
        match self.view {
            View::Label => self.label_view(ui),
            View::Graph => self.graph_page(ui),
            View::Train => self.train_view(ui),
            View::Map => self.map_view(ui),
        }
        if self.view == View::Label {
            self.duplicates_window(&ctx);
        }
        self.image_viewer(&ctx);
        self.show_dialogs(&ctx);
        self.bulk_accept_dialog(&ctx);
        chrome::drop_overlay(&ctx);
        self.show_notices(&ctx);
        if self.is_busy() {
            // Workers wake the UI with news; this keeps the ETA ticking between news.
            ctx.request_repaint_after(Duration::from_millis(250));
        }
        // Kept in the project (saved with the next label, or at exit).
        if let Some(s) = self.session.as_mut() {
            let (sort, view) = (s.filter().sort.id(), self.view.id());
            let st = &mut s.project.settings;
            if st.sort != sort || st.view != view {
                st.sort = sort.to_string();
                st.view = view.to_string();
            }
        }
        self.frames.record(started.elapsed());
        if self.frames.shown {
            let lines = self.frames.report();
            egui::Area::new(egui::Id::unique("hegraph-frame-stats"))
                .anchor(egui::Align2::RIGHT_TOP, egui::vec2(-10.0, 44.0))
                .interactable(false)
                .show(&ctx, |ui| {
                    ui.style_mut().wrap_mode = Some(egui::TextWrapMode::Extend);
                    for line in lines {
                        ui.label(RichText::new(line).monospace().size(11.0));
                    }
                });
            // Redraw at once, so the next frame's start measures this whole frame.
            ctx.request_repaint();
        }
    }

    /// The UI's own time per frame (what F12 shows).
    pub fn frame_stats(&mut self) -> &mut frame_stats::FrameStats {
        &mut self.frames
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        if let Some(p) = dropped.first() {
            let target = if p.is_file() && p.extension().is_none_or(|e| e != "json") {
                p.parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| p.clone())
            } else {
                p.clone()
            };
            if let Err(e) = self.open_path(&target) {
                self.notify(Level::Error, e.to_string());
            }
        }
    }

    /// Applies the frame's key presses in the order they were typed ([`shortcuts`]). Keys that are no
    /// shortcut stay for the widgets; once an action opens a dialog, the keys after it are the dialog's.
    fn handle_keys(&mut self, ctx: &egui::Context) {
        if std::mem::take(&mut self.dialogs.drop_input) {
            // Typed at the window while a native file dialog had the person's attention.
            ctx.input_mut(|i| i.events.retain(|e| !shortcuts::is_user_input(e)));
            return;
        }
        if self.modal_open() {
            if ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape))
                && self.insight.bulk.take().is_none()
            {
                self.dialogs.close_top();
            }
            return;
        }
        if self.viewer.is_some() && self.viewer_keys(ctx) {
            return;
        }
        let text_focus = ctx.egui_wants_keyboard_input();
        let events = ctx.input_mut(|i| std::mem::take(&mut i.events));
        let mut keep = Vec::with_capacity(events.len());
        let mut events = events.into_iter();
        while let Some(e) = events.next() {
            let cx = shortcuts::KeyContext {
                text_focus,
                view: self.view,
                cols: self.grid.cols,
                classes: self.session.as_ref().map_or(0, |s| s.classes().len()),
            };
            match shortcuts::action_of(&e, &cx) {
                Some(a) => {
                    self.perform(a);
                    if self.modal_open() || self.dialogs.drop_input {
                        keep.extend(events.by_ref());
                    }
                }
                None => keep.push(e),
            }
        }
        ctx.input_mut(|i| {
            keep.append(&mut i.events);
            i.events = keep;
        });
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::OpenFolder => self.pick_folder(),
            Action::Save => {
                if let Some(Err(e)) = self.session.as_ref().map(Session::save) {
                    self.notify(Level::Error, e.to_string());
                } else if self.session.is_some() {
                    self.notify(Level::Info, "saved".into());
                }
            }
            Action::Show(v) => self.view = v,
            Action::ToggleHelp => self.dialogs.help = !self.dialogs.help,
            Action::ToggleFrameStats => self.frames.shown = !self.frames.shown,
            Action::Undo => self.undo(),
            Action::Redo => self.redo(),
            Action::SelectAll => {
                if let Some(s) = self.session.as_mut() {
                    s.select_all_visible();
                }
            }
            Action::Escape => {
                if self.dialogs.help {
                    self.dialogs.help = false;
                } else if self.dialogs.settings {
                    self.dialogs.settings = false;
                    self.dialogs.model_dir_text = None;
                } else if self.dialogs.export.open {
                    self.dialogs.export.open = false;
                } else if self.search.duplicates.open {
                    self.search.duplicates.open = false;
                } else if let Some(s) = self.session.as_mut() {
                    s.clear_selection();
                }
            }
            Action::Quit => {
                if let Some(ctx) = &self.ctx {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
            Action::FocusSearch => {
                self.view = View::Label;
                self.search.mode = search::SearchMode::FileName;
                self.grid.focus_search = true;
            }
            Action::FocusClipSearch => {
                self.view = View::Label;
                self.search.mode = search::SearchMode::ClipText;
                self.grid.focus_search = true;
            }
            Action::MoreLikeThis => self.more_like_this(),
            Action::NearDuplicates => self.open_duplicates(),
            Action::CycleShow => {
                if let Some(s) = self.session.as_mut() {
                    let mut f = s.filter().clone();
                    f.show = match f.show {
                        Show::All => Show::Unlabelled,
                        Show::Unlabelled => Show::Labelled,
                        Show::Labelled => Show::Review,
                        Show::Review => Show::All,
                    };
                    s.set_filter(f);
                }
            }
            Action::CycleSort => {
                if let Some(s) = self.session.as_mut() {
                    let mut f = s.filter().clone();
                    let i = SortKey::ALL.iter().position(|&k| k == f.sort).unwrap_or(0);
                    f.sort = SortKey::ALL[(i + 1) % SortKey::ALL.len()];
                    s.set_filter(f);
                }
            }
            Action::Train => {
                if let Err(e) = self.start_training() {
                    self.notify(Level::Warn, e);
                }
            }
            Action::Label(class) => self.label_with(class),
            Action::LabelNext => self.label_next(),
            Action::AcceptPredictions => self.open_bulk_accept(),
            Action::ToggleMapLayout => self.toggle_map_layout(),
            Action::OpenViewer => self.open_viewer(),
            Action::ClassPicker => {
                if self.session.is_some() {
                    self.dialogs.picker = Some(dialogs::ClassPicker::default());
                }
            }
            Action::Move(d) => {
                if let Some(s) = self.session.as_mut() {
                    s.move_cursor(d);
                    self.grid.scroll_to_cursor = true;
                }
            }
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// The window.

/// The wgpu device eframe renders with, wrapped for the compute engine. This is the one place where the UI's
/// device is handed to the engine.
pub fn compute_gpu(rs: &eframe::egui_wgpu::RenderState) -> GpuContext {
    GpuContext::from_device(rs.device.clone(), rs.queue.clone(), rs.adapter.get_info())
}

/// eframe's wgpu set-up, asking for the adapter's own limits (not wgpu's conservative defaults) so that the
/// compute engine can bind large feature matrices on the UI's device.
pub fn wgpu_configuration() -> eframe::egui_wgpu::WgpuConfiguration {
    use eframe::egui_wgpu::{WgpuConfiguration, WgpuSetup, WgpuSetupCreateNew};
    let mut setup = WgpuSetupCreateNew::without_display_handle();
    setup.device_descriptor = Arc::new(|adapter: &eframe::wgpu::Adapter| {
        let mut limits = adapter.limits();
        limits.max_texture_dimension_2d = limits
            .max_texture_dimension_2d
            .max(8192)
            .min(adapter.limits().max_texture_dimension_2d);
        eframe::wgpu::DeviceDescriptor {
            label: Some("hegraph (UI and compute)"),
            required_limits: limits,
            ..Default::default()
        }
    });
    WgpuConfiguration {
        wgpu_setup: WgpuSetup::CreateNew(setup),
        ..Default::default()
    }
}

/// Opens the window; `start` is a folder or project file to open at once.
pub fn run_gui(start: Option<PathBuf>) -> Result<(), AppError> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("hegraph")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([960.0, 600.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        wgpu_options: wgpu_configuration(),
        ..Default::default()
    };
    eframe::run_native(
        "hegraph",
        options,
        Box::new(move |cc| {
            let mut app = HeGraphApp::new(AppOptions::default());
            style::apply(&cc.egui_ctx);
            style::panels_from_the_clear_color(&cc.egui_ctx);
            app.styled = true;
            app.ctx = Some(cc.egui_ctx.clone());
            app.set_gpu(cc.wgpu_render_state.as_ref().map(compute_gpu));
            if let Some(p) = start {
                if let Err(e) = app.open_path(&p) {
                    app.notify(Level::Error, e.to_string());
                }
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| AppError::Window(e.to_string()))
}

impl eframe::App for HeGraphApp {
    fn clear_color(&self, _visuals: &egui::Visuals) -> [f32; 4] {
        style::window_clear_color()
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn on_exit(&mut self) {
        self.cancel_jobs();
        if self.frames.shown {
            for line in self.frames.report() {
                eprintln!("hegraph: {line}");
            }
        }
        if let Some(Err(e)) = self.session.as_ref().map(Session::save) {
            eprintln!("hegraph: the project could not be saved on exit: {e}");
        }
    }
}
