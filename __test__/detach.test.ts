import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { attach, Loop, LoopControl, LoopError } from '../ts/index.js';
import { boundAfterSettling, configuredLoop, devicesBoundUnder, image, loopTest, openFds } from './helpers.js';

loopTest('clearFdWait returns once the device is unbound; close finishes the teardown', async (t) => {
  const img = image(t);
  const lo = await configuredLoop(img.fd);
  await lo.clearFdWait(img.fd, 2000, 5);
  t.false(lo.isBoundTo(img.fd));
  lo.close();
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('clearFdWaitSync behaves the same without a promise', async (t) => {
  const img = image(t);
  const lo = await configuredLoop(img.fd);
  lo.clearFdWaitSync(img.fd, 2000, 5);
  lo.close();
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('clearFdWait times out with ETIMEDOUT while another fd holds the device, which frees it later', async (t) => {
  const img = image(t);
  const lo = await configuredLoop(img.fd);
  const holder = fs.openSync(lo.path, 'r');
  const err = await t.throwsAsync(lo.clearFdWait(img.fd, 200, 20), { instanceOf: LoopError });
  t.is(err?.code, 'ETIMEDOUT');
  t.is(err?.errno, -110);
  t.is(err?.path, lo.path);
  t.regex(
    err!.message,
    /^ETIMEDOUT: device still bound after 200 ms \(open elsewhere\); LOOP_CLR_FD set autoclear on it: the kernel detaches it at its last close, ioctl LOOP_CLR_FD/,
  );
  t.true(lo.isBoundTo(img.fd), 'still bound while held');
  t.true(lo.getStatus().autoclear, 'autoclear, as the error says');
  lo.close();
  t.deepEqual(devicesBoundUnder(img.path).length, 1, 'the holder keeps it');
  fs.closeSync(holder);
  t.deepEqual(await boundAfterSettling(img.path), [], 'the last close detaches it (autoclear)');
});

loopTest.serial('using detaches a device this object configured', async (t) => {
  const img = image(t);
  const before = openFds();
  {
    using lo = await configuredLoop(img.fd);
    t.true(lo.isBoundTo(img.fd));
  }
  t.deepEqual(await boundAfterSettling(img.path), []);
  t.is(openFds(), before);
});

loopTest('await using waits for a verified detach', async (t) => {
  const img = image(t);
  let minor = -1;
  {
    await using lo = await configuredLoop(img.fd);
    minor = lo.minor;
  }
  t.true(minor >= 0);
  // At the moment the block is left, not after a grace period: the detach was verified before it returned.
  t.deepEqual(devicesBoundUnder(img.path), []);
});

loopTest('detach of a device held by someone else rejects with ETIMEDOUT and leaves it to autoclear', async (t) => {
  const img = image(t);
  const lo = await configuredLoop(img.fd);
  const holder = fs.openSync(lo.path, 'r');
  await t.throwsAsync(lo.clearFdWait({ timeoutMs: 100 }), { instanceOf: LoopError, code: 'ETIMEDOUT' });
  t.throws(() => lo.clearFdWaitSync({ timeoutMs: 50 }), { instanceOf: LoopError, code: 'ETIMEDOUT' });
  lo.close();
  t.is(devicesBoundUnder(img.path).length, 1);
  fs.closeSync(holder);
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('dispose of a Loop that did not bind the device leaves it bound', async (t) => {
  const img = image(t);
  using owner = await configuredLoop(img.fd);
  {
    using viewer = new Loop(owner.minor);
    t.true(viewer.isBoundTo(img.fd));
  }
  t.true(owner.isBoundTo(img.fd));
});

loopTest('onClose runs once and the fd becomes -1', async (t) => {
  const img = image(t);
  using ctl = new LoopControl();
  const lo = ctl.loopForFdSync(img.fd, { autoclear: true });
  let calls = 0;
  lo.onClose = (closed) => {
    calls++;
    t.is(closed, lo);
  };
  t.true(lo.fd >= 0);
  lo.close();
  lo.close();
  t.is(calls, 1);
  t.is(lo.fd, -1);
  const err = t.throws(() => lo.getStatus(), { instanceOf: LoopError });
  t.is(err?.code, 'ERR_LOOP_CLOSED');
});

loopTest('clearFdWait completes once another holder closes during the wait', async (t) => {
  const img = image(t);
  const lo = await configuredLoop(img.fd);
  const holder = fs.openSync(lo.path, 'r');
  setTimeout(() => fs.closeSync(holder), 100);
  await t.notThrowsAsync(lo.clearFdWait(img.fd, 5000, 10));
  t.false(lo.isBoundTo(img.fd));
  lo.close();
  t.deepEqual(await boundAfterSettling(img.path), []);
});

const FORGETFUL = `
import { LoopControl } from ${JSON.stringify(path.resolve('ts/index.ts'))};
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
process.on('warning', (w) => console.log(JSON.stringify({ code: w.code, message: w.message })));
const fd = fs.openSync(process.argv[2], 'r+');
const kept = fs.openSync(process.argv[3], 'r+');
(() => {
  const ctl = new LoopControl();
  ctl.loopForFdSync(fd, { autoclear: true }); // never closed, and neither is ctl
  ctl.loopForFdSync(kept); // nor this one, without autoclear
})();
globalThis.gc();
await new Promise((r) => setTimeout(r, 100));
globalThis.gc();
await new Promise((r) => setTimeout(r, 100));
`;

loopTest('a Loop collected without close() is closed with a warning that says what becomes of its binding', async (t) => {
  const img = image(t);
  const kept = image(t);
  const script = path.join(img.dir, 'forgetful.mts');
  fs.writeFileSync(script, FORGETFUL);
  const argv = ['--expose-gc', '--import=tsx', script, img.path, kept.path];
  const out = execFileSync(process.execPath, argv, { encoding: 'utf8' });
  const warnings = out.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as { code: string; message: string });
  const said = (re: RegExp) => warnings.some((w) => w.code === 'LOOPDEV_UNCLOSED' && re.test(w.message));
  t.true(said(/^Closing loop device \/dev\/loop\d+ on garbage collection \(autoclear: the kernel detaches it now/));
  t.true(said(new RegExp(`^Closing loop device /dev/loop\\d+ on garbage collection \\(it stays bound to ${kept.path}: no autoclear`)));
  t.true(said(/^Closing loop-control/));
  t.deepEqual(await boundAfterSettling(img.path), [], 'autoclear freed it');
  const left = devicesBoundUnder(kept.path);
  t.is(left.length, 1, 'the other one stayed bound, as the warning said');
  for (const dev of left) execFileSync('losetup', ['-d', dev]); // ours: bound to this test's file
  t.deepEqual(await boundAfterSettling(kept.path), []);
});

loopTest('clearFdWait leaves a device bound to another file alone', async (t) => {
  const mine = image(t);
  const theirs = image(t);
  using owner = await configuredLoop(theirs.fd);
  {
    using lo = new Loop(owner.minor);
    // Not bound to `mine`: nothing to clear, and above all not the owner's binding.
    await t.notThrowsAsync(lo.clearFdWait(mine.fd, 200, 10));
    t.notThrows(() => lo.clearFdWaitSync(mine.fd, 200, 10));
  }
  t.true(owner.isBoundTo(theirs.fd));
  t.false(owner.getStatus().autoclear, 'no LOOP_CLR_FD reached the device');
});

// Since Linux 6.11 the last close of a device runs its teardown, which first writes the device's dirty page
// cache to the backing file: the async detach paths must do that close off the event loop.
for (const how of ['LoopDevice.detach()', 'await using a Loop'] as const) {
  loopTest.serial(`${how} flushes a device's dirty pages without stalling the event loop`, async (t) => {
    const img = image(t, 512 << 20);
    const dev = await attach(img.path, { directIo: false });
    const lo = how === 'await using a Loop' ? new Loop(dev.minor) : null;
    // 256 MiB written through the device's page cache by another open, which is not the last close.
    const writer = fs.openSync(dev.path, 'r+');
    const block = Buffer.alloc(1 << 20, 0x5a);
    for (let i = 0; i < 256; i++) fs.writeSync(writer, block);
    fs.closeSync(writer);
    let maxGap = 0;
    let last = performance.now();
    const tick = setInterval(() => {
      const now = performance.now();
      maxGap = Math.max(maxGap, now - last);
      last = now;
    }, 1);
    const start = performance.now();
    if (lo === null) {
      await dev.detach();
    } else {
      dev.close(); // `lo` is now the device's only open, with autoclear from attach(): its close tears down
      await lo.clearFdWait({ timeoutMs: 10_000 });
      await using disposing = lo;
      void disposing;
    }
    const took = performance.now() - start;
    // One more tick, so a stall that ran to the end of the detach is measured too.
    await new Promise((resolve) => setTimeout(resolve, 5));
    clearInterval(tick);
    t.log(`${how}: ${took.toFixed(1)} ms, the event loop's longest gap ${maxGap.toFixed(1)} ms`);
    t.true(took > 15, `the flush took long enough to show anything (${took.toFixed(1)} ms)`);
    t.true(maxGap < took * 0.75, `the event loop kept running (longest gap ${maxGap.toFixed(1)} of ${took.toFixed(1)} ms)`);
    t.deepEqual(await boundAfterSettling(img.path), []);
  });
}
