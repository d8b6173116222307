//! `hegraph bench train`: how long a HeGraphAdapter retrain takes, on synthetic-but-realistic features
//! (random unit class centres; images at cosine ≈ 0.85 to their centre, views at ≈ 0.95 to their image, text
//! at ≈ 0.55), so it runs anywhere without data.

use std::time::Instant;

use super::{train, AdapterError, BackendChoice, Method, TrainEvent, TrainInput, TrainParams};
use crate::features::LabelledSplit;
use crate::linalg::Mat;
use crate::progress::CancelToken;
use crate::rng::Rng;

/// The class counts `hegraph bench train` reports.
pub const BENCH_CLASSES: [usize; 3] = [10, 100, 1000];

/// A synthetic few-shot task: class names, positive and negative text features and a labelled split with
/// `views` augmented views per image.
pub struct SyntheticTask {
    pub classes: Vec<String>,
    pub text: Mat,
    pub text_neg: Mat,
    pub train: LabelledSplit,
}

impl SyntheticTask {
    /// The task as training input, without a validation split (as the app trains).
    pub fn input(&self) -> TrainInput<'_> {
        TrainInput {
            classes: &self.classes,
            text: Some(&self.text),
            text_neg: Some(&self.text_neg),
            train: &self.train,
            val: None,
        }
    }
}

fn noisy(rng: &mut Rng, base: &[f32], base_weight: f32, sigma: f32) -> Vec<f32> {
    let d = base.len();
    let s = sigma / (d as f32).sqrt();
    let mut v: Vec<f32> = base
        .iter()
        .map(|&b| base_weight * b + s * rng.normal())
        .collect();
    crate::linalg::normalize(&mut v);
    v
}

pub fn synthetic_task(
    classes: usize,
    shots: usize,
    dim: usize,
    views: usize,
    seed: u64,
) -> SyntheticTask {
    let mut rng = Rng::derive(seed, &[0xBE7C]);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| noisy(&mut rng, &vec![0.0; dim], 0.0, 1.0))
        .collect();
    let mut text = Mat::zeros(classes, dim);
    let mut text_neg = Mat::zeros(classes, dim);
    for (c, mu) in centres.iter().enumerate() {
        text.row_mut(c)
            .copy_from_slice(&noisy(&mut rng, mu, 1.0, 1.5));
        text_neg
            .row_mut(c)
            .copy_from_slice(&noisy(&mut rng, mu, -0.2, 1.0));
    }
    let m = classes * shots;
    let mut features = Mat::zeros(m, dim);
    let mut labels = Vec::with_capacity(m);
    let mut view_mats = vec![Mat::zeros(m, dim); views.max(1)];
    for i in 0..m {
        let c = i / shots.max(1);
        labels.push(c);
        let x = noisy(&mut rng, &centres[c], 1.0, 0.62);
        for v in view_mats.iter_mut() {
            v.row_mut(i)
                .copy_from_slice(&noisy(&mut rng, &x, 1.0, 0.33));
        }
        features.row_mut(i).copy_from_slice(&x);
    }
    SyntheticTask {
        classes: (0..classes).map(|c| format!("class {c}")).collect(),
        text,
        text_neg,
        train: LabelledSplit {
            features,
            labels,
            views: (views > 0).then_some(view_mats),
            paths: None,
        },
    }
}

/// At most this many steps are timed; longer trainings are stopped there and their total is projected.
pub const BENCH_MAX_STEPS: usize = 40;

