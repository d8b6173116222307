//! The few-shot evaluation protocol of the field (CoOp): `K ∈ {1, 2, 4, 8, 16}` shots per class drawn with
//! seeds 1–3, validation capped at `min(K, 4)` images per class, top-1 accuracy on the full test split, mean
//! ± standard deviation over the seeds (population std, as `numpy.std`), every method on the same features.
//!
//! Where the draws come from depends on the features file:
//! - **Shared benchmark files** (`shots{K}` sets, `val`, `test`): each holds ONE precomputed draw per `K`
//!   (Tip-Adapter's seed 1), used for seed 1. Seeds 2 and 3 draw `K` per class from the largest shot set (the
//!   16-shot pool) with the seed; at `K` = 16 the pool is the only draw, so only seed 1 exists. The report's
//!   notes say so.
//! - **Our own files with `train` and `test`**: `K` per class drawn from `train` with the seed; validation from
//!   `val` (or, without one, from the remaining training images).
//! - **Only `train`** (an image folder): per class, the images are shuffled with the seed, the first `K` train,
//!   the next `min(K, 4)` validate, the rest test; a `K` is used only if every class has enough images. The
//!   test images then differ between seeds and between `K`s (the notes say so).
//!
//! Methods that need text on a file without text features are reported as "needs text features"; Tip-Adapter
//! and Tip-Adapter-F then also get their measurable "cache only" rows.
//!
//! # Protocols
//! - [`Protocol::CoOp`] (the default): as above; every method may use the validation draw to choose its
//!   hyperparameters.
//! - [`Protocol::Interactive`]: the app's situation. No validation split at all: every method trains with
//!   `val: None`, so every hyperparameter is chosen from the labelled images alone through the same code path
//!   the GUI and `hegraph train` take without validation ([`crate::adapter::select`]). The images not used
//!   for training (the validation and test splits together, labels never read for the validation part) are
//!   the unlabelled pool; accuracy is reported on `test`.
//!
//! With `transductive`, every method with text also gets a "+ transductive" row: its predictions on the
//! unlabelled pool refined by [`crate::adapter::transduce`] (pool: the test split in the CoOp protocol,
//! validation and test splits in the interactive one), accuracy on the test images of the pool.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use crate::adapter::{self, AdapterError, BackendChoice, Method, TrainInput, TrainParams};
use crate::features::{FeatureSet, LabelledSplit};
use crate::progress::CancelToken;
use crate::rng::Rng;

const STREAM_SHOTS: u64 = 0x5407;
const STREAM_VAL: u64 = 0x7A1;
const STREAM_SPLIT: u64 = 0x5B17;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("nothing to evaluate: {0}")]
    Nothing(String),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

/// Which protocol (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    CoOp,
    Interactive,
}

#[derive(Clone, Debug)]
pub struct EvalOptions<'a> {
    pub protocol: Protocol,
    /// Add "+ transductive" rows (module docs).
    pub transductive: bool,
    /// Shot counts to try (those the data allows are kept); empty means {1, 2, 4, 8, 16}.
    pub shots: Vec<usize>,
    /// Seeds; empty means {1, 2, 3}.
    pub seeds: Vec<u64>,
    /// Methods; empty means all four.
    pub methods: Vec<Method>,
    /// Hyperparameters (the seed is replaced by each run's seed).
    pub params: TrainParams,
    pub backend: BackendChoice<'a>,
    pub cancel: CancelToken,
}

impl Default for EvalOptions<'_> {
    fn default() -> Self {
        Self {
            protocol: Protocol::CoOp,
            transductive: false,
            shots: vec![1, 2, 4, 8, 16],
            seeds: vec![1, 2, 3],
            methods: Method::ALL.to_vec(),
            params: TrainParams::default(),
            backend: BackendChoice::Cpu,
            cancel: CancelToken::new(),
        }
    }
}

/// One method at one shot count.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// Test accuracies (percent), one per seed that ran.
    Measured {
        seeds: Vec<u64>,
        accuracies: Vec<f32>,
    },
    NeedsText,
}

