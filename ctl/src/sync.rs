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

/// Past its expiry an applied document is still served, and shown as expired: the upstream
/// may be frozen, or this device cut off from it.
fn expired(applied: &proto::AppliedVersion, now: i64) -> bool {
    applied.expires_unix > 0 && applied.expires_unix <= now
}

fn print_sync(status: &proto::SyncStatusReply, json_output: bool) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if json_output {
        print_json(&json!({
            "state": status.state, "upstream": status.upstream, "device": status.device,
            "device_source": status.device_source, "installation": status.installation,
            "delegation": {"serial": status.delegation_serial, "expires": status.delegation_expires_unix},
            "last_success": status.last_success_unix, "last_error": status.last_error,
            "backlog": status.backlog, "backlog_bytes": status.backlog_bytes, "dropped": status.dropped,
            "applied": status.applied.iter().map(|a| json!({
                "key": a.key, "version": a.version, "applied": a.applied_unix,
                "expires": a.expires_unix, "expired": expired(a, now), "complete": a.complete,
                "retry": a.retry,
            })).collect::<Vec<_>>(),
            "rejections": status.rejections.iter().map(|r| json!({"key": r.key, "reason": r.reason, "at": r.unix})).collect::<Vec<_>>(),
        }));
        return;
    }
    let mut rows = vec![
        row(["state", &status.state]),
        row(["upstream", &status.upstream]),
        row([
            "device",
            &match status.device_source.as_str() {
                "store" => format!(
                    "{} (made at first start; set [upstream] device to name it)",
                    status.device
                ),
                _ => status.device.clone(),
            },
        ]),
        row(["installation", &status.installation]),
        row([
            "delegation",
            &match status.delegation_serial {
                0 => "none".to_string(),
                serial if status.delegation_expires_unix <= now => format!(
                    "serial {serial}, EXPIRED at {}: delegated keys are not trusted",
                    utc(status.delegation_expires_unix)
                ),
                serial => format!(
                    "serial {serial}, valid until {}",
                    utc(status.delegation_expires_unix)
                ),
            },
        ]),
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
                "{} report(s) waiting ({}), {} dropped",
                status.backlog,
                cairn_core::spec::ByteSize(status.backlog_bytes),
                status.dropped
            ),
        ]),
    ];
    for applied in &status.applied {
        let mut text = format!(
            "version {} at {}",
            applied.version,
            utc(applied.applied_unix)
        );
        if expired(applied, now) {
            text += &format!(
                ", EXPIRED at {} (still served; no newer version has arrived)",
                utc(applied.expires_unix)
            );
        } else if applied.expires_unix > 0 {
            text += &format!(", valid until {}", utc(applied.expires_unix));
        }
        if !applied.retry.is_empty() {
            text += &format!(", retrying: {}", applied.retry);
        } else if !applied.complete {
            text += ", incomplete (retried)";
        }
        rows.push(row([&format!("applied {}", applied.key), &text]));
    }
    for rejection in &status.rejections {
        rows.push(row([
            &format!("rejected {}", rejection.key),
            &format!("{} ({})", rejection.reason, utc(rejection.unix)),
        ]));
    }
    print_table(&rows);
}
