# Every routine task by name. On a fresh machine run them through ./bootstrap, which installs
# what they need first (./bootstrap demo, ./bootstrap test).

set shell := ["bash", "-euo", "pipefail", "-c"]

components_target := justfile_directory() / "target/components"
hello := components_target / "wasm32-wasip2/release/hello.wasm"
# The wasmtime cairn links (Cargo.toml pins it); `just bench` compares with its `wasmtime serve`.
wasmtime_version := "48.0.8"
version := `sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1`
arm64_target := "aarch64-unknown-linux-gnu"
# How the host's test harness runs against the arm64 test build under qemu-user.
arm64_test_env := "QEMU_LD_PREFIX=/usr/aarch64-linux-gnu CAIRN_PROFILE=arm64-test CAIRN_TARGET=" + arm64_target
# The end-to-end modules whose code is the same on every architecture: `just test-arm64` (CI)
# skips them, `just test-arm64-rest` (test-all) runs them.
arm64_elsewhere := "--skip access:: --skip bad_input:: --skip events:: --skip host_apis:: --skip import:: --skip keyvalue:: --skip metrics:: --skip schedule:: --skip service:: --skip store:: --skip fleet::"

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
        # 0, or 8 when a kept app is failed: either way cairnd answers.
        rc=0; target/debug/cairnctl status >/dev/null 2>&1 || rc=$?
        [ "$rc" -eq 0 ] || [ "$rc" -eq 8 ] && break
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

# The whole test suite, as CI runs it (under an hour on 2 cores from a clean clone): rustfmt;
# unit and end-to-end tests on release builds; the amd64 .deb (lintian) and image booted under
# QEMU (import, serving, growth, persistence, the package's upgrade/remove/purge); the arm64
# cross build and the end-to-end suite's arm64 slice on it under qemu-user. Clippy is not here:
# its check build of every dependency is 8 minutes CI cannot spare; `just check` and `test-all`
# run it, and every commit is clippy-clean. Each step's time is printed (`== took N s: STEP`),
# so a slow CI run says where it went.
test: components
    #!/usr/bin/env bash
    set -euo pipefail
    start=$SECONDS
    step() {
        local t=$SECONDS
        echo "== $*"
        "$@"
        echo "== took $((SECONDS - t)) s: $* (test: $((SECONDS - start)) s so far)"
    }
    rm -f target/test-skips.log
    step cargo fmt --all -- --check
    step cargo build --release --workspace --bins
    step env CAIRN_PROFILE=release cargo test --release --workspace
    step just boot-test amd64
    step just test-arm64
    if [ -s target/test-skips.log ]; then echo "Tests that could not run here:"; cat target/test-skips.log; fi

# The quick loop while developing: lints, unit and end-to-end tests on debug builds.
check: lint components
    rm -f target/test-skips.log
    cargo build --workspace --bins
    cargo test --workspace
    if [ -s target/test-skips.log ]; then echo "Tests that could not run here:"; cat target/test-skips.log; fi

# Everything, including what does not fit CI's budget: the whole suite, the arm64 image booted
# under QEMU, and the Raspberry Pi image (about 40 minutes more the first time, for the cached
# arm64 Debian root; about 10 after that), the hostile suite and the crash loop.
test-all: lint test test-arm64-rest (boot-test "arm64") test-rpi hostile (hostile "--pinned") crash linkcut power-cut fuzz

# Fuzzing, outside CI (about SECONDS x 6, plus a few minutes of building once): each target
# in fuzz/ (manifest, fleet_document, config, import_manifest, pool_frames, control_request)
# runs for SECONDS under cargo-fuzz (libFuzzer) on a nightly toolchain, both installed when
# missing. The corpus grows in fuzz/corpus/TARGET (kept in the repository, minimised after
# each run); a crash stops the run and lands in fuzz/artifacts/TARGET: fix it, then copy the
# input to fuzz/regressions/TARGET, which `cargo test -p cairnd` replays. Figures to
# RELIABILITY.md.
fuzz seconds="60" *targets="manifest fleet_document config import_manifest pool_frames control_request":
    #!/usr/bin/env bash
    set -euo pipefail
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    cd fuzz
    for target in {{targets}}; do
        echo "fuzz: $target for {{seconds}} s"
        # No sanitizer: the parsers are safe Rust (a panic is what is looked for), and it runs
        # several times as many inputs a second.
        cargo +nightly fuzz run --sanitizer none "$target" "corpus/$target" -- \
            -max_total_time={{seconds}} -rss_limit_mb=2048 -timeout=10 -max_len=65536 2>&1
        cargo +nightly fuzz cmin --sanitizer none "$target" "corpus/$target" >/dev/null 2>&1 || true
    done | tee last-run.log
    ./report {{seconds}} <last-run.log

