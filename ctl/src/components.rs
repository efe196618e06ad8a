//! `cairnctl push` and `components`: what the device stores.

use crate::output::{human_size, print_json, print_table, row, short};
use anyhow::Context as _;
use cairn_core::proto::{self, control_client::ControlClient, push_chunk::Part};
use cairn_core::time::utc;
use cairn_ctl::exit::Failure;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// Bytes per upload message.
const CHUNK: usize = 256 << 10;

/// `cairnctl push`.
pub async fn push_file(
    client: &mut ControlClient<Channel>,
    file: PathBuf,
    name: Option<String>,
    tag: String,
    json_output: bool,
) -> Result<(), Failure> {
    let reply = upload(client, &file, name, &tag).await?;
    if json_output {
        print_json(
            &json!({"digest": reply.digest, "size": reply.size, "name": reply.name, "tag": reply.tag, "already_present": reply.already_present}),
        );
    } else {
        println!("{}", reply.digest);
    }
    Ok(())
}

/// `cairnctl components`.
pub async fn list(client: &mut ControlClient<Channel>, json_output: bool) -> Result<(), Failure> {
    let components = client
        .list_components(proto::ListComponentsRequest {})
        .await?
        .into_inner()
        .components;
    if json_output {
        print_json(&json!(components
            .iter()
            .map(|c| json!({"digest": c.digest, "size": c.size, "name": c.name, "tag": c.tag, "source": c.source, "created": c.created_unix, "used_by": c.used_by}))
            .collect::<Vec<_>>()));
    } else {
        let mut rows = vec![row(["DIGEST", "NAME:TAG", "SIZE", "CREATED", "USED BY"])];
        for c in &components {
            let named = if c.name.is_empty() {
                "-".to_string()
            } else {
                format!("{}:{}", c.name, c.tag)
            };
            rows.push(vec![
                short(&c.digest),
                named,
                human_size(c.size),
                utc(c.created_unix),
                c.used_by.join(","),
            ]);
        }
        print_table(&rows);
    }
    Ok(())
}

/// Uploads `file` in chunks, showing progress on a terminal.
pub async fn upload(
    client: &mut ControlClient<Channel>,
    file: &Path,
    name: Option<String>,
    tag: &str,
) -> Result<proto::PushReply, Failure> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let name = name.unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "component".into())
    });
    let size = bytes.len() as u64;
    let show_progress = std::io::stderr().is_terminal() && size > 4 * CHUNK as u64;
    let meta = proto::PushChunk {
        part: Some(Part::Meta(proto::PushMeta {
            name,
            tag: tag.to_string(),
            size,
            digest,
        })),
    };
    let chunks: Vec<proto::PushChunk> = bytes
        .chunks(CHUNK)
        .map(|chunk| proto::PushChunk {
            part: Some(Part::Data(chunk.to_vec())),
        })
        .collect();
    let total = chunks.len();
    let stream = tokio_stream::iter(std::iter::once(meta).chain(
        chunks.into_iter().enumerate().map(move |(index, chunk)| {
            if show_progress {
                eprint!(
                    "\rpushing {}: {:>3}%",
                    human_size(size),
                    (index + 1) * 100 / total
                );
                if index + 1 == total {
                    eprintln!();
                }
            }
            chunk
        }),
    ));
    Ok(client.push(stream).await?.into_inner())
}

/// `cairnctl gc`: collects now and says what was freed.
pub async fn collect(
    client: &mut ControlClient<Channel>,
    json_output: bool,
) -> Result<(), Failure> {
    let reply = client.collect(proto::CollectRequest {}).await?.into_inner();
    if json_output {
        print_json(&json!({
            "generations": reply.generations, "components": reply.components,
            "component_bytes": reply.component_bytes, "compiled": reply.compiled,
            "compiled_bytes": reply.compiled_bytes, "log_lines": reply.log_lines,
            "file_bytes_freed": reply.file_bytes_freed, "store_bytes": reply.store_bytes,
            "store_budget": reply.store_budget,
        }));
        return Ok(());
    }
    println!(
        "collected {} generation(s), {} component(s) ({}), {} compiled code entr{} ({}), {} log line(s)",
        reply.generations,
        reply.components,
        human_size(reply.component_bytes),
        reply.compiled,
        if reply.compiled == 1 { "y" } else { "ies" },
        human_size(reply.compiled_bytes),
        reply.log_lines,
    );
    let budget = match reply.store_budget {
        0 => String::new(),
        budget => format!(" of a {} budget", human_size(budget)),
    };
    println!(
        "the store is {} smaller: {} now{budget}",
        human_size(reply.file_bytes_freed),
        human_size(reply.store_bytes)
    );
    Ok(())
}
