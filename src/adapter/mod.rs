//! HeGraphAdapter and the baselines it is compared with (zero-shot CLIP, Tip-Adapter, Tip-Adapter-F), trained
//! and applied on CLIP features. The graph's math is the SPEC's; [`hegraph`] holds the reference (candle
//! autodiff), the training driver and the backend seam; `cpu` the hand-written CPU backend that trains the
//! graph without a GPU; [`crate::gpu::adapter`] the wgpu one; [`select`] how `(α, β)` are chosen with and
//! without a validation split; `keys` the cache-key training shared with Tip-Adapter-F; [`transduce`] the
//! transductive refinement over the unlabelled images.
//!
//! # The reading of the paper adopted by default ([`TrainParams::default`])
//!
//! Measured with `hegraph eval` on the two real feature files with text (oxford_pets25, stanford_cars_even),
//! 1–16 shots, 3 seeds, in both protocols (with a validation split, and `--protocol interactive` without
//! one); the tables and ablations are in `BENCHMARKS.md`. The SPEC's own form stays reachable as
//! [`TrainParams::spec`] (`--spec` on the command line).
//! - **Fusion in logit space** ([`Fusion::Logit`]), as Tip-Adapter does: `ℓ = s·z norm(P')ᵀ + α·exp(−β(1 −
//!   z Kᵀ)) L`, where `P'` is the graph's refined text nodes and the keys `K` start at the graph's keys
//!   `norm(X')` (`X' = X + γ L B`, the visual nodes' class bias) and are then trained as Tip-Adapter-F trains
//!   its keys ([`keys`]), with each training image's own key left out of its cache sum. `(α, β)` are chosen
//!   as in [`select`]. The SPEC's probability-space fusion `(softmax(ℓ_t) + w·softmax(ℓ_c)) / (1 + w)` with
//!   `s = 100` in both branches lets an almost one-hot cache override the text classifier (−12 points on
//!   pets25 without validation) and cannot be tuned without a validation split.
//! - **The graph layers start at zero** ([`WeightInit::Zero`]): `tanh(H·0) = 0`, so before training `P' = P`
//!   and `X' = X` exactly. The SPEC's uniform ±1/√D start perturbs the zero-shot classifier at random
//!   (`‖P' − P‖ ≈ 0.15` per class) before any image is seen.
//! - **The graph layers are not trained by default** (`epochs = 0`). Trained 20 epochs with the SPEC's loss
//!   at the SPEC's learning rate they lost almost everywhere (Cars −0.5 to −2.3 points at 2–16 shots, pets25
//!   −1.8 at 1 shot, in both protocols); at a tenth of it they came within ±1 point of not training them
//!   either way (pets25 +0.5 at 1–2 shots; Cars −1.0 at 2 shots with validation, and 0.15 below zero-shot at
//!   1 shot without): with a few labels per class the `D×D` layers fit the labelled images (AdamW moves every
//!   weight by ≈ lr per step whatever the gradient's size) and nothing without a validation split can tell
//!   when to stop. Training-free message passing (`W = I`) did not help either (prototype). `--graph-epochs`
//!   (or [`TrainParams::epochs`]) trains them.
//!
//! # Other choices (where the SPEC leaves room), all settable in [`TrainParams`]
//! - AdamW with PyTorch semantics (decoupled weight decay 0.01, PyTorch's default), cosine schedule over all
//!   steps, `lr_t = lr · ½(1 + cos(π t / T))` for step `t` (0-based) of `T`.
//! - Every query (training view, image to classify) is L2-normalised before use; the features files already
//!   hold normalised rows, so this only guards against hand-made inputs.
//! - Tip-Adapter's `(α, β)` search uses Tip-Adapter's own grid (β over 200 steps in (0, 7], α over 20 steps
//!   in (0, 3], β outer, α inner, first best kept) on validation; without validation, [`select`]'s
//!   leave-one-out. Tip-Adapter-F trains with the chosen `(α, β)` and, with validation, searches again
//!   afterwards.
//! - Without text features only the visual-only "cache only" variants of Tip-Adapter(-F) can run:
//!   logits `exp(−β(1 − z Xᵀ)) L`, β searched on validation; the other methods fail with
//!   [`AdapterError::NeedsText`].
//! - In the SPEC's reading ([`Fusion::Probability`]) the fusion weight `w` (a SPEC choice, default 1) is
//!   chosen on the validation split when there is one: the best validation accuracy over `{0} ∪ [0.01, 10]`
//!   (log grid), ties broken by the lower validation cross-entropy of the fused probabilities.

