# Every routine task by name. On a fresh machine run them through ./bootstrap, which installs
# what they need first (./bootstrap demo, ./bootstrap test).

set shell := ["bash", "-euo", "pipefail", "-c"]

components_target := justfile_directory() / "target/components"
hello := components_target / "wasm32-wasip2/release/hello.wasm"
# The wasmtime cairn links (Cargo.toml pins it); `just bench` compares with its `wasmtime serve`.
wasmtime_version := "48.0.8"

# List the recipes.
default:
    @just --list

# Build cairnd and cairnctl (debug profile; dependencies are optimised).
build:
    cargo build --workspace --bins

# Build the test and demo components for wasm32-wasip2.
components:
    cd tests/components && cargo build --release --target wasm32-wasip2 --target-dir {{components_target}}

# Run cairnd in the foreground with a demo app on http://127.0.0.1:PORT (Ctrl-C stops it).
demo port="8080": build components
    #!/usr/bin/env bash
    set -euo pipefail
    state="${XDG_DATA_HOME:-$HOME/.local/share}/cairn-demo"
    export CAIRN_SOCKET="$state/cairnd.sock"
    mkdir -p "$state"
    target/debug/cairnd --state-dir "$state" --socket "$CAIRN_SOCKET" &
    daemon=$!
    trap 'kill -TERM $daemon 2>/dev/null; wait $daemon' INT TERM
    for _ in $(seq 600); do
        target/debug/cairnctl status >/dev/null 2>&1 && break
        kill -0 $daemon 2>/dev/null || { echo "cairnd exited; see above" >&2; exit 1; }
        sleep 0.1
    done
    target/debug/cairnctl deploy hello --component {{hello}} --listen 127.0.0.1:{{port}} --env GREETING=hello
    echo
    echo "\$ curl http://127.0.0.1:{{port}}/"
    curl -sS --retry 5 --retry-connrefused http://127.0.0.1:{{port}}/
    echo
    echo "cairnd is running (state in $state). In another shell:"
    echo "  export CAIRN_SOCKET=$CAIRN_SOCKET"
    echo "  target/debug/cairnctl ls"
    echo "  target/debug/cairnctl logs hello -f"
    echo "Ctrl-C stops it; the app comes back when you run the demo again."
    wait $daemon

# Run cairnd in the foreground with your own arguments.
run *args: build
    target/debug/cairnd {{args}}

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# The whole test suite: lints, unit tests and the end-to-end tests over the real binaries.
test: lint components
    rm -f target/test-skips.log
    cargo build --workspace --bins
    cargo test --workspace
    if [ -s target/test-skips.log ]; then echo "Tests that could not run here:"; cat target/test-skips.log; fi

# Benchmarks in release mode, printed as tables and written to BENCHMARKS.md: fleet sync
# (outbox flush, time to converge) and serving (cairn vs `wasmtime serve` vs native hyper).
# Installs wrk (apt) and wasmtime-cli at wasmtime_version (cargo install, into the tools dir) when
# missing. `just bench --quick` does one round of each figure.
bench *flags: components
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v wrk >/dev/null; then
        echo "bench: installing wrk with apt-get" >&2
        sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq wrk >/dev/null
    fi
    tools="${CAIRN_TOOLS:-$HOME/.cache/cairn/tools}"
    if ! "$tools/wasmtime-cli/bin/wasmtime" --version 2>/dev/null | grep -Eq "^wasmtime {{wasmtime_version}}( |$)"; then
        echo "bench: building wasmtime-cli {{wasmtime_version}} (the peer; once, ~20 min on 2 cores)" >&2
        cargo install --locked --quiet "wasmtime-cli@{{wasmtime_version}}" --root "$tools/wasmtime-cli"
    fi
    export CAIRN_WASMTIME="$tools/wasmtime-cli/bin/wasmtime" CAIRN_PROFILE=release
    cargo build --release --workspace --bins
    cargo bench -p cairn-tests --bench serve -- {{flags}}
    cargo bench -p cairn-tests --bench fleet -- {{flags}}
