//! The log pipeline: guest stdout/stderr and cairn's own notes about an app go through a
//! channel bounded in bytes to one writer task that batches them into the store, then to live
//! followers (`cairnctl logs -f`). The writer gathers what comes within `FLUSH_EVERY` of a
//! batch's first line into one transaction, so an app that logs a line per request costs the
//! flash one commit a second, not one per line; a reader (`flush`) has what is gathered written
//! at once, so `cairnctl logs` always shows every line emitted before it asked. The request path never waits on it: when the channel is full
//! a line is dropped and counted, and the count is shown in `cairnctl status`. Each app keeps
//! its newest lines up to a count and a byte budget (`Keep`).

use crate::store::{now_unix, EventRecord, LogRecord, NewEvent, NewLogLine, OutboxBounds, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};

/// Pending `emit` calls (each a batch of lines) before new ones are dropped and counted…
const CHANNEL_BATCHES: usize = 1024;
/// …and the bytes of line text they may hold together.
pub const CHANNEL_BYTES: usize = 16 << 20;
/// Lines written to the store in one transaction, at most (a little more when one emit is big).
const BATCH_LINES: usize = 4096;
/// How long the writer gathers lines after a batch's first before it writes them: the most a
/// power cut can take of what was emitted (BENCHMARKS.md, "Flash wear", has what it saves).
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest line kept; longer ones are cut (a line is a record, not a file transfer).
const MAX_LINE: usize = 16 << 10;

pub struct LogHub {
    sender: mpsc::Sender<Vec<NewLogLine>>,
    /// Readers waiting for what is gathered to be written (`flush`).
    flushes: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    live: broadcast::Sender<LogRecord>,
    dropped: AtomicU64,
    /// Bytes of line text in the channel now.
    queued: AtomicUsize,
    /// Events (`event`) on their way to the store, and to followers once stored.
    events: mpsc::Sender<NewEvent>,
    live_events: broadcast::Sender<EventRecord>,
    /// Events dropped because the queue was full.
    events_dropped: AtomicU64,
}

/// Events waiting for the store before new ones are dropped (and counted); each is small
/// (`MAX_EVENT_TEXT`).
const EVENT_QUEUE: usize = 1024;
/// The longest event text kept.
const MAX_EVENT_TEXT: usize = 1024;

/// How much of each app's log the store keeps: its newest lines, up to both bounds; and of all
/// apps' together, up to `total` bytes (the store's `Policy::log_bytes_total`).
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    pub lines: u64,
    pub bytes: u64,
    pub total: u64,
}

/// What a line costs besides its text (the record, its app name), so a flood of empty lines
/// is bounded too.
const LINE_OVERHEAD: usize = 128;

/// The bytes `lines` are counted as against `CHANNEL_BYTES`.
fn text_bytes(lines: &[NewLogLine]) -> usize {
    lines
        .iter()
        .map(|line| line.line.len() + LINE_OVERHEAD)
        .sum()
}

impl LogHub {
    /// Starts the writer task; the store keeps the newest `keep_per_app` lines of each app.
    /// With `outbox` (an upstream is configured) every line is also queued for the upstream,
    /// in the same transaction.
    pub fn start(
        store: Arc<Store>,
        keep: Keep,
        outbox: Option<(String, OutboxBounds)>,
    ) -> Arc<LogHub> {
        let (sender, receiver) = mpsc::channel(CHANNEL_BATCHES);
        let (flushes, flush_requests) = mpsc::channel(64);
        let (live, _) = broadcast::channel(1024);
        let (events, event_queue) = mpsc::channel(EVENT_QUEUE);
        let (live_events, _) = broadcast::channel(256);
        let hub = Arc::new(LogHub {
            sender,
            flushes,
            live: live.clone(),
            dropped: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            events,
            live_events: live_events.clone(),
            events_dropped: AtomicU64::new(0),
        });
        tokio::spawn(write_events(Arc::clone(&store), event_queue, live_events));
        tokio::spawn(write_loop(
            store,
            (receiver, flush_requests),
            live,
            keep,
            outbox,
            Arc::clone(&hub),
        ));
        hub
    }

