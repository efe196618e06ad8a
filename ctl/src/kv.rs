//! `cairnctl kv APP …`: an app's key-value data, for the operator. The same store the app's
//! guests reach through `wasi:keyvalue` and Spin's `key-value`, through the control socket.

use crate::output::{for_terminal_if, human_size, print_json, stdout_is_terminal};
use base64::Engine as _;
use cairn_core::proto::{self, control_client::ControlClient, kv_request::Op};
use cairn_ctl::exit::{Failure, EXHAUSTED, FAILURE, INVALID, PERMISSION};
use serde_json::json;
use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use tonic::transport::Channel;

/// The largest value, as cairnd bounds it.
const MAX_VALUE: usize = 1 << 20;
/// What one import call carries at most (cairnd takes 1,000 keys and 4 MiB).
const BATCH_KEYS: usize = 1000;
const BATCH_BYTES: usize = 4 << 20;
/// Keys read per export call, halved while their values come to more than one answer holds.
const EXPORT_KEYS: usize = 256;

#[derive(clap::Subcommand)]
pub enum KvCommand {
    /// List the keys, one per line, in the order they were first written.
    Ls,
    /// Print KEY's value as stored (its bytes, no newline added).
    Get { key: String },
    /// Set KEY to VALUE, or to what stdin holds (at most 1 MiB) when VALUE is left out.
    /// Counted against the app's [keyvalue] quota as the app's own writes are.
    Set { key: String, value: Option<String> },
    /// Delete KEYs (a key that is not there is not an error).
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Write every key and value to FILE (or stdout) as JSON lines:
    /// {"key": K, "value": TEXT}, or {"key": K, "base64": B} for a value that is not UTF-8.
    /// Read in pages while the app runs: a key written meanwhile may or may not be in it.
    /// FILE is written whole or not at all (a temporary file beside it, then renamed), mode
    /// 0600.
    Export { file: Option<PathBuf> },
    /// Set every key in FILE (written by `export`, or by hand in its form), in batches of up
    /// to 1,000 keys, each batch all or nothing. Keys not in the file are left as they are.
    /// FILE must be a regular file.
    Import { file: PathBuf },
}

/// `cairnctl kv`.
pub async fn run(
    client: &mut ControlClient<Channel>,
    app: String,
    command: KvCommand,
    json_output: bool,
) -> Result<(), Failure> {
    let mut kv = Kv { client, app };
    match command {
        KvCommand::Ls => {
            let mut cursor = None;
            let mut all = Vec::new();
            loop {
                let reply = kv.call(Op::List(proto::KvList { cursor })).await?;
                if json_output {
                    all.extend(reply.keys);
                } else {
                    // Keys are the app's text: escaped for a terminal, as logs are.
                    let terminal = stdout_is_terminal();
                    let mut out = std::io::stdout().lock();
                    for key in &reply.keys {
                        if writeln!(out, "{}", for_terminal_if(terminal, key)).is_err() {
                            return Ok(()); // a closed pipe
                        }
                    }
                }
                match reply.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            if json_output {
                print_json(&json!(all));
            }
        }
        KvCommand::Get { key } => {
            let reply = kv.get(vec![key.clone()]).await?;
            let Some(value) = reply.into_iter().next().and_then(|pair| pair.value) else {
                return Err(Failure {
                    code: cairn_ctl::exit::NOT_FOUND,
                    message: format!("{} has no key {key:?}", kv.app),
                });
            };
            if json_output {
                print_json(&line(&key, &value));
            } else if stdout_is_terminal() {
                // Raw bytes for a pipe; for a terminal, text with its controls escaped.
                print!(
                    "{}",
                    crate::output::for_terminal(&String::from_utf8_lossy(&value))
                );
            } else {
                let _ = std::io::stdout().write_all(&value);
            }
        }
        KvCommand::Set { key, value } => {
            let value = match value {
                Some(value) => value.into_bytes(),
                None => read_stdin()?,
            };
            let reply = kv
                .call(Op::Set(proto::KvPairs {
                    pairs: vec![proto::KvPair {
                        key: key.clone(),
                        value: Some(value),
                    }],
                }))
                .await?;
            report(json_output, json!({"set": key}), usage(&reply));
        }
        KvCommand::Rm { keys } => {
            let count = keys.len();
            let mut reply = None;
            for chunk in keys.chunks(BATCH_KEYS) {
                let delete = Op::Delete(proto::KvKeys {
                    keys: chunk.to_vec(),
                });
                reply = Some(kv.call(delete).await?);
            }
            let said = reply.as_ref().map(usage).unwrap_or_default();
            report(json_output, json!({"deleted": count}), said);
        }
        KvCommand::Export { file } => export(&mut kv, file).await?,
        KvCommand::Import { file } => import(&mut kv, file, json_output).await?,
    }
    Ok(())
}

struct Kv<'a> {
    client: &'a mut ControlClient<Channel>,
    app: String,
}

