//! Background work of the GUI: embedding a folder and training an adapter, each on its own thread (the egui
//! demo's pattern: `std::thread` + a channel, the worker calls `request_repaint` when it has news), so the UI
//! keeps its frame rate and can cancel.
//!
//! Every call into the engine the GUI makes lives in this file ([`run_embed`], [`run_train`]), so a change of
//! the engine's signatures touches one place.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::adapter::{
    self, CandleFactory, Method, TrainEvent, TrainInput, TrainParams, TrainedAdapter,
};
use crate::clip::{ClipModel, ModelInfo};
use crate::extract::{EmbedOptions, EmbedStats, Embedder};
use crate::features::LabelledSplit;
use crate::gpu::{BackendRequest, ComputeBackend, GpuContext, GpuHeGraphFactory};
use crate::linalg::{softmax, Mat};
use crate::progress::{CancelToken, Progress};

/// A message from a worker.
pub enum JobMsg<T> {
    /// A stage and, when it said so, the unit of its counts.
    Stage(String, Option<String>),
    Progress {
        done: usize,
        total: usize,
    },
    Message(String),
    Loss {
        step: usize,
        total: usize,
        loss: f32,
    },
    Done(Result<T, String>),
}

/// [`Progress`] that forwards to the UI thread and wakes it up.
struct ChannelProgress<T> {
    tx: Mutex<Sender<JobMsg<T>>>,
    ctx: Option<egui::Context>,
}

impl<T: Send> ChannelProgress<T> {
    fn send(&self, msg: JobMsg<T>) {
        if let Ok(tx) = self.tx.lock() {
            // The UI dropping the receiver means nobody listens any more; the worker will notice the cancel.
            let _ = tx.send(msg);
        }
        if let Some(ctx) = &self.ctx {
            ctx.request_repaint();
        }
    }
}

impl<T: Send> Progress for ChannelProgress<T> {
    fn set_stage(&self, stage: &str) {
        self.send(JobMsg::Stage(stage.to_string(), None));
    }
    fn set_stage_counting(&self, stage: &str, unit: &str) {
        self.send(JobMsg::Stage(stage.to_string(), Some(unit.to_string())));
    }
    fn update(&self, done: usize, total: usize) {
        self.send(JobMsg::Progress { done, total });
    }
    fn message(&self, msg: &str) {
        self.send(JobMsg::Message(msg.to_string()));
    }
}

/// A running job as the UI sees it: stage, counts, rate and ETA.
pub struct Job<T> {
    pub name: &'static str,
    rx: Receiver<JobMsg<T>>,
    cancel: CancelToken,
    pub stage: String,
    /// What `done` and `total` count in the current stage, when the stage said.
    pub unit: Option<String>,
    pub done: usize,
    pub total: usize,
    pub started: Instant,
    /// Start of the current stage and the count it started from (cache hits arrive at once and must not count
    /// towards the rate).
    stage_start: Option<(Instant, usize)>,
    pub messages: Vec<String>,
    pub losses: Vec<(usize, f32)>,
    pub total_steps: usize,
}

/// What [`Job::poll`] found.
pub enum Polled<T> {
    Running,
    Finished(Result<T, String>),
}

