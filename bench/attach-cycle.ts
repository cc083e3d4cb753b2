/**
 * attach + verified detach cycle time of the high-level API against the `losetup` CLI, in the same run.
 *
 *   npx tsx bench/attach-cycle.ts [--cycles 300] [--losetup-cycles 60] [--cli-cycles 10] [--rounds 5]
 *
 * One cycle:
 *   attach()      `const d = await attach(file); await d.detach()` (open file O_DIRECT, loopForFd, read back
 *                 and verify, clear, close, wait for sysfs to show the release)
 *   attachSync()  the same with attachSync/detachSync
 *   losetup       `losetup --find --show --direct-io=on FILE`, then `losetup -d DEV` (two processes)
 *   loopdev CLI   `node dist/cli.js attach FILE`, then `node dist/cli.js detach DEV` (only when dist/ is built)
 * The variants run interleaved in a rotating order for `--rounds` rounds; each ratio is the median over the
 * rounds of (losetup per-cycle time / variant per-cycle time in the same round). Needs root.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { attach, attachSync, type LoopDevice } from '../ts/index.js';
import { QUICK, ROOT, intOption, machine, median, parseArgs, record, scratchImage } from './lib.js';

const { opts } = parseArgs();
const cycles = intOption(opts, 'cycles', QUICK ? 5 : 300);
const losetupCycles = intOption(opts, 'losetup-cycles', QUICK ? 2 : 60);
const cliCycles = intOption(opts, 'cli-cycles', QUICK ? 1 : 10);
const rounds = intOption(opts, 'rounds', QUICK ? 1 : 5);
const CLI = path.join(ROOT, 'dist', 'cli.js');
record('attach-cycle');

// Its cleanup detaches whatever losetup or the CLI left bound to it (never anyone else's).
const { file } = scratchImage();
const live: LoopDevice[] = [];
process.once('exit', () => {
  for (const d of live) d.detachSync(5000);
});
for (const s of ['SIGINT', 'SIGTERM'] as const) process.once(s, () => process.exit(130));

function run(cmd: string, args: string[]): string {
  for (let attempt = 0; ; attempt++) {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    if (r.status === 0) return r.stdout.trim();
    // losetup's free-device pick races with other processes attaching; retry like a script would.
    if (attempt >= 20) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr.trim()}`);
  }
}

interface Variant {
  name: string;
  cycles: number;
  cycle(): Promise<void> | void;
}

const variants: Variant[] = [
  {
    name: 'losetup (baseline)',
    cycles: losetupCycles,
    cycle() {
      const dev = run('losetup', ['--find', '--show', '--direct-io=on', file]);
      run('losetup', ['-d', dev]);
    },
  },
  {
    name: 'attach() + detach()',
    cycles,
    async cycle() {
      const d = await attach(file);
      live.push(d);
      await d.detach();
      live.pop();
    },
  },
  {
    name: 'attachSync() + detachSync()',
    cycles,
    cycle() {
      const d = attachSync(file);
      live.push(d);
      d.detachSync();
      live.pop();
    },
  },
];
if (fs.existsSync(CLI)) {
  variants.push({
    name: 'loopdev CLI (node startup)',
    cycles: cliCycles,
    cycle() {
      const dev = run(process.execPath, [CLI, 'attach', file]);
      run(process.execPath, [CLI, 'detach', dev]);
    },
  });
}

async function measure(v: Variant): Promise<number> {
  await v.cycle(); // warm-up
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < v.cycles; i++) await v.cycle();
  return Number(process.hrtime.bigint() - t0) / 1e6 / v.cycles; // ms per cycle
}

const times = variants.map(() => [] as number[]);
const ratios = variants.map(() => [] as number[]);
for (let round = 0; round < rounds; round++) {
  const order = variants.map((_, i) => (i + round) % variants.length);
  const perCycle: number[] = [];
  for (const i of order) perCycle[i] = await measure(variants[i]!);
  variants.forEach((_, i) => {
    times[i]!.push(perCycle[i]!);
    ratios[i]!.push(perCycle[0]! / perCycle[i]!);
  });
}

console.log(
  `attach + verified detach cycle, ${rounds} rounds (medians) — ${machine()}`,
);
const header = ['variant'.padEnd(30), 'cycles'.padStart(8), 'ms/cycle'.padStart(10), 'losetup/variant'.padStart(17)];
console.log(header.join(''));
variants.forEach((v, i) => {
  console.log(
    `${v.name.padEnd(30)}${String(v.cycles).padStart(8)}${median(times[i]!).toFixed(3).padStart(10)}` +
      `${(median(ratios[i]!).toFixed(2) + 'x').padStart(17)}`,
  );
});