# The power-loss proof (20 cuts, about 15 minutes after the image): the amd64 image booted
# under QEMU has its power cut (QEMU `quit`) while cairnd deploys and writes logs; after each
# cut the database passes integrity_check and the last acknowledged deploy is in effect
# (images/power-cut); figures to RELIABILITY.md.
power-cut cycles="20": (image "amd64") components
    CAIRN_POWER_CUT_REPORT=RELIABILITY.md images/power-cut images/out/cairn-{{version}}-amd64.img {{hello}} {{cycles}}

# Link cuts (50 rounds, about 3 minutes after the release build; needs root): two devices
# sync over a link cut, taken down or made poor at random; every device converges and every
# log line arrives exactly once. Figures to RELIABILITY.md.
linkcut rounds="50": components
    cargo build --release --workspace --bins
    CAIRN_PROFILE=release CAIRN_LINKCUT_ROUNDS={{rounds}} CAIRN_LINKCUT_REPORT=1 cargo test --release -p cairn-tests --test linkcut

# The crash loop (100 rounds, about 5 minutes after the release build): a random operation (deploy, rollback, rm, push,
# a log flood through the outbox to a real nats-server, a fleet document to fetch) with cairnd
# or a pool killed by SIGKILL at a random moment, every round checked (integrity, acknowledged
# operations in effect, outbox exactly once, every app serving); figures to RELIABILITY.md.
# `just test` runs 6 rounds of it. CAIRN_CRASH_SEED=N replays a run.
crash rounds="100": components
    cargo build --release --workspace --bins
    CAIRN_PROFILE=release CAIRN_CRASH_ROUNDS={{rounds}} CAIRN_CRASH_REPORT=1 cargo test --release -p cairn-tests --test crash

# Release builds of cairnd and cairnctl for this machine (what packages ship, what tests run).
release:
    cargo build --release --workspace --bins

# Release builds for arm64, cross-compiled with Debian's gcc-aarch64-linux-gnu.
release-arm64:
    cargo build --release --workspace --bins --target {{arm64_target}}

# Debian packages: target/debian/cairn_VERSION_ARCH.deb for each ARCH (amd64, arm64), checked
# by lintian. Man pages and completions come from the clap definitions of this machine's build.
deb *arches="amd64 arm64": release
    #!/usr/bin/env bash
    set -euo pipefail
    for arch in {{arches}}; do
        case "$arch" in
            amd64) bindir=target/release ;;
            arm64|rpi) arch=arm64; just release-arm64; bindir=target/{{arm64_target}}/release ;;
            *) echo "deb: unknown architecture $arch (amd64 or arm64)" >&2; exit 2 ;;
        esac
        deb=$(packaging/build-deb "$arch" "$bindir" target/release)
        lintian --fail-on error,warning "$deb" 2> >(grep -v 'root privileges' >&2)
        echo "$deb"
    done

# A flashable raw disk image, images/out/cairn-VERSION-IMAGE.img(.xz): amd64 or arm64 (UEFI),
# or rpi (Raspberry Pi 4: the arm64 root plus Debian's raspi-firmware).
image arch="amd64": (deb arch)
    images/build-image {{arch}} target/debian/cairn_{{version}}_{{ if arch == "rpi" { "arm64" } else { arch } }}.deb images/out

# The Raspberry Pi image: checked where the Pi's boot ROM and firmware look (QEMU cannot run
# the Pi firmware) and against the arm64 image's root (images/check-rpi); then booted from its
# own boot partition under QEMU's Raspberry Pi 3 machine (images/boot-test-rpi).
test-rpi: (image "arm64") (image "rpi") components
    images/check-rpi images/out/cairn-{{version}}-rpi.img images/out/cairn-{{version}}-arm64.img
    images/boot-test-rpi images/out/cairn-{{version}}-rpi.img {{hello}}