impl<T: Send + 'static> Job<T> {
    /// Runs `work` on a new thread.
    pub fn spawn(
        name: &'static str,
        ctx: Option<egui::Context>,
        work: impl FnOnce(&dyn Progress, &CancelToken, &dyn Fn(usize, usize, f32)) -> Result<T, String>
            + Send
            + 'static,
    ) -> Self {
        let (tx, rx) = channel();
        let cancel = CancelToken::new();
        let c2 = cancel.clone();
        let progress = ChannelProgress {
            tx: Mutex::new(tx.clone()),
            ctx: ctx.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("hegraph-{name}"))
            .spawn(move || {
                let on_loss = |step: usize, total: usize, loss: f32| {
                    progress.send(JobMsg::Loss { step, total, loss })
                };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    work(&progress, &c2, &on_loss)
                }))
                .unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(format!("internal error ({what}); please report it"))
                });
                progress.send(JobMsg::Done(result));
            });
        if let Err(e) = spawned {
            let _ = tx.send(JobMsg::Done(Err(format!(
                "cannot start a worker thread: {e}"
            ))));
        }
        Self {
            name,
            rx,
            cancel,
            stage: String::new(),
            unit: None,
            done: 0,
            total: 0,
            started: Instant::now(),
            stage_start: None,
            messages: Vec::new(),
            losses: Vec::new(),
            total_steps: 0,
        }
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Drains the worker's messages.
    pub fn poll(&mut self) -> Polled<T> {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                JobMsg::Stage(s, unit) => {
                    self.stage = s;
                    self.unit = unit;
                    self.stage_start = None;
                }
                JobMsg::Progress { done, total } => {
                    if self.stage_start.is_none() {
                        self.stage_start = Some((Instant::now(), done));
                    }
                    self.done = done;
                    self.total = total;
                }
                JobMsg::Message(m) => self.messages.push(m),
                JobMsg::Loss { step, total, loss } => {
                    if self.stage_start.is_none() {
                        self.stage_start = Some((Instant::now(), step));
                    }
                    self.losses.push((step, loss));
                    self.total_steps = total;
                    self.done = step;
                    self.total = total;
                }
                JobMsg::Done(r) => return Polled::Finished(r),
            }
        }
        Polled::Running
    }

    /// Items per second in the current stage.
    pub fn rate(&self) -> Option<f64> {
        let (t, from) = self.stage_start?;
        let secs = t.elapsed().as_secs_f64();
        let n = self.done.saturating_sub(from);
        (secs > 0.2 && n > 0).then(|| n as f64 / secs)
    }

    /// Seconds left at the current rate.
    pub fn eta(&self) -> Option<f64> {
        let r = self.rate()?;
        Some(self.total.saturating_sub(self.done) as f64 / r)
    }

    pub fn fraction(&self) -> f32 {
        if self.total == 0 {
            0.0
        } else {
            (self.done as f32 / self.total as f32).clamp(0.0, 1.0)
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// Embedding.

/// Where the CLIP weights come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    /// A model folder; `None` = the default look-up ([`crate::clip::hub::resolve_model_dir`]).
    pub dir: Option<PathBuf>,
    /// The default look-up may download the default model.
    pub allow_download: bool,
    /// `dir` holds the generated test checkpoint: written there when absent or damaged.
    pub test_checkpoint: bool,
}

impl ModelSource {
    /// The default look-up, downloading only when `allow_download`.
    pub fn look_up(allow_download: bool) -> Self {
        Self {
            dir: None,
            allow_download,
            test_checkpoint: false,
        }
    }

    pub fn folder(dir: PathBuf) -> Self {
        Self {
            dir: Some(dir),
            allow_download: false,
            test_checkpoint: false,
        }
    }
}

/// Everything the embedding worker needs.
pub struct EmbedRequest {
    pub model: ModelSource,
    pub cache_dir: Option<PathBuf>,
    pub clip_device: crate::clip::ClipDevice,
    /// Reused when the model is already loaded (re-embedding after a class edit costs no model load).
    pub embedder: Option<Arc<Embedder>>,
    /// The images to embed; `None` when their features are already there and only the prompts changed
    /// (re-hashing 10,000 files for a renamed class would be wasted time).
    pub paths: Option<Vec<PathBuf>>,
    pub classes: Vec<String>,
    pub templates: Vec<String>,
}

/// Centre-crop features of every image, the class prompts' text features and zero-shot predictions.
pub struct EmbedOutput {
    pub embedder: Arc<Embedder>,
    pub info: ModelInfo,
    /// `N×D`, rows aligned with the session's images (zero rows for unreadable images); `None` when only the
    /// prompts were embedded.
    pub centre: Option<Arc<Mat>>,
    pub ok: Vec<bool>,
    pub text: Arc<Mat>,
    pub text_neg: Arc<Mat>,
    /// Zero-shot CLIP probabilities (`softmax(s · z · Pᵀ)`), so the grid can sort and "label next" works before
    /// any training.
    pub zero_shot: Option<Mat>,
    pub stats: EmbedStats,
}

pub fn run_embed(
    req: EmbedRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
) -> Result<EmbedOutput, String> {
    let embedder = match req.embedder {
        Some(e) => e,
        None => {
            progress.set_stage("loading the CLIP model");
            let src = &req.model;
            let model = match (&src.dir, src.test_checkpoint) {
                (Some(dir), true) => {
                    let (m, note) =
                        crate::clip::test_checkpoint::load_or_write_app_test_checkpoint(dir)
                            .map_err(|e| e.to_string())?;
                    if let Some(n) = note {
                        progress.message(&n);
                    }
                    m
                }
                _ => {
                    let dir = crate::clip::resolve_model_dir_reporting(
                        src.dir.as_deref(),
                        src.allow_download,
                        Some(progress),
                    )
                    .map_err(|e| e.to_string())?;
                    progress.set_stage("loading the CLIP model");
                    ClipModel::load(&dir).map_err(|e| e.to_string())?
                }
            };
            let opts = EmbedOptions {
                cache_dir: req.cache_dir.clone(),
                clip_device: req.clip_device,
                ..EmbedOptions::default()
            };
            let e = Embedder::new(Arc::new(model), opts).map_err(|e| e.to_string())?;
            for w in e.cache_warnings() {
                progress.message(w);
            }
            if let Some(n) = e.device_note() {
                progress.message(n);
            }
            Arc::new(e)
        }
    };
    let info = embedder.model().info().clone();
    let mut stats = EmbedStats::default();
    let mut centre = None;
    let mut ok = Vec::new();
    if let Some(paths) = &req.paths {
        let (feats, s) = embedder
            .embed_images(paths, &[0], progress, cancel)
            .map_err(|e| e.to_string())?;
        for p in s.problems.iter().take(20) {
            progress.message(&p.to_string());
        }
        stats = s;
        ok = feats.ok;
        centre = feats.per_view.into_iter().next();
    }
    if cancel.is_cancelled() {
        return Err("cancelled".into());
    }
    progress.set_stage("embedding class prompts");
    let (text, text_neg) = embedder
        .embed_prompts(&req.classes, &req.templates)
        .map_err(|e| e.to_string())?;
    let zero_shot = centre
        .as_ref()
        .map(|c| zero_shot_probs(c, &text, TrainParams::default().logit_scale));
    Ok(EmbedOutput {
        embedder,
        info,
        centre: centre.map(Arc::new),
        ok,
        text: Arc::new(text),
        text_neg: Arc::new(text_neg),
        zero_shot,
        stats,
    })
}

/// `softmax(s · norm(z) · norm(P)ᵀ)` row by row.
pub fn zero_shot_probs(z: &Mat, text: &Mat, scale: f32) -> Mat {
    let logits = z.normalized_rows().matmul_t(&text.normalized_rows());
    let mut out = Mat::zeros(logits.rows, logits.cols);
    for r in 0..logits.rows {
        let row: Vec<f32> = logits.row(r).iter().map(|x| x * scale).collect();
        out.row_mut(r).copy_from_slice(&softmax(&row));
    }
    out
}

// -------------------------------------------------------------------------------------------------------------
// Training.

pub struct TrainRequest {
    /// Computes the labelled images' augmented views; `None` for a features file (no images: centre crops only).
    pub embedder: Option<Arc<Embedder>>,
    pub method: Method,
    pub params: TrainParams,
    pub classes: Vec<String>,
    pub text: Arc<Mat>,
    /// `None` when there are no negative prompts (a features file without `text_neg.features`).
    pub text_neg: Option<Arc<Mat>>,
    /// Centre-crop features of every image.
    pub centre: Arc<Mat>,
    /// Image indices and labels to train on, and held out for the accuracy.
    pub train: Vec<(usize, PathBuf, usize)>,
    pub held_out: Vec<(usize, usize)>,
    /// Refine the other images' predictions with their features (the transductive step).
    pub transductive: bool,
    /// Where to save the trained adapter.
    pub save_to: Option<PathBuf>,
    /// The training backend, made on first use from the UI's device and kept for later trainings (compiling
    /// the kernels costs time once).
    pub backend: Arc<OnceLock<ComputeBackend>>,
    pub backend_request: BackendRequest,
    /// The UI's GPU, for the wgpu training backend.
    pub gpu: Option<GpuContext>,
}

pub struct TrainOutput {
    pub adapter: Arc<TrainedAdapter>,
    /// `N×C` probabilities of every image.
    pub probs: Mat,
    /// How many images the transductive step refined (0: it did not run).
    pub refined: usize,
    pub held_out_accuracy: Option<f32>,
    pub held_out: usize,
    pub trained_on: usize,
    pub seconds: f64,
    pub saved_to: Option<PathBuf>,
    pub backend: String,
}

/// Why the CPU backend is used with this request and device; `None` when the device's wgpu backend is.
fn cpu_reason(req: BackendRequest, gpu: Option<&GpuContext>) -> Option<Option<String>> {
    match (req, gpu) {
        (BackendRequest::Cpu, _) => Some(None),
        (_, None) => Some(Some("the window has no wgpu device".into())),
        // A software adapter (lavapipe, WARP) is slower than the CPU backend at these sizes.
        (BackendRequest::Auto, Some(g)) if g.is_software() => {
            Some(Some(format!("{} is a software adapter", g.adapter_name())))
        }
        _ => None,
    }
}

/// The backend HeGraphAdapter trains on: the UI's own wgpu device when it is a real GPU (or when asked for
/// with `HEGRAPH_BACKEND=wgpu`), else the CPU backend. This is the one place that decides it. Baselines
/// always run on the CPU.
pub fn compute_backend(req: BackendRequest, gpu: Option<&GpuContext>) -> ComputeBackend {
    if req == BackendRequest::Candle {
        return ComputeBackend::Candle(CandleFactory);
    }
    if let Some(reason) = cpu_reason(req, gpu) {
        return ComputeBackend::Cpu { reason };
    }
    match gpu.map(|g| GpuHeGraphFactory::new(Arc::new(g.clone()))) {
        Some(Ok(f)) => ComputeBackend::Wgpu(f),
        Some(Err(e)) => ComputeBackend::Cpu {
            reason: Some(format!("the GPU kernels could not be built: {e}")),
        },
        None => ComputeBackend::Cpu { reason: None },
    }
}

/// What [`compute_backend`] will pick, for the status line before the first training (without building
/// kernels).
pub fn planned_backend(req: BackendRequest, gpu: Option<&GpuContext>) -> String {
    if req == BackendRequest::Candle {
        return "CPU (candle autodiff)".into();
    }
    match (cpu_reason(req, gpu), gpu) {
        (Some(None), _) => "CPU".into(),
        (Some(Some(r)), _) => format!("CPU ({r})"),
        (None, Some(g)) => format!("wgpu: {}", g.describe()),
        (None, None) => "CPU".into(),
    }
}

/// Every image's probabilities from `adapter`; with `transductive`, those of the images it was not trained
/// on (`trained_rows`, labelled `labels`) refined over each other ([`adapter::transduce`], the labelled
/// images as support). The training job and the reopening of a project both predict through here, so a
/// reopened project shows what the last training showed. Returns how many predictions were refined.
pub fn predict_all(
    adapter: &TrainedAdapter,
    centre: &Mat,
    trained_rows: &[usize],
    labels: &[usize],
    transductive: bool,
) -> Result<(Mat, usize), adapter::AdapterError> {
    let mut probs = adapter.predict(centre)?;
    if !transductive {
        return Ok((probs, 0));
    }
    let trained: std::collections::HashSet<usize> = trained_rows.iter().copied().collect();
    let pool_rows: Vec<usize> = (0..centre.rows).filter(|i| !trained.contains(i)).collect();
    if pool_rows.is_empty() {
        return Ok((probs, 0));
    }
    let refined = adapter::transduce(
        &centre.select_rows(&pool_rows),
        &probs.select_rows(&pool_rows),
        &centre.select_rows(trained_rows),
        labels,
        &adapter.params.transduction,
    )?;
    for (r, &i) in pool_rows.iter().enumerate() {
        probs.row_mut(i).copy_from_slice(refined.row(r));
    }
    Ok((probs, pool_rows.len()))
}

pub fn run_train(
    req: TrainRequest,
    progress: &dyn Progress,
    cancel: &CancelToken,
    on_loss: &dyn Fn(usize, usize, f32),
) -> Result<TrainOutput, String> {
    let start = Instant::now();
    if req.train.is_empty() {
        return Err("label at least one image before training".into());
    }
    let views = req
        .embedder
        .as_ref()
        .map_or(0, |e| e.options().views as u32);
    let (aug_ok, aug_views) = match &req.embedder {
        Some(e) if views > 0 => {
            let paths: Vec<PathBuf> = req.train.iter().map(|t| t.1.clone()).collect();
            let view_ids: Vec<u32> = (1..=views).collect();
            let (aug, _) = e
                .embed_images(&paths, &view_ids, progress, cancel)
                .map_err(|e| e.to_string())?;
            (aug.ok, aug.per_view)
        }
        _ => (vec![true; req.train.len()], Vec::new()),
    };
    // Images whose views could not be computed are left out.
    let keep: Vec<usize> = (0..req.train.len()).filter(|&i| aug_ok[i]).collect();
    if keep.is_empty() {
        return Err("none of the labelled images could be read".into());
    }
    let rows: Vec<usize> = keep.iter().map(|&i| req.train[i].0).collect();
    let split = LabelledSplit {
        features: req.centre.select_rows(&rows),
        labels: keep.iter().map(|&i| req.train[i].2).collect(),
        views: (!aug_views.is_empty())
            .then(|| aug_views.iter().map(|v| v.select_rows(&keep)).collect()),
        paths: None,
    };
    let input = TrainInput {
        classes: &req.classes,
        text: Some(&req.text),
        text_neg: req.text_neg.as_deref(),
        train: &split,
        // Held-out images are not given as validation: Tip-Adapter would tune (α, β) on them and the accuracy
        // shown would flatter it.
        val: None,
    };
    progress.set_stage_counting(&format!("training {}", req.method.title()), "steps");
    let mut on_event = |e: &TrainEvent| match e {
        TrainEvent::Step {
            step, total, loss, ..
        } => {
            if let Some(l) = loss {
                on_loss(*step, *total, *l);
            }
        }
        TrainEvent::Message(m) => progress.message(m),
    };
    let adapter = adapter::train(
        req.method,
        &req.params,
        &input,
        req.backend
            .get_or_init(|| compute_backend(req.backend_request, req.gpu.as_ref()))
            .choice(),
        cancel,
        &mut on_event,
    )
    .map_err(|e| e.to_string())?;
    progress.set_stage("predicting every image");
    if req.transductive {
        progress.set_stage("refining the predictions with the unlabelled images");
    }
    let (probs, refined) = predict_all(
        &adapter,
        &req.centre,
        &rows,
        &split.labels,
        req.transductive,
    )
    .map_err(|e| e.to_string())?;
    let held_out_accuracy = (!req.held_out.is_empty()).then(|| {
        let hits = req
            .held_out
            .iter()
            .filter(|(i, l)| crate::linalg::argmax(probs.row(*i)) == *l)
            .count();
        hits as f32 / req.held_out.len() as f32
    });
    let mut saved_to = None;
    if let Some(path) = &req.save_to {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match adapter.save(path) {
            Ok(()) => saved_to = Some(path.clone()),
            Err(e) => progress.message(&format!("the adapter could not be saved: {e}")),
        }
    }
    let backend = adapter.backend.clone().unwrap_or_else(|| "cpu".into());
    Ok(TrainOutput {
        adapter: Arc::new(adapter),
        probs,
        refined,
        held_out_accuracy,
        held_out: req.held_out.len(),
        trained_on: keep.len(),
        seconds: start.elapsed().as_secs_f64(),
        saved_to,
        backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_shot_probabilities_follow_the_nearest_text() {
        let z = Mat::from_vec(2, 2, vec![1.0, 0.1, 0.0, 2.0]);
        let t = Mat::from_vec(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let p = zero_shot_probs(&z, &t, 100.0);
        assert!(p.get(0, 0) > 0.99 && p.get(1, 1) > 0.99);
        assert!((p.row(0).iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn job_reports_progress_losses_and_result() {
        let mut job: Job<u32> = Job::spawn("test", None, |progress, cancel, on_loss| {
            progress.set_stage("counting");
            for i in 0..=10 {
                progress.update(i, 10);
            }
            on_loss(1, 2, 0.5);
            assert!(!cancel.is_cancelled());
            Ok(7)
        });
        let result = loop {
            if let Polled::Finished(r) = job.poll() {
                break r;
            }
            std::thread::yield_now();
        };
        assert_eq!(result, Ok(7));
        assert_eq!(job.stage, "counting");
        assert_eq!(job.losses, vec![(1, 0.5)]);
        assert_eq!((job.done, job.total), (1, 2));
        let mut failing: Job<u32> = Job::spawn("panics", None, |_, _, _| panic!("boom"));
        let result = loop {
            if let Polled::Finished(r) = failing.poll() {
                break r;
            }
            std::thread::yield_now();
        };
        assert!(result.unwrap_err().contains("boom"));
    }
}