impl Kv<'_> {
    async fn call(&mut self, op: Op) -> Result<proto::KvReply, Failure> {
        let request = proto::KvRequest {
            app: self.app.clone(),
            op: Some(op),
        };
        Ok(self.client.kv(request).await?.into_inner())
    }

    async fn get(&mut self, keys: Vec<String>) -> Result<Vec<proto::KvPair>, Failure> {
        Ok(self.call(Op::Get(proto::KvKeys { keys })).await?.values)
    }
}

fn usage(reply: &proto::KvReply) -> String {
    if reply.quota == 0 {
        format!("{} stored", human_size(reply.used))
    } else {
        format!(
            "{} of {} quota used",
            human_size(reply.used),
            human_size(reply.quota)
        )
    }
}

fn report(json_output: bool, value: serde_json::Value, said: String) {
    if json_output {
        print_json(&value);
    } else {
        println!("{said}");
    }
}

/// One exported entry.
fn line(key: &str, value: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(value) {
        Ok(text) => json!({"key": key, "value": text}),
        Err(_) => {
            json!({"key": key, "base64": base64::engine::general_purpose::STANDARD.encode(value)})
        }
    }
}

fn read_stdin() -> Result<Vec<u8>, Failure> {
    let mut value = Vec::new();
    std::io::stdin()
        .take(MAX_VALUE as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|error| invalid(format!("cannot read the value from stdin: {error}")))?;
    if value.len() > MAX_VALUE {
        return Err(invalid(format!(
            "the value on stdin is over the {MAX_VALUE}-byte bound of a value"
        )));
    }
    Ok(value)
}

fn invalid(message: String) -> Failure {
    Failure {
        code: INVALID,
        message,
    }
}

/// The exit code of a local file's I/O error: a full disk is an exhausted resource, a refused
/// path a permission, as the daemon's own errors are.
fn io_failure(what: String, error: std::io::Error) -> Failure {
    let code = match error.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => EXHAUSTED,
        std::io::ErrorKind::PermissionDenied => PERMISSION,
        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => INVALID,
        _ => FAILURE,
    };
    Failure {
        code,
        message: format!("{what}: {error}"),
    }
}

/// Where an export goes: stdout, or a temporary file beside FILE, renamed over it only once
/// everything is written (a failed export leaves FILE as it was).
enum Sink {
    Stdout(std::io::BufWriter<std::io::StdoutLock<'static>>),
    File {
        writer: std::io::BufWriter<std::fs::File>,
        temporary: PathBuf,
        path: PathBuf,
    },
}

impl Sink {
    fn open(file: Option<&PathBuf>) -> Result<Sink, Failure> {
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = file else {
            return Ok(Sink::Stdout(std::io::BufWriter::new(
                std::io::stdout().lock(),
            )));
        };
        let name = path
            .file_name()
            .ok_or_else(|| invalid(format!("{} names no file", path.display())))?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".{}.partial", std::process::id()));
        let temporary = path.with_file_name(temporary_name);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|error| io_failure(format!("cannot write {}", temporary.display()), error))?;
        Ok(Sink::File {
            writer: std::io::BufWriter::new(created),
            temporary,
            path: path.clone(),
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(writer) => writer,
            Sink::File { writer, .. } => writer,
        }
    }

    fn finish(self) -> Result<(), Failure> {
        let failed = |error| io_failure("cannot write the export".into(), error);
        match self {
            Sink::Stdout(mut writer) => writer.flush().map_err(failed),
            Sink::File {
                writer,
                temporary,
                path,
            } => {
                let file = writer.into_inner().map_err(|e| failed(e.into_error()))?;
                file.sync_all().map_err(failed)?;
                std::fs::rename(&temporary, &path).map_err(|error| {
                    let _ = std::fs::remove_file(&temporary);
                    io_failure(
                        format!("cannot rename the export onto {}", path.display()),
                        error,
                    )
                })
            }
        }
    }

    /// Removes a temporary file left by a failed export.
    fn abandon(self) {
        if let Sink::File { temporary, .. } = self {
            let _ = std::fs::remove_file(temporary);
        }
    }
}

