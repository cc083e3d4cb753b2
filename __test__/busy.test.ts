/**
 * Detaching a device something else holds open: a mount or another process makes a verified detach fail at
 * once with EBUSY naming the holder (instead of waiting out its timeout), `lazy` leaves it to the kernel as
 * `losetup -d` does, and `loopdev detach` behaves like `losetup -d` unless given --wait.
 */
import { execFileSync, spawn } from 'node:child_process';
import { native } from '../ts/binding.js';
import { LoopError } from '../ts/index.js';
import { attached, cli, mount, sparseFile, tool, umount } from './fixtures.js';
import { boundAfterSettling, devicesBoundUnder, loopTest, tempDir, unavailable } from './helpers.js';

const MiB = 1 << 20;

/** An ext4 image attached and mounted in a fresh dir. */
async function mounted(t: import('ava').ExecutionContext) {
  const mkfs = tool('mkfs.ext4');
  if (!mkfs) return null;
  const dir = tempDir(t);
  const file = sparseFile(dir, 16 * MiB);
  execFileSync(mkfs, ['-q', '-F', file]);
  const dev = await attached(t, file);
  const mnt = mount(t, dir, dev.path, ['-t', 'ext4']);
  return { dir, file, dev, mnt };
}

loopTest('a verified detach of a mounted device fails at once with EBUSY naming the mount point', async (t) => {
  // A 60 s timeout waited out would fail by ava's 10 s one: the mount is found, not waited for.
  t.timeout(10_000);
  const m = await mounted(t);
  if (!m) return unavailable(t, 'mkfs.ext4 not installed');
  const err = await t.throwsAsync(m.dev.detach({ timeoutMs: 60_000 }), { instanceOf: LoopError, code: 'EBUSY' });
  t.like(err, { syscall: 'ioctl', ioctl: 'LOOP_CLR_FD', path: m.dev.path });
  t.deepEqual(err?.heldBy, [`mounted at ${m.mnt}`]);
  t.regex(err!.message, new RegExp(`mounted at ${m.mnt}; the kernel detaches it at its last close`));
  umount(m.mnt);
  t.deepEqual(await boundAfterSettling(m.file), [], 'the kernel finished at the last close (the umount)');
  t.notThrows(() => m.dev.detachSync(), 'a second detach is a no-op');
});

// Serial: it counts calls of the binding's functions, which the other tests here make too.
loopTest.serial('a verified detach of a device another process has open fails with EBUSY naming the process', async (t) => {
  t.timeout(10_000);
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const dev = await attached(t, file);
  const holder = spawn('sh', ['-c', `exec 3<${dev.path}; echo open; exec sleep 60`], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.teardown(() => holder.kill('SIGKILL'));
  await new Promise((resolve) => holder.stdout.once('data', resolve));
  // The scan of /proc that finds the process stats every fd of every process: the async detach has it done
  // on the pool, never on the JS thread.
  const scans = { sync: 0, async: 0 };
  const { blockOpeners, blockOpenersAsync } = native;
  native.blockOpeners = (devs) => (scans.sync++, blockOpeners(devs));
  native.blockOpenersAsync = (devs) => (scans.async++, blockOpenersAsync(devs));
  t.teardown(() => Object.assign(native, { blockOpeners, blockOpenersAsync }));
  const err = await t.throwsAsync(dev.detach({ timeoutMs: 60_000 }), { instanceOf: LoopError, code: 'EBUSY' });
  t.deepEqual(err?.heldBy, [`open in process ${holder.pid} (sleep)`]);
  t.is(scans.sync, 0, 'no scan of /proc on the JS thread');
  t.true(scans.async > 0);
  t.deepEqual(dev.heldBy(), [`open in process ${holder.pid} (sleep)`], 'heldBy() scans in place');
  t.is(scans.sync, 1);
  holder.kill('SIGKILL');
  t.deepEqual(await boundAfterSettling(file), []);
});

loopTest('lazy: true returns at once while mounted; the kernel detaches at the umount', async (t) => {
  t.timeout(10_000);
  const m = await mounted(t);
  if (!m) return unavailable(t, 'mkfs.ext4 not installed');
  await m.dev.detach({ lazy: true, timeoutMs: 60_000 });
  t.false(m.dev.released, 'still bound: the mount holds it');
  t.true(m.dev.closed);
  t.deepEqual(m.dev.heldBy(), [`mounted at ${m.mnt}`]);
  umount(m.mnt);
  t.deepEqual(await boundAfterSettling(m.file), []);
});

loopTest('loopdev detach is losetup -d: exit 0 and one line naming the mount; --wait fails with EBUSY', async (t) => {
  const m = await mounted(t);
  if (!m) return unavailable(t, 'mkfs.ext4 not installed');
  m.dev.close(); // the CLI opens it by name, like any other process
  const waited = await cli(['detach', '--wait', m.dev.path]);
  t.is(waited.code, 1);
  t.regex(waited.stderr, new RegExp(`^loopdev: EBUSY: .*mounted at ${m.mnt}`));
  t.is(waited.stderr.trim().split('\n').length, 1, waited.stderr);
  const lazy = await cli(['detach', m.dev.path]);
  t.is(lazy.code, 0, lazy.stderr);
  t.is(lazy.stderr, `loopdev: ${m.dev.path}: mounted at ${m.mnt}; the kernel detaches it when it is closed\n`);
  t.deepEqual(devicesBoundUnder(m.file), [m.dev.path], 'bound until the umount');
  umount(m.mnt);
  t.deepEqual(await boundAfterSettling(m.file), []);
});
