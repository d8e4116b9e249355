//! Which file a GeoIP database was read from.
//!
//! Owns: the key that tells "the same file" from "a replaced one" without
//! reading it. Used by reloads and the file watcher; never on the query path.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file as the filesystem identifies it: device and inode (geoipupdate
/// renames a new file into place: a new inode), size, modification time
/// (an in-place write) and change time (which no one can set back: an
/// in-place write that restores the modification time still moves it).
///
/// Two equal keys are the same bytes for our purposes; a different key
/// makes the file be read again, and a file whose bytes turn out to be
/// those in use (a `touch`, a copy, the same download) is not checked
/// again (see `GeoDb::reload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileKey {
    /// The key of the file at `path` now; `None` when it cannot be read.
    pub fn at(path: &Path) -> Option<FileKey> {
        std::fs::metadata(path).ok().map(|m| FileKey::of(&m))
    }

    pub fn of(m: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}
