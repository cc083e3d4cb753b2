import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import {
  attach,
  attachSync,
  LOCK_EX,
  LOCK_NB,
  Loop,
  LoopControl,
  LoopDevice,
  LoopError,
  type AttachOptions,
} from '../ts/index.js';
import {
  attached,
  hasODirect,
  isReadOnlyFd,
  losetupAttach,
  losetupList,
  partitionImage,
  ramfs,
  readOnlyBind,
  sparseFile,
  tool,
} from './fixtures.js';
import { devicesBoundUnder, isBound, loopTest, openFds, sysfs, tempDir, unavailable } from './helpers.js';

const MiB = 1 << 20;

loopTest.serial('attach uses direct I/O by default and detach() is verified', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 8 * MiB);
  const fds = openFds();
  const dev = await attached(t, file);
  t.true(dev instanceof LoopDevice);
  t.true(dev.loop instanceof Loop);
  t.is(dev.backingFile, file);
  t.true(dev.ownsBackingFd);
  t.true(dev.directIo);
  t.true(hasODirect(dev.backingFd), 'backing fd opened O_DIRECT');
  t.is(sysfs(dev.minor, 'loop/dio'), '1');
  t.is(sysfs(dev.minor, 'loop/backing_file'), file);
  t.is(losetupList().get(dev.path)?.dio, true);
  t.false(dev.readOnly);
  t.is(sysfs(dev.minor, 'ro'), '0');
  t.false(isReadOnlyFd(dev.backingFd));
  t.is(dev.size, BigInt(8 * MiB));
  t.is(sysfs(dev.minor, 'size'), String((8 * MiB) / 512));
  t.true(dev.autoclear, 'autoclear by default: the device never outlives this process');
  t.is(sysfs(dev.minor, 'loop/autoclear'), '1');

  await dev.detach();
  t.true(dev.released);
  t.false(isBound(dev.minor) && sysfs(dev.minor, 'loop/backing_file') === file);
  t.deepEqual(devicesBoundUnder(dir), []);
  t.is(dev.fd, -1);
  t.is(dev.backingFd, -1);
  t.is(openFds(), fds, 'device and backing fds closed');
  await dev.detach(); // idempotent
});

loopTest('directIo: false binds buffered through a plain fd', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { directIo: false });
  t.false(dev.directIo);
  t.false(hasODirect(dev.backingFd));
  t.is(sysfs(dev.minor, 'loop/dio'), '0');
  await dev.detach();
});

