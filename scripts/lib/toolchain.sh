# Put a Rust toolchain on PATH for scripts run as root (sourced, not run).
# `sudo` resets PATH, so a rustup toolchain in the invoking user's
# ~/.cargo/bin is not found by name: look there (through SUDO_USER), then
# in root's own, and say what to install when there is none or it is too
# old for the workspace's rust-version.
# shellcheck shell=bash

_toolchain_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_toolchain_min=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$_toolchain_repo/Cargo.toml")

if ! command -v cargo >/dev/null 2>&1; then
  for _home in \
    "$(if [[ -n ${SUDO_USER:-} ]]; then getent passwd "$SUDO_USER" | cut -d: -f6; fi)" \
    "${HOME:-}" /root; do
    if [[ -n $_home && -x $_home/.cargo/bin/cargo ]]; then
      export PATH="$_home/.cargo/bin:$PATH"
      # rustup's proxies find their toolchains there; downloads and
      # builds stay in root's own CARGO_HOME.
      if [[ -d $_home/.rustup && -z ${RUSTUP_HOME:-} ]]; then
        export RUSTUP_HOME="$_home/.rustup"
      fi
      break
    fi
  done
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "$(basename "$0"): no Rust toolchain found (cargo is not on PATH, nor in ~/.cargo/bin of ${SUDO_USER:-root})." >&2
  echo "  Install one as your user: curl https://sh.rustup.rs -sSf | sh -s -- --default-toolchain $_toolchain_min" >&2
  echo "  (or 'rustup toolchain install $_toolchain_min'), then run this script with sudo again." >&2
  exit 1
fi

_toolchain_have=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9][0-9.]*\).*/\1/p')
if [[ -n $_toolchain_min && -n $_toolchain_have ]] &&
  [[ $(printf '%s\n%s\n' "$_toolchain_min" "$_toolchain_have" | sort -V | head -1) != "$_toolchain_min" ]]; then
  echo "$(basename "$0"): rustc $_toolchain_have is older than the $_toolchain_min this workspace needs (rust-version in Cargo.toml)." >&2
  echo "  Update it: rustup update stable (or rustup toolchain install $_toolchain_min)" >&2
  exit 1
fi
unset _home _toolchain_repo _toolchain_min _toolchain_have