impl Cell {
    pub fn mean_std(&self) -> Option<(f32, f32)> {
        match self {
            Cell::Measured { accuracies, .. } if !accuracies.is_empty() => {
                let n = accuracies.len() as f32;
                let mean = accuracies.iter().sum::<f32>() / n;
                let var = accuracies.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / n;
                Some((mean, var.sqrt()))
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalRow {
    pub method: Method,
    pub cache_only: bool,
    /// The method's predictions refined over the unlabelled pool.
    pub transductive: bool,
    /// "Tip-Adapter (cache only)" etc.
    pub label: String,
    pub cells: BTreeMap<usize, Cell>,
}

/// One training + test run.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalRun {
    pub label: String,
    pub shots: usize,
    pub seed: u64,
    /// Percent.
    pub accuracy: f32,
    pub val_accuracy: Option<f32>,
    pub train_ms: f64,
    /// How `(α, β)` were chosen, where the method has them.
    pub selection: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct EvalReport {
    pub classes: usize,
    pub shots: Vec<usize>,
    pub rows: Vec<EvalRow>,
    pub runs: Vec<EvalRun>,
    pub notes: Vec<String>,
}

impl EvalReport {
    pub fn row(&self, label: &str) -> Option<&EvalRow> {
        self.rows.iter().find(|r| r.label == label)
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "| Method |");
        for k in &self.shots {
            let _ = write!(s, " {k} shot{} |", if *k == 1 { "" } else { "s" });
        }
        s.push('\n');
        s.push_str("|---|");
        for _ in &self.shots {
            s.push_str("---|");
        }
        s.push('\n');
        for r in &self.rows {
            let _ = write!(s, "| {} |", r.label);
            for k in &self.shots {
                let cell = match r.cells.get(k) {
                    Some(Cell::NeedsText) => "needs text features".to_string(),
                    Some(c @ Cell::Measured { accuracies, .. }) => match c.mean_std() {
                        Some((m, sd)) if accuracies.len() > 1 => format!("{m:.2} ± {sd:.2}"),
                        Some((m, _)) => format!("{m:.2} (1 seed)"),
                        None => "–".into(),
                    },
                    None => "–".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }

    /// One line per method and shot count: `method,shots,seeds,mean,std,accuracies,status`.
    pub fn to_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record([
            "method",
            "shots",
            "seeds",
            "mean",
            "std",
            "accuracies",
            "status",
        ]);
        for r in &self.rows {
            for (k, c) in &r.cells {
                let rec = match c {
                    Cell::NeedsText => vec![
                        r.label.clone(),
                        k.to_string(),
                        String::new(),
                        String::new(),
                        String::new(),
                        String::new(),
                        "needs text features".into(),
                    ],
                    Cell::Measured { seeds, accuracies } => {
                        let (m, sd) = c.mean_std().unwrap_or((f32::NAN, f32::NAN));
                        vec![
                            r.label.clone(),
                            k.to_string(),
                            seeds
                                .iter()
                                .map(|s| s.to_string())
                                .collect::<Vec<_>>()
                                .join(" "),
                            format!("{m:.4}"),
                            format!("{sd:.4}"),
                            accuracies
                                .iter()
                                .map(|a| format!("{a:.4}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                            "ok".into(),
                        ]
                    }
                };
                let _ = w.write_record(&rec);
            }
        }
        w.into_inner()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// One draw: training, validation and test splits.
struct Draw {
    train: LabelledSplit,
    val: Option<LabelledSplit>,
    test: LabelledSplit,
}

/// The unlabelled pool's features: `extra` (features only, never labels) then the test split's, whose rows
/// start at the returned offset.
fn pool_features(
    extra: Option<&LabelledSplit>,
    test: &LabelledSplit,
) -> (crate::linalg::Mat, usize) {
    let Some(x) = extra.filter(|x| !x.is_empty()) else {
        return (test.features.clone(), 0);
    };
    let d = test.features.cols;
    let mut data = Vec::with_capacity((x.features.rows + test.features.rows) * d);
    data.extend_from_slice(&x.features.data);
    data.extend_from_slice(&test.features.data);
    (
        crate::linalg::Mat::from_vec(x.features.rows + test.features.rows, d, data),
        x.features.rows,
    )
}

/// The first `n` of each class's indices after a seeded shuffle.
fn per_class_draw(split: &LabelledSplit, c: usize, n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut out = Vec::new();
    for (k, mut idx) in split.indices_by_class(c).into_iter().enumerate() {
        Rng::derive(seed, &[stream, k as u64]).shuffle(&mut idx);
        idx.truncate(n);
        out.extend(idx);
    }
    out.sort_unstable();
    out
}

fn min_per_class(split: &LabelledSplit, c: usize) -> usize {
    split
        .indices_by_class(c)
        .iter()
        .map(|v| v.len())
        .min()
        .unwrap_or(0)
}

enum Source<'f> {
    Shared {
        pool_k: usize,
        pool: &'f LabelledSplit,
        test: &'f LabelledSplit,
    },
    TrainTest {
        train: &'f LabelledSplit,
        test: &'f LabelledSplit,
    },
    TrainOnly {
        train: &'f LabelledSplit,
    },
}

impl Source<'_> {
    /// The draw for `(k, seed)`, or why there is none.
    /// The draw for `(k, seed)`, or why there is none. Without `with_val` (the interactive protocol) no
    /// validation images are drawn (their labels are never read), and a folder's images are split into `k`
    /// training images and the rest.
    fn draw(&self, fs: &FeatureSet, k: usize, seed: u64, with_val: bool) -> Result<Draw, String> {
        let c = fs.num_classes();
        let vk = if with_val { k.min(4) } else { 0 };
        let val_from = |v: &LabelledSplit| {
            with_val.then(|| v.subset(&per_class_draw(v, c, vk, seed, STREAM_VAL)))
        };
        match self {
            Source::Shared { pool_k, pool, test } => {
                let train = match fs.shots.get(&k) {
                    Some(s) if seed == 1 => s.clone(),
                    _ if k < *pool_k => {
                        pool.subset(&per_class_draw(pool, c, k, seed, STREAM_SHOTS))
                    }
                    _ if k == *pool_k => {
                        return Err(format!("{k} shots: the file holds a single {k}-shot draw"))
                    }
                    _ => {
                        return Err(format!(
                            "{k} shots: the file's largest shot set is {pool_k}"
                        ))
                    }
                };
                Ok(Draw {
                    train,
                    val: fs.val.as_ref().and_then(val_from),
                    test: (*test).clone(),
                })
            }
            Source::TrainTest { train, test } => {
                if min_per_class(train, c) < k {
                    return Err(format!(
                        "{k} shots: some class has fewer than {k} training images"
                    ));
                }
                let idx = per_class_draw(train, c, k, seed, STREAM_SHOTS);
                let val = match &fs.val {
                    Some(v) => val_from(v),
                    None => {
                        let chosen: std::collections::HashSet<usize> =
                            idx.iter().copied().collect();
                        let rest: Vec<usize> =
                            (0..train.len()).filter(|i| !chosen.contains(i)).collect();
                        let rest_split = train.subset(&rest);
                        (min_per_class(&rest_split, c) >= vk)
                            .then(|| val_from(&rest_split))
                            .flatten()
                    }
                };
                Ok(Draw {
                    train: train.subset(&idx),
                    val,
                    test: (*test).clone(),
                })
            }
            Source::TrainOnly { train } => {
                if min_per_class(train, c) < k + vk + 1 {
                    return Err(format!(
                        "{k} shots: every class needs at least {} images ({k} train, {vk} validation, 1 test)",
                        k + vk + 1
                    ));
                }
                let vk = if with_val { vk } else { 0 };
                let (mut tr, mut va, mut te) = (Vec::new(), Vec::new(), Vec::new());
                for (cl, mut idx) in train.indices_by_class(c).into_iter().enumerate() {
                    Rng::derive(seed, &[STREAM_SPLIT, cl as u64]).shuffle(&mut idx);
                    tr.extend_from_slice(&idx[..k]);
                    va.extend_from_slice(&idx[k..k + vk]);
                    te.extend_from_slice(&idx[k + vk..]);
                }
                for v in [&mut tr, &mut va, &mut te] {
                    v.sort_unstable();
                }
                Ok(Draw {
                    train: train.subset(&tr),
                    val: with_val.then(|| train.subset(&va)),
                    test: train.subset(&te),
                })
            }
        }
    }
}

/// Runs the protocol (module docs). `on_event` receives one line per run.
pub fn evaluate(
    fs: &FeatureSet,
    opts: &EvalOptions,
    on_event: &mut dyn FnMut(&str),
) -> Result<EvalReport, EvalError> {
    let c = fs.num_classes();
    if c == 0 {
        return Err(EvalError::Nothing("the features have no classes".into()));
    }
    let shots: Vec<usize> = if opts.shots.is_empty() {
        vec![1, 2, 4, 8, 16]
    } else {
        opts.shots.clone()
    };
    let seeds: Vec<u64> = if opts.seeds.is_empty() {
        vec![1, 2, 3]
    } else {
        opts.seeds.clone()
    };
    let methods: Vec<Method> = if opts.methods.is_empty() {
        Method::ALL.to_vec()
    } else {
        opts.methods.clone()
    };
    let mut notes = Vec::new();
    let source = match (fs.shots.iter().next_back(), &fs.train, &fs.test) {
        (Some((&pool_k, pool)), _, Some(test)) => {
            notes.push(format!(
                "the file holds one precomputed draw per shot count, used for seed 1; other seeds draw K per class \
                 from the {pool_k}-shot pool; at {pool_k} shots only seed 1 exists"
            ));
            Source::Shared { pool_k, pool, test }
        }
        (_, Some(train), Some(test)) => Source::TrainTest { train, test },
        (_, Some(train), None) => {
            notes.push(
                "no test split: each class's images are split per seed into K train, min(K, 4) validation and the \
                 rest test, so the test images differ between seeds and shot counts"
                    .into(),
            );
            Source::TrainOnly { train }
        }
        _ => {
            return Err(EvalError::Nothing(
                "the features need a test split with shot sets, or a labelled training pool".into(),
            ))
        }
    };
    if fs.text.is_none() {
        notes.push(
            "no text features: zero-shot CLIP, HeGraphAdapter and the text side of Tip-Adapter cannot be measured; \
             the cache-only Tip-Adapter rows use the image features alone"
                .into(),
        );
    }
    if fs.val.is_none()
        && matches!(source, Source::Shared { .. })
        && opts.protocol == Protocol::CoOp
    {
        notes.push("no validation split: Tip-Adapter's (α, β) were not searched".into());
    }
    if fs.test_checkpoint {
        notes.push(
            "these features come from the random test checkpoint: accuracies are meaningless"
                .into(),
        );
    }

    // Rows: each method, and right after it its cache-only row when text is missing.
    let mut rows: Vec<EvalRow> = Vec::new();
    let row = |method: Method, cache_only: bool, transductive: bool| {
        let mut label = method.title().to_string();
        if cache_only {
            label.push_str(" (cache only)");
        }
        if transductive {
            label.push_str(" + transductive");
        }
        EvalRow {
            method,
            cache_only,
            transductive,
            label,
            cells: BTreeMap::new(),
        }
    };
    for &m in &methods {
        rows.push(row(m, false, false));
        if fs.text.is_none() && m.has_cache_only_variant() {
            rows.push(row(m, true, false));
        }
    }
    if opts.transductive && fs.text.is_some() {
        for &m in &methods {
            rows.push(row(m, false, true));
        }
    }
    if opts.protocol == Protocol::Interactive {
        notes.push(
            "interactive protocol: no validation split; hyperparameters from the labelled images alone \
             (leave-one-out, or the prior α = β = 1 with one label per class); the validation and test images \
             are the unlabelled pool, accuracy on test"
                .into(),
        );
    }

    let mut used_shots = Vec::new();
    let mut runs = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for &k in &shots {
        let mut any = false;
        for &seed in &seeds {
            let interactive = opts.protocol == Protocol::Interactive;
            let draw = match source.draw(fs, k, seed, !interactive) {
                Ok(d) => d,
                Err(why) => {
                    if !skipped.contains(&why) {
                        skipped.push(why);
                    }
                    continue;
                }
            };
            any = true;
            // The interactive pool holds the whole validation split too (features only).
            let pool_extra = interactive.then_some(fs.val.as_ref()).flatten();
            let mut params = opts.params.clone();
            params.seed = seed;
            let input = TrainInput {
                classes: &fs.classes,
                text: fs.text.as_ref(),
                text_neg: fs.text_neg.as_ref(),
                train: &draw.train,
                val: draw.val.as_ref(),
            };
            let pool = opts
                .transductive
                .then(|| pool_features(pool_extra, &draw.test));
            // The inductive adapters of this draw, reused by the transductive rows.
            let mut trained_here: Vec<(Method, bool, adapter::TrainedAdapter, f64)> = Vec::new();
            for row in rows.iter_mut() {
                if fs.text.is_none() && !row.cache_only {
                    row.cells.insert(k, Cell::NeedsText);
                    continue;
                }
                if opts.cancel.is_cancelled() {
                    return Err(AdapterError::Cancelled.into());
                }
                on_event(&format!("{k} shots, seed {seed}: {}", row.label));
                let (acc, val_accuracy, train_ms, selection) = if row.transductive {
                    let Some((_, _, trained, ms)) = trained_here
                        .iter()
                        .find(|(m, co, ..)| *m == row.method && !*co)
                    else {
                        continue;
                    };
                    let Some((pool, offset)) = pool.as_ref() else {
                        continue;
                    };
                    let start = Instant::now();
                    let prior = trained.predict(pool)?;
                    let refined = adapter::transduce(
                        pool,
                        &prior,
                        &draw.train.features,
                        &draw.train.labels,
                        &params.transduction,
                    )?;
                    let test_rows: Vec<usize> = (*offset..pool.rows).collect();
                    let acc = 100.0
                        * adapter::accuracy_of(&refined.select_rows(&test_rows), &draw.test.labels);
                    (
                        acc,
                        None,
                        ms + start.elapsed().as_secs_f64() * 1e3,
                        trained.selection.as_ref().map(|s| s.to_string()),
                    )
                } else {
                    let start = Instant::now();
                    let trained = adapter::train(
                        row.method,
                        &params,
                        &input,
                        opts.backend,
                        &opts.cancel,
                        &mut |_| {},
                    )?;
                    let train_ms = start.elapsed().as_secs_f64() * 1e3;
                    let acc = 100.0 * trained.accuracy(&draw.test)?;
                    for n in &trained.notes {
                        let n = format!("{}: {n}", row.label);
                        if !notes.contains(&n) {
                            notes.push(n);
                        }
                    }
                    let out = (
                        acc,
                        trained.val_accuracy.map(|v| 100.0 * v),
                        train_ms,
                        trained.selection.as_ref().map(|s| s.to_string()),
                    );
                    trained_here.push((row.method, row.cache_only, trained, train_ms));
                    out
                };
                if let Cell::Measured { seeds, accuracies } =
                    row.cells.entry(k).or_insert(Cell::Measured {
                        seeds: Vec::new(),
                        accuracies: Vec::new(),
                    })
                {
                    seeds.push(seed);
                    accuracies.push(acc);
                }
                runs.push(EvalRun {
                    label: row.label.clone(),
                    shots: k,
                    seed,
                    accuracy: acc,
                    val_accuracy,
                    train_ms,
                    selection,
                });
            }
        }
        if any {
            used_shots.push(k);
        }
    }
    for s in skipped {
        notes.push(format!("skipped: {s}"));
    }
    if used_shots.is_empty() {
        return Err(EvalError::Nothing(
            "no requested shot count is possible with these features".into(),
        ));
    }
    Ok(EvalReport {
        classes: c,
        shots: used_shots,
        rows,
        runs,
        notes,
    })
}
