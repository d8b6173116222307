//! `hegraph bench train`: how long a HeGraphAdapter retrain takes, and what loss it reaches, on a task with
//! the statistics of real CLIP features ([`bench_task`]): the real ViT-B/32 features of a shared file, their
//! classes tiled up to the requested count, or, without the file, synthetic features with the same cosine
//! statistics. (The plain [`synthetic_task`] the tests use is trivially separable: its class centres are
//! nearly orthogonal, so the loss is 0 in f32 from the first step and a bench on it times work no real
//! training does.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{train, AdapterError, BackendChoice, Method, TrainEvent, TrainInput, TrainParams};
use crate::features::{FeatureSet, LabelledSplit};
use crate::linalg::Mat;
use crate::progress::CancelToken;
use crate::rng::Rng;

/// The class counts `hegraph bench train` reports.
pub const BENCH_CLASSES: [usize; 3] = [10, 100, 1000];

/// A few-shot task: class names, positive and negative text features and a labelled split with `views`
/// augmented views per image.
pub struct SyntheticTask {
    pub classes: Vec<String>,
    pub text: Mat,
    pub text_neg: Mat,
    pub train: LabelledSplit,
}

impl SyntheticTask {
    fn new(
        classes: Vec<String>,
        text: Mat,
        text_neg: Mat,
        features: Mat,
        labels: Vec<usize>,
        views: Option<Vec<Mat>>,
    ) -> Self {
        Self {
            classes,
            text,
            text_neg,
            train: LabelledSplit {
                features,
                labels,
                views,
                paths: None,
            },
        }
    }

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

/// Random unit class centres (nearly orthogonal), images at cosine ≈ 0.85 to their centre, views at ≈ 0.95
/// to their image, text at ≈ 0.55: an easy task for tests of the plumbing.
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
    let names = (0..classes).map(|c| format!("class {c}")).collect();
    let views = (views > 0).then_some(view_mats);
    SyntheticTask::new(names, text, text_neg, features, labels, views)
}

/// The real features `hegraph bench train` prefers, relative to the repository root: real CLIP ViT-B/32
/// image and text features of 98 Stanford Cars classes (see the folder's README), a task where few-shot
/// training has room to learn.
pub const REAL_FEATURES: &str = "../shared/data/features/stanford_cars_even.safetensors";

/// Where a bench task's features came from.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskSource {
    /// The real features of `file`, whose `classes` classes were tiled up to the requested count.
    Real { file: PathBuf, classes: usize },
    /// [`realistic_synthetic_task`].
    Synthetic,
}

impl std::fmt::Display for TaskSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskSource::Real { file, classes } => write!(
                f,
                "real CLIP ViT-B/32 image and text features of {} ({classes} classes; more are copies with \
                 their class-specific part rotated; augmented views and negative prompts synthetic)",
                file.display()
            ),
            TaskSource::Synthetic => write!(
                f,
                "synthetic features with the cosine statistics of the real CLIP files (class means ≈ 0.79 \
                 to each other, images ≈ 0.89 to their class mean, text ≈ 0.32 to its class's images and \
                 ≈ 0.19 to the others', classes in families of {FAMILY})"
            ),
        }
    }
}

/// A bench task and where its features came from.
pub struct BenchTask {
    pub task: SyntheticTask,
    pub source: TaskSource,
}

/// Cosine of a view to its image, as CLIP gives for Tip-Adapter's crops (0.5–1 of the image, flips).
const VIEW_NOISE: f32 = 0.4; // cos ≈ 1/√(1 + 0.4²) ≈ 0.93
/// "a photo of no {}." against "a photo of a {}.": close in CLIP's text space.
const NEG_NOISE: f32 = 0.48; // cos ≈ 0.9

/// The task of these images and text rows, with `views` jittered views of each image row and a negative
/// prompt near each text row.
fn with_views_and_negatives(
    rng: &mut Rng,
    classes: Vec<String>,
    text: Mat,
    features: Mat,
    labels: Vec<usize>,
    views: usize,
) -> SyntheticTask {
    let mut view_mats = vec![Mat::zeros(features.rows, features.cols); views.max(1)];
    for i in 0..features.rows {
        for v in view_mats.iter_mut() {
            v.row_mut(i)
                .copy_from_slice(&noisy(rng, features.row(i), 1.0, VIEW_NOISE));
        }
    }
    let mut text_neg = Mat::zeros(text.rows, text.cols);
    for c in 0..text.rows {
        text_neg
            .row_mut(c)
            .copy_from_slice(&noisy(rng, text.row(c), 1.0, NEG_NOISE));
    }
    let views = (views > 0).then_some(view_mats);
    SyntheticTask::new(classes, text, text_neg, features, labels, views)
}

/// The unit vector `Σ w_i v_i`.
fn mix(parts: &[(f32, &[f32])]) -> Vec<f32> {
    let mut out = vec![0.0f32; parts.first().map_or(0, |(_, v)| v.len())];
    for (w, v) in parts {
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += w * x;
        }
    }
    crate::linalg::normalize(&mut out);
    out
}

