#!/bin/sh
# Runs inside the booted amd64 image (started by systemd.run= on the kernel command line that
# images/boot-test sets): upgrade, remove, reinstall and purge the cairn package for real, and
# write what it saw to the boot partition as `RESULT key=value` lines for the host to check.
# The machine powers off when this ends (systemd.run_success_action=poweroff).
dir=/boot/efi/test
exec >"$dir/result.txt" 2>&1

# cairnd answers: `status` exits 0, or 8 when an app is failed or crashlooping.
answering() { cairnctl status >/dev/null 2>&1; rc=$?; [ "$rc" -eq 0 ] || [ "$rc" -eq 8 ]; }
apps() { cairnctl ls | awk 'NR > 1 { printf "%s:%s:%s ", $1, $2, $3 }'; }
ready() {
    for _ in $(seq 180); do
        # Answering is not enough: an app restored at start is `starting` until its pool is
        # up, and what this script records is where the apps settle.
        if systemctl is-active --quiet cairnd && answering \
            && ! apps | grep -q ':starting'; then
            return 0
        fi
        sleep 1
    done
    echo "cairnd did not become active, or an app stayed starting: $(apps)"; systemctl status --no-pager cairnd; return 1
}
version() {  # the installed version, or none (also when only conffiles are left)
    case "$(dpkg-query -W -f='${db:Status-Abbrev}' cairn 2>/dev/null)" in
        ii*) dpkg-query -W -f='${Version}' cairn ;;
        *) echo none ;;
    esac
}

# systemd.run= makes this command the boot's goal instead of multi-user.target: reach it.
systemctl start multi-user.target
ready
# The fleet id: made at first start (the image carries no store), kept across an upgrade.
device() { cairnctl sync status | awk '$1 == "device" { print $2 }'; }
echo "RESULT installed=$(version) apps=$(apps)"
echo "RESULT device=$(device)"
echo "RESULT cgroup=$(stat -fc %T /sys/fs/cgroup) limits=$(cairnctl status | sed -n 's/^limits *//p' | tr ' ' '_')"
# The hello app's pool (a spare pool process, not yet any app's, waits beside it).
pool=$(pgrep -f 'cairnd pool --app hello' | head -1)
echo "RESULT pool_user=$(ps -o user= -p "$pool") pool_cgroup=$(cut -d: -f3 /proc/"$pool"/cgroup)"
# The pool's system-call filter on this kernel and architecture: every thread bound, and no
# call denied while it serves a few requests.
for _ in 1 2 3; do
    bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080; printf "GET / HTTP/1.0\r\n\r\n" >&3; cat <&3' >/dev/null 2>&1
done
filtered=$(grep -l '^Seccomp:[[:space:]]*2' /proc/"$pool"/task/*/status | wc -l)
threads=$(ls /proc/"$pool"/task | wc -l)
denied=$(cairnctl -o json status hello | tr -d ' \n' | sed -n 's/.*"syscalls_denied":\([0-9]*\).*/\1/p')
echo "RESULT filtered_threads=$filtered/$threads syscalls_denied=$denied"
systemd-analyze security --no-pager cairnd.service >"$dir/security.txt" 2>&1

# Key-value data must outlive the package's upgrade and its removal and reinstall: a second
# app on the same component, with a store, given a key by the operator.
digest=$(cairnctl -o json status hello | tr -d ' \n' | sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p')
printf 'name = "notes"\ncomponent = "%s"\n[http]\nlisten = "127.0.0.1:8081"\n[keyvalue]\nquota = "64KiB"\n' \
    "$digest" >/run/notes.toml
cairnctl deploy -f /run/notes.toml >/dev/null
cairnctl kv notes set written-before "the upgrade" >/dev/null
echo "RESULT kv=$(cairnctl kv notes get written-before)"

dpkg -i "$dir/cairn-upgrade.deb"
ready
echo "RESULT upgraded=$(version) apps=$(apps)"
echo "RESULT upgraded_device=$(device)"
echo "RESULT upgraded_kv=$(cairnctl kv notes get written-before)"

dpkg -r cairn
echo "RESULT removed=$(version) state=$(test -f /var/lib/cairn/cairn.db && echo kept || echo gone) active=$(systemctl is-active cairnd)"

dpkg -i "$dir/cairn-upgrade.deb"
ready
echo "RESULT reinstalled=$(version) apps=$(apps)"
echo "RESULT reinstalled_kv=$(cairnctl kv notes get written-before)"

dpkg -P cairn
echo "RESULT purged=$(version) state=$(test -e /var/lib/cairn && echo kept || echo gone) config=$(test -e /etc/cairn/cairnd.toml && echo kept || echo gone)"
echo "RESULT done"
