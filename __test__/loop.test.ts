import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Loop, LoopError } from '../ts/index.js';
import { bindFresh, boundAfterSettling, configuredLoop, image, loopTest, sysfs, unavailable } from './helpers.js';

loopTest('configure binds with offset, size limit, partscan, read-only and 4096-byte sectors', async (t) => {
  const img = image(t, 16 << 20);
  using lo = await configuredLoop(img.fd, {
    offset: 8192,
    sizeLimit: 2 << 20,
    partscan: true,
    readOnly: true,
    blockSize: 4096,
  });
  t.is(sysfs(lo.minor, 'loop/backing_file'), img.path);
  t.is(sysfs(lo.minor, 'loop/offset'), '8192');
  t.is(sysfs(lo.minor, 'loop/sizelimit'), String(2 << 20));
  t.is(sysfs(lo.minor, 'loop/partscan'), '1');
  t.is(sysfs(lo.minor, 'ro'), '1');
  t.is(sysfs(lo.minor, 'queue/logical_block_size'), '4096');
  const info = lo.getStatus();
  t.is(info.number, lo.minor);
  t.true(Object.isFrozen(info));
});

loopTest('configure binds off the event loop', async (t) => {
  const img = image(t);
  await using lo = await bindFresh((l) => l.configure(img.fd, { autoclear: true }));
  t.true(lo.isBoundTo(img.fd));
  t.is(sysfs(lo.minor, 'loop/autoclear'), '1');
});

