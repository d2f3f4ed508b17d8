# Sourced by the scripts the nspawn tests run inside the container
# (bangerd/testbed/src/nspawn.rs boots it): the log, the step list and the
# verdict in /opt/results, a bangerd.toml for QEMU under TCG (no KVM in
# the container), and the test kernel and tiny image.
out=/opt/results
exec >"$out/log" 2>&1
set -x
export HOME=/root
step() { echo "$1" >>"$out/steps"; }
# Writes the verdict (PASS or what failed) and powers the container off.
finish() {
  echo "$1" >"$out/verdict"
  journalctl -u bangerd -o json --no-pager >"$out/journal.json" 2>/dev/null
  systemctl poweroff
  exit 0
}
# /etc/banger/bangerd.toml: the TCG guest settings, then $1 as is.
write_config() {
  mkdir -p /etc/banger
  {
    cat <<'CONF'
[vm]
vmm = "qemu"
accel = "tcg"
default_image = "tiny"
vcpus = 1
memory_mib = 256
disk_mib = 128
boot_timeout_secs = 150
CONF
    printf '%s' "${1:-}"
  } >/etc/banger/bangerd.toml
}
# The test kernel and the tiny image (bound at /opt/guest), through the
# CLI $1.
register_guest() {
  "$1" kernel import --name test-kernel --kernel /opt/guest/kernel/vmlinuz \
    --initrd /opt/guest/kernel/initrd.img || finish "kernel import failed"
  "$1" image register --name tiny --rootfs /opt/guest/tiny/rootfs.ext4 \
    --work-seed /opt/guest/tiny/work-seed.ext4 --kernel test-kernel \
    --service ssh:22 --init /sbin/banger-init || finish "image register failed"
}