#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    pub backend: String,
    pub classes: usize,
    pub shots: usize,
    pub dim: usize,
    pub views: usize,
    pub epochs: usize,
    /// Steps of the full training.
    pub steps: usize,
    /// Steps actually run (fewer than `steps` when the training was cut at [`BENCH_MAX_STEPS`]).
    pub timed_steps: usize,
    /// Graph construction, frozen products and the first step's extra cost.
    pub setup_ms: f64,
    pub ms_per_step: f64,
    /// The whole training: measured, or `setup + steps · ms_per_step` when it was cut short.
    pub total_ms: f64,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let projected = if self.timed_steps < self.steps {
            format!(" (projected from {} steps)", self.timed_steps)
        } else {
            String::new()
        };
        write!(
            f,
            "{:>5} classes × {} shots × {} views, D={}: {} steps ({} epochs) in {:.0} ms{projected} = {:.2} ms/step + {:.0} ms setup [{}]",
            self.classes,
            self.shots,
            self.views,
            self.dim,
            self.steps,
            self.epochs,
            self.total_ms,
            self.ms_per_step,
            self.setup_ms,
            self.backend
        )
    }
}

/// Times one HeGraphAdapter training on a synthetic task (`epochs`, or the default). Unless `full`, trainings
/// longer than [`BENCH_MAX_STEPS`] are cancelled there and their total projected, so the 1000-class case stays
/// short; a full run is timed from start to end (graph construction included), as a person waits for it.
pub fn bench_train(
    classes: usize,
    shots: usize,
    dim: usize,
    views: usize,
    epochs: Option<usize>,
    backend: BackendChoice,
    full: bool,
) -> Result<BenchResult, AdapterError> {
    let task = synthetic_task(classes, shots, dim, views, 7);
    // The graph layers' training is what is timed: the SPEC's reading trains them.
    let mut params = TrainParams::spec();
    if let Some(e) = epochs {
        params.epochs = e;
    }
    // A GPU backend only queues work; reading the loss back is what waits for it. Reading it after the first
    // step and after the last timed one makes both timestamps mean "done", not "queued", and costs two
    // readbacks in 40 steps.
    params.loss_every = BENCH_MAX_STEPS - 1;
    let input = task.input();
    let cancel = CancelToken::new();
    let start = Instant::now();
    let mut first: Option<f64> = None;
    let mut last = 0.0f64;
    let mut timed = 0usize;
    let mut total_steps = 0usize;
    let result = train(
        Method::HeGraph,
        &params,
        &input,
        backend,
        &cancel,
        &mut |ev| {
            if let TrainEvent::Step { step, total, .. } = ev {
                let t = start.elapsed().as_secs_f64() * 1e3;
                first.get_or_insert(t);
                last = t;
                timed = *step;
                total_steps = *total;
                if !full && timed >= BENCH_MAX_STEPS {
                    cancel.cancel();
                }
            }
        },
    );
    let backend_name = match result {
        Ok(a) => a.backend.unwrap_or_default(),
        Err(AdapterError::Cancelled) => match backend {
            BackendChoice::Cpu => "cpu".to_string(),
            BackendChoice::Custom(f) => f.name(),
        },
        Err(e) => return Err(e),
    };
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    let first = first.unwrap_or(elapsed);
    let ms_per_step = if timed > 1 {
        (last - first) / (timed - 1) as f64
    } else {
        first
    };
    let setup_ms = (first - ms_per_step).max(0.0);
    let total_ms = if timed < total_steps {
        setup_ms + ms_per_step * total_steps as f64
    } else {
        elapsed
    };
    Ok(BenchResult {
        backend: backend_name,
        classes,
        shots,
        dim,
        views,
        epochs: params.epochs,
        steps: total_steps,
        timed_steps: timed,
        setup_ms,
        ms_per_step,
        total_ms,
    })
}

/// Times the interactive retrain in the adopted reading (the GUI's default): building the graph, choosing
/// `(α, β)` by leave-one-out and training the cache keys, with no validation split, from start to end.
/// Returns milliseconds.
pub fn bench_retrain_adopted(
    classes: usize,
    shots: usize,
    dim: usize,
    views: usize,
) -> Result<f64, AdapterError> {
    let task = synthetic_task(classes, shots, dim, views, 7);
    let input = task.input();
    let start = Instant::now();
    train(
        Method::HeGraph,
        &TrainParams::default(),
        &input,
        BackendChoice::Cpu,
        &CancelToken::new(),
        &mut |_| {},
    )?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}
