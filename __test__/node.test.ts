import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Loop, LoopControl, LOOP_MAJOR, removeNode, UnexpectedDeviceError } from '../ts/index.js';
import { image, loopTest, mountsUnder, nodeDev, tempDir } from './helpers.js';

function openDir(t: import('ava').ExecutionContext, dir: string): number {
  const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(fd));
  return fd;
}

/** A bound autoclear device and an empty directory (with an fd) to make its node in. */
function deviceAndDir(t: import('ava').ExecutionContext) {
  const img = image(t);
  const dir = tempDir(t);
  using ctl = new LoopControl();
  const lo = ctl.loopForFdSync(img.fd, { autoclear: true });
  t.teardown(() => lo.close());
  return { lo, dir, dirFd: openDir(t, dir) };
}

loopTest('mknod makes a block node 7:minor in a directory, removeNode takes it away', (t) => {
  const { lo, dir, dirFd } = deviceAndDir(t);
  lo.mknod(dirFd);
  const node = path.join(dir, lo.devname);
  t.deepEqual(nodeDev(node), { major: LOOP_MAJOR, minor: lo.minor, block: true });
  // The node reads the same bytes as the device itself.
  const viaNode = fs.openSync(node, 'r');
  t.teardown(() => fs.closeSync(viaNode));
  const buf = Buffer.alloc(16);
  t.is(fs.readSync(viaNode, buf, 0, 16, 0), 16);
  removeNode(dirFd, lo.devname);
  t.false(fs.existsSync(node));
});

loopTest('mknod refuses to replace an existing node (EEXIST)', (t) => {
  const { lo, dir, dirFd } = deviceAndDir(t);
  fs.writeFileSync(path.join(dir, lo.devname), '');
  t.throws(() => lo.mknod(dirFd), { code: 'EEXIST' });
});

loopTest('a Loop can be opened through a directory fd', (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  using bound = ctl.loopForFdSync(img.fd, { autoclear: true });
  const devFd = openDir(t, '/dev');
  using lo = new Loop(bound.minor, { dirFd: devFd });
  t.is(lo.path, `/dev/loop${bound.minor}`);
  t.true(lo.isBoundTo(img.fd));
});

loopTest('a node that is not the loop device asked for is an UnexpectedDeviceError', (t) => {
  const dir = tempDir(t);
  fs.symlinkSync('/dev/null', path.join(dir, 'loop3')); // a character device
  fs.writeFileSync(path.join(dir, 'loop4'), ''); // a regular file
  const dirFd = openDir(t, dir);
  // A real loop device (held open by us, so nobody removes it) under another minor's name.
  const { lo } = deviceAndDir(t);
  const wrong = lo.minor + 1000;
  fs.symlinkSync(lo.path, path.join(dir, `loop${wrong}`));
  for (const minor of [3, 4, wrong]) {
    const err = t.throws(() => new Loop(minor, { dirFd }), { instanceOf: UnexpectedDeviceError });
    t.is(err?.code, 'ERR_LOOP_UNEXPECTED_DEVICE');
    t.is(err?.expectedMinor, minor);
    t.is(err?.path, path.join(dir, `loop${minor}`));
    t.is(typeof err?.rdev, 'bigint');
  }
});

loopTest('a node of a minor above 255 carries the whole minor (dev_t high bits)', (t) => {
  const dir = tempDir(t);
  const dirFd = openDir(t, dir);
  using ctl = new LoopControl();
  // A minor nobody uses, above the 8 bits an old-style dev_t holds; removed again below (we created it).
  let minor = 4096 + (process.pid % 1000);
  while (fs.existsSync(`/sys/block/loop${minor}`)) minor++;
  t.is(ctl.add(minor), minor);
  try {
    using lo = new Loop(minor);
    lo.mknod(dirFd);
    t.deepEqual(nodeDev(path.join(dir, lo.devname)), { major: LOOP_MAJOR, minor, block: true });
    removeNode(dirFd, lo.devname);
  } finally {
    ctl.remove(minor);
  }
});

/** Waits (up to 2 s) for `pid` to have left our mount namespace. */
async function inOwnMountNamespace(pid: number): Promise<boolean> {
  const ns = (p: string) => {
    try {
      return fs.readlinkSync(`/proc/${p}/ns/mnt`);
    } catch {
      return null; // not started yet
    }
  };
  for (let i = 0; i < 400; i++) {
    const theirs = ns(String(pid));
    if (theirs !== null && theirs !== ns('self')) return true;
    await new Promise((r) => setTimeout(r, 5));
  }
  return false;
}

loopTest('where no bind mount is possible (a directory of another mount namespace), mknod makes a 7:minor node', async (t) => {
  const { lo, dir } = deviceAndDir(t);
  // A process in a mount namespace of its own; the directory opened through its root belongs to that
  // namespace, so move_mount onto a file in it fails (EINVAL) and mknod is the way left.
  const other = spawn('unshare', ['--mount', '--propagation', 'private', 'sleep', '60'], { stdio: 'ignore' });
  t.teardown(() => other.kill('SIGKILL'));
  t.true(await inOwnMountNamespace(other.pid!), 'the child is in a mount namespace of its own');
  const foreignFd = openDir(t, `/proc/${other.pid}/root${dir}`);
  lo.mknod(foreignFd);
  const node = path.join(dir, lo.devname);
  t.deepEqual(nodeDev(node), { major: LOOP_MAJOR, minor: lo.minor, block: true });
  t.deepEqual(mountsUnder(dir), [], 'a node, not a bind mount');
  removeNode(foreignFd, lo.devname);
  t.false(fs.existsSync(node));
});
