//! Outgoing HTTP from apps (`wasi:http/outgoing-handler`): denied unless `[outbound]
//! allowed_hosts` lists the host, connected by cairnd (the pool cannot open sockets), HTTPS
//! checked against the system's authorities and the app's `ca_file`, and each call bounded by
//! the app's outbound timeout and `max_response`. The calls go to real servers on loopback
//! (`Upstream`), which count what reached them.

use cairn_tests::{get, tls_files, Daemon, Upstream};
use std::net::SocketAddr;

/// The app's answer to a GET of `path`: its status and body.
fn answer(app: SocketAddr, path: &str) -> (u16, String) {
    let response = get(app, path).unwrap();
    (response.status, response.body)
}

fn fetch(app: SocketAddr, url: &str) -> (u16, String) {
    answer(app, &format!("/fetch?{url}"))
}

fn fetch_many(app: SocketAddr, count: usize, url: &str) -> (u16, String) {
    answer(app, &format!("/fan-out?{count}={url}"))
}

// Over 100 lines: one app and its upstreams, each bound checked in turn.
#[test]
fn an_app_reaches_only_its_listed_hosts_within_its_bounds() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path(), "localhost");
    let listed = Upstream::plain();
    let unlisted = Upstream::plain();
    let secure = Upstream::tls(&cert, &key);
    let (port, tls_port) = (listed.addr.port(), secure.addr.port());
    // Loopback is reached only through entries that name it: an address literal and
    // `localhost`. The app's own limit is 10 s; its calls are cut at 1 s.
    let app = daemon.deploy_manifest(
        "caller",
        "host_apis",
        &format!(
            "health = \"/health\"\n[limits]\ntimeout = \"10s\"\n\
             [outbound]\nallowed_hosts = [\"http://127.0.0.1:{port}\", \"https://localhost:{tls_port}\", \"https://127.0.0.1:{tls_port}\"]\n\
             timeout = \"1s\"\nmax_response = \"64KiB\"\nca_file = \"{}\"\n",
            ca.display()
        ),
    );

    // A listed host answers.
    let (status, body) = fetch(app, &format!("http://127.0.0.1:{port}/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "status 200\nhello from upstream")
    );
    assert_eq!(listed.requests(), 1);

    // HTTPS, checked against the app's CA, by the URL's name.
    let (status, body) = fetch(app, &format!("https://localhost:{tls_port}/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "status 200\nhello from upstream")
    );
    assert_eq!(secure.requests(), 1);

    // An unlisted port, scheme or host is refused with the interface's error and never sent.
    for url in [
        format!("http://127.0.0.1:{}/hello", unlisted.addr.port()),
        format!("https://127.0.0.1:{port}/hello"),
        format!("http://localhost:{tls_port}/hello"),
        format!("http://127.0.0.2:{port}/hello"),
    ] {
        let (status, body) = fetch(app, &url);
        assert_eq!(
            (status, body.as_str()),
            (502, "error: ErrorCode::HttpRequestDenied"),
            "{url}"
        );
    }
    assert_eq!(unlisted.requests(), 0);
    assert_eq!(listed.requests(), 1);

    // A redirect from a listed host to an unlisted one: the redirect is answered, the call it
    // leads to is refused.
    let target = format!("http://127.0.0.1:{}/hello", unlisted.addr.port());
    let (status, body) = fetch(app, &format!("http://127.0.0.1:{port}/redirect?{target}"));
    assert_eq!(
        (status, body.as_str()),
        (502, "error: ErrorCode::HttpRequestDenied")
    );
    assert_eq!((listed.requests(), unlisted.requests()), (2, 0));
    // ... and to a listed one is followed.
    let (status, body) = fetch(
        app,
        &format!("http://127.0.0.1:{port}/redirect?https://localhost:{tls_port}/hello"),
    );
    assert_eq!(
        (status, body.as_str()),
        (200, "status 200\nhello from upstream")
    );

    // A server that sends part of its answer and stalls, or none at all, is cut at the call's
    // 1 s bound: the guest gets an error to handle, long before its own 10 s limit. (A body
    // that fails reaches a wasi:http 0.2 guest as a stream error whose `http-error-code`
    // wasmtime leaves empty; its text says why.)
    let (status, body) = fetch(app, &format!("http://127.0.0.1:{port}/stall"));
    assert_eq!(status, 502, "{body}");
    assert!(body.starts_with("status 200\n0123456789"), "{body}");
    assert!(
        body.ends_with("body error: ErrorCode::InternalError(Some(\"HTTP response timeout\"))"),
        "{body}"
    );
    let (status, body) = fetch(app, &format!("http://127.0.0.1:{port}/silent"));
    assert_eq!(
        (status, body.as_str()),
        (502, "error: ErrorCode::ConnectionReadTimeout")
    );

    // A response over max_response is cut there.
    let (status, body) = fetch(app, &format!("http://127.0.0.1:{port}/big?{}", 64 << 10));
    assert_eq!(status, 200, "exactly the bound is whole");
    assert_eq!(body.len(), "status 200\n".len() + (64 << 10));
    let (status, body) = fetch(app, &format!("http://127.0.0.1:{port}/big?{}", 1 << 20));
    assert_eq!(status, 502);
    assert!(body.ends_with("body error: ErrorCode::InternalError(Some(\"HTTP response body size exceeds limit: 65536 bytes\"))"), "{}", &body[body.len() - 100..]);
    assert!(
        body.len() <= "status 200\n".len() + (64 << 10) + 100,
        "{}",
        body.len()
    );

    // One instance has at most 16 calls open; the rest fail at once with the interface's
    // error, and the next request's instance starts from none.
    let (status, body) = fetch_many(app, 20, &format!("http://127.0.0.1:{port}/hello"));
    assert_eq!(
        (status, body.as_str()),
        (200, "16 answered\nErrorCode::ConnectionLimitReached 4\n")
    );
    let (status, body) = fetch_many(app, 16, &format!("http://127.0.0.1:{port}/hello"));
    assert_eq!((status, body.as_str()), (200, "16 answered\n"));
    // A call gives its slot back when it is done: many in a row in one instance all go.
    let (status, body) = answer(app, &format!("/fetch-seq?40=http://127.0.0.1:{port}/hello"));
    assert_eq!((status, body.as_str()), (200, "40 answered\n"));

    // Every refusal is counted and named in the app's log, without the query.
    assert_eq!(daemon.app_status("caller")["outbound_denied"], 5);
    daemon.wait_logged(
        "caller",
        &format!("outgoing HTTP refused: GET http://127.0.0.1:{}/hello (not in [outbound] allowed_hosts)", unlisted.addr.port()),
    );
    assert!(!daemon.ctl_ok(&["logs", "caller"]).contains("/redirect?"));
}

#[test]
fn names_and_wildcards_never_reach_loopback_and_https_needs_a_trusted_server() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cert, key) = tls_files(dir.path(), "localhost");
    let upstream = Upstream::plain();
    let secure = Upstream::tls(&cert, &key);
    let (port, tls_port) = (upstream.addr.port(), secure.addr.port());
    // `*` and a name that resolves to loopback pass the pool's check, and cairnd refuses
    // them once it has resolved the name: only an entry naming loopback reaches it.
    let app = daemon.deploy_manifest(
        "wild",
        "host_apis",
        &format!(
            "health = \"/health\"\n[outbound]\n\
             allowed_hosts = [\"http://*:{port}\", \"https://localhost:{tls_port}\"]\n"
        ),
    );
    for url in [
        format!("http://127.0.0.1:{port}/hello"),
        format!("http://localhost:{port}/hello"),
        format!("http://[::ffff:127.0.0.1]:{port}/hello"),
    ] {
        let (status, body) = fetch(app, &url);
        assert_eq!(
            (status, body.as_str()),
            (502, "error: ErrorCode::HttpRequestDenied"),
            "{url}"
        );
    }
    assert_eq!(upstream.requests(), 0);
    // A name no resolver knows, and one no resolver could take (too long for DNS).
    let (status, body) = fetch(app, &format!("http://nothing.invalid:{port}/"));
    assert_eq!(status, 502);
    assert!(body.starts_with("error: ErrorCode::Dns"), "{body}");
    let long = format!("{}.example.com", "a".repeat(2000));
    let (status, body) = fetch(app, &format!("http://{long}:{port}/"));
    assert_eq!(
        (status, body.as_str()),
        (502, "error: ErrorCode::HttpRequestDenied")
    );
    daemon.wait_logged("wild", "GET http://localhost:");
    assert!(daemon
        .ctl_ok(&["logs", "wild"])
        .contains("127.0.0.1 is a loopback, link-local or other special address"));

    // The server's certificate is signed by a CA this app does not trust (no ca_file): the
    // handshake fails and no request is sent.
    let (status, body) = fetch(app, &format!("https://localhost:{tls_port}/hello"));
    assert_eq!(
        (status, body.as_str()),
        (502, "error: ErrorCode::TlsCertificateError")
    );
    assert_eq!(secure.requests(), 0);

    // An app without [outbound] is refused everything, as before.
    let closed = daemon.deploy_manifest("closed", "host_apis", "health = \"/health\"\n");
    let (status, body) = fetch(closed, &format!("http://127.0.0.1:{port}/hello"));
    assert_eq!(
        (status, body.as_str()),
        (502, "error: ErrorCode::HttpRequestDenied")
    );
    daemon.wait_logged("closed", "(the app has no [outbound] table)");
}

