# Sourced by the boot tests (images/boot-test, images/boot-test-rpi): what an operator puts in
# the boot partition's cairn/ folder before the first boot, a demo app and a broken manifest,
# copied with the caller's `fat` (mtools on that partition); and what report.txt must then say.

demo_answer="from the boot partition from cairn"
report_imported="ok: apps/hello.toml: deployed as app hello generation 1"
# (An extended regular expression: at import time the restored app's pool may still be starting.)
report_unchanged='ok: apps/hello\.toml: unchanged since it was imported; app hello is at generation 1 \((starting|running)\)'

put_demo_apps() {  # put_demo_apps COMPONENT WORK_DIR
    local component=$1 work=$2
    cat >"$work/hello.toml" <<'TOML'
name = "hello"
component = "hello.wasm"
[http]
listen = "0.0.0.0:8080"
[env]
GREETING = "from the boot partition"
TOML
    printf 'name = "broken"\n[http\n' >"$work/broken.toml"
    fat mcopy "$component" ::cairn/apps/hello.wasm
    fat mcopy "$work/hello.toml" ::cairn/apps/hello.toml
    fat mcopy "$work/broken.toml" ::cairn/apps/broken.toml
}
