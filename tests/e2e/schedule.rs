//! `[[schedule]]`: requests cairnd sends an app on a timer. The count over a minute, no
//! overlap when a run overruns (it is skipped and counted), and a cron run missed while cairnd
//! was stopped made up once at the next start.

use cairn_tests::{get, wait_for, Daemon};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn schedules(daemon: &Daemon, app: &str) -> Vec<serde_json::Value> {
    daemon.app_status(app)["schedules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The runs of the app's first schedule so far (0 before the scheduler has seen it).
fn runs(daemon: &Daemon, app: &str) -> u64 {
    schedules(daemon, app)
        .first()
        .and_then(|schedule| schedule["runs"].as_u64())
        .unwrap_or(0)
}

/// The wall clock in Unix milliseconds, as schedules' due times are given.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn counter(addr: SocketAddr, key: &str) -> u64 {
    let response = get(addr, &format!("/kv/get?{key}")).unwrap();
    match response.status {
        404 => 0,
        _ => response.body.parse().unwrap(),
    }
}

#[test]
fn an_every_second_schedule_runs_sixty_times_in_a_minute() {
    let daemon = Daemon::start();
    let app = daemon.deploy_manifest(
        "ticker",
        "host_apis",
        "[keyvalue]\n[[schedule]]\nname = \"tick\"\nevery = \"1s\"\npath = \"/kv/incr?ticks\"\n",
    );
    // From the first run's due time, the runs due in the next 60 s.
    wait_for("the first run", Duration::from_secs(5), || {
        runs(&daemon, "ticker") >= 1
    })
    .unwrap();
    let first = schedules(&daemon, "ticker")[0]["recent"][0]["due_ms"]
        .as_i64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(
        (first + 59_500 - now_ms()).max(0) as u64
    ));
    let ticks = counter(app, "ticks");
    assert!((59..=61).contains(&ticks), "{ticks} runs in 60 s");
    let schedule = &schedules(&daemon, "ticker")[0];
    assert_eq!(schedule["failed"], 0, "{schedule}");
    assert_eq!(schedule["skipped"], 0, "{schedule}");
    assert_eq!(schedule["when"], "every 1s");
    assert_eq!(schedule["request"], "POST /kv/incr?ticks");
    // Due times on the second, without drift.
    let recent = schedule["recent"].as_array().unwrap();
    for pair in recent.windows(2) {
        let gap = pair[1]["due_ms"].as_i64().unwrap() - pair[0]["due_ms"].as_i64().unwrap();
        assert_eq!(gap, 1000, "{schedule}");
    }
    let table = daemon.ctl_ok(&["status", "ticker"]);
    assert!(table.contains("schedule tick"), "{table}");
}

