//! `[[schedule]]`: requests cairnd sends an app on a timer, `every` so long or at the times of
//! a `cron` expression (UTC), through the app's own listener, as any client's: an app scaled
//! to zero is woken by it, and its limits, instances and timeout hold as for any request.
//!
//! A run never overlaps the one before of the same schedule: one due while the previous still
//! runs is skipped and counted (`skipped`). Each schedule's last due time is kept in the store
//! (at most once a minute for schedules more frequent than that, so a per-second schedule does
//! not write the flash every second), and at start a run missed while cairnd was stopped runs
//! once (`missed = "once"`, the default) or not at all (`"skip"`).
//!
//! The loop follows the reconciler's apps: a new generation's schedules take over from its
//! `last due` time, a removed app's stop. Runs and their outcomes since cairnd started are
//! kept in memory (the last `RECENT` per schedule) for `cairnctl status`.

use crate::logs::LogHub;
use crate::reconcile::{AppSchedules, Reconciler};
use crate::spec::{AppName, Missed, ScheduleSpec};
use crate::store::Store;
use bytes::Bytes;
use cairn_core::cron::Cron;
use http_body_util::{BodyExt, Empty};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs kept per schedule for `status`.
pub const RECENT: usize = 20;
/// A schedule more frequent than this has its last due time written at most this often.
const PERSIST_EVERY_MS: i64 = 60_000;
/// What a run's request is given beyond the app's own timeout (a wake from idle, a queue).
const RUN_SLACK: Duration = Duration::from_secs(10);
/// The most of a response a run reads (the rest is dropped with the connection).
const RESPONSE_BOUND: usize = 1 << 20;

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered with this status.
    Answered(u16),
    /// The command app's run ended with this exit code, and how (`exit 1`, `trapped: …`).
    Exited(i32, String),
    /// No answer: why.
    Failed(String),
    /// Not run: the run before was still running.
    Skipped,
}

#[derive(Debug, Clone)]
pub struct Run {
    pub due_ms: i64,
    pub started_ms: i64,
    pub duration_ms: u64,
    pub outcome: Outcome,
    /// It ran at start for a run missed while cairnd was stopped.
    pub caught_up: bool,
}

/// What `status` shows of one schedule.
#[derive(Debug, Clone)]
pub struct ScheduleView {
    pub name: String,
    pub when: String,
    pub request: String,
    /// A command app's schedule, whose `request` is `run` and its arguments.
    pub command: bool,
    pub next_ms: i64,
    pub runs: u64,
    pub skipped: u64,
    pub failed: u64,
    pub recent: Vec<Run>,
}

/// A schedule's runs, shared with the tasks that run them.
#[derive(Default)]
struct Record {
    running: bool,
    runs: u64,
    skipped: u64,
    failed: u64,
    recent: VecDeque<Run>,
}

impl Record {
    fn push(&mut self, run: Run) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(run);
    }
}

enum When {
    Every(i64),
    Cron(Cron),
}

impl When {
    fn of(spec: &ScheduleSpec) -> Option<When> {
        match (&spec.every, &spec.cron) {
            (Some(every), _) => Some(When::Every(every.0.as_millis() as i64)),
            (None, Some(cron)) => cron.parse().ok().map(When::Cron),
            (None, None) => None,
        }
    }

    /// The first due time after `after` (Unix milliseconds).
    fn after(&self, after: i64) -> Option<i64> {
        match self {
            When::Every(every) => Some(after + every),
            When::Cron(cron) => cron.next_after(after.div_euclid(1000)).map(|s| s * 1000),
        }
    }

    fn period_ms(&self) -> i64 {
        match self {
            When::Every(every) => *every,
            When::Cron(_) => 60_000,
        }
    }
}

