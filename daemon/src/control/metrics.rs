//! The Prometheus / OpenMetrics endpoint (`[metrics] listen`): the figures `cairnctl status`
//! and `sync status` show, per app and for the device, encoded by `prometheus-client` at each
//! scrape from the same views (no second bookkeeping, nothing added to the request path: the
//! request counters are the pools' shared pages, the rest the cgroups' and the store's).
//!
//! Names follow Prometheus conventions: `cairn_` prefix, units in names, `_total` counters.
//! The only labels are `app` (one per app), `state` (a few) and `document` (one per applied
//! fleet document): no label grows with traffic.
//!
//! The endpoint answers `GET /metrics` only, one request per connection (no keep-alive), to
//! at most `MAX_CONNECTIONS` clients at once, each with a deadline for its request head and
//! one for the whole connection; it reads no request body. A scrape's text is kept for
//! `FRESH` and made by one request at a time, so scrapers arriving together, or a client
//! asking in a loop, cost one scrape per `FRESH`, not one each.

use super::views::Env;
use super::ControlService;
use cairn_core::proto;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Scrapers served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// How long one connection may take, from accept to the last byte.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long a client has to send its request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(3);
/// How long a scrape's text is served again.
const FRESH: Duration = Duration::from_secs(2);

/// The last scrape's text and when it was made; the lock makes one scrape at a time.
type Cache = tokio::sync::Mutex<Option<(std::time::Instant, Arc<String>)>>;

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, service: Arc<ControlService>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let cache: Arc<Cache> = Arc::default();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics: cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (service, cache) = (Arc::clone(&service), Arc::clone(&cache));
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |request| {
                let (service, cache) = (Arc::clone(&service), Arc::clone(&cache));
                async move { Ok::<_, std::convert::Infallible>(answer(&service, &cache, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .max_buf_size(16 << 10)
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_DEADLINE)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), handler);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
            drop(slot);
        });
    }
}

/// Binds `listen` for the endpoint.
pub async fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await
}

type Body = http_body_util::Full<bytes::Bytes>;

async fn answer(
    service: &ControlService,
    cache: &Cache,
    request: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let reply = |status: u16, content_type: &str, text: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Body::from(text))
            .expect("a response from constant parts")
    };
    if request.uri().path() != "/metrics" {
        return reply(404, "text/plain", "cairn serves /metrics only\n".into());
    }
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return reply(405, "text/plain", "GET /metrics\n".into());
    }
    let mut cached = cache.lock().await;
    let text = match cached.as_ref() {
        Some((made, text)) if made.elapsed() < FRESH => Arc::clone(text),
        _ => match scrape(service).await {
            Ok(text) => {
                let text = Arc::new(text);
                *cached = Some((std::time::Instant::now(), Arc::clone(&text)));
                text
            }
            Err(error) => {
                tracing::warn!(%error, "metrics: a scrape failed");
                return reply(
                    500,
                    "text/plain",
                    "the scrape failed; see cairnd's log\n".into(),
                );
            }
        },
    };
    drop(cached);
    reply(
        200,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        text.as_str().to_string(),
    )
}

/// Everything one scrape reports, gathered before encoding (encoding cannot wait).
#[derive(Debug)]
struct Snapshot {
    daemon: proto::DaemonStatus,
    apps: Vec<proto::AppDetail>,
    sync: proto::SyncStatusReply,
    events_dropped: u64,
}

/// The endpoint's text for one scrape.
pub(super) async fn scrape(service: &ControlService) -> Result<String, String> {
    let daemon = service
        .daemon_status()
        .await
        .map_err(|s| s.message().to_string())?;
    let mut apps = Vec::new();
    for app in service.reconciler.list().await {
        let Ok(name) = app.name.parse() else {
            continue;
        };
        // An app removed meanwhile is simply not reported.
        if let Ok(detail) = service.app_detail(&name, Env::KeysOnly).await {
            apps.push(detail);
        }
    }
    let sync = service
        .sync_reply()
        .await
        .map_err(|s| s.message().to_string())?;
    let snapshot = Snapshot {
        daemon,
        apps,
        sync,
        events_dropped: service.logs.events_dropped(),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| e.to_string())?;
    Ok(text)
}

/// A histogram read from an app's counters page: the sum, and each bucket's count (not
/// cumulative; the encoder adds them up), the last bucket past every bound.
#[derive(Debug)]
struct PageHistogram {
    sum: f64,
    buckets: Vec<(f64, u64)>,
}

impl PageHistogram {
    fn of(detail: &proto::AppDetail) -> PageHistogram {
        let bounds = crate::counters::LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX]);
        PageHistogram {
            sum: detail.latency_seconds,
            buckets: bounds
                .zip(
                    detail
                        .latency_buckets
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0)),
                )
                .collect(),
        }
    }
}

