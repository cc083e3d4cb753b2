/**
 * Kernel races: other processes detach, bind, remove or hold our devices while we use them. Every call gives
 * a result or a clean LoopError (code + negative errno), never a crash or a hang, and nothing stays bound.
 * Other processes only ever touch devices bound to (or created for) this test's own files.
 */
import type { ExecutionContext } from 'ava';
import { execFile, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import { Loop, LoopControl, LoopError } from '../../ts/index.js';
import { boundAfterSettling, devicesBoundUnder, image, sysfs } from '../helpers.js';
import { holdOpen, makeImage, scaled, stressTest } from './fixtures.js';

const run = promisify(execFile);
const RACES = scaled(40, 10);

/** The error `fn` threw/rejected with (undefined if none), asserting it is a clean LoopError. */
async function clean(t: ExecutionContext, what: string, fn: () => unknown): Promise<string> {
  try {
    await fn();
    return 'ok';
  } catch (e) {
    t.true(e instanceof LoopError, `${what}: ${String(e)} is not a LoopError`);
    const err = e as LoopError;
    t.is(typeof err.code, 'string', `${what}: code`);
    if (!err.code.startsWith('ERR_')) t.true(typeof err.errno === 'number' && err.errno < 0, `${what}: errno`);
    return err.code;
  }
}

/** LOOP_CTL_REMOVE from another process; resolves with its exit status (non-zero: the kernel refused). */
async function removeElsewhere(minor: number): Promise<string> {
  const py =
    'import fcntl, os, sys\n' +
    'fd = os.open("/dev/loop-control", os.O_RDWR)\n' +
    'try:\n    fcntl.ioctl(fd, 0x4C81, int(sys.argv[1]))\nexcept OSError as e:\n' +
    '    print(os.strerror(e.errno)); sys.exit(1)';
  try {
    await run('python3', ['-c', py, String(minor)]);
    return 'removed';
  } catch (e) {
    return `refused: ${String((e as { stdout?: string }).stdout).trim()}`;
  }
}

stressTest.serial('losetup -d on our open device (another process): the kernel defers it, our calls stay clean', async (t) => {
  const img = image(t, 1 << 20);
  using ctl = new LoopControl();
  const lo = ctl.loopForFdSync(img.fd);
  execFileSync('losetup', ['-d', lo.path]); // someone else detaches OUR device while we hold it open
  // Linux ≥ 5.x: it only sets autoclear (we are still an opener); either way every call is clean.
  const status = await clean(t, 'getStatus', () => lo.getStatus());
  if (status === 'ok') t.true(lo.getStatus().autoclear, 'the kernel marked it autoclear');
  else t.is(status, 'ENXIO');
  t.is(typeof lo.isBoundTo(img.fd), 'boolean');
  t.is(await clean(t, 'clearFdWaitSync', () => lo.clearFdWaitSync({ timeoutMs: 2000 })), 'ok');
  t.is(await clean(t, 'getStatus after detach', () => lo.getStatus()), 'ENXIO');
  t.false(lo.isBoundTo(img.fd));
  lo[Symbol.dispose]();
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

stressTest.serial(`losetup -d racing in-flight async calls on our device (${RACES} races)`, async (t) => {
  const img = image(t, 1 << 20);
  using ctl = new LoopControl();
  const seen = new Map<string, number>();
  const note = (k: string): void => void seen.set(k, (seen.get(k) ?? 0) + 1);
  for (let i = 0; i < RACES; i++) {
    const lo = await ctl.loopForFd(img.fd);
    // Another process detaches it while we query it, try to re-bind it and detach it ourselves, each of
    // our calls starting at a random moment around the (few ms long) `losetup -d` run.
    const other = run('losetup', ['-d', lo.path]).then(
      () => 'losetup -d: ok',
      () => 'losetup -d: refused',
    );
    const later = <T>(fn: () => Promise<T>): Promise<T> =>
      new Promise((r) => setTimeout(r, Math.random() * 8)).then(fn);
    const ours = await Promise.all([
      later(() => clean(t, 'getStatus', () => lo.getStatus())),
      later(() => clean(t, 'isBoundTo', () => lo.isBoundTo(img.fd))),
      later(() => clean(t, 'configure', () => lo.configure(img.fd))),
      later(() => clean(t, 'clearFdWait', () => lo.clearFdWait({ timeoutMs: 1000 }))),
    ]);
    note(await other);
    ours.forEach((code, k) => note(`${['getStatus', 'isBoundTo', 'configure', 'clearFdWait'][k]}: ${code}`));
    await lo[Symbol.asyncDispose]().catch((e: unknown) => note(`asyncDispose: ${(e as LoopError).code}`));
    lo.close();
  }
  t.deepEqual(await boundAfterSettling(img.dir, 5000), []);
  t.log([...seen].map(([k, n]) => `${k} ×${n}`).join(', '));
});

stressTest.serial('a Loop we did not bind never clears the binding another process made on that minor', async (t) => {
  const img = image(t, 1 << 20);
  const theirs = makeImage(img.dir, 'theirs.img', 1 << 20);
  using ctl = new LoopControl();
  const minor = ctl.add(-1); // a fresh device nobody else is handed by LOOP_CTL_GET_FREE before lower ones
  t.teardown(() => {
    try {
      ctl.remove(minor);
    } catch {
      /* in use by someone else by now: unbound, leave it */
    }
  });
  const dev = `/dev/loop${minor}`;
  for (const dispose of ['sync', 'async'] as const) {
    const lo = new Loop(minor);
    execFileSync('losetup', [dev, theirs]); // another process binds its file to "our" open, unbound device
    t.false(lo.isBoundTo(img.fd));
    t.regex(lo.getStatus().fileName, /theirs\.img$/);
    if (dispose === 'sync') lo[Symbol.dispose]();
    else await lo[Symbol.asyncDispose]();
    t.deepEqual(devicesBoundUnder(theirs), [dev], `${dispose} dispose left their binding alone`);
    execFileSync('losetup', ['-d', dev]); // their cleanup (a device bound to this test's own file)
    t.deepEqual(await boundAfterSettling(theirs), []);
  }
});

stressTest.serial('a device removed by another process: opening it is a clean ENOENT; an open one cannot be removed', async (t) => {
  const img = image(t, 1 << 20);
  using ctl = new LoopControl();

  const gone = ctl.add(-1);
  const removed = await removeElsewhere(gone);
  if (removed === 'removed') {
    const err = t.throws(() => new Loop(gone), { instanceOf: LoopError });
    t.true(['ENOENT', 'ENXIO'].includes(err!.code), err!.message);
    t.is(err!.path, `/dev/loop${gone}`);
  } else {
    t.log(`loop${gone} was taken by someone else before it could be removed (${removed}); skipped that half`);
  }

  const held = ctl.add(-1);
  t.teardown(() => {
    try {
      ctl.remove(held);
    } catch {
      /* in use */
    }
  });
  {
    using lo = new Loop(held);
    t.regex(await removeElsewhere(held), /^refused/, 'the kernel refuses to remove an open device');
    lo.configureSync(img.fd); // still a working device
    t.true(lo.isBoundTo(img.fd));
  }
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

for (const api of ['clearFdWait', 'clearFdWaitSync', 'clearFdWait({ timeoutMs })'] as const) {
  stressTest.serial(`${api} while another process holds the device open: ETIMEDOUT, then cleaned up`, async (t) => {
    const img = image(t, 1 << 20);
    using ctl = new LoopControl();
    const lo = ctl.loopForFdSync(img.fd);
    const holder = holdOpen(lo.path);
    t.teardown(() => holder.release());
    await holder.ready;

    const start = Date.now();
    const code = await clean(t, api, () =>
      api === 'clearFdWait'
        ? lo.clearFdWait(img.fd, 300, 20)
        : api === 'clearFdWaitSync'
          ? lo.clearFdWaitSync(img.fd, 300, 20)
          : lo.clearFdWait({ timeoutMs: 300 }),
    );
    t.is(code, 'ETIMEDOUT');
    t.true(Date.now() - start >= 290, `gave up after ${Date.now() - start} ms, not the 300 ms asked`);
    // Still bound (the holder keeps it), now marked autoclear by our LOOP_CLR_FD.
    t.deepEqual(devicesBoundUnder(img.dir), [lo.path]);
    t.is(sysfs(lo.minor, 'loop/autoclear'), '1');

    await holder.release();
    lo.close(); // the last close: the kernel completes the detach
    t.deepEqual(await boundAfterSettling(img.dir), [], 'nothing left once the holder and we closed');
  });
}

stressTest.serial('a verified detach completes once another process that had the device open at LOOP_CLR_FD closes it', async (t) => {
  // Regression (fixed in ab1c984): the kernel only marks the device autoclear while someone else holds it,
  // and completes at the last close — ours. detach() must re-issue LOOP_CLR_FD once the other opener is
  // gone instead of waiting out its whole timeout. Repro: /tmp/research/repro/detach-after-transient-opener.mts
  const img = image(t, 1 << 20);
  using ctl = new LoopControl();
  const lo = ctl.loopForFdSync(img.fd);
  t.teardown(() => lo.close());
  const holder = holdOpen(lo.path);
  await holder.ready;
  setTimeout(() => void holder.release(), 200);
  const start = Date.now();
  await lo.clearFdWait({ timeoutMs: 3000 });
  const took = Date.now() - start;
  t.true(took >= 150 && took < 2000, `detach took ${took} ms (holder left after 200 ms)`);
  lo.close();
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

stressTest.serial('a Loop keeps working (and disposes cleanly) after its device file is unlinked', async (t) => {
  // Another process can remove /dev/loopN (the node, not the device); our open fd is unaffected.
  const img = image(t, 1 << 20);
  using ctl = new LoopControl();
  const minor = ctl.add(-1);
  const node = `/dev/loop${minor}`;
  t.teardown(() => {
    try {
      ctl.remove(minor); // the device goes; so does any need for its node
    } catch {
      // Someone else uses it now: give the node back so they can open it by name.
      if (!fs.existsSync(node)) execFileSync('mknod', [node, 'b', '7', String(minor)]);
    }
  });
  {
    using lo = new Loop(minor);
    fs.unlinkSync(node);
    lo.configureSync(img.fd);
    t.true(lo.isBoundTo(img.fd));
    t.is(lo.getStatus().number, minor);
  }
  t.deepEqual(await boundAfterSettling(img.dir), []);
  t.throws(() => new Loop(minor), { instanceOf: LoopError, code: 'ENOENT' });
});
