//! The one place cairnctl formats output: aligned tables for people, pretty JSON for scripts
//! (`-o json`), and the short forms of digests, sizes and times both use.

use cairn_core::proto;
use cairn_core::time::utc;
use clap::ValueEnum;
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

pub fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

pub fn short(digest: &str) -> String {
    digest.get(..19).unwrap_or(digest).to_string()
}

pub fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}

pub fn utc_millis(millis: i64) -> String {
    format!(
        "{}.{:03}",
        utc(millis.div_euclid(1000)),
        millis.rem_euclid(1000)
    )
}

/// An app as `-o json` shows it.
pub fn app_json(app: &proto::AppSummary) -> serde_json::Value {
    json!({
        "name": app.name,
        "generation": app.generation,
        "status": app.status,
        "listen": app.listen,
        "digest": app.digest,
        "owner": app.owner,
        "error": app.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_638_118), "2026-11-25 20:21:58");
        assert_eq!(utc_millis(1_795_638_118_042), "2026-11-25 20:21:58.042");
    }
}