struct Entry {
    spec: ScheduleSpec,
    when: When,
    generation: u64,
    /// `None`: a command app, run rather than requested.
    target: Option<SocketAddr>,
    timeout: Duration,
    /// `None`: a date that never comes (a cron of 30 February).
    next_due_ms: Option<i64>,
    last_due_ms: Option<i64>,
    /// The next run makes up for one missed while cairnd was stopped: the stored last due time,
    /// from which the runs after it keep their phase.
    catching_up: Option<i64>,
    /// The app can be reached (not failed): its due runs fire.
    serving: bool,
    record: Arc<Mutex<Record>>,
    /// The last due time not yet written to the store, and when it last was.
    dirty: bool,
    persisted_ms: i64,
}

type Key = (AppName, String);

pub struct Scheduler {
    reconciler: Arc<Reconciler>,
    store: Arc<Store>,
    logs: Arc<LogHub>,
    entries: Mutex<HashMap<Key, Entry>>,
    stop: tokio_util::sync::CancellationToken,
    looping: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Scheduler {
    /// Starts the loop (it ends when cairnd does).
    pub fn start(
        reconciler: Arc<Reconciler>,
        store: Arc<Store>,
        logs: Arc<LogHub>,
    ) -> Arc<Scheduler> {
        let scheduler = Arc::new(Scheduler {
            reconciler,
            store,
            logs,
            entries: Mutex::new(HashMap::new()),
            stop: tokio_util::sync::CancellationToken::new(),
            looping: Mutex::new(None),
        });
        let looping = Arc::clone(&scheduler);
        let handle = tokio::spawn(async move { looping.run().await });
        *scheduler.looping.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        scheduler
    }

    /// The schedules of `app` and their runs since cairnd started.
    pub fn views(&self, app: &AppName) -> Vec<ScheduleView> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut views: Vec<ScheduleView> = entries
            .iter()
            .filter(|((name, _), _)| name == app)
            .map(|((_, name), entry)| {
                let record = entry.record.lock().unwrap_or_else(|p| p.into_inner());
                ScheduleView {
                    name: name.clone(),
                    when: match (&entry.spec.every, &entry.spec.cron) {
                        (Some(every), _) => format!("every {every}"),
                        (_, Some(cron)) => format!("cron \"{cron}\" (UTC)"),
                        _ => String::new(),
                    },
                    request: match entry.target {
                        Some(_) => format!("{} {}", entry.spec.method, entry.spec.path),
                        None => std::iter::once("run")
                            .chain(entry.spec.args.iter().map(String::as_str))
                            .collect::<Vec<_>>()
                            .join(" "),
                    },
                    command: entry.target.is_none(),
                    next_ms: entry.next_due_ms.unwrap_or(0),
                    runs: record.runs,
                    skipped: record.skipped,
                    failed: record.failed,
                    recent: record.recent.iter().cloned().collect(),
                }
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    async fn run(self: Arc<Self>) {
        while !self.stop.is_cancelled() {
            self.follow_apps().await;
            let now = now_ms();
            let next = self.fire_due(now);
            self.persist(now, false).await;
            let wait = next.map_or(1000, |next| (next - now).clamp(5, 1000));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                _ = self.stop.cancelled() => {}
            }
        }
    }

    /// Brings the entries in line with the apps there are: new schedules get their due times
    /// (from the store, for a run missed while cairnd was stopped), changed ones go on from
    /// their last due time, and a schedule its app no longer has goes, with its stored state.
    async fn follow_apps(&self) {
        let apps = self.reconciler.schedules();
        let now = now_ms();
        let mut wanted: HashMap<Key, (&AppSchedules, &ScheduleSpec)> = HashMap::new();
        for app in &apps {
            for spec in &app.schedules {
                wanted.insert((app.app.clone(), spec.name.clone()), (app, spec));
            }
        }
        let (new, dropped): (Vec<Key>, Vec<Key>) = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            // A schedule gone from an app that is still there: its state goes too (a removed
            // app's went with it).
            let dropped: Vec<Key> = entries
                .keys()
                .filter(|key| !wanted.contains_key(*key) && apps.iter().any(|a| a.app == key.0))
                .cloned()
                .collect();
            entries.retain(|key, _| wanted.contains_key(key));
            for (key, (app, spec)) in &wanted {
                if let Some(entry) = entries.get_mut(key) {
                    entry.generation = app.generation;
                    entry.target = app.listen.map(target);
                    entry.timeout = app.timeout;
                    entry.serving = app.serving;
                    if &entry.spec != *spec {
                        if let Some(when) = When::of(spec) {
                            let from = entry.last_due_ms.unwrap_or(now);
                            entry.next_due_ms = first_after(&when, from, now);
                            entry.when = when;
                        }
                        entry.spec = (*spec).clone();
                    }
                }
            }
            let new = wanted
                .keys()
                .filter(|key| !entries.contains_key(*key))
                .cloned()
                .collect();
            (new, dropped)
        };
        if !dropped.is_empty() {
            let forget: Vec<(String, String)> = dropped
                .into_iter()
                .map(|(app, name)| (app.to_string(), name))
                .collect();
            if let Err(error) = self
                .store
                .call(move |store| store.forget_schedules(&forget))
                .await
            {
                tracing::warn!(%error, "cannot forget the state of schedules that are gone");
            }
        }
        if new.is_empty() {
            return;
        }
        let asked = new.clone();
        let last_dues = match self
            .store
            .call(move |store| {
                asked
                    .iter()
                    .map(|(app, name)| store.schedule_last_due(app.as_str(), name))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
        {
            Ok(last_dues) => last_dues,
            Err(error) => {
                // Tried again at the next turn: a schedule taken as new would lose a missed run.
                tracing::warn!(%error, "cannot read the schedules' last runs; trying again");
                return;
            }
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for (key, last_due) in new.into_iter().zip(last_dues) {
            let Some((app, spec)) = wanted.get(&key) else {
                continue;
            };
            let Some(when) = When::of(spec) else {
                continue;
            };
            // A schedule seen for the first time was never due before now: that is recorded,
            // so a restart after its first due time finds the run it missed. A stored time in
            // the future (the clock was set back) counts as now.
            let (last, dirty) = match last_due {
                Some(last) if last <= now => (last, false),
                _ => (now, true),
            };
            let (next_due_ms, catching_up) = match when.after(last) {
                Some(due) if due <= now && spec.missed == Missed::Once => (Some(now), Some(last)),
                Some(due) if due <= now => (first_after(&when, last, now), None),
                other => (other, None),
            };
            entries.insert(
                key,
                Entry {
                    spec: (*spec).clone(),
                    when,
                    generation: app.generation,
                    target: app.listen.map(target),
                    timeout: app.timeout,
                    next_due_ms,
                    last_due_ms: Some(last),
                    catching_up,
                    serving: app.serving,
                    record: Arc::default(),
                    dirty,
                    persisted_ms: now,
                },
            );
        }
    }

    /// Starts every run that is due (or skips it, when the one before still runs); returns the
    /// earliest next due time.
    fn fire_due(&self, now: i64) -> Option<i64> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut earliest: Option<i64> = None;
        for ((app, name), entry) in entries.iter_mut() {
            let Some(mut due) = entry.next_due_ms else {
                continue;
            };
            // The clock was set back: a due time further ahead than the schedule's next one
            // from now would silence it until the clock caught up.
            if let Some(soonest) = entry.when.after(now) {
                if due > soonest && entry.catching_up.is_none() {
                    due = soonest;
                    entry.next_due_ms = Some(soonest);
                }
            }
            if due <= now && entry.serving {
                let catching_up = entry.catching_up.take();
                let caught_up = catching_up.is_some();
                let mut record = entry.record.lock().unwrap_or_else(|p| p.into_inner());
                if record.running {
                    record.skipped += 1;
                    record.push(Run {
                        due_ms: due,
                        started_ms: now,
                        duration_ms: 0,
                        outcome: Outcome::Skipped,
                        caught_up,
                    });
                } else {
                    record.running = true;
                    drop(record);
                    tokio::spawn(run_once(RunOrder {
                        app: app.clone(),
                        name: name.clone(),
                        generation: entry.generation,
                        target: entry.target,
                        timeout: entry.timeout + RUN_SLACK,
                        method: entry.spec.method.clone(),
                        path: entry.spec.path.clone(),
                        args: entry.spec.args.clone(),
                        reconciler: Arc::clone(&self.reconciler),
                        due,
                        caught_up,
                        record: Arc::clone(&entry.record),
                        logs: Arc::clone(&self.logs),
                    }));
                }
                entry.last_due_ms = Some(due);
                entry.dirty = true;
                // Anchored to the due time, not to when it ran, so runs do not drift (after a
                // catch-up, to the stored one, keeping the phase); a loop that fell behind (a
                // suspended device) goes on from now.
                entry.next_due_ms = first_after(&entry.when, catching_up.unwrap_or(due), now);
            }
            if let Some(next) = entry.next_due_ms {
                earliest = Some(earliest.map_or(next, |e: i64| e.min(next)));
            }
        }
        earliest
    }

    /// Writes the last due times that changed: for schedules of a minute or longer at once,
    /// for more frequent ones once a minute; `all` at shutdown.
    async fn persist(&self, now: i64, all: bool) {
        let states: Vec<(String, String, i64, String)> = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .iter_mut()
                .filter(|(_, entry)| {
                    entry.dirty
                        && (all
                            || entry.when.period_ms() >= PERSIST_EVERY_MS
                            || now - entry.persisted_ms >= PERSIST_EVERY_MS)
                })
                .filter_map(|((app, name), entry)| {
                    entry.dirty = false;
                    entry.persisted_ms = now;
                    let last = entry
                        .record
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .recent
                        .back()
                        .map(describe)
                        .unwrap_or_default();
                    Some((app.to_string(), name.clone(), entry.last_due_ms?, last))
                })
                .collect()
        };
        if states.is_empty() {
            return;
        }
        let keys: Vec<(String, String)> = states
            .iter()
            .map(|(app, name, _, _)| (app.clone(), name.clone()))
            .collect();
        if let Err(error) = self
            .store
            .call(move |store| store.record_schedules(&states))
            .await
        {
            tracing::warn!(%error, "cannot record the schedules' last runs; trying again");
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            for ((app, name), entry) in entries.iter_mut() {
                if keys.iter().any(|(a, n)| a == app.as_str() && n == name) {
                    entry.dirty = true;
                }
            }
        }
    }

    /// Stops the loop (no run starts while the apps stop) and writes every last due time.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let looping = self
            .looping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(looping) = looping {
            let _ = looping.await;
        }
        self.persist(now_ms(), true).await;
    }
}

/// The first due time after `from` that is later than `now`.
fn first_after(when: &When, from: i64, now: i64) -> Option<i64> {
    match when {
        When::Every(every) => {
            let next = from + every;
            if next > now {
                Some(next)
            } else {
                // Skip the slots that passed, keeping the phase.
                Some(next + ((now - next) / every + 1) * every)
            }
        }
        When::Cron(_) => when.after(from.max(now)),
    }
}

/// A request path without its query (which may carry credentials), for logs and readers.
pub fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(path, _)| path)
}

