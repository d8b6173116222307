//! On-disk feature cache, so a folder is never embedded twice.
//!
//! Keys are (content hash, view) inside a *namespace* the caller chooses (model id + preprocessing version,
//! plus the augmentation seed when views are augmented): renaming or moving a file keeps its features, and
//! editing it changes its hash, so it is simply re-embedded. The cache never decides what a key means.
//!
//! Layout: `<dir>/<sanitised namespace>-<hash of namespace>/shard-<checksum>.safetensors`. Each shard holds
//! one tensor `features` (N×D, f32, little-endian) and string metadata:
//! - `format` = `hegraph-feature-cache`, `version` = [`FORMAT_VERSION`], `namespace` (verbatim), `dim`,
//!   `count`;
//! - `keys`: `<64 hex>:<view>` per row, comma-separated (10,000 images × 11 views is ~8 MB of header,
//!   which safetensors allows, and avoids one file per feature);
//! - `checksum`: blake3 of the `keys` string followed by the feature bytes. It covers the keys too, because a
//!   flipped hex digit would otherwise silently hand one image's features to another.
//!
//! Shards are immutable and named after their checksum; they are written to a uniquely named temporary file
//! in the same folder, fsynced, then renamed, so a reader (or another process) never sees half a shard and two
//! writers never touch the same file. A shard that fails to parse, has a bad checksum or a wrong shape is
//! reported, deleted, and its entries are recomputed by the caller. Shards of another dimension or a newer
//! format version are reported and left alone (they are intact, just not ours to use or delete).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// Version of the shard layout above; bump when it changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "hegraph-feature-cache";
const SHARD_PREFIX: &str = "shard-";
const SHARD_SUFFIX: &str = ".safetensors";
const TEMP_PREFIX: &str = ".tmp-";
/// Largest shard written (rows). At D = 768 that is ~100 MB, small enough to read in one go.
pub const MAX_SHARD_ROWS: usize = 32_768;
/// `compact` merges shards smaller than this.
pub const SMALL_SHARD_ROWS: usize = 4_096;
/// `open` compacts once this many small shards have piled up.
pub const COMPACT_AT_SMALL_SHARDS: usize = 32;
/// Temporary files older than this are leftovers of a crashed writer and removed on `open`; younger ones may
/// belong to a writer still at work in another process.
const STALE_TEMP_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("feature cache: {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Hashing reads the image itself, so this is a problem with the image, not with the cache.
    #[error("cannot read the image {}: {source}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "feature cache: the namespace is empty; pass the model id (and preprocessing version)"
    )]
    EmptyNamespace,
    #[error("feature cache: the feature dimension must be at least 1")]
    ZeroDim,
    #[error("feature cache: a feature has {got} values but this cache holds {expected}-dimensional features")]
    WrongDim { expected: usize, got: usize },
    #[error("feature cache: a feature contains NaN or infinity; refusing to cache it (the encoder misbehaved)")]
    NonFinite,
    #[error("feature cache: cannot encode a shard: {0}")]
    Encode(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// blake3 digest of a file's or string's bytes.
pub type ContentHash = [u8; 32];

/// Streams the file through blake3 (constant memory, any size).
pub fn hash_file(path: &Path) -> Result<ContentHash, CacheError> {
    let image_err = |source| CacheError::Image {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(image_err)?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::io::BufReader::with_capacity(1 << 16, file))
        .map_err(image_err)?;
    Ok(*hasher.finalize().as_bytes())
}

pub fn hash_bytes(bytes: &[u8]) -> ContentHash {
    *blake3::hash(bytes).as_bytes()
}

/// One cached feature: whose content and which view.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey {
    pub content: ContentHash,
    /// 0 = centre crop, 1..=A augmented views; text prompts use the hash of the prompt string and view 0.
    pub view: u32,
}

