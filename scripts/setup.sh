#!/usr/bin/env bash
# Installs everything this repo needs on a Debian 12 machine (as root) and builds it:
# Debian's Rust crate sources (crates.io is not used), the tools the tests and demo use, npm deps,
# the native addon and the TypeScript output. Safe to run again; it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  librust-nix-dev librust-libc-dev librust-serde-json-dev # crate sources for the directory registry
  util-linux fdisk e2fsprogs xfsprogs                     # losetup, sfdisk, mkfs.ext4, mkfs.xfs
  python3 build-essential                                 # osbuild-compatible test peer; linker
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  # The code builds with Debian 12's own Rust (1.63) too.
  echo "setup: no cargo on PATH; installing Debian's rustc and cargo"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rustc cargo >/dev/null
fi
rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "$rustc_minor" -lt 63 ]; then
  echo "setup: rustc $(rustc --version) is too old; need >= 1.63" >&2
  exit 1
fi
command -v rustup >/dev/null 2>&1 && { rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
npm run --silent build
echo "setup: ok ($(ls loopdev.*.node))"
