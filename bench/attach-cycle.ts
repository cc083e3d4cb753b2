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
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { attach, attachSync, detachSync, type LoopDevice } from '../ts/index.js';

const { values } = parseArgs({
  options: {
    cycles: { type: 'string', default: '300' },
    'losetup-cycles': { type: 'string', default: '60' },
    'cli-cycles': { type: 'string', default: '10' },
    rounds: { type: 'string', default: '5' },
  },
});
const ROOT = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const CLI = path.join(ROOT, 'dist', 'cli.js');
const rounds = Number(values.rounds);

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'loopdev-test-bench-cycle-'));
const file = path.join(dir, 'disk.img');
fs.writeFileSync(file, '');
fs.truncateSync(file, 8 << 20);
const live: LoopDevice[] = [];
process.once('exit', () => {
  for (const d of live) d.detachSync(5000);
  // Anything losetup or the CLI left bound to our file (never anyone else's).
  for (const name of fs.readdirSync('/sys/block').filter((n) => n.startsWith('loop'))) {
    try {
      if (fs.readFileSync(`/sys/block/${name}/loop/backing_file`, 'utf8').trim() === file) detachSync(name, 5000);
    } catch {
      /* unbound */
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
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
    cycles: Number(values['losetup-cycles']),
    cycle() {
      const dev = run('losetup', ['--find', '--show', '--direct-io=on', file]);
      run('losetup', ['-d', dev]);
    },
  },
  {
    name: 'attach() + detach()',
    cycles: Number(values.cycles),
    async cycle() {
      const d = await attach(file);
      live.push(d);
      await d.detach();
      live.pop();
    },
  },
  {
    name: 'attachSync() + detachSync()',
    cycles: Number(values.cycles),
    cycle() {
      const d = attachSync(file);
      live.push(d);
      d.detachSync();
      live.pop();
    },
  },
];
if (fs.existsSync(CLI) && Number(values['cli-cycles']) > 0) {
  variants.push({
    name: 'loopdev CLI (node startup)',
    cycles: Number(values['cli-cycles']),
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

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
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
  `attach + verified detach cycle, ${rounds} rounds (medians), ${os.cpus().length} CPUs, kernel ${os.release()}`,
);
const header = ['variant'.padEnd(30), 'cycles'.padStart(8), 'ms/cycle'.padStart(10), 'losetup/variant'.padStart(17)];
console.log(header.join(''));
variants.forEach((v, i) => {
  console.log(
    `${v.name.padEnd(30)}${String(v.cycles).padStart(8)}${median(times[i]!).toFixed(3).padStart(10)}` +
      `${(median(ratios[i]!).toFixed(2) + 'x').padStart(17)}`,
  );
});
