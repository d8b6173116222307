//! A CLIP checkpoint in Hugging Face layout, loaded into `candle_transformers::models::clip`.
//!
//! `config.json` is read the way transformers' `CLIPConfig` reads it: missing fields take transformers'
//! defaults (the ViT-B/32 sizes), and the legacy `text_config_dict`/`vision_config_dict` override
//! `text_config`/`vision_config`. Anything candle's CLIP cannot run faithfully (another activation, another
//! layer-norm epsilon, another `model_type`) is refused with a message instead of silently giving wrong
//! features.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::clip as cclip;
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use rayon::prelude::*;
use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use super::cpu::{TextTower, VisionTower};
use super::preprocess::ImageTensor;
use super::ClipError;
use crate::linalg::Mat;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// CLIP's context length; prompts are truncated to it (with the end-of-text token kept last).
pub const MAX_TOKENS: usize = 77;
const START_OF_TEXT: u32 = 49406;
const END_OF_TEXT: u32 = 49407;
/// Images per forward pass: big enough for the CPU matmuls to use every core, small enough that ViT-L/14
/// activations stay in the low hundreds of MB.
const IMAGE_CHUNK: usize = 32;
const TEXT_CHUNK: usize = 256;

/// What a loaded checkpoint is, for display and for the feature cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// `<name>@<16 hex digits>`, the hash covering `config.json`, the safetensors header and the weights file
    /// size: it changes with any different checkpoint but costs no pass over 600 MB of weights.
    pub id: String,
    pub name: String,
    pub dir: PathBuf,
    pub is_test_checkpoint: bool,
    pub embed_dim: usize,
    pub image_size: usize,
}

impl ModelInfo {
    /// The line every output that depends on the model carries, so a test checkpoint's output is never
    /// mistaken for CLIP's.
    pub fn banner(&self) -> String {
        if self.is_test_checkpoint {
            format!(
                "CLIP model: {} [{}] - TEST CHECKPOINT (random weights): predictions are not meaningful",
                self.name, self.id
            )
        } else {
            format!(
                "CLIP model: {} ({}-d features, {} px input) [{}]",
                self.name, self.embed_dim, self.image_size, self.id
            )
        }
    }
}

/// A loaded CLIP model with its tokenizer. Shared across threads (`Send + Sync`); every method takes `&self`.
pub struct ClipModel {
    info: ModelInfo,
    vision: VisionTower,
    text: TextTower,
    tokenizer: Tokenizer,
    max_tokens: usize,
    start_id: u32,
    end_id: u32,
}

impl std::fmt::Debug for ClipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The parts of `config.json` that matter, already checked.
#[derive(Clone, Debug)]
pub(crate) struct ParsedConfig {
    pub clip: cclip::ClipConfig,
    pub projection_dim: usize,
    pub name: Option<String>,
    pub is_test_checkpoint: bool,
}

/// One config section seen through its layers (later ones win), as transformers merges them.
struct Section<'a> {
    name: &'static str,
    layers: Vec<&'a Map<String, Value>>,
}

impl Section<'_> {
    fn find(&self, key: &str) -> Option<&Value> {
        self.layers
            .iter()
            .rev()
            .find_map(|m| m.get(key))
            .filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize, String> {
        match self.find(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(format!(
                    "{}{key} must be a positive integer, found {v}",
                    self.name
                )),
            },
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.find(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("{}{key} must be a number, found {v}", self.name)),
        }
    }

    fn str(&self, key: &str, default: &str) -> Result<String, String> {
        match self.find(key) {
            None => Ok(default.to_string()),
            Some(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{}{key} must be a string, found {v}", self.name)),
        }
    }
}

fn sub_section<'a>(
    root: &'a Map<String, Value>,
    name: &'static str,
    keys: [&str; 2],
) -> Result<Section<'a>, String> {
    let mut layers = Vec::new();
    for key in keys {
        match root.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => layers.push(m),
            Some(other) => return Err(format!("{key} must be an object, found {other}")),
        }
    }
    Ok(Section { name, layers })
}

