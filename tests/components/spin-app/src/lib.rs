//! A component written for Spin with its own SDK (`spin-sdk`), unchanged: it must run on
//! cairn as it runs on Spin.
//!
//! Routes:
//! - `/variable?NAME`  200 and `variables::get(NAME)`; 404 for undefined, 400 for an invalid
//!   name (the text of Spin's error either way)

use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;
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
        _ => (404, format!("no route {path}")),
    };
    Ok(Response::builder().status(status).body(body).build())
}