loopTest('a file on tmpfs: the result reports what the kernel did (6.x tmpfs supports O_DIRECT)', async (t) => {
  const file = sparseFile(tempDir(t, '/dev/shm'), 4 * MiB);
  const dev = await attached(t, file);
  t.log(`tmpfs: directIo=${dev.directIo}`);
  t.is(dev.directIo, sysfs(dev.minor, 'loop/dio') === '1');
  t.is(hasODirect(dev.backingFd), dev.directIo);
  await dev.detach();
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('a file system without O_DIRECT (ramfs) falls back silently to buffered I/O', async (t) => {
  const mnt = ramfs(t, tempDir(t));
  const file = path.join(mnt, 'disk.img');
  const data = Buffer.alloc(MiB, 0x5a);
  fs.writeFileSync(file, data);
  const dev = await attached(t, file);
  t.false(dev.directIo);
  t.false(hasODirect(dev.backingFd));
  t.is(sysfs(dev.minor, 'loop/dio'), '0');
  const fd = fs.openSync(dev.path, 'r');
  const buf = Buffer.alloc(4096);
  fs.readSync(fd, buf, 0, buf.length, 0);
  fs.closeSync(fd);
  t.true(buf.equals(data.subarray(0, 4096)), 'readable through the device');
  await dev.detach();
  t.deepEqual(devicesBoundUnder(mnt), []);
});

loopTest('an offset that is not sector-aligned gets buffered I/O', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  fs.writeFileSync(file, 'abcdef', { flag: 'r+' });
  const dev = await attached(t, file, { offset: 3, readOnly: true });
  t.false(dev.directIo);
  t.false(hasODirect(dev.backingFd));
  t.is(dev.offset, 3n);
  const fd = fs.openSync(dev.path, 'r');
  const buf = Buffer.alloc(512);
  fs.readSync(fd, buf, 0, 512, 0);
  fs.closeSync(fd);
  t.is(buf.subarray(0, 3).toString(), 'def');
  await dev.detach();
});

loopTest('direct I/O refused after binding (sector size below the backing device\'s) rebinds buffered', async (t) => {
  const file = sparseFile(tempDir(t), 8 * MiB);
  const lower = await attached(t, file, { blockSize: 4096 });
  t.is(lower.blockSize, 4096);
  const upper = await attach(lower.path, { blockSize: 512 });
  try {
    t.is(upper.blockSize, 512);
    t.false(upper.directIo, 'the kernel cannot do 512-byte direct I/O on a 4096-byte device');
    t.false(hasODirect(upper.backingFd), 'and the fd was reopened without O_DIRECT');
    t.is(sysfs(upper.minor, 'loop/dio'), '0');
    t.is(upper.size, BigInt(8 * MiB));
  } finally {
    await upper.detach();
  }
  t.false(isBound(upper.minor) && sysfs(upper.minor, 'loop/backing_file') === lower.path);
  await lower.detach();
});

loopTest('readOnly opens the backing file O_RDONLY and binds read-only', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { readOnly: true });
  t.true(dev.readOnly);
  t.true(isReadOnlyFd(dev.backingFd), 'never opened for writing');
  t.is(sysfs(dev.minor, 'ro'), '1');
  t.is(losetupList().get(dev.path)?.ro, true);
  const write = () => {
    const fd = fs.openSync(dev.path, 'r+');
    try {
      fs.writeSync(fd, Buffer.alloc(512, 1), 0, 512, 0);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  };
  const err = t.throws(write);
  t.regex(String((err as NodeJS.ErrnoException | undefined)?.code), /^(EPERM|EACCES|EROFS)$/);
  await dev.detach();
});

loopTest('a 0444 file attaches read-only unless readOnly: false is explicit', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  fs.chmodSync(file, 0o444);
  const dev = await attached(t, file);
  t.true(dev.readOnly);
  t.true(isReadOnlyFd(dev.backingFd));
  t.is(sysfs(dev.minor, 'ro'), '1');
  await dev.detach();
  const rw = await attached(t, file, { readOnly: false });
  t.false(rw.readOnly, 'root asked for read-write explicitly');
  await rw.detach();
});

loopTest('a file on a read-only mount attaches read-only', async (t) => {
  const dir = tempDir(t);
  const src = fs.mkdtempSync(path.join(dir, 'src-'));
  sparseFile(src, 4 * MiB);
  const ro = readOnlyBind(t, dir, src);
  const dev = await attached(t, path.join(ro, 'disk.img'));
  t.true(dev.readOnly);
  t.true(isReadOnlyFd(dev.backingFd));
  t.is(sysfs(dev.minor, 'ro'), '1');
  await dev.detach();
  t.deepEqual(devicesBoundUnder(ro), []);
});

loopTest('offset, sizeLimit, blockSize and partscan are applied and read back', async (t) => {
  const file = sparseFile(tempDir(t), 16 * MiB);
  const dev = await attached(t, file, { offset: MiB, sizeLimit: 4 * MiB, blockSize: 4096, partscan: true });
  t.is(dev.offset, BigInt(MiB));
  t.is(dev.sizeLimit, BigInt(4 * MiB));
  t.is(dev.size, BigInt(4 * MiB));
  t.is(dev.blockSize, 4096);
  t.true(dev.partscan);
  t.is(sysfs(dev.minor, 'loop/offset'), String(MiB));
  t.is(sysfs(dev.minor, 'loop/sizelimit'), String(4 * MiB));
  t.is(sysfs(dev.minor, 'queue/logical_block_size'), '4096');
  t.is(sysfs(dev.minor, 'loop/partscan'), '1');
  t.is(sysfs(dev.minor, 'size'), String((4 * MiB) / 512));
  const status = dev.getStatus();
  t.is(status.offset, BigInt(MiB));
  t.true(status.partscan);
  await dev.detach();
});

