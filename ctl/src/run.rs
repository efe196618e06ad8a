//! `cairnctl run APP [-- ARGS]`: runs a command app once on the device and streams its output
//! here as it comes: the command's stdout to stdout, the rest (its stderr, what it logs
//! through `wasi:logging`, cairn's notes) to stderr. cairnctl then exits with the command's
//! own exit code, or 125 when the run could not start (as `docker run` does), so a script can
//! tell the two apart.

use crate::output::for_terminal_if;
use cairn_core::proto::{self, control_client::ControlClient};
use cairn_ctl::exit::Failure;
use serde_json::json;
use std::io::{IsTerminal, Write};
use tonic::transport::Channel;

/// The exit code when the run did not happen…
pub const NOT_RUN: i32 = 125;
/// …and when cairnctl lost cairnd after the run had started: how it ended is unknown here.
pub const LOST: i32 = 255;

pub async fn run(
    client: &mut ControlClient<Channel>,
    app: String,
    args: Vec<String>,
    json_output: bool,
) -> Result<(), Failure> {
    let not_run = |status: tonic::Status| Failure {
        code: NOT_RUN,
        message: status.message().to_string(),
    };
    let mut stream = client
        .run(proto::RunRequest { app, args })
        .await
        .map_err(not_run)?
        .into_inner();
    let (stdout, stderr) = (std::io::stdout(), std::io::stderr());
    let (out_terminal, err_terminal) = (stdout.is_terminal(), stderr.is_terminal());
    let mut started = false;
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) if started => {
                return Err(Failure {
                    code: LOST,
                    message: format!(
                        "lost cairnd during the run ({}); how it ended is unknown here: `cairnctl status` and `cairnctl logs` of the app say",
                        status.message()
                    ),
                })
            }
            Err(status) => return Err(not_run(status)),
        };
        started = true;
        if message.started {
            continue;
        }
        if message.finished {
            if json_output {
                let _ = writeln!(
                    stdout.lock(),
                    "{}",
                    json!({"exit_code": message.exit_code, "outcome": message.outcome,
                           "generation": message.generation, "duration_ms": message.duration_ms,
                           "dropped_bytes": message.dropped_bytes})
                );
            }
            if message.dropped_bytes > 0 {
                eprintln!(
                    "cairnctl: {} bytes of output were not shown here (read too slowly); `cairnctl logs` has them",
                    message.dropped_bytes
                );
            }
            if message.exit_code != 0 {
                eprintln!("cairnctl: the run ended: {}", message.outcome);
            }
            return match message.exit_code {
                0 => Ok(()),
                code => Err(Failure {
                    code,
                    message: String::new(),
                }),
            };
        }
        // Best effort: a closed pipe here must not stop the run's end from being reported.
        let _ = if json_output {
            writeln!(
                stdout.lock(),
                "{}",
                json!({"stream": message.stream, "text": message.text})
            )
        } else if message.stream == "stdout" {
            let mut out = stdout.lock();
            out.write_all(shown(out_terminal, &message.text).as_bytes())
                .and_then(|()| out.flush())
        } else {
            let text = shown(err_terminal, &message.text);
            let mut err = stderr.lock();
            match message.stream.as_str() {
                "stderr" => err.write_all(text.as_bytes()),
                other => writeln!(err, "[{other}] {}", text.trim_end()),
            }
        };
    }
    Err(Failure {
        code: if started { LOST } else { NOT_RUN },
        message: "cairnd ended the run's stream without saying how it ended".into(),
    })
}

/// Guest text as it may be shown: on a terminal, escaped as `for_terminal_if` does, but each
/// line for itself, so the output keeps its lines.
fn shown(terminal: bool, text: &str) -> String {
    text.split('\n')
        .map(|line| for_terminal_if(terminal, line))
        .collect::<Vec<_>>()
        .join("\n")
}
