//! `cairnctl logs`: an app's recorded output and cairn's notes about it.

use crate::output::{for_terminal_if, stdout_is_terminal, utc_millis};
use cairn_core::proto::{self, control_client::ControlClient};
use cairn_ctl::exit::Failure;
use serde_json::json;
use std::io::Write;
use tonic::transport::Channel;

/// `cairnctl logs`.
pub async fn show(
    client: &mut ControlClient<Channel>,
    app: String,
    follow: bool,
    tail: Option<u64>,
    level: Option<String>,
    json_output: bool,
) -> Result<(), Failure> {
    let mut stream = client
        .logs(proto::LogsRequest {
            app,
            follow,
            tail: tail.unwrap_or(0),
            level: level.unwrap_or_default(),
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
