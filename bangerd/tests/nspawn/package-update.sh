#!/bin/bash
# Runs inside a systemd-nspawn container booted by
# bangerd/tests/it/package_update.rs (as banger-package-update-test.service):
# the banger .deb (version A) installed, a running VM, and a release
# channel on loopback (channel-server.py over /opt/channel) holding
# version B and broken variants of it. Each broken release is refused and
# changes nothing; B installs and systemd restarts bangerd into it while
# the VM's unit runs on; the packaged CLI hands over to B; rollback
# restores A. Writes what it saw to /opt/results and powers off.
set -uo pipefail
. /opt/banger-test/lib.sh

manager_version() {
  busctl get-property org.banger.Manager /org/banger/Manager org.banger.Manager Version |
    sed -e 's/^s "//' -e 's/"$//'
}
# Wait up to 60 s for the daemon on the bus to say version $1.
wait_version() {
  local i
  for ((i = 0; i < 120; i++)); do
    [[ $(manager_version 2>/dev/null) == "$1" ]] && return 0
    sleep 0.5
  done
  # Into the log, for the failure message.
  systemctl status --no-pager bangerd.service
  journalctl -u bangerd -n 60 --no-pager
  return 1
}
# What an update may change: the packaged binaries and the releases root.
fingerprint() {
  sha256sum /usr/bin/banger /usr/libexec/banger/bangerd /usr/libexec/banger/banger-agent
  find /var/lib/banger-releases -printf '%P %y %m %l\n' | sort
  find /var/lib/banger-releases -type f -exec sha256sum {} + | sort
}
daemon() { systemctl show bangerd.service -p MainPID -p ActiveState -p NRestarts -p Result; }

dpkg -i /opt/pkg/banger.deb >"$out/dpkg-install" 2>&1 || finish "dpkg -i failed"
step installed
a=$(cat /opt/channel/version-a)
b=$(cat /opt/channel/version-b)
write_config "[update]
channel = \"http://127.0.0.1:8080/good/\"
extra_keys = [\"$(sed -n 2p /opt/channel/test.pub)\"]
stall_timeout_secs = 3
"
systemd-run --unit=banger-channel --quiet \
  python3 /opt/banger-test/channel-server.py 8080 /opt/channel
for ((i = 0; i < 40; i++)); do
  (: </dev/tcp/127.0.0.1/8080) 2>/dev/null && break
  sleep 0.25
done

register_guest banger
banger vm create --name keeper >"$out/vm-create" 2>&1 || finish "vm create failed"
id=$(banger vm show keeper --json | jq -r .id)
vm_unit=banger-vm-$id.service
systemctl show "$vm_unit" -p MainPID -p ActiveState >"$out/vm-unit-before"
manager_version >"$out/version-before"
daemon >"$out/daemon-before"
fingerprint >"$out/fp-before"
step "A with a VM"

for case in tampered wrongkey mismatch downgrade replay truncated hang; do
  banger update --channel "http://127.0.0.1:8080/$case/" >"$out/refused-$case" 2>&1
  echo $? >"$out/refused-$case-rc"
  fingerprint >"$out/fp-$case"
done
manager_version >"$out/version-refused"
daemon >"$out/daemon-refused"
step "refusals"

banger update --check --json >"$out/check.json" 2>"$out/check.err"
banger update >"$out/update" 2>&1
echo $? >"$out/update-rc"
cat "$out/update"
wait_version "$b" || finish "bangerd did not come back as $b"
daemon >"$out/daemon-updated"
systemctl show "$vm_unit" -p MainPID -p ActiveState >"$out/vm-unit-updated"
banger version --json >"$out/version-updated.json" 2>&1
banger vm show keeper --json >"$out/vm-updated.json" 2>&1
readlink /var/lib/banger-releases/current >"$out/current-updated"
fingerprint >"$out/fp-updated"
step "updated to B"

banger update --rollback >"$out/rollback" 2>&1
echo $? >"$out/rollback-rc"
cat "$out/rollback"
wait_version "$a" || finish "bangerd did not come back as $a"
daemon >"$out/daemon-rolled-back"
systemctl show "$vm_unit" -p MainPID -p ActiveState >"$out/vm-unit-rolled-back"
banger version --json >"$out/version-rolled-back.json" 2>&1
banger vm show keeper --json >"$out/vm-rolled-back.json" 2>&1
fingerprint >"$out/fp-rolled-back"
step "rolled back to A"

banger vm delete keeper >"$out/vm-delete" 2>&1 || finish "vm delete failed"
finish PASS