loopTest('blockSize and sectorSize are aliases; a size limit beyond the end maps the rest of the file', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { blockSize: 1024, sizeLimit: 64 * MiB, offset: MiB });
  t.is(dev.blockSize, 1024);
  t.is(dev.size, BigInt(3 * MiB));
  await dev.detach();
  await t.throwsAsync(attach(file, { blockSize: 512, sectorSize: 4096 }), { code: 'ERR_INVALID_ARG_VALUE' });
});

loopTest('given an fd, attach uses it as is and the caller keeps it', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const fd = fs.openSync(file, 'r');
  t.teardown(() => fs.closeSync(fd));
  const dev = await attached(t, fd);
  t.false(dev.ownsBackingFd);
  t.is(dev.backingFd, fd);
  t.is(dev.backingFile, file);
  t.true(dev.readOnly, 'an O_RDONLY fd binds read-only');
  t.is(sysfs(dev.minor, 'ro'), '1');
  t.true(dev.isBoundTo(fd));
  await dev.detach();
  t.is(dev.backingFd, fd, 'not closed');
  t.notThrows(() => fs.fstatSync(fd));
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('readOnly: false with an O_RDONLY fd is an EBADF error, not a silently read-only device', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const fd = fs.openSync(file, 'r');
  t.teardown(() => fs.closeSync(fd));
  for (const run of [() => attach(fd, { readOnly: false }), async () => attachSync(fd, { readOnly: false })]) {
    const err = await t.throwsAsync(run(), { instanceOf: LoopError, code: 'EBADF' });
    t.like(err, { syscall: 'attach', path: file });
    t.regex(err!.message, /O_RDONLY/);
  }
  t.deepEqual(devicesBoundUnder(file), [], 'nothing was bound');
});

loopTest.serial('attachSync and `using` give the same verified cleanup', (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const fds = openFds();
  let minor = -1;
  {
    using dev = attachSync(file, { partscan: true });
    minor = dev.minor;
    t.is(sysfs(minor, 'loop/backing_file'), file);
    t.true(dev.directIo);
  }
  t.deepEqual(devicesBoundUnder(file), []);
  t.is(openFds(), fds);
  t.true(minor >= 0);
});

loopTest.serial('`await using` detaches on every exit path, also when the body throws', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const fds = openFds();
  await t.throwsAsync(async () => {
    await using dev = await attach(file);
    t.is(sysfs(dev.minor, 'loop/backing_file'), file);
    throw new Error('boom');
  }, { message: 'boom' });
  t.deepEqual(devicesBoundUnder(file), []);
  t.is(openFds(), fds);
});

loopTest('lock: true holds flock(LOCK_EX) on the device while it is open', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { lock: true });
  const other = new Loop(dev.minor);
  try {
    const err = t.throws(() => other.flock(LOCK_EX | LOCK_NB), { instanceOf: LoopError });
    t.regex(err!.code, /^(EWOULDBLOCK|EAGAIN)$/);
  } finally {
    other.close();
  }
  await dev.detach();
});

loopTest('autoclear: closing the device is enough for the kernel to detach it', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { autoclear: true });
  t.true(dev.autoclear);
  t.is(sysfs(dev.minor, 'loop/autoclear'), '1');
  dev.close();
  t.is(dev.backingFd, -1);
  const deadline = Date.now() + 2000;
  while (!dev.released && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  t.true(dev.released);
  await dev.detach(); // nothing left to do
});