#[test]
fn a_bad_outbound_table_is_refused_with_the_entry_named() {
    let daemon = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bad.toml");
    for (table, says) in [
        (
            "allowed_hosts = [\"api.example.com\"]",
            "entry \"api.example.com\": write scheme://host[:port]",
        ),
        ("allowed_hosts = [\"*://api.example.com\"]", "needs a port"),
        (
            "allowed_hosts = []\ntimeout = \"1h\"",
            "[outbound] timeout = \"1h\" is out of range",
        ),
        (
            "allowed_hosts = []\nmax_response = \"2GiB\"",
            "[outbound] max_response = \"2GiB\" is out of range",
        ),
        (
            "allowed_hosts = []\nca_file = \"ca.pem\"",
            "must be an absolute path",
        ),
    ] {
        std::fs::write(
            &manifest,
            format!(
                "name = \"bad\"\ncomponent = \"{}\"\n[http]\nlisten = \"127.0.0.1:1\"\n[outbound]\n{table}\n",
                cairn_tests::component("host_apis").display()
            ),
        )
        .unwrap();
        let result = daemon.ctl(&["deploy", "-f", manifest.to_str().unwrap()]);
        assert_ne!(result.code, 0, "{table}");
        assert!(result.stderr.contains(says), "{table}: {}", result.stderr);
    }

    // A ca_file that cannot be read fails the app's start with the reason.
    std::fs::write(
        &manifest,
        format!(
            "name = \"noca\"\ncomponent = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[outbound]\n\
             allowed_hosts = [\"https://api.example.com\"]\nca_file = \"/nonexistent/ca.pem\"\n",
            cairn_tests::component("host_apis").display(),
            cairn_tests::free_port()
        ),
    )
    .unwrap();
    let result = daemon.ctl(&["deploy", "-f", manifest.to_str().unwrap()]);
    assert_ne!(result.code, 0);
    assert!(
        result
            .stderr
            .contains("[outbound] ca_file: cannot read /nonexistent/ca.pem"),
        "{}",
        result.stderr
    );
}