/// candle's CLIP implements QuickGELU only (what every OpenAI checkpoint uses).
fn check_activation(section: &Section<'_>) -> Result<Activation, String> {
    let act = section.str("hidden_act", "quick_gelu")?;
    if act == "quick_gelu" {
        Ok(Activation::QuickGelu)
    } else {
        Err(format!(
            "{}hidden_act is {act:?}, but candle's CLIP only implements \"quick_gelu\" (OpenAI's CLIP \
             checkpoints); this checkpoint would give wrong features",
            section.name
        ))
    }
}

/// candle's CLIP hard-codes transformers' default epsilon.
fn check_layer_norm_eps(section: &Section<'_>) -> Result<(), String> {
    let eps = section.f64("layer_norm_eps", 1e-5)?;
    if (eps - 1e-5).abs() > 1e-9 {
        return Err(format!(
            "{}layer_norm_eps is {eps}, but candle's CLIP only implements 1e-5",
            section.name
        ));
    }
    Ok(())
}

fn check_heads(section: &Section<'_>, hidden: usize, heads: usize) -> Result<(), String> {
    if !hidden.is_multiple_of(heads) {
        return Err(format!(
            "{}hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
            section.name
        ));
    }
    Ok(())
}

/// Parses transformers' `CLIPConfig` JSON. Defaults are transformers' (`CLIPTextConfig`, `CLIPVisionConfig`).
pub(crate) fn parse_config(json: &str) -> Result<ParsedConfig, String> {
    let root: Value = serde_json::from_str(json).map_err(|e| format!("not valid JSON ({e})"))?;
    let root = root
        .as_object()
        .ok_or_else(|| "the top level must be a JSON object".to_string())?;
    let top = Section {
        name: "",
        layers: vec![root],
    };
    let model_type = top.str("model_type", "clip")?;
    if model_type != "clip" {
        return Err(format!(
            "model_type is {model_type:?}; only CLIP checkpoints (model_type \"clip\", e.g. \
             openai/clip-vit-base-patch32) are supported"
        ));
    }
    let projection_dim = top.usize("projection_dim", 512)?;
    let logit_scale_init_value = top.f64("logit_scale_init_value", 2.6592)? as f32;

    let text = sub_section(root, "text_config.", ["text_config", "text_config_dict"])?;
    let t_hidden = text.usize("hidden_size", 512)?;
    let t_heads = text.usize("num_attention_heads", 8)?;
    check_heads(&text, t_hidden, t_heads)?;
    check_activation(&text)?;
    check_layer_norm_eps(&text)?;
    let text_config = ClipTextConfig {
        vocab_size: text.usize("vocab_size", 49408)?,
        embed_dim: t_hidden,
        activation: Activation::QuickGelu,
        intermediate_size: text.usize("intermediate_size", 2048)?,
        max_position_embeddings: text.usize("max_position_embeddings", 77)?,
        pad_with: None,
        num_hidden_layers: text.usize("num_hidden_layers", 12)?,
        num_attention_heads: t_heads,
        projection_dim,
    };

    let vision = sub_section(
        root,
        "vision_config.",
        ["vision_config", "vision_config_dict"],
    )?;
    let v_hidden = vision.usize("hidden_size", 768)?;
    let v_heads = vision.usize("num_attention_heads", 12)?;
    check_heads(&vision, v_hidden, v_heads)?;
    let activation = check_activation(&vision)?;
    check_layer_norm_eps(&vision)?;
    let image_size = vision.usize("image_size", 224)?;
    let patch_size = vision.usize("patch_size", 32)?;
    if patch_size > image_size {
        return Err(format!(
            "vision_config.patch_size {patch_size} is larger than image_size {image_size}"
        ));
    }
    let num_channels = vision.usize("num_channels", 3)?;
    if num_channels != 3 {
        return Err(format!(
            "vision_config.num_channels is {num_channels}; CLIP preprocessing produces RGB (3)"
        ));
    }
    let vision_config = ClipVisionConfig {
        embed_dim: v_hidden,
        activation,
        intermediate_size: vision.usize("intermediate_size", 3072)?,
        num_hidden_layers: vision.usize("num_hidden_layers", 12)?,
        num_attention_heads: v_heads,
        projection_dim,
        num_channels,
        image_size,
        patch_size,
    };

    let name = root
        .get("_name_or_path")
        .and_then(Value::as_str)
        .filter(|s| looks_like_repo_id(s))
        .map(str::to_string);
    let is_test_checkpoint = root
        .get("hegraph_test_checkpoint")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ParsedConfig {
        clip: cclip::ClipConfig {
            text_config,
            vision_config,
            logit_scale_init_value,
            image_size,
        },
        projection_dim,
        name,
        is_test_checkpoint,
    })
}

