#!/usr/bin/env bash
# Cross-builds loopdev.linux-arm64-gnu.node on an x86_64 Debian 12 machine with Debian's own Rust (1.63,
# our minimum) and its arm64 standard library: rustup cannot fetch other targets here. Installs what it
# needs, then checks the result is an aarch64 shared object exporting napi_register_module_v1.
# Usage: scripts/build-arm64.sh [OUT] (default: loopdev.linux-arm64-gnu.node at the repo root). Honours
# CARGO_TARGET_DIR, so a release staged from a fresh clone can reuse a checkout's build cache.
set -euo pipefail
# Resolved before the cd, as a relative argument is relative to the caller.
out=$(realpath -m "${1:-$(dirname "$0")/../loopdev.linux-arm64-gnu.node}")
cd "$(dirname "$0")/.."

if [ ! -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    rustc cargo gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstd-rust-dev:arm64 >/dev/null
fi

# Its own subdirectory: Debian's cargo and rustup's must not share fingerprints.
target=${CARGO_TARGET_DIR:-target}/debian
RUSTC=/usr/bin/rustc CARGO_TARGET_DIR=$target \
  /usr/bin/cargo build --quiet --release --target aarch64-unknown-linux-gnu -p loopdev-napi
cp "$target/aarch64-unknown-linux-gnu/release/libloopdev_napi.so" "$out.tmp"
mv -f "$out.tmp" "$out"

file "$out" | grep -q 'ELF 64-bit LSB shared object, ARM aarch64' || { file "$out"; exit 1; }
aarch64-linux-gnu-readelf --dyn-syms -W "$out" | grep -q ' napi_register_module_v1$' \
  || { echo "napi_register_module_v1 not exported" >&2; exit 1; }
echo "built $out ($(stat -c %s "$out") bytes, $(/usr/bin/rustc --version))"