# Boots the image under QEMU (TCG) and checks it as an operator would (images/boot-test); on
# amd64 also upgrades, removes, reinstalls and purges the package inside it.
boot-test arch="amd64": (image arch) components
    #!/usr/bin/env bash
    set -euo pipefail
    upgrade=""
    if [ "{{arch}}" = amd64 ]; then
        upgrade=$(CAIRN_DEB_VERSION={{version}}+test1 packaging/build-deb amd64 target/release target/release)
    fi
    images/boot-test {{arch}} images/out/cairn-{{version}}-{{arch}}.img {{hello}} $upgrade

# Lets this machine run arm64 binaries (binfmt_misc + qemu-user-static), for the arm64 tests;
# QEMU_LD_PREFIX then points qemu at Debian's arm64 cross libc (libc6-arm64-cross).
binfmt-arm64:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        /lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf
    fi

# The arm64 build's smoke test under qemu-user: start, deploy, one request, kill -9, serve again.
smoke-arm64: binfmt-arm64 components release-arm64
    QEMU_LD_PREFIX=/usr/aarch64-linux-gnu CAIRN_PROFILE=release CAIRN_TARGET={{arm64_target}} cargo test --release -p cairn-tests --test e2e -- --exact lifecycle::apps_come_back_after_sigterm_and_kill_9_without_recompiling

# The end-to-end suite's arm64 slice against arm64 cairnd/cairnctl under qemu-user, built with
# the `arm64-test` profile (release without LTO, minutes faster to build): what can differ by
# architecture, that is Cranelift's aarch64 code, traps, epoch interruption, the pooling
# allocator's address space, system calls and credentials in pools, cgroups (lifecycle, pools,
# requests, limits, hostile), and two fleet tests (converging, a resumed download).
# `just test-arm64-rest` (in test-all) runs the other modules, whose code is the same on every
# architecture: the control socket's access, bad input, events, host interfaces, import,
# key-value, metrics, schedules, systemd, the store, and fleet.
test-arm64: binfmt-arm64 components build-arm64-test
    {{arm64_test_env}} cargo test --release -p cairn-tests --test e2e -- {{arm64_elsewhere}}
    {{arm64_test_env}} cargo test --release -p cairn-tests --test e2e -- --exact fleet::a_device_converges_stays_up_offline_and_catches_up_to_the_latest fleet::links::a_download_cut_halfway_stores_nothing_and_resumes_where_it_stopped

# The end-to-end modules `just test-arm64` leaves out, against the arm64 build under qemu-user
# (in test-all; judged at 4 to 6 minutes after the arm64 build, not timed alone).
test-arm64-rest: binfmt-arm64 components build-arm64-test
    {{arm64_test_env}} cargo test --release -p cairn-tests --test e2e -- {{replace(arm64_elsewhere, "--skip ", "")}}

# The arm64 binaries the arm64 tests run (the `arm64-test` profile).
build-arm64-test:
    cargo build --profile arm64-test --workspace --bins --target {{arm64_target}}

# Benchmarks in release mode, printed as tables and written to BENCHMARKS.md: fleet sync
# (outbox flush, time to converge), serving (cairn vs `wasmtime serve` vs native hyper) and
# key-value (a read and a write per request against none, and writes per commit), and flash
# wear (bytes written per hour by 10 apps idle and serving a logged request a second each;
# about 11 minutes, `--quick` about 2).
# Installs wrk (apt) and wasmtime-cli at wasmtime_version (cargo install, into the tools dir) when
# missing. `just bench --quick` does one round of each figure.
# The hostile suite (about 3 minutes; `--quick` about 1): one app attacked (busy loops, a
# memory bomb, recursion, a log flood, 100 MiB bodies and responses, 2,000 slowloris
# connections, clients that never read, a pool's credentials) beside a well-behaved neighbour
# under wrk; figures to BENCHMARKS.md. Root for the credentials part. Installs wrk.
hostile *flags: components
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v wrk >/dev/null; then
        echo "hostile: installing wrk with apt-get" >&2
        sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq wrk >/dev/null
    fi
    export CAIRN_PROFILE=release
    cargo build --release --workspace --bins
    cargo bench -p cairn-tests --bench hostile -- {{flags}}

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
    cargo bench -p cairn-tests --bench keyvalue -- {{flags}}
    cargo bench -p cairn-tests --bench fleet -- {{flags}}
    cargo bench -p cairn-tests --bench poorlink -- {{flags}}
    cargo bench -p cairn-tests --bench flashwear -- {{flags}}
