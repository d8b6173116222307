//! File names as they are written to files that a program reads back (the features file's `paths.*`, the
//! prediction CSV/JSON, exports, the project's label keys): a `String` from which the exact bytes of the
//! name can be recovered, so that any name the file system allows round-trips and two names never collide.
//!
//! # The escape (Unix)
//!
//! A name is a sequence of bytes. Every run of bytes that is valid UTF-8 is kept as it is, except the
//! backslash; every byte that is *not* part of valid UTF-8, and the backslash itself, is written as `\xNN`
//! (two upper-case hex digits). So `x\xe9.png` (Latin-1 é) is stored as `x\xE9.png`, `a\b.png` as
//! `a\x5Cb.png`, and `café.png` (valid UTF-8) unchanged. Newlines, tabs and quotes are ordinary characters
//! here: the formats that hold stored names (JSON arrays, quoted CSV fields) carry them safely.
//!
//! Reading undoes exactly that: `\x` followed by two hex digits (either case) is that byte; anything else,
//! a lone backslash included, is taken literally, so a hand-written name without escapes reads as itself.
//! The backslash was chosen as the escape because it almost never appears in Unix file names and cannot
//! appear in a Windows one, so ordinary names are stored unchanged (a `%XX` escape would rewrite every
//! URL-encoded download name such as `photo%20one.jpg`).
//!
//! On other platforms, names are stored with [`Path::to_string_lossy`] and read back literally: Windows
//! names are UTF-16 and there is no safe way to rebuild an unpaired surrogate, and a backslash there is the
//! separator of an absolute path, not a character to escape.
//!
//! For a person, show [`display`]: the lossy form (invalid bytes become `�`), never the stored one.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// The stored form of a path: exact, see the module docs.
pub fn path_to_stored(path: &Path) -> String {
    os_to_stored(path.as_os_str())
}

/// The stored form of one file-name component or any OS string.
#[cfg(unix)]
pub fn os_to_stored(s: &OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\x5C");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// The stored form of one file-name component or any OS string.
#[cfg(not(unix))]
pub fn os_to_stored(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

/// The stored form of a name that is already a `str` (e.g. read from a version-1 features file, where names
/// were kept literally): only backslashes change.
pub fn str_to_stored(s: &str) -> String {
    os_to_stored(OsStr::new(s))
}

/// The path a stored form names (the inverse of [`path_to_stored`]).
pub fn path_from_stored(stored: &str) -> PathBuf {
    PathBuf::from(os_from_stored(stored))
}

/// The OS string a stored form names (the inverse of [`os_to_stored`]).
#[cfg(unix)]
pub fn os_from_stored(stored: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = stored.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            if let (Some(hi), Some(lo)) = (
                b.get(i + 2).and_then(|&c| hex(c)),
                b.get(i + 3).and_then(|&c| hex(c)),
            ) {
                out.push(hi << 4 | lo);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// The OS string a stored form names (the inverse of [`os_to_stored`]).
#[cfg(not(unix))]
pub fn os_from_stored(stored: &str) -> OsString {
    OsString::from(stored)
}

#[cfg(unix)]
fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// What to show a person for a stored name: the real name, with bytes that are not UTF-8 shown as `�`.
/// Two different names may look alike here; compare stored forms, never displayed ones.
pub fn display(stored: &str) -> String {
    os_from_stored(stored).to_string_lossy().into_owned()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn every_byte_sequence_round_trips_and_utf8_stays_readable() {
        let names: &[&[u8]] = &[
            b"plain.png",
            "caf\u{e9}.png".as_bytes(),
            b"x\xe9.png",
            b"x\xe8.png",
            b"a\\b.png",
            b"a\\x41.png",
            b"new\nline\tand \"quotes\".png",
            b"\xff\xfe\\\xc3",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let s = os_to_stored(OsStr::from_bytes(n));
            assert_eq!(os_from_stored(&s).as_bytes(), *n, "{s}");
            assert!(seen.insert(s.clone()), "{s} collides");
        }
        assert_eq!(os_to_stored(OsStr::from_bytes(b"x\xe9.png")), "x\\xE9.png");
        assert_eq!(os_to_stored(OsStr::new("caf\u{e9}.png")), "caf\u{e9}.png");
        assert_eq!(os_to_stored(OsStr::new("a\\b")), "a\\x5Cb");
        assert_eq!(display("x\\xE9.png"), "x\u{fffd}.png");
        // Not an escape: kept literally.
        assert_eq!(os_from_stored("a\\b\\xZ1\\x4").as_bytes(), b"a\\b\\xZ1\\x4");
        assert_eq!(os_from_stored("\\x41\\x5c").as_bytes(), b"A\\");
    }
}
