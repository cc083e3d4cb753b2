/**
 * Memory and file descriptors over many attach/detach cycles.
 *
 *   npx tsx bench/memory.ts [CYCLES=100000] [--kind NAME] [--check]
 *
 * Cycles rotate, in blocks of 500, through the ways the API is used:
 *   sync          `using lo = ctl.loopForFdSync(fd)`
 *   async         `await using lo = await ctl.loopForFd(fd)`
 *   sync+setup    loopForFd with a `setup(lo)` callback (a temporary native handle per call)
 *   async+setup   loopForFd (async) with a `setup(lo)` callback (a threadsafe function per call)
 *   error         loopForFd with sizeLimit 2^64-1 (EOVERFLOW from LOOP_CONFIGURE: the error path, device
 *                 opened and dropped, error object built)
 * The event loop gets a turn between blocks (as in any real program; N-API finalizers run there). RSS, V8
 * heap and open fds are taken after a warm-up of 10,000 cycles (JIT tiers, allocator arenas and V8's code
 * space settle there), at five checkpoints and at the end, each after a full GC.
 * Targets: RSS growth < 5 MB, open fds unchanged (`--check` exits 1 otherwise).
 */
import * as fs from 'node:fs';
import { setImmediate as turn } from 'node:timers/promises';
import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import { LoopControl } from '../ts/index.js';
import { QUICK, intOption, machine, parseArgs, record, scratchImage, table } from './lib.js';

const TARGET_RSS_MB = 5;
const BLOCK = 500;
const WARMUP = QUICK ? 500 : 10_000;

const { opts, positional } = parseArgs();
const total = positional[0]
  ? intOption(new Map([['cycles', positional[0]]]), 'cycles', 0)
  : intOption(opts, 'cycles', QUICK ? 1000 : 100_000);
const check = opts.has('check');
record('memory');

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

const img = scratchImage();
const ctl = new LoopControl();
let detachTimeouts = 0;

type Kind = { name: string; cycle: () => void | Promise<void> };
const allKinds: Kind[] = [
  {
    name: 'sync',
    cycle: () => {
      using lo = ctl.loopForFdSync(img.fd);
      void lo;
    },
  },
  {
    name: 'async',
    cycle: async () => {
      try {
        await using lo = await ctl.loopForFd(img.fd);
        void lo;
      } catch (e) {
        if ((e as { code?: string }).code !== 'ETIMEDOUT') throw e;
        detachTimeouts++; // another process kept the device open for the whole 10 s timeout
      }
    },
  },
  {
    name: 'sync+setup',
    cycle: () => {
      using lo = ctl.loopForFdSync(img.fd, { setup: (l) => void l.minor });
      void lo;
    },
  },
  {
    name: 'async+setup',
    cycle: async () => {
      try {
        await using lo = await ctl.loopForFd(img.fd, { setup: (l) => void l.minor });
        void lo;
      } catch (e) {
        if ((e as { code?: string }).code !== 'ETIMEDOUT') throw e;
        detachTimeouts++;
      }
    },
  },
  {
    name: 'error',
    cycle: () => {
      try {
        using lo = ctl.loopForFdSync(img.fd, { sizeLimit: 2n ** 64n - 1n });
        void lo;
        throw new Error('sizeLimit 2^64-1 was accepted');
      } catch (e) {
        if ((e as { code?: string }).code !== 'EOVERFLOW') throw e;
      }
    },
  },
];

// --kind sync: only that way (with BENCH_TAG=sync, its own results file), to tell the kinds' costs apart.
const only = opts.get('kind');
const kinds = only === undefined ? allKinds : allKinds.filter((k) => k.name === only);
if (kinds.length === 0) throw new RangeError(`--kind must be one of ${allKinds.map((k) => k.name).join(', ')}`);

interface Snapshot {
  cycles: number;
  rss: number;
  heap: number;
  external: number;
  fds: number;
}

async function snapshot(cycles: number): Promise<Snapshot> {
  for (let i = 0; i < 3; i++) {
    gc();
    await turn(); // let finalizers queued by the GC run
  }
  const m = process.memoryUsage();
  return { cycles, rss: m.rss, heap: m.heapUsed, external: m.external, fds: fs.readdirSync('/proc/self/fd').length };
}

/** Runs `n` cycles (in blocks, rotating kinds); returns cycles done. */
async function run(n: number, offset: number): Promise<void> {
  for (let done = 0; done < n; ) {
    const kind = kinds[((offset + done) / BLOCK) % kinds.length | 0]!;
    const m = Math.min(BLOCK, n - done);
    for (let i = 0; i < m; i++) {
      const r = kind.cycle();
      if (r) await r;
    }
    done += m;
    await turn();
  }
}

const MB = (b: number): string => (b / 2 ** 20).toFixed(2);

async function main(): Promise<void> {
  console.log(`# memory and fds over ${total} attach/detach cycles — ${machine()}`);
  console.log(`# kinds (blocks of ${BLOCK}): ${kinds.map((k) => k.name).join(', ')}; warm-up ${WARMUP} cycles`);
  await run(WARMUP, 0);
  const snaps = [await snapshot(0)];
  const t0 = performance.now();
  const step = Math.max(BLOCK * kinds.length, Math.ceil(total / 5 / (BLOCK * kinds.length)) * BLOCK * kinds.length);
  for (let done = 0; done < total; ) {
    const n = Math.min(step, total - done);
    await run(n, WARMUP + done);
    done += n;
    snaps.push(await snapshot(done));
  }
  const secs = (performance.now() - t0) / 1000;
  ctl.close();

  const first = snaps[0]!;
  const rows = [['cycles', 'RSS MB', 'heap MB', 'external MB', 'open fds']];
  for (const s of snaps) rows.push([String(s.cycles), MB(s.rss), MB(s.heap), MB(s.external), String(s.fds)]);
  console.log('');
  table(rows);
  const last = snaps.at(-1)!;
  const growth = (last.rss - first.rss) / 2 ** 20;
  const fdDelta = last.fds - first.fds;
  const ok = growth < TARGET_RSS_MB && fdDelta === 0;
  const rss = snaps.map((s) => s.rss);
  const spread = (Math.max(...rss) - Math.min(...rss)) / 2 ** 20;
  console.log(
    `\n${total} cycles in ${secs.toFixed(1)} s (${Math.round(total / secs)}/s): RSS growth ${growth.toFixed(2)} MB ` +
      `(target < ${TARGET_RSS_MB} MB; checkpoints within ${spread.toFixed(2)} MB), open fds ` +
      `${fdDelta >= 0 ? '+' : ''}${fdDelta} (target 0): ${ok ? 'met' : 'MISSED'}`,
  );
  if (detachTimeouts) console.log(`# ${detachTimeouts} async detach(es) timed out (another process held the device)`);
  img.cleanup();
  if (check && !ok) process.exitCode = 1;
}

await main();
