//! CLIP through candle: checkpoint look-up and download, OpenAI preprocessing, image and text encoding.
//!
//! A model directory is always a Hugging Face CLIP directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`) loaded with `candle_transformers::models::clip`. The same code path loads the real
//! checkpoint and the small random-weight *test checkpoint* that [`test_checkpoint`] writes, so that the
//! loading code is exercised on machines where no real CLIP can be downloaded. A test checkpoint says so in
//! [`ModelInfo::banner`], which every output shows.

pub mod bench;
pub mod cpu;
pub mod device_bench;
pub mod hub;
pub mod image_encoder;
pub mod model;
pub mod preprocess;
pub mod reference;
pub mod test_checkpoint;

use std::path::PathBuf;

pub use bench::{bench_clip, ClipBench};
pub use hub::{resolve_model_dir, resolve_model_dir_reporting, user_model_dir, DEFAULT_MODEL_REPO};
pub use image_encoder::{ClipDevice, ImageEncoder};
pub use model::{ClipModel, ModelInfo};
pub use preprocess::ImageTensor;
pub use test_checkpoint::{write_test_checkpoint, TestCheckpointConfig};

/// Everything that can go wrong between a model directory (or an image file) and an embedding.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error(
        "{file} is missing from the CLIP model directory {dir}: a model directory needs config.json, \
         model.safetensors and tokenizer.json (Hugging Face layout, e.g. from \
         https://huggingface.co/openai/clip-vit-base-patch32)"
    )]
    MissingFile { dir: PathBuf, file: String },

    /// `origin` says where the directory came from ("the model directory " or "HEGRAPH_MODEL_DIR=").
    #[error(
        "{origin}{dir} lacks {missing}: a CLIP model directory needs config.json, model.safetensors and \
         tokenizer.json (Hugging Face layout, e.g. from https://huggingface.co/openai/clip-vit-base-patch32)"
    )]
    BadModelDir {
        origin: String,
        dir: PathBuf,
        missing: String,
    },

    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot use the CLIP config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("cannot load the CLIP weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    #[error("cannot load the tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("cannot tokenize {text:?}: {msg}")]
    Tokenize { text: String, msg: String },

    /// `file` is the path as the person gave it, or "image in memory".
    #[error("cannot decode image {file}: {msg}")]
    Image { file: String, msg: String },

    #[error("bad input to the CLIP encoder: {0}")]
    Input(String),

    #[error("CLIP computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("CLIP image encoding on the GPU failed: {0}")]
    Gpu(#[from] crate::gpu::GpuError),

    #[error("{0}")]
    Download(String),

    #[error("cannot write {path}: {msg}")]
    Write { path: PathBuf, msg: String },
}
