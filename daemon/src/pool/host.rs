//! What a request's guest sees of its host (the `T` of every request's `Store`): WASI with
//! every capability the app was not granted denied, `wasi:http` with outgoing requests to
//! the hosts of `[outbound]` only (`outgoing`), and its stdout and stderr captured in memory up
//! to a bound.

use super::services::Client;
use bytes::{Bytes, BytesMut};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Output kept per stream per request; the rest is cut and the cut is marked.
const OUTPUT_LIMIT: usize = 64 << 10;
/// What a kept `wasi:logging` line costs beyond its text (its entry in `GuestLog`).
const LINE_OVERHEAD: usize = std::mem::size_of::<(&str, String)>();

/// The `T` of every request's `Store`.
pub struct Host {
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub limits: StoreLimits,
    pub hooks: super::outgoing::OutgoingHttp,
    /// What `wasi:config` and Spin's variables read (`interfaces`).
    pub config: Arc<GuestConfig>,
    /// What the guest logged through `wasi:logging` during this request.
    pub logged: GuestLog,
    /// The app's key-value store as this instance reaches it (`interfaces`).
    pub kv: KvAccess,
}

/// An instance's way to the app's key-value store: the pool's client of the host-services
/// socket (`None`: the app has no `[keyvalue]`), and how many stores it holds open.
pub struct KvAccess {
    pub client: Option<Arc<Client>>,
    pub open: usize,
}

impl KvAccess {
    pub fn new(client: Option<Arc<Client>>) -> KvAccess {
        KvAccess { client, open: 0 }
    }
}

/// An open store as a guest holds it (`wasi:keyvalue`'s `bucket`, Spin's `store`): every app
/// has one store, so the handle carries nothing but its existence.
pub struct KvStore;

/// A request's `wasi:logging` lines, each with its level, kept up to `OUTPUT_LIMIT` bytes.
#[derive(Default)]
pub struct GuestLog {
    pub lines: Vec<(&'static str, String)>,
    bytes: usize,
    /// Lines were dropped past the bound.
    pub cut: bool,
}

impl GuestLog {
    pub fn push(&mut self, level: &'static str, context: &str, message: &str) {
        let line = if context.is_empty() {
            message.to_string()
        } else {
            format!("{context}: {message}")
        };
        // Each line is charged its bookkeeping too, so a guest logging empty messages in a
        // loop fills the bound instead of growing the list without end.
        let cost = line.len() + LINE_OVERHEAD;
        if self.bytes + cost > OUTPUT_LIMIT {
            self.cut = true;
            return;
        }
        self.bytes += cost;
        self.lines.push((level, line));
    }
}

/// An app's `[config]` and `[secrets]` as its guests read them: one map, since a key is never
/// in both (`AppSpec::validate`).
#[derive(Default)]
pub struct GuestConfig(BTreeMap<String, String>);

impl GuestConfig {
    pub fn of(spec: &crate::spec::AppSpec) -> GuestConfig {
        let mut values = spec.config.clone();
        values.extend(spec.secrets.0.clone());
        GuestConfig(values)
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.get(key)
    }

    pub fn all(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// A guest's stdout or stderr for one request: kept in memory up to `OUTPUT_LIMIT`, then cut.
#[derive(Clone)]
pub struct OutputCapture {
    buffer: Arc<Mutex<(BytesMut, bool)>>,
}

impl OutputCapture {
    pub fn new() -> OutputCapture {
        OutputCapture {
            buffer: Arc::new(Mutex::new((BytesMut::new(), false))),
        }
    }

    pub fn append(&self, bytes: &[u8]) {
        let mut guard = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let (buffer, cut) = &mut *guard;
        let room = OUTPUT_LIMIT.saturating_sub(buffer.len());
        if bytes.len() > room {
            *cut = true;
        }
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    pub fn take(&self) -> Bytes {
        let mut guard = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let (buffer, cut) = &mut *guard;
        if std::mem::take(cut) {
            buffer.extend_from_slice(b"\n[cairn: output of this request cut at 64KiB]\n");
        }
        std::mem::take(buffer).freeze()
    }
}

impl wasmtime_wasi::cli::IsTerminal for OutputCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for OutputCapture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
}

impl wasmtime_wasi::p2::OutputStream for OutputCapture {
    fn write(&mut self, bytes: Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        // Always writable: output past the limit is dropped (and marked), never an error that
        // would make a chatty guest fail.
        Ok(OUTPUT_LIMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for OutputCapture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for OutputCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_at_the_limit_and_marked() {
        let capture = OutputCapture::new();
        capture.append(&vec![b'x'; OUTPUT_LIMIT - 1]);
        capture.append(b"yz");
        let taken = capture.take();
        assert!(taken.starts_with(&vec![b'x'; OUTPUT_LIMIT - 1]));
        assert!(String::from_utf8_lossy(&taken).contains("cut at 64KiB"));
        assert!(capture.take().is_empty());
    }

    #[test]
    fn logged_lines_are_bounded_even_when_empty() {
        let mut log = GuestLog::default();
        for _ in 0..1_000_000 {
            log.push("info", "", "");
        }
        assert!(log.cut);
        assert!(log.lines.len() <= OUTPUT_LIMIT / LINE_OVERHEAD);
        let mut log = GuestLog::default();
        log.push("warn", "db", "slow");
        assert_eq!(log.lines, [("warn", "db: slow".to_string())]);
        assert!(!log.cut);
    }
}
