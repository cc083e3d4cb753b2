/**
 * Shared test fixtures. Every image lives in a fresh `loopdev-test-*` temp dir; teardown detaches only
 * devices bound to files in that dir (never anyone else's) and reports them as leaks.
 */
import test, { type ExecutionContext, type TestFn } from 'ava';
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { devicesBoundUnder } from './bound.js';

export { devicesBoundUnder };

export const TEST_PREFIX = 'loopdev-test-';

function loopControlProblem(): string | null {
  try {
    fs.closeSync(fs.openSync('/dev/loop-control', fs.constants.O_RDWR));
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

/** Why privileged tests cannot run here, or null when /dev/loop-control is usable. */
export const loopUnusable = loopControlProblem();

/**
 * Whether loop tests are skipped: only off CI. Under CI=true a machine without usable loop devices must not
 * look green, so the tests run (and fail with the real error).
 */
export const loopSkipped = loopUnusable !== null && process.env.CI !== 'true';

if (loopSkipped) console.warn(`# skipping loop device tests: /dev/loop-control unusable (${loopUnusable})`);

/** `test` when real loop devices can be used (or under CI), else every test (serial ones too) is skipped. */
export const loopTest: TestFn = loopSkipped
  ? (Object.assign((title: string, impl: never) => test.skip(title, impl), {
      serial: Object.assign((title: string, impl: never) => test.serial.skip(title, impl), { skip: test.serial.skip }),
      skip: test.skip,
    }) as unknown as TestFn)
  : test;

/** Mount points (decoded) in this mount namespace at or under `dir`. */
export function mountsUnder(dir: string): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .trim()
    .split('\n')
    .map((l) => l.split(' ')[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))))
    .filter((m) => m === dir || m.startsWith(dir + '/'));
}

/**
 * A fresh temp dir (under `parent`, default the OS temp dir) removed at teardown. A device still bound to a
 * file in it, or a mount still in it, once the test's own teardowns ran fails the test, naming what was left;
 * it is undone first (only ours: everything is under this dir), so the next test starts clean.
 */
export function tempDir(t: ExecutionContext, parent = os.tmpdir()): string {
  const dir = fs.mkdtempSync(path.join(parent, TEST_PREFIX));
  t.teardown(async () => {
    // Autoclear and the kernel's deferred LOOP_CLR_FD finish at the last close: give them a moment.
    const devices = await boundAfterSettling(dir);
    const mounts = mountsUnder(dir);
    for (const m of [...mounts].reverse()) execFileSync('umount', ['-l', m]);
    for (const dev of devices) spawnSync('losetup', ['-d', dev]);
    fs.rmSync(dir, { recursive: true, force: true });
    const left = [...devices.map((d) => `device ${d}`), ...mounts.map((m) => `mount ${m}`)];
    if (left.length) throw new Error(`LEAK: the test left ${left.join(', ')} (now undone)`);
  });
  return dir;
}

export interface Image {
  path: string;
  fd: number;
  dir: string;
}