/// Where to reach an app listening on `listen`.
fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

fn describe(run: &Run) -> String {
    match &run.outcome {
        Outcome::Answered(status) => format!("{status} in {} ms", run.duration_ms),
        Outcome::Exited(_, how) => format!("{how} after {} ms", run.duration_ms),
        Outcome::Failed(why) => format!("failed after {} ms: {why}", run.duration_ms),
        Outcome::Skipped => "skipped: the run before was still running".into(),
    }
}

struct RunOrder {
    app: AppName,
    name: String,
    generation: u64,
    target: Option<SocketAddr>,
    timeout: Duration,
    method: String,
    path: String,
    args: Vec<String>,
    reconciler: Arc<Reconciler>,
    due: i64,
    caught_up: bool,
    record: Arc<Mutex<Record>>,
    logs: Arc<LogHub>,
}

/// Clears a schedule's `running` however its run ends (a panic included), so later runs are
/// not skipped for ever.
struct Running(Arc<Mutex<Record>>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).running = false;
    }
}

async fn run_once(order: RunOrder) {
    let _running = Running(Arc::clone(&order.record));
    let started_ms = now_ms();
    let clock = std::time::Instant::now();
    let outcome = match order.target {
        // A run has its own bound: the app's timeout, then its pool is killed.
        None => match order
            .reconciler
            .run(
                &order.app,
                &order.args,
                None,
                &format!("schedule {}", order.name),
            )
            .await
        {
            // Killed with its app: nothing is left to record it for.
            Ok(end) if end.removed => return,
            Ok(end) => Outcome::Exited(end.code, end.outcome),
            Err(error) => Outcome::Failed(error.to_string()),
        },
        Some(target) => match tokio::time::timeout(order.timeout, request(&order, target)).await {
            Ok(Ok(status)) => Outcome::Answered(status),
            Ok(Err(why)) => Outcome::Failed(why),
            Err(_) => Outcome::Failed(format!("no answer within {} s", order.timeout.as_secs())),
        },
    };
    let run = Run {
        due_ms: order.due,
        started_ms,
        duration_ms: clock.elapsed().as_millis() as u64,
        outcome,
        caught_up: order.caught_up,
    };
    let failed = !matches!(
        run.outcome,
        Outcome::Answered(200..=399) | Outcome::Exited(0, _)
    );
    if failed {
        let what = match order.target {
            Some(_) => format!("{} {}", order.method, without_query(&order.path)),
            None => "run".to_string(),
        };
        order.logs.note(
            order.app.as_str(),
            order.generation,
            &format!("schedule {}: {what}: {}", order.name, describe(&run)),
        );
    }
    let mut record = order.record.lock().unwrap_or_else(|p| p.into_inner());
    record.runs += 1;
    if failed {
        record.failed += 1;
    }
    record.push(run);
}

