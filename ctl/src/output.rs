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

/// `text` as it may be written to a terminal: control characters (escape sequences above
/// all, which can retitle, clear or rewrite an operator's screen) and the bidirectional
/// overrides that reorder what is shown are written as escapes instead, such as `\x1b`.
/// Guest text (logs, errors a guest caused) goes through this whenever stdout is a terminal.
pub fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(
                c,
                '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}'
                    | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            )
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `text` escaped by `for_terminal` when `terminal`, else as it is.
pub fn for_terminal_if(terminal: bool, text: &str) -> std::borrow::Cow<'_, str> {
    if terminal {
        for_terminal(text)
    } else {
        text.into()
    }
}

/// Whether stdout is a terminal (then guest text is escaped, see `for_terminal`).
pub fn stdout_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout())
}

pub fn print_table(rows: &[Vec<String>]) {
    let terminal = stdout_is_terminal();
    // Escaped first, so the columns line up with what is shown.
    let escaped: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|cell| for_terminal_if(terminal, cell).into_owned())
                .collect()
        })
        .collect();
    let rows = &escaped;
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
    use std::io::Write;
    // A reader that went away (`| head`) ends the output quietly, as the tables do.
    let _ = writeln!(
        std::io::stdout().lock(),
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
    fn guest_text_for_a_terminal_has_its_controls_escaped() {
        let cases = [
            (
                "plain text, tabs\tand unicode é",
                "plain text, tabs\tand unicode é",
            ),
            ("\x1b]0;owned\x07title", "\\x1b]0;owned\\x07title"),
            ("\x1b[2Jclear", "\\x1b[2Jclear"),
            ("carriage\rreturn", "carriage\\x0dreturn"),
            ("bell\x7f", "bell\\x7f"),
            ("c1 \u{9b}31m", "c1 \\u{9b}31m"),
            ("bidi \u{202e}txt.exe", "bidi \\u{202e}txt.exe"),
        ];
        for (raw, shown) in cases {
            assert_eq!(for_terminal(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn dates_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_638_118), "2026-11-25 20:21:58");
        assert_eq!(utc_millis(1_795_638_118_042), "2026-11-25 20:21:58.042");
    }
}