impl CacheKey {
    fn encode(&self) -> String {
        format!(
            "{}:{}",
            blake3::Hash::from_bytes(self.content).to_hex(),
            self.view
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let (hex, view) = s.split_once(':')?;
        let hash = blake3::Hash::from_hex(hex).ok()?;
        Some(Self {
            content: *hash.as_bytes(),
            view: view.parse().ok()?,
        })
    }
}

/// What we remember of a loaded shard: its keys (for `compact`).
struct Shard {
    keys: Vec<CacheKey>,
}

/// Features of one namespace, all held in memory (one contiguous buffer) after `open`.
pub struct FeatureCache {
    dir: PathBuf,
    namespace: String,
    dim: usize,
    /// Row-major features, `dim` values per row.
    data: Vec<f32>,
    index: HashMap<CacheKey, usize>,
    /// Shard file name -> what it held.
    shards: HashMap<String, Shard>,
    /// Shards reported once and not to be read again by `refresh` (damaged or foreign).
    ignored: HashSet<String>,
}

impl std::fmt::Debug for FeatureCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureCache")
            .field("dir", &self.dir)
            .field("namespace", &self.namespace)
            .field("dim", &self.dim)
            .field("len", &self.index.len())
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl FeatureCache {
    /// `<user cache dir>/hegraph/features`, or `None` on a system without one.
    pub fn default_dir() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("hegraph").join("features"))
    }

    /// Opens (creating if needed) the namespace's folder under `dir` and loads every valid shard.
    ///
    /// `namespace` = model id + preprocessing version (+ augmentation seed for views) chosen by the caller.
    /// Returns the cache and warnings about shards that were skipped or deleted; their entries are simply
    /// missing, so the caller recomputes them.
    pub fn open(
        dir: &Path,
        namespace: &str,
        dim: usize,
    ) -> Result<(FeatureCache, Vec<String>), CacheError> {
        if namespace.trim().is_empty() {
            return Err(CacheError::EmptyNamespace);
        }
        if dim == 0 {
            return Err(CacheError::ZeroDim);
        }
        let dir = dir.join(namespace_dir_name(namespace));
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut cache = FeatureCache {
            dir,
            namespace: namespace.to_string(),
            dim,
            data: Vec::new(),
            index: HashMap::new(),
            shards: HashMap::new(),
            ignored: HashSet::new(),
        };
        let mut warnings = cache.remove_stale_temps();
        warnings.extend(cache.refresh()?);
        // Every embedding run adds a shard; merging the small ones here keeps a folder of 20,000 images
        // from turning into hundreds of files. Failing to merge only costs speed, so it is a warning.
        if cache.small_shards() >= COMPACT_AT_SMALL_SHARDS {
            if let Err(e) = cache.compact() {
                warnings.push(format!("could not merge the small shards: {e}"));
            }
        }
        Ok((cache, warnings))
    }

    /// Loads shards written since `open` (e.g. by another process). Returns warnings like `open`.
    pub fn refresh(&mut self) -> Result<Vec<String>, CacheError> {
        let mut warnings = Vec::new();
        // A shard that vanished between listing and reading was merged by a concurrent `compact`; the merged
        // shard is already on disk, so listing again finds it. A few passes cover back-to-back compactions.
        for _ in 0..3 {
            if !self.refresh_pass(&mut warnings)? {
                break;
            }
        }
        Ok(warnings)
    }

    /// One listing of the folder; returns whether some shard vanished meanwhile.
    fn refresh_pass(&mut self, warnings: &mut Vec<String>) -> Result<bool, CacheError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(SHARD_PREFIX)
                && name.ends_with(SHARD_SUFFIX)
                && !self.shards.contains_key(&name)
                && !self.ignored.contains(&name)
            {
                names.push(name);
            }
        }
        // Sorted so that, with duplicate keys across shards, the same copy wins on every open.
        names.sort();
        let mut vanished = false;
        for name in names {
            let path = self.dir.join(&name);
            match self.load_shard(&path) {
                Ok(keys) => {
                    self.shards.insert(name, Shard { keys });
                }
                Err(ShardProblem::Corrupt(why)) => {
                    let removed = match fs::remove_file(&path) {
                        Ok(()) => "deleted".to_string(),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            "already gone".to_string()
                        }
                        Err(e) => {
                            // Still there: do not read it again on the next pass.
                            self.ignored.insert(name);
                            format!("could not delete it ({e}); ignored")
                        }
                    };
                    warnings.push(format!(
                        "feature cache: {}: {why}; {removed}, its features will be recomputed",
                        path.display()
                    ));
                }
                Err(ShardProblem::Foreign(why)) => {
                    warnings.push(format!("feature cache: {}: {why}; ignored", path.display()));
                    self.ignored.insert(name);
                }
                Err(ShardProblem::Vanished) => vanished = true,
            }
        }
        Ok(vanished)
    }

    /// The folder holding this namespace's shards.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn get(&self, key: &CacheKey) -> Option<&[f32]> {
        let row = *self.index.get(key)?;
        self.data.get(row * self.dim..(row + 1) * self.dim)
    }

    pub fn contains(&self, key: &CacheKey) -> bool {
        self.index.contains_key(key)
    }

    /// Number of distinct keys held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Number of shard files loaded or written by this instance.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Appends a new shard with these entries and makes them visible to `get`.
    ///
    /// Keys already cached are skipped (features are a function of the key); within the batch the last
    /// duplicate wins. Every feature is checked before anything is written, so a bad batch writes nothing.
    pub fn insert_batch(&mut self, entries: Vec<(CacheKey, Vec<f32>)>) -> Result<(), CacheError> {
        for (_, f) in &entries {
            if f.len() != self.dim {
                return Err(CacheError::WrongDim {
                    expected: self.dim,
                    got: f.len(),
                });
            }
            if f.iter().any(|v| !v.is_finite()) {
                return Err(CacheError::NonFinite);
            }
        }
        let mut pos: HashMap<CacheKey, usize> = HashMap::new();
        let mut fresh: Vec<(CacheKey, Vec<f32>)> = Vec::new();
        for (key, f) in entries {
            if self.index.contains_key(&key) {
                continue;
            }
            match pos.get(&key) {
                Some(&i) => fresh[i].1 = f,
                None => {
                    pos.insert(key, fresh.len());
                    fresh.push((key, f));
                }
            }
        }
        for chunk in fresh.chunks(MAX_SHARD_ROWS) {
            let keys: Vec<CacheKey> = chunk.iter().map(|(k, _)| *k).collect();
            let mut values = Vec::with_capacity(chunk.len() * self.dim);
            for (_, f) in chunk {
                values.extend_from_slice(f);
            }
            let name = self.write_shard(&keys, &values)?;
            for (i, key) in keys.iter().enumerate() {
                let row = self.data.len() / self.dim;
                if let Some(f) = values.get(i * self.dim..(i + 1) * self.dim) {
                    self.data.extend_from_slice(f);
                    self.index.insert(*key, row);
                }
            }
            self.shards.insert(name, Shard { keys });
        }
        Ok(())
    }

    /// Number of shards under [`SMALL_SHARD_ROWS`] rows (what [`Self::compact`] would merge).
    pub fn small_shards(&self) -> usize {
        self.shards
            .values()
            .filter(|s| s.keys.len() < SMALL_SHARD_ROWS)
            .count()
    }

    /// Merges the shards under [`SMALL_SHARD_ROWS`] rows into as few shards as possible, so a cache filled
    /// batch by batch does not end up as thousands of files.
    ///
    /// Safe against other processes: the merged shard is durable before any old one is deleted, and only
    /// shards this instance has read are deleted. Two processes compacting at once at worst leave duplicate
    /// rows, which `open` tolerates.
    pub fn compact(&mut self) -> Result<(), CacheError> {
        let mut small: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, s)| s.keys.len() < SMALL_SHARD_ROWS)
            .map(|(n, _)| n.clone())
            .collect();
        if small.len() < 2 {
            return Ok(());
        }
        small.sort();
        let mut seen = HashSet::new();
        let mut keys = Vec::new();
        for name in &small {
            if let Some(shard) = self.shards.get(name) {
                keys.extend(shard.keys.iter().copied().filter(|k| seen.insert(*k)));
            }
        }
        let mut written = Vec::new();
        for chunk in keys.chunks(MAX_SHARD_ROWS) {
            let mut values = Vec::with_capacity(chunk.len() * self.dim);
            for key in chunk {
                if let Some(f) = self.get(key) {
                    values.extend_from_slice(f);
                }
            }
            let name = self.write_shard(chunk, &values)?;
            written.push((name, chunk.to_vec()));
        }
        let new_names: HashSet<&String> = written.iter().map(|(n, _)| n).collect();
        for name in &small {
            // A merged shard can be named like an old one when it has the same content.
            if new_names.contains(name) {
                continue;
            }
            let path = self.dir.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            self.shards.remove(name);
        }
        for (name, keys) in written {
            self.shards.insert(name, Shard { keys });
        }
        Ok(())
    }

    /// Writes one immutable shard atomically and returns its file name.
    fn write_shard(&self, keys: &[CacheKey], values: &[f32]) -> Result<String, CacheError> {
        let keys_str = keys
            .iter()
            .map(CacheKey::encode)
            .collect::<Vec<_>>()
            .join(",");
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let checksum = checksum(&keys_str, &bytes);
        let metadata: HashMap<String, String> = [
            ("format", FORMAT_NAME.to_string()),
            ("version", FORMAT_VERSION.to_string()),
            ("namespace", self.namespace.clone()),
            ("dim", self.dim.to_string()),
            ("count", keys.len().to_string()),
            ("keys", keys_str),
            ("checksum", checksum.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let view = TensorView::new(Dtype::F32, vec![keys.len(), self.dim], &bytes)
            .map_err(|e| CacheError::Encode(e.to_string()))?;
        let encoded = safetensors::tensor::serialize([("features", view)], Some(metadata))
            .map_err(|e| CacheError::Encode(e.to_string()))?;

        let name = format!("{SHARD_PREFIX}{}{SHARD_SUFFIX}", &checksum[..32]);
        let path = self.dir.join(&name);
        // The writer's pid in the name lets `open` remove what a killed writer left at once.
        let prefix = format!("{TEMP_PREFIX}{}-", std::process::id());
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".part")
            .tempfile_in(&self.dir)
            .map_err(io_err(&self.dir))?;
        tmp.write_all(&encoded).map_err(io_err(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        // Same checksum = same bytes, so replacing an existing file of that name changes nothing (and repairs
        // one damaged since it was read).
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        sync_dir(&self.dir);
        Ok(name)
    }

    fn load_shard(&mut self, path: &Path) -> Result<Vec<CacheKey>, ShardProblem> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            // Deleted by a concurrent `compact` between listing and reading: its rows live in the merged shard.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ShardProblem::Vanished)
            }
            Err(e) => return Err(ShardProblem::Foreign(format!("cannot read ({e})"))),
        };
        // `read_metadata` validates the header and that the offsets cover the whole file exactly.
        let (header_len, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| ShardProblem::Corrupt(format!("not a valid safetensors file ({e})")))?;
        let Some(meta) = header.metadata().as_ref() else {
            return Err(ShardProblem::Corrupt("no metadata".into()));
        };
        let field = |k: &str| {
            meta.get(k)
                .map(String::as_str)
                .ok_or_else(|| ShardProblem::Corrupt(format!("metadata lacks '{k}'")))
        };
        if field("format")? != FORMAT_NAME {
            return Err(ShardProblem::Corrupt(
                "not a hegraph feature-cache shard".into(),
            ));
        }
        let version: u32 = field("version")?
            .parse()
            .map_err(|_| ShardProblem::Corrupt("unreadable format version".into()))?;
        if version != FORMAT_VERSION {
            return Err(ShardProblem::Foreign(format!(
                "format version {version}, this program reads version {FORMAT_VERSION}"
            )));
        }
        if field("namespace")? != self.namespace {
            return Err(ShardProblem::Foreign(format!(
                "belongs to namespace '{}', not '{}'",
                field("namespace")?,
                self.namespace
            )));
        }
        let dim: usize = field("dim")?
            .parse()
            .map_err(|_| ShardProblem::Corrupt("unreadable dim".into()))?;
        if dim != self.dim {
            return Err(ShardProblem::Foreign(format!(
                "holds {dim}-dimensional features, this cache was opened for {}",
                self.dim
            )));
        }
        let count: usize = field("count")?
            .parse()
            .map_err(|_| ShardProblem::Corrupt("unreadable count".into()))?;
        let keys_str = field("keys")?;
        let Some(info) = header.info("features") else {
            return Err(ShardProblem::Corrupt("no 'features' tensor".into()));
        };
        if info.dtype != Dtype::F32 || info.shape != [count, dim] {
            return Err(ShardProblem::Corrupt(format!(
                "'features' is {:?} {:?}, expected F32 [{count}, {dim}]",
                info.dtype, info.shape
            )));
        }
        let (start, end) = info.data_offsets;
        let Some(feature_bytes) = bytes.get(8 + header_len + start..8 + header_len + end) else {
            return Err(ShardProblem::Corrupt(
                "'features' lies outside the file".into(),
            ));
        };
        if checksum(keys_str, feature_bytes) != field("checksum")? {
            return Err(ShardProblem::Corrupt(
                "checksum mismatch (the file is damaged)".into(),
            ));
        }
        let keys: Vec<CacheKey> = if keys_str.is_empty() {
            Vec::new()
        } else {
            keys_str
                .split(',')
                .map(CacheKey::decode)
                .collect::<Option<_>>()
                .ok_or_else(|| ShardProblem::Corrupt("unreadable key".into()))?
        };
        if keys.len() != count {
            return Err(ShardProblem::Corrupt(format!(
                "{} keys for {count} rows",
                keys.len()
            )));
        }
        let values: Vec<f32> = feature_bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for (i, key) in keys.iter().enumerate() {
            if self.index.contains_key(key) {
                continue;
            }
            if let Some(f) = values.get(i * dim..(i + 1) * dim) {
                let row = self.data.len() / self.dim;
                self.data.extend_from_slice(f);
                self.index.insert(*key, row);
            }
        }
        Ok(keys)
    }

    fn remove_stale_temps(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return warnings;
        };
        let now = SystemTime::now();
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(TEMP_PREFIX) else {
                continue;
            };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            let writer_gone = rest
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| !process_alive(pid));
            if (old || writer_gone) && fs::remove_file(entry.path()).is_ok() {
                warnings.push(format!(
                    "feature cache: {}: removed an unfinished shard left by an interrupted run",
                    entry.path().display()
                ));
            }
        }
        warnings
    }
}

