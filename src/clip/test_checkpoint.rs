//! A random-weight CLIP checkpoint in the exact Hugging Face layout, written by hegraph itself.
//!
//! No real CLIP checkpoint can reach the machines this project is built and tested on, yet the loading code
//! must be the real one. This writes what `transformers.CLIPModel.save_pretrained` writes (`config.json` in
//! `CLIPConfig` layout, `model.safetensors` with every tensor of `CLIPModel` under its exact name and shape,
//! including the `position_ids` buffers older checkpoints carry and `logit_scale`) plus the bundled CLIP
//! `tokenizer.json`. Its `config.json` says `"hegraph_test_checkpoint": true`, which [`super::ModelInfo`]
//! turns into a banner on every output: its predictions mean nothing.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde_json::json;

use super::hub::{bundled_tokenizer, write_atomically};
use super::model::{CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use super::ClipError;
use crate::rng::Rng;

/// Sizes of a test checkpoint. The tokenizer is CLIP's, so the vocabulary stays 49,408 and the context 77.
#[derive(Clone, Debug, PartialEq)]
pub struct TestCheckpointConfig {
    pub text_hidden: usize,
    pub text_intermediate: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub vision_hidden: usize,
    pub vision_intermediate: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub projection_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// Store the weights as F16, as some Hugging Face repositories do (the loader converts to F32).
    pub half_precision: bool,
}

impl TestCheckpointConfig {
    /// Small enough for debug-profile tests (~13 MB, almost all of it the token embedding). The 32-pixel
    /// input (patch 8) also checks that nothing assumes CLIP's usual 224.
    pub fn tiny() -> Self {
        Self {
            text_hidden: 64,
            text_intermediate: 256,
            text_layers: 2,
            text_heads: 4,
            vision_hidden: 64,
            vision_intermediate: 256,
            vision_layers: 2,
            vision_heads: 4,
            image_size: 32,
            patch_size: 8,
            projection_dim: 64,
            vocab_size: 49_408,
            max_position_embeddings: 77,
            half_precision: false,
        }
    }

    /// The real ViT-B/32 sizes (~600 MB of random weights), so speed can be measured where the real
    /// checkpoint cannot be had.
    pub fn vit_b_32() -> Self {
        Self {
            text_hidden: 512,
            text_intermediate: 2048,
            text_layers: 12,
            text_heads: 8,
            vision_hidden: 768,
            vision_intermediate: 3072,
            vision_layers: 12,
            vision_heads: 12,
            image_size: 224,
            patch_size: 32,
            projection_dim: 512,
            vocab_size: 49_408,
            max_position_embeddings: 77,
            half_precision: false,
        }
    }

    fn check(&self) -> Result<(), String> {
        let dims = [
            ("text_hidden", self.text_hidden),
            ("text_intermediate", self.text_intermediate),
            ("text_layers", self.text_layers),
            ("text_heads", self.text_heads),
            ("vision_hidden", self.vision_hidden),
            ("vision_intermediate", self.vision_intermediate),
            ("vision_layers", self.vision_layers),
            ("vision_heads", self.vision_heads),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("projection_dim", self.projection_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.text_hidden.is_multiple_of(self.text_heads)
            || !self.vision_hidden.is_multiple_of(self.vision_heads)
        {
            return Err("hidden sizes must be multiples of their head counts".into());
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err("image_size must be a multiple of patch_size".into());
        }
        if self.vocab_size < 49_408 {
            return Err("vocab_size must cover the CLIP tokenizer's 49,408 tokens".into());
        }
        Ok(())
    }

    fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// transformers' `config.json` for this checkpoint.
    fn config_json(&self, seed: u64) -> serde_json::Value {
        json!({
            "_name_or_path": "hegraph-test-checkpoint",
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "hegraph_test_checkpoint": true,
            "hegraph_test_checkpoint_seed": seed,
            "initializer_factor": 1.0,
            "logit_scale_init_value": 2.6592,
            "projection_dim": self.projection_dim,
            "torch_dtype": if self.half_precision { "float16" } else { "float32" },
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": self.vocab_size,
                "hidden_size": self.text_hidden,
                "intermediate_size": self.text_intermediate,
                "num_hidden_layers": self.text_layers,
                "num_attention_heads": self.text_heads,
                "max_position_embeddings": self.max_position_embeddings,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": self.projection_dim,
                "bos_token_id": 49406,
                "eos_token_id": 49407,
                "pad_token_id": 1
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.vision_hidden,
                "intermediate_size": self.vision_intermediate,
                "num_hidden_layers": self.vision_layers,
                "num_attention_heads": self.vision_heads,
                "num_channels": 3,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": self.projection_dim
            }
        })
    }

    /// Every tensor of transformers' `CLIPModel` state dict, with roughly its initialisation scales (so
    /// activations stay in a sane range through the layers).
    fn tensor_specs(&self) -> Vec<Spec> {
        let mut specs = Vec::new();
        let t = self.text_hidden;
        let v = self.vision_hidden;
        let mut push =
            |name: String, shape: Vec<usize>, init: Init| specs.push(Spec { name, shape, init });

        push(
            "text_model.embeddings.token_embedding.weight".into(),
            vec![self.vocab_size, t],
            Init::Normal(0.02),
        );
        push(
            "text_model.embeddings.position_embedding.weight".into(),
            vec![self.max_position_embeddings, t],
            Init::Normal(0.01),
        );
        push(
            "text_model.embeddings.position_ids".into(),
            vec![1, self.max_position_embeddings],
            Init::PositionIds,
        );
        encoder_specs(
            &mut push,
            "text_model",
            t,
            self.text_intermediate,
            self.text_layers,
        );
        layer_norm_specs(&mut push, "text_model.final_layer_norm", t);

        push(
            "vision_model.embeddings.class_embedding".into(),
            vec![v],
            Init::Normal((v as f32).powf(-0.5)),
        );
        push(
            "vision_model.embeddings.patch_embedding.weight".into(),
            vec![v, 3, self.patch_size, self.patch_size],
            Init::Normal(((3 * self.patch_size * self.patch_size) as f32).powf(-0.5)),
        );
        push(
            "vision_model.embeddings.position_embedding.weight".into(),
            vec![self.num_positions(), v],
            Init::Normal(0.02),
        );
        push(
            "vision_model.embeddings.position_ids".into(),
            vec![1, self.num_positions()],
            Init::PositionIds,
        );
        // Spelled "pre_layrnorm" in transformers, and so in every checkpoint.
        layer_norm_specs(&mut push, "vision_model.pre_layrnorm", v);
        encoder_specs(
            &mut push,
            "vision_model",
            v,
            self.vision_intermediate,
            self.vision_layers,
        );
        layer_norm_specs(&mut push, "vision_model.post_layernorm", v);

        push(
            "visual_projection.weight".into(),
            vec![self.projection_dim, v],
            Init::Normal((v as f32).powf(-0.5)),
        );
        push(
            "text_projection.weight".into(),
            vec![self.projection_dim, t],
            Init::Normal((t as f32).powf(-0.5)),
        );
        push("logit_scale".into(), vec![], Init::Const(2.6592));
        specs
    }
}

enum Init {
    Normal(f32),
    LayerNormWeight,
    Const(f32),
    PositionIds,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

fn layer_norm_specs(push: &mut impl FnMut(String, Vec<usize>, Init), prefix: &str, width: usize) {
    push(
        format!("{prefix}.weight"),
        vec![width],
        Init::LayerNormWeight,
    );
    push(format!("{prefix}.bias"), vec![width], Init::Normal(0.02));
}

fn encoder_specs(
    push: &mut impl FnMut(String, Vec<usize>, Init),
    tower: &str,
    width: usize,
    intermediate: usize,
    layers: usize,
) {
    let attn_std = (width as f32).powf(-0.5) * ((2 * layers) as f32).powf(-0.5);
    let out_std = (width as f32).powf(-0.5);
    let fc_std = ((2 * width) as f32).powf(-0.5);
    for l in 0..layers {
        let p = format!("{tower}.encoder.layers.{l}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            let std = if proj == "out_proj" {
                out_std
            } else {
                attn_std
            };
            push(
                format!("{p}.self_attn.{proj}.weight"),
                vec![width, width],
                Init::Normal(std),
            );
            push(
                format!("{p}.self_attn.{proj}.bias"),
                vec![width],
                Init::Normal(0.02),
            );
        }
        layer_norm_specs(push, &format!("{p}.layer_norm1"), width);
        push(
            format!("{p}.mlp.fc1.weight"),
            vec![intermediate, width],
            Init::Normal(fc_std),
        );
        push(
            format!("{p}.mlp.fc1.bias"),
            vec![intermediate],
            Init::Normal(0.02),
        );
        push(
            format!("{p}.mlp.fc2.weight"),
            vec![width, intermediate],
            Init::Normal(attn_std),
        );
        push(format!("{p}.mlp.fc2.bias"), vec![width], Init::Normal(0.02));
        layer_norm_specs(push, &format!("{p}.layer_norm2"), width);
    }
}

/// Tensor `i` draws from its own stream `(seed, i)`, so tensors can be generated in parallel and the values
/// do not depend on the thread count.
fn make_tensor(spec: &Spec, index: usize, seed: u64, dtype: DType) -> candle_core::Result<Tensor> {
    let n: usize = spec.shape.iter().product();
    let dev = &Device::Cpu;
    let mut rng = Rng::derive(seed, &[index as u64]);
    let values: Vec<f32> = match spec.init {
        Init::PositionIds => {
            let ids: Vec<i64> = (0..n as i64).collect();
            return Tensor::from_vec(ids, spec.shape.as_slice(), dev);
        }
        Init::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
        Init::LayerNormWeight => (0..n).map(|_| 1.0 + rng.normal() * 0.02).collect(),
        Init::Const(c) => vec![c; n],
    };
    Tensor::from_vec(values, spec.shape.as_slice(), dev)?.to_dtype(dtype)
}

/// The seed of the test checkpoint that the CLI (`--test-checkpoint`) and the GUI write, so both produce the
/// same weights and share cache entries.
pub const APP_TEST_CHECKPOINT_SEED: u64 = 0;

/// Where the app's test checkpoint lives below `base` (the CLI's user cache, the GUI's user folder).
pub fn app_test_checkpoint_dir(base: &Path) -> std::path::PathBuf {
    base.join("models").join("hegraph-test-checkpoint")
}

/// Loads the app's test checkpoint ([`TestCheckpointConfig::tiny`]) from `dir`, writing it first when it is
/// absent and again when it is damaged: it is generated, so there is never anything to download. The note
/// says when a damaged one was replaced.
pub fn load_or_write_app_test_checkpoint(
    dir: &Path,
) -> Result<(super::ClipModel, Option<String>), ClipError> {
    let write =
        || write_test_checkpoint(dir, &TestCheckpointConfig::tiny(), APP_TEST_CHECKPOINT_SEED);
    if !dir.join(WEIGHTS_FILE).exists() {
        write()?;
    }
    match super::ClipModel::load(dir) {
        Ok(m) => Ok((m, None)),
        Err(e) => {
            let note = format!(
                "the test checkpoint in {} was damaged ({e}); writing it again",
                dir.display()
            );
            write()?;
            Ok((super::ClipModel::load(dir)?, Some(note)))
        }
    }
}

/// Writes `config.json`, `model.safetensors` (random values from `seed`) and `tokenizer.json` into `dir`
/// (created if needed).
pub fn write_test_checkpoint(
    dir: &Path,
    cfg: &TestCheckpointConfig,
    seed: u64,
) -> Result<(), ClipError> {
    cfg.check().map_err(|msg| ClipError::Write {
        path: dir.to_path_buf(),
        msg: format!("bad test checkpoint sizes: {msg}"),
    })?;
    std::fs::create_dir_all(dir).map_err(|source| ClipError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let dtype = if cfg.half_precision {
        DType::F16
    } else {
        DType::F32
    };
    let specs = cfg.tensor_specs();
    let tensors: HashMap<String, Tensor> = specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| Ok((spec.name.clone(), make_tensor(spec, i, seed, dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = weights.with_extension("part");
    candle_core::safetensors::save(&tensors, &tmp)
        .and_then(|()| std::fs::rename(&tmp, &weights).map_err(candle_core::Error::from))
        .map_err(|e| ClipError::Write {
            path: weights.clone(),
            msg: e.to_string(),
        })?;

    let config =
        serde_json::to_vec_pretty(&cfg.config_json(seed)).map_err(|e| ClipError::Write {
            path: dir.join(CONFIG_FILE),
            msg: e.to_string(),
        })?;
    write_atomically(&dir.join(CONFIG_FILE), &config)?;
    write_atomically(&dir.join(TOKENIZER_FILE), bundled_tokenizer())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b_32_has_the_real_parameter_count() {
        // transformers' CLIPModel for openai/clip-vit-base-patch32 has 151,277,313 parameters.
        let n: usize = TestCheckpointConfig::vit_b_32()
            .tensor_specs()
            .iter()
            .filter(|s| !matches!(s.init, Init::PositionIds))
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        assert_eq!(n, 151_277_313);
    }

    #[test]
    fn names_are_unique_and_sizes_checked() {
        let specs = TestCheckpointConfig::tiny().tensor_specs();
        let mut names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
        let mut bad = TestCheckpointConfig::tiny();
        bad.text_heads = 3;
        assert!(bad.check().is_err());
        bad = TestCheckpointConfig::tiny();
        bad.vocab_size = 1000;
        assert!(bad.check().is_err());
    }
}