/// Classes come in families of this many (breeds, car models of one maker): real class means range from
/// 0.57 to 0.99 in cosine, and the near ones are what makes a real task hard.
const FAMILY: usize = 4;
/// How much of a class's own direction its family shares.
const FAMILY_SHARE: f32 = 0.85;

/// Synthetic features with the statistics measured on the shared real files (ViT-B/32, 16-shot Stanford
/// Cars): class means at cosine ≈ 0.79 to each other, images ≈ 0.89 to their class mean (≈ 0.80 to each
/// other), text rows ≈ 0.65 to each other, ≈ 0.32 to their class's images and ≈ 0.19 to other classes'
/// (images and text in cones of their own, as CLIP's are), classes in families of [`FAMILY`]. Views and negatives as [`bench_task`]'s.
pub fn realistic_synthetic_task(
    classes: usize,
    shots: usize,
    dim: usize,
    views: usize,
    seed: u64,
) -> SyntheticTask {
    let mut rng = Rng::derive(seed, &[0xBE7C, 1]);
    let unit = |rng: &mut Rng| noisy(rng, &vec![0.0; dim], 0.0, 1.0);
    let image_axis = unit(&mut rng);
    let text_axis = {
        let h = unit(&mut rng);
        let along = crate::linalg::dot(&h, &image_axis);
        mix(&[(1.0, &h), (-along, &image_axis)])
    };
    let mut text = Mat::zeros(classes, dim);
    let mut centres = Vec::with_capacity(classes);
    let mut family = unit(&mut rng);
    for c in 0..classes {
        if c % FAMILY == 0 {
            family = unit(&mut rng);
        }
        let own = mix(&[
            (FAMILY_SHARE.sqrt(), &family),
            ((1.0 - FAMILY_SHARE).sqrt(), &unit(&mut rng)),
        ]);
        let spread = unit(&mut rng);
        centres.push(mix(&[
            (0.79f32.sqrt(), &image_axis),
            (0.21f32.sqrt(), &own),
        ]));
        // Weights solved from the measured cosines (text-text 0.65, image-own text 0.32, image-other 0.19).
        let t = mix(&[
            (0.770, &text_axis),
            (0.239, &image_axis),
            (0.3177, &own),
            (0.499, &spread),
        ]);
        text.row_mut(c).copy_from_slice(&t);
    }
    let m = classes * shots;
    let mut features = Mat::zeros(m, dim);
    let mut labels = Vec::with_capacity(m);
    for i in 0..m {
        let c = i / shots.max(1);
        labels.push(c);
        features
            .row_mut(i)
            .copy_from_slice(&noisy(&mut rng, &centres[c], 1.0, 0.5));
    }
    let names = (0..classes).map(|c| format!("class {c}")).collect();
    with_views_and_negatives(&mut rng, names, text, features, labels, views)
}

/// A rotation of the coordinates outside span(image mean, text mean): a signed permutation, re-projected.
/// A tiled class is a real class under one of these, so it keeps the real class's inner structure and its
/// relation to its text while its class-specific part points elsewhere, as another real class's would.
struct Rotation {
    basis: [Vec<f32>; 2],
    perm: Vec<usize>,
    sign: Vec<f32>,
}

impl Rotation {
    fn new(basis: [Vec<f32>; 2], rng: &mut Rng) -> Self {
        let d = basis[0].len();
        let mut perm: Vec<usize> = (0..d).collect();
        rng.shuffle(&mut perm);
        let sign = (0..d)
            .map(|_| if rng.bool(0.5) { -1.0 } else { 1.0 })
            .collect();
        Self { basis, perm, sign }
    }

    fn apply(&self, v: &[f32]) -> Vec<f32> {
        let dots = |x: &[f32]| self.basis.each_ref().map(|b| crate::linalg::dot(x, b));
        let [a0, a1] = dots(v);
        let rest: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(j, &x)| x - a0 * self.basis[0][j] - a1 * self.basis[1][j])
            .collect();
        let turned: Vec<f32> = self
            .perm
            .iter()
            .zip(&self.sign)
            .map(|(&j, s)| s * rest[j])
            .collect();
        let [r0, r1] = dots(&turned);
        mix(&[
            (1.0, &turned),
            (a0 - r0, &self.basis[0]),
            (a1 - r1, &self.basis[1]),
        ])
    }
}

