//! The test and demo component: a plain `wasi:http/proxy` component with one route per behaviour
//! the runtime must handle. It deliberately uses both the Rust standard library (which imports
//! `wasi:cli@0.2.0`) and `wasip2` bindings (which import `wasi:http@0.2.12`), so the host has to
//! link a component that mixes 0.2.x versions, as components from real toolchains do.
//!
//! Routes:
//! - `/`              200, "<GREETING> from cairn" (GREETING from the app's env, default "hello")
//! - `/health`        200 "ok"
//! - `/env?NAME`      200, the value of NAME or 404
//! - `/log`           writes a line to stdout and one to stderr, then 200
//! - `/lines?N-TAG`   writes N lines `TAG-0` … to stdout
//! - `/trap`          panics (a trap): the host must answer 500 and keep serving
//! - `/loop`          spins forever: the host's request timeout must stop it
//! - `/sleep?MS`      sleeps MS milliseconds on the monotonic clock, then 200
//! - `/alloc`         allocates until memory runs out
//! - `/alloc?MB`      allocates MB mebibytes, touches them, then 200
//! - `/echo`          answers with the request body
//! - `/fs`            tries to read /etc/hostname (std, wasi:filesystem): "denied: …" expected
//! - `/net?PORT`      tries a TCP connection to 127.0.0.1:PORT (std, wasi:sockets)
//! - `/outgoing`      tries an outgoing HTTP request (wasi:http/outgoing-handler)

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasip2::http::proxy::export!(Hello);

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_else(|| "/".to_string());
        let (path, query) = match path_with_query.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (path_with_query.clone(), String::new()),
        };
        let (status, body) = match path.as_str() {
            "/" => {
                let greeting = std::env::var("GREETING").unwrap_or_else(|_| "hello".to_string());
                (200, format!("{greeting} from cairn\n").into_bytes())
            }
            "/health" => (200, b"ok\n".to_vec()),
            "/env" => match std::env::var(&query) {
                Ok(value) => (200, value.into_bytes()),
                Err(_) => (404, format!("no variable {query}\n").into_bytes()),
            },
                        "/lines" => {
                // N numbered lines to stdout, each tagged with the request's own prefix.
                let (count, tag) = query.split_once('-').unwrap_or((query.as_str(), "line"));
                let count: usize = count.parse().unwrap_or(1);
                let mut out = String::new();
                for n in 0..count {
                    out.push_str(&format!("{tag}-{n}\n"));
                }
                print!("{out}");
                (200, format!("{count} lines\n").into_bytes())
            }
            "/escape" => {
                // Terminal escape sequences in the log: clear the screen, retitle the window.
                println!("\x1b[2J\x1b]0;owned\x07 after the escapes");
                (200, b"escaped\n".to_vec())
            }
            "/log" => {
                println!("log line to stdout");
                eprintln!("log line to stderr");
                (200, b"logged\n".to_vec())
            }
            "/trap" => panic!("the /trap route panics on purpose"),
            "/loop" => {
                let mut counter: u64 = 0;
                loop {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            "/sleep" => {
                let millis: u64 = query.parse().unwrap_or(100);
                wasip2::clocks::monotonic_clock::subscribe_duration(millis * 1_000_000).block();
                (200, format!("slept {millis}ms\n").into_bytes())
            }
            "/alloc" => {
                if let Ok(mebibytes) = query.parse::<usize>() {
                    let mut block = vec![0u8; mebibytes << 20];
                    for i in (0..block.len()).step_by(4096) {
                        block[i] = 1;
                    }
                    let touched = std::hint::black_box(&block).len();
                    (200, format!("allocated {touched} bytes\n").into_bytes())
                } else {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        let mut chunk = vec![0u8; 1 << 20];
                        chunk[0] = 1;
                        hoard.push(std::hint::black_box(chunk));
                    }
                }
            }
            "/echo" => (200, read_body(request)),
            "/sink" => {
                // Reads the whole body and keeps only its length.
                let body = request.consume().expect("request body is consumed once");
                let stream = body.stream().expect("body stream is taken once");
                let mut total = 0usize;
                while let Ok(chunk) = stream.blocking_read(64 * 1024) {
                    total += chunk.len();
                }
                drop(stream);
                IncomingBody::finish(body);
                (200, format!("{total} bytes\n").into_bytes())
            }
            "/recurse" => {
                let depth = recurse(std::hint::black_box(1));
                (200, format!("{depth}\n").into_bytes())
            }
            "/big" => {
                // N MiB streamed in 4 KiB writes; stops when the client is gone.
                let mebibytes: usize = query.parse().unwrap_or(1);
                stream_zeros(response_out, mebibytes << 20);
                return;
            }
            "/fs" => match std::fs::read_to_string("/etc/hostname") {
                Ok(text) => (200, format!("read: {text}").into_bytes()),
                Err(error) => (200, format!("denied: {error}\n").into_bytes()),
            },
            "/net" => match std::net::TcpStream::connect(("127.0.0.1", query.parse().unwrap_or(80))) {
                Ok(_) => (200, b"connected\n".to_vec()),
                Err(error) => (200, format!("denied: {error}\n").into_bytes()),
            },
            "/outgoing" => (200, outgoing().into_bytes()),
            _ => (404, format!("no route {path}\n").into_bytes()),
        };
        respond(response_out, status, &body);
    }
}

fn outgoing() -> String {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{OutgoingRequest, Scheme};
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&Scheme::Http)).expect("scheme is valid");
    request.set_authority(Some("127.0.0.1:9")).expect("authority is valid");
    request.set_path_with_query(Some("/")).expect("path is valid");
    match outgoing_handler::handle(request, None) {
        Err(code) => format!("denied: {code:?}\n"),
        Ok(future) => {
            future.subscribe().block();
            match future.get() {
                Some(Ok(Ok(_))) => "sent\n".to_string(),
                Some(Ok(Err(code))) => format!("denied: {code:?}\n"),
                other => format!("denied: {other:?}\n"),
            }
        }
    }
}

fn read_body(request: IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("request body is consumed once");
    let stream = body.stream().expect("body stream is taken once");
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(_) => break,
        }
    }
    drop(stream);
    IncomingBody::finish(body);
    out
}

/// Recursion with no end (a stack overflow in the guest).
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 16]);
    recurse(frame[3] + 1) + frame[7]
}

fn stream_zeros(response_out: ResponseOutparam, bytes: usize) {
    let response = OutgoingResponse::new(Fields::new());
    let outgoing = response.body().expect("body is taken once");
    ResponseOutparam::set(response_out, Ok(response));
    let stream = outgoing.write().expect("stream is taken once");
    let chunk = [0u8; 4096];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        if stream.blocking_write_and_flush(&chunk[..n]).is_err() {
            return;
        }
        left -= n;
    }
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}

fn respond(response_out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::from_list(&[(
        "content-type".to_string(),
        b"text/plain; charset=utf-8".to_vec(),
    )])
    .expect("static header is valid");
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("status is valid");
    let outgoing = response.body().expect("body is taken once");
    ResponseOutparam::set(response_out, Ok(response));
    let stream = outgoing.write().expect("stream is taken once");
    for chunk in body.chunks(4096) {
        stream
            .blocking_write_and_flush(chunk)
            .expect("client accepts the body");
    }
    drop(stream);
    OutgoingBody::finish(outgoing, None).expect("body finishes");
}