/// Whether process `pid` still runs. Only Linux can tell cheaply (`/proc`); elsewhere every writer counts
/// as alive and its leftovers go by age.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

enum ShardProblem {
    /// Damaged or not ours to parse: delete and recompute.
    Corrupt(String),
    /// Intact but for another dimension / version / namespace: leave alone.
    Foreign(String),
    /// Gone between listing and reading (another process compacted it).
    Vanished,
}

fn checksum(keys: &str, feature_bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(keys.as_bytes());
    h.update(feature_bytes);
    h.finalize().to_hex().to_string()
}

/// Folder name for a namespace: readable (model ids stay recognisable) yet collision-free (`a/b` and `a_b`
/// differ by the hash suffix) and safe on every file system.
fn namespace_dir_name(namespace: &str) -> String {
    let readable: String = namespace
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let readable = readable.trim_start_matches('.');
    let hash = blake3::hash(namespace.as_bytes()).to_hex();
    format!("{readable}-{}", &hash[..16])
}

/// Makes a rename durable. Best effort: some platforms cannot open a directory for syncing.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip() {
        let k = CacheKey {
            content: hash_bytes(b"x"),
            view: 7,
        };
        assert_eq!(CacheKey::decode(&k.encode()), Some(k));
        assert_eq!(CacheKey::decode("zz:1"), None);
    }

    #[test]
    fn namespace_names_are_distinct_and_safe() {
        let a = namespace_dir_name("openai/clip-vit-base-patch32 pp1");
        let b = namespace_dir_name("openai_clip-vit-base-patch32_pp1");
        assert_ne!(a, b);
        assert!(a.starts_with("openai_clip-vit-base-patch32_pp1-"));
        assert!(!namespace_dir_name("../..").contains('/'));
    }

    #[test]
    fn open_merges_many_small_shards_and_keeps_every_feature() {
        let dir = tempfile::tempdir().unwrap();
        let n = COMPACT_AT_SMALL_SHARDS + 3;
        let key = |i: usize| CacheKey {
            content: hash_bytes(&i.to_le_bytes()),
            view: 0,
        };
        {
            let (mut c, _) = FeatureCache::open(dir.path(), "ns", 3).unwrap();
            for i in 0..n {
                c.insert_batch(vec![(key(i), vec![i as f32, 1.0, -1.0])])
                    .unwrap();
            }
            assert_eq!(c.shard_count(), n, "one shard per batch before compaction");
        }
        let (c, warnings) = FeatureCache::open(dir.path(), "ns", 3).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.shard_count(), 1);
        let files = fs::read_dir(&c.dir).unwrap().count();
        assert_eq!(files, 1, "the merged shards' files are gone");
        for i in 0..n {
            assert_eq!(c.get(&key(i)), Some(&[i as f32, 1.0, -1.0][..]));
        }
    }

    #[test]
    fn open_removes_what_a_dead_writer_left_and_keeps_a_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = FeatureCache::open(dir.path(), "ns", 3).unwrap();
        // No pid reaches a billion (Linux caps them at 2^22).
        let dead = c.dir.join(format!("{TEMP_PREFIX}999999999-abc.part"));
        let live = c
            .dir
            .join(format!("{TEMP_PREFIX}{}-abc.part", std::process::id()));
        fs::write(&dead, b"half a shard").unwrap();
        fs::write(&live, b"a shard being written").unwrap();
        let (_, warnings) = FeatureCache::open(dir.path(), "ns", 3).unwrap();
        assert_eq!(dead.exists(), !cfg!(target_os = "linux"));
        assert!(live.exists(), "a running writer's file is never removed");
        if cfg!(target_os = "linux") {
            assert!(
                warnings.iter().any(|w| w.contains("999999999")),
                "{warnings:?}"
            );
        }
    }
}