/// One request to the app; its status.
async fn request(order: &RunOrder, target: SocketAddr) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|error| format!("cannot connect to {target}: {error}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| error.to_string())?;
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(order.method.as_str())
        .uri(order.path.as_str())
        .header(http::header::HOST, target.to_string())
        .header(http::header::USER_AGENT, "cairn-schedule")
        .header("x-cairn-schedule", order.name.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status().as_u16();
    // Read the answer through (up to a bound), so the app's request completes as it would for
    // any client.
    let mut body = response.into_body();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > RESPONSE_BOUND {
                    break;
                }
            }
            Err(error) => return Err(format!("the answer broke off: {error}")),
        }
    }
    driver.abort();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_keeps_its_phase_and_skips_what_passed() {
        let every = When::Every(1000);
        assert_eq!(first_after(&every, 10_000, 10_500), Some(11_000));
        // Fell behind by 3.5 periods: the next slot on the same phase after now.
        assert_eq!(first_after(&every, 10_000, 14_500), Some(15_000));
        assert_eq!(first_after(&every, 10_000, 15_000), Some(16_000));
        let hourly = When::Cron("0 * * * *".parse().unwrap());
        assert_eq!(first_after(&hourly, 0, 30 * 60_000), Some(3_600_000));
    }

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        assert_eq!(
            target("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            target("[::]:80".parse().unwrap()),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            target("192.0.2.7:80".parse().unwrap()),
            "192.0.2.7:80".parse().unwrap()
        );
    }
}
