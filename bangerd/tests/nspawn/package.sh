#!/bin/bash
# Runs inside a systemd-nspawn container booted by bangerd/tests/it/package.rs
# (as banger-package-test.service): installs the banger .deb and checks it
# as a Debian user would meet it. D-Bus activation, idle exit, DNS socket
# activation, journald fields, polkit for a group member in a logind
# session and for a stranger, a VM booted by the packaged (hardened)
# bangerd, systemd-analyze, and remove/purge. Writes what it saw to
# /opt/results (the test judges it) and powers the container off.
set -uo pipefail
. /opt/banger-test/lib.sh
# Wait up to $1 seconds for bangerd.service to be inactive.
wait_inactive() {
  local i
  for ((i = 0; i < $1 * 4; i++)); do
    systemctl is-active --quiet bangerd.service || return 0
    sleep 0.25
  done
  return 1
}
# bangerd.service's state once it has left "activating" (within 10 s). A
# DNS query is answered while the daemon still starts (it serves the
# socket systemd passed before it takes its bus name, which is when a
# Type=dbus unit turns active), so the answer alone does not mean active.
settled_state() {
  local i state
  for ((i = 0; i < 100; i++)); do
    state=$(systemctl is-active bangerd.service)
    [ "$state" = activating ] || break
    sleep 0.1
  done
  echo "$state"
}
# Run a command as user $1 in a PAM login session (pam_systemd: logind).
as_user() {
  local user=$1
  shift
  systemd-run --quiet --wait --pipe --collect --uid="$user" -p PAMName=login \
    -E HOME="/home/$user" -E XDG_SESSION_CLASS=user -- "$@"
}

dpkg -i /opt/pkg/banger.deb >"$out/dpkg-install" 2>&1 || finish "dpkg -i failed"
step installed
getent group banger >"$out/group"
systemctl is-enabled bangerd.socket >"$out/socket-enabled" 2>&1
systemctl is-active bangerd.socket >"$out/socket-active" 2>&1
systemd-analyze verify /usr/lib/systemd/system/bangerd.service \
  /usr/lib/systemd/system/bangerd.socket \
  /usr/lib/systemd/system/banger-autostart.service >"$out/verify" 2>&1
echo $? >"$out/verify-rc"
systemd-analyze security --no-pager bangerd.service >"$out/security" 2>&1

# A quick idle exit, and QEMU under TCG for the VM below.
write_config '[daemon]
idle_exit_secs = 3
'

# Nothing runs until someone asks.
systemctl is-active bangerd.service >"$out/state-before"
busctl introspect org.banger.Manager /org/banger/Manager >"$out/introspect" 2>&1 ||
  finish "introspect failed"
systemctl is-active bangerd.service >"$out/state-introspect"
systemctl show bangerd.service -p StatusText -p Type -p MainPID >"$out/show-active"
step "activated by D-Bus"
t0=$(date +%s.%N)
wait_inactive 30 || finish "bangerd did not exit when idle"
awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}' >"$out/idle-exit-secs"
systemctl show bangerd.service -p Result -p NRestarts -p ExecMainStatus >"$out/show-idle"
step "idle exit"

# A .vm lookup on the socket systemd holds starts it again.
dig +time=20 +tries=1 @127.0.0.1 -p 42069 nothing-here.vm >"$out/dig" 2>&1
settled_state >"$out/state-dig"
wait_inactive 30 || finish "bangerd did not exit when idle after the lookup"
step "activated by DNS"

banger doctor --json >"$out/doctor.json"
settled_state >"$out/state-doctor"
step "activated by doctor"

register_guest banger

# A member of `banger` in a real logind session, and a stranger.
useradd --create-home --groups banger alice
useradd --create-home bob
as_user alice sh -c 'echo "$XDG_SESSION_ID"; loginctl show-session "$XDG_SESSION_ID" -p Class -p Remote' \
  >"$out/alice-session" 2>&1
