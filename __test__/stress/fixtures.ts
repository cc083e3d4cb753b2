/**
 * Fixtures shared by the stress specs (the general ones live in ../helpers.ts).
 *
 * Size: `STRESS_SCALE` (default 1 = the reduced run CI does, a few minutes on 2 cores; 5–10 for a soak).
 * The specs only run when `LOOPDEV_STRESS=1` (set by ava.stress.config.mjs, i.e. `npm run test:stress`), so
 * that the regular suite never pays for them even if its glob still matches this directory.
 */
import test, { type TestFn } from 'ava';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loopSkipped } from '../helpers.js';

export const STRESS_DIR = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(STRESS_DIR, '../..');

const enabled = process.env.LOOPDEV_STRESS === '1';

/**
 * Registers every test as skipped, whatever the chain (`.serial`, `.serial.failing`, …): `test.skip` itself
 * has no `.serial`, so casting it to TestFn (as ../helpers.ts does for loopTest) breaks `x.serial(...)`.
 */
const skipAll: TestFn = new Proxy(function () {} as unknown as TestFn, {
  apply: (_target, _this, args: unknown[]) => (test.skip as unknown as (...a: unknown[]) => void)(...args),
  get: () => skipAll,
});

if (!enabled) console.warn('# stress specs skipped: run them with `npm run test:stress` (sets LOOPDEV_STRESS=1)');

/** `test` under `npm run test:stress` with usable loop devices (or under CI); else every test is skipped. */
export const stressTest: TestFn = enabled && !loopSkipped ? test : skipAll;

export const SCALE = (() => {
  const raw = process.env.STRESS_SCALE;
  const n = raw === undefined ? 1 : Number(raw);
  if (!Number.isFinite(n) || n <= 0) throw new RangeError(`STRESS_SCALE must be a positive number, got ${raw}`);
  return n;
})();

/** `base × STRESS_SCALE`, rounded, never below `min`. */
export function scaled(base: number, min = 1): number {
  return Math.max(min, Math.round(base * SCALE));
}

/** A sparse image of `size` bytes at `dir/name`. */
export function makeImage(dir: string, name: string, size = 4 << 20): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

export interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Spawns `node --import tsx <STRESS_DIR>/children/<script> ...args` (cwd = repo root). */
export function spawnChild(script: string, args: string[]): ChildProcess {
  return spawn(process.execPath, ['--import', 'tsx', path.join(STRESS_DIR, 'children', script), ...args], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
}

/** Collects a child's output until it exits. */
export function finished(child: ChildProcess): Promise<ChildResult> {
  let stdout = '';
  let stderr = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

/** Resolves with the first stdout line matching `re` (rejects if the child exits first). */
export function lineMatching(child: ChildProcess, re: RegExp): Promise<RegExpExecArray> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const onData = (d: Buffer | string): void => {
      buf += d.toString();
      const m = re.exec(buf);
      if (m) {
        child.stdout?.off('data', onData);
        child.off('exit', onExit);
        resolve(m);
      }
    };
    const onExit = (code: number | null, signal: string | null): void =>
      reject(new Error(`child exited (${code ?? signal}) before printing ${re}; output: ${buf}`));
    child.stdout?.on('data', onData);
    child.once('exit', onExit);
  });
}

/**
 * Another process holding `dev` open (read-only) until `release()`: a shell with the device on fd 3 that
 * exits when its stdin closes. `ready` resolves once the device is open.
 */
export function holdOpen(dev: string): { ready: Promise<void>; release: () => Promise<void>; pid: number } {
  const child = spawn('sh', ['-c', 'exec 3<"$0" && echo held && read _', dev], { stdio: ['pipe', 'pipe', 'pipe'] });
  const exited = finished(child);
  const ready = lineMatching(child, /held/).then(() => undefined);
  return {
    ready,
    pid: child.pid!,
    release: async () => {
      child.stdin!.end();
      await exited;
    },
  };
}

/** `losetup --list` rows (NAME BACK-FILE) whose backing file lies under `dir`, sorted: our devices only. */
export function losetupUnder(dir: string): string[] {
  const out = execFileSync('losetup', ['--list', '--noheadings', '--raw', '--output', 'NAME,BACK-FILE'], {
    encoding: 'utf8',
  });
  return out
    .split('\n')
    .filter((l) => {
      const file = l.slice(l.indexOf(' ') + 1).replace(/ \(deleted\)$/, '');
      return file === dir || file.startsWith(dir + '/');
    })
    .sort();
}

/** This process's open fds as "fd -> target" (the fd used to read the directory is left out). */
export function fdTable(): string[] {
  const rows: string[] = [];
  for (const fd of fs.readdirSync('/proc/self/fd')) {
    try {
      rows.push(`${fd} -> ${fs.readlinkSync(`/proc/self/fd/${fd}`)}`);
    } catch {
      /* the directory fd readdirSync used, already closed */
    }
  }
  return rows.sort();
}

/** Polls `cond` every 10 ms until it holds or `timeoutMs` passes; returns its last value. */
export async function until<T>(cond: () => T, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = cond();
    if (v || Date.now() > deadline) return v;
    await new Promise((r) => setTimeout(r, 10));
  }
}
