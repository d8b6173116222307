//! candle-transformers' CLIP run the straightforward way (what hegraph ran before [`super::cpu`]): the
//! reference the fused towers are checked against, by `tests/clip.rs` on the test checkpoint and by
//! `hegraph bench clip` on the ViT-B/32-sized one.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip as cclip;

use super::model::{parse_config, CONFIG_FILE, WEIGHTS_FILE};
use super::preprocess::ImageTensor;
use super::ClipError;
use crate::linalg::Mat;

/// Padding of a batch of prompts: below the end-of-text id, so the pooled position (the largest id) is the
/// prompt's own end token; the causal mask keeps the padding from reaching it.
const PAD: u32 = 0;

pub struct ReferenceClip {
    model: cclip::ClipModel,
    image_size: usize,
}

impl ReferenceClip {
    pub fn load(dir: &Path) -> Result<Self, ClipError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| ClipError::Io {
            path: config_path.clone(),
            source,
        })?;
        let parsed = parse_config(&text).map_err(|msg| ClipError::Config {
            path: config_path,
            msg,
        })?;
        let weights = dir.join(WEIGHTS_FILE);
        let err = |e: candle_core::Error| ClipError::Weights {
            path: weights.clone(),
            msg: e.to_string(),
        };
        // SAFETY: as in `ClipModel::load`: the mapping lives only while `ClipModel::new` copies the tensors
        // out, and a model directory is not truncated meanwhile.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&weights),
                DType::F32,
                &Device::Cpu,
            )
        }
        .map_err(err)?;
        let model = cclip::ClipModel::new(vb, &parsed.clip).map_err(err)?;
        Ok(Self {
            model,
            image_size: parsed.clip.vision_config.image_size,
        })
    }

    /// L2-normalised features of images preprocessed at the model's size, in one batch.
    pub fn encode_images(&self, images: &[ImageTensor]) -> Result<Mat, ClipError> {
        let s = self.image_size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
        for t in images {
            pixels.extend_from_slice(&t.data);
        }
        let x = Tensor::from_vec(pixels, (images.len(), 3, s, s), &Device::Cpu)?;
        let f = self.model.get_image_features(&x)?;
        normalized(&f)
    }

    /// L2-normalised features of tokenised prompts, padded to the longest and run as one batch.
    pub fn encode_token_ids(&self, ids: &[Vec<u32>]) -> Result<Mat, ClipError> {
        let len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(ids.len() * len);
        for row in ids {
            flat.extend_from_slice(row);
            flat.resize(flat.len() + len - row.len(), PAD);
        }
        let x = Tensor::from_vec(flat, (ids.len(), len), &Device::Cpu)?;
        let f = self.model.get_text_features(&x)?;
        normalized(&f)
    }
}

fn normalized(f: &Tensor) -> Result<Mat, ClipError> {
    let (rows, cols) = f.dims2()?;
    let mut m = Mat::from_vec(rows, cols, f.flatten_all()?.to_vec1::<f32>()?);
    m.l2_normalize_rows();
    Ok(m)
}
