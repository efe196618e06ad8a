//! A component written for Spin with its own SDK (`spin-sdk`), unchanged: it must run on
//! cairn as it runs on Spin.
//!
//! Routes:
//! - `/variable?NAME`  200 and `variables::get(NAME)`; 404 for undefined, 400 for an invalid
//!   name (the text of Spin's error either way)
//! - `/kv/open?LABEL`      200 if `Store::open(LABEL)` succeeds, else 500 and the error
//! - `/kv/set?KEY=VALUE`    200 `ok` on the default store, or 500 and the error
//! - `/kv/get?KEY`          200 and the value, 404 when absent
//! - `/kv/keys`             200, `get_keys` sorted, one per line

use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;
use spin_sdk::key_value::Store;
use spin_sdk::variables;

#[http_component]
fn handle(request: Request) -> anyhow::Result<impl IntoResponse> {
    let path = request.path().to_string();
    let query = request.query().to_string();
    let (status, body) = match path.as_str() {
        "/health" => (200, "ok".to_string()),
        "/variable" => match variables::get(&query) {
            Ok(value) => (200, value),
            Err(variables::Error::Undefined(why)) => (404, format!("undefined: {why}")),
            Err(variables::Error::InvalidName(why)) => (400, format!("invalid name: {why}")),
            Err(other) => (500, format!("{other:?}")),
        },
        "/kv/open" => match Store::open(&query) {
            Ok(_) => (200, "opened".to_string()),
            Err(error) => (500, format!("{error:?}")),
        },
        route if route.starts_with("/kv/") => keyvalue(route, &query),
        _ => (404, format!("no route {path}")),
    };
    Ok(Response::builder().status(status).body(body).build())
}

/// The `/kv/` routes on the default store.
fn keyvalue(route: &str, query: &str) -> (u16, String) {
    let store = match Store::open_default() {
        Ok(store) => store,
        Err(error) => return (500, format!("{error:?}")),
    };
    let (key, value) = query.split_once('=').unwrap_or((query, ""));
    match route {
        "/kv/set" => match store.set(key, value.as_bytes()) {
            Ok(()) => (200, "ok".to_string()),
            Err(error) => (500, format!("{error:?}")),
        },
        "/kv/get" => match store.get(key) {
            Ok(Some(value)) => (200, String::from_utf8_lossy(&value).into_owned()),
            Ok(None) => (404, format!("no key {key}")),
            Err(error) => (500, format!("{error:?}")),
        },
        "/kv/keys" => match store.get_keys() {
            Ok(mut keys) => {
                keys.sort();
                (200, keys.iter().map(|k| format!("{k}\n")).collect())
            }
            Err(error) => (500, format!("{error:?}")),
        },
        _ => (404, format!("no route {route}")),
    }
}