/// The task of `hegraph bench train`: from `real` (a features file with text features and a K-shot draw of
/// at least `shots` per class) when given, else [`realistic_synthetic_task`]. Real classes beyond the
/// file's count are tiled: copy `k` of class `c` is class `c` under a fixed rotation ([`Rotation`]) of the
/// part of every feature outside the image and text mean directions. Views are jittered around the real
/// image rows (the files hold the mean of 10 views only) and negative prompts around the text rows (the
/// files have none).
pub fn bench_task(
    classes: usize,
    shots: usize,
    dim: usize,
    views: usize,
    seed: u64,
    real: Option<(&Path, &FeatureSet)>,
) -> Result<BenchTask, AdapterError> {
    let Some((file, fs)) = real else {
        return Ok(BenchTask {
            task: realistic_synthetic_task(classes, shots, dim, views, seed),
            source: TaskSource::Synthetic,
        });
    };
    let unusable = |why: &str| AdapterError::Input(format!("{}: {why}", file.display()));
    let text = fs
        .text
        .as_ref()
        .ok_or_else(|| unusable("has no text features (`text.features`)"))?;
    let draw = fs
        .shots
        .range(shots..)
        .next()
        .map(|(_, s)| s)
        .ok_or_else(|| unusable(&format!("has no draw of {shots} or more shots per class")))?;
    let real_classes = text.rows;
    let by_class = draw.indices_by_class(real_classes);
    if real_classes == 0 || by_class.iter().any(|v| v.len() < shots) {
        return Err(unusable(&format!(
            "some class has fewer than {shots} images in its shots draw"
        )));
    }
    let mean_dir = |m: &Mat| {
        let rows: Vec<&[f32]> = (0..m.rows).map(|i| m.row(i)).collect();
        crate::linalg::mean_normalized(&rows, m.cols)
    };
    let image_axis = mean_dir(&draw.features);
    let text_axis = {
        let h = mean_dir(text);
        let along = crate::linalg::dot(&h, &image_axis);
        mix(&[(1.0, &h), (-along, &image_axis)])
    };
    let mut rng = Rng::derive(seed, &[0xBE7C, 2]);
    let copies = classes.div_ceil(real_classes);
    let rotations: Vec<Option<Rotation>> = (0..copies)
        .map(|k| (k > 0).then(|| Rotation::new([image_axis.clone(), text_axis.clone()], &mut rng)))
        .collect();
    let turn = |k: usize, v: &[f32]| match &rotations[k] {
        Some(r) => r.apply(v),
        None => v.to_vec(),
    };
    let d = fs.dim;
    let mut out_text = Mat::zeros(classes, d);
    let mut features = Mat::zeros(classes * shots, d);
    let mut labels = Vec::with_capacity(classes * shots);
    let mut names = Vec::with_capacity(classes);
    for c in 0..classes {
        let (base, k) = (c % real_classes, c / real_classes);
        out_text
            .row_mut(c)
            .copy_from_slice(&turn(k, text.row(base)));
        for (s, &i) in by_class[base][..shots].iter().enumerate() {
            features
                .row_mut(c * shots + s)
                .copy_from_slice(&turn(k, draw.features.row(i)));
            labels.push(c);
        }
        let name = fs
            .classes
            .get(base)
            .cloned()
            .unwrap_or_else(|| format!("class {base}"));
        names.push(if k == 0 {
            name
        } else {
            format!("{name} (copy {k})")
        });
    }
    Ok(BenchTask {
        task: with_views_and_negatives(&mut rng, names, out_text, features, labels, views),
        source: TaskSource::Real {
            file: file.to_path_buf(),
            classes: real_classes,
        },
    })
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
    /// The batch loss of the first step and of the last one read (the last timed step).
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let projected = if self.timed_steps < self.steps {
            format!(" (projected from {} steps)", self.timed_steps)
        } else {
            String::new()
        };
        let loss = |l: Option<f32>| l.map_or("–".to_string(), |l| format!("{l:.4}"));
        write!(
            f,
            "{:>5} classes × {} shots × {} views, D={}: {} steps ({} epochs) in {:.0} ms{projected} = {:.2} ms/step + {:.0} ms setup, loss {} → {} [{}]",
            self.classes,
            self.shots,
            self.views,
            self.dim,
            self.steps,
            self.epochs,
            self.total_ms,
            self.ms_per_step,
            self.setup_ms,
            loss(self.first_loss),
            loss(self.last_loss),
            self.backend
        )
    }
}

/// Times one HeGraphAdapter training on `task` (`epochs`, or the default), every class with as many shots
/// as the first. Unless `full`, trainings longer than [`BENCH_MAX_STEPS`] are cancelled there and their
/// total projected, so the 1000-class case stays short; a full run is timed from start to end (graph
/// construction included), as a person waits for it.
pub fn bench_train(
    task: &SyntheticTask,
    epochs: Option<usize>,
    backend: BackendChoice,
    full: bool,
) -> Result<BenchResult, AdapterError> {
    let classes = task.classes.len();
    let shots = task.train.len() / classes.max(1);
    let dim = task.train.features.cols;
    let views = task.train.views.as_ref().map_or(0, Vec::len);
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
    let mut first_loss = None;
    let mut last_loss = None;
    let result = train(
        Method::HeGraph,
        &params,
        &input,
        backend,
        &cancel,
        &mut |ev| {
            if let TrainEvent::Step {
                step, total, loss, ..
            } = ev
            {
                if let Some(l) = *loss {
                    first_loss.get_or_insert(l);
                    last_loss = Some(l);
                }
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
        first_loss,
        last_loss,
    })
}

/// Times the interactive retrain in the adopted reading (the GUI's default): building the graph, choosing
/// `(α, β)` by leave-one-out and training the cache keys, with no validation split, from start to end.
/// Returns milliseconds.
pub fn bench_retrain_adopted(task: &SyntheticTask) -> Result<f64, AdapterError> {
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
