#!/bin/bash
# Runs inside a systemd-nspawn container booted by
# bangerd/tests/it/package_fresh.rs (as banger-package-fresh-test.service):
# a host with no network whose only package source is a Debian mirror
# (the partial one scripts/build-local-mirror makes, bound at
# /opt/mirror). `apt-get install ./banger.deb` takes the package and what
# it recommends from there; then, with no kernel, no image and an empty
# catalog, `banger vm run -- cat /etc/os-release` has the packaged,
# hardened bangerd build the kernel and the debian-bookworm image from
# that mirror and boots it; a second `vm run` reuses them. Writes what it
# saw to /opt/results and powers the container off.
set -uo pipefail
. /opt/banger-test/lib.sh
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN{printf "%.1f\n", a-b}'; }

# The mirror is the only source, as on an offline host with a local one.
rm -f /etc/apt/sources.list.d/*
echo "deb file:/opt/mirror bookworm main" >/etc/apt/sources.list
apt-get update >"$out/apt-update" 2>&1 || {
  tail -n 20 "$out/apt-update"
  finish "apt-get update failed"
}
apt-get install -y /opt/pkg/banger.deb >"$out/apt-install" 2>&1 || {
  tail -n 20 "$out/apt-install"
  finish "apt-get install ./banger.deb failed"
}
step installed
dpkg-query -W -f='${Package} ${Status}\n' mmdebstrap uidmap busybox-static kmod >"$out/recommends" 2>&1
# The account the base system is made as, without privilege.
{ getent passwd banger-build; grep '^banger-build:' /etc/subuid /etc/subgid; } >"$out/build-user" 2>&1

# The internet, as far as the VMs know: a namespace behind a router link
# (198.51.100.0/30: the container's default route, a network the host is
# attached to, which banger's NAT keeps guests out of) with 192.0.2.1
# (TEST-NET-1) behind it, serving the pinned opencode package (bound at
# /opt/tools) over HTTP. The recipe's tools.list names it there, so a VM
# with --nat installs opencode at its first boot through banger's NAT, and
# nothing leaves the container.
ip netns add inet
ip link add inet0 type veth peer name inet1 netns inet
ip addr add 198.51.100.2/30 dev inet0
ip link set inet0 up
ip -n inet addr add 198.51.100.1/30 dev inet1
ip -n inet addr add 192.0.2.1/32 dev lo
ip -n inet link set inet1 up
ip -n inet link set lo up
ip route add default via 198.51.100.1
ip netns exec inet python3 -m http.server --bind 192.0.2.1 --directory /opt/tools 80 \
  >"$out/http.log" 2>&1 &
list=/usr/share/banger/images/debian-bookworm/tools.list
awk -v sha="$(sha256sum /opt/tools/opencode.tgz | cut -d' ' -f1)" \
  '$1 == "opencode" { print $1, $2, "http://192.0.2.1/opencode.tgz", sha, $5 }' \
  "$list" >"$list.new"
mv "$list.new" "$list"
cp "$list" "$out/tools.list"

# QEMU under TCG (no KVM in the container) with room for Debian; the
# image's packages come from the same mirror.
mkdir -p /etc/banger
cat >/etc/banger/bangerd.toml <<'CONF'
[vm]
vmm = "qemu"
accel = "tcg"
vcpus = 2
memory_mib = 1024
boot_timeout_secs = 600

[images]
mirror = "file:///opt/mirror"
CONF
banger doctor --json >"$out/doctor-before.json" 2>"$out/doctor-before.err"

t0=$(now)
banger vm run --name first --nat -- cat /etc/os-release >"$out/run1" 2>"$out/run1.err"
echo $? >"$out/run1-rc"
since "$t0" >"$out/run1-secs"
step "first vm run"
# Its first boot with network installs opencode (banger-tools.service),
# which then listens on 4096.
t0=$(now)
# shellcheck disable=SC2016
banger vm ssh first -- sh -c 'for i in $(seq 600); do
    ss -Hltn "sport = :4096" | grep -q . && exit 0; sleep 1; done; exit 1' >"$out/opencode" 2>&1
echo $? >"$out/opencode-rc"
since "$t0" >"$out/opencode-secs"
banger vm ssh first -- journalctl -b -u banger-tools.service -u opencode.service --no-pager \
  >"$out/tools-journal" 2>&1
banger vm stop first >"$out/stop-first" 2>&1
step "opencode"
journalctl --no-pager -o short-monotonic -u 'banger-build-*' >"$out/build-units" 2>&1
banger kernel list --json >"$out/kernels.json" 2>&1
banger image list --json >"$out/images.json" 2>&1

t0=$(now)
banger vm run --name second -- cat /etc/os-release >"$out/run2" 2>"$out/run2.err"
echo $? >"$out/run2-rc"
since "$t0" >"$out/run2-secs"
step "second vm run"
banger doctor --json >"$out/doctor-after.json" 2>"$out/doctor-after.err"
banger vm delete first second >"$out/delete" 2>&1
echo $? >"$out/delete-rc"
# No mount, tree or unit of the builds is left behind.
findmnt -rn -o TARGET | grep -c /var/lib/banger >"$out/mounts-left"
ls -A /var/lib/banger/images | grep -c '^\.tmp-' >"$out/tmp-left"
systemctl list-units --all --no-legend 'banger-build-*' >"$out/units-left" 2>&1
finish PASS
