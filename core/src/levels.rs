//! Log levels. A line's `stream` says where it came from: `stdout`, `stderr`, `cairn` (cairn's
//! own notes about the app) or, for a line logged through `wasi:logging`, its level. Each
//! stream has a rank, so `cairnctl logs --level L` can keep the lines at L or above: output
//! without a level counts as `info`, cairn's notes as `warn` (they are mostly why a request
//! failed), so they show at every level up to `warn`.

/// The levels of `wasi:logging`, least severe first.
pub const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "critical"];

/// The rank of a stream: its level's index in `LEVELS`.
pub fn rank(stream: &str) -> usize {
    match stream {
        "cairn" => 3,
        other => LEVELS.iter().position(|l| *l == other).unwrap_or(2),
    }
}

/// The stream name of `level` as the pool names it, or `None` for a name that is no level.
pub fn level(name: &str) -> Option<&'static str> {
    LEVELS.iter().find(|l| **l == name).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_rank_by_level() {
        assert_eq!(rank("trace"), 0);
        assert_eq!(rank("stdout"), rank("info"));
        assert_eq!(rank("stderr"), rank("info"));
        assert_eq!(rank("cairn"), rank("warn"));
        assert!(rank("critical") > rank("error"));
        assert_eq!(level("warn"), Some("warn"));
        assert_eq!(level("loud"), None);
    }
}
