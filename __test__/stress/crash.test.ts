/**
 * Crash safety: processes SIGKILLed at random points while attaching/detaching leave nothing bound when they
 * bind with autoclear (the kernel detaches at the last close, which process exit performs), and the next
 * attach works. Without autoclear a killed process's device stays bound: shown, then cleaned up.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { Loop, LoopControl, attach } from '../../ts/index.js';
import { boundAfterSettling, devicesBoundUnder, sysfs, tempDir } from '../helpers.js';
import { finished, lineMatching, makeImage, scaled, spawnChild, stressTest } from './fixtures.js';

const KILLS = scaled(60, 50);
const PARALLEL = 2;
/** The kill lands this long (random, ms) after the child reports that its attach/detach loop started. */
const MAX_DELAY_MS = 40;

stressTest.serial(`${KILLS} processes SIGKILLed at random points during attach (autoclear) leave nothing bound`, async (t) => {
  const dir = tempDir(t);
  const files = Array.from({ length: PARALLEL }, (_, i) => makeImage(dir, `crash${i}.img`, 1 << 20));
  const signals: string[] = [];
  let whileBound = 0; // kills that hit while the child's device was bound (sysfs, just before the kill)
  let next = 0;
  await Promise.all(
    files.map(async (file) => {
      while (next < KILLS) {
        next++;
        const child = spawnChild('crasher.ts', [file, 'autoclear']);
        const done = finished(child);
        await lineMatching(child, /ready/);
        await new Promise((r) => setTimeout(r, Math.random() * MAX_DELAY_MS));
        if (devicesBoundUnder(file).length > 0) whileBound++;
        child.kill('SIGKILL');
        const r = await done;
        signals.push(r.signal ?? `exit ${r.code}: ${r.stderr}`);
      }
    }),
  );
  t.is(signals.filter((s) => s === 'SIGKILL').length, signals.length, `every child died by SIGKILL: ${signals}`);
  t.true(signals.length >= 50);
  t.true(whileBound > 0, 'some kills landed while a device was bound');
  t.deepEqual(await boundAfterSettling(dir, 5000), [], 'devices still bound to the killed processes\' files');

  // A new attach on the same files still works, both through loopForFd and attach().
  using ctl = new LoopControl();
  for (const file of files) {
    const fd = fs.openSync(file, 'r+');
    t.teardown(() => fs.closeSync(fd));
    {
      using lo = ctl.loopForFdSync(fd, { autoclear: true });
      t.true(lo.isBoundTo(fd));
      t.deepEqual(devicesBoundUnder(file), [lo.path]);
    }
    const dev = await attach(file);
    t.true(dev.isBoundTo(fd));
    await dev.detach();
  }
  t.deepEqual(await boundAfterSettling(dir), []);
  t.log(`${signals.length} children SIGKILLed within ${MAX_DELAY_MS} ms of starting their attach/detach loop`);
  t.log(`${whileBound} of them with their device bound at the moment of the kill`);
});

stressTest.serial('without autoclear, a SIGKILLed process leaks its bound device (kernel behaviour); cleaned up here', async (t) => {
  const dir = tempDir(t);
  const file = makeImage(dir, 'leak.img', 1 << 20);
  const child = spawnChild('crasher.ts', [file, 'hold']);
  const done = finished(child);
  const [, minor] = await lineMatching(child, /bound (\d+)/);
  child.kill('SIGKILL');
  t.is((await done).signal, 'SIGKILL');

  // Nobody holds the device any more, yet it stays bound: no autoclear, nobody cleared it.
  await new Promise((r) => setTimeout(r, 300));
  t.deepEqual(devicesBoundUnder(file), [`/dev/loop${minor}`], 'the device stays bound after its owner died');

  // Cleanup, as a user would: open that device and do a verified detach (only ever our own file's device).
  {
    using lo = new Loop(Number(minor));
    t.is(sysfs(lo.minor, 'loop/backing_file'), file, 'still our file');
    lo.clearFdWaitSync({ timeoutMs: 5000 });
  }
  t.deepEqual(await boundAfterSettling(dir), [], 'cleaned up');
});

for (const end of ['SIGINT', 'SIGTERM', 'SIGKILL', 'throw'] as const) {
  stressTest(`a process holding devices from the default attach() leaves none bound when it ends by ${end}`, async (t) => {
    const dir = tempDir(t);
    const files = [0, 1, 2].map((i) => makeImage(dir, `held${i}.img`, 1 << 20));
    const child = spawnChild('holder.ts', [...files, end === 'throw' ? 'throw' : 'wait']);
    const done = finished(child);
    const [ready] = await lineMatching(child, /^ready .*/);
    t.is(devicesBoundUnder(dir).length, 3, `bound while the child lives: ${ready}`);
    child.kill(end === 'throw' ? 'SIGUSR2' : end);
    const r = await done;
    if (end === 'throw') t.is(r.code, 1, r.stderr);
    else t.is(r.signal, end);
    // Judged by sysfs and by losetup: no disposer ran (signals and crashes skip them); autoclear did the work.
    t.deepEqual(await boundAfterSettling(dir, 5000), []);
    t.notRegex(execFileSync('losetup', ['--list', '--noheadings', '--output', 'BACK-FILE'], { encoding: 'utf8' }), new RegExp(dir));
  });
}