    /// Records `text` (split into lines) for `app`. Never blocks.
    pub fn emit(&self, app: &str, generation: u64, stream: &'static str, text: &[u8]) {
        if text.is_empty() {
            return;
        }
        let unix_millis = now_millis();
        let text = String::from_utf8_lossy(text);
        let mut lines = Vec::new();
        for line in text.trim_end_matches('\n').split('\n') {
            let mut line = line.trim_end_matches('\r').to_string();
            cairn_core::text::cut(&mut line, MAX_LINE, " [cut]");
            lines.push(NewLogLine {
                app: app.to_string(),
                generation,
                unix_millis,
                stream,
                line,
            });
        }
        let count = lines.len() as u64;
        let bytes = text_bytes(&lines);
        let before = self.queued.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > CHANNEL_BYTES || self.sender.try_send(lines).is_err() {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
            self.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// A note from cairn itself about an app (deploys, traps, timeouts).
    pub fn note(&self, app: &str, generation: u64, text: &str) {
        self.emit(app, generation, "cairn", text.as_bytes());
    }

    /// Waits (up to 5 s) until every line emitted before the call is in the store.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.flushes.send(done).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), written).await;
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogRecord> {
        self.live.subscribe()
    }

    /// Records an event (`kind`: deploy, rollback, restart, exit, oom, crashloop, …) with its
    /// time, and notes `text` in the app's log as `note` does (`app` "": the device's own,
    /// in no app's log). Never blocks: when the queue is full the event is dropped and counted.
    pub fn event(&self, app: &str, generation: u64, kind: &'static str, text: &str) {
        if !app.is_empty() {
            self.note(app, generation, text);
        }
        self.record(app, generation, kind, text);
    }

    /// Records an event only (not in the app's log).
    pub fn record(&self, app: &str, generation: u64, kind: &'static str, text: &str) {
        let mut text = text.to_string();
        cairn_core::text::cut(&mut text, MAX_EVENT_TEXT, "…");
        let event = NewEvent {
            app: app.to_string(),
            generation,
            unix_millis: now_millis(),
            kind,
            text,
        };
        if self.events.try_send(event).is_err() {
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Ordering::Relaxed)
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<EventRecord> {
        self.live_events.subscribe()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Writes events as they come, those queued together in one transaction, then hands them to
/// followers with their ids.
async fn write_events(
    store: Arc<Store>,
    mut queue: mpsc::Receiver<NewEvent>,
    live: broadcast::Sender<EventRecord>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < 256 {
            match queue.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let written = batch.clone();
        match store.call(move |store| store.append_events(&written)).await {
            Ok(ids) => {
                for (id, event) in ids.into_iter().zip(batch) {
                    let _ = live.send(EventRecord {
                        id,
                        app: event.app,
                        generation: event.generation,
                        unix_millis: event.unix_millis,
                        kind: event.kind.to_string(),
                        text: event.text,
                    });
                }
            }
            Err(error) => {
                tracing::warn!(%error, events = batch.len(), "events could not be stored")
            }
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(now_unix() * 1000)
}

async fn write_loop(
    store: Arc<Store>,
    (mut receiver, mut flush_requests): (
        mpsc::Receiver<Vec<NewLogLine>>,
        mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    ),
    live: broadcast::Sender<LogRecord>,
    keep: Keep,
    outbox: Option<(String, OutboxBounds)>,
    hub: Arc<LogHub>,
) {
    // Lines and bytes written per app since its last prune.
    let mut written_since_prune: HashMap<String, (u64, u64)> = HashMap::new();
    // Bytes written by all apps since the last prune of the total.
    let mut written_total: u64 = 0;
    // Readers to answer once the batch under way is written.
    let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    loop {
        let mut batch = tokio::select! {
            lines = receiver.recv() => match lines {
                Some(lines) => lines,
                None => break,
            },
            Some(reader) = flush_requests.recv() => {
                // Nothing gathered: everything emitted so far is written (or on its way
                // in the channel, which the reader then waits for).
                match receiver.try_recv() {
                    Ok(lines) => {
                        waiting.push(reader);
                        lines
                    }
                    Err(_) => {
                        let _ = reader.send(());
                        continue;
                    }
                }
            }
        };
        let until = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH_LINES && waiting.is_empty() {
            tokio::select! {
                lines = receiver.recv() => match lines {
                    Some(lines) => batch.extend(lines),
                    None => break,
                },
                Some(reader) = flush_requests.recv() => waiting.push(reader),
                () = tokio::time::sleep_until(until) => break,
            }
        }
        // What was emitted before a reader asked may still be in the channel.
        while batch.len() < BATCH_LINES {
            match receiver.try_recv() {
                Ok(lines) => batch.extend(lines),
                Err(_) => break,
            }
        }
        hub.queued.fetch_sub(text_bytes(&batch), Ordering::AcqRel);
        let count = batch.len() as u64;
        let forward = outbox.clone();
        let result = store
            .call(move |store| {
                let reports = forward.map(|(device, bounds)| {
                    let reports: Vec<Vec<u8>> = batch
                        .iter()
                        .map(|line| {
                            serde_json::to_vec(&serde_json::json!({
                                "device": device, "kind": "log", "app": line.app, "generation": line.generation,
                                "unix_millis": line.unix_millis, "stream": line.stream, "line": line.line,
                            }))
                            .expect("log reports serialise")
                        })
                        .collect();
                    (reports, bounds)
                });
                // Stored and queued for the upstream in one transaction.
                let ids = store.append_logs_reported(
                    &batch,
                    reports
                        .as_ref()
                        .map(|(reports, bounds)| (reports.as_slice(), *bounds)),
                )?;
                Ok((batch, ids))
            })
            .await;
        match result {
            Ok((batch, ids)) => {
                for (line, id) in batch.into_iter().zip(ids) {
                    let written = written_since_prune.entry(line.app.clone()).or_default();
                    written.0 += 1;
                    written.1 += line.line.len() as u64;
                    written_total += line.line.len() as u64;
                    let _ = live.send(LogRecord {
                        id,
                        app: line.app,
                        generation: line.generation,
                        unix_millis: line.unix_millis,
                        stream: line.stream.to_string(),
                        line: line.line,
                    });
                }
            }
            Err(error) => {
                hub.dropped.fetch_add(count, Ordering::Relaxed);
                tracing::warn!(%error, lines = count, "log lines could not be stored and were dropped");
            }
        }
        for reader in waiting.drain(..) {
            let _ = reader.send(());
        }
        let due: Vec<String> = written_since_prune
            .iter()
            .filter(|(_, (lines, bytes))| {
                *lines >= (keep.lines / 10).max(100) || *bytes >= keep.bytes / 10
            })
            .map(|(app, _)| app.clone())
            .collect();
        for app in due {
            written_since_prune.remove(&app);
            let pruned = store
                .call(move |store| store.prune_logs(&app, keep.lines, keep.bytes))
                .await;
            if let Err(error) = pruned {
                tracing::warn!(%error, "old log lines could not be pruned");
            }
        }
        if written_total >= keep.total / 10 {
            written_total = 0;
            if let Err(error) = store.call(|store| store.prune_all_logs()).await {
                tracing::warn!(%error, "old log lines could not be pruned");
            }
        }
    }
}
