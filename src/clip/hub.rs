//! Finding a CLIP checkpoint on disk, or downloading the default one from the Hugging Face hub.
//!
//! A model directory is complete when it holds the three files of [`REQUIRED_FILES`]; each file is moved into
//! place only once it is whole, so an interrupted download never looks like a model. There is deliberately no
//! fallback to random weights: a missing model is an error that says how to provide one.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use super::model::{CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use super::ClipError;
use crate::progress::Progress;

pub const DEFAULT_MODEL_REPO: &str = "openai/clip-vit-base-patch32";
/// Environment variable naming a model directory; it wins over the user cache.
pub const MODEL_DIR_ENV: &str = "HEGRAPH_MODEL_DIR";
pub const REQUIRED_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE];
/// The revision of [`DEFAULT_MODEL_REPO`] that holds `model.safetensors` (the conversion pull request that
/// candle's CLIP example uses), tried when the main branch has no safetensors file.
const SAFETENSORS_REVISION: &str = "refs/pr/15";
/// The CLIP tokenizer shipped with hegraph, used when the repository has no `tokenizer.json`.
const BUNDLED_TOKENIZER: &[u8] = include_bytes!("../../assets/clip-tokenizer/tokenizer.json");

pub(crate) fn bundled_tokenizer() -> &'static [u8] {
    BUNDLED_TOKENIZER
}

/// `dirs::cache_dir()/hegraph/models/openai--clip-vit-base-patch32`.
pub fn user_model_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| {
        d.join("hegraph")
            .join("models")
            .join(DEFAULT_MODEL_REPO.replace('/', "--"))
    })
}

/// The required files that `dir` lacks, in [`REQUIRED_FILES`] order.
pub fn missing_files(dir: &Path) -> Vec<&'static str> {
    REQUIRED_FILES
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

fn check_dir(dir: &Path, origin: &str) -> Result<PathBuf, ClipError> {
    let missing = missing_files(dir);
    if missing.is_empty() {
        Ok(dir.to_path_buf())
    } else {
        Err(ClipError::BadModelDir {
            origin: origin.to_string(),
            dir: dir.to_path_buf(),
            missing: match missing.as_slice() {
                [one] => one.to_string(),
                [init @ .., last] => format!("{} and {last}", init.join(", ")),
                [] => String::new(),
            },
        })
    }
}

fn how_to_provide(user_dir: Option<&Path>) -> String {
    let place = match user_dir {
        Some(d) => format!("put them in {}, or in any directory", d.display()),
        None => "put them in a directory".to_string(),
    };
    format!(
        "download config.json, model.safetensors and tokenizer.json from \
         https://huggingface.co/{DEFAULT_MODEL_REPO} by hand, {place} and give that directory explicitly \
         or through the {MODEL_DIR_ENV} environment variable"
    )
}

/// Look-up order: `explicit`, `$HEGRAPH_MODEL_DIR`, the user cache dir if it holds all three files, then (if
/// `allow_download`) a download of [`DEFAULT_MODEL_REPO`] into the user cache dir. An explicit or environment
/// directory that is incomplete is an error rather than skipped: the person asked for that model.
pub fn resolve_model_dir(
    explicit: Option<&Path>,
    allow_download: bool,
) -> Result<PathBuf, ClipError> {
    resolve_model_dir_reporting(explicit, allow_download, None)
}

/// [`resolve_model_dir`] with a download's progress sent to `progress` (in MB) instead of hf-hub's bars on
/// stderr: the GUI shows it.
pub fn resolve_model_dir_reporting(
    explicit: Option<&Path>,
    allow_download: bool,
    progress: Option<&dyn Progress>,
) -> Result<PathBuf, ClipError> {
    if let Some(dir) = explicit {
        return check_dir(dir, "the model directory ");
    }
    if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|v| !v.is_empty()) {
        return check_dir(Path::new(&dir), &format!("{MODEL_DIR_ENV}="));
    }
    let user = user_model_dir();
    if let Some(dir) = &user {
        if missing_files(dir).is_empty() {
            return Ok(dir.clone());
        }
    }
    if !allow_download {
        return Err(ClipError::Download(format!(
            "no CLIP model found and downloading is disabled; {}",
            how_to_provide(user.as_deref())
        )));
    }
    let Some(dir) = user else {
        return Err(ClipError::Download(format!(
            "this system has no user cache directory to download CLIP into; {}",
            how_to_provide(None)
        )));
    };
    download_default_model(&dir, progress)?;
    Ok(dir)
}

