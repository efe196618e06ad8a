#!/bin/bash
# Runs inside the booted amd64 image during images/power-cut (started by systemd.run= on the
# kernel command line it sets), until the host cuts the power: says on the serial console what
# the app serves after the previous cut (`SERVING ...`), then deploys new generations of the
# demo app one after another, each with a greeting of its own, saying each one cairnctl
# acknowledged (`ACK CYCLE N`), with log lines written between them.
console=/dev/ttyS0
cycle=$(cat /boot/efi/test/cycle 2>/dev/null || echo 0)
say() { echo "$*" >"$console"; }

# cairnd answers: `status` exits 0, or 8 when an app is failed or crashlooping.
answering() { cairnctl status >/dev/null 2>&1; rc=$?; [ "$rc" -eq 0 ] || [ "$rc" -eq 8 ]; }
systemctl start multi-user.target
for _ in $(seq 300); do
    answering && break
    sleep 1
done
get() {  # get PATH: the body of a GET to the demo app
    bash -c "exec 3<>/dev/tcp/127.0.0.1/8080; printf 'GET $1 HTTP/1.0\r\nHost: device\r\n\r\n' >&3; cat <&3" 2>/dev/null |
        sed '1,/^\r$/d'
}
for _ in $(seq 120); do
    body=$(get /)
    [ -n "$body" ] && break
    sleep 1
done
say "SERVING $cycle $body"
digest=$(cairnctl -o json ls | sed -n 's/.*"digest": *"\(sha256:[0-9a-f]*\)".*/\1/p' | head -1)
say "READY $cycle $digest"
n=0
while true; do
    n=$((n + 1))
    if cairnctl deploy hello --component "$digest" --listen 0.0.0.0:8080 \
        --env "GREETING=cut-$cycle-$n" >/dev/null 2>&1; then
        say "ACK $cycle $n"
    fi
    get "/lines?200-cut-$cycle-$n" >/dev/null
done
