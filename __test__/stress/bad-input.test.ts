/**
 * Bad-input matrix across the public API: every bad call is a typed error (class + `code`, and for kernel
 * errors a negative `errno`), async calls reject instead of throwing, and neither this process's fds nor the
 * devices bound to our files (`losetup --list`) change. Complements ../errors.test.ts (which checks a few
 * sizes, EBADF/EINVAL on loopForFd, ENOENT minors) with a broader table.
 */
import type { ExecutionContext } from 'ava';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  LOCK_EX,
  Loop,
  LoopControl,
  LoopError,
  UnexpectedDeviceError,
  attach,
  attachSync,
  detach,
  removeNode,
} from '../../ts/index.js';
import { closeQuietly, configuredLoop, image, tempDir, type Image } from '../helpers.js';
import { fdTable, losetupUnder, stressTest, until } from './fixtures.js';

type ErrorClass = typeof TypeError | typeof RangeError | typeof LoopError;

/** Lazily made fixtures; each one is released at teardown. Touch what a case needs before the snapshot. */
class Fx {
  #img?: Image;
  #ctl?: LoopControl;
  #bound?: Loop;
  #unbound?: Loop;
  #dir?: string;
  constructor(readonly t: ExecutionContext) {}

  get img(): Image {
    return (this.#img ??= image(this.t, 1 << 20));
  }
  get fd(): number {
    return this.img.fd;
  }
  get dir(): string {
    return (this.#dir ??= tempDir(this.t));
  }
  get ctl(): LoopControl {
    if (!this.#ctl) {
      const ctl = (this.#ctl = new LoopControl());
      this.t.teardown(() => ctl.close());
    }
    return this.#ctl;
  }
  /**
   * A number that is not an open fd (opened, then closed). Take it inside the bad call (net zero fds), after
   * every other fixture: a later open would reuse the number.
   */
  get closedFd(): number {
    const fd = fs.openSync(this.img.path, 'r');
    fs.closeSync(fd);
    return fd;
  }
  /** An fd the test closes at teardown. */
  open(p: string, flags: number | string = 'r'): number {
    const fd = fs.openSync(p, flags);
    this.t.teardown(() => closeQuietly(fd));
    return fd;
  }
  dirFd(p = this.dir): number {
    return this.open(p, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  }
  /** A FIFO opened read-write (so the open does not block). */
  fifoFd(): number {
    const fifo = path.join(this.dir, 'fifo');
    if (!fs.existsSync(fifo)) execFileSync('mkfifo', [fifo]);
    return this.open(fifo, fs.constants.O_RDWR);
  }
  /** A device bound by this test to `img` (detached at teardown). */
  async bound(): Promise<Loop> {
    if (!this.#bound) {
      const lo = (this.#bound = await configuredLoop(this.fd));
      this.t.teardown(async () => {
        if (!lo.closed) await lo[Symbol.asyncDispose]();
      });
    }
    return this.#bound;
  }
  /** An open, unbound device that only this test uses: a fresh minor from LOOP_CTL_ADD, removed at teardown. */
  get unbound(): Loop {
    if (!this.#unbound) {
      const ctl = this.ctl;
      const minor = ctl.add(-1);
      const lo = (this.#unbound = new Loop(minor));
      this.t.teardown(() => {
        try {
          // A case that bound it by mistake (a bug the matrix found) must not leak it.
          if (!lo.closed && this.#img && lo.isBoundTo(this.#img.fd)) lo.clearFdWaitSync({ timeoutMs: 2000 });
        } catch {
          /* reported by tempDir's leak check */
        }
        lo.close();
        try {
          ctl.remove(minor);
        } catch {
          /* someone opened it meanwhile; it is unbound, leave it */
        }
      });
    }
    return this.#unbound;
  }
  /** A closed Loop (opened on the unbound device, then closed). */
  get closedLoop(): Loop {
    const lo = new Loop(this.unbound.minor);
    lo.close();
    return lo;
  }
  get closedCtl(): LoopControl {
    const ctl = new LoopControl();
    ctl.close();
    return ctl;
  }
  /** A directory with fake "loopN" nodes: loop0 regular file, loop1 char device 1:3, loop2 block 7:<not 2>. */
  fakeDevDir(): number {
    const dir = fs.mkdtempSync(path.join(this.dir, 'dev-'));
    fs.writeFileSync(path.join(dir, 'loop0'), '');
    fs.writeFileSync(path.join(dir, 'loop-control'), '');
    mknod(path.join(dir, 'loop1'), 'c', 1, 3);
    mknod(path.join(dir, 'loop2'), 'b', 7, 3);
    return this.dirFd(dir);
  }
}

/** node:fs has no mknod; coreutils does. */
function mknod(p: string, kind: 'b' | 'c', major: number, minor: number): void {
  execFileSync('mknod', [p, kind, String(major), String(minor)]);
}

interface Case {
  name: string;
  /** Builds fixtures (before the snapshot) and returns the bad call. */
  call: (fx: Fx) => (() => unknown) | Promise<() => unknown>;
  type: ErrorClass;
  code: string;
  /** The call is an async API: it must return a rejected promise, not throw synchronously. */
  async?: boolean;
  /** A library bug this case shows today: runs as `test.failing` (flip it once fixed). */
  bug?: string;
}

const TYPE = { type: TypeError, code: 'ERR_INVALID_ARG_TYPE' };
const RANGE = { type: RangeError, code: 'ERR_OUT_OF_RANGE' };
const CLOSED = { type: LoopError, code: 'ERR_LOOP_CLOSED' };
const kernel = (code: string) => ({ type: LoopError, code });
const unexpected = { type: UnexpectedDeviceError, code: 'ERR_LOOP_UNEXPECTED_DEVICE' };

const CASES: Case[] = [
  // ---- types ----
  { name: 'loopForFdSync: fd as a string', call: (fx) => () => fx.ctl.loopForFdSync('3' as never), ...TYPE },
  { name: 'loopForFdSync: fd null', call: (fx) => () => fx.ctl.loopForFdSync(null as never), ...TYPE },
  { name: 'loopForFdSync: autoclear "yes"', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { autoclear: 'yes' as never }), ...TYPE },
  { name: 'loopForFdSync: blockSize "512"', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { blockSize: '512' as never }), ...TYPE },
  { name: 'loopForFdSync: sizeLimit {}', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { sizeLimit: {} as never }), ...TYPE },
  { name: 'loopForFdSync: setup 42', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { setup: 42 as never }), ...TYPE },
  { name: 'loopForFd: readOnly 1', call: (fx) => () => fx.ctl.loopForFd(fx.fd, { readOnly: 1 as never }), ...TYPE, async: true },
  { name: 'new Loop: minor "0"', call: () => () => new Loop('0' as never), ...TYPE },
  { name: 'new LoopControl: dirFd "x"', call: () => () => new LoopControl({ dirFd: 'x' as never }), ...TYPE },
  { name: 'Loop.flock("x")', call: (fx) => { const lo = fx.unbound; return () => lo.flock('x' as never); }, ...TYPE },
  { name: 'Loop.setStatus({ partscan: 1 })', call: async (fx) => { const lo = await fx.bound(); return () => lo.setStatus({ partscan: 1 as never }); }, ...TYPE },
  { name: 'Loop.configureSync(fd, "x")', call: (fx) => { const lo = fx.unbound; return () => lo.configureSync(fx.fd, 'x' as never); }, ...TYPE },
  { name: 'attach(123n)', call: () => () => attach(123n as never), ...TYPE, async: true },
  { name: 'attachSync({})', call: () => () => attachSync({} as never), ...TYPE },

  // ---- ranges ----
  { name: 'loopForFdSync: sizeLimit -1', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { sizeLimit: -1 }), ...RANGE },
  { name: 'loopForFdSync: sizeLimit 2^64 (bigint)', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { sizeLimit: 2n ** 64n }), ...RANGE },
  { name: 'loopForFdSync: blockSize 2^32', call: (fx) => () => fx.ctl.loopForFdSync(fx.fd, { blockSize: 2 ** 32 }), ...RANGE },
  { name: 'loopForFdSync: fd 2^31', call: (fx) => () => fx.ctl.loopForFdSync(2 ** 31), ...RANGE },
  { name: 'loopForFdSync: fd 1.5', call: (fx) => () => fx.ctl.loopForFdSync(1.5), ...RANGE },
  { name: 'loopForFdSync: fd NaN', call: (fx) => () => fx.ctl.loopForFdSync(NaN), ...RANGE },
  { name: 'loopForFd: fd -1', call: (fx) => () => fx.ctl.loopForFd(-1), ...RANGE, async: true },
  { name: 'new Loop: minor 2^20', call: () => () => new Loop(2 ** 20), ...RANGE },
  { name: 'new Loop: minor NaN', call: () => () => new Loop(NaN), ...RANGE },
  { name: 'LoopControl.add(-2)', call: (fx) => () => fx.ctl.add(-2), ...RANGE },
  { name: 'LoopControl.remove(2^31)', call: (fx) => () => fx.ctl.remove(2 ** 31), ...RANGE },
  { name: 'Loop.flock(16)', call: (fx) => { const lo = fx.unbound; return () => lo.flock(16); }, ...RANGE },
  { name: 'Loop.clearFdWaitSync(fd, -1)', call: async (fx) => { const lo = await fx.bound(); return () => lo.clearFdWaitSync(fx.fd, -1); }, ...RANGE },
  { name: 'Loop.clearFdWaitSync({ timeoutMs: -5 })', call: async (fx) => { const lo = await fx.bound(); return () => lo.clearFdWaitSync({ timeoutMs: -5 }); }, ...RANGE },
  { name: 'Loop.mknod(dirFd, 0o10000)', call: (fx) => { const d = fx.dirFd(); const lo = fx.unbound; return () => lo.mknod(d, 0o10000); }, ...RANGE },
  { name: 'Loop.setBlockSize(-512)', call: async (fx) => { const lo = await fx.bound(); return () => lo.setBlockSize(-512); }, ...RANGE },
  { name: 'attach(file, { offset: -1 })', call: (fx) => () => attach(fx.img.path, { offset: -1 }), ...RANGE, async: true },

  // ---- closed / invalid fds ----
  { name: 'Loop.configureSync(closed fd)', call: (fx) => { const lo = fx.unbound; return () => lo.configureSync(fx.closedFd); }, ...kernel('EBADF') },
  { name: 'loopForFd(closed fd)', call: (fx) => () => fx.ctl.loopForFd(fx.closedFd), ...kernel('EBADF'), async: true },
  { name: 'loopForFdSync(fd never opened)', call: (fx) => () => fx.ctl.loopForFdSync(99_999), ...kernel('EBADF') },
  { name: 'Loop.isBoundTo(closed fd)', call: async (fx) => { const lo = await fx.bound(); return () => lo.isBoundTo(fx.closedFd); }, ...kernel('EBADF') },
  { name: 'Loop.changeFd(closed fd)', call: async (fx) => { const lo = await fx.bound(); return () => lo.changeFd(fx.closedFd); }, ...kernel('EBADF') },
  { name: 'Loop.clearFdWaitSync(closed fd) leaves the device bound', call: async (fx) => { const lo = await fx.bound(); return () => lo.clearFdWaitSync(fx.closedFd, 100); }, ...kernel('EBADF') },
  { name: 'new LoopControl({ dirFd: closed fd })', call: (fx) => () => new LoopControl({ dirFd: fx.closedFd }), ...kernel('EBADF') },
  { name: 'new Loop(0, { dirFd: closed fd })', call: (fx) => () => new Loop(0, { dirFd: fx.closedFd }), ...kernel('EBADF') },
  { name: 'attach(closed fd)', call: (fx) => () => attach(fx.closedFd), ...kernel('EBADF'), async: true },
  { name: 'removeNode(closed fd, "loop0")', call: (fx) => () => removeNode(fx.closedFd, 'loop0'), ...kernel('EBADF') },

  // ---- wrong kinds of files ----
  { name: 'Loop.configureSync(directory fd)', call: (fx) => { const d = fx.dirFd(); const lo = fx.unbound; return () => lo.configureSync(d); }, ...kernel('EINVAL') },
  { name: 'loopForFdSync(FIFO fd)', call: (fx) => { const fd = fx.fifoFd(); return () => fx.ctl.loopForFdSync(fd); }, ...kernel('EINVAL') },
  { name: 'loopForFdSync(/dev/null fd)', call: (fx) => { const fd = fx.open('/dev/null'); return () => fx.ctl.loopForFdSync(fd); }, ...kernel('EINVAL') },
  { name: 'new Loop: "loop0" is a regular file', call: (fx) => { const d = fx.fakeDevDir(); return () => new Loop(0, { dirFd: d }); }, ...unexpected },
  { name: 'new Loop: "loop1" is char device 1:3', call: (fx) => { const d = fx.fakeDevDir(); return () => new Loop(1, { dirFd: d }); }, ...unexpected },
  { name: 'new Loop: "loop2" is block device 7:3', call: (fx) => { const d = fx.fakeDevDir(); return () => new Loop(2, { dirFd: d }); }, ...unexpected },
  { name: 'LoopControl on a regular file: getUnbound()', call: (fx) => { const d = fx.fakeDevDir(); const ctl = new LoopControl({ dirFd: d }); fx.t.teardown(() => ctl.close()); return () => ctl.getUnbound(); }, ...kernel('ENOTTY') },
  { name: 'attach(directory)', call: (fx) => () => attach(fx.dir), ...kernel('EISDIR'), async: true },
  { name: 'attachSync("/dev/null")', call: () => () => attachSync('/dev/null'), ...kernel('EINVAL') },
  { name: 'attach(empty file)', call: (fx) => { const p = path.join(fx.dir, 'empty.img'); fs.writeFileSync(p, ''); return () => attach(p); }, ...kernel('EINVAL'), async: true },
  { name: 'attach(file, { offset: beyond the end })', call: (fx) => () => attach(fx.img.path, { offset: 2 << 20 }), ...kernel('EINVAL'), async: true },

  // ---- missing files and devices ----
  { name: 'new LoopControl({ dirFd: empty dir })', call: (fx) => { const d = fx.dirFd(); return () => new LoopControl({ dirFd: d }); }, ...kernel('ENOENT') },
  { name: 'new Loop(5, { dirFd: empty dir })', call: (fx) => { const d = fx.dirFd(); return () => new Loop(5, { dirFd: d }); }, ...kernel('ENOENT') },
  { name: 'attach(missing file)', call: (fx) => () => attach(path.join(fx.dir, 'missing.img')), ...kernel('ENOENT'), async: true },
  { name: 'detach("/dev/loop999999")', call: () => () => detach('/dev/loop999999'), ...kernel('ENOENT'), async: true },
  { name: 'removeNode(dirFd, missing name)', call: (fx) => { const d = fx.dirFd(); return () => removeNode(d, 'loop12345'); }, ...kernel('ENOENT') },

  // ---- bad minors ----
  { name: 'LoopControl.remove(999999)', call: (fx) => () => fx.ctl.remove(999_999), ...kernel('ENODEV') },
  { name: 'LoopControl.add(minor in use)', call: async (fx) => { const lo = await fx.bound(); return () => fx.ctl.add(lo.minor); }, ...kernel('EEXIST') },
  { name: 'LoopControl.remove(bound minor)', call: async (fx) => { const lo = await fx.bound(); return () => fx.ctl.remove(lo.minor); }, ...kernel('EBUSY') },

  // ---- use after close ----
  { name: 'closed Loop: getStatus()', call: (fx) => { const lo = fx.closedLoop; return () => lo.getStatus(); }, ...CLOSED },
  { name: 'closed Loop: configureSync(fd)', call: (fx) => { const lo = fx.closedLoop; return () => lo.configureSync(fx.fd); }, ...CLOSED },
  { name: 'closed Loop: isBoundTo(fd)', call: (fx) => { const lo = fx.closedLoop; return () => lo.isBoundTo(fx.fd); }, ...CLOSED },
  { name: 'closed Loop: flock(LOCK_EX)', call: (fx) => { const lo = fx.closedLoop; return () => lo.flock(LOCK_EX); }, ...CLOSED },
  { name: 'closed Loop: clearFdWait()', call: (fx) => { const lo = fx.closedLoop; return () => lo.clearFdWait(); }, ...CLOSED, async: true },
  { name: 'closed Loop: configure(fd)', call: (fx) => { const lo = fx.closedLoop; return () => lo.configure(fx.fd); }, ...CLOSED, async: true },
  { name: 'closed LoopControl: getUnbound()', call: (fx) => { const ctl = fx.closedCtl; return () => ctl.getUnbound(); }, ...CLOSED },
  { name: 'closed LoopControl: loopForFdSync(fd)', call: (fx) => { const ctl = fx.closedCtl; return () => ctl.loopForFdSync(fx.fd); }, ...CLOSED },
  { name: 'closed LoopControl: loopForFd(fd)', call: (fx) => { const ctl = fx.closedCtl; return () => ctl.loopForFd(fx.fd); }, ...CLOSED, async: true },

  // ---- wrong state ----
  { name: 'unbound device: getStatus()', call: (fx) => { const lo = fx.unbound; return () => lo.getStatus(); }, ...kernel('ENXIO') },
  { name: 'unbound device: clearFd()', call: (fx) => { const lo = fx.unbound; return () => lo.clearFd(); }, ...kernel('ENXIO') },
  { name: 'bound device: configure(fd) again', call: async (fx) => { const lo = await fx.bound(); return () => lo.configureSync(fx.fd); }, ...kernel('EBUSY') },
  { name: 'bound device: setStatus({ readOnly: true })', call: async (fx) => { const lo = await fx.bound(); return () => lo.setStatus({ readOnly: true }); }, ...kernel('EINVAL') },
  { name: 'bound read-write device: changeFd(fd)', call: async (fx) => { const lo = await fx.bound(); return () => lo.changeFd(fx.fd); }, ...kernel('EINVAL') },
  { name: 'bound device: setBlockSize(1000)', call: async (fx) => { const lo = await fx.bound(); return () => lo.setBlockSize(1000); }, ...kernel('EINVAL') },
];

/** Runs `fn`, returning what it threw or rejected with; `sync` says whether it threw synchronously. */
async function outcome(fn: () => unknown): Promise<{ error: unknown; sync: boolean; value?: unknown }> {
  let r: unknown;
  try {
    r = fn();
  } catch (error) {
    return { error, sync: true };
  }
  try {
    return { error: undefined, sync: false, value: await r };
  } catch (error) {
    return { error, sync: false };
  }
}

for (const c of CASES) {
  const register = c.bug ? stressTest.serial.failing : stressTest.serial;
  register(`${c.bug ? `known bug (${c.bug}) — ` : ''}bad input → ${c.code}: ${c.name}`, async (t) => {
    const fx = new Fx(t);
    void fx.ctl, fx.img; // the common fixtures exist before the snapshot
    const bad = await c.call(fx);
    const dir = fx.dir;
    const fdsBefore = fdTable();
    const boundBefore = losetupUnder(dir);
    const r = await outcome(bad);
    if (r.error === undefined) {
      // Whatever it returned must not stay alive.
      const v = r.value as { [Symbol.asyncDispose]?: () => Promise<void> } | undefined;
      await v?.[Symbol.asyncDispose]?.();
      t.fail(`no error (returned ${String(r.value)})`);
      return;
    }
    const err = r.error as Error & { code?: unknown; errno?: unknown };
    t.true(err instanceof c.type, `${err?.constructor?.name}: ${err?.message} is not a ${c.type.name}`);
    t.is(err.code, c.code, err.message);
    t.true(typeof err.message === 'string' && err.message.length > 0);
    if (c.type === LoopError && !c.code.startsWith('ERR_')) {
      t.true(typeof err.errno === 'number' && err.errno < 0, `errno ${String(err.errno)}`);
    }
    if (c.async) t.false(r.sync, 'an async API threw synchronously instead of rejecting');
    t.deepEqual(fdTable(), fdsBefore, 'open fds changed');
    t.deepEqual(await until(() => { const now = losetupUnder(dir); return now.join() === boundBefore.join() ? now : null; }, 2000) ?? losetupUnder(dir), boundBefore, 'losetup --list changed');
  });
}

stressTest.serial(`the matrix has at least 30 bad inputs (${CASES.length})`, (t) => {
  t.true(CASES.length >= 30);
  t.is(new Set(CASES.map((c) => c.name)).size, CASES.length, 'case names are unique');
});

/** Repeats that must be harmless: no error, fds back to where they were, nothing of ours left bound. */
const REPEATS: Array<{ name: string; run: (fd: number) => Promise<void> }> = [
  { name: 'Loop: dispose twice', run: async (fd) => { const lo = await configuredLoop(fd); lo[Symbol.dispose](); lo[Symbol.dispose](); } },
  { name: 'Loop: asyncDispose twice', run: async (fd) => { const lo = await configuredLoop(fd); await lo[Symbol.asyncDispose](); await lo[Symbol.asyncDispose](); } },
  { name: 'Loop: close, then dispose and asyncDispose', run: async (fd) => { const lo = await configuredLoop(fd, { autoclear: true }); lo.close(); lo[Symbol.dispose](); await lo[Symbol.asyncDispose](); } },
  { name: 'Loop: dispose, then asyncDispose', run: async (fd) => { const lo = await configuredLoop(fd); lo[Symbol.dispose](); await lo[Symbol.asyncDispose](); } },
  { name: 'LoopControl: close and dispose twice', run: async () => { const ctl = new LoopControl(); ctl.close(); ctl[Symbol.dispose](); ctl.close(); } },
  { name: 'LoopDevice: detach twice, then dispose', run: async (fd) => { const dev = await attach(fd); await dev.detach(); await dev.detach(); dev.detachSync(); await dev[Symbol.asyncDispose](); } },
  { name: 'LoopDevice: asyncDispose twice', run: async (fd) => { const dev = await attach(fd); await dev[Symbol.asyncDispose](); await dev[Symbol.asyncDispose](); } },
];

for (const r of REPEATS) {
  stressTest.serial(`harmless repeat: ${r.name}`, async (t) => {
    const img = image(t, 1 << 20);
    const fdsBefore = fdTable();
    await t.notThrowsAsync(() => r.run(img.fd));
    t.deepEqual(fdTable(), fdsBefore, 'open fds changed');
    t.deepEqual(await until(() => losetupUnder(img.dir).length === 0, 2000), true, `still bound: ${losetupUnder(img.dir)}`);
  });
}