loopTest('close() releases the binding by default (autoclear), and at once', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file);
  dev.close();
  t.true(dev.released, 'unbound when close() returns: the last close was ours');
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('close() with autoclear: false keeps the binding; detach() later still releases it', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { autoclear: false });
  t.is(sysfs(dev.minor, 'loop/autoclear'), '0');
  dev.close();
  t.is(sysfs(dev.minor, 'loop/backing_file'), file);
  t.false(dev.released);
  await dev.detach();
  t.true(dev.released);
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('detach: ETIMEDOUT while someone else holds the device; the kernel finishes at their close', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file);
  const holder = fs.openSync(dev.path, 'r');
  let closed = false;
  t.teardown(() => {
    if (!closed) fs.closeSync(holder);
  });
  const err = await t.throwsAsync(dev.detach(200), { instanceOf: LoopError });
  t.is(err?.code, 'ETIMEDOUT');
  t.is(err?.errno, -110);
  t.is(err?.path, dev.path);
  t.is(sysfs(dev.minor, 'loop/autoclear'), '1', 'the clear was recorded as autoclear');
  fs.closeSync(holder);
  closed = true;
  await dev.detach(2000);
  t.true(dev.released);
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('LoopDevice.open takes charge of a device bound elsewhere (losetup) and detaches it', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const devPath = losetupAttach(file);
  const dev = LoopDevice.open(devPath);
  t.is(dev.path, devPath);
  t.is(dev.backingFile, file);
  t.false(dev.ownsBackingFd);
  await dev.detach();
  t.deepEqual(devicesBoundUnder(file), []);
  // Unbound now (ENXIO), unless another process took the freed device meanwhile: then it is their file.
  try {
    const other = LoopDevice.open(devPath);
    t.not(other.backingFile, file, 'our binding is gone');
    other.close();
  } catch (e) {
    t.true(e instanceof LoopError);
    t.is((e as LoopError).code, 'ENXIO');
  }
});

loopTest('partitioned image: partition nodes are found and vanish with the device', async (t) => {
  const sfdisk = tool('sfdisk');
  if (!sfdisk) return unavailable(t, 'sfdisk not installed');
  const file = sparseFile(tempDir(t), 8 * MiB);
  partitionImage(file);
  // The library registers them itself where the kernel parses no tables (no partx here).
  const dev = await attached(t, file, { partscan: true });
  const parts = await dev.waitForPartitions(5000);
  t.deepEqual(
    parts.map((p) => p.node),
    [`${dev.path}p1`, `${dev.path}p2`],
  );
  t.deepEqual(dev.partitions(), parts);
  for (const p of parts) t.true(fs.statSync(p.node).isBlockDevice());
  t.is(sysfs(dev.minor, `${dev.devname}p1/size`), '2048');
  await dev.detach();
  t.false(fs.existsSync(`/sys/block/${dev.devname}/${dev.devname}p1`));
});

loopTest('waitForPartitions returns [] at once when no partition can appear (no table, or no partscan)', async (t) => {
  // The kernel scans inside the configure, so there is nothing to wait for: a 60 s timeout would fail the
  // test by ava's 10 s one if it were waited out.
  t.timeout(10_000);
  const file = sparseFile(tempDir(t), 4 * MiB);
  const dev = await attached(t, file, { partscan: true });
  t.deepEqual(await dev.waitForPartitions(60_000), []);
  t.deepEqual(dev.partitions(), []);
  await dev.detach();
  const plain = await attached(t, file);
  t.deepEqual(await plain.waitForPartitions(60_000), []);
  await plain.detach();
});

/** Asserts a typed LoopError, and that nothing is bound under `dir` and no fd leaked, for both twins. */
async function rejects(
  t: import('ava').ExecutionContext,
  dir: string,
  file: string | number,
  o: AttachOptions,
  expected: { code: string; syscall: string; path?: string; message?: RegExp },
): Promise<void> {
  const fds = openFds();
  for (const run of [() => attach(file, o), async () => attachSync(file, o)]) {
    const err = await t.throwsAsync(run(), { instanceOf: LoopError });
    t.is(err?.code, expected.code);
    t.true(typeof err?.errno === 'number' && err.errno < 0, `errno ${err?.errno}`);
    t.is(err?.syscall, expected.syscall);
    if (expected.path !== undefined) t.is(err?.path, expected.path);
    if (expected.message) t.regex(err!.message, expected.message);
    t.notRegex(err!.message, /\n/);
  }
  t.deepEqual(devicesBoundUnder(dir), []);
  t.is(openFds(), fds, 'no fd leaked');
}

