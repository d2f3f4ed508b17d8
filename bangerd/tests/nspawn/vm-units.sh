#!/bin/bash
# Runs inside a systemd-nspawn container booted by
# bangerd/tests/it/systemd_units.rs (as banger-test.service): bangerd under
# systemd, a VM whose VMM becomes a sandboxed transient unit, what systemd,
# machined and resolved say about it, a bangerd crash the VM survives, a
# crash that cut a start short (the unit stopped by the next bangerd), a
# host folder served from a unit of its own, then stop and delete. Writes what it saw to /opt/results (the test reads and judges
# it) and powers the container off.
set -uo pipefail
. /opt/banger-test/lib.sh
B=/opt/banger/banger

write_config

start_bangerd() {
  systemd-run --unit=bangerd --collect \
    -p Type=dbus -p BusName=org.banger.Manager \
    -p StateDirectory=banger -p CacheDirectory=banger \
    -p RuntimeDirectory=banger -p RuntimeDirectoryPreserve=yes \
    -p ConfigurationDirectory=banger \
    /opt/banger/bangerd
}
# Kill bangerd with SIGKILL and wait until its unit is gone: systemd-run
# cannot reuse the name while the dead unit is still loaded. The signal
# goes to its main process with kill(2): `systemctl kill` also walks the
# unit's cgroup, which systemd 252 sometimes fails to read ("Failed to
# send signal SIGKILL to auxiliary processes: Input/output error").
kill_bangerd() {
  pid=$(systemctl show -p MainPID --value bangerd)
  [ "${pid:-0}" -gt 0 ] && kill -KILL "$pid"
  for _ in $(seq 300); do
    [ "$(systemctl show -p LoadState --value bangerd)" = not-found ] && return 0
    systemctl reset-failed bangerd 2>/dev/null
    sleep 0.1
  done
  return 1
}
start_bangerd || finish "bangerd did not start under systemd"
step "bangerd up"

register_guest "$B"
$B doctor --json >"$out/doctor.json"
$B vm create --name unitvm || finish "vm create failed"
step "created"
$B vm show unitvm --json >"$out/vm.json"
id=$(jq -r .id "$out/vm.json")
unit=banger-vm-$id.service
echo "$unit" >"$out/unit-name"
systemctl show "$unit" -p ActiveState -p Slice -p MemoryMax -p CPUQuotaPerSecUSec \
  -p MainPID -p Type >"$out/unit"
machinectl list --no-legend >"$out/machines" 2>&1
$B vm ssh unitvm -- uname -r >"$out/ssh" || finish "ssh failed"
step "ssh"
# The VMM's sandbox, as systemd scores it and as the kernel holds it.
systemd-analyze security --no-pager "$unit" >"$out/vm-security" 2>&1
vmm=$(systemctl show -p MainPID --value "$unit")
grep -E '^(Uid|Gid|Groups|CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$vmm/status" >"$out/vmm-status" 2>&1
{ readlink "/proc/$vmm/ns/net"; readlink /proc/1/ns/net; } >"$out/vmm-netns" 2>&1
# The host resolves <name>.vm through systemd-resolved.
resolvectl status banger0 >"$out/resolved" 2>&1
resolvectl query --cache=no unitvm.vm >"$out/query" 2>&1
$B doctor --json >"$out/doctor-up.json"

# bangerd dies; the VM's unit does not.
kill_bangerd || finish "bangerd's unit did not go away"
systemctl is-active "$unit" >"$out/after-kill"
start_bangerd || finish "bangerd did not come back"
$B vm show unitvm --json >"$out/vm-after.json"
step "restarted"

# A crash between starting the VMM's unit and recording its pid, as the
# store then reads: the row says starting, with no pid, while the unit
# runs. The next bangerd stops the unit it cannot account for and records
# the VM stopped; it starts again on request.
kill_bangerd || finish "bangerd's unit did not go away"
python3 - "$id" <<'PY' || finish "cannot edit the store"
import sqlite3, sys
db = sqlite3.connect("/var/lib/banger/banger.db")
n = db.execute(
    "UPDATE vms SET state = 'starting', pid = NULL, pid_start = NULL WHERE id = ?",
    (sys.argv[1],),
).rowcount
db.commit()
sys.exit(0 if n == 1 else 1)
PY
start_bangerd || finish "bangerd did not come back after the cut-short start"
for _ in $(seq 100); do
  systemctl is-active --quiet "$unit" || break
  sleep 0.2
done
systemctl show "$unit" -p ActiveState >"$out/unit-orphan"
$B vm show unitvm --json >"$out/vm-orphan.json"
$B vm start unitvm || finish "vm start after the cut-short start failed"
step "cut-short start"

# A host folder: its virtiofsd in a unit of its own, beside the VMM's.
$B vm stop unitvm || finish "vm stop before the host folder failed"
mkdir -p /srv/share && echo "from the host" >/srv/share/hello
$B vm set unitvm --mount /srv/share:/mnt/share || finish "vm set --mount failed"
$B vm start unitvm >"$out/folder-start" 2>&1 || finish "vm start with a host folder failed: $(tail -3 "$out/folder-start")"
$B vm exec unitvm -- cat /mnt/share/hello >"$out/folder-read" 2>&1
systemctl show "banger-fs-$id.service" -p ActiveState -p Slice -p CapabilityBoundingSet \
  -p NoNewPrivileges -p PrivateNetwork >"$out/folder-unit"
step "host folder"

$B vm stop unitvm || finish "vm stop failed"
systemctl show "$unit" -p ActiveState >"$out/unit-stopped"
systemctl show "banger-fs-$id.service" -p ActiveState >"$out/folder-unit-stopped"
$B vm delete unitvm || finish "vm delete failed"
step "deleted"
finish PASS
