//! Benchmark reporting: wrk runs, medians, the machine's description, and the sections of
//! BENCHMARKS.md that a benchmark owns (rewritten between its markers on every run).

use std::net::SocketAddr;
use std::time::Duration;

pub fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "a median of nothing");
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// CPU model, core count, memory, kernel and date, one line each.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| format!("{} GiB", kib / (1 << 20)))
        .unwrap_or_default();
    format!(
        "- machine: {model}, {cores} cores, {memory} RAM, {} {}\n- date: {}",
        command_output("uname", &["-s", "-r"]),
        command_output("uname", &["-m"]),
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}

/// Replaces the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in BENCHMARKS.md
/// (appending the section when it is not there yet), leaving every other part as written.
pub fn write_section(name: &str, body: &str) {
    write_section_in("BENCHMARKS.md", "# Benchmarks\n", name, body);
}

/// `write_section` for another file of the workspace (`heading` starts it when it is new).
pub fn write_section_in(file: &str, heading: &str, name: &str, body: &str) {
    let path = crate::workspace_root().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| heading.into());
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let section = format!("{start}\n{}\n{end}", body.trim_end());
    let updated = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &text[..a], &text[b + end.len()..])
        }
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, updated)
        .unwrap_or_else(|e| panic!("{} is not writable: {e}", path.display()));
    println!("(written to {})", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

/// What one wrk run reports.
#[derive(Debug, Clone)]
pub struct Load {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub avg_ms: f64,
    /// wrk's lines about non-2xx answers and socket errors; empty when there were none.
    pub errors: String,
}

fn parse_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let value: f64 = text[..split].parse().unwrap_or(f64::NAN);
    match &text[split..] {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        other => panic!("unknown wrk unit `{other}` in `{text}`"),
    }
}

/// Runs wrk (`just bench` installs it) against `http://addr{path}`.
pub fn wrk(addr: SocketAddr, path: &str, threads: u32, connections: u32, seconds: u32) -> Load {
    let output = std::process::Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            &format!("http://{addr}{path}"),
        ])
        .output()
        .expect("wrk runs (just bench installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |prefix: &str, index: usize| -> &str {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(index))
            .unwrap_or_else(|| panic!("no `{prefix}` in wrk's output:\n{text}"))
    };
    let errors = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors"))
        .collect::<Vec<_>>()
        .join("; ");
    Load {
        requests_per_sec: field("Requests/sec:", 1).parse().unwrap(),
        avg_ms: parse_ms(field("Latency ", 1)),
        p50_ms: parse_ms(field("50%", 1)),
        p99_ms: parse_ms(field("99%", 1)),
        errors,
    }
}