impl EncodeMetric for PageHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let count = self.buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// One family: its name (without `_total`, which the encoder adds to counters), help, unit,
/// and a value per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    values: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut values = values.into_iter().peekable();
    let Some((_, first)) = values.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, value) in values {
        if labels.is_empty() {
            // The device's own: no label set at all (not `{}`).
            value.encode(metric)?;
            return Ok(());
        }
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let apps = &self.apps;
        let app = |detail: &proto::AppDetail| {
            vec![(
                "app",
                detail
                    .summary
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
            )]
        };
        let counter = |pick: fn(&proto::AppDetail) -> u64| {
            apps.iter()
                .map(move |d| (app(d), ConstCounter::new(pick(d))))
                .collect::<Vec<_>>()
        };
        let gauge = |pick: fn(&proto::AppDetail) -> i64| {
            apps.iter()
                .map(move |d| (app(d), ConstGauge::new(pick(d))))
                .collect::<Vec<_>>()
        };
        let e = &mut encoder;
        family(
            e,
            "cairn_app_requests",
            "Requests the app's guests served (each a fresh instance).",
            None,
            counter(|d| d.requests),
        )?;
        family(
            e,
            "cairn_app_requests_in_flight",
            "Requests being served now.",
            None,
            gauge(|d| d.in_flight as i64),
        )?;
        family(
            e,
            "cairn_app_responses",
            "Responses by status class (the guest's, and the pool's own 4xx and 5xx).",
            None,
            apps.iter()
                .flat_map(|d| {
                    ["1xx", "2xx", "3xx", "4xx", "5xx"]
                        .into_iter()
                        .zip(d.responses.iter().copied().chain(std::iter::repeat(0)))
                        .map(move |(class, count)| {
                            let mut labels = app(d);
                            labels.push(("class", class.to_string()));
                            (labels, ConstCounter::new(count))
                        })
                })
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_app_request_duration",
            "The time from a request's arrival in the pool to its response head.",
            Some(&Unit::Seconds),
            apps.iter()
                .map(|d| (app(d), PageHistogram::of(d)))
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_app_cold_starts",
            "Pools started for a connection to an app that had none (idle, or restored at boot).",
            None,
            counter(|d| d.cold_starts),
        )?;
        family(
            e,
            "cairn_app_cold_start",
            "The time those cold starts took, together.",
            Some(&Unit::Seconds),
            apps.iter()
                .map(|d| (app(d), ConstCounter::new(d.cold_start_seconds)))
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_app_rejected_requests",
            "Requests answered 503 at the app's instance limit.",
            None,
            counter(|d| d.rejected),
        )?;
        family(
            e,
            "cairn_app_timeouts",
            "Requests stopped at the app's timeout.",
            None,
            counter(|d| d.timeouts),
        )?;
        family(
            e,
            "cairn_app_traps",
            "Requests whose guest trapped.",
            None,
            counter(|d| d.traps),
        )?;
        family(
            e,
            "cairn_app_restarts",
            "Pool failures since cairnd started, each followed by a restart, by reason: the OOM killer (oom), another signal, an exit, a failed start.",
            None,
            apps.iter()
                .flat_map(|d| {
                    crate::reconcile::RESTART_REASONS
                        .into_iter()
                        .zip(
                            d.restarts_by_reason
                                .iter()
                                .copied()
                                .chain(std::iter::repeat(0)),
                        )
                        .map(move |(reason, count)| {
                            let mut labels = app(d);
                            labels.push(("reason", reason.to_string()));
                            (labels, ConstCounter::new(count))
                        })
                })
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_app_oom_kills",
            "Pools the kernel's OOM killer ended, since cairnd started.",
            None,
            counter(|d| d.oom_kills),
        )?;
        family(
            e,
            "cairn_app_generation",
            "The generation the app runs.",
            None,
            gauge(|d| d.summary.as_ref().map_or(0, |s| s.generation as i64)),
        )?;
        family(
            e,
            "cairn_app_memory",
            "Memory the app's pool uses, from its cgroup.",
            Some(&Unit::Bytes),
            gauge(|d| d.memory_bytes as i64),
        )?;
        family(
            e,
            "cairn_app_cpu",
            "CPU time the app's pool used, from its cgroup.",
            Some(&Unit::Seconds),
            apps.iter()
                .map(|d| (app(d), ConstCounter::new(d.cpu_usage_nanos as f64 / 1e9)))
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_app_syscalls_denied",
            "System calls the pool's filter refused.",
            None,
            counter(|d| d.syscalls_denied),
        )?;
        family(
            e,
            "cairn_app_outbound_denied",
            "Outgoing HTTP requests refused.",
            None,
            counter(|d| d.outbound_denied),
        )?;
        family(
            e,
            "cairn_app_log_lines_dropped",
            "Output lines the pool dropped (its queue was full).",
            None,
            counter(|d| d.log_lines_dropped),
        )?;
        let with_store: Vec<&proto::AppDetail> = apps.iter().filter(|d| d.kv_quota > 0).collect();
        family(
            e,
            "cairn_app_kv_used",
            "Bytes of keys plus values in the app's key-value store.",
            Some(&Unit::Bytes),
            with_store
                .iter()
                .map(|d| (app(d), ConstGauge::new(d.kv_used.unwrap_or(0) as i64)))
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_app_kv_quota",
            "The app's key-value quota.",
            Some(&Unit::Bytes),
            with_store
                .iter()
                .map(|d| (app(d), ConstGauge::new(d.kv_quota as i64)))
                .collect::<Vec<_>>(),
        )?;
        // One series per app: 1 for the state it is in.
        family(
            e,
            "cairn_app_state",
            "1 for the app's state: running, idle, starting, ready (a command app), restarting, crashloop or failed.",
            None,
            apps.iter()
                .map(|d| {
                    let mut labels = app(d);
                    labels.push((
                        "state",
                        d.summary
                            .as_ref()
                            .map(|s| s.status.clone())
                            .unwrap_or_default(),
                    ));
                    (labels, ConstGauge::new(1i64))
                })
                .collect::<Vec<_>>(),
        )?;

        let daemon = &self.daemon;
        let one = |value: i64| vec![(Vec::new(), ConstGauge::new(value))];
        family(
            e,
            "cairn_apps",
            "Apps on the device.",
            None,
            one(daemon.apps as i64),
        )?;
        family(
            e,
            "cairn_store",
            "The state database's files (database and WAL).",
            Some(&Unit::Bytes),
            one(daemon.store_bytes as i64),
        )?;
        family(
            e,
            "cairn_store_used",
            "What the store's pages hold (what the budget counts).",
            Some(&Unit::Bytes),
            one(daemon.store_used as i64),
        )?;
        if daemon.store_budget > 0 {
            family(
                e,
                "cairn_store_budget",
                "The store's budget ([store] budget).",
                Some(&Unit::Bytes),
                one(daemon.store_budget as i64),
            )?;
        }
        if let Some(free) = daemon.store_disk_free {
            family(
                e,
                "cairn_store_disk_free",
                "Free space on the store's file system.",
                Some(&Unit::Bytes),
                one(free as i64),
            )?;
        }
        family(
            e,
            "cairn_components",
            "Distinct components stored.",
            None,
            one(daemon.components as i64),
        )?;
        family(
            e,
            "cairn_log_lines_dropped",
            "Log lines cairnd dropped (its queue was full).",
            None,
            vec![(Vec::new(), ConstCounter::new(daemon.log_lines_dropped))],
        )?;
        family(
            e,
            "cairn_events_dropped",
            "Events dropped (their queue was full).",
            None,
            vec![(Vec::new(), ConstCounter::new(self.events_dropped))],
        )?;
        family(
            e,
            "cairn_uptime",
            "Since cairnd started.",
            Some(&Unit::Seconds),
            one(daemon.uptime_seconds as i64),
        )?;

        let sync = &self.sync;
        family(
            e,
            "cairn_upstream_state",
            "1 for the link to the upstream's state: disabled, connecting, connected or offline.",
            None,
            vec![(vec![("state", sync.state.clone())], ConstGauge::new(1i64))],
        )?;
        if sync.last_success_unix > 0 {
            family(
                e,
                "cairn_upstream_last_contact_timestamp",
                "When the upstream last answered (unix time).",
                Some(&Unit::Seconds),
                one(sync.last_success_unix),
            )?;
        }
        family(
            e,
            "cairn_outbox_reports",
            "Reports waiting for the upstream.",
            None,
            one(sync.backlog as i64),
        )?;
        family(
            e,
            "cairn_outbox",
            "The bytes of the reports waiting for the upstream (what upstream.outbox_max_bytes bounds).",
            Some(&Unit::Bytes),
            one(sync.backlog_bytes as i64),
        )?;
        family(
            e,
            "cairn_outbox_dropped",
            "Reports the outbox bounds dropped.",
            None,
            vec![(Vec::new(), ConstCounter::new(sync.dropped))],
        )?;
        family(
            e,
            "cairn_applied_version",
            "The version of each fleet document applied.",
            None,
            sync.applied
                .iter()
                .map(|a| {
                    (
                        vec![("document", a.key.clone())],
                        ConstGauge::new(a.version as i64),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        family(
            e,
            "cairn_fleet_refusals",
            "Fleet documents refused and kept on record (the newest 20).",
            None,
            one(sync.rejections.len() as i64),
        )?;
        Ok(())
    }
}