pub mod bench;
mod cpu;
mod file;
pub mod hegraph;
mod keys;
mod schedule;
pub mod select;
mod tip;
pub mod transduce;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::features::LabelledSplit;
use crate::graph::{CacheKeys, GraphError, GraphOptions, HeteroGraph};
use crate::linalg::{softmax, Mat};
use crate::progress::CancelToken;

pub use cpu::CpuBackend;
pub use hegraph::{
    forward_graph, init_weights, loss_and_grads, loss_and_grads_f64, CacheByClass, CandleBackend,
    CandleFactory, FrozenInputs, GraphOutputs, HeGraphHyper, HeGraphState, HeGraphWeights,
    LossAndGrads, ParamState,
};
pub use schedule::{cosine_lr, epoch_batches, stack_queries, Batch};
pub use select::{search_grid, Choice, SearchResult, Selection};
pub use tip::tip_logits;
pub use transduce::{transduce, TransductionParams};

/// The methods the engine runs on the same features.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum Method {
    ZeroShot,
    TipAdapter,
    TipAdapterF,
    #[default]
    HeGraph,
}

impl Method {
    pub const ALL: [Method; 4] = [
        Method::ZeroShot,
        Method::TipAdapter,
        Method::TipAdapterF,
        Method::HeGraph,
    ];

    /// The name people read in tables ("Tip-Adapter-F", …).
    pub fn title(&self) -> &'static str {
        match self {
            Method::ZeroShot => "Zero-shot CLIP",
            Method::TipAdapter => "Tip-Adapter",
            Method::TipAdapterF => "Tip-Adapter-F",
            Method::HeGraph => "HeGraphAdapter",
        }
    }

    /// Whether the method has a visual-only form that runs without text features.
    pub fn has_cache_only_variant(&self) -> bool {
        matches!(self, Method::TipAdapter | Method::TipAdapterF)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::ZeroShot => "zero-shot",
            Method::TipAdapter => "tip-adapter",
            Method::TipAdapterF => "tip-adapter-f",
            Method::HeGraph => "hegraph",
        })
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let k = s.trim().to_lowercase().replace(['_', ' '], "-");
        match k.as_str() {
            "zero-shot" | "zeroshot" | "clip" => Ok(Method::ZeroShot),
            "tip-adapter" | "tip" => Ok(Method::TipAdapter),
            "tip-adapter-f" | "tip-f" => Ok(Method::TipAdapterF),
            "hegraph" | "hegraphadapter" | "hegraph-adapter" => Ok(Method::HeGraph),
            _ => Err(format!(
                "unknown method `{s}`; expected one of zero-shot, tip-adapter, tip-adapter-f, hegraph"
            )),
        }
    }
}

/// The GNN activation (SPEC: tanh is GraphAdapter's; the paper names none).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum Activation {
    #[default]
    Tanh,
    Identity,
}

/// How HeGraphAdapter combines its text and cache classifiers (module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum Fusion {
    /// `s·z norm(P')ᵀ + α·exp(−β(1 − z Kᵀ)) L` with trained keys `K` (the adopted reading).
    #[default]
    Logit,
    /// The SPEC's `(softmax(ℓ_t) + w·softmax(ℓ_c)) / (1 + w)`, cache logits at scale `s`.
    Probability,
}

/// How the graph layers `W_P, W_N, W_V` start (module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub enum WeightInit {
    /// All zero: the graph starts as the identity on its nodes (the adopted reading).
    #[default]
    Zero,
    /// The SPEC's uniform ±1/√D.
    Uniform,
}

/// Tip-Adapter's `(α, β)` search grid: `β_i = 0.1 + i·(β_max − 0.1)/β_steps`, likewise for α.
#[derive(Clone, Copy, PartialEq, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchGrid {
    pub beta_max: f32,
    pub beta_steps: usize,
    pub alpha_max: f32,
    pub alpha_steps: usize,
    /// β steps of the leave-one-out search (each held-out image is scored against every key, so the grid
    /// is coarser than validation's; 50 steps chose the same pair as 200 on the real sets to ±0.1 points).
    pub loo_beta_steps: usize,
}

