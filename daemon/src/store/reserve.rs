//! A reserve file beside the database: space set aside while the disk has it, and given back
//! when the database cannot be opened (SQLite needs room for its WAL index even to read), so
//! that a device whose disk filled up while cairnd was stopped still starts and serves. It is
//! made again once the disk has room.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The space set aside.
pub const RESERVE_BYTES: u64 = 4 << 20;
/// The reserve is made only with this much more free, so that making it never fills the disk.
const MARGIN: u64 = 16 << 20;

fn path(db: &Path) -> PathBuf {
    db.with_file_name("cairn.reserve")
}

/// Gives the reserve back; whether there was one.
pub fn release(db: &Path) -> bool {
    // A reserve being made when cairnd was killed counts too.
    let partial = std::fs::remove_file(path(db).with_extension("reserve.partial")).is_ok();
    std::fs::remove_file(path(db)).is_ok() || partial
}

/// Makes the reserve if it is missing and the disk has room for it; whether it was made.
pub fn keep(db: &Path) -> std::io::Result<bool> {
    let reserve = path(db);
    if reserve.exists() || free_bytes(db).unwrap_or(0) < RESERVE_BYTES + MARGIN {
        return Ok(false);
    }
    // Written under another name and renamed, so a crash never leaves a short reserve.
    let partial = reserve.with_extension("reserve.partial");
    let made = (|| {
        let mut file = std::fs::File::create(&partial)?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES / zeros.len() as u64 {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        std::fs::rename(&partial, &reserve)
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made.map(|()| true)
}

/// Free bytes on the file system holding `db` (for an unprivileged user).
pub fn free_bytes(db: &Path) -> Option<u64> {
    let dir = db.parent().unwrap_or(Path::new("."));
    let stats = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(stats.blocks_available() as u64 * stats.fragment_size() as u64)
}
