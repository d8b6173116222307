//! The person's choices that hold for every project (`<user dir>/prefs.json`): which CLIP weights to use and
//! the projects opened lately. A project file holds what belongs to one folder; this holds what a person
//! should only have to say once.
//!
//! A missing file is a first run. A file that cannot be read is reported and left untouched (it is replaced
//! only when the person changes a choice), so a hand edit with a typo loses nothing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::project::atomic_write;

/// How many recent projects are remembered.
pub const RECENT_MAX: usize = 8;

/// Where CLIP's weights come from when neither the command line nor the project names a model folder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ModelChoice {
    /// Not chosen yet: the first folder that needs a model asks.
    #[default]
    Unset,
    /// The default look-up, downloading `openai/clip-vit-base-patch32` (about 600 MB, once) when it is not on
    /// disk.
    Download,
    /// A Hugging Face CLIP folder on disk.
    Folder { path: PathBuf },
    /// The random-weight test checkpoint: the app runs, predictions mean nothing (labelled everywhere).
    TestCheckpoint,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Prefs {
    pub model: ModelChoice,
    /// Where images are embedded (auto: a hardware GPU when present, else the CPU).
    pub clip_device: crate::clip::ClipDevice,
    /// Project files, most recent first.
    pub recent: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("cannot read your hegraph settings {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("your hegraph settings {} are not readable ({detail}); they were left untouched and the defaults \
             are used until you change a setting", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot save your hegraph settings {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Prefs {
    pub fn path(user_dir: &Path) -> PathBuf {
        user_dir.join("prefs.json")
    }

    /// The saved choices; the defaults when there are none (a first run) or they cannot be read (with why).
    pub fn load(user_dir: &Path) -> (Prefs, Option<PrefsError>) {
        let path = Self::path(user_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Prefs::default(), None),
            Err(source) => return (Prefs::default(), Some(PrefsError::Read { path, source })),
        };
        match serde_json::from_slice(&bytes) {
            Ok(p) => (p, None),
            Err(e) => (
                Prefs::default(),
                Some(PrefsError::Corrupt {
                    path,
                    detail: e.to_string(),
                }),
            ),
        }
    }

    pub fn save(&self, user_dir: &Path) -> Result<(), PrefsError> {
        let path = Self::path(user_dir);
        let write_err = |source| PrefsError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(user_dir).map_err(write_err)?;
        let mut bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
        bytes.push(b'\n');
        atomic_write(&path, &bytes).map_err(write_err)
    }

    /// Puts `project` first in [`Self::recent`] (once), keeping at most [`RECENT_MAX`].
    pub fn remember(&mut self, project: &Path) {
        self.recent.retain(|p| p != project);
        self.recent.insert(0, project.to_path_buf());
        self.recent.truncate(RECENT_MAX);
    }

    /// The recent projects whose files still exist.
    pub fn existing_recent(&self) -> impl Iterator<Item = &PathBuf> {
        self.recent.iter().filter(|p| p.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_round_trip_and_a_damaged_file_is_reported_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (p, err) = Prefs::load(dir.path());
        assert_eq!(p, Prefs::default());
        assert!(err.is_none(), "no file is a first run, not an error");
        let mut p = Prefs {
            model: ModelChoice::Folder {
                path: PathBuf::from("/models/clip"),
            },
            clip_device: crate::clip::ClipDevice::Gpu,
            recent: Vec::new(),
        };
        for i in 0..RECENT_MAX + 2 {
            p.remember(Path::new(&format!("/p{i}.json")));
        }
        p.remember(Path::new("/p3.json"));
        assert_eq!(p.recent.len(), RECENT_MAX);
        assert_eq!(p.recent[0], Path::new("/p3.json"));
        assert_eq!(
            p.recent.iter().filter(|r| r.ends_with("p3.json")).count(),
            1
        );
        p.save(dir.path()).unwrap();
        assert_eq!(Prefs::load(dir.path()).0, p);
        // A file from before the setting existed embeds where `auto` says.
        std::fs::write(Prefs::path(dir.path()), "{\"recent\": []}").unwrap();
        assert_eq!(
            Prefs::load(dir.path()).0.clip_device,
            crate::clip::ClipDevice::Auto
        );

        std::fs::write(
            Prefs::path(dir.path()),
            "{\"model\": {\"kind\": \"nonsense\"",
        )
        .unwrap();
        let (p, err) = Prefs::load(dir.path());
        assert_eq!(p, Prefs::default());
        assert!(matches!(err, Some(PrefsError::Corrupt { .. })), "{err:?}");
        assert!(std::fs::read_to_string(Prefs::path(dir.path()))
            .unwrap()
            .contains("nonsense"));
    }
}