impl Default for SearchGrid {
    fn default() -> Self {
        Self {
            beta_max: 7.0,
            beta_steps: 200,
            alpha_max: 3.0,
            alpha_steps: 20,
            loo_beta_steps: 50,
        }
    }
}

/// Every hyperparameter. [`TrainParams::default`] is the reading adopted by measurement (module docs),
/// [`TrainParams::spec`] the SPEC's. Missing fields in a saved file take their defaults, so older files keep
/// loading when a setting is added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainParams {
    pub seed: u64,
    /// Epochs of the graph layers' training (0: not trained; module docs).
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub adam_betas: (f32, f32),
    pub adam_eps: f32,
    pub weight_decay: f32,
    pub beta_pn: f32,
    pub beta_vn: f32,
    pub alpha_pp: f32,
    pub alpha_vp: f32,
    pub alpha_np_train: f32,
    pub alpha_np_test: f32,
    pub gamma: f32,
    /// CLIP's logit scale `s`.
    pub logit_scale: f32,
    /// Sharpness `β_c` of HeGraphAdapter's cache classifier.
    pub beta_c: f32,
    /// Weight `λ` of the cache loss.
    pub lambda: f32,
    /// How HeGraphAdapter's two classifiers are combined. (Adapter files from before this setting say
    /// nothing and were trained in the SPEC's reading: their loader fills in [`TrainParams::LEGACY`].)
    pub fusion: Fusion,
    /// How the graph layers start.
    pub weight_init: WeightInit,
    /// Logit fusion: leave each training image's own key out of its cache sum when training the keys.
    pub self_exclude: bool,
    /// Probability fusion: weight `w` of the cache classifier (used as is without validation images).
    pub fusion_weight: f32,
    /// Choose `w` on the validation split, when there is one (module docs).
    pub search_fusion_weight: bool,
    pub activation: Activation,
    pub cache_keys: CacheKeys,
    /// Use negative-text nodes when the features have them.
    pub use_negative: bool,
    /// Epochs, learning rate, AdamW ε and weight decay of the cache keys' training (Tip-Adapter-F, and
    /// HeGraphAdapter's logit fusion).
    pub tip_epochs: usize,
    pub tip_lr: f32,
    pub tip_eps: f32,
    pub tip_weight_decay: f32,
    /// Without a validation split, choose `(α, β)` by leave-one-out over the labelled images.
    pub leave_one_out: bool,
    /// The α used when nothing can choose it (no validation split, no class with two labels), with β =
    /// `tip_beta`; 0 keeps the zero-shot classifier ([`select`]).
    pub prior_alpha: f32,
    /// Cache-only temperature α and β used when nothing can choose them.
    pub tip_alpha: f32,
    pub tip_beta: f32,
    pub search: SearchGrid,
    /// The transductive refinement over unlabelled images (where a caller asks for it).
    pub transduction: TransductionParams,
    /// How often (in steps) the driver keeps a copy of a non-CPU backend's state to fall back to.
    pub snapshot_every: usize,
    /// Ask the backend for the batch loss every this many steps (and at the last step).
    pub loss_every: usize,
}

impl Default for TrainParams {
    fn default() -> Self {
        Self {
            seed: 1,
            epochs: 0,
            batch_size: 256,
            lr: 1e-3,
            adam_betas: (0.9, 0.999),
            adam_eps: 1e-8,
            weight_decay: 0.01,
            beta_pn: 0.5,
            beta_vn: 0.5,
            alpha_pp: 0.06,
            alpha_vp: 0.24,
            alpha_np_train: 0.2,
            alpha_np_test: 0.1,
            gamma: 0.5,
            logit_scale: 100.0,
            beta_c: 1.0,
            lambda: 0.1,
            fusion: Fusion::Logit,
            weight_init: WeightInit::Zero,
            self_exclude: true,
            fusion_weight: 1.0,
            search_fusion_weight: true,
            activation: Activation::Tanh,
            cache_keys: CacheKeys::MeanOfViews,
            use_negative: true,
            tip_epochs: 20,
            tip_lr: 1e-3,
            tip_eps: 1e-4,
            tip_weight_decay: 0.01,
            leave_one_out: true,
            prior_alpha: 1.0,
            tip_alpha: 1.0,
            tip_beta: 1.0,
            search: SearchGrid::default(),
            transduction: TransductionParams::default(),
            snapshot_every: 20,
            loss_every: 1,
        }
    }
}