loopTest.serial('errors are typed LoopErrors and leave nothing bound', async (t) => {
  const dir = tempDir(t);
  const missing = path.join(dir, 'missing.img');
  await rejects(t, dir, missing, {}, { code: 'ENOENT', syscall: 'stat', path: missing });

  await rejects(t, dir, dir, {}, { code: 'EISDIR', syscall: 'open', path: dir });
  await rejects(t, dir, dir, { readOnly: true }, { code: 'EISDIR', syscall: 'open', path: dir });

  const sock = path.join(dir, 'sock');
  const server = net.createServer().listen(sock);
  await new Promise((r) => server.once('listening', r));
  try {
    await rejects(t, dir, sock, {}, { code: 'ENXIO', syscall: 'open', path: sock });
  } finally {
    server.close();
  }

  const fifo = path.join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  await rejects(t, dir, fifo, { readOnly: true }, { code: 'EINVAL', syscall: 'open', path: fifo, message: /FIFO/ });

  const empty = sparseFile(dir, 0, 'empty.img');
  await rejects(t, dir, empty, {}, { code: 'EINVAL', syscall: 'fstat', path: empty, message: /empty/ });

  const small = sparseFile(dir, 4 * MiB, 'small.img');
  const beyond = { code: 'EINVAL', syscall: 'fstat', path: small, message: /beyond the end/ };
  await rejects(t, dir, small, { offset: 4 * MiB }, beyond);
  await rejects(t, dir, small, { offset: 8 * MiB }, beyond);
  await rejects(t, dir, small, { offset: 4 * MiB - 100 }, { code: 'EINVAL', syscall: 'fstat', message: /sector/ });

  const fd = fs.openSync(small, 'r');
  fs.closeSync(fd);
  await rejects(t, dir, fd, {}, { code: 'EBADF', syscall: 'fstat' });
});

loopTest.serial('invalid options throw before anything is opened', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const fds = openFds();
  await t.throwsAsync(attach(file, { offset: -1 }), { instanceOf: RangeError, code: 'ERR_OUT_OF_RANGE' });
  await t.throwsAsync(attach(file, { sizeLimit: 1.5 }), { instanceOf: RangeError, code: 'ERR_OUT_OF_RANGE' });
  await t.throwsAsync(attach(file, { offset: 1n << 64n }), { instanceOf: RangeError, code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => attachSync(-1), { instanceOf: RangeError, code: 'ERR_OUT_OF_RANGE' });
  t.deepEqual(devicesBoundUnder(dir), []);
  t.is(openFds(), fds);
});

loopTest('a bad option gets the same error from attach, Loop.configure and LoopControl.loopForFd', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const fd = fs.openSync(file, 'r+');
  t.teardown(() => fs.closeSync(fd));
  using ctl = new LoopControl();
  using lo = new Loop(ctl.getUnbound());
  const bads: AttachOptions[] = [
    { offset: -1 },
    { sizeLimit: 1.5 },
    { offset: 1n << 64n },
    { blockSize: 2 ** 32 },
    { autoclear: 'yes' as never },
    { directIo: 1 as never },
  ];
  for (const bad of bads) {
    const errors = [
      await t.throwsAsync(attach(file, bad)),
      t.throws(() => attachSync(file, bad)),
      await t.throwsAsync(lo.configure(fd, bad)),
      t.throws(() => lo.configureSync(fd, bad)),
      await t.throwsAsync(ctl.loopForFd(fd, bad)),
      t.throws(() => ctl.loopForFdSync(fd, bad)),
    ];
    const seen = errors.map((e) => ({ class: e?.constructor.name, code: (e as { code?: string }).code, message: e?.message }));
    t.regex(seen[0]!.code ?? '', /^ERR_(OUT_OF_RANGE|INVALID_ARG_TYPE)$/);
    t.deepEqual(seen, Array(seen.length).fill(seen[0]), String(Object.keys(bad)));
  }
  t.deepEqual(devicesBoundUnder(dir), []);
});
