/**
 * Shared benchmark helpers: a scratch image in a `loopdev-test-bench-*` dir (cleaned up, with any device
 * still bound to it detached — only ours), argument parsing, statistics and table output.
 * (__test__/helpers.ts cannot be imported here: it imports ava, which refuses to load outside its runner.)
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { devicesBoundUnder } from '../__test__/bound.js';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export const BENCH_DIR = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.dirname(BENCH_DIR);

export interface Scratch {
  dir: string;
  file: string;
  fd: number;
  /** Closes the fd, detaches devices still bound into `dir` (reporting them), removes `dir`. */
  cleanup(): void;
}

/** A sparse `size`-byte image opened read-write, in a fresh temp dir. Cleaned up on exit too. */
export function scratchImage(size = 8 << 20): Scratch {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'loopdev-test-bench-'));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  let done = false;
  const cleanup = (): void => {
    if (done) return;
    done = true;
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
    for (const dev of devicesBoundUnder(dir)) {
      console.error(`# leftover: ${dev} still bound to a file in ${dir}; detaching it`);
      try {
        execFileSync('losetup', ['-d', dev]);
      } catch {
        /* already gone */
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', cleanup);
  return { dir, file, fd, cleanup };
}


/** `--name value` / `--name=value` / `--flag`, plus positionals. */
export function parseArgs(argv = process.argv.slice(2)): { opts: Map<string, string>; positional: string[] } {
  const opts = new Map<string, string>();
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('--')) {
      positional.push(a);
      continue;
    }
    const eq = a.indexOf('=');
    if (eq > 0) opts.set(a.slice(2, eq), a.slice(eq + 1));
    else if (i + 1 < argv.length && !argv[i + 1]!.startsWith('--')) opts.set(a.slice(2), argv[++i]!);
    else opts.set(a.slice(2), 'true');
  }
  return { opts, positional };
}

/** A positive integer option (accepts `100_000` and `100k`). */
export function intOption(opts: Map<string, string>, name: string, fallback: number): number {
  const raw = opts.get(name);
  if (raw === undefined) return fallback;
  const m = /^(\d[\d_]*)(k?)$/i.exec(raw);
  const n = m ? Number(m[1]!.replace(/_/g, '')) * (m[2] ? 1000 : 1) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) throw new RangeError(`--${name} must be a positive integer, got ${raw}`);
  return n;
}

export function median(xs: number[]): number {
  return quantile(xs, 0.5);
}

/** Linear-interpolated quantile (q in 0..1). */
export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

/** Prints rows as an aligned plain-text table (first row = header). */
export function table(rows: string[][]): void {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  for (const [i, r] of rows.entries()) {
    console.log(r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  '));
    if (i === 0) console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  }
}

export function machine(): string {
  const cpu = os.cpus()[0]?.model ?? 'unknown CPU';
  return `${os.cpus().length}× ${cpu}${pinned()}, Linux ${os.release()}, node ${process.version}`;
}

/** Where the process may run, when that is not every CPU (`taskset -c 1 npx tsx bench/…`): a run confined to
 * one CPU hands work to libuv's pool and back without crossing CPUs, which changes every async figure. */
function pinned(): string {
  const allowed = /^Cpus_allowed_list:\s*(\S+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1];
  const all = os.cpus().length === 1 ? '0' : `0-${os.cpus().length - 1}`;
  return allowed && allowed !== all ? ` (this run on CPU ${allowed} only)` : '';
}

/** Waits `ms` milliseconds. */
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** `--quick`: one small run that only proves the benchmark still works (CI); nothing is recorded. */
export const QUICK = process.argv.includes('--quick');

/**
 * Records what the benchmark prints into `bench/results/<name>.txt`, with when, where and how loaded the
 * machine was, so the figures the README quotes come from a file a run wrote, not from a hand copy.
 * Quick runs record nothing.
 */
export function record(name: string): void {
  if (QUICK) return;
  const lines: string[] = [];
  const log = console.log.bind(console);
  console.log = (...args: unknown[]): void => {
    lines.push(args.map(String).join(' '));
    log(...args);
  };
  const load = (): string => os.loadavg().map((l) => l.toFixed(2)).join(' ');
  // BENCH_TAG=x writes results/<name>-x.txt, for a variant run (e.g. other NODE_OPTIONS) beside the main one.
  const tag = process.env.BENCH_TAG ? `-${process.env.BENCH_TAG}` : '';
  const env = ['BENCH_TAG', 'NODE_OPTIONS', 'MALLOC_ARENA_MAX'].filter((k) => process.env[k]).map((k) => `${k}='${process.env[k]}' `);
  const header = [
    `# ${env.join('')}npx tsx bench/${name}.ts ${process.argv.slice(2).join(' ')}`.trimEnd(),
    `# date: ${new Date().toISOString()}`,
    `# machine: ${machine()}`,
    `# load average (1, 5, 15 min) at start: ${load()}`,
  ];
  process.once('exit', (code) => {
    const out = path.join(BENCH_DIR, 'results', `${name}${tag}.txt`);
    fs.mkdirSync(path.dirname(out), { recursive: true });
    const footer = [`# load average at end: ${load()}`, `# exit status: ${code}`];
    fs.writeFileSync(out, [...header, '', ...lines, '', ...footer, ''].join('\n'));
    console.error(`# results written to ${path.relative(ROOT, out)}`);
  });
}