as_user alice banger vm create --name alicevm >"$out/alice-create" 2>&1
echo $? >"$out/alice-create-rc"
as_user alice banger vm show alicevm --json >"$out/alice-vm.json" 2>"$out/alice-vm.err"
as_user bob banger vm create --name bobvm >"$out/bob-create" 2>&1
echo $? >"$out/bob-create-rc"
as_user bob banger vm delete alicevm >"$out/bob-delete" 2>&1
echo $? >"$out/bob-delete-rc"
as_user alice banger vm delete alicevm >"$out/alice-delete" 2>&1
echo $? >"$out/alice-delete-rc"
# NAT under the hardened unit: the one writable /proc/sys switch and nft.
banger vm create --name natvm --nat >"$out/nat-create" 2>&1
echo $? >"$out/nat-create-rc"
cat /proc/sys/net/ipv4/ip_forward >"$out/ip-forward"
nft list table inet banger >"$out/nft" 2>&1
banger vm delete natvm >"$out/nat-delete" 2>&1
echo $? >"$out/nat-delete-rc"
banger vm list --all --json >"$out/vms-after.json" 2>&1
step "users"
journalctl -u bangerd -o json --no-pager >"$out/journal.json"
# e2fsprogs on the VMs' disks ran in their own units (os::sandbox).
journalctl --no-pager -u 'banger-tool-*' >"$out/tool-units" 2>&1

# An OCI image with a setuid file and a file capability (made by the
# test: /usr/local/bin/suid 4755, /opt/cap/cat with cap_net_raw+ep),
# pulled from a registry on loopback through the packaged bangerd, its
# layers applied in a unit of their own; then booted.
cp -a /opt/registry /var/tmp/registry
cat >/var/tmp/registry.yml <<'EOF'
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: /var/tmp/registry
http:
  addr: 127.0.0.1:5000
EOF
docker-registry serve /var/tmp/registry.yml >/var/tmp/registry.log 2>&1 &
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/5000) 2>/dev/null && break
  sleep 0.1
done
banger image pull 127.0.0.1:5000/test/caps:t --kernel test-kernel --name caps \
  >"$out/caps-pull" 2>&1
echo $? >"$out/caps-pull-rc"
banger vm create --image caps --name capsvm >"$out/caps-create" 2>&1
echo $? >"$out/caps-create-rc"
banger vm ssh capsvm -- stat -c %a /usr/local/bin/suid >"$out/caps-suid" 2>&1
# As nobody, the capable copy of cat has cap_net_raw (bit 13) from its
# file capability alone.
banger vm ssh capsvm -- "su -s /bin/sh nobody -c '/opt/cap/cat /proc/self/status'" \
  >"$out/caps-status" 2>&1
banger vm ssh capsvm -- "su -s /bin/sh nobody -c 'cat /proc/self/status'" \
  >"$out/plain-status" 2>&1
banger vm delete capsvm >"$out/caps-delete" 2>&1
journalctl --no-pager -u 'banger-pull-*' >"$out/pull-units" 2>&1
step "oci caps"

# Autostart: banger-autostart.service (enabled, as for a boot's
# multi-user.target) starts bangerd only while a VM is marked; bangerd's
# first start after a boot (its runtime directory emptied; here its
# marker removed) starts the marked VMs.
systemctl is-enabled banger-autostart.service >"$out/autostart-enabled" 2>&1
wait_inactive 30 || finish "bangerd did not exit when idle before autostart"
systemctl start banger-autostart.service >"$out/autostart-unmarked" 2>&1
systemctl is-active bangerd.service >"$out/autostart-unmarked-daemon" 2>&1
banger vm create --name autovm --autostart --no-start >"$out/autostart-create" 2>&1
echo $? >"$out/autostart-create-rc"
test -e /var/lib/banger/autostart && echo present >"$out/autostart-flag" ||
  echo absent >"$out/autostart-flag"
systemctl stop bangerd.service
rm -f /run/banger/autostarted-boot
systemctl reset-failed banger-autostart.service 2>/dev/null || true
systemctl start banger-autostart.service >>"$out/autostart-start" 2>&1
systemctl is-active bangerd.service >"$out/autostart-daemon" 2>&1
for _ in $(seq 180); do
  banger vm show autovm >"$out/autostart-show" 2>&1
  grep -q '^state: *running' "$out/autostart-show" && break
  sleep 1
done
banger vm stop autovm >"$out/autostart-delete" 2>&1
banger vm delete autovm >>"$out/autostart-delete" 2>&1
echo $? >"$out/autostart-delete-rc"
test -e /var/lib/banger/autostart && echo present >"$out/autostart-flag-after" ||
  echo absent >"$out/autostart-flag-after"
step "autostart"

# Remove keeps the state, purge drops it.
dpkg -r banger >"$out/dpkg-remove" 2>&1 || finish "dpkg -r failed"
ls /var/lib/banger >"$out/state-after-remove" 2>&1
systemctl is-active bangerd.service >"$out/state-after-remove-unit" 2>&1
dpkg -P banger >"$out/dpkg-purge" 2>&1 || finish "dpkg -P failed"
test -e /var/lib/banger && echo present >"$out/state-after-purge" || echo absent >"$out/state-after-purge"
step "removed"
finish PASS