/// Forwards hf-hub's byte counts to a [`Progress`], in MB so the units stay readable.
struct Reporter<'a> {
    progress: &'a dyn Progress,
    total: usize,
    done: usize,
}

impl hf_hub::api::Progress for Reporter<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.total = size;
        self.done = 0;
        self.progress.set_stage_counting(
            &format!("downloading {filename} of {DEFAULT_MODEL_REPO}"),
            "MB",
        );
        self.progress.update(0, size.div_ceil(1 << 20));
    }

    fn update(&mut self, size: usize) {
        self.done += size;
        self.progress
            .update(self.done >> 20, self.total.div_ceil(1 << 20));
    }

    fn finish(&mut self) {}
}

/// Downloads [`DEFAULT_MODEL_REPO`] into `target` through hf-hub (honouring `HF_ENDPOINT` for mirrors), with
/// hf-hub's progress bars. hf-hub's own cache layout lives in a staging directory beside `target` and is
/// removed afterwards, so the ~600 MB are not kept twice.
pub fn download_default_model(
    target: &Path,
    progress: Option<&dyn Progress>,
) -> Result<(), ClipError> {
    let parent = target.parent().unwrap_or(target);
    let staging = parent.join(".hf-download");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ClipError::Io { path, source }
    };
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    std::fs::create_dir_all(target).map_err(io(target))?;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ClipError::Download(format!(
            "could not download {what} of {DEFAULT_MODEL_REPO} from the Hugging Face hub ({e}). To work \
             offline, {}",
            how_to_provide(Some(target))
        ))
    };
    let api = ApiBuilder::from_env()
        .with_cache_dir(staging.clone())
        .with_progress(progress.is_none())
        .build()
        .map_err(|e| failed("anything", &e))?;
    eprintln!(
        "Downloading CLIP {DEFAULT_MODEL_REPO} (about 600 MB, once) into {}",
        target.display()
    );
    let main = api.model(DEFAULT_MODEL_REPO.to_string());
    let fetch = |repo: &hf_hub::api::sync::ApiRepo, file: &str| match progress {
        Some(p) => repo.download_with_progress(
            file,
            Reporter {
                progress: p,
                total: 0,
                done: 0,
            },
        ),
        None => repo.get(file),
    };
    for file in REQUIRED_FILES {
        let dest = target.join(file);
        if dest.is_file() {
            continue;
        }
        let fetched = match file {
            WEIGHTS_FILE => fetch(&main, file).or_else(|first| {
                let pr = api.repo(Repo::with_revision(
                    DEFAULT_MODEL_REPO.to_string(),
                    RepoType::Model,
                    SAFETENSORS_REVISION.to_string(),
                ));
                fetch(&pr, file).map_err(|_| first)
            }),
            _ => fetch(&main, file),
        };
        match fetched {
            Ok(path) => place(&path, &dest)?,
            // The bundled tokenizer is the same CLIP BPE; a missing tokenizer.json is no reason to fail.
            Err(_) if file == TOKENIZER_FILE => write_atomically(&dest, BUNDLED_TOKENIZER)?,
            Err(e) => return Err(failed(file, &e)),
        }
    }
    // Best effort: a leftover staging directory only costs disk space.
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

/// Moves hf-hub's blob (its snapshot entry is usually a symlink to it) to `dest` through a temporary name;
/// copies when a rename is impossible.
fn place(fetched: &Path, dest: &Path) -> Result<(), ClipError> {
    let blob = fetched
        .canonicalize()
        .unwrap_or_else(|_| fetched.to_path_buf());
    let tmp = dest.with_extension("part");
    if std::fs::rename(&blob, &tmp).is_err() {
        std::fs::copy(&blob, &tmp).map_err(|source| ClipError::Io {
            path: blob.clone(),
            source,
        })?;
    }
    std::fs::rename(&tmp, dest).map_err(|source| ClipError::Io {
        path: dest.to_path_buf(),
        source,
    })
}

pub(crate) fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<(), ClipError> {
    let tmp = dest.with_extension("part");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dest))
        .map_err(|source| ClipError::Io {
            path: dest.to_path_buf(),
            source,
        })
}