/// `_name_or_path` is a hub id for downloaded models but may be a local path on someone's disk, which says
/// nothing useful and must not leak into cache ids.
fn looks_like_repo_id(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['/', '.', '~', '\\'])
        && !s.contains(['\\', ':'])
        && s.split('/').count() <= 2
}

/// The 8-byte length prefix and JSON header of a safetensors file, checked for plausibility so a truncated
/// download is reported as such.
/// `remedy` says what fixes a damaged file: a download is fetched again, a test checkpoint is generated again.
fn read_safetensors_header(path: &Path, remedy: &str) -> Result<(Vec<u8>, u64), ClipError> {
    let io = |source| ClipError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let bad = |msg: String| ClipError::Weights {
        path: path.to_path_buf(),
        msg,
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| {
        bad(format!(
            "the file has {size} bytes, too short for a safetensors file; {remedy}"
        ))
    })?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 100 << 20 || n + 8 > size {
        return Err(bad(format!(
            "not a safetensors file, or truncated (header length {n}, file size {size}); {remedy}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    Ok((header, size))
}

/// What fixes a damaged test checkpoint: it is generated, never downloaded.
pub const TEST_CHECKPOINT_REMEDY: &str =
    "this is a generated test checkpoint: delete its folder and it is written again";

fn model_id(name: &str, config: &[u8], header: &[u8], size: u64) -> String {
    let mut h = blake3::Hasher::new();
    h.update(config);
    h.update(header);
    h.update(&size.to_le_bytes());
    let hex = h.finalize().to_hex();
    format!("{name}@{}", &hex.as_str()[..16])
}

/// The directory's own name, with the `owner--name` convention of hub caches turned back into `owner/name`.
fn name_from_dir(dir: &Path) -> String {
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "clip".to_string());
    let base = base.strip_prefix("models--").unwrap_or(&base);
    base.replacen("--", "/", 1)
}

impl ClipModel {
    /// Loads a Hugging Face CLIP directory. Weights of any float dtype (F32, F16, BF16) are converted to F32.
    pub fn load(dir: &Path) -> Result<ClipModel, ClipError> {
        for file in [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
            if !dir.join(file).is_file() {
                return Err(ClipError::MissingFile {
                    dir: dir.to_path_buf(),
                    file: file.to_string(),
                });
            }
        }
        let config_path = dir.join(CONFIG_FILE);
        let config_bytes = std::fs::read(&config_path).map_err(|source| ClipError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config_text = std::str::from_utf8(&config_bytes).map_err(|_| ClipError::Config {
            path: config_path.clone(),
            msg: "not UTF-8 text".into(),
        })?;
        let parsed = parse_config(config_text).map_err(|msg| ClipError::Config {
            path: config_path.clone(),
            msg,
        })?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let remedy = if parsed.is_test_checkpoint {
            TEST_CHECKPOINT_REMEDY
        } else {
            "an interrupted download? download it again"
        };
        let (header, size) = read_safetensors_header(&weights_path, remedy)?;
        let name = if parsed.is_test_checkpoint {
            parsed
                .name
                .clone()
                .unwrap_or_else(|| "hegraph-test-checkpoint".to_string())
        } else {
            parsed.name.clone().unwrap_or_else(|| name_from_dir(dir))
        };
        let id = model_id(&name, &config_bytes, &header, size);

        let device = Device::Cpu;
        let weights_err = |hint: &str| {
            let hint = hint.to_string();
            let path = weights_path.clone();
            move |e: candle_core::Error| ClipError::Weights {
                path,
                msg: format!("{e} ({hint})"),
            }
        };
        // SAFETY: the file is memory-mapped only while the towers copy every tensor out of it (the
        // VarBuilder and its mapping are dropped before this function returns); the file must not be
        // truncated by another process during those moments, which holds for a model directory.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&weights_path),
                DType::F32,
                &device,
            )
        }
        .map_err(weights_err(&format!(
            "the file looks damaged or incomplete; {remedy}"
        )))?;
        const SHAPES: &str = "config.json does not describe these weights";
        let vision = VisionTower::load(&vb, &parsed.clip.vision_config, parsed.projection_dim)
            .map_err(weights_err(SHAPES))?;
        let text = TextTower::load(&vb, &parsed.clip.text_config).map_err(weights_err(SHAPES))?;
        drop(vb);

        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let tok_err = |msg: String| ClipError::Tokenizer {
            path: tokenizer_path.clone(),
            msg,
        };
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| tok_err(e.to_string()))?;
        // Truncation and padding are ours (end token kept last, pad id 0), whatever the file asks for.
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(e.to_string()))?;
        tokenizer.with_padding(None);
        let start_id = tokenizer
            .token_to_id("<|startoftext|>")
            .unwrap_or(START_OF_TEXT);
        let end_id = tokenizer
            .token_to_id("<|endoftext|>")
            .unwrap_or(END_OF_TEXT);
        let vocab = parsed.clip.text_config.vocab_size;
        if start_id as usize >= vocab || end_id as usize >= vocab {
            return Err(tok_err(format!(
                "its start/end token ids ({start_id}, {end_id}) do not fit the model's vocabulary of {vocab}"
            )));
        }

        let info = ModelInfo {
            id,
            name,
            dir: dir.to_path_buf(),
            is_test_checkpoint: parsed.is_test_checkpoint,
            embed_dim: parsed.projection_dim,
            image_size: parsed.clip.vision_config.image_size,
        };
        Ok(ClipModel {
            info,
            vision,
            text,
            tokenizer,
            max_tokens: MAX_TOKENS.min(parsed.clip.text_config.max_position_embeddings),
            start_id,
            end_id,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Token ids with start and end tokens, unpadded, truncated to the context length with the end token
    /// kept last (the text tower reads the end token's position).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ClipError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ClipError::Tokenize {
                text: text.to_string(),
                msg: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        // A tokenizer.json without CLIP's post-processor would leave these out.
        if ids.first() != Some(&self.start_id) {
            ids.insert(0, self.start_id);
        }
        if ids.len() < 2 || ids.last() != Some(&self.end_id) {
            ids.push(self.end_id);
        }
        if ids.len() > self.max_tokens {
            ids.truncate(self.max_tokens);
            if let Some(last) = ids.last_mut() {
                *last = self.end_id;
            }
        }
        Ok(ids)
    }

    /// One L2-normalised row per image. Images must have been preprocessed at `info().image_size`.
    pub fn encode_images(&self, images: &[ImageTensor]) -> Result<Mat, ClipError> {
        let s = self.info.image_size;
        for (i, t) in images.iter().enumerate() {
            if t.size != s || t.data.len() != 3 * s * s {
                return Err(ClipError::Input(format!(
                    "image {i} is a {}-pixel tensor with {} values, but this model takes {s}×{s} RGB \
                     (preprocess with the model's image_size)",
                    t.size,
                    t.data.len()
                )));
            }
        }
        let mut data = Vec::with_capacity(images.len() * self.info.embed_dim);
        for chunk in images.chunks(IMAGE_CHUNK) {
            let mut pixels = Vec::with_capacity(chunk.len() * 3 * s * s);
            for t in chunk {
                pixels.extend_from_slice(&t.data);
            }
            data.extend(self.vision.forward(&pixels, chunk.len()));
        }
        self.normalized(images.len(), data)
    }

    /// One L2-normalised row per text, batched (texts longer than the context are truncated).
    pub fn encode_texts(&self, texts: &[String]) -> Result<Mat, ClipError> {
        let mut data = Vec::with_capacity(texts.len() * self.info.embed_dim);
        for chunk in texts.chunks(TEXT_CHUNK) {
            let ids: Vec<Vec<u32>> = chunk
                .par_iter()
                .map(|t| self.tokenize(t))
                .collect::<Result<_, _>>()?;
            data.extend(self.text.forward(&ids).map_err(ClipError::Input)?);
        }
        self.normalized(texts.len(), data)
    }

    fn normalized(&self, rows: usize, data: Vec<f32>) -> Result<Mat, ClipError> {
        let cols = self.info.embed_dim;
        if data.len() != rows * cols {
            return Err(ClipError::Input(format!(
                "the model produced {} values for {rows} inputs of {cols} dimensions: its weights do not \
                 match projection_dim in config.json",
                data.len()
            )));
        }
        let mut m = Mat::from_vec(rows, cols, data);
        m.l2_normalize_rows();
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_vit_b_32() {
        let p = parse_config(r#"{"model_type": "clip", "text_config": {}, "vision_config": {}}"#)
            .expect("parses");
        assert_eq!(p.projection_dim, 512);
        let (t, v) = (&p.clip.text_config, &p.clip.vision_config);
        assert_eq!(
            (t.embed_dim, t.intermediate_size, t.num_hidden_layers),
            (512, 2048, 12)
        );
        assert_eq!(
            (
                t.num_attention_heads,
                t.vocab_size,
                t.max_position_embeddings
            ),
            (8, 49408, 77)
        );
        assert_eq!(
            (v.embed_dim, v.intermediate_size, v.num_hidden_layers),
            (768, 3072, 12)
        );
        assert_eq!(
            (v.num_attention_heads, v.image_size, v.patch_size),
            (12, 224, 32)
        );
        assert!(!p.is_test_checkpoint);
        assert_eq!(p.name, None);
    }

    #[test]
    fn vit_l_14_with_legacy_dict_overrides() {
        let json = r#"{
            "_name_or_path": "openai/clip-vit-large-patch14",
            "projection_dim": 768,
            "text_config": {"hidden_size": 512, "num_attention_heads": 8, "text_only": null},
            "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                 "projection_dim": 768},
            "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                              "num_attention_heads": 16, "patch_size": 14, "image_size": 224,
                              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05},
            "vision_config_dict": null
        }"#;
        let p = parse_config(json).expect("parses");
        assert_eq!(p.name.as_deref(), Some("openai/clip-vit-large-patch14"));
        assert_eq!(p.projection_dim, 768);
        assert_eq!(p.clip.text_config.embed_dim, 768);
        assert_eq!(p.clip.text_config.num_attention_heads, 12);
        assert_eq!(p.clip.vision_config.embed_dim, 1024);
        assert_eq!(p.clip.vision_config.patch_size, 14);
        assert_eq!(p.clip.vision_config.projection_dim, 768);
        assert_eq!(p.clip.image_size, 224);
    }

    #[test]
    fn unsupported_configs_are_refused_with_reasons() {
        let e = parse_config(r#"{"vision_config": {"hidden_act": "gelu"}}"#).unwrap_err();
        assert!(
            e.contains("vision_config.hidden_act") && e.contains("gelu"),
            "{e}"
        );
        let e = parse_config(r#"{"model_type": "siglip"}"#).unwrap_err();
        assert!(e.contains("siglip"), "{e}");
        let e = parse_config(r#"{"text_config": {"hidden_size": 100, "num_attention_heads": 8}}"#)
            .unwrap_err();
        assert!(e.contains("text_config.hidden_size"), "{e}");
        let e = parse_config(r#"{"projection_dim": "big"}"#).unwrap_err();
        assert!(e.contains("projection_dim"), "{e}");
        assert!(parse_config("not json").unwrap_err().contains("JSON"));
    }

    #[test]
    fn local_paths_are_not_names() {
        assert!(looks_like_repo_id("openai/clip-vit-base-patch32"));
        assert!(!looks_like_repo_id("/home/me/clip"));
        assert!(!looks_like_repo_id("./clip"));
        assert!(!looks_like_repo_id("C:\\models\\clip"));
        assert_eq!(
            name_from_dir(Path::new("/nonexistent/openai--clip-vit-base-patch16")),
            "openai/clip-vit-base-patch16"
        );
    }
}
