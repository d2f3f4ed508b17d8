# The throw-away bed the benchmarks share (sourced after common.sh, not
# run): bench_bed_up FS starts a bus, polkitd and the release-built
# bangerd in a network namespace of its own, with its state in a temp
# directory (on a loop-mounted btrfs when FS is btrfs), imports the test
# kernel and registers the tiny image; everything goes away on exit.
# Sets dir, ns and images; defines banger (the release CLI in the
# namespace) and median. A benchmark that starts a QEMU of its own puts
# its pid in qemu_pid so that it dies too.
# shellcheck shell=bash

qemu_pid=
loop_file=

bench_bed_cleanup() {
  set +e
  [[ -n $qemu_pid ]] && kill -9 "$qemu_pid" 2>/dev/null
  ip netns exec "$ns" "$repo/scripts/testbed" down "$dir" >/dev/null 2>&1
  # VMMs outlive bangerd by design; the bench's must not outlive the bench.
  pkill -9 -f "qemu-system.*$dir" 2>/dev/null
  sleep 0.2
  mountpoint -q "$dir/state" && umount "$dir/state"
  [[ -n $loop_file ]] && rm -f "$loop_file"
  ip netns delete "$ns" 2>/dev/null
  rm -rf "$dir"
}

# median: the median of the numbers on stdin.
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

banger() { ip netns exec "$ns" "$repo/target/release/banger" "$@"; }

bench_bed_up() {
  local fs=$1 kernel_dir=$artifacts/kernel tiny=$artifacts/tiny
  dir=$(mktemp -d /tmp/banger-bench.XXXXXX)
  ns=banger-bench-$$
  trap bench_bed_cleanup EXIT
  stage "start bangerd (netns $ns, state on $fs)"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  mkdir -p "$dir"/{state,config}
  if [[ $fs == btrfs ]]; then
    loop_file=$(mktemp /var/tmp/banger-bench-btrfs.XXXXXX)
    truncate -s 24G "$loop_file"
    mkfs.btrfs -q "$loop_file" >/dev/null
    mount -o loop "$loop_file" "$dir/state"
  fi
  printf '%s\n' '[network]' 'tap_pool_size = 2' '[vm]' 'vmm = "qemu"' 'accel = "tcg"' \
    'default_image = "tiny"' 'vcpus = 1' 'memory_mib = 256' 'disk_mib = 256' \
    "templates = ${BENCH_TEMPLATES:-false}" \
    >"$dir/config/bangerd.toml"
  export BANGERD=$repo/target/release/bangerd
  ip netns exec "$ns" "$repo/scripts/testbed" up "$dir" >/dev/null
  export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$dir/system_bus_socket
  banger kernel import --name test-kernel --kernel "$kernel_dir/vmlinuz" \
    --initrd "$kernel_dir/initrd.img" >/dev/null
  # Images live on the state filesystem, so that reflink can apply.
  images=$dir/state/bench-images
  mkdir -p "$images"
  cp --sparse=always "$tiny/rootfs.ext4" "$tiny/work-seed.ext4" "$images/"
  banger image register --name tiny --rootfs "$images/rootfs.ext4" \
    --work-seed "$images/work-seed.ext4" --kernel test-kernel --service ssh:22 \
    --init /sbin/banger-init >/dev/null
}
