//! Reading files an operator's input names (the import folder's config overlay, manifests and
//! components): only a regular file is read, the open never waits (a FIFO with no writer
//! would block it forever), and the read stops at a byte bound. The length the metadata claims
//! is never trusted: a device such as /dev/zero says 0 and never ends.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{} is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is over {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Opens `path` for reading if it is a regular file (after following symlinks). Anything else
/// is refused before it is opened (opening some devices acts: a watchdog starts, a serial
/// line drops its carrier), and checked again once open, in case it was swapped between.
pub fn open(path: &Path) -> Result<File, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    check_regular(path, std::fs::metadata(path).map_err(io)?.file_type())?;
    // O_NONBLOCK: opening a FIFO waits for a writer otherwise. It changes nothing for the
    // reads of a regular file, the only kind read on.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    check_regular(path, file.metadata().map_err(io)?.file_type())?;
    Ok(file)
}

fn check_regular(path: &Path, kind: std::fs::FileType) -> Result<(), FileError> {
    let not = |kind| {
        Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind,
        })
    };
    if kind.is_file() {
        Ok(())
    } else if kind.is_dir() {
        not("a directory")
    } else if kind.is_fifo() {
        not("a FIFO")
    } else if kind.is_char_device() {
        not("a character device")
    } else if kind.is_block_device() {
        not("a block device")
    } else if kind.is_socket() {
        not("a socket")
    } else {
        not("not a file")
    }
}

/// Calls `each` with the file's bytes in chunks, in order; fails once more than `limit`
/// bytes have come (before handing over the chunk that crossed it).
pub fn read_chunks(path: &Path, limit: u64, mut each: impl FnMut(&[u8])) -> Result<u64, FileError> {
    let mut file = open(path)?;
    let mut buffer = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(|source| FileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if read == 0 {
            return Ok(total);
        }
        total += read as u64;
        if total > limit {
            return Err(FileError::TooLarge {
                path: path.to_path_buf(),
                limit,
            });
        }
        each(&buffer[..read]);
    }
}

/// The whole file, if it is a regular file of at most `limit` bytes.
pub fn read(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    read_chunks(path, limit, |chunk| bytes.extend_from_slice(chunk))?;
    Ok(bytes)
}

/// The whole file as text (see `read`).
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    String::from_utf8(read(path, limit)?).map_err(|_| FileError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_never_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read(&file, 10).unwrap(), b"0123456789");
        assert!(matches!(
            read(&file, 9),
            Err(FileError::TooLarge { limit: 9, .. })
        ));

        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // No writer: an ordinary open would wait forever.
        assert!(matches!(
            read(&fifo, 10),
            Err(FileError::NotRegular { kind: "a FIFO", .. })
        ));
        for (path, kind) in [("/dev/zero", "a character device"), ("/", "a directory")] {
            match read(Path::new(path), 10) {
                Err(FileError::NotRegular { kind: found, .. }) => assert_eq!(found, kind),
                other => panic!("{path}: {other:?}"),
            }
        }
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read(&link, 10),
            Err(FileError::NotRegular {
                kind: "a character device",
                ..
            })
        ));
        // A file whose metadata says 0 bytes but which has content is read to its bound.
        assert!(matches!(
            read(Path::new("/proc/self/status"), 8),
            Err(FileError::TooLarge { .. })
        ));
        let text = read_text(&file, 100).unwrap();
        assert_eq!(text, "0123456789");
    }
}