impl TrainParams {
    /// The settings (as JSON fields) that files written before the adopted reading existed did not record
    /// because they were trained in the SPEC's: an adapter loader fills them in when absent.
    pub const LEGACY: [(&'static str, &'static str); 2] =
        [("fusion", "Probability"), ("weight_init", "Uniform")];

    /// Whether a stored settings object predates the adopted reading (it names no fusion).
    pub fn predates_fusion_setting(v: &serde_json::Value) -> bool {
        v.is_object() && v.get("fusion").is_none()
    }

    /// The SPEC's reading: probability fusion, uniform initial weights, the graph trained 20 epochs.
    pub fn spec() -> Self {
        Self {
            epochs: 20,
            fusion: Fusion::Probability,
            weight_init: WeightInit::Uniform,
            ..Self::default()
        }
    }

    /// The settings read from `key=value` pairs (the field names of this struct, values as JSON, a bare
    /// word as a string: `fusion=Probability`, `epochs=40`, `transduction.temperature=20`), for ablations.
    pub fn with_overrides(&self, pairs: &[String]) -> Result<Self, String> {
        let mut v = serde_json::to_value(self).map_err(|e| e.to_string())?;
        for pair in pairs {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}` is not key=value"))?;
            let value: serde_json::Value = serde_json::from_str(value.trim())
                .unwrap_or_else(|_| serde_json::Value::String(value.trim().to_string()));
            let mut slot = &mut v;
            for part in key.trim().split('.') {
                slot = slot
                    .get_mut(part)
                    .ok_or_else(|| format!("unknown setting `{key}`"))?;
            }
            *slot = value;
        }
        serde_json::from_value(v).map_err(|e| format!("invalid settings {pairs:?}: {e}"))
    }

    /// Why these settings cannot train, if they cannot: a number that is not finite (JSON, where they are
    /// stored, has no NaN), or a rate, size or scale that must be positive. Checked before any training and
    /// before an adapter file is written or accepted.
    pub fn check(&self) -> Result<(), String> {
        let v = serde_json::to_value(self).map_err(|e| e.to_string())?;
        if let Some(name) = first_null(&v) {
            return Err(format!("setting `{name}` is not a finite number"));
        }
        let positive = [
            ("lr", self.lr),
            ("tip_lr", self.tip_lr),
            ("adam_eps", self.adam_eps),
            ("tip_eps", self.tip_eps),
            ("logit_scale", self.logit_scale),
        ];
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("tip_weight_decay", self.tip_weight_decay),
            ("beta_c", self.beta_c),
            ("lambda", self.lambda),
            ("fusion_weight", self.fusion_weight),
            ("prior_alpha", self.prior_alpha),
            ("tip_alpha", self.tip_alpha),
            ("tip_beta", self.tip_beta),
        ];
        if let Some((name, x)) = positive.iter().find(|(_, x)| *x <= 0.0) {
            return Err(format!("setting `{name}` must be positive, not {x}"));
        }
        if let Some((name, x)) = non_negative.iter().find(|(_, x)| *x < 0.0) {
            return Err(format!("setting `{name}` must not be negative, not {x}"));
        }
        if self.batch_size == 0 {
            return Err("setting `batch_size` must be at least 1".into());
        }
        Ok(())
    }

    pub fn graph_options(&self) -> GraphOptions {
        GraphOptions {
            cache_keys: self.cache_keys,
        }
    }
}

/// The dotted name of the first `null` in `v` (a non-finite float, as serde_json writes one).
fn first_null(v: &serde_json::Value) -> Option<String> {
    let join = |key: String, rest: String| {
        if rest.is_empty() {
            key
        } else {
            format!("{key}.{rest}")
        }
    };
    match v {
        serde_json::Value::Null => Some(String::new()),
        serde_json::Value::Object(m) => m
            .iter()
            .find_map(|(k, x)| first_null(x).map(|rest| join(k.clone(), rest))),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| first_null(x).map(|rest| join(i.to_string(), rest))),
        _ => None,
    }
}

/// What a method trains on.
#[derive(Clone, Copy, Debug)]
pub struct TrainInput<'a> {
    pub classes: &'a [String],
    pub text: Option<&'a Mat>,
    pub text_neg: Option<&'a Mat>,
    pub train: &'a LabelledSplit,
    pub val: Option<&'a LabelledSplit>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TrainEvent {
    Step {
        step: usize,
        total: usize,
        epoch: usize,
        loss: Option<f32>,
    },
    Message(String),
}

/// Plain data: everything a backend needs to continue training elsewhere (weights, AdamW moments, step).
pub trait HeGraphBackend {
    fn name(&self) -> String;
    /// One AdamW step. `rows` index into the stacked query matrix the backend was built with (all views of all
    /// training images stacked view-major: row = view * M + image), `labels` per row. Returns the batch loss
    /// if asked. A backend must leave its weights untouched and return [`AdapterError::NonFinite`] when a
    /// step would make them NaN/∞, and return [`AdapterError::DeviceLost`] when its device is gone.
    fn step(
        &mut self,
        rows: &[u32],
        labels: &[u32],
        lr: f32,
        want_loss: bool,
    ) -> Result<Option<f32>, AdapterError>;
    fn state(&mut self) -> Result<HeGraphState, AdapterError>;
}

/// Builds a non-CPU backend (the GPU one). `queries` are the normalised stacked training views (view-major),
/// `state` the initial weights and moments (the driver makes them with [`init_weights`], so every backend
/// starts from the same numbers).
pub trait BackendFactory {
    fn name(&self) -> String;
    fn create(
        &self,
        graph: &HeteroGraph,
        queries: &Mat,
        params: &TrainParams,
        state: HeGraphState,
    ) -> Result<Box<dyn HeGraphBackend>, AdapterError>;
}

/// Where HeGraphAdapter trains. Baselines always run on the CPU (they are cheap).
#[derive(Clone, Copy, Default)]
pub enum BackendChoice<'a> {
    #[default]
    Cpu,
    Custom(&'a dyn BackendFactory),
}

impl fmt::Debug for BackendChoice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Cpu => f.write_str("Cpu"),
            BackendChoice::Custom(b) => write!(f, "Custom({})", b.name()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{method} needs text features, and these features have none (extract them with a CLIP text encoder, or use the cache-only Tip-Adapter variants)")]
    NeedsText { method: Method },
    #[error("invalid training input: {0}")]
    Input(String),
    #[error("cannot build the graph: {0}")]
    Graph(#[from] GraphError),
    #[error("training stopped at step {step}: {what} became NaN or infinite, so no adapter was produced; lower the learning rate, or check the features (all-zero or identical features carry no signal)")]
    NonFinite {
        step: usize,
        what: String,
        /// The adapter with the weights of the last good step, when the driver could recover them (a caller may
        /// offer it; nothing is written on its behalf).
        last_good: Option<Box<TrainedAdapter>>,
    },
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    #[error("training was cancelled")]
    Cancelled,
    #[error("{backend} backend: {msg}")]
    Backend { backend: String, msg: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("adapter file {path}: {msg}")]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("adapter file {path} has format version {found}, but this program reads version {supported}; {hint}")]
    Version {
        path: std::path::PathBuf,
        found: String,
        supported: u32,
        hint: &'static str,
    },
    #[error("cannot predict: {0}")]
    Predict(String),
}

/// The tensors of a trained adapter. Which are present depends on the method (see [`TrainedAdapter`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterTensors {
    #[serde(with = "file::opt_mat")]
    pub text: Option<Mat>,
    #[serde(with = "file::opt_mat")]
    pub text_neg: Option<Mat>,
    /// Cache keys `X` (Tip-Adapter-F: the trained keys) or the graph's cache keys.
    #[serde(with = "file::opt_mat")]
    pub keys: Option<Mat>,
    /// HeGraphAdapter's logit fusion: the trained keys `K` of its cache classifier (rows as `key_labels`).
    #[serde(default, with = "file::opt_mat")]
    pub fused_keys: Option<Mat>,
    pub key_labels: Vec<usize>,
    /// The graph's visual nodes.
    #[serde(with = "file::opt_mat")]
    pub visual: Option<Mat>,
    pub has_visual: Vec<bool>,
    #[serde(with = "file::opt_mat")]
    pub w_p: Option<Mat>,
    #[serde(with = "file::opt_mat")]
    pub w_n: Option<Mat>,
    #[serde(with = "file::opt_mat")]
    pub w_v: Option<Mat>,
}

/// A trained adapter: enough to classify new features, draw the graph and be saved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainedAdapter {
    pub method: Method,
    /// Tip-Adapter(-F) without text: the cache classifier alone.
    pub cache_only: bool,
    pub classes: Vec<String>,
    pub params: TrainParams,
    pub notes: Vec<String>,
    /// The `(α, β)` of a Tip-style classifier as used for prediction (Tip-Adapter(-F), HeGraphAdapter's logit
    /// fusion).
    pub alpha: Option<f32>,
    pub beta: Option<f32>,
    /// How `alpha` and `beta` were chosen.
    pub selection: Option<Selection>,
    /// HeGraphAdapter's fusion weight `w` when it was chosen on validation (else `params.fusion_weight`).
    pub fusion_weight: Option<f32>,
    /// Top-1 accuracy on the validation split, when there was one (fraction in [0, 1]).
    pub val_accuracy: Option<f32>,
    /// `(step, batch loss)` as reported during training.
    pub losses: Vec<(usize, f32)>,
    /// The backend that trained it (e.g. "cpu", "cpu (candle)", "wgpu (NVIDIA H200 (Vulkan, DiscreteGpu))").
    pub backend: Option<String>,
    pub tensors: AdapterTensors,
    #[serde(skip)]
    derived: OnceLock<Result<Derived, String>>,
}

/// What prediction needs, computed once from the tensors.
#[derive(Clone, Debug)]
struct Derived {
    graph: Option<HeteroGraph>,
    /// Normalised text classifier (P, or P' for HeGraphAdapter).
    text_cls: Option<Mat>,
    /// Cache keys as used at prediction (X, trained X, or normalised X').
    keys: Option<Mat>,
}

impl TrainedAdapter {
    pub(crate) fn new(
        method: Method,
        classes: &[String],
        params: &TrainParams,
        tensors: AdapterTensors,
    ) -> Self {
        Self {
            method,
            cache_only: false,
            classes: classes.to_vec(),
            params: params.clone(),
            notes: Vec::new(),
            alpha: None,
            beta: None,
            selection: None,
            fusion_weight: None,
            val_accuracy: None,
            losses: Vec::new(),
            backend: None,
            tensors,
            derived: OnceLock::new(),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// A short name for tables: "Tip-Adapter (cache only)" etc.
    pub fn title(&self) -> String {
        if self.cache_only {
            format!("{} (cache only)", self.method.title())
        } else {
            self.method.title().to_string()
        }
    }

    fn derived(&self) -> Result<&Derived, AdapterError> {
        self.derived
            .get_or_init(|| self.compute_derived().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| AdapterError::Predict(e.clone()))
    }

    fn compute_derived(&self) -> Result<Derived, AdapterError> {
        let t = &self.tensors;
        match self.method {
            Method::HeGraph => {
                let graph = self.rebuild_graph()?;
                let weights = HeGraphWeights {
                    w_p: t.w_p.clone().ok_or_else(|| missing("w_p"))?,
                    w_n: t.w_n.clone(),
                    w_v: t.w_v.clone().ok_or_else(|| missing("w_v"))?,
                };
                let hyper = HeGraphHyper::test(&self.params);
                let out = forward_graph(&graph, &hyper, &weights)?;
                let keys = match (self.params.fusion, &t.fused_keys) {
                    (Fusion::Logit, Some(k)) => k.clone(),
                    (Fusion::Logit, None) => return Err(missing("fused_keys")),
                    (Fusion::Probability, _) => out.x_prime.normalized_rows(),
                };
                Ok(Derived {
                    text_cls: Some(out.p_prime.normalized_rows()),
                    keys: Some(keys),
                    graph: Some(graph),
                })
            }
            _ => Ok(Derived {
                graph: None,
                text_cls: t.text.as_ref().map(|p| p.normalized_rows()),
                keys: t.keys.clone(),
            }),
        }
    }

    fn rebuild_graph(&self) -> Result<HeteroGraph, AdapterError> {
        let t = &self.tensors;
        let p = t.text.as_ref().ok_or_else(|| missing("text"))?;
        let v = t.visual.as_ref().ok_or_else(|| missing("visual"))?;
        let keys = t.keys.clone().ok_or_else(|| missing("keys"))?;
        Ok(HeteroGraph::from_nodes(
            &self.classes,
            p,
            t.text_neg.as_ref(),
            v,
            t.has_visual.clone(),
            keys,
            t.key_labels.clone(),
            &self.params.graph_options(),
        )?)
    }

    /// The heterogeneous graph (HeGraphAdapter only), for the GUI.
    pub fn graph(&self) -> Option<&HeteroGraph> {
        self.derived().ok().and_then(|d| d.graph.as_ref())
    }

    /// Per-class probabilities for each row of `z` (rows are normalised first); rows sum to 1.
    pub fn predict(&self, z: &Mat) -> Result<Mat, AdapterError> {
        let d = self.derived()?;
        let c = self.classes.len();
        let dim = d
            .text_cls
            .as_ref()
            .map(|m| m.cols)
            .or(d.keys.as_ref().map(|m| m.cols))
            .unwrap_or(0);
        if z.cols != dim {
            return Err(AdapterError::Predict(format!(
                "the features have dimension {} but the adapter was trained on dimension {dim}; use the same CLIP model",
                z.cols
            )));
        }
        if !z.is_finite() {
            return Err(AdapterError::Predict(
                "the features contain NaN or infinity; re-extract them".into(),
            ));
        }
        let z = z.normalized_rows();
        let s = self.params.logit_scale;
        let mut out = Mat::zeros(z.rows, c);
        match self.method {
            Method::HeGraph if self.params.fusion == Fusion::Logit => {
                let logits = tip_logits(
                    &z,
                    d.text_cls.as_ref(),
                    d.keys
                        .as_ref()
                        .map(|k| (k, self.tensors.key_labels.as_slice())),
                    c,
                    s,
                    self.alpha.unwrap_or(self.params.prior_alpha),
                    self.beta.unwrap_or(self.params.tip_beta),
                );
                for r in 0..z.rows {
                    out.row_mut(r).copy_from_slice(&softmax(logits.row(r)));
                }
            }
            Method::HeGraph => {
                let (pt, pc) = self.hegraph_branches(&z)?;
                let w = self.fusion_weight.unwrap_or(self.params.fusion_weight);
                for (o, (a, b)) in out.data.iter_mut().zip(pt.data.iter().zip(&pc.data)) {
                    *o = (a + w * b) / (1.0 + w);
                }
            }
            Method::ZeroShot | Method::TipAdapter | Method::TipAdapterF => {
                let alpha = if self.method == Method::ZeroShot {
                    0.0
                } else {
                    self.alpha.unwrap_or(self.params.tip_alpha)
                };
                let beta = self.beta.unwrap_or(self.params.tip_beta);
                let keys = if alpha > 0.0 || self.cache_only {
                    d.keys.as_ref()
                } else {
                    None
                };
                let logits = tip_logits(
                    &z,
                    if self.cache_only {
                        None
                    } else {
                        d.text_cls.as_ref()
                    },
                    keys.map(|k| (k, self.tensors.key_labels.as_slice())),
                    c,
                    s,
                    alpha,
                    beta,
                );
                for r in 0..z.rows {
                    out.row_mut(r).copy_from_slice(&softmax(logits.row(r)));
                }
            }
        }
        Ok(out)
    }

    /// HeGraphAdapter's two classifiers in the SPEC's reading on normalised queries: `(softmax(ℓ_t),
    /// softmax(ℓ_c))`, row per query.
    pub fn hegraph_branches(&self, z: &Mat) -> Result<(Mat, Mat), AdapterError> {
        let d = self.derived()?;
        let (Some(tc), Some(keys)) = (&d.text_cls, &d.keys) else {
            return Err(AdapterError::Predict(
                "the adapter has no HeGraphAdapter classifier tensors".into(),
            ));
        };
        let c = self.classes.len();
        let s = self.params.logit_scale;
        let bc = self.params.beta_c;
        let lt = z.matmul_t(tc);
        let aff = z.matmul_t(keys);
        let mut pt = Mat::zeros(z.rows, c);
        let mut pc = Mat::zeros(z.rows, c);
        for r in 0..z.rows {
            let t: Vec<f32> = lt.row(r).iter().map(|x| s * x).collect();
            let mut cache = vec![0.0f32; c];
            for (m, &a) in aff.row(r).iter().enumerate() {
                cache[self.tensors.key_labels[m]] += (bc * (a - 1.0)).exp();
            }
            cache.iter_mut().for_each(|x| *x *= s);
            pt.row_mut(r).copy_from_slice(&softmax(&t));
            pc.row_mut(r).copy_from_slice(&softmax(&cache));
        }
        Ok((pt, pc))
    }

    /// Top-1 accuracy (fraction) on a labelled split.
    pub fn accuracy(&self, split: &LabelledSplit) -> Result<f32, AdapterError> {
        let p = self.predict(&split.features)?;
        Ok(accuracy_of(&p, &split.labels))
    }

    pub fn save(&self, path: &Path) -> Result<(), AdapterError> {
        file::save(self, path)
    }

    pub fn load(path: &Path) -> Result<Self, AdapterError> {
        let a = file::load(path)?;
        // Surface a broken file now rather than at the first prediction, naming the file.
        a.derived().map_err(|e| AdapterError::File {
            path: path.to_path_buf(),
            msg: format!("{e}; the file is damaged: retrain the adapter"),
        })?;
        Ok(a)
    }
}

fn missing(what: &str) -> AdapterError {
    AdapterError::Predict(format!("the adapter lacks its `{what}` tensor; retrain it"))
}

/// Top-1 accuracy of probability (or logit) rows against labels.
pub fn accuracy_of(scores: &Mat, labels: &[usize]) -> f32 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = labels
        .iter()
        .enumerate()
        .filter(|(r, &l)| crate::linalg::argmax(scores.row(*r)) == l)
        .count();
    hits as f32 / labels.len() as f32
}

/// Trains `method` on `input`. HeGraphAdapter runs on `backend`; the baselines on the CPU.
pub fn train(
    method: Method,
    params: &TrainParams,
    input: &TrainInput,
    backend: BackendChoice,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainedAdapter, AdapterError> {
    validate_input(params, input)?;
    match method {
        Method::ZeroShot => tip::train_zero_shot(params, input),
        Method::TipAdapter => tip::train_tip_adapter(params, input),
        Method::TipAdapterF => tip::train_tip_adapter_f(params, input, cancel, on_event),
        Method::HeGraph => hegraph::train_hegraph(params, input, backend, cancel, on_event),
    }
}

fn validate_input(params: &TrainParams, input: &TrainInput) -> Result<(), AdapterError> {
    params.check().map_err(AdapterError::Input)?;
    let c = input.classes.len();
    if c == 0 {
        return Err(AdapterError::Input("there are no classes".into()));
    }
    let tr = input.train;
    // With no labelled image yet (zero-shot on a fresh project) the text decides the dimension.
    let d = if tr.is_empty() {
        input.text.map(|t| t.cols).unwrap_or(tr.features.cols)
    } else {
        tr.features.cols
    };
    let check = |name: &str, m: &Mat, rows: Option<usize>| -> Result<(), AdapterError> {
        if m.cols != d {
            return Err(AdapterError::Input(format!(
                "{name} have dimension {} but the training features have {d}",
                m.cols
            )));
        }
        if let Some(r) = rows {
            if m.rows != r {
                return Err(AdapterError::Input(format!(
                    "{name} have {} rows, expected {r}",
                    m.rows
                )));
            }
        }
        if let Some(r) = m.first_non_finite_row() {
            return Err(AdapterError::Input(format!(
                "{name}: row {r} contains NaN or infinity; re-extract the features"
            )));
        }
        Ok(())
    };
    if !tr.is_empty() {
        check("training features", &tr.features, Some(tr.labels.len()))?;
    }
    if let Some(views) = tr.views.as_ref().filter(|_| !tr.is_empty()) {
        for (a, v) in views.iter().enumerate() {
            check(
                &format!("training view {a} features"),
                v,
                Some(tr.labels.len()),
            )?;
        }
    }
    if let Some((i, l)) = tr.labels.iter().enumerate().find(|(_, &l)| l >= c) {
        return Err(AdapterError::Input(format!(
            "training image {i} has label {l}, but there are {c} classes"
        )));
    }
    if let Some(t) = input.text {
        check("text features", t, Some(c))?;
    }
    if let Some(t) = input.text_neg {
        check("negative text features", t, Some(c))?;
    }
    if let Some(v) = input.val {
        check("validation features", &v.features, Some(v.labels.len()))?;
        if let Some((i, l)) = v.labels.iter().enumerate().find(|(_, &l)| l >= c) {
            return Err(AdapterError::Input(format!(
                "validation image {i} has label {l}, but there are {c} classes"
            )));
        }
    }
    if params.batch_size == 0 {
        return Err(AdapterError::Input("batch size must be at least 1".into()));
    }
    Ok(())
}
