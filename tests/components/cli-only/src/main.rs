//! A component that exports `wasi:cli/run` and nothing else: cairn must refuse to deploy it as
//! an HTTP app, saying which export is missing.
fn main() {
    println!("this component has no HTTP handler");
}
