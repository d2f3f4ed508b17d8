# Shared helpers of the guest builders (sourced, not run).
# shellcheck shell=bash

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
artifacts=${BANGER_ARTIFACTS:-$repo/build/guest}
cache=${BANGER_CACHE:-$repo/build/cache}
mkdir -p "$artifacts" "$cache"

_script=$(basename "$0")
_t0=$(date +%s.%N)
_stage=""
_stage_t=$_t0

log() { printf '%s: %s\n' "$_script" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# stage NAME: end the previous stage (printing its time), start NAME.
stage() {
  local now
  now=$(date +%s.%N)
  if [[ -n $_stage ]]; then
    printf '%s:   %-28s %6.1fs\n' "$_script" "$_stage" "$(awk -v a="$now" -v b="$_stage_t" 'BEGIN{print a-b}')" >&2
  fi
  _stage=$1
  _stage_t=$now
  [[ -n $1 ]] && log "$1"
  return 0
}

finish() {
  stage ""
  printf '%s: done in %.1fs\n' "$_script" "$(awk -v a="$(date +%s.%N)" -v b="$_t0" 'BEGIN{print a-b}')" >&2
}

# need_packages PKG...: install the Debian packages that are missing.
need_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# stamp_of FILE...: a digest of the inputs that decide an output.
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

# up_to_date DIR STAMP: whether DIR was built from inputs with STAMP.
up_to_date() { [[ -f $1/.stamp && $(cat "$1/.stamp") == "$2" ]]; }

# publish TMP DIR STAMP: record the stamp and move TMP into place as DIR.
publish() {
  echo "$3" >"$1/.stamp"
  rm -rf "$2.old"
  [[ -e $2 ]] && mv "$2" "$2.old"
  mv "$1" "$2"
  rm -rf "$2.old"
}

# bookworm_tree DIR MIRROR [INCLUDE]: a debootstrapped (minbase) Debian
# bookworm in the new directory DIR, with INCLUDE's packages (comma
# separated). The tree is cached as a tarball keyed by MIRROR and
# INCLUDE, so only the first build downloads it.
bookworm_tree() {
  local dir=$1 mirror=$2 include=${3:-}
  local base
  base=$cache/debian-bookworm-base-$(echo "$mirror $include" | sha256sum | cut -c1-12).tar
  if [[ ! -f $base ]]; then
    log "debootstrap bookworm from $mirror (cached afterwards)"
    # Beside DIR, so the caller's clean-up of DIR's parent takes it too.
    local work=$dir.debootstrap
    mkdir -p "$work"
    debootstrap --variant=minbase ${include:+--include="$include"} bookworm "$work/root" "$mirror" >"$work/log" 2>&1 || {
      tail -n 30 "$work/log" >&2
      rm -rf "$work"
      die "debootstrap failed (log above)"
    }
    tar -C "$work/root" --numeric-owner -cf "$base.part" .
    mv "$base.part" "$base"
    rm -rf "$work"
  fi
  mkdir -p "$dir"
  tar -C "$dir" --numeric-owner -xf "$base"
}

# banger_cli: the banger binary to register outputs with, if a daemon
# answers; empty otherwise.
banger_cli() {
  local b=${BANGER:-}
  [[ -z $b ]] && b=$(command -v banger || true)
  [[ -z $b && -x $repo/target/debug/banger ]] && b=$repo/target/debug/banger
  [[ -n $b ]] && "$b" daemon status >/dev/null 2>&1 && echo "$b"
  return 0
}

# register KIND NAME CMD...: run the `banger` registration command CMD
# when a daemon answers and has no KIND (kernel|image) called NAME yet;
# otherwise say how to do it later. Never fails the build.
register() {
  local kind=$1 name=$2 b
  shift 2
  b=$(banger_cli)
  if [[ -z $b ]]; then
    log "no banger daemon answers; register later with:"
    printf '  banger %s\n' "$*" >&2
    return 0
  fi
  if "$b" "$kind" show "$name" >/dev/null 2>&1; then
    log "$kind $name is already registered"
    return 0
  fi
  if ! "$b" "$@" >&2; then
    log "warning: 'banger $*' failed (the build itself is fine)"
  fi
}