async fn export(kv: &mut Kv<'_>, file: Option<PathBuf>) -> Result<(), Failure> {
    // Asked first, so a name that has no data (or a caller who may not read it) leaves no file.
    let first = kv.call(Op::List(proto::KvList { cursor: None })).await?;
    let mut sink = Sink::open(file.as_ref())?;
    match export_into(kv, first, sink.writer()).await {
        Ok((keys, bytes)) => {
            sink.finish()?;
            if file.is_some() || !stdout_is_terminal() {
                eprintln!(
                    "exported {keys} {} ({} of values)",
                    if keys == 1 { "key" } else { "keys" },
                    human_size(bytes)
                );
            }
            Ok(())
        }
        Err(failure) => {
            sink.abandon();
            Err(failure)
        }
    }
}

async fn export_into(
    kv: &mut Kv<'_>,
    first: proto::KvReply,
    out: &mut dyn Write,
) -> Result<(u64, u64), Failure> {
    let write_failed = |error: std::io::Error| io_failure("cannot write the export".into(), error);
    let (mut keys_written, mut bytes) = (0u64, 0u64);
    let mut page = first;
    loop {
        let mut rest = &page.keys[..];
        let mut step = EXPORT_KEYS;
        while !rest.is_empty() {
            let take = step.min(rest.len());
            match kv.get(rest[..take].to_vec()).await {
                Ok(pairs) => {
                    // A key deleted since the page was listed is left out.
                    for pair in pairs {
                        if let Some(value) = pair.value {
                            writeln!(out, "{}", line(&pair.key, &value)).map_err(write_failed)?;
                            keys_written += 1;
                            bytes += value.len() as u64;
                        }
                    }
                    rest = &rest[take..];
                }
                // Their values come to more than one answer holds: ask for fewer.
                Err(failure) if failure.code == INVALID && take > 1 => step = take / 2,
                Err(failure) => return Err(failure),
            }
        }
        match page.cursor {
            Some(cursor) => {
                page = kv
                    .call(Op::List(proto::KvList {
                        cursor: Some(cursor),
                    }))
                    .await?
            }
            None => break,
        }
    }
    Ok((keys_written, bytes))
}