#[test]
fn a_run_that_overruns_is_never_overlapped_the_next_one_is_skipped() {
    let daemon = Daemon::start();
    daemon.deploy_manifest(
        "slow",
        "hello",
        "[[schedule]]\nname = \"slow\"\nevery = \"1s\"\npath = \"/sleep?2500\"\nmethod = \"GET\"\n",
    );
    let start = Instant::now();
    wait_for("three runs", Duration::from_secs(20), || {
        runs(&daemon, "slow") >= 3
    })
    .unwrap();
    let schedule = &schedules(&daemon, "slow")[0];
    let skipped = schedule["skipped"].as_u64().unwrap();
    assert!(skipped >= 4, "{schedule} after {:?}", start.elapsed());
    let ran: Vec<&serde_json::Value> = schedule["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|run| run["status"] == 200)
        .collect();
    assert!(ran.len() >= 3, "{schedule}");
    for pair in ran.windows(2) {
        let end =
            pair[0]["started_ms"].as_i64().unwrap() + pair[0]["duration_ms"].as_i64().unwrap();
        assert!(
            pair[1]["started_ms"].as_i64().unwrap() >= end,
            "runs overlap: {schedule}"
        );
        assert!(
            pair[0]["duration_ms"].as_u64().unwrap() >= 2500,
            "{schedule}"
        );
    }
    assert_eq!(schedule["failed"], 0, "{schedule}");
}

#[test]
fn a_cron_run_missed_while_cairnd_was_stopped_runs_once_at_the_next_start() {
    let mut daemon = Daemon::start();
    // Hourly, at a minute half an hour away: nothing is legitimately due while the test runs.
    let minute = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        + 30)
        % 60;
    let app = daemon.deploy_manifest(
        "hourly",
        "host_apis",
        &format!(
            "[keyvalue]\n\
             [[schedule]]\nname = \"once\"\ncron = \"{minute} * * * *\"\npath = \"/kv/incr?once\"\n\
             [[schedule]]\nname = \"skip\"\ncron = \"{minute} * * * *\"\npath = \"/kv/incr?skip\"\nmissed = \"skip\"\n"
        ),
    );
    // Recorded as never due before now (schedules of a minute or more are written at once).
    let recorded = || -> i64 {
        rusqlite::Connection::open(daemon.database())
            .unwrap()
            .query_row(
                "SELECT count(*) FROM schedule_state WHERE app = 'hourly'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    wait_for("the schedules recorded", Duration::from_secs(10), || {
        recorded() == 2
    })
    .unwrap();
    daemon.stop();
    // cairnd was "off" for three hours: three hourly runs were missed.
    rusqlite::Connection::open(daemon.database())
        .unwrap()
        .execute(
            "UPDATE schedule_state SET last_due_ms = last_due_ms - 3 * 3600 * 1000",
            [],
        )
        .unwrap();
    daemon.restart();
    wait_for("the missed run", Duration::from_secs(10), || {
        counter(app, "once") >= 1
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(counter(app, "once"), 1, "made up once, not three times");
    assert_eq!(counter(app, "skip"), 0, "missed = \"skip\" drops it");
    let views = schedules(&daemon, "hourly");
    let once = views.iter().find(|s| s["name"] == "once").unwrap();
    assert_eq!(once["recent"][0]["caught_up"], true, "{once}");
    assert_eq!(once["recent"][0]["status"], 200, "{once}");
    let table = daemon.ctl_ok(&["status", "hourly"]);
    assert!(
        table.contains(&format!("cron \"{minute} * * * *\" (UTC)")),
        "{table}"
    );
    // A restart with nothing missed runs nothing (the made-up run counts as the last due).
    daemon.stop();
    daemon.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        counter(app, "once"),
        1,
        "a restart with nothing missed ran it again"
    );
    assert_eq!(counter(app, "skip"), 0);
}

#[test]
fn a_made_up_interval_run_keeps_the_schedules_phase() {
    let mut daemon = Daemon::start();
    daemon.deploy_manifest(
        "phase",
        "host_apis",
        "[keyvalue]\n[[schedule]]\nname = \"every10\"\nevery = \"10s\"\npath = \"/kv/incr?n\"\n",
    );
    wait_for("the first run", Duration::from_secs(15), || {
        runs(&daemon, "phase") >= 1
    })
    .unwrap();
    let first = schedules(&daemon, "phase")[0]["recent"][0]["due_ms"]
        .as_i64()
        .unwrap();
    daemon.stop();
    // Stopped across the run due at first + 10 s.
    std::thread::sleep(Duration::from_millis(
        (first + 12_000 - now_ms()).max(0) as u64
    ));
    daemon.restart();
    wait_for(
        "the made-up run and the next",
        Duration::from_secs(20),
        || runs(&daemon, "phase") >= 2,
    )
    .unwrap();
    let schedule = &schedules(&daemon, "phase")[0];
    let recent = schedule["recent"].as_array().unwrap();
    assert_eq!(recent[0]["caught_up"], true, "{schedule}");
    // The run after the made-up one is due on the deploy's phase, not ten seconds after it.
    assert_eq!(
        recent[1]["due_ms"].as_i64().unwrap(),
        first + 20_000,
        "{schedule}"
    );
}
