//! `cairnctl sync`: this device's link to the upstream lattice.

use crate::output::{print_json, print_table, row};
use cairn_core::proto::{self, control_client::ControlClient};
use cairn_core::time::utc;
use cairn_ctl::exit::Failure;
use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum SyncCommand {
    /// State of the link, last success, last error, applied versions, backlog, rejections.
    Status,
    /// Try to reach the upstream now instead of waiting for the next retry.
    Now,
}

/// `cairnctl sync status|now`.
pub async fn run(
    client: &mut ControlClient<Channel>,
    command: SyncCommand,
    json_output: bool,
) -> Result<(), Failure> {
    let status = match command {
        SyncCommand::Status => client.sync_status(proto::SyncStatusRequest {}).await?,
        SyncCommand::Now => client.sync_now(proto::SyncNowRequest {}).await?,
    }
    .into_inner();
    print_sync(&status, json_output);
    Ok(())
}

fn print_sync(status: &proto::SyncStatusReply, json_output: bool) {
    if json_output {
        print_json(&json!({
            "state": status.state, "upstream": status.upstream, "device": status.device,
            "last_success": status.last_success_unix, "last_error": status.last_error,
            "backlog": status.backlog, "dropped": status.dropped,
            "applied": status.applied.iter().map(|a| json!({"key": a.key, "version": a.version, "applied": a.applied_unix})).collect::<Vec<_>>(),
            "rejections": status.rejections.iter().map(|r| json!({"key": r.key, "reason": r.reason, "at": r.unix})).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut rows = vec![
        row(["state", &status.state]),
        row(["upstream", &status.upstream]),
        row(["device", &status.device]),
        row([
            "last success",
            &if status.last_success_unix == 0 {
                "never".to_string()
            } else {
                utc(status.last_success_unix)
            },
        ]),
        row(["last error", &status.last_error]),
        row([
            "backlog",
            &format!(
                "{} report(s) waiting, {} dropped",
                status.backlog, status.dropped
            ),
        ]),
    ];
    for applied in &status.applied {
        rows.push(row([
            &format!("applied {}", applied.key),
            &format!(
                "version {} at {}",
                applied.version,
                utc(applied.applied_unix)
            ),
        ]));
    }
    for rejection in &status.rejections {
        rows.push(row([
            &format!("rejected {}", rejection.key),
            &format!("{} ({})", rejection.reason, utc(rejection.unix)),
        ]));
    }
    print_table(&rows);
}
