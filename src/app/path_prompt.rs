//! Paths typed by hand, and the system's file dialogs watched for failure.
//!
//! A native file dialog (rfd: the xdg desktop portal or zenity on Linux) may be missing on a bare desktop;
//! rfd then returns "nothing picked" at once, exactly as if the person had cancelled. A dialog a person
//! cancels stays open for at least a moment, so an answer within [`NATIVE_FAILED_WITHIN`] is taken as "the
//! dialog did not open", and the person is offered the typed path instead. The typed path is also the way for
//! keyboard-only users: Tab completes it like a shell.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A native dialog answering faster than this never reached the screen.
pub const NATIVE_FAILED_WITHIN: Duration = Duration::from_millis(150);

/// What a native file dialog gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Picked<T> {
    Path(T),
    Cancelled,
    /// It returned at once: no dialog backend on this system.
    Unavailable,
}

/// Runs a native dialog and tells a cancel from a dialog that never opened.
pub fn native<T>(dialog: impl FnOnce() -> Option<T>) -> Picked<T> {
    let start = Instant::now();
    let picked = dialog();
    classify(picked, start.elapsed())
}

/// What a dialog's answer means, given how long it took.
fn classify<T>(picked: Option<T>, took: Duration) -> Picked<T> {
    match picked {
        Some(p) => Picked::Path(p),
        None if took < NATIVE_FAILED_WITHIN => Picked::Unavailable,
        None => Picked::Cancelled,
    }
}

/// The words shown when the system's dialog did not open.
pub const NATIVE_UNAVAILABLE: &str = "the system's file dialog did not open (on Linux it needs \
     xdg-desktop-portal or zenity); type the path instead (Tab completes)";

/// The entries of the folder `text` points into whose names start with what follows the last `/`, sorted,
/// folders with a trailing `/`; hidden entries only when the typed name starts with a dot.
pub fn candidates(text: &str) -> Vec<String> {
    let (dir, prefix) = match text
        .rfind(std::path::MAIN_SEPARATOR)
        .or_else(|| text.rfind('/'))
    {
        Some(i) => (&text[..=i], &text[i + 1..]),
        None => ("", text),
    };
    let list_dir = if dir.is_empty() {
        Path::new(".")
    } else {
        Path::new(dir)
    };
    let Ok(entries) = std::fs::read_dir(list_dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if !name.starts_with(prefix) || (name.starts_with('.') && !prefix.starts_with('.')) {
                return None;
            }
            let is_dir = e.path().is_dir();
            Some(format!("{dir}{name}{}", if is_dir { "/" } else { "" }))
        })
        .collect();
    out.sort();
    out
}

/// Tab: the longest common prefix of the candidates (the one candidate, when there is one); `None` when
/// nothing matches or nothing would be added.
pub fn complete(text: &str) -> Option<String> {
    let c = candidates(text);
    let first = c.first()?;
    let mut common = first.len();
    for other in &c[1..] {
        common = common.min(
            first
                .char_indices()
                .zip(other.chars())
                .take_while(|((_, a), b)| a == b)
                .last()
                .map_or(0, |((i, a), _)| i + a.len_utf8()),
        );
    }
    let done = first[..common].to_string();
    (done.len() > text.len()).then_some(done)
}

/// `~/` means the home folder, as in a shell.
pub fn expand(text: &str) -> PathBuf {
    match (text.strip_prefix("~/"), dirs::home_dir()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(text.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tab_completes_like_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap().to_string();
        std::fs::create_dir_all(dir.path().join("photos-2024")).unwrap();
        std::fs::create_dir_all(dir.path().join("photos-2025")).unwrap();
        std::fs::create_dir_all(dir.path().join(".hidden")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(
            complete(&format!("{root}/ph")),
            Some(format!("{root}/photos-202"))
        );
        assert_eq!(
            complete(&format!("{root}/photos-202")),
            None,
            "two ways on: nothing to add"
        );
        assert_eq!(
            candidates(&format!("{root}/photos-202")),
            [
                format!("{root}/photos-2024/"),
                format!("{root}/photos-2025/")
            ]
        );
        assert_eq!(
            complete(&format!("{root}/n")),
            Some(format!("{root}/notes.txt"))
        );
        assert_eq!(
            complete(&format!("{root}/photos-2025")),
            Some(format!("{root}/photos-2025/"))
        );
        assert_eq!(
            candidates(&format!("{root}/")).len(),
            3,
            "hidden entries only when asked for"
        );
        assert_eq!(candidates(&format!("{root}/.")).len(), 1);
        assert!(candidates(&format!("{root}/nothing/x")).is_empty());
    }

    #[test]
    fn a_dialog_that_returns_at_once_did_not_open() {
        let at_once = Duration::from_millis(3);
        let after_a_while = NATIVE_FAILED_WITHIN * 4;
        assert_eq!(classify(None::<PathBuf>, at_once), Picked::Unavailable);
        assert_eq!(classify(None::<PathBuf>, after_a_while), Picked::Cancelled);
        assert_eq!(classify(Some(1), at_once), Picked::Path(1));
        assert_eq!(classify(Some(1), after_a_while), Picked::Path(1));
    }
}
