/**
 * Start-up cost of the `loopdev` CLI per call, against `node -e 0` (the floor every Node program pays) and
 * losetup, measured interleaved in the same run.
 *
 *   npx tsx bench/cli.ts [--reps 20] [--cli dist/cli.js] [--quick]
 *
 * Rows: `node -e 0`; `loopdev --help` (no addon); `loopdev list` and `loopdev -l` (sysfs, no addon);
 * `loopdev attach FILE` + `loopdev detach DEV` (addon; one row each); `losetup -l` and losetup's attach/detach.
 * Each figure is the median wall time of a spawn; ratios are against the `node -e 0` median of the same run.
 * Runs dist/cli.js (build first: that is what the installed bin runs), or `--cli` (e.g. an older build). Needs root for the attach rows.
 */
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import { QUICK, ROOT, intOption, machine, median, parseArgs, record, scratchImage, table } from './lib.js';

const { opts } = parseArgs();
const reps = intOption(opts, 'reps', QUICK ? 2 : 20);
record('cli');

const CLI = path.resolve(opts.get('cli') ?? path.join(ROOT, 'dist', 'cli.js'));
const { file } = scratchImage();

function time(cmd: string, args: string[]): { ms: number; stdout: string } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}: ${r.stderr}`);
  return { ms, stdout: r.stdout };
}

const node = process.execPath;
const samples = new Map<string, number[]>();
const add = (name: string, ms: number) => samples.set(name, [...(samples.get(name) ?? []), ms]);

for (let i = 0; i < reps; i++) {
  add('node -e 0', time(node, ['-e', '0']).ms);
  add('loopdev --help', time(node, [CLI, '--help']).ms);
  add('loopdev list', time(node, [CLI, 'list']).ms);
  if (!opts.has('cli')) add('loopdev -l', time(node, [CLI, '-l']).ms);
  const a = time(node, [CLI, 'attach', file]);
  add('loopdev attach FILE', a.ms);
  add('loopdev detach DEV', time(node, [CLI, 'detach', a.stdout.trim()]).ms);
  add('losetup -l', time('losetup', ['-l']).ms);
  const la = time('losetup', ['-f', '--show', file]);
  add('losetup -f --show FILE', la.ms);
  add('losetup -d DEV', time('losetup', ['-d', la.stdout.trim()]).ms);
}

const floor = median(samples.get('node -e 0')!);
console.log(`# ${path.relative(ROOT, CLI)}; ${machine()}; ${reps} spawns per row, interleaved; median wall time`);
table([
  ['command', 'median ms', 'x node -e 0'],
  ...[...samples].map(([name, xs]) => [name, median(xs).toFixed(1), (median(xs) / floor).toFixed(2)]),
]);