loopTest('isBoundTo is true for the backing file only, false once unbound', async (t) => {
  const img = image(t);
  const other = image(t);
  const lo = await configuredLoop(img.fd);
  t.true(lo.isBoundTo(img.fd));
  t.false(lo.isBoundTo(other.fd));
  // clearFd alone only marks the device autoclear while anyone else (a prober) has it open; wait for it.
  await lo.clearFdWait(img.fd, 2000, 5);
  t.false(lo.isBoundTo(img.fd));
  lo.close();
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('setStatus changes what is asked and keeps the rest', async (t) => {
  const img = image(t);
  using lo = await configuredLoop(img.fd, { offset: 4096, partscan: true, fileName: img.path });
  lo.setStatus({ sizeLimit: 1 << 20, autoclear: true });
  const info = lo.getStatus();
  t.is(info.offset, 4096n);
  t.is(info.sizeLimit, 1n << 20n);
  t.true(info.autoclear && info.partscan);
  t.is(info.fileName, img.path);
  t.is(sysfs(lo.minor, 'loop/sizelimit'), String(1 << 20));
  lo.setStatus({ autoclear: false });
  t.false(lo.getStatus().autoclear);
});

loopTest('setStatus refuses a change the kernel would silently ignore, and changes nothing', async (t) => {
  const img = image(t);
  using lo = await configuredLoop(img.fd, { partscan: true });
  const before = lo.getStatus();
  const asks = [
    { offset: 4096, sizeLimit: 1 << 20, autoclear: true, readOnly: true },
    { offset: 4096, sizeLimit: 1 << 20, autoclear: true, partscan: false },
  ];
  for (const ask of asks) {
    const err = t.throws(() => lo.setStatus(ask), { instanceOf: LoopError });
    t.is(err?.code, 'EINVAL');
    t.is(err?.ioctl, 'LOOP_SET_STATUS64');
    t.regex(err!.message, /nothing was changed/);
    t.deepEqual(lo.getStatus(), before);
    t.is(sysfs(lo.minor, 'loop/offset'), '0');
    t.is(sysfs(lo.minor, 'loop/autoclear'), '0');
    t.is(sysfs(lo.minor, 'ro'), '0');
  }
  // Asking for what is already in effect is not a change.
  t.notThrows(() => lo.setStatus({ readOnly: false, partscan: true }));
});

loopTest('the legacy path (setFd + setStatus + setBlockSize) gives the same device', async (t) => {
  const img = image(t);
  using lo = await bindFresh((l) => l.setFd(img.fd));
  lo.setStatus({ offset: 4096, autoclear: true });
  lo.setBlockSize(4096);
  t.is(sysfs(lo.minor, 'loop/offset'), '4096');
  t.is(sysfs(lo.minor, 'loop/autoclear'), '1');
  t.is(sysfs(lo.minor, 'queue/logical_block_size'), '4096');
  t.true(lo.isBoundTo(img.fd));
});

loopTest('changeFd swaps a read-only device to a same-size file', async (t) => {
  const a = image(t, 4 << 20, { readOnly: true });
  const b = image(t, 4 << 20, { name: 'other.img', readOnly: true });
  using lo = await configuredLoop(a.fd, { readOnly: true });
  lo.changeFd(b.fd);
  t.true(lo.isBoundTo(b.fd));
  t.is(sysfs(lo.minor, 'loop/backing_file'), b.path);
});

loopTest('setCapacity picks up a grown backing file', async (t) => {
  const img = image(t, 4 << 20);
  using lo = await configuredLoop(img.fd);
  t.is(sysfs(lo.minor, 'size'), String((4 << 20) / 512));
  fs.ftruncateSync(img.fd, 8 << 20);
  lo.setCapacity();
  t.is(sysfs(lo.minor, 'size'), String((8 << 20) / 512));
});

loopTest('setDirectIo toggles direct I/O on a file that supports it', async (t) => {
  // tmpfs refuses O_DIRECT; use a file on the root file system.
  const dir = fs.mkdtempSync(path.join('/var/tmp', 'loopdev-test-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'dio.img');
  fs.writeFileSync(file, Buffer.alloc(1 << 20));
  const fd = fs.openSync(file, 'r+');
  t.teardown(() => fs.closeSync(fd));
  {
    using lo = await configuredLoop(fd, { blockSize: 4096 });
    try {
      lo.setDirectIo(true);
    } catch (e) {
      return unavailable(t, `direct I/O not supported here: ${(e as Error).message}`);
    }
    t.is(sysfs(lo.minor, 'loop/dio'), '1');
    t.true(lo.getStatus().directIo);
    lo.setDirectIo(false);
    t.is(sysfs(lo.minor, 'loop/dio'), '0');
  }
  t.deepEqual(await boundAfterSettling(dir), []);
});

loopTest('flock(LOCK_EX) keeps a second opener from locking the device until LOCK_UN; flushBuf works', async (t) => {
  const img = image(t);
  using lo = await configuredLoop(img.fd);
  t.notThrows(() => lo.flushBuf());
  const secondOpener = () => spawnSync('flock', ['--nonblock', '--shared', lo.path, 'true']).status;
  t.is(secondOpener(), 0, 'free before');
  lo.flock(2 /* LOCK_EX */);
  t.is(secondOpener(), 1, 'a second opener cannot take even a shared lock');
  lo.flock(8 /* LOCK_UN */);
  t.is(secondOpener(), 0, 'free again');
});

loopTest('getStatus of an unbound device is ENXIO with ioctl and path', async (t) => {
  const { LoopControl } = await import('../ts/index.js');
  using ctl = new LoopControl();
  const minor = ctl.add();
  t.teardown(() => {
    try {
      ctl.remove(minor);
    } catch {
      /* someone else bound it meanwhile */
    }
  });
  {
    using lo = new Loop(minor);
    const err = t.throws(() => lo.getStatus(), { instanceOf: LoopError });
    t.is(err?.code, 'ENXIO');
    t.is(err?.errno, -6);
    t.is(err?.syscall, 'ioctl');
    t.is(err?.ioctl, 'LOOP_GET_STATUS64');
    t.is(err?.path, `/dev/loop${minor}`);
    t.is(err?.message, `ENXIO: no such device or address, ioctl LOOP_GET_STATUS64 '/dev/loop${minor}'`);
  }
});

/** Runs `body` (module code with `fs`, `LoopControl` and `dir` in scope) in a child process that forces the
 * pre-5.8 configure path, and returns what it prints as JSON. */
function legacyChild(dir: string, body: string): unknown {
  const script = path.join(dir, 'legacy.mts');
  fs.writeFileSync(
    script,
    `import { LoopControl } from ${JSON.stringify(path.resolve('ts/index.ts'))};
import * as fs from 'node:fs';
const dir = ${JSON.stringify(dir)};
const ctl = new LoopControl();
const sys = (lo, attr) => fs.readFileSync('/sys/block/' + lo.devname + '/' + attr, 'utf8').trim();
${body}`,
  );
  const env = { ...process.env, LOOPDEV_FORCE_LEGACY_CONFIGURE: '1' };
  return JSON.parse(execFileSync(process.execPath, ['--import=tsx', script], { env, encoding: 'utf8' }));
}

loopTest('the legacy path applies every option LOOP_CONFIGURE would', (t) => {
  // On ext4 (not tmpfs) so that direct I/O can really be enabled.
  const dir = fs.mkdtempSync(path.join('/var/tmp', 'loopdev-test-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(16 << 20));
  const seen = legacyChild(
    dir,
    `const fd = fs.openSync(dir + '/disk.img', 'r');
const lo = ctl.loopForFdSync(fd, { offset: 8192, sizeLimit: 2 << 20, readOnly: true, blockSize: 4096, partscan: true,
  directIo: true, autoclear: true });
const attrs = ['loop/offset', 'loop/sizelimit', 'ro', 'queue/logical_block_size', 'loop/partscan', 'loop/dio',
  'loop/autoclear'];
console.log(JSON.stringify(Object.fromEntries(attrs.map((a) => [a, sys(lo, a)]))));
lo.close();`,
  );
  t.deepEqual(seen, {
    'loop/offset': '8192',
    'loop/sizelimit': String(2 << 20),
    ro: '1',
    'queue/logical_block_size': '4096',
    'loop/partscan': '1',
    'loop/dio': '1',
    'loop/autoclear': '1',
  });
});

loopTest('the legacy path treats direct I/O as best effort and names the step that failed', (t) => {
  const img = image(t);
  // ramfs has no O_DIRECT: LOOP_CONFIGURE binds buffered there, and so must the fallback.
  const ram = path.join(img.dir, 'ram');
  fs.mkdirSync(ram);
  execFileSync('mount', ['-t', 'ramfs', 'none', ram]);
  t.teardown(() => execFileSync('umount', ['-l', ram]));
  fs.writeFileSync(path.join(ram, 'disk.img'), Buffer.alloc(4 << 20));
  const seen = legacyChild(
    ram,
    `const fd = fs.openSync(dir + '/disk.img', 'r+');
const lo = ctl.loopForFdSync(fd, { directIo: true, autoclear: true });
const dio = sys(lo, 'loop/dio');
lo.close();
let error;
try {
  ctl.loopForFdSync(fd, { blockSize: 1000, autoclear: true });
} catch (e) {
  error = { code: e.code, syscall: e.syscall, ioctl: e.ioctl };
}
fs.closeSync(fd);
console.log(JSON.stringify({ dio, error }));`,
  );
  t.deepEqual(seen, { dio: '0', error: { code: 'EINVAL', syscall: 'ioctl', ioctl: 'LOOP_SET_BLOCK_SIZE' } });
});