/** A sparse image file of `size` bytes, opened read-write (or read-only); the fd is closed at teardown. */
export function image(t: ExecutionContext, size = 8 << 20, options: { name?: string; readOnly?: boolean } = {}): Image {
  const dir = tempDir(t);
  const file = path.join(dir, options.name ?? 'disk.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, options.readOnly ? 'r' : 'r+');
  t.teardown(() => closeQuietly(fd));
  return { path: file, fd, dir };
}

export function closeQuietly(fd: number): void {
  try {
    fs.closeSync(fd);
  } catch {
    /* already closed */
  }
}

/** `/sys/block/loopN/<attr>`, trimmed; null when absent (e.g. `loop/*` on an unbound device). */
export function sysfs(minor: number, attr: string): string | null {
  try {
    return fs.readFileSync(`/sys/block/loop${minor}/${attr}`, 'utf8').trim();
  } catch {
    return null;
  }
}

/** Whether the kernel reports loopN as bound (its sysfs `loop/` directory exists). */
export function isBound(minor: number): boolean {
  return sysfs(minor, 'loop/backing_file') !== null;
}

/** Open fds of this process, for leak checks. */
export function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/**
 * Binds a fresh device with `bind` the way a careful caller does without loopForFd: another process may
 * take the free device first (EBUSY), so retry on a new one. Tests of Loop itself use this.
 */
export async function bindFresh(
  bind: (lo: import('../ts/index.js').Loop) => void | Promise<void>,
): Promise<import('../ts/index.js').Loop> {
  const { Loop, LoopControl } = await import('../ts/index.js');
  using ctl = new LoopControl();
  for (let attempt = 0; ; attempt++) {
    let lo: import('../ts/index.js').Loop | undefined;
    try {
      lo = new Loop(ctl.getUnbound());
      await bind(lo);
      return lo;
    } catch (e) {
      lo?.close();
      // EBUSY: someone bound it first. ENXIO: someone bound and already cleared it (it is going away).
      const code = (e as { code?: string }).code;
      if ((code !== 'EBUSY' && code !== 'ENXIO') || attempt >= 64) throw e;
      await new Promise((r) => setTimeout(r, Math.random() * Math.min(attempt + 1, 10)));
    }
  }
}

/** `new Loop(getUnbound()).configureSync(fd, options)`, retried on EBUSY. */
export function configuredLoop(
  fd: number,
  options: import('../ts/index.js').ConfigureOptions = {},
): Promise<import('../ts/index.js').Loop> {
  return bindFresh((lo) => lo.configureSync(fd, options));
}

/** Polls `ok` every 5 ms until it holds; throws after `timeoutMs`, naming what it waited for. */
export async function until(what: string, ok: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/**
 * `devicesBoundUnder(file)` once it is empty, or after `timeoutMs`. The kernel finishes a detach at the
 * last close of the device, and another process probing free devices may hold ours open for a moment.
 */
export async function boundAfterSettling(file: string, timeoutMs = 2000): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const bound = devicesBoundUnder(file);
    if (bound.length === 0 || Date.now() > deadline) return bound;
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * For a test that cannot run without a tool or kernel feature: fails under CI=true, where the set-up installs
 * every tool the suite uses and nothing may pass without checking. Elsewhere it is a skip: ava cannot skip a
 * running test, so it is recorded in LOOPDEV_SKIP_LOG (scripts/test.sh counts those lines as skipped and
 * takes them out of the passes) and the test ends with the reason logged.
 */
export function unavailable(t: ExecutionContext, why: string): void {
  if (process.env.CI === 'true') {
    t.fail(`${why} (CI=true: nothing may pass unchecked)`);
    return;
  }
  const skipLog = process.env.LOOPDEV_SKIP_LOG;
  if (skipLog) fs.appendFileSync(skipLog, `${t.title}: ${why}\n`);
  t.log(`SKIPPED: ${why}`);
  t.pass(why);
}

/** major:minor of a block node, decoded from the full 64-bit dev_t (glibc's encoding), not from its low bits. */
export function nodeDev(p: string): { major: number; minor: number; block: boolean } {
  const st = fs.statSync(p, { bigint: true });
  const major = ((st.rdev >> 8n) & 0xfffn) | ((st.rdev >> 32n) & 0xfffff000n);
  const minor = (st.rdev & 0xffn) | ((st.rdev >> 12n) & 0xffffff00n);
  return { major: Number(major), minor: Number(minor), block: st.isBlockDevice() };
}

export type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** JSON lines of a child's stdout, one at a time. */
export function jsonLines(child: { stdout: NodeJS.ReadableStream | null }): () => Promise<Json> {
  const it = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  return async () => {
    const { value, done } = await it.next();
    if (done) throw new Error('child closed its stdout');
    return JSON.parse(value as string) as Json;
  };
}
