//! `cairnctl logs`: an app's recorded output and cairn's notes about it; `cairnctl events`:
//! what happened to apps and the device.

use crate::output::{for_terminal_if, stdout_is_terminal, utc_millis};
use cairn_core::proto::{self, control_client::ControlClient};
use cairn_ctl::exit::Failure;
use serde_json::json;
use std::io::Write;
use tonic::transport::Channel;

/// `--since WHEN`: a time ago (`10m`, `3d`) or a UTC time, as unix milliseconds.
pub fn since(text: &str) -> Result<i64, String> {
    if let Some(unix) = cairn_core::time::parse_utc(text) {
        return Ok(unix * 1000);
    }
    let wrong = || {
        format!("`{text}` is neither a time ago (such as 10m, 2h or 3d) nor a UTC time (such as \"2026-12-03 19:00\")")
    };
    // Days too, which a manifest's durations do not take.
    let ago = match text.trim().strip_suffix('d') {
        Some(days) => std::time::Duration::from_secs(
            days.parse::<u64>()
                .map_err(|_| wrong())?
                .saturating_mul(86_400),
        ),
        None => {
            text.parse::<cairn_core::spec::HumanDuration>()
                .map_err(|_| wrong())?
                .0
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok(now.saturating_sub(ago.as_millis().min(i64::MAX as u128) as i64))
}

/// `cairnctl logs`.
pub async fn show(
    client: &mut ControlClient<Channel>,
    app: String,
    follow: bool,
    tail: Option<u64>,
    level: Option<String>,
    since: Option<i64>,
    json_output: bool,
) -> Result<(), Failure> {
    let mut stream = client
        .logs(proto::LogsRequest {
            app,
            follow,
            tail: tail.unwrap_or(0),
            level: level.unwrap_or_default(),
            since_unix_millis: since.unwrap_or(0),
        })
        .await?
        .into_inner();
    let stdout = std::io::stdout();
    let terminal = stdout_is_terminal();
    while let Some(line) = stream.message().await? {
        let mut out = stdout.lock();
        let written = if json_output {
            writeln!(
                out,
                "{}",
                json!({"id": line.id, "time_ms": line.unix_millis, "stream": line.stream, "generation": line.generation, "line": line.line})
            )
        } else {
            writeln!(
                out,
                "{} [{}] {}",
                utc_millis(line.unix_millis),
                line.stream,
                for_terminal_if(terminal, &line.line)
            )
        };
        if written.and_then(|_| out.flush()).is_err() {
            break; // the reader went away (a closed pipe): stop quietly
        }
    }
    Ok(())
}

/// `cairnctl events`.
pub async fn events(
    client: &mut ControlClient<Channel>,
    app: Option<String>,
    follow: bool,
    since: Option<i64>,
    tail: Option<u64>,
    json_output: bool,
) -> Result<(), Failure> {
    let mut stream = client
        .events(proto::EventsRequest {
            app: app.unwrap_or_default(),
            follow,
            since_unix_millis: since.unwrap_or(0),
            tail: tail.unwrap_or(0),
        })
        .await?
        .into_inner();
    let stdout = std::io::stdout();
    let terminal = stdout_is_terminal();
    while let Some(event) = stream.message().await? {
        let mut out = stdout.lock();
        let written = if json_output {
            writeln!(
                out,
                "{}",
                json!({"id": event.id, "time_ms": event.unix_millis, "app": event.app, "generation": event.generation, "kind": event.kind, "text": event.text})
            )
        } else {
            let app = if event.app.is_empty() {
                "(device)"
            } else {
                &event.app
            };
            writeln!(
                out,
                "{} {} {} {}",
                utc_millis(event.unix_millis),
                for_terminal_if(terminal, app),
                event.kind,
                for_terminal_if(terminal, &event.text)
            )
        };
        if written.and_then(|_| out.flush()).is_err() {
            break; // the reader went away (a closed pipe): stop quietly
        }
    }
    Ok(())
}
