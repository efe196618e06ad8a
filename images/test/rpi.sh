#!/bin/sh
# Runs inside the Raspberry Pi image booted under qemu-system-aarch64 -M raspi3b (started by
# systemd.run= on the kernel command line that images/boot-test-rpi sets): waits for cairnd and
# the preloaded app, and appends what it saw to the boot partition as `RESULT key=value`
# lines for the host to check. The machine powers off when this ends.
dir=/boot/firmware/test
exec >>"$dir/result.txt" 2>&1
echo "RESULT boot"

# systemd.run= makes this command the boot's goal instead of multi-user.target: reach it.
# cairnd answers: `status` exits 0, or 8 when an app is failed or crashlooping.
answering() { cairnctl status >/dev/null 2>&1; rc=$?; [ "$rc" -eq 0 ] || [ "$rc" -eq 8 ]; }
systemctl start multi-user.target
for _ in $(seq 600); do
    answering && break
    sleep 1
done
echo "RESULT apps=$(cairnctl ls | awk 'NR > 1 { printf "%s:%s:%s ", $1, $2, $3 }')"
# No curl on the device: one HTTP/1.0 request through bash's /dev/tcp.
answer=$(bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080; printf "GET / HTTP/1.0\r\nHost: x\r\n\r\n" >&3; cat <&3' |
    tr -d '\r' | tail -1)
echo "RESULT answer=$answer"
root=$(basename "$(readlink -f "$(findmnt -no SOURCE /)")")
disk=$(basename "$(readlink -f "/sys/class/block/$root/..")")
end=$(( $(cat "/sys/class/block/$root/start") + $(cat "/sys/class/block/$root/size") ))
echo "RESULT root=$root disk=$disk spare_sectors=$(( $(cat "/sys/class/block/$disk/size") - end ))"
echo "RESULT fs_mib=$(df -m --output=size / | tail -1 | tr -d ' ') disk_mib=$(( $(cat "/sys/class/block/$disk/size") / 2048 ))"
echo "RESULT growroot=$(systemctl show -p Result --value cairn-growroot.service)"
echo "RESULT model=$(tr -d '\0' </sys/firmware/devicetree/base/model | tr ' ' '_')"
# cairnd's output goes to the journal and /dev/console (the screen, the last console= of
# cmdline.txt, which QEMU does not show): read the journal's copy.
journalctl -b -u cairnd.service --no-pager -o cat | grep 'IMPORT PROBLEM' | sed 's/^/RESULT console: /'
journalctl -b -u cairn-growroot.service --no-pager -o cat | sed 's/^/growroot: /'
echo "RESULT done"