async fn import(kv: &mut Kv<'_>, file: PathBuf, json_output: bool) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never waits on a FIFO (opened without blocking, then refused), and reads no device.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&file)
        .map_err(|error| io_failure(format!("cannot read {}", file.display()), error))?;
    let kind = opened
        .metadata()
        .map_err(|error| io_failure(format!("cannot read {}", file.display()), error))?;
    if !kind.is_file() {
        return Err(invalid(format!(
            "{} is not a regular file: import reads only files (an export, or lines in its form)",
            file.display()
        )));
    }
    // An empty batch first: a caller who may not write hears so even for an empty file.
    kv.call(Op::Set(proto::KvPairs { pairs: Vec::new() }))
        .await?;
    let mut reader = std::io::BufReader::new(opened);
    // A line holds one value (at most 1 MiB; escaped as JSON, up to six bytes for one) and its
    // key (at most 1 KiB, escaped alike).
    let line_bound = (MAX_VALUE + (1 << 10)) * 6 + 64;
    let mut batch: Vec<proto::KvPair> = Vec::new();
    let (mut batch_bytes, mut imported, mut number) = (0usize, 0u64, 0u64);
    let mut reply = None;
    loop {
        let mut text = Vec::new();
        let read = (&mut reader)
            .take(line_bound as u64 + 1)
            .read_until(b'\n', &mut text)
            .map_err(|error| invalid(format!("cannot read {}: {error}", file.display())))?;
        if read == 0 {
            break;
        }
        number += 1;
        let at = |what: String| {
            invalid(format!(
                "{} line {number}: {what} ({imported} keys were imported before it)",
                file.display()
            ))
        };
        if text.len() > line_bound {
            return Err(at(format!("longer than {line_bound} bytes")));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (key, value) = entry(&text).map_err(at)?;
        // Sent before this entry would take the batch past what cairnd takes in one call.
        let size = key.len() + value.len();
        if !batch.is_empty() && (batch.len() == BATCH_KEYS || batch_bytes + size > BATCH_BYTES) {
            imported += batch.len() as u64;
            reply = Some(send_batch(kv, &mut batch, imported).await?);
            batch_bytes = 0;
        }
        batch_bytes += size;
        batch.push(proto::KvPair {
            key,
            value: Some(value),
        });
    }
    if !batch.is_empty() {
        imported += batch.len() as u64;
        reply = Some(send_batch(kv, &mut batch, imported).await?);
    }
    let entries = if imported == 1 { "entry" } else { "entries" };
    let said = match reply.as_ref() {
        Some(reply) => format!("imported {imported} {entries}; {}", usage(reply)),
        None => format!("imported {imported} {entries}"),
    };
    report(json_output, json!({"imported": imported}), said);
    Ok(())
}

async fn send_batch(
    kv: &mut Kv<'_>,
    batch: &mut Vec<proto::KvPair>,
    through: u64,
) -> Result<proto::KvReply, Failure> {
    let pairs = std::mem::take(batch);
    let before = through - pairs.len() as u64;
    kv.call(Op::Set(proto::KvPairs { pairs }))
        .await
        .map_err(|failure| Failure {
            message: format!(
                "{} ({before} keys were imported before this batch)",
                failure.message
            ),
            ..failure
        })
}

/// One line of an export: its key and value.
fn entry(text: &[u8]) -> Result<(String, Vec<u8>), String> {
    let value: serde_json::Value =
        serde_json::from_slice(text).map_err(|error| format!("not JSON: {error}"))?;
    if let Some(other) = value.as_object().and_then(|fields| {
        fields
            .keys()
            .find(|k| !["key", "value", "base64"].contains(&k.as_str()))
    }) {
        return Err(format!(
            "an unknown field {other:?}: a line has \"key\" and \"value\" or \"base64\""
        ));
    }
    let key = value["key"]
        .as_str()
        .ok_or("no \"key\" string")?
        .to_string();
    match (&value["value"], &value["base64"]) {
        (serde_json::Value::String(text), serde_json::Value::Null) => {
            Ok((key, text.clone().into_bytes()))
        }
        (serde_json::Value::Null, serde_json::Value::String(encoded)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|error| format!("\"base64\" is not base64: {error}"))?;
            Ok((key, bytes))
        }
        _ => Err("give the value as a \"value\" string or a \"base64\" string, one of them".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_text_and_bytes() {
        for value in [b"plain text".to_vec(), vec![0, 159, 146, 150, 255]] {
            let written = line("k", &value).to_string();
            assert_eq!(entry(written.as_bytes()).unwrap(), ("k".to_string(), value));
        }
        assert!(line("k", &[0xff]).get("base64").is_some());
        for bad in [
            &b"{\"key\": 1, \"value\": \"v\"}"[..],
            b"{\"key\": \"k\"}",
            b"{\"key\": \"k\", \"value\": \"v\", \"base64\": \"dg==\"}",
            b"{\"key\": \"k\", \"base64\": \"***\"}",
            b"{\"key\": \"k\", \"value\": \"v\", \"junk\": 5}",
            b"not json",
        ] {
            assert!(entry(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
