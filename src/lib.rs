//! # hegraph
//!
//! Few-shot image classification with CLIP and the Heterogeneous Graph Adapter (HeGraphAdapter,
//! Zhao et al., arXiv 2410.07854).
//!
//! The engine (everything but [`app`]) knows nothing of the GUI:
//! - [`clip`]: CLIP through candle: checkpoint look-up and download, OpenAI preprocessing, image/text encoding.
//! - [`data`]: image folders, class names, label CSVs, robust image decoding.
//! - [`cache`]: the on-disk feature cache keyed by model, image content and view.
//! - [`features`]: the features file (per-split features, labels, class names, text features).
//! - [`stored_path`]: file names in files a program reads back, byte-exact (`\xNN` for non-UTF-8 bytes).
//! - [`prompts`]: prompt templates and their negative ("a photo of no {}") forms.
//! - [`similarity`]: cosine ranking against a query (a phrase, "more like this") and near-duplicate groups.
//! - [`graph`]: the heterogeneous graph (visual, positive-text and negative-text nodes, six edge types).
//! - [`adapter`]: HeGraphAdapter and the baselines (zero-shot, Tip-Adapter, Tip-Adapter-F) on the CPU
//!   reference backend (candle autodiff), training and prediction.
//! - [`gpu`]: the wgpu runtime and WGSL kernels, and the adapter's training on them.
//! - [`eval`]: the few-shot evaluation protocol of the field.
//! - [`embedding_map`]: the 2-D maps of the image features that the map view draws: PCA, and t-SNE (through
//!   `bhtsne`, cached on disk).
//! - [`chart_png`]: the training view's charts (accuracy against labels, confusion matrix) as PNG files.
//! - [`review`]: k-fold held-out predictions on the labelled images (likely mistakes, accuracy, confusion).
//! - [`app`]: the egui/eframe desktop application.

pub mod linalg;
pub mod progress;
pub mod rng;
pub mod stored_path;

pub mod adapter;
pub mod app;
pub mod bench;
pub mod cache;
pub mod chart_png;
pub mod clip;
pub mod data;
pub mod embedding_map;
pub mod eval;
pub mod extract;
pub mod features;
pub mod gpu;
pub mod graph;
pub mod project;
pub mod prompts;
pub mod review;
pub mod similarity;
